"""joint_tree.py's question asked of MT-Bench: do trees grown from the heads' joint acceptance (its joint_best) beat
Tree.best's, which assumes each head is right independently as calibrate does (from the checkpoint's accuracy
table), on other prompts than the ones they are grown on? Both are grown on the shipped Cerberus heads' held-out
calibration positions and scored, as drafts accepted per tree step with no gate, there (in-sample) and on
MT-Bench's first-turn AR answers (results/mt_bench_heads.py's cached positions; drafts in bfloat16, as the
benchmark runs them). No timing.
    python results/joint_tree_mt_bench.py > results/joint_tree_mt_bench.txt
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cerberus import Tree, load_heads  # noqa: E402
from joint_tree import joint_best  # noqa: E402
from model import load_smollm2  # noqa: E402
from mt_bench_heads import mt_bench_positions  # noqa: E402
from train import accepted_lengths, target_ranks  # noqa: E402


@torch.no_grad()
def main():
    model, tokenizer = load_smollm2()
    heads, checkpoint = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)
    held_out = checkpoint["calibration"]["ranks"]
    data, _ = mt_bench_positions(model.eval(), tokenizer)
    mt_bench = target_ranks(heads.to(torch.bfloat16), model.lm_head.weight.to(torch.bfloat16), data, heads.n_heads)
    print(f"drafts accepted per tree step, no gate; trees grown on {len(held_out)} held-out positions, "
          f"MT-Bench {len(mt_bench)} positions")
    for n in (4, 8, 16, 32, 64):
        trees = {"Tree.best": Tree.best(checkpoint["gate"]["accuracy_table"], n), "joint": joint_best(held_out, n)}
        print(f"  {n:2d} nodes: " + ", ".join(
            f"{name} held-out {accepted_lengths(held_out, t).float().mean():.3f} MT-Bench "
            f"{accepted_lengths(mt_bench, t).float().mean():.3f} (depth {t.max_depth})" for name, t in trees.items()))


if __name__ == "__main__":
    main()
