"""Eager decode-step cost of this commit's one-graph step against the decode loop it replaced (commit
348c54d), in one process on the same weights, heads, prompts and tree, the two taking turns prompt by
prompt so that the machine's drift hits both alike. Greedy, float32, shipped Cerberus heads (bf16
drafts), the checkpoint's tree, threshold inf (every step a tree step) and plain AR.

    python results/step_glue_ab.py > results/step_glue_ab.txt

The old files are read from git into a temporary folder, so this runs only in a git checkout."""
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OLD = "348c54d"
old_dir = tempfile.mkdtemp()
for name in ("model", "cerberus", "train"):
    source = subprocess.run(["git", "-C", ROOT, "show", f"{OLD}:{name}.py"], capture_output=True, text=True,
                            check=True).stdout
    for module in ("model", "cerberus"):
        source = source.replace(f"from {module} import", f"from old_{module} import")
    open(os.path.join(old_dir, f"old_{name}.py"), "w").write(source)
sys.path.insert(0, old_dir)

import old_cerberus  # noqa: E402
import old_model  # noqa: E402
import old_train  # noqa: E402
from bench import load_prompts  # noqa: E402
from cerberus import Decoder, Tree, load_heads  # noqa: E402
from model import load_smollm2  # noqa: E402


@torch.no_grad()
def main(n_prompts=8, max_new_tokens=96, rounds=3):
    new_model, tokenizer = load_smollm2()
    old_model_, _ = old_model.load_smollm2()
    heads, ckpt = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), new_model)
    old_heads, _ = old_train.load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), old_model_)
    heads, old_heads = heads.to(torch.bfloat16), old_heads.to(torch.bfloat16)
    tree_paths = ckpt["gate"]["tree"]
    prompts = load_prompts(os.path.join(ROOT, "..", "shared", "data", "mt_bench.jsonl"), tokenizer, n_prompts)
    eos = tokenizer.encode("<|im_end|>", allowed_special="all")[0]
    max_len = max(len(p["ids"]) for p in prompts) + max_new_tokens + 8
    draft_weight = old_heads.draft_weight(old_model_.lm_head.weight).to(torch.bfloat16)
    arms = {
        "new AR": lambda ids, d=Decoder(new_model, max_len=max_len): d.generate(ids, max_new_tokens, eos_id=eos),
        "old AR": lambda ids: old_cerberus.generate(old_model_, ids, max_new_tokens, eos_id=eos),
        "new tree": lambda ids, d=Decoder(new_model, heads, Tree(tree_paths), max_len=max_len):
            d.generate(ids, max_new_tokens, eos_id=eos),
        "old tree": lambda ids: old_cerberus.generate(old_model_, ids, max_new_tokens, heads=old_heads,
                                                      tree=old_cerberus.Tree(tree_paths), eos_id=eos,
                                                      draft_weight=draft_weight),
    }
    for arm in arms.values():  # warm-up
        arm(prompts[0]["ids"])
    ms_per_step = {name: [] for name in arms}
    outputs = {}
    print(f"# {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.2f} at start; "
          f"tree {tree_paths}; {n_prompts} MT-Bench first turns x {max_new_tokens} tokens x {rounds} rounds")
    for r in range(rounds):
        seconds, steps = {name: 0.0 for name in arms}, {name: 0 for name in arms}
        for prompt in prompts:
            for name, arm in arms.items():
                start = time.perf_counter()
                ids, stats = arm(prompt["ids"])
                seconds[name] += time.perf_counter() - start
                steps[name] += stats.steps
                outputs.setdefault(name, []).append(ids)
        for name in arms:
            ms_per_step[name].append(1e3 * seconds[name] / steps[name])
        print(f"round {r + 1}: " + ", ".join(f"{name} {ms_per_step[name][-1]:.2f}" for name in arms)
              + f" ms/step (prefill included); load avg {os.getloadavg()[0]:.2f}")
    same = all(outputs[f"new {kind}"] == outputs[f"old {kind}"] for kind in ("AR", "tree"))
    print(f"same tokens, old and new: {same}")
    for kind in ("AR", "tree"):
        new, old = (statistics.median(ms_per_step[f"{age} {kind}"]) for age in ("new", "old"))
        print(f"{kind:4s} step, median of rounds: new {new:.2f} ms, old {old:.2f} ms, new/old {new / old:.3f}")


if __name__ == "__main__":
    main()
