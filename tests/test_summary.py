"""What we report: the ``summary`` subcommands (one line per artefact, from the files a run leaves,
made by hand here, and a clear refusal for a folder that is not one) and the shape of a data issue."""
import json

import pytest

from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pretrain_summary_says_steps_losses_and_whether_it_finished(tmp_path, capsys):
    run = tmp_path / "pretrain"
    run.mkdir()
    _jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.25}, {"step": 3, "loss": 0.75},
                                   {"step": 3, "bad_samples": 1}])  # a record without a loss is no step
    assert pretrain_main(["summary", str(run)]) == 0
    line = capsys.readouterr().out
    assert line == f"pretrain   {run}: 3 steps, loss 1.5000 -> 0.7500 (not finished: rerun the training command to resume)\n"
    (run / "DONE").write_text("{}")
    assert pretrain_main(["summary", str(run)]) == 0
    assert capsys.readouterr().out == f"pretrain   {run}: 3 steps, loss 1.5000 -> 0.7500\n"
    assert pretrain_main(["summary", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    seg = tmp_path / "seg"  # a fine-tuning run logs metrics.jsonl too: told apart by its config
    seg.mkdir()
    (seg / "config.yaml").write_text("data: {layout: msrs}\n")
    _jsonl(seg / "metrics.jsonl", [{"step": 1, "loss": 1.5}])
    assert pretrain_main(["summary", str(seg)]) == 2
    assert f"{seg} is a segmentation fine-tuning run, not a pre-training run" in capsys.readouterr().err
    empty = tmp_path / "started"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert pretrain_main(["summary", str(empty)]) == 2
    assert "no step logged yet" in capsys.readouterr().err


def test_data_issues_have_one_shape_and_documented_reasons():
    from data_tools.issues import count_by_reason, issue

    reasons = {"box_empty": "...", "box_clipped": "..."}
    issues = [issue("a.txt", "box_empty", "w=0", reasons=reasons), issue("b", "box_clipped", reasons=reasons),
              issue("c", "box_empty", reasons=reasons)]
    assert issues[0] == {"name": "a.txt", "reason": "box_empty", "detail": "w=0"}
    assert count_by_reason(issues) == {"box_clipped": 1, "box_empty": 2}
    with pytest.raises(ValueError, match="issue reason 'typo' is not one of the documented"):
        issue("d", "typo", reasons=reasons)


def test_finetune_summary_names_method_score_share_and_best(tmp_path, capsys):
    run = tmp_path / "seg"
    run.mkdir()
    metrics = {"task": "seg", "method": "mona", "mIoU": 0.4567, "frames": 24,
               "params": {"trainable_backbone_share": 0.031, "trainable_backbone": 2684928}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "DONE").write_text(json.dumps({"steps": 8, "best": {"metric": "mIoU", "value": 0.5, "step": 4}}))
    assert finetune_main(["summary", str(run)]) == 0
    assert capsys.readouterr().out == (f"seg        {run}: mona, mIoU 45.7 on 24 frames; trains 3.1% of the backbone "
                                       f"(2,684,928); best mIoU 50.0 at step 4; overlays {run / 'overlays'}\n")
    assert finetune_main(["summary", str(tmp_path)]) == 2
    assert "no metrics.json (the run has not finished" in capsys.readouterr().err
    assert finetune_main(["summary", str(tmp_path / "sge")]) == 2  # a typo
    assert capsys.readouterr().err == f"error: {tmp_path / 'sge'}: no such run folder\n"
    assert finetune_main(["summary", str(run / "metrics.json")]) == 2
    assert f"{run / 'metrics.json'} is a file where a folder is expected" in capsys.readouterr().err
    pretrained = tmp_path / "pretrain"
    pretrained.mkdir()
    (pretrained / "config.yaml").write_text("data: {shards: []}\n")
    (pretrained / "metrics.json").write_text(json.dumps(metrics))
    assert finetune_main(["summary", str(pretrained)]) == 2
    assert f"{pretrained} is a pre-training run, not a fine-tuning run" in capsys.readouterr().err
    det = tmp_path / "det"
    det.mkdir()
    share = {"trainable_backbone_share": 0.031, "trainable_backbone": 2684928}
    for ap, said in ((0.25, "AP 25.0, AP50 50.0"), (None, "no score (no object to score)")):
        (det / "metrics.json").write_text(json.dumps({"task": "det", "method": "ivtuning", "AP": ap,
                                                      "AP50": ap and 2 * ap, "frames": 3, "params": share}))
        assert finetune_main(["summary", str(det)]) == 0
        assert f"det        {det}: ivtuning, {said} on 3 frames;" in capsys.readouterr().out


@pytest.mark.parametrize("layout,modality,detection,frames", [
    ("mfnet", "both", False, "--packed DIR"),
    ("pairs", "both", False, "--ir DIR [--vi DIR]"),
    ("pairs", "both", True, "--ir DIR --vi DIR"),
    ("pairs", "ir", True, "--ir DIR"),
    ("pairs", "vi", False, "--vi DIR")])
def test_the_predict_command_names_the_frames_the_run_takes(layout, modality, detection, frames, tmp_path, capsys):
    import shlex
    import sys

    import yaml

    run = tmp_path / "run #2"
    run.mkdir()
    data = {"layout": layout, **({"boxes": {"format": "yolo"}} if detection else {})}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"modality": modality}, "data": data}))
    assert finetune_main(["summary", "--predict-command", str(run)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith(f" {frames} --out DIR")
    assert shlex.split(line)[:5] == [sys.executable, "-m", "finetune", "predict", str(run)]  # reads back as run
