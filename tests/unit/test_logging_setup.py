"""Text/JSON log formats, request ids in log lines, the log_format setting, gunicorn's hooks."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy.settings import SettingsError, load_settings
from deploy.supervisor import child_environment
from frontend import gunicorn_conf
from ipc import logging_setup, runtime
from ipc.logging_setup import REQUEST_ID, RequestIdFilter, configure, dict_config, make_formatter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.fixture(autouse=True)
def _no_request_id():
    token = REQUEST_ID.set(None)
    yield
    REQUEST_ID.reset(token)


def _record(message: str = "hello %s", args: tuple = ("world",), **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("frontend.app", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    RequestIdFilter().filter(record)
    return record


def test_text_line_carries_the_request_id():
    REQUEST_ID.set("chatcmpl-abc")
    line = make_formatter("web", "text").format(_record())
    assert line.endswith(" web INFO frontend.app [chatcmpl-abc]: hello world")


def test_text_line_without_request():
    assert make_formatter("engine", "text").format(_record()).endswith(" engine INFO frontend.app: hello world")


def test_text_line_of_the_supervisor_names_it_once():
    record = logging.LogRecord("mlx-server", logging.INFO, __file__, 1, "serving", (), None)
    RequestIdFilter().filter(record)
    assert make_formatter("mlx-server", "text").format(record).endswith(" mlx-server INFO: serving")


def test_json_line():
    REQUEST_ID.set("cmpl-1")
    entry = json.loads(make_formatter("web", "json").format(_record(tokens=12)))
    assert entry["message"] == "hello world"
    assert entry["level"] == "info"
    assert entry["role"] == "web"
    assert entry["logger"] == "frontend.app"
    assert entry["request_id"] == "cmpl-1"
    assert entry["pid"] == os.getpid()
    assert entry["tokens"] == 12  # logging's extra= fields
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]


def test_json_line_with_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    entry = json.loads(make_formatter("engine", "json").format(record))
    assert "ValueError: boom" in entry["exc_info"]
    assert "request_id" not in entry


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        make_formatter("web", "xml")


def test_configure_replaces_root_handlers():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        configure("engine", "warning", "json", stream=stream)
        REQUEST_ID.set("req-1")
        logging.getLogger("engine.proc").info("not shown")
        logging.getLogger("engine.proc").warning("shown")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["message"] == "shown"
    assert json.loads(line)["request_id"] == "req-1"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_gunicorn_dict_config_loads(log_format):
    config = dict_config("web", log_format)
    assert config["formatters"]["mlx_server"]["log_format"] == log_format
    # gunicorn merges it over its defaults; dictConfig must accept the result.
    from gunicorn.glogging import CONFIG_DEFAULTS

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig({**CONFIG_DEFAULTS, **config})
        [handler] = root.handlers
        expected = logging_setup.JsonFormatter if log_format == "json" else logging_setup.TextFormatter
        assert isinstance(handler.formatter, expected)
        assert logging.getLogger("gunicorn.error").propagate
        assert not logging.getLogger("gunicorn.error").handlers
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# ---------------------------------------------------------------- the setting, and who gets it


def test_log_format_setting(model: Path):
    assert load_settings([str(model)], {}).log_format == "text"
    assert load_settings([str(model)], {"MLX_SERVER_LOG_FORMAT": "JSON"}).log_format == "json"
    assert load_settings([str(model), "--log-format", "json"], {"MLX_SERVER_LOG_FORMAT": "text"}).log_format == "json"
    with pytest.raises(SettingsError, match="log_format: unknown log format 'xml'.*MLX_SERVER_LOG_FORMAT"):
        load_settings([str(model)], {"MLX_SERVER_LOG_FORMAT": "xml"})


def test_engine_and_web_get_the_level_and_format(model: Path):
    settings = load_settings([str(model), "--log-format", "json", "--log-level", "debug"], {})
    env = child_environment(settings.runtime_config("ipc:///tmp/x.sock"), {})
    config = runtime.from_environ(env)  # what the engine and gunicorn decode
    assert (config.log_level, config.log_format) == ("debug", "json")


def test_gunicorn_logs_in_the_configs_format(model: Path):
    settings = load_settings([str(model), "--log-format", "json"], {})
    env = child_environment(settings.runtime_config("ipc:///tmp/x.sock"), {})
    script = "import json, frontend.gunicorn_conf as c; print(json.dumps(c.logconfig_dict))"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert json.loads(out.stdout)["formatters"]["mlx_server"]["log_format"] == "json"


def test_gunicorn_builds_no_access_log_line(monkeypatch):
    """The access log is off, so no request pays for building one (its atoms)."""
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("logger_class", gunicorn_conf.logger_class)
    cfg.set("logconfig_dict", {"version": 1})  # what turns gunicorn's access log on
    logger = cfg.logger_class(cfg)

    def atoms(*args: object) -> dict:
        raise AssertionError("an access log line was built")

    monkeypatch.setattr(logger, "atoms", atoms)
    logger.access(SimpleNamespace(status="200 OK"), SimpleNamespace(), {}, None)


# ---------------------------------------------------------------- gunicorn's metrics directory


def _server(level: int = logging.INFO) -> SimpleNamespace:
    return SimpleNamespace(log=SimpleNamespace(loglevel=level))


def test_master_makes_and_removes_a_private_metrics_dir(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    gunicorn_conf.on_starting(_server(logging.DEBUG))
    try:
        path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        assert os.path.isdir(path)
        assert os.stat(path).st_mode & 0o777 == 0o700
        assert root.level == logging.DEBUG
        # A dead worker's files are marked (prometheus-client drops its live gauges).
        gunicorn_conf.child_exit(_server(), SimpleNamespace(pid=999_999))
    finally:
        gunicorn_conf.on_exit(_server())
    assert not os.path.exists(path)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_an_operators_metrics_dir_is_wiped_and_kept(monkeypatch, tmp_path: Path):
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)
    gunicorn_conf.on_starting(_server())
    gunicorn_conf.on_exit(_server())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
