"""A run's model rebuilt in one process from a checkpoint (pretrain/engine/trained.py), as exports
and predictions do, on a hand-made run: which checkpoint, the frozen weights checked against the
checkpoint's fingerprint, the trainable weights loaded, and each way a run cannot be rebuilt."""
import json

import pytest
import torch

from data_tools.config import save_resolved
from data_tools.files import sha256_file
from pretrain.engine.checkpoint import ResumeError, frozen_fingerprint
from pretrain.engine.trained import load_trained


def build(cfg):
    """The run's model: the weight frozen (from the seed, as a random-init run's), the bias trained."""
    model = torch.nn.Linear(3, 1)
    model.weight.requires_grad_(False)
    return model


def save_step(run, step, bias, fingerprint=None, module=None):
    torch.manual_seed(1)
    model = build(None)
    folder = run / "checkpoints" / f"step{step:08d}"
    folder.mkdir(parents=True)
    state = module if module is not None else {"bias": torch.tensor([bias])}  # trainable weights only
    torch.save({"module": state}, folder / "mp_rank_00_model_states.pt")
    (folder / "state_rank0.json").write_text(json.dumps({"frozen": {
        "fingerprint": fingerprint or frozen_fingerprint(model), "init_checkpoint": None}}))
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    (folder / "checksums.json").write_text(json.dumps({"world_size": 1, "files": files}))


@pytest.fixture
def run(tmp_path):
    save_resolved({"train": {"seed": 1, "zero_stage": 0}, "data": {"shards": "x"}}, tmp_path)
    save_step(tmp_path, 2, 0.5)
    save_step(tmp_path, 4, 0.75)
    return tmp_path


def test_the_newest_checkpoint_or_the_one_named_rebuilds_the_model_in_eval_mode(run):
    model, tag, cfg = load_trained(run, build, ("pretrain",))
    assert tag == "step00000004" and not model.training and cfg.train.seed == 1
    assert float(model.bias.detach()) == 0.75
    torch.manual_seed(1)
    assert torch.equal(model.weight, build(None).weight)  # frozen: rebuilt from the run's seed
    model, tag, _ = load_trained(run, build, ("pretrain",), tag="step00000002")
    assert tag == "step00000002" and float(model.bias.detach()) == 0.5


def test_each_way_a_run_cannot_be_rebuilt_is_named(run, tmp_path_factory, capsys):
    with pytest.raises(ResumeError, match="checkpoint step00000009: its folder is missing"):
        load_trained(run, build, ("pretrain",), tag="step00000009")
    with pytest.raises(ValueError, match="not a fine-tuning run"):
        load_trained(run, build, ("seg", "det"))
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_trained(tmp_path_factory.mktemp("empty"), build, ("pretrain",))
    (run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt").write_bytes(b"changed")
    assert float(load_trained(run, build, ("pretrain",))[0].bias.detach()) == 0.5  # the newest that verifies
    assert "warning: checkpoint skipped: " in capsys.readouterr().err
    save_step(run, 6, 0.1, fingerprint="0" * 64)
    with pytest.raises(ResumeError, match="frozen weights rebuilt for .* differ from the checkpoint's reference"):
        load_trained(run, build, ("pretrain",))
    save_step(run, 8, 0.1, module={})  # a trained weight it lacks
    with pytest.raises(ResumeError, match=r"does not match the model: missing \['bias'\], unexpected \[\]"):
        load_trained(run, build, ("pretrain",))
    save_step(run, 10, 0.1, module={"bias": torch.tensor([0.0]), "scale": torch.tensor([1.0])})  # one it has not
    with pytest.raises(ResumeError, match=r"does not match the model: missing \[\], unexpected \['scale'\]"):
        load_trained(run, build, ("pretrain",))
    save_resolved({"train": {"seed": 1, "zero_stage": 3}, "data": {"shards": "x"}}, run)
    with pytest.raises(ResumeError, match="ZeRO stage 3 partitions the weights"):
        load_trained(run, build, ("pretrain",))


def test_a_run_without_checkpoints_is_refused(tmp_path):
    save_resolved({"train": {"seed": 1, "zero_stage": 0}}, tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_trained(tmp_path, build, ("pretrain",))
