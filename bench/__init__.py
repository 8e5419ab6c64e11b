"""Serving benchmark: our server vs mlx_lm.server vs raw BatchGenerator.

Run from the repository root: `python -m bench.serving --help`.
Bench-only dependencies (matplotlib for the chart) are in bench/requirements.txt.
"""
