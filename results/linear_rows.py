"""Why a CPU may calibrate 2-node trees: the cost of the backbone's linear layers against the rows (tokens) of
a decode step. Every product of SmolLM2's 30 blocks (qkv, o_proj, gate_up, down_proj; 425 MB of float32
weights, far past any cache) at 1-8 rows, three ways:
  model.linear  what the model runs: W @ x.T, one row doubled to two
  F.linear      x @ W.T, MKL's float32 kernel as PyTorch calls it
  oneDNN        torch.ops.mkldnn._linear_pointwise on weights packed for it in advance (what inductor's CPU
                freezing uses; an internal op, tried here as the alternative and not used by the model)
Times are the fastest of 5 rounds, each one pass over the 30 blocks, in ms. Then the question that decides it,
on whole forwards (attention, norms and the lm_head included; train.step_costs: the sizes take turns, fastest of
7 rounds): a step of T tokens with model.linear everywhere, then with the hybrid (oneDNN from 3 rows, model.linear
below), then model.linear again to show the machine's drift. Nothing else should run.
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
import model as backbone  # noqa: E402
from model import linear, load_smollm2  # noqa: E402
from train import step_costs  # noqa: E402

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


def onednn(x, packed_weight):
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [None], "")


def whole_steps(model):
    """{arm: {T: seconds}} of whole forwards of T tokens: model.linear everywhere, then the hybrid, which
    patches backbone.Linear.forward for the call (weights packed once, for 4 rows) and puts it back."""
    sizes = list(ROWS)
    costs = {"model.linear": step_costs(model, sizes)}
    layers = [m for m in model.modules() if isinstance(m, backbone.Linear)]  # the blocks' and the lm_head
    packed = {m: torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 4) for m in layers}
    plain = backbone.Linear.forward

    def hybrid(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] < 3:
            return plain(self, x)
        return onednn(rows.contiguous(), packed[self]).reshape(*x.shape[:-1], -1)

    backbone.Linear.forward = hybrid
    try:
        costs["hybrid"] = step_costs(model, sizes)
    finally:
        backbone.Linear.forward = plain
    costs["model.linear, again"] = step_costs(model, sizes)  # the machine's drift over the three
    return costs


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
    if "oneDNN" not in table:
        return
    print("whole forwards of T tokens on a 256-token cache, ms (lm_head and attention included):")
    costs = whole_steps(model)
    print(f"{'T':>20}" + "".join(f"{r:>8}" for r in ROWS))
    for name, times in costs.items():
        print(f"{name:>20}" + "".join(f"{1e3 * times[r]:8.2f}" for r in ROWS))
    one = min(costs["model.linear"][1], costs["model.linear, again"][1])
    print("each against model.linear at T=1 (an AR step), the faster of its two runs:")
    for name, times in costs.items():
        print(f"{name:>20}" + "".join(f"{times[r] / one:7.2f}x" for r in ROWS))
    print(f"load avg {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
