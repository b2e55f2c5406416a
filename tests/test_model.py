"""Backbone invariants: cached and uncached forwards agree, masks align, the cache compacts exactly."""
import pytest
import torch
import torch.nn.functional as F

from cerberus import generate
from conftest import TINY as CONFIG, tiny_gpt
from model import GPTConfig, KVCache, causal_mask


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


def test_keep_moves_chosen_rows_of_every_layer():
    """Guards tree compaction: every layer's K and V moves, and only the chosen slots."""
    cache = KVCache(CONFIG, 16)
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.length = 4
    cache.keep([0, 2, 5])  # pending slots 4, 6, 9 -> 4, 5, 6
    assert cache.length == 7
    for src, dst in [(4, 4), (6, 5), (9, 6)]:
        assert torch.equal(cache.k[:, :, :, dst], before_k[:, :, :, src])
        assert torch.equal(cache.v[:, :, :, dst], before_v[:, :, :, src])
    assert torch.equal(cache.k[:, :, :, :4], before_k[:, :, :, :4])  # committed prefix untouched
    assert torch.equal(cache.k[:, :, :, 7:], before_k[:, :, :, 7:])  # beyond: untouched


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
def test_static_cache_forward_equals_the_sliced_one(model):
    """A static cache writes at slot indices and attends over every slot, the unwritten ones masked:
    prefill, a causal chunk, one token and a tree-shaped mask give the sliced cache's logits, and
    stale K/V past the committed length (a reused cache) change nothing."""
    idx = torch.randint(0, 256, (1, 14))
    tree_mask = causal_mask(3, 11)
    tree_mask[2, 12] = False  # node 2 does not see node 1: siblings
    outputs = []
    for static in (False, True):
        cache = KVCache(CONFIG, 24, static=static)
        cache.k.normal_(), cache.v.normal_()  # garbage in unwritten slots
        steps = [model(idx[:, :6], cache)]
        cache.length = 6
        steps.append(model(idx[:, 6:10], cache))
        cache.length = 10
        steps.append(model(idx[:, 10:11], cache))
        cache.length = 11
        steps.append(model(idx[:, 11:14], cache, pos=torch.tensor([11, 12, 12]), mask=tree_mask))
        outputs.append([logits for logits, _ in steps])
    for sliced, static in zip(*outputs):
        torch.testing.assert_close(static, sliced, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit internals that inductor imports
@torch.no_grad()
def test_compiled_steps_on_a_reused_static_cache_decode_like_eager():
    """What `bench.py --compile` does: compile_steps, and one static cache for every call. AR and tree
    decoding over prompts of two lengths give eager greedy AR's tokens, with no recompilation after
    the first call of each kind (fixed shapes; on a GPU, CUDA graphs replay them)."""
    from cerberus import CerberusHeads, Tree
    from conftest import perturb
    model = tiny_gpt()
    heads, tree = perturb(CerberusHeads(CONFIG, 4), 0), Tree.preset("sparse8")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3]]
    reference = [generate(model, p, 12)[0] for p in prompts]
    model.compile_steps(mode="default")  # reduce-overhead needs CUDA; the graphs are the same
    cache = KVCache(CONFIG, 32, static=True)
    torch._dynamo.utils.counters.clear()
    for p, expected in zip(prompts, reference):
        assert generate(model, p, 12, cache=cache)[0] == expected
        assert generate(model, p, 12, heads=heads, tree=tree, cache=cache)[0] == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # AR step and tree step
    with pytest.raises(ValueError, match="allocate a larger KVCache"):
        generate(model, list(range(30)), 12, cache=cache)
