"""Which distribution should the gate read (the paper does not say)? The backbone's next-token
entropy (what the shipped heads calibrate on) against head 1's own entropy, on the AR answers to the
project's 48 benchmark prompts (128 tokens each), with the shipped Cerberus heads.

For each signal, train.calibrate picks the threshold that maximises estimated tokens/s for the step
costs measured here, for a fixed tree (4 nodes: what this CPU picks; 8 and 16: trees that cost 2-3
AR steps here, where a gate has work to do), and prints drafts accepted by signal bin. Estimates
from target ranks, as in calibration: the benchmark then measures what a threshold really gives.

    python results/gate_signal.py > results/gate_signal.txt
"""
import os
import sys

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import load_prompts  # noqa: E402
from cerberus import Tree, entropy, generate, load_heads  # noqa: E402
from model import load_smollm2  # noqa: E402
from train import (accepted_lengths, calibrate, draft_costs, head1_entropy, head_targets,  # noqa: E402
                   print_entropy_curve, step_costs, target_ranks)


@torch.no_grad()
def main():
    model, tokenizer = load_smollm2()
    heads, ckpt = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)
    heads = heads.to(torch.bfloat16)  # drafts in bfloat16, as the benchmark runs them on this CPU
    lm_weight = model.lm_head.weight.to(torch.bfloat16)
    prompts = load_prompts(os.path.join(ROOT, "data", "bench_prompts.jsonl"), tokenizer, 0)
    eos_id = tokenizer.encode("<|im_end|>", allowed_special="all")[0]

    hidden, next_logits, targets = [], [], []
    for prompt in tqdm(prompts, desc="AR answers", file=sys.stderr):
        answer, _ = generate(model, prompt["ids"], 128, eos_id=eos_id)
        P = len(prompt["ids"])
        logits, states = model(torch.tensor([prompt["ids"] + answer]))
        rows = slice(P - 1, P - 1 + len(answer))  # row i predicts answer token i (the root)
        hidden.append(states[0, rows])
        next_logits.append(logits[0, rows])
        targets.append(head_targets(torch.tensor(answer), heads.n_heads))
    data = {"hidden": torch.cat(hidden), "targets": torch.cat(targets)}
    ranks = target_ranks(heads, lm_weight, data, heads.n_heads)
    signals = {"backbone": entropy(torch.cat(next_logits)), "head1": head1_entropy(heads, lm_weight, data)}

    costs = step_costs(model, [1, 4, 8, 16])
    drafting = draft_costs(heads, lm_weight)
    print(f"{len(prompts)} project prompts, {len(ranks)} AR answer positions, shipped Cerberus heads, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("step costs: " + ", ".join(f"T={T} {1e3 * s:.2f} ms" for T, s in costs.items())
          + "; drafts: " + ", ".join(f"{d} heads {1e3 * s:.2f} ms" for d, s in drafting.items()))
    trees = {"4 nodes (calibrated)": Tree(ckpt["gate"]["tree"]), "sparse8": Tree.preset("sparse8"),
             "sparse16": Tree.preset("sparse16")}
    for tree_name, tree in trees.items():
        gain = 1 + accepted_lengths(ranks, tree).float()
        ungated = float(gain.mean()) * costs[1] / (costs[tree.n_nodes] + drafting[tree.max_depth])
        print(f"\n== tree {tree_name}: no gate, est. speedup {ungated:.3f}x, tau {float(gain.mean()):.2f}")
        for gate_on, signal in signals.items():  # calibrate prices the drafts into a head-1 gate's AR steps
            key = "entropy" if gate_on == "backbone" else "head1_entropy"
            gate = calibrate({"ranks": ranks, key: signal}, costs, drafting, tree)
            print(f"{gate_on + ' entropy':>17}: best threshold {gate['threshold']:.3f} nats, est. speedup "
                  f"{gate['est_speedup']:.3f}x, est. tau of parallel steps {gate['est_tau_parallel']:.2f}")
            print_entropy_curve(gate["entropy_curve"], gate["threshold"])


if __name__ == "__main__":
    main()
