"""A short soak (the long one: `python -m tests.soak`, figures in RELIABILITY.md)."""

from __future__ import annotations

from tests.soak import run_soak


def test_short_soak_no_hung_request_no_5xx_outside_the_kill(tmp_path):
    result = run_soak(duration_s=20, clients=24, seed=1, workdir=tmp_path)
    assert result["hung"] == 0, result
    assert result["server_errors_outside_kill_window"] == 0, result
    assert result["failures"] == [], result
    assert result["outcomes"].get("disconnected", 0) > 0
    assert result["outcomes"].get("malformed_rejected", 0) > 0
    assert result["engine_idle_after"]
    # Idle engine memory: the weights plus what the prefix cache holds, nothing leaked.
    leaked = result["memory_after_bytes"] - result["prompt_cache_bytes_after"] - result["memory_baseline_bytes"]
    assert leaked < 16 * 2**20, result
