#!/usr/bin/env bash
# Everything owed to the GPU, in two device calls (each must end inside 10 minutes):
#   here:    bash scripts/gpu_wheels.sh
#   device:  run(command="bash benchmarks/gpu_session.sh kernels", carry=[".whl"])
#   device:  run(command="bash benchmarks/gpu_session.sh family", carry=[".whl"])
# Results land in $OUT; copy them into benchmarks/results/ and commit.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src EXPERTSWITCH_CACHE=/tmp/cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=src:/tmp/site
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
step() { echo "== $*" | tee -a "$OUT/log.txt"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
case "${1:-kernels}" in
  kernels)
    step python3 -m pytest -q -m gpu tests/test_kernels.py
    step python3 -m pytest -q tests/test_kernels.py tests/test_moe_layer.py tests/test_moe_gate.py
    step python3 benchmarks/moe.py --out "$OUT"
    step python3 benchmarks/compress.py --tune-steps 200 --tune-bits 2 --out "$OUT"
    ;;
  family)
    step python3 -m expertswitch.cli zoo build --preset small --device cuda
    step python3 benchmarks/quality.py --preset small --device cuda --out "$OUT"
    ;;
  *) echo "usage: gpu_session.sh kernels|family" >&2; exit 2 ;;
esac
ls -la "$OUT"
