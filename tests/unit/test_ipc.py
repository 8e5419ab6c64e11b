"""The wire: codec round trips, and a real engine loop talking to the real client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import zmq

from engine.core import Scheduler, SchedulerConfig
from engine.proc import EngineLoop
from frontend.engine_client import EngineUnavailable
from frontend.zmq_client import ZmqEngineClient
from ipc import codec
from ipc.messages import (
    PROTOCOL_VERSION,
    Abort,
    EngineStatus,
    Generate,
    Hello,
    ModelInfo,
    Rejected,
    SamplingParams,
    StepOutputs,
    TokenDelta,
    Welcome,
)
from ipc.sockets import connect_dealer, default_ipc_address, make_private_runtime_dir
from tests.unit.defaults import CLIENT_LIMITS, ENGINE_LIMITS
from tests.unit.random_llama import random_llama
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 300
MODEL = ModelInfo(
    model_id="tiny",
    model_path="/nowhere/tiny",
    adapter_path=None,
    context_length=512,
    eos_token_ids=[1],
    vocab_size=VOCAB,
    created=0,
)


def test_codec_round_trips_every_direction():
    out = StepOutputs([TokenDelta("a", [1, 2]), TokenDelta("b", [], "stop", 3)])
    assert codec.decode_engine_message(codec.encode(out)) == out
    g = Generate(
        request_id="x",
        prompt_token_ids=[1, 2, 3],
        max_tokens=4,
        sampling=SamplingParams(temperature=0.5, logit_bias={3: -100.0}, seed=1),
    )
    assert codec.decode_frontend_message(codec.encode(g)) == g
    assert codec.decode_frontend_message(codec.encode(Abort(["x"]))) == Abort(["x"])


def test_codec_rejects_wrong_direction_and_garbage():
    with pytest.raises(msgspec.DecodeError):
        codec.decode_frontend_message(codec.encode(Welcome(PROTOCOL_VERSION, MODEL)))
    with pytest.raises(msgspec.DecodeError):
        codec.decode_engine_message(b"\x93not msgpack of ours")


def test_runtime_dir_is_private():
    d = make_private_runtime_dir()
    try:
        assert (d.stat().st_mode & 0o777) == 0o700
        assert default_ipc_address(d).startswith("ipc://")
    finally:
        d.rmdir()


@pytest.fixture(scope="module")
def model():
    return random_llama(vocab=VOCAB)


@pytest.fixture
def engine(model):
    """A real EngineLoop on a private ipc:// socket, run in a thread."""
    runtime = make_private_runtime_dir()
    address = default_ipc_address(runtime)
    scheduler = Scheduler(
        model, SchedulerConfig(eos_token_ids=(1,), vocab_size=VOCAB, context_length=512, **ENGINE_LIMITS)
    )
    loop = EngineLoop(scheduler, MODEL, address)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    yield address, loop, scheduler
    loop.request_stop()
    thread.join(10)
    assert not thread.is_alive()
    for p in runtime.iterdir():
        p.unlink()
    runtime.rmdir()


def connect(address: str, **kw) -> ZmqEngineClient:
    client = ZmqEngineClient(address, **{**CLIENT_LIMITS, **kw})
    assert client.wait_ready(30)
    return client


def gen(rid, max_tokens=6, **kw):
    return Generate(request_id=rid, prompt_token_ids=[5, 6, 7], max_tokens=max_tokens,
                    sampling=SamplingParams(temperature=0.0), stop_token_ids=[], **kw)  # fmt: skip


def test_client_handshake_generate_and_status(engine):
    address, _, _ = engine
    client = connect(address, request_timeout_s=30)
    assert client.model == MODEL
    with client.submit(gen("r1")) as stream:
        deltas = list(stream)
    assert sum(len(d.token_ids) for d in deltas) == 6
    assert deltas[-1].finish_reason == "length"
    assert [d.finish_reason for d in deltas].count(None) == len(deltas) - 1
    status = client.status()
    assert isinstance(status, EngineStatus)
    assert status.tokens_generated >= 6 and status.running_requests == 0
    # Six tokens take at least six steps (prefill and decode share a step at most).
    assert status.steps >= 6 and status.step_seconds > 0


def test_many_concurrent_streams_from_threads(engine):
    address, _, _ = engine
    client = connect(address, request_timeout_s=30)
    results: dict[str, int] = {}

    def one(i: int) -> None:
        with client.submit(gen(f"c{i}", 10)) as stream:
            results[f"c{i}"] = sum(len(d.token_ids) for d in stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {f"c{i}": 10 for i in range(16)}


# Run in a child process: gevent's monkey-patching must not leak into this one.
GREENLET_CLIENT = """
from gevent import monkey
monkey.patch_all()
import json, sys
import gevent, zmq.green
from frontend import zmq_client
from frontend.zmq_client import ZmqEngineClient
from ipc.messages import Generate, SamplingParams
from tests.unit.defaults import CLIENT_LIMITS

client = ZmqEngineClient(sys.argv[1], **{**CLIENT_LIMITS, "request_timeout_s": 30})
assert client.wait_ready(30)
results = {}
order = []

def one(i):
    request = Generate(request_id=f"g{i}", prompt_token_ids=[5, 6, 7], max_tokens=10,
                       sampling=SamplingParams(temperature=0.0), stop_token_ids=[])
    client.announce()  # as the worker's ArrivalNotice does, from the request's greenlet
    order.append("announced" if zmq_client._ANNOUNCED.get() is not None else "not announced")
    with client.submit(request) as stream:
        client.settle()
        order.append("submitted")
        order.append("forwarded" if stream.forwarded(5) else "not forwarded")
        results[f"g{i}"] = sum(len(d.token_ids) for d in stream)

gevent.joinall([gevent.spawn(one, i) for i in range(16)], timeout=60)
print(json.dumps({"results": results, "green": isinstance(client._ctx, zmq.green.Context),
                  "status_running": client.status().running_requests, "order": order}))
"""


def test_many_concurrent_streams_from_greenlets(engine):
    """The client as gunicorn's gevent worker runs it: green sockets, one OS thread."""
    address, _, _ = engine
    done = subprocess.run([sys.executable, "-c", GREENLET_CLIENT, address], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # Every greenlet submitted before the first was told its request had left:
    # the burst went as one frame set, before any response would have started.
    assert out.pop("order") == ["announced", "submitted"] * 16 + ["forwarded"] * 16
    assert out == {"results": {f"g{i}": 10 for i in range(16)}, "green": True, "status_running": 0}
    # Every announcement from the greenlets' own socket met its Settled.
    _, _, scheduler = engine
    announcements = scheduler._announcements
    wait_until(lambda: announcements.pending(time.monotonic()) == 0, "every announcement settled", 5.0, 0.01)
    wait_until(lambda: not announcements._settled_early, "every Settled matched to its Arriving", 5.0, 0.01)


def test_a_stream_is_forwarded_once_the_io_thread_sent_it(engine):
    address, _, scheduler = engine
    client = connect(address, request_timeout_s=30)
    with client.submit(gen("fwd", 400)) as stream:
        assert stream.forwarded(5)
        wait_until(lambda: scheduler.has_request("fwd"), "the engine to hold the forwarded request", 5.0, 0.01)


def test_an_announced_request_counts_as_on_its_way_until_it_is_settled(engine):
    address, _, scheduler = engine
    client = connect(address)
    pending = lambda: scheduler._announcements.pending(time.monotonic())  # noqa: E731
    client.announce()
    client.announce()  # one request, one announcement
    wait_until(lambda: pending() == 1, "the engine to count the announced request", 5.0, 0.01)
    with client.submit(gen("announced", 2)) as stream:
        client.settle()  # after its submit: the Settled follows the Generate
        wait_until(lambda: pending() == 0, "the engine to count it settled", 5.0, 0.01)
        assert sum(len(d.token_ids) for d in stream) == 2
    client.announce()
    wait_until(lambda: pending() == 1, "the engine to count the next one", 5.0, 0.01)
    client.settle()  # failed before any submit
    client.settle()  # idempotent
    wait_until(lambda: pending() == 0, "the engine to count it settled", 5.0, 0.01)


def test_client_without_gevent_uses_plain_sockets(engine):
    address, _, _ = engine
    assert type(connect(address)._ctx) is zmq.Context


def test_closing_a_stream_early_aborts_in_engine(engine):
    address, _, scheduler = engine
    client = connect(address, request_timeout_s=30)
    stream = client.submit(gen("long", 400))
    next(iter(stream))
    stream.close()
    stream.close()  # idempotent
    wait_until(lambda: not scheduler.has_request("long"), "the engine to abort the closed stream", 5.0, 0.05)


def test_protocol_mismatch_is_rejected(engine):
    address, _, _ = engine
    ctx = zmq.Context()
    sock = connect_dealer(ctx, address, uuid.uuid4().hex.encode())
    try:
        sock.send(codec.encode(Hello("old-worker", PROTOCOL_VERSION + 1)))
        assert sock.poll(10_000)
        assert isinstance(codec.decode_engine_message(sock.recv()), Rejected)
    finally:
        sock.close()
        ctx.term()


def test_one_frame_set_carries_several_messages_and_a_bad_one_costs_only_itself(engine):
    """A worker forwards what its requests queued as one frame set (a burst reaches
    the engine whole); an undecodable message in it is dropped, the others served."""
    address, _, _ = engine
    ctx = zmq.Context()
    sock = connect_dealer(ctx, address, uuid.uuid4().hex.encode())
    try:
        sock.send(codec.encode(Hello("batching-worker", PROTOCOL_VERSION)))
        assert sock.poll(10_000) and isinstance(codec.decode_engine_message(sock.recv()), Welcome)
        sock.send_multipart([codec.encode(gen("a", 3)), b"\x93not msgpack of ours", codec.encode(gen("b", 3))])
        tokens: dict[str, int] = {"a": 0, "b": 0}
        finals: dict[str, str] = {}
        while len(finals) < 2:
            assert sock.poll(10_000), f"no answer; finals so far: {finals}"
            message = codec.decode_engine_message(sock.recv())
            for delta in message.deltas:
                tokens[delta.request_id] += len(delta.token_ids)
                if delta.finish_reason is not None:
                    finals[delta.request_id] = delta.finish_reason
        assert finals == {"a": "length", "b": "length"} and tokens == {"a": 3, "b": 3}
    finally:
        sock.close()
        ctx.term()


def test_engine_death_fails_streams_at_once_instead_of_hanging(engine):
    address, loop, _ = engine
    client = connect(address, request_timeout_s=60, silence_limit_s=30.0)
    stream = client.submit(gen("orphan", 400))
    loop.request_stop()  # the engine goes away mid-request
    with pytest.raises(EngineUnavailable):
        for _ in stream:
            pass
    with pytest.raises(EngineUnavailable):
        client.submit(gen("after"))


def test_client_waits_for_a_late_engine_and_reconnects_after_a_restart(model):
    runtime = make_private_runtime_dir()
    address = default_ipc_address(runtime)
    client = ZmqEngineClient(address, **{**CLIENT_LIMITS, "request_timeout_s": 30})
    assert not client.wait_ready(0.3)  # no engine yet
    with pytest.raises(EngineUnavailable):
        _ = client.model
    with pytest.raises(EngineUnavailable):
        client.submit(gen("too-early"))
    for generation in range(2):  # start, then a "restarted" engine on the same address
        scheduler = Scheduler(
            model, SchedulerConfig(eos_token_ids=(1,), vocab_size=VOCAB, context_length=512, **ENGINE_LIMITS)
        )
        loop = EngineLoop(scheduler, MODEL, address)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        wait_until(lambda: client.alive, "the client to connect", 10.0, 0.05)
        assert client.model == MODEL
        with client.submit(gen(f"g{generation}")) as stream:
            assert sum(len(d.token_ids) for d in stream) == 6
        loop.request_stop()
        thread.join(10)
        wait_until(lambda: not client.alive, "the client to notice the engine left", 10.0, 0.05)
    for p in runtime.iterdir():
        p.unlink()
    runtime.rmdir()


def test_request_timeout_aborts_and_raises(engine):
    from frontend.engine_client import RequestTimedOut

    address, _, scheduler = engine
    client = connect(address, request_timeout_s=0.5)
    stream = client.submit(gen("slowpoke", 400))
    with pytest.raises(RequestTimedOut):
        for _ in stream:
            threading.Event().wait(0.05)  # a slow reader: the deadline passes mid-stream
    wait_until(lambda: not scheduler.has_request("slowpoke"), "the engine to abort the timed-out request")


class _SlowOnce(Scheduler):
    """A scheduler whose first step with work takes ``delay_s`` (a GPU kernel compile, say)."""

    delay_s = 1.5

    def step(self):
        if self.has_work() and self.delay_s:
            delay, self.delay_s = self.delay_s, 0
            threading.Event().wait(delay)
        return super().step()


def test_a_long_step_neither_drops_workers_nor_leaves_the_client_dead(model):
    runtime = make_private_runtime_dir()
    address = default_ipc_address(runtime)
    scheduler = _SlowOnce(
        model, SchedulerConfig(eos_token_ids=(1,), vocab_size=VOCAB, context_length=512, **ENGINE_LIMITS)
    )
    # The engine forgets workers silent 0.5 s; the step lasts 1.5 s; the worker pings throughout.
    loop = EngineLoop(scheduler, MODEL, address, worker_silence_limit_s=0.5)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        patient = connect(address, request_timeout_s=30)
        with patient.submit(gen("survives", 8)) as stream:
            deltas = list(stream)  # not aborted as a "silent worker" after the long step
        assert deltas[-1].finish_reason == "length"

        scheduler.delay_s = 1.5
        impatient = connect(address, request_timeout_s=30, silence_limit_s=0.5)
        stream = impatient.submit(gen("given-up", 400))
        with pytest.raises(EngineUnavailable):
            list(stream)  # the client gave up on a silent engine...
        for _ in range(200):
            if impatient.alive:
                break
            threading.Event().wait(0.05)
        assert impatient.alive  # ...and trusts it again once it answers
        with impatient.submit(gen("after", 4)) as again:
            assert sum(len(d.token_ids) for d in again) == 4
        for _ in range(200):
            if not scheduler.has_request("given-up"):
                break
            threading.Event().wait(0.05)
        assert not scheduler.has_request("given-up")  # aborted, not left generating
    finally:
        loop.request_stop()
        thread.join(10)
        for p in runtime.iterdir():
            p.unlink()
        runtime.rmdir()


def test_a_steps_deltas_are_sent_before_its_finished_prefixes_are_cached():
    """The prefix-cache work of a step must not delay that step's final tokens."""
    calls: list[str] = []

    class RecordingScheduler:
        def step(self):
            calls.append("step")
            return {b"w1": [TokenDelta("a", [5], "length")], b"w2": [TokenDelta("b", [6], "length")]}

        def remember_finished(self):
            calls.append("remember")

    runtime = make_private_runtime_dir()
    loop = EngineLoop(RecordingScheduler(), MODEL, default_ipc_address(runtime))  # type: ignore[arg-type]
    try:
        loop._send = lambda worker, message: calls.append(f"send {worker.decode()}")  # type: ignore[method-assign]
        loop._step()
    finally:
        loop._sock.close()
        loop._ctx.term()
    assert calls == ["step", "send w1", "send w2", "remember"]
