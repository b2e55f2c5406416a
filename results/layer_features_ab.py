"""Would heads that also read earlier layers' states guess better (EAGLE-3 fuses low, middle and high-level
features)? Both arms continue the shipped Cerberus heads (+token+root) as
    python train.py --recipe=full --n_shards=8 --heads=cerberus+token+root --init_from=heads --lr=3e-4
would (same data, order, steps and draft vocabulary); the second adds to the heads' input state the final
norm of the residual stream after blocks LAYERS, x <- x + W [norm(x_a) ; norm(x_b)], W zero-initialised, so it
starts as the shipped heads. Held-out and MT-Bench (results/mt_bench_heads.py's positions, their answers
recovered from its cache) top-1, in float32. The decoder has no such input (its step would keep those
layers' states too): this only asks whether they are worth building.
    python results/layer_features_ab.py      # output: results/layer_features_ab.txt; caches in runs/ab_layers
"""
import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
import bench  # noqa: E402
import model as model_module  # noqa: E402
from cerberus import CerberusHeads, load_heads, parameter_count  # noqa: E402
from model import load_smollm2  # noqa: E402
from mt_bench_heads import PROMPT_SETS, mt_bench_positions  # noqa: E402
from train import (TrainConfig, accuracy, concrete_dtypes, draft_vocabulary, get_data, head_set_spec,  # noqa: E402
                   target_ranks, train_heads)

LAYERS = (7, 15)  # of 30 blocks: a quarter and half of the way up


def tapped_hidden_states(self, idx):
    """GPT.hidden_states, widened: (B, T) -> (B, T, 3C), the final state then norm(residual) after LAYERS."""
    T = idx.shape[1]
    pos = self.positions(T, None, None)
    x, cos, sin, taps = self.embed(idx), self.rope_cos[pos], self.rope_sin[pos], []
    for i, block in enumerate(self.blocks):
        x = block(x, cos, sin, None, slice(0, T), None)
        if i in LAYERS:
            taps.append(self.norm(x))
    return torch.cat([self.norm(x)] + taps, -1)


class FusedHeads(CerberusHeads):
    """Cerberus heads whose input (hidden, 3C) also holds the LAYERS' states: h + W [taps], W zero-initialised."""

    def __init__(self, config, **options):
        super().__init__(config, **options)
        self.fuse = nn.Linear(len(LAYERS) * config.n_embd, config.n_embd)
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)

    def input_state(self, hidden, root_vec):
        wide = hidden.reshape(-1, (1 + len(LAYERS)) * self.n_embd)
        return super().input_state(wide[:, :self.n_embd], root_vec) + self.fuse(wide[:, self.n_embd:])


def final_only(data):
    return {**data, "hidden": data["hidden"][:, :data["hidden"].shape[1] // (1 + len(LAYERS))]}


@torch.no_grad()
def mt_bench_tapped(model, tokenizer):
    """results/mt_bench_heads.py's MT-Bench positions with tapped states. Its cache keeps each answer's targets
    in prompt order; an answer ends at EOS or after 128 tokens, which recovers the answers without decoding."""
    cached, categories = mt_bench_positions(model, tokenizer)
    prompts = bench.load_prompts(PROMPT_SETS["MT-Bench"], tokenizer, 0)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    answers, current = [], []
    for token in cached["targets"][:, 0].tolist():
        current.append(token)
        if token == eos_id or len(current) == 128:
            answers.append(current)
            current = []
    assert not current and len(answers) == len(prompts), (len(answers), len(prompts))
    hidden = []
    for prompt, answer in zip(prompts, answers):
        P = len(prompt["ids"])
        states = tapped_hidden_states(model, torch.tensor([prompt["ids"] + answer]))[0]
        hidden.append(states[P - 1:P - 1 + len(answer)])
    hidden = torch.cat(hidden)
    torch.testing.assert_close(hidden[:, :model.config.n_embd], cached["hidden"], rtol=1e-3, atol=1e-3)
    return {"hidden": hidden, "targets": cached["targets"]}


def main():
    cfg = concrete_dtypes(TrainConfig(recipe="full", n_shards=8, heads="cerberus+token+root", init_from="heads",
                                      lr=3e-4, out_dir="runs/ab_layers"), "cpu")
    model, tokenizer = load_smollm2()
    model.requires_grad_(False).eval()
    mt_bench = mt_bench_tapped(model, tokenizer)
    model_module.GPT.hidden_states = tapped_hidden_states  # what get_data's teacher-forced forwards call
    train_data, held_out = get_data(model, tokenizer, cfg)
    lm_weight = model.lm_head.weight.to(getattr(torch, cfg.train_dtype))
    spec = {k: v for k, v in head_set_spec(cfg.heads, cfg.n_heads).items() if k != "kind"}
    vocab = draft_vocabulary(train_data["targets"], cfg.draft_vocab, model.config.vocab_size)
    shipped = {k: v for k, v in load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)[0].state_dict().items()
               if k != "vocab"}
    print(f"{len(train_data['targets']):,} training positions, {len(held_out['targets']):,} held out, "
          f"{len(mt_bench['targets']):,} MT-Bench; layers {LAYERS}; lr {cfg.lr}; {cfg.train_dtype}", flush=True)
    for name, heads, inputs in (("h", CerberusHeads(model.config, **spec), final_only),
                                (f"h + layers {LAYERS}", FusedHeads(model.config, **spec), lambda d: d)):
        heads.draft_over(vocab)
        missing = heads.load_state_dict(shipped, strict=False).missing_keys
        assert all(k.startswith(("fuse", "vocab")) for k in missing), missing
        train_heads(heads, lm_weight, inputs(train_data), cfg, desc=name)
        for set_name, data in (("held-out", held_out), ("MT-Bench", mt_bench)):
            acc = accuracy(target_ranks(heads, lm_weight, inputs(data), cfg.n_heads))
            print(f"{name:<18} {parameter_count(heads):,} params, {set_name:<8} top-1/top-5",
                  *(f"{h} {a['top1']:.3f}/{a['top5']:.3f}" for h, a in acc.items()), flush=True)


if __name__ == "__main__":
    main()
