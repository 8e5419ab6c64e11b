"""N concurrent streaming clients of one API (chat, completions, messages, responses) on one asyncio loop.

asyncio + aiohttp keeps the load generator to one thread: on a 2-core machine it
shares the CPU with the server it measures, and threads would add GIL handoffs
and context switches to every chunk. aiohttp, not httpx: its C HTTP parser
reads a streamed chunk for about half the CPU (tiny model, 32 streams: 0.14-0.17
cores against 0.34-0.38 at the same tokens/s), CPU the server then has; vLLM's
serving benchmark uses it for the same reason. Chunks are timed when they
arrive, before any parsing, so parsing cost does not show up as server latency.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.prompts import Prompt
from bench.sse import LineSplitter, parse_line
from bench.stats import RequestResult

CHAT_PATH = "/v1/chat/completions"
# API name -> the path its requests go to (bench.sse.PAYLOADS reads its events).
PATHS = {
    "chat": CHAT_PATH,
    "completions": "/v1/completions",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
}
CONNECT_TIMEOUT_S = 10.0
# Answered by every target (ours and mlx_lm.server): opens the clients' connections.
CONNECT_PATH = "/health"
ERROR_BODY_CHARS = 200
# A server whose listen backlog overflows (mlx_lm.server's socketserver keeps 5)
# resets new connections during a burst. Clients retry those, as the openai SDK
# does (2 retries); the wait counts in TTFT and the retries are reported.
CONNECT_RETRIES = 2
RETRY_BACKOFF_S = 0.1  # doubled on each retry


class _NoResponse(Exception):
    """The connection failed before any response byte: safe to send again."""


@dataclass(frozen=True)
class LoadSpec:
    model: str  # the "model" field of each request
    max_tokens: int
    logit_bias: dict[int, float]  # eos ids -> -100, so every stream runs to max_tokens
    request_timeout_s: float
    # Client i starts i/N of this later: 0 is a burst of N connections at once.
    ramp_s: float = 0.0

    api: str = "chat"  # a key of PATHS

    def body(self, prompt: Prompt) -> dict[str, Any]:
        return {"model": self.model, "temperature": 0.0, "stream": True, **_BODIES[self.api](self, prompt)}

    @property
    def path(self) -> str:
        return PATHS[self.api]


def _bias(spec: LoadSpec) -> dict[str, float]:
    # JSON object keys are strings; the servers convert them back to ints.
    return {str(k): v for k, v in spec.logit_bias.items()}


def _chat(spec: LoadSpec, prompt: Prompt) -> dict[str, Any]:
    return {
        "messages": prompt.messages(),
        "max_tokens": spec.max_tokens,
        "stream_options": {"include_usage": True},
        "logit_bias": _bias(spec),
    }


def _completions(spec: LoadSpec, prompt: Prompt) -> dict[str, Any]:
    # The templated ids: the same prompt tokens as the chat request.
    return {
        "prompt": list(prompt.ids),
        "max_tokens": spec.max_tokens,
        "stream_options": {"include_usage": True},
        "logit_bias": _bias(spec),
    }


def _messages(spec: LoadSpec, prompt: Prompt) -> dict[str, Any]:
    # logit_bias is mlx-server's extension here (Anthropic has none): it bans EOS as for chat.
    return {"messages": prompt.messages(), "max_tokens": spec.max_tokens, "logit_bias": _bias(spec)}


def _responses(spec: LoadSpec, prompt: Prompt) -> dict[str, Any]:
    # logit_bias is mlx-server's extension here (OpenAI's Responses has none): it bans EOS as for chat.
    return {"input": prompt.messages(), "max_output_tokens": spec.max_tokens, "store": False, "logit_bias": _bias(spec)}


_BODIES = {"chat": _chat, "completions": _completions, "messages": _messages, "responses": _responses}


async def _stream_once(
    session: aiohttp.ClientSession, spec: LoadSpec, body: dict[str, Any], result: RequestResult, start: float
) -> None:
    """Fill `result` in place, so a timeout or cancellation keeps what was measured."""
    last: float | None = None
    splitter = LineSplitter()
    try:
        resp = await session.post(spec.path, json=body)
    except aiohttp.ClientConnectionError as exc:  # refused, reset or closed before any response
        raise _NoResponse(f"{type(exc).__name__}: {exc}") from exc
    async with resp:
        if resp.status != 200:
            text = (await resp.read())[:ERROR_BODY_CHARS]
            result.error = f"HTTP {resp.status}: {text!r}"
            return
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            for line in splitter.feed(data):
                event = parse_line(line, spec.api)
                if event is None:
                    continue
                if event.error is not None:
                    result.error = event.error
                    return
                if event.usage_tokens is not None:
                    result.usage_tokens = event.usage_tokens
                if event.done:
                    return
                if event.content:
                    result.chunks += 1
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
        result.error = "stream ended without its last event"


async def _request(session: aiohttp.ClientSession, spec: LoadSpec, prompt: Prompt, result: RequestResult) -> None:
    start = time.perf_counter()  # TTFT is the user's wait: retries included
    body = spec.body(prompt)
    while True:
        try:
            await _stream_once(session, spec, body, result, start)
            return
        except _NoResponse as exc:
            if result.retries >= CONNECT_RETRIES:
                result.error = str(exc)
                return
            await asyncio.sleep(RETRY_BACKOFF_S * 2**result.retries)
            result.retries += 1


async def _client(
    session: aiohttp.ClientSession, spec: LoadSpec, prompts: Sequence[Prompt], out: list[RequestResult], delay_s: float
) -> None:
    """One client: its prompts one after the other, each bounded by the request timeout."""
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    for prompt in prompts:
        result = RequestResult()
        out.append(result)
        try:
            await asyncio.wait_for(_request(session, spec, prompt, result), spec.request_timeout_s)
        except asyncio.TimeoutError:
            result.error = f"timeout after {spec.request_timeout_s:g} s"
        except aiohttp.ClientError as exc:  # the connection broke mid-stream
            result.error = f"{type(exc).__name__}: {exc}"


async def _connect(session: aiohttp.ClientSession, n: int) -> None:
    """Open the n keep-alive connections before the clock starts, as long-lived
    clients (SDKs, agents) hold them: TTFT then measures the server, not n TCP
    connects and the client's set-up of each, which on one asyncio loop delay
    every request of a burst behind all the others'."""

    async def one() -> None:
        try:
            async with session.get(CONNECT_PATH) as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass  # the timed request connects again, retries and records what fails

    await asyncio.gather(*(one() for _ in range(n)))


async def _run(
    base_url: str, spec: LoadSpec, per_client: Sequence[Sequence[Prompt]], deadline_s: float
) -> tuple[list[RequestResult], float]:
    n = len(per_client)
    connector = aiohttp.TCPConnector(limit=n)  # one keep-alive connection per client
    timeout = aiohttp.ClientTimeout(total=spec.request_timeout_s, connect=CONNECT_TIMEOUT_S)
    results: list[list[RequestResult]] = [[] for _ in range(n)]
    async with aiohttp.ClientSession(base_url=base_url, connector=connector, timeout=timeout) as session:
        await _connect(session, n)
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(_client(session, spec, p, r, spec.ramp_s * i / n))
            for i, (p, r) in enumerate(zip(per_client, results))
        ]
        _, pending = await asyncio.wait(tasks, timeout=max(deadline_s, 0.0))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    for r in flat:
        if pending and r.ok and (r.tokens < spec.max_tokens):
            r.error = "cut by the overall deadline"
    return flat, wall


def run_load(
    base_url: str, spec: LoadSpec, per_client: Sequence[Sequence[Prompt]], deadline_s: float
) -> tuple[list[RequestResult], float]:
    """Run every client to completion (or the deadline); return results and wall seconds."""
    return asyncio.run(_run(base_url, spec, per_client, deadline_s))
