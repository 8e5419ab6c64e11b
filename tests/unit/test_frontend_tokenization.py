"""Prompts and output text must equal mlx-lm's, token for token, character for character.

mlx-lm is imported here only as the reference (the frontend itself never
imports it; test_import_boundaries checks that).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from frontend.tokenization import ChatTemplateError, Tokenization, decoder_kind
from tests.unit.fakes import write_spm_tokenizer_dir, write_tokenizer_dir

tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Café, naïve, 你好 🙂 🦀"},
    ],
]
WORDS = [
    "Hello",
    " world",
    "!",
    " Café",
    " naïve",
    " 你好",
    " 🙂",
    " 🦀",
    "\n",
    "  ",
    " the",
    " capital",
    "Zürich",
    ",",
]


@pytest.fixture(scope="module", params=["bpe", "spm"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    write = write_tokenizer_dir if request.param == "bpe" else write_spm_tokenizer_dir
    return write(tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def pair(model_dir: Path):
    """(ours, mlx-lm's TokenizerWrapper) for the same directory."""
    return Tokenization.from_pretrained(model_dir), tokenizer_utils.load(model_dir)


def _stream(ours: Tokenization, tokens: list[int], rng: random.Random) -> str:
    detok = ours.detokenizer()
    out, i = "", 0
    while i < len(tokens):  # deltas of 1..3 tokens, as engine steps deliver them
        k = rng.randint(1, 3)
        out += detok.add(tokens[i : i + k])
        i += k
    return out + detok.finalize()


def _mlx_lm_text(wrapper, tokens: list[int]) -> str:
    detok = wrapper.detokenizer
    for token in tokens:
        detok.add_token(token)
    detok.finalize()
    return detok.text


def test_decoder_kinds(pair, model_dir):
    ours, wrapper = pair
    expected = {
        tokenizer_utils.BPEStreamingDetokenizer: "bpe",
        tokenizer_utils.SPMStreamingDetokenizer: "spm",
    }[type(wrapper._detokenizer)]
    assert ours.decoder_kind == expected
    assert decoder_kind(None) == "other"


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompt_matches_mlx_lm(pair, messages):
    ours, wrapper = pair
    reference = wrapper.apply_chat_template(messages, add_generation_prompt=True, tools=None, tokenize=True)
    assert ours.render_chat(messages) == list(reference)
    text = wrapper.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(messages) == ours.hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("prompt", ["Hello world", " leading space", "Café 🦀\n"])
def test_completion_prompt_matches_mlx_lm_server(pair, prompt):
    ours, wrapper = pair
    assert ours.encode_prompt(prompt) == wrapper.encode(prompt)


def test_streamed_text_matches_mlx_lm_on_real_text(pair):
    ours, wrapper = pair
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        tokens = ours.hf.encode(text, add_special_tokens=False)
        assert _stream(ours, tokens, rng) == _mlx_lm_text(wrapper, tokens), text


def _usable(kind: str, token: str) -> bool:
    """Tokens for the random test. BPE: all but "Ā" (mlx-lm's byte map drops
    byte 0, so it prints "Ā" where tokenizers decode NUL). SPM: no byte tokens
    (lone bytes are invalid UTF-8, and tokenizers' ByteFallback replaces them
    differently from Python's errors="replace")."""
    return "Ā" not in token if kind == "bpe" else not token.startswith("<0x")


def _random_runs(ours: Tokenization, use_decode_stream: bool, seed: int, count: int):
    """A fresh Tokenization on ``ours``' tokenizer, its vocabulary, an rng, and ``count``
    random runs of decodable tokens (four in ten word-initial)."""
    ours = Tokenization(ours.hf, model_path=Path(ours.hf.name_or_path))
    ours._use_decode_stream = use_decode_stream
    vocab = ours.hf.convert_ids_to_tokens(list(range(ours.vocab_size)))
    usable = [i for i, token in enumerate(vocab) if _usable(ours.decoder_kind, token)]
    spaces = [i for i, token in enumerate(vocab) if token.startswith(("Ġ", "▁"))]
    rng = random.Random(seed)
    runs = (
        [rng.choice(spaces if rng.random() < 0.4 else usable) for _ in range(rng.randint(1, 12))] for _ in range(count)
    )
    return ours, vocab, rng, runs


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_streamed_text_matches_mlx_lm_on_random_tokens(pair, use_decode_stream):
    ours, vocab, rng, runs = _random_runs(pair[0], use_decode_stream, seed=1, count=1000)
    for tokens in runs:
        assert _stream(ours, tokens, rng) == _mlx_lm_text(pair[1], tokens), [vocab[t] for t in tokens]


def test_first_space_is_trimmed_once_like_mlx_lm(tmp_path):
    ours = Tokenization.from_pretrained(write_tokenizer_dir(tmp_path / "bpe"))
    space = ours.hf.convert_tokens_to_ids("Ġ")
    hello = ours.hf.encode(" Hello", add_special_tokens=False)
    detok = ours.detokenizer()
    assert detok.add([space]) + detok.add(hello) + detok.finalize() == " Hello"
    detok = ours.detokenizer()
    assert detok.add(hello) + detok.add(hello) == "Hello Hello"


@pytest.mark.parametrize("use_decode_stream", [True, False])
def test_untrimmed_text_is_its_tokens_text(pair, use_decode_stream):
    """A completion's detokenizer drops nothing: its text is its tokens' bytes, leading space too."""
    wrapper = pair[1]
    ours, vocab, rng, runs = _random_runs(pair[0], use_decode_stream, seed=5, count=500)
    for tokens in runs:
        detok, out, i = ours.detokenizer(trim_leading_space=False), "", 0
        while i < len(tokens):
            k = rng.randint(1, 3)
            out += detok.add(tokens[i : i + k])
            i += k
        out += detok.finalize()
        expected = b"".join(ours.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
        assert out == expected, [vocab[t] for t in tokens]
        trimmed = _mlx_lm_text(wrapper, tokens)  # what chat writes: only leading spaces less
        dropped = out[: len(out) - len(trimmed)]
        assert out.endswith(trimmed) and not dropped.strip(" ")
        if ours.decoder_kind == "bpe":
            assert dropped == (" " if out.startswith(" ") else "")


def test_random_byte_tokens_never_fail(tmp_path):
    """DecodeStream raises on some invalid byte sequences; we fall back instead."""
    ours = Tokenization.from_pretrained(write_spm_tokenizer_dir(tmp_path / "spm"))
    rng = random.Random(2)
    for _ in range(500):
        tokens = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))]
        _stream(ours, tokens, rng)


def test_window_fallback_agrees_with_decode_stream(pair):
    ours, _ = pair
    fallback = Tokenization(ours.hf, model_path=Path(ours.hf.name_or_path))
    fallback._use_decode_stream = False  # what slow or customised tokenizers get
    rng = random.Random(3)
    for _ in range(200):
        text = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        tokens = ours.hf.encode(text, add_special_tokens=False)
        assert _stream(fallback, tokens, random.Random(4)) == _stream(ours, tokens, random.Random(4))


def test_multibyte_characters_are_never_split(tmp_path):
    ours = Tokenization.from_pretrained(write_tokenizer_dir(tmp_path / "bpe"))
    tokens = ours.hf.encode("crab 🦀 ok", add_special_tokens=False)
    # The crab is not in the training corpus: it is several byte tokens.
    assert any("\ufffd" in ours.decode([t]) for t in tokens)
    detok = ours.detokenizer()
    pieces = [detok.add([t]) for t in tokens] + [detok.finalize()]
    assert "".join(pieces) == "crab 🦀 ok"
    assert all("\ufffd" not in p for p in pieces)


def test_special_tokens_are_kept_like_mlx_lm(pair):
    ours, wrapper = pair
    special = ours.hf.convert_tokens_to_ids(ours.hf.eos_token)
    tokens = ours.hf.encode("Hello", add_special_tokens=False) + [special]
    assert _stream(ours, tokens, random.Random(0)) == _mlx_lm_text(wrapper, tokens)
    skipping = Tokenization(ours.hf, skip_special_tokens=True)
    assert ours.hf.eos_token not in _stream(skipping, tokens, random.Random(0))


def test_enable_thinking_default_follows_mlx_lm(tmp_path):
    path = write_tokenizer_dir(tmp_path / "src")
    hf = AutoTokenizer.from_pretrained(str(path))
    hf.add_tokens(["<think>", "</think>"], special_tokens=True)
    hf.chat_template = "{{ messages[0]['content'] }}|thinking={{ enable_thinking }}"
    hf.save_pretrained(str(tmp_path / "thinking"))
    ours = Tokenization.from_pretrained(tmp_path / "thinking")
    wrapper = tokenizer_utils.load(tmp_path / "thinking")
    messages = [{"role": "user", "content": "hi"}]
    assert ours.has_thinking and wrapper.has_thinking
    assert ours.render_chat(messages) == list(wrapper.apply_chat_template(messages, add_generation_prompt=True))
    assert ours.decode(ours.render_chat(messages)) == "hi|thinking=True"
    off = ours.render_chat(messages, template_kwargs={"enable_thinking": False})
    assert ours.decode(off) == "hi|thinking=False"


def test_no_chat_template_uses_mlx_lm_convert_chat(tmp_path):
    server = pytest.importorskip("mlx_lm.server")
    ours = Tokenization.from_pretrained(write_tokenizer_dir(tmp_path / "plain", chat_template=None))
    assert not ours.has_chat_template
    messages = CONVERSATIONS[1]
    assert ours.render_chat(messages) == ours.hf.encode(server.convert_chat(messages))


def test_template_errors_are_client_errors(tmp_path):
    path = write_tokenizer_dir(tmp_path / "t", chat_template="{{ raise_exception('only user messages') }}")
    with pytest.raises(ChatTemplateError, match="only user messages"):
        Tokenization.from_pretrained(path).render_chat([{"role": "user", "content": "x"}])
