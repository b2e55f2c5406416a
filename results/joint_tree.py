"""Trees grown from the heads' joint acceptance vs from per-head accuracies (Tree.best assumes heads
are right independently), scored by tau on held-out positions: the shipped Cerberus heads'
calibration ranks, first half to grow the joint tree, second half to score both.
    python results/joint_tree.py > results/joint_tree.txt"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cerberus import Tree  # noqa: E402
from train import accepted_lengths  # noqa: E402


def reach(ranks, path):
    """How many positions accept every node of this path."""
    ok = torch.ones(len(ranks), dtype=torch.bool)
    for k, r in enumerate(path):
        ok &= ranks[:, k] == r
    return int(ok.sum())


def joint_best(ranks, n_nodes, max_rank=10):
    """Grow best-first by the measured count of positions that reach each candidate node."""
    chosen, frontier = [], {(r,): reach(ranks, (r,)) for r in range(max_rank)}
    while frontier and len(chosen) < n_nodes - 1:
        path = max(frontier, key=frontier.get)
        frontier.pop(path)
        chosen.append(path)
        if len(path) < ranks.shape[1]:
            frontier.update({path + (r,): reach(ranks, path + (r,)) for r in range(max_rank)})
    return Tree(chosen)


def main():
    checkpoint = torch.load(os.path.join(ROOT, "heads", "cerberus.pt"), weights_only=False, map_location="cpu")
    ranks = checkpoint["calibration"]["ranks"].long()
    grow, score = ranks[:len(ranks) // 2], ranks[len(ranks) // 2:]
    print(f"{len(ranks)} held-out positions; tau on the second half (accuracy table from all of them)")
    for n in (4, 8, 16, 32, 64):
        independent, joint = Tree.best(checkpoint["gate"]["accuracy_table"], n), joint_best(grow, n)
        tau = {name: 1 + accepted_lengths(score, t).float().mean().item() for name, t in (("independent", independent), ("joint", joint))}
        print(f"  {n:2d} nodes: Tree.best {tau['independent']:.3f} (depth {independent.max_depth}), "
              f"joint {tau['joint']:.3f} (depth {joint.max_depth})")


if __name__ == "__main__":
    main()
