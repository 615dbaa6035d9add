"""What the engine does with a run directory before its first step, on its own in this process:
resume, start fresh, wipe a start that claims nothing, or refuse (naming what differs); and the
checks a checkpoint passes before a run goes on from it (its config, frozen weights, training data,
global batch and optimiser groups)."""
import json

import pytest
from omegaconf import OmegaConf

from data_tools.config import config_hash, save_resolved
from pretrain.engine.checkpoint import ResumeError
from pretrain.engine.loop import _run_dir_decision, prepare_run_dir, resume_state, weights_for_evaluation
from pretrain.engine.runlock import LOCK_NAME
from pretrain.engine.batching import Batching
from pretrain.engine.task import training_inputs


pytestmark = pytest.mark.usefixtures("one_process_group")


def config(**train):
    return OmegaConf.create({"train": {"lr": 0.1, "batch_size": 2, **train}, "data": {"num_workers": 2}})


def a_run(run_dir, cfg, checkpoint=True, logged=True):
    """A run of ``cfg`` in ``run_dir``, as the engine leaves one: its config and hash, a logged
    step, a checkpoint."""
    save_resolved(cfg, run_dir)
    (run_dir / "config_hash.txt").write_text(config_hash(cfg) + "\n")
    if logged:
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "latest").write_text("step00000002")
    return run_dir


def test_a_run_of_this_config_resumes_and_one_of_another_is_refused_naming_what_differs(tmp_path):
    cfg = config()
    run = a_run(tmp_path / "run", cfg)
    assert _run_dir_decision(run, False, config_hash(cfg), cfg) == ("resume", None)
    other = config(lr=0.2)
    action, error = _run_dir_decision(run, False, config_hash(other), other)
    assert action == "resume" and f"holds a run of another config (hash {config_hash(cfg)} != {config_hash(other)})" \
        in error and "train.lr: 0.1 -> 0.2" in error and "--overwrite to discard it" in error
    # How the data is loaded, or the global batch split, may change on a resume.
    loading = OmegaConf.merge(cfg, {"data": {"num_workers": 5}, "train": {"batch_size": 1}})
    assert _run_dir_decision(run, False, config_hash(loading), loading) == ("resume", None)
    # --overwrite: not resumed; the folder is wiped for the fresh start.
    assert _run_dir_decision(run, True, config_hash(other), other) == ("wipe", None)


def test_a_start_that_claims_nothing_is_wiped_and_a_folder_not_ours_is_refused(tmp_path):
    cfg = config()
    never_checkpointed = a_run(tmp_path / "a", cfg, checkpoint=False)
    assert _run_dir_decision(never_checkpointed, False, config_hash(cfg), cfg) == ("wipe", None)
    failed_start = a_run(tmp_path / "b", config(lr=0.3), checkpoint=False, logged=False)
    assert _run_dir_decision(failed_start, False, config_hash(cfg), cfg) == ("wipe", None)
    (failed_start / "metrics.jsonl").write_text("")  # opened, no step written
    assert _run_dir_decision(failed_start, False, config_hash(cfg), cfg) == ("wipe", None)
    not_ours = tmp_path / "mine"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("x")
    assert "is not empty" in _run_dir_decision(not_ours, False, config_hash(cfg), cfg)[1]
    logged_other = a_run(tmp_path / "c", config(lr=0.3), checkpoint=False)
    action, error = _run_dir_decision(logged_other, False, config_hash(cfg), cfg)
    assert action == "fresh" and error.startswith(f"{logged_other} is not empty and has no checkpoint to resume from")
    assert _run_dir_decision(logged_other, True, config_hash(cfg), cfg) == ("wipe", None)
    only_lock = tmp_path / "d"
    only_lock.mkdir()
    (only_lock / LOCK_NAME).write_text("")
    assert _run_dir_decision(only_lock, False, "h", cfg) == ("fresh", None)
    assert _run_dir_decision(tmp_path / "new", False, "h", cfg) == ("fresh", None)


def test_preparing_a_folder_keeps_a_resumed_run_and_wipes_all_but_the_lock_for_a_fresh_one(tmp_path, capsys):
    cfg = config()
    run = a_run(tmp_path / "run", cfg)
    (run / "notes.txt").write_text("kept")
    assert prepare_run_dir(run, False, cfg, config_hash(cfg), 0) == (True, config_hash(cfg))
    assert (run / "notes.txt").is_file() and (run / "checkpoints" / "latest").is_file()
    # Resumed with another loading of its data: the run keeps its own hash, and says what differs.
    loading = OmegaConf.merge(cfg, {"data": {"num_workers": 5}})
    assert prepare_run_dir(run, False, loading, config_hash(loading), 0) == (True, config_hash(cfg))
    assert "data.num_workers: 2 -> 5" in capsys.readouterr().out
    assert (run / "config_hash.txt").read_text() == config_hash(cfg) + "\n"  # the run's own config stays saved
    assert OmegaConf.load(run / "config.yaml").data.num_workers == 2
    with pytest.raises(ResumeError, match="holds a run of another config"):
        prepare_run_dir(run, False, config(lr=0.2), config_hash(config(lr=0.2)), 0)
    other = config(lr=0.2)
    assert prepare_run_dir(run, True, other, config_hash(other), 0) == (False, config_hash(other))
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK_NAME, "config.yaml", "config_hash.txt"])
    assert (run / "config_hash.txt").read_text() == config_hash(other) + "\n"
    assert OmegaConf.load(run / "config.yaml").train.lr == 0.2


class Saved:
    """A checkpointer that hands over one saved state, asking ``check`` first as the real one does."""

    def __init__(self, directory, saved):
        self.directory, self.saved, self.loaded_tag, self.asked = directory, saved, "step00000004", []

    def load(self, engine, rank, weights_only=False, check=None):
        self.asked.append(weights_only)
        problem = check(self.directory / self.loaded_tag, self.saved) if check else None
        if problem:
            raise ResumeError(f"checkpoint {self.loaded_tag}: {problem}")
        return json.loads(json.dumps(self.saved))


def saved_state(**overrides):
    state = {"config_hash": "h1", "frozen": {"fingerprint": "f1"}, "world_size": 1,
             "inputs": training_inputs("frames", 2, ["a", "b"]), "optimizer_groups": [["w"], ["b"]],
             "data": {"step": 4, "epoch": 1, "batch": 2, "batching": {"micro": 2, "accum": 2, "world": 1}}}
    return {**state, **overrides}


def test_a_checkpoint_goes_on_only_with_its_config_frozen_weights_data_batch_and_groups(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step00000004").mkdir(parents=True)
    ckpt = Saved(tmp_path / "checkpoints", saved_state())
    frozen, inputs, groups = {"fingerprint": "f1"}, training_inputs("frames", 2, ["a", "b"]), [["w"], ["b"]]

    def resume(batching=Batching(1, 4, 1), **kw):
        args = dict(cfg_hash="h1", frozen_ref=frozen, inputs=inputs, groups=groups) | kw
        return resume_state(ckpt, None, 0, batching, args["cfg_hash"], args["frozen_ref"], args["inputs"],
                            args["groups"])

    state = resume()  # the same global batch, split otherwise: goes on, with the checkpoint's batching
    assert state["step"] == 4 and state["batching"] == {"micro": 2, "accum": 2, "world": 1}
    assert "resumed from step00000004 at step 4 (epoch 1, micro-batch 2)" in capsys.readouterr().out
    with pytest.raises(ResumeError, match="config hash differs"):
        resume(cfg_hash="h2")
    with pytest.raises(ResumeError, match="frozen weights differ"):
        resume(frozen_ref={"fingerprint": "f2"})
    with pytest.raises(ResumeError, match=r"training data differs from the checkpoint's: 2 frames \(sha256 "):
        resume(inputs=training_inputs("frames", 2, ["a", "c"]))
    assert resume(inputs=None)["step"] == 4  # a task that records no inputs
    with pytest.raises(ResumeError, match="checkpoint step00000004: the checkpoint's global batch is 4 = 2 x 2"):
        resume(batching=Batching(2, 1, 1))
    with pytest.raises(ResumeError, match="optimiser's parameter groups differ"):
        resume(groups=[["w", "b"]])
    assert resume(groups=None)["step"] == 4
    # Evaluation loads the weights alone, with the same checks of config and frozen weights.
    assert weights_for_evaluation(ckpt, None, "h1", frozen)["step"] == 4 and ckpt.asked[-1] is True
    with pytest.raises(ResumeError, match="frozen weights differ"):
        weights_for_evaluation(ckpt, None, "h1", {"fingerprint": "f2"})


def test_a_checkpoint_of_a_version_that_recorded_no_batching_was_written_with_the_runs_config(tmp_path):
    cfg = config(batch_size=2, accum_steps=3, effective_batch=None)
    save_resolved(cfg, tmp_path)
    (tmp_path / "checkpoints" / "step00000004").mkdir(parents=True)
    saved = saved_state()
    del saved["data"]["batching"]
    ckpt = Saved(tmp_path / "checkpoints", saved)
    state = resume_state(ckpt, None, 0, Batching(2, 3, 1), "h1", {"fingerprint": "f1"})
    assert state["batching"] == {"micro": 2, "accum": 3, "world": 1}
    with pytest.raises(ResumeError, match="global batch is 6"):
        resume_state(ckpt, None, 0, Batching(2, 2, 1), "h1", {"fingerprint": "f1"})

