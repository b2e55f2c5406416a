"""Answering the prompt mix: data/generate_answers.py as of a commit (a second turn answered as a new
chat, its first turn computed again) against today's (the second turn fed on after the first answer,
its keys and values kept), on the same prompt lines, one thread, float32, one after the other.

    python results/generate_two_turn_ab.py 13ae92f 44 128 old:32 new:32 new:64   # shard 44's first 128 lines
                                                             # output: results/generate_two_turn_ab.txt
Each arm is `code:batch_size`. Prints answer tokens per second of wall time and how many answers are
token for token the first arm's (greedy float32 answers in other batch shapes may part at a near tie).
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
import generate_answers as new  # noqa: E402
from model import load_smollm2  # noqa: E402


def module_at(commit):
    """data/generate_answers.py as it was at a commit, imported under another name."""
    source = subprocess.run(["git", "show", f"{commit}:data/generate_answers.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "generate_answers_old.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("generate_answers_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(commit, shard, n_lines, *arms):
    torch.set_num_threads(1)
    codes = {"old": module_at(commit), "new": new}
    model, tokenizer = load_smollm2()
    model = model.float().requires_grad_(False)
    rows = new.shard_rows(new.load_prompts(os.path.join(ROOT, "data", "train_prompts.jsonl")), int(shard))
    rows = dict(list(rows.items())[:int(n_lines)])
    print(f"shard {shard}'s first {n_lines} prompt lines ({sum(1 + bool(r.get('follow_up')) for r in rows.values())} "
          f"answers), old = {commit}, float32, one thread, load average before: {os.getloadavg()[0]:.1f}", flush=True)
    first = None
    for arm in arms:
        code, batch_size = arm.split(":")
        cfg = new.AnswerConfig(dtype="float32", batch_size=int(batch_size))
        t0 = time.time()
        answers = codes[code].answer_rows(model, tokenizer, rows, cfg)
        seconds = time.time() - t0
        n_tokens = sum(map(len, answers.values()))
        first = first or answers
        same = sum(answers[key] == first[key] for key in first)
        print(f"{arm:>7}: {n_tokens} answer tokens in {seconds:.0f} s, {n_tokens / seconds:.1f} tok/s; "
              f"{same} of {len(first)} answers as the first arm's; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
