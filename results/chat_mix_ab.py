"""Do heads guess MT-Bench better when their training leans toward chat? MT-Bench's first turns are open
requests (writing, roleplay, explanations), where the shipped heads guess head 1 less often than on any
category of the training mix; on its held-out lines the chat, writing and coding ones score below the
summarising, translation and document tasks (results/train_ftall.log). Both arms continue the shipped Cerberus heads
(+token+root, their own draft vocabulary) for the same steps, lr 3e-4, on the full recipe's cached hidden states
(runs/ftall/hidden, all 63 shards): one on positions of every category, one on chat, writing and coding only.
Held-out (per category) and MT-Bench (results/mt_bench_heads.py's positions) top-1, in float32. No timing.
    python results/chat_mix_ab.py      # output: results/chat_mix_ab.txt
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cerberus import load_heads  # noqa: E402
from model import load_smollm2  # noqa: E402
from mt_bench_heads import mt_bench_positions  # noqa: E402
from train import CATEGORIES, TrainConfig, accuracy, concrete_dtypes, get_data, target_ranks, train_heads  # noqa: E402

CHAT_LIKE = ("chat", "writing", "coding")


def rows_of(data, keep):
    return {k: v[keep] for k, v in data.items()}


def setup():
    """(cfg, model, train_data, held_out, MT-Bench positions, lm_weight, chat-like mask, as many rows of every kind)."""
    cfg = concrete_dtypes(TrainConfig(recipe="full", n_shards=0, heads="cerberus+token+root", init_from="heads",
                                      lr=3e-4, out_dir="runs/ftall"), "cpu")  # out_dir: where the cache is
    model, tokenizer = load_smollm2()
    model.requires_grad_(False).eval()
    mt_bench, _ = mt_bench_positions(model, tokenizer)
    train_data, held_out = get_data(model, tokenizer, cfg)
    lm_weight = model.lm_head.weight.to(getattr(torch, cfg.train_dtype))
    chat_like = torch.isin(train_data["category"], torch.tensor([CATEGORIES.index(c) for c in CHAT_LIKE]))
    every = torch.randperm(len(chat_like), generator=torch.Generator().manual_seed(0))[:int(chat_like.sum())]
    return cfg, model, train_data, held_out, mt_bench, lm_weight, chat_like, every  # every: same size, all kinds


def main():
    cfg, model, train_data, held_out, mt_bench, lm_weight, chat_like, every = setup()
    n = len(every)
    print(f"{len(chat_like):,} training positions, {n:,} of them {'/'.join(CHAT_LIKE)}; {n // cfg.batch_size:,} "
          f"steps an arm; {len(held_out['targets']):,} held out, {len(mt_bench['targets']):,} MT-Bench; lr {cfg.lr}; "
          f"{cfg.train_dtype}", flush=True)
    for name, rows in (("every category", every), ("chat-like only", chat_like.nonzero()[:, 0])):
        heads = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)[0].float()
        train_heads(heads, lm_weight, rows_of(train_data, rows), cfg, desc=name)
        held_ranks = target_ranks(heads, lm_weight, held_out, cfg.n_heads)
        mt = accuracy(target_ranks(heads, lm_weight, mt_bench, cfg.n_heads))
        print(f"{name:<15} MT-Bench top-1/top-5", *(f"{h} {a['top1']:.3f}/{a['top5']:.3f}" for h, a in mt.items()))
        print(f"{name:<15} held-out head-1 top-1 by category:", ", ".join(
            f"{c} {accuracy(held_ranks[held_out['category'] == i])['head1']['top1']:.3f}"
            for i, c in enumerate(CATEGORIES)), f"| all {accuracy(held_ranks)['head1']['top1']:.3f}", flush=True)


if __name__ == "__main__":
    main()
