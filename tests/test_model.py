"""Backbone invariants: cached and uncached forwards agree, masks align, the cache compacts exactly."""
import copy

import pytest
import torch
import torch.nn.functional as F

from cerberus import generate
from conftest import TINY as CONFIG, tiny_gpt
from model import GPTConfig, KVCache, causal_mask, rotary_table


@pytest.fixture
def model():
    return tiny_gpt()


@torch.no_grad()
def test_prefix_plus_chunk_equals_full_forward(model):
    """Guards the lower-right causal mask when a chunk follows a cached prefix."""
    idx = torch.randint(0, 256, (2, 24))
    full, full_hidden = model(idx)
    cache = KVCache(CONFIG, 32, batch_size=2)
    first, _ = model(idx[:, :10], cache)
    cache.length += 10
    second, second_hidden = model(idx[:, 10:], cache)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second_hidden, full_hidden[:, 10:], atol=1e-5, rtol=1e-5)
    assert torch.equal(model.hidden_states(idx), full_hidden)  # what training recomputes, without the lm_head


@torch.no_grad()
def test_token_by_token_decode_equals_full_forward(model):
    """Guards cache writes at `length` and the default positions cache.length + arange(T)."""
    idx = torch.randint(0, 256, (1, 20))
    full, _ = model(idx)
    cache = KVCache(CONFIG, 20)
    for t in range(20):
        logits, _ = model(idx[:, t:t + 1], cache)
        cache.length += 1
        torch.testing.assert_close(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_is_causal_is_top_left_aligned_which_the_model_avoids():
    """SDPA's is_causal=True aligns the mask top-left: with 3 queries after 5 cached keys, query 0
    would see only key 0. The model therefore passes causal_mask (lower-right) whenever a prefix exists."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    lower_right = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(3, 5))
    assert not torch.allclose(top_left, lower_right)
    assert causal_mask(3, 5).tolist()[0] == [True] * 6 + [False] * 2
    # query 0 may attend to the 5 cached keys and itself; a reference computed by hand agrees
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    scores = scores.masked_fill(~causal_mask(3, 5), float("-inf"))
    torch.testing.assert_close(lower_right, scores.softmax(-1) @ v)


def test_move_copies_chosen_slots_of_every_layer():
    """Guards tree compaction: every layer's K and V moves, only to the chosen slots, and a source
    overwritten by the same move is read before it is written."""
    cache = KVCache(CONFIG, 16)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.move(torch.tensor([4, 6, 9, 9]), torch.tensor([4, 5, 6, 7]))  # a path 4, 6, 9 padded with its last node
    for src, dst in [(4, 4), (6, 5), (9, 6), (9, 7)]:
        assert torch.equal(cache.k[:, :, :, dst], before_k[:, :, :, src])
        assert torch.equal(cache.v[:, :, :, dst], before_v[:, :, :, src])
    assert torch.equal(cache.k[:, :, :, :4], before_k[:, :, :, :4])  # committed prefix untouched
    assert torch.equal(cache.k[:, :, :, 8:], before_k[:, :, :, 8:])  # beyond: untouched


@torch.no_grad()
def test_cached_generation_equals_recomputing_everything(model):
    """Guards the whole cached decode path against the slow obviously-correct loop."""
    prompt = [5, 17, 99, 3]
    ids, stats = generate(model, prompt, max_new_tokens=24)
    seq = list(prompt)
    for _ in range(24):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert ids == seq[len(prompt):]
    assert stats.steps == 24 and stats.ar_steps == 24 and stats.tokens_per_step == 1.0
    assert len(set(ids)) > 3  # the model is not stuck on one token, so the comparison means something


@torch.no_grad()
def test_eos_stops_generation(model):
    ids, _ = generate(model, [5, 17, 99, 3], max_new_tokens=24)
    eos = ids[5]
    cut, _ = generate(model, [5, 17, 99, 3], max_new_tokens=24, eos_id=eos)
    assert cut == ids[:ids.index(eos) + 1]


def test_bad_input_is_a_value_error(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, [1] * 100, max_new_tokens=40)
    with pytest.raises(ValueError, match="exceed the context"):
        model(torch.zeros(1, CONFIG.block_size + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="overflow the KV cache"):
        model(torch.zeros(1, 9, dtype=torch.long), KVCache(CONFIG, 8))
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 2, dtype=torch.long), pos=torch.tensor([0, CONFIG.block_size]))
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [1, 300], max_new_tokens=4)
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=64, n_head=5)


def test_blocks_share_no_parameters(model):
    """Guards against `[Block()] * n`, which would share one block n times."""
    ptrs = [p.data_ptr() for b in model.blocks for p in b.parameters()]
    assert len(ptrs) == len(set(ptrs))


@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 2, 48), (3, 5, 48), (48,)])
def test_cpu_linear_equals_f_linear(shape):
    """model.Linear's float32 CPU path (W @ x.T, one row doubled) is the same product as F.linear,
    for any row count and for inputs that are not row-major (e.g. the output of another Linear)."""
    from model import Linear
    layer = Linear(48, 40)
    x = torch.randn(*shape)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    transposed = torch.randn(48, 7).mT  # (7, 48), column-major
    torch.testing.assert_close(layer(transposed), F.linear(transposed, layer.weight))
    assert layer(x).shape == (*shape[:-1], 40)


@torch.no_grad()
def test_slot_indexed_forward_over_every_slot_equals_the_sliced_one(model):
    """The decode step writes K/V at slot indices and attends over every cache slot through a mask
    from a device-side length (Tree.mask); a tree on a cached prefix gives the logits of the eager,
    sliced forward, and stale K/V in unwritten slots (a reused cache) change nothing."""
    from cerberus import Tree
    tree, L = Tree([(0,), (1,), (0, 0)]), 6
    idx, tokens = torch.randint(0, 256, (1, L)), torch.randint(0, 256, (1, 4))
    sliced = KVCache(CONFIG, 16)
    model(idx, sliced)
    sliced.length = L
    expected, _ = model(tokens, sliced, pos=L + tree.depth, mask=tree.mask(L, L + 4))
    full = KVCache(CONFIG, 16)
    full.k.normal_(), full.v.normal_()  # garbage in unwritten slots
    model(idx, full)
    length = torch.tensor([L])
    logits, _ = model.layers(tokens, length + tree.depth, tree.mask(length, 16), full, length + torch.arange(4))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_keeps_norms_and_rotary_in_float32(model):
    """Under bfloat16 the rotary tables stay float32 (cast, position 4000's angles would be off by
    tens of degrees) and RMSNorm squares and averages in float32, then casts back."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.rope_cos, rotary_table(CONFIG)[0])
    x = torch.randn(3, CONFIG.n_embd, dtype=torch.bfloat16) * 300  # squares beyond bfloat16's 8 bits of precision
    norm = model.blocks[0].attn_norm
    exact = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)).bfloat16() * norm.weight
    assert torch.equal(norm(x), exact)
    logits, _ = model(torch.randint(0, 256, (1, 8)))
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
