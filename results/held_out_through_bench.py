"""Does the benchmark's pipeline score heads lower than training's? Held-out first-turn lines of the training
mix (6 a category, no system prompt of their own) go through both: the benchmark's (the float32 backbone's own
greedy answers at batch 1, 128 tokens, results/heads_compare.py's benchmark_positions) and training's (the stored
answers, cut to 128 tokens, teacher-forced by train.answer_data). Head-1 top-1 of the shipped Cerberus heads,
drafts in bfloat16 as the benchmark runs them. No timing.
    python results/held_out_through_bench.py      # output: results/held_out_through_bench.txt
"""
import json
import os
import pathlib
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
import bench  # noqa: E402
from cerberus import load_heads  # noqa: E402
from heads_compare import benchmark_positions  # noqa: E402
from model import load_smollm2  # noqa: E402
from train import CATEGORIES, TrainConfig, answer_data, read_prompts, read_shard  # noqa: E402

PER_CATEGORY = 6


def held_out_lines(rows, cfg):
    """{line: stored first answer} for the first PER_CATEGORY held-out lines of each category."""
    stored = {line: ids for path in sorted(pathlib.Path(ROOT, cfg.answers_dir).glob("*.npz"))
              for (line, turn), ids in read_shard(path)[1].items()
              if line % round(1 / cfg.holdout) == 0 and turn == 1 and "system" not in rows[line]}
    return {line: stored[line] for c in CATEGORIES
            for line in [line for line in sorted(stored) if rows[line]["category"] == c][:PER_CATEGORY]}


def head1(heads, lm_weight, data, categories):
    overall, by_category = bench.score_heads({"cerberus": (heads, None)}, lm_weight, data, categories)
    return (f"{overall['cerberus']['head1']['top1']:.3f} | "
            + ", ".join(f"{c} {by_category['cerberus'][c]['head1']['top1']:.3f}" for c in CATEGORIES))


@torch.no_grad()
def main():
    model, tokenizer = load_smollm2()
    model.eval()
    cfg = TrainConfig()
    rows = read_prompts(cfg.prompts)
    lines = held_out_lines(rows, cfg)
    heads = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)[0].to(torch.bfloat16)
    lm_weight = model.lm_head.weight.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:  # the lines as an MT-Bench-format prompts file
        path = os.path.join(folder, "held_out.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"category": rows[line]["category"], "turns": [rows[line]["prompt"]]}) + "\n"
                         for line in lines)
        through_bench = head1(heads, lm_weight, *benchmark_positions(model, tokenizer, path))
    stored = answer_data(model, tokenizer, rows, {(line, 1): ids[:128] for line, ids in lines.items()}, cfg)
    categories = [CATEGORIES[c] for c in stored["category"].tolist()]
    print(f"head-1 top-1 of heads/cerberus.pt on {len(lines)} held-out first turns ({PER_CATEGORY} a category): "
          "all | per category")
    print(f"  the benchmark's pipeline (float32 AR answers): {through_bench}")
    print(f"  training's pipeline (stored answers):          {head1(heads, lm_weight, stored, categories)}")


if __name__ == "__main__":
    main()
