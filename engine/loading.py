"""Load the one model (and optional LoRA adapter) with mlx-lm, once, at startup."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

from ipc.messages import ModelInfo

log = logging.getLogger(__name__)

# Used when config.json names no context length at all.
FALLBACK_CONTEXT_LENGTH = 4096
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length")
# Without a terminal, one progress line per this many percent.
PROGRESS_STEP_PERCENT = 10
PROGRESS_BAR_WIDTH = 30


class LoadProgress:
    """Weight loading progress: a bar on a terminal, plain lines otherwise."""

    def __init__(self, total_bytes: int, stream=sys.stderr) -> None:
        self._total = max(total_bytes, 1)
        self._stream = stream
        self._tty = stream.isatty()
        self._next_percent = 0

    def update(self, done_bytes: int) -> None:
        percent = min(100, done_bytes * 100 // self._total)
        if self._tty:
            filled = PROGRESS_BAR_WIDTH * percent // 100
            bar = "#" * filled + "." * (PROGRESS_BAR_WIDTH - filled)
            end = "\n" if percent == 100 else ""
            self._stream.write(f"\rloading weights [{bar}] {percent:3d}%{end}")
            self._stream.flush()
        elif percent >= self._next_percent:
            log.info("loading weights: %d%% of %.2f GB", percent, self._total / 1e9)
            self._next_percent = percent + PROGRESS_STEP_PERCENT


def materialize_weights(model: Any) -> None:
    """Evaluate lazily loaded weights one array at a time, reporting progress."""
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    progress = LoadProgress(sum(v.nbytes for _, v in params))
    done = 0
    progress.update(0)
    for _, value in params:
        mx.eval(value)
        done += value.nbytes
        progress.update(done)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo


def _context_length(config: dict[str, Any]) -> int:
    text_config = config.get("text_config", {})
    for source in (config, text_config):
        for key in _CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return source[key]
    return FALLBACK_CONTEXT_LENGTH


def _vocab_size(config: dict[str, Any], tokenizer: Any) -> int:
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if size else len(tokenizer)


# gpt-oss's Harmony format (mlx-lm has no parser for it): its tokenizer has these tokens.
_HARMONY_TOKENS = ("<|channel|>", "<|message|>", "<|call|>")


def _tool_parser_name(tokenizer: Any) -> str | None:
    """mlx-lm's inferred tool-call parser (a module of mlx_lm.tool_parsers) by name, or "harmony"."""
    parser = getattr(tokenizer, "tool_parser", None)
    module = getattr(parser, "__module__", "") or ""
    if module.startswith("mlx_lm.tool_parsers."):
        return module.rsplit(".", 1)[-1]
    vocab = tokenizer.get_vocab()
    return "harmony" if all(t in vocab for t in _HARMONY_TOKENS) else None


def load_model(
    model_path: str, adapter_path: str | None = None, shard: Callable[[Any], None] | None = None
) -> LoadedModel:
    """Load the model (and adapter); ``shard``, given, keeps one rank's part of the
    still lazy model (engine.sharding.prepare), so only that part is read into memory."""
    path = Path(model_path).resolve()
    log.info("loading model %s%s", path, f" with adapter {adapter_path}" if adapter_path else "")
    started = time.monotonic()
    # Lazy load, then evaluate with progress: big models take minutes.
    model, tokenizer = mlx_lm_load(str(path), adapter_path=adapter_path, lazy=True)[:2]
    if shard is not None:
        shard(model)
    materialize_weights(model)
    config = json.loads((path / "config.json").read_text())
    info = ModelInfo(
        model_id=path.name,
        model_path=str(path),
        adapter_path=str(Path(adapter_path).resolve()) if adapter_path else None,
        context_length=_context_length(config),
        eos_token_ids=sorted(int(t) for t in tokenizer.eos_token_ids),
        vocab_size=_vocab_size(config, tokenizer),
        created=int(time.time()),
        tool_parser=_tool_parser_name(tokenizer),
        tool_call_start=getattr(tokenizer, "tool_call_start", None),
        tool_call_end=getattr(tokenizer, "tool_call_end", None),
    )
    log.info(
        "model %s loaded in %.1f s (context %d, eos %s, %.2f GB active memory)",
        info.model_id,
        time.monotonic() - started,
        info.context_length,
        info.eos_token_ids,
        mx.get_active_memory() / 1e9,
    )
    return LoadedModel(model, tokenizer, info)
