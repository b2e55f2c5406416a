"""What the shipped Cerberus heads' draft costs inside a decode step on this CPU, by dtype: each draft is timed
right after an AR step of the same float32 backbone, which has pushed the heads' weights out of the caches, as
in a real step (the calibrated 2-node tree drafts with head 1 only). Interleaved, medians of 80.
    python results/draft_cost_cpu.py      # output: results/draft_cost_cpu.txt
"""
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cerberus import Decoder, Tree, load_heads  # noqa: E402
from model import chat_prompt, load_smollm2  # noqa: E402
from train import timed  # noqa: E402

QUESTION = "Explain how photosynthesis works in plants, step by step."


@torch.no_grad()
def main(n_steps=80):
    model, tokenizer = load_smollm2()
    model.eval()
    prompt = torch.tensor(chat_prompt(tokenizer, QUESTION))
    ar = Decoder(model, max_len=len(prompt) + 2 * n_steps * 2 + 8)
    ar.prefill(prompt)
    drafters = {}
    for dtype in (torch.bfloat16, torch.float32):
        heads = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)[0].to(dtype)
        drafters[dtype] = Decoder(model, heads, Tree([(0,)]), max_len=len(prompt) + 8)
        drafters[dtype].prefill(prompt)
    times = {dtype: [] for dtype in drafters}
    for _ in range(n_steps):
        for dtype, decoder in drafters.items():
            ar.step(False)
            times[dtype].append(timed(decoder.draft)[1])
    print(f"the draft of head 1 after an AR step, ms (median, min of {n_steps}):")
    for dtype, t in times.items():
        print(f"  {str(dtype).removeprefix('torch.'):<9} {statistics.median(t) * 1e3:6.3f}  {min(t) * 1e3:6.3f}")


if __name__ == "__main__":
    main()
