"""A/B of Cerberus head sets inside the decode loop: AR and each head set's Cerberus decoder with the same tree
(no gate) take turns on each MT-Bench prompt (24 x 128 tokens, float32 backbone, drafts in bfloat16 as the
benchmark runs them), so drift in the machine's load hits every arm alike. Verification is the same, so every
arm must emit AR's tokens; the head sets differ only in what they draft and what that costs.

    python results/heads_ab.py shipped=heads new=runs/ftall/cerberus+token+root.pt [--tree=2]
A name=path pair names a checkpoint file or a folder holding cerberus.pt; --tree=2 (default) is the
2-node chain [[0]], --tree=4 the 4-node tree [[0], [1], [0, 0]].
"""
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import load_prompts  # noqa: E402
from cerberus import Decoder, Tree, load_heads  # noqa: E402
from model import load_smollm2  # noqa: E402

N_PROMPTS, MAX_NEW_TOKENS = 24, 128
TREES = {"2": Tree([(0,)]), "4": Tree([(0,), (1,), (0, 0)])}


def mt_bench_prompts(tokenizer):
    """The first N_PROMPTS MT-Bench first turns, as bench.py reads them, and the EOS id."""
    prompts = load_prompts(os.path.join(ROOT, "..", "shared", "data", "mt_bench.jsonl"), tokenizer, N_PROMPTS)
    return prompts, tokenizer.encode("<|im_end|>", allowed_special="all")[0]


@torch.no_grad()
def interleaved(decoders, prompts, eos_id):
    """({arm: {"seconds", "steps", "tokens"}}, {arm: [token ids per prompt]}): every arm's Decoder on each
    prompt in turn, after one untimed warm-up each. Seconds are whole generate() calls, prefill included."""
    for decoder in decoders.values():
        decoder.generate(prompts[0]["ids"], 16, eos_id=eos_id)
    totals, outputs = {arm: defaultdict(float) for arm in decoders}, {arm: [] for arm in decoders}
    for prompt in prompts:
        for arm, decoder in decoders.items():
            t0 = time.perf_counter()
            out, stats = decoder.generate(prompt["ids"], MAX_NEW_TOKENS, eos_id=eos_id)
            totals[arm]["seconds"] += time.perf_counter() - t0
            totals[arm]["steps"] += stats.steps
            totals[arm]["tokens"] += len(out)
            outputs[arm].append(out)
    return totals, outputs


def print_arms(totals, outputs):
    """One line an arm: tau, ms per step, tok/s, speedup over the "ar" arm, and whether it wrote AR's tokens."""
    ar = totals["ar"]
    for arm, t in totals.items():
        same = "same tokens as AR" if outputs[arm] == outputs["ar"] else "OTHER TOKENS THAN AR"
        print(f"  {arm:>18}: tau {t['tokens'] / t['steps']:.3f}, {1e3 * t['seconds'] / t['steps']:6.2f} ms per step "
              f"(prefill included), {t['tokens'] / t['seconds']:5.1f} tok/s, {ar['seconds'] / t['seconds']:.3f}x AR, {same}")


def main(argv):
    tree_name = next((a.split("=", 1)[1] for a in argv if a.startswith("--tree=")), "2")
    if tree_name not in TREES:
        raise ValueError(f"unknown --tree={tree_name}; use one of {sorted(TREES)}")
    pairs = [a.split("=", 1) for a in argv if not a.startswith("--")]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError("pass name=path pairs, a path being a cerberus checkpoint or a folder with cerberus.pt")
    model, tokenizer = load_smollm2()
    prompts, eos_id = mt_bench_prompts(tokenizer)
    max_len = max(len(p["ids"]) for p in prompts) + MAX_NEW_TOKENS + 8
    tree = TREES[tree_name]
    decoders = {"ar": Decoder(model, max_len=max_len)}
    for name, path in pairs:
        path = os.path.join(path, "cerberus.pt") if os.path.isdir(path) else path
        heads, _ = load_heads(path, model)
        decoders[name] = Decoder(model, heads.to(torch.bfloat16), tree, max_len=max_len)
        print(f"{name}: {path}, {heads.n_draft_tokens} draft tokens")
    print(f"{N_PROMPTS} MT-Bench prompts x {MAX_NEW_TOKENS} tokens, float32 backbone, bfloat16 drafts, no gate, "
          f"tree {[list(p) for p in tree.paths]}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print_arms(*interleaved(decoders, prompts, eos_id))


if __name__ == "__main__":
    main(sys.argv[1:])
