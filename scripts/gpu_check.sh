#!/usr/bin/env bash
# GPU cluster correctness check in one command (docs/gpu.md): a markdown table of results, at most
# GPU_CHECK_BUDGET_S seconds (default 480). On a machine without a GPU it says so and exits 0, running nothing;
# --cpu-smoke (or GPU_CHECK_FORCE_CPU=1) runs the same checks on CPU at minimal sizes.
#
#   bash scripts/gpu_check.sh [--out FILE] [--budget-s S] [--only a,b] [--list] [--cpu-smoke]
#
# Python: $PYTHON if set, else .venv/bin/python when its torch sees CUDA, else python3 (a GPU image's own
# torch). The project's .venv may hold a CPU torch build, so it is never assumed to work on a GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0 any=0  # any: the checks need no GPU (the CPU smoke run, or only listing them)
[ "${GPU_CHECK_FORCE_CPU:-0}" = 1 ] && smoke=1
for a in "$@"; do [ "$a" = --cpu-smoke ] && smoke=1; [ "$a" = --list ] && any=1; done
[ $smoke = 1 ] && any=1

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }

py=""
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ $any = 1 ]; then
  [ -x .venv/bin/python ] && py=.venv/bin/python || py=python3
else
  for cand in .venv/bin/python python3; do
    if command -v "$cand" >/dev/null 2>&1 && has_cuda "$cand"; then py=$cand; break; fi
  done
fi

if [ -z "$py" ] || { [ $any = 0 ] && ! has_cuda "$py"; }; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: a GPU is present (nvidia-smi) but ${py:-no Python here} has no CUDA torch;" \
         "set PYTHON=/path/to/python (docs/gpu.md)" >&2
    exit 2
  fi
  echo "gpu_check: no GPU present (no CUDA device visible to torch): nothing run."
  echo "gpu_check: 'bash scripts/gpu_check.sh --cpu-smoke' runs the same checks on CPU at minimal sizes."
  exit 0
fi

# DeepSpeed and its pure-Python needs may be missing from a GPU image with no network: wheels carried in
# .whl/ (scripts/gpu_wheels.sh makes them) are installed to a private folder, never over the image's packages.
if ! "$py" -c 'import deepspeed' >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
  site=${TMPDIR:-/tmp}/gpu_check_site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

export DS_BUILD_OPS=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export GPU_CHECK_COMMAND="${GPU_CHECK_COMMAND:-bash scripts/gpu_check.sh $*}"
echo "gpu_check: python $py: $("$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
  "GPUs", torch.cuda.device_count())' 2>&1 | tail -1)"
exec "$py" bench/gpu_check.py "$@"
