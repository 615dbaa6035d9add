"""Every bad input the shard builder handles: skipped or reported with its reason, never lost."""
import json
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_tools.build import BuildError, build_shards
from data_tools.cli import DEFAULT_BUILD_CONFIG, main as cli_main
from data_tools.config import ConfigError, load_config
from data_tools.imageio import SkipSample, read_frame
from data_tools.shards import decode_sample, iter_shard
from data_tools.sources import AnnotationSpec, Source, SourceError, discover, load_sources, source_from_dict


def _scene(h=96, w=128, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 40, np.float64) + rng.normal(0, 3, (h, w))
    cv2.rectangle(img, (20, 20), (70, 80), 200, -1)
    cv2.circle(img, (100, 40), 15, 150, -1)
    if dtype == np.uint16:
        return (img * 40 + 5000).astype(np.uint16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _png(img) -> bytes:
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture
def bad_corpus(tmp_path):
    root = tmp_path / "frames"
    root.mkdir()
    cv2.imwrite(str(root / "good.png"), _scene())
    cv2.imwrite(str(root / "good16.png"), _scene(dtype=np.uint16))
    cv2.imwrite(str(root / "greyrgb.png"), cv2.cvtColor(_scene(), cv2.COLOR_GRAY2BGR))
    colour = cv2.cvtColor(_scene(), cv2.COLOR_GRAY2BGR)
    colour[:, :, 2] = 255 - colour[:, :, 2]
    cv2.imwrite(str(root / "colour.png"), colour)
    cv2.imwrite(str(root / "jpeg_ok.jpg"), _scene())
    full_png = _png(_scene())
    (root / "truncated.png").write_bytes(full_png[: len(full_png) // 2])
    full_jpg = cv2.imencode(".jpg", _scene())[1].tobytes()
    (root / "truncated.jpg").write_bytes(full_jpg[: len(full_jpg) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notimage.png").write_text("this is a text file with an image extension\n")
    corrupt = bytearray(full_png)
    corrupt[40:200] = b"\x00" * 160  # damaged IDAT, intact IEND
    (root / "corrupt.png").write_bytes(bytes(corrupt))
    cv2.imwrite(str(root / "tiny.png"), _scene(40, 50))
    cv2.imwrite(str(root / "black.png"), np.full((96, 128), 10, np.uint8))
    cv2.imwrite(str(root / "blank16.png"), np.full((96, 128), 3000, np.uint16))  # bright, but one value
    os.symlink("/proc/self/mem", root / "unreadable.png")  # open() works, read() fails (EIO)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "good.txt").write_text("0 0.5 0.5 0.25 0.25\n0 0.95 0.5 0.3 0.2\n")  # second leaves the image
    (labels / "jpeg_ok.txt").write_text("0 1.2 0.5 0.1 0.1\n")  # entirely outside: zero area
    (labels / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # no image "ghost"
    (labels / "broken.txt").write_text("0 0.5 oops\n")
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "good_mask.png"), np.zeros((50, 50), np.uint8))  # wrong size
    m = np.zeros((96, 128), np.uint8)
    m[10:60, 60:110] = 255
    cv2.imwrite(str(masks / "good16_mask.png"), m)
    (tmp_path / "sources.yaml").write_text("""
sources:
  - name: bad
    root: frames
    black_threshold: 20
    boxes: {format: yolo, path: labels}
    masks: {path: masks, suffix: _mask.png}
""")
    return tmp_path


EXPECTED_SKIPS = {
    "truncated.png": "truncated", "truncated.jpg": "truncated", "empty.png": "empty_file",
    "notimage.png": "not_an_image", "corrupt.png": "decode_failed", "tiny.png": "too_small",
    "black.png": "black_frame", "blank16.png": "blank_frame", "unreadable.png": "unreadable",
}


def test_bad_inputs_are_skipped_with_reasons(bad_corpus):
    cfg = load_config(DEFAULT_BUILD_CONFIG)
    m = build_shards(load_sources(bad_corpus / "sources.yaml"), cfg, bad_corpus / "out", workers=2, progress=False)
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert skipped == EXPECTED_SKIPS
    ps = m["sources"]["bad"]
    assert ps["found"] == 14 and ps["written"] == 5 and ps["skipped"] == 9
    assert ps["found"] == ps["written"] + ps["skipped"]
    assert ps["skipped_by_reason"]["truncated"] == 2
    assert [c["path"] for c in m["colour_converted"]] == ["colour.png"]
    issues = {(Path(i["name"]).name, i["reason"]) for i in m["annotation_issues"]}
    assert ("ghost", "annotation_without_image") in issues
    assert ("broken.txt", "annotation_parse_error") in issues
    assert ("good.png", "box_clipped") in issues
    assert ("jpeg_ok.jpg", "box_empty") in issues
    assert ("good_mask.png", "mask_size_mismatch") in issues
    samples = {}
    for e in m["shards"]:
        for key, members in iter_shard(str(bad_corpus / "out" / e["shard"])):
            image, props, meta = decode_sample(members)
            samples[meta["path"]] = (image, props, meta)
    assert set(samples) == {"good.png", "good16.png", "greyrgb.png", "colour.png", "jpeg_ok.jpg"}
    # 16-bit keeps its full range; grey stored as RGB becomes one identical channel.
    np.testing.assert_array_equal(samples["good16.png"][0], _scene(dtype=np.uint16))
    np.testing.assert_array_equal(samples["greyrgb.png"][0], _scene())
    assert samples["greyrgb.png"][2]["colour"] == "grey_rgb" and samples["colour.png"][2]["colour"] == "colour"
    # YOLO box (0.5, 0.5, 0.25, 0.25) on 128x96 -> x 48, y 36, w 32, h 24; the clipped one stays.
    props = samples["good.png"][1].tolist()
    assert [48, 36, 32, 24] in props and [102, 38, 26, 19] in props
    # The mask of good16 (rows 10-59, cols 60-109) gives a box.
    assert [60, 10, 50, 50] in samples["good16.png"][1].tolist()


def test_label_maps_among_the_frames_are_skipped_as_such(tmp_path):
    """A source rooted at a dataset's top folder takes its label folders too: label maps (class
    indices) and 0 / 255 masks were stored as infrared frames. They are skipped as `label_map` and
    counted; a real frame of few values (SIRST's darkest sky frame holds 12, from 23 to 204) stays."""
    root = tmp_path / "dataset"
    (root / "ir").mkdir(parents=True)
    (root / "labels").mkdir()
    cv2.imwrite(str(root / "ir" / "a.png"), _scene())
    cv2.imwrite(str(root / "ir" / "b16.png"), _scene(dtype=np.uint16))
    few = np.repeat(np.linspace(23, 204, 12).astype(np.uint8), 128 * 8).reshape(96, 128)
    cv2.imwrite(str(root / "ir" / "few.png"), few)
    labels = np.zeros((96, 128), np.uint8)
    labels[20:80, 20:70], labels[30:60, 90:110], labels[:4] = 1, 3, 255
    cv2.imwrite(str(root / "labels" / "a.png"), labels)
    cv2.imwrite(str(root / "labels" / "mask.png"), (labels == 1).astype(np.uint8) * 255)
    cv2.imwrite(str(root / "labels" / "mask16.png"), (labels == 1).astype(np.uint16) * 65535)
    sources = [source_from_dict({"name": "ds", "root": str(root)}, tmp_path)]
    m = build_shards(sources, load_config(DEFAULT_BUILD_CONFIG), tmp_path / "out", workers=1, progress=False)
    assert {s["path"]: s["reason"] for s in m["skipped"]} == {
        "labels/a.png": "label_map", "labels/mask.png": "label_map", "labels/mask16.png": "label_map"}
    assert m["sources"]["ds"]["written"] == 3 and m["sources"]["ds"]["skipped_by_reason"] == {"label_map": 3}
    kept = load_config(DEFAULT_BUILD_CONFIG, ["image.skip_label_maps=false"])
    m = build_shards(sources, kept, tmp_path / "all", workers=1, progress=False)
    assert m["sources"]["ds"]["written"] == 6


# too_small, black_frame and blank_frame are decided by the build's rules, not by the reader.
@pytest.mark.parametrize("name,reason", sorted((n, r) for n, r in EXPECTED_SKIPS.items()
                                               if r not in ("too_small", "black_frame", "blank_frame")))
def test_read_frame_reasons(bad_corpus, name, reason):
    with pytest.raises(SkipSample) as e:
        read_frame(str(bad_corpus / "frames" / name))
    assert e.value.reason == reason


def test_directory_is_unreadable(tmp_path):
    with pytest.raises(SkipSample) as e:
        read_frame(str(tmp_path))
    assert e.value.reason == "unreadable"


def test_empty_source_is_an_error_naming_it(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.txt").write_text("no frames here")
    with pytest.raises(SourceError, match="source 'lonely'"):
        discover(Source("lonely", str(tmp_path / "nothing")))
    assert cli_main(["build", "--source", f"lonely={tmp_path / 'nothing'}", "--out", str(tmp_path / "o")]) == 2
    assert "lonely" in capsys.readouterr().err


def test_video_recordings_are_named_and_counted_never_passed_over(tmp_path, capsys):
    videos = tmp_path / "videos"
    (videos / "day2").mkdir(parents=True)
    (videos / "drive1.MP4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (videos / "day2" / "walk.seq").write_bytes(b"FFF\x00")
    out = tmp_path / "o"
    assert cli_main(["build", "--source", f"cam={videos}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no image files" in err and "2 video file(s) (e.g. day2/walk.seq)" in err and "ffmpeg -i" in err
    assert not list(out.glob("*.tar"))

    (videos / "frames").mkdir()  # the same source with frames beside the recordings: built, recordings said
    for i in range(3):
        (videos / "frames" / f"{i:06d}.png").write_bytes(_png(_scene(seed=i)))
    assert cli_main(["build", "--source", f"cam={videos}", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "warning: source 'cam': 2 video file(s) not read (e.g. day2/walk.seq)" in said.err
    assert "2 video file(s) not read" in said.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["cam"]["videos_not_read"] == 2 and manifest["sources"]["cam"]["written"] == 3


def test_the_visible_half_of_an_infrared_visible_dataset_is_left_out_and_counted(tmp_path, capsys):
    """A dataset's root given as one folder (run.sh --data DIR): its visible frames, grey ones included, and
    depth maps are not infrared frames. Told by the folder's name beside an infrared-named sibling, said and
    counted."""
    root = tmp_path / "dataset"
    frames = ["ir/0001.png", "ir/0002.png", "vi/0001.png", "vi/0002.png",  # MSRS
              "set00/V000/lwir/I00000.png", "set00/V000/visible/I00000.png", "set00/V000/visible/I00001.png",  # KAIST
              "pst900/thermal/0.png", "pst900/rgb/0.png", "pst900/depth/0.png",  # PST900's depth maps too
              "llvip/infrared/train/0.png", "llvip/visible/train/0.png",  # the modality a level up (LLVIP)
              "drone/rgb/x.png"]  # no infrared-named sibling: read (a colour frame, warned about)
    for i, rel in enumerate(frames):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        frame = _scene(seed=i)
        (root / rel).write_bytes(_png(np.dstack([frame, frame // 2, 255 - frame]) if "drone" in rel else frame))
    out = tmp_path / "o"
    assert cli_main(["build", "--source", f"ds={root}", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert ("note: source 'ds': 7 frame(s) under llvip/visible/, pst900/depth/, pst900/rgb/, ... left out, "
            "folders named for another modality (visible, depth) beside one named for infrared") in said.err
    assert "found 6 (of 6 matched), written 6, skipped 0 (none), 7 frame(s) under llvip/visible/, pst900/depth/, " \
           "pst900/rgb/, ... left out (another modality)" in said.out
    assert ("warning: source 'ds': 1 colour frame(s) read as their luma, 1 of them in drone/rgb/: if they are visible "
            "photographs, not pseudo-coloured infrared, leave them out") in said.err
    per = json.loads((out / "manifest.json").read_text())["sources"]["ds"]
    assert per["other_modalities_left_out"] == {"llvip/visible": 1, "pst900/depth": 1, "pst900/rgb": 1,
                                                "set00/V000/visible": 2, "vi": 2}
    assert per["written"] == 6
    stored = sorted(decode_sample(members)[2]["path"] for shard in sorted(out.glob("*.tar"))
                    for _, members in iter_shard(str(shard)))
    assert stored == ["drone/rgb/x.png", "ir/0001.png", "ir/0002.png", "llvip/infrared/train/0.png",
                      "pst900/thermal/0.png", "set00/V000/lwir/I00000.png"]
    # boxes named by the frame's stem belong to the infrared frame alone (with its visible twin read too,
    # they could be either's, and were given to neither)
    from data_tools.build import annotations_for_source

    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "0001.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    boxed = source_from_dict({"name": "ds", "root": str(root), "boxes": {
        "format": "yolo", "path": str(tmp_path / "labels"), "classes": ["person"]}}, tmp_path)
    by_image, issues = annotations_for_source(boxed, discover(boxed))
    assert list(by_image) == ["ir/0001.png"] and len(by_image["ir/0001.png"][0]) == 1 and issues == []
    # a source rooted at a visible folder reads it, as asked
    assert [it.rel for it in discover(Source("vis", str(root / "vi"))).items] == ["0001.png", "0002.png"]


def test_dronevehicles_visible_half_is_told_by_its_infrared_twins_name(tmp_path):
    """DroneVehicle ships train/trainimg/ (RGB) beside train/trainimgr/ (infrared), and val/, test/ alike:
    no modality word in either name, the pair tells them apart."""
    root = tmp_path / "DroneVehicle"
    for split in ("train", "val"):
        for folder in (f"{split}img", f"{split}imgr"):
            for i in (1, 2):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                (root / split / folder / f"{i:05d}.jpg").write_bytes(b"jpg")
    (root / "extra" / "img").mkdir(parents=True)  # no twin: read
    (root / "extra" / "img" / "00001.jpg").write_bytes(b"jpg")
    found = discover(Source("dv", str(root)))
    assert [it.rel for it in found.items] == ["extra/img/00001.jpg", "train/trainimgr/00001.jpg",
                                              "train/trainimgr/00002.jpg", "val/valimgr/00001.jpg",
                                              "val/valimgr/00002.jpg"]
    assert found.other_modalities_left_out == {"train/trainimg": 2, "val/valimg": 2}


def test_the_same_frames_in_two_infrared_folders_are_said_and_a_glob_keeps_one(tmp_path, capsys):
    """FLIR ADAS ships each frame as thermal_8_bit/*.jpeg and thermal_16_bit/*.tiff (and RGB/*.jpg)."""
    root = tmp_path / "FLIR_ADAS"
    for split in ("train", "val"):
        for i in range(2):
            frame = _scene(seed=i)
            for rel, image in ((f"thermal_8_bit/FLIR_{i:05d}.jpeg", frame),
                               (f"thermal_16_bit/FLIR_{i:05d}.tiff", frame.astype(np.uint16) * 200),
                               (f"RGB/FLIR_{i:05d}.jpg", cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))):
                (root / split / rel).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / split / rel), image)
    out = tmp_path / "o"
    assert cli_main(["build", "--source", f"flir={root}", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for split in ("train", "val"):
        assert (f"warning: source 'flir': {split}/thermal_16_bit/ and {split}/thermal_8_bit/ hold 2 frame(s) of the "
                'same names: the same frames twice') in err
    assert err.count('give the source a glob (glob: "**/thermal_8_bit/*")') == 2
    per = json.loads((out / "manifest.json").read_text())["sources"]["flir"]
    assert per["infrared_twins"] == [{"folders": [f"{s}/thermal_16_bit", f"{s}/thermal_8_bit"], "same_names": 2}
                                     for s in ("train", "val")]
    assert per["written"] == 8 and per["other_modalities_left_out"] == {"train/RGB": 2, "val/RGB": 2}
    # the glob it suggests keeps one copy of each frame, and nothing is said
    (tmp_path / "sources.yaml").write_text(
        f'sources:\n  - name: flir\n    root: {root}\n    glob: "**/thermal_8_bit/*"\n')
    assert cli_main(["build", "--sources", str(tmp_path / "sources.yaml"), "--out", str(tmp_path / "o2")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["sources"]["flir"]["written"] == 4
    # sequences whose frames are named alike (KAIST: every V000, V001 ... from I00000) are not twins
    # (in an infrared folder each, or holding their frames themselves, as tracking sets do)
    for sequence in ("V000/lwir", "V001/lwir", "flat/V000", "flat/V001"):
        (tmp_path / "kaist" / sequence).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "kaist" / sequence / "I00000.png"), _scene())
    assert discover(Source("kaist", str(tmp_path / "kaist"))).infrared_twins == []


def test_colour_frames_are_said_per_source_with_the_folder_holding_most():
    from data_tools.cli import _colour_folders

    luma, packed = "colour_converted_to_luma", "colour_converted_to_luma_4th_channel_left_out"
    converted = [{"source": "dv", "path": p, "kind": luma} for p in ("a/1.jpg", "trainimg/1.jpg", "trainimg/2.jpg")]
    converted += [{"source": "mfnet", "path": "images/1.png", "kind": packed}, {"source": "top", "path": "1.png",
                                                                                 "kind": luma}]
    assert [line.split(": if")[0] for line in _colour_folders(converted)] == [
        "warning: source 'dv': 3 colour frame(s) read as their luma, 2 of them in trainimg/",
        "warning: source 'top': 1 colour frame(s) read as their luma, 1 of them in ./"]


@pytest.mark.parametrize("name, modality", [
    ("ir", "infrared"), ("Ir", "infrared"), ("infrared", "infrared"), ("lwir", "infrared"),
    ("thermal_8_bit", "infrared"), ("cropinfrared", "infrared"), ("images_thermal_train", "infrared"),
    ("thermal_raw", "infrared"),
    ("vi", "visible"), ("Vis", "visible"), ("visible", "visible"), ("RGB", "visible"), ("crop_HR_visible", "visible"),
    ("images_rgb_train", "visible"), ("depth", "depth"),
    ("rgb_thermal", None), ("rgb_depth", None), ("RGBT234", None), ("images", None), ("Segmentation_labels", None),
    ("video", None)])
def test_folders_are_told_by_the_names_datasets_ship_them_under(name, modality):
    from data_tools.sources import folder_modality

    assert folder_modality(name) == modality


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="root folder does not exist") as e:
        discover(Source("gone", str(tmp_path / "gone")))
    assert "it is at" not in str(e.value)


def test_a_root_that_unpacked_one_folder_down_is_pointed_at(tmp_path, capsys):
    frames = tmp_path / "downloads" / "LLVIP-main" / "infrared" / "train"
    frames.mkdir(parents=True)
    (frames / "010001.jpg").write_bytes(cv2.imencode(".jpg", _scene())[1].tobytes())
    (tmp_path / "downloads" / "infrared").mkdir()  # part of the path exists where it was expected
    recipe = tmp_path / "sources.yaml"
    recipe.write_text("sources:\n  - {name: llvip, root: infrared/train}\n")
    out = tmp_path / "o"
    assert cli_main(["build", "--sources", str(recipe), "--sources-root", str(tmp_path / "downloads"),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"root folder does not exist: {tmp_path / 'downloads' / 'infrared' / 'train'}; it is at {frames}" in err


def test_sources_not_downloaded_yet_are_named_together_and_the_rest_built_with_only(tmp_path, capsys):
    """An eight-source recipe with some downloads still missing: every missing root in one error,
    the sources that are there named, and `--only` builds from those."""
    (tmp_path / "dl" / "LLVIP" / "infrared" / "train").mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(tmp_path / "dl" / "LLVIP" / "infrared" / "train" / f"{i}.png"), _scene(seed=i))
    recipe = tmp_path / "sources.yaml"
    recipe.write_text("sources:\n  - {name: drone, root: DroneVehicle/train}\n  - {name: llvip, root: LLVIP/infrared/train}"
                      "\n  - {name: ship, root: ship}\n")
    build = ["build", "--sources", str(recipe), "--sources-root", str(tmp_path / "dl"), "--out", str(tmp_path / "o")]
    for extra in ([], ["--dry-run"]):
        assert cli_main(build + extra) == 2
        err = capsys.readouterr().err
        assert (f"error: 2 of 3 sources cannot be read:\n  source 'drone': root folder does not exist: "
                f"{tmp_path / 'dl' / 'DroneVehicle' / 'train'}\n  source 'ship': root folder does not exist: "
                f"{tmp_path / 'dl' / 'ship'}; {tmp_path / 'dl'} holds LLVIP\nthe other source is there: build from "
                "them alone with --only llvip") in err
        assert not (tmp_path / "o" / "manifest.json").exists()
    assert cli_main(build + ["--only", "llvip", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["llvip"] and manifest["totals"]["written"] == 2
    assert cli_main(build + ["--only", "llvip,lvip"]) == 2
    assert "--only names lvip, which the sources do not: drone, llvip, ship" in capsys.readouterr().err


def _full_disk_after(samples: int, monkeypatch):
    """Shard writes fail as on a full disk once ``samples`` samples are written."""
    import errno

    from data_tools.shards import ShardFile

    real_write, written = ShardFile.write, []

    def write_until_full(shard, sample):
        if len(written) == samples:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        real_write(shard, sample)

    monkeypatch.setattr(ShardFile, "write", write_until_full)
    return lambda: monkeypatch.setattr(ShardFile, "write", real_write)


def test_a_full_disk_ends_the_build_with_that_said_and_the_rerun_resumes(tmp_path, monkeypatch):
    from data_tools.reencode import ReencodeError, reencode_shards

    for i in range(9):
        cv2.imwrite(str(tmp_path / f"{i}.png"), _scene(seed=i))
    sources, cfg = [Source("cam", str(tmp_path))], load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=3"])
    space_freed = _full_disk_after(5, monkeypatch)  # the second shard's third frame
    with pytest.raises(BuildError, match=r"writing .*out failed \(No space left on device\); its 1 finished shard "
                                         r"record\(s\) are kept: free space .* rerun the same command to resume"):
        build_shards(sources, cfg, tmp_path / "out", progress=False)
    space_freed()
    resumed = build_shards(sources, cfg, tmp_path / "out", progress=False)
    assert resumed == build_shards(sources, cfg, tmp_path / "clean", progress=False)
    assert resumed["totals"]["written"] == 9
    _full_disk_after(4, monkeypatch)
    with pytest.raises(ReencodeError, match=r"writing .*raw failed \(No space left on device\): free space"):
        reencode_shards(tmp_path / "clean", tmp_path / "raw", "raw")


def test_output_of_a_different_config_is_refused_unless_overwrite(bad_corpus, capsys):
    src = load_sources(bad_corpus / "sources.yaml")
    out = bad_corpus / "out"
    build_shards(src, load_config(DEFAULT_BUILD_CONFIG), out, progress=False)
    other = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=2"])
    with pytest.raises(BuildError, match="different config"):
        build_shards(src, other, out, progress=False)
    m = build_shards(src, other, out, overwrite=True, progress=False)
    assert [e["samples"] for e in m["shards"]] == [2, 2, 1]
    assert sorted(p.name for p in out.glob("*.tar")) == [e["shard"] for e in m["shards"]]
    # Through the CLI the refusal is exit code 2 with the reason.
    args = ["build", "--sources", str(bad_corpus / "sources.yaml"), "--out", str(out), "--quiet"]
    assert cli_main(args) == 2 and "different config" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    with pytest.raises(BuildError, match=r"; shards.max_samples: 1000 -> 2\)"):  # what changed, named
        build_shards(src, other, out, progress=False)


def _as_an_earlier_version_wrote_it(out, status: str) -> None:
    """The manifest of ``out`` as a toolkit before ``proposals.overlay_mask`` would have written it."""
    from data_tools.config import config_hash

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config"]["proposals"].pop("overlay_mask", None)
    manifest.update(status=status, config_hash=config_hash(manifest["config"]))
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_a_build_of_an_earlier_version_is_kept_when_complete_and_refused_when_not(bad_corpus, capsys):
    """Settings added since a build was made: a finished build stays as it was built (said, with
    the settings it lacked), an unfinished one is not continued another way; any other change is
    still another config."""
    src = load_sources(bad_corpus / "sources.yaml")
    out = bad_corpus / "earlier"
    build_shards(src, load_config(DEFAULT_BUILD_CONFIG), out, progress=False)
    _as_an_earlier_version_wrote_it(out, "complete")
    before = (out / "manifest.json").read_text()
    m = build_shards(src, load_config(DEFAULT_BUILD_CONFIG), out, progress=False)
    assert m["status"] == "complete" and (out / "manifest.json").read_text() == before
    assert ("was built by an earlier version of this toolkit, before the settings proposals.overlay_mask: "
            "absent -> true; kept as built") in capsys.readouterr().err
    with pytest.raises(BuildError, match="different config"):
        build_shards(src, load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=2"]), out, progress=False)
    _as_an_earlier_version_wrote_it(out, "building")
    with pytest.raises(BuildError, match="an unfinished build of an earlier version of this toolkit, before the "
                                         "settings proposals.overlay_mask: absent -> true"):
        build_shards(src, load_config(DEFAULT_BUILD_CONFIG), out, progress=False)


def test_unknown_override_and_source_option_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"no key 'shards.max_sample' \(did you mean 'shards.max_samples'\?\)"):
        load_config(DEFAULT_BUILD_CONFIG, ["shards.max_sample=3"])
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: a, root: ., strde: 2}\n")
    with pytest.raises(SourceError, match=r"source 'a': strde: unknown key \(allowed: black_threshold, border_crop, "
                                          "boxes, channel, expected_frames, glob, globs, masks, name, root, sort, "
                                          "stride\\)"):
        load_sources(tmp_path / "s.yaml")
    # The folder of the boxes is 'path' (the frames' folder is 'root'): a clear refusal, not a KeyError.
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: a, root: ., boxes: {format: yolo, root: labels}}\n")
    with pytest.raises(SourceError, match=r"source 'a': boxes.path \(the folder or file of the boxes\): missing"):
        load_sources(tmp_path / "s.yaml")


BORDER = "border_crop (an int >= 0, [v, h] or [top, bottom, left, right])"


@pytest.mark.parametrize("entry,said", [
    ({"stride": 2.7}, "stride: Input should be a valid integer (got 2.7)"),  # int() kept every 2nd frame
    ({"stride": True}, "stride: Input should be a valid integer (got True)"),  # int() kept every frame
    ({"stride": "abc"}, "stride: Input should be a valid integer (got 'abc')"),
    ({"stride": [2]}, "stride: Input should be a valid integer (got [2])"),  # was a TypeError's traceback
    ({"stride": 0}, "stride: Input should be greater than 0 (got 0)"),
    ({"stride": None}, "stride: Input should be a valid integer (got None)"),  # `stride:` left empty
    ({"expected_frames": "1000"}, "expected_frames: Input should be a valid integer (got '1000')"),
    ({"channel": -1}, "channel (0-based, in stored order B, G, R, A): Input should be greater than or equal to 0 "
                      "(got -1)"),
    ({"black_threshold": "dark"}, "black_threshold (the largest value of a frame dropped as black): Input should "
                                  "be a valid number (got 'dark')"),
    ({"black_threshold": [3]}, "black_threshold (the largest value of a frame dropped as black): Input should "
                               "be a valid number (got [3])"),
    ({"border_crop": True}, f"{BORDER}: Input should be a valid tuple (got True)"),
    ({"border_crop": [1, 2, 3]}, f"{BORDER}: 3 values (got [1, 2, 3])"),
    ({"border_crop": [1, -2]}, "border_crop[2] (an int >= 0, [v, h] or [top, bottom, left, right]): Input should "
                               "be greater than or equal to 0 (got -2)"),
    ({"boxes": "labels"}, "boxes ({format: coco|yolo|voc|bbgt, path: ...}): Input should be a valid dictionary"),
    ({"boxes": {"format": "yolo", "path": "l", "classes": "person"}},  # was six classes: p, e, r, s, o, n
     "boxes.classes (the labels in index order, [person, car]): Input should be a valid list (got 'person')"),
    ({"boxes": {"format": "yolo", "path": "l", "classes": ["person", True]}},
     "boxes.classes[1] (the labels in index order, [person, car]): Input should be a valid string (got True)"),
    ({"masks": {"path": "m", "suffix": 1}}, "masks.suffix (the end of the mask files' names, '_mask.png'): Input "
                                            "should be a valid string (got 1)"),
    ({"glob": "*.png", "globs": ["*.jpg"]}, "give glob or globs, not both"),  # one of them was dropped unsaid
    ({"glob": 3}, "glob[0]: Input should be a valid string (got 3)"),
    # matched nothing; pydantic's own words, 'List' in its 2.5, our lower bound
    ({"glob": []}, re.compile(r"glob: (List|Value) should have at least 1 item after validation, not 0 \(got \[\]\)")),
    ({"root": None}, "root (the folder of the frames): Input should be a valid string (got None)"),  # was ./None
])
def test_a_source_option_of_the_wrong_kind_is_refused_naming_the_source(tmp_path, entry, said):
    said = said.pattern if isinstance(said, re.Pattern) else re.escape(said)
    with pytest.raises(SourceError, match="source 'a': " + said):
        source_from_dict({"name": "a", "root": ".", **entry}, tmp_path)


def test_a_source_entry_without_a_name_is_named_by_its_place(tmp_path):
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: a, root: .}\n  - {root: b}\n  - frames\n")
    with pytest.raises(SourceError, match=re.escape("source #2: name (letters, digits, '_' or '-'): missing")):
        load_sources(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: a, root: .}\n  - frames\n")
    with pytest.raises(SourceError, match=re.escape("source #2: Input should be a valid dictionary")):
        load_sources(tmp_path / "s.yaml")


def test_source_options_of_the_right_kind_are_kept(tmp_path):
    source = source_from_dict({"name": "a", "root": ".", "stride": 3, "black_threshold": 2, "expected_frames": 10,
                               "channel": 0, "boxes": {"format": "yolo", "path": "l", "classes": ["person", 7]}},
                              tmp_path)
    assert (source.stride, source.black_threshold, source.expected_frames, source.channel) == (3, 2.0, 10, 0)
    assert source.annotations[0].classes == ("person", "7")
    # YAML reads a folder or a name of digits as a number: it is its text
    year = source_from_dict({"name": 2020, "root": 2020, "glob": "*.png", "border_crop": [4, 8]}, tmp_path)
    assert (year.name, year.root, year.globs, year.border_crop) == ("2020", str(tmp_path / "2020"), ("*.png",),
                                                                     (4, 4, 8, 8))
    with pytest.raises(SourceError, match=re.escape("source #1: name (letters, digits, '_' or '-'): Input should be "
                                                    "a valid string (got True)")):
        source_from_dict({"name": True, "root": "."}, tmp_path)


def test_stride_per_sequence_folder_and_natural_sort(tmp_path):
    for seq in ("seq2", "seq10"):
        (tmp_path / seq).mkdir()
        for i in range(1, 13):
            cv2.imwrite(str(tmp_path / seq / f"frame{i}.png"), _scene(seed=i))
    items = discover(Source("video", str(tmp_path), stride=5)).items
    assert [it.rel for it in items] == [f"{s}/frame{i}.png" for s in ("seq2", "seq10") for i in (1, 6, 11)]
    assert [it.frame for it in items] == [0, 5, 10] * 2
    assert [it.sequence for it in items] == ["seq2"] * 3 + ["seq10"] * 3


def test_grey_stored_as_colour_is_grey_up_to_the_tolerance_and_colour_past_it():
    """`image.grey_tolerance` (2 by default): channels at most that far apart are one grey frame stored
    three times (as JPEG encoders leave them), one more is colour, converted to luma and reported."""
    from data_tools.imageio import to_single_channel

    grey = _scene()
    grey[10, 10] = 100  # room for the spread below 255
    for spread, colour in ((2, "grey_rgb"), (3, "colour")):
        bgr = np.stack([grey, grey, grey], axis=2).astype(np.int32)
        bgr[10, 10] += (0, spread, 0)  # one pixel's green channel, the rest equal
        image, said, _ = to_single_channel(np.clip(bgr, 0, 255).astype(np.uint8), 2)
        assert said == colour and image.shape == grey.shape
    # a JPEG some recorders pad after its end marker (zeros, a line end) is whole, not truncated
    from data_tools.imageio import decode_frame

    jpeg = cv2.imencode(".jpg", grey)[1].tobytes()
    assert decode_frame(jpeg + b"\x00" * 600 + b"\r\n").image.shape == grey.shape
    with pytest.raises(SkipSample, match="truncated"):
        decode_frame(jpeg[:-600])
    # luma weighs red, green and blue 0.299, 0.587, 0.114 (BT.601); OpenCV stores blue first
    blue, red = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)
    blue[..., 0], red[..., 2] = 200, 200
    assert to_single_channel(blue, 2)[0][0, 0] == 23 and to_single_channel(red, 2)[0][0, 0] == 60


def test_label_maps_are_2_to_16_values_each_a_class_index_below_64_or_255():
    """A dataset's label folder read as frames: 2-16 distinct values, each a small class index (< 64),
    255 or the type's maximum. A dark infrared frame holds more values, or larger ones."""
    from data_tools.imageio import label_map_values

    def frame(values):
        return np.resize(np.array(values, np.uint8), (32, 40))

    assert label_map_values(frame(list(range(16)))).tolist() == list(range(16))  # MFNet-like: 9 classes and more
    assert label_map_values(frame([0, 40, 63, 255])).tolist() == [0, 40, 63, 255]
    assert label_map_values(frame(list(range(17)))) is None and label_map_values(frame([0, 64])) is None
    assert label_map_values(frame([7])) is None  # one value: a blank frame, said as such
    assert label_map_values(np.resize(np.array([0, 1, 65535], np.uint16), (32, 40))).tolist() == [0, 1, 65535]


def test_a_visible_frame_reads_as_red_green_blue_and_16_bit_as_its_high_byte(tmp_path):
    from data_tools.imageio import read_rgb

    bgr = np.zeros((8, 10, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30  # OpenCV's order: blue, green, red
    cv2.imwrite(str(tmp_path / "colour.png"), bgr)
    cv2.imwrite(str(tmp_path / "deep.png"), (bgr.astype(np.uint16) << 8) + 0x7F)
    cv2.imwrite(str(tmp_path / "grey.png"), bgr[..., 1])
    for name, expected in (("colour.png", [30, 20, 10]), ("deep.png", [30, 20, 10]), ("grey.png", [20, 20, 20])):
        rgb = read_rgb(str(tmp_path / name))
        assert rgb.dtype == np.uint8 and rgb.shape == (8, 10, 3) and rgb[3, 4].tolist() == expected, name


def test_border_crop_moves_boxes_and_records_crop(tmp_path):
    root = tmp_path / "frames"
    root.mkdir()
    img = _scene(120, 160)
    cv2.imwrite(str(root / "a.png"), img)
    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 160, "height": 120}],
        "annotations": [{"image_id": 1, "bbox": bbox, "category_id": 1}
                        for bbox in ([30, 20, 50, 60], [40, 100, 20, 20], [60, 116, 20, 4], [150, 30, 10, 10])],
        "categories": [{"id": 1, "name": "person"}]}))
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: c, root: frames, border_crop: [10, 5, 20, 5], "
                                     "boxes: {format: coco, path: a.json}}\n")
    m = build_shards(load_sources(tmp_path / "s.yaml"), load_config(DEFAULT_BUILD_CONFIG), tmp_path / "out",
                     progress=False)
    (_, members), = iter_shard(str(tmp_path / "out" / m["shards"][0]["shard"]))
    image, props, meta = decode_sample(members)
    np.testing.assert_array_equal(image, img[10:115, 20:155])
    assert meta["crop"] == [10, 5, 20, 5] and (meta["orig_width"], meta["width"], meta["height"]) == (160, 135, 105)
    assert [10, 10, 50, 60] in props.tolist()  # COCO box moved by (-20, -10)
    # boxes reaching into the bottom and right borders are cut at the crop; one wholly in the border is gone
    assert [20, 90, 20, 15] in props.tolist() and [130, 20, 5, 10] in props.tolist()  # x, y, w, h
    assert meta["proposals_from_annotations"] == 3
    assert sorted(i["reason"] for i in m["annotation_issues"]) == ["box_clipped", "box_clipped", "box_empty"]


def test_sample_keys_count_the_frames_of_each_source_from_zero(tmp_path):
    """`<source>-<index>`, the index within the source (README, What a shard holds): a source's keys do
    not change when another source joins the corpus before it."""
    sources = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            cv2.imwrite(str(tmp_path / name / f"{i}.png"), _scene(seed=i))
        sources.append(source_from_dict({"name": name, "root": name}, tmp_path))
    m = build_shards(sources, load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false"]), tmp_path / "out",
                     progress=False)
    keys = {key for e in m["shards"] for key, _ in iter_shard(str(tmp_path / "out" / e["shard"]))}
    assert keys == {"a-00000000", "a-00000001", "b-00000000", "b-00000001"}


def test_the_black_threshold_and_the_smallest_side_are_each_the_last_value_skipped_or_kept(tmp_path):
    """A frame whose brightest pixel is the black threshold is black; one whose shorter side (after the
    border crop) is image.min_side is kept, one pixel less is too small."""
    (tmp_path / "frames").mkdir()
    for name, high in (("at.png", 20), ("above.png", 21)):  # dark ramps: every value from 0 to the brightest
        ramp = np.linspace(0, high, 80).round().astype(np.uint8)
        cv2.imwrite(str(tmp_path / "frames" / name), np.tile(ramp, (64, 1)))
    for name, height in (("short.png", 59), ("min.png", 60)):
        cv2.imwrite(str(tmp_path / "frames" / name), _scene(height, 80))
    source = source_from_dict({"name": "s", "root": "frames", "black_threshold": 20}, tmp_path)
    m = build_shards([source], load_config(DEFAULT_BUILD_CONFIG, ["image.min_side=60"]), tmp_path / "out",
                     progress=False)
    assert [(s["path"], s["reason"]) for s in m["skipped"]] == [("at.png", "black_frame"), ("short.png", "too_small")]
    assert m["skipped"][0]["detail"] == "max 20 <= 20" and m["sources"]["s"]["written"] == 2


def test_dronevehicle_polygon_boxes_join_the_proposals_and_a_shapeless_object_is_named(tmp_path):
    """DroneVehicle ships VOC files whose objects are oriented boxes, <polygon><x1>..<y4>: the box
    enclosing the corners is used (moved by the border crop); an object with no geometry leaves its
    file out, reported with the object named, never silently."""
    (tmp_path / "trainimgr").mkdir()
    (tmp_path / "trainlabelr").mkdir()
    for stem in ("00001", "00002", "00003"):
        cv2.imwrite(str(tmp_path / "trainimgr" / f"{stem}.jpg"), _scene(120, 160, seed=int(stem)))
    corners = "".join(f"<x{k}>{x}</x{k}><y{k}>{y}</y{k}>" for k, (x, y) in enumerate(
        [(40, 30), (100, 42), (94, 72), (34, 60)], 1))
    (tmp_path / "trainlabelr" / "00001.xml").write_text(
        f"<annotation><object><name>car</name><polygon>{corners}</polygon></object></annotation>")
    (tmp_path / "trainlabelr" / "00002.xml").write_text(
        "<annotation><object><name>car</name><point><x>5</x><y>6</y></point></object></annotation>")
    (tmp_path / "trainlabelr" / "00003.xml").write_text(  # two corners: a line, not an object's outline
        "<annotation><object><name>van</name><polygon><x1>5</x1><y1>6</y1><x2>50</x2><y2>60</y2></polygon>"
        "</object></annotation>")
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: dv, root: trainimgr, border_crop: 10, "
                                     "boxes: {format: voc, path: trainlabelr}}\n")
    m = build_shards(load_sources(tmp_path / "s.yaml"), load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false"]),
                     tmp_path / "out", progress=False)
    proposals = {}
    for entry in m["shards"]:
        for _, members in iter_shard(str(tmp_path / "out" / entry["shard"])):
            _, props, meta = decode_sample(members)
            proposals[meta["path"]] = props.tolist()
    # (34, 30)-(100, 72) less the crop
    assert proposals == {"00001.jpg": [[24, 20, 66, 42]], "00002.jpg": [], "00003.jpg": []}
    bad, line = sorted(m["annotation_issues"], key=lambda i: i["name"])
    assert bad["reason"] == "annotation_parse_error" and bad["name"].endswith("00002.xml")
    assert "object 1 (car): neither <bndbox> nor <polygon>, only ['name', 'point']" in bad["detail"]
    assert line["reason"] == "annotation_parse_error" and line["name"].endswith("00003.xml")
    assert "object 1 (van): a <polygon> needs >= 3 <xN>/<yN> pairs, got 2 x and 2 y" in line["detail"]


def test_mask_components_touching_at_a_corner_are_one_object():
    """A mask's objects are its 8-connected components: a thin object drawn at a slant (pixels
    meeting at corners) stays one box."""
    from data_tools.annotations import boxes_from_mask

    mask = np.zeros((20, 20), np.uint8)
    mask[2:5, 2:5] = 1
    mask[5:8, 5:8] = 1  # meets the first block at a corner only
    mask[12:15, 2:4] = 255
    assert boxes_from_mask(mask).tolist() == [[2, 2, 6, 6], [2, 12, 2, 3]]


def test_a_4_channel_frame_reads_the_channel_the_source_names(tmp_path, capsys):
    """MFNet keeps the thermal frame in the 4th channel of each PNG: read as colour, the visible
    channels would enter the corpus; a varying 4th channel is warned about, `channel: 3` reads it."""
    (tmp_path / "images").mkdir()
    bgr = _scene(96, 128, seed=1)[:, :, None].repeat(3, axis=2)
    bgr[:, :, 2] //= 2  # coloured visible channels
    thermal = _scene(96, 128, seed=2)
    cv2.imwrite(str(tmp_path / "images" / "00001.png"), np.dstack([bgr, thermal]))
    for line, out in (("", "plain"), (", channel: 3", "thermal"), (", channel: 4", "none")):
        (tmp_path / f"{out}.yaml").write_text(f"sources:\n  - {{name: mfnet, root: images{line}}}\n")
        assert cli_main(["build", "--sources", str(tmp_path / f"{out}.yaml"), "--out", str(tmp_path / out),
                         "--quiet", "proposals.enabled=false"]) == 0
    said = capsys.readouterr()
    assert "warning: 1 frame(s) carry a 4th channel that is another image" in said.err
    assert "set `channel: 3` on the source" in said.err and said.err.count("warning: 1 frame(s) carry") == 1
    plain = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert plain["colour_converted"][0]["kind"] == "colour_converted_to_luma_4th_channel_left_out"
    (_, members), = iter_shard(str(tmp_path / "thermal" / "shard-000000.tar"))
    image, _, meta = decode_sample(members)
    np.testing.assert_array_equal(image, thermal)
    assert meta["colour"] == "channel"
    none = json.loads((tmp_path / "none" / "manifest.json").read_text())
    assert none["totals"]["written"] == 0 and none["skipped"][0]["reason"] == "no_such_channel"
    with pytest.raises(SourceError, match=r"channel \(0-based, in stored order B, G, R, A\): Input should be a "
                                          "valid integer"):
        source_from_dict({"name": "x", "root": "images", "channel": "alpha"}, tmp_path)


def test_ignore_classes_is_a_list_of_labels_and_leaves_the_build_as_it_was(tmp_path):
    """`boxes.ignore_classes` changes what proposals-eval counts, not a stored byte: a build made
    without it is the same build (its identity, `describe()`, is unchanged); a bare string is refused."""
    (tmp_path / "images").mkdir()
    plain = {"name": "k", "root": "images", "boxes": {"format": "bbgt", "path": "ann"}}
    ignoring = {**plain, "boxes": {**plain["boxes"], "ignore_classes": ["people", "person?"]}}
    with_it = source_from_dict(ignoring, tmp_path)
    assert with_it.annotations[0].ignore_classes == ("people", "person?")
    assert with_it.describe() == source_from_dict(plain, tmp_path).describe()
    with pytest.raises(SourceError, match=r"boxes.ignore_classes \(labels of ignore regions, \[people\]\): Input "
                                          "should be a valid list \\(got 'people'\\)"):
        source_from_dict({**plain, "boxes": {**plain["boxes"], "ignore_classes": "people"}}, tmp_path)
    with pytest.raises(SourceError, match=r"masks.ignore_classes: unknown key \(allowed: classes, path, suffix\)"):
        source_from_dict({**plain, "masks": {"path": "m", "ignore_classes": ["people"]}}, tmp_path)


def test_text_that_starts_like_netpbm_and_float_frames_are_named_skips(tmp_path):
    """A Netpbm signature is two bytes and white space: a note reading `P5X...` (or `P2:`) is not a
    frame; a 32-bit float TIFF decodes but is neither 8- nor 16-bit, so it is skipped by that name."""
    from data_tools.imageio import SkipSample, decode_raw, sniff_format

    assert sniff_format(b"P5\n2 2\n255\n" + bytes(4)) == "pnm" and sniff_format(b"P2 2 1 255 0 9") == "pnm"
    for note in (b"P5X notes", b"P2:todo"):
        with pytest.raises(SkipSample) as e:
            sniff_format(note)
        assert e.value.reason == "not_an_image"
    cv2.imwrite(str(tmp_path / "float.tif"), np.full((40, 40), 0.5, np.float32))
    with pytest.raises(SkipSample) as e:
        decode_raw((tmp_path / "float.tif").read_bytes())
    assert (e.value.reason, e.value.detail) == ("unsupported_dtype", "float32")


def test_tiff_bmp_and_netpbm_8_and_16_bit_round_trip(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    img8, img16 = _scene(), _scene(dtype=np.uint16)
    cv2.imwrite(str(root / "a8.tif"), img8)
    cv2.imwrite(str(root / "b16.tiff"), img16)
    cv2.imwrite(str(root / "c8.bmp"), img8)
    cv2.imwrite(str(root / "d16.pgm"), img16)  # binary P5, 16-bit big-endian
    (root / "e8.pgm").write_bytes(b"P2\n2 2\n255\n0 10\n200 255\n")  # text P2: too small, but read
    m = build_shards([Source("mixed", str(root))], load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false"]),
                     tmp_path / "out", progress=False)
    got = {}
    for e in m["shards"]:
        for _, members in iter_shard(str(tmp_path / "out" / e["shard"])):
            image, _, meta = decode_sample(members)
            got[meta["path"]] = (image, meta)
    np.testing.assert_array_equal(got["a8.tif"][0], img8)
    np.testing.assert_array_equal(got["b16.tiff"][0], img16)
    np.testing.assert_array_equal(got["c8.bmp"][0], img8)
    assert got["b16.tiff"][1]["dtype"] == "uint16" and got["b16.tiff"][1]["format"] == "tiff"
    assert got["c8.bmp"][1]["format"] == "bmp"
    np.testing.assert_array_equal(got["d16.pgm"][0], img16)
    assert got["d16.pgm"][1]["dtype"] == "uint16" and got["d16.pgm"][1]["format"] == "pnm"
    assert [(s["path"], s["reason"]) for s in m["skipped"]] == [("e8.pgm", "too_small")]
    np.testing.assert_array_equal(read_frame(str(root / "e8.pgm")).image, [[0, 10], [200, 255]])


def test_shards_are_sized_by_bytes(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    for i in range(6):
        cv2.imwrite(str(root / f"{i}.png"), _scene(seed=i))
    one = len(_png(_scene())) + 3 * 512 + 1024  # roughly one sample in a tar
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false", "shards.max_samples=0", "shards.encoding=png",
                                             f"shards.max_bytes={int(2.5 * one)}"])
    m = build_shards([Source("b", str(root))], cfg, tmp_path / "out", progress=False)
    assert [e["samples"] for e in m["shards"]] == [2, 2, 2]
    assert all(e["bytes"] <= int(2.5 * one) + 10240 for e in m["shards"])  # + the tar end-of-archive record


def test_palette_png_masks_give_boxes(tmp_path):
    """A palette ('P') mask whose object index maps to a colour with a zero first channel
    (VOC's class 1 is (128, 0, 0)): OpenCV expands palettes to colours and found no object."""
    from PIL import Image

    root = tmp_path / "pal"
    (root / "masks").mkdir(parents=True)
    cv2.imwrite(str(root / "f.png"), _scene(80, 100))
    mask = np.zeros((80, 100), np.uint8)
    mask[10:40, 20:70] = 1
    img = Image.fromarray(mask, mode="P")
    img.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # index 1 -> RGB (128, 0, 0), VOC's first class
    img.save(root / "masks" / "f.png")
    cv2_view = cv2.imread(str(root / "masks" / "f.png"), cv2.IMREAD_UNCHANGED)
    assert cv2_view.ndim == 3 and cv2_view[20, 30, 0] == 0  # BGR: the channel the builder used to read is 0
    src = Source("pal", str(root), globs=("*.png",),
                 annotations=(AnnotationSpec(format="mask", path=str(root / "masks")),))
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false"])
    m = build_shards([src], cfg, tmp_path / "out", progress=False)
    _, members = next(iter_shard(str(tmp_path / "out" / m["shards"][0]["shard"])))
    _, proposals, meta = decode_sample(members)
    assert [20, 10, 50, 30] in proposals.tolist() and meta["proposals_from_annotations"] == 1


def _annotation_boxes_per_frame(out) -> dict[str, int]:
    """Each shard sample's path -> how many of its proposals came from its annotations."""
    m = json.loads((out / "manifest.json").read_text())
    return {meta["path"]: meta["proposals_from_annotations"] for entry in m["shards"]
            for _, members in iter_shard(str(out / entry["shard"])) for meta in [decode_sample(members)[2]]}


def _frames(root, *rels, size=(96, 128)):
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), _scene(*size))


def _build(tmp_path, boxes: str, root: str = "frames", glob: str = "**/*.png"):
    (tmp_path / "s.yaml").write_text(f"sources:\n  - {{name: seq, root: {root}, glob: '{glob}', boxes: {boxes}}}\n")
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.enabled=false"])
    return build_shards(load_sources(tmp_path / "s.yaml"), cfg, tmp_path / "out", progress=False)


def test_flat_annotations_of_a_stem_that_several_images_share_are_reported_not_spread(tmp_path):
    """Sequences repeat frame names (seq1/000001, seq2/000001); a flat label folder names only the
    stem: the boxes of 000001 cannot be told apart, so neither frame gets them, and the report says why."""
    _frames(tmp_path / "frames", "seq1/000001.png", "seq2/000001.png", "seq1/000002.png")
    (tmp_path / "labels").mkdir()
    for stem in ("000001", "000002"):
        (tmp_path / "labels" / f"{stem}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    m = _build(tmp_path, "{format: yolo, path: labels}")
    assert _annotation_boxes_per_frame(tmp_path / "out") == {"seq1/000001.png": 0, "seq2/000001.png": 0,
                                                              "seq1/000002.png": 1}
    [ambiguous] = [i for i in m["annotation_issues"] if i["reason"] == "annotation_ambiguous"]
    assert ambiguous["name"] == "000001" and ambiguous["detail"].startswith("2 ")
    assert "seq1/000001.png" in ambiguous["detail"] and "seq2/000001.png" in ambiguous["detail"]
    assert m["sources"]["seq"]["annotation_issues"] == len(m["annotation_issues"]) == 1


def test_coco_entries_in_sequence_folders_reach_their_own_frames(tmp_path):
    """A COCO file whose entries name their sequence folders (seq1/000001.png, seq2/000001.png)
    tells the frames apart: each gets its own boxes."""
    _frames(tmp_path / "frames", "seq1/000001.png", "seq2/000001.png", "seq1/000002.png")
    images = [{"id": i, "file_name": rel, "width": 128, "height": 96}
              for i, rel in enumerate(("seq1/000001.png", "seq2/000001.png", "seq1/000002.png"))]
    (tmp_path / "a.json").write_text(json.dumps({
        "images": images, "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"image_id": i, "bbox": [30, 20 + k, 50, 40], "category_id": 1}
                        for k, i in enumerate((0, 1, 1, 2))]}))
    m = _build(tmp_path, "{format: coco, path: a.json}")
    assert _annotation_boxes_per_frame(tmp_path / "out") == {"seq1/000001.png": 1, "seq2/000001.png": 2,
                                                              "seq1/000002.png": 1}
    assert m["annotation_issues"] == []
    # an entry without a folder beside one with it: both kept, for the images to tell apart
    from data_tools.annotations import read_coco

    images[0]["file_name"] = "000001.png"
    (tmp_path / "a.json").write_text(json.dumps({"images": images, "annotations": []}))
    anns = read_coco(str(tmp_path / "a.json"), nested=True)
    assert sorted(anns.boxes) == ["000001", "000002", "seq2/000001"] and anns.issues == []


@pytest.mark.parametrize("fmt", ["voc", "yolo", "bbgt"])
def test_a_tree_of_annotation_folders_per_sequence_reaches_its_frames(tmp_path, fmt):
    """Tracking and video sets ship one annotation folder per sequence beside the frames
    (KAIST: images/set00/V000/lwir/I00000.jpg and annotations/set00/V000/I00000.xml; the
    Ultralytics layout: images/train, labels/train): each frame gets the boxes of its own
    sequence's file; a file of a sequence the source does not hold is reported."""
    rels = ["images/set00/V000/lwir/I00000.png", "images/set00/V001/lwir/I00000.png",
            "images/set01/V000/lwir/I00000.png", "images/set00/V000/lwir/I00001.png"]
    _frames(tmp_path / "kaist", *rels)
    labelled = {"set00/V000/I00000": 1, "set00/V001/I00000": 2, "set01/V000/I00000": 3, "set02/V000/I00000": 1}
    for key, n in labelled.items():
        path = tmp_path / "kaist" / "annotations" / f"{key}.{'xml' if fmt == 'voc' else 'txt'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "voc":
            objects = "".join(f"<object><name>person</name><bndbox><x>{10 + 5 * k}</x><y>8</y><w>40</w><h>50</h>"
                              "</bndbox></object>" for k in range(n))
            path.write_text(f"<annotation>{objects}</annotation>")
        elif fmt == "bbgt":
            path.write_text("% bbGt version=3\n" + "".join(f"person {10 + 5 * k} 8 40 50 0 0 0 0 0 0 0\n"
                                                            for k in range(n)))
        else:
            path.write_text("".join(f"0 {0.3 + 0.05 * k} 0.5 0.3 0.5\n" for k in range(n)))
    m = _build(tmp_path, f"{{format: {fmt}, path: kaist/annotations}}", root="kaist", glob="images/**/lwir/*.png")
    assert _annotation_boxes_per_frame(tmp_path / "out") == {rels[0]: 1, rels[1]: 2, rels[2]: 3, rels[3]: 0}
    assert [(i["name"], i["reason"]) for i in m["annotation_issues"]] == [
        ("set02/V000/I00000", "annotation_without_image")]
    assert m["annotation_issues"][0]["detail"] == "no image with this stem in these folders of the source"


def test_one_folder_of_files_named_by_the_joined_sequence_folders_reaches_its_frames(tmp_path):
    """KAIST's improved test annotations and Caltech's converted releases are one folder of files
    named set06_V000_I00019.txt for frames in images/set06/V000/lwir/I00019.jpg: each frame gets its
    own sequence's file, a file named by the frame alone still reaches the one frame of that name,
    and a name whose folders the source does not hold is reported."""
    rels = ["images/set06/V000/lwir/I00019.png", "images/set06/V001/lwir/I00019.png",
            "images/set07/V000/lwir/I00039.png", "images/set07/V000/lwir/I00059.png"]
    _frames(tmp_path / "kaist", *rels)
    flat = tmp_path / "kaist" / "improved"
    flat.mkdir()
    for name, n in {"set06_V000_I00019": 1, "set06_V001_I00019": 2, "set07_V000_I00039": 3, "set09_V000_I00019": 1,
                    "I00059": 1}.items():
        (flat / f"{name}.txt").write_text("% bbGt version=3\n" + "".join(f"person {10 + 5 * k} 8 40 50 0 0 0 0 0 0 0\n"
                                                                          for k in range(n)))
    m = _build(tmp_path, "{format: bbgt, path: kaist/improved}", root="kaist", glob="images/**/lwir/*.png")
    assert _annotation_boxes_per_frame(tmp_path / "out") == {rels[0]: 1, rels[1]: 2, rels[2]: 3, rels[3]: 1}
    assert [(i["name"], i["reason"]) for i in m["annotation_issues"]] == [
        ("set09_V000_I00019", "annotation_without_image")]


def test_coco_entries_that_share_a_stem_give_no_boxes_even_if_one_image_is_absent(tmp_path):
    from data_tools.annotations import read_coco

    (tmp_path / "a.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "seq1/7.png"}, {"id": 2, "file_name": "seq2/7.png"},
                   {"id": 3, "file_name": "seq1/8.png"}, {"id": 4, "file_name": "seq2/8.png"}],
        "annotations": [{"image_id": i, "bbox": [1, 2, 3, 4], "category_id": 1} for i in (1, 2, 3)]}))
    anns = read_coco(str(tmp_path / "a.json"))
    assert "7" not in anns.boxes and "8" not in anns.boxes  # a source holding only seq1 must not get seq2's box
    assert [(i["name"], i["reason"]) for i in anns.issues] == [("7", "annotation_ambiguous"), ("8", "annotation_ambiguous")]


def test_an_image_whose_folders_match_two_annotation_files_gets_neither():
    from data_tools.annotations import AnnotationSet, BoxRecord, assign_to_images

    anns = AnnotationSet(boxes={k: [BoxRecord((1, 2, 3, 4), "person")] for k in ("a/x", "b/x", "c/y/x", "y")})
    assigned, issues = assign_to_images(anns, {"1": "/r/a/b/x.png", "2": "/r/c/y/x.png", "3": "/r/y.png"}, "images")
    assert assigned == {"2": "c/y/x", "3": "y"}  # the longest run of folders decides; equal runs: neither
    assert [(i["name"], i["reason"]) for i in issues] == [
        ("x", "annotation_ambiguous"), ("a/x", "annotation_without_image"), ("b/x", "annotation_without_image")]
    assert issues[0]["detail"] == "1 matches 2 annotations: a/x, b/x"


def test_annotation_paths_that_would_give_no_boxes_silently_are_errors(tmp_path, capsys):
    from data_tools.annotations import read_annotations

    (tmp_path / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "frames" / "a.png"), _scene())
    nested = tmp_path / "labels" / "train"  # the Ultralytics layout: labels/{train,val}/*.txt
    nested.mkdir(parents=True)
    (nested / "a.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    # Fine-tuning reads label folders where their files are: the parent folder is an error naming the subfolder.
    with pytest.raises(FileNotFoundError, match=f"holds no yolo annotation files itself, but {nested} does"):
        read_annotations("yolo", str(tmp_path / "labels"))
    # The shard builder reads the tree below it: a frame of that stem gets its boxes.
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: cam, root: frames, boxes: {format: yolo, path: labels}}\n")
    assert cli_main(["build", "--sources", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 0
    assert _annotation_boxes_per_frame(tmp_path / "o") == {"a.png": 1}
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_annotations("voc", str(nested / "a.txt"))
    with pytest.raises(FileNotFoundError, match="one JSON file"):
        read_annotations("coco", str(nested))
    assert read_annotations("yolo", str(nested)).boxes.keys() == {"a"}  # the folder that holds them
    # a folder of another format's files: the format to set is named
    with pytest.raises(FileNotFoundError, match=rf"{nested} holds no voc annotation files but 1 .txt files \(e.g. "
                                                r"a.txt\): set the format to yolo, or bbgt"):
        read_annotations("voc", str(nested))
    (nested / "a.txt").rename(nested / "a.xml")
    for fmt in ("yolo", "bbgt"):
        with pytest.raises(FileNotFoundError, match=f"holds no {fmt} annotation files but 1 .xml files"):
            read_annotations(fmt, str(nested))


def test_a_box_format_the_builder_does_not_read_is_refused_naming_those_it_does(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: cam, root: frames, boxes: {format: kitti, path: labels}}\n")
    assert cli_main(["build", "--sources", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert ("source 'cam': boxes.format: Input should be 'coco', 'yolo', 'voc' or 'bbgt' (got 'kitti')"
            in capsys.readouterr().err)


def test_a_sources_file_yaml_cannot_read_is_one_line_naming_where(tmp_path, capsys):
    """An unquoted path holding ': ' used to end in a parser traceback."""
    bad = tmp_path / "s.yaml"
    bad.write_text("sources:\n  - name: cam\n    root: /data/flir: day\n")
    assert cli_main(["build", "--sources", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {bad}, line 3, column 21: not valid YAML (mapping values are not allowed here); "
                   "a value holding ': ', ' #', ', ' or brackets (a path, say) needs quotes")
    assert not (tmp_path / "o").exists()


def test_home_folder_paths_in_a_sources_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: cam, root: ~/frames, boxes: {format: yolo, path: ~/labels}}\n"
                                     "  - {name: rel, root: frames, masks: {path: masks}}\n")
    cam, rel = load_sources(tmp_path / "s.yaml")
    assert cam.root == str(tmp_path / "frames") and cam.annotations[0].path == str(tmp_path / "labels")
    assert rel.root == str(tmp_path / "frames") and rel.annotations[0].path == str(tmp_path / "masks")


def test_a_frame_two_sources_hold_enters_the_corpus_once(tmp_path, capsys):
    """Pooled datasets nest: `root: FLIR` and `root: FLIR/train` (or a link to the same files)."""
    frames = tmp_path / "FLIR"
    (frames / "train").mkdir(parents=True)
    for i in range(2):
        (frames / f"{i:03d}.png").write_bytes(_png(_scene(seed=i)))
        (frames / "train" / f"{i:03d}.png").write_bytes(_png(_scene(seed=10 + i)))
    (tmp_path / "linked").symlink_to(frames / "train", target_is_directory=True)
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: all, root: FLIR}\n  - {name: train, root: FLIR/train}\n"
                                     "  - {name: link, root: linked}\n")
    out = tmp_path / "o"
    assert cli_main(["build", "--sources", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "warning: source 'train': 2 frame(s) left out, source 'all' already holds them" in said.err
    assert "link: found 0 (of 2 matched), written 0, skipped 0 (none), 2 already in source 'all'" in said.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 4
    assert {n: (ps["found"], ps["held_by_earlier_sources"]) for n, ps in manifest["sources"].items()} == {
        "all": (4, {}), "train": (0, {"all": 2}), "link": (0, {"all": 2})}


def _tree(root: Path, files: list[str]) -> None:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(_scene()))


@pytest.mark.parametrize("pattern", ["**/*", "*.png", "*/ir/*", "**/lwir/*.png", "a/**", ".hidden/*", "**/.hidden/*",
                                     "[ab]/*.png", "x?.png", "a/b/c.png", "**"])
def test_patterns_match_what_glob_matches_on_a_tree_without_links(tmp_path, pattern):
    import glob

    from data_tools.walk import walk_matching
    _tree(tmp_path, ["x1.png", "xy.png", ".dot.png", "a/b/c.png", "a/ir/1.png", "b/ir/2.png", "b/v/lwir/3.png",
                     "lwir/4.png", ".hidden/5.png", "a/.hidden/6.png", "c/7.png", ".hidden/lwir/8.png"])
    expected = sorted(os.path.relpath(p, tmp_path) for p in glob.glob(os.path.join(str(tmp_path), pattern),
                                                                          recursive=True) if os.path.isfile(p))
    assert walk_matching(str(tmp_path), [pattern]).files == expected


def test_linked_folders_are_read_once_loops_and_second_names_counted(tmp_path, capsys):
    root, elsewhere = tmp_path / "frames", tmp_path / "disk2"
    _tree(root, ["a/1.png", "a/2.png", "b/3.png"])
    _tree(elsewhere, ["night/4.png"])
    (root / "a" / "up").symlink_to("..")  # a loop: glob listed the tree again at each depth, 40 deep
    (root / "b" / "again").symlink_to(root / "b")
    (root / "0_b").symlink_to(root / "b")  # a second name of a folder in the tree, listed before it
    (root / "disk2").symlink_to(elsewhere)  # a dataset linked in from another disk: read
    (root / "disk2_alias").symlink_to(elsewhere)
    (elsewhere / "night" / "back").symlink_to(elsewhere)
    (root / "b" / "3_link.png").symlink_to(root / "b" / "3.png")  # a link to a frame of the source
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")  # dangling: read, and skipped by name
    os.mkfifo(root / "pipe.png")  # not a file: reading it would block

    d = discover(Source("cam", str(root)))
    assert d.all_rel == ["a/1.png", "a/2.png", "b/3.png", "b/3_link.png", "disk2/night/4.png", "gone.png"]
    assert d.links_not_followed == ["0_b", "a/up", "b/again", "disk2/night/back", "disk2_alias"]

    out = tmp_path / "o"
    assert cli_main(["build", "--source", f"cam={root}", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "5 linked folder(s) not followed (e.g. 0_b)" in err
    assert "1 frame(s) left out, source 'cam' already holds them" in err
    per = json.loads((out / "manifest.json").read_text())["sources"]["cam"]
    assert (per["found"], per["written"], per["skipped_by_reason"]) == (5, 4, {"unreadable": 1})
    assert per["links_not_followed"] == 5 and per["held_by_earlier_sources"] == {"cam": 1}


def test_a_folder_that_cannot_be_listed_is_counted(tmp_path, monkeypatch, capsys):
    root = tmp_path / "frames"
    _tree(root, ["ok/1.png", "ok/2.png", "locked/3.png"])
    listing = os.scandir

    def scandir(path="."):  # permissions cannot lock out the root user the tests may run as
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "o"
    assert cli_main(["build", "--source", f"cam={root}", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "1 folder(s) could not be listed (e.g. locked; permissions?)" in said.err
    assert "1 folder(s) not listed" in said.out
    per = json.loads((out / "manifest.json").read_text())["sources"]["cam"]
    assert per["unreadable_folders"] == 1 and per["written"] == 2


@pytest.mark.parametrize("pattern", ["../other/*.png", "/data/*.png", "a/../../*.png", "", ["*.png", "/x/*.png"]])
def test_a_glob_outside_the_root_is_refused(tmp_path, pattern):
    with pytest.raises(SourceError, match="must be a pattern below the root"):
        source_from_dict({"name": "cam", "root": "frames", "glob": pattern}, tmp_path)


def test_an_output_folder_inside_the_source_is_not_read_as_frames(tmp_path):
    """`--out frames/shards`: the pictures a build and its previews write there (overlay-<source>.png,
    grid.png) would become frames of the next build."""
    root = tmp_path / "frames"
    _tree(root, ["a.png", "b/c.png", "shards/grid.png", "shards/more/overlay-cam.png"])
    m = build_shards([Source("cam", str(root))], load_config(DEFAULT_BUILD_CONFIG), root / "shards", progress=False)
    assert (m["sources"]["cam"]["matched"], m["sources"]["cam"]["written"]) == (2, 2)


def test_linked_sequence_folders_of_frames_and_annotations_are_both_read(tmp_path):
    """A set kept on another disk and linked into the dataset's tree (frames and annotations):
    the frames were read through the link and their annotations were not, so they were built
    without boxes; a macOS `._` file beside the labels is not an annotation."""
    _frames(tmp_path / "kaist", "images/set00/V000/lwir/I00000.png")
    _frames(tmp_path / "disk2", "images/set01/V000/lwir/I00000.png")
    (tmp_path / "kaist" / "images" / "set01").symlink_to(tmp_path / "disk2" / "images" / "set01")
    for where, key in (("kaist", "set00"), ("disk2", "set01")):
        path = tmp_path / where / "annotations" / key / "V000" / "I00000.txt"
        path.parent.mkdir(parents=True)
        path.write_text("0 0.5 0.5 0.3 0.5\n")
    (tmp_path / "kaist" / "annotations" / "set00" / "V000" / "._I00000.txt").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "kaist" / "annotations" / "set01").symlink_to(tmp_path / "disk2" / "annotations" / "set01")
    m = _build(tmp_path, "{format: yolo, path: kaist/annotations}", root="kaist", glob="images/**/lwir/*.png")
    assert _annotation_boxes_per_frame(tmp_path / "out") == {"images/set00/V000/lwir/I00000.png": 1,
                                                              "images/set01/V000/lwir/I00000.png": 1}
    assert m["annotation_issues"] == []
