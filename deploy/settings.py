"""Settings of one mlx-server instance: CLI > env MLX_SERVER_* > JSON config file > defaults.

`load_settings()` is the one resolver. It reads each layer, rejects the settings 0.2 removed and
unknown config keys by name, and turns every problem into a one-line `SettingsError` that says
where the bad value came from. `Settings` itself is a frozen, validated value; its
`runtime_config()` is what the engine and the HTTP workers are started with (ipc.runtime).
This module holds the one copy of every default.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, get_args

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from deploy import shardable
from deploy.hostfile import check_backend, read_hostfile
from ipc import runtime
from ipc.logging_setup import LOG_FORMATS, LOG_LEVELS, LogFormat, LogLevel

VERSION = "0.2.0"  # keep in step with pyproject.toml (a test checks)
PROG = "mlx-server"
ENV_PREFIX = "MLX_SERVER_"
MIGRATION_HINT = "see README, Migrating from 0.1"

MIN_PORT, MAX_PORT = 1, 65535
GIB = 1024**3
IPC_SCHEMES = ("ipc://", "tcp://")
KV_BITS, KV_GROUP_SIZES = runtime.KV_BITS, runtime.KV_GROUP_SIZES

# What a directory must hold, as glob pattern -> how to name it when it is missing.
MODEL_LAYOUT: dict[str, str] = {"config.json": "config.json", "*.safetensors": "*.safetensors file"}
ADAPTER_LAYOUT: dict[str, str] = {
    "adapter_config.json": "adapter_config.json",
    "adapters.safetensors": "adapters.safetensors",
}

NO_MODEL_PATH = (
    f"no model path: pass it as `{PROG} /path/to/model`, set {ENV_PREFIX}MODEL_PATH, or `model_path` in the config file"
)

# 0.1 settings that 0.2 removed -> what to do instead. Looked up for config keys, env vars and
# flags alike, so an old deployment fails loudly at start instead of silently changing behaviour.
REMOVED_SETTINGS: dict[str, str] = {
    "max_loaded_models": ("mlx-server serves one model per process; run one instance per model on its own port"),
    "model_cache_size_gb": ("mlx-server holds one model per process; bound the prefix cache with prompt_cache_bytes"),
    "auto_unload_timeout": ("the model stays loaded for the process lifetime; stop the instance to free its memory"),
    "models_cache_dir": f"pass the model directory path directly: {PROG} /path/to/model",
}
# Every 0.1 spelling (config key / env suffix / flag) -> the removed setting it meant.
REMOVED_SPELLINGS: dict[str, str] = {name: name for name in REMOVED_SETTINGS} | {
    "models_dir": "models_cache_dir",  # the 0.1 env var was MLX_SERVER_MODELS_DIR
}


# MLX_SERVER_* variables that are not settings: what the supervisor hands its children,
# and the caches of the demo model, the tests and the benchmarks. Any other is a typo or
# an old name, which a warning reports (tests/unit/test_settings.py keeps this list whole).
INTERNAL_ENV_VARS: frozenset[str] = frozenset(
    {runtime.CONFIG_ENV, *(ENV_PREFIX + name for name in ("DEMO_CACHE", "TEST_CACHE", "BENCH_CACHE"))}
)
# Settings renamed before 0.2 shipped -> the new name, for the warning's hint.
RENAMED_SETTINGS: dict[str, str] = {"threads": "worker_connections"}


class SettingsError(Exception):
    """Why the settings cannot be used, in one line fit for a terminal or a launchd log."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def removed_message(spelling: str, name: str) -> str:
    return f"`{spelling}` was removed in 0.2: {REMOVED_SETTINGS[name]} ({MIGRATION_HINT})"


def cpu_count() -> int:
    # Affinity first: in a container or under taskset, os.cpu_count() reports the host's cores.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def default_workers(cpus: int | None = None) -> int:
    # Workers do the per-token Python (detokenizing, SSE/JSON) under their own GIL, so more than
    # one uses more cores; but the engine process is the throughput limit and needs cores of its
    # own, hence at most half of them, and one on 2-3 cores: a gevent worker carries 64 streams
    # on a quarter of a core, and a second one only competes with the engine (BENCHMARKS.md,
    # "Measurements behind the defaults"). Several cores: more than one, so one busy or
    # restarting worker never stalls all HTTP; at most 4, since each worker also holds a
    # tokenizer and a socket and past that they only cost memory.
    cpus = cpu_count() if cpus is None else cpus
    return min(4, max(1, cpus // 2))


def _check_dir(path: Path, what: str, layout: Mapping[str, str]) -> Path:
    # abspath, not resolve(): keep the user's symlinked name, but make it immune to the
    # working directory of the processes it is handed to.
    path = Path(os.path.abspath(path.expanduser()))
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    missing = [name for pattern, name in layout.items() if not any(path.glob(pattern))]
    if missing:
        raise ValueError(f"{path} holds no {what}: it has no {' and no '.join(missing)}")
    return path


class Settings(BaseSettings):
    """Everything one instance needs; field descriptions double as `--help` text."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    model_path: Path = Field(description="model directory: config.json and *.safetensors weights")
    adapter_path: Path | None = Field(
        None, description="LoRA adapter directory: adapter_config.json and adapters.safetensors"
    )
    host: str = Field("127.0.0.1", description="address the HTTP server binds")
    port: int = Field(8000, description="TCP port the HTTP server binds")
    workers: int = Field(
        default_factory=default_workers,
        ge=1,
        description="gunicorn worker processes; unset or null: min(4, max(1, cores // 2))",
    )
    # Each open connection (a running request or an idle keep-alive one) holds one of its
    # worker's greenlets, so workers x worker_connections bound the concurrent requests.
    # Greenlets are cheap; 128 per worker lets one worker alone carry a full default batch
    # (max_batch_size 64) and as many idle keep-alive connections.
    worker_connections: int = Field(
        128, ge=1, description="open client connections per worker (each running request holds one)"
    )
    log_level: LogLevel = Field("info", description="debug, info, warning or error")
    log_format: LogFormat = Field("text", description="text lines, or json (one object per line)")
    # Without a cap one request could hold a batch slot for a whole long context;
    # 4096 fits any ordinary answer (mlx_lm.server's own default is 512).
    default_max_tokens: int = Field(4096, ge=1, description="max_tokens of a request that does not set it")
    prompt_cache_bytes: int = Field(2 * GIB, ge=0, description="byte cap of the engine's prefix cache; 0 disables it")
    # Admission by memory: a request enters the batch only while its prompt + max_tokens
    # fit beside the running ones; otherwise it waits (and beyond max_queued_requests, 429).
    # The derived default leaves the model, a headroom and the OS their share, so a flood of
    # long prompts queues instead of taking the engine out of memory.
    kv_cache_budget_bytes: int = Field(
        0,
        ge=0,
        description="KV cache memory of the running requests and the prefix cache together; "
        "0: derived at startup: the device's usable memory (Metal's recommended working set, "
        "else RAM; at most MLX's memory limit) - the loaded model - a headroom of 10% (at least 1 GiB)",
    )
    max_batch_size: int = Field(64, ge=1, description="sequences the engine decodes together")
    prefill_batch_size: int = Field(
        64, ge=1, description="prompts the engine prefills together (one forward for a whole burst)"
    )
    # Chunked prefill: a long prompt is fed in steps so the running streams keep getting tokens.
    prefill_step_size: int = Field(
        512,
        ge=1,
        description="prompt tokens per prefill step (while streams decode: fewer, sized to about one decode step)",
    )
    # KV cache quantization: 8 bits take about half the memory of a bf16 cache per token,
    # 4 bits about a quarter, for more streams and longer contexts (quality: BENCHMARKS.md).
    kv_bits: int | None = Field(
        None, description="bits of the quantized KV cache: 8 or 4; none: full precision (the model's dtype)"
    )
    kv_group_size: int = Field(
        64, description="elements per scale and bias of the quantized KV cache: 32, 64 or 128 (with kv_bits)"
    )
    engine_startup_timeout_s: float = Field(
        600.0, gt=0, description="seconds the engine may take to load the model (big ones are slow)"
    )
    request_timeout_s: float = Field(600.0, gt=0, description="seconds a request may run before it is aborted")
    # Backpressure: beyond this many waiting requests, new ones get 429 at once
    # instead of queueing for minutes.
    max_queued_requests: int = Field(
        256, ge=1, description="requests that may wait for a batch slot before new ones get 429"
    )
    # Security: off by default, like any local tool; set a key before binding beyond 127.0.0.1.
    api_key: str | None = Field(
        None, description="API key clients must send as `Authorization: Bearer KEY` or `x-api-key: KEY`"
    )
    api_key_file: Path | None = Field(None, description="file with accepted API keys, one per line")
    cors_origins: str | None = Field(None, description="comma-separated origins allowed by CORS (default: CORS off)")
    ui: bool = Field(True, description="serve the web page (status and chat playground) at / (false: 404)")
    # Graceful stop: new requests get 503 while running ones may finish this long.
    drain_timeout_s: float = Field(30.0, ge=0, description="seconds running requests may take to finish on SIGTERM")
    # A crash loop (bad weights, out of memory at load) must end, not spin forever.
    max_engine_restarts: int = Field(
        5, ge=0, description="engine restarts (with backoff) before mlx-server gives up and exits"
    )
    # One model over several processes (mlx.launch starts them): a hostfile spreads them over
    # Macs, a rank count keeps them on this machine (tests, or checking a set-up before spreading it).
    distributed_hostfile: Path | None = Field(
        None,
        description="mlx.launch hostfile (JSON): shard the model over its hosts, one rank each; "
        "the first host is this machine (rank 0)",
    )
    distributed_ranks: int | None = Field(None, description="shard the model over N ranks on this machine (N >= 2)")
    distributed_mode: runtime.DistributedMode = Field(
        "tensor",
        description="how a sharded model is split: tensor (every layer over all ranks) "
        "or pipeline (consecutive layers per rank)",
    )
    distributed_backend: runtime.DistributedBackend = Field(
        "ring",
        description="mlx.distributed backend of a sharded model: ring (TCP), jaccl (Thunderbolt 5 RDMA) "
        "or nccl (NVIDIA GPUs with mlx's CUDA build, one GPU per rank)",
    )
    ipc_address: str | None = Field(
        None,
        description="engine socket, ipc://PATH or tcp://HOST:PORT "
        "(default: an ipc:// socket in a private 0700 runtime directory)",
    )
    config: Path | None = Field(None, description="JSON config file (keys: the setting names)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() layers CLI, environment and config file itself: it takes an injected
        # environ, and its errors name the flag, variable or file a bad value came from, which
        # the stock sources cannot. Settings only validates what it is given, and a stray .env
        # file or secrets dir can never reconfigure a server behind its back.
        return (init_settings,)

    @field_validator("model_path")
    @classmethod
    def _holds_model(cls, path: Path) -> Path:
        return _check_dir(path, "model", MODEL_LAYOUT)

    @field_validator("adapter_path")
    @classmethod
    def _holds_adapter(cls, path: Path | None) -> Path | None:
        return None if path is None else _check_dir(path, "adapter", ADAPTER_LAYOUT)

    @field_validator("config")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        return None if path is None else Path(os.path.abspath(path.expanduser()))

    @field_validator("port")
    @classmethod
    def _port_in_range(cls, port: int) -> int:
        if not MIN_PORT <= port <= MAX_PORT:
            raise ValueError(f"{port} is out of range {MIN_PORT}-{MAX_PORT}")
        return port

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        # null in a config file means "size it from this machine", as when it is not set at all.
        return default_workers() if value is None else value

    @field_validator("kv_bits", mode="before")
    @classmethod
    def _kv_bits_or_none(cls, value: object) -> object:
        # "none" spells full precision on a command line or in an environment variable.
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        if str(value).strip() not in {str(b) for b in KV_BITS}:
            raise ValueError(f"kv_bits must be {', '.join(map(str, KV_BITS))} or none, got {value!r}")
        return int(str(value).strip())

    @field_validator("kv_group_size", mode="before")
    @classmethod
    def _known_kv_group_size(cls, value: object) -> object:
        if str(value).strip() not in {str(g) for g in KV_GROUP_SIZES}:
            raise ValueError(f"kv_group_size must be {', '.join(map(str, KV_GROUP_SIZES))}, got {value!r}")
        return int(str(value).strip())

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_log_level(cls, value: object) -> object:
        level = str(value).lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}: use one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _known_log_format(cls, value: object) -> object:
        log_format = str(value).lower()
        if log_format not in LOG_FORMATS:
            raise ValueError(f"unknown log format {value!r}: use one of {', '.join(LOG_FORMATS)}")
        return log_format

    @field_validator("api_key_file")
    @classmethod
    def _readable_keys(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        path = Path(os.path.abspath(path.expanduser()))
        try:
            keys = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        if not keys:
            raise ValueError(f"{path} holds no API key")
        return path

    def api_keys(self) -> tuple[str, ...]:
        """Every accepted key: --api-key plus the lines of --api-key-file."""
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file is not None:
            keys += [line.strip() for line in self.api_key_file.read_text().splitlines() if line.strip()]
        return tuple(keys)

    def cors_origin_list(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in (self.cors_origins or "").split(",") if o.strip())

    @field_validator("ipc_address")
    @classmethod
    def _known_scheme(cls, address: str | None) -> str | None:
        if address is not None and not address.startswith(IPC_SCHEMES):
            raise ValueError(f"{address!r} must start with {' or '.join(IPC_SCHEMES)}")
        return address

    @field_validator("distributed_hostfile")
    @classmethod
    def _parses(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        path = Path(os.path.abspath(path.expanduser()))
        read_hostfile(path)  # ValueError: its one line names the problem
        return path

    @field_validator("distributed_ranks")
    @classmethod
    def _a_group(cls, ranks: int | None, info: ValidationInfo) -> int | None:
        if ranks is not None and info.data.get("distributed_hostfile") is not None:
            raise ValueError("set distributed_ranks or distributed_hostfile, not both (the hostfile sets the ranks)")
        if ranks is not None and ranks < 2:
            raise ValueError(f"a group needs at least 2 ranks, got {ranks} (unset: one engine process)")
        return ranks

    @field_validator("distributed_mode", "distributed_backend")
    @classmethod
    def _needs_a_group(cls, value: str, info: ValidationInfo) -> str:
        # Runs only on a given value (defaults are not validated). The defaults may be spelled
        # out (config.example.json does); another value without a group would be silently unused.
        default = cls.model_fields[str(info.field_name)].default
        grouped = info.data.get("distributed_ranks") or info.data.get("distributed_hostfile")
        if value != default and not grouped:
            raise ValueError(f"{value!r} needs a group: set distributed_ranks or distributed_hostfile")
        return value

    @model_validator(mode="after")
    def _shardable(self) -> Settings:
        group = self.distributed()
        if group is None:
            return self
        if group.hostfile is None and group.backend == "jaccl":
            raise ValueError(
                "distributed_backend jaccl needs distributed_hostfile (its hosts' RDMA devices); "
                "ranks on one machine use ring"
            )
        if group.hostfile is not None:
            try:
                check_backend(read_hostfile(Path(group.hostfile)), group.backend)
            except ValueError as exc:
                raise ValueError(f"distributed_hostfile {group.hostfile}: {exc}") from None
        problem = shardable.config_problem(self.model_path, group.mode, group.ranks)
        if problem is not None:
            raise ValueError(problem)
        return self

    def distributed(self) -> runtime.DistributedConfig | None:
        """The engine group, or None for one engine process."""
        if self.distributed_hostfile is not None:
            ranks = len(read_hostfile(self.distributed_hostfile).hosts)
        elif self.distributed_ranks is not None:
            ranks = self.distributed_ranks
        else:
            return None
        return runtime.DistributedConfig(
            mode=self.distributed_mode,
            backend=self.distributed_backend,
            ranks=ranks,
            hostfile=None if self.distributed_hostfile is None else str(self.distributed_hostfile),
        )

    def engine_config(self) -> runtime.EngineConfig:
        return runtime.EngineConfig(
            max_batch_size=self.max_batch_size,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step_size=self.prefill_step_size,
            prompt_cache_bytes=self.prompt_cache_bytes,
            max_queued_requests=self.max_queued_requests,
            kv_cache_budget_bytes=self.kv_cache_budget_bytes,
            kv_bits=self.kv_bits,
            kv_group_size=self.kv_group_size,
        )

    def runtime_config(
        self, address: str, *, drain_flag: str | None = None, supervisor_pid: int | None = None
    ) -> runtime.RuntimeConfig:
        """What the engine and the HTTP workers run with; drain_flag and supervisor_pid
        only under the supervisor (a Procfile runner has neither)."""
        return runtime.RuntimeConfig(
            model_path=str(self.model_path),
            adapter_path=None if self.adapter_path is None else str(self.adapter_path),
            distributed=self.distributed(),
            ipc_address=address,
            log_level=self.log_level,
            log_format=self.log_format,
            engine=self.engine_config(),
            web=runtime.WebConfig(
                default_max_tokens=self.default_max_tokens,
                request_timeout_s=self.request_timeout_s,
                max_queued_requests=self.max_queued_requests,
                api_keys=self.api_keys(),
                cors_origins=self.cors_origin_list(),
                ui=self.ui,
                drain_flag=drain_flag,
                supervisor_pid=supervisor_pid,
            ),
        )


# Settings a config file may hold: all but the pointer to the file itself.
FILE_KEYS: tuple[str, ...] = tuple(name for name in Settings.model_fields if name != "config")

# One resolved layer: setting name -> (raw value, where it came from).
Layer = dict[str, tuple[Any, str]]


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print its whole usage block; one line is what a launchd log can show.
        raise SettingsError(f"{message} (see `{self.prog} --help`)")


class _RemovedFlag(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: str | None = None) -> None:
        spelling = option or self.option_strings[0]
        name = REMOVED_SPELLINGS[spelling.lstrip("-").replace("-", "_")]
        raise SettingsError(removed_message(spelling, name))


class _ModelFlag(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: str | None = None) -> None:
        path = values or "/path/to/model"
        raise SettingsError(f"--model was removed in 0.2: the model path is now positional: {PROG} {path}")


# Flag metavars by value type; others show their name (HOST, LOG_LEVEL, IPC_ADDRESS).
METAVARS: dict[type, str] = {int: "N", float: "SECONDS", Path: "PATH", bool: "BOOL"}
# Flags whose values are not a plain count.
NAMED_METAVARS: dict[str, str] = {"kv_bits": "BITS"}


def _metavar(name: str, field: FieldInfo) -> str:
    if name in NAMED_METAVARS:
        return NAMED_METAVARS[name]
    types = (field.annotation, *get_args(field.annotation))  # Path | None -> Path, NoneType
    return next((METAVARS[t] for t in types if t in METAVARS), name.upper())


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"{field.default_factory()} on this machine"  # type: ignore[call-arg]
    return "none" if field.default is None else str(field.default)


HIDDEN = argparse.SUPPRESS  # removed flags: recognised to explain themselves, never advertised


def build_parser() -> argparse.ArgumentParser:
    """The `mlx-server` command line, one flag per Settings field (model_path is positional)."""
    parser = _Parser(
        prog=PROG,
        # A typo such as --prefill must not quietly pick one of several --prefill-* flags.
        allow_abbrev=False,
        description="Serve one MLX model over an OpenAI-compatible HTTP API.",
        epilog=f"Precedence: flags > {ENV_PREFIX}* environment > --config file > defaults.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    parser.add_argument(
        "model_path",
        nargs="?",  # it may come from the environment or the config file instead
        metavar="MODEL_PATH",
        help=f"{Settings.model_fields['model_path'].description} [env {env_var('model_path')}]",
    )
    for name, field in Settings.model_fields.items():
        if name == "model_path":
            continue
        text = f"{field.description} [default: {_default_text(field)}; env {env_var(name)}]"
        help_text = text.replace("%", "%%")  # argparse formats help with %
        parser.add_argument(flag(name), dest=name, metavar=_metavar(name, field), help=help_text)
    for spelling in REMOVED_SPELLINGS:
        spellings = dict.fromkeys([flag(spelling), "--" + spelling])  # 0.1 took both forms
        parser.add_argument(*spellings, dest=f"removed_{spelling}", nargs="?", action=_RemovedFlag, help=HIDDEN)
    parser.add_argument("--model", dest="removed_model", nargs="?", action=_ModelFlag, help=HIDDEN)
    return parser


def _cli_layer(argv: Sequence[str]) -> Layer:
    namespace = build_parser().parse_args(list(argv))
    # Every flag takes a value, so None can only mean "not given".
    given = {name: value for name, value in vars(namespace).items() if value is not None}
    return {
        name: (value, "the MODEL_PATH argument" if name == "model_path" else flag(name))
        for name, value in given.items()
    }


# ---------------------------------------------------------------- environment and file


def _env_layer(environ: Mapping[str, str]) -> Layer:
    for spelling, name in REMOVED_SPELLINGS.items():
        if environ.get(env_var(spelling)):
            raise SettingsError(removed_message(env_var(spelling), name))
    # Empty counts as unset: launchd plists and Procfiles often carry empty placeholders.
    return {
        name: (environ[env_var(name)], env_var(name)) for name in Settings.model_fields if environ.get(env_var(name))
    }


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"config file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold one JSON object of settings")
    return data


def _file_layer(path: Path) -> Layer:
    data = _read_json_object(path)
    origin = f"config file {path}"
    for key in data:
        if key in REMOVED_SPELLINGS:
            raise SettingsError(f"{origin}: {removed_message(key, REMOVED_SPELLINGS[key])}")
        if key not in FILE_KEYS:
            # A typo must fail here: silently ignored, it would leave the default in place.
            close = difflib.get_close_matches(key, FILE_KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise SettingsError(f"{origin}: unknown setting `{key}`{hint}")
    return {key: (value, origin) for key, value in data.items()}


def unknown_env_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per set MLX_SERVER_* variable that no setting reads: unlike a config file's
    unknown key (an error), the environment may hold variables for other programs."""
    environ = os.environ if environ is None else environ
    known = {env_var(name) for name in Settings.model_fields} | INTERNAL_ENV_VARS
    known |= {env_var(spelling) for spelling in REMOVED_SPELLINGS}  # those are errors already
    lines = []
    for var in sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known):
        suffix = var[len(ENV_PREFIX) :].lower()
        suggestion = RENAMED_SETTINGS.get(suffix) or next(
            iter(difflib.get_close_matches(suffix, Settings.model_fields, n=1)), None
        )
        hint = f" (did you mean {env_var(suggestion)}?)" if suggestion else ""
        lines.append(f"{var} is not a setting and is ignored{hint}")
    return lines


# ---------------------------------------------------------------- resolution


def _describe(error: ValidationError, origins: Mapping[str, str]) -> str:
    problems = error.errors(include_url=False)
    first = problems[0]
    # A check across settings (a model validator) has no location: its message names them.
    name = str(first["loc"][0]) if first["loc"] else ""
    if first["type"] == "value_error":  # our validators: the message already names the value
        text = str(first["ctx"]["error"])
    else:  # pydantic's own, e.g. "Input should be a valid integer": add what it got
        text = f"{first['msg'][0].lower()}{first['msg'][1:]}, got {first['input']!r}"
    where = f" (from {origins[name]})" if name in origins else ""
    # One line, so the first problem in field order; the count says fixing it is not the end.
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{name}: {text}{where}{more}" if name else f"{text}{more}"


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve argv (default sys.argv[1:]) > environ (default os.environ) > config file > defaults.

    Raises SettingsError (one line) on any bad or removed setting. `--help` and `--version`
    print and raise SystemExit(0), as argparse does.
    """
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    cli = _cli_layer(argv)
    env = _env_layer(environ)
    config = cli.get("config") or env.get("config")
    file = _file_layer(Path(config[0]).expanduser()) if config else {}
    layers: Layer = {**file, **env, **cli}  # later layers win
    if "model_path" not in layers:
        raise SettingsError(NO_MODEL_PATH)
    try:
        return Settings(**{name: value for name, (value, _) in layers.items()})
    except ValidationError as exc:
        origins = {name: origin for name, (_, origin) in layers.items()}
        raise SettingsError(_describe(exc, origins)) from None
