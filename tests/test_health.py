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
