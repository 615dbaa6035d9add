"""Refusals of the smaller commands and helpers: each names what is wrong."""
import cv2
import numpy as np
import pytest

from data_tools.config import CONFIG_DIR, load_config


def test_split_refuses_a_bad_fraction_and_a_missing_folder(tmp_path, capsys):
    from data_tools.cli import main as data_main

    assert data_main(["split", "--root", str(tmp_path), "--images", "Ir"]) == 2
    assert f"{tmp_path / 'Ir'}: no such folder" in capsys.readouterr().err
    (tmp_path / "Ir").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "Ir" / f"{i}.png"), np.zeros((4, 4), np.uint8))
    assert data_main(["split", "--root", str(tmp_path), "--images", "Ir", "--val-fraction", "1.5"]) == 2
    assert "--val-fraction must be between 0 and 1, got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "train.txt").exists()


def test_a_split_placeholder_without_split_dirs_is_named():
    from finetune.factory import data_for_split

    cfg = load_config(CONFIG_DIR / "finetune" / "seg_tiny.yaml", ["data.root=/data", "data.dirs.ir='{split}/ir'"])
    with pytest.raises(ValueError, match=r"data.dirs.ir is '\{split\}/ir', but data.split_dirs.val is not set"):
        data_for_split(cfg, "val")


def test_check_refuses_segmentation_without_label_folder(tmp_path, capsys):
    from finetune.cli import main as finetune_main

    assert finetune_main(["check", "--config", str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"), f"data.root={tmp_path}",
                          "data.dirs.label=null"]) == 2
    assert "data.dirs.label is not set" in capsys.readouterr().err


def test_rollback_without_any_checkpoint_stops_with_the_reason(tmp_path):
    from pretrain.engine import Checkpointer
    from pretrain.engine.loop import _roll_back

    with pytest.raises(FloatingPointError, match="non-finite loss at step 3 and no checkpoint yet to roll back to"):
        _roll_back(Checkpointer(tmp_path / "checkpoints"), engine=None, rank=0, step=3)
