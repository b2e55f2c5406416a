"""Why a CPU may calibrate 2-node trees: the cost of the backbone's linear layers against the rows (tokens) of
a decode step. Every product of SmolLM2's 30 blocks (qkv, o_proj, gate_up, down_proj; 425 MB of float32
weights, far past any cache) at 1-8 rows, three ways:
  model.linear  what the model runs: W @ x.T, one row doubled to two
  F.linear      x @ W.T, MKL's float32 kernel as PyTorch calls it
  oneDNN        torch.ops.mkldnn._linear_pointwise on weights packed for it in advance (what inductor's CPU
                freezing uses; an internal op, tried here as the alternative and not used by the model)
Times are the fastest of 5 rounds, each one pass over the 30 blocks, in ms; nothing else should run.
    python results/linear_rows.py > results/linear_rows.txt
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "results"))
from cpu_info import cpu_info  # noqa: E402
from model import linear, load_smollm2  # noqa: E402

ROWS = (1, 2, 3, 4, 6, 8)


def layer_weights(model):
    """[(out, in) float32 weight] of every linear layer in the blocks, in the order a forward reads them."""
    return [m.weight for block in model.blocks for m in
            (block.attn.qkv, block.attn.o_proj, block.mlp.gate_up, block.mlp.down_proj)]


def pass_ms(product, weights, rows, rounds=5):
    """Fastest of `rounds` passes over the weights, each a (rows, in) @ weight.T product, in ms."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    best = float("inf")
    for _ in range(rounds + 1):  # the first pass warms up
        start = time.perf_counter()
        for w in weights:
            product(inputs[w.shape[1]], w)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main():
    info = cpu_info()
    print(f"{info.get('model name', '?')}, family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.2f}")
    torch.manual_seed(0)
    model, _ = load_smollm2()
    weights = layer_weights(model)
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    print(f"{len(weights)} products a forward, {megabytes:.0f} MB of float32 weights; ms per forward's products:")
    print(f"{'rows':>14}" + "".join(f"{r:>8}" for r in ROWS))
    table = {"model.linear": [pass_ms(linear, weights, r) for r in ROWS],
             "F.linear": [pass_ms(F.linear, weights, r) for r in ROWS]}
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        def onednn(x, packed_weight):
            return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [None], "")
        x = torch.randn(4, weights[0].shape[1])
        packed = torch.ops.mkldnn._reorder_linear_weight(weights[0], 4)
        torch.testing.assert_close(onednn(x, packed), F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)  # same product
        table["oneDNN"] = []
        for r in ROWS:  # packed for this many rows, as inductor packs for a known batch
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, r) for w in weights]  # same shapes as weights
            table["oneDNN"].append(pass_ms(onednn, packed, r))
    for name, times in table.items():
        print(f"{name:>14}" + "".join(f"{t:8.2f}" for t in times))
    two = table["model.linear"][ROWS.index(2)]
    print("each against model.linear at 2 rows (a 2-node tree step):")
    for name, times in table.items():
        print(f"{name:>14}" + "".join(f"{t / two:7.2f}x" for t in times))


if __name__ == "__main__":
    main()
