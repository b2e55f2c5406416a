"""Which dtype should data/generate_answers.py answer in on this CPU? The first 32 prompt lines, 48 greedy
tokens each, one batch, one thread, float32 then bfloat16 (a CPU without bf16 instructions emulates it).
    python results/generate_dtype_ab.py float32 bfloat16      # output: results/generate_dtype_ab.txt
"""
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
from generate_answers import batched_generate  # noqa: E402
from model import load_smollm2  # noqa: E402
from train import conversation, read_prompts  # noqa: E402

torch.set_num_threads(1)
model, tokenizer = load_smollm2()
prompts = sorted((conversation(tokenizer, r) for r in read_prompts("data/train_prompts.jsonl")[:32]), key=len)
eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
for dtype in sys.argv[1:]:
    backbone = model.to(getattr(torch, dtype)).requires_grad_(False)
    t0 = time.time()
    n_tokens = sum(len(turns[0][0]) for turns in batched_generate(backbone, prompts, 48, eos_id))
    seconds = time.time() - t0
    print(f"{dtype}: {n_tokens} answer tokens in {seconds:.1f} s, {n_tokens / seconds:.1f} tok/s", flush=True)
