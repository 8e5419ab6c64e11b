"""Constrained decoding with llguidance: a grammar mask as a per-request logits processor.

Why llguidance: a mask per token cheaper than outlines-core's and no
per-schema index build, no dependencies (xgrammar pulls torch and CUDA
wheels); full JSON schema and Lark grammars (tool calls embed schemas with
``%json``). Its own
``llguidance.mlx`` applies masks with a Metal kernel, which mlx's CPU
backend lacks, so the mask is applied here with ``mx.where``.

The processor is stateful: mlx-lm calls it once per decode step with the
token context, whose last entry is the token sampled by the previous step
(the first call sees the last prompt token instead). It feeds that token to
the matcher, then masks the next logits. When the grammar is complete the
mask holds only the EOS ids, so the request ends with finish_reason "stop";
before that EOS is masked out, so it cannot end early (max_tokens can:
"length").
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from ipc.messages import Constraint

if TYPE_CHECKING:  # declared in llguidance's stubs only
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

# Compiled grammars kept (by kind and text); each request gets a copy.
GRAMMAR_CACHE_ENTRIES = 128
# llguidance's log level: warnings only (1) would log per request.
MATCHER_LOG_LEVEL = 0
# JSON layout unless the schema's "x-guidance" says otherwise: json.dumps's
# separators, no free whitespace. Flexible whitespace lets a model pad
# forever (seen here: 200 tokens of "\r" and spaces on the random test model).
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Longest llguidance error text a request's error carries (the rest is logged).
ERROR_SUMMARY_CHARS = 200


class ConstraintError(ValueError):
    """A grammar that cannot be compiled (the request ends with this error)."""


def _summary(error: str) -> str:
    """llguidance's first line: its errors go on with the parser state and the grammar, log-only."""
    return error.strip().split("\n", 1)[0][:ERROR_SUMMARY_CHARS]


class GrammarCompiler:
    """Turns wire Constraints into per-request processors, for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        # mlx-lm's TokenizerWrapper holds the Hugging Face tokenizer in _tokenizer.
        self._hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._prototypes: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use: it reads the whole vocabulary (~0.25 s for 49k tokens).
        if self._ll_tokenizer is None:
            n_vocab = max(self._vocab_size, len(self._hf))
            try:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=n_vocab, eos_token=self._eos)
            except Exception as exc:
                log.error("llguidance cannot use this tokenizer: %s", exc)
                raise ConstraintError("constrained decoding is not available for this tokenizer") from exc
        return self._ll_tokenizer

    def _grammar(self, constraint: Constraint) -> str:
        try:
            if constraint.kind == "json_schema":
                return llguidance.LLMatcher.grammar_from_json_schema(constraint.text, defaults=JSON_DEFAULTS)
            if constraint.kind == "lark":
                return llguidance.LLMatcher.grammar_from_lark(constraint.text)
        except ValueError as exc:
            log.error("invalid %s: %s", constraint.kind, exc)
            raise ConstraintError(f"invalid {constraint.kind}: {_summary(str(exc))}") from exc
        raise ConstraintError(f"unknown constraint kind {constraint.kind!r}")

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one request (a copy of the cached compiled one)."""
        key = (constraint.kind, constraint.text)
        prototype = self._prototypes.get(key)
        if prototype is None:
            prototype = llguidance.LLMatcher(self._tokenizer(), self._grammar(constraint), log_level=MATCHER_LOG_LEVEL)
            if prototype.is_error():
                log.error("invalid %s: %s", constraint.kind, prototype.get_error())
                raise ConstraintError(f"invalid {constraint.kind}: {_summary(prototype.get_error())}")
            self._prototypes[key] = prototype
            while len(self._prototypes) > GRAMMAR_CACHE_ENTRIES:
                self._prototypes.popitem(last=False)
        else:
            self._prototypes.move_to_end(key)
        return prototype.deep_copy()

    def processor(self, constraint: Constraint) -> GrammarProcessor:
        return GrammarProcessor(self.matcher(constraint), self._eos)


class GrammarProcessor:
    """mlx-lm logits processor: ``(tokens, logits[1, V]) -> masked logits``."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._eos = list(eos_token_ids)
        self._started = False
        self.error: str | None = None  # set once the matcher failed; the scheduler ends the request

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started and self.error is None:
            token: int = tokens[-1].item()  # type: ignore[assignment]
            if not self._matcher.consume_token(token):
                # The client gets one sentence; the parser state and grammar go to the log.
                self.error = f"constrained decoding failed: the grammar refused token {token}"
                log.error("%s: %s", self.error, self._matcher.get_error())
        self._started = True
        return mx.where(self._allowed(logits.shape[-1]), logits, -mx.inf)

    def _allowed(self, vocab: int) -> mx.array:
        if self.error is not None or self._matcher.is_error():
            allowed = np.zeros(vocab, dtype=np.bool_)
            allowed[[t for t in self._eos if t < vocab]] = True
            return mx.array(allowed)
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if bits.size < vocab:  # logits wider than the tokenizer: the extra ids are never allowed
            bits = np.pad(bits, (0, vocab - bits.size))
        return mx.array(bits[:vocab].astype(np.bool_))

    @property
    def accepting(self) -> bool:
        return self._matcher.is_accepting()
