#!/usr/bin/env bash
# One device run (at most 9.5 minutes on an H200): CUDA correctness in bf16 and every GPU figure the
# open issues ask for. Each part writes its output under $OUT (default /tmp/gpu-out).
#   bash benchmarks/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
part() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "rc=$?" >> "$OUT/$name.txt"; tail -n 25 "$OUT/$name.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# Fixed-shape decode replayed from a CUDA graph: same tokens as the dynamic path (fp32, bf16), speed.
part static_decode 100 python3 benchmarks/static_decode_gpu_check.py --size gpt2 --vocab 50257
# Decode vs transformers generate, greedy, 124M.
part decode 110 python3 benchmarks/decode_bench.py --device cuda --size gpt2 --vocab 50257 --batches 1,16 --new-tokens 128
# The serve engine on CUDA.
part serve 60 python3 benchmarks/serve_gpu_check.py --device cuda
# LoRA DPO at SmolLM2-135M's shape, bf16 and fp32, through the command line.
part lora 120 python3 benchmarks/lora_gpu_check.py --workspace /tmp/lora-gpu
# Pretraining MFU at 124M, bf16, context 1024, compiled, against transformers.
part train 170 python3 benchmarks/train_bench.py --device cuda --size gpt2 --context 1024 --batch-size 16 --steps 15 --warmup 3 --compile
