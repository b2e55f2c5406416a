"""Cerberus decoding: draft heads, the entropy gate, tree verification, sampling and the decode loop.

One decoding step, as in the paper (Liu et al., arXiv 2410.13344):
    gate:    entropy of the next-token distribution; high -> a plain AR step, low -> a parallel step
    propose: the heads read the last accepted hidden state and fill a token tree from their top-k
    verify:  one backbone forward over the whole tree (tree attention mask); keep the deepest node
             whose every ancestor is the backbone's own choice (argmax, or its seeded draw), plus
             the backbone's choice after it
    keep:    compact the accepted path's K/V in the cache; the rest is overwritten later
The output is token for token AR's, greedy or sampled with the same seed: drafts only change the speed.

    python cerberus.py "your question"    # the answer, drafted tokens marked, tau and speed against AR
"""
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import KVCache, chat_prompt, linear, load_smollm2


# Heads. Head k (k = 1..K) guesses the token k steps after the backbone's own next token from its last hidden
# state h. Both kinds run all heads' blocks in one batched matmul over stacked weights and share the backbone's
# lm_head, so they only add small C x C matrices. A head set maps h to draft logits.

def residual_blocks(z, weight, bias):
    """Each head's stack of Medusa blocks z_k <- z_k + SiLU(W_k z_k + b_k), all heads in one batched
    matmul per layer: z (K, M, C), weight (L, K, C, C), bias (L, K, C) -> (K, M, C)."""
    for w, b in zip(weight, bias):
        z = z + F.silu(z @ w.mT + b[:, None])
    return z


class DraftHeads(nn.Module):
    """What Medusa and Cerberus heads share: sizes, spec (stored in checkpoints), an optional draft vocabulary
    and every head's input state. With reads_root=True (a variant, in neither paper) that state also reads the
    backbone's own next token, known before any head runs: h + SiLU(P [h ; e] + b), e its lm_head row."""

    def __init__(self, config, kind, n_heads, n_layers, reads_root):
        super().__init__()
        C = config.n_embd
        self.n_heads, self.n_embd, self.vocab_size = n_heads, C, config.vocab_size
        self.spec = dict(kind=kind, n_heads=n_heads, n_layers=n_layers, reads_root=reads_root)
        self.needs_root = reads_root  # token-linked Cerberus heads need the root's row too
        self.root_weight = nn.Parameter(torch.zeros(C, 2 * C)) if reads_root else None
        self.root_bias = nn.Parameter(torch.zeros(C)) if reads_root else None
        self.register_buffer("vocab", None)  # (D,) token ids the heads draft over; None = all V (draft_over)

    def draft_over(self, token_ids):
        """Let the heads draft over these D token ids only (a draft vocabulary, as in EAGLE-3): their lm_head
        shrinks from V to D rows. A token outside them is never drafted: acceptance falls, never correctness."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.ndim != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"a draft vocabulary is a non-empty 1-D list of token ids in [0, {self.vocab_size})")
        self.vocab = ids.to(next(self.parameters()).device)
        return self

    n_draft_tokens = property(lambda self: self.vocab_size if self.vocab is None else len(self.vocab))  # D

    def draft_weight(self, lm_weight):
        """lm_head (V, C) -> the rows the heads draft through, (D, C): a copy with a draft vocabulary."""
        return lm_weight if self.vocab is None else lm_weight[self.vocab].contiguous()

    @staticmethod
    def project(states, draft_weight):
        """Head states through the shared lm_head (D, C): (..., C) -> (..., D), in draft_weight's dtype."""
        return linear(states.to(draft_weight.dtype), draft_weight)

    def input_state(self, hidden, root_vec):
        """hidden, root_vec (..., C) -> (M, C), M positions. root_vec may be None for the papers' heads."""
        h = hidden.reshape(-1, self.n_embd)
        if self.needs_root and root_vec is None:
            raise ValueError("these heads read the root token (reads_root=True or link='token'): pass root_vec, the "
                             "lm_head row of the backbone's next token (head_logits(..., root_vec=lm_weight[ids]))")
        if self.root_weight is None:
            return h
        return h + F.silu(linear(torch.cat([h, root_vec.reshape(h.shape)], -1), self.root_weight) + self.root_bias)


class MedusaHeads(DraftHeads):
    """K independent stacks of residual blocks x + SiLU(W x); zero init, so each starts as h itself."""

    def __init__(self, config, n_heads=4, n_layers=1, reads_root=False):
        super().__init__(config, "medusa", n_heads, n_layers, reads_root)
        C = config.n_embd
        self.weight = nn.Parameter(torch.zeros(n_layers, n_heads, C, C))
        self.bias = nn.Parameter(torch.zeros(n_layers, n_heads, C))

    def forward(self, hidden, draft_weight, n, root_vec=None):
        """hidden, root_vec (..., C), draft_weight (D, C) -> draft logits of heads 1..n, (n, M, D)."""
        h = self.input_state(hidden, root_vec)  # (M, C)
        z = residual_blocks(h.expand(n, *h.shape), self.weight[:, :n], self.bias[:, :n])  # (n, M, C)
        return self.project(z, draft_weight)


class CerberusHeads(DraftHeads):
    """Heads with the sequential-knowledge link inside; zero init makes every head start as h itself.

    stage 1:  z_k = h, then n_layers Medusa blocks z_k = z_k + SiLU(W_k z_k)   (our reading: one)
    stage 2:  s_k = z_k + SiLU(A_k [z_k ; x_{k-1}])      head k also sees what head k-1 did
    What x_{k-1} is, is the `link`:
      "hidden" (our reading of the paper): x_{k-1} = z_{k-1}, what head k-1 computed; x_0 = h. All
               heads in one batched pass.
      "token"  (a variant, measured better): x_{k-1} = p e, e the lm_head row of head k-1's top-1 draft
               and p its probability (how sure it was); x_0 = the root's row. Heads run one after
               another, still with no backbone forward in between (Hydra's heads read the tree's tokens).
    """

    def __init__(self, config, n_heads=4, n_layers=1, reads_root=False, link="hidden"):
        super().__init__(config, "cerberus", n_heads, n_layers, reads_root)
        if link not in ("hidden", "token"):
            raise ValueError(f"unknown Cerberus link {link!r}; expected 'hidden' or 'token'")
        self.spec["link"], self.needs_root = link, reads_root or link == "token"
        C = config.n_embd
        self.w1 = nn.Parameter(torch.zeros(n_layers, n_heads, C, C))
        self.b1 = nn.Parameter(torch.zeros(n_layers, n_heads, C))
        self.w2 = nn.Parameter(torch.zeros(n_heads, C, 2 * C))
        self.b2 = nn.Parameter(torch.zeros(n_heads, C))

    def forward(self, hidden, draft_weight, n, root_vec=None):
        """hidden, root_vec (..., C), draft_weight (D, C) -> draft logits of heads 1..n, (n, M, D)."""
        h = self.input_state(hidden, root_vec)  # (M, C)
        z = residual_blocks(h.expand(n, *h.shape), self.w1[:, :n], self.b1[:, :n])  # (n, M, C): stage 1
        if self.spec["link"] == "hidden":
            z_prev = torch.cat([h[None], z[:-1]])  # (n, M, C): z_{k-1}, with z_0 = h
            s = z + F.silu(torch.cat([z, z_prev], -1) @ self.w2[:n].mT + self.b2[:n, None])  # (n, M, C)
            return self.project(s, draft_weight)
        x_prev, logits = root_vec.reshape(h.shape), []
        for k in range(n):
            s_k = z[k] + F.silu(linear(torch.cat([z[k], x_prev], -1), self.w2[k]) + self.b2[k])  # (M, C)
            logits.append(self.project(s_k, draft_weight))  # (M, D)
            if k + 1 < n:  # what head k+1 reads; the last head has no successor
                p_top, top = logits[-1].detach().float().softmax(-1).max(-1)  # (M,): head k's top-1, its probability
                x_prev = (p_top[:, None] * draft_weight[top].float()).to(h.dtype)  # (M, C)
        return torch.stack(logits)


def build_heads(config, spec):
    """Heads from their spec dict (as stored in checkpoints): {"kind": "medusa"|"cerberus", ...}."""
    kinds, (kind, options) = {"medusa": MedusaHeads, "cerberus": CerberusHeads}, (spec["kind"], dict(spec))
    if kind not in kinds:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[options.pop("kind")](config, **options)


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def head_logits(heads, draft_weight, hidden, n, root_vec=None):
    """Draft logits of the first n heads through the shared lm_head: hidden (..., C) -> (n, ..., D).

    draft_weight: heads.draft_weight(lm_head weight), (D, C); logit j scores token heads.vocab[j] (j without a
    draft vocabulary). root_vec (..., C): the lm_head row of the backbone's own next token (a tree's root), read
    by reads_root and token-linked heads. The heads may compute in a cheaper dtype: drafts never change the output."""
    dtype = next(heads.parameters()).dtype
    logits = heads(hidden.to(dtype), draft_weight, n, None if root_vec is None else root_vec.to(dtype))  # (n, M, D)
    return logits.reshape(n, *hidden.shape[:-1], -1)


def entropy(logits):
    """Entropy in nats of softmax(logits) over the last dimension."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# Trees. Node 0 is the root: the token the backbone already chose. Node i > 0 at depth d takes the
# rank[i]-th candidate of head d. `parents` is in topological order (parent index < node index);
# depth, rank and the ancestor matrix are derived from it once. DEFAULT_ACCURACY: an assumed chance
# that head d's rank-r candidate is right, which only shapes the presets (training measures the real one).
DEFAULT_ACCURACY = [
    [0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01, 0.01, 0.01],
    [0.30, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01, 0.01, 0.01],
    [0.20, 0.08, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01],
    [0.15, 0.06, 0.03, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
]


class Tree(nn.Module):
    """A token tree's structure, as buffers on the decode step's device: parents, depth, rank (N,);
    ancestors (N, N) bool, [i, j] = node j is on root..i; path (N, max_depth + 1), the nodes root..i padded
    with i, so that keeping a path always moves max_depth + 1 slots; on_path[i], unpadded, for the host."""

    def __init__(self, paths):
        """paths: Medusa-style rank tuples, [(0,), (1,), (0, 0)]: (0, 0) is head 1's top candidate, then head
        2's top candidate. Every prefix of a path must be a path too."""
        super().__init__()
        paths = sorted(set(map(tuple, paths)), key=lambda p: (len(p), p))
        index = {(): 0}
        for p in paths:
            if len(p) == 0 or any(r < 0 for r in p):
                raise ValueError(f"bad tree path {p!r}: paths are non-empty tuples of ranks >= 0")
            if p[:-1] not in index:
                raise ValueError(f"tree path {p!r} lacks its parent {p[:-1]!r}; list every prefix")
            index[p] = len(index)
        self.paths, N = paths, len(index)
        self.n_nodes, self.max_depth = N, len(paths[-1]) if paths else 0
        self.on_path = [[index[p[:d]] for d in range(len(p) + 1)] for p in [()] + paths]  # root..node
        ancestors = torch.zeros(N, N, dtype=torch.bool)
        for i, nodes in enumerate(self.on_path):
            ancestors[i, nodes] = True
        buffers = dict(parents=[-1] + [index[p[:-1]] for p in paths], depth=[len(p) for p in [()] + paths],
                       rank=[0] + [p[-1] for p in paths], ancestors=ancestors,
                       path=[nodes + nodes[-1:] * (self.max_depth + 1 - len(nodes)) for nodes in self.on_path])
        for name, value in buffers.items():
            self.register_buffer(name, torch.as_tensor(value), persistent=False)
        self.max_rank = int(self.rank.max())

    from_paths = classmethod(lambda cls, paths: cls(paths))

    @classmethod
    def chain(cls, k):
        """k drafts in a line: plain speculative decoding with the heads as the draft model."""
        return cls([(0,) * d for d in range(1, k + 1)])

    @classmethod
    def best(cls, accuracy, n_nodes):
        """The n_nodes-node tree of largest expected accepted length, if head d's rank-r candidate
        is right with chance accuracy[d-1][r], independently: grow best-first by path probability."""
        chosen, frontier = [], {(r,): accuracy[0][r] for r in range(len(accuracy[0]))}
        while frontier and len(chosen) < n_nodes - 1:
            path = max(frontier, key=frontier.get)
            p = frontier.pop(path)
            chosen.append(path)
            if len(path) < len(accuracy):
                for r, a in enumerate(accuracy[len(path)]):
                    frontier[path + (r,)] = p * a
        return cls(chosen)

    @classmethod
    def preset(cls, name):
        """'chain1'..'chain5', or 'sparse8'/'sparse16'/'sparse32'/'sparse64' (nodes, root included)."""
        if name.startswith("chain") and name[5:] in {"1", "2", "3", "4", "5"}:
            return cls.chain(int(name[5:]))
        if name.startswith("sparse") and name[6:] in {"8", "16", "32", "64"}:
            return cls.best(DEFAULT_ACCURACY, int(name[6:]))
        raise ValueError(f"unknown tree preset {name!r}; choose chain1..chain5 or sparse8/16/32/64")

    def mask(self, length, n_slots):
        """(N, n_slots) bool attention mask of the nodes, written at slots [length, length + N): every
        committed slot (< length), then the node's own ancestors, nothing else. length: an int, or a
        (1,) tensor (then no shape depends on its value)."""
        offset = torch.arange(n_slots, device=self.ancestors.device) - length  # (n_slots,) node index held
        in_tree = (offset >= 0) & (offset < self.n_nodes)
        return (offset < 0) | (in_tree & self.ancestors[:, offset.clamp(0, self.n_nodes - 1)])

    def extra_repr(self):
        return f"n_nodes={self.n_nodes}, max_depth={self.max_depth}, paths={self.paths}"


def propose(drafts, root, tree, vocab=None):
    """Fill the tree: root (1,) and drafts (K, D), the heads' logits -> node tokens (N,).
    vocab (D,): the token id of each logit column, for heads with a draft vocabulary."""
    top = drafts.topk(tree.max_rank + 1, dim=-1).indices  # (K, R)
    if vocab is not None:
        top = vocab[top]  # column -> token id
    return torch.cat([root, top[tree.depth[1:] - 1, tree.rank[1:]]])


def verify(tokens, target, tree):
    """tokens (N,) drafted; target (N,) the backbone's own token after each node (argmax or seeded draw). A node
    is correct if its token is target at its parent: the deepest node whose whole path is correct, (1,)."""
    correct = (tokens == target[tree.parents]) | (tree.depth == 0)  # the root (parent -1) is the backbone's own
    all_correct = ~(tree.ancestors & ~correct).any(-1)  # (N,)
    return torch.argmax(tree.depth * all_correct, dim=0, keepdim=True)


# Sampling. The token at position t is drawn by the Gumbel-max trick with noise that depends only on (seed, t).
# Every tree node draws the backbone's own token so; a tree step then accepts exactly the drafts AR would draw.

@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # then keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # then the fewest most likely tokens whose probability reaches top_p; 1 = all

    def __post_init__(self):
        if not self.temperature >= 0:  # NaN fails too
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus cut), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = all tokens), got {self.top_k}")


def warp(logits, sampling):
    """(N, V) logits -> (N, V) unnormalised probabilities: divide by the temperature, keep the top_k most likely,
    then the fewest of those whose share of their mass reaches top_p (the one crossing it kept); 0 elsewhere.
    A token exactly as likely as the last one kept is kept too."""
    p = (logits.float() / sampling.temperature).softmax(-1)
    if sampling.top_k == 0 and sampling.top_p == 1:
        return p
    top = p.topk(sampling.top_k or p.shape[-1], dim=-1).values  # (N, k), most likely first
    before = top.cumsum(-1) - top  # mass of the more likely tokens
    n_kept = (before < sampling.top_p * top.sum(-1, keepdim=True)).sum(-1, keepdim=True)  # (N, 1), at least 1
    floor = top.gather(-1, n_kept - 1)  # (N, 1): the least likely kept probability
    return p * (p >= floor)  # a threshold, not a scatter back to the ids: inductor (2.11, CUDA) fails on that


def uniform(seed, position, n):
    """(N, n) numbers in (0, 1) that depend only on (seed, position, column): a 32-bit integer hash of the
    three, so the device computes them inside the step with no generator state. seed (1,), position (N,)."""
    def mix(x):  # multipliers < 2**27 keep every product of 32-bit values inside int64
        for _ in range(3):
            x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
        return x
    bits = mix(mix(mix(seed & 0xFFFFFFFF) ^ position)[:, None] ^ torch.arange(n, device=position.device))
    return ((bits >> 8).float() + 0.5) / 2 ** 24  # 24 bits, exact in float32, never 0 or 1


def choose(logits, position, seed, sampling):
    """The backbone's token after each row of logits (N, V), landing at `position` (N,): the argmax, or a draw
    from the warped distribution, argmax(log p + Gumbel noise). Rounding that differs between a 1-token and
    an N-token forward moves the draw only if the top two noisy scores lie that close."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    gumbel = -torch.log(-torch.log(uniform(seed, position, logits.shape[-1])))  # (N, V)
    return (warp(logits, sampling).log() + gumbel).argmax(-1)


# Checkpoints: atomic writes, configs included, refuse the wrong backbone.

def write_atomically(path, write):
    """write(temporary path), then rename over `path`: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def read_checkpoint(path, what, fix):
    """torch.load of a file written by torch.save (tensors and plain values), on the CPU; a ValueError that
    names it (`what` and path) and the fix when it is truncated or corrupt."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} is truncated or corrupt ({type(e).__name__}); {fix}") from e


def save_heads(path, heads, backbone, extra):
    """Write heads (half precision) with their spec and the backbone's fingerprint, atomically."""
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu() for k, v in heads.state_dict().items()}
    payload = {"spec": heads.spec, "state_dict": state, "backbone": backbone.fingerprint(), **extra}
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_heads(path, model):
    """(heads in float32, checkpoint dict) for this backbone, or a ValueError that says why not."""
    if not os.path.isfile(path):
        raise ValueError(f"no heads checkpoint at {path}; train some with `python train.py`")
    ckpt = read_checkpoint(path, "heads checkpoint", f"train again or restore it (git checkout -- {path})")
    if ckpt.get("backbone") != model.fingerprint():
        raise ValueError(f"heads in {path} were trained for another backbone (fingerprint "
                         f"{ckpt.get('backbone')} != {model.fingerprint()}); train heads for this model")
    heads = build_heads(model.config, ckpt["spec"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    if "vocab" in state:  # the token ids the heads draft over (train.py's draft_vocab)
        heads.draft_over(state["vocab"])
    heads.load_state_dict(state)
    return heads.to(model.embed.weight.device), ckpt


# The decode step and the loop. What a step reads and advances (KV cache, its length, root token, last hidden
# state) lives on the device at fixed addresses and every shape is fixed by the tree, so torch.compile captures a
# whole step, draft -> propose -> forward -> verify -> keep -> gate, as one graph (on a GPU one CUDA graph).

def forward_prompt(model, tokens, last):
    """A prompt's forward pass, as a pure function: tokens (T,) -> their keys and values, each (n_layer, 1, G, T, D),
    and the backbone's logits (1, V) and final hidden state (1, C) at index last (1,) only. Pure (it writes no
    Decoder's state), so one compiled graph per prompt length serves every Decoder of this backbone."""
    T = len(tokens)
    cache = KVCache(model.config, T, device=tokens.device, dtype=model.embed.weight.dtype)
    hidden = model.trunk(tokens[None], torch.arange(T, device=tokens.device), None, cache, slice(0, T))[0, last]
    return cache.k, cache.v, model.lm_head(hidden), hidden


_compiled_forward_prompt = {}  # mode -> forward_prompt compiled in it, shared by every Decoder


class Decoder(nn.Module):
    """Decodes with one backbone, head set, tree, gate signal and sampling rule into its own KV cache of max_len
    slots: reused across prompts, its shapes (and compiled graphs) never change. An AR step is a tree step on
    the root-only tree; without heads every step is one."""

    def __init__(self, model, heads=None, tree=None, gate_on="backbone", sampling=Sampling(), max_len=1024):
        super().__init__()
        tree = Tree.chain(heads.n_heads) if heads is not None and tree is None else tree
        check_parts(model, heads, tree, gate_on)
        device, dtype = model.embed.weight.device, model.embed.weight.dtype
        self.model, self.gate_on, self.sampling = model, gate_on, sampling
        self.add_module("heads", heads)  # a submodule slot even when None, so that dynamo's guards tell Decoders
        # with and without heads apart by value (skip_guard_eval_unsafe keeps only such guards)
        self.forward_prompt, self.min_prompt_slots = forward_prompt, None  # compile(): a compiled one, padded prompts
        self.fixed_shapes = False  # eager steps attend over the committed slots only; compile() (or whoever
        # compiles `step` by hand) sets True: all max_len slots, shapes that never change
        self.tree, self.root_only = (tree or Tree([])).to(device), Tree([]).to(device)
        if heads is not None:  # (D, C): the lm_head rows the heads draft through, one copy in their dtype
            self.draft_weight = heads.to(device).draft_weight(model.lm_head.weight).to(next(heads.parameters()).dtype)
        # The state: on the device, at fixed addresses (a CUDA graph writes into them in place)
        self.cache = KVCache(model.config, max_len, device=device, dtype=dtype)
        self.length, self.root, self.seed = (torch.zeros(1, dtype=torch.long, device=device) for _ in range(3))
        self.threshold = torch.zeros(1, device=device)
        self.hidden = torch.zeros(model.config.n_embd, dtype=dtype, device=device)
        self.drafts = torch.zeros(self.tree.max_depth, heads.n_draft_tokens if heads else 0, device=device)
        for state in (self.cache.k, self.cache.v, self.length, self.root, self.seed, self.threshold, self.hidden,
                      self.drafts):
            torch._dynamo.mark_static_address(state)

    def draft(self):  # (K, D) draft logits of heads 1..max_depth from the last hidden state and root (its row)
        root_vec = self.model.lm_head.weight[self.root]  # (1, C)
        return head_logits(self.heads, self.draft_weight, self.hidden[None], self.tree.max_depth, root_vec)[:, 0]

    def prefill(self, prompt):
        """The prompt (P,) into the cache, then `settle`. Compiled, the prompt is padded to a power of two of at
        least min_prompt_slots tokens, so that a few graphs cover every length; the padding's keys and values
        land past `length`, where the mask hides them until steps overwrite them."""
        P, T = len(prompt), self.prompt_slots(len(prompt))
        tokens = torch.cat([prompt, prompt.new_zeros(T - P)])  # (T,)
        k, v, logits, hidden = self.forward_prompt(self.model, tokens, torch.tensor([P - 1], device=prompt.device))
        self.cache.k[:, :, :, :T] = k  # copied at once: a CUDA graph's outputs are overwritten by its next replay
        self.cache.v[:, :, :, :T] = v
        self.length.fill_(P)
        return self.settle(logits, hidden, self.length)

    def prompt_slots(self, P):
        """The length a prompt of P tokens is padded to before its forward: P itself unless compiled."""
        if self.min_prompt_slots is None:
            return P
        return min(max(self.min_prompt_slots, 1 << (P - 1).bit_length()), self.cache.max_len,
                   self.model.config.block_size)

    def settle(self, logits, hidden, position):
        """After a prefill or a step: the next root drawn from logits (1, V) at position (1,), hidden (1, C)
        kept, and the gate for the next step: its choice (1,) long, 1 = a tree step; the entropy it read."""
        self.root.copy_(choose(logits, position, self.seed, self.sampling))
        self.hidden.copy_(hidden[0])
        if self.heads is None:
            return torch.zeros_like(self.root), torch.zeros_like(self.threshold)
        if self.gate_on == "head1":  # head 1 must run before the gate can read it: draft now
            self.drafts.copy_(self.draft())
        signal = entropy(self.drafts[:1] if self.gate_on == "head1" else logits)  # (1,)
        return (signal < self.threshold).long(), signal

    def step(self, parallel, n_slots=None):
        """One decode step, a tree step (parallel=True) or an AR step, advancing the state in place. Returns
        (3 + N,) long: the number of new tokens, the accepted node, the gate's choice for the next step,
        the N node tokens (the new tokens are the accepted node's path); and the entropy the gate read.
        n_slots: attend over the first n_slots cache slots (at least length + N) rather than all max_len."""
        tree = self.tree if parallel else self.root_only
        cache = self.cache if n_slots is None else self.cache.first(n_slots)
        L = self.length  # (1,) committed tokens
        tokens = self.root.clone()  # (1,): settle overwrites the root below
        if parallel:
            drafts = self.drafts if self.gate_on == "head1" else self.draft()
            tokens = propose(drafts, self.root, tree, self.heads.vocab)  # (N,)
        position = L + tree.depth  # (N,) siblings share a position
        mask = tree.mask(L, cache.max_len)  # (N, n_slots)
        logits, hidden = self.model.layers(tokens[None], position, mask, cache, L + torch.arange(
            tree.n_nodes, device=L.device))
        target = choose(logits[0], position + 1, self.seed, self.sampling)  # (N,) the backbone's own next tokens
        best = verify(tokens, target, tree)  # (1,)
        path = tree.path[best][0]  # (max_depth + 1,) root..best, padded: a fixed number of slots
        self.cache.move(L + path, L + torch.arange(len(path), device=L.device))  # padding lands past the end
        n_new = tree.depth[best] + 1
        self.length.add_(n_new)
        parallel_next, signal = self.settle(logits[0, best], hidden[0, best], position[best] + 1)
        return torch.cat([n_new, best, parallel_next, tokens]), signal

    def compile(self, mode="default", min_prompt_slots=64):
        """torch.compile the step whole, with fixed shapes: one graph per tree (the root-only one too) for
        every prompt; and the prompt's forward, one graph per padded length (64, 128, 256, ... tokens), shared
        with the other Decoders of the backbone. mode="reduce-overhead" replays each as a CUDA graph."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # 2 graphs a Decoder
        self.step = torch.compile(self.step, fullgraph=True, dynamic=False, mode=mode)
        self.fixed_shapes = True  # every step attends over all max_len slots: one graph a tree
        if mode not in _compiled_forward_prompt:
            _compiled_forward_prompt[mode] = torch.compile(forward_prompt, fullgraph=True, dynamic=False, mode=mode)
        self.forward_prompt, self.min_prompt_slots = _compiled_forward_prompt[mode], min_prompt_slots
        return self

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, gate_threshold=float("inf"), eos_id=None, seed=0, trace=False):
        """New token ids (EOS included when hit) and Stats for one prompt; see `generate`."""
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.length.device)
        check_request(self.model, prompt, max_new_tokens, self.tree, self.cache.max_len)
        if gate_threshold != gate_threshold:
            raise ValueError("gate_threshold is NaN: use 0 (always AR), inf (always a tree) or a value in nats")
        self.seed.fill_(seed)
        self.threshold.fill_(gate_threshold)
        parallel, signal = self.prefill(prompt)
        parallel, length = bool(parallel), len(prompt)  # length: committed tokens, as the device counts them
        out, stats = [], Stats(trace=[] if trace else None)
        while len(out) < max_new_tokens and eos_id not in out[-1:]:
            gate = float(signal) if trace and self.heads is not None else None  # extra reads: trace only
            n_slots = None if self.fixed_shapes else length + self.tree.n_nodes  # an AR step's 1 node fits too
            packed, signal = self.step(parallel, n_slots)
            n_new, best, parallel_next, *tokens = packed.tolist()  # the step's one host read
            length += n_new
            nodes = self.tree.on_path[best] if parallel else [0]  # root..the accepted node
            new = [tokens[i] for i in nodes]
            if eos_id in new:
                new = new[:new.index(eos_id) + 1]  # EOS may arrive inside an accepted chunk
            new = new[:max_new_tokens - len(out)]
            out += new
            stats.record(parallel, n_new - 1, len(new))
            if trace:
                stats.trace.append(dict(gate=gate, tree=tokens if parallel else None, path=nodes if parallel else None,
                                        emitted=new))
            parallel = bool(parallel_next)
        return out, stats


@dataclass
class Stats:
    steps: int = 0  # backbone forwards in decode (prefill excluded)
    ar_steps: int = 0  # of which plain AR steps (the gate said no, or no heads)
    new_tokens: int = 0
    accept_lengths: list = field(default_factory=list)  # drafts accepted at each parallel step
    trace: list = None  # per step: gate entropy, tree tokens, accepted path, emitted tokens (trace=True)

    def record(self, parallel, accepted, emitted):
        """One step: `accepted` drafts (0 for an AR step), `emitted` tokens after the EOS and length cut."""
        self.steps += 1
        self.ar_steps += not parallel
        self.new_tokens += emitted
        if parallel:
            self.accept_lengths.append(accepted)

    # tau: tokens per backbone forward, the backbone's own included (AR = 1); drafts accepted -> steps
    tokens_per_step = property(lambda self: self.new_tokens / max(self.steps, 1))
    accept_histogram = property(lambda self: dict(sorted(Counter(self.accept_lengths).items())))


def check_parts(model, heads, tree, gate_on):
    """A ValueError for a tree without heads, heads of another backbone or too few, an unknown gate."""
    cfg = model.config
    if gate_on not in ("backbone", "head1"):
        raise ValueError(f"unknown gate_on {gate_on!r}: use 'backbone' (next-token entropy) or 'head1'")
    if tree is not None and heads is None:
        raise ValueError("a tree needs draft heads: pass heads=... or drop tree=")
    if heads is not None and (heads.n_embd, heads.vocab_size) != (cfg.n_embd, cfg.vocab_size):
        raise ValueError(f"heads were built for width {heads.n_embd} / vocab {heads.vocab_size}, but the "
                         f"model has {cfg.n_embd} / {cfg.vocab_size}: train heads for this model")
    if heads is not None and tree.max_depth > heads.n_heads:
        raise ValueError(f"tree depth {tree.max_depth} needs {tree.max_depth} heads, but only "
                         f"{heads.n_heads} are given: use a shallower tree or more heads")


def check_request(model, prompt, max_new_tokens, tree, max_len):
    """Turn a bad prompt or length into a ValueError that names the problem and the fix."""
    cfg = model.config
    if prompt.ndim != 1 or len(prompt) == 0:
        raise ValueError("the prompt is empty (or not 1-D): pass at least one token id")
    if int(prompt.min()) < 0 or int(prompt.max()) >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}); got {int(prompt.min())}.."
                         f"{int(prompt.max())} (was the text encoded with this model's tokenizer?)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens + tree.max_depth > cfg.block_size:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + tree depth ({tree.max_depth}) "
                         f"exceeds the context of {cfg.block_size} tokens; shorten the prompt or generate less")
    if len(prompt) + max_new_tokens + tree.n_nodes > max_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + tree ({tree.n_nodes} nodes) "
                         f"overflow the decoder's KV cache of {max_len} slots; build the Decoder with a larger max_len")


def generate(model, prompt_ids, max_new_tokens, heads=None, tree=None, gate_threshold=float("inf"), eos_id=None,
             gate_on="backbone", temperature=0.0, top_k=0, top_p=1.0, seed=0, trace=False):
    """Decode one prompt: (new token ids, EOS included when hit; Stats). Without heads: plain AR.

    With heads the gate reads an entropy before each step (`gate_on`: "backbone", the next-token
    distribution, or "head1", head 1's): below `gate_threshold` a tree step, else an AR step (0 = always
    AR, inf = always a tree). temperature 0 is greedy, else sampling from the distribution warped by
    temperature, top_k, top_p, the draw at each position depending only on (seed, position). The ids are
    AR's whatever the heads, tree and gate (in float32). For many prompts, or compiled: a Decoder."""
    tree_slots = tree.n_nodes if tree is not None else heads.n_heads + 1 if heads is not None else 1
    decoder = Decoder(model, heads, tree, gate_on, Sampling(temperature, top_k, top_p),
                      max_len=len(prompt_ids) + max(max_new_tokens, 1) + tree_slots)
    return decoder.generate(prompt_ids, max_new_tokens, gate_threshold, eos_id, seed, trace)


def main(argv):
    """python cerberus.py "your question": SmolLM2's answer with the shipped Cerberus heads, the tokens
    from accepted drafts marked, then tau and decode speed against plain AR on the same prompt."""
    model, tokenizer = load_smollm2()
    heads, ckpt = load_heads(os.path.join(os.path.dirname(os.path.abspath(__file__)), "heads", "cerberus.pt"), model)
    prompt, gate = chat_prompt(tokenizer, " ".join(argv) or "What makes a good cup of coffee?"), ckpt["gate"]
    eos_id, runs, max_len = tokenizer.encode("<|im_end|>", allowed_special="all")[0], {}, len(prompt) + 300
    for name, decoder in [("AR", Decoder(model, max_len=max_len)),
                          ("Cerberus", Decoder(model, heads, Tree(gate["tree"]), gate["gate_on"], max_len=max_len))]:
        decoder.generate(prompt, 8, gate["threshold"], eos_id)  # warm-up: first calls pay one-off costs
        start = time.perf_counter()
        runs[name] = *decoder.generate(prompt, 256, gate["threshold"], eos_id, trace=True), time.perf_counter() - start
    (ids, stats, seconds), (ar_ids, _, ar_seconds) = runs["Cerberus"], runs["AR"]
    mark = ("\033[32m", "\033[0m") if sys.stdout.isatty() else ("[", "]")
    for step in stats.trace:  # a tree step emits its root (the backbone's own token), then accepted drafts
        drafted = tokenizer.decode(step["emitted"][1:])
        print(tokenizer.decode(step["emitted"][:1]) + (mark[0] + drafted + mark[1] if drafted else ""), end="")
    print(f"\n\n{mark[0]}marked{mark[1]}: accepted drafts. {len(ids)} tokens in {stats.steps} forwards: tau "
          f"{stats.tokens_per_step:.2f}, {len(ids) / seconds:.1f} tok/s against AR's {len(ar_ids) / ar_seconds:.1f} "
          f"({ar_seconds / seconds:.2f}x, prefill included); same tokens as AR: {ids == ar_ids}")


if __name__ == "__main__":
    main(sys.argv[1:])
