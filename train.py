"""Train Medusa and Cerberus heads on a frozen backbone by self-distillation, and calibrate the gate.

    python train.py                      # the quick recipe (2-core CPU: 4 min)
    python train.py --recipe=full        # the papers' heads on the full data (2-core CPU: ~2 h)
    python train.py --recipe=full --heads=cerberus+token+root,medusa+root   # the shipped heads (variants)
    torchrun --nproc_per_node=2 train.py --recipe=full     # DDP: NCCL on GPUs, gloo on CPUs

Steps: (1) the backbone answers training prompts greedily, batched (the project's templates and,
in the full recipe, requests the model writes itself); the hidden state that predicts each answer
token is captured on the way, so head k at answer position i learns token i + k (the backbone's own
greedy continuation). (2) The draft vocabulary: the tokens the backbone wrote most often in the
training answers, the only ones the heads draft (a smaller lm_head, cheaper drafts and training).
Each head set trains on the same data, steps and learning rate. (3) Held-out prompts give per-head
top-1/top-5 accuracy, the tree that fits this device's step costs, and the gate: which entropy it
reads (the backbone's or head 1's) and its threshold. (4) Checkpoints, written atomically, carry
the head spec, the gate and a fingerprint of the backbone.
"""
import copy
import inspect
import itertools
import json
import math
import os
import pathlib
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cerberus import Tree, build_heads, entropy, head_logits, parameter_count, save_heads, write_atomically
from model import KVCache, cache_for, chat_prompt, linear, load_gguf, load_smollm2

ROOT = os.path.dirname(os.path.abspath(__file__))
IGNORE = -100  # target index that cross_entropy skips (past the end of an answer)
NO_TARGET = 255  # rank stored where a head has no target; true ranks are capped at 254 (uint8)


@dataclass
class TrainConfig:
    recipe: str = "quick"  # "quick" or "full": sets the data size below unless given explicitly
    gguf: str = ""  # backbone: "" = the packaged SmolLM2-135M-Instruct, else a llama GGUF file
    out_dir: str = "runs/quick"  # data cache, checkpoints and metrics go here
    heads: str = "cerberus,medusa,medusa3"  # a digit = blocks per head (medusa3: size-matched); +root = reads the root
    n_heads: int = 4
    n_prompts: int = 400  # template prompts (data/train_prompts.json), answered greedily by the backbone
    n_self_instruct: int = 0  # requests the instruct model writes itself, answered greedily too
    prompt_temperature: float = 0.8  # sampling temperature of those self-written requests
    max_answer_tokens: int = 160
    gen_batch_size: int = 32  # batched generation runs ~9x faster per token than batch 1 on a CPU
    gen_dtype: str = "bfloat16"  # backbone dtype while generating data (targets need no float32)
    holdout: float = 0.05  # share of prompts held out for accuracy and gate calibration
    batch_size: int = 256  # positions per optimiser step
    epochs: int = 1  # fresh data beats extra epochs
    lr: float = 1e-3
    warmup: int = 50  # steps of linear warm-up, then cosine decay to 0
    head_decay: float = 0.8  # loss weight of head k is head_decay ** (k - 1)
    draft_vocab: int = 16384  # heads draft over the D tokens the backbone writes most often; 0 = all V
    train_dtype: str = "bfloat16"  # dtype of the shared lm_head in the loss (heads keep float32 weights)
    seed: int = 0


RECIPES = {
    "quick": dict(n_prompts=400, max_answer_tokens=160, out_dir="runs/quick"),
    "full": dict(n_prompts=2600, n_self_instruct=3000, max_answer_tokens=200, out_dir="runs/full"),
}


def cli_help(config_class):
    """One line per field of a config dataclass: `--name=default` and the comment beside it in the source."""
    comments = {}
    for line in inspect.getsource(config_class).splitlines():
        name, _, rest = line.strip().partition(":")
        if name.isidentifier() and "#" in rest:
            comments[name] = rest.split("#", 1)[1].strip()
    flags = {f.name: f"--{f.name}={f.default}" for f in fields(config_class)}
    width = max(map(len, flags.values()))
    return "\n".join(f"  {flag:<{width}}  {comments.get(name, '')}".rstrip() for name, flag in flags.items())


def parse_cli(config_class, argv):
    """`--key=value` arguments onto a dataclass config (a bare `--flag` sets a bool field to true);
    unknown keys are an error; `--help` prints every key with its default and exits."""
    known = {f.name: f for f in fields(config_class)}
    if "--help" in argv or "-h" in argv:
        print(f"flags, --key=value (a bare --flag sets a true/false one to true):\n{cli_help(config_class)}")
        raise SystemExit(0)
    values = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if key in known and known[key].type in (bool, "bool") and not eq:
            eq, value = "=", "true"
        if not arg.startswith("--") or not eq or key not in known:
            raise ValueError(f"unknown argument {arg!r}; expected --key=value with key in {sorted(known)}")
        kind = known[key].type
        values[key] = value.lower() in ("1", "true", "yes") if kind in (bool, "bool") else \
            (int if kind in (int, "int") else float if kind in (float, "float") else str)(value)
    return values


def train_config(overrides):
    """A TrainConfig: the recipe's defaults, then explicit overrides."""
    recipe = overrides.get("recipe", "quick")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return TrainConfig(**{**RECIPES[recipe], **overrides})


# ----------------------------------------------------------------------------------------------
# Prompts: the project's own, rendered from templates x topics, disjoint from every benchmark prompt.

def normalise(text):
    return " ".join(text.lower().split())


def benchmark_prompts():
    """Every first turn the benchmark may use: the project's set and MT-Bench (when present)."""
    texts = []
    for path in (os.path.join(ROOT, "data", "bench_prompts.jsonl"),
                 os.path.join(ROOT, "..", "shared", "data", "mt_bench.jsonl")):
        if os.path.exists(path):
            with open(path) as f:
                texts += [json.loads(line)["turns"][0] for line in f if line.strip()]
    return texts


def without_benchmark_prompts(prompts):
    """The prompts that neither contain nor are contained in any benchmark prompt (normalised)."""
    banned = [normalise(t) for t in benchmark_prompts()]
    return [p for p in prompts if not any(b in normalise(p) or normalise(p) in b for b in banned)]


def training_prompts(n, seed=0):
    """n distinct prompts drawn from data/train_prompts.json, none overlapping a benchmark prompt."""
    with open(os.path.join(ROOT, "data", "train_prompts.json")) as f:
        spec = json.load(f)
    rendered = sorted({t.format(topic=topic) for cat, templates in spec["templates"].items()
                       for t in templates for topic in spec["topics"][cat]})
    clean = without_benchmark_prompts(rendered)
    random.Random(seed).shuffle(clean)
    if n > len(clean):
        raise ValueError(f"asked for {n} training prompts but only {len(clean)} exist; lower n_prompts")
    return clean[:n]


# ----------------------------------------------------------------------------------------------
# Self-distillation data.

def head_targets(answer, n_heads):
    """(A,) answer tokens -> (A, 1 + K) targets. Row i belongs to the hidden state that predicts
    answer[i]: column 0 is the backbone's own token answer[i], column k is head k's, answer[i + k]."""
    A = len(answer)
    padded = torch.cat([answer, answer.new_full((n_heads,), IGNORE)])
    return torch.stack([padded[k:k + A] for k in range(n_heads + 1)], dim=1)


@torch.no_grad()
def batched_generate(model, prompts, max_new_tokens, eos_id, temperature=0.0, generator=None):
    """Answers to a batch of prompts (lists of ids), left-padded: greedy, or sampled at `temperature`.

    Returns answers (B, A) (tokens past a row's length mean nothing), the hidden state that
    predicted each answer token (B, A, C), and each answer's length (up to and including EOS). Rotary
    positions are relative, so the left padding only needs masking; pad rows attend to themselves so
    that no row is fully masked. Finished rows leave the batch (their cache rows too) once a quarter of it is done:
    a batch costs about its number of rows per step, so idle rows would waste up to half the time.
    """
    device, B, P = model.embed.weight.device, len(prompts), max(map(len, prompts))
    S = P + max_new_tokens
    if S > model.config.block_size:
        raise ValueError(f"prompt of {P} tokens + {max_new_tokens} answer tokens exceed the context of "
                         f"{model.config.block_size}; use shorter prompts or max_answer_tokens")
    idx = torch.zeros(B, P, dtype=torch.long, device=device)
    real = torch.ones(B, S, dtype=torch.bool, device=device)  # (B, S) False at left padding
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p)
        real[b, :P - len(p)] = False
    allowed = torch.ones(S, S, dtype=torch.bool, device=device).tril()  # causal
    self_only = torch.eye(S, dtype=torch.bool, device=device)

    def mask(real, start, T):  # (rows, 1, T, start + T)
        cols = slice(0, start + T)
        return (allowed[start:start + T, cols] & (real[:, None, cols] | self_only[start:start + T, cols]))[:, None]

    answers = torch.full((B, max_new_tokens), eos_id, dtype=torch.long, device=device)
    states = torch.zeros(B, max_new_tokens, model.config.n_embd, dtype=model.embed.weight.dtype, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)  # original index of each row still in the batch
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # per row still in the batch
    cache = KVCache(model.config, S, batch_size=B, device=device, dtype=model.embed.weight.dtype)
    logits, hidden = model(idx, cache, mask=mask(real, 0, P))
    cache.length = P
    for i in range(max_new_tokens):
        last = logits[:, -1].float()
        if temperature > 0:
            token = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator)[:, 0]
        else:
            token = last.argmax(-1)
        answers[rows, i], states[rows, i] = token, hidden[:, -1]
        newly = (token == eos_id) & ~finished
        lengths[rows] = torch.where(newly, i + 1, lengths[rows])
        finished |= newly
        n_finished = int(finished.sum())  # the step's one host sync
        if i + 1 == max_new_tokens or n_finished == len(rows):
            break
        if n_finished * 4 >= len(rows):  # drop finished rows from the batch and the cache
            alive = ~finished
            rows, token, real, finished = rows[alive], token[alive], real[alive], finished[alive]
            cache.k, cache.v = cache.k[:, alive], cache.v[:, alive]
        logits, hidden = model(token[:, None], cache, mask=mask(real, cache.length, 1))
        cache.length += 1
    return answers[:, :int(lengths.max())], states[:, :int(lengths.max())], lengths


def self_distill(model, tokenizer, prompts, cfg, desc="self-distillation"):
    """Answer every prompt greedily; return {"hidden": (M, C) bf16, "targets": (M, 1 + K) long}."""
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    encoded = sorted((chat_prompt(tokenizer, p) for p in prompts), key=len)  # similar lengths batch well
    hidden, targets = [], []
    batches = [encoded[i:i + cfg.gen_batch_size] for i in range(0, len(encoded), cfg.gen_batch_size)]
    bar = tqdm(batches, desc=desc, unit="batch", disable=rank() > 0)
    for batch in bar:
        answers, states, lengths = batched_generate(model, batch, cfg.max_answer_tokens, eos_id)
        for answer, state, n in zip(answers, states, lengths.tolist()):
            hidden.append(state[:n].to(torch.bfloat16).cpu())
            targets.append(head_targets(answer[:n].cpu(), cfg.n_heads))
        bar.set_postfix(positions=sum(len(t) for t in targets))
    return {"hidden": torch.cat(hidden), "targets": torch.cat(targets)}


def self_instruct_prompts(model, tokenizer, n, cfg, seed):
    """n requests written by the instruct model itself, sampled from the bare chat template (system
    turn, then `<|im_start|>user`). They carry the model's fine-tuning mix (plans, emails, code, maths,
    advice, rewrites, ...), the kinds of request that templates x topics miss. Kept: requests that
    end within 96 tokens, have 3+ words, are distinct and overlap no benchmark prompt."""
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    start = chat_prompt(tokenizer, None)
    generator = torch.Generator(model.embed.weight.device).manual_seed(seed)
    kept, tries = {}, 0
    bar = tqdm(total=n, desc="self-written requests", unit="prompt", disable=rank() > 0)
    while len(kept) < n:
        tries += 1
        if tries > 10 + 4 * n / cfg.gen_batch_size:
            raise ValueError(f"the model wrote only {len(kept)} usable requests of {n} after {tries - 1} "
                             f"batches; lower n_self_instruct or raise prompt_temperature")
        answers, _, lengths = batched_generate(model, [start] * cfg.gen_batch_size, 96, eos_id,
                                               cfg.prompt_temperature, generator)
        texts = [tokenizer.decode(a[:n_tok - 1].tolist()).strip()
                 for a, n_tok in zip(answers, lengths.tolist()) if a[n_tok - 1] == eos_id]
        for text in without_benchmark_prompts([t for t in texts if len(t.split()) >= 3 and "<|" not in t]):
            if len(kept) < n and text not in kept:
                kept[text] = None
                bar.update()
    bar.close()
    return list(kept)


# ----------------------------------------------------------------------------------------------
# Training and evaluation of one head set.

def head_weights(cfg):
    return torch.tensor([cfg.head_decay ** k for k in range(cfg.n_heads)])


def draft_vocabulary(targets, size, vocab_size):
    """(size,) sorted token ids: those the backbone wrote most often in the training answers (targets
    column 0), ties and unseen tokens ordered by id (BPE's early merges are its frequent tokens). Under
    torchrun the counts are summed over ranks, so every rank drafts over the same tokens."""
    counts = torch.bincount(targets[:, 0], minlength=vocab_size)
    if world_size() > 1:
        torch.distributed.all_reduce(counts)
    counts = counts.tolist()
    order = sorted(range(vocab_size), key=lambda token: (-counts[token], token))
    return torch.tensor(sorted(order[:size]))


def draft_classes(heads, tokens):
    """Token ids (IGNORE included) -> their column among the heads' draft logits; IGNORE for tokens
    outside the draft vocabulary (no head can draft them, so no loss can teach it)."""
    if heads.vocab is None:
        return tokens
    column = torch.full((heads.vocab_size,), IGNORE, dtype=torch.long, device=tokens.device)
    column[heads.vocab] = torch.arange(len(heads.vocab), device=tokens.device)
    return torch.where(tokens == IGNORE, IGNORE, column[tokens.clamp(min=0)])


def train_heads(heads, lm_weight, data, cfg, desc="heads"):
    """AdamW with warm-up and cosine decay, one pass (per epoch) over the positions in random order.
    Under torchrun the heads are wrapped in DDP and every rank trains on its own data shard."""
    torch.manual_seed(cfg.seed)
    model = heads
    if world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(heads)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    M = len(data["targets"])
    n_steps = cfg.epochs * (M // cfg.batch_size)
    if world_size() > 1:  # every rank must take the same number of steps
        n = torch.tensor(n_steps)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        n_steps = int(n)
    weights = head_weights(cfg)
    draft_weight = heads.draft_weight(lm_weight)  # (D, C)
    order = torch.cat([torch.randperm(M) for _ in range(cfg.epochs)])
    bar = tqdm(range(n_steps), desc=desc, unit="step", disable=rank() > 0)
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / n_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        root_vec = lm_weight[data["targets"][rows, 0]]  # (b, C) the backbone's own next token, the tree's root
        logits = head_logits(model, draft_weight, data["hidden"][rows].float(), cfg.n_heads, root_vec)  # (K, b, D)
        target = draft_classes(heads, data["targets"][rows, 1:].T)  # (K, b)
        losses = torch.stack([F.cross_entropy(logits[k], target[k], ignore_index=IGNORE)
                              for k in range(cfg.n_heads)])
        loss = (weights * losses.nan_to_num()).sum()  # a head with no valid target contributes 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", head1=f"{losses[0].item():.3f}")
    return heads


@torch.no_grad()
def target_ranks(heads, lm_weight, data, n_heads, chunk=512):
    """(M, K) uint8 rank of the true target among each head's logits (0 = top-1, capped at 254, which
    a target outside the draft vocabulary gets); NO_TARGET where the answer has ended. Tree
    acceptance and top-k accuracy follow from these."""
    ranks, draft_weight = [], heads.draft_weight(lm_weight)
    for i in range(0, len(data["targets"]), chunk):
        rows = slice(i, i + chunk)
        root_vec = lm_weight[data["targets"][rows, 0]]  # (b, C) the backbone's own next token at each row
        logits = head_logits(heads, draft_weight, data["hidden"][rows].float(), n_heads, root_vec).float()
        target = data["targets"][rows, 1:].T  # (K, b)
        column = draft_classes(heads, target)
        picked = logits.gather(-1, column.clamp(min=0)[..., None])  # (K, b, 1)
        rank = torch.where(column == IGNORE, NO_TARGET - 1, (logits > picked).sum(-1).clamp(max=NO_TARGET - 1))
        ranks.append(torch.where(target != IGNORE, rank, NO_TARGET).T.to(torch.uint8))
    return torch.cat(ranks)


@torch.no_grad()
def head1_entropy(heads, lm_weight, data, chunk=512):
    """(M,) entropy of head 1's draft distribution at each position: what a head-1 gate reads."""
    draft_weight, rows = heads.draft_weight(lm_weight), range(0, len(data["targets"]), chunk)
    return torch.cat([entropy(head_logits(heads, draft_weight, data["hidden"][i:i + chunk].float(), 1,
                                          lm_weight[data["targets"][i:i + chunk, 0]])[0]).cpu() for i in rows])


def accuracy(ranks):
    """Per-head top-1 and top-5, over positions where the head has a target."""
    valid = ranks != NO_TARGET
    out = {}
    for k in range(ranks.shape[1]):
        r = ranks[valid[:, k], k]
        out[f"head{k + 1}"] = {"top1": round(float((r < 1).float().mean()), 4),
                               "top5": round(float((r < 5).float().mean()), 4)}
    return out


def accepted_lengths(ranks, tree):
    """Drafts a tree would accept at each position, from the target ranks: a node is accepted
    when, for every head along its path, the target has exactly the rank the node takes."""
    best = torch.zeros(len(ranks), dtype=torch.long)
    for path in tree.paths:
        ok = torch.ones(len(ranks), dtype=torch.bool)
        for k, r in enumerate(path):
            ok &= ranks[:, k] == r
        best = torch.where(ok, torch.full_like(best, len(path)), best)
    return best


# ----------------------------------------------------------------------------------------------
# Gate calibration: which tree and which entropy threshold pay on this device.

def timed(fn):
    """(fn(), wall seconds), draining the GPU queue around the clock: the project's one clock."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def fastest(calls, rounds=7):
    """{key: fastest wall seconds of calls[key]()}, after one warm-up call each. The calls take turns
    within each round, so a slow spell of the machine spoils one round of every call rather than every
    repeat of one (which once made T=1 look 60% dearer than T=4 and the calibration promise 2x). The
    minimum, not the mean: on a shared machine the noise only ever adds time."""
    for call in calls.values():
        call()
    best = {key: math.inf for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            best[key] = min(best[key], timed(call)[1])
    return best


@torch.no_grad()
def step_costs(model, sizes, n_cached=256, cache=None):
    """{T: seconds} for one backbone forward of T new tokens on a cached prefix (lm_head included).
    cache: the KVCache to measure in (a compiled model's static one); default a fresh one."""
    device, V = model.embed.weight.device, model.config.vocab_size
    cache = cache_for(model, n_cached + max(sizes), cache)
    model(torch.randint(0, V, (1, n_cached), device=device), cache)
    cache.length = n_cached
    tokens = {T: torch.randint(0, V, (1, T), device=device) for T in sizes}
    return fastest({T: lambda T=T: model(tokens[T], cache) for T in sizes})


@torch.no_grad()
def draft_costs(heads, lm_weight):
    """{d: seconds} to draft with the first d heads at one position (heads, lm_head, top-k)."""
    hidden, draft_weight = torch.randn(heads.n_embd, device=lm_weight.device), heads.draft_weight(lm_weight)
    return fastest({d: lambda d=d: head_logits(heads, draft_weight, hidden, d, lm_weight[0]).topk(10, dim=-1)
                    for d in range(1, heads.n_heads + 1)})


def calibrate(ranks, entropies, costs, drafting, tree=None):
    """Pick the tree, the gate's signal and its threshold that maximise estimated tokens per second.

    entropies: {gate_on: (M,) entropies} at the held-out positions, "backbone" (next-token
    distribution) and optionally "head1" (head 1's); a bare tensor means the backbone's. costs:
    {T: seconds} of a backbone forward; drafting: {depth: seconds} of the heads. For each candidate
    tree size, the best tree for the measured rank accuracies (Tree.best), or only `tree` when one is
    given (costs must then hold its size); then, for each signal and each threshold at its entropy
    quantiles, speed = tokens / time where a position below the threshold costs a tree step (drafts +
    forward) and yields 1 + accepted tokens, else an AR step and 1 token. A head-1 gate runs the heads
    before it decides, so its AR steps pay the drafts too. Positions stand in for steps: an estimate,
    which the benchmark then measures.
    """
    signals = entropies if isinstance(entropies, dict) else {"backbone": entropies}
    max_depth = len(drafting)
    valid = ranks != NO_TARGET
    accuracy_table = [[float(((ranks[:, k] == r) & valid[:, k]).float().sum() / valid[:, k].sum().clamp(min=1))
                       for r in range(10)] for k in range(max_depth)]
    if tree is not None and tree.max_depth > max_depth:
        raise ValueError(f"tree depth {tree.max_depth} needs {tree.max_depth} heads, but only "
                         f"{max_depth} are given: use a shallower tree or more heads")
    candidates = [tree] if tree is not None else [Tree.best(accuracy_table, n) for n in sorted(costs) if n >= 2]
    best = None
    for candidate, (gate_on, signal) in itertools.product(candidates, signals.items()):
        gain = 1 + accepted_lengths(ranks, candidate).float()  # tokens a tree step would yield
        tree_cost = costs[candidate.n_nodes] + drafting[candidate.max_depth]
        ar_cost = costs[1] + (drafting[candidate.max_depth] if gate_on == "head1" else 0.0)
        quantiles = torch.quantile(signal, torch.linspace(0, 1, 21)).tolist()
        for threshold in [0.0] + quantiles[1:-1] + [math.inf]:
            parallel = signal < threshold
            tokens = torch.where(parallel, gain, torch.ones_like(gain)).sum()
            seconds = parallel.sum() * tree_cost + (~parallel).sum() * (costs[1] if threshold == 0 else ar_cost)
            speed = float(tokens / seconds)  # threshold 0: always AR, no heads run
            if best is None or speed > best["est_tok_s"]:
                tau = float(gain[parallel].mean()) if parallel.any() else 1.0
                best = {"tree": [list(p) for p in candidate.paths], "threshold": threshold, "gate_on": gate_on,
                        "est_tok_s": speed, "est_speedup": speed * costs[1], "est_tau_parallel": tau,
                        "entropy_curve": entropy_curve(signal, gain - 1)}
    return {**best, "step_costs": {str(k): v for k, v in costs.items()},
            "draft_costs": {str(k): v for k, v in drafting.items()}, "accuracy_table": accuracy_table}


def entropy_curve(gate_entropy, accepted, n_bins=8):
    """Mean drafts accepted in equal-count bins of the gate's entropy: why a gate pays at all."""
    edges = torch.quantile(gate_entropy, torch.linspace(0, 1, n_bins + 1)).tolist()
    bins = torch.bucketize(gate_entropy, torch.tensor(edges[1:-1]))
    return [{"entropy": (round(edges[b], 3), round(edges[b + 1], 3)),
             "accepted": round(float(accepted[bins == b].float().mean()), 3)}
            for b in range(n_bins) if (bins == b).any()]  # tiny held-out sets leave some bins empty


def print_entropy_curve(curve, threshold):
    print(f"  drafts accepted vs gate entropy (bins of equal count; gate threshold {threshold:.3f} nats):")
    top = max(max(b["accepted"] for b in curve), 1e-9)
    for b in curve:
        lo, hi = b["entropy"]
        side = "parallel" if hi <= threshold else "AR" if lo >= threshold else "both"
        print(f"    {lo:6.3f}..{hi:6.3f} nats  {b['accepted']:5.2f}  {'#' * round(30 * b['accepted'] / top):<30} {side}")


# ----------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE).

def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def setup_distributed():
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def head_set_spec(name, n_heads):
    """'cerberus' | 'medusa', optionally followed by N, the residual blocks per head (stage 1 of a
    Cerberus head), then variants: '+root' (every head also reads the backbone's own next token) and,
    for Cerberus, '+token' (the link carries head k-1's top-1 token): 'medusa3', 'cerberus+token+root'
    -> head spec dict."""
    base, *variants = name.split("+")
    for kind in ("cerberus", "medusa"):
        depth = base.removeprefix(kind)
        known = {"root", "token"} if kind == "cerberus" else {"root"}
        if base.startswith(kind) and (depth == "" or depth.isdigit()) and set(variants) <= known:
            spec = dict(kind=kind, n_heads=n_heads, n_layers=int(depth or 1), reads_root="root" in variants)
            if kind == "cerberus":
                spec["link"] = "token" if "token" in variants else "hidden"
            return spec
    raise ValueError(f"unknown head set {name!r}; use cerberus, medusa, cerberusN or medusaN, each optionally "
                     f"+root, and Cerberus +token")


SOURCES = {  # prompt source -> the config fields that define its data (the first is its prompt count)
    "templates": ("n_prompts",),
    "self_instruct": ("n_self_instruct", "prompt_temperature"),
}


def source_data(model, tokenizer, cfg, source):
    """One prompt source's self-distilled {"train", "held_out", "seconds"}, cached in
    out_dir/{source}_rank{r}.pt; under torchrun every rank answers its own share of the prompts."""
    path = os.path.join(cfg.out_dir, f"{source}_rank{rank()}.pt")
    key_fields = SOURCES[source] + ("max_answer_tokens", "n_heads", "holdout", "seed", "gen_dtype")
    key = {k: getattr(cfg, k) for k in key_fields}
    key["world_size"], key["backbone"] = world_size(), model.fingerprint()
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        if cached["key"] == key:
            return cached
    gen_model = copy.deepcopy(model).to(getattr(torch, cfg.gen_dtype))
    t0 = time.time()
    if source == "templates":
        prompts = training_prompts(cfg.n_prompts, cfg.seed)[rank()::world_size()]
    else:
        share = math.ceil(cfg.n_self_instruct / world_size())
        prompts = self_instruct_prompts(gen_model, tokenizer, share, cfg, seed=cfg.seed * 1000 + rank())
    n_held = max(1, int(len(prompts) * cfg.holdout))
    data = {"key": key,
            "held_out": self_distill(gen_model, tokenizer, prompts[:n_held], cfg, f"{source}: held-out answers"),
            "train": self_distill(gen_model, tokenizer, prompts[n_held:], cfg, f"{source}: training answers")}
    data["seconds"] = time.time() - t0
    write_atomically(path, lambda tmp: torch.save(data, tmp))
    return data


def get_data(model, tokenizer, cfg):
    """Self-distilled data of every prompt source with prompts: {source: source_data(...)}."""
    return {source: source_data(model, tokenizer, cfg, source)
            for source, key_fields in SOURCES.items() if getattr(cfg, key_fields[0]) > 0}


def concat(parts):
    """Positions of several data dicts ({"hidden", "targets"}) in one."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def train(cfg):
    """The whole recipe; returns the metrics dict (also written to out_dir/metrics.json)."""
    setup_distributed()
    torch.manual_seed(cfg.seed)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_gguf(cfg.gguf) if cfg.gguf else load_smollm2()
    model = model.to(device).requires_grad_(False)
    data = get_data(model, tokenizer, cfg)
    train_data = concat([d["train"] for d in data.values()])
    held_out = concat([d["held_out"] for d in data.values()])
    held_out_sizes = [len(d["held_out"]["targets"]) for d in data.values()]  # to report accuracy per source
    lm_weight = model.lm_head.weight.to(getattr(torch, cfg.train_dtype))
    V = model.config.vocab_size
    vocab = draft_vocabulary(train_data["targets"], cfg.draft_vocab, V) if 0 < cfg.draft_vocab < V else None
    coverage = 1.0 if vocab is None else float(torch.isin(held_out["targets"][:, 0], vocab).float().mean())
    if rank() == 0:  # a held-out token outside the draft vocabulary is one no head can get right
        print(f"draft vocabulary: {len(vocab) if vocab is not None else V} tokens, "
              f"{coverage:.4f} of the held-out answers' tokens")
    metrics = {"config": asdict(cfg), "device": str(device), "positions": len(train_data["targets"]),
               "held_out_positions": len(held_out["targets"]),
               "data_seconds": round(sum(d["seconds"] for d in data.values()), 1),
               "sources": {s: {"positions": len(d["train"]["targets"]),
                               "held_out_positions": len(d["held_out"]["targets"]),
                               "seconds": round(d["seconds"], 1)} for s, d in data.items()},
               "draft_vocab": len(vocab) if vocab is not None else V, "held_out_in_draft_vocab": round(coverage, 4),
               "heads": {}}

    backbone_entropy = torch.cat([entropy(linear(h.to(device, lm_weight.dtype), lm_weight)).cpu()
                                  for h in held_out["hidden"].split(1024)])
    costs = step_costs(model, [1, 2, 3, 4, 6, 8, 16, 32, 64]) if rank() == 0 else {}
    for name in cfg.heads.split(","):
        heads = build_heads(model.config, head_set_spec(name, cfg.n_heads)).to(device)
        if vocab is not None:
            heads.draft_over(vocab)
        t0 = time.time()
        train_heads(heads, lm_weight, train_data, cfg, desc=name)
        seconds = time.time() - t0
        if rank() != 0:
            continue
        ranks = target_ranks(heads, lm_weight, held_out, cfg.n_heads)
        signals = {"backbone": backbone_entropy, "head1": head1_entropy(heads, lm_weight, held_out)}
        result = {"params": parameter_count(heads), "train_seconds": round(seconds, 1),
                  "held_out": accuracy(ranks),
                  "held_out_by_source": {s: accuracy(r) for s, r in zip(data, ranks.split(held_out_sizes))},
                  "gate": calibrate(ranks, signals, costs, draft_costs(heads, lm_weight))}
        metrics["heads"][name] = result
        calibration = {"entropy": backbone_entropy.half(), "head1_entropy": signals["head1"].half(), "ranks": ranks}
        save_heads(os.path.join(cfg.out_dir, f"{name}.pt"), heads, model,
                   {"gate": result["gate"], "held_out": result["held_out"], "train_config": asdict(cfg),
                    "calibration": calibration})  # lets the benchmark re-calibrate for its own device
        print(f"{name}: {result['params']:,} params, {seconds:.0f}s, held-out {result['held_out']}, "
              f"tree {len(result['gate']['tree']) + 1} nodes, threshold {result['gate']['threshold']:.3f} "
              f"on {result['gate']['gate_on']}")
        print_entropy_curve(result["gate"]["entropy_curve"], result["gate"]["threshold"])
    if rank() == 0:
        write_atomically(os.path.join(cfg.out_dir, "metrics.json"),
                         lambda tmp: pathlib.Path(tmp).write_text(json.dumps(metrics, indent=1)))
    if torch.distributed.is_initialized():  # wait for rank 0's evaluation: a rank that tears gloo down
        torch.distributed.barrier()           # while another still holds it can abort the process
        torch.distributed.destroy_process_group()
    return metrics


def main(argv=None):
    cfg = train_config(parse_cli(TrainConfig, sys.argv[1:] if argv is None else argv))
    train(cfg)


if __name__ == "__main__":
    main()
