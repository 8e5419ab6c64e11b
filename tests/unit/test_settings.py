"""Settings resolution: precedence, validation messages, removed 0.1 settings, example config."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deploy.settings import (
    ENV_PREFIX,
    FILE_KEYS,
    GIB,
    NO_MODEL_PATH,
    REMOVED_SETTINGS,
    REMOVED_SPELLINGS,
    VERSION,
    Settings,
    SettingsError,
    build_parser,
    default_workers,
    load_settings,
    unknown_env_warnings,
)
from ipc import runtime

REPO = Path(__file__).resolve().parents[2]
MIGRATION = "(see README, Migrating from 0.1)"


def make_model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").touch()
    return path


def make_adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapters.safetensors").touch()
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "model")


def write_config(tmp_path: Path, data: Any, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def load(argv: list[str], environ: Mapping[str, str] | None = None) -> Settings:
    # An empty environ by default: a developer's MLX_SERVER_* variables must not leak into tests.
    return load_settings(argv, {} if environ is None else environ)


def error_of(argv: list[str], environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(SettingsError) as caught:
        load(argv, environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- defaults and precedence


def test_defaults(model: Path) -> None:
    s = load([str(model)])
    assert s.model_path == model
    assert s.adapter_path is None
    assert (s.host, s.port, s.worker_connections, s.log_level) == ("127.0.0.1", 8000, 128, "info")
    assert s.workers == default_workers()
    assert s.default_max_tokens == 4096
    assert s.prompt_cache_bytes == 2 * GIB
    assert (s.max_batch_size, s.prefill_batch_size, s.prefill_step_size) == (64, 64, 512)
    assert (s.engine_startup_timeout_s, s.request_timeout_s) == (600.0, 600.0)
    assert s.ipc_address is None and s.config is None


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (3, 1), (4, 2), (6, 3), (8, 4), (64, 4)])
def test_default_workers_sized_from_cores(cpus: int, workers: int) -> None:
    assert default_workers(cpus) == workers


# setting, config-file value, env value, CLI value (as typed), parsed CLI value
PRECEDENCE = [
    ("port", 8001, "8002", "8003", 8003),
    ("host", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.3"),
    ("worker_connections", 4, "5", "6", 6),
    ("log_level", "debug", "warning", "ERROR", "error"),
    ("prompt_cache_bytes", 1, "2", "0", 0),
    ("request_timeout_s", 1.5, "2.5", "3.5", 3.5),
    ("ipc_address", "ipc:///tmp/a", "ipc:///tmp/b", "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
]


@pytest.mark.parametrize(("name", "in_file", "in_env", "on_cli", "parsed"), PRECEDENCE)
def test_precedence_cli_env_file_default(
    tmp_path: Path, model: Path, name: str, in_file: Any, in_env: str, on_cli: str, parsed: Any
) -> None:
    config = write_config(tmp_path, {name: in_file})
    flag = "--" + name.replace("_", "-")
    env = {ENV_PREFIX + name.upper(): in_env}
    base = [str(model), "--config", str(config)]
    assert getattr(load([*base, flag, on_cli], env), name) == parsed
    env_value = getattr(load(base, env), name)
    assert env_value == type(parsed)(in_env.lower() if name == "log_level" else in_env)
    assert getattr(load(base), name) == in_file
    assert getattr(load([str(model)]), name) == Settings.model_fields[name].default


def test_model_path_precedence(tmp_path: Path) -> None:
    first, second, third = (make_model(tmp_path / n) for n in ("a", "b", "c"))
    config = write_config(tmp_path, {"model_path": str(third)})
    env = {"MLX_SERVER_MODEL_PATH": str(second), "MLX_SERVER_CONFIG": str(config)}
    assert load([str(first)], env).model_path == first
    assert load([], env).model_path == second
    assert load([], {"MLX_SERVER_CONFIG": str(config)}).model_path == third


def test_config_flag_beats_config_env(tmp_path: Path, model: Path) -> None:
    by_env = write_config(tmp_path, {"port": 9001}, "env.json")
    by_flag = write_config(tmp_path, {"port": 9002}, "flag.json")
    s = load([str(model), "--config", str(by_flag)], {"MLX_SERVER_CONFIG": str(by_env)})
    assert s.port == 9002 and s.config == by_flag


def test_empty_env_var_counts_as_unset(model: Path) -> None:
    s = load([str(model)], {"MLX_SERVER_PORT": "", "MLX_SERVER_ADAPTER_PATH": ""})
    assert s.port == 8000 and s.adapter_path is None


def test_adapter_path(tmp_path: Path, model: Path) -> None:
    adapter = make_adapter(tmp_path / "adapter")
    assert load([str(model), "--adapter-path", str(adapter)]).adapter_path == adapter
    assert load([str(model)], {"MLX_SERVER_ADAPTER_PATH": str(adapter)}).adapter_path == adapter


def test_relative_paths_become_absolute(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The supervisor's children may run elsewhere; the path they get must not depend on cwd.
    monkeypatch.chdir(model.parent)
    assert load(["model"]).model_path == model


def test_workers_null_in_file_means_auto(tmp_path: Path, model: Path) -> None:
    config = write_config(tmp_path, {"workers": None})
    assert load([str(model), "--config", str(config)]).workers == default_workers()


def test_settings_is_frozen(model: Path) -> None:
    s = load([str(model)])
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]
    assert s.model_copy(update={"port": 1}).port == 1


def test_settings_ignores_dotenv_and_environment(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only load_settings() layers sources; Settings(...) validates exactly what it is given.
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MLX_SERVER_PORT=1234\n")
    monkeypatch.setenv("MLX_SERVER_THREADS", "3")
    s = Settings(model_path=model)
    assert (s.port, s.worker_connections) == (8000, 128)


def test_settings_round_trip_through_json(model: Path) -> None:
    # How the supervisor can hand resolved settings to a child process.
    s = load([str(model), "--port", "8123"])
    assert Settings.model_validate_json(s.model_dump_json()) == s


# ---------------------------------------------------------------- validation errors


def test_missing_model_path() -> None:
    assert error_of([]) == NO_MODEL_PATH
    assert error_of([]).startswith("no model path: pass it as `mlx-server /path/to/model`")


def test_model_path_does_not_exist(tmp_path: Path) -> None:
    message = error_of([str(tmp_path / "nope")])
    assert f"{tmp_path / 'nope'} does not exist" in message
    assert "MODEL_PATH argument" in message


@pytest.mark.parametrize(
    ("files", "missing"),
    [
        ((), "no config.json and no *.safetensors file"),
        (("config.json",), "no *.safetensors file"),
        (("model.safetensors",), "no config.json"),
    ],
)
def test_model_path_holds_no_model(tmp_path: Path, files: tuple[str, ...], missing: str) -> None:
    for name in files:
        (tmp_path / name).touch()
    message = error_of([str(tmp_path)])
    assert f"{tmp_path} holds no model: it has {missing}" in message


def test_sharded_weights_count_as_a_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").touch()
    (tmp_path / "model-00001-of-00002.safetensors").touch()
    assert load([str(tmp_path)]).model_path == tmp_path


def test_model_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "weights").touch()
    assert "is not a directory" in error_of([str(tmp_path / "weights")])


def test_model_path_error_names_env_var(tmp_path: Path) -> None:
    message = error_of([], {"MLX_SERVER_MODEL_PATH": str(tmp_path / "nope")})
    assert message.endswith("(from MLX_SERVER_MODEL_PATH)")


def test_adapter_path_missing(tmp_path: Path, model: Path) -> None:
    message = error_of([str(model), "--adapter-path", str(tmp_path / "nope")])
    assert message.startswith("adapter_path: ") and "does not exist" in message


@pytest.mark.parametrize("present", ["adapter_config.json", "adapters.safetensors"])
def test_adapter_path_without_adapter_files(tmp_path: Path, model: Path, present: str) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / present).touch()
    missing = {"adapter_config.json", "adapters.safetensors"} - {present}
    message = error_of([str(model), "--adapter-path", str(adapter)])
    assert f"holds no adapter: it has no {missing.pop()}" in message


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_port_out_of_range(model: Path, port: str) -> None:
    message = error_of([str(model), f"--port={port}"])
    assert message == f"port: {port} is out of range 1-65535 (from --port)"


def test_port_not_a_number_from_env(model: Path) -> None:
    message = error_of([str(model)], {"MLX_SERVER_PORT": "http"})
    assert message.startswith("port: input should be a valid integer")
    assert message.endswith("got 'http' (from MLX_SERVER_PORT)")


@pytest.mark.parametrize("name", ["workers", "worker_connections", "max_batch_size", "prefill_step_size"])
def test_counts_below_one(model: Path, name: str) -> None:
    flag = "--" + name.replace("_", "-")
    message = error_of([str(model), flag, "0"])
    assert message.startswith(f"{name}: input should be greater than or equal to 1")


def test_several_problems_report_the_first_and_count_the_rest(model: Path) -> None:
    message = error_of([str(model), "--port", "x", "--worker-connections", "0", "--workers", "0"])
    assert message.startswith("port: ") and message.endswith("(+2 more)")


def test_unknown_log_level(model: Path) -> None:
    message = error_of([str(model), "--log-level", "verbose"])
    assert message.startswith("log_level: unknown log level 'verbose'")
    assert "debug, info, warning, error" in message


def test_ipc_address_scheme(model: Path) -> None:
    assert "must start with ipc:// or tcp://" in error_of([str(model), "--ipc-address", "/tmp/s"])


def test_unreadable_config(tmp_path: Path, model: Path) -> None:
    message = error_of([str(model), "--config", str(tmp_path / "missing.json")])
    assert message.startswith(f"cannot read config file {tmp_path / 'missing.json'}")


def test_invalid_json_config(tmp_path: Path, model: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text('{"port": 8000,}')
    message = error_of([str(model), "--config", str(config)])
    assert f"config file {config} is not valid JSON" in message


def test_config_must_be_an_object(tmp_path: Path, model: Path) -> None:
    config = write_config(tmp_path, [1, 2])
    assert "must hold one JSON object" in error_of([str(model), "--config", str(config)])


def test_unknown_config_key_is_named(tmp_path: Path, model: Path) -> None:
    config = write_config(tmp_path, {"prot": 8001})
    message = error_of([str(model), "--config", str(config)])
    assert message == f"config file {config}: unknown setting `prot` (did you mean `port`?)"


def test_bad_value_in_config_names_the_file(tmp_path: Path, model: Path) -> None:
    config = write_config(tmp_path, {"worker_connections": "many"})
    assert error_of([str(model), "--config", str(config)]).endswith(f"(from config file {config})")


def test_unknown_flag_is_one_line(model: Path) -> None:
    message = error_of([str(model), "--prot", "8001"])
    assert message == "unrecognized arguments: --prot 8001 (see `mlx-server --help`)"


def test_flags_are_not_abbreviated(model: Path) -> None:
    assert "unrecognized arguments" in error_of([str(model), "--thr", "4"])


# ---------------------------------------------------------------- removed 0.1 settings


def test_removed_table_covers_every_0_1_setting() -> None:
    assert set(REMOVED_SETTINGS) == {
        "max_loaded_models",
        "model_cache_size_gb",
        "auto_unload_timeout",
        "models_cache_dir",
    }
    assert REMOVED_SPELLINGS["models_dir"] == "models_cache_dir"


def test_removed_message_for_max_loaded_models(tmp_path: Path, model: Path) -> None:
    config = write_config(tmp_path, {"max_loaded_models": 3})
    message = error_of([str(model), "--config", str(config)])
    assert message.endswith(
        "`max_loaded_models` was removed in 0.2: mlx-server serves one model per process; "
        "run one instance per model on its own port (see README, Migrating from 0.1)"
    )


ADVICE = {
    "max_loaded_models": "one instance per model",
    "model_cache_size_gb": "prompt_cache_bytes",
    "auto_unload_timeout": "stop the instance",
    "models_cache_dir": "pass the model directory path directly",
}


@pytest.mark.parametrize("spelling", sorted(REMOVED_SPELLINGS))
def test_removed_in_config_file(tmp_path: Path, model: Path, spelling: str) -> None:
    config = write_config(tmp_path, {spelling: 1})
    message = error_of([str(model), "--config", str(config)])
    assert f"`{spelling}` was removed in 0.2" in message
    assert ADVICE[REMOVED_SPELLINGS[spelling]] in message and message.endswith(MIGRATION)


@pytest.mark.parametrize("spelling", sorted(REMOVED_SPELLINGS))
def test_removed_in_environment(model: Path, spelling: str) -> None:
    variable = ENV_PREFIX + spelling.upper()
    message = error_of([str(model)], {variable: "1"})
    assert message.startswith(f"`{variable}` was removed in 0.2")
    assert ADVICE[REMOVED_SPELLINGS[spelling]] in message and message.endswith(MIGRATION)


@pytest.mark.parametrize("spelling", sorted(REMOVED_SPELLINGS))
@pytest.mark.parametrize("dashes", [True, False])
def test_removed_on_command_line(model: Path, spelling: str, dashes: bool) -> None:
    flag = "--" + (spelling.replace("_", "-") if dashes else spelling)
    for argv in ([str(model), flag, "1"], [str(model), flag]):
        message = error_of(argv)
        assert message.startswith(f"`{flag}` was removed in 0.2")
        assert ADVICE[REMOVED_SPELLINGS[spelling]] in message


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["--model", "/models/qwen"], "/models/qwen"),
        (["--model=/models/qwen"], "/models/qwen"),
        (["--model"], "/path/to/model"),
    ],
)
def test_model_flag_points_to_positional(argv: list[str], shown: str) -> None:
    message = error_of(argv)
    assert message == (f"--model was removed in 0.2: the model path is now positional: mlx-server {shown}")


# ---------------------------------------------------------------- flags, example file, version


def test_every_setting_has_a_flag_and_env_var() -> None:
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    help_text = parser.format_help()
    for name in Settings.model_fields:
        if name != "model_path":
            assert "--" + name.replace("_", "-") in flags
        assert ENV_PREFIX + name.upper() in help_text


def test_example_config_lists_every_setting() -> None:
    data = json.loads((REPO / "config.example.json").read_text())
    assert list(data) == list(FILE_KEYS)
    assert set(FILE_KEYS) == set(Settings.model_fields) - {"config"}
    assert not set(data) & set(REMOVED_SPELLINGS)


def test_example_config_loads_with_defaults(tmp_path: Path, model: Path) -> None:
    data = json.loads((REPO / "config.example.json").read_text())
    data["model_path"] = str(model)
    config = write_config(tmp_path, data, "example.json")
    from_file = load(["--config", str(config)])
    assert from_file.model_copy(update={"config": None}) == load([str(model)])


def test_version_matches_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == VERSION


def test_every_mlx_server_variable_the_code_reads_is_known() -> None:
    # The warning for unknown MLX_SERVER_* variables must never name one the product uses.
    packages = ("deploy", "frontend", "engine", "ipc", "bench", "tests")
    sources = [p for d in packages for p in (REPO / d).rglob("*.py")]
    used = {m for p in sources for m in re.findall(r"MLX_SERVER_[A-Z][A-Z_]*[A-Z]", p.read_text())}
    used -= {"MLX_SERVER_PROT", "MLX_SERVER_THREADS", "MLX_SERVER_ZZZ", "MLX_SERVER_API_KEYS"}  # the examples below
    assert runtime.CONFIG_ENV in used
    assert unknown_env_warnings(dict.fromkeys(used, "1")) == []
    assert unknown_env_warnings({"MLX_SERVER_API_KEYS": "k"}) == [
        "MLX_SERVER_API_KEYS is not a setting and is ignored (did you mean MLX_SERVER_API_KEY?)"
    ]


def test_unknown_env_warning_ignores_empty_prefix_and_other_programs() -> None:
    assert unknown_env_warnings({"MLX_OTHER": "1", "PATH": "/bin"}) == []
    assert unknown_env_warnings({"MLX_SERVER_ZZZ": "1"}) == ["MLX_SERVER_ZZZ is not a setting and is ignored"]


# ---------------------------------------------------------------- the web page switch


def test_ui_is_on_by_default_and_off_from_each_layer(tmp_path: Path, model: Path) -> None:
    assert load([str(model)]).runtime_config("ipc:///x").web.ui is True
    assert load([str(model), "--ui", "false"]).ui is False
    assert load([str(model)], {"MLX_SERVER_UI": "0"}).ui is False
    config = write_config(tmp_path, {"ui": False})
    assert load([str(model), "--config", str(config)]).runtime_config("ipc:///x").web.ui is False
    assert "ui" in error_of([str(model), "--ui", "maybe"])


# ---------------------------------------------------------------- a sharded engine (mlx.distributed)


def shaped_model(path: Path, **sizes: int) -> Path:
    make_model(path)
    (path / "config.json").write_text(json.dumps(sizes))
    return path


def test_no_group_by_default(model: Path) -> None:
    assert load([str(model)]).runtime_config("ipc:///x").distributed is None


def test_ranks_on_this_machine_from_each_layer(tmp_path: Path, model: Path) -> None:
    group = runtime.DistributedConfig(mode="tensor", backend="ring", ranks=2, hostfile=None)
    assert load([str(model), "--distributed-ranks", "2"]).runtime_config("ipc:///x").distributed == group
    env = {"MLX_SERVER_DISTRIBUTED_RANKS": "2", "MLX_SERVER_DISTRIBUTED_MODE": "pipeline"}
    assert load([str(model)], env).distributed() == runtime.DistributedConfig(
        mode="pipeline", backend="ring", ranks=2, hostfile=None
    )
    config = write_config(tmp_path, {"distributed_ranks": 4, "distributed_mode": "tensor"})
    assert load([str(model), "--config", str(config)]).distributed() == runtime.DistributedConfig(
        mode="tensor", backend="ring", ranks=4, hostfile=None
    )


def test_a_hostfile_sets_the_ranks(tmp_path: Path, model: Path) -> None:
    hosts = [{"ssh": "127.0.0.1", "ips": ["10.0.0.1"]}, {"ssh": "mac-b", "ips": ["10.0.0.2"]}]
    hostfile = write_config(tmp_path, hosts, "hosts.json")
    group = load([str(model), "--distributed-hostfile", str(hostfile)]).distributed()
    assert group == runtime.DistributedConfig(mode="tensor", backend="ring", ranks=2, hostfile=str(hostfile))


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--distributed-ranks", "1"], ["distributed_ranks", "at least 2 ranks, got 1", "--distributed-ranks"]),
        (["--distributed-ranks", "two"], ["distributed_ranks", "integer"]),
        (["--distributed-mode", "pipeline"], ["distributed_mode", "'pipeline' needs a group"]),
        (["--distributed-backend", "jaccl"], ["distributed_backend", "'jaccl' needs a group"]),
        (["--distributed-ranks", "2", "--distributed-mode", "data"], ["distributed_mode", "'tensor' or 'pipeline'"]),
        (["--distributed-ranks", "2", "--distributed-backend", "jaccl"], ["jaccl needs distributed_hostfile"]),
    ],
)
def test_group_setting_errors(model: Path, args: list[str], needles: list[str]) -> None:
    message = error_of([str(model), *args])
    for needle in needles:
        assert needle in message, message


def test_defaults_spelled_out_need_no_group(model: Path) -> None:
    s = load([str(model), "--distributed-mode", "tensor", "--distributed-backend", "ring"])
    assert s.distributed() is None


def test_hostfile_errors(tmp_path: Path, model: Path) -> None:
    bad = write_config(tmp_path, "not json", "bad.json")
    bad.write_text("{not json")
    assert "is not valid JSON" in error_of([str(model), "--distributed-hostfile", str(bad)])
    assert "cannot read hostfile" in error_of([str(model), "--distributed-hostfile", str(tmp_path / "none.json")])
    named = write_config(tmp_path, [{"ssh": "a", "ips": ["mac-a"]}, {"ssh": "b", "ips": ["10.0.0.2"]}], "named.json")
    assert "not an IP address" in error_of([str(model), "--distributed-hostfile", str(named)])
    good = write_config(tmp_path, [{"ssh": "127.0.0.1", "ips": ["10.0.0.1"]}] * 2, "good.json")
    both = error_of([str(model), "--distributed-hostfile", str(good), "--distributed-ranks", "2"])
    assert "not both" in both


def test_head_and_layer_counts_must_fit_the_ranks(tmp_path: Path) -> None:
    model = shaped_model(tmp_path / "m", num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=2)
    assert load([str(model), "--distributed-ranks", "3"]).distributed() is not None
    message = error_of([str(model), "--distributed-ranks", "2"])
    assert message == f"tensor mode over 2 ranks needs key/value heads divisible by 2; {model} has 3"
    assert load([str(model), "--distributed-ranks", "2", "--distributed-mode", "pipeline"]).distributed()
    pipeline = error_of([str(model), "--distributed-ranks", "3", "--distributed-mode", "pipeline"])
    assert pipeline == f"pipeline mode over 3 ranks needs at least 3 layers; {model} has 2"
