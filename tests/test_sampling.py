"""Lossless sampling: with the same seed, any heads, tree and gate emit exactly AR sampling's tokens, and
AR sampling itself follows the warped softmax (temperature, then top-k, then top-p)."""
import math

import pytest
import torch

import cerberus
from cerberus import CerberusHeads, MedusaHeads, Sampling, Tree, choose, generate, warp
from conftest import TINY, perturb, tiny_gpt
from model import GPTConfig
from test_cerberus import HAND_MADE, PROMPT, mid_threshold

SAMPLINGS = [dict(temperature=0.7), dict(temperature=1.0, top_k=20, top_p=0.9), dict(temperature=1.5, top_p=0.8)]
TREES = [Tree.preset("chain4"), Tree.preset("sparse16"), Tree.preset("sparse64"), Tree(HAND_MADE["lopsided"]),
         Tree(HAND_MADE["wide_shallow"])]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind,spec", [(MedusaHeads, {}), (CerberusHeads, {}), (CerberusHeads, dict(link="token", reads_root=True))])
def test_tree_sampling_emits_ar_samplings_tokens(seed, kind, spec):
    """The central promise, sampled: every tree, gate and sampling rule gives AR's draws for the seed."""
    model = tiny_gpt(seed)
    heads = perturb(kind(TINY, n_heads=4, **spec), seed)
    gates = [(0.0, "backbone"), (mid_threshold(model, heads), "backbone"),
             (mid_threshold(model, heads, "head1"), "head1"), (math.inf, "backbone")]
    for sampling in SAMPLINGS:
        reference, _ = generate(model, PROMPT, 30, seed=seed, **sampling)
        for tree in TREES:
            for threshold, gate_on in gates:
                ids, _ = generate(model, PROMPT, 30, heads=heads, tree=tree, gate_threshold=threshold, gate_on=gate_on,
                                  seed=seed, **sampling)
                assert ids == reference, (sampling, tree, threshold, gate_on)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_drafts_of_the_sampled_future_are_accepted_and_wrong_ones_cost_only_speed(sampling, monkeypatch):
    """Random heads are almost never accepted, so here the drafts are AR's own draws for this seed,
    each replaced by a wrong token with chance 1/2: accepted paths of every length, rejected branches
    and bonus draws at every depth, and still AR's tokens."""
    model, tree = tiny_gpt(4), Tree.preset("sparse16")
    reference, _ = generate(model, PROMPT, 40, seed=7, **sampling)
    future, coin = reference + [0] * tree.max_depth, torch.Generator().manual_seed(0)
    decoder = cerberus.Decoder(model, CerberusHeads(TINY, 4), tree, sampling=Sampling(**sampling), max_len=80)

    def half_right(drafts, root, tree, vocab=None):
        at = int(decoder.length) - len(PROMPT)  # the root is answer token `at`
        tokens = [int(root)]
        for path in tree.paths:  # nodes on the rank-0 line guess the true draw, or a wrong one
            true = future[at + len(path)]
            right = all(r == 0 for r in path) and bool(torch.rand(1, generator=coin) < 0.5)
            tokens.append(true if right else (true + 1 + path[-1]) % TINY.vocab_size)
        return torch.tensor(tokens)

    monkeypatch.setattr(cerberus, "propose", half_right)
    ids, stats = decoder.generate(PROMPT, 40, seed=7)
    assert ids == reference
    assert len(set(stats.accept_lengths)) >= 3 and max(stats.accept_lengths) >= 2


def test_temperature_zero_is_greedy_ar():
    """temperature=0 takes the argmax, checked against recomputing the whole sequence at every token."""
    model = tiny_gpt(2)
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert generate(model, PROMPT, 20, temperature=0.0, seed=123)[0] == seq[len(PROMPT):]
    heads = perturb(CerberusHeads(TINY, 4), 2)
    assert generate(model, PROMPT, 20, heads=heads, tree=Tree.preset("sparse8"), seed=9)[0] == seq[len(PROMPT):]


def chi_square_critical(df, z=3.719):
    """Wilson-Hilferty approximation of the chi-square quantile at the normal quantile z: z = 3.719
    is a false-failure rate of 1e-4 for a correct sampler (within 1% of the exact quantile for df > 10)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def exact_first_two(model, prompt, sampling):
    """(V, V) exact probability of the first two sampled tokens, from the model's logits and `warp`."""
    with torch.no_grad():
        first = warp(model(torch.tensor([prompt]))[0][0, -1:], sampling)[0]
        second = warp(model(torch.tensor([[*prompt, t] for t in range(model.config.vocab_size)]))[0][:, -1], sampling)
    first, second = first / first.sum(), second / second.sum(-1, keepdim=True)
    return first[:, None] * second


def chi_square(model, prompt, sampling, n):
    """(statistic, degrees of freedom, counts, expected) of n seeded AR samples of the first two tokens."""
    decoder = cerberus.Decoder(model, sampling=sampling, max_len=len(prompt) + 3)
    V = model.config.vocab_size
    counts = torch.zeros(V * V)
    for seed in range(n):
        a, b = decoder.generate(prompt, 2, seed=seed)[0]
        counts[a * V + b] += 1
    expected = exact_first_two(model, prompt, sampling).flatten() * n
    big = expected >= 5  # cells expected fewer than 5 times pool into one, as the test requires
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    pooled = torch.cat([expected[big], expected[~big].sum()[None]])
    statistic = float(((observed - pooled) ** 2 / pooled.clamp(min=1e-9)).sum())
    return statistic, len(observed) - 1, counts, expected


@pytest.mark.parametrize("sampling", [Sampling(0.7), Sampling(1.3, top_k=5), Sampling(1.0, top_k=6, top_p=0.8)])
def test_ar_sampling_follows_the_warped_distribution(sampling, monkeypatch):
    """The first two tokens of 2,000 seeds against their exact joint law (vocabulary of 8: 64 cells):
    chi-square below its 1e-4 quantile; tokens cut by top-k or top-p never drawn. A sampler that skips
    the warp, as an unwarped bonus draw would, fails the same test."""
    config = GPTConfig(vocab_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, tie_embeddings=False)
    model, prompt = tiny_gpt(0, config), [1, 5, 2]
    statistic, df, counts, expected = chi_square(model, prompt, sampling, 2000)
    assert statistic < chi_square_critical(df), (statistic, df)
    assert (counts[expected == 0] == 0).all()
    assert (expected == 0).any() == (sampling.top_k > 0 or sampling.top_p < 1)
    unwarped = cerberus.warp
    monkeypatch.setattr(cerberus, "warp", lambda logits, s: unwarped(logits, Sampling(1.0)))
    wrong, df, _, _ = chi_square(model, prompt, sampling, 2000)
    assert wrong > chi_square_critical(df), (wrong, df)


def test_choose_draws_only_kept_tokens_and_depends_on_seed_and_position_only():
    """Over 4,000 positions no draw leaves the top-k / top-p set; the same (seed, position) gives the
    same draw whatever else is in the batch; another seed gives other draws."""
    torch.manual_seed(0)
    logits = torch.randn(1, 256).expand(4000, 256)
    position, seed = torch.arange(4000), torch.tensor([11])
    sampling = Sampling(1.0, top_k=10, top_p=0.7)
    kept = warp(logits[:1], sampling)[0] > 0
    draws = choose(logits, position, seed, sampling)
    assert kept[draws].all() and len(set(draws.tolist())) == int(kept.sum()) > 1
    assert torch.equal(choose(logits[7:9], position[7:9], seed, sampling), draws[7:9])
    assert not torch.equal(choose(logits, position, seed + 1, sampling), draws)


def test_nucleus_keeps_tokens_tied_with_the_last_kept_one():
    """top_p cuts by probability, not by position in a sort: four equal tokens at top_p 0.5 are all kept, and
    of [0.4, 0.3, 0.2, 0.1] at top_p 0.6 the first two (0.4 falls short, 0.7 reaches it)."""
    assert torch.equal(warp(torch.zeros(1, 4), Sampling(1.0, top_p=0.5)) > 0, torch.ones(1, 4, dtype=torch.bool))
    kept = warp(torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log(), Sampling(1.0, top_p=0.6)) > 0
    assert kept.tolist() == [[True, True, False, False]]


def test_bad_sampling_arguments_are_value_errors():
    model = tiny_gpt()
    for kwargs, message in [(dict(temperature=-0.5), "temperature must be >= 0"),
                            (dict(temperature=math.nan), "temperature must be >= 0"),
                            (dict(temperature=1.0, top_p=0.0), r"top_p must lie in \(0, 1\]"),
                            (dict(temperature=1.0, top_p=1.5), r"top_p must lie in \(0, 1\]"),
                            (dict(temperature=1.0, top_k=-1), "top_k must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            generate(model, PROMPT, 4, **kwargs)
