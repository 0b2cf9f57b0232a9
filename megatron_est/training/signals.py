"""Exit on a signal (slurm preemption sends SIGTERM): finish the current step, save, and exit cleanly.

The handler only records that the signal arrived. After every step all ranks agree (one all-reduce of a flag)
whether any of them received it, so they all save the same iteration and leave the loop together, even when
the signal reached only some of them.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist


class ExitSignalHandler:
    def __init__(self, sig: int = signal.SIGTERM):
        self.sig = sig
        self.received = False
        self._previous = None

    def __enter__(self) -> "ExitSignalHandler":
        self._previous = signal.signal(self.sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.sig, self._previous)
            self._previous = None

    def any_received(self, device: Optional[torch.device] = None) -> bool:
        """True on every rank when any rank has received the signal (a collective: call it on all ranks)."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device or "cpu")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
