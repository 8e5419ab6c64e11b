"""What fits a Mac: KV bytes per token of Llama-3.1 shapes, and the streams x context
that the engine's default KV budget admits on a 16 GB and a 64 GB Mac with a 4-bit model.

Computed, not measured: bytes per token by engine.kv_memory's formula (checked against
mlx-lm's cache nbytes in tests/unit/test_kv_budget.py), the budget by its rule, the
admission by engine.kv_budget's layout (rows padded to the longest, whole steps of 256
tokens). Prints the Markdown tables of BENCHMARKS.md's "KV cache memory" section:

    python -m bench.kv_table
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from engine.kv_budget import padded
from engine.kv_memory import KvShape, headroom

GIB = 1 << 30
# Activations (and KV quantization scales and biases) in float16.
FP16_BYTES = 2
# mlx-lm's 4-bit models: 4 bits per weight plus a float16 scale and bias per group of 64.
WEIGHT_BITS_4BIT = 4 + 2 * 16 / 64
# Metal's recommended working set (mx.device_info()["max_recommended_working_set_size"]),
# as Apple-silicon Macs report it: two thirds of the memory up to 32 GB, three quarters above.
WORKING_SET_SHARE = {16: 2 / 3, 64: 3 / 4}
KV_BITS = (None, 8, 4)
CONTEXTS = (4096, 8192, 32768, 131072)


@dataclass(frozen=True)
class Model:
    name: str
    parameters: float
    shape: KvShape

    @property
    def weights_4bit(self) -> int:
        return int(self.parameters * WEIGHT_BITS_4BIT / 8)


MODELS = (
    Model("Llama-3.1-8B", 8.03e9, KvShape(layers=32, kv_heads=8, head_dim=128, dtype_bytes=FP16_BYTES)),
    Model("Llama-3.1-70B", 70.55e9, KvShape(layers=80, kv_heads=8, head_dim=128, dtype_bytes=FP16_BYTES)),
)


def kv_budget(mac_gb: int, weights: int) -> int:
    """The engine's derived default on that Mac: usable - model - headroom."""
    usable = int(mac_gb * GIB * WORKING_SET_SHARE[mac_gb])
    return usable - weights - headroom(usable)


def streams(budget: int, bytes_per_token: int, context: int) -> int:
    """Rows of ``context`` tokens (prompt + max_tokens) each that the budget admits."""
    return max(budget, 0) // (padded(context) * bytes_per_token)


def label(kv_bits: int | None) -> str:
    return "fp16" if kv_bits is None else f"{kv_bits}-bit"


def bytes_table() -> list[str]:
    lines = [
        "| model (layers, KV heads x head size) | " + " | ".join(label(b) for b in KV_BITS) + " | 8-bit / fp16 |",
        "|---|" + "---:|" * (len(KV_BITS) + 1),
    ]
    for m in MODELS:
        per = [m.shape.bytes_per_token(b) for b in KV_BITS]
        cells = " | ".join(f"{b:,} B ({b / 1024:.0f} KiB)" for b in per)
        s = m.shape
        lines.append(f"| {m.name} ({s.layers}, {s.kv_heads} x {s.head_dim}) | {cells} | {per[1] / per[0]:.3f} |")
    return lines


def fit_table() -> list[str]:
    head = " | ".join(f"streams at {c // 1024}k" for c in CONTEXTS)
    lines = [
        f"| Mac | model, 4-bit weights | KV budget | KV | tokens in budget | {head} |",
        "|---|---|---:|---|---:|" + "---:|" * len(CONTEXTS),
    ]
    for mac_gb in WORKING_SET_SHARE:
        for m in MODELS:
            budget = kv_budget(mac_gb, m.weights_4bit)
            if budget <= 0:
                lines.append(
                    f"| {mac_gb} GB | {m.name}, {m.weights_4bit / 1e9:.1f} GB | does not fit | | |"
                    + " |" * len(CONTEXTS)
                )
                continue
            for b in KV_BITS:
                bpt = m.shape.bytes_per_token(b)
                cells = " | ".join(str(streams(budget, bpt, c)) for c in CONTEXTS)
                lines.append(
                    f"| {mac_gb} GB | {m.name}, {m.weights_4bit / 1e9:.1f} GB | {budget / 1e9:.2f} GB | {label(b)} "
                    f"| {budget // bpt:,} | {cells} |"
                )
    return lines


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m bench.kv_table", description=__doc__).parse_args(argv)
    print("\n".join([*bytes_table(), "", *fit_table()]))


if __name__ == "__main__":
    main()
