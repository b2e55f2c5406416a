"""Would heads that also read the previous position's hidden state guess better? The quick recipe's data and
settings (shard 0, from scratch, train.py's defaults), Cerberus heads +token+root against the same heads with one
more input block, x <- x + SiLU(Q [h ; h_prev] + c), zero-initialised like the others. Held-out and MT-Bench
(results/mt_bench_heads.py's positions) top-1, drafts in float32. h_prev is the row before, where that row is
the same answer's (its head-1 target is this row's token), else h itself; the decoder does not have this input.
    python results/prev_state_ab.py      # output: results/prev_state_ab.txt
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cerberus import CerberusHeads, parameter_count  # noqa: E402
from model import load_smollm2  # noqa: E402
from mt_bench_heads import mt_bench_positions  # noqa: E402
from train import (TrainConfig, accuracy, concrete_dtypes, draft_vocabulary, get_data, head_set_spec,  # noqa: E402
                   target_ranks, train_heads)


class PrevStateHeads(CerberusHeads):
    """Cerberus heads whose input (hidden, 2C) is [h ; h_prev]."""

    def __init__(self, config, **options):
        super().__init__(config, **options)
        C = config.n_embd
        self.prev_weight = nn.Parameter(torch.zeros(C, 2 * C))
        self.prev_bias = nn.Parameter(torch.zeros(C))

    def input_state(self, hidden, root_vec):
        h, h_prev = hidden.reshape(-1, 2 * self.n_embd).chunk(2, dim=-1)
        x = super().input_state(h, root_vec)
        return x + F.silu(torch.cat([h, h_prev], -1) @ self.prev_weight.mT + self.prev_bias)


def with_previous_state(data):
    """data with hidden (M, 2C) = [h ; h_prev]."""
    h = data["hidden"].float()
    same_answer = torch.zeros(len(h), dtype=torch.bool)
    same_answer[1:] = data["targets"][:-1, 1] == data["targets"][1:, 0]
    return {**data, "hidden": torch.cat([h, torch.where(same_answer[:, None], h.roll(1, 0), h)], -1)}


def main():
    cfg = concrete_dtypes(TrainConfig(), "cpu")
    model, tokenizer = load_smollm2()
    model.requires_grad_(False).eval()
    train_data, held_out = get_data(model, tokenizer, cfg)  # cached in runs/quick/hidden/ by `python train.py`
    mt_bench = mt_bench_positions(model, tokenizer)[0]
    lm_weight = model.lm_head.weight.to(getattr(torch, cfg.train_dtype))
    spec = {k: v for k, v in head_set_spec("cerberus+token+root", cfg.n_heads).items() if k != "kind"}
    vocab = draft_vocabulary(train_data["targets"], cfg.draft_vocab, model.config.vocab_size)
    print(f"{len(train_data['targets']):,} training positions, {len(held_out['targets']):,} held out, "
          f"{len(mt_bench['targets']):,} MT-Bench; {cfg.train_dtype}")
    for name, heads, inputs in (("h", CerberusHeads(model.config, **spec), lambda d: d),
                                ("h, h_prev", PrevStateHeads(model.config, **spec), with_previous_state)):
        train_heads(heads.draft_over(vocab), lm_weight, inputs(train_data), cfg, desc=name)
        for set_name, data in (("held-out", held_out), ("MT-Bench", mt_bench)):
            acc = accuracy(target_ranks(heads, lm_weight, inputs(data), cfg.n_heads))
            print(f"{name:<10} {parameter_count(heads):,} params, {set_name:<8} top-1/top-5",
                  *(f"{h} {a['top1']:.3f}/{a['top5']:.3f}" for h, a in acc.items()), flush=True)


if __name__ == "__main__":
    main()
