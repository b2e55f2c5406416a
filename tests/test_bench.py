"""bench.py on a tiny random model: the JSON line, lossless arms, repeated rounds and their spread, the
noise warnings, prompt-file parsing and its errors."""
import dataclasses
import json
import math

import pytest
import torch

import bench
from bench import BenchConfig, load_prompts
from cerberus import CerberusHeads, MedusaHeads, Tree, save_heads
from conftest import TINY, perturb, tiny_gpt

CONFIG = dataclasses.replace(TINY, block_size=512)  # room for a chat-templated prompt of ~150 bytes
QUESTIONS = [  # MT-Bench's format: only the first turn is benchmarked
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 2, "category": "math", "turns": ["What is 12 times 7?", "And 13 times 7?"]},
]
JSON_KEYS = {"device", "dtype", "compile", "tree", "n_prompts", "max_new_tokens", "repeat", "arms", "setup_s",
             "load_before", "load_after", "noise_warnings", "head_accuracy", "head_accuracy_by_category", "roofline"}
ARM_KEYS = {"tok_s", "speedup", "speedup_rounds", "speedup_spread", "tau", "match_rate", "ar_fraction", "ms_per_step"}


class ByteTokenizer:
    """Bytes as token ids, for the 256-token model; "<|im_end|>" is one token (id 2), as in SmolLM2."""

    def encode(self, text, allowed_special=()):
        return list(text.replace("<|im_end|>", "\x02").encode())


def gate(tree):
    return {"tree": tree, "threshold": 2.0, "gate_on": "backbone", "est_speedup": 1.0,
            "step_costs": {"1": 0.01, "4": 0.02}}


@pytest.fixture
def tiny(tmp_path):
    """A tiny model, its tokenizer, a head set of each kind and a two-question prompts file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matmuls this small gain nothing from threads, and stall ~15 ms when the cores are busy
    model = tiny_gpt(0, CONFIG)
    head_sets = {"medusa": (perturb(MedusaHeads(CONFIG, n_heads=3), 0), {"gate": gate([[0], [1], [0, 0]])}),
                 "cerberus": (perturb(CerberusHeads(CONFIG, n_heads=3), 1), {"gate": gate([[0], [0, 0], [0, 0, 0]])})}
    prompts = tmp_path / "question.jsonl"
    prompts.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    yield model, ByteTokenizer(), head_sets, str(prompts)
    torch.set_num_threads(threads)


def test_every_arm_reproduces_ar_and_json_has_the_keys(tiny, capsys):
    """Guards the benchmark's own claim: in float32 every arm emits AR's tokens (match 1.0), and the
    last stdout line is the JSON that scripts parse."""
    model, tokenizer, head_sets, prompts = tiny
    cfg = BenchConfig(prompts=prompts, max_new_tokens=12, draft_dtype="float32")
    summary = bench.bench(cfg, model, tokenizer, head_sets)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(summary))
    assert JSON_KEYS <= summary.keys() and summary["n_prompts"] == 2
    assert list(summary["arms"]) == ["ar", "medusa", "cerberus", "cerberus_nogate"]
    for arm, r in summary["arms"].items():
        assert ARM_KEYS <= r.keys(), arm
        assert r["match_rate"] == 1.0, arm
        assert r["tok_s"] * r["ms_per_step"] / 1e3 == pytest.approx(r["tau"]), arm  # same decode time, same steps
        assert set(r["by_category"]) == {"writing", "math"}
    assert summary["arms"]["ar"]["tau"] == 1.0 and summary["arms"]["ar"]["ar_fraction"] == 1.0
    assert summary["arms"]["cerberus_nogate"]["ar_fraction"] == 0.0  # threshold inf: never AR
    assert set(summary["head_accuracy"]) == {"medusa", "cerberus"}
    assert 0.0 <= summary["head_accuracy"]["cerberus"]["head1"]["top1"] <= 1.0
    assert summary["repeat"] == 1 and summary["arms"]["cerberus"]["speedup_spread"] == 0.0


def test_repeated_rounds_give_a_median_a_spread_and_accuracy_per_category(tiny):
    """--repeat=R times every arm R times over the whole prompt set: the reported speedup is the median
    of the rounds' speedups and the spread their (max - min) / median; every round reproduces AR. Head
    accuracy comes per category as well as overall."""
    model, tokenizer, head_sets, prompts = tiny
    cfg = BenchConfig(prompts=prompts, max_new_tokens=8, draft_dtype="float32", repeat=2)
    summary = bench.bench(cfg, model, tokenizer, head_sets)
    assert summary["repeat"] == 2 and isinstance(summary["noise_warnings"], list)
    for arm, r in summary["arms"].items():
        lo, hi = min(r["speedup_rounds"]), max(r["speedup_rounds"])
        assert len(r["speedup_rounds"]) == 2 and r["match_rate"] == 1.0, arm
        assert r["speedup"] == pytest.approx((lo + hi) / 2) and r["speedup_spread"] == pytest.approx((hi - lo) / r["speedup"])
    assert summary["arms"]["ar"]["new_tokens"] == 2 * 2 * 8  # both prompts, both rounds (no EOS in a byte model)
    by_category = summary["head_accuracy_by_category"]
    assert set(by_category) == {"medusa", "cerberus"} and set(by_category["cerberus"]) == {"writing", "math"}
    assert set(by_category["cerberus"]["math"]) == {"head1", "head2", "head3"}
    assert set(by_category["medusa"]["writing"]["head1"]) == {"top1", "top5"}


def test_noise_warnings_name_spread_rounds_and_a_busy_machine(capsys):
    """Guards the benchmark's statement of its own noise: rounds that disagree by more than NOISY_SPREAD
    of their median, or a load beyond the benchmark's own threads above BUSY_LOAD per core, are warned
    about; a quiet machine and agreeing rounds are not."""
    def arms(rounds):
        median = sorted(rounds)[len(rounds) // 2]
        return {"ar": {"speedup_rounds": [1.0] * len(rounds), "speedup_spread": 0.0},
                "cerberus": {"speedup_rounds": rounds, "speedup_spread": (max(rounds) - min(rounds)) / median}}

    cpu, cores = torch.device("cpu"), bench.os.cpu_count()
    own = min(torch.get_num_threads(), cores)  # the load this benchmark itself adds on a CPU
    assert bench.noise_warnings(arms([1.30, 1.32, 1.35]), 0.0, float(own), cpu) == []
    assert "medians of 3 rounds" in capsys.readouterr().out
    noisy = bench.noise_warnings(arms([0.9, 1.3, 1.5]), 0.0, 0.0, cpu)
    assert len(noisy) == 1 and "cerberus's speedup ranged 0.90x..1.50x" in noisy[0]
    busy = bench.noise_warnings(arms([1.3]), 1.0 * cores, own + 1.0 * cores, cpu)
    assert len(busy) == 2 and "before the benchmark started" in busy[0] and "during the timed rounds" in busy[1]
    assert "WARNING: other work" in capsys.readouterr().out


def test_an_ungated_cerberus_arm_is_not_timed_twice(tiny, capsys, monkeypatch):
    """With threshold inf the gate never chooses AR, so cerberus_nogate is the cerberus arm's very
    computation: it runs once and is reported under both names, saying so; with a finite threshold
    both run (the test above)."""
    model, tokenizer, head_sets, prompts = tiny
    timed_arms, run_arms = [], bench.run_arms

    def recording_run_arms(model, prompts, settings):
        timed_arms.append(list(settings))
        return run_arms(model, prompts, settings)

    monkeypatch.setattr(bench, "run_arms", recording_run_arms)
    cfg = BenchConfig(prompts=prompts, max_new_tokens=8, draft_dtype="float32", threshold=math.inf)
    summary = bench.bench(cfg, model, tokenizer, head_sets)
    assert timed_arms == [["ar", "medusa", "cerberus"]]
    nogate = summary["arms"]["cerberus_nogate"]
    assert nogate.pop("same_as") == "cerberus" and nogate == summary["arms"]["cerberus"]
    assert "cerberus_nogate is cerberus here" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit internals that inductor imports
def test_compiled_arms_reproduce_ar_and_report_one_graph_per_step_kind_and_prompt_length(tiny):
    """--compile: each decoder's step compiled whole (token-linked heads here, the kind with a loop);
    the tokens stay AR's, compile_stats come from torch's counters: one graph for AR's decoder, one
    per step kind for Cerberus's and one prompt forward that both share (both prompts pad to one length),
    no break, nothing compiled while timed."""
    model, tokenizer, head_sets, prompts = tiny
    token_linked = perturb(CerberusHeads(CONFIG, n_heads=3, link="token"), 2)
    head_sets = dict(head_sets, cerberus=(token_linked, head_sets["cerberus"][1]))
    cfg = BenchConfig(prompts=prompts, max_new_tokens=12, draft_dtype="float32", compile=True, arms="ar,cerberus")
    summary = bench.bench(cfg, model, tokenizer, head_sets)
    assert summary["compile"] is True
    assert all(r["match_rate"] == 1.0 for r in summary["arms"].values())
    assert summary["compile_stats"] == {"graphs": 4, "graph_breaks": 0, "recompiles": 0, "cudagraph_skips": None}


def test_sampled_arms_draw_ar_samplings_tokens(tiny, capsys):
    """--temperature: every arm samples with the same seed, so each matches AR (the tiny model's logits are
    the same for 1 and N tokens to far below any CDF gap); the header names the sampling rule."""
    model, tokenizer, head_sets, prompts = tiny
    cfg = BenchConfig(prompts=prompts, max_new_tokens=12, draft_dtype="float32", temperature=0.8, top_p=0.9, seed=3)
    summary = bench.bench(cfg, model, tokenizer, head_sets)
    assert all(r["match_rate"] == 1.0 for r in summary["arms"].values())
    assert summary["sampling"] == "temperature 0.8 top_k 0 top_p 0.9 seed 3" and summary["compile_stats"] is None
    assert "every arm draws AR's tokens" in capsys.readouterr().out


def test_roofline_counts_each_weight_once_and_knows_the_cards():
    """Guards the MBU arithmetic: a tied lm_head is read once, an untied embedding only row by row,
    plus the K/V of the context; unknown devices get no roofline rather than a guessed one."""
    model = tiny_gpt(0, CONFIG)  # untied, float32
    params = sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    kv = 2 * CONFIG.n_layer * CONFIG.n_kv_head * CONFIG.head_dim * 100
    roof = bench.roofline(model, "NVIDIA H100 80GB HBM3", {"tok_s": 1000.0}, mean_context=100)
    assert roof["bytes_per_ar_step"] == 4 * (params + kv)
    assert roof["ar_roofline_tok_s"] == round(3.35e12 / roof["bytes_per_ar_step"], 1)
    assert roof["ar_mbu"] == round(1000.0 * 4 * (params + kv) / 3.35e12, 4)
    assert bench.roofline(model, "NVIDIA H200", {"tok_s": 1.0}, 100)["peak_tb_s"] == 4.8
    assert bench.roofline(model, "NVIDIA H100 PCIe", {"tok_s": 1.0}, 100)["peak_tb_s"] == 2.0
    assert bench.roofline(model, "AMD EPYC (2 cores)", {"tok_s": 1.0}, 100) is None


def test_cpu_name_says_what_the_cpu_can_do():
    """Logs from days on different hosts must be told apart: the header names the CPU's vector extensions."""
    name = bench.device_name(torch.device("cpu"))
    assert torch.backends.cpu.get_cpu_capability() in name and f"{torch.get_num_threads()} torch threads" in name


def test_main_prints_json_last(tiny, tmp_path, capsys, monkeypatch):
    """Guards the CLI path end to end: flag spellings, a bare --flag, heads loaded from a directory, a gate
    on head 1's entropy (lossless too)."""
    model, tokenizer, head_sets, prompts = tiny
    for name, (heads, ckpt) in head_sets.items():
        save_heads(str(tmp_path / f"{name}.pt"), heads, model, ckpt)
    monkeypatch.setattr(bench, "load_smollm2", lambda: (model, tokenizer))
    bench.main([f"--prompts={prompts}", f"--heads={tmp_path}", "--max-new-tokens=6", "--n-prompts=1",
                "--arms=ar,cerberus", "--tree=chain2", "--gate_on=head1", "--threshold=3", "--calibrate"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_prompts"] == 1 and summary["tree"] == "chain2" and list(summary["arms"]) == ["ar", "cerberus"]
    assert summary["arms"]["cerberus"]["match_rate"] == 1.0


def test_load_prompts_takes_first_turns_with_chat_template(tiny):
    _, tokenizer, _, prompts = tiny
    loaded = load_prompts(prompts, tokenizer, 0)
    assert [p["category"] for p in loaded] == ["writing", "math"]
    text = bytes(loaded[1]["ids"]).decode()
    assert "What is 12 times 7?" in text and "13 times" not in text and text.endswith("assistant\n")
    assert len(load_prompts(prompts, tokenizer, 1)) == 1


@pytest.mark.parametrize("line", ['{"question_id": 3, "turns": ["ok"]', '{"question_id": 3, "category": "math"}'])
def test_malformed_prompts_file_names_file_and_line(tiny, tmp_path, line):
    _, tokenizer, _, prompts = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(prompts).read() + line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3"):
        load_prompts(str(bad), tokenizer, 1)


def test_unknown_arm_gate_or_device_is_a_clear_error(tiny):
    model, tokenizer, head_sets, prompts = tiny
    with pytest.raises(ValueError, match="cerberus_nogate"):
        bench.bench(BenchConfig(arms="ar,eagle", prompts=prompts), model, tokenizer, head_sets)
    with pytest.raises(ValueError, match="'backbone' .* or 'head1'"):
        bench.bench(BenchConfig(gate_on="head2", prompts=prompts), model, tokenizer, head_sets)
    with pytest.raises(ValueError, match="--draft_dtype=float16: the heads draft in float32 or bfloat16"):
        bench.bench(BenchConfig(draft_dtype="float16", prompts=prompts), model, tokenizer, head_sets)
    with pytest.raises(ValueError, match="--repeat=0: the timed rounds must be 1 or more"):
        bench.bench(BenchConfig(repeat=0, prompts=prompts), model, tokenizer, head_sets)
    with pytest.raises(ValueError, match="--gate_on=head1 needs --threshold"):
        bench.bench(BenchConfig(gate_on="head1", arms="ar,cerberus", prompts=prompts), model, tokenizer, head_sets)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU; use --device=cpu"):
            bench.bench(BenchConfig(device="cuda", prompts=prompts), model, tokenizer, head_sets)


def test_missing_heads_file_is_a_value_error(tiny, tmp_path):
    model, tokenizer, _, prompts = tiny
    with pytest.raises(ValueError, match="no heads checkpoint"):
        bench.bench(BenchConfig(prompts=prompts, heads=str(tmp_path), max_new_tokens=4), model, tokenizer)


def test_recalibration_uses_the_stored_held_out_data_and_leaves_the_checkpoint_alone(tiny):
    """bench re-chooses tree and threshold for this device's step costs from the checkpoint's
    held-out ranks and entropies; the caller's checkpoint dict keeps its own gate."""
    model, _, head_sets, _ = tiny
    heads, ckpt = head_sets["cerberus"]
    torch.manual_seed(0)
    ckpt = {**ckpt, "calibration": {"ranks": torch.randint(0, 3, (400, 3), dtype=torch.uint8),
                                    "entropy": torch.rand(400).half() * 4}}
    costs = {1: 0.010, 2: 0.011, 4: 0.012, 8: 0.014}  # parallel steps almost free: a tree pays
    new = bench.recalibrate({"cerberus": (heads, ckpt)}, costs, model)
    gate = new["cerberus"][1]["gate"]
    assert ckpt["gate"]["threshold"] == 2.0 and gate is not ckpt["gate"]
    assert gate["step_costs"] == {str(k): v for k, v in costs.items()} and len(gate["tree"]) + 1 in costs


def test_a_tree_given_by_flag_gets_a_threshold_of_its_own(tiny):
    """--tree fixes the tree; bench then picks only the gate threshold, for that tree's measured cost.
    Drafts right exactly below 1 nat and a tree step costing 1.5 AR steps: gate near 1 nat. A tree
    deeper than the heads is refused before any timing."""
    model, _, head_sets, _ = tiny
    heads, ckpt = head_sets["cerberus"]
    torch.manual_seed(0)
    gate_entropy = torch.rand(2000) * 4
    ranks = torch.where(gate_entropy[:, None] < 1.0, 0, 200).repeat(1, heads.n_heads).to(torch.uint8)
    ckpt = {**ckpt, "calibration": {"ranks": ranks, "entropy": gate_entropy.half()}}
    tree = Tree.chain(2)  # 3 nodes
    costs = {1: 0.010, 3: 0.015}
    gate = bench.recalibrate({"cerberus": (heads, ckpt)}, costs, model, tree)["cerberus"][1]["gate"]
    assert Tree(gate["tree"]).paths == tree.paths and 0.5 < gate["threshold"] < 2.0
    with pytest.raises(ValueError, match="tree depth 4 needs 4 heads"):
        bench.recalibrate({"cerberus": (heads, ckpt)}, {1: 0.01, 5: 0.02}, model, Tree.chain(4))


def test_recalibration_chooses_a_head1_gate_where_head1_entropy_separates(tiny):
    """Checkpoints from train.py also store head 1's entropies: where they predict acceptance and the
    backbone's do not, the re-calibrated gate reads head 1 (its AR steps priced with the drafts)."""
    model, _, head_sets, _ = tiny
    heads, ckpt = head_sets["cerberus"]
    torch.manual_seed(0)
    head1 = torch.rand(2000) * 4
    ranks = torch.where(head1[:, None] < 1.0, 0, 200).repeat(1, heads.n_heads).to(torch.uint8)
    ckpt = {**ckpt, "calibration": {"ranks": ranks, "entropy": (torch.rand(2000) * 4).half(),
                                    "head1_entropy": head1.half()}}
    new = bench.recalibrate({"cerberus": (heads, ckpt)}, {1: 0.010, 3: 0.015}, model, Tree.chain(2))
    gate = new["cerberus"][1]["gate"]
    assert gate["gate_on"] == "head1" and 0.5 < gate["threshold"] < 2.0
