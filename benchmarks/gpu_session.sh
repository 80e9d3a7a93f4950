#!/usr/bin/env bash
# Everything owed to the GPU, in device calls that each end inside 10 minutes:
#   here:    bash scripts/gpu_wheels.sh
#   device:  run(command="bash benchmarks/gpu_session.sh kernels", carry=[".whl"])
#   device:  run(command="bash benchmarks/gpu_session.sh family", carry=[".whl"])
#   device:  run(command="bash benchmarks/gpu_session.sh compress", carry=[".whl"])  # if time is left
#   device:  run(command="bash benchmarks/gpu_session.sh engine", carry=[".whl"])
#   device:  run(command="bash benchmarks/gpu_session.sh serve", carry=[".whl"])
#   device:  run(command="bash benchmarks/gpu_session.sh parallel", carry=[".whl"])
#   device:  run(command="bash benchmarks/gpu_session.sh train", carry=[".whl"])
# Results land in $OUT; copy them into benchmarks/results/ (the tuned table,
# <device>.json, into src/expertswitch/kernels/configs/) and commit.
set -uo pipefail
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=src EXPERTSWITCH_CACHE=$PWD/.cache-gpu
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=src:/tmp/site
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
step() { echo "== $* ($(( $(date +%s) - START )) s)" | tee -a "$OUT/log.txt"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
left() { echo $(( ${1} - ($(date +%s) - START) )); }  # seconds left of a ${1}-second call
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
case "${1:-kernels}" in
  kernels)
    # the interpreter and the sm_90 compile check already ran on CPU: here only the GPU tests
    step python3 -m pytest -q -x -m gpu tests/test_kernels.py tests/test_kernel_paths.py
    # the benchmark after it needs ~3-4 minutes (peers built on the GPU, 2 shapes x 4 sizes)
    step python3 benchmarks/tune_moe.py --budget-s "$(( $(left 600) - 330 ))" --out "$OUT"
    mkdir -p src/expertswitch/kernels/configs && cp "$OUT"/NVIDIA*.json src/expertswitch/kernels/configs/
    step python3 benchmarks/moe.py --out "$OUT"
    ;;
  family)  # the small family, then as much of the quality table as fits (most important first)
    step python3 -m expertswitch.cli zoo build --preset small --device cuda
    step python3 benchmarks/quality.py --preset small --device cuda --items 300 --budget-s "$(left 570)" \
      --out "$OUT"
    ;;
  engine)  # the serving engine: gpu tests of the delta kernel, pool, engine and LoRA, then benchmarks
    step python3 -m pytest -q -x -m gpu tests/test_delta_kernel.py tests/test_paged_attention.py \
      tests/test_pool.py tests/test_engine.py tests/test_sampler.py tests/test_lora.py
    step python3 benchmarks/engine.py --part gpu --out "$OUT"
    step python3 benchmarks/sampler.py --device cuda --out "$OUT"
    step python3 benchmarks/lora.py --part gpu --out "$OUT"
    ;;
  parallel)  # issue 14's scaling model: one dense and one MoE layer of 1.3B+MoE-128 timed
    step python3 benchmarks/parallel.py --nproc 2 --measure-layers cuda --out "$OUT"
    ;;
  train)  # issue 15: dense vs MoE vs PR-MoE vs MoS students at equal tokens (7 runs)
    step python3 -m pytest -q -x -m gpu tests/test_train.py
    step python3 benchmarks/train_moe.py --device cuda --work /tmp/train_moe --out "$OUT"
    ;;
  compress)
    step python3 benchmarks/compress.py --tune-steps 200 --tune-bits 2 --out "$OUT"
    ;;
  serve)  # the HTTP server on the small family (built first when not cached) vs model swaps
    step python3 -m expertswitch.cli zoo build --preset small --device cuda
    step python3 benchmarks/serve.py --preset small --device cuda --out "$OUT"
    ;;
  *) echo "usage: gpu_session.sh kernels|family|compress|engine|serve|parallel|train" >&2; exit 2 ;;
esac
ls -la "$OUT"
