"""Refusals of the smaller commands and helpers: each names what is wrong."""
import argparse
import contextlib
import errno
import os

import cv2
import numpy as np
import pytest

from data_tools.config import CONFIG_DIR, load_config
from data_tools.synth import SynthConfig, write_corpus


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
    (tmp_path / "Seq" / "day1").mkdir(parents=True)  # frames a folder further down: said where
    cv2.imwrite(str(tmp_path / "Seq" / "day1" / "0.png"), np.zeros((4, 4), np.uint8))
    assert data_main(["split", "--root", str(tmp_path), "--images", "Seq"]) == 2
    assert (f"{tmp_path / 'Seq'} holds 0 image(s): nothing to split; {tmp_path / 'Seq' / 'day1'} holds 1 image "
            "files: frames are read from the folder named, not its subfolders" in capsys.readouterr().err)


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


def test_detection_without_a_boxes_path_is_refused_before_training_as_the_check_refuses_it(tmp_path, capsys):
    """The tiny detection config names no boxes (run.sh passes the synthetic corpus's): run by hand
    on a data.root alone, training ended in a traceback (`annotation path does not exist: None`)."""
    from finetune.cli import main as finetune_main

    write_corpus(tmp_path / "syn", SynthConfig(num_images=4, width=80, height=64))
    args = ["--config", str(CONFIG_DIR / "finetune" / "det_tiny.yaml"), f"data.root={tmp_path / 'syn'}"]
    for command in (["check"], ["det", "--run-dir", str(tmp_path / "run")]):
        assert finetune_main(command + args) == 2
        err = capsys.readouterr().err
        assert "det_tiny.yaml (train): data.boxes.path is not set (the boxes: a COCO JSON file" in err, err
    assert not (tmp_path / "run").exists()
    assert finetune_main(["check", *args, "data.boxes.path=labels"]) == 0


def test_check_refuses_an_init_checkpoint_that_is_not_there_as_training_would(tmp_path, capsys):
    """`finetune check` before a long job says what the job would say at its start."""
    from finetune.cli import main as finetune_main

    write_corpus(tmp_path / "syn", SynthConfig(num_images=4, width=80, height=64))
    args = ["check", "--config", str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"), f"data.root={tmp_path / 'syn'}"]
    assert finetune_main(args) == 0
    assert finetune_main(args + [f"init.checkpoint={tmp_path / 'backbone.pth'}"]) == 2
    assert f"init.checkpoint {tmp_path / 'backbone.pth'}: no such file" in capsys.readouterr().err
    # run.sh checks before pre-training the export its fine-tuning stages will be given
    later = ["check", "--init-written-later", *args[1:], f"init.checkpoint={tmp_path / 'backbone.pth'}"]
    assert finetune_main(later) == 0
    (tmp_path / "weights").mkdir()
    assert finetune_main(args + [f"init.checkpoint={tmp_path / 'weights'}"]) == 2
    assert "init.checkpoint: " in capsys.readouterr().err
    # run.sh's embedded default: its frames are what the synth stage writes; the rest is checked
    unborn = ["check", "--init-written-later", "--config", str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
              f"data.root={tmp_path / 'synth_later'}", f"init.checkpoint={tmp_path / 'backbone.pth'}"]
    assert finetune_main(unborn) == 2
    assert f"{tmp_path / 'synth_later'}" in capsys.readouterr().err
    assert finetune_main(unborn[:1] + ["--data-written-later"] + unborn[1:]) == 0
    assert f"its frames under {tmp_path / 'synth_later'} are not looked at (written later)" in capsys.readouterr().out
    assert finetune_main(unborn[:1] + ["--data-written-later"] + unborn[1:] + ["train.batch_size=1"]) == 2
    assert "train.batch_size=1 with one process" in capsys.readouterr().err


def test_check_says_which_validation_frames_the_backbone_was_pre_trained_on(tmp_path, monkeypatch, capsys):
    """An export names the corpus it was pre-trained on (shard folders, their sources' roots and globs):
    validation frames among them are said before fine-tuning (self-supervised, but not a clean benchmark)."""
    import json

    from finetune.cli import main as finetune_main
    from tests.conftest import tiny_pad_export

    write_corpus(tmp_path / "syn", SynthConfig(num_images=9, width=80, height=64))
    val = (tmp_path / "syn" / "val.txt").read_text().split()
    init = tiny_pad_export(tmp_path / "export", depth=2)
    meta_path = tmp_path / "export" / "backbone.json"
    meta = json.loads(meta_path.read_text())
    args = ["check", "--config", str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"), f"data.root={tmp_path / 'syn'}",
            f"init.checkpoint={init}", "model.method=pad", "model.modality=ir", "data.train_split=train.txt",
            "data.val_split=val.txt"]

    def said_with(*sources):
        corpus = [{"shards": str(tmp_path / "shards"), "sources": list(s) if s is not None else None} for s in sources]
        meta_path.write_text(json.dumps(dict(meta, pretraining_corpus=corpus)))
        assert finetune_main(args) == 0
        return capsys.readouterr().err

    ir = str(tmp_path / "syn" / "ir")
    err = said_with([{"name": "cam", "root": ir, "globs": ["*.png"]}])
    assert (f"note: {args[2]} (val): {len(val)} of its {len(val)} frames are among those {init} was pre-trained "
            f"on ({len(val)} under source 'cam'): the backbone may have seen them") in err
    assert err.count("note:") == 1  # the evaluation frames: pre-training on the training frames is no leak
    day = sum(name.endswith("D") for name in val)
    assert 0 < day < len(val)  # the globs count: night frames (N) left out of pre-training
    assert f"{day} of its {len(val)} frames are among" in said_with([{"name": "cam", "root": ir, "globs": ["*D.png"]}])
    strided = said_with([{"name": "cam", "root": ir, "globs": ["*.png"], "stride": 10}])  # SCUT FIR's, LSOTB's
    assert f"({len(val)} under source 'cam', which read 1 in 10 of each folder)" in strided
    monkeypatch.setenv("RANK", "1")  # every process of a launch checks; the first says it
    assert "note:" not in said_with([{"name": "cam", "root": ir, "globs": ["*.png"]}])
    monkeypatch.delenv("RANK")
    for sources in ([{"name": "cam", "root": str(tmp_path / "other"), "globs": ["**/*"]}], None):
        assert "note:" not in said_with(sources)  # elsewhere; a manifest not readable at export
    meta_path.write_text(json.dumps(meta))  # an export of an earlier version says nothing of its corpus
    assert finetune_main(args) == 0 and "note:" not in capsys.readouterr().err


def test_pretrain_check_refuses_what_training_would_refuse_at_its_start(tmp_path, capsys):
    """`pretrain check` (run.sh: before the shard build) says what `pretrain train` would say before it
    touches its run directory: a key the config lacks, an init.checkpoint that is not there, a global
    batch the processes cannot split; the shards are not looked at (not built yet)."""
    from pretrain.cli import main as pretrain_main

    vitb = ["check", "--config", str(CONFIG_DIR / "pretrain" / "pad_vitb.yaml"), f"data.shards=[{{path: {tmp_path}}}]"]
    assert pretrain_main(vitb + ["--processes", "8"]) == 0
    assert capsys.readouterr().out.endswith("pad_vitb.yaml: config fits its schema; global batch 4096 = 64 x 8 "
                                            "accumulation x 8 processes\n")
    assert pretrain_main(vitb + ["--processes", "3"]) == 2
    assert "error: effective_batch 4096 is not a multiple of batch_size 64 x 3 processes" in capsys.readouterr().err
    assert pretrain_main(vitb + ["train.epoch=3"]) == 2
    assert "has no key 'train.epoch' (did you mean 'train.epochs'?)" in capsys.readouterr().err
    assert pretrain_main(vitb + ["train.epochs=0"]) == 2
    assert "does not fit its schema (PretrainConfig):\n  train.epochs: Input should be greater than 0" in \
        capsys.readouterr().err
    assert pretrain_main(vitb + [f"init.checkpoint={tmp_path / 'mae.pth'}"]) == 2
    assert f"error: init.checkpoint {tmp_path / 'mae.pth'}: no such file" in capsys.readouterr().err
    (tmp_path / "mae.pth").write_bytes(b"")
    assert pretrain_main(vitb + [f"init.checkpoint={tmp_path / 'mae.pth'}"]) == 0
    assert f"init.checkpoint {tmp_path / 'mae.pth'} is there; global batch 4096" in capsys.readouterr().out
    assert pretrain_main(vitb + [f"init.checkpoint={tmp_path}"]) == 2
    assert "error: init.checkpoint: " in capsys.readouterr().err
    tiny = ["check", "--config", str(CONFIG_DIR / "pretrain" / "tiny.yaml"), "--processes", "3"]
    assert pretrain_main(tiny) == 0 and capsys.readouterr().out.endswith("tiny.yaml: config fits its schema\n")
    assert pretrain_main(tiny + ["train.effective_batch=8"]) == 2  # 8 frames over 3 processes of 4
    assert "effective_batch 8 is not a multiple of batch_size 4 x 3 processes" in capsys.readouterr().err


def test_rollback_without_any_checkpoint_stops_with_the_reason(tmp_path):
    from pretrain.engine import Checkpointer
    from pretrain.engine.loop import _roll_back

    with pytest.raises(FloatingPointError, match="non-finite loss at step 3 and no checkpoint yet to roll back to"):
        _roll_back(Checkpointer(tmp_path / "checkpoints"), engine=None, rank=0, step=3)


def test_segmentation_on_one_frame_per_process_is_refused_before_the_run_starts(tmp_path, capsys):
    """UPerNet's pyramid pooling normalises a 1x1 map with BatchNorm: one frame per step cannot
    train (PyTorch raised a 90-line traceback after the run directory was set up). Refused by the
    check and by the run itself before anything is written, unless SyncBatchNorm pools several GPUs."""
    import torch

    from finetune.cli import main as finetune_main
    from finetune.factory import build_segmentor
    from finetune.preflight import check_batch

    seg = load_config(CONFIG_DIR / "finetune" / "seg_tiny.yaml",
                      ["train.batch_size=1", "model.method=full", "model.modality=ir"])
    model = build_segmentor(seg).train()
    frames = torch.zeros(2, 1, *seg.model.encoder.img_size)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(frames[:1], None, torch.zeros(1, *seg.model.encoder.img_size, dtype=torch.long))
    model(frames, None, torch.zeros(2, *seg.model.encoder.img_size, dtype=torch.long))  # two frames train

    with pytest.raises(ValueError, match=r"seg: train.batch_size=1 with one process: .* Set train.batch_size=2"):
        check_batch(seg, "seg")
    with pytest.raises(ValueError, match="with 2 CPU processes, whose BatchNorm is not synchronised"):
        check_batch(seg, "seg", processes=2, cuda=False)
    check_batch(seg, "seg", processes=2, cuda=True)  # SyncBatchNorm: two frames per step over the GPUs
    check_batch(load_config(CONFIG_DIR / "finetune" / "seg_tiny.yaml", ["train.batch_size=2"]), "seg")
    check_batch(load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml", ["train.batch_size=1"]), "det")
    from finetune.preflight import check_run

    # an evaluation alone trains nothing: no batch rule, on to its inputs
    with pytest.raises(ValueError, match="seg: data.root is not set"):
        check_run(seg, "seg", splits=("val",))
    # the run's own check counts the processes from the launcher's variables, as the process group will
    from pretrain.engine import launched_world_size

    assert launched_world_size({}) == 1 and launched_world_size({"RANK": "3", "WORLD_SIZE": "8"}) == 8
    assert launched_world_size({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == 4  # srun
    assert launched_world_size({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == 2
    from pretrain.engine.distributed import launched_rank

    assert launched_rank({}) == 0 and launched_rank({"RANK": "3", "WORLD_SIZE": "8"}) == 3
    assert launched_rank({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}) == 2  # srun
    assert launched_rank({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == 1

    config = str(CONFIG_DIR / "finetune" / "seg_tiny.yaml")
    assert finetune_main(["check", "--config", config, f"data.root={tmp_path}", "train.batch_size=1"]) == 2
    assert "train.batch_size=1 with one process" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert finetune_main(["check", "--processes", "4", "--config", config, f"data.root={tmp_path}",
                              "train.batch_size=1"]) == 2
        assert "with 4 CPU processes" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert finetune_main(["seg", "--config", config, "--run-dir", str(run_dir), f"data.root={tmp_path}",
                          "train.batch_size=1"]) == 2
    assert "train.batch_size=1 with one process" in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_file_given_where_a_folder_is_expected_is_named_as_a_file(tmp_path, capsys):
    """One frame, a video or an archive given as the frames' folder was reported as a folder that
    does not exist; each command now says it is a file and names the folder holding it."""
    from data_tools.cli import main as data_main
    from finetune.cli import main as finetune_main
    from finetune.data.pairs import list_images

    frame = tmp_path / "cam" / "f0.png"
    frame.parent.mkdir()
    cv2.imwrite(str(frame), np.zeros((8, 8), np.uint8))
    said = f"{frame} is a file where a folder is expected (the folder holding it: {frame.parent})"
    assert data_main(["build", "--source", f"cam={frame}", "--out", str(tmp_path / "shards")]) == 2
    assert f"source 'cam': root {said}" in capsys.readouterr().err
    assert data_main(["split", "--root", str(tmp_path), "--images", "cam/f0.png"]) == 2
    assert said in capsys.readouterr().err
    assert finetune_main(["check", "--config", str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                          f"data.root={frame}"]) == 2
    assert f"data.root {said}" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="is a file where a folder is expected"):
        list_images(frame)  # predict's --ir / --vi
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_images(tmp_path / "absent")


def test_preview_and_summary_of_a_folder_that_is_not_theirs_say_so(tmp_path, capsys):
    """preview of a folder without shards raised a traceback; summary of a run folder that is not
    there said the run had not finished."""
    from data_tools.cli import main as data_main
    from finetune.cli import main as finetune_main

    assert data_main(["preview", str(tmp_path), "--out", str(tmp_path / "grid.png")]) == 2
    assert f"{tmp_path}: no manifest.json (not a shard folder" in capsys.readouterr().err
    assert finetune_main(["summary", str(tmp_path / "absent")]) == 2
    assert f"{tmp_path / 'absent'}: no such run folder" in capsys.readouterr().err
    assert finetune_main(["summary", str(tmp_path)]) == 2
    assert "no metrics.json (the run has not finished" in capsys.readouterr().err


@pytest.mark.parametrize("argv,said", [
    (["proposals-eval", "--every", "0"], "argument --every: must be at least 1, got 0"),  # was a ZeroDivisionError
    (["proposals-eval", "--min-object-side", "-1"], "argument --min-object-side: must be at least 0, got -1"),
    (["synth", "--out", "X", "--width", "8"], "argument --width: must be at least 16, got 8"),  # OpenCV / numpy raised
    (["synth", "--out", "X", "--num", "two"], "argument --num: invalid integer value: 'two'"),
    (["reencode", "X", "--out", "Y", "--encoding", "png", "--png-compression", "12"],
     "argument --png-compression: must be from 0 to 9, got 12"),
    (["build", "--source", "a=X", "--out", "Y", "--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["predict", "X", "--ir", "X", "--out", "Y", "--min-score", "2"],  # scores are 0-1: every box was dropped
     "argument --min-score: must be from 0.0 to 1.0, got 2.0"),
    (["check", "--processes", "0"], "argument --processes: must be at least 1, got 0"),
])
def test_numbers_out_of_range_are_refused_by_the_argument_parser(argv, said, tmp_path, capsys):
    from data_tools.cli import main as data_main
    from finetune.cli import main as finetune_main

    main = finetune_main if argv[0] in ("predict", "check") else data_main
    with pytest.raises(SystemExit) as e:
        main([a.replace("X", str(tmp_path / "x")).replace("Y", str(tmp_path / "y")) for a in argv])
    assert e.value.code == 2 and said in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_held_out_split_needs_an_offset_below_every(tmp_path, capsys):
    from data_tools.cli import main as data_main

    frames = tmp_path / "f"
    frames.mkdir()
    cv2.imwrite(str(frames / "a.png"), np.zeros((64, 64), np.uint8))
    (frames / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    sources = tmp_path / "s.yaml"
    sources.write_text(f"sources:\n  - name: a\n    root: {frames}\n    boxes: {{format: yolo, path: {frames}}}\n")
    for command in (["proposals-eval"], ["proposals-fit", "--out", str(tmp_path / "r.json")]):
        assert data_main([*command, "--sources", str(sources), "--every", "2", "--offset", "2"]) == 2
        assert "--every 2 --offset 2: frames i with i % every == offset need" in capsys.readouterr().err


def test_jpeg_label_maps_are_refused_and_jpeg_binary_masks_thresholded(tmp_path, capsys):
    """JPEG changes class indices along every edge: a multi-class dataset of JPEG label maps lost
    3 of 4 frames to 'unknown values' and trained the rest on wrong edges, unsaid; binary masks read
    '> 0' turned JPEG's ringing into more false target pixels than there were target pixels."""
    from data_tools.annotations import boxes_from_mask
    from data_tools.build import frame_annotation_boxes
    from data_tools.imageio import read_label_map
    from data_tools.sources import Source
    from finetune.cli import main as finetune_main
    from finetune.data.pairs import PairRecord
    from finetune.data.seg import SegDataSpec, SegDataset
    from tests.conftest import shared_path

    write_corpus(tmp_path / "synth", SynthConfig(num_images=4, width=160, height=128))
    for mask in (tmp_path / "synth" / "masks").glob("*.png"):
        cv2.imwrite(str(mask.with_suffix(".jpg")), cv2.imread(str(mask), cv2.IMREAD_UNCHANGED))
        mask.unlink()
    config = str(CONFIG_DIR / "finetune" / "seg_tiny.yaml")
    assert finetune_main(["check", "--config", config, f"data.root={tmp_path / 'synth'}"]) == 2
    assert "its label maps are JPEG (4 of the first 4" in capsys.readouterr().err
    assert finetune_main(["check", "--config", config, f"data.root={tmp_path / 'synth'}", "data.binary_labels=true",
                          "data.classes=[background,object]", "model.head.class_weight=null"]) == 0

    records, truth = [], []
    for i, png in enumerate(sorted(shared_path("sirst", "masks").glob("*_pixels0.png"))[:12]):
        truth.append(read_label_map(str(png)) > 0)
        jpeg = tmp_path / f"m{i}.jpg"
        cv2.imwrite(str(jpeg), (truth[-1] * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 75])
        assert ((read_label_map(str(jpeg)) > 0) != truth[-1]).any() or not truth[-1].any()  # JPEG's ringing
        records.append(PairRecord(f"m{i}", label=str(jpeg)))
    dataset = SegDataset(records, SegDataSpec(num_classes=2, binary_labels=True))
    for i, target in enumerate(truth):
        assert np.array_equal(dataset._label(records[i]), target.astype(np.int64))
        # the build's boxes from a source's masks read a JPEG mask the same way
        h, w = target.shape
        boxes, _ = frame_annotation_boxes([], records[i].label, w, h, Source("m", str(tmp_path)), "f.png")
        assert np.array_equal(boxes, boxes_from_mask(target))


def test_pretraining_needs_its_shard_folders_each_once(tmp_path, capsys):
    """An empty data.shards (the shipped configs' default) said '0 samples per epoch cannot fill
    one batch'; a folder listed twice was read twice per epoch, unsaid."""
    from data_tools.build import build_shards
    from data_tools.cli import DEFAULT_BUILD_CONFIG
    from data_tools.sources import load_sources
    from pretrain.cli import main as pretrain_main

    write_corpus(tmp_path / "synth", SynthConfig(num_images=4, width=64, height=64))
    build_shards(load_sources(tmp_path / "synth" / "sources.yaml"), load_config(DEFAULT_BUILD_CONFIG),
                 tmp_path / "shards", progress=False)
    train = ["train", "--config", str(CONFIG_DIR / "pretrain" / "tiny.yaml"), "--run-dir", str(tmp_path / "run")]
    assert pretrain_main([*train, "data.shards=[]"]) == 2
    assert 'data.shards is empty: name the folders `python -m data_tools build` wrote' in capsys.readouterr().err
    shards = tmp_path / "shards"
    assert pretrain_main([*train, f"data.shards=[{{path: {shards}}}, {{path: {shards}/, weight: 2}}]"]) == 2
    assert f"data.shards[0] and data.shards[1] are the same folder {shards}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_each_command_says_which_of_our_folders_it_was_given(tmp_path, capsys):
    """A pre-training run given to `finetune predict` (or `finetune summary --predict-command`) raised
    a traceback about a missing config key, a fine-tuning run given to `pretrain export` one about
    unknown MAE keys, `pretrain summary` of a fine-tuning run printed a pre-training line, and a run
    folder as `init.checkpoint` a traceback: each now says what the folder is and what to give."""
    from data_tools.cli import main as data_main
    from data_tools.config import save_resolved
    from finetune.cli import main as finetune_main
    from pretrain.cli import main as pretrain_main

    shards, pre, seg, det = (tmp_path / n for n in ("shards", "pre", "seg", "det"))
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "f0.png"), np.random.default_rng(0).integers(0, 255, (96, 128), np.uint8))
    assert data_main(["build", "--source", f"cam={frames}", "--out", str(shards)]) == 0
    save_resolved(load_config(CONFIG_DIR / "pretrain" / "tiny.yaml"), pre)  # what each run saves first
    save_resolved(load_config(CONFIG_DIR / "finetune" / "seg_tiny.yaml", ["data.root=/data"]), seg)
    save_resolved(load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml", ["data.root=/data"]), det)
    (pre / "checkpoints" / "step00000004").mkdir(parents=True)
    capsys.readouterr()

    for argv in (["predict", str(pre), "--ir", str(frames), "--out", str(tmp_path / "p")],
                 ["summary", str(pre)], ["summary", "--predict-command", str(pre)]):
        assert finetune_main(argv) == 2
        assert (f"{pre} is a pre-training run, not a fine-tuning run (python -m pretrain export {pre} --out "
                "backbone.pth makes the backbone") in capsys.readouterr().err
    assert finetune_main(["predict", str(shards), "--ir", str(frames), "--out", str(tmp_path / "p")]) == 2
    assert f"{shards} is a shard folder (data_tools build), not a fine-tuning run" in capsys.readouterr().err
    assert data_main(["build", "--source", f"again={shards}", "--out", str(tmp_path / "again")]) == 2
    assert (f"under {shards}: it is a shard folder (data_tools build), which pre-training reads as it is: "
            f"data.shards=[{{path: {shards}}}]") in capsys.readouterr().err
    for run, what in ((seg, "a segmentation fine-tuning run"), (det, "a detection fine-tuning run")):
        for argv in (["export", str(run), "--out", str(tmp_path / "b.pth")], ["summary", str(run)]):
            assert pretrain_main(argv) == 2
            assert (f"{run} is {what}, not a pre-training run (python -m finetune predict {run} applies it"
                    in capsys.readouterr().err)

    seg_cli = ["seg", "--config", str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"), "--run-dir", str(tmp_path / "r"),
               f"data.root={tmp_path}"]
    assert finetune_main(seg_cli + [f"init.checkpoint={pre}"]) == 2
    assert (f"{pre} is a pre-training run, not a weights file: export its backbone first (python -m pretrain "
            f"export {pre} --out backbone.pth)") in capsys.readouterr().err
    step = pre / "checkpoints" / "step00000004"
    assert finetune_main(seg_cli + [f"init.checkpoint={step}"]) == 2
    assert (f"a checkpoint of the pre-training run {pre}, not a weights file: export its backbone first (python -m "
            f"pretrain export {pre} --tag step00000004 --out backbone.pth)") in capsys.readouterr().err
    assert finetune_main(seg_cli + [f"init.checkpoint={seg}"]) == 2
    assert f"{seg} is a segmentation fine-tuning run, not weights" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,said", [
    (["build", "--source", "a=D", "--out", "F"], "argument --out: F is a file where a folder is expected"),
    (["proposals-eval", "--out", "F"], "argument --out: F is a file where a folder is expected"),
    (["synth", "--out", "F"], "argument --out: F is a file where a folder is expected"),
    (["reencode", "D", "--out", "F", "--encoding", "png"], "argument --out: F is a file where a folder is expected"),
    (["predict", "D", "--ir", "D", "--out", "F"], "argument --out: F is a file where a folder is expected"),
    (["seg", "--run-dir", "F"], "argument --run-dir: F is a file where a folder is expected"),
    (["train", "--run-dir", "F"], "argument --run-dir: F is a file where a folder is expected"),
    (["preview", "D", "--out", "D/grid"], "argument --out: D/grid: give a .png / .jpg / .jpeg file, or a folder"),
    (["proposals-fit", "--out", "D/ranker.txt"], "argument --out: D/ranker.txt: give a .json file, or a folder"),
])
def test_an_output_of_the_wrong_kind_is_refused_before_any_work(argv, said, tmp_path, capsys):
    """A file given where an output folder goes raised FileExistsError after the work (proposals-fit:
    minutes of fitting; a run directory: after the start-up); preview's grid without an image extension an OpenCV error, a ranker written
    to a folder IsADirectoryError."""
    from data_tools.cli import main as data_main
    from finetune.cli import main as finetune_main
    from pretrain.cli import main as pretrain_main

    (tmp_path / "D").mkdir()
    (tmp_path / "F").write_text("a file\n")
    main = {"predict": finetune_main, "seg": finetune_main, "train": pretrain_main,
            "export": pretrain_main}.get(argv[0], data_main)
    with pytest.raises(SystemExit) as e:
        main([a.replace("D", str(tmp_path / "D")).replace("F", str(tmp_path / "F")) for a in argv])
    assert e.value.code == 2 and said.replace("D", str(tmp_path / "D")).replace("F", str(tmp_path / "F")) in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["build", "--source", "a=D", "--out", "R/shards"], "--out"), (["train", "--run-dir", "R/run"], "--run-dir"),
    (["seg", "--run-dir", "R"], "--run-dir"), (["predict", "D", "--ir", "D", "--out", "R/pred"], "--out"),
    (["proposals-fit", "--out", "R"], "--out"), (["export", "D", "--out", "R/b.pth"], "--out")])
def test_an_output_this_user_cannot_write_is_refused_before_any_work(argv, option, tmp_path, monkeypatch, capsys):
    """An output folder under a folder the user may not write (another user's, a read-only mount)
    ended the build and a run's start in a PermissionError traceback."""
    import os

    from data_tools.cli import main as data_main
    from finetune.cli import main as finetune_main
    from pretrain.cli import main as pretrain_main

    (tmp_path / "D").mkdir()
    (tmp_path / "R").mkdir()
    locked = str(tmp_path / "R")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != locked and access(path, mode))
    main = {"predict": finetune_main, "seg": finetune_main, "train": pretrain_main,
            "export": pretrain_main}.get(argv[0], data_main)
    with pytest.raises(SystemExit) as e:
        main([a.replace("D", str(tmp_path / "D")).replace("R", locked) for a in argv])
    out = argv[argv.index(option) + 1].replace("R", locked)
    if argv[0] == "proposals-fit":
        out += "/ranker.json"
    where = "it" if out == locked else f"{locked} (where it would go)"
    assert e.value.code == 2 and (f"argument {option}: {out}: this user cannot write {where}: no permission, or a "
                                  "read-only mount; choose another place") in capsys.readouterr().err


def test_a_folder_given_for_an_output_file_takes_its_usual_name(tmp_path):
    from data_tools.config import out_file

    (tmp_path / "exports").mkdir()
    assert out_file("preview.png", (".png",))(str(tmp_path / "exports")) == str(tmp_path / "exports" / "preview.png")
    assert out_file("preview.png", (".png",))(str(tmp_path / "grid.PNG")) == str(tmp_path / "grid.PNG")
    # a folder not there yet, said as one by its final slash (a file of that name was written before)
    assert out_file("backbone.pth", (".pth",))(str(tmp_path / "new") + "/") == str(tmp_path / "new" / "backbone.pth")
    with pytest.raises(argparse.ArgumentTypeError, match=r"new: give a .pth / .pt file, or a folder for its backbone"):
        out_file("backbone.pth", (".pth", ".pt"))(str(tmp_path / "new"))


@pytest.mark.parametrize("command", ["data_tools synth", "finetune predict", "pretrain export"])
def test_a_full_disk_under_a_command_is_one_line_and_other_os_errors_keep_their_traceback(command, tmp_path,
                                                                                          monkeypatch, capsys):
    import errno

    import data_tools.synth
    import finetune.predict
    import pretrain.export
    from data_tools.cli import main as data_main
    from finetune.cli import main as finetune_main
    from pretrain.cli import main as pretrain_main

    def fails(*args, **kwargs):
        raise error

    if command == "data_tools synth":
        monkeypatch.setattr(data_tools.synth, "write_corpus", fails)
        main, argv = data_main, ["synth", "--out", str(tmp_path / "synth")]
    elif command == "finetune predict":
        monkeypatch.setattr(finetune.predict, "predict_run", fails)
        main, argv = finetune_main, ["predict", str(tmp_path), "--ir", str(tmp_path), "--out", str(tmp_path / "p")]
    else:
        monkeypatch.setattr(pretrain.export, "export_run", fails)
        main, argv = pretrain_main, ["export", str(tmp_path), "--out", str(tmp_path / "backbone.pth")]
    written = tmp_path / "out" / "a.png"
    error = OSError(errno.ENOSPC, "No space left on device", str(written))
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: a write failed (No space left on device: {written}): free space "
                                       "(or write elsewhere) and run again\n")
    error = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(PermissionError):
        main(argv)


@pytest.mark.parametrize("signals, verdicts, said_as", [
    ("SIGINT SIGTERM SIGINT", "first again second", "SIGINT"),
    ("SIGTERM SIGINT SIGTERM SIGINT", "first again again second", "SIGINT"),  # run.sh's pass-on of a Ctrl-C first
    ("SIGTERM SIGUSR1 SIGHUP SIGTERM", "first again again again", "SIGTERM"),
    ("SIGUSR1 SIGTERM", "first again", "SIGUSR1")])
def test_stop_requests_are_one_request_until_a_second_ctrl_c(signals, verdicts, said_as):
    """A Ctrl-C or a scheduler's stop reaches a process from the process group and passed on by
    run.sh or a launcher, in either order; only a Ctrl-C after a Ctrl-C asks for more."""
    import signal

    from data_tools.command import StopRequests

    requests = StopRequests()
    taken = [requests.take(signal.Signals[name]) for name in signals.split()]
    assert taken == [{"first": StopRequests.FIRST, "again": StopRequests.AGAIN,
                      "second": StopRequests.SECOND_CTRL_C}[v] for v in verdicts.split()]
    assert requests.signum == signal.Signals[said_as]


@pytest.mark.parametrize("first, again, status, said", [
    ("SIGTERM", "SIGTERM", 143, "stopped by SIGTERM: what it finished is kept"),
    ("SIGUSR1", "SIGTERM", 138, "stopped by SIGUSR1: what it finished is kept"),
    ("SIGHUP", "SIGTERM", 129, "stopped by SIGHUP: what it finished is kept"),
    ("SIGINT", "SIGTERM", 130, "interrupted: what it finished is kept"),
    ("SIGTERM", "SIGINT", 130, "interrupted: what it finished is kept"),  # run.sh's pass-on handled first
    ("SIGINT", "SIGINT", 130, "interrupted")])
def test_a_stop_signal_ends_a_command_as_ctrl_c_does_and_the_same_request_again_is_one(first, again, status, said,
                                                                                     tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM or a preemption notice (SIGUSR1) ended a command at once, unsaid, past
    the Ctrl-C path that keeps what it finished; now they take that path, with the shell's status for
    the signal. A process group's signal and run.sh's pass-on of it reach a command both, in either
    order: a SIGTERM after a stop request, or a Ctrl-C after a SIGTERM, is the same request (dropped;
    a Ctrl-C said as one); a second Ctrl-C still stops at once."""
    import os
    import signal
    import time

    import data_tools.synth
    from data_tools.cli import main
    from data_tools.command import Interrupted

    def stopped(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.Signals[first])
            time.sleep(5)  # the handler raises within it
            raise AssertionError("not stopped")
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.Signals[again])
            time.sleep(0.1)
            raise Interrupted("what it finished is kept") from None

    from data_tools.command import STOP_SIGNALS

    if signal.Signals[first] not in STOP_SIGNALS:
        pytest.skip("the test run started with SIGHUP ignored (nohup): it stays ignored, as asked")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    monkeypatch.setattr(data_tools.synth, "write_corpus", stopped)
    assert main(["synth", "--out", str(tmp_path / "synth")]) == status
    assert capsys.readouterr().err == said + "\n"
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the command's handlers are gone


@pytest.mark.parametrize("env,stops", [({}, False), ({"IRPT_HANGUP_STOPS": "1"}, True)])
def test_a_hang_up_ignored_at_start_stays_ignored_unless_the_launcher_says_otherwise(env, stops):
    """`nohup` (SIGHUP ignored when the process starts): the user asked the command to outlive its terminal.
    The DeepSpeed launcher ignores it for its own per-node launcher and sets IRPT_HANGUP_STOPS=1."""
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT

    environment = {k: v for k, v in os.environ.items() if k != "IRPT_HANGUP_STOPS"}
    said = subprocess.run(
        [sys.executable, "-c", "import signal; from data_tools.command import STOP_SIGNALS; "
                               "print(signal.SIGHUP in STOP_SIGNALS)"],
        cwd=ROOT, env={**environment, **env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert said.stdout.strip() == str(stops)


@pytest.mark.parametrize("error,redirected", [(errno.EIO, [2]), (errno.EPIPE, []), (None, [])])
def test_only_a_terminal_that_hung_up_is_left_for_dev_null(monkeypatch, error, redirected):
    """After an ssh connection drops every write to its terminal fails with EIO: stdout and stderr
    then go to /dev/null; a closed pipe (EPIPE) or a working output stays where it goes."""
    from data_tools import command

    moved = []

    def write(fd, data):
        if fd == 2 and error is not None:
            raise OSError(error, os.strerror(error))
        return 0

    monkeypatch.setattr(command.os, "write", write)
    monkeypatch.setattr(command.os, "dup2", lambda source, fd: moved.append(fd))
    command.leave_a_hung_up_terminal()
    assert moved == redirected


def test_a_stop_signal_leaves_a_hung_up_terminal_before_anything_is_said(monkeypatch):
    import signal

    from data_tools import command

    calls = []
    monkeypatch.setattr(command, "leave_a_hung_up_terminal", lambda: calls.append("left"))
    stop = command._StopAsCtrlC()
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGHUP, None)
    stop(signal.SIGTERM, None)  # the same request again: dropped, but the terminal is checked again
    assert calls == ["left", "left"]


def test_a_command_run_outside_the_main_thread_sets_no_signal_handlers():
    """A notebook or a GUI running a command in a worker thread: signal.signal would raise there."""
    import argparse
    import threading

    from data_tools.command import run_command

    results = []
    command = lambda: results.append(run_command(lambda a: a.value, argparse.Namespace(value=7)))  # noqa: E731
    worker = threading.Thread(target=command)
    worker.start()
    worker.join()
    assert results == [7]


def test_a_fifo_or_folder_named_like_a_frame_or_label_file_is_not_read(tmp_path):
    """A FIFO named like a frame or a label file made building a fine-tuning split wait forever (its
    read waits for a writer); it is not a file to read, as the shard builder already held: its
    frame is counted as one whose partner or label is missing. A folder so named is not a frame."""
    import threading

    from data_tools.annotations import read_annotations
    from finetune.factory import det_dataset, seg_dataset

    write_corpus(tmp_path, SynthConfig(num_images=6, width=96, height=80))
    names = sorted(p.stem for p in (tmp_path / "ir").glob("*.png"))
    (tmp_path / "ir" / f"{names[1]}.png").unlink()
    os.mkfifo(tmp_path / "ir" / f"{names[1]}.png")
    (tmp_path / "labels" / f"{names[2]}.txt").unlink()
    os.mkfifo(tmp_path / "labels" / f"{names[2]}.txt")
    (tmp_path / "masks" / f"{names[3]}.png").unlink()
    os.mkfifo(tmp_path / "masks" / f"{names[3]}.png")
    (tmp_path / "vi" / "folder.png").mkdir()
    fifos = [tmp_path / "ir" / f"{names[1]}.png", tmp_path / "labels" / f"{names[2]}.txt",
             tmp_path / "masks" / f"{names[3]}.png"]
    split = ["data.train_split=null", "data.val_split=null"]
    det_cfg = load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml",
                          [f"data.root={tmp_path}", "data.boxes.path=labels", *split])
    seg_cfg = load_config(CONFIG_DIR / "finetune" / "seg_tiny.yaml", [f"data.root={tmp_path}", *split])
    built = {}

    def build():
        built["det"] = det_dataset(det_cfg, "train")
        built["seg"] = seg_dataset(seg_cfg, "train")
        built["nested"] = read_annotations("yolo", str(tmp_path / "labels"), classes=("person", "car"), nested=True)

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(timeout=60)
    waited = worker.is_alive()
    for _ in range(200):  # a read waiting on a FIFO: let it go (a writer that closes at once), so the test ends
        if not worker.is_alive():
            break
        for fifo in fifos:
            with contextlib.suppress(OSError):  # ENXIO: nothing reads it
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=0.05)
    assert not waited, "building the splits waited on a FIFO"
    (det, det_issues, _), (seg, seg_issues, _) = built["det"], built["seg"]
    assert sorted((i["name"], i["reason"]) for i in det_issues) == [(names[1], "label_without_image"),
                                                                   (names[1], "missing_partner")]
    assert sorted((i["name"], i["reason"]) for i in seg_issues) == [(names[1], "missing_partner"),
                                                                   (names[3], "missing_label")]
    # a detection frame without a label file has no objects (YOLO's rule): the FIFO is read as that
    assert len(det) == 5 and [len(r.boxes) for r in det.records if r.pair.name == names[2]] == [0]
    assert len(seg) == 4 and "folder" not in [r.name for r in seg.records]
    assert built["nested"].stems() == set(names) - {names[2]}  # labels in per-sequence folders: the same rule
