"""Engine process entry point: ``python -m engine [--restarts N]``.

Started by the mlx-server supervisor (or a Procfile's deploy.procfile), which
puts the config (ipc.runtime) in its environment. Loads the model, binds
the ROUTER socket, then serves until SIGTERM/SIGINT or until its parent dies.
Readiness is the handshake: the socket answers Hello only after the load.

A sharded engine (config.distributed) is a group of these processes started
by mlx.launch: each loads its shard; rank 0 serves as above and sends its
step plans to the others (engine.group), which follow them (engine.follower).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import logging
import os
import sys

# mlx's CUDA backend builds work per shape: a CUDA graph per batch shape, and
# a cuDNN attention graph per (rows, query length, key length). A serving
# batch changes shape at every arrival and finish and every prefill brings a
# new length combination, so both are built far more often than reused
# (figures: BENCHMARKS.md, "Measurements behind the defaults"). They must be
# set before mlx starts; a user's own values win. Apple silicon ignores both.
CUDA_SERVING_DEFAULTS = {"MLX_USE_CUDA_GRAPHS": "0", "MLX_CUDA_USE_CUDNN_SDPA": "0"}
for _name, _value in CUDA_SERVING_DEFAULTS.items():
    os.environ.setdefault(_name, _value)

from typing import Any  # noqa: E402

import msgspec  # noqa: E402

from engine.constraints import GrammarCompiler  # noqa: E402
from engine.core import EngineCore, Scheduler, SchedulerConfig  # noqa: E402
from engine.follower import Follower  # noqa: E402
from engine.group import (  # noqa: E402
    EXIT_GROUP_FAILED,
    CollectiveChannel,
    GroupError,
    GroupLink,
    Watchdog,
    gather_host_names,
    join_group,
)
from engine.kv_memory import rank_budget  # noqa: E402
from engine.loading import LoadedModel, load_model  # noqa: E402
from engine.proc import EngineLoop  # noqa: E402
from engine.quantized_cache import KVQuantizationUnsupported  # noqa: E402
from engine.sharding import EXIT_CANNOT_SHARD, prepare, sharding_problem  # noqa: E402
from ipc import runtime  # noqa: E402
from ipc.logging_setup import configure as configure_logging  # noqa: E402
from ipc.messages import ModelInfo  # noqa: E402

log = logging.getLogger("engine")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    p.add_argument("--restarts", type=int, default=0, help="engines the supervisor started before this one")
    return p.parse_args(argv)


def freeze_startup_heap() -> None:
    """Exclude everything loaded so far (mlx-lm, transformers, the tokenizer)
    from garbage collection. Every step allocates short-lived objects, so full
    collections keep coming, and each one walked this whole heap: pauses of
    tens of milliseconds in the middle of a decode step, stalling every stream
    (vLLM's engine does the same after its start-up)."""
    gc.collect()
    gc.freeze()


def _scheduler_config(config: runtime.RuntimeConfig, info: ModelInfo) -> SchedulerConfig:
    return SchedulerConfig(
        eos_token_ids=tuple(info.eos_token_ids),
        vocab_size=info.vocab_size,
        context_length=info.context_length,
        **msgspec.structs.asdict(config.engine),
    )


def _load(config: runtime.RuntimeConfig, group: Any) -> LoadedModel | None:
    """The model (this rank's shard of it in a group), or None after one line on stderr."""
    dist = config.distributed
    shard = None
    if dist is not None:
        shard = functools.partial(prepare, mode=dist.mode, group=group, with_adapter=config.adapter_path is not None)
    try:
        return load_model(config.model_path, config.adapter_path, shard=shard)
    except Exception as exc:
        # One line the supervisor can show; the traceback only at debug level.
        log.debug("load failed", exc_info=True)
        print(f"engine: failed to load model: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = runtime.from_environ(os.environ)
    except runtime.ConfigError as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return 2
    configure_logging("engine", config.log_level, config.log_format)
    if config.distributed is not None:
        return run_group_rank(config, args.restarts)
    loaded = _load(config, None)
    if loaded is None:
        return 1
    info = loaded.info
    try:
        scheduler = Scheduler(
            loaded.model,
            _scheduler_config(config, info),
            grammars=GrammarCompiler(loaded.tokenizer, info.vocab_size, info.eos_token_ids),
        )
    except KVQuantizationUnsupported as exc:
        # A setting this model cannot take: one line and exit 2, as a bad setting gets.
        print(f"engine: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the KV budget: no memory left, or a model it cannot size
        print(f"engine: error: {exc}", file=sys.stderr)
        return 1
    loop = EngineLoop(scheduler, info, config.ipc_address, restarts=args.restarts)
    loop.install_signal_handlers()
    freeze_startup_heap()
    loop.run()
    return 0


def run_group_rank(config: runtime.RuntimeConfig, restarts: int) -> int:
    """One rank of a sharded engine (started by mlx.launch): rank 0 serves, the others follow."""
    dist = config.distributed
    assert dist is not None
    problem = sharding_problem(config.model_path, dist.mode, dist.ranks, config.adapter_path, dist.backend)
    if problem is not None:
        print(f"engine: error: {problem}", file=sys.stderr)
        return EXIT_CANNOT_SHARD
    try:
        group = join_group(dist)
    except GroupError as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return 2
    rank = group.rank()
    if rank != 0:
        configure_logging(f"engine-rank{rank}", config.log_level, config.log_format)
    loaded = _load(config, group)
    if loaded is None:
        return 1
    info = loaded.info
    channel = CollectiveChannel(group)
    watchdog = Watchdog()
    watchdog.start()
    try:
        # Unbounded: hosts load at their own disks' speed (minutes for a big
        # model); a rank that dies meanwhile closes its connections.
        hosts = gather_host_names(channel)
    except GroupError as exc:
        log.error("engine group failed at start: %s", exc)
        return EXIT_GROUP_FAILED
    sched_config = _scheduler_config(config, info)
    if sched_config.kv_cache_budget_bytes <= 0:
        try:
            budget = agree_on_kv_budget(channel, hosts, loaded.model, dist.mode)
        except GroupError as exc:
            log.error("engine group failed at start: %s", exc)
            return EXIT_GROUP_FAILED
        sched_config = dataclasses.replace(sched_config, kv_cache_budget_bytes=budget)
    grammars = GrammarCompiler(loaded.tokenizer, info.vocab_size, info.eos_token_ids)
    if rank != 0:
        return _follow(EngineCore(loaded.model, sched_config, grammars), channel, watchdog)
    link = GroupLink(channel, watchdog, dist.mode, dist.backend, hosts, lambda: scheduler.core.pending_prompt_tokens())
    scheduler = Scheduler(loaded.model, sched_config, grammars=grammars, plan_sink=link.send_plan)
    loop = EngineLoop(scheduler, info, config.ipc_address, restarts=restarts, group=link)
    log.info("engine group of %d ranks (%s, %s backend) on %s", dist.ranks, dist.mode, dist.backend, ", ".join(hosts))
    return _lead(loop, link)


def agree_on_kv_budget(channel: CollectiveChannel, hosts: list[str], model: Any, mode: str) -> int:
    """One derived KV budget for the whole group: every rank admits and evicts by the same
    figure (decisions that differ would split the ranks), the smallest rank's room."""
    own = rank_budget(model, mode, channel.size, hosts.count(hosts[channel.rank]))
    budget = min(values[0] for values in channel.gather_ints([own]))
    if budget <= 0:
        raise GroupError("no memory is left for the KV cache on some rank: set kv_cache_budget_bytes")
    return budget


def _lead(loop: EngineLoop, link: GroupLink) -> int:
    """Rank 0: serve the HTTP workers, sending every step's plan to the group."""
    loop.install_signal_handlers()
    freeze_startup_heap()
    try:
        loop.run()
        link.stop()
    except Exception as exc:
        # The socket is closed already, so the HTTP workers fail their requests at once.
        log.error("engine group failed: %s: %s", type(exc).__name__, exc)
        return EXIT_GROUP_FAILED
    return 0


def _follow(core: EngineCore, channel: CollectiveChannel, watchdog: Watchdog) -> int:
    """Any other rank: execute rank 0's plans until it stops the group."""
    follower = Follower(core, channel, watchdog)
    follower.install_signal_handlers()
    freeze_startup_heap()
    try:
        follower.run()
    except Exception as exc:
        log.error("rank %d leaves the group: %s: %s", channel.rank, type(exc).__name__, exc)
        return EXIT_GROUP_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
