"""What the training loop does when a step goes wrong: a non-finite loss (``stop`` | ``skip`` |
``rollback``) and a loss spike (a warning).

Every rank must take the same decision, or one rank would wait in a collective the others never
join: the verdict comes from one all-reduce per step of (non-finite micro-batches, loss sum),
taken before the step's update, so that ``skip`` can hold the update back on every rank.
``rollback`` is the recipe of large-scale runs (PaLM, Chowdhery et al. 2022, §5.1): reload the
last good checkpoint and go on with the next data. K consecutive events stop the run: a model
that keeps diverging needs a person, not a loop.
"""
from __future__ import annotations

import os
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

NONFINITE_FAULT_ENV = "IRPT_FAULT_NONFINITE_AT_STEPS"  # fault injection: "3,4" makes rank 0's loss NaN there
POLICIES = ("stop", "skip", "rollback")


@dataclass(frozen=True)
class HealthPolicy:
    nonfinite: str = "stop"
    max_consecutive: int = 3  # consecutive non-finite steps tolerated by skip / rollback
    spike_factor: float | None = None  # warn when the loss exceeds factor x the running median
    spike_window: int = 50  # steps in the running median

    def __post_init__(self):
        if self.nonfinite not in POLICIES:
            raise ValueError(f"train.nonfinite must be one of {', '.join(POLICIES)}, got {self.nonfinite!r}")

    @classmethod
    def from_config(cls, t) -> HealthPolicy:
        """From a ``train`` section (the schema has checked its values)."""
        factor = t.loss_spike_factor
        return cls(nonfinite=str(t.nonfinite), max_consecutive=int(t.nonfinite_max_consecutive),
                   spike_factor=float(factor) if factor is not None else None, spike_window=int(t.loss_spike_window))


@dataclass(frozen=True)
class Verdict:
    finite: bool
    loss: float | None  # the step's loss averaged over micro-batches and ranks; None when non-finite


def faulty_steps() -> set[int]:
    return {int(s) for s in os.environ.get(NONFINITE_FAULT_ENV, "").split(",") if s.strip()}


def step_verdict(losses: list[torch.Tensor]) -> Verdict:
    """One all-reduce of (non-finite micro-batch count, loss sum) over every rank."""
    stacked = torch.stack([loss.detach().float().reshape(()) for loss in losses])
    finite = torch.isfinite(stacked)
    summary = torch.stack([(~finite).sum().float(), torch.where(finite, stacked, 0.0).sum()])
    dist.all_reduce(summary)
    if summary[0].item() > 0:
        return Verdict(False, None)
    return Verdict(True, summary[1].item() / (len(losses) * dist.get_world_size()))


class StepHealth:
    """Applies a :class:`HealthPolicy` step by step; its counters live in the loop state, so that
    they, and every decision, come back identical after a resume."""

    def __init__(self, policy: HealthPolicy, state: dict, rank: int):
        self.policy, self.state, self.rank = policy, state, rank
        for key, value in (("nonfinite_steps", 0), ("nonfinite_consecutive", 0), ("loss_spikes", 0),
                           ("loss_history", [])):
            state.setdefault(key, value)

    def after_step(self, step: int, verdict: Verdict) -> str:
        """'ok', 'skipped' or 'rollback' for finished step ``step``; raises FloatingPointError
        when the policy is ``stop`` or the events have gone on for too long."""
        s, p = self.state, self.policy
        if verdict.finite:
            s["nonfinite_consecutive"] = 0
            self._watch_spike(step, verdict.loss)
            return "ok"
        s["nonfinite_steps"] += 1
        s["nonfinite_consecutive"] += 1
        if p.nonfinite == "stop":
            raise FloatingPointError(f"non-finite loss at step {step} (train.nonfinite=stop; skip or rollback "
                                     "go on past it)")
        if s["nonfinite_consecutive"] >= p.max_consecutive:
            raise FloatingPointError(f"non-finite loss at step {step}: {s['nonfinite_consecutive']} consecutive "
                                     f"non-finite steps (train.nonfinite_max_consecutive={p.max_consecutive}); "
                                     "lower the learning rate, or check the data")
        if self.rank == 0:
            what = "its update dropped" if p.nonfinite == "skip" else "rolling back to the last good checkpoint"
            print(f"warning: non-finite loss at step {step}: {what} ({s['nonfinite_steps']} so far)",
                  file=sys.stderr, flush=True)
        return "skipped" if p.nonfinite == "skip" else "rollback"

    def _watch_spike(self, step: int, loss: float) -> None:
        p, history = self.policy, self.state["loss_history"]
        if p.spike_factor is None:
            return
        if len(history) >= min(p.spike_window, 10):
            median = statistics.median(history)
            if median > 0 and loss > p.spike_factor * median:
                self.state["loss_spikes"] += 1
                if self.rank == 0:
                    print(f"warning: loss spike at step {step}: {loss:.4g} is {loss / median:.1f}x the median "
                          f"{median:.4g} of the last {len(history)} steps", file=sys.stderr, flush=True)
        history.append(loss)
        del history[:-p.spike_window]
