"""Cerberus decoding: draft heads, the entropy gate, tree verification and the decode loop.

One decoding step, as in the paper (Liu et al., arXiv 2410.13344):
    gate:    entropy of the next-token distribution; high -> a plain AR step, low -> a parallel step
    propose: the heads read the last accepted hidden state and fill a token tree from their top-k
    verify:  one backbone forward over the whole tree (tree attention mask); keep the deepest node
             whose every ancestor is the backbone's own greedy choice, plus the backbone's next token
    keep:    compact the accepted path's K/V in the cache; the rest is overwritten later
The output is token for token the output of plain greedy AR: drafts only change the speed.
"""
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import cache_for, linear


# ----------------------------------------------------------------------------------------------
# Heads. Head k (k = 1..K) guesses the token k steps after the backbone's own next token, from the
# backbone's last hidden state h (and, in the reads_root variant, from that next token too). Both
# kinds run their blocks for all heads in one batched matmul over stacked weights and share the
# backbone's lm_head, so they only add small C x C matrices. A head set maps h to draft logits.

def residual_blocks(z, weight, bias):
    """Each head's stack of Medusa blocks z_k <- z_k + SiLU(W_k z_k + b_k), all heads in one batched
    matmul per layer: z (K, M, C), weight (L, K, C, C), bias (L, K, C) -> (K, M, C)."""
    for w, b in zip(weight, bias):
        z = z + F.silu(z @ w.mT + b[:, None])
    return z


class DraftHeads(nn.Module):
    """What Medusa and Cerberus heads share: their sizes, their spec (stored in checkpoints), their
    draft vocabulary (optional) and the input state of every head. With reads_root=True (a variant,
    not in either paper) that state also reads the backbone's own next token, known before any head
    runs: h + SiLU(P [h ; e] + b), e being that token's lm_head row. Zero init: it starts as h."""

    def __init__(self, config, kind, n_heads, n_layers, reads_root):
        super().__init__()
        C = config.n_embd
        self.n_heads, self.n_embd, self.vocab_size = n_heads, C, config.vocab_size
        self.spec = dict(kind=kind, n_heads=n_heads, n_layers=n_layers, reads_root=reads_root)
        self.root_weight = nn.Parameter(torch.zeros(C, 2 * C)) if reads_root else None
        self.root_bias = nn.Parameter(torch.zeros(C)) if reads_root else None
        self.register_buffer("vocab", None)  # (D,) token ids the heads draft over; None = all V (draft_over)

    def draft_over(self, token_ids):
        """Let the heads draft over these D token ids only (a draft vocabulary, as in EAGLE-3): their
        lm_head shrinks from V to D rows. train.py picks the tokens the backbone writes most often. A
        token outside them can never be drafted, which costs acceptance only, never correctness."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.ndim != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"a draft vocabulary is a non-empty 1-D list of token ids in [0, {self.vocab_size})")
        self.vocab = ids.to(next(self.parameters()).device)
        return self

    @property
    def n_draft_tokens(self):
        """D, the size of the heads' draft vocabulary (V without one)."""
        return self.vocab_size if self.vocab is None else len(self.vocab)

    def draft_weight(self, lm_weight):
        """lm_head (V, C) -> the rows the heads draft through: (D, C) with a draft vocabulary, else
        (V, C). With a vocabulary it is a copy: make it once per model, not at every step."""
        return lm_weight if self.vocab is None else lm_weight[self.vocab].contiguous()

    @staticmethod
    def project(states, draft_weight):
        """Head states through the shared lm_head (D, C): (..., C) -> (..., D), in draft_weight's dtype."""
        return linear(states.to(draft_weight.dtype), draft_weight)

    def input_state(self, hidden, root_vec):
        """hidden, root_vec (..., C) -> (M, C), M positions. root_vec may be None for the papers' heads."""
        h = hidden.reshape(-1, self.n_embd)
        if self.root_weight is None:
            return h
        if root_vec is None:
            raise ValueError("these heads read the root token (reads_root=True): pass root_vec, the lm_head "
                             "row of the backbone's next token (head_logits(..., root_vec=lm_weight[ids]))")
        return h + F.silu(torch.cat([h, root_vec.reshape(h.shape)], -1) @ self.root_weight.mT + self.root_bias)


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
    """Heads with the sequential-knowledge link inside (DESIGN §1).

    stage 1:  z_k = h, then n_layers Medusa blocks z_k = z_k + SiLU(W_k z_k)   (our reading: one)
    stage 2:  s_k = z_k + SiLU(A_k [z_k ; x_{k-1}])      head k also sees what head k-1 did
    Zero init makes every head start as h itself. What x_{k-1} is, is the `link`:
      "hidden" (our reading of the paper): x_{k-1} = z_{k-1}, what head k-1 computed; x_0 = h.
               All heads in one batched pass.
      "token"  (a variant, measured better): x_{k-1} = p e, e the lm_head row of head k-1's top-1
               draft (what head k-1 decided) and p its probability (how sure it was); x_0 = the
               root's row. Heads run one after another (each needs its predecessor's argmax),
               but it is still one pass over the heads, with no backbone forward in between,
               unlike Hydra's heads, which read the tree's tokens.
    """

    def __init__(self, config, n_heads=4, n_layers=1, reads_root=False, link="hidden"):
        super().__init__(config, "cerberus", n_heads, n_layers, reads_root)
        if link not in ("hidden", "token"):
            raise ValueError(f"unknown Cerberus link {link!r}; expected 'hidden' or 'token'")
        self.spec["link"] = link
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
        if root_vec is None:
            raise ValueError("token-linked Cerberus heads start from the root token: pass root_vec, the lm_head "
                             "row of the backbone's next token (head_logits(..., root_vec=lm_weight[ids]))")
        x_prev, logits = root_vec.reshape(h.shape), []
        for k in range(n):
            s_k = z[k] + F.silu(torch.cat([z[k], x_prev], -1) @ self.w2[k].mT + self.b2[k])  # (M, C)
            logits.append(self.project(s_k, draft_weight))  # (M, D)
            if k + 1 < n:  # what head k+1 reads; the last head has no successor
                p_top, top = logits[-1].detach().float().softmax(-1).max(-1)  # (M,): head k's top-1, its probability
                x_prev = (p_top[:, None] * draft_weight[top].float()).to(h.dtype)  # (M, C)
        return torch.stack(logits)


def build_heads(config, spec):
    """Heads from their spec dict (as stored in checkpoints): {"kind": "medusa"|"cerberus", ...}."""
    kinds = {"medusa": MedusaHeads, "cerberus": CerberusHeads}
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in kinds:
        raise ValueError(f"unknown head kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind](config, **spec)


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def head_logits(heads, draft_weight, hidden, n, root_vec=None):
    """Draft logits of the first n heads through the shared lm_head: hidden (..., C) -> (n, ..., D).

    draft_weight: heads.draft_weight(lm_head weight), (D, C); logit j scores token heads.vocab[j]
    (token j without a draft vocabulary, D = V). root_vec (..., C): the lm_head row of the backbone's
    own next token at each position (a tree's root); heads built with reads_root=True and token-linked
    Cerberus heads need it, the papers' heads ignore it. Heads and draft_weight may be in a cheaper
    dtype than the backbone (bfloat16, say): drafts never change the output.
    """
    dtype = next(heads.parameters()).dtype
    logits = heads(hidden.to(dtype), draft_weight, n, None if root_vec is None else root_vec.to(dtype))  # (n, M, D)
    return logits.reshape(n, *hidden.shape[:-1], -1)


def entropy(logits):
    """Entropy in nats of softmax(logits) over the last dimension."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------------------------
# Trees. Node 0 is the root: the token the backbone already chose. Node i > 0 at depth d takes the
# rank[i]-th candidate of head d. `parents` is in topological order (parent index < node index);
# depth, rank and the ancestor matrix are derived from it once.

# Assumed chance that head d's rank-r candidate is right (rows: heads 1..4). Only shapes the presets;
# train.py measures the real table and Tree.best builds a tree from it.
DEFAULT_ACCURACY = [
    [0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01, 0.01, 0.01],
    [0.30, 0.10, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01, 0.01, 0.01],
    [0.20, 0.08, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01],
    [0.15, 0.06, 0.03, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
]


class Tree:
    def __init__(self, paths):
        """paths: Medusa-style rank tuples, e.g. [(0,), (1,), (0, 0)]: (0, 0) is head 1's top
        candidate followed by head 2's top candidate. Every prefix of a path must be a path too."""
        paths = sorted(set(map(tuple, paths)), key=lambda p: (len(p), p))
        index = {(): 0}
        for p in paths:
            if len(p) == 0 or any(r < 0 for r in p):
                raise ValueError(f"bad tree path {p!r}: paths are non-empty tuples of ranks >= 0")
            if p[:-1] not in index:
                raise ValueError(f"tree path {p!r} lacks its parent {p[:-1]!r}; list every prefix")
            index[p] = len(index)
        self.paths = paths
        N = len(index)
        self.parents = torch.tensor([-1] + [index[p[:-1]] for p in paths])  # (N,)
        self.depth = torch.tensor([0] + [len(p) for p in paths])  # (N,)
        self.rank = torch.tensor([0] + [p[-1] for p in paths])  # (N,)
        self.ancestors = torch.eye(N, dtype=torch.bool)  # (N, N): ancestors[i, j] = j is on root..i
        for i in range(1, N):
            self.ancestors[i] |= self.ancestors[self.parents[i]]
        self.n_nodes, self.max_depth = N, len(paths[-1]) if paths else 0
        self.max_rank = int(self.rank.max())

    @classmethod
    def from_paths(cls, paths):
        return cls(paths)

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

    def to(self, device):
        for name in ("parents", "depth", "rank", "ancestors"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def mask(self, n_cached):
        """(N, L + N) bool attention mask: every committed token, then the node's own ancestors."""
        seen = torch.ones(self.n_nodes, n_cached, dtype=torch.bool, device=self.ancestors.device)
        return torch.cat([seen, self.ancestors], dim=1)

    def __repr__(self):
        return f"Tree(n_nodes={self.n_nodes}, max_depth={self.max_depth}, paths={self.paths})"


def propose(drafts, root, tree, vocab=None):
    """Fill the tree: root (1,) and drafts (K, D), the heads' logits -> node tokens (N,).
    vocab (D,): the token id of each logit column, for heads with a draft vocabulary."""
    top = drafts.topk(tree.max_rank + 1, dim=-1).indices  # (K, R)
    if vocab is not None:
        top = vocab[top]  # column -> token id
    return torch.cat([root, top[tree.depth[1:] - 1, tree.rank[1:]]])


def verify(tokens, target, tree):
    """Greedy verification. tokens (N,) drafted; target (N,) the backbone's argmax at each node.

    A node is correct if its token is the backbone's choice after its parent. Returns the accepted
    path (node indices, root first): the deepest node whose ancestors are all correct.
    """
    # (N,) the token is the backbone's choice after the parent; the root (parent -1) is its own choice
    correct = (tokens == target[tree.parents]) | (tree.depth == 0)
    all_correct = ~(tree.ancestors & ~correct).any(-1)  # (N,) the whole root..node path is correct
    best = torch.argmax(tree.depth * all_correct)
    return tree.ancestors[best].nonzero().squeeze(1)


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, configs included, refuse the wrong backbone.

def write_atomically(path, write):
    """write(temporary path), then rename over `path`: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_heads(path, heads, backbone, extra):
    """Write heads (half precision) with their spec and the backbone's fingerprint, atomically."""
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu() for k, v in heads.state_dict().items()}
    payload = {"spec": heads.spec, "state_dict": state, "backbone": backbone.fingerprint(), **extra}
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_heads(path, model):
    """(heads in float32, checkpoint dict) for this backbone, or a ValueError that says why not."""
    if not os.path.isfile(path):
        raise ValueError(f"no heads checkpoint at {path}; train some with `python train.py`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"heads checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                         f"train again or restore it (git checkout -- {path})") from e
    if ckpt.get("backbone") != model.fingerprint():
        raise ValueError(f"heads in {path} were trained for another backbone (fingerprint "
                         f"{ckpt.get('backbone')} != {model.fingerprint()}); train heads for this model")
    heads = build_heads(model.config, ckpt["spec"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    if "vocab" in state:  # the token ids the heads draft over (train.py's draft_vocab)
        heads.draft_over(state["vocab"])
    if ckpt["spec"]["kind"] == "cerberus" and "n_layers" not in ckpt["spec"]:  # saved before stage 1 could
        state["w1"], state["b1"] = state["w1"][None], state["b1"][None]  # be deeper: one block, unstacked
    heads.load_state_dict(state)
    return heads.to(model.embed.weight.device), ckpt


# ----------------------------------------------------------------------------------------------
# The decode loop.

@dataclass
class Stats:
    steps: int = 0  # backbone forwards in decode (prefill excluded)
    ar_steps: int = 0  # of which plain AR steps (the gate said no, or no heads)
    new_tokens: int = 0
    accept_lengths: list = field(default_factory=list)  # drafts accepted at each parallel step
    trace: list = None  # per step: gate value, tree tokens, accepted path, emitted tokens (trace=True)

    @property
    def tokens_per_step(self):
        """tau: tokens emitted per backbone forward, the backbone's own token included (AR = 1)."""
        return self.new_tokens / max(self.steps, 1)

    @property
    def accept_histogram(self):
        return dict(sorted(Counter(self.accept_lengths).items()))


def check_request(model, prompt, max_new_tokens, heads, tree, gate_on):
    """Turn bad input into a ValueError that names the problem and the fix."""
    cfg = model.config
    if prompt.ndim != 1 or len(prompt) == 0:
        raise ValueError("the prompt is empty (or not 1-D): pass at least one token id")
    if int(prompt.min()) < 0 or int(prompt.max()) >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}); got {int(prompt.min())}.."
                         f"{int(prompt.max())} (was the text encoded with this model's tokenizer?)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    depth = tree.max_depth if tree is not None else 0
    if len(prompt) + max_new_tokens + depth > cfg.block_size:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + tree depth ({depth}) "
                         f"exceeds the context of {cfg.block_size} tokens; shorten the prompt or generate less")
    if tree is not None and heads is None:
        raise ValueError("a tree needs draft heads: pass heads=... or drop tree=")
    if gate_on not in ("backbone", "head1"):
        raise ValueError(f"unknown gate_on {gate_on!r}: use 'backbone' (next-token entropy) or 'head1'")
    if heads is not None:
        if (heads.n_embd, heads.vocab_size) != (cfg.n_embd, cfg.vocab_size):
            raise ValueError(f"heads were built for width {heads.n_embd} / vocab {heads.vocab_size}, but the "
                             f"model has {cfg.n_embd} / {cfg.vocab_size}: train heads for this model")
        if tree.max_depth > heads.n_heads:
            raise ValueError(f"tree depth {tree.max_depth} needs {tree.max_depth} heads, but only "
                             f"{heads.n_heads} are given: use a shallower tree or more heads")


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, heads=None, tree=None, gate_threshold=float("inf"),
             eos_id=None, gate_on="backbone", trace=False, draft_weight=None, cache=None):
    """Greedy decoding of one prompt; returns (new token ids, Stats). Without heads: plain AR.

    With heads: at each step, if the entropy of the gate's distribution (`gate_on`: "backbone",
    the next-token distribution; or "head1", head 1's) is below `gate_threshold`, a parallel step
    (0 = always AR, inf = always parallel). The ids are those of greedy AR whatever the heads do.
    draft_weight: the lm_head rows the heads draft through, heads.draft_weight(lm_head weight) cast
    to the heads' dtype; made here by default (pass it to make that copy once, not in every call).
    cache: a KVCache to decode into, from slot 0 (default: a fresh one sized for this call). One static
    cache reused by every call keeps the shapes of compiled steps fixed (GPT.compile_steps).
    """
    device = model.embed.weight.device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if heads is not None and tree is None:
        tree = Tree.chain(heads.n_heads)
    check_request(model, prompt, max_new_tokens, heads, tree, gate_on)
    if heads is not None:
        tree = tree.to(device)
        lm_weight = model.lm_head.weight  # (V, C): the root's row, for heads that read the root
        if draft_weight is None:
            draft_weight = heads.draft_weight(lm_weight).to(next(heads.parameters()).dtype)
        if len(draft_weight) != heads.n_draft_tokens:
            raise ValueError(f"draft_weight has {len(draft_weight)} rows but the heads draft over "
                             f"{heads.n_draft_tokens} tokens: pass heads.draft_weight(model.lm_head.weight)")

    cache = cache_for(model, len(prompt) + max_new_tokens + (tree.n_nodes if tree else 1), cache)
    logits, hidden = model(prompt[None], cache)  # prefill
    cache.length = len(prompt)
    next_logits, last_hidden = logits[0, -1], hidden[0, -1]  # (V,), (C,) at the last accepted token
    out, stats = [], Stats(trace=[] if trace else None)

    while True:
        root = next_logits.argmax().view(1)  # the backbone's own next token, (1,)
        drafts = gate = None
        use_heads = heads is not None and gate_threshold > 0  # threshold 0: always AR
        if use_heads and gate_on == "head1":
            drafts = head_logits(heads, draft_weight, last_hidden, max(tree.max_depth, 1), lm_weight[root])
        if use_heads and gate_threshold < math.inf:  # threshold inf: always parallel, no entropy needed
            gate = float(entropy(next_logits if drafts is None else drafts[0]))
        parallel = use_heads and (gate is None or gate < gate_threshold)

        if parallel:  # propose -> verify -> keep
            if drafts is None:
                drafts = head_logits(heads, draft_weight, last_hidden, tree.max_depth, lm_weight[root])
            tokens = propose(drafts, root, tree, heads.vocab)  # (N,)
            logits, hidden = model(tokens[None], cache, pos=cache.length + tree.depth, mask=tree.mask(cache.length))
            path = verify(tokens, logits[0].argmax(-1), tree)  # accepted nodes, root first
            cache.keep(path)
            last = path[-1:]  # (1,) the deepest accepted node, left on the device: indexing with it reads nothing back
            next_logits, last_hidden, accepted = logits[0, last][0], hidden[0, last][0], tokens[path]
            stats.accept_lengths.append(len(path) - 1)
        else:  # plain AR step
            logits, hidden = model(root[None], cache)
            cache.length += 1
            next_logits, last_hidden, accepted = logits[0, -1], hidden[0, -1], root
            stats.ar_steps += 1
        stats.steps += 1

        new = accepted.tolist()
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]  # EOS may arrive inside an accepted chunk
        new = new[:max_new_tokens - len(out)]
        out += new
        stats.new_tokens += len(new)
        if trace:
            stats.trace.append(dict(gate=gate, tree=tokens.tolist() if parallel else None,
                                    path=path.tolist() if parallel else None, emitted=new))
        if len(out) >= max_new_tokens or (eos_id is not None and out[-1] == eos_id):
            return out, stats
