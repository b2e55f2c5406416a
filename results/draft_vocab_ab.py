"""A/B of the draft vocabulary's size inside the decode loop: the same Cerberus heads drafting over two
vocabularies (the 16,384 tokens they were fine-tuned over and the 4,096 most written of them, ranked by
results/draft_vocab_trim.py's counts), with AR as the baseline, taking turns on each MT-Bench prompt (24 x 128
tokens, float32 backbone, bfloat16 drafts, no gate) for a 2-node and a 4-node tree. Verification is the same,
so every arm emits AR's tokens; only the drafts' cost and the candidates lost differ. Like draft_vocab_trim.py it
measures the heads shipped from 59dc7ed to 9af6736 and stops on others: `git checkout 9af6736 -- heads` first, then

    python results/draft_vocab_ab.py > results/draft_vocab_ab.txt
"""
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cerberus import Decoder, Tree, load_heads  # noqa: E402
from draft_vocab_trim import check_counts, training_tokens  # noqa: E402
from heads_ab import MAX_NEW_TOKENS, N_PROMPTS, interleaved, mt_bench_prompts, print_arms  # noqa: E402
from model import load_smollm2  # noqa: E402
from train import draft_vocabulary  # noqa: E402

SIZES = (16384, 4096)
TREES = {"2-node": Tree([(0,)]), "4-node": Tree([(0,), (1,), (0, 0)])}


@torch.no_grad()
def main():
    model, tokenizer = load_smollm2()
    shipped, _ = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)
    tokens = training_tokens()
    check_counts(shipped, tokens, model.config.vocab_size)
    head_sets = {size: copy.deepcopy(shipped).draft_over(draft_vocabulary(tokens, size, model.config.vocab_size))
                 .to(torch.bfloat16) for size in SIZES}
    prompts, eos_id = mt_bench_prompts(tokenizer)
    max_len = max(len(p["ids"]) for p in prompts) + MAX_NEW_TOKENS + 8
    print(f"{N_PROMPTS} MT-Bench prompts x {MAX_NEW_TOKENS} tokens, float32 backbone, bfloat16 drafts, no gate, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.2f}")
    for tree_name, tree in TREES.items():
        arms = {"ar": Decoder(model, max_len=max_len)}
        arms |= {f"{size} draft tokens": Decoder(model, heads, tree, max_len=max_len) for size, heads in head_sets.items()}
        totals, outputs = interleaved(arms, prompts, eos_id)
        print(f"\n{tree_name} tree {[list(p) for p in tree.paths]}")
        print_arms(totals, outputs)


if __name__ == "__main__":
    main()
