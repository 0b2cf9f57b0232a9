"""A point-to-point transport with NCCL's semantics for large messages, on gloo, for CPU tests.

Gloo buffers sends: an isend completes whether or not the peer has posted its receive, so code that deadlocks
under NCCL passes on CPU. NCCL, for a message above its internal buffer (a few MiB; pipeline activations are
tens of MB), completes a send only once the peer's receive runs, and a rank runs its point-to-point operations
in issue order on a stream; the operations of one batch_isend_irecv group progress together.

`nccl_semantics(store, timeout)` replaces torch.distributed's isend, irecv, P2POp and batch_isend_irecv (the
names code calls through `dist.`; all_reduce and barrier are wrapped, see the last rule) with a transport that
has exactly those rules:
- an isend or irecv is a batch of one operation, a batch_isend_irecv one batch of all its operations;
- the rank runs its batches strictly in issue order, one at a time (one stream for all peers, which is stricter
  than NCCL's stream per peer pair: a schedule that completes here should complete there). Work.wait() runs
  the queue up to its batch; the pipeline waits each exchange as soon as it is issued, which is when a stream
  would run it;
- within a batch every operation progresses independently: a receive posts a "ready" token to its sender (a
  key in a c10d store); a send goes out only after the receiver's token, as a real gloo isend on the caller's
  group, and then announces itself ("sent"); the receive posts its gloo irecv once it sees that announcement.
  So the data travels over gloo and no gloo operation is ever left unmatched, even after a deadlock;
- an operation that cannot progress for `timeout` seconds raises Deadlock, naming itself;
- NCCL's rule for a group's first collective: a batch_isend_irecv on a group on which this rank has joined no
  all_reduce or barrier (within the block) raises FirstCollective, since NCCL requires every rank of the group
  in it then, and a pipeline exchange has two.
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional
from unittest import mock

import torch
import torch.distributed as dist

DATA_TAG = 7  # the gloo tag of this transport's data messages
_POLL_S = (0.0005, 0.01)  # first and longest sleep between checks of the store
_REAL = {"isend": dist.isend, "irecv": dist.irecv, "all_reduce": dist.all_reduce, "barrier": dist.barrier}


class Deadlock(RuntimeError):
    """An operation made no progress within the timeout."""


class FirstCollective(RuntimeError):
    """A batch_isend_irecv was the first collective on its group."""


@dataclass
class P2POp:
    """Stands in for torch.distributed.P2POp (whose constructor accepts only the real isend / irecv)."""
    op: Callable
    tensor: torch.Tensor
    peer: int  # global rank, as for dist.isend's dst
    group: Optional[dist.ProcessGroup] = None
    tag: int = 0


class _Work:
    def __init__(self, stream: "Stream", batch: int):
        self.stream, self.batch = stream, batch

    def wait(self, timeout=None) -> bool:
        self.stream.run_until(self.batch)
        return True


class _Transfer:
    """One operation of a running batch: the store key it waits for, then its gloo half."""

    def __init__(self, stream: "Stream", op: P2POp):
        self.op, self.store, self.is_send = op, stream.store, op.op == stream.isend
        src, dst = (stream.rank, op.peer) if self.is_send else (op.peer, stream.rank)
        key = f"{src}>{dst}#{stream.next_seq(src, dst)}"
        self.name = f"rank {stream.rank}: {'send to' if self.is_send else 'receive from'} rank {op.peer} ({key})"
        self.ready, self.sent = key + ":ready", key + ":sent"
        if not self.is_send:
            self.store.set(self.ready, b"1")  # the receive is running: its sender may go

    def can_go(self) -> bool:
        return self.store.check([self.ready if self.is_send else self.sent])

    def go(self) -> dist.Work:
        if not self.is_send:
            return _REAL["irecv"](self.op.tensor, self.op.peer, self.op.group, DATA_TAG)
        work = _REAL["isend"](self.op.tensor, self.op.peer, self.op.group, DATA_TAG)
        self.store.set(self.sent, b"1")
        return work



class Stream:
    """One rank's point-to-point operations, run in issue order with NCCL's rendezvous rule."""

    def __init__(self, store: dist.Store, timeout: float):
        self.store, self.timeout, self.rank = store, timeout, dist.get_rank()
        self.batches: list[list[P2POp]] = []  # issued
        self.done = 0  # batches completed
        self.failed: Optional[Deadlock] = None
        self.joined: set = set()  # groups with an all_reduce or barrier so far
        self._seq: Counter = Counter()  # messages so far per (src, dst): the k-th send matches the k-th receive

    def next_seq(self, src: int, dst: int) -> int:
        self._seq[src, dst] += 1
        return self._seq[src, dst]

    # The torch.distributed API, as patched in.
    def isend(self, tensor, dst=None, group=None, tag=0) -> _Work:
        return self._issue([P2POp(self.isend, tensor, dst, group, tag)])[0]

    def irecv(self, tensor, src=None, group=None, tag=0) -> _Work:
        return self._issue([P2POp(self.irecv, tensor, src, group, tag)])[0]

    def batch_isend_irecv(self, ops: list[P2POp]) -> list[_Work]:
        if _group(ops[0].group) not in self.joined:
            raise FirstCollective(f"rank {self.rank}: batch_isend_irecv is the first collective on its group")
        return self._issue(ops)

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self.joined.add(_group(group))
        return _REAL["all_reduce"](tensor, op, group, async_op)

    def barrier(self, group=None, async_op=False, device_ids=None):
        self.joined.add(_group(group))
        return _REAL["barrier"](group, async_op, device_ids)

    def _issue(self, ops: list[P2POp]) -> list[_Work]:
        self.batches.append(list(ops))
        return [_Work(self, len(self.batches) - 1)] * len(ops)

    def run_until(self, batch: int) -> None:
        while self.done <= batch:
            if self.failed is not None:  # a stream stuck behind a deadlocked operation stays stuck
                raise self.failed
            try:
                self._run(self.batches[self.done])
            except Deadlock as e:
                self.failed = e
                raise
            self.done += 1

    def _run(self, ops: list[P2POp]) -> None:
        waiting = [_Transfer(self, op) for op in ops]  # receives post their tokens here, all at once
        works, deadline, pause = [], time.monotonic() + self.timeout, _POLL_S[0]
        while waiting:
            ready = [t for t in waiting if t.can_go()]
            works += [t.go() for t in ready]
            waiting = [t for t in waiting if t not in ready]
            if ready:
                deadline, pause = time.monotonic() + self.timeout, _POLL_S[0]
            elif waiting:
                if time.monotonic() > deadline:
                    raise Deadlock(f"{waiting[0].name} made no progress in {self.timeout:g} s")
                time.sleep(pause)
                pause = min(2 * pause, _POLL_S[1])
        for work in works:  # both sides of every message are posted now: these complete
            work.wait()

    def sizes(self) -> list[tuple[int, int]]:
        """(sends, receives) of every batch run so far."""
        return [(sum(op.op == self.isend for op in b), sum(op.op == self.irecv for op in b))
                for b in self.batches[:self.done]]


def _group(group: Optional[dist.ProcessGroup]) -> dist.ProcessGroup:
    return dist.group.WORLD if group is None else group


@contextmanager
def nccl_semantics(store: dist.Store, timeout: float) -> Iterator[Stream]:
    """Within the block, torch.distributed's point-to-point calls go through a Stream with NCCL's rules."""
    stream = Stream(store, timeout)
    with mock.patch.multiple(dist, isend=stream.isend, irecv=stream.irecv,
                             batch_isend_irecv=stream.batch_isend_irecv, P2POp=P2POp,
                             all_reduce=stream.all_reduce, barrier=stream.barrier):
        yield stream
