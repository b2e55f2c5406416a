"""AR vs Medusa vs Cerberus, side by side on the real model: one process, same prompts, same weights.

    python bench.py                # SmolLM2-135M, data/bench_prompts.jsonl, shipped heads; --help lists the flags
    python bench.py --repeat=3     # three timed rounds: each speedup's median and spread

Prints the conditions, this device's step costs and calibration, one row per arm, speedup and head accuracy
per category, the machine's load (warning when the run measured the machine), then one JSON line. Every arm
decodes greedily or samples with one seed, so in float32 each reproduces AR token for token (match 1.000).
"""
import ast
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import Counter, namedtuple
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

from cerberus import Decoder, Sampling, Tree, load_heads
from model import chat_prompt, load_smollm2
from train import (accuracy, calibrate, draft_costs, head_targets, parse_cli, print_entropy_curve,
                   step_costs, target_ranks, timed)

ROOT = os.path.dirname(os.path.abspath(__file__))
ARMS = ("ar", "medusa", "cerberus", "cerberus_nogate")
HEAD_SET = {"medusa": "medusa", "cerberus": "cerberus", "cerberus_nogate": "cerberus"}  # arm -> <name>.pt
STEP_SIZES = [1, 2, 3, 4, 8, 16, 32, 64]  # tokens per forward for the step-cost curve
STEP_PREFIX = 256  # cached tokens behind each of those forwards
NOISY_SPREAD = 0.10  # an arm's speedup ranging over more than 10% of its median across rounds: machine noise
BUSY_LOAD = 0.4  # others' load per core that spoils timings (one busy thread on 2 cores is 0.5: caught)
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]  # bytes/s


@dataclass
class BenchConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # backbone dtype, "float32" or "bfloat16" (bf16 trees may flip near-ties: see match)
    compile: bool = False  # compile each decode step whole (heads, tree, verify, keep): a CUDA graph on a GPU; untimed
    tree: str = ""  # "" = each checkpoint's calibrated tree; a preset ("chain2", "sparse16"); or paths "[(0,), (0, 0)]"
    max_new_tokens: int = 128
    n_prompts: int = 24  # taken round-robin over the categories (24 = 3 each of 8); 0 = every prompt
    prompts: str = ""  # "" = data/bench_prompts.jsonl; or any MT-Bench-format question.jsonl (first turns)
    heads: str = ""  # directory holding cerberus.pt and medusa.pt; "" = the shipped heads/
    arms: str = "ar,medusa,cerberus,cerberus_nogate"  # "ar" always runs: it is the baseline
    repeat: int = 1  # timed rounds over all prompts (arms take turns on each); 2+ gives each speedup's spread
    threshold: float = -1.0  # entropy gate of the cerberus arm in nats; -1 = the calibrated one
    gate_on: str = ""  # whose entropy the cerberus arm's gate reads: "" = the checkpoint's; "backbone" or "head1"
    draft_dtype: str = "bfloat16"  # heads and their lm_head copy; drafts change only the speed, never the output
    calibrate: bool = True  # choose each head set's tree and threshold from this device's step costs
    temperature: float = 0.0  # 0 = greedy; else every arm samples, same seed, so the same tokens (top_k, top_p too)
    top_k: int = 0  # sampling: keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # sampling: then the fewest most likely whose probability reaches top_p; 1 = all
    seed: int = 0  # sampling: the draw at each position depends only on (seed, position)


# ----------------------------------------------------------------------------------------------
# Inputs: prompts, arms, heads.

def load_prompts(path, tokenizer, n):
    """n questions (0 = all) of an MT-Bench-format file as [{"category", "ids"}]: first turns, chat
    template applied, taken round-robin over the categories so that any n covers them evenly. Every
    line is checked, so a malformed file fails before any timing."""
    if not os.path.isfile(path):
        raise ValueError(f"prompts file not found: {path}")
    by_category = {}  # category -> its questions, in file order
    with open(path) as f:
        for line_no, line in ((i, line) for i, line in enumerate(f, 1) if line.strip()):
            try:
                question = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_no}: not valid JSON ({e})") from e
            turns = question.get("turns") if isinstance(question, dict) else None
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise ValueError(f'{path}, line {line_no}: expected {{"category": ..., "turns": ["first turn", ...]}}')
            by_category.setdefault(question.get("category", "all"), []).append(question)
    if not by_category:
        raise ValueError(f"{path} holds no questions")
    spread = [q for rank in itertools.zip_longest(*by_category.values()) for q in rank if q is not None]
    return [{"category": q.get("category", "all"), "ids": chat_prompt(tokenizer, q["turns"][0])}
            for q in spread[:n or None]]


def parse_tree(spec):
    """Tree from --tree: a preset name or a path list."""
    return Tree(ast.literal_eval(spec)) if spec.lstrip().startswith("[") else Tree.preset(spec)


def recalibrate(head_sets, costs, model, tree=None):
    """Re-choose each head set's tree and gate (signal, threshold) for the step costs measured here, from the
    held-out positions in its checkpoint (entropies, target ranks, task categories): a tree that pays on one
    device may lose on another.
    With `tree` only the gate is chosen; without costs or that data the stored gate stays. Returns new head sets."""
    out = {}
    for name, (heads, ckpt) in head_sets.items():
        where = "as stored"
        if costs is not None and "calibration" in ckpt:
            lm_weight = model.lm_head.weight.to(next(heads.parameters()).dtype)  # the dtype the heads draft in
            ckpt = {**ckpt, "gate": calibrate(ckpt["calibration"], costs, draft_costs(heads, lm_weight, model), tree)}
            where = "re-calibrated for the step costs here"
        spec, gate = heads.spec, ckpt["gate"]
        kind = ", ".join([spec["kind"], f"{spec['n_layers']} block(s)"] + ["reads the root"] * spec["reads_root"]
                         + ["token link"] * (spec.get("link") == "token") + [f"{heads.n_draft_tokens} draft tokens"])
        print(f"  {name} heads ({kind}): tree of {len(gate['tree']) + 1} nodes, threshold {gate['threshold']:.3f} nats "
              f"on {gate.get('gate_on', 'backbone')}, est. speedup {gate.get('est_speedup', math.nan):.2f}x, "
              f"{gate.get('est_speedup_slowest_category', math.nan):.2f}x on the slowest task category ({where})")
        if "entropy_curve" in gate:
            print_entropy_curve(gate["entropy_curve"], gate["threshold"])
        out[name] = (heads, ckpt)
    return out


def arm_settings(arms, cfg, model, head_sets, eos_id, max_len):
    """{arm: (Decoder, its generate() keyword arguments)}. Only the cerberus arm gates; the others always go
    parallel. Arms with the same heads, tree and gate signal share a Decoder (its cache and compiled steps)."""
    decoders, settings, sampling = {}, {}, Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    for arm in arms:
        options, threshold = {}, math.inf  # ar: no heads; medusa and cerberus_nogate: a parallel step every time
        if arm != "ar":
            heads, ckpt = head_sets[HEAD_SET[arm]]
            gate = ckpt["gate"]
            if arm == "cerberus" and cfg.gate_on not in ("", gate.get("gate_on", "backbone")) and cfg.threshold < 0:
                raise ValueError(f"--gate_on={cfg.gate_on} needs --threshold: the calibrated one ({gate['threshold']:.3f} "
                                 f"nats) is for the {gate.get('gate_on', 'backbone')}'s entropy")
            if arm == "cerberus":
                threshold = gate["threshold"] if cfg.threshold < 0 else cfg.threshold
            options = dict(heads=heads, tree=parse_tree(cfg.tree) if cfg.tree else Tree(gate["tree"]),
                           gate_on=cfg.gate_on or gate.get("gate_on", "backbone"))
        key = (HEAD_SET.get(arm), options.get("tree") and tuple(options["tree"].paths), options.get("gate_on"))
        if key not in decoders:
            decoders[key] = Decoder(model, **options, sampling=sampling, max_len=max_len)
        settings[arm] = (decoders[key], dict(max_new_tokens=cfg.max_new_tokens, gate_threshold=threshold,
                                             eos_id=eos_id, seed=cfg.seed))
    return settings


# ----------------------------------------------------------------------------------------------
# Measuring, with train.timed: one clock for everything; on GPU the queue is drained around it.

Generation = namedtuple("Generation", "ids stats seconds")


def prefill_seconds(decoder, ids):
    """Time of what every generate() call does before decoding: the prompt's forward into the cache, the gate."""
    return timed(lambda: decoder.prefill(torch.tensor(ids, device=decoder.length.device)))[1]


def run_arms(model, prompts, settings):
    """{arm: [Generation per prompt]}, one round. Whole generate() calls are timed (prefill included,
    identical across arms). Arms take turns on each prompt, so drift in machine load hits them all alike."""
    runs = {arm: [] for arm in settings}
    for prompt in tqdm(prompts, desc="/".join(settings), unit="prompt", file=sys.stderr):
        for arm, (decoder, kwargs) in settings.items():
            (ids, stats), seconds = timed(lambda: decoder.generate(prompt["ids"], **kwargs))
            runs[arm].append(Generation(ids, stats, seconds))
    return runs


def report(rounds, prompts, prefill):
    """Metrics per arm, pooled over every round. Decode tok/s = new tokens / (call time - prefill time);
    speedup = AR's time / the arm's time over whole calls (what a user waits for), per round, reported
    as the rounds' median with spread = (max - min) / median; match = share of AR's tokens reproduced."""
    categories = [p["category"] for p in prompts] * len(rounds)  # of each call, pooled over rounds

    def seconds(gens, category=None):
        return sum(g.seconds for g, c in zip(gens, categories) if category in (None, c))

    ar, out = [g for r in rounds for g in r["ar"]], {}
    for arm in rounds[0]:
        gens = [g for r in rounds for g in r[arm]]
        stats = [g.stats for g in gens]
        steps, new_tokens = sum(s.steps for s in stats), sum(s.new_tokens for s in stats)
        accepted = [n for s in stats for n in s.accept_lengths]  # one entry per parallel step
        decode = seconds(gens) - sum(prefill) * len(rounds)  # <= 0 if a prefill compiled: NaN, not a huge tok/s
        per_round = [seconds(r["ar"]) / seconds(r[arm]) for r in rounds]
        median = statistics.median(per_round)
        out[arm] = {"tok_s": new_tokens / decode if decode > 0 else math.nan, "speedup": median,
                    "speedup_rounds": per_round, "speedup_spread": (max(per_round) - min(per_round)) / median,
                    "tau": new_tokens / max(steps, 1), "ms_per_step": 1e3 * decode / steps if decode > 0 else math.nan,
                    "match_rate": sum(a == b for g, ref in zip(gens, ar) for a, b in zip(g.ids, ref.ids))
                    / max(sum(len(g.ids) for g in ar), 1),
                    "ar_fraction": sum(s.ar_steps for s in stats) / max(steps, 1),
                    "zero_accept": accepted.count(0) / len(accepted) if accepted else None,
                    "accept_histogram": dict(sorted(Counter(accepted).items())),
                    "new_tokens": new_tokens, "seconds": seconds(gens),
                    "by_category": {c: seconds(ar, c) / seconds(gens, c) for c in dict.fromkeys(categories)}}
    return out


def answer_positions(model, prompts, ar_runs, n_heads):
    """The AR answers to these prompts as head-training positions: {"hidden" (M, C), "targets" (M, 1 + n_heads)}
    and the M positions' categories. One forward per prompt gives the hidden state before each answer token."""
    device, hidden, targets, categories = model.embed.weight.device, [], [], []
    for prompt, run in zip(prompts, ar_runs):
        P = len(prompt["ids"])
        _, states = model(torch.tensor([prompt["ids"] + run.ids], device=device))
        hidden.append(states[0, P - 1:P - 1 + len(run.ids)])  # (A, C): row i predicts answer token i
        targets.append(head_targets(torch.tensor(run.ids, device=device), n_heads))
        categories += [prompt["category"]] * len(run.ids)
    return {"hidden": torch.cat(hidden), "targets": torch.cat(targets)}, categories


def score_heads(head_sets, lm_weight, data, categories):
    """({head set: per-head top-1/top-5}, {head set: {category: the same}}) at these positions: head k should
    name the token k after the one each hidden state predicts."""
    overall, by_category = {}, {}
    for name, (heads, _) in head_sets.items():
        ranks = target_ranks(heads, lm_weight, data, heads.n_heads)  # (M, K)
        overall[name] = accuracy(ranks)
        by_category[name] = {c: accuracy(ranks[torch.tensor([r == c for r in categories])])
                             for c in dict.fromkeys(categories)}
    return overall, by_category


def head_accuracy(model, head_sets, lm_weight, prompts, ar_runs):
    """score_heads on the AR answers to these prompts."""
    n_heads = max(heads.n_heads for heads, _ in head_sets.values())
    return score_heads(head_sets, lm_weight, *answer_positions(model, prompts, ar_runs, n_heads))


def noise_warnings(results, load_before, load_after, device):
    """Print the machine's load; return why the speedups may describe the machine more than the method: rounds
    that disagree by over NOISY_SPREAD of the median, or other work on the cores above BUSY_LOAD per core."""
    cores, n_rounds = os.cpu_count(), len(results["ar"]["speedup_rounds"])
    own = 1 if device.type == "cuda" else min(torch.get_num_threads(), cores)  # threads this benchmark keeps busy
    print(f"noise: load avg (1 min) {load_before:.2f} before, {load_after:.2f} after the timed rounds ({own} of "
          f"{cores} cores this benchmark's); "
          + (f"speedups are medians of {n_rounds} rounds" if n_rounds > 1 else "one round: --repeat=3 gives the spread"))
    warnings = [f"{arm}'s speedup ranged {min(r['speedup_rounds']):.2f}x..{max(r['speedup_rounds']):.2f}x across "
                f"rounds, more than {NOISY_SPREAD:.0%} of its median: the machine's speed moved more than the method "
                "shows; rerun on a quiet machine"
                for arm, r in results.items() if "same_as" not in r and r["speedup_spread"] > NOISY_SPREAD]
    busy = {f"before the benchmark started (load {load_before:.2f})": load_before,
            f"during the timed rounds (load {load_after:.2f}, {own} of it this benchmark's)": load_after - own}
    warnings += [f"other work on the {cores} cores {when}: the timings measure it too; stop it and rerun"
                 for when, load in busy.items() if load > BUSY_LOAD * cores]
    print("".join(f"WARNING: {w}\n" for w in warnings), end="")
    return warnings


def roofline(model, card, ar, mean_context):
    """AR decode against the memory roofline of a known GPU, else None. One AR step reads every weight
    once (a tied lm_head is the embedding: one read) and the K/V of the context; at the card's peak
    bandwidth that gives the fastest possible tok/s, and measured over it the MBU (bandwidth utilisation)."""
    bandwidth = next((bw for name, bw in PEAK_BANDWIDTH if name in card), None)
    if bandwidth is None:
        return None
    cfg, size = model.config, model.embed.weight.element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix counts once
    if not cfg.tie_embeddings:  # an untied embedding is only looked up, one row per token
        weights -= model.embed.weight.numel() * size
    step_bytes = weights + 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * size * mean_context
    return {"card": card, "peak_tb_s": bandwidth / 1e12, "bytes_per_ar_step": round(step_bytes), "ar_roofline_tok_s":
            round(bandwidth / step_bytes, 1), "ar_mbu": round(ar["tok_s"] * step_bytes / bandwidth, 4)}


# ----------------------------------------------------------------------------------------------
# Printing.

def device_name(device):
    """The card, or the CPU with its cores, torch threads and vector extensions (results/cpu_info.py: its host)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")
    threads, capability = torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()
    return f"{cpu} ({os.cpu_count()} cores, {threads} torch threads, {capability})"


def print_tables(results, settings, accuracy, accuracy_by_category):
    print(f"{'arm':<16} {'nodes':>5} {'tok/s':>7} {'speedup':>8} {'min-max':>11} {'tau':>5} {'ms/step':>7} {'match':>6} "
          f"{'AR frac':>7} {'0-accept':>8}  accept-length histogram")
    for arm, r in results.items():
        nodes = settings[arm][0].tree.n_nodes
        zero = "-" if r["zero_accept"] is None else f"{r['zero_accept']:.3f}"
        spread = "-" if len(r["speedup_rounds"]) < 2 else f"{min(r['speedup_rounds']):.2f}-{max(r['speedup_rounds']):.2f}"
        print(f"{arm:<16} {nodes:>5} {r['tok_s']:7.2f} {r['speedup']:7.2f}x {spread:>11} {r['tau']:5.2f} "
              f"{r['ms_per_step']:7.2f} {r['match_rate']:6.3f} {r['ar_fraction']:7.3f} {zero:>8} "
              f" {r['accept_histogram']}")
    for arm in [arm for arm, r in results.items() if "same_as" in r]:
        print(f"{arm} is {results[arm]['same_as']} here: with threshold inf the two arms are one computation, timed once")
    others = [arm for arm in results if arm != "ar"]
    print(f"speedup vs ar by category:\n  {'category':<14}" + "".join(f"{arm:>17}" for arm in others))
    for category in results["ar"]["by_category"]:
        print(f"  {category:<14}" + "".join(f"{results[arm]['by_category'][category]:16.2f}x" for arm in others))
    for name, table in accuracy_by_category.items():
        print(f"{name} heads on these prompts' AR answers, top-1 / top-5:\n  {'category':<14}"
              + "".join(f"{k:>15}" for k in accuracy[name]))
        for category, acc in {**table, "all": accuracy[name]}.items():
            print(f"  {category:<14}" + "".join(f"{a['top1']:8.3f} / {a['top5']:.3f}" for a in acc.values()))


@torch.no_grad()
def bench(cfg, model=None, tokenizer=None, head_sets=None):
    """Run the arms of cfg on the same prompts; print the tables and the JSON line; return the JSON dict.
    model, tokenizer: default SmolLM2-135M-Instruct; "<|im_end|>" is the stop token. head_sets: {"medusa" |
    "cerberus": (heads, checkpoint dict with a "gate")}, default cfg.heads/<name>.pt. Given ones are moved and cast."""
    load_before = os.getloadavg()[0]  # before loading anything: what else this machine is doing
    arms = ["ar"] + [a for a in (arm.strip() for arm in cfg.arms.split(",")) if a and a != "ar"]  # ar: the baseline
    if set(arms) - set(ARMS):  # fail before the slow loading
        raise ValueError(f"unknown arm(s) {sorted(set(arms) - set(ARMS))}; valid arms are {list(ARMS)}")
    if cfg.gate_on not in ("", "backbone", "head1"):
        raise ValueError(f"unknown gate_on {cfg.gate_on!r}: use 'backbone' (next-token entropy) or 'head1'")
    if cfg.repeat < 1:
        raise ValueError(f"--repeat={cfg.repeat}: the timed rounds must be 1 or more (3 gives a median and a spread)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={cfg.device}, but this PyTorch sees no CUDA GPU; use --device=cpu")
    if cfg.draft_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--draft_dtype={cfg.draft_dtype}: the heads draft in float32 or bfloat16")
    device, dtype, draft_dtype = torch.device(cfg.device), getattr(torch, cfg.dtype), getattr(torch, cfg.draft_dtype)
    if model is None:
        model, tokenizer = load_smollm2()
    model = model.to(device, dtype).eval()
    prompts = load_prompts(cfg.prompts or os.path.join(ROOT, "data", "bench_prompts.jsonl"), tokenizer, cfg.n_prompts)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    if head_sets is None:
        head_sets = {name: load_heads(os.path.join(cfg.heads or os.path.join(ROOT, "heads"), f"{name}.pt"), model)
                     for name in sorted({HEAD_SET[a] for a in arms if a != "ar"})}
    head_sets = {name: (heads.to(device, draft_dtype), ckpt) for name, (heads, ckpt) in head_sets.items()}
    lm_weight = model.lm_head.weight.to(draft_dtype)  # what the heads draft through, cast once, not per call
    fixed_tree = parse_tree(cfg.tree) if cfg.tree else None  # else each checkpoint's own
    sizes = sorted(set(STEP_SIZES) | {fixed_tree.n_nodes if fixed_tree else 1})  # trees are chosen among these
    max_len = max(len(p["ids"]) for p in prompts) + cfg.max_new_tokens + max(sizes)  # every decoder's cache

    conditions = {"device": device_name(device), "dtype": cfg.dtype, "compile": cfg.compile,
                  "tree": cfg.tree or "calibrated", "n_prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
                  "repeat": cfg.repeat, "sampling": f"temperature {cfg.temperature} top_k {cfg.top_k} top_p {cfg.top_p} "
                                                    f"seed {cfg.seed}" if cfg.temperature > 0 else "greedy"}
    print(f"bench | {' | '.join(f'{k} {v}' for k, v in conditions.items())} | drafts {cfg.draft_dtype} | prompts "
          f"{cfg.prompts or 'data/bench_prompts.jsonl'} | torch {torch.__version__} | load avg {load_before:.2f}")
    setup_start = time.perf_counter()  # with --compile, compiling happens in the first calls below
    costs = step_costs(model, sizes, STEP_PREFIX)
    print(f"step cost of one eager forward of T tokens on a {STEP_PREFIX}-token cache, and the trees and gates for it:")
    for T, s in costs.items():
        print(f"  T={T:<3d} {1e3 * s:8.2f} ms  {s / costs[1]:5.2f}x T=1  {'#' * round(40 * s / max(costs.values()))}")
    head_sets = recalibrate(head_sets, costs if cfg.calibrate else None, model, fixed_tree)
    settings = arm_settings(arms, cfg, model, head_sets, eos_id, max_len)
    # Threshold inf: cerberus_nogate would repeat cerberus step for step; timing it twice would measure only noise.
    twins = {"cerberus", "cerberus_nogate"} <= settings.keys() and settings["cerberus"][1]["gate_threshold"] == math.inf
    timed_settings = {arm: s for arm, s in settings.items() if not (twins and arm == "cerberus_nogate")}
    if cfg.compile:  # one graph per step kind; on CUDA replayed as a CUDA graph. torch's counters from zero:
        counters.clear()
        for decoder in {id(d): d for d, _ in settings.values()}.values():
            decoder.compile("reduce-overhead" if device.type == "cuda" else "default")
    warm = {arm: timed(lambda: [decoder.generate(prompts[0]["ids"], **dict(kwargs, gate_threshold=t, max_new_tokens=8))
                                for t in (0.0, math.inf)])[1]  # untimed: an AR step and a tree step, compiled here
            for arm, (decoder, kwargs) in timed_settings.items()}
    ar_decoder = settings["ar"][0]
    if cfg.compile:  # untimed: compile every padded prompt length these prompts need (3 calls record a CUDA graph)
        for ids in {ar_decoder.prompt_slots(len(p["ids"])): p["ids"] for p in prompts}.values():
            for _ in range(3):
                prefill_seconds(ar_decoder, ids)
    setup_s = time.perf_counter() - setup_start
    compiled_graphs = counters["stats"]["unique_graphs"]
    # Every graph is compiled now: a call checks only the guards that tell its graphs apart (the step kind, the
    # decoder, the prompt's padded length), not the hundreds on every weight (620-840 us a call against 70-90 on the
    # Zen 4 CPU; a GPU's share not yet measured). Unsafe only if something they skip changed since; match and
    # recompiles below would show it.
    with torch.compiler.set_stance(skip_guard_eval_unsafe=cfg.compile):
        prefill = [prefill_seconds(ar_decoder, p["ids"]) for p in prompts]
        print(f"step costs, calibration and warm-up took {setup_s:.1f} s{', compiling included' if cfg.compile else ''}; "
              f"prefill (subtracted for decode tok/s) {1e3 * statistics.mean(prefill):.1f} ms a prompt")
        if cfg.temperature > 0:
            print("sampling: draws keyed by (seed, position): every arm draws AR's tokens, up to rounding at CDF "
                  "boundaries")
        rounds = [run_arms(model, prompts, timed_settings) for _ in range(cfg.repeat)]
    load_after = os.getloadavg()[0]
    compile_stats = dict(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                         recompiles=counters["stats"]["unique_graphs"] - compiled_graphs,  # new graphs while timed
                         cudagraph_skips=counters["inductor"]["cudagraph_skips"] if device.type == "cuda" else None
                         ) if cfg.compile else None
    print(f"compiled steps: {compile_stats}" if compile_stats else "eager steps (--compile: one graph a step)")
    results = report(rounds, prompts, prefill)
    if twins:
        results["cerberus_nogate"] = dict(results["cerberus"], same_as="cerberus")
        warm["cerberus_nogate"] = warm["cerberus"]
    heads_seen, heads_by_category = head_accuracy(model, head_sets, lm_weight, prompts, rounds[0]["ar"])
    print_tables(results, settings, heads_seen, heads_by_category)
    warnings = noise_warnings(results, load_before, load_after, device)
    answer = results["ar"]["new_tokens"] / len(rounds) / len(prompts)  # mean AR answer length
    mean_context = statistics.mean(len(p["ids"]) for p in prompts) + answer / 2
    roof = roofline(model, conditions["device"], results["ar"], mean_context)
    if roof:
        print(f"roofline ({roof['card']}, {roof['peak_tb_s']} TB/s): an AR step reads {roof['bytes_per_ar_step'] / 1e6:.1f} "
              f"MB, so AR could reach {roof['ar_roofline_tok_s']:.0f} tok/s; MBU {roof['ar_mbu']:.3f}")
    summary = dict(conditions, setup_s=round(setup_s, 1), load_before=load_before, load_after=load_after,
                   noise_warnings=warnings, arms={arm: dict(r, warmup_s=warm[arm]) for arm, r in results.items()},
                   head_accuracy=heads_seen, head_accuracy_by_category=heads_by_category, roofline=roof,
                   compile_stats=compile_stats)
    print(json.dumps(summary))  # last line of stdout
    return summary


def main(argv=None):
    bench(BenchConfig(**parse_cli(BenchConfig, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
