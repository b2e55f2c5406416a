"""Where a tree step's time over an AR step goes, eager on this CPU: the shipped Cerberus heads (bfloat16 drafts,
as the benchmark runs them) on the CPU's calibrated 2-node tree. Wall time of AR steps, tree steps and the draft
alone, interleaved (medians); then torch.profiler's self CPU time per op, tree step minus AR step of the same
Decoder, and the extra calls a step. The benchmark (bench.py) is the measurement of speed; this only says where
the difference lies.
    python results/step_overhead_cpu.py      # output: results/step_overhead_cpu.txt
"""
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

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
    heads = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)[0].to(torch.bfloat16)
    prompt = torch.tensor(chat_prompt(tokenizer, QUESTION))
    max_len = len(prompt) + 2 * n_steps + 8
    ar, tree = Decoder(model, max_len=max_len), Decoder(model, heads, Tree([(0,)]), max_len=max_len)
    ar.prefill(prompt)
    tree.prefill(prompt)
    times = {"AR step (no heads)": [], "tree step": [], "draft alone": []}
    for _ in range(n_steps):
        times["AR step (no heads)"].append(timed(lambda: ar.step(False))[1])
        times["tree step"].append(timed(lambda: tree.step(True))[1])
        times["draft alone"].append(timed(tree.draft)[1])
    print(f"{n_steps} interleaved steps, wall ms (median, min):")
    for name, t in times.items():
        print(f"  {name:<19} {statistics.median(t) * 1e3:6.2f}  {min(t) * 1e3:6.2f}")

    per_op = {}
    for parallel in (False, True):
        tree.prefill(prompt)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(40):
                tree.step(parallel)
        per_op[parallel] = {e.key: (e.self_cpu_time_total / 40, e.count / 40) for e in prof.key_averages()}
    rows = sorted(((per_op[True].get(k, (0, 0))[0] - per_op[False].get(k, (0, 0))[0],
                    per_op[True].get(k, (0, 0))[1] - per_op[False].get(k, (0, 0))[1], k)
                   for k in set(per_op[True]) | set(per_op[False])), reverse=True)
    print("profiled self CPU µs a step, tree step minus AR step of the same Decoder (40 each), and extra calls:")
    for extra_us, extra_calls, op in rows[:12]:
        print(f"  {extra_us:7.1f} µs  {extra_calls:+6.1f}  {op}")


if __name__ == "__main__":
    main()
