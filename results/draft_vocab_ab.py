"""A/B of the draft vocabulary: the same shipped Cerberus heads draft over the whole 49,152-token
lm_head, or over their draft vocabulary (the tokens the backbone wrote most often in the training
answers, stored in the checkpoint by train.py), taking turns per prompt on 8 MT-Bench prompts x 128
tokens, 4-node tree, no gate, bfloat16 drafts (the benchmark's setting on this CPU). Verification is
the same, so both emit AR's tokens; only the drafts' cost and any lost candidates differ.

    python results/draft_vocab_ab.py > results/draft_vocab_ab.txt
"""
import copy
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import load_prompts  # noqa: E402
from cerberus import Tree, generate  # noqa: E402
from model import load_smollm2  # noqa: E402
from cerberus import load_heads  # noqa: E402


def main():
    model, tokenizer = load_smollm2()
    heads, _ = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)
    heads = heads.to(torch.bfloat16)
    whole = copy.deepcopy(heads)
    whole.vocab = None
    lm_weight = model.lm_head.weight.to(torch.bfloat16)
    arms = {"whole vocabulary": whole, f"{heads.n_draft_tokens} draft tokens": heads}
    settings = {arm: dict(heads=h, tree=Tree([(0,), (1,), (0, 0)]), draft_weight=h.draft_weight(lm_weight))
                for arm, h in arms.items()}
    prompts = load_prompts(os.path.join(ROOT, "..", "shared", "data", "mt_bench.jsonl"), tokenizer, 8)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    totals = {arm: defaultdict(float) for arm in arms}
    for kwargs in settings.values():  # warm-up, untimed
        generate(model, prompts[0]["ids"], 16, **kwargs)
    for prompt in prompts:
        for arm, kwargs in settings.items():
            t0 = time.perf_counter()
            _, stats = generate(model, prompt["ids"], 128, eos_id=eos_id, **kwargs)
            totals[arm]["seconds"] += time.perf_counter() - t0
            totals[arm]["steps"] += stats.steps
            totals[arm]["tokens"] += stats.new_tokens
    print(f"8 MT-Bench prompts x 128 tokens, float32 backbone, bfloat16 drafts, torch {torch.__version__}")
    for arm, t in totals.items():
        print(f"{arm:>18}: tau {t['tokens'] / t['steps']:.3f}, {1e3 * t['seconds'] / t['steps']:.2f} ms per step "
              f"(prefill included), {t['tokens'] / t['seconds']:.1f} tok/s")


if __name__ == "__main__":
    main()
