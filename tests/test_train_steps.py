"""The step loop (``train_steps``) on its own, in this process: a one-process group, a two-weight
model and stand-ins for the engine, the loader and the checkpointer that record what the loop asks
of them. What it checks, step by step: the learning rate, gradient accumulation, the data position
through epochs, when it logs and saves, exact resume, stop requests, evaluation and the best
checkpoint, non-finite steps; and the end of a run (its final evaluation, metrics.json, DONE).
(The runs under the launchers, with DeepSpeed, are in test_pretrain_resume.py and
test_finetune_seg.py; these take seconds.)"""
import copy
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from pretrain.engine import Batching, LoopSpec
from pretrain.engine.checkpoint import seed_step
from pretrain.engine.health import NONFINITE_FAULT_ENV, HealthPolicy
from pretrain.engine.loop import Process, train_steps, new_state
from pretrain.engine.signals import EvaluationStopped


pytestmark = pytest.mark.usefixtures("one_process_group")


class Engine:
    """DeepSpeed's engine as the loop uses it: ``step`` after every micro-batch updates at the
    accumulation boundary only, unless ``update_hold.everything`` holds the update back."""

    def __init__(self, accum: int):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(2, 1)
        # The bias learns at half the rate (a group's lr_scale, as layer-wise decay sets it).
        self.optimizer = torch.optim.SGD([{"params": [self.module.weight]},
                                          {"params": [self.module.bias], "lr_scale": 0.5}], lr=0.0)
        self.update_hold = SimpleNamespace(everything=False)
        self.accum, self.micro, self.updates = accum, 0, 0

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro += 1
        if self.micro % self.accum:
            return
        if not self.update_hold.everything:
            self.optimizer.step()
            self.updates += 1
        self.optimizer.zero_grad()

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.module.parameters()]


class Loader:
    """``batches`` micro-batches an epoch, dealt to ``workers`` in turn; each batch's data is a
    function of (epoch, batch). Batch 3 of every epoch holds one bad sample; batches 1 and 4 come
    from two truncated shards, read again every epoch."""

    def __init__(self, batches: int, workers: int = 2):
        self.batches, self.workers, self.calls = batches, workers, []

    def epoch(self, epoch: int, start: int = 0, positions=None):
        self.calls.append((epoch, start, list(positions) if positions else None))
        for b in range(start, self.batches):
            x = torch.tensor([[float(epoch + 1), float(b + 1)]]) / 4
            yield {"x": x, "worker": b % self.workers, "position": b // self.workers + 1, "batch": b,
                   "bad_samples": int(b == 3), "bad_shard_urls": {1: ["shard-7.tar"], 4: ["shard-9.tar"]}.get(b, []),
                   "keys": [f"e{epoch}b{b}"]}


class Checkpoints:
    """Keeps each save's state and weights in memory."""

    def __init__(self):
        self.saved, self.best, self.loaded_tag = {}, [], None

    def save(self, engine, tag, rank, meta):
        self.saved[tag] = (copy.deepcopy(meta), engine.weights())

    def keep_as_best(self, tag, rank, best):
        self.best.append((tag, dict(best)))

    def has_checkpoints(self):
        return bool(self.saved)

    def load(self, engine, rank):
        self.loaded_tag = sorted(self.saved)[-1]
        with torch.no_grad():
            for p, w in zip(engine.module.parameters(), self.saved[self.loaded_tag][1]):
                p.copy_(w)


class Task:
    """Loss: the squared error against 1 of the model's output plus a little noise drawn from the
    step's generators (as masking and dropout are), so that a step's loss depends on its seeding."""

    name = "t"

    def __init__(self, stop_at: tuple[int, int] | None = None, stop: int = signal.SIGTERM):
        self.stop_at, self.stop = stop_at, stop  # (step, micro-batch): signal ``stop`` to this process there
        self.begun, self.ended, self.forwards, self.noise = [], [], [], {}
        self.step = None

    def learning_rate(self, step):
        return 0.1 / (step + 1)

    def begin_step(self, step):
        self.begun.append(step)
        self.step, self.micro = step, 0

    def forward(self, engine, batch):
        self.forwards.append((self.step, batch["keys"][0]))
        if (self.step, self.micro) == self.stop_at:
            os.kill(os.getpid(), self.stop)
        noise = torch.rand(()).item()
        self.noise.setdefault(self.step, noise)
        self.micro += 1
        return ((engine(batch["x"]) - 1) ** 2).mean() + 0.01 * noise

    def log_fields(self):
        return {"task_field": 7}

    def end_step(self, step):
        self.ended.append(step)


class Evaluations:
    """The metric at each evaluated step; ``stop_at``: the steps whose evaluation gets a SIGTERM
    after its first frame (it asks before each frame whether to stop, as evaluations do)."""

    def __init__(self, values: dict, stop_at=()):
        self.values, self.stop_at, self.calls = values, set(stop_at), []

    def __call__(self, step, stop_requested):
        self.calls.append(step)
        for frame in range(3):
            if stop_requested():
                raise EvaluationStopped
            if step in self.stop_at:
                self.stop_at.discard(step)
                os.kill(os.getpid(), signal.SIGTERM)
        return {"m": self.values[step], "frames": 3, "name": "not a scalar", "flag": True}


def spec(total=7, per_epoch=3, accum=2, **kw) -> LoopSpec:
    fields = dict(total_steps=total, steps_per_epoch=per_epoch, batching=Batching(1, accum, 1), seed=5,
                  num_workers=2, log_every=2, save_every=3)
    return LoopSpec(**{**fields, **kw})


def run(tmp_path, loop_spec, task=None, state=None, engine=None, ckpt=None, evaluate=None, where_rank=0):
    task = task or Task()
    engine = engine or Engine(loop_spec.batching.accum)
    loader = Loader(loop_spec.steps_per_epoch * loop_spec.batching.accum)
    ckpt = ckpt or Checkpoints()
    state = new_state(loop_spec.num_workers) if state is None else state
    where = Process(where_rank, 1, torch.device("cpu"), tmp_path)  # the rank as the loop sees it
    finished = train_steps(task, engine, engine.optimizer, loader, ckpt, state, loop_spec, where,
                           checkpoint_meta={"run": "r"}, evaluate=evaluate)
    return SimpleNamespace(finished=finished, task=task, engine=engine, loader=loader, ckpt=ckpt, state=state)


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_steps_take_their_micro_batches_epoch_by_epoch_and_log_and_save_on_schedule(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    r = run(tmp_path, spec(record_samples=True), evaluate=Evaluations({}))  # eval_every 0: no evaluation
    assert r.finished is True and signal.getsignal(signal.SIGTERM) is before
    assert r.task.begun == list(range(7)) and r.task.ended == list(range(1, 8))
    assert r.engine.updates == 7 and r.engine.micro == 14
    # Two micro-batches a step, three steps an epoch; each epoch starts at its first batch.
    assert r.loader.calls == [(0, 0, None), (1, 0, None), (2, 0, None)]
    assert [k for s, k in r.task.forwards if s == 4] == ["e1b2", "e1b3"]
    assert [json.loads(line)["keys"] for line in (tmp_path / "samples_rank0.jsonl").read_text().splitlines()][3] == \
        ["e1b0", "e1b1"]
    # Saved every 3 steps and at the end, with the loop state of that step and the caller's fields.
    assert sorted(r.ckpt.saved) == ["step00000003", "step00000006", "step00000007"]
    meta = r.ckpt.saved["step00000006"][0]
    assert meta["run"] == "r" and meta["world_size"] == 1
    assert {k: meta["data"][k] for k in ("step", "epoch", "batch", "positions", "samples_seen")} == \
        {"step": 6, "epoch": 1, "batch": 6, "positions": [3, 3], "samples_seen": 12}
    # Bad samples add up (batch 3 of epochs 0 and 1); a truncated shard counts once, however often it is read.
    assert (r.state["bad_samples"], r.state["bad_shards"], r.state["bad_shard_names"]) == \
        (2, 2, ["shard-7.tar", "shard-9.tar"])
    # Logged every 2 steps and at the end; the lr is the task's for the step, set before its batches.
    logged = records(tmp_path)
    assert [x["step"] for x in logged] == [2, 4, 6, 7]
    assert [x["epoch"] for x in logged] == [0, 1, 1, 2]
    assert [x["lr"] for x in logged] == pytest.approx([0.1 / 2, 0.1 / 4, 0.1 / 6, 0.1 / 7])
    assert [g["lr"] for g in r.engine.optimizer.param_groups] == pytest.approx([0.1 / 7, 0.05 / 7])
    assert [x["samples_seen"] for x in logged] == [4, 8, 12, 14]
    assert logged[-1]["task_field"] == 7 and logged[-1]["bad_samples"] == 2 and logged[-1]["bad_shards"] == 2
    assert all(x["loss"] > 0 and x["images_per_s"] > 0 and 0 <= x["data_wait_fraction"] <= 1 for x in logged)
    # Each step's generators are seeded from (seed, rank, step) before its first micro-batch.
    for step, noise in r.task.noise.items():
        seed_step(5, 0, step)
        assert noise == torch.rand(()).item()


@pytest.mark.parametrize("accum, goes_on_from", [(2, (1, 2, [1, 1])), (1, (1, 1, [1, 0]))])
def test_a_resume_from_any_checkpoint_ends_where_the_whole_run_ends(tmp_path, accum, goes_on_from):
    """Cut at step 4, mid-epoch 1: the resumed run takes the epoch's next batch, each loader worker
    from its own place (one that has not yet had a batch this epoch: from the start)."""
    whole = run(tmp_path / "whole", spec(save_every=100, accum=accum))
    first = run(tmp_path / "cut", spec(save_every=100, total=4, accum=accum))
    meta, weights = first.ckpt.saved["step00000004"]
    engine = Engine(accum)
    with torch.no_grad():
        for p, w in zip(engine.module.parameters(), weights):
            p.copy_(w)
    state = copy.deepcopy(meta["data"])
    resumed = run(tmp_path / "cut", spec(save_every=100, accum=accum), state=state, engine=engine)
    assert resumed.loader.calls == [goes_on_from, (2, 0, None)]
    assert resumed.task.begun == [4, 5, 6]
    assert [k for s, k in first.task.forwards + resumed.task.forwards] == [k for s, k in whole.task.forwards]
    assert {**first.task.noise, **resumed.task.noise} == whole.task.noise  # generators: a function of the step
    assert all(torch.equal(a, b) for a, b in zip(resumed.engine.weights(), whole.engine.weights()))
    logged = [x["step"] for x in records(tmp_path / "cut")]
    assert logged == [2, 4, 6, 7] == [x["step"] for x in records(tmp_path / "whole")]
    assert records(tmp_path / "cut")[-1]["loss"] == records(tmp_path / "whole")[-1]["loss"]


def test_a_resume_drops_the_logged_steps_it_redoes_also_from_the_sample_logs_of_ranks_it_lacks(tmp_path):
    run(tmp_path, spec(record_samples=True, log_every=1))
    extra = tmp_path / "samples_rank1.jsonl"  # a second process's log, of a run that had two
    extra.write_text("".join(json.dumps({"step": s, "keys": []}) + "\n" for s in range(7)))
    resumed_from = run(tmp_path / "x", spec(total=3)).state
    run(tmp_path, spec(record_samples=True, log_every=1), state=copy.deepcopy(resumed_from))
    assert [x["step"] for x in records(tmp_path)] == list(range(1, 8))
    samples = [json.loads(line)["step"] for line in (tmp_path / "samples_rank0.jsonl").read_text().splitlines()]
    assert samples == list(range(7))
    assert [json.loads(line)["step"] for line in extra.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_request_saves_the_step_under_way_and_ends_it_unfinished(tmp_path, capfd, stop):
    before = signal.getsignal(stop)
    r = run(tmp_path, spec(save_every=100), task=Task(stop_at=(3, 0), stop=stop))
    assert r.finished is False
    assert r.task.begun == [0, 1, 2, 3] and r.engine.updates == 4  # the step under way ends, with its update
    assert sorted(r.ckpt.saved) == ["step00000004"] and r.ckpt.saved["step00000004"][0]["data"]["step"] == 4
    out, err = capfd.readouterr()
    assert f"{stop.name}: saved step 4, exiting; rerun the same command to resume" in out
    # A Ctrl-C is answered at once, in the terminal: what happens next and how to stop at once.
    assert ("Ctrl-C: saving at the end of this step" in err) == (stop == signal.SIGINT)
    assert signal.getsignal(stop) is before  # after the loop a signal is no request to save


def test_evaluations_on_schedule_save_their_step_and_the_best_is_kept(tmp_path):
    evaluate = Evaluations({2: 0.5, 4: 0.7, 5: 0.6})
    r = run(tmp_path, spec(total=5, save_every=100, eval_every=2, best_metric="m"), evaluate=evaluate)
    assert evaluate.calls == [2, 4, 5]  # every 2 steps and at the end
    assert sorted(r.ckpt.saved) == ["step00000002", "step00000004", "step00000005"]
    assert r.ckpt.best == [("step00000002", {"metric": "m", "value": 0.5, "step": 2}),
                           ("step00000004", {"metric": "m", "value": 0.7, "step": 4})]
    assert [x for x in records(tmp_path) if "val/m" in x] == [  # numbers only
        {"step": s, "val/m": v, "val/frames": 3} for s, v in ((2, 0.5), (4, 0.7), (5, 0.6))]


def test_an_evaluation_a_stop_ended_is_saved_pending_and_done_first_on_resume(tmp_path, capsys):
    evaluate = Evaluations({2: 0.5, 4: 0.7, 5: 0.6}, stop_at={2})
    r = run(tmp_path, spec(total=5, save_every=100, eval_every=2, best_metric="m"), evaluate=evaluate)
    assert r.finished is False and r.task.begun == [0, 1]
    state = r.ckpt.saved["step00000002"][0]["data"]
    assert state["eval_pending"] == 2 and r.ckpt.best == []
    assert "saved step 2, its evaluation stopped, exiting" in capsys.readouterr().out
    resumed = run(tmp_path, spec(total=5, save_every=100, eval_every=2, best_metric="m"),
                  state=copy.deepcopy(state), evaluate=evaluate)
    assert resumed.finished is True and "evaluating step 2 first" in capsys.readouterr().out
    assert evaluate.calls == [2, 2, 4, 5] and resumed.task.begun == [2, 3, 4]
    assert [tag for tag, _ in resumed.ckpt.best] == ["step00000002", "step00000004"]
    assert "eval_pending" not in resumed.state
    # Stopped again in that first evaluation: saved as it was (still pending), no step taken.
    again = run(tmp_path, spec(total=5, eval_every=2), state=copy.deepcopy(state), evaluate=Evaluations({}, {2}))
    assert again.finished is False and again.task.begun == [] and again.ckpt.saved == {}
    assert "saved step 2, its evaluation stopped again" in capsys.readouterr().out
    # Resumed without evaluations, the pending one is dropped: it is no longer in the state saved.
    without = run(tmp_path, spec(total=5, save_every=100), state=copy.deepcopy(state), evaluate=evaluate)
    assert evaluate.calls == [2, 2, 4, 5] and "eval_pending" not in without.ckpt.saved["step00000005"][0]["data"]


def test_a_process_other_than_the_first_logs_only_its_samples_and_says_nothing(tmp_path, capsys):
    r = run(tmp_path, spec(record_samples=True), task=Task(stop_at=(1, 0)), where_rank=1)
    assert r.finished is False and sorted(r.ckpt.saved) == ["step00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples_rank1.jsonl"]
    assert capsys.readouterr().out == ""
    seed_step(5, 1, 0)  # its generators are its own
    assert r.task.noise[0] == torch.rand(()).item()


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_a_non_finite_step_holds_its_update_back_and_is_logged_off_schedule(tmp_path, monkeypatch, policy, capsys):
    monkeypatch.setenv(NONFINITE_FAULT_ENV, "5")  # the fifth step (index 4)
    weights = {}

    class Watch(Task):
        def begin_step(self, step):
            weights[step] = self.engine.weights()
            super().begin_step(step)

    task = Watch()
    task.engine = Engine(2)
    r = run(tmp_path, spec(save_every=2, log_every=100, health=HealthPolicy(nonfinite=policy)), task=task,
            engine=task.engine)
    assert r.finished is True and r.state["nonfinite_steps"] == 1 and r.engine.updates == 6
    assert all(torch.equal(a, b) for a, b in zip(weights[4], weights[5]))  # step 5 changed nothing
    logged = records(tmp_path)
    assert [x["step"] for x in logged] == [5, 7] and logged[0]["loss"] is None and logged[0]["nonfinite_steps"] == 1
    assert (r.ckpt.loaded_tag == "step00000004") == (policy == "rollback")
    assert f"non-finite loss at step 5: {'its update dropped' if policy == 'skip' else 'rolling back'}" in \
        capsys.readouterr().err


# --- the end of a run (pretrain/engine/run.py) -------------------------------------------------------

class Evaluated(Task):
    """A task whose evaluation records the model's mode and may get a SIGTERM after its first frame."""

    def __init__(self, stop_in_eval=False):
        super().__init__()
        self.stop_in_eval, self.modes = stop_in_eval, []

    def evaluate(self, model, cfg, where, stop_requested=None):
        self.modes.append(model.training)
        model.eval()
        for frame in range(3):
            if stop_requested is not None and stop_requested():
                raise EvaluationStopped
            if self.stop_in_eval:
                os.kill(os.getpid(), signal.SIGTERM)
        return {"score": 0.25}

    def result_line(self, metrics, steps, where):
        return f"score {metrics['score']} after {steps} steps"


def test_the_end_of_a_run_reuses_the_last_evaluation_and_writes_metrics_done_and_its_line(tmp_path, capsys):
    from pretrain.engine.run import Evaluation, _finish

    task, model = Evaluated(), torch.nn.Linear(1, 1)
    where = Process(0, 2, torch.device("cpu"), tmp_path)
    evaluation = Evaluation(task, model, None, where)
    assert evaluation(6) == {"score": 0.25} and model.training  # back in training mode after it
    state = {"step": 6, "samples_seen": 24, "best": {"metric": "score", "value": 0.25, "step": 6}}
    before = signal.getsignal(signal.SIGTERM)
    assert _finish(task, model, None, where, state, evaluation) is True
    assert signal.getsignal(signal.SIGTERM) is before  # a stop request only during its evaluation
    assert task.modes == [True]  # step 6 was evaluated in the loop: not again
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"score": 0.25, "task": "t", "steps": 6,
                                                                  "processes": 2}
    assert json.loads((tmp_path / "DONE").read_text()) == {"steps": 6, "samples_seen": 24, "best": state["best"]}
    assert capsys.readouterr().out.strip() == "score 0.25 after 6 steps"
    assert _finish(task, model, None, where, dict(state, step=7), evaluation) is True and len(task.modes) == 2
    assert capsys.readouterr().out.strip() == "score 0.25 after 7 steps"  # step 7 was not: evaluated now
    other = tmp_path / "rank1"
    other.mkdir()
    assert _finish(task, model, None, Process(1, 2, torch.device("cpu"), other), state) is True
    assert list(other.iterdir()) == [] and capsys.readouterr().out == ""  # rank 0 writes and says it


def test_a_stop_during_the_final_evaluation_leaves_the_run_unfinished(tmp_path, capsys):
    from pretrain.engine.run import _finish

    task, model = Evaluated(stop_in_eval=True), torch.nn.Linear(1, 1)
    assert _finish(task, model, None, Process(0, 1, torch.device("cpu"), tmp_path), {"step": 6}) is False
    assert not (tmp_path / "DONE").exists() and not (tmp_path / "metrics.json").exists() and model.training
    assert "SIGTERM: step 6 is saved, its evaluation stopped, exiting" in capsys.readouterr().out


def test_an_init_checkpoint_that_is_missing_or_a_folder_is_refused_in_one_line(tmp_path):
    from omegaconf import OmegaConf

    from pretrain.engine.run import check_init_checkpoint

    check_init_checkpoint(OmegaConf.create({"init": {"checkpoint": None}}))
    check_init_checkpoint(OmegaConf.create({}))
    with pytest.raises(FileNotFoundError, match=f"init.checkpoint {tmp_path / 'no.pth'}: no such file"):
        check_init_checkpoint(OmegaConf.create({"init": {"checkpoint": str(tmp_path / "no.pth")}}))
    with pytest.raises(FileNotFoundError, match="init.checkpoint: "):
        check_init_checkpoint(OmegaConf.create({"init": {"checkpoint": str(tmp_path)}}))
