"""The decode step is one graph: one host read per step, no data-dependent shapes, compiled whole
(fullgraph) without recompiling across steps and prompts, nothing CUDA graphs refuse, and compiled
tokens equal eager ones. The CPU's proof that a GPU will replay each step as one CUDA graph."""
import collections
import dataclasses

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._inductor.utils import get_first_incompatible_cudagraph_node
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from cerberus import CerberusHeads, Decoder, MedusaHeads, Sampling, Tree, forward_prompt, generate
from conftest import TINY, perturb, tiny_gpt
from test_cerberus import PROMPT, mid_threshold

HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}
DATA_DEPENDENT = {"nonzero", "masked_select", "_local_scalar_dense", "unique", "_unique2", "repeat_interleave"}
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit internals that inductor imports


class CountHostReads(TorchFunctionMode):
    """Tensor -> Python value conversions (each waits for the device), and the ops whose output shape
    depends on values (they read a size back) seen at the dispatcher."""

    def __init__(self):
        super().__init__()
        self.reads, self.ops = 0, collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in HOST_READS
        return func(*args, **(kwargs or {}))


class CountOps(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counter[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def reads_and_ops(decoder, n_tokens, threshold):
    """(host reads, op counts, steps) of one generate call on the decoder."""
    with CountHostReads() as reads, CountOps(reads.ops):
        _, stats = decoder.generate(PROMPT, n_tokens, gate_threshold=threshold, seed=3)
    return reads.reads, reads.ops, stats.steps


@pytest.mark.parametrize("heads,gate_on,temperature", [(None, "backbone", 0.0), ("medusa", "backbone", 0.0),
                                                       ("cerberus", "backbone", 0.8), ("cerberus", "head1", 0.0)])
def test_one_host_read_per_step_and_no_data_dependent_shape(heads, gate_on, temperature):
    """Guards the sync count that made tree steps slow on a GPU (3 reads and a nonzero per tree step):
    a decode step, AR or tree, reads the device once, and no op anywhere has a value-dependent shape."""
    model = tiny_gpt(0)
    heads = {None: None, "medusa": perturb(MedusaHeads(TINY, 4), 0),
             "cerberus": perturb(CerberusHeads(TINY, 4, link="token", reads_root=True), 0)}[heads]
    threshold = float("inf") if heads is None else mid_threshold(model, heads, gate_on)
    decoder = Decoder(model, heads, Tree.preset("sparse16") if heads else None, gate_on, Sampling(temperature),
                      max_len=64)
    short_reads, short_ops, short_steps = reads_and_ops(decoder, 1, threshold)
    long_reads, long_ops, long_steps = reads_and_ops(decoder, 30, threshold)
    assert long_steps - short_steps >= 20
    assert long_reads - short_reads == long_steps - short_steps  # one per step; the prefill's are the same
    step_ops = long_ops - short_ops  # what the extra steps ran
    assert step_ops["mm"] > 0 and not DATA_DEPENDENT & set(step_ops), DATA_DEPENDENT & set(step_ops)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_eager_steps_over_the_committed_slots_decode_as_steps_over_every_slot(temperature):
    """generate's eager steps attend over the committed slots plus the tree's (n_slots); fixed_shapes, as compiled,
    over all max_len. Same tokens and accepted lengths, AR and tree steps alike, and the gate's entropies up to
    float rounding (sums over fewer slots); a slot count off by one would hide a committed token or a node's own slot."""
    model, heads = tiny_gpt(0), perturb(CerberusHeads(TINY, 3, link="token", reads_root=True), 1)
    threshold = mid_threshold(model, heads)
    runs = []
    for fixed_shapes in (False, True):
        decoder = Decoder(model, heads, Tree.preset("sparse16"), sampling=Sampling(temperature), max_len=128)
        decoder.fixed_shapes = fixed_shapes
        ids, stats = decoder.generate(PROMPT, 40, gate_threshold=threshold, seed=3, trace=True)
        runs.append((ids, stats.accept_lengths, torch.tensor([step["gate"] for step in stats.trace])))
        assert 0 < stats.ar_steps < stats.steps
    assert runs[0][:2] == runs[1][:2]
    torch.testing.assert_close(runs[0][2], runs[1][2])


def test_step_compiles_whole_and_never_recompiles():
    """fullgraph=True, dynamic=False: the step is one graph with no break; after one warm-up prompt with
    both kinds of step, 20+ steps of other prompts, lengths, seeds and accepted lengths (0 to 3: zero-init
    heads draft the backbone's own token again, right whenever it repeats) reuse the same two graphs, AR
    and tree, greedy and sampled alike; no node of them is one CUDA graphs refuse (a host sync, an
    unbacked size). Captured without code generation: seconds."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    model, heads = tiny_gpt(0), CerberusHeads(TINY, 4, link="token", reads_root=True)
    threshold = mid_threshold(model, heads)
    counters.clear()
    for sampling in (Sampling(), Sampling(0.9, top_k=20, top_p=0.9)):
        decoder = Decoder(model, heads, Tree.preset("sparse16"), sampling=sampling, max_len=96)
        decoder.step = torch.compile(decoder.step, fullgraph=True, dynamic=False,
                                     backend=aot_autograd(fw_compiler=capture))
        decoder.fixed_shapes = True  # what Decoder.compile sets: every step attends over all max_len slots
        warm = decoder.generate(PROMPT, 30, gate_threshold=threshold)[1]
        assert 0 < warm.ar_steps < warm.steps
        accepted = set()
        with torch.compiler.set_stance("fail_on_recompile"):
            for prompt, seed in [([3, 1, 4, 1, 5, 9, 2, 6], 1), ([2, 7], 2)]:
                ids, stats = decoder.generate(prompt, 40, gate_threshold=threshold, seed=seed)
                assert stats.steps >= 20 and 0 < stats.ar_steps < stats.steps
                assert ids == generate(model, prompt, 40, temperature=sampling.temperature, top_k=sampling.top_k,
                                       top_p=sampling.top_p, seed=seed)[0]
                accepted |= set(stats.accept_lengths)
        assert sampling.temperature > 0 or len(accepted) >= 3, accepted
    assert len(graphs) == 4 and not counters["graph_break"]
    assert [get_first_incompatible_cudagraph_node(gm) for gm in graphs] == [None] * 4


@torch.no_grad()
def test_compiled_prompts_pad_to_a_few_lengths_each_one_graph_cuda_graphs_accept():
    """Compiled, a prompt's forward runs padded to 64, 128, ... tokens (at most the cache or the context): a few
    graphs cover every prompt. The padding changes nothing before it (causal attention): the real tokens' keys,
    values and last logits are the unpadded forward's; and no node is one CUDA graphs refuse."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    model = tiny_gpt(0)
    assert [Decoder(model, max_len=100).prompt_slots(P) for P in (1, 64, 65)] == [1, 64, 65]  # eager: as given
    decoder = Decoder(model, max_len=100).compile()  # lazy: nothing compiles before a call
    assert [decoder.prompt_slots(P) for P in (1, 64, 65, 99)] == [64, 64, 100, 100]
    short_context = tiny_gpt(0, dataclasses.replace(TINY, block_size=96))
    assert Decoder(short_context, max_len=200).compile().prompt_slots(65) == 96  # the context caps it
    padded_forward = torch.compile(forward_prompt, fullgraph=True, dynamic=False,
                                   backend=aot_autograd(fw_compiler=capture))
    for P in (5, 60, 70):
        tokens, last = torch.randint(0, TINY.vocab_size, (P,)), torch.tensor([P - 1])
        padding = tokens.new_zeros(decoder.prompt_slots(P) - P)
        k, v, logits, hidden = padded_forward(model, torch.cat([tokens, padding]), last)
        k0, v0, logits0, hidden0 = forward_prompt(model, tokens, last)
        for padded, unpadded in [(k[..., :P, :], k0), (v[..., :P, :], v0), (logits, logits0), (hidden, hidden0)]:
            torch.testing.assert_close(padded, unpadded)
    assert len(graphs) == 2  # 64 and 100 slots
    assert [get_first_incompatible_cudagraph_node(gm) for gm in graphs] == [None] * 2


@torch.no_grad()
def test_inductor_compiled_step_decodes_like_eager():
    """Real code generation (inductor on the CPU, what bench.py --compile runs on a CPU): the compiled
    step's tokens equal eager decoding's, sampled (the position hash, top-k, top-p) and gated."""
    model, heads = tiny_gpt(1), CerberusHeads(TINY, 4, link="token", reads_root=True)  # zero init: some accepted
    threshold = mid_threshold(model, heads)
    decoder = Decoder(model, heads, Tree.preset("sparse8"), sampling=Sampling(0.7, top_k=30, top_p=0.95),
                      max_len=80).compile()
    for prompt, seed in [(PROMPT, 0), ([9, 8, 7, 6, 5, 4, 3, 2, 1], 5)]:
        ids, stats = decoder.generate(prompt, 40, gate_threshold=threshold, seed=seed)
        expected = generate(model, prompt, 40, heads=heads, tree=Tree.preset("sparse8"), gate_threshold=threshold,
                            temperature=0.7, top_k=30, top_p=0.95, seed=seed)
        assert ids == expected[0] and stats == expected[1]
