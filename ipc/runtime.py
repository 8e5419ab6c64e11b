"""What the engine and the HTTP workers are started with: one typed config in one variable.

``deploy`` resolves the settings (and their defaults) once, builds a ``RuntimeConfig``
and puts it, as JSON, in ``CONFIG_ENV`` of both children; the engine and the gunicorn
master and workers decode it. Every field is required: a default here would be a
second copy of ``deploy/settings.py``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

from ipc.logging_setup import LogFormat, LogLevel

# The only MLX_SERVER_* variable that is not a setting and that the product itself sets.
CONFIG_ENV = "MLX_SERVER_RUNTIME_CONFIG"

# What the engine's quantized KV cache supports (EngineConfig.kv_bits, kv_group_size):
# mx.quantize's bit widths and group sizes that mlx's quantized attention serves.
KV_BITS = (8, 4)
KV_GROUP_SIZES = (32, 64, 128)


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The engine's limits (engine.core.SchedulerConfig takes them by these names)."""

    max_batch_size: int
    prefill_batch_size: int
    prefill_step_size: int
    prompt_cache_bytes: int
    max_queued_requests: int
    kv_cache_budget_bytes: int  # 0: derived by the engine from its device and model
    kv_bits: int | None  # None: full-precision KV cache
    kv_group_size: int


class WebConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What each HTTP worker (and the gunicorn master) needs."""

    default_max_tokens: int
    request_timeout_s: float
    max_queued_requests: int
    api_keys: tuple[str, ...]  # empty: no authentication
    cors_origins: tuple[str, ...]  # empty: CORS off
    ui: bool  # the web page at /
    # Set only under the supervisor: the file whose existence means "graceful stop in
    # progress", and the pid whose death makes gunicorn shut down.
    drain_flag: str | None
    supervisor_pid: int | None


DistributedMode = Literal["tensor", "pipeline"]
DistributedBackend = Literal["ring", "jaccl", "nccl"]


class DistributedConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One model sharded over a group of engine processes (mlx.distributed).

    Every rank is started (by mlx.launch) with the same RuntimeConfig; rank 0
    is the engine the HTTP workers talk to, the others follow its step plans.
    """

    mode: DistributedMode  # tensor: model.shard(group); pipeline: layers split over ranks
    backend: DistributedBackend
    ranks: int  # the group's size
    hostfile: str | None  # mlx.launch's hostfile; None: every rank on this machine


class RuntimeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model_path: str
    adapter_path: str | None
    # None: one engine process (no mlx.distributed group).
    distributed: DistributedConfig | None
    ipc_address: str
    log_level: LogLevel
    log_format: LogFormat
    engine: EngineConfig
    web: WebConfig


class ConfigError(Exception):
    """The process was started without a usable config; one line for its stderr."""


def encode(config: RuntimeConfig) -> str:
    return msgspec.json.encode(config).decode()


def from_environ(environ: Mapping[str, str]) -> RuntimeConfig:
    raw = environ.get(CONFIG_ENV)
    if not raw:
        raise ConfigError(f"{CONFIG_ENV} is not set: start the server with mlx-server (or deploy.procfile)")
    try:
        return msgspec.json.decode(raw, type=RuntimeConfig)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise ConfigError(f"{CONFIG_ENV} is not a valid config: {exc}") from None
