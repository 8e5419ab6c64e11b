"""Prompt rendering, tokenization and incremental detokenization, as mlx-lm does them.

The engine generates from token ids made here and sends token ids back, so
prompts and output text must match mlx-lm token for token and character for
character (``mlx_lm.server`` / ``mlx_lm.generate``):

* chat: ``apply_chat_template(messages, add_generation_prompt=True, tools=...)``
  tokenized without extra special tokens, with mlx-lm's ``enable_thinking``
  default (TokenizerWrapper.apply_chat_template);
* completions: ``tokenizer.encode(prompt)`` (special tokens added, as mlx_lm.server);
* output: ``tokenizers.decoders.DecodeStream``; for chat, plus mlx-lm's one
  quirk that DecodeStream lacks: its streaming detokenizers drop leading
  spaces at the start of a response (BPEStreamingDetokenizer._maybe_trim_space,
  SPMStreamingDetokenizer with trim_space), each in its own way. A completion
  keeps them: its text is its tokens' text (as OpenAI and vLLM).

No mlx or mlx_lm import here: the frontend must not load them (DESIGN.md).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import threading
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

import tokenizers
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from frontend.reasoning import ThinkingMarkers

log = logging.getLogger(__name__)

# Emitted ids kept as context to finalize held-back bytes (DecodeStream keeps
# a similar window: decoders like SPM's Strip depend on what came before).
FINALIZE_CONTEXT_IDS = 8

# mlx_lm.tokenizer_utils._infer_thinking: single-token thinking markers.
_THINK_TOKEN_PAIRS = (
    ("<think>", "</think>"),
    ("<longcat_think>", "</longcat_think>"),
    ("<|think:start|>", "<|think:end|>"),
)
# Markers of several tokens: (tokens the vocabulary must hold) -> (start, end) text.
_MULTI_TOKEN_THINKING = (
    (("<|channel>", "<channel|>"), ("<|channel>thought", "<channel|>")),
    (("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>"), ("<|open|>think<|sep|>", "<|close|>think<|sep|>")),
)

# mlx_lm.server.convert_chat's default role mapping, for models without a template.
_DEFAULT_ROLE_MAPPING = {
    "system": "ASSISTANT's RULE: ",
    "user": "USER: ",
    "assistant": "ASSISTANT: ",
    "stop": "\n",
}


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (a client error)."""


class IncrementalDetokenizer(Protocol):
    def add(self, token_ids: Sequence[int]) -> str:
        """Text completed by these tokens (may be empty while bytes are pending)."""

    def finalize(self) -> str:
        """Flush text held back at the end of the request."""


# ---------------------------------------------------------------- decoder kinds


def _match(pattern: Any, value: Any) -> bool:
    """Structural equality, as mlx_lm.tokenizer_utils._match."""
    if type(pattern) is not type(value):
        return False
    if isinstance(pattern, dict):
        return len(pattern) == len(value) and all(k in value and _match(pattern[k], value[k]) for k in pattern)
    if isinstance(pattern, list):
        return len(pattern) == len(value) and all(_match(a, b) for a, b in zip(pattern, value, strict=True))
    return pattern == value


_SPM_STEPS = [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
]
_SPM_DECODER = {"type": "Sequence", "decoders": [*_SPM_STEPS, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
_SPM_DECODER_NO_SPACE = {"type": "Sequence", "decoders": _SPM_STEPS}


def decoder_kind(decoder: Any) -> str:
    """Which streaming detokenizer mlx-lm picks for a tokenizer.json decoder.

    "bpe": BPEStreamingDetokenizer (drops the first leading space);
    "spm": SPMStreamingDetokenizer with trim_space (drops a leading space
    from every piece while no text was produced yet);
    "spm_no_trim": SPMStreamingDetokenizer(trim_space=False);
    "other": NaiveStreamingDetokenizer (plain ``tokenizer.decode``).
    """
    if isinstance(decoder, dict) and decoder.get("type") == "ByteLevel":
        return "bpe"
    if _match(_SPM_DECODER, decoder):
        return "spm"
    if _match(_SPM_DECODER_NO_SPACE, decoder):
        return "spm_no_trim"
    return "other"


def _tokenizer_json_decoder(hf: PreTrainedTokenizerBase, model_path: Path | None) -> Any:
    """The decoder as mlx-lm sees it: from tokenizer.json on disk if there is one."""
    candidates = [model_path, Path(str(getattr(hf, "name_or_path", "") or ""))]
    for directory in candidates:
        if directory is not None and (directory / "tokenizer.json").is_file():
            with open(directory / "tokenizer.json", encoding="utf-8") as f:
                return json.load(f).get("decoder")
    backend = getattr(hf, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return json.loads(backend.to_str()).get("decoder")
    return None


# ---------------------------------------------------------------- detokenizers


class _WindowDetokenizer:
    """DecodeStream's algorithm over ``tokenizer.decode``, for tokenizers whose
    Rust decoder is not the whole story (slow tokenizers, overridden decode)."""

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        # ``context``: ids already emitted as text, kept so the next decode
        # sees what came before (leading-space rules depend on it).
        self._ids: list[int] = list(context)
        self._prefix = decode(self._ids) if self._ids else ""
        self._prefix_index = 0

    def _step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix) or text.endswith("\ufffd"):
            return None
        # A decoder that rewrites earlier text (rare) cannot be taken back; emit the tail.
        new_text = text[len(self._prefix) :]
        new_prefix_index = len(self._ids) - self._prefix_index
        self._ids = self._ids[self._prefix_index :]
        self._prefix = self._decode(self._ids)
        self._prefix_index = new_prefix_index
        return new_text

    def add(self, token_ids: Sequence[int]) -> str:
        return "".join(p for p in map(self._step, token_ids) if p is not None)

    def finalize(self) -> str:
        text = self._decode(self._ids)
        tail = text[len(self._prefix) :] if len(text) > len(self._prefix) else ""
        self._ids, self._prefix, self._prefix_index = [], "", 0
        return tail


class _DecodeStreamDetokenizer:
    """tokenizers' Rust DecodeStream (UTF-8 safe, linear time).

    DecodeStream raises "Invalid prefix" when a new token changes text it
    already returned (seen with byte-fallback tokens that form invalid UTF-8);
    from then on this request continues with the Python window algorithm.
    """

    def __init__(self, backend: tokenizers.Tokenizer, skip_special: bool, prime: Sequence[int] = ()) -> None:
        self._backend = backend
        self._skip_special = skip_special
        self._stream = DecodeStream(skip_special_tokens=skip_special)
        self._pending: list[int] = []  # ids not yet turned into text
        self._context: list[int] = list(prime)  # the last ids already turned into text
        self._fallback: _WindowDetokenizer | None = None
        for token_id in prime:  # its text is context, never output
            self._stream.step(backend, token_id)

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special)

    def add(self, token_ids: Sequence[int]) -> str:
        pieces = []
        for i, token_id in enumerate(token_ids):
            if self._fallback is not None:
                pieces.append(self._fallback.add(token_ids[i:]))
                break
            self._pending.append(token_id)
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception as exc:  # tokenizers raises a bare Exception
                log.debug("DecodeStream gave up (%s); continuing with decode()", exc)
                self._fallback = _WindowDetokenizer(self._decode, self._context)
                pieces.append(self._fallback.add(self._pending))
                self._pending = []
                continue
            if piece is not None:
                pieces.append(piece)
                self._context = (self._context + self._pending)[-FINALIZE_CONTEXT_IDS:]
                self._pending = []
        return "".join(pieces)

    def finalize(self) -> str:
        if self._fallback is not None:
            return self._fallback.finalize()
        if not self._pending:
            return ""
        pending, self._pending = self._pending, []
        return _decode_suffix(self._decode, self._context, pending)


def _decode_suffix(decode: Callable[[list[int]], str], context: list[int], new: list[int]) -> str:
    """Text that ``new`` adds after ``context`` (incomplete bytes become U+FFFD)."""
    before = decode(context)
    after = decode(context + new)
    return after[len(before) :] if after.startswith(before) else decode(new)


class _TrimLeadingSpace:
    """mlx-lm's streaming detokenizers drop leading spaces at the start of a
    response; do the same so output equals ``mlx_lm.generate``'s.

    BPE (``repeat=False``): one space, from the first text (its detokenizer
    holds a lone space token back and trims the combined text once).
    SPM (``repeat=True``): one space from every piece until some text is
    left (SPMStreamingDetokenizer trims each flush while its text is empty).
    """

    def __init__(self, inner: IncrementalDetokenizer, *, repeat: bool) -> None:
        self._inner = inner
        self._repeat = repeat
        self._done = False

    def _trim(self, text: str) -> str:
        if self._done or not text:
            return text
        if text[0] == " ":
            text = text[1:]
        self._done = bool(text) or not self._repeat
        return text

    def add(self, token_ids: Sequence[int]) -> str:
        # SPM trims per token (mlx-lm flushes per token), so feed one at a time.
        if not self._repeat or self._done:
            return self._trim(self._inner.add(token_ids))
        return "".join(self._trim(self._inner.add([t])) for t in token_ids)

    def finalize(self) -> str:
        return self._trim(self._inner.finalize())


class _KeepTokens:
    """Writes the text of special tokens that the inner detokenizer skips.

    The inner one still sees every id (and writes nothing for a skipped
    one), so the text around a kept token decodes as it would without it.
    """

    def __init__(self, inner: IncrementalDetokenizer, texts: dict[int, str]) -> None:
        self._inner = inner
        self._texts = texts

    def add(self, token_ids: Sequence[int]) -> str:
        pieces, start = [], 0
        for i, token_id in enumerate(token_ids):
            if token_id in self._texts:
                pieces += [self._inner.add(token_ids[start : i + 1]), self._texts[token_id]]
                start = i + 1
        pieces.append(self._inner.add(token_ids[start:]))
        return "".join(pieces)

    def finalize(self) -> str:
        return self._inner.finalize()


def _spm_prime(hf: PreTrainedTokenizerBase) -> list[int]:
    """One plain token to start SPM decoding with.

    The SPM decoder's Strip step removes a space from the start of the whole
    text, so DecodeStream's first piece comes out already trimmed, in its own
    way. Decoding after a throwaway word-internal token yields the untrimmed
    text, which _TrimLeadingSpace then trims exactly as mlx-lm does.
    """
    special = set(hf.all_special_ids)
    for token, token_id in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]):
        if token_id in special or token.startswith(("▁", "<")) or not token.isalnum():
            continue
        text = hf.decode([token_id])
        if text and not text[0].isspace():
            return [token_id]
    return []


# ---------------------------------------------------------------- thinking flags


def _infer_thinking(hf: PreTrainedTokenizerBase) -> ThinkingMarkers | None:
    """mlx_lm.tokenizer_utils._infer_thinking: the markers, from the vocabulary."""
    vocab = hf.get_vocab()
    for start, end in _THINK_TOKEN_PAIRS:
        if start in vocab and end in vocab:
            return ThinkingMarkers(start, end, (vocab[start],), (vocab[end],))
    for tokens, (start, end) in _MULTI_TOKEN_THINKING:
        if all(t in vocab for t in tokens):
            encode = functools.partial(hf.encode, add_special_tokens=False)
            return ThinkingMarkers(start, end, tuple(encode(start)), tuple(encode(end)))
    return None


def _thinking_kwarg(hf: PreTrainedTokenizerBase) -> str:
    """mlx_lm.tokenizer_utils._infer_thinking_kwarg: custom renderers may call it "thinking"."""
    method = getattr(type(hf), "apply_chat_template", None)
    if method is PreTrainedTokenizerBase.apply_chat_template:
        return "enable_thinking"
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return "enable_thinking"
    return "thinking" if "thinking" in params and "enable_thinking" not in params else "enable_thinking"


def _has_custom_renderer(hf: PreTrainedTokenizerBase) -> bool:
    return getattr(type(hf), "apply_chat_template", None) is not PreTrainedTokenizerBase.apply_chat_template


def _decode_is_plain(hf: PreTrainedTokenizerBase) -> bool:
    """True when ``hf.decode`` returns the Rust decoder's output untouched
    (no subclass override, no clean-up of spaces), so DecodeStream agrees."""
    cls = type(hf)
    overridden = cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not PreTrainedTokenizerFast._decode
    return not overridden and not getattr(hf, "clean_up_tokenization_spaces", False)


@functools.lru_cache(maxsize=1)
def reserved_template_kwargs() -> frozenset[str]:
    """apply_chat_template's own parameters: a request's chat_template_kwargs
    may set template variables (enable_thinking, ...) but not these
    (chat_template, tokenize, truncation, ...)."""
    params = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    return frozenset(name for name, p in params.items() if p.kind is not p.VAR_KEYWORD and name != "self")


def convert_chat(messages: list[dict[str, Any]]) -> str:
    """mlx_lm.server.convert_chat: a plain prompt for models without a template."""
    mapping = _DEFAULT_ROLE_MAPPING
    prompt = "".join(f"{mapping.get(m['role'], '')}{m.get('content', '')}{mapping['stop']}" for m in messages)
    return (prompt + mapping["assistant"]).rstrip()


# ---------------------------------------------------------------- token bytes


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character a byte-level BPE
    vocabulary uses for each byte -> that byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_display(raw: bytes) -> str:
    """The ``token`` string of a logprob entry: its text, or for bytes that
    are not whole UTF-8 characters, ``bytes:\\xNN...`` (as OpenAI writes them)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


# ---------------------------------------------------------------- the facade


class Tokenization:
    """The model's tokenizer, used the way mlx-lm uses it."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_path: str | Path | None = None,
        skip_special_tokens: bool = False,
    ) -> None:
        self.hf = tokenizer
        self.skip_special_tokens = skip_special_tokens
        path = Path(model_path) if model_path is not None else None
        self.decoder_kind = decoder_kind(_tokenizer_json_decoder(tokenizer, path))
        # The reasoning markers when the model thinks (mlx-lm's has_thinking), else None.
        self.thinking = _infer_thinking(tokenizer)
        self.has_thinking = self.thinking is not None
        self._thinking_kwarg = _thinking_kwarg(tokenizer)
        self.has_chat_template = tokenizer.chat_template is not None or _has_custom_renderer(tokenizer)
        self.vocab_size = len(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if isinstance(backend, tokenizers.Tokenizer) else None
        self._prime = _spm_prime(tokenizer) if self.decoder_kind == "spm" else []
        self._use_decode_stream = self._backend is not None and (
            self.decoder_kind != "other" or _decode_is_plain(tokenizer)
        )
        self._special_ids = frozenset(tokenizer.all_special_ids) | frozenset(tokenizer.added_tokens_decoder)
        self._token_bytes: dict[int, bytes] = {}
        # transformers may reconfigure the Rust tokenizer (padding, truncation
        # from tokenizer.json) inside encode, which needs exclusive access
        # ("Already borrowed" otherwise). One encode now settles that state
        # before request threads share the tokenizer; the lock covers the rest.
        self._encode_lock = threading.Lock()
        tokenizer.encode("warm-up")
        log.info(
            "tokenizer %s: vocab %d, decoder %s, %s, chat template %s",
            type(tokenizer).__name__,
            self.vocab_size,
            self.decoder_kind,
            "DecodeStream" if self._use_decode_stream else "decode() window",
            "yes" if self.has_chat_template else "no",
        )

    @classmethod
    def from_pretrained(
        cls, model_path: str | Path, *, skip_special_tokens: bool = False, **kwargs: Any
    ) -> Tokenization:
        hf = AutoTokenizer.from_pretrained(str(model_path), **kwargs)
        return cls(hf, model_path=model_path, skip_special_tokens=skip_special_tokens)

    # -- prompts

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
        thinking: bool | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Prompt ids of a conversation, as mlx_lm.server tokenizes it.

        ``thinking``: turn the template's thinking on or off (``enable_thinking``
        or the renderer's ``thinking``); None keeps mlx-lm's default (on for a
        thinking model) or what ``template_kwargs`` says. A template without
        the variable ignores it: ``can_toggle_thinking`` says whether it has one.
        ``add_special_tokens``: the tokenizer's (BOS, ...) on top of the
        template's own; only /tokenize may ask for them.
        """
        if not self.has_chat_template:
            return self.encode_prompt(convert_chat(messages))
        kwargs = dict(template_kwargs or {})
        if self._thinking_kwarg != "enable_thinking" and "enable_thinking" in kwargs:
            kwargs[self._thinking_kwarg] = kwargs.pop("enable_thinking")
        if thinking is not None:
            kwargs[self._thinking_kwarg] = thinking
        kwargs.setdefault(self._thinking_kwarg, self.has_thinking)
        try:
            text = self.hf.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:
            # Templates reject conversations with raise_exception (jinja) or
            # fail on fields they index; either way the input is at fault.
            raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from exc
        # What apply_chat_template(tokenize=True) does, with only the encoding locked.
        with self._encode_lock:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    @property
    def can_toggle_thinking(self) -> bool:
        """Whether the chat template (or renderer) takes the variable that turns thinking on and off."""
        return self._thinking_kwarg == "thinking" or self.template_mentions(self._thinking_kwarg)

    def encode_prompt(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Completion prompt ids: ``tokenizer.encode(prompt)`` as mlx_lm.server."""
        with self._encode_lock:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of text that continues a rendered prompt (an assistant prefill): no special tokens."""
        with self._encode_lock:
            return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=self.skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a piece of a character for byte tokens)."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._token_bytes[token_id] = self._compute_token_bytes(token_id)
        return raw

    def _compute_token_bytes(self, token_id: int) -> bytes:
        piece = self.hf.convert_ids_to_tokens(token_id)
        if token_id in self._special_ids or not isinstance(piece, str):
            return self.decode([token_id]).encode("utf-8")
        if self.decoder_kind == "bpe":
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        elif self.decoder_kind in ("spm", "spm_no_trim"):
            match = _SPM_BYTE.match(piece)
            if match:
                return bytes([int(match.group(1), 16)])
            return piece.replace("▁", " ").encode("utf-8")
        return self.decode([token_id]).encode("utf-8")

    def template_mentions(self, name: str) -> bool:
        """Whether the chat template refers to ``name`` (a template variable)."""
        template = self.hf.chat_template
        texts = template.values() if isinstance(template, dict) else [template or ""]
        return any(re.search(rf"\b{re.escape(name)}\b", text) for text in texts)

    def marker_token_id(self, text: str) -> int | None:
        """The id of the added token spelled ``text`` (special or not, as
        Qwen's ``<tool_call>``), else None: then ``text`` is plain text."""
        for token_id, added in self.hf.added_tokens_decoder.items():
            if added.content == text:
                return token_id
        return None

    def token_entry(self, token_id: int) -> tuple[str, bytes]:
        """(token string, its bytes) for logprob entries."""
        raw = self.token_bytes(token_id)
        return token_display(raw), raw

    # -- output

    def detokenizer(
        self, *, trim_leading_space: bool = True, keep_token_ids: Collection[int] = ()
    ) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one response.

        ``trim_leading_space``: drop leading space as mlx-lm's output does
        (chat); a completion keeps it, so its text is its tokens' text.
        ``keep_token_ids``: special tokens whose text stays even when special
        tokens are skipped (tool-call markers, which the call parser needs).
        """
        inner: IncrementalDetokenizer
        if self._use_decode_stream:
            assert self._backend is not None
            inner = _DecodeStreamDetokenizer(self._backend, self.skip_special_tokens, self._prime)
        else:
            inner = _WindowDetokenizer(self.decode, self._prime)
        added = self.hf.added_tokens_decoder
        kept = {i: added[i].content for i in keep_token_ids if i in added and added[i].special}
        if self.skip_special_tokens and kept:
            inner = _KeepTokens(inner, kept)
        trim = _TRIMMING.get(self.decoder_kind) if trim_leading_space else None
        return inner if trim is None else _TrimLeadingSpace(inner, repeat=trim == "each")


# decoder kind -> how mlx-lm trims leading spaces ("spm_no_trim", "other": not at all).
_TRIMMING = {"bpe": "once", "spm": "each"}
