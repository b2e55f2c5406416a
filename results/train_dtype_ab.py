"""bfloat16 against float32 on this CPU for train.py's two bulk jobs: the teacher-forced forward that
recomputes hidden states (one batch of 16 x 512 tokens, logits included) and a Cerberus training step (256 positions,
16,384 draft tokens). `python results/train_dtype_ab.py`; the output is results/train_dtype_ab.txt."""
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cerberus import build_heads  # noqa: E402
from model import load_smollm2  # noqa: E402
from train import TrainConfig, head_set_spec, train_heads  # noqa: E402

print(f"{torch.backends.cpu.get_cpu_capability()}, AVX-512 BF16 {torch.cpu._is_avx512_bf16_supported()}, "
      f"AMX {torch.cpu._is_amx_tile_supported()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
model, _ = load_smollm2()
model.requires_grad_(False)
idx = torch.randint(0, model.config.vocab_size, (16, 512))
for name in ("float32", "bfloat16"):
    cast = copy.deepcopy(model).to(getattr(torch, name))
    with torch.no_grad():
        t0 = time.perf_counter()
        cast(idx)
    print(f"teacher-forced forward 16x512, {name}: {time.perf_counter() - t0:.1f} s", flush=True)
steps = 6
data = {"hidden": torch.randn(256 * steps, model.config.n_embd).bfloat16(),
        "targets": torch.randint(0, 16384, (256 * steps, 5))}
for name in ("float32", "bfloat16"):
    heads = build_heads(model.config, head_set_spec("cerberus+token+root", 4))
    heads.draft_over(torch.arange(16384))
    t0 = time.perf_counter()
    train_heads(heads, model.lm_head.weight.to(getattr(torch, name)), data, TrainConfig(warmup=5), desc=name)
    print(f"cerberus training, {steps} steps of 256, {name}: {(time.perf_counter() - t0) / steps * 1e3:.0f} ms per step")
