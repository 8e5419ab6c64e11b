"""Engine process entry point: ``python -m engine [--restarts N]``.

Started by the mlx-server supervisor (or a Procfile's deploy.procfile), which
puts the config (ipc.runtime) in its environment. Loads the model, binds
the ROUTER socket, then serves until SIGTERM/SIGINT or until its parent dies.
Readiness is the handshake: the socket answers Hello only after the load.
"""

from __future__ import annotations

import argparse
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

import msgspec  # noqa: E402

from engine.constraints import GrammarCompiler  # noqa: E402
from engine.core import Scheduler, SchedulerConfig  # noqa: E402
from engine.loading import load_model  # noqa: E402
from engine.proc import EngineLoop  # noqa: E402
from engine.quantized_cache import KVQuantizationUnsupported  # noqa: E402
from ipc import runtime  # noqa: E402
from ipc.logging_setup import configure as configure_logging  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = runtime.from_environ(os.environ)
    except runtime.ConfigError as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return 2
    configure_logging("engine", config.log_level, config.log_format)
    try:
        loaded = load_model(config.model_path, config.adapter_path)
    except Exception as exc:
        # One line the supervisor can show; the traceback only at debug level.
        log.debug("load failed", exc_info=True)
        print(f"engine: failed to load model: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    info = loaded.info
    try:
        scheduler = Scheduler(
            loaded.model,
            SchedulerConfig(
                eos_token_ids=tuple(info.eos_token_ids),
                vocab_size=info.vocab_size,
                context_length=info.context_length,
                **msgspec.structs.asdict(config.engine),
            ),
            grammars=GrammarCompiler(loaded.tokenizer, info.vocab_size, info.eos_token_ids),
        )
    except KVQuantizationUnsupported as exc:
        # A setting this model cannot take: one line and exit 2, as a bad setting gets.
        print(f"engine: error: {exc}", file=sys.stderr)
        return 2
    loop = EngineLoop(scheduler, info, config.ipc_address, restarts=args.restarts)
    loop.install_signal_handlers()
    freeze_startup_heap()
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
