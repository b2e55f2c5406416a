"""Draft cost of the shipped heads at depth 1-4 (bf16 drafts), eager vs heads.compile() (inductor on
this CPU): the one-off behind the README's "compiled drafts are no faster on this CPU".
    python results/compiled_drafts_cpu.py > results/compiled_drafts_cpu.txt"""
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import load_smollm2  # noqa: E402
from cerberus import load_heads  # noqa: E402
from train import draft_costs  # noqa: E402

model, _ = load_smollm2()
lm_weight = model.lm_head.weight.to(torch.bfloat16)
for name in ("cerberus", "medusa"):
    heads, _ = load_heads(os.path.join(ROOT, "heads", f"{name}.pt"), model)
    heads = heads.to(torch.bfloat16)
    eager = draft_costs(heads, lm_weight)
    heads.compile(mode="default")
    start = time.time()
    draft_costs(heads, lm_weight)
    print(f"{name}: compiling and a first measurement took {time.time() - start:.1f} s")
    compiled = draft_costs(heads, lm_weight)
    for label, costs in (("eager", eager), ("compiled", compiled)):
        print(f"  {label:9s} ms at depth 1-4: " + "  ".join(f"{1e3 * costs[d]:.2f}" for d in sorted(costs)))
