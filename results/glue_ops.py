"""Eager ops a decode step issues outside the backbone's network (GPT.layers, what --compile turns into
a CUDA graph): the heads, top-k, the tree mask, verify, keep, the bookkeeping. Counted at the dispatcher
(TorchDispatchMode), so the count is the same on any machine; what each op costs is not. On the H200
(results/gpu_h200/) an eager op cost about 11-15 us (README, GPU), so these counts are most of a tree step there.
    python results/glue_ops.py > results/glue_ops.txt"""
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cerberus import DraftHeads, Tree, generate  # noqa: E402
from model import GPT, KVCache, chat_prompt, load_smollm2  # noqa: E402
from cerberus import load_heads  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts aten ops by the part of the step they belong to: "network" inside GPT.layers, "heads"
    inside a head set's forward, "glue" everything else."""
    part = "glue"

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[CountOps.part] += 1
        return func(*args, **(kwargs or {}))


def counted_as(part, method):
    def wrapper(*args, **kwargs):
        outer, CountOps.part = CountOps.part, part
        try:
            return method(*args, **kwargs)
        finally:
            CountOps.part = outer
    return wrapper


GPT.layers = counted_as("network", GPT.layers)
DraftHeads.__call__ = counted_as("heads", DraftHeads.__call__)


def ops_per_step(model, prompt, **kwargs):
    """Ops per decode step by part: a 33-token generation minus a 1-token one (prefill, first step)."""
    with CountOps() as long:
        _, stats = generate(model, prompt, 33, **kwargs)
    with CountOps() as short:
        generate(model, prompt, 1, **kwargs)
    return {part: (long.ops[part] - short.ops[part]) / (stats.steps - 1) for part in ("glue", "heads")}


model, tokenizer = load_smollm2()
prompt = chat_prompt(tokenizer, "Explain photosynthesis in two sentences.")
cache = KVCache(model.config, 512, static=True)  # what --compile decodes into
print("eager ops per decode step outside the backbone's network, static KV cache (the GPU path):")
print(f"  {'AR step':34s} glue {ops_per_step(model, prompt, cache=cache)['glue']:5.1f}")
for name in ("medusa", "cerberus"):
    heads, ckpt = load_heads(os.path.join(ROOT, "heads", f"{name}.pt"), model)
    heads = heads.to(torch.bfloat16)
    draft_weight = heads.draft_weight(model.lm_head.weight).to(torch.bfloat16)
    for tree in (Tree([tuple(p) for p in ckpt["gate"]["tree"]]), Tree.preset("sparse64")):
        ops = ops_per_step(model, prompt, heads=heads, tree=tree, draft_weight=draft_weight, cache=cache)
        label = f"{name} tree step, {tree.n_nodes} nodes, depth {tree.max_depth}"
        print(f"  {label:34s} glue {ops['glue']:5.1f}  heads {ops['heads']:5.1f}  total {ops['glue'] + ops['heads']:5.1f}")
