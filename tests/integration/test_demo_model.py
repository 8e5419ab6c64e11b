"""The SmolLM2 demo model converted from GGUF: real answers, EOS stops, exact text."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

MAX_TOKENS = 64
ROUND_TRIP_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing space \n\ttabs and\n\nnewlines ",
    "Numbers 12345 and 3.14159; it's 100% ok.",
    "Café, naïve, résumé, Zürich, São Paulo",
    "你好，世界。今天天气很好。",
    "Emoji: 🙂🚀👩‍💻 done",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path):
    from mlx_lm import load

    return load(str(smollm2_dir))


def test_config_from_gguf_metadata(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_answers_paris_and_stops_at_eos(smollm2) -> None:
    from mlx_lm import stream_generate

    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS):
        text += last.text
    assert "Paris" in text
    assert last.finish_reason == "stop"
    assert last.token == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert last.generation_tokens < MAX_TOKENS


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(smollm2, text: str) -> None:
    _, tokenizer = smollm2
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_ids_match_reference_gpt2_bpe(smollm2_dir: Path, smollm2, text: str) -> None:
    """tokenizer.json (and transformers on top) == a plain GPT-2 BPE over the GGUF vocab."""
    _, tokenizer = smollm2
    assert tokenizer.encode(text, add_special_tokens=False) == _reference_bpe(smollm2_dir, text)


def test_known_ids(smollm2) -> None:
    _, tokenizer = smollm2
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    # SmolLM2 splits digits one by one; "Ġ" marks a leading space in byte-level BPE.
    ids = tokenizer.encode(" 2025", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["Ġ", "2", "0", "2", "5"]
    ids = tokenizer.encode(" Paris", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["ĠParis"]
    # Special tokens in text are atomic.
    assert tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)[0] == 1


# --- a plain reimplementation of GPT-2 byte-level BPE (openai/gpt-2 encoder.py) ---

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the "Ġ" for space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    bs, cs = printable[:], printable[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _vocab_and_ranks(model_dir: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    model = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], {m: i for i, m in enumerate(merges)}


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _reference_bpe(model_dir: Path, text: str) -> list[int]:
    import regex

    vocab, ranks = _vocab_and_ranks(model_dir)
    byte_map = _bytes_to_unicode()
    ids = []
    # llama.cpp "smollm" pre-tokenizer: every digit alone, then the GPT-2 regex.
    for chunk in regex.split(r"(\p{N})", text):
        for piece in regex.findall(GPT2_PATTERN, chunk):
            word = "".join(byte_map[b] for b in piece.encode("utf-8"))
            ids += [vocab[t] for t in _bpe(word, ranks)]
    return ids


def test_failed_conversion_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy import demo_model

    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")  # half-written model
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(demo_model, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        demo_model.ensure_demo_model(tmp_path)
    assert list(tmp_path.iterdir()) == []
