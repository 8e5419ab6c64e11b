"""The product's defaults, read from their one home (deploy/settings.py), for tests that
build an engine Scheduler or a ZmqEngineClient directly instead of through mlx-server."""

from __future__ import annotations

from typing import Any

import msgspec

from deploy.settings import Settings
from frontend.context import FrontendSettings

DEFAULTS = Settings.model_construct()  # every default; no model directory needed
# SchedulerConfig's limits, by their names in ipc.runtime.EngineConfig.
ENGINE_LIMITS: dict[str, int] = msgspec.structs.asdict(DEFAULTS.engine_config())
# ZmqEngineClient's keyword arguments.
CLIENT_LIMITS: dict[str, float] = {
    "request_timeout_s": DEFAULTS.request_timeout_s,
    "max_queued_requests": DEFAULTS.max_queued_requests,
}


def frontend_settings(**overrides: Any) -> FrontendSettings:
    """The HTTP side's settings as mlx-server would make them, with ``overrides``."""
    return FrontendSettings(**{"default_max_tokens": DEFAULTS.default_max_tokens, **overrides})
