#!/usr/bin/env bash
# The GPU regime of BENCHMARKS.md, on an NVIDIA host where mlx runs with its CUDA backend
# (../shared/gpu/README.md: `source .dev/p2/gpu_env.sh` first). Generates the random-weight
# Llama-3.2-1B-shaped models once per machine (bench/gpu_model.py), then runs
# ours vs mlx_lm.server vs raw BatchGenerator on one of them.
#
#   bench/gpu_bench.sh bf16|4bit OUT_DIR [more bench.serving flags]
#
# OUT_DIR gets the --json dump (chart it elsewhere with --replot), the server logs
# and a copy of BENCHMARKS.md with the new section. GPU_SHAPE=tiny runs the same
# path with a tiny model (a CPU check of the script).
set -euo pipefail
variant=$1 out=$2
shift 2
# The mlx settings ours' engine gives itself (engine/__main__.py), for every
# target: raw and mlx_lm measured with the same backend configuration.
export MLX_USE_CUDA_GRAPHS=${MLX_USE_CUDA_GRAPHS:-0} MLX_CUDA_USE_CUDNN_SDPA=${MLX_CUDA_USE_CUDNN_SDPA:-0}
shape=${GPU_SHAPE:-llama-3.2-1b}
models=${GPU_MODELS:-/tmp/gpu-models}
mkdir -p "$out"
python3 -m bench.gpu_model "$models/$shape-bf16" --shape "$shape" $([ "$variant" = 4bit ] && echo --q4 "$models/$shape-4bit")
rc=0
python3 -m bench.serving --model "$models/$shape-$variant" \
  --concurrency 1,8,32,64 --max-tokens 256 --prompt-tokens 128 --targets ours,mlx_lm,raw \
  --rounds 1 --repeats 3 --warmup-tokens 256 --warmup-tries 2 --quiet-wait-s 2 --request-timeout-s 60 \
  --section "gpu-$shape-$variant" --out BENCHMARKS.md --chart "" \
  --json "$out/gpu-$shape-$variant.json" --log-dir "$out/logs" "$@" || rc=$?
cp BENCHMARKS.md "$out/BENCHMARKS.md"
exit $rc
