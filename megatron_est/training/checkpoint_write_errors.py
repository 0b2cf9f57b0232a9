"""A checkpoint save that cannot write (disk full, a file-size limit, no permission): one line naming the path and
the cause, the same on every rank, instead of a traceback.

torch.save into a Python file object (our writers) reports a failed write() as RuntimeError("[enforce fail at
inline_container.cc...] unexpected pos") with the OSError that names the cause as its __context__: write_error
digs it out, so the line says "File too large" or "No space left on device", not the zip writer's arithmetic.
torch.save to a path (DeepSpeed's writers) fails in C++ and keeps no errno; then the likely cause is read from
the file-size limit and the free space of the file system.
"""
from __future__ import annotations

import errno
import os
import resource
from typing import Optional

import torch.distributed as dist

from megatron_est.config import ConfigError

SAVE_FAILURE_CHOICES = ("stop", "continue")


class CheckpointWriteError(ConfigError):
    """Writing `path` failed for `cause` (errno text when there is one). A ConfigError, so the entry point prints
    it as one line and exits non-zero."""

    def __init__(self, path: str, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


class CheckpointSaveError(ConfigError):
    """A save that failed (the whole story in one line: which iteration, the path and cause, what survives)."""


def _os_error(e: BaseException) -> Optional[OSError]:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: str, e: BaseException) -> CheckpointWriteError:
    """The one-line error for a failed write of `path` (the file being written, or the save directory)."""
    if isinstance(e, CheckpointWriteError):
        return e
    os_err = _os_error(e)
    if os_err is not None:
        name = errno.errorcode.get(os_err.errno, str(os_err.errno))
        return CheckpointWriteError(os_err.filename or path, f"{os_err.strerror} ({name})")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointWriteError(path, _probable_cause(path) or f"{type(e).__name__}: {first}")


def _probable_cause(path: str) -> Optional[str]:
    """EFBIG when the file reached the file-size limit (ulimit -f), ENOSPC when the file system is (nearly) full."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    if limit != resource.RLIM_INFINITY and size >= limit:
        return f"{os.strerror(errno.EFBIG)} (EFBIG: the file-size limit, ulimit -f, is {limit} bytes)"
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < (1 << 20):
        return f"{os.strerror(errno.ENOSPC)} (ENOSPC)"
    return None


def is_io_failure(e: BaseException) -> bool:
    """A failure to write (reported in one line), as opposed to a bug (which keeps its traceback)."""
    if isinstance(e, (OSError, CheckpointWriteError)) or _os_error(e) is not None:
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("inline_container", "PytorchStreamWriter",
                                                                    "file write failed"))


def remove_quietly(path: str) -> None:
    """Drop a partial file (best effort: the write already failed; that error is the one to report)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def agree(error: Optional[str]) -> Optional[str]:
    """The first rank's error message, on every rank, or None when no rank failed (a collective under
    torch.distributed: it replaces the barrier between the phases of a save, so a rank that failed to write
    does not leave its peers waiting)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, error)
    return next((f"rank {r}: {m}" for r, m in enumerate(out) if m is not None), None)
