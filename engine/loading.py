"""Load the one model (and optional LoRA adapter) with mlx-lm, once, at startup."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
from mlx_lm import load as mlx_lm_load

from ipc.messages import ModelInfo

log = logging.getLogger(__name__)

# Used when config.json names no context length at all.
FALLBACK_CONTEXT_LENGTH = 4096
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length")


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


def load_model(model_path: str, adapter_path: Optional[str] = None) -> LoadedModel:
    path = Path(model_path).resolve()
    log.info("loading model %s%s", path, f" with adapter {adapter_path}" if adapter_path else "")
    started = time.monotonic()
    model, tokenizer = mlx_lm_load(str(path), adapter_path=adapter_path)
    config = json.loads((path / "config.json").read_text())
    info = ModelInfo(
        model_id=path.name,
        model_path=str(path),
        adapter_path=str(Path(adapter_path).resolve()) if adapter_path else None,
        context_length=_context_length(config),
        eos_token_ids=sorted(int(t) for t in tokenizer.eos_token_ids),
        vocab_size=_vocab_size(config, tokenizer),
        created=int(time.time()),
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
