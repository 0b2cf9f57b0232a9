"""Data-parallel gradient averaging overlapped with the last micro-batch's backward, bucketed as DDP does.

The plain engine's synchronous path (grads.sync_data_parallel_grads) waits for the whole backward. Here each
parameter's post-accumulate-grad hook counts its gradient's micro-batches; once all of a bucket's gradients are
final (the step's last micro-batch reached them) the bucket is all-reduced asynchronously while backward goes on,
and finish() launches what is left, waits and averages. Gradients live in one flat buffer (grad_buffer.py), so a
bucket is a slice of it, reduced in place. Buckets hold parameters in reverse registration order (about the
order backward finishes them) and are launched strictly in bucket order, so every rank issues the same
collectives in the same order. Which parameters take part is decided per step from the plan: skipped layers get
no gradient and are left out (a bucket ends at them), identically on every data-parallel rank because all of
them train the same subnetwork. The tied word embedding of a pipelined run is summed over its two stages first
(grads.sync_tied_embedding_grads, between forward_backward and finish), so it is reduced in finish(), as before.

Same values as the synchronous path: each element is the same sum over the same ranks, divided by the same size
(bit for bit at DP 2, where the sum is a + b; gloo's ring may group a larger sum differently per bucket layout).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_est.parallel.grad_buffer import GradBuffer

OVERLAP_BUCKET_NUMEL = 8 * 1024 * 1024  # smaller than the synchronous path's: the first bucket starts sooner


class OverlappedGradReduce:
    def __init__(self, params: list[torch.nn.Parameter], group: Optional[dist.ProcessGroup], dp: int,
                 bucket_numel: int = OVERLAP_BUCKET_NUMEL):
        self.params, self.group, self.dp, self.bucket_numel = list(params), group, dp, bucket_numel
        self.armed = False
        self.launched_in_backward = 0  # buckets launched from hooks in the last step (observability, tests)
        self.handles, self.buffer = [], None
        if dp > 1:
            # buffer order = bucket order, the tied embedding last (it is reduced last, in finish())
            order = list(reversed(self.params))
            self.buffer = GradBuffer([p for p in order if not _tied(p)] + [p for p in order if _tied(p)])
            self.handles = [p.register_post_accumulate_grad_hook(_marked(self._ready)) for p in self.params]

    def remove(self) -> None:
        """Take the hooks and the gradient buffer's views off the parameters."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.buffer is not None:
            self.buffer.release()

    def begin(self, skipped: Iterable[torch.nn.Parameter], n_micro: int) -> None:
        """Before the step's forward/backward: the parameters that will get a gradient (all but `skipped`,
        model.skipped_parameters(plan)) and how many micro-batches each gradient accumulates."""
        if self.dp == 1:
            return
        skip = set(skipped)
        order = [p for p in self.buffer.place if p not in skip]
        self.deferred = [p for p in order if _tied(p)]
        self.buckets = self.buffer.runs([p for p in order if not _tied(p)], self.bucket_numel)
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self.waiting = [len(b) for b in self.buckets]
        self.count: dict[torch.nn.Parameter, int] = {}
        self.n_micro, self.next, self.in_flight = n_micro, 0, []
        self.launched_in_backward = 0
        self.armed = True

    def _ready(self, p: torch.nn.Parameter) -> None:
        i = self.bucket_of.get(p) if self.armed else None
        if i is None:
            return
        self.buffer.adopt(p)  # from the first micro-batch on, the rest accumulate in the buffer
        self.count[p] = self.count.get(p, 0) + 1
        if self.count[p] != self.n_micro:
            return
        self.waiting[i] -= 1
        while self.next < len(self.buckets) and self.waiting[self.next] == 0:
            self._launch(self.buckets[self.next])
            self.next += 1
            self.launched_in_backward += 1

    def _launch(self, bucket: list[torch.nn.Parameter]) -> None:
        # A parameter that got no gradient (grad None: the same on every rank) is reduced along as stale bytes of
        # its piece and keeps grad None.
        if all(p.grad is None for p in bucket):
            return
        for p in bucket:
            self.buffer.adopt(p)
        flat = self.buffer.slice(bucket)
        self.in_flight.append((flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    def finish(self) -> None:
        """After forward/backward (and the tied embedding's pipeline sum): every gradient averaged over DP."""
        if self.dp == 1:
            return
        self.armed = False
        for bucket in self.buckets[self.next:]:
            self._launch(bucket)
        for bucket in self.buffer.runs(self.deferred, self.bucket_numel):
            self._launch(bucket)
        for flat, work in self.in_flight:
            work.wait()
            flat.div_(self.dp)
        self.in_flight = []


def _tied(p: torch.nn.Parameter) -> bool:
    return getattr(p, "tied_embedding", False)


def _marked(hook):
    """A hook that parallel/sliced_grad.py's direct gradients keep working with (it fires after the direct write);
    an unmarked one (DeepSpeed's) makes sliced weights use autograd's path instead."""
    def fire(p):
        hook(p)
    fire.fires_from_direct_grads = True
    return fire
