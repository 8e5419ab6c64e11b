#!/usr/bin/env bash
# Start mlx-server on a model directory, or on the converted SmolLM2 demo model.
#
#   ./run_server.sh /path/to/model [mlx-server options...]
#   ./run_server.sh --demo [mlx-server options...]
#
# Uses `mlx-server` from PATH, else `python -m deploy.cli` from this checkout.
# PYTHON overrides the interpreter (default: ./.venv/bin/python, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
USAGE="$(basename "$0"): no model given; pass a model directory first ($0 /path/to/model [options...]) or --demo for the SmolLM2 demo model ($0 --demo [options...])"

if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
else
    PYTHON="${PYTHON:-python3}"
fi
# Let `python -m deploy...` work from a plain checkout, without `pip install`.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ $# -eq 0 ]]; then
    echo "$USAGE" >&2
    exit 2
fi

if [[ "$1" == "--demo" ]]; then
    shift
    # The converter logs progress to stderr and prints only the directory.
    MODEL_DIR="$("$PYTHON" -m deploy.demo_model)"
    set -- "$MODEL_DIR" "$@"
elif [[ "$1" == -* ]]; then
    echo "$USAGE" >&2
    exit 2
fi

if command -v mlx-server >/dev/null 2>&1; then
    exec mlx-server "$@"
fi
exec "$PYTHON" -m deploy.cli "$@"
