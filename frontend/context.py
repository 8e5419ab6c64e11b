"""What every resource needs: the engine client, the tokenizer and the settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from frontend import sse
from frontend.engine_client import EngineClient
from frontend.guards import DrainGate
from frontend.tokenization import Tokenization

MIB = 1024 * 1024


@dataclass(frozen=True)
class FrontendSettings:
    """HTTP-side limits and defaults (deploy settings fill these in)."""

    # max_tokens when a request omits it: the rest of the context, capped by this.
    default_max_tokens: int
    # Largest `n` (choices per prompt) and largest prompts x n per request:
    # each choice is one engine request, i.e. one batch slot.
    max_n: int = 16
    max_choices: int = 64
    # Request bodies above this answer 413 (a long chat history is a few MB).
    max_request_bytes: int = 32 * MIB
    # Retry-After on 503 (engine unavailable): about an engine restart.
    retry_after_s: int = 5
    # GET /v1/mlx/status waits this long for the engine's answer.
    status_timeout_s: float = 5.0
    # mlx-lm's streaming detokenizers keep special tokens' text; so do we by default.
    skip_special_tokens: bool = False
    # Bearer keys accepted on /v1 routes; empty: no authentication.
    api_keys: tuple[str, ...] = ()
    # Origins allowed by CORS; empty: CORS off (browsers can't call us cross-origin).
    cors_origins: tuple[str, ...] = ()
    # The built-in web page at / (off: 404).
    ui: bool = True
    # The supervisor creates this file when a graceful stop begins.
    drain_flag: str | None = None
    # A stream waiting for its first token sends a keep-alive this often.
    keep_alive_s: float = sse.KEEPALIVE_INTERVAL_S

    def __post_init__(self) -> None:
        for name in ("default_max_tokens", "max_n", "max_choices", "max_request_bytes", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"FrontendSettings.{name} must be >= 1")
        if self.keep_alive_s <= 0:
            raise ValueError("FrontendSettings.keep_alive_s must be > 0")


@dataclass
class AppContext:
    engine: EngineClient
    tokenization: Tokenization
    settings: FrontendSettings
    started_at: float = field(default_factory=time.monotonic)
    drain_gate: DrainGate = field(init=False)

    def __post_init__(self) -> None:
        self.drain_gate = DrainGate(self.settings.drain_flag, self.settings.retry_after_s)
