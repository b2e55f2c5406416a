"""Is MT-Bench's head 1 low because the heads learned the wrong things, or because MT-Bench's answers are harder
to guess? Head 1 guesses the token the backbone will choose one step later. This sorts every position by how
sure the backbone itself is of that token when it chooses it (its softmax probability, from the next row's hidden
state), then gives head 1's top-1 per band, on MT-Bench's first-turn AR answers and on the held-out answers of
the training mix (first turns, first 128 tokens, like MT-Bench's). If the two sets agree band by band, the gap is
in the mix of bands: what the answers are, not what the heads saw. No timing.
    python results/head1_predictability.py heads/cerberus.pt
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cerberus import load_heads  # noqa: E402
from heads_compare import held_out_positions  # noqa: E402
from model import load_smollm2  # noqa: E402
from mt_bench_heads import mt_bench_positions  # noqa: E402
from train import IGNORE, target_ranks  # noqa: E402

BANDS = [0.0, 0.3, 0.5, 0.7, 0.9, 1.01]  # the backbone's probability of the token head 1 must guess


def answer_offsets(targets):
    """(M,) each row's offset in its answer: an answer's last row is the one with no head-1 target."""
    ends = (targets[:, 1] == IGNORE).nonzero().flatten().tolist()
    offsets, start = torch.empty(len(targets), dtype=torch.long), 0
    for end in ends:
        offsets[start:end + 1] = torch.arange(end + 1 - start)
        start = end + 1
    return offsets


@torch.no_grad()
def head1_table(model, heads, data, keep):
    """(positions, {band: (share, head-1 top-1)}) over the rows in keep that have a head-1 target."""
    lm_weight = model.lm_head.weight.to(torch.bfloat16)  # the benchmark's draft dtype
    hidden, targets = data["hidden"], data["targets"]
    # The backbone's probability of head 1's target, read at the next row (where the backbone chooses it). An
    # answer's last row has no next row in its answer; it has no head-1 target either, and is left out below.
    next_hidden = torch.cat([hidden[1:], hidden[-1:]])  # (M, C)
    sure = torch.cat([model.lm_head(next_hidden[i:i + 1024].float()).softmax(-1)
                      .gather(-1, targets[i:i + 1024, 1].clamp(min=0)[:, None])[:, 0]
                      for i in range(0, len(targets), 1024)])  # (M,)
    rows = keep & (targets[:, 1] != IGNORE)
    ranks = target_ranks(heads, lm_weight, {"hidden": hidden[rows], "targets": targets[rows]}, 1)  # (m, 1)
    sure, right = sure[rows], ranks[:, 0] == 0
    table = {}
    for low, high in zip(BANDS, BANDS[1:]):
        band = (sure >= low) & (sure < high)
        table[f"{low:.1f}-{min(high, 1):.1f}"] = (band.float().mean().item(), right[band].float().mean().item())
    table["all"] = (1.0, right.float().mean().item())
    return int(rows.sum()), table


def main(heads_path):
    model, tokenizer = load_smollm2()
    model.eval()
    heads = load_heads(heads_path, model)[0].to(torch.bfloat16)
    mt_bench, _ = mt_bench_positions(model, tokenizer)
    held_out, _ = held_out_positions(model, tokenizer)
    first_128 = (held_out["turn"] == 1) & (answer_offsets(held_out["targets"]) < 128)
    sets = {"MT-Bench": head1_table(model, heads, mt_bench, torch.ones(len(mt_bench["targets"]), dtype=torch.bool)),
            "held out": head1_table(model, heads, held_out, first_128)}
    print(f"head 1 of {heads_path}, top-1, by the backbone's probability of the token it must guess")
    print(f"{'band':>9} | " + " | ".join(f"{name} ({n} positions): share, top-1" for name, (n, _) in sets.items()))
    for band in sets["MT-Bench"][1]:
        print(f"{band:>9} | " + " | ".join(f"{table[band][0]:.3f}, {table[band][1]:.3f}".ljust(len(name) + 36)
                                           for name, (_, table) in sets.items()))
    # The held-out accuracy of each band, weighted by MT-Bench's shares: what held-out would score with MT-Bench's mix.
    reweighted = sum(sets["MT-Bench"][1][band][0] * sets["held out"][1][band][1] for band in sets["MT-Bench"][1]
                     if band != "all")
    print(f"held out, each band weighted by MT-Bench's share: {reweighted:.3f} "
          f"(MT-Bench {sets['MT-Bench'][1]['all'][1]:.3f}, held out {sets['held out'][1]['all'][1]:.3f})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
