"""Preemption signals: SIGTERM / SIGUSR1 ask the run to save and stop; loader workers ignore them."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopSignals:
    """SIGTERM / SIGUSR1 (preemption notices) set a flag; the loop saves and stops at the next
    step, once every rank agrees (an all-reduce, so no rank is left waiting in a collective)."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def any_rank_requested(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def ignore_preemption_signals(_worker_id: int) -> None:
    """Runs in each loader worker after PyTorch installed its own SIGTERM handler (which re-raises
    SIGTERM from any sender but the parent): the training process handles preemption."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
