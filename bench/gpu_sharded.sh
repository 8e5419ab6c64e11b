#!/usr/bin/env bash
# The sharded engine on two GPUs of one host (device kind nvidia-h200-x2), mlx's nccl backend,
# one rank per GPU. Staging as for the other GPU scripts (../shared/gpu/README.md: `source
# .dev/p2/gpu_env.sh` first). Each part fits one device call (at most 10 minutes):
#
#   bench/gpu_sharded.sh OUT_DIR models                       # generate the models (once per machine)
#   bench/gpu_sharded.sh OUT_DIR single|tensor|pipeline bf16|4bit [more bench.serving flags]
#   bench/gpu_sharded.sh OUT_DIR death tensor|pipeline        # kill rank 1 mid-stream, 3 times
#
# The model: Llama 3.1 8B's sizes in mlx-lm's qwen2 layout (llama's plus q/k/v biases): mlx-lm
# splits it both ways, its llama only by tensor (bench/gpu_model.py). `single` is one GPU,
# unsharded (ours, mlx_lm, raw); `tensor` and `pipeline` shard ours and mlx_lm (under
# mlx.launch) the same way. Sections go to OUT_DIR/BENCHMARKS.md (a copy of the repo's), the
# JSON dumps and logs to OUT_DIR. GPU_SHAPE=tiny runs the same path on a tiny model.
set -euo pipefail
out=$1 part=$2
shift 2
export MLX_USE_CUDA_GRAPHS=${MLX_USE_CUDA_GRAPHS:-0} MLX_CUDA_USE_CUDNN_SDPA=${MLX_CUDA_USE_CUDNN_SDPA:-0}
shape=${GPU_SHAPE:-llama-3.1-8b}
models=${GPU_MODELS:-/tmp/gpu-models}
model="$models/$shape-qwen2"
mkdir -p "$out"
[ -f "$out/BENCHMARKS.md" ] || cp BENCHMARKS.md "$out/BENCHMARKS.md"
case $part in
  models)
    exec python3 -m bench.gpu_model "$model-bf16" --shape "$shape" --architecture qwen2 --q4 "$model-4bit"
    ;;
  death)
    mode=$1
    exec python3 -m bench.rank_death "$model-bf16" --distributed-backend nccl --distributed-mode "$mode" \
      --log-dir "$out/logs" | tee "$out/rank-death-$mode.json"
    ;;
  single | tensor | pipeline)
    variant=$1
    shift
    flags=(--targets ours,mlx_lm,raw)
    if [ "$part" = single ]; then
      export CUDA_VISIBLE_DEVICES=0
    else
      flags=(--targets ours,mlx_lm --distributed-ranks 2 --distributed-backend nccl --distributed-mode "$part")
    fi
    exec python3 -m bench.serving --model "$model-$variant" "${flags[@]}" \
      --concurrency 1,8,32,64 --max-tokens 256 --prompt-tokens 128 \
      --rounds 1 --repeats 3 --warmup-tokens 256 --warmup-tries 2 --quiet-wait-s 2 --request-timeout-s 120 \
      --section "gpu2-$shape-$variant-$part" --out "$out/BENCHMARKS.md" --chart "" \
      --json "$out/gpu2-$shape-$variant-$part.json" --log-dir "$out/logs" "$@"
    ;;
  *)
    echo "usage: bench/gpu_sharded.sh OUT_DIR models | single|tensor|pipeline bf16|4bit | death tensor|pipeline" >&2
    exit 2
    ;;
esac
