#!/usr/bin/env bash
# Wheels for a GPU machine without network whose image has torch but not DeepSpeed (docs/gpu.md): run here,
# where pip reaches the package index; .whl/ then travels with the checkout and scripts/gpu_check.sh installs
# it into a private folder there. DeepSpeed has no wheel on the index: it is built from its sdist without ops
# (DS_BUILD_OPS=0, pure Python). Its other needs that such images lack are fetched for the image's Python
# (GPU_PY_VERSION, default 3.12), in the versions of this checkout's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
pyv=${GPU_PY_VERSION:-3.12}
pip=.venv/bin/pip
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
ver() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }

DS_BUILD_OPS=0 $pip wheel -q --no-deps --no-build-isolation "deepspeed==$(ver deepspeed)" -w .whl
for pkg in hjson pydantic pydantic_core annotated_types typing_inspection; do
  $pip download -q --no-deps --only-binary=:all: --python-version "$pyv" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$(ver "$pkg")"
done
ls -la .whl
