"""The backbone's greedy answers to the prompt mix, as token ids in shards: the data train.py learns from.

    python data/generate_answers.py                    # every shard of data/train_prompts.jsonl; resumes
    OMP_NUM_THREADS=1 nice -n 19 nohup python data/generate_answers.py >> runs/datagen.log 2>&1 &   # background
    torchrun --nproc_per_node=8 data/generate_answers.py --batch_size=256   # GPUs: shard k on rank k % 8

Shard k holds the answers to prompt lines [256 k, 256 (k + 1)) of the prompt file: every first turn,
then every follow-up, answered after the model's own first answer. A shard is written whole (to a
temporary file, then renamed) or not at all, so a killed run loses at most the shard it was on, and
a rerun, here or on another machine, generates only the shards that are missing. On a CPU shared with
other work one thread does more per CPU-second than two, which spin while waiting for each other
(measured at load 6 on 2 cores: 125 against 39 tokens per CPU-second). Answers are uint16
token ids (2M tokens are 4 MB), small enough to commit; train.py recomputes their hidden states with
one teacher-forced forward per batch. The prompt file is refused when any turn overlaps a benchmark
prompt, so no benchmark question is ever answered for training.
"""
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cerberus import write_atomically  # noqa: E402
from model import KVCache, load_gguf, load_smollm2  # noqa: E402
from train import (CATEGORIES, conversation, parse_cli, prompts_hash, rank, read_prompts, read_shard,  # noqa: E402
                   resolve_dtype, setup_distributed, world_size)

SHARD_ROWS = 256  # prompt lines per shard: ~4 min of a 2-core CPU, the most a killed run loses


@dataclass
class AnswerConfig:
    gguf: str = ""  # backbone: "" = the packaged SmolLM2-135M-Instruct, else a llama GGUF file
    prompts: str = "data/train_prompts.jsonl"  # the prompt mix (data/build_prompts.py), one JSON object a line
    answers_dir: str = "data/answers"  # shards go here, one .npz per 256 prompt lines
    n_shards: int = 0  # shards to make, the first ones in file order; 0 = every shard of the prompt file
    max_answer_tokens: int = 200  # per turn; a shard remembers it, so a rerun must keep it
    batch_size: int = 32  # batched generation runs ~9x faster per token than batch 1 on a CPU
    dtype: str = "auto"  # backbone dtype while answering; auto = bfloat16 where native, else float32 (5x faster there)


# ----------------------------------------------------------------------------------------------
# Prompts, refused when any turn overlaps a benchmark prompt.

def words(text):
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def benchmark_prompts():
    """Every turn the benchmark may use: the project's set and MT-Bench (when present)."""
    texts = []
    for path in (os.path.join(ROOT, "data", "bench_prompts.jsonl"),
                 os.path.join(ROOT, "..", "shared", "data", "mt_bench.jsonl")):
        if os.path.exists(path):
            with open(path) as f:
                texts += [turn for line in f if line.strip() for turn in json.loads(line)["turns"]]
    return texts


def overlaps_benchmark(texts, n=8):
    """The texts that share an n-word run with a benchmark turn or, where either is shorter than n
    words, contain it or appear in it (lower-cased, punctuation dropped): the rule the real prompts
    in ../shared/data/real_prompts/ were filtered by, and a stricter one than whole-text equality."""
    bench = [" ".join(words(t)) for t in benchmark_prompts()]
    runs = {tuple(w[i:i + n]) for w in map(str.split, bench) for i in range(len(w) - n + 1)}
    short = [f" {b} " for b in bench if len(b.split()) < n]

    def overlaps(w):
        text = f" {' '.join(w)} "
        return (any(tuple(w[i:i + n]) in runs for i in range(len(w) - n + 1)) or any(b in text for b in short)
                or (len(w) < n and any(text in f" {b} " for b in bench)))
    return [t for t in texts if overlaps(words(t))]


def load_prompts(path):
    """The rows of a prompt file ({"prompt", "category", "follow_up" (optional), ...} a line),
    refused when a row has an unknown category or any turn overlaps a benchmark prompt."""
    rows = read_prompts(path)
    for row in rows:
        if row.get("category") not in CATEGORIES:
            raise ValueError(f"{path}: category {row.get('category')!r} is not one of {CATEGORIES}; fix the line")
    clash = overlaps_benchmark([t for row in rows for t in (row["prompt"], row.get("follow_up")) if t])
    if clash:
        raise ValueError(f"{path}: {len(clash)} turns overlap a benchmark prompt, e.g. {clash[0][:80]!r}; "
                         f"rebuild it with data/build_prompts.py, which drops them")
    return rows


# ----------------------------------------------------------------------------------------------
# Answers.

@torch.no_grad()
def batched_generate(model, prompts, max_new_tokens, eos_id, follow_ups=None):
    """Greedy answers to a batch of chats (lists of ids), left-padded, and second answers to those that go on.

    follow_ups[b], where given, is what comes after row b's first answer: its end token, then the next
    user turn up to where the assistant answers. The row is fed those ids one per step, as if it were
    answering, and then answers again: its first turn's keys and values stay in the cache, where a new
    chat would compute them again (in shards 36 and 40, 56-63k of a shard's 100-110k prompt tokens).

    Returns, per row, one (answer ids, hidden states that predicted them (n, C)) per turn; an answer
    runs up to and including eos_id, or to max_new_tokens. Rotary positions are relative, so the left
    padding only needs masking; pad slots attend to themselves so that no row is fully masked. Rows
    that are done leave the batch (their cache rows too) once a quarter of it is: a batch costs about
    its number of rows per step, so idle rows would waste up to half the time.
    """
    device, B, P = model.embed.weight.device, len(prompts), max(map(len, prompts))
    follow_ups = follow_ups or [None] * B
    n_steps = max(max_new_tokens + (len(f) + max_new_tokens if f else 0) for f in follow_ups)
    S = P + n_steps
    if S > model.config.block_size:
        raise ValueError(f"prompt of {P} tokens + {n_steps} answer and follow-up tokens exceed the context of "
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

    # What each step predicted, per row; an answer is a run of steps [begin, end).
    tokens = torch.zeros(B, n_steps, dtype=torch.long, device=device)
    states = torch.zeros(B, n_steps, model.config.n_embd, dtype=model.embed.weight.dtype, device=device)
    turns = [[] for _ in range(B)]  # (begin, end) of each answer so far
    begin = [0] * B  # the step that predicts the current answer's first token
    to_feed = [[] for _ in range(B)]  # follow-up ids still to go in before the row answers again
    rows = list(range(B))  # original index of each row still in the batch

    def done(b):
        return len(turns[b]) == 1 + bool(follow_ups[b])

    cache = KVCache(model.config, S, batch_size=B, device=device, dtype=model.embed.weight.dtype)
    hidden = model.trunk(idx, torch.arange(P, device=device), mask(real, 0, P), cache, slice(0, P))[:, -1:]
    logits = model.lm_head(hidden)  # the last position only: logits everywhere are a fifth of a prefill
    cache.length = P
    for i in range(n_steps):
        token = logits[:, -1].float().argmax(-1)
        tokens[rows, i], states[rows, i] = token, hidden[:, -1]
        inputs = token.tolist()  # the step's one host sync: each row's next token, unless it is fed one
        for j, b in enumerate(rows):
            if to_feed[b]:  # this step's prediction is not an answer's: feed the follow-up's next id
                inputs[j] = to_feed[b].pop(0)
            elif not done(b) and (inputs[j] == eos_id or i + 1 - begin[b] == max_new_tokens):  # an answer ends
                turns[b].append((begin[b], i + 1))
                if not done(b):  # an answer that ended goes in with its end token, so skip the follow-up's
                    to_feed[b] = list(follow_ups[b][1:] if inputs[j] == eos_id else follow_ups[b])
                    begin[b] = i + 1 + len(to_feed[b])  # the step that reads the last fed id's prediction
        alive = [j for j, b in enumerate(rows) if not done(b)]
        if not alive:
            break
        if len(alive) * 4 <= len(rows) * 3:  # drop the rows that are done from the batch and the cache
            rows, real = [rows[j] for j in alive], real[alive]
            cache.k, cache.v = cache.k[:, alive], cache.v[:, alive]
            inputs = [inputs[j] for j in alive]
        logits, hidden = model(torch.tensor(inputs, device=device)[:, None], cache, mask=mask(real, cache.length, 1))
        cache.length += 1
    return [[(tokens[b, s:e].tolist(), states[b, s:e]) for s, e in turns[b]] for b in range(B)]


def follow_up_ids(tokenizer, row):
    """What batched_generate feeds after row's first answer: its end token, then the next user turn up to
    where the assistant answers (the chat after an empty first answer, less the first turn); None if none."""
    if not row.get("follow_up"):
        return None
    return conversation(tokenizer, row, [])[len(conversation(tokenizer, row)):]


def answer_rows(model, tokenizer, rows, cfg, bar=None):
    """{(line, turn): greedy answer ids} for rows {line: row}: every first turn and, after the model's
    own first answer, every follow-up, both in one pass (batched_generate). bar: a progress bar counting answers."""
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    chats = {line: conversation(tokenizer, row) for line, row in rows.items()}
    follow_ups = {line: follow_up_ids(tokenizer, row) for line, row in rows.items()}
    lines = sorted(rows, key=lambda line: (bool(follow_ups[line]), len(chats[line])))  # similar rows batch well
    answers = {}
    for i in range(0, len(lines), cfg.batch_size):
        batch = lines[i:i + cfg.batch_size]
        out = batched_generate(model, [chats[line] for line in batch], cfg.max_answer_tokens, eos_id,
                               [follow_ups[line] for line in batch])
        answers.update({(line, turn): ids for line, turns in zip(batch, out) for turn, (ids, _) in enumerate(turns, 1)})
        if bar is not None:
            bar.update(sum(map(len, out)))
    return answers


def shard_rows(rows, k):
    """{line: row} of shard k: prompt lines [k * SHARD_ROWS, (k + 1) * SHARD_ROWS) of the file."""
    return {line: rows[line] for line in range(k * SHARD_ROWS, min(len(rows), (k + 1) * SHARD_ROWS))}


def write_shard(path, answers, meta):
    """{(line, turn): ids} -> one .npz, token ids as uint16, with what they depend on (meta:
    backbone, prompts, max_answer_tokens), written atomically."""
    items = sorted(answers.items())
    if any(t > np.iinfo(np.uint16).max for _, ids in items for t in ids):
        raise ValueError("a token id above 65535 does not fit a uint16 shard; this backbone's vocabulary is too large")
    arrays = dict({k: np.array(v) for k, v in meta.items()},
                  line=np.array([line for (line, _), _ in items], dtype=np.int32),
                  turn=np.array([turn for (_, turn), _ in items], dtype=np.uint8),
                  length=np.array([len(ids) for _, ids in items], dtype=np.int32),
                  tokens=np.array([t for _, ids in items for t in ids], dtype=np.uint16))

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
            np.savez(f, **arrays)
    write_atomically(path, write)


def generate_shards(model, tokenizer, rows, cfg):
    """Generate this rank's missing shards (shard k is rank k % world size's); returns their paths.
    A shard already there must have been made from the same prompts, backbone and answer length."""
    n_shards = math.ceil(len(rows) / SHARD_ROWS)
    shards = range(min(cfg.n_shards or n_shards, n_shards))[rank()::world_size()]
    paths = {k: os.path.join(ROOT, cfg.answers_dir, f"{k:05d}.npz") for k in shards}
    metas = {k: {"backbone": model.fingerprint(), "prompts": prompts_hash(list(shard_rows(rows, k).values())),
                 "max_answer_tokens": cfg.max_answer_tokens} for k in shards}
    for k in shards:
        if os.path.exists(paths[k]) and read_shard(paths[k])[0] != metas[k]:
            raise ValueError(f"{paths[k]} holds answers to other prompts, of another backbone or answer length; "
                             f"move it away or choose another --answers_dir")
    missing = [k for k in shards if not os.path.exists(paths[k])]
    n_answers = sum(1 + bool(row.get("follow_up")) for k in missing for row in shard_rows(rows, k).values())
    bar = tqdm(total=n_answers, desc=f"answers ({len(shards) - len(missing)} of {len(shards)} shards there)",
               unit="answer", disable=rank() > 0)
    for k in missing:
        t0, cpu0 = time.time(), time.process_time()
        answers = answer_rows(model, tokenizer, shard_rows(rows, k), cfg, bar)
        write_shard(paths[k], answers, metas[k])
        n_tokens = sum(map(len, answers.values()))  # rates beside the load: the CPU may be shared, or paused
        tqdm.write(f"shard {k}: {len(answers)} answers, {n_tokens} tokens, {n_tokens / (time.time() - t0):.0f} tok/s "
                   f"of wall time, {n_tokens / (time.process_time() - cpu0):.0f} per CPU-second of this process, "
                   f"load average {os.getloadavg()[0]:.1f}")
    bar.close()
    return list(paths.values())


def main(argv=None):
    cfg = AnswerConfig(**parse_cli(AnswerConfig, sys.argv[1:] if argv is None else argv))
    setup_distributed()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_gguf(cfg.gguf) if cfg.gguf else load_smollm2()
    model = model.to(device, getattr(torch, resolve_dtype(cfg.dtype, device))).requires_grad_(False)
    generate_shards(model, tokenizer, load_prompts(cfg.prompts), cfg)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
