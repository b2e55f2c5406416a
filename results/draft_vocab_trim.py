"""How small can the draft vocabulary get? The shipped heads' weights, unchanged (a draft vocabulary only picks
lm_head rows), drafting over the D tokens the backbone wrote most often in their training answers (data/answers
shards 0-10 less the held-out lines, the counts train.py ranked them by), D from the 16,384 they were fine-tuned
over down: per-head top-1 on the backbone's AR answers
to MT-Bench's first turns (drafts in bfloat16, as the benchmark runs them), and the cost of one step's drafts
at 1-4 heads on this CPU (fastest of 7 rounds, the calibration's clock). A draft outside the D tokens is
never made: acceptance can fall, the output cannot change.
It measures the heads shipped from 59dc7ed to 9af6736 (later heads drafted over other shards' counts; the script
stops on them): `git checkout 9af6736 -- heads` first, then
    python results/draft_vocab_trim.py > results/draft_vocab_trim.txt
"""
import copy
import os
import pathlib
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
import bench  # noqa: E402
from cerberus import load_heads  # noqa: E402
from model import load_smollm2  # noqa: E402
from mt_bench_heads import mt_bench_positions  # noqa: E402
from train import TrainConfig, draft_costs, draft_vocabulary, read_shard  # noqa: E402

SIZES = (16384, 8192, 4096, 2048, 1024)


def training_tokens(n_shards=11):
    """(N, 1) every answer token of the first n_shards shards' training lines: train.py's targets column 0."""
    cfg = TrainConfig()
    paths = sorted(pathlib.Path(ROOT, cfg.answers_dir).glob("*.npz"))[:n_shards]
    every = round(1 / cfg.holdout)
    tokens = [t for p in paths for (line, _), ids in read_shard(p)[1].items() if line % every for t in ids]
    return torch.tensor(tokens)[:, None]


def check_counts(heads, tokens, vocab_size):
    """Stops unless these token counts rank the heads' own draft vocabulary first: the heads they were made for."""
    if not torch.equal(draft_vocabulary(tokens, heads.n_draft_tokens, vocab_size), heads.vocab.cpu()):
        raise SystemExit("these counts do not give the heads' draft vocabulary: not the heads this script measured; "
                         "git checkout 9af6736 -- heads")


@torch.no_grad()
def main():
    model, tokenizer = load_smollm2()
    data, categories = mt_bench_positions(model.eval(), tokenizer)
    lm_weight = model.lm_head.weight.to(torch.bfloat16)
    tokens, V = training_tokens(), model.config.vocab_size
    answer_tokens = data["targets"][:, 1]  # head 1's targets
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; MT-Bench AR answers: {len(categories)} "
          f"positions; counts from {len(tokens):,} training answer tokens")
    for kind in ("cerberus", "medusa"):
        shipped, _ = load_heads(os.path.join(ROOT, "heads", f"{kind}.pt"), model)
        shipped = shipped.to(torch.bfloat16)
        check_counts(shipped, tokens, V)
        print(f"\n{kind} heads {shipped.spec}")
        print(f"{'D':>6} {'MT-Bench in D':>13} " + " ".join(f"{f'head{k} top-1':>12}" for k in range(1, 5))
              + " " + " ".join(f"{f'drafts d={d}':>12}" for d in range(1, 5)))
        for size in SIZES:
            heads = copy.deepcopy(shipped).draft_over(draft_vocabulary(tokens, size, V))
            overall, _ = bench.score_heads({kind: (heads, None)}, lm_weight, data, categories)
            costs = draft_costs(heads, lm_weight)
            covered = float(torch.isin(answer_tokens, heads.vocab).float().mean())
            print(f"{size:>6} {covered:13.3f} " + " ".join(f"{overall[kind][f'head{k}']['top1']:12.3f}" for k in range(1, 5))
                  + " " + " ".join(f"{1e3 * costs[d]:9.2f} ms" for d in range(1, 5)))


if __name__ == "__main__":
    main()
