"""A/B for a next step, not yet in cerberus.py: let the heads draft over only the K tokens the
backbone most often produced in the training answers, instead of the whole 49k vocabulary.

The shipped Cerberus heads decode 8 MT-Bench prompts x 128 tokens twice, taking turns per prompt:
drafting through the whole bfloat16 lm_head (as generate() does), and through a contiguous copy of
its K most frequent rows (top-k indices mapped back to token ids). Verification is unchanged, so
both emit AR's tokens; only the drafts' cost (and any lost candidates) differ.

    python train.py --recipe=full            # once: the cached training data this reads
    python results/draft_vocab_ab.py 16384 > results/draft_vocab_ab.txt
"""
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cerberus  # noqa: E402
from bench import load_prompts  # noqa: E402
from cerberus import Tree, generate  # noqa: E402
from model import linear, load_smollm2  # noqa: E402
from train import load_heads  # noqa: E402


def main(K):
    model, tokenizer = load_smollm2()
    heads, _ = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)
    heads, draft_weight = heads.to(torch.bfloat16), model.lm_head.weight.to(torch.bfloat16)
    roots = [torch.load(os.path.join(ROOT, "runs", "full", f"{source}_rank0.pt"))["train"]["targets"][:, 0]
             for source in ("templates", "self_instruct")]
    counts = torch.bincount(torch.cat(roots), minlength=draft_weight.shape[0])
    vocab = counts.topk(K).indices.sort().values  # (K,) token ids
    rows = draft_weight[vocab].contiguous()  # (K, C)
    print(f"{K} draft tokens cover {float(counts[vocab].sum() / counts.sum()):.4f} of the training answers' "
          f"tokens ({int((counts > 0).sum())} distinct)")

    def few_token_logits(heads, lm_weight, hidden, n, root):  # head_logits over the K rows only
        dtype = next(heads.parameters()).dtype
        return linear(heads(hidden.to(dtype), lm_weight[root].to(dtype))[:n], rows)

    def few_token_propose(drafts, root, tree):  # propose, with indices mapped back to token ids
        top = vocab[drafts.topk(tree.max_rank + 1, dim=-1).indices]
        return torch.cat([root, top[tree.depth[1:] - 1, tree.rank[1:]]])

    arms = {"whole vocabulary": (cerberus.head_logits, cerberus.propose),
            f"{K} tokens": (few_token_logits, few_token_propose)}
    tree = Tree([(0,), (1,), (0, 0)])
    prompts = load_prompts(os.path.join(ROOT, "..", "shared", "data", "mt_bench.jsonl"), tokenizer, 8)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    totals = {arm: defaultdict(float) for arm in arms}
    for drafting, proposing in arms.values():  # warm-up, untimed
        cerberus.head_logits, cerberus.propose = drafting, proposing
        generate(model, prompts[0]["ids"], 16, heads=heads, tree=tree, draft_weight=draft_weight)
    for prompt in prompts:
        for arm, (drafting, proposing) in arms.items():
            cerberus.head_logits, cerberus.propose = drafting, proposing  # what generate() calls
            t0 = time.perf_counter()
            _, stats = generate(model, prompt["ids"], 128, heads=heads, tree=tree, draft_weight=draft_weight,
                                eos_id=eos_id)
            totals[arm]["seconds"] += time.perf_counter() - t0
            totals[arm]["steps"] += stats.steps
            totals[arm]["tokens"] += stats.new_tokens
    for arm, t in totals.items():
        print(f"{arm:>18}: tau {t['tokens'] / t['steps']:.3f}, {1e3 * t['seconds'] / t['steps']:.2f} ms per step "
              f"(prefill included), {t['tokens'] / t['seconds']:.1f} tok/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
