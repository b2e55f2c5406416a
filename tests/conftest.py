import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig  # noqa: E402

TINY = GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128, tie_embeddings=False)


def tiny_gpt(seed=0, config=TINY):
    """A tiny random GPT whose greedy output varies from token to token (untied lm_head, weights
    larger than GPT's init); a tied random model tends to repeat its input token forever."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def perturb(heads, seed, scale=0.3):
    """Random head weights, so that drafts are wrong in varied ways (zero-init heads all agree)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, scale)
    return heads
