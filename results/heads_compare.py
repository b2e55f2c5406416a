"""Two head directories side by side: per-head top-1 (and head 1's per category) on the backbone's own
greedy answers (float32, batch 1, as bench.py's AR arm) to MT-Bench's first turns and to the project's
benchmark prompts, and on the held-out lines of the real-prompt mix's answer shards (both turns; train.py
trains on none of them). No timing, so the figures do not depend on what else the machine is doing:
    python results/heads_compare.py runs/heads_2026-11-27 heads      # old directory, then new
"""
import json
import math
import os
import pathlib
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
from cerberus import Decoder, load_heads  # noqa: E402
from model import load_smollm2  # noqa: E402
from train import CATEGORIES, TrainConfig, answer_data, read_prompts, read_shard  # noqa: E402

PROMPT_SETS = {"MT-Bench": os.path.join(ROOT, "..", "shared", "data", "mt_bench.jsonl"),
               "project": os.path.join(ROOT, "data", "bench_prompts.jsonl")}


def benchmark_positions(model, tokenizer, path, max_new_tokens=128):
    """Positions of the backbone's AR answers to a benchmark file's first turns, and their categories."""
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    prompts = bench.load_prompts(path, tokenizer, 0)  # every prompt
    decoder = Decoder(model, max_len=max(len(p["ids"]) for p in prompts) + max_new_tokens + 1)
    answers = [bench.Generation(decoder.generate(p["ids"], max_new_tokens, math.inf, eos_id)[0], None, 0.0)
               for p in bench.tqdm(prompts, desc=f"AR answers, {os.path.basename(path)}", unit="prompt")]
    return bench.answer_positions(model, prompts, answers, n_heads=4)


def held_out_positions(model, tokenizer):
    """Positions of the held-out prompt lines of every answer shard in data/answers/, and their categories."""
    cfg = TrainConfig()
    every = round(1 / cfg.holdout)
    answers = {key: ids for path in sorted(pathlib.Path(ROOT, cfg.answers_dir).glob("*.npz"))
               for key, ids in read_shard(path)[1].items() if key[0] % every == 0}
    data = answer_data(model, tokenizer, read_prompts(cfg.prompts), answers, cfg)
    return data, [CATEGORIES[c] for c in data["category"].tolist()]


@torch.no_grad()
def main(old_dir, new_dir):
    model, tokenizer = load_smollm2()
    model.eval()
    lm_weight = model.lm_head.weight.to(torch.bfloat16)  # the benchmark's draft dtype
    head_sets = {f"{kind} {label}": (heads.to(torch.bfloat16), ckpt)
                 for label, folder in (("old", old_dir), ("new", new_dir)) for kind in ("medusa", "cerberus")
                 for heads, ckpt in [load_heads(os.path.join(folder, f"{kind}.pt"), model)]}
    position_sets = {name: benchmark_positions(model, tokenizer, path) for name, path in PROMPT_SETS.items()}
    position_sets["real-prompt held-out"] = held_out_positions(model, tokenizer)
    summary = {}
    for set_name, (data, categories) in position_sets.items():
        overall, by_category = bench.score_heads(head_sets, lm_weight, data, categories)
        summary[set_name] = {"positions": len(categories), "overall": overall, "by_category": by_category}
        print_top1(f"\n{set_name}: {len(categories)} answer positions; top-1", overall, by_category)
    print(json.dumps(summary))


def print_top1(title, overall, by_category):
    """score_heads' result as a table: a column per head set, a row per head, then head 1 per category."""
    names = list(overall)
    print(title)
    print(f"{'':<12}" + "".join(f"{name:>15}" for name in names))
    for k in range(1, 5):
        print(f"{f'head {k}':<12}" + "".join(f"{overall[n][f'head{k}']['top1']:15.3f}" for n in names))
    print("head 1 by category:")
    for category in by_category[names[0]]:
        print(f"  {category:<10}" + "".join(f"{by_category[n][category]['head1']['top1']:15.3f}" for n in names))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
