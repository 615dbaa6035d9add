"""configs/data/msip.yaml: PAD's 8 MSIP sources with their rules, read from one root the user
passes; each source's frame count is checked against PAD's and a difference is warned about."""
import json

import cv2
import numpy as np
import pytest

from data_tools.build import build_shards
from data_tools.cli import DEFAULT_BUILD_CONFIG
from data_tools.cli import main as data_main
from data_tools.config import CONFIG_DIR, load_config
from data_tools.sources import SourceError, load_sources

MSIP = CONFIG_DIR / "data" / "msip.yaml"


def _frame(path, border=0, black=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((80 + 2 * border, 96 + 2 * border), 10 if black else 120, np.uint8)
    if not black:
        image[border + 20:border + 40, border + 30:border + 60] = 230
    assert cv2.imwrite(str(path), image)


def _replica(root):
    """A few frames per MSIP source in the folders the recipe names: DroneVehicle with its white
    border, SCUT FIR videos with a black frame, LasHeR sequences with visible frames beside."""
    for i in range(3):
        _frame(root / "DroneVehicle/train/trainimgr" / f"{i:05d}.jpg", border=100)
        _frame(root / "LLVIP/infrared/train" / f"{i:06d}.jpg")
        _frame(root / "infrared_ship/train" / f"{i}.png")
        _frame(root / "infrared_security" / f"{i}.jpg")
    for i in range(4):
        _frame(root / "infrared_aerial" / f"{i}.jpg")  # stride 2: 2 kept
    for video in ("set00/V000", "set01/V001"):
        for f in range(12):  # stride 10: frames 0 and 10 of each video
            _frame(root / "SCUT_FIR_Pedestrian/videos" / video / f"{f}.jpg", black=(video, f) == ("set00/V000", 10))
    for seq in ("airplane_001", "bike_002"):
        for f in range(11):
            _frame(root / "LSOTB-TIR_TrainingData/TrainingData/TIR_training_001" / seq / f"{f:04d}.jpg")
    for seq in ("2ndblkboy1_quezhen", "boy"):
        for f in range(11):
            _frame(root / "LasHeR/TrainingSet/trainingset" / seq / "infrared" / f"i{f:04d}.jpg")
            _frame(root / "LasHeR/TrainingSet/trainingset" / seq / "visible" / f"v{f:04d}.jpg")
    # written per source: dronevehicle 3, scut 3 (4 selected, 1 black), llvip 3, aerial 2, ship 3,
    # security 3, lsotb 4, lasher 4
    return {"dronevehicle": 3, "scut_fir_pedestrian": 3, "llvip": 3, "infrared_aerial": 2, "infrared_ship": 3,
            "infrared_security": 3, "lsotb_tir": 4, "lasher": 4}


def test_the_recipe_holds_pads_sources_counts_and_rules():
    sources = {s.name: s for s in load_sources(MSIP, root=CONFIG_DIR)}
    assert sum(s.expected_frames for s in sources.values()) == 178_756
    assert sources["dronevehicle"].border_crop == (100, 100, 100, 100)
    assert sources["scut_fir_pedestrian"].stride == 10 and sources["scut_fir_pedestrian"].black_threshold == 20
    assert sources["infrared_aerial"].stride == 2 and sources["lsotb_tir"].stride == sources["lasher"].stride == 10
    with pytest.raises(SourceError, match="is not a folder"):
        load_sources(MSIP, root=CONFIG_DIR / "nowhere")


def test_build_from_one_root_warns_where_a_count_differs(tmp_path, capsys):
    written = _replica(tmp_path / "raw")
    code = data_main(["build", "--sources", str(MSIP), "--sources-root", str(tmp_path / "raw"), "--out",
                      str(tmp_path / "shards"), "--workers", "1", "--quiet", "proposals.enabled=false"])
    assert code == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    per_source = manifest["sources"]
    assert {k: v["written"] for k, v in per_source.items()} == written
    assert per_source["scut_fir_pedestrian"]["skipped_by_reason"] == {"black_frame": 1}
    assert per_source["lasher"]["found"] == 4  # infrared frames only
    err = capsys.readouterr().err
    assert "warning: source 'dronevehicle': 3 frames written, the recipe expects 17,990" in err
    assert err.count("the recipe expects") == 8 and per_source["lasher"]["expected_frames"] == 51_843


def test_a_dry_run_says_what_each_source_gives_without_reading_or_writing(tmp_path, capsys):
    """`build --dry-run` on the recipe: frames per source after the stride (the build's `found`),
    the expected count where the folders hold fewer, and nothing written."""
    _replica(tmp_path / "raw")
    out = tmp_path / "shards"
    assert data_main(["build", "--sources", str(MSIP), "--sources-root", str(tmp_path / "raw"), "--out", str(out),
                      "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert ("  scut_fir_pedestrian: 4 frame(s) (of 24 matched, 1 in 10 of each folder), 0 with annotations; "
            "expected_frames 21,049 (more than found: a folder missing or named otherwise?)") in said
    assert "  lasher: 4 frame(s) (of 22 matched, 1 in 10 of each folder)" in said
    assert "dry run: 26 frame(s) from 8 source(s)" in said and not out.exists()
    _frame(tmp_path / "cam" / "a.png")
    _frame(tmp_path / "cam" / "b.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "labels" / "c.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # no frame c
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: cam, root: cam, boxes: {format: yolo, path: labels}}\n")
    assert data_main(["build", "--sources", str(tmp_path / "s.yaml"), "--out", str(out), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "  cam: 2 frame(s) (of 2 matched), 1 with annotations" in said and "1 annotation file issue(s)" in said
    # a source with masks alone is annotated too; a count as expected is quiet; --only takes "a, b"
    _frame(tmp_path / "seg" / "a.png")
    _frame(tmp_path / "seg" / "b.png")
    _frame(tmp_path / "masks" / "a.png", black=True)
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: cam, root: cam, boxes: {format: yolo, path: labels}}\n"
                                     "  - {name: seg, root: seg, masks: {path: masks}, expected_frames: 2}\n"
                                     "  - {name: other, root: absent}\n")
    assert data_main(["build", "--sources", str(tmp_path / "s.yaml"), "--only", "cam, seg", "--out", str(out),
                      "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "  seg: 2 frame(s) (of 2 matched), 1 with annotations; expected_frames 2\n" in said
    assert "dry run: 4 frame(s) from 2 source(s)" in said and "other" not in said


def test_a_matching_count_is_quiet(tmp_path, capsys):
    src = tmp_path / "sources.yaml"
    _frame(tmp_path / "cam" / "a.png")
    _frame(tmp_path / "cam" / "b.png")
    src.write_text("sources:\n  - {name: cam, root: cam, expected_frames: 2}\n")
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false"])
    manifest = build_shards(load_sources(src), cfg, tmp_path / "out", progress=False)
    assert manifest["sources"]["cam"]["expected_frames"] == 2 and "recipe expects" not in capsys.readouterr().err
    src.write_text("sources:\n  - {name: cam, root: cam, expected_frames: many}\n")
    with pytest.raises(SourceError, match="expected_frames: Input should be a valid integer"):
        load_sources(src)
