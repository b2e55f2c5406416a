"""Cerberus decoding is lossless: for any heads, tree and gate it emits exactly greedy AR's tokens."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import cerberus
from cerberus import CerberusHeads, MedusaHeads, Tree, generate, parameter_count, verify
from conftest import TINY, perturb, tiny_gpt
from model import GPTConfig, KVCache

PROMPT = [5, 17, 99, 3, 42]
HAND_MADE = {
    "chain": [(0,), (0, 0), (0, 0, 0)],
    "wide_shallow": [(0,), (1,), (2,), (3,), (4,), (5,)],
    "single_node": [(0,)],
    "lopsided": [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)],
}
TREES = {**{name: Tree.preset(name) for name in ["chain1", "chain4", "sparse8", "sparse16", "sparse32", "sparse64"]},
         **{name: Tree(paths) for name, paths in HAND_MADE.items()}}


def mid_threshold(model, heads, gate_on="backbone"):
    """The median entropy the gate reads on PROMPT's decode: a threshold that sends about half the
    steps each way (a tiny random model's entropies all lie near log(256), so a fixed one would not)."""
    _, stats = generate(model, PROMPT, 30, heads=heads, gate_on=gate_on, trace=True)
    return float(torch.tensor([step["gate"] for step in stats.trace]).median())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind,spec", [(MedusaHeads, {}), (CerberusHeads, {}), (CerberusHeads, dict(n_layers=2)),
                                       (CerberusHeads, dict(reads_root=True)), (MedusaHeads, dict(reads_root=True)),
                                       (CerberusHeads, dict(link="token")), (CerberusHeads, dict(link="token", reads_root=True))])
def test_every_tree_gate_and_eos_reproduces_greedy_ar(seed, kind, spec):
    """The central promise: verification never lets a wrong draft through, nor loses a token."""
    model = tiny_gpt(seed)
    heads = perturb(kind(TINY, n_heads=4, **spec), seed)
    reference, _ = generate(model, PROMPT, max_new_tokens=30)
    eos = reference[13]  # a token that does occur, to exercise cutting inside accepted chunks
    reference_eos = reference[:reference.index(eos) + 1]
    gates = [(0.0, "backbone"), (mid_threshold(model, heads), "backbone"),
             (mid_threshold(model, heads, "head1"), "head1"), (math.inf, "backbone")]
    for name, tree in TREES.items():
        for threshold, gate_on in gates:
            ids, stats = generate(model, PROMPT, 30, heads=heads, tree=tree, gate_threshold=threshold, gate_on=gate_on)
            assert ids == reference, (name, threshold, gate_on)
            assert stats.new_tokens == 30
        ids, _ = generate(model, PROMPT, 30, heads=heads, tree=tree, eos_id=eos)
        assert ids == reference_eos, name


def test_a_draft_vocabulary_keeps_the_output_and_drafts_only_its_tokens():
    """Heads that draft over a subset of the vocabulary still reproduce greedy AR exactly, and every
    drafted token (all nodes but the root) is one of the subset's, even when AR's tokens are not."""
    model = tiny_gpt(3)
    reference, _ = generate(model, PROMPT, 30)
    some = torch.randperm(TINY.vocab_size, generator=torch.Generator().manual_seed(0))[:100].tolist()
    none_of_ar = sorted(set(range(TINY.vocab_size)) - set(reference))  # no draft can ever be accepted
    for vocab in (some, none_of_ar):
        heads = perturb(CerberusHeads(TINY, 4, reads_root=True), 3).draft_over(vocab)
        for tree in (Tree.preset("sparse16"), Tree.chain(3)):
            ids, stats = generate(model, PROMPT, 30, heads=heads, tree=tree, trace=True)
            assert ids == reference
            assert {t for step in stats.trace for t in step["tree"][1:]} <= set(vocab)
            if vocab is none_of_ar:
                assert set(stats.accept_lengths) == {0}


def test_propose_maps_draft_columns_to_token_ids():
    drafts = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.1]])  # 2 heads x 3 columns
    tree = Tree([(0,), (1,), (0, 0)])  # head 1's top-2, head 2's top-1 under head 1's best
    assert cerberus.propose(drafts, torch.tensor([4]), tree).tolist() == [4, 1, 2, 0]
    assert cerberus.propose(drafts, torch.tensor([4]), tree, vocab=torch.tensor([30, 10, 20])).tolist() == [4, 10, 20, 30]


def test_gate_extremes():
    """Threshold 0 never runs a parallel step; infinity never runs an AR step."""
    model, heads = tiny_gpt(), perturb(CerberusHeads(TINY, 4), 0)
    _, always_ar = generate(model, PROMPT, 20, heads=heads, tree=Tree.preset("sparse8"), gate_threshold=0.0)
    _, never_ar = generate(model, PROMPT, 20, heads=heads, tree=Tree.preset("sparse8"))
    assert always_ar.ar_steps == always_ar.steps == 20 and always_ar.accept_lengths == []
    assert never_ar.ar_steps == 0 and len(never_ar.accept_lengths) == never_ar.steps


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_oracle_drafts_are_accepted_to_full_depth(depth, monkeypatch):
    """Drafts equal to the true greedy future are always accepted: each step yields depth + 1 tokens."""
    model = tiny_gpt(1)
    reference, _ = generate(model, PROMPT, max_new_tokens=41)
    position = {"next": 0}  # index in `reference` of the root of the coming step

    def oracle(drafts, root, tree, vocab=None):
        j = position["next"]
        assert int(root) == reference[j]  # holds only if every earlier step accepted fully
        position["next"] = j + depth + 1
        future = reference[j + 1:j + 1 + depth] + [0] * depth  # pad past the end: never checked
        return torch.tensor([reference[j]] + future[:depth])

    monkeypatch.setattr(cerberus, "propose", oracle)
    ids, stats = generate(model, PROMPT, 41, heads=CerberusHeads(TINY, 4), tree=Tree.chain(depth))
    assert ids == reference
    assert stats.steps == math.ceil(41 / (depth + 1))
    assert stats.accept_lengths[:-1] == [depth] * (stats.steps - 1)


@torch.no_grad()
def test_tree_node_logits_equal_running_its_path_as_a_sequence():
    """Guards tree positions (L + depth, not L + index) and the ancestor mask."""
    model, tree = tiny_gpt(2), Tree.preset("sparse16")
    prefix = torch.tensor([PROMPT])
    tokens = torch.randint(0, 256, (tree.n_nodes,))
    cache = KVCache(TINY, 64)
    model(prefix, cache)
    cache.length = prefix.shape[1]
    logits, hidden = model(tokens[None], cache, pos=cache.length + tree.depth,
                           mask=tree.mask(cache.length, cache.length + tree.n_nodes))
    for node in range(tree.n_nodes):
        path = tokens[tree.ancestors[node]]
        plain_logits, plain_hidden = model(torch.cat([prefix[0], path])[None])
        torch.testing.assert_close(logits[0, node], plain_logits[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden[0, node], plain_hidden[0, -1], atol=1e-5, rtol=1e-5)


def test_tree_from_paths_derives_structure():
    tree = Tree([(1,), (0,), (0, 0), (0, 1), (0, 0, 0)])  # order of the input does not matter
    assert tree.paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.rank.tolist() == [0, 0, 1, 0, 1, 0]
    assert tree.ancestors[5].tolist() == [True, True, False, True, False, True]
    assert tree.path.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 2, 2, 2], [0, 1, 3, 3], [0, 1, 4, 4], [0, 1, 3, 5]]
    assert tree.on_path[5] == [0, 1, 3, 5]
    assert tree.mask(2, 8)[5].tolist() == [True, True, True, True, False, True, False, True]
    assert (tree.mask(2, 8).sum(1) >= 1).all()  # no fully masked row (it would give NaN)
    # the decode step's mask spans every cache slot and takes the length as a tensor: no slot past the tree is seen
    assert torch.equal(tree.mask(torch.tensor([2]), 11), torch.cat([tree.mask(2, 8), torch.zeros(6, 3, dtype=torch.bool)], 1))
    assert Tree.chain(3).parents.tolist() == [-1, 0, 1, 2]
    for n in (8, 16, 32, 64):
        assert Tree.preset(f"sparse{n}").n_nodes == n and Tree.preset(f"sparse{n}").max_depth <= 4


def test_verify_picks_deepest_fully_correct_path():
    tree = Tree([(0,), (1,), (0, 0), (1, 0)])  # nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (1,0)
    tokens = torch.tensor([7, 8, 9, 10, 11])
    target = torch.tensor([9, 5, 11, 0, 0])  # after root: 9 (node 2 right); after node 2: 11 (node 4 right)
    assert verify(tokens, target, tree).tolist() == [4] and tree.on_path[4] == [0, 2, 4]
    target = torch.tensor([8, 3, 11, 0, 0])  # node 1 right, node 3 wrong, node 4 right but its parent wrong
    assert verify(tokens, target, tree).tolist() == [1]
    target = torch.tensor([1, 1, 1, 1, 1])
    assert verify(tokens, target, tree).tolist() == [0]


def states(heads, h, root_vec=None):
    """Each head's final state, (K, M, C): its logits through an identity 'lm_head' (D = C)."""
    return heads(h, torch.eye(TINY.n_embd), heads.n_heads, root_vec)


def test_heads_share_no_parameters_and_start_as_identity():
    for heads in (MedusaHeads(TINY, 4, n_layers=2), CerberusHeads(TINY, 4), CerberusHeads(TINY, 4, reads_root=True),
                  CerberusHeads(TINY, 4, link="token")):
        ptrs = [p.data_ptr() for p in heads.parameters()]
        assert len(ptrs) == len(set(ptrs))
        h, root_vec = torch.randn(3, TINY.n_embd), torch.randn(3, TINY.n_embd)
        assert torch.equal(states(heads, h, root_vec), h.expand(4, 3, TINY.n_embd))  # zero init: every head is h
        lm_weight = torch.randn(TINY.vocab_size, TINY.n_embd)
        for n in (1, 4):  # the first n heads, through the shared lm_head
            torch.testing.assert_close(heads(h, lm_weight, n, root_vec), (h @ lm_weight.T).expand(n, 3, -1))
    # Cerberus: 4 heads x (C*C + 2C*C) weights; a 3-block Medusa matches it (but for one bias per head)
    cerberus_size, medusa3_size = parameter_count(CerberusHeads(TINY, 4)), parameter_count(MedusaHeads(TINY, 4, 3))
    assert medusa3_size - cerberus_size == 4 * TINY.n_embd


def test_cerberus_head_k_reads_head_k_minus_1():
    """The sequential link: changing head 1's stage-1 weights changes head 2's output, not head 3's
    through anything but head 2 — and Medusa heads stay independent."""
    h, root_vec = torch.randn(5, TINY.n_embd), torch.randn(5, TINY.n_embd)
    heads = perturb(CerberusHeads(TINY, 4), 0)
    before = states(heads, h, root_vec)
    with torch.no_grad():
        heads.w1[0, 0] += 0.5  # (layer, head)
    after = states(heads, h, root_vec)
    assert not torch.allclose(before[0], after[0]) and not torch.allclose(before[1], after[1])
    assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
    medusa = perturb(MedusaHeads(TINY, 4), 0)
    before = states(medusa, h, root_vec)
    with torch.no_grad():
        medusa.weight[0, 0] += 0.5
    assert torch.equal(before[1:], states(medusa, h, root_vec)[1:])


def test_token_link_reads_the_previous_heads_top_token_only():
    """link='token': head 1 reads the root's lm_head row; head k > 1 reads the row of head k-1's
    argmax scaled by its probability (checked against a hand computation), and a later head never
    changes an earlier one."""
    torch.manual_seed(0)
    h, lm_weight = torch.randn(1, TINY.n_embd), torch.randn(TINY.vocab_size, TINY.n_embd)
    heads = perturb(CerberusHeads(TINY, 3, link="token"), 0)
    root = lm_weight[5:6]
    logits = heads(h, lm_weight, 3, root)  # (3, 1, V)
    z = [h + F.silu(h @ heads.w1[0, k].T + heads.b1[0, k]) for k in range(2)]  # stage 1 of heads 1, 2
    head1 = (z[0] + F.silu(torch.cat([z[0], root], -1) @ heads.w2[0].T + heads.b2[0])) @ lm_weight.T
    x1 = head1.softmax(-1).max() * lm_weight[head1.argmax()][None]  # head 1's top token, scaled by its probability
    head2 = (z[1] + F.silu(torch.cat([z[1], x1], -1) @ heads.w2[1].T + heads.b2[1])) @ lm_weight.T
    torch.testing.assert_close(logits[0], head1, rtol=1e-3, atol=1e-3)  # model.linear sums in another order
    torch.testing.assert_close(logits[1], head2, rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        heads.w2[2] += 0.5
    assert torch.equal(heads(h, lm_weight, 3, root)[:2], logits[:2])
    with pytest.raises(ValueError, match="root_vec"):
        heads(h, lm_weight, 3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit internals that inductor imports
@torch.no_grad()
def test_compiled_heads_draft_what_eager_heads_do():
    """bench.py --compile also compiles the heads (on a GPU their few dozen small ops per draft
    become one CUDA graph). Token-linked heads reading the root, the kind with a loop: compiled
    logits equal eager ones, for one position (a decode step) and for a batch."""
    torch.manual_seed(0)
    lm_weight = torch.randn(TINY.vocab_size, TINY.n_embd)
    heads = perturb(CerberusHeads(TINY, 3, reads_root=True, link="token"), 0)
    compiled = copy.deepcopy(heads)
    compiled.compile(mode="default")  # reduce-overhead needs CUDA
    for M in (1, 5):
        h, root = torch.randn(M, TINY.n_embd), lm_weight[torch.randint(0, TINY.vocab_size, (M,))]
        torch.testing.assert_close(compiled(h, lm_weight, 3, root), heads(h, lm_weight, 3, root), rtol=1e-4, atol=1e-4)


def test_only_the_root_reading_variant_reads_the_root():
    """The paper's heads ignore the root token; reads_root=True heads change with it, every head."""
    h, root_vec, other = torch.randn(3, TINY.n_embd), torch.randn(3, TINY.n_embd), torch.randn(3, TINY.n_embd)
    for kind in (MedusaHeads, CerberusHeads):
        paper, variant = perturb(kind(TINY, 4), 0), perturb(kind(TINY, 4, reads_root=True), 0)
        assert torch.equal(states(paper, h, root_vec), states(paper, h, other))
        assert torch.equal(states(paper, h), states(paper, h, other))
        changed = (states(variant, h, root_vec) - states(variant, h, other)).abs().amax(dim=(1, 2))  # (K,)
        assert (changed > 1e-3).all()
        with pytest.raises(ValueError, match="read the root token"):
            states(variant, h)


def test_bad_input_is_a_value_error():
    model = tiny_gpt()
    heads = CerberusHeads(TINY, n_heads=2)
    with pytest.raises(ValueError, match="needs 3 heads"):
        generate(model, PROMPT, 8, heads=heads, tree=Tree.chain(3))
    with pytest.raises(ValueError, match="unknown tree preset"):
        Tree.preset("bushy9")
    other = GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=128)
    with pytest.raises(ValueError, match="another model|train heads"):
        generate(model, PROMPT, 8, heads=MedusaHeads(other, 2), tree=Tree.chain(1))
    other = GPTConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128)
    with pytest.raises(ValueError, match="train heads for this model"):
        generate(model, PROMPT, 8, heads=CerberusHeads(other, 2), tree=Tree.chain(1))
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 8, heads=heads, tree=Tree.chain(1))
    with pytest.raises(ValueError, match="lacks its parent"):
        Tree([(0, 0)])
    with pytest.raises(ValueError, match="needs draft heads"):
        generate(model, PROMPT, 8, tree=Tree.chain(1))
    with pytest.raises(ValueError, match="token ids in"):
        CerberusHeads(TINY, 2).draft_over([3, 256])
    with pytest.raises(ValueError, match="unknown gate_on"):
        generate(model, PROMPT, 8, heads=heads, gate_on="head2")
    with pytest.raises(ValueError, match="gate_threshold is NaN"):
        generate(model, PROMPT, 8, heads=heads, gate_threshold=math.nan)
    decoder = cerberus.Decoder(model, heads, Tree.chain(2), max_len=20)
    with pytest.raises(ValueError, match="overflow the decoder's KV cache of 20 slots"):
        decoder.generate(PROMPT, 14)


def test_trace_records_each_step():
    model, heads = tiny_gpt(), perturb(MedusaHeads(TINY, 4), 1)
    threshold = mid_threshold(model, heads)
    ids, stats = generate(model, PROMPT, 12, heads=heads, tree=Tree.preset("sparse8"), gate_threshold=threshold,
                          trace=True)
    assert len(stats.trace) == stats.steps
    assert sum(len(s["emitted"]) for s in stats.trace) == len(ids)
    assert 0 < stats.ar_steps < stats.steps  # both kinds of step are traced
    for step in stats.trace:
        assert (step["tree"] is None) == (step["path"] is None) and step["gate"] > 0
        if step["path"] is not None:
            assert step["gate"] < threshold
            assert step["emitted"] == [step["tree"][i] for i in step["path"]][:len(step["emitted"])]
        else:
            assert step["gate"] >= threshold


def test_decoding_imports_no_training_or_benchmark_code():
    """The README's promise: model.py and cerberus.py alone decode with the shipped heads."""
    import subprocess
    import sys
    code = "import sys, cerberus; sys.exit(sorted({'train', 'bench'} & set(sys.modules)) or 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=cerberus.__file__.rsplit("/", 1)[0]).returncode == 0
