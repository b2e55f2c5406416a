"""On a CUDA GPU (skipped elsewhere): lossless tree decoding of the real model in float32, and
compiled decode steps (CUDA graphs on a static cache) giving eager's tokens."""
import copy
import os

import pytest
import torch

from cerberus import Tree, generate
from model import KVCache, chat_prompt
from cerberus import load_heads

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
    """Guards the GPU kernels (SDPA with a tree mask, index copies in `keep`) against the CPU-only
    assumptions: every tree gives AR's tokens on the same device and dtype."""
    model, heads, prompts = gpu
    for prompt in prompts:
        expected = generate(model, prompt, 64)[0]
        for tree in (Tree.chain(4), Tree.preset("sparse16"), Tree.preset("sparse64")):
            assert generate(model, prompt, 64, heads=heads, tree=tree)[0] == expected


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@torch.no_grad()
def test_cuda_graph_steps_give_eager_tokens(gpu):
    """What `bench.py --device=cuda --compile` runs: compile_steps("reduce-overhead"), compiled heads
    and one static cache for every call. In float32 the replayed graphs give eager AR's tokens, for AR
    and trees."""
    model, heads, prompts = gpu
    expected = [generate(model, p, 64)[0] for p in prompts]
    compiled, compiled_heads = copy.deepcopy(model).compile_steps(mode="reduce-overhead"), copy.deepcopy(heads)
    compiled_heads.compile(mode="reduce-overhead")  # as bench.py --compile does: drafts replay too
    cache = KVCache(model.config, 256, device="cuda", static=True)
    for prompt, ids in zip(prompts, expected):
        assert generate(compiled, prompt, 64, cache=cache)[0] == ids
        assert generate(compiled, prompt, 64, heads=compiled_heads, tree=Tree.preset("sparse16"), cache=cache)[0] == ids
