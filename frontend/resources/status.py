"""GET /v1/mlx/status: what the engine is doing (503 when it does not answer)."""

from __future__ import annotations

import os
import time
from typing import Literal

import falcon

from frontend.context import AppContext
from frontend.openapi import Operation
from frontend.shapes import Shape
from ipc.messages import EngineStatus, GroupStatus


class StatusModel(Shape):
    id: str
    path: str
    adapter: str | None
    context_length: int
    vocab_size: int
    created: int


class StatusEngine(Shape):
    # "draining": a graceful stop is under way (new generations get 503).
    state: Literal["ready", "draining"]
    uptime_s: float
    restarts: int
    running_requests: int
    queued_requests: int
    requests_finished: int
    tokens_generated: int
    prompt_tokens_processed: int
    steps: int
    step_seconds: float


class StatusPromptCache(Shape):
    entries: int
    bytes: int
    hits: int
    hit_tokens: int


class StatusMemory(Shape):
    active_bytes: int
    peak_bytes: int


class StatusRank(Shape):
    """One rank of a sharded engine, as its last report to rank 0 gave it."""

    rank: int
    host: str
    memory: StatusMemory


class StatusGroup(Shape):
    """A sharded engine (mlx.distributed): how the model is split, over which ranks."""

    mode: Literal["tensor", "pipeline"]
    backend: Literal["ring", "jaccl"]
    size: int
    ranks: list[StatusRank]


class StatusFrontend(Shape):
    """The gunicorn worker that answered."""

    pid: int
    uptime_s: float


class Status(Shape):
    object: Literal["mlx.status"]
    model: StatusModel
    engine: StatusEngine
    prompt_cache: StatusPromptCache
    # Rank 0's memory when sharded; every rank's is in group.ranks.
    memory: StatusMemory
    # null: one engine process, not a sharded group.
    group: StatusGroup | None
    frontend: StatusFrontend


def group_body(group: GroupStatus | None) -> StatusGroup | None:
    if group is None:
        return None
    return StatusGroup(
        mode=group.mode,
        backend=group.backend,
        size=len(group.ranks),
        ranks=[
            StatusRank(
                rank=r.rank,
                host=r.host,
                memory=StatusMemory(active_bytes=r.active_memory_bytes, peak_bytes=r.peak_memory_bytes),
            )
            for r in group.ranks
        ],
    )


def status_body(ctx: AppContext, status: EngineStatus) -> Status:
    model = ctx.engine.model
    return Status(
        object="mlx.status",
        model=StatusModel(
            id=model.model_id,
            path=model.model_path,
            adapter=model.adapter_path,
            context_length=model.context_length,
            vocab_size=model.vocab_size,
            created=model.created,
        ),
        engine=StatusEngine(
            state="draining" if ctx.drain_gate.draining() else "ready",
            uptime_s=round(status.uptime_s, 3),
            restarts=status.restarts,
            running_requests=status.running_requests,
            queued_requests=status.queued_requests,
            requests_finished=status.requests_finished,
            tokens_generated=status.tokens_generated,
            prompt_tokens_processed=status.prompt_tokens_processed,
            steps=status.steps,
            step_seconds=round(status.step_seconds, 6),
        ),
        prompt_cache=StatusPromptCache(
            entries=status.prompt_cache_entries,
            bytes=status.prompt_cache_bytes,
            hits=status.prompt_cache_hits,
            hit_tokens=status.prompt_cache_hit_tokens,
        ),
        memory=StatusMemory(active_bytes=status.active_memory_bytes, peak_bytes=status.peak_memory_bytes),
        group=group_body(status.group),
        frontend=StatusFrontend(pid=os.getpid(), uptime_s=round(time.monotonic() - ctx.started_at, 3)),
    )


class StatusResource:
    openapi = {
        "get": Operation(
            "Model, engine state, queue, prefix cache and (sharded) the engine group's ranks",
            response=Status,
            errors=(401, 503),
        )
    }

    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # EngineUnavailable propagates to the 503 handler (with Retry-After).
        status = self._ctx.engine.status(timeout_s=self._ctx.settings.status_timeout_s)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = status_body(self._ctx, status).dump()
