"""Head training: target offsets, a frozen backbone, heads that learn, checkpoints, DDP."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cerberus import CerberusHeads, MedusaHeads, Tree, generate, load_heads, save_heads
from conftest import TINY, perturb, tiny_gpt, write_gguf
from model import GPT, GPTConfig
from train import (IGNORE, NO_TARGET, TrainConfig, batched_generate, calibrate, draft_classes, draft_vocabulary,
                   head_set_spec, head_targets, parse_cli, self_distill, target_ranks,
                   train_config, train_heads)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_head_k_learns_token_t_plus_1_plus_k():
    """Row i is the hidden state that predicts answer[i] (t + 1); head k's target is answer[i + k]."""
    targets = head_targets(torch.arange(6), n_heads=3)
    assert targets.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, IGNORE],
                                [4, 5, IGNORE, IGNORE], [5, IGNORE, IGNORE, IGNORE]]


def test_head_targets_stay_on_the_answers_device():
    """The benchmark builds targets from AR answers on the GPU; the padding must follow them there
    (the first H200 run stopped here). The meta device stands in for CUDA on a CPU-only machine."""
    assert head_targets(torch.arange(6, device="meta"), n_heads=3).device.type == "meta"


def test_batched_generation_equals_greedy_per_prompt():
    """Left-padded batches, with rows leaving the batch as they finish, answer exactly as `generate`
    does one prompt at a time; the hidden states are the ones that predicted each token."""
    model = tiny_gpt()
    torch.manual_seed(1)
    prompts = [torch.randint(0, TINY.vocab_size, (n,)).tolist() for n in (3, 9, 5, 12, 1, 7, 4, 10)]
    reference = [generate(model, p, 20)[0] for p in prompts]
    eos_id = max(set(t for r in reference for t in r), key=lambda t: sum(r.count(t) for r in reference))
    answers, states, lengths = batched_generate(model, prompts, 20, eos_id)
    assert len(set(lengths.tolist())) > 2  # rows end at different steps, so some leave the batch early
    for p, a, s, n in zip(prompts, answers, states, lengths.tolist()):
        expected = generate(model, p, 20, eos_id=eos_id)[0]
        assert a[:n].tolist() == expected
        _, hidden = model(torch.tensor([p + expected[:-1]]))
        torch.testing.assert_close(s[:n], hidden[0, len(p) - 1:], atol=1e-4, rtol=1e-4)


def counting_backbone():
    """A tiny GPT trained for a few seconds to continue any run of tokens by counting up (mod V):
    a backbone whose greedy future is predictable from its hidden state."""
    torch.manual_seed(0)
    model = GPT(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        start = torch.randint(0, TINY.vocab_size, (16, 1))
        seq = (start + torch.arange(33)) % TINY.vocab_size
        logits, _ = model(seq[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


class ByteTokenizer:  # the two methods self_distill needs, for a model without a real tokenizer
    def encode(self, text, allowed_special=()):
        return [1] if text == "<|im_end|>" else list(text.encode())[:8]


@pytest.mark.parametrize("spec,draft_vocab", [({}, 0), (dict(reads_root=True), 0), (dict(reads_root=True), 128),
                                              (dict(link="token"), 128)])
def test_brief_training_raises_accepted_length(monkeypatch, spec, draft_vocab):
    """Heads trained on a predictable backbone must be accepted: tau well above 1 — and the
    backbone stays bit-identical through training. Also with a draft vocabulary of half the tokens
    (the ones the answers use), which the loss and the drafts must both index the same way."""
    model = counting_backbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr("train.chat_prompt", lambda tok, text: tok.encode(text))
    cfg = TrainConfig(n_heads=3, max_answer_tokens=24, gen_batch_size=16, batch_size=64, lr=3e-3, warmup=10,
                      gen_dtype="float32")
    prompts = [f"{a:c}{b:c}" for a, b in torch.randint(33, 126, (48, 2)).tolist()]
    data = self_distill(model, ByteTokenizer(), prompts, cfg)
    # Each row's root (column 0) is the backbone's own choice from that row's hidden state, as in
    # generate(), where the heads read argmax(lm_head(last_hidden)): the variant trains on what it sees.
    assert torch.equal(model.lm_head(data["hidden"].float()).argmax(-1), data["targets"][:, 0])
    heads = CerberusHeads(TINY, n_heads=3, **spec)
    if draft_vocab:
        heads.draft_over(draft_vocabulary(data["targets"], draft_vocab, TINY.vocab_size))
    prompt, tree = [40, 41, 42], Tree.chain(3)
    _, untrained = generate(model, prompt, 30, heads=heads, tree=tree)
    train_heads(heads, model.lm_head.weight, data, TrainConfig(**{**vars(cfg), "epochs": 20}))
    ids, trained = generate(model, prompt, 30, heads=heads, tree=tree)
    assert ids == generate(model, prompt, 30)[0]
    assert untrained.tokens_per_step < 1.5 and trained.tokens_per_step > 2.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = tiny_gpt()
    heads = MedusaHeads(TINY, n_heads=3, n_layers=2)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
    path = str(tmp_path / "medusa.pt")
    save_heads(path, heads, model, {"gate": {"threshold": 1.5}})
    assert os.listdir(tmp_path) == ["medusa.pt"]  # the temp file was renamed, not left behind
    loaded, ckpt = load_heads(path, model)
    assert ckpt["gate"]["threshold"] == 1.5 and loaded.spec == heads.spec and loaded.vocab is None
    for a, b in zip(heads.parameters(), loaded.parameters()):
        torch.testing.assert_close(a.half().float(), b)  # stored in half precision
    heads.draft_over([2, 3, 255])
    save_heads(path, heads, model, {})
    assert torch.load(path, weights_only=True)["state_dict"]["vocab"].dtype == torch.long  # ids stay exact
    assert load_heads(path, model)[0].vocab.tolist() == [2, 3, 255]

    with pytest.raises(ValueError, match="another backbone"):
        load_heads(path, tiny_gpt(seed=1))
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_heads(path, model)
    with pytest.raises(ValueError, match="no heads checkpoint"):
        load_heads(str(tmp_path / "missing.pt"), model)


def test_draft_vocabulary_is_the_most_written_tokens_and_indexes_targets():
    targets = head_targets(torch.tensor([7, 7, 7, 3, 3, 9, 200]), n_heads=2)  # column 0: the answer
    assert draft_vocabulary(targets, 2, 256).tolist() == [3, 7]  # the two most frequent, sorted by id
    vocab = draft_vocabulary(targets, 6, 256)
    assert vocab.tolist() == [0, 1, 3, 7, 9, 200]  # all 4 seen, then the lowest unseen ids
    heads = CerberusHeads(TINY, 2).draft_over(vocab)
    assert draft_classes(heads, torch.tensor([9, 5, IGNORE, 0])).tolist() == [4, IGNORE, IGNORE, 0]


def test_target_ranks_count_a_token_outside_the_draft_vocabulary_as_a_miss():
    """A head whose target it cannot draft gets the worst rank (254), not a rank among other tokens;
    a position without a target stays NO_TARGET."""
    model = tiny_gpt()
    heads = perturb(MedusaHeads(TINY, n_heads=2), 0)
    targets = torch.tensor([[5, 6, 7], [6, 7, IGNORE]])
    data = {"hidden": torch.randn(2, TINY.n_embd), "targets": targets}
    whole = target_ranks(heads, model.lm_head.weight, data, 2)
    heads.draft_over([6, 8, 9])  # holds head 1's first target (6), not head 2's (7) or head 1's second (7)
    ranks = target_ranks(heads, model.lm_head.weight, data, 2)
    assert ranks[1, 1] == whole[1, 1] == NO_TARGET
    assert ranks[0, 1] == ranks[1, 0] == NO_TARGET - 1
    assert ranks[0, 0] <= 2 and ranks[0, 0] <= whole[0, 0]  # ranked among the 3 drafted tokens only


def test_checkpoint_from_before_deeper_cerberus_heads_loads(tmp_path):
    """Cerberus checkpoints saved before stage 1 could have several blocks (spec without n_layers,
    w1 of shape (K, C, C)) load into the same one-block heads (the heads shipped until the root-reading
    variant replaced them are such checkpoints, and so are runs/ of that time)."""
    model, heads = tiny_gpt(), perturb(CerberusHeads(TINY, n_heads=3), 0)
    path = str(tmp_path / "old.pt")
    save_heads(path, heads, model, {})
    old = torch.load(path, weights_only=True)
    old["spec"].pop("n_layers")
    old["state_dict"]["w1"], old["state_dict"]["b1"] = old["state_dict"]["w1"][0], old["state_dict"]["b1"][0]
    torch.save(old, path)
    loaded, _ = load_heads(path, model)
    hidden, lm_weight = torch.randn(5, TINY.n_embd), model.lm_head.weight
    torch.testing.assert_close(loaded(hidden, lm_weight, 3), heads.half().float()(hidden, lm_weight, 3))


def test_cli_help_lists_every_flag_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_cli(TrainConfig, ["--recipe=full", "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == len(dataclasses.fields(TrainConfig))
    assert any(line.split() == ["--epochs=1", "fresh", "data", "beats", "extra", "epochs"] for line in lines)
    assert "--seed=0" in lines[-1]


def test_cli_overrides_and_recipes():
    cfg = train_config(parse_cli(TrainConfig, ["--recipe=full", "--lr=0.002", "--n-heads=3"]))
    assert (cfg.recipe, cfg.lr, cfg.n_heads, cfg.out_dir) == ("full", 0.002, 3, "runs/full")
    with pytest.raises(ValueError, match="unknown argument"):
        parse_cli(TrainConfig, ["--learning_rate=1"])
    with pytest.raises(ValueError, match="unknown recipe"):
        train_config({"recipe": "huge"})
    assert head_set_spec("cerberus2", 4) == dict(kind="cerberus", n_heads=4, n_layers=2, reads_root=False, link="hidden")
    assert head_set_spec("cerberus+token+root", 4) == dict(kind="cerberus", n_heads=4, n_layers=1, reads_root=True,
                                                           link="token")
    assert head_set_spec("medusa", 4) == dict(kind="medusa", n_heads=4, n_layers=1, reads_root=False)
    assert head_set_spec("medusa3+root", 4) == dict(kind="medusa", n_heads=4, n_layers=3, reads_root=True)
    for name in ("hydra", "medusa+token", "cerberus+roots"):
        with pytest.raises(ValueError, match="unknown head set"):
            head_set_spec(name, 4)


def test_torchrun_ddp_on_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node=2 train.py` trains with DDP (gloo) and rank 0 writes the heads."""
    config = GPTConfig(vocab_size=259, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=512,
                       tie_embeddings=False)
    model = tiny_gpt(config=config)
    write_gguf(tmp_path / "tiny.gguf", model, special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), f"--gguf={tmp_path / 'tiny.gguf'}", f"--out_dir={out}",
           "--n_prompts=16", "--max_answer_tokens=8", "--batch_size=8", "--heads=cerberus", "--n_heads=2",
           "--gen_dtype=float32", "--draft_vocab=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["cerberus.pt", "metrics.json", "templates_rank0.pt", "templates_rank1.pt"]
    from model import load_gguf
    loaded, _ = load_gguf(str(tmp_path / "tiny.gguf"))
    heads, ckpt = load_heads(str(out / "cerberus.pt"), loaded)
    assert heads.n_heads == 2 and "threshold" in ckpt["gate"] and len(heads.vocab) == 100


def test_calibration_gates_off_the_hard_positions():
    """Where drafts are right only at low entropy and a tree step costs 1.5 AR steps, the calibrated
    gate must go parallel below some threshold and stay AR above it — and beat both extremes."""
    torch.manual_seed(0)
    n = 4000
    gate_entropy = torch.rand(n) * 4  # nats
    easy = gate_entropy < 1.0  # heads 1 and 2 right (rank 0) exactly at the easy positions
    ranks = torch.where(easy[:, None], 0, 200).repeat(1, 2).to(torch.uint8)
    costs = {1: 1.0, 2: 1.4, 3: 1.5, 4: 1.6}
    gate = calibrate(ranks, gate_entropy, costs, drafting={1: 0.05, 2: 0.1})
    assert 0.5 < gate["threshold"] < 2.0 and gate["tree"] == [[0], [0, 0]]
    assert gate["est_speedup"] > 1.2  # gated: 1.30x; always AR: 1.00x; always parallel: 1.5 / 1.6 = 0.94x
    curve = gate["entropy_curve"]
    assert curve[0]["accepted"] == 2.0 and curve[-1]["accepted"] == 0.0


def test_calibration_picks_the_signal_that_separates_and_prices_a_head1_gate():
    """Given both signals, the gate reads the one that predicts acceptance (here head 1's). A head-1 gate
    runs the heads before deciding, so when drafts cost as much as a forward no threshold of it pays:
    the choice is then AR only (threshold 0, no heads), at exactly AR's speed."""
    torch.manual_seed(0)
    n = 4000
    head1 = torch.rand(n) * 4
    ranks = torch.where(head1[:, None] < 1.0, 0, 200).repeat(1, 2).to(torch.uint8)
    signals = {"backbone": torch.rand(n) * 4, "head1": head1}  # the backbone's says nothing here
    costs = {1: 1.0, 2: 1.4, 3: 1.5, 4: 1.6}
    gate = calibrate(ranks, signals, costs, drafting={1: 0.05, 2: 0.1})
    assert gate["gate_on"] == "head1" and 0.5 < gate["threshold"] < 2.0 and gate["est_speedup"] > 1.2
    gate = calibrate(ranks, signals, costs, drafting={1: 1.0, 2: 1.0})
    assert gate["threshold"] == 0.0 and gate["est_speedup"] == pytest.approx(1.0)
