"""Where the time of a decode step goes, inside the real loop: wrap the pieces `cerberus.generate`
calls with timers, then decode MT-Bench prompts with plain AR and with the shipped Cerberus heads
(4-node tree, no gate, bfloat16 drafts: the benchmark's setting here), the two taking turns per prompt.

    python results/step_profile.py > results/step_profile.txt

Per decode step (prefill excluded): the backbone forward, the drafts (heads + lm_head), propose,
verify, the cache's keep, and the rest of the loop (argmax, tree mask, tolist, Python).
"""
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cerberus  # noqa: E402
from bench import load_prompts  # noqa: E402
from cerberus import Tree, generate  # noqa: E402
from model import KVCache, load_smollm2  # noqa: E402
from cerberus import load_heads  # noqa: E402

N_PROMPTS, MAX_NEW_TOKENS = 8, 128
seconds = defaultdict(float)


def timed_as(name, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[name] += time.perf_counter() - t0
        return out
    return wrapper


def main():
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    heads, ckpt = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)
    heads = heads.to(torch.bfloat16)
    draft_weight = heads.draft_weight(model.lm_head.weight).to(torch.bfloat16)
    tree = Tree([(0,), (1,), (0, 0)])  # what the benchmark calibrated to on this CPU
    prompts = load_prompts(os.path.join(ROOT, "..", "shared", "data", "mt_bench.jsonl"), tokenizer, N_PROMPTS)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]

    forward = model.forward
    model.forward = timed_as("forward", forward)
    cerberus.head_logits = timed_as("drafts", cerberus.head_logits)
    cerberus.propose = timed_as("propose", cerberus.propose)
    cerberus.verify = timed_as("verify", cerberus.verify)
    KVCache.keep = timed_as("keep", KVCache.keep)
    arms = {"ar": {}, "cerberus": dict(heads=heads, tree=tree, draft_weight=draft_weight)}
    totals = {arm: defaultdict(float) for arm in arms}
    generate(model, prompts[0]["ids"], 8, **arms["cerberus"])  # warm-up
    for prompt in prompts:
        for arm, kwargs in arms.items():
            seconds.clear()
            ids = torch.tensor([prompt["ids"]])
            model(ids, KVCache(model.config, ids.shape[1] + 1))  # a bare prefill, to subtract
            prefill = seconds["forward"]
            seconds.clear()
            t0 = time.perf_counter()
            _, stats = generate(model, prompt["ids"], MAX_NEW_TOKENS, eos_id=eos_id, **kwargs)
            seconds["generate"] = time.perf_counter() - t0
            seconds["forward"] -= prefill  # the prefill is generate's first forward
            seconds["generate"] -= prefill
            for key, value in seconds.items():
                totals[arm][key] += value
            totals[arm]["steps"] += stats.steps
            totals[arm]["tokens"] += stats.new_tokens
    print(f"{N_PROMPTS} MT-Bench prompts x {MAX_NEW_TOKENS} tokens, float32 backbone, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ms per decode step (prefill subtracted)")
    parts = ["forward", "drafts", "propose", "verify", "keep"]
    print(f"{'arm':<9} {'steps':>5} {'tau':>5} " + " ".join(f"{p:>8}" for p in parts) + f" {'rest':>8} {'step':>8}")
    for arm, t in totals.items():
        per_step = {p: 1e3 * t[p] / t["steps"] for p in parts + ["generate"]}
        rest = per_step["generate"] - sum(per_step[p] for p in parts)
        print(f"{arm:<9} {int(t['steps']):>5} {t['tokens'] / t['steps']:5.2f} "
              + " ".join(f"{per_step[p]:8.2f}" for p in parts) + f" {rest:8.2f} {per_step['generate']:8.2f}")


if __name__ == "__main__":
    main()
