"""Train Medusa and Cerberus heads on a frozen backbone by self-distillation, and calibrate the gate.

    python train.py                      # the quick recipe: the first shard of answers (2-core CPU: minutes)
    python train.py --recipe=full        # every shard of data/answers/
    torchrun --nproc_per_node=2 train.py --recipe=full     # DDP: NCCL on GPUs, gloo on CPUs

Steps: (1) the backbone's greedy answers to the prompt mix are token-id shards in data/answers/
(data/generate_answers.py); the hidden state that predicted each answer token is recomputed by one
teacher-forced forward per batch and cached in out_dir: head k at answer position i learns token i + k.
(2) Each head set trains on the same data, steps and learning rate, drafting over the tokens the
backbone wrote most often. (3) Held-out prompt lines give top-1/top-5 per head, overall and per task
category, the tree that fits this device's step costs, and the gate, which the checkpoints carry.
"""
import copy
import hashlib
import inspect
import itertools
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from cerberus import (Tree, build_heads, entropy, head_logits, load_heads, parameter_count, read_checkpoint,
                      save_heads, write_atomically)
from model import SYSTEM_PROMPT, cache_for, chat_prompt, linear, load_gguf, load_smollm2

ROOT = os.path.dirname(os.path.abspath(__file__))
IGNORE = -100  # target index that cross_entropy skips (past the end of an answer)
NO_TARGET = 255  # rank stored where a head has no target; true ranks are capped at 254 (uint8)
CATEGORIES = ("chat", "writing", "coding", "math", "qa", "summarise", "translate", "doc_qa")


@dataclass
class TrainConfig:
    recipe: str = "quick"  # "quick" or "full": sets the data size below unless given explicitly
    gguf: str = ""  # backbone: "" = the packaged SmolLM2-135M-Instruct, else a llama GGUF file
    out_dir: str = "runs/quick"  # hidden-state cache, checkpoints and metrics go here
    heads: str = "cerberus,medusa,medusa3"  # a digit = blocks per head (medusa3: size-matched); +root = reads the root
    n_heads: int = 4
    prompts: str = "data/train_prompts.jsonl"  # the prompt mix the answers answer (data/build_prompts.py)
    answers_dir: str = "data/answers"  # the backbone's answers as token-id shards (data/generate_answers.py)
    n_shards: int = 1  # answer shards to train on, the first ones there (256 prompt lines each); 0 = all
    hidden_dtype: str = "auto"  # backbone dtype that recomputes the hidden states; auto = bfloat16 where native
    holdout: float = 0.05  # share of prompt lines (every 1/holdout-th, both turns) held out for accuracy and the gate
    batch_size: int = 256  # positions per optimiser step
    epochs: int = 1  # fresh data beats extra epochs; 0 = no training: evaluate and calibrate --init_from heads
    lr: float = 1e-3
    warmup: int = 50  # steps of linear warm-up, then cosine decay to 0
    head_decay: float = 0.8  # loss weight of head k is head_decay ** (k - 1)
    draft_vocab: int = 4096  # heads draft over the D tokens the backbone writes most often; 0 = all V
    train_dtype: str = "auto"  # dtype of the shared lm_head in the loss (heads keep float32 weights); auto as above
    init_from: str = ""  # "" = heads start fresh; else a folder (heads/) whose <kind>.pt each head set starts from
    checkpoint_every: int = 500  # steps between saves of out_dir/<heads>.train_state.pt, where a rerun resumes
    seed: int = 0


RECIPES = {"quick": dict(n_shards=1, out_dir="runs/quick"), "full": dict(n_shards=0, out_dir="runs/full")}
DTYPES = ("auto", "float32", "bfloat16")


def cli_help(config_class):
    """One line per field of a config dataclass: `--name=default` and the comment beside it in the source."""
    lines = (line.strip().partition(":") for line in inspect.getsource(config_class).splitlines())
    comments = {name: rest.split("#", 1)[1].strip() for name, _, rest in lines if name.isidentifier() and "#" in rest}
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


def native_bfloat16(device):
    """Whether the device multiplies bfloat16 natively: a GPU that supports it, or a CPU with AVX-512 BF16
    or AMX. Elsewhere (an AVX2 CPU, for one) bfloat16 is emulated, and the bulk matmuls of training, hundreds
    to thousands of rows at a time, run several times slower than in float32."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name, device, option="dtype"):
    """The dtype name to run in: "auto" is "bfloat16" where the device has it natively, else "float32"."""
    if name not in DTYPES:
        raise ValueError(f"unknown {option} {name!r}; choose one of {DTYPES}")
    return name if name != "auto" else "bfloat16" if native_bfloat16(device) else "float32"


def concrete_dtypes(cfg, device):
    """cfg with each "auto" dtype resolved for this device, so that the metrics and the checkpoints record what ran."""
    keys = ("hidden_dtype", "train_dtype")
    return replace(cfg, **{key: resolve_dtype(getattr(cfg, key), device, key) for key in keys})


# ----------------------------------------------------------------------------------------------
# Self-distillation data: the answers' token-id shards, and the hidden states that predicted them.

def conversation(tokenizer, row, first_answer=None):
    """Token ids of a chat up to where the assistant answers: a prompt row's first turn (under its system
    prompt, if it names one) or, after the model's own first answer (ids, its end token included when it
    ended), the row's follow-up."""
    ids = chat_prompt(tokenizer, row["prompt"], row.get("system", SYSTEM_PROMPT))
    if first_answer is None:
        return ids
    end = tokenizer.encode("<|im_end|>", allowed_special="all")
    closed = first_answer if first_answer[-len(end):] == end else first_answer + end  # cut at max tokens
    follow_up = f"\n<|im_start|>user\n{row['follow_up']}<|im_end|>\n<|im_start|>assistant\n"
    return ids + closed + tokenizer.encode(follow_up, allowed_special="all")


def prompts_hash(rows):
    """A short hash of prompt rows: a shard remembers the prompts it answers, in line order."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def read_shard(path):
    """({"backbone", "prompts", "max_answer_tokens"}, {(line, turn): answer ids}) of a shard file."""
    with np.load(path) as shard:
        meta = {key: shard[key].item() for key in ("backbone", "prompts", "max_answer_tokens")}
        ends, tokens = np.cumsum(shard["length"]).tolist(), shard["tokens"].tolist()
        answers = {(line, turn): tokens[end - n:end] for line, turn, n, end in
                   zip(shard["line"].tolist(), shard["turn"].tolist(), shard["length"].tolist(), ends)}
    return meta, answers


def head_targets(answer, n_heads):
    """(A,) answer tokens -> (A, 1 + K) targets. Row i belongs to the hidden state that predicts
    answer[i]: column 0 is the backbone's own token answer[i], column k is head k's, answer[i + k]."""
    padded = torch.cat([answer, answer.new_full((n_heads,), IGNORE)])
    return torch.stack([padded[k:k + len(answer)] for k in range(n_heads + 1)], dim=1)


@torch.no_grad()
def teacher_forced_states(model, sequences, n_answer, max_tokens=8192):
    """[(A_i, C) bf16]: the hidden states that predicted the last n_answer[i] tokens of each of the
    sequences (context + answer ids), from one forward per batch of similar lengths (up to max_tokens
    padded tokens). Right padding needs no mask: causal attention never looks right."""
    batches = [[]]
    for i in sorted(range(len(sequences)), key=lambda i: len(sequences[i])):
        if batches[-1] and (len(batches[-1]) + 1) * len(sequences[i]) > max_tokens:
            batches.append([])
        batches[-1].append(i)
    states = [None] * len(sequences)
    for batch in tqdm(batches, desc="hidden states", unit="batch", leave=False, disable=rank() > 0):
        idx = pad_sequence([torch.tensor(sequences[i][:-1]) for i in batch], batch_first=True)  # (b, T)
        hidden = model.hidden_states(idx.to(model.embed.weight.device))  # (b, T, C)
        for row, i in enumerate(batch):  # the hidden state at position p predicts token p + 1
            end = len(sequences[i]) - 1
            states[i] = hidden[row, end - n_answer[i]:end].to("cpu", torch.bfloat16)
    return states


def read_prompts(path):
    """The rows of a prompt file, one JSON object a line (a file splits lines at "\n" only; str.splitlines()
    would also cut at U+2028 and the like, which real prompts hold)."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def answer_data(model, tokenizer, rows, answers, cfg):
    """Positions {"hidden" (M, C), "targets" (M, 1 + K), "category", "turn", "held_out" (M,)} of the answers
    {(line, turn): ids} to these prompt rows, their hidden states from one teacher-forced forward per batch."""
    items = sorted(answers.items())  # ((line, turn), answer ids)
    # One forward a prompt line, of its last turn: a second turn's conversation holds the first answer, and
    # causal attention gives it the states a forward of the first turn alone would (a third fewer tokens).
    last_turn = {line: turn for line, turn in sorted(answers)}
    sequences = {line: conversation(tokenizer, rows[line], answers[line, 1] if turn == 2 else None)
                 + answers[line, turn] for line, turn in last_turn.items()}
    first_answer_at = {line: len(conversation(tokenizer, rows[line])) for line in sequences}  # a position
    from_first_answer = dict(zip(sequences, teacher_forced_states(
        model, list(sequences.values()), [len(seq) - first_answer_at[line] for line, seq in sequences.items()])))
    states = [from_first_answer[line][:len(ids)] if turn == 1 else from_first_answer[line][-len(ids):]
              for (line, turn), ids in items]

    def per_position(value_of, dtype):  # one value per answer, repeated over its tokens
        return torch.tensor([value_of(*item) for item, ids in items for _ in ids], dtype=dtype)
    return {"hidden": torch.cat(states),
            "targets": torch.cat([head_targets(torch.tensor(ids), cfg.n_heads) for _, ids in items]),
            "category": per_position(lambda line, turn: CATEGORIES.index(rows[line]["category"]), torch.uint8),
            "turn": per_position(lambda line, turn: turn, torch.uint8),
            "held_out": per_position(lambda line, turn: line % round(1 / cfg.holdout) == 0, torch.bool)}


def shard_data(model, tokenizer, rows, path, cfg):
    """answer_data of a shard file made for this backbone and prompt file, cached in out_dir/hidden/."""
    meta, answers = read_shard(path)
    if meta["backbone"] != model.fingerprint():
        raise ValueError(f"{path} holds another backbone's answers; pass that backbone or another --answers_dir")
    if meta["prompts"] != prompts_hash([rows[line] for line in sorted({line for line, _ in answers})]):
        raise ValueError(f"{path} answers other prompts than {cfg.prompts}; regenerate it or pass its --prompts")
    cache = os.path.join(cfg.out_dir, "hidden", os.path.basename(path).replace(".npz", ".pt"))
    cache_key = [hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest(), str(model.embed.weight.dtype),
                 cfg.n_heads, cfg.holdout]  # the answers themselves: a regenerated shard invalidates its cache
    if os.path.exists(cache) and (cached := torch.load(cache, weights_only=True))["key"] == cache_key:
        return cached["data"]
    data = answer_data(model, tokenizer, rows, answers, cfg)
    write_atomically(cache, lambda tmp: torch.save({"key": cache_key, "data": data}, tmp))
    return data


def get_data(model, tokenizer, cfg):
    """(train, held-out) positions of this rank's answer shards (shard k is rank k % world size's)."""
    rows = read_prompts(cfg.prompts)
    paths = sorted(p for p in pathlib.Path(ROOT, cfg.answers_dir).glob("*.npz"))[:cfg.n_shards or None]
    if len(paths) < world_size():  # every rank needs a shard of its own
        raise ValueError(f"{len(paths)} answer shards in {cfg.answers_dir}; make them with data/generate_answers.py")
    model = copy.deepcopy(model).to(getattr(torch, cfg.hidden_dtype))
    mine = paths[rank()::world_size()]
    parts = [shard_data(model, tokenizer, rows, str(p), cfg) for p in
             tqdm(mine, desc="answer shards", unit="shard", disable=rank() > 0 or len(mine) == 1)]
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return ({k: v[~data["held_out"]] for k, v in data.items()}, {k: v[data["held_out"]] for k, v in data.items()})


# ----------------------------------------------------------------------------------------------
# Training and evaluation of one head set.

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


def train_heads(heads, lm_weight, data, cfg, desc="heads", state_path=None):
    """AdamW with warm-up and cosine decay, one pass (per epoch) over the positions in random order.
    Under torchrun the heads are wrapped in DDP and every rank trains on its own data shard. With a
    state_path, the heads, optimiser and step are saved there every cfg.checkpoint_every steps and at the
    end, and a rerun with the same settings goes on from the last save: the steps of one uninterrupted run."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=0.0)
    M = len(data["targets"])
    n_steps = cfg.epochs * (M // cfg.batch_size)
    if world_size() > 1:  # every rank must take the same number of steps
        n = torch.tensor(n_steps)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        n_steps = int(n)
    if n_steps == 0:  # --epochs=0: the --init_from heads as they are, to evaluate and calibrate on this data
        return heads
    run = {**{k: v for k, v in asdict(cfg).items() if k not in ("heads", "out_dir", "checkpoint_every")},
           "steps": n_steps, "world_size": world_size()}  # what a saved state must match to be continued
    first_step = load_train_state(state_path, heads, opt, run) if state_path else 0
    model = torch.nn.parallel.DistributedDataParallel(heads) if world_size() > 1 else heads
    weights = torch.tensor([cfg.head_decay ** k for k in range(cfg.n_heads)])
    draft_weight = heads.draft_weight(lm_weight)  # (D, C)
    order = torch.cat([torch.randperm(M) for _ in range(cfg.epochs)])
    bar = tqdm(range(first_step, n_steps), desc=desc, unit="step", initial=first_step, total=n_steps,
               disable=rank() > 0)
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
        if state_path and rank() == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == n_steps):
            state = {"run": run, "step": step + 1, "heads": heads.state_dict(), "optimizer": opt.state_dict()}
            write_atomically(state_path, lambda tmp: torch.save(state, tmp))
    return heads


def load_train_state(path, heads, opt, run):
    """The step a training state saved at path reached, its heads and optimiser loaded; 0 if there is none."""
    if not os.path.exists(path):
        return 0
    state = read_checkpoint(path, "training state", "delete it to train these heads from the start")
    if state["run"] != run:
        changed = ", ".join(f"{k} {state['run'].get(k)!r} -> {run.get(k)!r}" for k in {**state["run"], **run}
                            if state["run"].get(k) != run.get(k))  # a setting either side lacks reads None
        raise ValueError(f"{path} is a run with other settings ({changed}); rerun with its settings to "
                         f"continue it, or delete it to train these heads from the start")
    heads.load_state_dict(state["heads"])
    opt.load_state_dict(state["optimizer"])
    return state["step"]


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
        target = data["targets"][rows, 1:n_heads + 1].T  # (K, b): more columns than heads are left out
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
    return {f"head{k + 1}": {f"top{n}": round(float((ranks[valid[:, k], k] < n).float().mean()), 4) for n in (1, 5)}
            for k in range(ranks.shape[1])}


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


def answer_bounds(ranks):
    """(starts, ends), (N,) each, of the answers laid end to end in these rows: an answer's last row is the
    one where head 1 has no target (rows after the last such row count as one more answer)."""
    ends = (ranks[:, 0] == NO_TARGET).nonzero().flatten() + 1
    if len(ends) == 0 or ends[-1] != len(ranks):
        ends = torch.cat([ends, torch.tensor([len(ranks)])])
    return torch.cat([ends.new_zeros(1), ends[:-1]]), ends


def decode_steps(gain, parallel, starts, ends):
    """Walk every answer as greedy decoding does (it emits exactly these answers): a step at row i is a tree
    step yielding gain[i] tokens where parallel[i], else an AR step yielding one; the next step starts at the
    row after them. gain (M,), parallel (G, M) for G gates -> (tree steps, AR steps), (G, N) each."""
    G, N = len(parallel), len(starts)
    at = starts.expand(G, N).clone()  # (G, N) the row each answer's next step starts at
    tree_steps, ar_steps = torch.zeros(G, N, dtype=torch.long), torch.zeros(G, N, dtype=torch.long)
    while (live := at < ends).any():
        row = at.clamp(max=len(gain) - 1)
        tree = parallel.gather(1, row) & live
        tree_steps += tree
        ar_steps += live & ~tree
        at += torch.where(tree, gain[row], 1) * live
    return tree_steps, ar_steps


# ----------------------------------------------------------------------------------------------
# Gate calibration: which tree and which entropy threshold pay on this device.

CALIBRATION_POSITIONS = 2 ** 17  # held-out positions a checkpoint keeps for the benchmark to re-calibrate on


def calibration_sample(calibration):
    """The held-out positions {name: (M, ...)} thinned to about CALIBRATION_POSITIONS: whole answers, evenly
    spaced, so that every category keeps its share and the calibration can walk each answer as decoding does.
    The heads' files stay small however much is held out."""
    starts, ends = answer_bounds(calibration["ranks"])
    stride = math.ceil(len(calibration["ranks"]) / CALIBRATION_POSITIONS)
    keep = torch.cat([torch.arange(s, e) for s, e in zip(starts[::stride].tolist(), ends[::stride].tolist())])
    return {name: values[keep] for name, values in calibration.items()}


def timed(fn):
    """(fn(), wall seconds), draining the GPU queue around the clock: the project's one clock."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def fastest(calls, rounds=7, before=lambda: None):
    """{key: fastest wall seconds of calls[key]()}, after one warm-up call each; before() runs untimed ahead of
    each timed call. The calls take turns within each round, so a slow spell of the machine spoils one round
    of every call rather than every repeat of one. The minimum, not the mean: on a shared machine the noise
    only ever adds time."""
    for call in calls.values():
        call()
    best = {key: math.inf for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            before()
            best[key] = min(best[key], timed(call)[1])
    return best


def cached_forwards(model, sizes, n_cached=256, cache=None):
    """{T: call}: one backbone forward of T new tokens on an n_cached-token prefix (lm_head included), the same
    work at every call (the cache's length stays). cache: a compiled model's static one; default a fresh one."""
    device, V = model.embed.weight.device, model.config.vocab_size
    cache = cache_for(model, n_cached + max(sizes), cache)
    model(torch.randint(0, V, (1, n_cached), device=device), cache)
    cache.length = n_cached
    tokens = {T: torch.randint(0, V, (1, T), device=device) for T in sizes}
    return {T: lambda T=T: model(tokens[T], cache) for T in sizes}


@torch.no_grad()
def step_costs(model, sizes, n_cached=256, cache=None):
    """{T: seconds} for one backbone forward of T new tokens on a cached prefix (lm_head included)."""
    return fastest(cached_forwards(model, sizes, n_cached, cache))


@torch.no_grad()
def draft_costs(heads, lm_weight, model=None):
    """{d: seconds} to draft with the first d heads at one position (heads, lm_head, top-k). Given the model,
    each draft is timed right after a one-token forward of it, which has pushed the heads' weights out of the
    CPU's caches, as in a decode step (there a draft can cost twice what it costs alone)."""
    hidden, draft_weight = torch.randn(heads.n_embd, device=lm_weight.device), heads.draft_weight(lm_weight)
    forward = cached_forwards(model, [1])[1] if model is not None else (lambda: None)
    return fastest({d: lambda d=d: head_logits(heads, draft_weight, hidden, d, lm_weight[0]).topk(10, dim=-1)
                    for d in range(1, heads.n_heads + 1)}, before=forward)


def calibrate(held_out, costs, drafting, tree=None):
    """Pick the tree, the gate's signal and its threshold that maximise estimated tokens per second.

    held_out: held-out answers laid end to end, {"ranks" (M, K) target ranks, "entropy" (M,) of the backbone's
    next-token distribution, optionally "head1_entropy" (M,) of head 1's and "category" (M,) task category}.
    costs: {T: seconds} of a backbone forward; drafting: {depth: seconds} of the heads. For each candidate tree
    size, the best tree for the measured rank accuracies (Tree.best), or only `tree` when one is given (costs
    must then hold its size); then, for each signal and each threshold at its entropy quantiles, decoding walks
    every answer (decode_steps): a step where the signal is below the threshold is a tree step (drafts +
    forward) and yields 1 + accepted tokens, else an AR step and 1 token. A head-1 gate runs the heads before
    it decides, so its AR steps pay the drafts too. The pick maximises the slowest category's tokens per
    second: a deeper tree that wins on the easy passage tasks must not lose on open requests.
    """
    held_out = {name: values.cpu() for name, values in held_out.items()}  # a walk of small steps: the CPU's work
    ranks = held_out["ranks"]
    signals = {gate_on: held_out[key].float() for gate_on, key in (("backbone", "entropy"), ("head1", "head1_entropy"))
               if key in held_out}
    starts, ends = answer_bounds(ranks)
    n_tokens = (ends - starts).float()  # (N,) what every walk emits
    category = held_out.get("category", torch.zeros(len(ranks), dtype=torch.uint8))[starts]  # (N,)
    groups = [category == c for c in category.unique()]  # (N,) masks, one a category
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
        gain = 1 + accepted_lengths(ranks, candidate)  # (M,) tokens a tree step at each row would yield
        thresholds = [0.0] + torch.quantile(signal, torch.linspace(0, 1, 21))[1:-1].tolist() + [math.inf]
        tree_steps, ar_steps = decode_steps(gain, signal < torch.tensor(thresholds)[:, None], starts, ends)
        tree_cost = costs[candidate.n_nodes] + drafting[candidate.max_depth]
        gated_ar_cost = costs[1] + (drafting[candidate.max_depth] if gate_on == "head1" else 0.0)
        ar_cost = torch.tensor([costs[1]] + [gated_ar_cost] * (len(thresholds) - 1))[:, None]  # 0: no heads run
        seconds = tree_steps * tree_cost + ar_steps * ar_cost  # (G, N)
        slowest = torch.stack([n_tokens[g].sum() / seconds[:, g].sum(1) for g in groups]).amin(0)  # (G,) tokens/s
        g = int(slowest.argmax())
        if best is None or float(slowest[g]) * costs[1] > best["est_speedup_slowest_category"]:
            speed, n_tree = float(n_tokens.sum() / seconds[g].sum()), int(tree_steps[g].sum())
            best = {"tree": [list(p) for p in candidate.paths], "threshold": thresholds[g], "gate_on": gate_on,
                    "est_tok_s": speed, "est_speedup": speed * costs[1],
                    "est_speedup_slowest_category": float(slowest[g]) * costs[1],
                    "est_tau_parallel": float(n_tokens.sum() - ar_steps[g].sum()) / n_tree if n_tree else 1.0,
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
            return spec | ({"link": "token" if "token" in variants else "hidden"} if kind == "cerberus" else {})
    raise ValueError(f"unknown head set {name!r}; use cerberus, medusa, cerberusN or medusaN, each optionally "
                     f"+root, and Cerberus +token")


def starting_weights(folder, heads, model):
    """The weights of the head set in folder/<kind>.pt, to fine-tune from: it must have this head set's spec.
    Its draft vocabulary is left behind (a buffer, not a weight): the heads draft over this data's."""
    _, ckpt = load_heads(os.path.join(folder, f"{heads.spec['kind']}.pt"), model)
    if ckpt["spec"] != heads.spec:
        raise ValueError(f"{folder}/{heads.spec['kind']}.pt holds heads {ckpt['spec']}, not {heads.spec}: "
                         f"pass --heads to match them, or leave out --init_from")
    return {k: v.float() for k, v in ckpt["state_dict"].items() if k != "vocab"}


def accuracy_by_category(ranks, held_out):
    """{category: accuracy} over the held-out positions of each task category, and of second turns."""
    groups = {name: held_out["category"] == c for c, name in enumerate(CATEGORIES)}
    groups["second turns"] = held_out["turn"] == 2
    return {name: accuracy(ranks[rows]) for name, rows in groups.items() if rows.any()}


def train(cfg):
    """The whole recipe; returns the metrics dict (also written to out_dir/metrics.json)."""
    setup_distributed()
    torch.manual_seed(cfg.seed)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    cfg = concrete_dtypes(cfg, device)
    model, tokenizer = load_gguf(cfg.gguf) if cfg.gguf else load_smollm2()
    model = model.to(device).requires_grad_(False)
    t0 = time.time()
    train_data, held_out = get_data(model, tokenizer, cfg)
    lm_weight = model.lm_head.weight.to(getattr(torch, cfg.train_dtype))
    V = model.config.vocab_size
    vocab = draft_vocabulary(train_data["targets"], cfg.draft_vocab, V) if 0 < cfg.draft_vocab < V else None
    coverage = 1.0 if vocab is None else float(torch.isin(held_out["targets"][:, 0], vocab).float().mean())
    if rank() == 0:  # a held-out token outside the draft vocabulary is one no head can get right
        print(f"{len(train_data['targets']):,} training positions, {len(held_out['targets']):,} held out; "
              f"draft vocabulary: {len(vocab) if vocab is not None else V} tokens, {coverage:.4f} of the held-out")
    metrics = {"config": asdict(cfg), "device": str(device), "positions": len(train_data["targets"]),
               "held_out_positions": len(held_out["targets"]), "data_seconds": round(time.time() - t0, 1),
               "positions_by_category": {c: int((train_data["category"] == i).sum()) for i, c in enumerate(CATEGORIES)},
               "second_turn_positions": int((train_data["turn"] == 2).sum()),
               "draft_vocab": len(vocab) if vocab is not None else V, "held_out_in_draft_vocab": round(coverage, 4),
               "heads": {}}

    backbone_entropy = torch.cat([entropy(linear(h.to(device, lm_weight.dtype), lm_weight)).cpu()
                                  for h in held_out["hidden"].split(1024)])
    costs = step_costs(model, [1, 2, 3, 4, 6, 8, 16, 32, 64]) if rank() == 0 else {}
    for name in cfg.heads.split(","):
        heads = build_heads(model.config, head_set_spec(name, cfg.n_heads)).to(device)
        if cfg.init_from:
            heads.load_state_dict(starting_weights(cfg.init_from, heads, model))
        if vocab is not None:
            heads.draft_over(vocab)
        t0 = time.time()
        train_heads(heads, lm_weight, train_data, cfg, desc=name,
                    state_path=os.path.join(cfg.out_dir, f"{name}.train_state.pt"))
        seconds = time.time() - t0
        if rank() != 0:
            continue
        ranks = target_ranks(heads, lm_weight, held_out, cfg.n_heads)
        calibration = {"ranks": ranks, "entropy": backbone_entropy.half(), "category": held_out["category"],
                       "head1_entropy": head1_entropy(heads, lm_weight, held_out).half()}
        result = {"params": parameter_count(heads), "train_seconds": round(seconds, 1),
                  "held_out": accuracy(ranks), "held_out_by_category": accuracy_by_category(ranks, held_out),
                  "gate": calibrate(calibration, costs, draft_costs(heads, lm_weight, model))}
        metrics["heads"][name] = result
        save_heads(os.path.join(cfg.out_dir, f"{name}.pt"), heads, model,
                   {"gate": result["gate"], "held_out": result["held_out"], "train_config": asdict(cfg),
                    "calibration": calibration_sample(calibration)})  # for the benchmark to re-calibrate
        print(f"{name}: {result['params']:,} params, {seconds:.0f}s, tree {len(result['gate']['tree']) + 1} nodes, "
              f"threshold {result['gate']['threshold']:.3f} on {result['gate']['gate_on']}")
        for category, acc in {"all held-out": result["held_out"], **result["held_out_by_category"]}.items():
            print(f"  {category:<13} top-1/top-5", *(f"{h} {a['top1']:.2f}/{a['top5']:.2f}" for h, a in acc.items()))
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
