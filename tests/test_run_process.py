"""One process's run as the engine wires it (``pretrain.engine.run._run_process``), in this process: a
tiny segmentation fine-tuning on synthetic pairs (about a second a run) in a one-process gloo group.
What the launched runs of the slow tests show in minutes is checked here in seconds: what a checkpoint
records for a resume, what a run says as it starts, the notes and refusals of a resume, a stop,
periodic evaluation and the best step, the health policy, ``--eval-only``, and what each training
command hands the engine."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from data_tools.config import CONFIG_DIR, load_config
from data_tools.files import sha256_file
from data_tools.synth import SynthConfig, write_corpus
from finetune.data.classes import resolve_classes
from finetune.seg import SegTask
from pretrain.engine import runlock
from pretrain.engine.checkpoint import ResumeError, frozen_fingerprint
from pretrain.engine.distributed import default_extensions_dir
from pretrain.engine.health import NONFINITE_FAULT_ENV
from pretrain.engine.optim import group_layout
from pretrain.engine.run import _run_process
from pretrain.engine.task import TrainingPlan
from tests.conftest import disk_full_when_saving, tiny_pad_export

FRAMES = 6


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_corpus(str(root), SynthConfig(num_images=FRAMES, width=96, height=80))
    return root


@pytest.fixture(autouse=True)
def _one_process_launch(one_process_group, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # as a launcher sets it; DeepSpeed asks for it
    # DeepSpeed's op built where the commands build it (this environment's folder), not in a shared cache
    # that another checkout's run rebuilds from its own sources (about 30 s each time)
    extensions: dict = {}
    default_extensions_dir(extensions)
    for name, value in extensions.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(NONFINITE_FAULT_ENV, raising=False)
    yield
    runlock.release_all()  # as the process's end would


class CountingSegTask(SegTask):
    """The segmentation task, counting its forwards and evaluations; SIGTERM to this process (a
    preemption notice) during forward number ``stop_at``."""

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        self.stop_at, self.forwards, self.evaluations = stop_at, 0, 0

    def forward(self, engine, batch):
        self.forwards += 1
        if self.forwards == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(engine, batch)

    def evaluate_split(self, *args, **kwargs):
        self.evaluations += 1
        return super().evaluate_split(*args, **kwargs)


def _config(data, *overrides):
    cfg = load_config(CONFIG_DIR / "finetune" / "seg_tiny.yaml",
                      [f"data.root={data}", "eval.overlays=0", "train.log_every_steps=1", *overrides])
    resolve_classes(cfg)
    return cfg


def _run(run_dir, data, *overrides, task=None, eval_only=False, overwrite=False):
    task = task or CountingSegTask()
    return _run_process(0, 1, torch.device("cpu"), _config(data, *overrides), run_dir, overwrite, task=task,
                        eval_only=eval_only)


def _state(run_dir, step):
    return json.loads((run_dir / "checkpoints" / f"step{step:08d}" / "state_rank0.json").read_text())


def test_a_checkpoint_records_what_a_resume_checks(pairs, tmp_path):
    """The saved state holds the run's config hash, the fingerprint of the frozen weights and the
    init checkpoint's digest, the optimiser's group layout, the training frames, the batch layout,
    the stream order and the plan: each is what a resume compares before it loads anything."""
    init = tiny_pad_export(tmp_path, depth=4)
    run_dir = tmp_path / "run"
    task = CountingSegTask()
    assert _run(run_dir, pairs, "train.steps=2", f"init.checkpoint={init}", task=task) is True
    state = _state(run_dir, 2)
    assert state["config_hash"] == (run_dir / "config_hash.txt").read_text().strip()
    cfg = _config(pairs, "train.steps=2", f"init.checkpoint={init}")
    torch.manual_seed(int(cfg.train.seed))
    model = SegTask().build_network(cfg)
    assert state["frozen"] == {"fingerprint": frozen_fingerprint(model), "init_checkpoint": init,
                               "init_sha256": sha256_file(init)}
    assert state["optimizer_groups"] == group_layout(task.param_groups(model, cfg))
    assert state["inputs"]["what"] == "frames of the training split" and state["inputs"]["count"] == FRAMES
    data = state["data"]
    assert data["batching"] == {"micro": 4, "accum": 1, "world": 1} and data["stream_order"] == 1
    assert data["plan"] == {"steps_per_epoch": 1, "total_steps": 2} and data["step"] == 2


def test_a_run_says_what_it_loaded_and_what_trains(pairs, tmp_path, capfd):
    """Rank 0, before training: the init checkpoint's load report, a 16-bit rule that differs from the
    backbone's pre-training, the parameter report (``params.json``) and its line."""
    init = tiny_pad_export(tmp_path, depth=4)
    meta_path = tmp_path / "backbone.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, input={"mean": 0.38, "std": 0.19,
                                                       "intensity": {"uint16_mode": "minmax"}})))
    run_dir = tmp_path / "run"
    task = CountingSegTask()
    assert _run(run_dir, pairs, "train.steps=1", f"init.checkpoint={init}", task=task) is True
    said = capfd.readouterr()
    assert f"{init}: loaded " in said.out
    assert f"warning: {init} was pre-trained with the 16-bit rule {{'uint16_mode': 'minmax'}}" in said.err
    r = json.loads((run_dir / "params.json").read_text())
    assert r == json.loads(json.dumps(task.report)) and 0 < r["trainable_backbone_share"] < 1
    assert (f"seg ivtuning: {r['trainable_backbone']:,} of {r['backbone_total']:,} backbone parameters train "
            f"({100 * r['trainable_backbone_share']:.2f}%), head {r['trainable_head']:,}") in said.out


def test_eval_only_evaluates_the_trained_run_without_the_random_init_warning(pairs, tmp_path, capfd):
    run_dir = tmp_path / "run"
    assert _run(run_dir, pairs, "train.steps=2") is True
    assert "the backbone starts from random init" in capfd.readouterr().err  # said when it trains
    trained = json.loads((run_dir / "metrics.json").read_text())
    task = CountingSegTask()
    assert _run(run_dir, pairs, "train.steps=2", task=task, eval_only=True) is True
    said = capfd.readouterr()
    assert "random init" not in said.err and "evaluating step00000002 (step 2) with 1 processes" in said.out
    assert task.forwards == 0 and task.evaluations == 1
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["confusion_matrix"] == trained["confusion_matrix"]


def test_eval_only_is_refused_without_a_checkpoint_and_with_overwrite(pairs, tmp_path):
    with pytest.raises(ResumeError, match="--eval-only needs a trained run in .* \\(no checkpoint there\\)"):
        _run(tmp_path / "empty", pairs, eval_only=True)
    assert not (tmp_path / "empty").exists()
    with pytest.raises(ResumeError, match="--eval-only and --overwrite exclude each other"):
        _run(tmp_path / "empty", pairs, eval_only=True, overwrite=True)


def test_a_run_without_a_usable_checkpoint_says_what_to_do_where_it_applies(pairs, tmp_path):
    """Training again offers --overwrite; an evaluation, which excludes it, does not."""
    run_dir = tmp_path / "run"
    assert _run(run_dir, pairs, "train.steps=2", "train.save_every_steps=10") is True  # its one checkpoint: step 2
    model = run_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-16])
    unusable = (f"no usable checkpoint in {run_dir / 'checkpoints'}: step00000002: mp_rank_00_model_states.pt does not "
                "match its sha256 (corrupted or truncated)")
    with pytest.raises(ResumeError) as refused:
        _run(run_dir, pairs, "train.steps=2", "train.save_every_steps=10", eval_only=True)
    assert str(refused.value) == unusable
    with pytest.raises(ResumeError) as refused:
        _run(run_dir, pairs, "train.steps=2", "train.save_every_steps=10")
    assert str(refused.value) == unusable + " (use --overwrite to start again)"


def test_a_stopped_run_resumes_with_another_batch_split_and_says_so(pairs, tmp_path, capfd):
    """SIGTERM during step 3 of 4: the step is finished and saved and the process says it stopped
    (False: exit 75). The same run on 2 x 2 micro-batches instead of 4 x 1 (the same global batch)
    goes on from step 3, saying so once, and finishes."""
    run_dir = tmp_path / "run"
    common = ["train.steps=4", "train.save_every_steps=10", "train.effective_batch=4"]
    task = CountingSegTask(stop_at=3)
    assert _run(run_dir, pairs, *common, task=task) is False
    assert task.forwards == 3 and (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
    assert not (run_dir / "DONE").exists()
    capfd.readouterr()
    task = CountingSegTask()
    assert _run(run_dir, pairs, *common, "train.batch_size=2", task=task) is True
    out = capfd.readouterr().out
    assert out.count("note: the checkpoint's global batch 4 = 4 x 1 accumulation x 1 processes goes on as "
                     "4 = 2 x 2 accumulation x 1 processes") == 1, out
    assert task.forwards == 2  # step 4's two micro-batches
    assert json.loads((run_dir / "DONE").read_text())["steps"] == 4
    assert _state(run_dir, 4)["data"]["batching"] == {"micro": 2, "accum": 2, "world": 1}


def test_a_resume_on_other_training_frames_is_refused(pairs, tmp_path):
    data = tmp_path / "pairs"
    shutil.copytree(pairs, data)
    run_dir = tmp_path / "run"
    assert _run(run_dir, data, "train.steps=4", task=CountingSegTask(stop_at=2)) is False
    next(iter(sorted(data.glob("ir/*.png")))).unlink()
    with pytest.raises(ResumeError, match=f"the training data differs from the checkpoint's: {FRAMES} frames"):
        _run(run_dir, data, "train.steps=4")


def test_periodic_evaluations_keep_the_best_step_and_the_last_is_not_evaluated_twice(pairs, tmp_path):
    run_dir = tmp_path / "run"
    task = CountingSegTask()
    assert _run(run_dir, pairs, "train.steps=2", "eval.every_steps=1", "train.record_samples=true",
                task=task) is True
    assert task.evaluations == 2  # steps 1 and 2; the final report reuses step 2's
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in logged if "val/mIoU" in r]
    assert evaluated == [1, 2], logged
    done = json.loads((run_dir / "DONE").read_text())
    assert done["best"]["metric"] == "mIoU" and done["best"]["step"] in (1, 2)
    assert len((run_dir / "samples_rank0.jsonl").read_text().splitlines()) == 2  # one record a step


def test_the_health_policy_is_the_configs(pairs, tmp_path, monkeypatch):
    """A non-finite loss at step 2: ``train.nonfinite=skip`` drops that update and finishes; the
    default (stop) ends the run."""
    monkeypatch.setenv(NONFINITE_FAULT_ENV, "2")
    assert _run(tmp_path / "skip", pairs, "train.steps=3", "train.nonfinite=skip") is True
    assert json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[-1])["nonfinite_steps"] == 1
    with pytest.raises(FloatingPointError):
        _run(tmp_path / "stop", pairs, "train.steps=3")


class LongPlanSegTask(SegTask):
    """A task whose plan asks more steps of an epoch than its stream yields (a task's bug)."""

    def training_plan(self, model, cfg, batching, where):
        plan = super().training_plan(model, cfg, batching, where)
        return TrainingPlan(plan.loader, plan.steps_per_epoch + 1, plan.total_steps, plan.inputs)


def test_a_plan_longer_than_its_stream_is_refused_before_training(pairs, tmp_path):
    with pytest.raises(RuntimeError, match="the training plan takes 2 steps x 1 accumulation = 2 micro-batches per "
                                           "epoch, but its data stream yields 1"):
        _run(tmp_path / "run", pairs, "train.steps=2", task=LongPlanSegTask())
    assert not (tmp_path / "run" / "checkpoints").exists()


class NotStarted(Exception):
    pass


class UnstartedSegTask(SegTask):
    """The segmentation task, ended where training would begin (after the resume is fitted)."""

    def start(self, *args):
        raise NotStarted


def test_a_resume_inside_an_epoch_with_other_loader_workers_starts_their_streams_afresh(pairs, tmp_path, capfd,
                                                                                        monkeypatch):
    """A stream that needs per-worker positions (the shards'; the pairs' stream, told so here) resumed
    inside an epoch with another ``data.num_workers``: its saved positions belong to the old count,
    so the new workers start their streams afresh, and the run says so before it trains."""
    from finetune.data.stream import MapBatchStream

    run_dir = tmp_path / "run"
    assert _run(run_dir, pairs, "train.steps=3", "train.batch_size=2", task=CountingSegTask(stop_at=2)) is False
    assert _state(run_dir, 2)["data"]["batch"] == 2  # 3 steps an epoch: inside the first
    monkeypatch.setattr(MapBatchStream, "needs_positions", True)
    capfd.readouterr()
    with pytest.raises(NotStarted):
        _run(run_dir, pairs, "train.steps=3", "train.batch_size=2", "data.num_workers=2", task=UnstartedSegTask())
    assert ("note: data.num_workers changed (1 -> 2 loader streams): the rest of epoch 0 is read from the start of "
            "the new workers' streams") in capfd.readouterr().out


@pytest.mark.parametrize("command", ["pretrain train", "finetune seg", "finetune det"])
def test_the_training_commands_hand_the_engine_their_run_directory_and_flags(command, pairs, tmp_path, monkeypatch):
    """What each training command gives the engine once its config and inputs passed their checks:
    the run directory, ``--overwrite``, ``--eval-only`` and the task (which names its config file)."""
    import importlib

    from data_tools.cli import DEFAULT_BUILD_CONFIG
    from finetune.cli import main as finetune_main, make_parser
    from pretrain.cli import main as pretrain_main

    engine_run = importlib.import_module("pretrain.engine.run")  # the module; the package exports run()
    handed = []
    monkeypatch.setattr(engine_run, "run_entry_point",
                        lambda body, cfg, run_dir, overwrite: handed.append((body.keywords, run_dir, overwrite)))
    run_dir = tmp_path / "run"
    if command == "pretrain train":
        from data_tools.build import build_shards
        from data_tools.sources import load_sources

        build_shards(load_sources(pairs / "sources.yaml"), load_config(DEFAULT_BUILD_CONFIG), tmp_path / "shards",
                     progress=False)
        common = ["--config", str(CONFIG_DIR / "pretrain" / "tiny.yaml"), "--run-dir", str(run_dir),
                  f"data.shards=[{{path: {tmp_path / 'shards'}}}]"]
        assert pretrain_main(["train", *common]) == 0
        assert pretrain_main(["train", "--overwrite", *common]) == 0
        assert [(k["task"].name, k["eval_only"], d, o) for k, d, o in handed] == [
            ("pretrain", False, run_dir, False), ("pretrain", False, run_dir, True)]
        return
    task = command.split()[1]
    default = make_parser().parse_args([task, "--run-dir", str(run_dir)]).config
    assert default == str(CONFIG_DIR / "finetune" / f"{task}_vitb.yaml")  # the paper-scale recipe of the task
    config = str(CONFIG_DIR / "finetune" / f"{task}_tiny.yaml")
    common = ["--config", config, "--run-dir", str(run_dir), f"data.root={pairs}",
              *([f"data.boxes.path={pairs / 'labels'}"] if task == "det" else [])]
    for flags in ([], ["--overwrite"], ["--eval-only"]):
        assert finetune_main([task, *flags, *common]) == 0
    assert [(k["task"].name, k["task"].config_name, k["eval_only"], d, o) for k, d, o in handed] == [
        (task, config, False, run_dir, False), (task, config, False, run_dir, True),
        (task, config, True, run_dir, False)]



@pytest.mark.parametrize("name", ["metrics.json", "DONE"])
def test_a_full_disk_as_a_run_ends_leaves_no_half_written_result(name, pairs, tmp_path, monkeypatch):
    """metrics.json and DONE (by which run.sh takes a run for finished, and which the summaries read) are
    written whole or not at all: a full disk while either is written leaves no half file, and the same
    command then evaluates the saved last step again, without training, and writes both."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        disk_full_when_saving(m, f"/{name}.tmp")
        with pytest.raises(OSError, match="No space left"):
            _run(run_dir, pairs, "train.steps=2")
    assert not (run_dir / "DONE").exists() and not (run_dir / f"{name}.tmp").exists()
    assert (run_dir / "metrics.json").exists() == (name == "DONE")
    task = CountingSegTask()
    assert _run(run_dir, pairs, "train.steps=2", task=task) is True
    assert (task.forwards, task.evaluations) == (0, 1)
    assert json.loads((run_dir / "DONE").read_text())["steps"] == 2
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 2
