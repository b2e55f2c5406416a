"""Per-head top-1 of any head checkpoints on the backbone's own greedy answers to MT-Bench's 80 first turns (128
tokens, float32, batch 1, as bench.py's AR arm), and head 1's per category; drafts in bfloat16, as the benchmark
runs them. No timing. The answers' positions are cached in runs/mt_bench_positions.pt (8 minutes to make on the
2-core EPYC):
    python results/mt_bench_heads.py shipped=heads/cerberus.pt quick=runs/quick/cerberus.pt
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
import bench  # noqa: E402
from cerberus import load_heads, write_atomically  # noqa: E402
from heads_compare import PROMPT_SETS, benchmark_positions, print_top1  # noqa: E402
from model import load_smollm2  # noqa: E402

CACHE = os.path.join(ROOT, "runs", "mt_bench_positions.pt")


def mt_bench_positions(model, tokenizer):
    """({"hidden" (M, C), "targets" (M, 5)}, M categories) of the AR answers to MT-Bench's first turns."""
    if not os.path.exists(CACHE):
        positions = benchmark_positions(model, tokenizer, PROMPT_SETS["MT-Bench"])
        write_atomically(CACHE, lambda tmp: torch.save(positions, tmp))
    return torch.load(CACHE)


@torch.no_grad()
def main(named_paths):
    model, tokenizer = load_smollm2()
    data, categories = mt_bench_positions(model.eval(), tokenizer)
    head_sets = {name: (load_heads(path, model)[0].to(torch.bfloat16), None)
                 for name, path in (arg.split("=", 1) for arg in named_paths)}
    overall, by_category = bench.score_heads(head_sets, model.lm_head.weight.to(torch.bfloat16), data, categories)
    print_top1(f"MT-Bench first turns, AR answers: {len(categories)} positions; top-1", overall, by_category)

if __name__ == "__main__":
    if len(sys.argv) < 2 or not all("=" in arg for arg in sys.argv[1:]):
        raise SystemExit(__doc__)
    main(sys.argv[1:])
