"""Head-1 top-1 against training positions: Cerberus heads (+token+root) trained from scratch by train.py on the
first 1, 2, 4, ... answer shards, and, to tell data from steps, several epochs of fewer; each run's held-out lines
and MT-Bench's AR answers (results/mt_bench_heads.py). Is more of this data what the heads lack? Draws
results/learning_curve.png.
    python train.py --heads=cerberus+token+root --n_shards=N --out_dir=runs/lcN      # for each N
    python train.py --heads=cerberus+token+root --epochs=4 --out_dir=runs/lc1x4
    python results/learning_curve.py runs/lc1 runs/lc2 runs/lc4 runs/lc1x4 [reference=heads/cerberus.pt]
"""
import json
import os
import sys

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
import bench  # noqa: E402
from cerberus import load_heads  # noqa: E402
from model import load_smollm2  # noqa: E402
from mt_bench_heads import mt_bench_positions  # noqa: E402

NAME = "cerberus+token+root"


@torch.no_grad()
def main(run_dirs, reference=None):
    model, tokenizer = load_smollm2()
    data, categories = mt_bench_positions(model.eval(), tokenizer)
    lm_weight = model.lm_head.weight.to(torch.bfloat16)

    def mt_bench_head1(path):
        heads = load_heads(path, model)[0].to(torch.bfloat16)
        return bench.score_heads({"heads": (heads, None)}, lm_weight, data, categories)[0]["heads"]["head1"]["top1"]
    points = {}  # epochs -> [(positions trained on, held-out head 1, MT-Bench head 1)]
    for run in run_dirs:
        metrics = json.load(open(os.path.join(ROOT, run, "metrics.json")))
        epochs = metrics["config"]["epochs"]
        point = (metrics["positions"] * epochs, metrics["heads"][NAME]["held_out"]["head1"]["top1"],
                 mt_bench_head1(os.path.join(ROOT, run, f"{NAME}.pt")))
        points.setdefault(epochs, []).append(point)
        print(f"{run}: {metrics['positions']:,} training positions x {epochs} epochs, head 1 top-1 held-out "
              f"{point[1]:.3f}, MT-Bench {point[2]:.3f}", flush=True)
    plt.figure(figsize=(6, 4))
    for epochs, runs in sorted(points.items()):
        positions, held_out, mt_bench = zip(*runs)
        label = "" if epochs == 1 else f", {epochs} epochs of one shard"
        plt.plot(positions, held_out, "o-" if epochs == 1 else "o", color="C0", mfc="none" if epochs > 1 else None,
                 label=f"held-out lines of those shards{label}")
        plt.plot(positions, mt_bench, "s-" if epochs == 1 else "s", color="C1", mfc="none" if epochs > 1 else None,
                 label=f"MT-Bench first turns, AR answers{label}")
    if reference:
        head1 = mt_bench_head1(os.path.join(ROOT, reference))
        print(f"{reference}: MT-Bench {head1:.3f}")
        plt.axhline(head1, color="gray", ls="--", label=f"{reference} on MT-Bench")
    plt.xscale("log")
    plt.xlabel("positions trained on (data x epochs; heads from scratch)")
    plt.ylabel("head 1 top-1")
    plt.legend(loc="lower right", fontsize="small")
    plt.title("Cerberus heads: accuracy against data")
    plt.tight_layout()
    plt.savefig(os.path.join(ROOT, "results", "learning_curve.png"), dpi=100)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    main([a for a in args if "=" not in a], next((a.split("=", 1)[1] for a in args if a.startswith("reference=")), None))
