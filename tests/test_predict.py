"""`finetune predict`: a trained run applied to frames without labels gives exactly what the run's
own evaluation computed on the same frames (segmentation: the confusion matrix; detection: the
detections), and names the frames it could not use."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest

from data_tools.config import CONFIG_DIR
from data_tools.imageio import read_label_map
from data_tools.synth import SynthConfig, write_corpus
from finetune.cli import main as finetune_main
from finetune.metrics import confusion_matrix
from tests.conftest import disk_full_when_saving, run_finetune_cli

SEG = str(CONFIG_DIR / "finetune" / "seg_tiny.yaml")
DET = str(CONFIG_DIR / "finetune" / "det_tiny.yaml")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    write_corpus(root, SynthConfig(num_images=6, width=160, height=128))
    return root


def _bordered(pairs, root, top: int, left: int):
    """The pairs in a white frame of ``top`` / ``left`` pixels on each side (DroneVehicle ships its frames in
    one of 100 px), their YOLO boxes re-normalised to the framed size."""
    for folder in ("ir", "vi", "labels"):
        (root / folder).mkdir(parents=True)
    for path in sorted((pairs / "ir").iterdir()):
        for folder in ("ir", "vi"):
            frame = cv2.imread(str(pairs / folder / path.name), cv2.IMREAD_UNCHANGED)
            h, w = frame.shape[:2]
            white = [255] * (frame.shape[2] if frame.ndim == 3 else 1)
            cv2.imwrite(str(root / folder / path.name),
                        cv2.copyMakeBorder(frame, top, top, left, left, cv2.BORDER_CONSTANT, value=white))
        lines = []
        for line in (pairs / "labels" / f"{path.stem}.txt").read_text().split("\n"):
            if line.strip():
                c, cx, cy, bw, bh = line.split()
                x, y = (float(cx) * w + left) / (w + 2 * left), (float(cy) * h + top) / (h + 2 * top)
                bw, bh = float(bw) * w / (w + 2 * left), float(bh) * h / (h + 2 * top)
                lines.append(f"{c} {x:.6f} {y:.6f} {bw:.6f} {bh:.6f}")
        (root / "labels" / f"{path.stem}.txt").write_text("\n".join(lines) + "\n")
    return root


def _trained(task, run_dir, config, *overrides):
    res = run_finetune_cli(task, run_dir, config, *overrides, "train.steps=4", "train.batch_size=2",
                           "eval.overlays=0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "without a checkpoint: the backbone starts from random init" in res.stderr  # said when it trains
    return json.loads((run_dir / "metrics.json").read_text())


def test_segmentation_masks_score_as_the_runs_evaluation(pairs, tmp_path, capsys, monkeypatch):
    import torch

    metrics = _trained("seg", tmp_path / "run", SEG, f"data.root={pairs}", "model.encoder.img_size=[64,80]")
    out = tmp_path / "pred"
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"),
                          "--out", str(out), "--overlays", "2"]) == 0
    said = capsys.readouterr()
    assert "seg: 6 of 6 frames predicted with step00000004" in said.out
    assert f"; masks in masks/, overlays and predict_report.json in {out}" in said.out
    assert "random init" not in said.err  # the trained weights are what predicts
    names = sorted(p.stem for p in (pairs / "ir").glob("*.png"))
    k = len(metrics["confusion_matrix"])
    cm = torch.zeros(k, k, dtype=torch.int64)
    for name in names:  # the run's validation split is every frame: the same confusion matrix
        mask = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        label = read_label_map(str(pairs / "masks" / f"{name}.png"))
        assert mask.shape == label.shape and mask.dtype == np.uint8
        cm += confusion_matrix(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(label.astype(np.int64)),
                               k, 255)
    assert cm.tolist() == metrics["confusion_matrix"]
    assert len(list((out / "overlays").glob("*.png"))) == 2
    report = json.loads((out / "predict_report.json").read_text())
    assert report["frames"] == names and report["checkpoint"] == "step00000004" and report["left_out"] == 0
    # again into the same folder, on two of the frames: the files of the first predict are named, not taken for its own
    for modality in ("ir", "vi"):
        (tmp_path / "two" / modality).mkdir(parents=True)
        for name in names[:2]:
            shutil.copy(pairs / modality / f"{name}.png", tmp_path / "two" / modality)
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(tmp_path / "two" / "ir"), "--vi",
                          str(tmp_path / "two" / "vi"), "--out", str(out), "--overlays", "0"]) == 0
    earlier = [f"masks/{name}.png" for name in names[2:]] + [f"overlays/{name}.png" for name in names[:2]]
    assert (f"note: {out} also holds 6 file(s) this predict did not write (an earlier one's, e.g. {earlier[0]})"
            in capsys.readouterr().err)
    report = json.loads((out / "predict_report.json").read_text())
    assert report["frames"] == names[:2] and report["earlier_files"] == earlier
    # a full disk while the masks are written (cv2.imwrite said it only by returning False): one line, no report
    with monkeypatch.context() as m:
        disk_full_when_saving(m, ".png.tmp")
        assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"),
                              "--out", str(tmp_path / "pred_full"), "--overlays", "0"]) == 2
    assert "error: a write failed (No space left on device" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "pred_full").rglob("*")] == ["masks"]

    # MFNet's packed 4-channel images (BGR + thermal as OpenCV writes them) give the same masks
    packed = tmp_path / "packed"
    packed.mkdir()
    for name in names:
        bgr = cv2.imread(str(pairs / "vi" / f"{name}.png"), cv2.IMREAD_COLOR)
        ir = cv2.imread(str(pairs / "ir" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(packed / f"{name}.png"), np.dstack([bgr, ir]))
    cv2.imwrite(str(packed / "rgb_only.png"), bgr)
    assert finetune_main(["predict", str(tmp_path / "run"), "--packed", str(packed), "--out",
                          str(tmp_path / "pred_packed"), "--overlays", "0"]) == 0
    for name in names:
        assert np.array_equal(cv2.imread(str(tmp_path / "pred_packed" / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED),
                              cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED))
    report = json.loads((tmp_path / "pred_packed" / "predict_report.json").read_text())
    assert report["issues_by_reason"] == {"wrong_channels": 1} and report["used"] == len(names)
    assert finetune_main(["predict", str(tmp_path / "run"), "--packed", str(packed), "--ir", str(pairs / "ir"),
                          "--out", str(tmp_path / "x")]) == 2
    assert "give the frames one way" in capsys.readouterr().err

    # frames it cannot use are named; a model of two modalities with infrared alone works
    frames = tmp_path / "frames"
    shutil.copytree(pairs / "ir", frames / "ir")
    shutil.copytree(pairs / "vi", frames / "vi")
    (frames / "ir" / f"{names[0]}.png").write_bytes(b"not a png")
    (frames / "vi" / f"{names[1]}.png").unlink()
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(frames / "ir"), "--vi", str(frames / "vi"),
                          "--out", str(tmp_path / "pred2")]) == 0
    report = json.loads((tmp_path / "pred2" / "predict_report.json").read_text())
    assert report["issues_by_reason"] == {"unreadable": 1, "missing_partner": 1} and report["used"] == 4
    assert len(list((tmp_path / "pred2" / "overlays").glob("*.png"))) == 4  # by default, of the first 8 frames
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(frames / "ir"),
                          "--out", str(tmp_path / "pred3")]) == 0
    assert len(list((tmp_path / "pred3" / "masks").glob("*.png"))) == 5
    assert finetune_main(["predict", str(tmp_path / "run"), "--vi", str(frames / "vi"),
                          "--out", str(tmp_path / "x")]) == 2
    assert "give --ir" in capsys.readouterr().err
    assert finetune_main(["predict", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2
    assert "error: give the frames: --ir DIR and / or --vi DIR, or --packed DIR" in capsys.readouterr().err
    assert finetune_main(["predict", str(tmp_path), "--ir", str(frames / "ir"), "--out", str(tmp_path / "x")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "x")]) == 2
    assert f"no image files in {tmp_path / 'empty'}" in capsys.readouterr().err and not (tmp_path / "x").exists()
    shutil.copytree(pairs / "ir", tmp_path / "empty" / "night")  # frames a folder down are named, not read
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(tmp_path / "empty"),
                          "--out", str(tmp_path / "x")]) == 2
    assert f"; {tmp_path / 'empty' / 'night'} holds 6 image files: frames are read from the folder named" in \
        capsys.readouterr().err
    model = tmp_path / "run" / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:-16])  # a damaged checkpoint: one line, no traceback
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(frames / "ir"),
                          "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (f"error: no usable checkpoint in {model.parent.parent}: step00000004: "
                                       f"{model.name} does not match its sha256 (corrupted or truncated)\n")


def test_one_folder_of_both_modalities_pairs_by_the_runs_name_suffixes(pairs, tmp_path, capsys):
    """FLIR-aligned keeps X_PreviewData (infrared) and X_RGB (visible) in one folder: predict pairs
    them as the run's data.name_suffixes say, never a file with itself."""
    import torch

    root = tmp_path / "flir"
    names = sorted(p.stem for p in (pairs / "ir").glob("*.png"))
    (root / "JPEGImages").mkdir(parents=True)
    for name in names:
        shutil.copy(pairs / "ir" / f"{name}.png", root / "JPEGImages" / f"{name}_PreviewData.png")
        shutil.copy(pairs / "vi" / f"{name}.png", root / "JPEGImages" / f"{name}_RGB.png")
    shutil.copytree(pairs / "masks", root / "masks")
    folder = str(root / "JPEGImages")
    metrics = _trained("seg", tmp_path / "run", SEG, f"data.root={root}", "data.dirs.ir=JPEGImages",
                       "data.dirs.vi=JPEGImages", "data.name_suffixes.ir=_PreviewData", "data.name_suffixes.vi=_RGB",
                       "model.encoder.img_size=[64,80]")
    out = tmp_path / "pred"
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", folder, "--vi", folder, "--out", str(out),
                          "--overlays", "0"]) == 0
    assert f"seg: {len(names)} of {len(names)} frames predicted" in capsys.readouterr().out
    k = len(metrics["confusion_matrix"])
    cm = torch.zeros(k, k, dtype=torch.int64)
    for name in names:  # the run's evaluation, frame by frame
        mask = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        label = read_label_map(str(root / "masks" / f"{name}.png"))
        cm += confusion_matrix(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(label.astype(np.int64)),
                               k, 255)
    assert cm.tolist() == metrics["confusion_matrix"]
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == names

    # training refuses one folder for both modalities when the suffixes cannot tell them apart
    res = run_finetune_cli("seg", tmp_path / "bad", SEG, f"data.root={root}", "data.dirs.ir=JPEGImages",
                           "data.dirs.vi=JPEGImages", "train.steps=1")
    assert res.returncode != 0 and "the infrared and visible frames are both read from" in res.stdout + res.stderr
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    shutil.copy(pairs / "ir" / f"{names[0]}.png", empty / "plain.png")
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(empty), "--vi", str(empty),
                          "--out", str(tmp_path / "x")]) == 2
    assert "ir files ending in '_PreviewData' or vi files ending in '_RGB'" in capsys.readouterr().err


def test_detections_are_the_runs_evaluation_detections(pairs, tmp_path, capsys, monkeypatch):
    # 4 steps from random init score every box low: keep them all, so that there is something to compare.
    # The frames come in a white frame that data.border_crop cuts off (10 px above and below, 20 left and
    # right); the 128x160 left fit the 96x128 input at 0.75: boxes are mapped back to the files' pixels.
    pairs = _bordered(pairs, tmp_path / "framed", 10, 20)
    _trained("det", tmp_path / "run", DET, f"data.root={pairs}", f"data.boxes.path={pairs / 'labels'}",
             "eval.every_steps=2", "model.head.score_threshold=0.0", "model.encoder.img_size=[96,128]",
             "data.border_crop=[10,20]")
    out = tmp_path / "pred"
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(pairs / "ir"), "--out", str(out)]) == 2
    assert "the run's detector takes infrared and visible frames" in capsys.readouterr().err  # it stacks both
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"),
                          "--out", str(out), "--checkpoint", "step00000004"]) == 0
    assert f"; detections.json, overlays and predict_report.json in {out}" in capsys.readouterr().out
    coco = json.loads((out / "detections.json").read_text())
    theirs = json.loads((tmp_path / "run" / "predictions.json").read_text())  # the last evaluation's
    assert [c["name"] for c in coco["categories"]] == ["person", "car"] and len(coco["images"]) == 6
    assert {(i["height"], i["width"]) for i in coco["images"]} == {(148, 200)}  # the files' own size

    def key(d):
        return (d["category_id"], *np.round(d["bbox"], 2), round(d["score"], 4))

    assert len(theirs) > 0 and sorted(map(key, coco["annotations"])) == sorted(map(key, theirs))
    corners = np.array([d["bbox"] for d in theirs])  # x y w h in the files' pixels, past the input's 96x128
    assert (corners[:, 0] + corners[:, 2]).max() > 20 + 128 and (corners[:, 1] + corners[:, 3]).max() > 10 + 96
    assert corners[:, 0].min() >= 20 and corners[:, 1].min() >= 10  # inside the picture, not the white frame
    assert (corners[:, 0] + corners[:, 2]).max() <= 20 + 160 and (corners[:, 1] + corners[:, 3]).max() <= 10 + 128
    median = float(np.median([d["score"] for d in theirs]))
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"),
                          "--out", str(tmp_path / "sure"), "--checkpoint", "step00000004",
                          "--min-score", str(median)]) == 0
    sure = json.loads((tmp_path / "sure" / "detections.json").read_text())["annotations"]
    assert 0 < len(sure) < len(theirs)
    assert sorted(map(key, sure)) == sorted(key(d) for d in theirs if d["score"] >= median)
    # by default the run's best checkpoint, which periodic evaluation kept
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"),
                          "--out", str(tmp_path / "pred_best"), "--overlays", "0"]) == 0
    assert "6 of 6 frames predicted with best of" in capsys.readouterr().out
    assert json.loads((tmp_path / "pred_best" / "predict_report.json").read_text())["checkpoint"] == "best"
    assert not (tmp_path / "pred_best" / "overlays").exists()
    # a full disk while the detections are written: said in one line, no half file, no report
    disk_full_when_saving(monkeypatch, "/detections.json.tmp")
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"),
                          "--out", str(tmp_path / "pred_full"), "--overlays", "0"]) == 2
    assert "error: a write failed (No space left on device" in capsys.readouterr().err
    assert os.listdir(tmp_path / "pred_full") == []


def test_ctrl_c_during_predict_is_one_line(tmp_path, monkeypatch, capsys):
    import finetune.predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.predict, "predict_run", interrupted)
    assert finetune_main(["predict", str(tmp_path / "run"), "--ir", str(tmp_path), "--out", str(tmp_path / "p")]) == 130
    assert capsys.readouterr().err == "interrupted\n"
