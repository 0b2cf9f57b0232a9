"""Point-to-point exchange of activations and their gradients between neighbouring pipeline stages.

Every message has the same shape, [micro_batch, seq, hidden], whatever EST skipped: a stage whose layers are all
sampled out still sends its input on, so the receiver never needs to know what the sender ran.

Every exchange is one group (`batch_isend_irecv`), never a separate isend then irecv. Gloo buffers sends, so
either works on CPU; NCCL runs a rank's operations to a peer in order on one stream, and a send above its buffer
(a few MiB; real activations are tens of MB) completes only once the peer's receive runs. In 1F1B's steady state
two neighbours each send to the other and then receive: ungrouped, both sends wait for receives that are queued
behind them, a deadlock. The operations of one group progress together. docs/pipeline.md shows the CPU test.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_est.parallel.state import ParallelState

# Pipeline groups on which every rank has joined a collective. NCCL leaves it undefined what happens when a
# batch_isend_irecv that only some ranks of a group join is the group's first collective (a 2-rank exchange in
# a 4-stage pipeline is), so every rank joins one all-reduce on the group before its first exchange.
_JOINED: set = set()


def _join_group_once(group: dist.ProcessGroup, device: torch.device) -> None:
    if group not in _JOINED:
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        _JOINED.add(group)


class StageP2P:
    """Sends and receives of one rank to the same (dp, tp) position on the previous and next stage.

    Built by every rank of the pipeline group in the same step (each step and each evaluation builds one), so
    the one-time join above happens on all of them together.
    """

    def __init__(self, st: ParallelState, shape: tuple[int, ...], dtype: torch.dtype):
        self.group, self.shape, self.dtype, self.device = st.pp_group, tuple(shape), dtype, st.device
        self.prev = None if st.is_first_stage else st.stage_rank(st.pp_rank - 1)
        self.next = None if st.is_last_stage else st.stage_rank(st.pp_rank + 1)
        if st.pp > 1:
            _join_group_once(self.group, self.device)

    def _check(self, send: torch.Tensor, send_to: int) -> None:
        """The receiver allocates (shape, dtype); NCCL would hang or corrupt silently on anything else."""
        if tuple(send.shape) != self.shape or send.dtype != self.dtype:
            raise RuntimeError(f"pipeline send to rank {send_to}: tensor {tuple(send.shape)} {send.dtype}, but "
                               f"the receiving stage allocates {self.shape} {self.dtype}")

    def _exchange(self, send: Optional[torch.Tensor], send_to: Optional[int],
                  recv_from: Optional[int]) -> Optional[torch.Tensor]:
        """Issue a send and/or a receive as one group, then wait for it; return the received tensor."""
        ops, received = [], None
        if send is not None and send_to is not None:
            self._check(send, send_to)
            ops.append(dist.P2POp(dist.isend, send.detach().contiguous(), send_to, self.group))
        if recv_from is not None:
            received = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, received, recv_from, self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return received

    # Forward direction: activations flow to the next stage.
    def recv_forward(self) -> Optional[torch.Tensor]:
        x = self._exchange(None, None, self.prev)
        return None if x is None else x.requires_grad_()

    def send_forward(self, y: torch.Tensor) -> None:
        self._exchange(y, self.next, None)

    # Backward direction: gradients flow to the previous stage.
    def recv_backward(self) -> Optional[torch.Tensor]:
        return self._exchange(None, None, self.next)

    def send_backward(self, dx: Optional[torch.Tensor]) -> None:
        self._exchange(dx, self.prev, None)

    # 1F1B steady state: one send and one receive with the same neighbour, in one group.
    def send_forward_recv_backward(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        return self._exchange(y, self.next, self.next)

    def send_backward_recv_forward(self, dx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        x = self._exchange(dx, self.prev, self.prev)
        return None if x is None else x.requires_grad_()
