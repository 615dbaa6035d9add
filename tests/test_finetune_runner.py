"""What segmentation and detection fine-tuning share as a task of the engine (finetune/runner.py),
with a stand-in network and dataset: each split's data report, the training plan, the evaluation
of the validation split (read once) and the lines a run prints. Schedules and parameter groups are
in test_finetune_protocol.py and test_finetune_models.py; whole runs in test_finetune_seg.py."""
import json
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from finetune.runner import FinetuneTask
from pretrain.engine import Batching
from pretrain.engine.loop import Process
from pretrain.engine.task import training_inputs


class Frames:
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def names(self):
        return [f"f{i}" for i in range(self.n)]

    def train_sample(self, i, rng):
        return {"ir": torch.full((1, 2, 2), float(i)), "name": f"f{i}"}


class StandIn(FinetuneTask):
    name = "stand-in"

    def __init__(self, sizes: dict, issues: list | None = None):
        super().__init__()
        self.sizes, self.issues, self.read, self.evaluated = sizes, issues or [], [], []

    def dataset(self, cfg, split):
        self.read.append(split)
        n = self.sizes[split]
        return Frames(n), self.issues, n + len(self.issues)

    def evaluate_split(self, model, cfg, dataset, device, rank, world, run_dir, stop_requested=None):
        self.evaluated.append(len(dataset))
        return {"score": 0.5, "frames": len(dataset)}

    def describe(self, metrics):
        return f"score {metrics['score']}"


def config():
    return OmegaConf.create({"train": {"steps": 9, "seed": 3}, "data": {"num_workers": 0, "classes": ["person", "car"]},
                             "model": {"method": "mona", "modality": "ir"}, "eval": {"every_steps": 3}})


def test_the_training_plan_and_the_data_report_of_the_train_split(tmp_path, capsys):
    issues = [{"reason": "unknown_class", "name": "a.png", "detail": "'bike'"},
              {"reason": "unknown_class", "name": "b.png", "detail": "'bike'"}]
    task = StandIn({"train": 3}, issues)
    plan = task.training_plan(None, config(), Batching(2, 2, 1), Process(0, 1, torch.device("cpu"), tmp_path))
    assert (plan.steps_per_epoch, plan.total_steps, task.total_steps) == (1, 9, 9)  # 3 frames: one step of 2 x 2
    assert plan.inputs == training_inputs("frames of the training split", 3, ["f0", "f1", "f2"])
    assert plan.loader.stream.batches_per_epoch == 2 and plan.loader.stream.seed == 3
    report = json.loads((tmp_path / "data_report_train.json").read_text())
    assert (report["found"], report["used"], report["issues_by_reason"]) == (5, 3, {"unknown_class": 2})
    out, err = capsys.readouterr()
    assert "train: 3 of 5 frames used; issues {'unknown_class': 2}" in out
    assert "effective batch 4 = 2 x 2 accumulation x 1 processes; 1 steps/epoch, 9 steps" in out
    assert "note: the train split has 3 frames, fewer than one effective batch of 4" in err
    assert "note: train: 2 boxes left out, their class is not in data.classes ['person', 'car']: 'bike' x2" in err
    StandIn({"train": 4}).training_plan(None, config(), Batching(2, 2, 1), Process(0, 1, torch.device("cpu"), tmp_path))
    assert "fewer than one effective batch" not in capsys.readouterr().err  # one batch exactly


def test_other_ranks_read_the_split_but_write_and_say_nothing(tmp_path, capsys):
    task = StandIn({"train": 8})
    plan = task.training_plan(None, config(), Batching(2, 1, 2), Process(1, 2, torch.device("cpu"), tmp_path))
    assert plan.steps_per_epoch == 2 and task.read == ["train"]  # 8 frames, 2 per process and step, 2 processes
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr() == ("", "")


def test_the_validation_split_is_read_once_however_often_it_is_evaluated(tmp_path, capsys):
    task = StandIn({"val": 4})
    task.report = {"trainable_backbone": 10, "backbone_total": 100, "per_module": {"x": 1}}
    where = Process(0, 1, torch.device("cpu"), tmp_path)
    cfg = config()
    first = task.evaluate(None, cfg, where)
    second = task.evaluate(None, cfg, where)
    assert task.read == ["val"] and task.evaluated == [4, 4] and first == second
    assert first == {"score": 0.5, "frames": 4, "method": "mona", "modality": "ir",
                     "params": {"trainable_backbone": 10, "backbone_total": 100}}
    assert capsys.readouterr().out.count("val: 4 of 4 frames used; issues none") == 1
    assert task.result_line(first, 9, where) == f"score 0.5 on 4 frames; {tmp_path / 'metrics.json'}"
    assert task.eval_every(cfg) == 3


class Engine:
    """DeepSpeed's engine in bf16 mode: it holds the weights in bf16 and casts no inputs itself."""

    def __init__(self):
        self.seen = []

    def bfloat16_enabled(self):
        return True

    def __call__(self, ir, vi, targets):
        self.seen.append((ir, vi, targets))
        return torch.tensor(1.0)


def test_a_batch_goes_to_the_network_as_infrared_visible_and_targets_images_in_the_weights_dtype(tmp_path):
    task = StandIn({})
    task.start(None, None, None, config(), SimpleNamespace(device=torch.device("cpu")))
    task.targets = lambda batch, device: batch["label"]
    engine, ir, vi, label = Engine(), torch.ones(2, 1, 4, 4), torch.full((2, 3, 4, 4), 2.0), torch.zeros(2, 4, 4)
    assert task.forward(engine, {"ir": ir, "label": label}) == 1.0
    task.forward(engine, {"ir": ir, "vi": vi, "label": label})
    (ir_in, vi_in, targets), (_, vi_both, _) = engine.seen
    assert ir_in.dtype == torch.bfloat16 and torch.equal(ir_in.float(), ir) and vi_in is None
    assert vi_both.dtype == torch.bfloat16 and torch.equal(vi_both.float(), vi)
    assert targets is label  # targets keep their precision (box coordinates)
