"""Tokens/s and tau of the cerberus arm against its gate threshold (0 = always AR, inf = always parallel):
where the entropy gate pays on this device. Every threshold and an AR run take turns on each prompt, so
the threshold-0 row (AR through the same loop) against the `ar` row shows the machine's noise. Takes
bench.py's flags; the re-calibrated threshold joins the fixed ones:
    python results/gate_sweep.py --prompts=../shared/data/mt_bench.jsonl --n_prompts=8 --max_new_tokens=64
(Before 2026-12-03 this was `python bench.py --arms=ar,cerberus --sweep` with the same other flags.)
"""
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
from cerberus import load_heads  # noqa: E402
from model import load_smollm2  # noqa: E402
from train import parse_cli, step_costs  # noqa: E402

THRESHOLDS = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, math.inf]  # nats


@torch.no_grad()
def main(argv):
    cfg = bench.BenchConfig(**parse_cli(bench.BenchConfig, argv))
    device, draft_dtype = torch.device(cfg.device), getattr(torch, cfg.draft_dtype)
    model, tokenizer = load_smollm2()
    model = model.to(device, getattr(torch, cfg.dtype)).eval()
    prompts = bench.load_prompts(cfg.prompts or os.path.join(ROOT, "data", "bench_prompts.jsonl"), tokenizer,
                                 cfg.n_prompts)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    heads, ckpt = load_heads(os.path.join(cfg.heads or os.path.join(ROOT, "heads"), "cerberus.pt"), model)
    lm_weight = model.lm_head.weight.to(draft_dtype)
    tree = bench.parse_tree(cfg.tree) if cfg.tree else None
    costs = step_costs(model, sorted(set(bench.STEP_SIZES) | {tree.n_nodes if tree else 1}), bench.STEP_PREFIX)
    head_sets = bench.recalibrate({"cerberus": (heads.to(device, draft_dtype), ckpt)}, costs, model, tree)
    max_len = max(len(p["ids"]) for p in prompts) + cfg.max_new_tokens + max(costs)
    settings = bench.arm_settings(["ar", "cerberus"], cfg, model, head_sets, eos_id, max_len)
    decoder, kwargs = settings["cerberus"]  # one decoder for every threshold: only the gate changes
    thresholds = sorted(set(THRESHOLDS) | {kwargs["gate_threshold"]})
    arms = {"ar": settings["ar"], **{f"{t:g}": (decoder, dict(kwargs, gate_threshold=t)) for t in thresholds}}
    for arm_decoder, arm_kwargs in arms.values():  # untimed warm-up
        arm_decoder.generate(prompts[0]["ids"], **dict(arm_kwargs, max_new_tokens=8))
    prefill = [bench.prefill_seconds(model, p["ids"]) for p in prompts]
    results = bench.report([bench.run_arms(model, prompts, arms)], prompts, prefill)
    print(f"{'threshold':>9} {'tok/s':>7} {'tau':>5} {'AR frac':>7}")
    for label, r in results.items():
        print(f"{label:>9} {r['tok_s']:7.2f} {r['tau']:5.2f} {r['ar_fraction']:7.3f}  "
              + "#" * round(40 * r["tok_s"] / max(q["tok_s"] for q in results.values())))
    print(json.dumps({label: {k: r[k] for k in ("tok_s", "tau", "ar_fraction")} for label, r in results.items()}))


if __name__ == "__main__":
    main(sys.argv[1:])
