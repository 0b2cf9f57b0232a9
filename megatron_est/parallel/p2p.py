"""Point-to-point exchange of activations and their gradients between neighbouring pipeline stages.

Every message has the same shape, [micro_batch, seq, hidden], whatever EST skipped: a stage whose layers are all
sampled out still sends its input on, so the receiver never needs to know what the sender ran. Each exchange
posts all its sends and receives at once and then waits, so two neighbours that send to each other at the same
moment (1F1B's steady state) cannot deadlock. Works on gloo (CPU) and NCCL alike.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_est.parallel.state import ParallelState


class StageP2P:
    """Sends and receives of one rank to the same (dp, tp) position on the previous and next stage."""

    def __init__(self, st: ParallelState, shape: tuple[int, ...], dtype: torch.dtype):
        self.group, self.shape, self.dtype, self.device = st.pp_group, shape, dtype, st.device
        self.prev = None if st.is_first_stage else st.stage_rank(st.pp_rank - 1)
        self.next = None if st.is_last_stage else st.stage_rank(st.pp_rank + 1)

    def _exchange(self, send: Optional[torch.Tensor], send_to: Optional[int],
                  recv_from: Optional[int]) -> Optional[torch.Tensor]:
        """Post a send and/or a receive together, then wait for both; return the received tensor."""
        works, received = [], None
        if send is not None and send_to is not None:
            works.append(dist.isend(send.detach().contiguous(), dst=send_to, group=self.group))
        if recv_from is not None:
            received = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            works.append(dist.irecv(received, src=recv_from, group=self.group))
        for w in works:
            w.wait()
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

    # 1F1B steady state: one send and one receive with the same neighbour, posted together.
    def send_forward_recv_backward(self, y: torch.Tensor) -> Optional[torch.Tensor]:
        return self._exchange(y, self.next, self.next)

    def send_backward_recv_forward(self, dx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        x = self._exchange(dx, self.prev, self.prev)
        return None if x is None else x.requires_grad_()
