"""Head training: the prompt mix, answer shards, teacher-forced hidden states, target offsets, a frozen
backbone, heads that learn, accuracy by category, checkpoints, DDP."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cerberus import CerberusHeads, MedusaHeads, Tree, generate, load_heads, save_heads
from conftest import TINY, perturb, tiny_gpt, write_gguf
from model import SYSTEM_PROMPT, GPT, GPTConfig, load_gguf
from train import (CATEGORIES, IGNORE, NO_TARGET, TrainConfig, accuracy_by_category, calibrate, calibration_sample,
                   conversation, draft_classes, draft_vocabulary, fastest, get_data, head_set_spec, head_targets,
                   parse_cli, read_shard, shard_data, starting_weights, target_ranks, teacher_forced_states,
                   train_config, train_heads)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
import generate_answers as gen  # noqa: E402

CHAT = GPTConfig(vocab_size=259, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=1024, tie_embeddings=False)


class ByteChat:
    """The chat markers as ids 0-2, then the 256 bytes: the layout of write_gguf's tokenizer."""
    special = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}

    def encode(self, text, allowed_special=()):
        return [i for part in re.split(r"(<\|\w+\|>)", text)
                for i in ([self.special[part]] if part in self.special else [b + 3 for b in part.encode()])]


def prompt_rows(n):
    """n prompt rows of every category in turn, every other one with a follow-up."""
    return [{"category": CATEGORIES[i % len(CATEGORIES)], "prompt": f"Question {i}: what is {i} plus {i}?",
             **({"follow_up": f"And times {i}?"} if i % 2 else {})} for i in range(n)]


def answer_config(tmp_path, **overrides):
    return gen.AnswerConfig(**{"answers_dir": str(tmp_path / "answers"), "max_answer_tokens": 12, "batch_size": 4,
                               "dtype": "float32", **overrides})


def all_answers(answers_dir):
    """Every (line, turn) of every shard in a folder, in a list: duplicates stay visible."""
    return [key for name in sorted(os.listdir(answers_dir)) if name.endswith(".npz")
            for key in read_shard(os.path.join(answers_dir, name))[1]]


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
    """Left-padded batches, with rows leaving the batch as they finish and rows that go on to a second
    turn fed its ids one per step, answer exactly as `generate` does one chat at a time, first answer
    and second alike; the hidden states are the ones that predicted each token."""
    model = tiny_gpt()
    torch.manual_seed(1)
    prompts = [torch.randint(0, TINY.vocab_size, (n,)).tolist() for n in (3, 9, 5, 12, 1, 7, 4, 10)]
    reference = [generate(model, p, 20)[0] for p in prompts]
    eos_id = max(set(t for r in reference for t in r), key=lambda t: sum(r.count(t) for r in reference))
    follow_ups = [[eos_id] + torch.randint(0, TINY.vocab_size, (n,)).tolist() if n else None
                  for n in (4, 0, 1, 6, 3, 0, 2, 5)]
    out = gen.batched_generate(model, prompts, 20, eos_id, follow_ups)
    first_lengths = [len(turns[0][0]) for turns in out]
    assert len(set(first_lengths)) > 2 and 20 in first_lengths  # rows end early and at the cap
    for prompt, follow_up, turns in zip(prompts, follow_ups, out):
        chat = list(prompt)
        assert len(turns) == (2 if follow_up else 1)
        for ids, states in turns:
            assert ids == generate(model, chat, 20, eos_id=eos_id)[0]
            _, hidden = model(torch.tensor([chat + ids[:-1]]))
            torch.testing.assert_close(states, hidden[0, len(chat) - 1:], atol=1e-4, rtol=1e-4)
            if follow_up:  # the end token goes in once, whether the answer ended or was cut
                chat += ids + (follow_up[1:] if ids[-1] == eos_id else follow_up)


def test_teacher_forced_states_equal_those_captured_while_generating():
    """One right-padded forward over context + answer gives each answer token's hidden state as the
    batched, cached generation saw it, first and second turns alike (an off-by-one shifts every target)."""
    model, tok = tiny_gpt(config=CHAT), ByteChat()
    rows = prompt_rows(6)
    chats = [conversation(tok, row) for row in rows]
    follow_ups = [gen.follow_up_ids(tok, row) for row in rows]
    sequences, n_answer, captured = [], [], []
    for row, chat, turns in zip(rows, chats, gen.batched_generate(model, chats, 12, eos_id=2, follow_ups=follow_ups)):
        for turn, (ids, states) in enumerate(turns, 1):
            context = chat if turn == 1 else conversation(tok, row, turns[0][0])
            sequences.append(context + ids), n_answer.append(len(ids)), captured.append(states)
    assert len(sequences) == 9  # six first turns, three second ones
    recomputed = teacher_forced_states(model, sequences, n_answer, max_tokens=400)  # several batches
    for r, c in zip(recomputed, captured):
        torch.testing.assert_close(r.float(), c.to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)


def test_a_second_turn_follows_the_models_own_first_answer():
    """The follow-up comes after the first answer, closed by the end token even when it was cut at
    max_answer_tokens, in the chat template's own layout."""
    tok, row = ByteChat(), {"category": "chat", "prompt": "Hi", "follow_up": "More"}
    first = conversation(tok, row)
    assert first[-len(tok.encode("<|im_start|>assistant\n")):] == tok.encode("<|im_start|>assistant\n")
    second_turn = tok.encode("<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n")
    assert conversation(tok, row, tok.encode("Hello<|im_end|>")) == first + tok.encode("Hello") + second_turn
    assert conversation(tok, row, tok.encode("Hel")) == first + tok.encode("Hel") + second_turn


def test_a_prompt_row_may_name_its_system_prompt():
    tok = ByteChat()
    assert conversation(tok, {"prompt": "Hi"}) == tok.encode(
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert conversation(tok, {"prompt": "Hi", "system": "Be brief."}) == tok.encode(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")  # as built
    return str(path)


def test_shards_resume_without_redoing_or_duplicating_work(tmp_path, monkeypatch):
    """A run killed after two of three shards leaves two whole shards; the rerun makes only the third,
    and the three hold every first turn and every follow-up exactly once, as one uninterrupted run does."""
    model, tok = tiny_gpt(config=CHAT), ByteChat()
    monkeypatch.setattr(gen, "SHARD_ROWS", 4)
    rows, cfg = prompt_rows(12), answer_config(tmp_path)
    made, answer_rows = [], gen.answer_rows

    def killed_at_the_third(model, tokenizer, shard, cfg, bar):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(min(shard))
        return answer_rows(model, tokenizer, shard, cfg, bar)
    monkeypatch.setattr(gen, "answer_rows", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        gen.generate_shards(model, tok, rows, cfg)
    assert sorted(os.listdir(cfg.answers_dir)) == ["00000.npz", "00001.npz"]
    made.clear()
    monkeypatch.setattr(gen, "answer_rows", lambda *args: (made.append(min(args[2])), answer_rows(*args))[1])
    paths = gen.generate_shards(model, tok, rows, cfg)
    assert made == [8] and len(paths) == 3
    done = all_answers(cfg.answers_dir)
    assert sorted(done) == sorted({(i, 1) for i in range(12)} | {(i, 2) for i in range(1, 12, 2)})
    fresh = answer_config(tmp_path / "fresh")
    gen.generate_shards(model, tok, rows, fresh)
    for name in os.listdir(fresh.answers_dir):
        assert read_shard(os.path.join(fresh.answers_dir, name)) == read_shard(os.path.join(cfg.answers_dir, name))
    made.clear()
    gen.generate_shards(model, tok, rows, cfg)  # all there: nothing to do
    assert made == []
    with pytest.raises(ValueError, match="other prompts"):  # a changed prompt file must not reuse shards
        gen.generate_shards(model, tok, prompt_rows(13)[1:], cfg)


def test_a_killed_shard_write_leaves_no_half_shard(tmp_path, monkeypatch):
    """A write cut off half way leaves no shard under its name (only a temporary file, which the next
    run ignores), so the rerun makes that shard again, whole."""
    model, tok = tiny_gpt(config=CHAT), ByteChat()
    cfg, savez = answer_config(tmp_path), np.savez

    def cut_off(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt
    monkeypatch.setattr(gen.np, "savez", cut_off)
    with pytest.raises(KeyboardInterrupt):
        gen.generate_shards(model, tok, prompt_rows(5), cfg)
    assert not any(name.endswith(".npz") for name in os.listdir(cfg.answers_dir))
    monkeypatch.setattr(gen.np, "savez", savez)
    gen.generate_shards(model, tok, prompt_rows(5), cfg)
    assert sorted(all_answers(cfg.answers_dir)) == sorted([(i, 1) for i in range(5)] + [(1, 2), (3, 2)])


def test_shard_positions_line_up_with_their_targets(tmp_path):
    """Teacher-forced positions from a shard: each row's hidden state predicts its column-0 target (the
    backbone's own greedy token), categories and turns follow the prompt rows, and every 1/holdout-th
    prompt line, both turns, is held out. A shard of another backbone, or of other prompts, is refused."""
    model, tok = tiny_gpt(config=CHAT), ByteChat()
    rows = prompt_rows(10)
    rows[3]["prompt"] += "\u2028Real prompts hold line separators."  # str.splitlines() would cut the line there
    rows[5]["system"] = "Answer in one short sentence."  # its answer starts later than under the default prompt
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    gen.generate_shards(model, tok, rows, answer_config(tmp_path))
    cfg = TrainConfig(prompts=prompts, answers_dir=str(tmp_path / "answers"), out_dir=str(tmp_path / "run"),
                      n_heads=2, holdout=0.25, hidden_dtype="float32")
    train, held = get_data(model, tok, cfg)
    for data in (train, held):
        assert torch.equal(model.lm_head(data["hidden"].float()).argmax(-1), data["targets"][:, 0])
    _, answers = read_shard(str(tmp_path / "answers" / "00000.npz"))
    assert len(held["targets"]) == sum(len(ids) for (line, _), ids in answers.items() if line % 4 == 0)
    assert set(held["category"].tolist()) == {0, 4} and set(train["turn"].tolist()) == {1, 2}
    assert os.path.exists(tmp_path / "run" / "hidden" / "00000.pt")  # cached for the next run
    shard = str(tmp_path / "answers" / "00000.npz")
    with pytest.raises(ValueError, match="another backbone"):
        shard_data(tiny_gpt(seed=1, config=CHAT), tok, rows, shard, cfg)
    with pytest.raises(ValueError, match="other prompts"):
        shard_data(model, tok, prompt_rows(11)[1:], shard, cfg)


def test_prompts_that_overlap_a_benchmark_prompt_are_refused(tmp_path, monkeypatch):
    """Any turn sharing an 8-word run with a benchmark turn, or holding a short one whole, is refused."""
    monkeypatch.setattr(gen, "benchmark_prompts", lambda: ["Write a haiku about the first snow of the winter.",
                                                           "Make it rhyme."])
    assert gen.overlaps_benchmark(["Please write a HAIKU about the first snow of the winter, thanks",
                                   "Could you make it rhyme?", "Write a haiku about autumn.", "make it"]) == \
        ["Please write a HAIKU about the first snow of the winter, thanks", "Could you make it rhyme?", "make it"]
    clean = prompt_rows(3)
    assert gen.load_prompts(write_prompts(tmp_path / "clean.jsonl", clean)) == clean
    for bad in ({"prompt": "Hello", "follow_up": "Now make it rhyme."},
                {"prompt": "write a haiku about the first snow of the winter"}):
        with pytest.raises(ValueError, match="overlap a benchmark prompt"):
            gen.load_prompts(write_prompts(tmp_path / "bad.jsonl", clean + [{"category": "chat", **bad}]))
    with pytest.raises(ValueError, match="is not one of"):
        gen.load_prompts(write_prompts(tmp_path / "bad.jsonl", [{"category": "poetry", "prompt": "Hi"}]))


def test_the_committed_prompt_mix_is_disjoint_from_the_benchmarks_and_balanced():
    rows = gen.load_prompts("data/train_prompts.jsonl")  # raises on any overlap
    first_round = rows[:8195]  # what shards 0-31 answer, as the shipped heads saw it
    counts = [sum(r["category"] == c for r in first_round) for c in CATEGORIES]
    assert min(counts) >= 400 and max(counts) <= 1200  # balanced by task type, not 83% maths and trivia
    assert not any("system" in r for r in first_round)
    assert all(r["license"] and r["source"] for r in rows)
    assert 0.4 < sum("follow_up" in r for r in rows) / len(rows) < 0.8
    held_out = {r["prompt"] for line, r in enumerate(rows) if line % round(1 / TrainConfig().holdout) == 0}
    again = [r for r in rows if "system" in r]  # second answers to a request, under another system prompt
    assert again and not any(r["prompt"] in held_out for r in again)  # held-out requests are never trained on


def test_accuracy_by_category_counts_only_that_categorys_positions():
    ranks = torch.tensor([[0, 0], [3, NO_TARGET], [0, 7], [9, 0]], dtype=torch.uint8)
    held_out = {"category": torch.tensor([0, 0, 2, 2], dtype=torch.uint8), "turn": torch.tensor([1, 2, 1, 2])}
    by_category = accuracy_by_category(ranks, held_out)
    assert list(by_category) == [CATEGORIES[0], CATEGORIES[2], "second turns"]
    assert by_category[CATEGORIES[0]] == {"head1": {"top1": 0.5, "top5": 1.0}, "head2": {"top1": 1.0, "top5": 1.0}}
    assert by_category[CATEGORIES[2]]["head1"] == {"top1": 0.5, "top5": 0.5}
    assert by_category["second turns"]["head2"] == {"top1": 1.0, "top5": 1.0}


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


@pytest.mark.parametrize("spec,draft_vocab", [({}, 0), (dict(reads_root=True), 0), (dict(reads_root=True), 128),
                                              (dict(link="token"), 128)])
def test_brief_training_raises_accepted_length(spec, draft_vocab):
    """Heads trained on a predictable backbone must be accepted: tau well above 1 — and the
    backbone stays bit-identical through training. Also with a draft vocabulary of half the tokens
    (the ones the answers use), which the loss and the drafts must both index the same way."""
    model = counting_backbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(n_heads=3, batch_size=64, lr=3e-3, warmup=10, epochs=20)
    prompts = torch.randint(33, 126, (48, 2)).tolist()
    answers = [turns[0] for turns in gen.batched_generate(model, prompts, 24, eos_id=1)]
    data = {"hidden": torch.cat([states for _, states in answers]),
            "targets": torch.cat([head_targets(torch.tensor(ids), 3) for ids, _ in answers])}
    heads = CerberusHeads(TINY, n_heads=3, **spec)
    if draft_vocab:
        heads.draft_over(draft_vocabulary(data["targets"], draft_vocab, TINY.vocab_size))
    prompt, tree = [40, 41, 42], Tree.chain(3)
    _, untrained = generate(model, prompt, 30, heads=heads, tree=tree)
    train_heads(heads, model.lm_head.weight, data, cfg)
    ids, trained = generate(model, prompt, 30, heads=heads, tree=tree)
    assert ids == generate(model, prompt, 30)[0]
    assert untrained.tokens_per_step < 1.5 and trained.tokens_per_step > 2.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_killed_training_resumes_to_the_heads_of_one_uninterrupted_run(tmp_path, monkeypatch):
    """A run killed after its second save and run again ends with the same heads, bit for bit, as a run
    that was never stopped; a rerun with other settings is refused, naming what changed."""
    model = tiny_gpt()
    data = {"hidden": torch.randn(200, TINY.n_embd), "targets": torch.randint(0, TINY.vocab_size, (200, 4))}
    cfg = TrainConfig(n_heads=3, batch_size=16, warmup=3, checkpoint_every=4)  # 12 steps, saved at 4, 8, 12

    def train_fresh_heads(cfg, state_path=None):
        torch.manual_seed(1)
        heads = CerberusHeads(TINY, n_heads=3, link="token", reads_root=True)
        return train_heads(heads, model.lm_head.weight, data, cfg, state_path=state_path)

    whole = train_fresh_heads(cfg)
    path = str(tmp_path / "cerberus.train_state.pt")
    losses_computed, cross_entropy = [], F.cross_entropy

    def killed_in_step_10(*args, **kwargs):  # three heads, three losses a step
        losses_computed.append(1)
        if len(losses_computed) > 9 * 3:
            raise KeyboardInterrupt
        return cross_entropy(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(F, "cross_entropy", killed_in_step_10)
        with pytest.raises(KeyboardInterrupt):
            train_fresh_heads(cfg, path)
    assert torch.load(path, weights_only=True)["step"] == 8
    resumed = train_fresh_heads(cfg, path)
    assert torch.load(path, weights_only=True)["step"] == 12
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"other settings \(lr 0.001 -> 0.002\); rerun with its settings"):
        train_fresh_heads(dataclasses.replace(cfg, lr=0.002), path)
    state = torch.load(path, weights_only=True)  # saved by a version that had a setting this one dropped
    state["run"]["dropped_flag"] = 1
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"other settings \(dropped_flag 1 -> None\)"):
        train_fresh_heads(cfg, path)
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        train_fresh_heads(cfg, path)


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


def test_fine_tuning_starts_from_a_folders_heads_of_the_same_spec(tmp_path):
    model = tiny_gpt()
    saved = CerberusHeads(TINY, n_heads=2, reads_root=True, link="token")
    with torch.no_grad():
        for p in saved.parameters():
            p.normal_(0, 0.1)
    save_heads(str(tmp_path / "cerberus.pt"), saved.draft_over([2, 3, 255]), model, {})
    fresh = CerberusHeads(TINY, n_heads=2, reads_root=True, link="token")
    fresh.load_state_dict(starting_weights(str(tmp_path), fresh, model))
    for a, b in zip(saved.parameters(), fresh.parameters()):
        torch.testing.assert_close(a.half().float(), b)
    assert fresh.vocab is None  # the draft vocabulary comes from the new data, not the old heads
    with pytest.raises(ValueError, match="pass --heads to match"):
        starting_weights(str(tmp_path), CerberusHeads(TINY, n_heads=2), model)
    with pytest.raises(ValueError, match="no heads checkpoint"):
        starting_weights(str(tmp_path / "elsewhere"), fresh, model)


def test_zero_epochs_leave_the_starting_heads_as_they_are(tmp_path):
    """--epochs=0 takes no step: the --init_from heads come back bit for bit, to be evaluated and calibrated
    on this data (a smaller draft vocabulary, another device), and no training state is written."""
    model = tiny_gpt()
    heads = perturb(CerberusHeads(TINY, n_heads=2, reads_root=True, link="token"), 0)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    data = {"hidden": torch.randn(64, TINY.n_embd), "targets": torch.randint(0, TINY.vocab_size, (64, 3))}
    state_path = tmp_path / "cerberus.train_state.pt"
    cfg = TrainConfig(n_heads=2, batch_size=16, epochs=0)
    train_heads(heads, model.lm_head.weight, data, cfg, state_path=str(state_path))
    for k, v in heads.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not state_path.exists()


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
    wider = {**data, "targets": torch.cat([targets, torch.full((2, 2), 9)], dim=1)}  # targets for 4 heads
    assert torch.equal(target_ranks(heads, model.lm_head.weight, wider, 2), ranks)  # a 2-head set reads its 2


def test_cli_help_lists_every_flag_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_cli(TrainConfig, ["--recipe=full", "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == len(dataclasses.fields(TrainConfig))
    assert any(line.split() == ["--draft_vocab=4096", "heads", "draft", "over", "the", "D", "tokens", "the", "backbone",
                                "writes", "most", "often;", "0", "=", "all", "V"] for line in lines)
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


def test_auto_dtypes_are_bfloat16_only_where_native(monkeypatch):
    """--hidden_dtype/--train_dtype=auto resolve before training, so the checkpoint records what ran:
    bfloat16 where the device has it natively, float32 where it would be emulated. Explicit names stay."""
    import train
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(train, "native_bfloat16", lambda device, native=native: native)
        cfg = train.concrete_dtypes(TrainConfig(), "cpu")
        assert (cfg.hidden_dtype, cfg.train_dtype) == (expected, expected)
        assert train.concrete_dtypes(TrainConfig(train_dtype="float32"), "cpu").train_dtype == "float32"
        assert train.resolve_dtype(gen.AnswerConfig().dtype, "cpu") == expected  # the generator's default too
    with pytest.raises(ValueError, match="unknown train_dtype 'fp16'"):
        train.concrete_dtypes(TrainConfig(train_dtype="fp16"), "cpu")


def test_torchrun_ddp_on_two_cpu_processes(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node=2 train.py` trains with DDP (gloo), each rank on its own answer shard,
    and rank 0 writes the heads."""
    write_gguf(tmp_path / "tiny.gguf", tiny_gpt(config=CHAT), special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    model, tok = load_gguf(str(tmp_path / "tiny.gguf"))
    monkeypatch.setattr(gen, "SHARD_ROWS", 8)
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_rows(16))
    gen.generate_shards(model, tok, gen.load_prompts(prompts), answer_config(tmp_path, max_answer_tokens=8))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), f"--gguf={tmp_path / 'tiny.gguf'}", f"--out_dir={out}",
           f"--prompts={prompts}", f"--answers_dir={tmp_path / 'answers'}", "--n_shards=0", "--holdout=0.25",
           "--batch_size=8", "--heads=cerberus", "--n_heads=2", "--hidden_dtype=float32", "--draft_vocab=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["cerberus.pt", "cerberus.train_state.pt", "hidden", "metrics.json"]
    assert sorted(os.listdir(out / "hidden")) == ["00000.pt", "00001.pt"]  # one shard per rank
    heads, ckpt = load_heads(str(out / "cerberus.pt"), model)
    assert heads.n_heads == 2 and "threshold" in ckpt["gate"] and len(heads.vocab) == 100
    assert ckpt["train_config"]["train_dtype"] in ("float32", "bfloat16")  # "auto", resolved for this CPU
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["heads"]["cerberus"]["held_out_by_category"]) <= set(CATEGORIES) | {"second turns"}


def test_fastest_runs_its_untimed_call_ahead_of_every_timed_one():
    """draft_costs times each draft right after a backbone forward (`before`), as inside a decode step: the
    forward must run before every timed call, never inside the warm-up's or in place of one."""
    log = []
    best = fastest({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, rounds=2,
                   before=lambda: log.append("forward"))
    assert log == ["a", "b"] + ["forward", "a", "forward", "b"] * 2 and set(best) == {"a", "b"}


def test_calibration_gates_off_the_hard_positions():
    """Where drafts are right only at low entropy and a tree step costs 1.5 AR steps, the calibrated
    gate must go parallel below some threshold and stay AR above it — and beat both extremes."""
    torch.manual_seed(0)
    n = 4000
    gate_entropy = torch.rand(n) * 4  # nats
    easy = gate_entropy < 1.0  # heads 1 and 2 right (rank 0) exactly at the easy positions
    ranks = torch.where(easy[:, None], 0, 200).repeat(1, 2).to(torch.uint8)
    costs = {1: 1.0, 2: 1.4, 3: 1.5, 4: 1.6}
    gate = calibrate({"ranks": ranks, "entropy": gate_entropy}, costs, drafting={1: 0.05, 2: 0.1})
    assert 0.5 < gate["threshold"] < 2.0 and gate["tree"] == [[0], [0, 0]]
    assert gate["est_speedup"] > 1.2  # gated: 1.30x; always AR: 1.00x; always parallel: 1.5 / 1.6 = 0.94x
    curve = gate["entropy_curve"]
    assert curve[0]["accepted"] == 2.0 and curve[-1]["accepted"] == 0.0


def test_calibration_walks_answers_and_picks_the_tree_that_pays_on_its_slowest_category():
    """Answers of 8 tokens: seven of every eight easy (heads 1 and 2 always right), one hard (head 1 right on
    its first four rows, head 2 never). Walking them as decoding does, the 3-node chain takes 3 steps on an
    easy answer, the 2-node tree 4, and both 6 on a hard one, where the chain's dearer steps lose. Over all
    answers the chain is fastest; given the categories, the pick is the 2-node tree."""
    row, answer = torch.arange(64) % 8, torch.arange(64) // 8  # 8 answers of 8 rows
    hard = answer == 7
    head1 = torch.where(hard & (row >= 4), 200, 0).masked_fill(row == 7, NO_TARGET)  # no token after the last
    head2 = torch.where(hard, 200, 0).masked_fill(row >= 6, NO_TARGET)
    held_out = {"ranks": torch.stack([head1, head2], dim=1).to(torch.uint8), "entropy": torch.ones(64)}
    costs, drafting = {1: 1.0, 2: 1.05, 3: 1.25}, {1: 0.01, 2: 0.02}  # a step: 2 nodes 1.06, chain 1.27
    gate = calibrate(held_out, costs, drafting)
    assert gate["tree"] == [[0], [0, 0]] and gate["est_speedup"] == pytest.approx(64 / (27 * 1.27))
    gate = calibrate({**held_out, "category": hard.to(torch.uint8)}, costs, drafting)
    assert gate["tree"] == [[0]] and gate["threshold"] == math.inf  # the chain: 8 / (6 * 1.27) on the hard one
    assert gate["est_speedup_slowest_category"] == pytest.approx(8 / (6 * 1.06))
    assert gate["est_speedup"] == pytest.approx(64 / (34 * 1.06)) and gate["est_tau_parallel"] == pytest.approx(64 / 34)


def test_stored_calibration_keeps_whole_answers_evenly_spaced_up_to_its_cap(monkeypatch):
    """A checkpoint keeps about CALIBRATION_POSITIONS held-out positions: whole answers (the calibration walks
    them), spread over all of them, each position's entropies and ranks together; fewer are kept whole."""
    import train
    monkeypatch.setattr(train, "CALIBRATION_POSITIONS", 9)
    ranks = torch.zeros(18, 2, dtype=torch.uint8)
    ranks[2::3, 0] = NO_TARGET  # six answers of three rows
    calibration = {"entropy": torch.arange(18.0), "ranks": ranks}
    thinned = calibration_sample(calibration)
    assert thinned["entropy"].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]  # answers 0, 2 and 4
    assert thinned["ranks"][:, 0].tolist() == [0, 0, NO_TARGET] * 3
    few = {name: values[:9] for name, values in calibration.items()}
    assert all(torch.equal(calibration_sample(few)[name], few[name]) for name in few)


def test_calibration_picks_the_signal_that_separates_and_prices_a_head1_gate():
    """Given both signals, the gate reads the one that predicts acceptance (here head 1's). A head-1 gate
    runs the heads before deciding, so when drafts cost as much as a forward no threshold of it pays:
    the choice is then AR only (threshold 0, no heads), at exactly AR's speed."""
    torch.manual_seed(0)
    n = 4000
    head1 = torch.rand(n) * 4
    ranks = torch.where(head1[:, None] < 1.0, 0, 200).repeat(1, 2).to(torch.uint8)
    held_out = {"ranks": ranks, "entropy": torch.rand(n) * 4, "head1_entropy": head1}  # the backbone's says nothing
    costs = {1: 1.0, 2: 1.4, 3: 1.5, 4: 1.6}
    gate = calibrate(held_out, costs, drafting={1: 0.05, 2: 0.1})
    assert gate["gate_on"] == "head1" and 0.5 < gate["threshold"] < 2.0 and gate["est_speedup"] > 1.2
    gate = calibrate(held_out, costs, drafting={1: 1.0, 2: 1.0})
    assert gate["threshold"] == 0.0 and gate["est_speedup"] == pytest.approx(1.0)
