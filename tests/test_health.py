"""The loss-spike warning and the non-finite policy's counters (no process group needed)."""
import json

import pytest

from pretrain.engine.health import HealthPolicy, StepHealth, Verdict


def test_a_loss_spike_over_the_running_median_is_warned_and_counted(capsys):
    state = {}
    health = StepHealth(HealthPolicy(spike_factor=3.0, spike_window=10), state, rank=0)
    for step in range(1, 11):
        assert health.after_step(step, Verdict(True, 1.0 + 0.01 * step)) == "ok"
    assert state["loss_spikes"] == 0
    health.after_step(11, Verdict(True, 3.5))  # 3.5 > 3 x median 1.055
    assert state["loss_spikes"] == 1
    assert "warning: loss spike at step 11: 3.5 is 3.3x the median 1.055 of the last 10 steps" in capsys.readouterr().err
    health.after_step(12, Verdict(True, 3.0))  # under 3 x the median
    assert state["loss_spikes"] == 1 and len(state["loss_history"]) == 10
    # the counters live in the (JSON) loop state: a resumed run decides the same
    again = StepHealth(HealthPolicy(spike_factor=3.0, spike_window=10), json.loads(json.dumps(state)), rank=0)
    health.after_step(13, Verdict(True, 9.0))
    again.after_step(13, Verdict(True, 9.0))
    assert again.state == state and state["loss_spikes"] == 2


def test_the_non_finite_policies():
    with pytest.raises(FloatingPointError, match="non-finite loss at step 5 .train.nonfinite=stop"):
        StepHealth(HealthPolicy(), {}, 0).after_step(5, Verdict(False, None))
    state = {}
    skip = StepHealth(HealthPolicy(nonfinite="skip", max_consecutive=3), state, 0)
    assert skip.after_step(1, Verdict(False, None)) == "skipped"
    assert skip.after_step(2, Verdict(True, 1.0)) == "ok"  # a finite step resets the run of events
    assert skip.after_step(3, Verdict(False, None)) == "skipped"
    assert skip.after_step(4, Verdict(False, None)) == "skipped"
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        skip.after_step(5, Verdict(False, None))
    assert state["nonfinite_steps"] == 4
    assert StepHealth(HealthPolicy(nonfinite="rollback"), {}, 0).after_step(1, Verdict(False, None)) == "rollback"
    with pytest.raises(ValueError, match="stop, skip, rollback"):
        HealthPolicy(nonfinite="ignore")


def test_the_step_verdict_is_one_decision_over_every_rank_micro_batch(monkeypatch):
    """Another rank stands in through the all-reduce: its micro-batches add to the count of
    non-finite ones and to the loss sum; the loss is the mean over every rank's micro-batches."""
    import torch
    import torch.distributed as dist

    from pretrain.engine.health import step_verdict

    def with_other_rank(nonfinite, loss_sum):
        def all_reduce(summary):
            summary += torch.tensor([float(nonfinite), loss_sum])
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    with_other_rank(0, 6.0)
    assert step_verdict([torch.tensor(1.0), torch.tensor(3.0)]) == Verdict(True, 2.5)  # (1 + 3 + 6) / 4
    assert step_verdict([torch.tensor(1.0), torch.tensor(float("nan"))]) == Verdict(False, None)  # one is enough
    assert step_verdict([torch.tensor(float("inf"))]) == Verdict(False, None)
    with_other_rank(1, 0.0)  # the other rank's loss was non-finite: this one holds its update back too
    assert step_verdict([torch.tensor(1.0), torch.tensor(3.0)]) == Verdict(False, None)


def test_a_spike_is_judged_only_after_ten_steps_and_against_a_positive_median():
    state = {}
    health = StepHealth(HealthPolicy(spike_factor=3.0, spike_window=50), state, rank=0)
    for step in range(1, 10):
        health.after_step(step, Verdict(True, 1.0))
    health.after_step(10, Verdict(True, 5.0))  # 9 steps behind it: too few for a median
    assert state["loss_spikes"] == 0
    health.after_step(11, Verdict(True, 5.0))
    assert state["loss_spikes"] == 1
    zero = StepHealth(HealthPolicy(spike_factor=3.0, spike_window=10), {}, rank=0)
    for step in range(1, 12):  # a loss that reached 0 (or below): no factor of it is a spike
        zero.after_step(step, Verdict(True, 0.0))
    zero.after_step(12, Verdict(True, 1.0))
    assert zero.state["loss_spikes"] == 0
    unwatched = StepHealth(HealthPolicy(), {}, rank=0)  # no spike_factor: no history kept either
    for step in range(1, 13):
        unwatched.after_step(step, Verdict(True, 100.0 * step))
    assert unwatched.state["loss_spikes"] == 0 and unwatched.state["loss_history"] == []


def test_only_the_first_rank_warns_and_every_rank_counts(capsys):
    state = {}
    health = StepHealth(HealthPolicy(nonfinite="skip", spike_factor=2.0, spike_window=10), state, rank=1)
    for step in range(1, 12):
        health.after_step(step, Verdict(True, 1.0))
    health.after_step(12, Verdict(True, 9.0))
    assert health.after_step(13, Verdict(False, None)) == "skipped"
    assert (state["loss_spikes"], state["nonfinite_steps"]) == (1, 1) and capsys.readouterr().err == ""


def test_the_policy_from_a_train_section():
    from types import SimpleNamespace

    t = SimpleNamespace(nonfinite="rollback", nonfinite_max_consecutive=5, loss_spike_factor=4, loss_spike_window=20)
    assert HealthPolicy.from_config(t) == HealthPolicy("rollback", 5, 4.0, 20)
    assert HealthPolicy.from_config(SimpleNamespace(**{**vars(t), "loss_spike_factor": None})).spike_factor is None
