#!/usr/bin/env bash
# Burst TTFT and long prompts on an NVIDIA host (mlx's CUDA backend; ../shared/gpu/README.md:
# `source .dev/p2/gpu_env.sh` first), in one command:
#
#   bench/gpu_burst.sh OUT_DIR
#
# 1. Burst TTFT, bf16 and 4-bit: ours vs raw BatchGenerator vs mlx_lm.server at 8, 32 and
#    64 streams (128-token prompts, 256 tokens; TTFT p50/p95 and tok/s side by side),
#    sections gpu-burst-llama-3.2-1b-bf16 / -4bit of BENCHMARKS.md.
# 2. A 32k-token prompt on the bf16 model: ours' prefill tokens/s vs mlx-lm's own
#    (stream_generate) and one-row BatchGenerator, alone and with 8 streams decoding,
#    section gpu-long-prompt; then alone with ours' prefill step at mlx-lm's 2,048,
#    section gpu-long-prompt-2048.
#
# OUT_DIR gets the --json dumps, the server logs and a copy of BENCHMARKS.md.
# GPU_SHAPE=tiny runs the same path with a tiny model (a CPU check of the script).
set -euo pipefail
out=$1
shift
export MLX_USE_CUDA_GRAPHS=${MLX_USE_CUDA_GRAPHS:-0} MLX_CUDA_USE_CUDNN_SDPA=${MLX_CUDA_USE_CUDNN_SDPA:-0}
shape=${GPU_SHAPE:-llama-3.2-1b}
models=${GPU_MODELS:-/tmp/gpu-models}
long_tokens=${LONG_PROMPT_TOKENS:-32768}
mkdir -p "$out"
python3 -m bench.gpu_model "$models/$shape-bf16" --shape "$shape" --q4 "$models/$shape-4bit"
rc=0
for variant in bf16 4bit; do
  python3 -m bench.serving --model "$models/$shape-$variant" \
    --concurrency 8,32,64 --max-tokens 256 --prompt-tokens 128 --targets ours,raw,mlx_lm \
    --rounds 1 --repeats 3 --warmup-tokens 256 --warmup-tries 2 --quiet-wait-s 2 --request-timeout-s 60 \
    --section "gpu-burst-$shape-$variant" --out BENCHMARKS.md --chart "" \
    --json "$out/gpu-burst-$shape-$variant.json" --log-dir "$out/logs" "$@" || rc=$?
done
python3 -m bench.long_prompt --model "$models/$shape-bf16" --prompt-tokens "$long_tokens" --streams 8 \
  --repeats 2 --section gpu-long-prompt --out BENCHMARKS.md --json "$out/gpu-long-prompt.json" || rc=$?
# Ours at mlx-lm's own prefill step too: whether the 512-token default costs prefill speed.
python3 -m bench.long_prompt --model "$models/$shape-bf16" --prompt-tokens "$long_tokens" --streams 0 \
  --repeats 2 --prefill-step-size 2048 --section gpu-long-prompt-2048 --out BENCHMARKS.md \
  --json "$out/gpu-long-prompt-2048.json" || rc=$?
cp BENCHMARKS.md "$out/BENCHMARKS.md"
exit $rc
