"""Is a second greedy answer to the same request, under another system prompt, new data for the heads?
The first 16 chat, writing and coding requests of the prompt mix (under 400 characters), answered greedily
(float32, 96 tokens) under SmolLM2's default system prompt and under each of data/build_prompts.py's
SYSTEM_PROMPTS; for each, how many leading tokens the two answers share and what share of the second
answer's 4-grams the first answer also holds (1.0 = the same text).
    python results/system_prompt_variety.py      # output: results/system_prompt_variety.txt
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
from build_prompts import SYSTEM_PROMPTS  # noqa: E402
from generate_answers import batched_generate  # noqa: E402
from model import SYSTEM_PROMPT, chat_prompt, load_smollm2  # noqa: E402
from train import read_prompts  # noqa: E402

N_REQUESTS, ANSWER_TOKENS = 16, 96


def four_grams(ids):
    return {tuple(ids[i:i + 4]) for i in range(len(ids) - 3)}


def main():
    model, tokenizer = load_smollm2()
    model = model.float().requires_grad_(False)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    requests = [r["prompt"] for r in read_prompts("data/train_prompts.jsonl")
                if r["category"] in ("chat", "writing", "coding") and len(r["prompt"]) < 400][:N_REQUESTS]
    answers = {}
    for system in [SYSTEM_PROMPT] + SYSTEM_PROMPTS:
        out = batched_generate(model, [chat_prompt(tokenizer, p, system) for p in requests], ANSWER_TOKENS, eos_id)
        answers[system] = [turns[0][0] for turns in out]
    first = answers[SYSTEM_PROMPT]
    print(f"{N_REQUESTS} chat/writing/coding requests, greedy float32 answers of up to {ANSWER_TOKENS} tokens; "
          f"compared with the answer under the default system prompt ({sum(map(len, first)) / N_REQUESTS:.0f} "
          f"tokens on average)")
    print(f"{'system prompt':<82} {'common prefix':>13} {'4-grams shared':>14} {'tokens':>6}")
    for system in SYSTEM_PROMPTS:
        second = answers[system]
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                  for a, b in zip(first, second)]
        shared = sum(len(four_grams(a) & four_grams(b)) for a, b in zip(first, second)) / sum(
            len(four_grams(b)) for b in second)
        mean_length = sum(map(len, second)) / N_REQUESTS
        print(f"{system:<82} {sum(prefix) / N_REQUESTS:>13.1f} {shared:>14.2f} {mean_length:>6.0f}")


if __name__ == "__main__":
    main()
