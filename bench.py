"""AR vs Medusa vs Cerberus, side by side on the real model: one process, same prompts, same weights.

    python bench.py                                   # SmolLM2-135M on data/bench_prompts.jsonl, shipped heads
    python bench.py --n_prompts=8 --max_new_tokens=64 --heads=runs/quick
    python bench.py --prompts=../shared/data/mt_bench.jsonl --sweep
    python bench.py --device=cuda --dtype=bfloat16 --compile

Prints a header with the conditions, the step-cost curve of this device next to the checkpoints'
calibration, one row per arm, speedup per prompt category, and as the last line of stdout one JSON
object. Every arm decodes greedily, so in float32 each must reproduce AR token for token (match 1.000).
"""
import ast
import itertools
import json
import math
import os
import platform
import sys
import time
from collections import Counter, namedtuple
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cerberus import Tree, generate, load_heads
from model import KVCache, cache_for, chat_prompt, load_smollm2
from train import (accuracy, calibrate, draft_costs, head_targets, parse_cli, print_entropy_curve,
                   step_costs, target_ranks, timed)

ROOT = os.path.dirname(os.path.abspath(__file__))
ARMS = ("ar", "medusa", "cerberus", "cerberus_nogate")
HEAD_SET = {"medusa": "medusa", "cerberus": "cerberus", "cerberus_nogate": "cerberus"}  # arm -> <name>.pt
STEP_SIZES = [1, 2, 3, 4, 8, 16, 32, 64]  # tokens per forward for the step-cost curve
STEP_PREFIX = 256  # cached tokens behind each of those forwards
SWEEP_THRESHOLDS = [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, math.inf]  # nats; the calibrated one is added


@dataclass
class BenchConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "float32"  # backbone dtype, "float32" or "bfloat16" (bf16 trees may flip near-ties: see match)
    compile: bool = False  # compile the decode steps (one static KV cache) and the heads: CUDA graphs on a GPU; untimed
    tree: str = ""  # "" = each checkpoint's calibrated tree; a preset ("chain2", "sparse16"); or paths "[(0,), (0, 0)]"
    max_new_tokens: int = 128
    n_prompts: int = 24  # taken round-robin over the categories (24 = 3 each of 8); 0 = every prompt
    prompts: str = ""  # "" = data/bench_prompts.jsonl; or any MT-Bench-format question.jsonl (first turns)
    heads: str = ""  # directory holding cerberus.pt and medusa.pt; "" = the shipped heads/
    arms: str = "ar,medusa,cerberus,cerberus_nogate"  # "ar" always runs: it is the baseline
    threshold: float = -1.0  # entropy gate of the cerberus arm in nats; -1 = the calibrated one
    gate_on: str = ""  # whose entropy the cerberus arm's gate reads: "" = the checkpoint's; "backbone" or "head1"
    draft_dtype: str = "bfloat16"  # heads and their lm_head copy; drafts change only the speed, never the output
    calibrate: bool = True  # choose each head set's tree and threshold from this device's step costs
    sweep: bool = False  # also run the cerberus arm over several gate thresholds
    out_dir: str = "out"  # where the sweep's PNG goes
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Inputs: prompts, arms, heads.

def load_prompts(path, tokenizer, n):
    """n questions (0 = all) of an MT-Bench-format file as [{"category", "ids"}]: first turns, chat
    template applied, taken round-robin over the categories so that any n covers them evenly. Every
    line is checked, so a malformed file fails before any timing."""
    if not os.path.isfile(path):
        raise ValueError(f"prompts file not found: {path}")
    questions = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                question = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_no}: not valid JSON ({e})") from e
            turns = question.get("turns") if isinstance(question, dict) else None
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                raise ValueError(f'{path}, line {line_no}: expected {{"category": ..., "turns": ["first turn", ...]}}')
            questions.append(question)
    if not questions:
        raise ValueError(f"{path} holds no questions")
    by_category = {}
    for q in questions:
        by_category.setdefault(q.get("category", "all"), []).append(q)
    spread = [q for rank in itertools.zip_longest(*by_category.values()) for q in rank if q is not None]
    return [{"category": q.get("category", "all"), "ids": chat_prompt(tokenizer, q["turns"][0])}
            for q in spread[:n or None]]


def parse_arms(spec):
    arms = [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; valid arms are {list(ARMS)}")
    return ["ar"] + [a for a in arms if a != "ar"]


def parse_tree(spec, gate):
    """Tree from --tree ("" = the checkpoint's calibrated one in `gate`, a preset name, or a path list)."""
    if not spec:
        return Tree(gate["tree"])
    return Tree(ast.literal_eval(spec)) if spec.lstrip().startswith("[") else Tree.preset(spec)


def recalibrate(head_sets, costs, lm_weight, tree=None):
    """Re-choose each head set's tree and gate threshold for the step costs measured here, from the
    held-out entropies and target ranks stored in its checkpoint (train.calibrate): a tree that
    pays on one device may lose on another. With `tree` (--tree) only the gate (signal, threshold) is
    chosen, for that tree. Returns new head sets (the checkpoints given are left as they were); head sets
    without that data keep their stored gate."""
    out = {}
    for name, (heads, ckpt) in head_sets.items():
        if "calibration" in ckpt:
            data = ckpt["calibration"]
            signals = {"backbone": data["entropy"].float()}
            if "head1_entropy" in data:  # heads trained before head-1 gates existed store only the backbone's
                signals["head1"] = data["head1_entropy"].float()
            gate = calibrate(data["ranks"], signals, costs, draft_costs(heads, lm_weight), tree)
            ckpt = {**ckpt, "gate": gate}
            print(f"  {name} re-calibrated here: tree of {len(gate['tree']) + 1} nodes, threshold "
                  f"{gate['threshold']:.3f} nats on {gate['gate_on']}, est. speedup {gate['est_speedup']:.2f}x")
            print_entropy_curve(gate["entropy_curve"], gate["threshold"])
        out[name] = (heads, ckpt)
    return out


def arm_kwargs(arm, cfg, head_sets, eos_id, lm_weight, cache=None):
    """generate() keyword arguments of one arm. Only the cerberus arm gates; the others always go parallel."""
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, eos_id=eos_id, cache=cache)
    if arm == "ar":
        return kwargs
    heads, ckpt = head_sets[HEAD_SET[arm]]
    gate = ckpt["gate"]
    threshold = math.inf  # medusa and cerberus_nogate: always a parallel step
    if arm == "cerberus":
        if cfg.gate_on not in ("", gate.get("gate_on", "backbone")) and cfg.threshold < 0:
            raise ValueError(f"--gate_on={cfg.gate_on} needs --threshold: the calibrated one ({gate['threshold']:.3f} "
                             f"nats) is for the {gate.get('gate_on', 'backbone')}'s entropy")
        threshold = gate["threshold"] if cfg.threshold < 0 else cfg.threshold
    return dict(kwargs, heads=heads, tree=parse_tree(cfg.tree, gate), gate_threshold=threshold,
                gate_on=cfg.gate_on or gate.get("gate_on", "backbone"), draft_weight=heads.draft_weight(lm_weight))


# ----------------------------------------------------------------------------------------------
# Measuring, with train.timed: one clock for everything; on GPU the queue is drained around it.

Generation = namedtuple("Generation", "ids stats seconds")


def prefill_seconds(model, ids, max_new_tokens, cache=None):
    """Time of what every generate() call does before decoding: allocate the cache (unless one is
    reused), one forward over the prompt."""
    prompt = torch.tensor([ids], device=model.embed.weight.device)
    return timed(lambda: model(prompt, cache_for(model, len(ids) + max_new_tokens + 1, cache)))[1]


def gate_never_fires(settings):
    """True when the cerberus arm's gate is off (threshold inf): cerberus_nogate would then repeat its
    every step, same heads and tree, and timing that twice would measure only the machine's noise."""
    return {"cerberus", "cerberus_nogate"} <= settings.keys() and settings["cerberus"]["gate_threshold"] == math.inf


def run_arms(model, prompts, settings):
    """{arm: [Generation per prompt]}. Whole generate() calls are timed (prefill included, identical
    across arms). Arms take turns on each prompt, so drift in machine load hits them all alike."""
    runs = {arm: [] for arm in settings}
    for prompt in tqdm(prompts, desc="/".join(settings), unit="prompt", file=sys.stderr):
        for arm, kwargs in settings.items():
            (ids, stats), seconds = timed(lambda: generate(model, prompt["ids"], **kwargs))
            runs[arm].append(Generation(ids, stats, seconds))
    return runs


def summarise(gens, baseline, prefill):
    """Pooled metrics of one arm over all prompts. Decode tok/s = new tokens / (generate time - prefill
    time); speedup = total AR time / total arm time (whole calls, what a user waits for)."""
    stats = [g.stats for g in gens]
    steps, new_tokens = sum(s.steps for s in stats), sum(s.new_tokens for s in stats)
    accepted = [n for s in stats for n in s.accept_lengths]  # one entry per parallel step
    decode_seconds = sum(g.seconds for g in gens) - sum(prefill)
    matches = sum(a == b for g, ref in zip(gens, baseline) for a, b in zip(g.ids, ref.ids))
    # A prefill timed slower than the whole call (e.g. one that compiled) would make decode time <= 0:
    # then there is no honest tok/s, and NaN says so rather than a huge number.
    return {"tok_s": new_tokens / decode_seconds if decode_seconds > 0 else math.nan,
            "speedup": sum(g.seconds for g in baseline) / sum(g.seconds for g in gens),
            "tau": new_tokens / max(steps, 1),
            "ms_per_step": 1e3 * decode_seconds / max(steps, 1) if decode_seconds > 0 else math.nan,
            "match_rate": matches / max(sum(len(g.ids) for g in baseline), 1),
            "ar_fraction": sum(s.ar_steps for s in stats) / max(steps, 1),
            "zero_accept": accepted.count(0) / len(accepted) if accepted else None,
            "accept_histogram": dict(sorted(Counter(accepted).items())),
            "new_tokens": new_tokens, "seconds": sum(g.seconds for g in gens)}


def head_accuracy(model, head_sets, lm_weight, prompts, ar_runs):
    """{head set: per-head top-1/top-5} on the AR answers to these very prompts: one forward per prompt
    gives the hidden state before each answer token, and head k should name the token k after it."""
    device, accuracies = model.embed.weight.device, {}
    for name, (heads, _) in head_sets.items():
        hidden, targets = [], []
        for prompt, run in zip(prompts, ar_runs):
            P = len(prompt["ids"])
            _, states = model(torch.tensor([prompt["ids"] + run.ids], device=device))
            hidden.append(states[0, P - 1:P - 1 + len(run.ids)])  # (A, C): row i predicts answer token i
            targets.append(head_targets(torch.tensor(run.ids, device=device), heads.n_heads))
        data = {"hidden": torch.cat(hidden), "targets": torch.cat(targets)}
        accuracies[name] = accuracy(target_ranks(heads, lm_weight, data, heads.n_heads))
    return accuracies


def report(runs, prompts, prefill):
    """summarise() per arm, plus speedup per prompt category."""
    categories = {}  # category -> indices of its prompts, in file order
    for i, prompt in enumerate(prompts):
        categories.setdefault(prompt["category"], []).append(i)
    seconds = {arm: [g.seconds for g in gens] for arm, gens in runs.items()}
    return {arm: dict(summarise(gens, runs["ar"], prefill),
                      by_category={c: sum(seconds["ar"][i] for i in idx) / sum(seconds[arm][i] for i in idx)
                                   for c, idx in categories.items()})
            for arm, gens in runs.items()}


PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]  # bytes/s


def roofline(model, card, ar, mean_context):
    """AR decode against the memory roofline of a known GPU (DESIGN §7), else None. One AR step reads
    every weight once (a tied lm_head is the embedding: one read) and the K/V of the context; at the
    card's peak bandwidth that gives the fastest possible tok/s, and the measured AR tok/s over it
    the MBU (model bandwidth utilisation)."""
    bandwidth = next((bw for name, bw in PEAK_BANDWIDTH if name in card), None)
    if bandwidth is None:
        return None
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied matrix counts once
    if not cfg.tie_embeddings:  # an untied embedding is only looked up, one row per token
        weights -= model.embed.weight.numel() * model.embed.weight.element_size()
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * model.embed.weight.element_size() * mean_context
    step_bytes = weights + kv
    return {"card": card, "peak_tb_s": bandwidth / 1e12, "bytes_per_ar_step": round(step_bytes),
            "ar_roofline_tok_s": round(bandwidth / step_bytes, 1), "ar_mbu": round(ar["tok_s"] * step_bytes / bandwidth, 4)}


# ----------------------------------------------------------------------------------------------
# Printing.

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = {}  # the first core's /proc/cpuinfo entries: a VM's "AMD EPYC" may be one generation or another
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name", platform.processor() or platform.machine())
    if "cpu family" in info:
        cpu += f" family {info['cpu family']} model {info.get('model', '?')}"
    bf16 = {"avx512_bf16", "amx_bf16"} & set(info.get("flags", "").split())  # without: no native bf16 matmul
    return (f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{torch.backends.cpu.get_cpu_capability()}{', bf16 in hardware' if bf16 else ''})")


def print_step_costs(costs, head_sets):
    """This device's cost of a T-token forward, and each checkpoint's calibration beside it: the
    calibrated tree and threshold only pay if the step costs here resemble those at training time."""
    print(f"step cost of one forward of T tokens on a {STEP_PREFIX}-token cache:")
    top = max(costs.values())
    print("\n".join(f"  T={T:<3d} {1e3 * s:8.2f} ms  {s / costs[1]:5.2f}x T=1  {'#' * round(40 * s / top)}"
                    for T, s in costs.items()))
    for name, (heads, ckpt) in head_sets.items():
        gate, n = ckpt["gate"], len(ckpt["gate"]["tree"]) + 1
        there = {int(k): v for k, v in gate.get("step_costs", {}).items()}
        ratio = lambda c: f"{c[n] / c[1]:.2f}x" if n in c and 1 in c else "?"  # noqa: E731
        spec = heads.spec
        kind = (f"{spec['kind']}, {spec['n_layers']} block(s)" + (", reads the root token" if spec["reads_root"] else "")
                + (", token link" if spec.get("link") == "token" else "")
                + f", drafts over {heads.n_draft_tokens} tokens")
        print(f"  {name} checkpoint ({kind}): tree of {n} nodes, threshold {gate['threshold']:.3f} nats (gate on "
              f"{gate.get('gate_on', 'backbone')}), est. speedup {gate.get('est_speedup', math.nan):.2f}x; "
              f"T={n} cost {ratio(there)} T=1 where it was calibrated, {ratio(costs)} here")


def print_tables(results, settings):
    print(f"{'arm':<16} {'nodes':>5} {'tok/s':>7} {'speedup':>8} {'tau':>5} {'ms/step':>7} {'match':>6} {'AR frac':>7} "
          f"{'0-accept':>8}  accept-length histogram")
    for arm, r in results.items():
        nodes = settings[arm]["tree"].n_nodes if "tree" in settings[arm] else 1
        zero = "-" if r["zero_accept"] is None else f"{r['zero_accept']:.3f}"
        print(f"{arm:<16} {nodes:>5} {r['tok_s']:7.2f} {r['speedup']:7.2f}x {r['tau']:5.2f} {r['ms_per_step']:7.2f} "
              f"{r['match_rate']:6.3f} {r['ar_fraction']:7.3f} {zero:>8}  {r['accept_histogram']}")
    for arm, r in results.items():
        if "same_as" in r:
            print(f"{arm} is {r['same_as']} here: the gate threshold is inf, so the gate never chooses AR and the "
                  "two arms are one computation, timed once")
    others = [arm for arm in results if arm != "ar"]
    print(f"speedup vs ar by category:\n  {'category':<14}" + "".join(f"{arm:>17}" for arm in others))
    for category in results["ar"]["by_category"]:
        print(f"  {category:<14}" + "".join(f"{results[arm]['by_category'][category]:16.2f}x" for arm in others))


def print_sweep(points, out_dir):
    """Text chart of tok/s and tau against the gate threshold; a PNG too when matplotlib is importable."""
    top = max(p["tok_s"] for p in points)
    print(f"gate sweep (cerberus heads): {'threshold':>9} {'tok/s':>7} {'tau':>5} {'AR frac':>7}")
    for p in points:
        bar = "#" * round(40 * p["tok_s"] / top)
        print(f"{'':28} {p['threshold']:>9} {p['tok_s']:7.2f} {p['tau']:5.2f} {p['ar_fraction']:7.3f}  {bar}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [p["threshold"] for p in points]  # categorical axis: inf has no place on a number line
    ax.plot(labels, [p["tok_s"] for p in points], "o-", label="tokens/s")
    ax.set_xlabel("gate threshold (nats; 0 = always AR, inf = always parallel)")
    ax.set_ylabel("decode tokens/s")
    ax.twinx().plot(labels, [p["tau"] for p in points], "s--", color="tab:orange", label="tau")
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(os.path.join(out_dir, "bench_sweep.png"), dpi=120, bbox_inches="tight")
    print(f"sweep plot: {os.path.join(out_dir, 'bench_sweep.png')}")


# ----------------------------------------------------------------------------------------------

def warm_up(model, prompt, settings):
    """{arm: seconds} of one short untimed generation per arm; with torch.compile, compiling happens here."""
    return {arm: timed(lambda: generate(model, prompt, **dict(kwargs, max_new_tokens=8)))[1]
            for arm, kwargs in settings.items()}


def sweep_gate(model, prompts, cerberus, prefill):
    """Pooled metrics of the cerberus arm at each gate threshold, against an AR run taken alongside."""
    thresholds = sorted(set(SWEEP_THRESHOLDS) | {cerberus["gate_threshold"]})
    arms = {f"{t:g}": dict(cerberus, gate_threshold=t) for t in thresholds}  # labels: JSON has no infinity
    runs = run_arms(model, prompts, {"ar": dict(max_new_tokens=cerberus["max_new_tokens"],
                                                eos_id=cerberus["eos_id"]), **arms})
    return [dict(summarise(runs[label], runs["ar"], prefill), threshold=label) for label in arms]


@torch.no_grad()
def bench(cfg, model=None, tokenizer=None, head_sets=None):
    """Run the arms of cfg on the same prompts; print the tables and the JSON line; return the JSON dict.

    model, tokenizer: default SmolLM2-135M-Instruct; "<|im_end|>" is the stop token.
    head_sets: {"medusa" | "cerberus": (heads, checkpoint dict with a "gate")}; default: cfg.heads/<name>.pt.
    The model and heads given are moved to cfg.device and cast in place, and compiled in place with cfg.compile.
    """
    arms = parse_arms(cfg.arms)  # fail before the slow loading
    if cfg.gate_on not in ("", "backbone", "head1"):
        raise ValueError(f"unknown gate_on {cfg.gate_on!r}: use 'backbone' (next-token entropy) or 'head1'")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={cfg.device}, but this PyTorch sees no CUDA GPU; use --device=cpu")
    torch.manual_seed(cfg.seed)
    device, dtype, draft_dtype = torch.device(cfg.device), getattr(torch, cfg.dtype), getattr(torch, cfg.draft_dtype)
    if model is None:
        model, tokenizer = load_smollm2()
    model = model.to(device, dtype).eval()
    prompts = load_prompts(cfg.prompts or os.path.join(ROOT, "data", "bench_prompts.jsonl"), tokenizer, cfg.n_prompts)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    if head_sets is None:
        needed = {HEAD_SET[a] for a in arms if a != "ar"} | ({"cerberus"} if cfg.sweep else set())
        head_dir = cfg.heads or os.path.join(ROOT, "heads")
        head_sets = {name: load_heads(os.path.join(head_dir, f"{name}.pt"), model) for name in sorted(needed)}
    head_sets = {name: (heads.to(device, draft_dtype), ckpt) for name, (heads, ckpt) in head_sets.items()}
    lm_weight = model.lm_head.weight.to(draft_dtype)  # what the heads draft through, cast once, not per call
    fixed_tree = parse_tree(cfg.tree, gate=None) if cfg.tree else None  # else each checkpoint's own
    sizes = sorted(set(STEP_SIZES) | {fixed_tree.n_nodes if fixed_tree else 1})  # trees are chosen among these
    cache = None  # with --compile: one static cache for every call, so compiled steps keep their shapes
    if cfg.compile:  # the backbone's decode steps, and the heads (a few dozen small ops per draft, eager)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        model.compile_steps(mode)
        for heads, _ in head_sets.values():
            heads.compile(mode=mode)
        longest = max(len(p["ids"]) for p in prompts) + cfg.max_new_tokens
        cache = KVCache(model.config, max(longest, STEP_PREFIX) + max(sizes), device=device, dtype=dtype, static=True)

    conditions = {"device": device_name(device), "dtype": cfg.dtype, "compile": cfg.compile,
                  "tree": cfg.tree or "calibrated", "n_prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens}
    print(f"bench | {' | '.join(f'{k} {v}' for k, v in conditions.items())} | drafts {cfg.draft_dtype} "
          f"| prompts {cfg.prompts or 'data/bench_prompts.jsonl'} | torch {torch.__version__}"
          + (f" | load avg {os.getloadavg()[0]:.1f}" if device.type == "cpu" else ""))
    if device.type == "cuda" and not cfg.compile:
        print("note: eager on a GPU launches every kernel from Python, one by one (the step costs below show "
              "what that costs here); --compile replays them as CUDA graphs, --n_prompts=4 waits less")
    setup_start = time.perf_counter()  # with --compile, compiling happens in the first calls below
    costs = step_costs(model, sizes, STEP_PREFIX, cache)
    print_step_costs(costs, head_sets)
    if cfg.calibrate:
        head_sets = recalibrate(head_sets, costs, lm_weight, fixed_tree)
    settings = {arm: arm_kwargs(arm, cfg, head_sets, eos_id, lm_weight, cache) for arm in arms}
    twins = gate_never_fires(settings)
    timed_settings = {arm: kw for arm, kw in settings.items() if not (twins and arm == "cerberus_nogate")}
    warm = warm_up(model, prompts[0]["ids"], timed_settings)
    setup_s = time.perf_counter() - setup_start
    print("warm-up, untimed: " + ", ".join(f"{arm} {s:.2f}s" for arm, s in warm.items())
          + f"; step costs, calibration and warm-up took {setup_s:.1f} s"
          + (", compiling included" if cfg.compile else ""))

    prefill = [prefill_seconds(model, p["ids"], cfg.max_new_tokens, cache) for p in prompts]
    print(f"prefill (a bare forward, once per prompt; subtracted for decode tok/s): "
          f"mean {1e3 * sum(prefill) / len(prefill):.1f} ms")
    runs = run_arms(model, prompts, timed_settings)
    results = report(runs, prompts, prefill)
    if twins:  # one computation, reported under both names
        results["cerberus_nogate"] = dict(results["cerberus"], same_as="cerberus")
        warm["cerberus_nogate"] = warm["cerberus"]
    print_tables(results, settings)
    heads_seen = head_accuracy(model, head_sets, lm_weight, prompts, runs["ar"])
    for name, acc in heads_seen.items():
        print(f"{name} heads on these prompts' AR answers, top-1 / top-5: "
              + "  ".join(f"{k} {a['top1']:.3f} / {a['top5']:.3f}" for k, a in acc.items()))
    mean_context = sum(len(p["ids"]) for p in prompts) / len(prompts) + results["ar"]["new_tokens"] / len(prompts) / 2
    roof = roofline(model, conditions["device"], results["ar"], mean_context)
    if roof:
        print(f"roofline ({roof['card']}, {roof['peak_tb_s']} TB/s): an AR step reads {roof['bytes_per_ar_step'] / 1e6:.1f} MB, "
              f"so AR could reach {roof['ar_roofline_tok_s']:.0f} tok/s; measured {results['ar']['tok_s']:.0f} (MBU {roof['ar_mbu']:.3f})")
    summary = dict(conditions, setup_s=round(setup_s, 1),
                   arms={arm: dict(r, warmup_s=warm[arm]) for arm, r in results.items()},
                   head_accuracy=heads_seen, roofline=roof)
    if cfg.sweep:
        summary["sweep"] = sweep_gate(model, prompts, arm_kwargs("cerberus", cfg, head_sets, eos_id, lm_weight, cache),
                                      prefill)
        print_sweep(summary["sweep"], cfg.out_dir)
    print(json.dumps(summary))  # last line of stdout
    return summary


def main(argv=None):
    bench(BenchConfig(**parse_cli(BenchConfig, sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
