"""End-to-end checks on the real SmolLM2-135M-Instruct weights (loaded once per session, ~7 s):
a wrong rotary layout, a dequantisation slip or a tokenizer mismatch all leave the model runnable
but turn its predictions into noise, which only real text reveals."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cerberus import CerberusHeads, MedusaHeads, Tree, generate, load_heads
from conftest import perturb
from model import KVCache, chat_prompt
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night, "
    "the keeper climbed the narrow stairs to light the lamp, and its beam swept across the dark water "
    "to warn passing ships of the rocks below. When the keeper grew too old to climb the stairs, his "
    "daughter took over the work. She kept a small notebook in which she wrote down the weather, the "
    "ships she saw, and the birds that rested on the railing."
)


def test_perplexity_on_plain_english_is_low(smollm):
    """Guards the whole forward pass on real weights (rotary pair layout, Q/K permutation, GQA,
    dequantisation): any of these wrong at least multiplies perplexity several times over."""
    model, tok = smollm
    ids = torch.tensor([tok.encode(PARAGRAPH)])
    assert 80 <= ids.shape[1] <= 120
    with torch.no_grad():
        logits, _ = model(ids)
    ppl = math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    print(f"perplexity of SmolLM2-135M-Instruct (Q4_1) on {ids.shape[1]} tokens: {ppl:.2f}")
    # Measured 16.82 (94 tokens, torch 2.13 CPU, float32). The bound of 30 leaves room for other
    # builds yet still catches a subtle bug: rotating the two halves instead of adjacent pairs gives 84,
    # no rotary at all 107, and a uniform guess over the vocabulary would be 49152.
    assert ppl < 30


def test_greedy_chat_answer_names_paris(smollm):
    """Guards the chat template (ChatML, special ids), incremental decoding with the KV cache
    (positions and cache length advancing together), and decoding back to text."""
    model, tok = smollm
    prompt = chat_prompt(tok, "What is the capital of France?")
    cache = KVCache(model.config, max_len=len(prompt) + 20)
    x, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(x, cache=cache)
            cache.length += x.shape[1]
            nxt = int(logits[0, -1].argmax())
            if nxt == 2:  # <|im_end|>
                break
            out.append(nxt)
            x = torch.tensor([[nxt]])
    answer = tok.decode(out)
    print("answer:", answer)
    assert "Paris" in answer


@pytest.mark.parametrize("kind", [CerberusHeads, MedusaHeads])
def test_random_heads_on_the_real_model_still_give_greedy_ar(smollm, kind):
    """Lossless on real weights too (float32): drafts from random heads change nothing but speed."""
    model, tok = smollm
    heads = perturb(kind(model.config, n_heads=4), seed=0, scale=0.02)
    for question in ["Name three primary colours.", "Write a haiku about rain."]:
        prompt = chat_prompt(tok, question)
        reference, _ = generate(model, prompt, 24, eos_id=2)
        for tree in (Tree.preset("chain2"), Tree.preset("sparse16")):
            ids, _ = generate(model, prompt, 24, heads=heads, tree=tree, eos_id=2)
            assert ids == reference


def test_shipped_heads_load_for_the_packaged_backbone(smollm):
    """Guards the README's first command: the committed heads load against the packaged SmolLM2
    (same fingerprint), carry a usable gate and train.py's draft vocabulary, and decode losslessly."""
    model, tok = smollm
    prompt = chat_prompt(tok, "Name three primary colours.")
    reference, _ = generate(model, prompt, 16, eos_id=2)
    for name in ("cerberus", "medusa"):
        heads, ckpt = load_heads(os.path.join(ROOT, "heads", f"{name}.pt"), model)
        assert heads.spec["kind"] == name and heads.n_heads == 4 and heads.n_draft_tokens == TrainConfig().draft_vocab
        tree = Tree(ckpt["gate"]["tree"])
        assert tree.max_depth <= heads.n_heads and ckpt["gate"]["threshold"] >= 0
        ids, _ = generate(model, prompt, 16, heads=heads, tree=tree, gate_threshold=ckpt["gate"]["threshold"], eos_id=2)
        assert ids == reference
