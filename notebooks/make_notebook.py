"""Builds cerberus_step_by_step.ipynb from the cells below, so that the notebook's source is plain Python
that reads (and diffs) well; the .ipynb is committed with its outputs so that it reads on a repository page.

    python notebooks/make_notebook.py            # rewrite the notebook, outputs cleared
    python notebooks/make_notebook.py --execute  # rewrite it and run it top to bottom, outputs kept

Each cell is tagged with its section (s0..s6): tests/test_notebook.py counts the pictures per section.
"""
import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "cerberus_step_by_step.ipynb")
CELLS = []


def md(section, text):
    CELLS.append(("markdown", section, text.strip("\n")))


def code(section, text):
    CELLS.append(("code", section, text.strip("\n")))


# ---------------------------------------------------------------------------------------------------
md("s0", r"""
# Cerberus, step by step

Cerberus (Liu et al., arXiv 2410.13344) speeds up decoding with two additions to a language model:
**draft heads** that guess the next few tokens from the model's last hidden state, and an **entropy
gate** that skips the guessing when the model is unsure. This notebook watches it work on the packaged
SmolLM2-135M-Instruct with the heads shipped in `heads/`:

1. one AR step, then one tree step, taken apart;
2. a whole answer, every token coloured by how it came, and the gate along it;
3. the heads: how often they guess right, by depth and by task, and Medusa's heads beside them;
4. how the machine's cost per forward decides the tree;
5. exactness: the output is plain AR's, greedy or sampled;
6. exercises with the knobs.

Every decode goes through the project's own API (`generate`, `Decoder` in `cerberus.py`); the notebook only
looks at what comes back. It runs top to bottom in about two minutes on the project's 2-core CPU (the last
cell prints how long it took), and `tests/test_notebook.py` runs it in CI. Opening it needs `matplotlib` and
Jupyter (`pip install -r requirements.txt` brings the kernel; add `notebook` or `jupyterlab` to browse it).
""")

code("s0", r"""
%matplotlib inline
import json, os, sys, time
notebook_start = time.perf_counter()
ROOT = os.path.dirname(os.getcwd()) if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
sys.path.insert(0, ROOT)  # model.py and cerberus.py live in the repository's root

import matplotlib.pyplot as plt
import torch

from cerberus import Decoder, Tree, entropy, generate, head_logits, load_heads, propose
from model import KVCache, chat_prompt, load_smollm2

torch.set_grad_enabled(False)  # we only decode: no autograd graphs
# One thread: on a shared 2-core machine, a second OpenMP thread that waits for a busy core stalls every small
# op (a 24-token answer took 30 s instead of 1 s beside other jobs). Tokens and tau do not depend on it.
torch.set_num_threads(1)
plt.rcParams.update({"figure.dpi": 64, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
""")

code("s0", r"""
model, tok = load_smollm2()  # float32, on the CPU; tok is a tiktoken.Encoding
eos = tok.encode("<|im_end|>", allowed_special="all")[0]
heads, ckpt = load_heads(os.path.join(ROOT, "heads", "cerberus.pt"), model)
medusa, medusa_ckpt = load_heads(os.path.join(ROOT, "heads", "medusa.pt"), model)
shipped = Tree(ckpt["gate"]["tree"])  # the tree the training run calibrated for its own CPU
acc = ckpt["gate"]["accuracy_table"]  # acc[d][r]: how often head d+1's rank-r guess was right, held out
print(heads.spec, "| shipped tree:", shipped.paths, "| gate threshold:", ckpt["gate"]["threshold"])


def show(t):
    # One token as a label: quoted, newlines escaped; '$' escaped so that matplotlib prints it as is
    return repr(tok.decode([t])).replace("$", r"\$")


def token_ids(h, columns):
    # The heads may draft over a smaller vocabulary: heads.vocab maps a logit column to its token id
    return columns if h.vocab is None else h.vocab[columns]
""")

# ---------------------------------------------------------------------------------------------------
md("s1", r"""
## 1. One AR step, then one tree step

**An AR step.** The backbone reads everything so far and returns a distribution over the next token;
greedy decoding takes its most likely token. One forward of the whole network buys one token. How spread
out that distribution is (its entropy, in nats) is what the gate will read in section 2.
""")

code("s1", r"""
prompt = chat_prompt(tok, "What makes a good cup of coffee?")
logits, hidden = model(torch.tensor([prompt]))  # (1, T, V) and (1, T, C): every position at once
top = logits[0, -1].softmax(-1).topk(8)
fig, ax = plt.subplots(figsize=(6, 2.2))
ax.barh([show(t) for t in top.indices.tolist()][::-1], top.values.tolist()[::-1], color="tab:blue")
ax.set_xlabel("probability")
ax.set_title(f"the next token after the prompt (entropy {float(entropy(logits[0, -1])):.2f} nats)")
plt.show()
""")

md("s1", r"""
**A tree step.** The token the backbone just chose is the *root*. The heads read the backbone's last hidden
state (these heads also read the root) and guess further: head 1 the token after the root, head 2 the one
after that, and so on, each as a ranked list. A *tree* says which guesses to check: the path `(0, 1)` is
head 1's best guess followed by head 2's second best. Here we use a 10-node tree grown from the checkpoint's
accuracy table (`Tree.best` keeps the most likely paths).

We take a `Decoder` through the prompt and one AR step (threshold 0 makes every step AR), then run one
tree step by hand with `decoder.step(True)`. First, what the heads guess from that state:
""")

code("s1", r"""
tree = Tree.best(acc, 10)
decoder = Decoder(model, heads, tree, max_len=len(prompt) + 64)
so_far, _ = decoder.generate(prompt, 1, gate_threshold=0.0)  # prefill, then one AR step
L, root = int(decoder.length), int(decoder.root)  # committed tokens; the root, not in the cache yet
drafts = decoder.draft()  # (depth, D) draft logits of heads 1..depth
print(f"answer so far {tok.decode(so_far)!r}, {L} tokens committed, root {show(root)}")
for k, row in enumerate(drafts.softmax(-1)):
    guess = row.topk(3)
    names = [f"{show(int(t))} ({p:.2f})" for p, t in zip(guess.values.tolist(), token_ids(heads, guess.indices))]
    print(f"head {k + 1}:", ", ".join(names))
""")

md("s1", r"""
Now the step: `propose` fills the tree's nodes with those guesses, **one forward** of the backbone runs over
all nodes at once (each node sees the committed tokens and its own ancestors, nothing else), and `verify`
accepts the deepest node whose every token is what the backbone itself would have chosen after its parent.
The backbone's own choice after that node is the **bonus token**: it becomes the next step's root. When no draft
is right, the root alone is accepted and the step yields one token, as an AR step would (about half of the tree
steps on MT-Bench with the shipped heads).
""")

code("s1", r"""
packed, _ = decoder.step(True)  # propose -> verify (one forward) -> keep
n_new, best, _, *nodes = packed.tolist()  # tokens committed, accepted node, gate's next choice, node tokens
path = tree.on_path[best]  # the accepted nodes, root..best
bonus = int(decoder.root)  # the backbone's token after the last accepted node: the next root
assert nodes == propose(drafts, torch.tensor([root]), tree, heads.vocab).tolist()  # the tree the heads filled
print(f"accepted nodes {path}: {tok.decode([nodes[i] for i in path])!r} ({n_new} token{'s' * (n_new > 1)} "
      f"from one forward), then the bonus {show(bonus)}")
""")

code("s1", r"""
def layout(tree):
    # Vertical position of each node: leaves one apart in depth-first order, a parent amid its children
    children = [[] for _ in range(tree.n_nodes)]
    for i, parent in enumerate(tree.parents.tolist()[1:], 1):
        children[parent].append(i)
    y, leaves = [0.0] * tree.n_nodes, [0]

    def place(i):
        for c in children[i]:
            place(c)
        if children[i]:
            y[i] = sum(y[c] for c in children[i]) / len(children[i])
        else:
            y[i], leaves[0] = leaves[0], leaves[0] + 1
    place(0)
    return y


def draw_tree(ax, tree, tokens=None, path=(), bonus=None):
    # Nodes by depth (x); with tokens, each node is labelled with its draft; path in green, bonus in orange
    y, depth, parents = layout(tree), tree.depth.tolist(), tree.parents.tolist()
    for i in range(1, tree.n_nodes):
        on = i in path
        ax.plot([depth[parents[i]], depth[i]], [y[parents[i]], y[i]], color="tab:green" if on else "0.7",
                lw=2.5 if on else 1, zorder=1)
    for i in range(tree.n_nodes):
        if tokens is None:
            ax.scatter(depth[i], y[i], s=12, color="tab:green" if i in path else "0.3", zorder=2)
        else:
            ax.text(depth[i], y[i], show(tokens[i]), ha="center", va="center", fontsize=8, zorder=2,
                    bbox=dict(boxstyle="round", fc="#c7e9c0" if i in path else "white",
                              ec="tab:green" if i in path else "0.6"))
    if bonus is not None:  # drawn one column right of the deepest node, linked to the accepted node
        x = tree.max_depth + 1
        ax.plot([depth[path[-1]], x], [y[path[-1]]] * 2, ls="--", color="tab:orange", zorder=1)
        ax.text(x, y[path[-1]], show(bonus), ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", fc="#fdd0a2", ec="tab:orange", ls="--"))
    ax.set_xlim(-0.7, tree.max_depth + (1.7 if bonus is not None else 0.7))
    ax.set_ylim(max(y) + 0.7, -0.7)
    ax.set_xticks(range(tree.max_depth + 1), ["root"] + [f"head {d}" for d in range(1, tree.max_depth + 1)])
    ax.set_yticks([])
""")

code("s1", r"""
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw=dict(width_ratios=[1, 1.5]))
draw_tree(a, tree, nodes, path, bonus)
a.set_title("the tree: accepted path in green, the bonus token in orange")
mask = tree.mask(L, L + tree.n_nodes)  # (N, L + N) bool: every committed slot | the node's own ancestors
shown = 6  # the last few committed slots; the ones before them look the same (all True)
b.imshow(mask[:, L - shown:], cmap="Blues", aspect="auto", interpolation="nearest")
b.axvline(shown - 0.5, color="tab:red")
b.set_yticks(range(tree.n_nodes), [f"{i}: {show(t)}" for i, t in enumerate(nodes)], fontsize=8)
slots = [f"L-{shown - j}" for j in range(shown)] + list(range(tree.n_nodes))
b.set_xticks(range(len(slots)), slots, fontsize=7)
b.set_xlabel(f"cache slot: committed tokens (L = {L}, the last {shown} shown) | tree nodes 0..{tree.n_nodes - 1}")
b.set_title("tree attention mask (dark = may attend)")
plt.show()
""")

md("s1", r"""
**Keep.** The forward wrote the K/V of node *i* into cache slot `L + i`. Only the accepted path stays: `keep`
copies the path's slots down to `L, L+1, ...` in every layer (a rejected slot is simply overwritten later).
Below, the moves of this step, and a check that the kept K/V are exactly what a plain forward of the accepted
tokens would have written.
""")

code("s1", r"""
fig, ax = plt.subplots(figsize=(11, 1.9))
for i, t in enumerate(nodes):  # top row: after the forward, slot L+i holds node i
    ax.text(i, 1, show(t), ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="square", fc="#c7e9c0" if i in path else "white", ec="0.5"))
for j in range(tree.n_nodes):  # bottom row: after keep, the path packed right after the committed tokens
    kept = j < len(path)
    ax.text(j, 0, show(nodes[path[j]]) if kept else "stale", ha="center", va="center", fontsize=8,
            color="black" if kept else "0.6", bbox=dict(boxstyle="square", fc="#c7e9c0" if kept else "0.95", ec="0.5"))
    if kept:
        ax.annotate("", (j, 0.25), (path[j], 0.75), arrowprops=dict(arrowstyle="->", color="tab:green"))
ax.set_xticks(range(tree.n_nodes), [f"L+{i}" for i in range(tree.n_nodes)])
ax.set_yticks([0, 1], ["after keep", "after the forward"])
ax.set_xlim(-0.6, tree.n_nodes - 0.4)
ax.set_ylim(-0.5, 1.5)
ax.set_title(f"keep: the K/V of nodes {path} move to slots L..L+{len(path) - 1} (L = {L}), in every layer")
plt.show()

plain = KVCache(model.config, decoder.cache.max_len)
plain.k.copy_(decoder.cache.k)
plain.v.copy_(decoder.cache.v)  # slots below L are the committed tokens, untouched by the step
plain.length = L
model(torch.tensor([[nodes[i] for i in path]]), plain)  # plain causal forward: writes slots L..L+n_new-1
kept = slice(L, L + n_new)
diff = max(float((decoder.cache.k[:, :, :, kept] - plain.k[:, :, :, kept]).abs().max()),
           float((decoder.cache.v[:, :, :, kept] - plain.v[:, :, :, kept]).abs().max()))
print(f"kept K/V against a plain forward of the accepted tokens: largest difference {diff:.1e}")
""")

# ---------------------------------------------------------------------------------------------------
md("s2", r"""
## 2. A whole answer

Now the full loop with the shipped tree. The shipped calibration set the gate's threshold to infinity
(on its CPU a tree step costs about what an AR step costs, so it always pays to guess); we set 2 nats, about
the 70th percentile of the entropies in the checkpoint's calibration data, to watch the gate choose.

**How each token is coloured.** Every forward of the backbone chooses exactly one token itself; accepted
drafts come on top. A tree step emits its root first, but the root was chosen by the *previous* forward, so
we colour each token by the forward that chose it:
- blue, **AR**: chosen by an AR step (or by the prefill, for the first token);
- orange, **bonus**: chosen by a tree step after its last accepted node (it is emitted as the next step's root);
- green, **draft**: guessed by a head and accepted by verification.

So tokens per forward (tau) = (blue + orange + green) / (blue + orange).
""")

code("s2", r"""
threshold = 2.0  # nats: above it the next step is an AR step
ids, stats = generate(model, prompt, 100, heads=heads, tree=shipped, gate_threshold=threshold, eos_id=eos, trace=True)
kinds, chosen_by = [], "AR"  # the first root was chosen by the prefill, an AR forward
for step in stats.trace:  # step["emitted"]: the root, then the accepted drafts
    kinds += [chosen_by] + ["draft"] * (len(step["emitted"]) - 1)
    chosen_by = "AR" if step["tree"] is None else "bonus"
print(f"{len(ids)} tokens in {stats.steps} forwards, {stats.ar_steps} of them AR: tau {stats.tokens_per_step:.2f}; "
      f"drafts accepted per tree step: {stats.accept_histogram}")
""")

code("s2", r"""
COLOURS = {"AR": "#c6dbef", "bonus": "#fdd0a2", "draft": "#a1d99b"}


def draw_answer(tokens, kinds, width=80, size=11):
    # Tokens in a monospace grid, one coloured box each; a newline shows as a pilcrow and breaks the line
    legend = [(f" {name} ", name) for name in COLOURS]
    cells, row, col = [], 0, 0
    for piece, kind in legend + [(None, None)] + [(tok.decode([t]), k) for t, k in zip(tokens, kinds)]:
        if piece is None or col + len(piece.replace("\n", "¶")) > width:
            row, col = row + 1, 0
            if piece is None:
                continue
        text = piece.replace("\n", "¶")
        cells.append((row, col, text, kind))
        col += len(text)
        if "\n" in piece:
            row, col = row + 1, 0
    char_inches = 0.6 * size / 72  # DejaVu Sans Mono: a character is 0.6 em wide
    fig = plt.figure(figsize=(width * char_inches, (row + 1) * 1.6 * size / 72), dpi=90)
    ax = fig.add_axes([0, 0, 1, 1])
    for r, c, text, kind in cells:
        ax.add_patch(plt.Rectangle((c, -r - 0.9), len(text), 0.8, fc=COLOURS[kind], ec="white", lw=0.5))
        ax.text(c, -r - 0.5, text, family="DejaVu Sans Mono", fontsize=size, va="center", parse_math=False)
    ax.set_xlim(0, width)
    ax.set_ylim(-row - 1, 0)
    ax.axis("off")
    plt.show()


draw_answer(ids, kinds)
""")

md("s2", r"""
**The gate along the answer.** Before each step the gate reads the entropy of the distribution the root was
just chosen from: a high value means the model was unsure here, and unsure stretches are where the heads'
guesses fail most. Above the threshold the step is a plain AR step: no drafting, a one-token forward.
""")

code("s2", r"""
starts, gates, is_ar, accepted, position = [], [], [], [], 0
for step in stats.trace:
    starts.append(position)
    gates.append(step["gate"])
    is_ar.append(step["tree"] is None)
    accepted.append(len(step["emitted"]) - 1)
    position += len(step["emitted"])
fig, (a, b) = plt.subplots(2, 1, figsize=(10, 3.6), sharex=True, gridspec_kw=dict(height_ratios=[2, 1]))
a.plot(starts, gates, color="0.7", lw=1)
for ar, colour, label in [(False, "tab:green", "tree step"), (True, "tab:blue", "AR step (gate above threshold)")]:
    a.scatter([s for s, x in zip(starts, is_ar) if x == ar], [g for g, x in zip(gates, is_ar) if x == ar],
              s=14, color=colour, label=label, zorder=2)
a.axhline(threshold, ls="--", color="tab:red", label=f"threshold {threshold} nats")
a.set_ylabel("gate entropy (nats)")
a.legend(fontsize=8, loc="upper right")
b.bar(starts, accepted, color=["tab:blue" if x else "tab:green" for x in is_ar])
b.set_ylabel("drafts\naccepted")
b.set_xlabel("answer token at which the step starts")
plt.show()
""")

# ---------------------------------------------------------------------------------------------------
md("s3", r"""
## 3. The heads

How often does head *k* name the right token? We let the model answer one prompt per task category of
`data/bench_prompts.jsonl` (48 tokens each; decoded with both head sets, which give the same answer),
then run one forward over prompt + answer: it gives the hidden state that chose each answer token `a[j]`. With
`a[j]` as the root, head *k* should name `a[j + k]`; we score its top-1 and top-5 guesses.
""")

code("s3", r"""
first_of = {}
with open(os.path.join(ROOT, "data", "bench_prompts.jsonl")) as f:
    for line in f:
        row = json.loads(line)
        first_of.setdefault(row["category"], row["turns"][0])
answers, tau, same = {}, {"cerberus": {}, "medusa": {}}, []
for category, question in first_of.items():
    p = chat_prompt(tok, question)
    answers[category], stats_c = generate(model, p, 48, heads=heads, tree=shipped, eos_id=eos)
    medusa_answer, stats_m = generate(model, p, 48, heads=medusa, tree=shipped, eos_id=eos)
    same.append(medusa_answer == answers[category])  # both are greedy AR's answer: heads change only the speed
    tau["cerberus"][category], tau["medusa"][category] = stats_c.tokens_per_step, stats_m.tokens_per_step
print(f"Medusa's answers are Cerberus's: {all(same)}; Cerberus's tau by category:",
      {c: round(t, 2) for c, t in tau["cerberus"].items()})
""")

code("s3", r"""
def head_hits(h, category):
    # (n_heads, 3): top-1 hits, top-5 hits and positions scored, per head, on one answer
    p, a = chat_prompt(tok, first_of[category]), answers[category]
    _, hidden = model(torch.tensor([p + a[:-1]]))
    states = hidden[0, len(p) - 1:]  # (n, C): the state that chose a[j], for j = 0..n-1
    roots = torch.tensor(a)
    drafts = head_logits(h, h.draft_weight(model.lm_head.weight), states, h.n_heads,
                         root_vec=model.lm_head.weight[roots])  # (K, n, D)
    top5 = token_ids(h, drafts.topk(5, dim=-1).indices)  # (K, n, 5) token ids
    hits = torch.zeros(h.n_heads, 3)
    for k in range(1, h.n_heads + 1):
        guess, target = top5[k - 1, :len(a) - k], roots[k:]  # head k at j names a[j + k]
        in_top1, in_top5 = (guess[:, 0] == target).sum(), (guess == target[:, None]).any(-1).sum()
        hits[k - 1] = torch.tensor([in_top1, in_top5, len(target)])
    return hits


hits = {name: {c: head_hits(h, c) for c in answers} for name, h in [("cerberus", heads), ("medusa", medusa)]}
total = {name: sum(per.values()) for name, per in hits.items()}  # (K, 3) over all categories
for name, t in total.items():
    print(name, "top-1 by head:", [round(x, 2) for x in (t[:, 0] / t[:, 2]).tolist()],
          "top-5:", [round(x, 2) for x in (t[:, 1] / t[:, 2]).tolist()])
""")

code("s3", r"""
fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.2), gridspec_kw=dict(width_ratios=[1, 1.3]))
depths = range(1, heads.n_heads + 1)
for name, colour, held_out in [("cerberus", "tab:green", ckpt["held_out"]),
                               ("medusa", "tab:purple", medusa_ckpt["held_out"])]:
    t = total[name]
    a.plot(depths, t[:, 0] / t[:, 2], "o-", color=colour, label=f"{name} top-1")
    a.plot(depths, t[:, 1] / t[:, 2], "o--", color=colour, label=f"{name} top-5")
    a.scatter(depths, [held_out[f"head{k}"]["top1"] for k in depths], marker="x", color=colour)
a.set_xticks(list(depths))
a.set_xlabel("head (tokens ahead of the root)")
a.set_ylabel("accuracy")
a.set_ylim(0, 1)
a.set_title("by depth (x: held-out top-1 from training)")
a.legend(fontsize=7)
grid = torch.stack([hits["cerberus"][c][:, 0] / hits["cerberus"][c][:, 2] for c in answers])  # (categories, K)
b.imshow(grid, cmap="Greens", vmin=0, vmax=1, aspect="auto")
for (i, k), v in zip([(i, k) for i in range(len(answers)) for k in range(heads.n_heads)], grid.flatten().tolist()):
    b.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
b.set_xticks(range(heads.n_heads), [f"head {k}" for k in depths])
b.set_yticks(range(len(answers)), list(answers))
b.set_title("Cerberus top-1 by category (48 tokens each: noisy)")
plt.show()
""")

md("s3", r"""
**Why deeper heads guess worse.** Head 1 names the token right after a token it is given; head 4 must name
the fourth token after it, without seeing the three in between. Every way those could go is a way the fourth
could differ, so the chance spreads over more candidates: deeper heads are right less often at
rank 0, and their right answers sit lower in their lists. The checkpoint's calibration, over tens of thousands
of held-out positions, shows both, and shows too that every head fails more where the backbone itself is unsure
(high entropy), which is what the gate exploits.
""")

code("s3", r"""
ranks, ent = ckpt["calibration"]["ranks"].long(), ckpt["calibration"]["entropy"].float()  # (M, K), (M,)
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3))
r = torch.arange(1, 11)
for k in range(ranks.shape[1]):
    a.plot(r, [(ranks[:, k] < n).float().mean() for n in r], "o-", ms=3, label=f"head {k + 1}")
a.set_xlabel("n: the right token among the head's top n")
a.set_ylabel("share of held-out positions")
a.legend(fontsize=8)
edges = torch.quantile(ent, torch.linspace(0, 1, 9))
bin_of = torch.bucketize(ent, edges[1:-1])  # 8 bins of equal count
for k in range(ranks.shape[1]):
    b.plot([float(ent[bin_of == i].mean()) for i in range(8)],
           [float((ranks[bin_of == i, k] == 0).float().mean()) for i in range(8)], "o-", ms=3, label=f"head {k + 1}")
b.set_xlabel("backbone entropy at that position (nats)")
b.set_ylabel("top-1 accuracy")
b.set_title("harder text, worse guesses")
plt.show()
""")

md("s3", r"""
**Medusa's heads against Cerberus's on the same answers.** Medusa's heads are independent; Cerberus's head
*k* also reads what head *k-1* guessed. Same tree, same answers (checked above): the accepted tokens per
forward show what the link is worth here.
""")

code("s3", r"""
fig, ax = plt.subplots(figsize=(9, 2.6))
x = torch.arange(len(answers)).float()
for shift, (name, colour) in zip([-0.2, 0.2], [("cerberus", "tab:green"), ("medusa", "tab:purple")]):
    ax.bar(x + shift, list(tau[name].values()), width=0.4, color=colour,
           label=f"{name}: mean tau {sum(tau[name].values()) / len(answers):.2f}")
ax.set_xticks(x, list(answers))
ax.set_ylabel("tokens per forward (tau)")
ax.set_ylim(1, None)
ax.legend(fontsize=8)
plt.show()
""")

# ---------------------------------------------------------------------------------------------------
md("s4", r"""
## 4. The device decides the tree

A bigger tree checks more guesses, so it accepts more tokens per step, but its forward handles more tokens.
On a GPU a forward of 64 tokens costs about what one token costs (the weights are read once either way); on
this CPU it does not. We time a forward of T new tokens on a cache that already holds 256 tokens (the
fastest of five tries, on the one thread this notebook uses), and with the checkpoint's accuracy table
compute the expected tokens per step of the best tree of each size *n*: 1 (the backbone's own token) plus,
for every node, the chance that its whole path is right.
""")

code("s4", r"""
V, sizes = model.config.vocab_size, [1, 2, 4, 8, 16, 32, 64]
cache = KVCache(model.config, 256 + max(sizes))
model(torch.randint(0, V, (1, 256)), cache)
cache.length = 256  # 256 committed tokens; each timed forward writes after them and is then forgotten


def forward_seconds(T, tries=5):
    x, times = torch.randint(0, V, (1, T)), []
    for _ in range(tries):
        start = time.perf_counter()
        model(x, cache)
        times.append(time.perf_counter() - start)
    return min(times)


forward_seconds(1)  # warm-up
here = {T: forward_seconds(T) for T in sizes}
print({T: f"{1000 * s:.0f} ms" for T, s in here.items()})
""")

code("s4", r"""
def expected_tokens(tree):
    total = 1.0
    for p in tree.paths:  # a node is accepted when every guess on its path is right
        chance = 1.0
        for d, r in enumerate(p):
            chance *= acc[d][r]
        total += chance
    return total


def cost_at(curve, n):  # linear between the measured sizes
    lo, hi = max(T for T in curve if T <= n), min(T for T in curve if T >= n)
    return curve[lo] if lo == hi else curve[lo] + (curve[hi] - curve[lo]) * (n - lo) / (hi - lo)


curves = {"this CPU (measured above)": here,
          "the training run's CPU (checkpoint)": {int(T): s for T, s in ckpt["gate"]["step_costs"].items()},
          "H200, network as a CUDA graph (results/gpu_h200/)": {1: 2.08e-3, 64: 2.33e-3}}
ns = list(range(1, 65))
gain = [expected_tokens(Tree.best(acc, n)) for n in ns]
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.2))
picked = {}
for (name, curve), colour in zip(curves.items(), ["tab:red", "tab:orange", "tab:blue"]):
    relative = [cost_at(curve, n) / curve[1] for n in ns]
    speed = [g / c for g, c in zip(gain, relative)]
    picked[name] = ns[max(range(len(ns)), key=speed.__getitem__)]
    a.plot(ns, relative, color=colour, label=name)
    b.plot(ns, speed, color=colour, label=f"{name}: best n = {picked[name]}")
    b.scatter([picked[name]], [max(speed)], color=colour, zorder=3)
b.plot(ns, gain, ls=":", color="0.5", label="expected tokens per step (cost ignored)")
a.set_xlabel("tokens in one forward (tree nodes n)")
a.set_ylabel("forward cost / 1-token cost")
a.legend(fontsize=7)
b.set_xlabel("tree nodes n")
b.set_ylabel("expected tokens per AR-step time")
b.legend(fontsize=7)
plt.show()
""")

md("s4", r"""
The trees each curve picks (structure only; the backbone's forward is the cost we model). The calibration in
`train.py` goes further: it prices the heads' drafts too, and instead of multiplying accuracies it walks
held-out answers step by step as decoding would, since a step that accepts tokens skips the rows behind them:
""")

code("s4", r"""
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
for ax, (name, n) in zip(axes, picked.items()):
    draw_tree(ax, Tree.best(acc, n))
    ax.set_title(f"{name.split(' (')[0]}: {n} nodes", fontsize=9)
plt.show()
""")

# ---------------------------------------------------------------------------------------------------
md("s5", r"""
## 5. Exactness

The drafts change only how many forwards the answer takes, never the answer: a draft is kept only if it is
the token the backbone would have chosen anyway. In float32 the output is greedy AR's token for token, for any
heads and tree. With sampling, each position's draw depends only on the seed and the position, and a tree node
keeps a draft only if it equals that draw, so the same seed gives AR sampling's text through any tree.
Each row below is one decode, compared token by token with its AR reference.
""")

code("s5", r"""
trees = {"shipped": shipped, "chain 3": Tree.chain(3), "sparse16": Tree.preset("sparse16")}
reference = {"greedy": generate(model, prompt, 40, eos_id=eos)[0],
             "sampled": generate(model, prompt, 40, eos_id=eos, temperature=0.7, top_p=0.9, seed=0)[0]}
rows = {}
for name, t in trees.items():
    rows[f"greedy, {name}"] = reference["greedy"], generate(model, prompt, 40, heads=heads, tree=t, eos_id=eos)[0]
    rows[f"sampled seed 0, {name}"] = reference["sampled"], generate(
        model, prompt, 40, heads=heads, tree=t, eos_id=eos, temperature=0.7, top_p=0.9, seed=0)[0]
rows["sampled seed 1, AR (not the same draws)"] = reference["sampled"], generate(
    model, prompt, 40, eos_id=eos, temperature=0.7, top_p=0.9, seed=1)[0]
for name, (ref, out) in rows.items():
    print(f"{name:40s} same as AR: {out == ref}")
print("\nsampled, seed 0:", repr(tok.decode(reference["sampled"])))
""")

code("s5", r"""
width = max(len(ref) for ref, _ in rows.values())
grid = torch.full((len(rows), width), float("nan"))
for i, (ref, out) in enumerate(rows.values()):
    for j in range(max(len(ref), len(out))):
        grid[i, j] = float(j < len(ref) and j < len(out) and ref[j] == out[j])
fig, ax = plt.subplots(figsize=(10, 2.6))
ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
ax.set_xlabel("answer token (green: the same token as the AR reference, red: another)")
plt.show()
""")

# ---------------------------------------------------------------------------------------------------
md("s6", r"""
## 6. The knobs

Three knobs set the speed, never the text: the **tree** (how many guesses, how deep), the **threshold**
(when to skip guessing) and the **number of heads** (the tree's depth). `knob` decodes the coffee question
with the settings you give and reports tokens per forward, the share of AR steps, and whether the text is AR's.
Below, first a sweep of the threshold and of the number of heads; then exercises: predict, then run.
""")

code("s6", r"""
ar_answer = {}


def knob(tree=shipped, threshold=float("inf"), h=heads, temperature=0.0, tokens=48):
    key = (temperature, tokens)
    if key not in ar_answer:  # the AR reference for this sampling rule, computed once
        ar_answer[key] = generate(model, prompt, tokens, eos_id=eos, temperature=temperature, seed=0)[0]
    out, s = generate(model, prompt, tokens, heads=h, tree=tree, gate_threshold=threshold, eos_id=eos,
                      temperature=temperature, seed=0)
    print(f"{tree.n_nodes:2d} nodes, depth {tree.max_depth}, threshold {threshold}: tau {s.tokens_per_step:.2f}, "
          f"{s.ar_steps}/{s.steps} AR steps, same as AR: {out == ar_answer[key]}")
    return s


thresholds = [0.0, 0.5, 1.0, 2.0, 4.0, float("inf")]
by_threshold = [knob(threshold=x) for x in thresholds]
by_heads = [knob(tree=Tree.chain(k)) for k in range(1, heads.n_heads + 1)]  # k drafts in a line: heads 1..k
""")

code("s6", r"""
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 2.8))
labels = [str(x) for x in thresholds]
a.plot(labels, [s.tokens_per_step for s in by_threshold], "o-", color="tab:green", label="tau")
a.plot(labels, [s.ar_steps / s.steps for s in by_threshold], "s--", color="tab:blue", label="share of AR steps")
a.set_xlabel("gate threshold (nats)")
a.legend(fontsize=8)
b.plot(range(1, heads.n_heads + 1), [s.tokens_per_step for s in by_heads], "o-", color="tab:green")
b.set_xticks(range(1, heads.n_heads + 1))
b.set_xlabel("heads used (Tree.chain: one guess per head)")
b.set_ylabel("tau")
plt.show()
""")

md("s6", r"""
**Exercises.** Write down your prediction first, then run the cell.

1. The best 32-node tree (`Tree.best(acc, 32)`) against the shipped tree: how many more tokens per
   forward? Would it pay on this CPU (section 4)?
2. The gate at 0.5 nats: what share of steps will be AR, and what happens to tau? (Look at section 2's
   entropy plot before you answer.)
3. Medusa's heads in the best 16-node tree: above or below Cerberus's heads in the same tree?
4. Sampling at temperature 1.0: does tau go up or down against greedy? Is the text still AR's?
""")

code("s6", r"""
s = knob(tree=Tree.best(acc, 32))  # exercise 1; compare with knob()
""")

code("s6", r"""
s = knob(threshold=0.5)  # exercise 2
""")

code("s6", r"""
s = knob(tree=Tree.best(acc, 16), h=medusa)  # exercise 3
s = knob(tree=Tree.best(acc, 16))
""")

code("s6", r"""
s = knob(temperature=1.0)  # exercise 4
""")

md("s6", r"""
**Your own heads** (not run here). Heads learn from the backbone's own answers, so those come first; they
are written in resumable shards, slow on a CPU (`data/README.md`). The quick recipe then trains on the first
shard only. From the repository's root:

```bash
python data/generate_answers.py   # the backbone's answers to the training prompts, resumable shards
python train.py                   # the quick recipe: heads on the first shard, written to runs/quick/
```

Then load them in place of the shipped ones, `heads, ckpt = load_heads(os.path.join(ROOT, "runs", "quick",
"cerberus.pt"), model)`, and run this notebook again.
""")

code("s6", r"""
print(f"the whole notebook ran in {time.perf_counter() - notebook_start:.0f} s")
""")


def build():
    """The notebook, outputs empty."""
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                                "language_info": {"name": "python"}})
    for kind, section, text in CELLS:
        make = new_markdown_cell if kind == "markdown" else new_code_cell
        nb.cells.append(make(text, metadata={"tags": [section]}))
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding does not churn the file
        cell["id"] = f"cell-{i:02d}"
    return nb


def execute(nb, timeout=900):
    """Run the notebook top to bottom in notebooks/ (where Jupyter would run it); raises on any error."""
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": HERE}}).execute()
    return nb


def main(argv):
    nb = build()
    if "--execute" in argv:
        execute(nb)
    nbformat.write(nb, PATH)
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
