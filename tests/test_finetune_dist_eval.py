"""Evaluation across processes: the confusion matrix summed over 2 gloo ranks and the detections
gathered from them equal a 1-process evaluation of the same checkpoint (``--eval-only``, which
re-scores a finished run with any number of processes)."""
import json
import os

import pytest

from data_tools.config import CONFIG_DIR
from data_tools.synth import SynthConfig, write_corpus
from tests.conftest import run_finetune_cli


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_corpus(str(root), SynthConfig(num_images=11, width=160, height=128))  # odd: ranks get 6 and 5 frames
    return root


def _finetune(task, run_dir, overrides, nproc=0, eval_only=False, env_extra=None):
    """One thread per process in both runs, so that 1 and 2 processes compute frames identically."""
    return run_finetune_cli(task, run_dir, CONFIG_DIR / "finetune" / f"{task}_tiny.yaml", *overrides, nproc=nproc,
                            eval_only=eval_only, env_extra={"OMP_NUM_THREADS": "1", **(env_extra or {})})


def _eval_twice(task, run_dir, overrides):
    """metrics.json (and predictions.json for det) of --eval-only with 1 and with 2 processes."""
    out = []
    for nproc in (1, 2):
        res = _finetune(task, run_dir, overrides, nproc=nproc, eval_only=True)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        # said once, by rank 0: what is evaluated, the split read, the result
        said = res.stdout
        assert said.count(f"with {nproc} processes") == said.count("val: 11 of 11 frames used") == 1, said[-3000:]
        assert said.count(f"on 11 frames; {run_dir / 'metrics.json'}") == 1, said[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["processes"] == nproc and metrics["frames"] == 11 and metrics["steps"] == 6
        preds = json.loads((run_dir / "predictions.json").read_text()) if task == "det" else None
        out.append((metrics, preds))
    return out


def test_segmentation_confusion_matrix_reduced_over_two_ranks(pairs, tmp_path):
    overrides = [f"data.root={pairs}", "train.steps=6", "train.save_every_steps=3"]
    res = _finetune("seg", tmp_path / "run", overrides)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())
    (one, _), (two, _) = _eval_twice("seg", tmp_path / "run", overrides)
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert sum(map(sum, one["confusion_matrix"])) == 11 * 128 * 160  # every pixel once, none twice
    assert two["mIoU"] == one["mIoU"] and two["per_class_iou"] == one["per_class_iou"]
    # The checkpoint holds the weights the training run evaluated (thread counts may differ).
    assert one["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-3)


def test_detection_predictions_gathered_from_two_ranks(pairs, tmp_path):
    # 6 steps from random init score every box low: keep them all, so that there is something to compare
    overrides = [f"data.root={pairs}", f"data.boxes.path={pairs / 'labels'}", "train.steps=6",
                 "train.save_every_steps=3", "model.head.score_threshold=0.0"]
    res = _finetune("det", tmp_path / "run", overrides)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (one, preds_one), (two, preds_two) = _eval_twice("det", tmp_path / "run", overrides)
    key = (lambda r: (r["image_id"], r["category_id"], -r["score"], r["bbox"]))
    assert preds_one and sorted(preds_two, key=key) == sorted(preds_one, key=key)
    assert {r["image_id"] for r in preds_one} == set(range(1, 12))  # frames of both ranks
    assert set(preds_one[0]) == {"image_id", "category_id", "bbox", "score"}  # COCO results format
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "per_class_AP", "detections"):
        assert two[name] == one[name], name


def test_eval_only_refuses_a_run_without_checkpoint_and_another_config(pairs, tmp_path):
    res = _finetune("seg", tmp_path / "empty", [f"data.root={pairs}"], eval_only=True)
    assert res.returncode != 0 and "no checkpoint" in res.stdout + res.stderr
    assert not (tmp_path / "empty").exists()  # nothing written
    overrides = [f"data.root={pairs}", "train.steps=2"]
    assert _finetune("seg", tmp_path / "run", overrides).returncode == 0
    res = _finetune("seg", tmp_path / "run", overrides[:1] + ["train.steps=3"], eval_only=True)
    assert res.returncode != 0 and "another config" in res.stdout + res.stderr
    res = _finetune("seg", tmp_path / "run", overrides + ["--overwrite"], eval_only=True)
    assert res.returncode != 0 and "exclude each other" in res.stdout + res.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()  # the trained run is kept


def test_a_launched_cpu_run_of_one_frame_a_step_is_refused_naming_its_processes(pairs, tmp_path):
    """The launch's process count reaches the check made before a run: 2 CPU processes do not pool
    their BatchNorm statistics, so one frame a step is refused as it is for one process."""
    res = _finetune("seg", tmp_path / "run", [f"data.root={pairs}", "train.batch_size=1"], nproc=2)
    said = res.stdout + res.stderr
    assert res.returncode != 0, said[-3000:]
    assert "train.batch_size=1 with 2 CPU processes, whose BatchNorm is not synchronised" in said, said[-3000:]
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_a_resume_on_other_training_frames_is_refused_with_what_changed(pairs, tmp_path):
    """The checkpoint records the training split (frame count and a digest of the names in order):
    re-running a run after frames were added or lost would replay another data order from the saved
    position. Refused, saying both; on the frames it started with, the same command goes on."""
    import shutil

    data = tmp_path / "pairs"
    shutil.copytree(pairs, data)
    overrides = [f"data.root={data}", "train.steps=2"]
    assert _finetune("seg", tmp_path / "run", overrides).returncode == 0
    moved = tmp_path / "aside.png"
    frame = sorted(data.glob("ir/*.png"))[0]  # every frame trains (no split list)
    shutil.move(frame, moved)
    res = _finetune("seg", tmp_path / "run", overrides)
    said = res.stdout + res.stderr
    assert res.returncode != 0 and "the training data differs from the checkpoint's: 11 frames of the training " \
        "split (sha256 " in said and "then, 10 frames of the training split" in said, said[-2000:]
    shutil.move(moved, frame)
    res = _finetune("seg", tmp_path / "run", overrides)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


def test_two_process_training_evaluates_the_model_it_saves_and_resumes_to_it(pairs, tmp_path):
    """IV-tuning (BatchNorm in its hybrid operation and in the heads) trained by 2 processes: every
    rank holds the same BatchNorm statistics, so --eval-only of the saved checkpoint reproduces the
    run's own metrics exactly, and a run SIGKILLed whole at a seeded random moment of its training
    resumes to the same weights, BatchNorm buffers and metrics, as does one stopped by a Ctrl-C during
    a periodic evaluation (the ranks hold 6 and 5 frames and stop at the same one)."""
    import random
    import time

    import torch

    from tests.conftest import kill_process_tree

    from pretrain.engine.loop import EVAL_STOP_FAULT_ENV

    overrides = [f"data.root={pairs}", "train.steps=6", "train.save_every_steps=2", "train.batch_size=2",
                 "eval.overlays=0", "train.log_every_steps=1", "eval.every_steps=3"]
    res = _finetune("seg", tmp_path / "clean", overrides, nproc=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # what the run loaded and what trains: said by one process, params.json written by it
    assert res.stdout.count("backbone parameters train (") == 1, res.stdout[-3000:]
    assert json.loads((tmp_path / "clean" / "params.json").read_text())["trainable_backbone"] > 0
    trained = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    res = _finetune("seg", tmp_path / "clean", overrides, nproc=2, eval_only=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    again = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert again["confusion_matrix"] == trained["confusion_matrix"] and again["mIoU"] == trained["mIoU"]

    rng = random.Random(int(os.environ.get("IRPT_KILL_SEED", "0")))
    target, extra = rng.randint(3, 5), rng.uniform(0.0, 0.2)  # after the save of step 2
    proc = run_finetune_cli("seg", tmp_path / "run", CONFIG_DIR / "finetune" / "seg_tiny.yaml", *overrides, nproc=2,
                            env_extra={"OMP_NUM_THREADS": "1"}, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and (
            not metrics.is_file() or len(metrics.read_text().splitlines()) < target):
        time.sleep(0.01)
    time.sleep(extra)
    killed_during_training = proc.poll() is None and not (tmp_path / "run" / "DONE").exists()
    kill_process_tree(proc)
    assert killed_during_training, "the run ended before the kill: make it longer"
    res = _finetune("seg", tmp_path / "run", overrides, nproc=2)
    assert res.returncode == 0 and "resumed from step0000000" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("resumed from") == 1  # said once, by rank 0

    res = _finetune("seg", tmp_path / "stopped", overrides, nproc=2, env_extra={EVAL_STOP_FAULT_ENV: "3"})
    said = res.stdout + res.stderr
    assert res.returncode != 0 and "SIGINT: saved step 3, its evaluation stopped, exiting" in said, said[-3000:]
    for rank in (0, 1):  # saved at once, its evaluation pending; nothing of it logged
        state = tmp_path / "stopped" / "checkpoints" / "step00000003" / f"state_rank{rank}.json"
        state = json.loads(state.read_text())
        assert state["data"]["eval_pending"] == 3
    assert "val/mIoU" not in (tmp_path / "stopped" / "metrics.jsonl").read_text()
    res = _finetune("seg", tmp_path / "stopped", overrides, nproc=2)
    assert res.returncode == 0 and "evaluating step 3 first (its evaluation was stopped)" in res.stdout, \
        res.stdout[-3000:] + res.stderr[-3000:]

    evaluations = (lambda d: [(r["step"], r["val/mIoU"]) for r in map(json.loads, (d / "metrics.jsonl").read_text()
                                                                    .splitlines()) if "val/mIoU" in r])
    a = torch.load(tmp_path / "clean" / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
                   weights_only=True)["module"]
    assert any("running_var" in k for k in a)  # the checkpoint holds BatchNorm statistics
    for run in ("run", "stopped"):
        b = torch.load(tmp_path / run / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
                       weights_only=True)["module"]
        for k in a:
            assert torch.equal(a[k], b[k]), (run, k)
        resumed = json.loads((tmp_path / run / "metrics.json").read_text())
        assert resumed["confusion_matrix"] == trained["confusion_matrix"]
        assert evaluations(tmp_path / run) == evaluations(tmp_path / "clean") and len(evaluations(tmp_path / run)) == 2
        best = (lambda d: json.loads((d / "checkpoints" / "best" / "best.json").read_text()))
        assert best(tmp_path / run) == best(tmp_path / "clean")
