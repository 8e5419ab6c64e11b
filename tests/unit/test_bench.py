"""The benchmark's parts: statistics, SSE reading, prompts, report rendering, and
the load generator against a stub SSE server.

No real servers, no timing assertions: the benchmark itself is run by hand (bench/).
"""

from __future__ import annotations

import dataclasses
import gc
import http.server
import json
import math
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from bench import loadgen, report, servers, serving
from bench.loadgen import LoadSpec
from bench.prompts import Prompt, make_prompt, make_prompts, templated_ids
from bench.servers import Sharding, busiest_thread, cpu_delta, free_port
from bench.serving import eos_ids, parse_args, replot, run_notes
from bench.sse import Event, LineSplitter, parse_line
from bench.stats import (
    CpuUse,
    RequestResult,
    RunResult,
    Summary,
    median_run,
    percentile,
    run_from_dict,
    summarize,
    summarize_repeats,
)

# --- statistics ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([10.0, 20.0, 30.0, 40.0, 50.0], 95, 48.0),  # numpy's linear: 40 + 0.8 * 10
        ([4.0, 1.0, 3.0, 2.0], 25, 1.75),  # order of input does not matter
        ([7.0], 95, 7.0),
    ],
)
def test_percentile_interpolates_linearly(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tokens_prefer_usage_over_chunks() -> None:
    assert RequestResult(chunks=5).tokens == 5
    assert RequestResult(chunks=5, usage_tokens=8).tokens == 8


def _run() -> RunResult:
    ok = RequestResult(ttft_s=0.1, itl_s=[0.01, 0.03], chunks=3, usage_tokens=3)
    short = RequestResult(ttft_s=0.3, itl_s=[0.02], chunks=2, retries=1)
    failed = RequestResult(ttft_s=9.0, itl_s=[9.0], chunks=1, error="boom")
    cpu = CpuUse(client_s=0.5, server_s={"engine": 1.0, "http": 0.5}, other_s=0.1)
    return RunResult("ours", 3, 3, 2.0, [ok, short, failed], cpu)


def test_summarize_counts_and_pools() -> None:
    s = summarize(_run())
    assert (s.requests, s.errors, s.short, s.retries) == (3, 1, 1, 1)
    assert s.tokens == 6  # a failed stream's tokens were still streamed
    assert s.tokens_per_s == pytest.approx(3.0)
    # Failed requests do not enter the latency percentiles.
    assert s.ttft_p50_ms == pytest.approx(200.0)
    assert s.itl_p50_ms == pytest.approx(20.0)
    assert s.itl_p95_ms == pytest.approx(29.0)
    assert s.client_cores == pytest.approx(0.25)
    assert s.server_cores == pytest.approx(0.75)
    assert s.other_cores == pytest.approx(0.05)


def test_summarize_with_no_successes_gives_nan_latencies() -> None:
    run = RunResult("mlx_lm", 1, 4, 1.0, [RequestResult(error="HTTP 500")])
    s = summarize(run)
    assert s.errors == 1 and s.tokens == 0
    assert math.isnan(s.ttft_p50_ms) and math.isnan(s.itl_p95_ms)


def _timed(wall_s: float) -> RunResult:
    return RunResult("raw", 1, 10, wall_s, [RequestResult(ttft_s=wall_s, chunks=10)])


def test_repeats_pick_the_median_run_and_keep_the_spread() -> None:
    runs = [_timed(1.0), _timed(4.0), _timed(2.0)]  # 10, 2.5 and 5 tokens/s
    assert median_run(runs) is runs[2]
    s = summarize_repeats(runs)
    assert (s.repeats, s.tokens_per_s, s.tps_min, s.tps_max) == (3, 5.0, 2.5, 10.0)
    assert s.ttft_p50_ms == pytest.approx(2000.0)
    # Latencies are medians over the runs, not the median-throughput run's own.
    slow_start = RunResult("raw", 1, 10, 2.0, [RequestResult(ttft_s=9.0, chunks=10)])
    five = [_timed(1.0), slow_start, _timed(4.0), _timed(3.0), _timed(5.0)]
    both = summarize_repeats(five)
    assert median_run(five).wall_s == 3.0
    assert both.ttft_p50_ms == pytest.approx(4000.0)  # of 1, 9, 4, 3 and 5 s
    failed = RunResult("raw", 1, 10, 1.0, [RequestResult(error="boom")])
    assert summarize_repeats([failed, _timed(2.0)]).ttft_p50_ms == pytest.approx(2000.0)  # NaN runs skipped
    assert median_run(runs[:2]) is runs[1]  # even count: the lower median
    assert summarize_repeats(runs[:1]).repeats == 1


def test_timed_runs_pause_the_garbage_collector_and_restore_it() -> None:
    """A collection in the clients' process is a pause the server would be charged for."""
    assert gc.isenabled()
    with serving._collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), serving._collector_paused():
        raise RuntimeError("a failed run")
    assert gc.isenabled()
    gc.disable()  # a caller that had turned it off keeps it off
    try:
        with serving._collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_cpu_delta_per_label_counts_new_processes_from_zero() -> None:
    before = {1: ("engine", 10.0), 2: ("http", 1.0)}
    after = {1: ("engine", 12.5), 2: ("http", 1.5), 3: ("http", 0.25)}
    assert cpu_delta(before, after) == {"engine": 2.5, "http": 0.75}


# --- SSE ----------------------------------------------------------------------


def test_line_splitter_joins_lines_cut_across_reads() -> None:
    split = LineSplitter()
    assert split.feed(b'data: {"a"') == []
    assert split.feed(b": 1}\n\ndata: [DO") == [b'data: {"a": 1}', b""]
    assert split.feed(b"NE]\n") == [b"data: [DONE]"]
    assert split.flush() == []
    split.feed(b"tail")
    assert split.flush() == [b"tail"]


def _chunk(delta: dict, usage: dict | None = None) -> bytes:
    obj: dict = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    if usage is not None:
        obj = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
    return b"data: " + json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (_chunk({"content": "Hi"}), Event(content=True)),
        (_chunk({"role": "assistant", "content": ""}), Event(content=False)),
        (_chunk({"content": None}), Event(content=False)),
        (_chunk({}, usage={"prompt_tokens": 3, "completion_tokens": 128}), Event(usage_tokens=128)),
        (b'data: {"choices": [{"index": 0, "text": "x"}]}', Event(content=True)),  # /v1/completions
        (b"data: [DONE]", Event(done=True)),
        (b"data:[DONE]\r", Event(done=True)),  # no space, CRLF line ends
        (b'data: {"error": {"message": "engine died", "type": "server_error"}}', Event(error="engine died")),
    ],
)
def test_parse_line_events(line: bytes, event: Event) -> None:
    assert parse_line(line) == event


@pytest.mark.parametrize("line", [b"", b": keepalive 10/32", b"event: message", b"id: 7", b"data: "])
def test_parse_line_ignores_non_data_lines(line: bytes) -> None:
    assert parse_line(line) is None


def test_parse_line_reports_bad_json_as_error() -> None:
    event = parse_line(b"data: {not json")
    assert event is not None and event.error is not None and "bad JSON" in event.error


@pytest.mark.parametrize(
    ("line", "api", "event"),
    [
        (b'data: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}', "messages",
         Event(content=True)),
        (b'data: {"type": "content_block_delta", "delta": {"type": "input_json_delta", "partial_json": "{"}}',
         "messages", Event(content=False)),
        (b'data: {"type": "message_delta", "usage": {"output_tokens": 7}}', "messages", Event(usage_tokens=7)),
        (b'data: {"type": "message_stop"}', "messages", Event(done=True)),
        (b'data: {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}', "messages",
         Event(error="busy")),
        (b'data: {"type": "response.output_text.delta", "delta": "Hi"}', "responses", Event(content=True)),
        (b'data: {"type": "response.reasoning_text.delta", "delta": "Hm"}', "responses", Event(content=False)),
        (b'data: {"type": "response.incomplete", "response": {"usage": {"output_tokens": 9}}}', "responses",
         Event(usage_tokens=9, done=True)),
        (b'data: {"type": "error", "code": null, "message": "engine died", "param": null}', "responses",
         Event(error="engine died")),
        (b'data: {"type": "response.failed", "response": {"error": {"message": "engine died"}}}', "responses",
         Event(error="engine died")),
    ],
)  # fmt: skip
def test_parse_line_reads_each_apis_events(line: bytes, api: str, event: Event) -> None:
    assert parse_line(line, api) == event


@pytest.mark.parametrize(
    ("api", "max_tokens_field", "prompt_field"),
    [("chat", "max_tokens", "messages"), ("completions", "max_tokens", "prompt"),
     ("messages", "max_tokens", "messages"), ("responses", "max_output_tokens", "input")],
)  # fmt: skip
def test_each_apis_body_asks_for_the_same_load(api: str, max_tokens_field: str, prompt_field: str) -> None:
    spec = LoadSpec(model="m", max_tokens=16, logit_bias={2: -100.0}, request_timeout_s=5, api=api)
    prompt = make_prompts(_WordTokenizer(), 1, 12, "s")[0]
    body = spec.body(prompt)
    assert body[max_tokens_field] == 16 and body["stream"] is True and body["temperature"] == 0.0
    assert body["logit_bias"] == {"2": -100.0}
    expected = list(prompt.ids) if api == "completions" else [{"role": "user", "content": prompt.text}]
    assert body[prompt_field] == expected
    assert spec.path == loadgen.PATHS[api]


def test_request_body_bans_eos_and_streams_usage() -> None:
    spec = LoadSpec(model="m", max_tokens=16, logit_bias={0: -100.0, 2: -100.0}, request_timeout_s=5)
    prompts = make_prompts(_WordTokenizer(), 1, 12, "s")
    body = spec.body(prompts[0])
    assert body["logit_bias"] == {"0": -100.0, "2": -100.0}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["messages"] == [{"role": "user", "content": prompts[0].text}]


# --- prompts ------------------------------------------------------------------


class _WordTokenizer:
    """One token per word (and one per letter of a filler); a 3-token chat template."""

    def apply_chat_template(self, conversation: list[dict], **_: object) -> str:
        return "<s> user " + conversation[0]["content"] + " <e>"

    def encode(self, text: str, **_: object) -> list[int]:
        return [len(w) for w in text.split()]

    def decode(self, ids: list[int], **_: object) -> str:
        return " ".join("x" * i for i in ids)


def test_prompts_have_the_exact_length_and_are_deterministic() -> None:
    tok = _WordTokenizer()
    first = make_prompts(tok, 4, 20, "run-8")
    assert [len(p.ids) for p in first] == [20] * 4
    assert first == make_prompts(tok, 4, 20, "run-8")
    assert len({p.text for p in first}) == 4  # distinct per index
    assert make_prompt(tok, 20, "warm-8", 0) != first[0]  # and per seed
    assert all(tuple(templated_ids(tok, p.text)) == p.ids for p in first)


def test_prompt_shorter_than_the_template_is_refused() -> None:
    with pytest.raises(ValueError, match="template"):
        make_prompt(_WordTokenizer(), 3, "s", 0)


def test_prompts_with_the_generated_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for length in (16, 32, 200):
        prompts = make_prompts(tok, 8, length, "t")
        assert {len(p.ids) for p in prompts} == {length}
        assert all(list(p.ids) == templated_ids(tok, p.text) for p in prompts)


def test_eos_ids_from_config_and_tokenizer(tiny_model_dir: Path) -> None:
    class Tok:
        eos_token_id = 2

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert eos_ids(tiny_model_dir, Tok()) == sorted(set(config["eos_token_id"]) | {2})


# --- CLI ------------------------------------------------------------------------


def test_cli_parses_lists_and_rejects_unknown_targets() -> None:
    args = parse_args(["--concurrency", "1,8,32", "--targets", "raw,mlx_lm"])
    assert args.concurrency == [1, 8, 32] and args.targets == ["raw", "mlx_lm"]
    with pytest.raises(SystemExit):
        parse_args(["--targets", "ours,vllm"])
    with pytest.raises(SystemExit):
        parse_args(["--concurrency", "0,8"])


def test_cli_api_defaults_to_chat_and_keeps_mlx_lm_to_its_apis() -> None:
    assert parse_args([]).api == "chat"
    assert parse_args(["--api", "responses", "--targets", "ours,raw"]).api == "responses"
    with pytest.raises(SystemExit):
        parse_args(["--api", "responses", "--targets", "ours,mlx_lm"])
    with pytest.raises(SystemExit):
        parse_args(["--api", "grpc"])


def test_cli_sharding_applies_to_both_servers_only_from_two_ranks() -> None:
    assert serving.sharding_of(parse_args([])) is None
    assert serving.sharding_of(parse_args(["--distributed-ranks", "1"])) is None
    args = parse_args(["--distributed-ranks", "2", "--distributed-mode", "pipeline", "--architecture", "qwen2"])
    assert serving.sharding_of(args) == Sharding(2, "pipeline") and args.architecture == "qwen2"
    assert serving.sharding_of(parse_args(["--distributed-ranks", "2"])) == Sharding(2, "tensor", "ring")
    nccl = parse_args(["--distributed-ranks", "2", "--distributed-backend", "nccl"])
    assert serving.sharding_of(nccl) == Sharding(2, "tensor", "nccl")
    for bad in (["--distributed-ranks", "0"], ["--distributed-mode", "expert"], ["--architecture", "gpt2"],
                ["--distributed-backend", "jaccl"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(bad)


# --- sharded servers -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_ours_sharded_passes_its_distributed_settings(mode: str) -> None:
    spec = servers.ours_spec(Path("/m"), ["--workers", "2"], Sharding(2, mode))
    argv = spec.argv(8100)
    assert argv[1:] == ["-m", "deploy.cli", "/m", "--port", "8100", "--distributed-ranks", "2",
                        "--distributed-mode", mode, "--distributed-backend", "ring", "--workers", "2"]  # fmt: skip
    # Ours' supervisor stops its own ranks: SIGTERM goes to it alone, as unsharded.
    assert not spec.signal_group
    assert "--distributed" not in " ".join(servers.ours_spec(Path("/m"), [], None).argv(8100))


@pytest.mark.parametrize(("mode", "pipeline_flag"), [("tensor", []), ("pipeline", ["--pipeline"])])
def test_mlx_lm_sharded_runs_under_mlx_launch(mode: str, pipeline_flag: list[str]) -> None:
    spec = servers.mlx_lm_spec(Path("/m"), 32, ["--x"], Sharding(2, mode), launcher="/venv/bin/mlx.launch")
    argv = spec.argv(8100)
    sep = argv.index("--")
    launch, server = argv[:sep], argv[sep + 1 :]
    assert launch[:5] == ["/venv/bin/mlx.launch", "--backend", "ring", "-n", "2"]
    assert launch[5] == "--starting-port" and 0 < int(launch[6]) < 65535 and len(launch) == 7
    assert server[1:6] == ["-m", "mlx_lm", "server", "--model", "/m"]
    assert server[6:10] == ["--host", "127.0.0.1", "--port", "8100"]
    assert server[10:] == ["--decode-concurrency", "32", "--prompt-concurrency", "32", "--log-level", "WARNING",
                           *pipeline_flag, "--x"]  # fmt: skip
    # mlx.launch dies on SIGTERM without passing it on: the whole group gets it. Its stdin is
    # an open pipe, as ours' supervisor gives its own mlx.launch (at EOF its relay spins).
    assert spec.signal_group and spec.stdin_pipe and spec.ready_path == "/health"


def test_nccl_groups_meet_at_one_port_with_a_gpu_per_rank() -> None:
    spec = servers.mlx_lm_spec(Path("/m"), 8, [], Sharding(2, "tensor", "nccl"), launcher="mlx.launch")
    launch = spec.argv(8100)[: spec.argv(8100).index("--")]
    assert launch[:5] == ["mlx.launch", "--backend", "nccl", "-n", "2"] and launch[5] == "--nccl-port"
    ours = servers.ours_spec(Path("/m"), [], Sharding(2, "tensor", "nccl")).argv(8100)
    assert ours[ours.index("--distributed-backend") + 1] == "nccl"


def test_mlx_lm_unsharded_is_the_server_alone() -> None:
    argv = servers.mlx_lm_spec(Path("/m"), 8, []).argv(8100)
    assert argv[1:4] == ["-m", "mlx_lm", "server"] and "--pipeline" not in argv
    unsharded = servers.mlx_lm_spec(Path("/m"), 8, [])
    assert not unsharded.signal_group and not unsharded.stdin_pipe


def test_weight_index_names_every_tensor_once_and_is_left_alone_after(tiny_model_dir: Path, tmp_path: Path) -> None:
    import mlx.core as mx

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    serving.ensure_weight_index(model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == dict.fromkeys(mx.load(str(model / "model.safetensors")), "model.safetensors")
    (model / "model.safetensors.index.json").write_text("{}")
    serving.ensure_weight_index(model)  # an existing index is the model's own: kept
    assert (model / "model.safetensors.index.json").read_text() == "{}"


def test_free_port_run_is_consecutive_free_ports() -> None:
    start = servers.free_port_run(3)
    for port in range(start, start + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


class _FakeProc:
    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self._cmd, self._env = cmd, env

    def cmdline(self) -> list[str]:
        return self._cmd

    def environ(self) -> dict[str, str]:
        return self._env


def test_rank_labels_keep_rank_zero_for_the_profiler() -> None:
    ours = servers.ours_spec(Path("/m"), [], Sharding(2, "tensor"))
    mlx_lm = servers.mlx_lm_spec(Path("/m"), 8, [], Sharding(2, "tensor"), launcher="mlx.launch")
    engine = ["python", "-m", "engine"]
    launcher = ["python", "/venv/bin/mlx.launch", "-n", "2", "--", *engine]
    assert ours.label(_FakeProc(engine, {"MLX_RANK": "0"})) == ours.profile_label == "engine"
    assert ours.label(_FakeProc(engine, {"MLX_RANK": "1"})) == "engine rank 1"
    assert ours.label(_FakeProc(launcher, {})) == "launcher"
    assert ours.label(_FakeProc(["python", "-m", "deploy.cli"], {})) == "supervisor"
    server = ["python", "-m", "mlx_lm", "server"]
    assert mlx_lm.label(_FakeProc(server, {"MLX_RANK": "0"})) == mlx_lm.profile_label == "server"
    assert mlx_lm.label(_FakeProc(server, {"MLX_RANK": "1"})) == "server rank 1"
    assert mlx_lm.label(_FakeProc(launcher, {})) == "launcher"


def test_stop_names_and_kills_every_process_left_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A "server" whose main process dies on SIGTERM and leaves a child and an orphan of its
    session (as a launcher leaves its ranks): both are named and killed."""
    monkeypatch.setattr(servers, "CHILD_GRACE_S", 0.2)
    script = "(sleep 60 &) ; sleep 60 & echo started; wait"
    spec = servers.ServerSpec(name="stub", argv=lambda port: ["sh", "-c", script])
    server = servers.ServerProcess(spec, tmp_path)
    for _ in range(100):  # up to 10 s for the shell to start both sleeps
        if "started" in server.log_tail():
            break
        time.sleep(0.1)
    server.stop()
    assert len(server.leftovers) == 2 and all("sleep 60" in line for line in server.leftovers)
    pids = [int(line.split()[0]) for line in server.leftovers]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


# --- report ---------------------------------------------------------------------


def _summary(target: str, conc: int, tps: float) -> Summary:
    return Summary(
        target, conc, conc, 0, 0, 0, conc * 128, 1.0, tps, 10.0, 20.0, 1.0, 2.0, 0.2, 1.0,
        other_cores=0.0, repeats=3, tps_min=tps, tps_max=tps,
    )  # fmt: skip


SUMMARIES = [
    _summary("ours", 8, 3000.0),
    _summary("mlx_lm", 8, 1500.0),
    _summary("raw", 8, 4000.0),
    _summary("mlx_lm", 32, 1600.0),
    _summary("raw", 32, 3200.0),
]


def test_ratio_rows_cover_measured_pairs_only() -> None:
    header, rows = report.ratio_rows(SUMMARIES)
    assert header == ["conc", "ours/mlx_lm", "ours/raw", "mlx_lm/raw"]
    assert rows == [["8", "2.00", "0.75", "0.38"], ["32", "–", "–", "0.50"]]
    assert report.ratio_rows([_summary("raw", 1, 10.0)]) == (["conc"], [])
    header, rows = report.ratio_rows([*SUMMARIES, _summary("raw_nobias", 8, 5000.0)])
    assert header[-1] == "ours/raw_nobias" and rows[0][-1] == "0.60"


def test_single_stream_line_compares_ours_with_stream_generate() -> None:
    ours = dataclasses.replace(_summary("ours", 1, 100.0), itl_p50_ms=10.5)
    ref = dataclasses.replace(_summary("stream_generate", 1, 110.0), itl_p50_ms=10.0)
    line = report.single_stream_line([ours, ref, _summary("ours", 8, 700.0)])
    assert line == "single-stream ITL p50: ours 10.50 ms, stream_generate 10.00 ms (ours/stream_generate 1.050)"
    assert report.single_stream_line([ours]) is None
    assert "single-stream ITL p50" in report.terminal_report([ours, ref], {})


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("", "failed"),
        ("TimeoutError: slow", "TimeoutError: slow"),
        ("E: a\nValueError: b\nok", "E: a ... ValueError: b"),
    ],
)
def test_failure_line(message: str, line: str) -> None:
    assert report.failure_line(message) == line


def test_text_table_aligns_columns() -> None:
    text = report.text_table(["a", "bbb"], [["1", "2"], ["333", "4"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["a", "bbb"] and lines[3].split() == ["333", "4"]


def _info(**overrides: object) -> report.SectionInfo:
    fields: dict = dict(
        name="tiny-x86_64", title="tiny", date="2026-01-01 00:00 UTC", command="python -m bench.serving",
        machine={"CPU": "test"}, settings={"load": "8 clients"}, chart="bench/throughput.png",
    )  # fmt: skip
    fields.update(overrides)
    return report.SectionInfo(**fields)


def test_markdown_section_has_markers_tables_chart_and_failures() -> None:
    failures = {"ours": "RuntimeError: ours exited 1:\nTraceback\nModuleNotFoundError: no x\nHaltServer\nstopped"}
    text = report.markdown_section(_info(notes=("a note",)), SUMMARIES, failures)
    assert text.startswith("<!-- bench:tiny-x86_64:begin -->") and text.endswith("<!-- bench:tiny-x86_64:end -->\n")
    assert "| ours | 8 | 3,000 | 3,000-3,000 |" in text
    assert "| 8 | 2.00 | 0.75 | 0.38 |" in text
    assert "![throughput vs concurrency](bench/throughput.png)" in text
    assert "**ours failed**: `RuntimeError: ours exited 1: ... ModuleNotFoundError: no x`" in text
    assert "* a note" in text
    assert "```\npython -m bench.serving\n```" in text


def test_replace_section_keeps_the_rest_of_the_document() -> None:
    first = report.markdown_section(_info(), SUMMARIES[:1], {})
    doc = report.replace_section("", "tiny-x86_64", first)
    assert doc.startswith("# Benchmarks")
    other = report.markdown_section(_info(name="other", date="kept date"), [], {})
    doc = report.replace_section(doc + "\n## GPU\nkept\n", "other", other)
    second = report.markdown_section(_info(date="2027-01-01 00:00 UTC"), SUMMARIES, {})
    updated = report.replace_section(doc, "tiny-x86_64", second)
    assert "2027-01-01" in updated and "2026-01-01" not in updated
    assert "## GPU\nkept" in updated and "bench:other:begin" in updated
    assert updated.count("bench:tiny-x86_64:begin") == 1


def test_write_chart_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart.png"
    report.write_chart(out, SUMMARIES, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_machine_info_names_the_basics() -> None:
    info = report.machine_info()
    assert {"CPU", "cores", "RAM", "OS", "Python", "packages"} <= info.keys()


def test_write_chart_without_matplotlib_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "chart.png"
    assert report.write_chart(out, SUMMARIES, "test") is False
    assert not out.exists()


# --- CPU and GPU readings, the --json dump and --replot ---------------------------


def test_busiest_thread_is_the_largest_delta_per_label() -> None:
    before = {1: ("engine", 10.0), 2: ("engine", 5.0), 3: ("http", 1.0)}
    after = {1: ("engine", 10.5), 2: ("engine", 6.0), 3: ("http", 1.25), 4: ("http", 0.5)}
    assert busiest_thread(before, after) == {"engine": 1.0, "http": 0.5}


def test_run_from_dict_inverts_asdict() -> None:
    run = _run()
    run.cpu.busiest_thread_s = {"engine": 0.9}
    run.cpu.gpu_busy_pct = 42.0
    run.engine_steps, run.engine_step_s = 200, 1.9
    assert run_from_dict(json.loads(json.dumps(dataclasses.asdict(run)))) == run


def test_run_from_dict_reads_dumps_without_engine_steps() -> None:
    d = dataclasses.asdict(_run())
    del d["engine_steps"], d["engine_step_s"]
    assert run_from_dict(d).engine_step_ms is None


def test_engine_step_notes_compare_ours_with_raw() -> None:
    ours = dataclasses.replace(_run(), engine_steps=100, engine_step_s=1.0)
    raw = dataclasses.replace(_run(), target="raw", engine_steps=100, engine_step_s=0.9)
    mlx_lm = dataclasses.replace(_run(), target="mlx_lm")
    notes = run_notes([ours, raw, mlx_lm])
    by_target = {n.split(" ")[0]: n for n in notes}
    assert by_target["ours"].endswith("; engine 10.00 ms per step (100 steps)")
    assert by_target["raw"].endswith("; engine 9.00 ms per step (100 steps)")
    assert "per step" not in by_target["mlx_lm"]  # unknown there
    assert notes[-1] == "engine time per step at 3 stream(s): ours 10.00 ms, raw 9.00 ms (raw/ours 0.90)"


def test_engine_steps_reads_ours_status_and_nothing_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {
        "ours": httpx.Response(200, json={"engine": {"steps": 7, "step_seconds": 0.5}}),
        "mlx_lm": httpx.Response(404, text="not found"),
    }
    monkeypatch.setattr(serving.httpx, "get", lambda url, timeout: answers[url.split("//")[1].split("/")[0]])
    assert serving.engine_steps("http://ours") == (7, 0.5)
    assert serving.engine_steps("http://mlx_lm") is None


def test_run_notes_name_cores_busiest_thread_and_gpu() -> None:
    run = _run()
    run.cpu.busiest_thread_s = {"engine": 1.8}
    run.cpu.gpu_busy_pct = 35.0
    (note,) = run_notes([run])
    assert note == (
        "ours at 3 stream(s), server CPU by process: engine 0.50 cores (busiest thread 0.90), "
        "http 0.25 cores; GPU busy 35%"
    )


def test_gpu_busy_is_each_gpus_mean_after_its_first_sample() -> None:
    samples = "0, 10\n1, 0\n0, 80\n1, 60\n0, 90\n1, 70\nNo devices were found\n"
    assert servers.gpu_means(samples) == [85.0, 65.0]
    assert servers.gpu_means("0, 40\n") == [40.0] and servers.gpu_means("") == []
    run = _run()
    run.cpu.gpu_busy_pct, run.cpu.gpu_busy_per_gpu = 85.0, [85.0, 65.0]
    (note,) = run_notes([run])
    assert note.endswith("; GPU busy 85% / 65% (GPU 0, 1, ...)")


def test_replot_redraws_the_section_and_leaves_out_runs_cut_by_the_deadline(tmp_path: Path) -> None:
    good = _run()
    cut = RunResult("raw", 3, 3, 1.0, [RequestResult(chunks=1, error="cut by the overall deadline")])
    info = report.SectionInfo(name="gpu-x", title="GPU", date="d", command="c", machine={"GPU": "H100"}, settings={})
    dump = {"section": dataclasses.asdict(info), "failures": {}, "runs": [dataclasses.asdict(r) for r in (good, cut)],
            "events": ["an event"]}  # fmt: skip
    (tmp_path / "runs.json").write_text(json.dumps(dump))
    out = tmp_path / "B.md"
    args = parse_args(["--replot", str(tmp_path / "runs.json"), "--out", str(out), "--chart", ""])
    assert replot(args) == 0
    text = out.read_text()
    assert "<!-- bench:gpu-x:begin -->" in text and "| GPU | H100 |" in text
    assert "| ours | 3 |" in text and "| raw | 3 |" not in text
    assert "* an event" in text and "raw at 3 stream(s): a run cut short by --deadline-s, left out" in text


# --- the GPU benchmark's generated model --------------------------------------------


def test_padded_tokenizer_covers_every_id_and_encodes_as_before() -> None:
    from tokenizers import Tokenizer

    from bench.gpu_model import padded_tokenizer_json
    from tests.model_factory import _tokenizer_json

    base = Tokenizer.from_str(_tokenizer_json())
    padded = Tokenizer.from_str(padded_tokenizer_json(_tokenizer_json(), 5000))
    assert padded.get_vocab_size() == 5000
    text = "Hello there, the quick brown fox."
    assert padded.encode(text).ids == base.encode(text).ids
    assert padded.decode([4000, 4999]) == " w4000 w4999"


def test_gpu_model_qwen2_layout_can_be_split_into_a_pipeline(tmp_path: Path) -> None:
    from bench.gpu_model import main as gpu_model_main
    from engine.sharding import sharding_problem

    assert gpu_model_main([str(tmp_path / "q"), "--shape", "tiny", "--architecture", "qwen2"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "qwen2"
    assert sharding_problem(str(tmp_path / "q"), "pipeline", 2) is None
    assert sharding_problem(str(tmp_path / "q"), "tensor", 2) is None
    from mlx_lm import load

    model, _ = load(str(tmp_path / "q"))  # every weight, the biases included, where mlx-lm wants it
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (64,)


def test_gpu_model_tiny_shape_loads_in_mlx_lm(tmp_path: Path) -> None:
    from mlx_lm import load

    from bench.gpu_model import main as gpu_model_main

    assert gpu_model_main([str(tmp_path / "bf16"), "--shape", "tiny", "--q4", str(tmp_path / "q4")]) == 0
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"]["group_size"] == 64 and config["quantization"]["bits"] == 4
    assert config["vocab_size"] == 128256 and config["tie_word_embeddings"] is True
    for variant in ("bf16", "q4"):
        model, tokenizer = load(str(tmp_path / variant))
        assert len(tokenizer.get_vocab()) == 128256


# --- load generator against a stub server ---------------------------------------


# Each API's stream in the stub: two text events, then usage and its end.
_STUB_STREAMS = {
    "/v1/chat/completions": b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    b'data: {"choices": [{"delta": {"content": "b"}}]}\n\n'
    b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n',
    "/v1/completions": b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"text": "b"}]}\n\n'
    b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\ndata: [DONE]\n\n',
    "/v1/messages": b'event: message_start\ndata: {"type": "message_start", "message": {}}\n\n'
    b'event: content_block_start\ndata: {"type": "content_block_start", "index": 0}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a"}}\n\n'
    b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "b"}}\n\n'
    b'event: content_block_stop\ndata: {"type": "content_block_stop", "index": 0}\n\n'
    b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 2}}\n\n'
    b'event: message_stop\ndata: {"type": "message_stop"}\n\n',
    "/v1/responses": b'event: response.created\ndata: {"type": "response.created", "response": {}}\n\n'
    b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "delta": "a"}\n\n'
    b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "delta": "b"}\n\n'
    b'event: response.output_text.done\ndata: {"type": "response.output_text.done", "text": "ab"}\n\n'
    b'event: response.completed\ndata: {"type": "response.completed", "response": {"usage": {"output_tokens": 2}}}'
    b"\n\n",
}


class _StubSSE(http.server.BaseHTTPRequestHandler):
    """Streams each API's two text events, usage and end; answers 400 to a body without messages or input."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes
    seen: list[str] = []  # "METHOD path" of every request, in arrival order

    def do_GET(self) -> None:
        self.seen.append(f"GET {self.path}")
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self) -> None:
        self.seen.append(f"POST {self.path}")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not (body.get("messages") or body.get("input") or body.get("prompt")):
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "no messages"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in _STUB_STREAMS[self.path].split(b"\n\n")[:-1]:
            self.wfile.write(event + b"\n\n")
            self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def stub_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubSSE)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("api", sorted(loadgen.PATHS))
def test_run_load_streams_every_prompt_of_every_client(stub_url: str, api: str) -> None:
    spec = LoadSpec(model="m", max_tokens=2, logit_bias={}, request_timeout_s=10, api=api)
    prompts = [[Prompt("hi", (1,)), Prompt("there", (2,))] for _ in range(3)]
    results, wall = loadgen.run_load(stub_url, spec, prompts, deadline_s=30)
    assert len(results) == 6 and wall > 0
    for r in results:
        assert (r.ok, r.chunks, r.tokens, len(r.itl_s), r.retries) == (True, 2, 2, 1, 0)
        assert r.ttft_s is not None and r.ttft_s >= 0


def test_run_load_opens_every_clients_connection_before_the_clock(stub_url: str) -> None:
    spec = LoadSpec(model="m", max_tokens=2, logit_bias={}, request_timeout_s=10)
    _StubSSE.seen.clear()
    loadgen.run_load(stub_url, spec, [[Prompt("hi", (1,))] for _ in range(3)], deadline_s=30)
    assert _StubSSE.seen == [f"GET {loadgen.CONNECT_PATH}"] * 3 + ["POST /v1/chat/completions"] * 3


def test_run_load_records_http_errors_and_refused_connections(stub_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = LoadSpec(model="m", max_tokens=2, logit_bias={}, request_timeout_s=10)
    monkeypatch.setattr(Prompt, "messages", lambda self: [])
    (bad,), _ = loadgen.run_load(stub_url, spec, [[Prompt("x", (1,))]], deadline_s=30)
    assert bad.error is not None and bad.error.startswith("HTTP 400")
    monkeypatch.setattr(loadgen, "RETRY_BACKOFF_S", 0.0)
    (refused,), _ = loadgen.run_load(f"http://127.0.0.1:{free_port()}", spec, [[Prompt("x", (1,))]], deadline_s=30)
    assert refused.retries == loadgen.CONNECT_RETRIES and refused.error


# --- long prompts -------------------------------------------------------------


def test_long_prompt_ids_are_plain_deterministic_and_within_the_vocabulary() -> None:
    from bench.long_prompt import FIRST_ID, prompt_ids

    ids = prompt_ids(1000, seed=3, vocab=635)
    assert ids == prompt_ids(1000, seed=3, vocab=635) != prompt_ids(1000, seed=4, vocab=635)
    assert len(ids) == 1000 and FIRST_ID <= min(ids) and max(ids) < 600


def test_long_prompt_gaps_keep_a_window_and_percentiles_pick_ranks() -> None:
    from bench.long_prompt import gaps, pct

    assert gaps([0.0, 1.0, 3.0, 6.0, 10.0], 1.0, 6.0) == [2.0, 3.0]
    assert pct([4.0, 1.0, 3.0, 2.0], 0.5) == 3.0 and pct([4.0, 1.0], 0.95) == 4.0
    assert math.isnan(pct([], 0.5))


def test_long_prompt_section_compares_with_stream_generate() -> None:
    from bench.long_prompt import render

    args = dataclasses.make_dataclass(
        "A", ["model", "prompt_tokens", "repeats", "streams", "prefill_step_size", "section"]
    )("tiny", 32768, 2, 8, 512, "long-prompt")
    busy = {"prefill_tok_s": 300.0, "idle_ms": [5.0, 9.0, 20.0], "during_ms": [6.0, 12.0, 30.0], "tokens_during": 99}
    measured = {"stream_generate": 1000.0, "batch_generator": 950.0, "alone": 960.0, "with_streams": busy}
    text = render({"CPU": "x"}, args, measured, "python -m bench.long_prompt")
    assert text.startswith(report.SECTION_BEGIN.format(name="long-prompt"))
    assert "| ours alone (HTTP, /v1/completions, max_tokens 1) | 960 | **0.96** |" in text
    assert "| 0.95 |" in text and "during the prefill 6.0 / 12.0 / 30.0 ms (99 tokens)" in text
