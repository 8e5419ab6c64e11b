"""The generated tiny model and LoRA adapter load with the real mlx-lm code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.model_factory import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    SIZES,
    TARGET_VOCAB_SIZE,
    _weight_shapes,
    build_lora_adapter,
    build_tiny_model,
)

PROMPT_MESSAGES = [{"role": "user", "content": "Hello! What is the capital of France?"}]
MAX_TOKENS = 24


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_builds_are_byte_identical(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a")
    second = build_tiny_model(tmp_path / "b")
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert set(_files(first)) == expected
    assert _files(first) == _files(second)
    adapter_a = build_lora_adapter(first, tmp_path / "la")
    adapter_b = build_lora_adapter(second, tmp_path / "lb")
    assert _files(adapter_a) == _files(adapter_b)
    # The seed changes the weights, nothing else.
    other = _files(build_tiny_model(tmp_path / "c", seed=1))
    assert other["model.safetensors"] != _files(first)["model.safetensors"]
    assert other["tokenizer.json"] == _files(first)["tokenizer.json"]


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        build_tiny_model(tmp_path, size="huge")


def test_config_has_eos_ids_and_matching_vocab(tiny_model_dir: Path) -> None:
    from tokenizers import Tokenizer

    config = json.loads((tiny_model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert config["model_type"] == "llama"
    assert config["eos_token_id"] == [tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)]
    assert config["vocab_size"] == tok.get_vocab_size()
    assert 512 <= config["vocab_size"] <= 1024
    assert config["max_position_embeddings"] == 4096
    assert json.loads(tok.to_str())["decoder"]["type"] == "ByteLevel"


def test_bench_size_is_about_34m_parameters() -> None:
    n = sum(math.prod(s) for s in _weight_shapes(SIZES["bench"], TARGET_VOCAB_SIZE).values())
    assert 30e6 < n < 38e6


def test_loads_with_mlx_lm(tiny_model_dir: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    model, tokenizer = load(str(tiny_model_dir))
    params = dict(tree_flatten(model.parameters()))
    assert all(p.dtype == mx.float32 for p in params.values())
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    vocab = tokenizer.get_vocab()
    assert tokenizer.eos_token_ids == {vocab[IM_END], vocab[ENDOFTEXT]}


def test_chat_template_renders_chatml(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("assistant\n")
    # Special tokens are single ids, never split by BPE.
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_END)) == 2


@pytest.mark.parametrize("text", ["The quick brown fox, 42!", "Café naïve", "你好，世界 🙂🚀", "  two\n\nlines "])
def test_tokenizer_round_trips(tiny_model_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def _greedy(model_dir: Path, adapter_dir: Path | None = None) -> list[int]:
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    prompt = tokenizer.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True)
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)]


def test_adapter_loads_and_changes_greedy_output(tiny_model_dir: Path, tiny_adapter_dir: Path) -> None:
    config = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    base = _greedy(tiny_model_dir)
    assert base == _greedy(tiny_model_dir)  # greedy is deterministic
    adapted = _greedy(tiny_model_dir, tiny_adapter_dir)
    assert adapted == _greedy(tiny_model_dir, tiny_adapter_dir)
    assert adapted != base


def test_thinking_variant_is_a_thinking_model_to_mlx_lm_and_to_us(tmp_path: Path) -> None:
    from mlx_lm import load

    from frontend.tokenization import Tokenization
    from tests.thinking_template import QWEN3_THINKING_TEMPLATE

    model_dir = build_tiny_model(tmp_path / "think", chat_template=QWEN3_THINKING_TEMPLATE, thinking=True)
    _, wrapper = load(str(model_dir))
    ours = Tokenization.from_pretrained(model_dir)
    assert wrapper.has_thinking and ours.thinking is not None
    assert (ours.thinking.start, ours.thinking.end) == (wrapper.think_start, wrapper.think_end)
    assert ours.thinking.start_ids == (wrapper.think_start_id,) and ours.thinking.end_ids == (wrapper.think_end_id,)
    off = wrapper.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True, enable_thinking=False)
    assert ours.render_chat(PROMPT_MESSAGES, thinking=False) == list(off)
    assert ours.render_chat(PROMPT_MESSAGES) == list(
        wrapper.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True)
    )
