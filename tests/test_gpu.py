"""On a CUDA GPU (skipped elsewhere): lossless tree decoding of the real model in float32, and
compiled decode steps (one CUDA graph each) giving eager's tokens."""
import copy
import os

import pytest
import torch

from cerberus import Decoder, Sampling, Tree, generate, load_heads
from model import chat_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HEADS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "heads", "cerberus.pt")
QUESTIONS = ["Explain photosynthesis in two sentences.", "Write a haiku about the sea.",
             "What is 17 times 23? Show your steps."]


@pytest.fixture(scope="module")
def gpu(smollm):
    """(model, heads, prompts) on the GPU in float32; the session's CPU model is left where it is."""
    model, tokenizer = smollm
    model = copy.deepcopy(model).cuda()
    heads, _ = load_heads(HEADS, model)
    return model, heads, [chat_prompt(tokenizer, q) for q in QUESTIONS]


@torch.no_grad()
def test_float32_trees_on_the_gpu_give_greedy_ar(gpu):
    """Guards the GPU kernels (SDPA with a tree mask, index copies in `move`) against the CPU-only
    assumptions: every tree gives AR's tokens on the same device and dtype."""
    model, heads, prompts = gpu
    for prompt in prompts:
        expected = generate(model, prompt, 64)[0]
        for tree in (Tree.chain(4), Tree.preset("sparse16"), Tree.preset("sparse64")):
            assert generate(model, prompt, 64, heads=heads, tree=tree)[0] == expected


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@torch.no_grad()
def test_cuda_graph_steps_give_eager_tokens_and_skip_no_graph(gpu):
    """What `bench.py --device=cuda --compile` runs: each Decoder's step compiled whole with
    mode="reduce-overhead". In float32 the replayed CUDA graphs give eager decoding's tokens, greedy and
    sampled, AR and tree steps alike, and inductor skipped CUDA graphs for none of them."""
    from torch._dynamo.utils import counters
    model, heads, prompts = gpu
    counters.clear()
    for sampling in (Sampling(), Sampling(0.8, top_p=0.95)):
        kwargs = dict(temperature=sampling.temperature, top_p=sampling.top_p, seed=1)
        expected = [generate(model, p, 64, heads=heads, tree=Tree.preset("sparse16"), **kwargs)[0] for p in prompts]
        decoder = Decoder(model, heads, Tree.preset("sparse16"), sampling=sampling, max_len=256).compile("reduce-overhead")
        for prompt, ids in zip(prompts, expected):
            assert decoder.generate(prompt, 64, seed=1)[0] == ids
            assert decoder.generate(prompt, 64, gate_threshold=0.0, seed=1)[0] == ids  # AR steps
    assert counters["inductor"]["cudagraph_skips"] == 0 and not counters["graph_break"]
