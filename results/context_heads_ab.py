"""Would heads that attend over the last few positions' hidden states guess better (a step towards EAGLE's
draft layer)? Both arms continue the shipped Cerberus heads (+token+root) exactly as
    python train.py --recipe=full --n_shards=16 --heads=cerberus+token+root --init_from=heads --lr=1e-4
does (same data, order, steps and draft vocabulary); the second adds one attention layer to the heads' input,
x <- x + Wo attention(x, the states of the last W positions of the same answer), Wo zero-initialised, so it
starts as the shipped heads. Held-out and MT-Bench (results/mt_bench_heads.py's positions) top-1, in float32.
The decoder has no such input (it would need the heads' own cache of past states): this only asks whether
the context is worth building. Needs runs/ab_ctx/hidden, e.g. a link to runs/ftall/hidden.
    python results/context_heads_ab.py      # output: results/context_heads_ab.txt
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cerberus import CerberusHeads, load_heads, parameter_count  # noqa: E402
from model import load_smollm2  # noqa: E402
from mt_bench_heads import mt_bench_positions  # noqa: E402
from train import (TrainConfig, accuracy, concrete_dtypes, draft_vocabulary, get_data, head_set_spec,  # noqa: E402
                   target_ranks, train_heads)

WINDOW = 4  # the position itself and the three before it
N_HEAD = 9  # as the backbone: 9 x 64 = 576


class ContextHeads(CerberusHeads):
    """Cerberus heads whose input (hidden, W*C) is the last W states of the answer, oldest first, zeros before
    its start; one multi-head attention from the usual input state over them, with a learnt offset embedding."""

    def __init__(self, config, **options):
        super().__init__(config, **options)
        C = config.n_embd
        self.qkv = nn.Linear(C, 3 * C)
        self.offset = nn.Parameter(torch.zeros(WINDOW, C))
        self.out = nn.Linear(C, C)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def input_state(self, hidden, root_vec):
        window = hidden.reshape(-1, WINDOW, self.n_embd)  # (M, W, C)
        x = super().input_state(window[:, -1], root_vec)  # (M, C)
        M, C, d = len(x), self.n_embd, self.n_embd // N_HEAD
        q = self.qkv(x)[:, :C].view(M, 1, N_HEAD, d).transpose(1, 2)  # (M, h, 1, d)
        k, v = self.qkv(window + self.offset)[..., C:].view(M, WINDOW, 2, N_HEAD, d).permute(2, 0, 3, 1, 4)
        seen = (window != 0).any(-1)[:, None, None, :]  # (M, 1, 1, W): rows inside the answer
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)  # (M, h, 1, d)
        return x + self.out(attended.reshape(M, C))


def with_window(data):
    """data with hidden (M, W*C): the states of rows i-W+1..i where they are the same answer's, else zeros.
    Row i-1 is the same answer's when its head-1 target is row i's token (a chance match at an answer's
    start lets the previous answer's end in: rare, and both arms train on the same data)."""
    h = data["hidden"]
    same = torch.zeros(len(h), dtype=torch.bool)
    same[1:] = data["targets"][:-1, 1] == data["targets"][1:, 0]
    parts, inside = [h], torch.ones(len(h), dtype=torch.bool)
    for back in range(1, WINDOW):
        inside = inside & same.roll(back - 1, 0)  # rows i-back+1..i each follow on from the row before
        inside[:back] = False
        parts.insert(0, torch.where(inside[:, None], h.roll(back, 0), torch.zeros_like(h)))
    return {**data, "hidden": torch.cat(parts, -1)}


def main():
    cfg = concrete_dtypes(TrainConfig(recipe="full", n_shards=16, heads="cerberus+token+root", init_from="heads",
                                      lr=1e-4, out_dir="runs/ab_ctx"), "cpu")
    model, tokenizer = load_smollm2()
    model.requires_grad_(False).eval()
    train_data, held_out = get_data(model, tokenizer, cfg)
    mt_bench = mt_bench_positions(model, tokenizer)[0]
    lm_weight = model.lm_head.weight.to(getattr(torch, cfg.train_dtype))
    spec = {k: v for k, v in head_set_spec(cfg.heads, cfg.n_heads).items() if k != "kind"}
    vocab = draft_vocabulary(train_data["targets"], cfg.draft_vocab, model.config.vocab_size)
    shipped = {k: v for k, v in load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)[0].state_dict().items()
               if k != "vocab"}
    print(f"{len(train_data['targets']):,} training positions, {len(held_out['targets']):,} held out, "
          f"{len(mt_bench['targets']):,} MT-Bench; window {WINDOW}; {cfg.train_dtype}", flush=True)
    for name, heads, inputs in (("h", CerberusHeads(model.config, **spec), lambda d: d),
                                (f"last {WINDOW}", ContextHeads(model.config, **spec), with_window)):
        heads.draft_over(vocab)
        missing = heads.load_state_dict(shipped, strict=False).missing_keys
        assert all(k.startswith(("qkv", "offset", "out", "vocab")) for k in missing), missing
        train_heads(heads, lm_weight, inputs(train_data), cfg, desc=name)
        for set_name, data in (("held-out", held_out), ("MT-Bench", mt_bench)):
            acc = accuracy(target_ranks(heads, lm_weight, inputs(data), cfg.n_heads))
            print(f"{name:<7} {parameter_count(heads):,} params, {set_name:<8} top-1/top-5",
                  *(f"{h} {a['top1']:.3f}/{a['top5']:.3f}" for h, a in acc.items()), flush=True)


if __name__ == "__main__":
    main()
