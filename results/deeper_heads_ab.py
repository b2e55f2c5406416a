"""Does a deeper Cerberus head guess MT-Bench better, on the same data? #23's head-1 target (0.50 on MT-Bench's
AR answers) asks for a stronger drafter; the cheapest step is a second residual block in stage 1. Both arms
continue the shipped Cerberus heads (+token+root, their own draft vocabulary) for the same steps on the same
positions as results/chat_mix_ab.py's "every category" arm (runs/ftall/hidden, all 63 shards, lr 3e-4): one as
they are, one with a second block, zero-initialised, so that it starts as the shipped heads exactly. Held-out
(per category) and MT-Bench (results/mt_bench_heads.py's positions) top-1, drafts in float32. No timing.
    python results/deeper_heads_ab.py      # output: results/deeper_heads_ab.txt
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cerberus import build_heads, load_heads, parameter_count  # noqa: E402
from chat_mix_ab import rows_of, setup  # noqa: E402
from train import CATEGORIES, accuracy, target_ranks, train_heads  # noqa: E402


def deeper(heads, model, n_layers):
    """The same heads with n_layers stage-1 blocks; the added ones are zero (identity), the rest copied."""
    out = build_heads(model.config, {**heads.spec, "n_layers": n_layers})
    state = heads.state_dict()
    for name in ("w1", "b1"):
        grown = torch.zeros_like(getattr(out, name))
        grown[:len(state[name])] = state[name]
        state[name] = grown
    out.draft_over(heads.vocab)
    out.load_state_dict(state)
    return out


def main():
    cfg, model, train_data, held_out, mt_bench, lm_weight, _, every = setup()  # chat_mix_ab's "every category" rows
    n = len(every)
    data = rows_of(train_data, every)
    print(f"{n:,} training positions of every category, {n // cfg.batch_size:,} steps an arm; "
          f"{len(held_out['targets']):,} held out, {len(mt_bench['targets']):,} MT-Bench; lr {cfg.lr}; {cfg.train_dtype}",
          flush=True)
    for n_layers in (1, 2):
        shipped = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)[0].float()
        heads = deeper(shipped, model, n_layers)
        name = f"{n_layers} block{'s' * (n_layers > 1)}"
        train_heads(heads, lm_weight, data, cfg, desc=name)
        held_ranks = target_ranks(heads, lm_weight, held_out, cfg.n_heads)
        mt = accuracy(target_ranks(heads, lm_weight, mt_bench, cfg.n_heads))
        print(f"{name} ({parameter_count(heads):,} parameters) MT-Bench top-1/top-5",
              *(f"{h} {a['top1']:.3f}/{a['top5']:.3f}" for h, a in mt.items()))
        print(f"{name} held-out head-1 top-1 by category:", ", ".join(
            f"{c} {accuracy(held_ranks[held_out['category'] == i])['head1']['top1']:.3f}"
            for i, c in enumerate(CATEGORIES)), f"| all {accuracy(held_ranks)['head1']['top1']:.3f}", flush=True)


if __name__ == "__main__":
    main()
