"""What segmentation and detection fine-tuning have in common, as a task of the training engine:
data reports, the parameter report, parameter groups, the poly schedule, the forward of an
(infrared, visible) batch and evaluation on the validation split. A subclass supplies the
network, the dataset of a split, the targets of a batch, the evaluation and the result line."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from data_tools.config import as_the_run_began
from data_tools.files import atomic_write_text
from finetune.data.pairs import unknown_classes_note, write_report
from finetune.data.stream import MapBatchStream
from finetune.factory import intensity_rule_mismatch, parameter_report
from finetune.models.methods import get_method
from pretrain.engine import (EpochLoader, Task, TrainingPlan, engine_input, launched_world_size, param_groups,
                             milestone_steps, poly_lr_at, spared_from_decay, step_lr_at, training_inputs)


class FinetuneTask(Task):
    sync_batchnorm = True
    val_set = None

    def __init__(self, config_name: str | None = None):
        self.config_name = config_name or f"the {self.name} config"  # how messages name the config

    # --- what a subclass supplies -------------------------------------------------------------
    def build_network(self, cfg) -> torch.nn.Module:
        raise NotImplementedError

    def dataset(self, cfg, split: str):
        """(dataset, issues, frames found) of a split."""
        raise NotImplementedError

    def targets(self, batch: dict, device: torch.device):
        raise NotImplementedError

    def evaluate_split(self, model, cfg, dataset, device: torch.device, rank: int, world: int, run_dir: Path,
                       stop_requested: Callable[[], bool] | None = None) -> dict:
        raise NotImplementedError

    def describe(self, metrics: dict) -> str:
        raise NotImplementedError

    # --- the engine's hooks -------------------------------------------------------------------
    def check_inputs(self, cfg, eval_only=False):
        from finetune.preflight import check_run

        check_run(cfg, self.config_name, ("val",) if eval_only else ("train", "val"), launched_world_size(),
                  torch.cuda.is_available())

    def build_model(self, cfg, where):
        # A run an earlier version began goes on as it began: a model setting added since (Faster R-CNN's
        # training rules, say) keeps the meaning its absence had, as `predict` reads the run's saved config.
        cfg, left_out = as_the_run_began(cfg, where.run_dir / "config.yaml", "model")
        if left_out and where.is_main:
            print(f"note: {where.run_dir} began before these model settings existed and goes on as it began, "
                  f"without them (their values here are not used): {', '.join(left_out)}", flush=True)
        return self.build_network(cfg)

    def describe_model(self, model, cfg, where):
        self.report = parameter_report(model)
        if not where.is_main:
            return
        if model.backbone.load_report is not None:
            print(model.backbone.load_report.summary(), flush=True)
        if (mismatch := intensity_rule_mismatch(cfg)) is not None:
            print(mismatch, file=sys.stderr, flush=True)
        atomic_write_text(where.run_dir / "params.json", json.dumps(self.report, indent=1))
        r = self.report
        print(f"{self.name} {cfg.model.method}: {r['trainable_backbone']:,} of {r['backbone_total']:,} backbone "
              f"parameters train ({100 * r['trainable_backbone_share']:.2f}%), head {r['trainable_head']:,}",
              flush=True)

    def param_groups(self, model, cfg):
        o = cfg.optim
        # Layer-wise lr decay where the whole encoder trains (BEiT / MAE fine-tuning); adapters: none.
        layer_decay = o.layer_decay if get_method(cfg.model.method).trains == "all" else None
        encoder, prefix = model.backbone.encoder, model.backbone_prefix + "encoder."
        return param_groups(model, float(o.weight_decay), layer_decay, len(encoder.blocks) if layer_decay else None,
                            prefix=prefix, no_decay=spared_from_decay(encoder, prefix))

    def training_plan(self, model, cfg, batching, where):
        t = cfg.train
        train_set = self.load_split(cfg, "train", where)
        stream = MapBatchStream(train_set, batching.micro, int(t.seed), where.rank, where.world, batching.accum)
        steps_per_epoch = stream.batches_per_epoch // batching.accum
        self.total_steps = int(t.steps)
        if where.is_main:
            print(f"effective batch {batching.said()}; {steps_per_epoch} steps/epoch, {self.total_steps} steps",
                  flush=True)
            if len(train_set) < batching.effective:
                print(f"note: the train split has {len(train_set)} frames, fewer than one effective batch of "
                      f"{batching.effective}: its frames repeat within each step", file=sys.stderr, flush=True)
        loader = EpochLoader(stream, int(cfg.data.num_workers))
        inputs = training_inputs("frames of the training split", len(train_set), train_set.names())
        return TrainingPlan(loader, steps_per_epoch, self.total_steps, inputs)

    def start(self, model, optimizer, plan, cfg, where):
        self.cfg, self.device = cfg, where.device

    def learning_rate(self, step: int) -> float:
        o = self.cfg.optim
        if o.get("milestones"):
            milestones = milestone_steps(list(o.milestones), self.total_steps)
            return step_lr_at(step, int(o.warmup_steps), float(o.lr), milestones, float(o.step_gamma))
        return poly_lr_at(step, self.total_steps, int(o.warmup_steps), float(o.lr), float(o.poly_power),
                          float(o.min_lr))

    def forward(self, engine, batch: dict) -> torch.Tensor:
        get = (lambda k: engine_input(engine, batch[k].to(self.device, non_blocking=True)) if k in batch else None)
        return engine(get("ir"), get("vi"), self.targets(batch, self.device))

    def eval_every(self, cfg) -> int:
        return int(cfg.eval.every_steps)

    def evaluate(self, model, cfg, where, stop_requested=None):
        if self.val_set is None:  # read (and reported) once, however often it is evaluated
            self.val_set = self.load_split(cfg, "val", where)
        metrics = self.evaluate_split(model, cfg, self.val_set, where.device, where.rank, where.world, where.run_dir,
                                      stop_requested)
        metrics.update(method=cfg.model.method, modality=cfg.model.modality,
                       params={k: v for k, v in self.report.items() if k != "per_module"})
        return metrics

    def result_line(self, metrics, steps, where):
        return f"{self.describe(metrics)} on {metrics['frames']} frames; {where.run_dir / 'metrics.json'}"

    # --- helpers ------------------------------------------------------------------------------
    def load_split(self, cfg, split: str, where):
        """The dataset of a split; rank 0 writes its data report."""
        dataset, issues, found = self.dataset(cfg, split)
        if where.is_main:
            path = where.run_dir / f"data_report_{split}.json"
            report = write_report(path, split, found, len(dataset), issues)
            print(f"{split}: {len(dataset)} of {found} frames used; issues {report['issues_by_reason'] or 'none'} "
                  f"(names in {path})", flush=True)
            if note := unknown_classes_note(issues, cfg.data.classes):
                print(f"note: {split}: {note}", file=sys.stderr, flush=True)
        return dataset
