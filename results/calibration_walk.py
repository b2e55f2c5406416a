"""Why the calibration picked a 4-node tree that lost on MT-Bench, and the calibration that walks answers instead.

1. Rewrites the held-out calibration data of heads/cerberus.pt and heads/medusa.pt as train.py now stores it: whole
   answers (train.calibration_sample) with each position's task category. The held-out positions are train.py's:
   their hidden states come from runs/ftall/hidden/ (the cache of the training run that made the shipped heads)
   where it is there, else from a teacher-forced forward of the held-out lines; the backbone's entropies at the
   positions the checkpoint stored before must match, or nothing is written. The stored gate is chosen again
   with the stored step costs. Skipped for a checkpoint that has categories already.
2. For the step costs of a benchmark log, prints for a few trees and gates the estimated speedup the old way
   (every held-out position stands in for a step), walking the held-out answers as decoding does (train.
   decode_steps), on the slowest task category, and walking MT-Bench's first-turn AR answers
   (runs/mt_bench_positions.pt, made by results/mt_bench_heads.py); then what each rule picks. No timing.
    python results/calibration_walk.py results/bench_cpu_float32_mtbench_zen4_sliced_calibrated.txt
"""
import copy
import math
import os
import pathlib
import re
import sys
from dataclasses import replace

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cerberus import Tree, entropy, load_heads, write_atomically  # noqa: E402
from model import linear, load_smollm2  # noqa: E402
from mt_bench_heads import mt_bench_positions  # noqa: E402
from train import (CATEGORIES, TrainConfig, accepted_lengths, answer_bounds, answer_data, calibrate,  # noqa: E402
                   calibration_sample, decode_steps, draft_costs, head1_entropy, read_prompts, read_shard,
                   shard_data, target_ranks)

CACHE = os.path.join(ROOT, "runs", "ftall")
CANDIDATES = [("2 nodes, no gate", [(0,)], "entropy", math.inf),
              ("3-node chain, no gate", [(0,), (0, 0)], "entropy", math.inf),
              ("4 nodes, no gate", [(0,), (1,), (0, 0)], "entropy", math.inf),
              ("4 nodes, head-1 gate 2.89", [(0,), (1,), (0, 0)], "head1_entropy", 2.887)]


def held_out_states(model, tokenizer):
    """train.py's held-out positions of every answer shard, in its order: {"hidden", "targets", "category", ...}."""
    cfg = replace(TrainConfig(), out_dir=CACHE, hidden_dtype="bfloat16")  # the shipped heads' run
    rows, every = read_prompts(os.path.join(ROOT, cfg.prompts)), round(1 / cfg.holdout)
    model = copy.deepcopy(model).to(torch.bfloat16)  # as train.get_data
    parts = []
    for path in tqdm(sorted(pathlib.Path(ROOT, cfg.answers_dir).glob("*.npz")), desc="held-out states", unit="shard"):
        if os.path.exists(os.path.join(CACHE, "hidden", path.name.replace(".npz", ".pt"))):
            data = shard_data(model, tokenizer, rows, str(path), cfg)
        else:
            answers = {key: ids for key, ids in read_shard(path)[1].items() if key[0] % every == 0}
            data = answer_data(model, tokenizer, rows, answers, cfg)
        parts.append({k: v[data["held_out"]] for k, v in data.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def calibration_data(heads, lm_weight, held_out, backbone_entropy):
    """What train.py stores for these heads: ranks, entropies and categories of whole answers."""
    return calibration_sample({"ranks": target_ranks(heads, lm_weight, held_out, heads.n_heads),
                               "entropy": backbone_entropy.half(), "category": held_out["category"],
                               "head1_entropy": head1_entropy(heads, lm_weight, held_out).half()})


def rewrite_calibration(model, tokenizer):
    paths = [os.path.join(ROOT, "heads", f"{kind}.pt") for kind in ("cerberus", "medusa")]
    if all("category" in torch.load(p, weights_only=True)["calibration"] for p in paths):
        return print("the checkpoints' calibration data have categories already")
    held_out = held_out_states(model, tokenizer)
    lm_weight = model.lm_head.weight.to(torch.bfloat16)  # training's dtype
    backbone_entropy = torch.cat([entropy(linear(h.to(lm_weight.dtype), lm_weight)).float()
                                  for h in held_out["hidden"].split(1024)])
    for path in paths:
        heads, ckpt = load_heads(path, model)
        old = ckpt["calibration"]
        before = torch.linspace(0, len(backbone_entropy) - 1, len(old["entropy"])).round().long()  # the old thinning
        gap = float((backbone_entropy[before] - old["entropy"].float()).abs().max())
        if gap > 0.05:
            raise SystemExit(f"{path}: held-out positions differ from the stored ones (entropy off by {gap:.3f})")
        ckpt["calibration"] = calibration_data(heads.to(torch.bfloat16), lm_weight, held_out, backbone_entropy)
        costs = {int(T): s for T, s in ckpt["gate"]["step_costs"].items()}
        drafting = {int(d): s for d, s in ckpt["gate"]["draft_costs"].items()}
        gate, ckpt["gate"] = ckpt["gate"], calibrate(ckpt["calibration"], costs, drafting)
        write_atomically(path, lambda tmp: torch.save(ckpt, tmp))
        print(f"{path}: {len(ckpt['calibration']['ranks']):,} positions of whole answers, categories (old ones "
              f"matched: entropy within {gap:.4f}); stored gate {len(gate['tree']) + 1} -> "
              f"{len(ckpt['gate']['tree']) + 1} nodes on {ckpt['gate']['gate_on']}, threshold {ckpt['gate']['threshold']:.3f}")


def estimates(data, costs, drafting, paths, signal, threshold):
    """(per position, walking the answers, walking on the slowest category) estimated speedups of a tree and gate."""
    tree = Tree(paths)
    parallel = data[signal].float() < threshold
    gain = 1 + accepted_lengths(data["ranks"], tree)
    tree_cost = costs[tree.n_nodes] + drafting[tree.max_depth]
    ar_cost = costs[1] + (drafting[tree.max_depth] if signal == "head1_entropy" else 0.0)
    per_position = float(torch.where(parallel, gain, 1).sum() / torch.where(parallel, tree_cost, ar_cost).sum())
    starts, ends = answer_bounds(data["ranks"])
    tree_steps, ar_steps = decode_steps(gain, parallel[None], starts, ends)
    seconds = (tree_steps * tree_cost + ar_steps * ar_cost)[0]  # (N,)
    category = data.get("category", torch.zeros(len(gain), dtype=torch.uint8))[starts]
    speeds = [float((ends - starts)[category == c].sum() / seconds[category == c].sum()) for c in category.unique()]
    return per_position * costs[1], float((ends - starts).sum() / seconds.sum()) * costs[1], min(speeds) * costs[1]


@torch.no_grad()
def main(log_path):
    model, tokenizer = load_smollm2()
    model.eval()
    rewrite_calibration(model, tokenizer)
    costs = {int(T): float(ms) / 1e3 for T, ms in re.findall(r"^\s+T=(\d+)\s+([\d.]+) ms", open(log_path).read(), re.M)}
    heads, ckpt = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)
    heads, lm_weight = heads.to(torch.bfloat16), model.lm_head.weight.to(torch.bfloat16)  # as the benchmark drafts
    drafting = draft_costs(heads, lm_weight)
    held_out = ckpt["calibration"]
    mt, _ = mt_bench_positions(model, tokenizer)
    mt_bench = {"ranks": target_ranks(heads, lm_weight, mt, heads.n_heads), "head1_entropy": head1_entropy(heads, lm_weight, mt),
                "entropy": torch.cat([entropy(linear(h.to(lm_weight.dtype), lm_weight)) for h in mt["hidden"].split(1024)])}
    print(f"\nstep costs of {os.path.relpath(log_path, ROOT)}: " + ", ".join(f"T={T} {1e3 * s:.2f} ms" for T, s in costs.items())
          + "; drafts here: " + ", ".join(f"{d} heads {1e3 * s:.2f} ms" for d, s in drafting.items()))
    print(f"estimated speedup on the Cerberus checkpoint's {len(held_out['ranks']):,} held-out positions "
          f"({len(answer_bounds(held_out['ranks'])[0])} answers, {len(CATEGORIES)} categories) and on MT-Bench's "
          f"{len(mt_bench['ranks']):,} ({len(answer_bounds(mt_bench['ranks'])[0])} answers):")
    print(f"  {'tree, gate':<26}{'per position':>13}{'walked':>8}{'slowest category':>18}{'MT-Bench walked':>17}")
    for label, paths, signal, threshold in CANDIDATES:
        per_position, walked, slowest = estimates(held_out, costs, drafting, paths, signal, threshold)
        print(f"  {label:<26}{per_position:13.3f}{walked:8.3f}{slowest:18.3f}"
              f"{estimates(mt_bench, costs, drafting, paths, signal, threshold)[1]:17.3f}")
    for rule, data in (("held-out answers, walked", {k: v for k, v in held_out.items() if k != "category"}),
                       ("held-out answers, walked, slowest category (bench.py now)", held_out),
                       ("MT-Bench answers, walked (an oracle: never used to choose)", mt_bench)):
        gate = calibrate(data, costs, drafting)
        print(f"  calibrated on {rule}: {len(gate['tree']) + 1} nodes {gate['tree']}, {gate['gate_on']} gate "
              f"{gate['threshold']:.3f} nats, est. {gate['est_speedup']:.3f}x")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for log in sys.argv[1:]:
        main(log)
