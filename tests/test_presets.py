"""Dataset presets: each reads a miniature replica of its benchmark's published layout (folder
names, file types, channel counts, bit depths, split files, label formats; synthetic pixels) with
only ``data.root`` given (and a tiny model): its datasets are built and counted, and it trains and
evaluates through the CLI."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_tools.config import CONFIG_DIR, ConfigError, check_config, load_config
from data_tools.synth import SynthConfig, render_scene
from finetune.data.classes import resolve_classes
from finetune.factory import det_dataset, seg_dataset
from finetune.schema import DetConfig, SegConfig
from tests.conftest import SHARED_DATA, run_finetune_cli

PRESETS = CONFIG_DIR / "finetune" / "presets"
N_TRAIN, N_VAL = 5, 3
SEG = ("mfnet", "msrs_seg", "soda", "scut_seg", "pst900", "fmb")
DET = ("flir_v1", "flir_v2", "flir_aligned", "m3fd", "llvip", "msrs_det", "yolo", "roboflow", "kaist", "dronevehicle")
THERMAL_ONLY = ("soda", "scut_seg", "flir_v1", "flir_v2", "yolo", "roboflow")
# a synthetic scene's classes (person, car) as each detection preset names them
DET_NAMES = {"m3fd": ("People", "Car"), "dronevehicle": ("truvk", "feright car")}  # DroneVehicle's: aliases


def _scenes(bit_depth=8):
    cfg = SynthConfig(num_images=N_TRAIN + N_VAL, width=160, height=128, bit_depth=bit_depth)
    return [(f"{i:05d}", render_scene(cfg, i)) for i in range(N_TRAIN + N_VAL)]


def _split(i: int) -> str:
    return "train" if i < N_TRAIN else "val"


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image), path


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def _lists(root: Path, names: list[str], train: str, val: str) -> None:
    (root / train).write_text("\n".join(names[:N_TRAIN]) + "\n")
    (root / val).write_text("\n".join(names[N_TRAIN:]) + "\n")


def _voc(path: Path, name: str, boxes, classes, size, xywh: bool = False, polygon: bool = False) -> None:
    """VOC XML; ``xywh``: boxes as KAIST writes them, <x><y><w><h> in <bndbox>; ``polygon``: as DroneVehicle
    writes its oriented boxes, four corners <x1><y1>..<x4><y4> (here a diamond inside the box, touching its sides)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    corners = "<xmin>{:.0f}</xmin><ymin>{:.0f}</ymin><xmax>{:.0f}</xmax><ymax>{:.0f}</ymax>"

    def shape(x, y, w, h):
        if polygon:
            points = ((x + w / 2, y), (x + w, y + h / 2), (x + w / 2, y + h), (x, y + h / 2))
            return "<polygon>" + "".join(f"<x{k}>{px:g}</x{k}><y{k}>{py:g}</y{k}>"
                                         for k, (px, py) in enumerate(points, 1)) + "</polygon>"
        return "<bndbox>" + ("<x>{:.0f}</x><y>{:.0f}</y><w>{:.0f}</w><h>{:.0f}</h>".format(x, y, w, h) if xywh else
                             corners.format(x, y, x + w, y + h)) + "</bndbox>"
    objs = "".join(f"<object><name>{classes[c]}</name>{shape(x, y, w, h)}</object>" for c, x, y, w, h in boxes)
    path.write_text(f"<annotation><filename>{name}</filename><size><width>{size[1]}</width><height>{size[0]}"
                    f"</height><depth>3</depth></size>{objs}</annotation>")


def _coco(path: Path, files: list[tuple[str, dict]], bicycle: str) -> None:
    """COCO JSON as FLIR ships it: ids 1 person, 2 bicycle (v2: bike), 3 car, and categories the
    preset does not keep (a dog box on the first frame)."""
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": bicycle}, {"id": 3, "name": "car"}, {"id": 17, "name": "dog"}]
    images, anns = [], []
    for i, (file_name, scene) in enumerate(files):
        images.append({"id": i, "file_name": file_name, "height": 128, "width": 160})
        for c, x, y, w, h in scene["boxes"]:  # scene classes: 0 person, 1 car
            anns.append({"id": len(anns), "image_id": i, "category_id": (1, 3)[c], "bbox": [x, y, w, h]})
        if i == 0:
            anns.append({"id": len(anns), "image_id": i, "category_id": 17, "bbox": [1, 1, 20, 20]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _yolo(path: Path, boxes, classes_map=(0, 2)) -> None:
    """YOLO txt with MSRS's ids (0 person, 1 bicycle, 2 car)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{classes_map[c]} {(x + w / 2) / 160:.6f} {(y + h / 2) / 128:.6f} {w / 160:.6f} "
                            f"{h / 128:.6f}\n" for c, x, y, w, h in boxes))


def build_replica(preset: str, root: Path) -> int:
    """The miniature of ``preset``'s layout under ``root``; returns the number of dropped boxes
    the data report must count (categories the preset does not keep)."""
    scenes = _scenes(16 if preset == "pst900" else 8)
    names = [n for n, _ in scenes]
    split_dir = {"train": "train", "val": "test"}
    # KAIST: training frames in two videos of two sets, test frames in a later set
    kaist_videos = ["set00/V000"] * 3 + ["set01/V001"] * (N_TRAIN - 3) + ["set06/V000"] * N_VAL
    for i, (n, s) in enumerate(scenes):
        folder = split_dir[_split(i)]
        if preset == "mfnet":  # 4-channel PNG: B, G, R, thermal
            _write(root / "images" / f"{n}.png", np.dstack([_bgr(s["vi"]), s["ir"]]))
            _write(root / "labels" / f"{n}.png", s["mask"])
        elif preset in ("msrs_seg", "msrs_det"):
            _write(root / folder / "ir" / f"{n}.png", s["ir"])
            _write(root / folder / "vi" / f"{n}.png", _bgr(s["vi"]))
            if preset == "msrs_seg":
                _write(root / folder / "Segmentation_labels" / f"{n}.png", s["mask"])
            else:
                _yolo(root / folder / "labels_ir" / f"{n}.txt", s["boxes"])
        elif preset == "soda":
            _write(root / "JPEGImages" / f"{n}.jpg", s["ir"])
            _write(root / "SegmentationClassPNG" / f"{n}.png", s["mask"])
        elif preset == "scut_seg":
            _write(root / "images" / f"{n}.jpg", s["ir"])
            _write(root / "labels" / f"{n}.png", s["mask"])
        elif preset == "pst900":  # thermal_raw: 16-bit counts; thermal: the 8-bit rendering
            _write(root / folder / "thermal_raw" / f"{n}.png", s["ir"])
            _write(root / folder / "thermal" / f"{n}.png", (s["ir"] >> 8).astype(np.uint8))
            _write(root / folder / "rgb" / f"{n}.png", _bgr(s["vi"]))
            _write(root / folder / "labels" / f"{n}.png", s["mask"])
        elif preset == "fmb":
            _write(root / folder / "Infrared" / f"{n}.png", s["ir"])
            _write(root / folder / "Visible" / f"{n}.png", _bgr(s["vi"]))
            _write(root / folder / "Label" / f"{n}.png", s["mask"])
        elif preset == "flir_v1":
            _write(root / ("train" if i < N_TRAIN else "val") / "thermal_8_bit" / f"FLIR_{i:05d}.jpeg", s["ir"])
        elif preset == "flir_v2":
            _write(root / f"images_thermal_{_split(i)}" / "data" / f"video-{i:05d}.jpg", s["ir"])
        elif preset == "flir_aligned":  # both modalities in one folder, told apart by the name's end
            _write(root / "JPEGImages" / f"FLIR_{i:05d}_PreviewData.jpeg", s["ir"])
            _write(root / "JPEGImages" / f"FLIR_{i:05d}_RGB.jpg", _bgr(s["vi"]))
            _voc(root / "Annotations" / f"FLIR_{i:05d}_PreviewData.xml", f"FLIR_{i:05d}_PreviewData.jpeg", s["boxes"],
                 ("person", "car"), (128, 160))
        elif preset == "m3fd":
            _write(root / "Ir" / f"{n}.png", s["ir"])
            _write(root / "Vis" / f"{n}.png", _bgr(s["vi"]))
            _voc(root / "Annotation" / f"{n}.xml", f"{n}.png", s["boxes"], DET_NAMES["m3fd"], (128, 160))
        elif preset in ("yolo", "roboflow"):  # ids as data.yaml names them
            # Ultralytics: images/{train,val}, labels/{train,val}; Roboflow: {train,valid}/{images,labels}
            images, labels = ((root / "images" / _split(i), root / "labels" / _split(i)) if preset == "yolo" else
                              (root / {"train": "train", "val": "valid"}[_split(i)] / k for k in ("images", "labels")))
            _write(images / f"{n}.jpg", s["ir"])
            unnamed = [(2, 1, 1, 20, 20)] if i in (0, N_TRAIN) else []  # id 5: data.yaml does not name it
            _yolo(labels / f"{n}.txt", s["boxes"] + unnamed, classes_map=(0, 1, 5))
        elif preset == "kaist":  # set / video folders; lwir stored as 3-channel grey JPEG, as KAIST ships it
            video = kaist_videos[i]
            _write(root / "images" / video / "lwir" / f"I{i:05d}.jpg", cv2.cvtColor(s["ir"], cv2.COLOR_GRAY2BGR))
            _write(root / "images" / video / "visible" / f"I{i:05d}.jpg", _bgr(s["vi"]))
            people = [(2, 2, 2, 20, 30)] if i in (0, N_TRAIN) else []  # a class the preset ignores
            _voc(root / "annotations-xml-new-sanitized" / video / f"I{i:05d}.xml", f"I{i:05d}", s["boxes"] + people,
                 ("person", "person", "people"), (128, 160), xywh=True)
        elif preset == "dronevehicle":  # {split}/{split}imgr (infrared), {split}img (visible), {split}labelr
            framed = [cv2.copyMakeBorder(f, *(100,) * 4, cv2.BORDER_CONSTANT, value=[255] * 3)  # its white frame
                      for f in (s["ir"], _bgr(s["vi"]))]
            _write(root / folder / f"{folder}imgr" / f"{n}.jpg", framed[0])
            _write(root / folder / f"{folder}img" / f"{n}.jpg", framed[1])
            unnamed = [(2, 1, 1, 20, 20)] if i in (0, N_TRAIN) else []  # "*": a box without a class
            _voc(root / folder / f"{folder}labelr" / f"{n}.xml", f"{n}.jpg",
                 [(c, x + 100, y + 100, w, h) for c, x, y, w, h in s["boxes"] + unnamed],
                 DET_NAMES["dronevehicle"] + ("*",), (328, 360), polygon=True)
        elif preset == "llvip":
            _write(root / "infrared" / folder / f"{n}.jpg", s["ir"])
            _write(root / "visible" / folder / f"{n}.jpg", _bgr(s["vi"]))
            _voc(root / "Annotations" / f"{n}.xml", f"{n}.jpg", s["boxes"], ("person", "person"), (128, 160))
    if preset == "mfnet":
        _lists(root, names, "train.txt", "test.txt")
        (root / "val.txt").write_text("")
    elif preset == "soda":
        _lists(root, names, "train_infrared.txt", "test_infrared.txt")
    elif preset == "kaist":
        (root / "imageSets").mkdir()
        _lists(root, [f"{v}/I{i:05d}" for i, v in enumerate(kaist_videos)], "imageSets/train-all-02.txt",
               "imageSets/test-all-20.txt")
        return 2  # the people box of frame 0 of each split
    elif preset == "flir_aligned":
        _lists(root, [f"FLIR_{i:05d}_PreviewData" for i in range(len(names))], "align_train.txt", "align_validation.txt")
    elif preset == "scut_seg":
        _lists(root, names, "train.txt", "val.txt")
    elif preset == "m3fd":
        from data_tools.cli import main as data_main
        assert data_main(["split", "--root", str(root), "--images", "Ir", "--val-fraction",
                          str(N_VAL / (N_TRAIN + N_VAL)), "--seed", "0"]) == 0
    elif preset == "flir_v1":
        for split, part in (("train", scenes[:N_TRAIN]), ("val", scenes[N_TRAIN:])):
            offset = 0 if split == "train" else N_TRAIN
            _coco(root / split / "thermal_annotations.json",
                  [(f"thermal_8_bit/FLIR_{offset + k:05d}.jpeg", s) for k, (_, s) in enumerate(part)], "bicycle")
        return 2  # the dog box of frame 0 of each split
    elif preset == "dronevehicle":
        return 2  # the "*" box of frame 0 of each split
    elif preset in ("yolo", "roboflow"):
        (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\n"
                                        "names:\n  0: person\n  1: car\n")
        return 2
    elif preset == "flir_v2":
        for split, part in (("train", scenes[:N_TRAIN]), ("val", scenes[N_TRAIN:])):
            offset = 0 if split == "train" else N_TRAIN
            _coco(root / f"images_thermal_{split}" / "coco.json",
                  [(f"data/video-{offset + k:05d}.jpg", s) for k, (_, s) in enumerate(part)], "bike")
        return 2
    return 0


def _boxes_of(scenes, names) -> int:
    """Boxes of the scenes behind frame names (the scene index is the name's last number)."""
    import re

    return sum(len(scenes[int(re.findall(r"\d+", n)[-1])][1]["boxes"]) for n in names)


@pytest.mark.parametrize("preset", SEG + DET)
def test_each_preset_reads_its_replica_with_only_the_root_given(preset, tmp_path):
    root = tmp_path / preset
    dropped = build_replica(preset, root)
    detection = preset in DET
    cfg = load_config(PRESETS / f"{preset}.yaml", [f"data.root={root}"])
    resolve_classes(cfg)  # yolo: the names of the dataset's data.yaml
    check_config(cfg, DetConfig if detection else SegConfig)
    scenes = _scenes()
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        dataset, issues, found = (det_dataset if detection else seg_dataset)(cfg, split)
        reasons = [i["reason"] for i in issues]
        assert len(dataset) == n == found, (split, issues)
        if detection:
            kept = sum(len(r.boxes) for r in dataset.records)
            assert kept == _boxes_of(scenes, [r.pair.name for r in dataset.records]), (split, issues)
            ignored = sum(len(r.ignore) for r in dataset.records)  # KAIST's people: ignore regions
            assert reasons.count("unknown_class") + ignored == dropped // 2  # one dog / people box per split
            assert reasons.count("ignore_region") == ignored == (dropped // 2 if cfg.data.ignore_classes else 0)
        else:
            assert not issues, issues
            sample = dataset.eval_sample(0)
            assert set(np.unique(sample["label"])) <= set(range(len(cfg.data.classes)))
    if preset == "pst900":  # the 16-bit radiometric frames are what the infrared input reads
        rec = dataset.records[0]
        assert cv2.imread(rec.ir, cv2.IMREAD_UNCHANGED).dtype == np.uint16 and "thermal_raw" in rec.ir


def test_frames_in_folders_of_their_own_are_told_apart_by_their_folder(tmp_path, capsys):
    """KAIST's frames repeat their file names in every video folder (set00/V000/I00000.jpg,
    set01/V001/I00000.jpg): named by the split list's whole entry, each frame keeps its own images
    and boxes; what is missing is named."""
    from finetune.cli import main as finetune_main

    root = tmp_path / "kaist"
    build_replica("kaist", root)
    twin = root / "images" / "set01" / "V001"  # a frame named as one of set00/V000's, other content
    shutil.copy(twin / "lwir" / "I00003.jpg", twin / "lwir" / "I00000.jpg")
    shutil.copy(twin / "visible" / "I00003.jpg", twin / "visible" / "I00000.jpg")
    xml = root / "annotations-xml-new-sanitized" / "set01" / "V001"
    shutil.copy(xml / "I00003.xml", xml / "I00000.xml")
    lists = root / "imageSets"
    entries = (lists / "train-all-02.txt").read_text().split()
    (lists / "train-all-02.txt").write_text("\n".join(entries + ["set01/V001/I00000", "set09/V000/I00001"]) + "\n")
    cfg = load_config(PRESETS / "kaist.yaml", [f"data.root={root}"])
    dataset, issues, found = det_dataset(cfg, "train")
    by_name = {r.pair.name: r for r in dataset.records}
    assert sorted(by_name) == sorted(entries + ["set01/V001/I00000"]) and found == N_TRAIN + 1
    assert by_name["set01/V001/I00000"].pair.ir.endswith("set01/V001/lwir/I00000.jpg")
    assert by_name["set00/V000/I00000"].pair.ir.endswith("set00/V000/lwir/I00000.jpg")
    np.testing.assert_array_equal(by_name["set01/V001/I00000"].boxes, by_name["set01/V001/I00003"].boxes)
    assert not np.array_equal(by_name["set00/V000/I00000"].boxes, by_name["set01/V001/I00000"].boxes)
    assert [i["name"] for i in issues if i["reason"] == "not_found"] == ["set09/V000/I00001"]

    with pytest.raises(ValueError, match=r"name each frame's folder with \{dir\}.*set data.train_split"):
        det_dataset(load_config(PRESETS / "kaist.yaml", [f"data.root={root}", "data.train_split=null"]), "train")
    with pytest.raises(ValueError, match=r"\{dir\} names a folder per frame folder, for label files .*a COCO file"):
        det_dataset(load_config(PRESETS / "kaist.yaml", [f"data.root={root}", "data.boxes.format=coco"]), "train")
    # the check names a list that is not there with the lists that are, and a missing folder
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={root}",
                          "data.train_split=imageSets/train-all-04.txt"]) == 2
    assert "holds test-all-20.txt, train-all-02.txt" in capsys.readouterr().err
    # the miniature's persons are under the reasonable setting's 55 px: nothing to score, said before training
    val, _, _ = det_dataset(cfg, "val")
    heights = [float(b[3] - b[1]) for r in val.records for b in r.boxes]
    assert max(heights) < 55
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={root}"]) == 2
    assert (f"kaist.yaml (val): none of its {len(heights)} objects would be scored: every one is under "
            f"eval.min_height=55 px tall (the tallest: {max(heights):g} px)") in capsys.readouterr().err
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={root}",
                          f"eval.min_height={max(heights):g}"]) == 0  # the tallest is scored
    assert (f"is there; 1 class: person; scored as ignore regions: people, cyclist, person? boxes, objects under "
            f"{max(heights):g} px tall, objects occluded above level 1, objects within 5 px of the frame's edge") in \
        capsys.readouterr().out
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={root}",
                          f"eval.min_height={max(heights):g}", "eval.max_occlusion=0"]) == 0
    assert "objects occluded above level 0," in capsys.readouterr().out  # 0: occluded objects are not scored
    unpacked = tmp_path / "download" / "kaist-cvpr15"  # a download that unpacked into a folder of its own
    shutil.copytree(root, unpacked)
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={unpacked.parent}"]) == 2
    assert f"The whole layout is under {unpacked}: use data.root=" in capsys.readouterr().err
    shutil.rmtree(xml)
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={root}"]) == 2
    assert f"(train): annotation path does not exist: {xml}" in capsys.readouterr().err
    shutil.rmtree(root / "images")
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={root}"]) == 2
    assert f"(train): not found: {root / 'images'}: no such folder" in capsys.readouterr().err
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={tmp_path / 'KAIST'}"]) == 2
    assert f"data.root {tmp_path / 'KAIST'}: no such folder; {root} differs in case only" in capsys.readouterr().err


def test_kaist_scores_on_test_annotations_published_apart_in_one_folder(tmp_path, capsys):
    """Liu et al.'s improved KAIST test annotations are one folder of bbGt files named by the whole
    entry with its folders joined by "_" (set06_V000_I00005.txt): data.val_boxes reads them, in
    their own format, for the validation split while training keeps the XML tree."""
    from finetune.cli import main as finetune_main

    root = tmp_path / "kaist"
    build_replica("kaist", root)
    entries = (root / "imageSets" / "test-all-20.txt").read_text().split()
    improved = root / "annotations_KAIST_test_set"
    improved.mkdir()
    expected = {}
    for k, entry in enumerate(entries):
        x, y = 10 + 7 * k, 20 + 3 * k
        lines = ["% bbGt version=3", f"person {x} {y} 20 60 0 0 0 0 0 0 0", f"people {x + 40} {y} 30 30 0 0 0 0 0 0 0"]
        (improved / f"{entry.replace('/', '_')}.txt").write_text("\n".join(lines) + "\n")
        expected[entry] = [x, y, x + 20, y + 60]
    apart = ["data.val_boxes.format=bbgt", "data.val_boxes.path=annotations_KAIST_test_set"]
    cfg = load_config(PRESETS / "kaist.yaml", [f"data.root={root}", *apart])
    check_config(cfg, DetConfig)
    with pytest.raises(ConfigError, match="data.val_boxes.format is set but not data.val_boxes.path"):
        check_config(load_config(PRESETS / "kaist.yaml", [f"data.root={root}", apart[0]]), DetConfig)
    val, issues, _ = det_dataset(cfg, "val")
    assert {r.pair.name: r.boxes.tolist() for r in val.records} == {e: [b] for e, b in expected.items()}
    assert all(len(r.ignore) == 1 for r in val.records)  # people: an ignore region
    assert {i["reason"] for i in issues} == {"ignore_region"}
    published = load_config(PRESETS / "kaist.yaml", [f"data.root={root}"])
    train, same = det_dataset(cfg, "train")[0], det_dataset(published, "train")[0]  # the XML tree
    assert [r.boxes.tolist() for r in train.records] == [r.boxes.tolist() for r in same.records]
    assert [r.boxes.tolist() for r in det_dataset(published, "val")[0].records] != list(expected.values())
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={root}", *apart]) == 0
    assert f"1 class: person; validation boxes from {improved} (bbgt); scored as" in capsys.readouterr().out
    for entry in entries:  # named by the frame alone, a file could be any sequence's: none is taken
        (improved / f"{entry.replace('/', '_')}.txt").rename(improved / f"{entry.rsplit('/', 1)[1]}.txt")
    assert finetune_main(["check", "--config", str(PRESETS / "kaist.yaml"), f"data.root={root}", *apart]) == 2
    assert f"(val): the labels in {improved} give no box to any of its {len(entries)} frames" in capsys.readouterr().err


def test_class_names_come_from_the_datasets_yaml_in_id_order(tmp_path, capsys):
    from finetune.cli import main as finetune_main

    def resolved(text, *overrides, root=tmp_path):
        (tmp_path / "data.yaml").write_text(text)
        cfg = load_config(PRESETS / "yolo.yaml", [f"data.root={root}", *overrides])
        resolve_classes(cfg)
        return list(cfg.data.classes)

    assert resolved("nc: 3\nnames: [person, bicycle, car]\n") == ["person", "bicycle", "car"]
    assert resolved("names: {2: car, 0: person, 1: bicycle}\n") == ["person", "bicycle", "car"]
    assert resolved("names: {'1': car, '0': person}\n") == ["person", "car"]
    assert resolved("names: [person, car]\n", "data.classes=[person,car]") == ["person", "car"]
    for text, message in (("names: {0: person, 2: car}\n", "the ids of 'names' must be 0 .. 1"),
                          ("nc: 2\n", "expected 'names' as a list of class names"),
                          ("names: [person, car\n", "data.classes_file")):
        with pytest.raises(ConfigError, match=message):
            resolved(text)
    assert resolved("names: [person, car]\n", "data.classes=[car]") == ["car"]  # some of them, to train on
    with pytest.raises(ConfigError, match=r"data.classes names \['bus'\], which .*data.yaml does not \(\['person', 'car'\]\)"):
        resolved("names: [person, car]\n", "data.classes=[car,bus]")
    # a download that unpacked into a folder of its own is named; no file and no names is refused
    (tmp_path / "set" / "v2").mkdir(parents=True)
    (tmp_path / "data.yaml").rename(tmp_path / "set" / "v2" / "data.yaml")
    assert finetune_main(["check", "--config", str(PRESETS / "yolo.yaml"), f"data.root={tmp_path}"]) == 2
    said = capsys.readouterr().err
    assert f"no such file, but the dataset is under {tmp_path / 'set' / 'v2'}: use data.root=" in said
    assert finetune_main(["check", "--config", str(PRESETS / "yolo.yaml"), f"data.root={tmp_path / 'set'}",
                          "data.classes_file=names.yaml"]) == 2
    assert "names.yaml: no such file (or give data.classes=[...])" in capsys.readouterr().err
    build_replica("yolo", tmp_path / "replica")  # the check says which names it read
    assert finetune_main(["check", "--config", str(PRESETS / "yolo.yaml"), f"data.root={tmp_path / 'replica'}",
                          "model.method=full"]) == 0
    assert "is there; 2 classes (from data.yaml): person, car" in capsys.readouterr().out
    # the class names are read first: a data.root of other case is said there
    assert finetune_main(["check", "--config", str(PRESETS / "yolo.yaml"), f"data.root={tmp_path / 'Replica'}"]) == 2
    assert f"data.root {tmp_path / 'Replica'}: no such folder; {tmp_path / 'replica'} differs in case only" in (
        capsys.readouterr().err)


def _tiny(preset: str) -> list[str]:
    common = ["model.encoder.size=tiny", "model.encoder.depth=2", "model.encoder.drop_path=0.0", "train.steps=2",
              "train.batch_size=2", "train.precision=fp32", "train.save_every_steps=2",
              "train.log_every_steps=1", "data.num_workers=0", "eval.overlays=0", "optim.warmup_steps=1"]
    if preset in THERMAL_ONLY:  # their default method, pad, needs init.checkpoint (a pre-trained backbone)
        common.append("model.method=full")
    if preset == "kaist":  # the miniature's persons are shorter than the reasonable setting's 55 px
        common.append("eval.min_height=0")
    if preset in DET:
        return common + ["model.encoder.img_size=[128,160]", "model.head.channels=64", "model.head.roi_samples_per_image=64"]
    return common + ["model.encoder.img_size=[64,80]", "model.head.channels=32", "model.head.aux_channels=16"]


def _cli_run(preset: str, tmp_path: Path) -> dict:
    root = tmp_path / preset
    dropped = build_replica(preset, root)
    task = "det" if preset in DET else "seg"
    run_dir = tmp_path / "run"
    res = run_finetune_cli(task, run_dir, PRESETS / f"{preset}.yaml", f"data.root={root}", *_tiny(preset))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    if dropped and preset != "kaist":  # a box of a class the preset does not train (KAIST's: ignore regions)
        assert "note: train: 1 box left out, their class is not in data.classes" in res.stderr
    # The preset's own effective batch (16, by accumulation; PAD's SODA 8) is more than the replica's 5 frames
    # (PAD's FLIR: 2, fewer).
    batch = {"soda": 8, "flir_v1": 2}.get(preset, 16)
    assert (f"fewer than one effective batch of {batch}: its frames repeat within each step" in res.stderr) == (
        batch > N_TRAIN)
    report = json.loads((run_dir / "data_report_train.json").read_text())
    assert report["found"] == report["used"] == N_TRAIN
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["frames"] == N_VAL and metrics["steps"] == 2
    return metrics


@pytest.mark.parametrize("preset", SEG + DET)
def test_each_preset_trains_and_evaluates_through_the_cli(preset, tmp_path):
    metrics = _cli_run(preset, tmp_path)
    assert ("AP" if preset in DET else "mIoU") in metrics
    if preset in DET:  # scored on some object: numbers, not "no object to score"
        assert metrics["objects"] > 0 and 0 <= metrics["AP"] <= 1 and 0 <= metrics["MR"] <= 1


def test_split_command_is_seeded_and_refuses_to_overwrite(tmp_path, capsys):
    from data_tools.cli import main as data_main

    for i in range(10):
        _write(tmp_path / "Ir" / f"{i:03d}.png", np.zeros((4, 4), np.uint8))
    assert data_main(["split", "--root", str(tmp_path), "--images", "Ir", "--val-fraction", "0.3", "--seed", "1"]) == 0
    first = ((tmp_path / "train.txt").read_text(), (tmp_path / "val.txt").read_text())
    assert len(first[0].split()) == 7 and len(first[1].split()) == 3 and not set(first[0].split()) & set(first[1].split())
    assert data_main(["split", "--root", str(tmp_path), "--images", "Ir", "--val-fraction", "0.3", "--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert data_main(["split", "--root", str(tmp_path), "--images", "Ir", "--val-fraction", "0.3", "--seed", "1",
                      "--overwrite"]) == 0
    assert ((tmp_path / "train.txt").read_text(), (tmp_path / "val.txt").read_text()) == first
    assert data_main(["split", "--root", str(tmp_path), "--images", "Ir", "--val-fraction", "0.3", "--seed", "2",
                      "--overwrite"]) == 0
    assert (tmp_path / "val.txt").read_text() != first[1]


@pytest.mark.skipif(not (SHARED_DATA / "msrs20").is_dir(), reason="../shared/data/msrs20 not present")
def test_msrs_det_preset_on_real_msrs_frames_in_the_published_layout(tmp_path):
    src = SHARED_DATA / "msrs20"
    names = sorted(p.stem for p in (src / "ir").glob("*.png"))
    for i, n in enumerate(names):
        folder = tmp_path / "MSRS" / ("train" if i % 4 else "test")
        for sub, dst in (("ir", "ir"), ("vi", "vi")):
            (folder / dst).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / sub / f"{n}.png", folder / dst / f"{n}.png")
        (folder / "labels_ir").mkdir(exist_ok=True)
        shutil.copy(src / "labels_ir" / f"{n}.txt", folder / "labels_ir" / f"{n}.txt")
    cfg = load_config(PRESETS / "msrs_det.yaml", [f"data.root={tmp_path / 'MSRS'}"], DetConfig)
    boxes = {n: len((src / "labels_ir" / f"{n}.txt").read_text().split("\n")) - 1 for n in names}
    for split, want in (("train", [n for i, n in enumerate(names) if i % 4]), ("val", names[::4])):
        dataset, issues, found = det_dataset(cfg, split)
        assert found == len(dataset) == len(want)
        assert sum(len(r.boxes) for r in dataset.records) + sum(i["reason"] == "box_empty" for i in issues) == \
            sum(boxes[n] for n in want)


def test_check_names_what_is_missing_before_any_work(tmp_path, capsys):
    from finetune.cli import main as finetune_main

    root = tmp_path / "llvip"
    build_replica("llvip", root)
    config = str(PRESETS / "llvip.yaml")
    assert finetune_main(["check", "--config", config, f"data.root={root}"]) == 0
    assert "config fits its schema" in capsys.readouterr().out
    shutil.rmtree(root / "visible" / "test")
    assert finetune_main(["check", "--config", config, f"data.root={root}"]) == 2
    assert f"(val): not found: {root / 'visible' / 'test'}" in capsys.readouterr().err
    assert finetune_main(["check", "--config", config]) == 2
    assert "data.root is not set" in capsys.readouterr().err
    assert finetune_main(["check", "--config", config, f"data.root={root}", "train.steps=0"]) == 2
    assert "train.steps: Input should be greater than 0" in capsys.readouterr().err
    nested = tmp_path / "llvip2"
    build_replica("llvip", nested)
    (nested / "Annotations" / "train").mkdir()
    for xml in (nested / "Annotations").glob("*.xml"):
        xml.rename(nested / "Annotations" / "train" / xml.name)
    assert finetune_main(["check", "--config", config, f"data.root={nested}"]) == 2
    assert (f"(train): {nested / 'Annotations'} holds no voc annotation files itself, but "
            f"{nested / 'Annotations' / 'train'} does") in capsys.readouterr().err


def test_a_method_that_needs_pre_trained_weights_is_refused_without_them(tmp_path, capsys):
    """Thermal-only presets fine-tune with `pad`, which starts from a pre-training export."""
    from finetune.cli import main as finetune_main

    root = tmp_path / "flir"
    build_replica("flir_v2", root)
    for command in (["check"], ["det", "--run-dir", str(tmp_path / "run")]):
        assert finetune_main([*command, "--config", str(PRESETS / "flir_v2.yaml"), f"data.root={root}"]) == 2
        said = capsys.readouterr().err
        assert "model.method=pad fine-tunes a backbone pre-trained with pad adapters: give init.checkpoint=FILE" in said
        assert "or another model.method (frozen, full, ivtuning, mona)" in said
    assert not (tmp_path / "run").exists()


def test_training_from_python_runs_the_same_checks_before_the_run_directory(tmp_path):
    """train_seg / train_det called from Python (not the CLI) refuse what `check` refuses, before
    the run directory is claimed; an evaluation-only run needs its validation split alone."""
    from finetune.det import train_det
    from finetune.seg import train_seg

    root, run_dir = tmp_path / "flir", tmp_path / "run"
    build_replica("flir_v2", root)
    cfg = load_config(PRESETS / "flir_v2.yaml", [f"data.root={root}"])
    with pytest.raises(ValueError, match="the det config: model.method=pad fine-tunes a backbone pre-trained"):
        train_det(cfg, run_dir)
    cfg.model.method = "full"
    shutil.rmtree(root / "images_thermal_train")
    with pytest.raises(FileNotFoundError, match=r"flir_v2.yaml \(train\): not found: .*images_thermal_train"):
        train_det(cfg, run_dir, config_name="flir_v2.yaml")
    assert not run_dir.exists()

    root = tmp_path / "msrs"
    build_replica("msrs_seg", root)
    cfg = load_config(PRESETS / "msrs_seg.yaml", [f"data.root={root}"])
    shutil.rmtree(root / "test")
    with pytest.raises(FileNotFoundError, match=r"the seg config \(val\): not found"):
        train_seg(cfg, run_dir, eval_only=True)  # the validation split is checked, not skipped
    assert not run_dir.exists()


def test_a_split_without_a_usable_frame_is_refused_before_any_work(tmp_path, capsys):
    """Listing alone (no image read) shows a split that cannot train: images a folder down, every
    frame missing a file, a split list naming none; refused by check and before a run starts."""
    from finetune.cli import main as finetune_main

    root = tmp_path / "msrs"
    build_replica("msrs_seg", root)
    config = str(PRESETS / "msrs_seg.yaml")

    def refused(*overrides, command="check"):
        extra = ["--run-dir", str(tmp_path / "run")] if command == "seg" else []
        assert finetune_main([command, "--config", config, *extra, f"data.root={root}", *overrides]) == 2
        return capsys.readouterr().err

    (root / "train" / "ir" / "day").mkdir()
    for png in (root / "train" / "ir").glob("*.png"):
        png.rename(root / "train" / "ir" / "day" / png.name)
    said = refused()
    assert f"(train): none of its {N_TRAIN} frames has all its files (missing_partner {N_TRAIN}); e.g. 00000: " \
           f"the infrared or the visible frame of a pair is missing (no ir frame); {root / 'train' / 'ir' / 'day'} " \
           f"holds {N_TRAIN} image files: frames are read from the folder named, not its subfolders" in said
    assert "holds 5 image files" in refused(command="seg") and not (tmp_path / "run").exists()
    for png in (root / "train" / "vi").glob("*.png"):
        png.rename(root / "train" / "ir" / "day" / f"vi_{png.name}")
    assert f"(train): no image files in {root / 'train' / 'ir'} or {root / 'train' / 'vi'}; " \
           f"{root / 'train' / 'ir' / 'day'} holds {2 * N_TRAIN} image files" in refused()
    for png in (root / "train" / "ir" / "day").glob("vi_*.png"):
        png.rename(root / "train" / "vi" / png.name.removeprefix("vi_"))
    for png in (root / "train" / "ir" / "day").glob("*.png"):
        png.rename(root / "train" / "ir" / png.name)
    shutil.rmtree(root / "train" / "Segmentation_labels")
    (root / "train" / "Segmentation_labels").mkdir()
    said = refused()
    assert f"(train): none of its {N_TRAIN} frames has all its files (missing_label {N_TRAIN}); e.g. 00000: " \
           "an image has no label file" in said
    (root / "list.txt").write_text("nope\n")
    assert f"(val): no frame named in the split list list.txt has image files under {root}" in \
        refused("data.val_split=list.txt", "data.split_dirs.train=test")
    # a fault of the whole dataset shows on its first frames, read as training reads them
    shutil.rmtree(root / "train" / "Segmentation_labels")
    for i, png in enumerate(sorted((root / "train" / "ir").glob("*.png"))):
        colour = np.zeros((128, 160, 3), np.uint8)
        colour[:, :, i % 3] = 128  # class colours, not indices
        _write(root / "train" / "Segmentation_labels" / png.name, colour)
    assert "(train): its first 4 frames cannot be used (unreadable 4); e.g. 00000: an image or label file could not " \
           "be decoded (label: decode_failed: label image mode RGB: expected one channel of class indices)" in refused()
    for png in (root / "train" / "Segmentation_labels").glob("*.png"):
        _write(png, np.full((128, 160), 255 if png.stem == "00004" else 200, np.uint8))  # 0/200 masks, 255 ignored
    said = refused()
    assert "(train): its first 4 frames cannot be used (unknown_label_values 4); e.g. 00000: the label map holds " \
           "values that are neither a class index nor the ignore index (values [200]" in said
    _write(root / "train" / "Segmentation_labels" / "00002.png", np.zeros((128, 160), np.uint8))
    assert finetune_main(["check", "--config", config, f"data.root={root}"]) == 0  # one usable frame among them
    for png in (root / "train" / "Segmentation_labels").glob("*.png"):  # binary 0 / 255 masks, read as indices
        mask = np.zeros((128, 160), np.uint8)
        mask[40:60, 50:80] = 255
        _write(png, mask)
    assert "(train): its first 4 label maps hold only 0 and 255, the ignore index: every object pixel would be " \
           "ignored. Binary masks (0 / 255): set data.binary_labels=true" in refused()
    assert finetune_main(["check", "--config", config, f"data.root={root}", "data.binary_labels=true"]) == 0
    for png in (root / "train" / "Segmentation_labels").glob("*.png"):  # class indices with an ignored border
        label = np.zeros((128, 160), np.uint8)
        label[40:60, 50:80], label[:2] = 1, 255
        _write(png, label)
    assert finetune_main(["check", "--config", config, f"data.root={root}"]) == 0


@pytest.mark.parametrize("preset,folder,renamed,now,there,fix", [
    ("msrs_seg", "test", "val", "test", "train, val", "val"),
    ("flir_v2", "images_thermal_val", "images_thermal_test", "val", "test, train", "test")])
def test_a_split_folder_named_otherwise_is_pointed_at(preset, folder, renamed, now, there, fix, tmp_path, capsys):
    """Another release names its evaluation folder otherwise than the preset reads it."""
    from finetune.cli import main as finetune_main

    root = tmp_path / preset
    build_replica(preset, root)
    (root / folder).rename(root / renamed)
    config = str(PRESETS / f"{preset}.yaml")
    (tmp_path / "backbone.pth").touch()  # flir_v2's method, pad, needs one (check sees it is there, not more)
    weights = f"init.checkpoint={tmp_path / 'backbone.pth'}"
    assert finetune_main(["check", "--config", config, f"data.root={root}", weights]) == 2
    task = "det" if preset in DET else "seg"
    assert f"; the split folders in {root} are {there}: set data.split_dirs.val to one of them (now '{now}'; " \
           f"run.sh: --{task}-set data.split_dirs.val=...)" in capsys.readouterr().err
    assert finetune_main(["check", "--config", config, f"data.root={root}", f"data.split_dirs.val={fix}", weights]) == 0


def test_a_missing_split_of_a_dataset_without_one_names_the_command_that_writes_it(tmp_path, capsys):
    import shlex

    from data_tools.cli import main as data_main
    from finetune.cli import main as finetune_main

    root = tmp_path / "M3FD"
    build_replica("m3fd", root)
    for name in ("train.txt", "val.txt"):
        (root / name).unlink()
    config = str(PRESETS / "m3fd.yaml")
    capsys.readouterr()
    assert finetune_main(["check", "--config", config, f"data.root={root}"]) == 2
    said = capsys.readouterr().err
    command = said.split("`")[1]
    assert command == shlex.join(["python", "-m", "data_tools", "split", "--root", str(root), "--images", "Ir"])
    assert data_main(shlex.split(command)[3:]) == 0  # as printed, it writes the lists the preset reads
    assert finetune_main(["check", "--config", config, f"data.root={root}"]) == 0


def test_labels_that_name_none_of_the_classes_are_refused_before_any_work(tmp_path, capsys):
    """Trained on, boxes of no configured class would make every frame background: the check says
    which names the labels use instead."""
    from finetune.cli import main as finetune_main

    root = tmp_path / "flir"
    build_replica("flir_v2", root)
    config = str(PRESETS / "flir_v2.yaml")
    assert finetune_main(["check", "--config", config, f"data.root={root}", "model.method=full"]) == 0
    capsys.readouterr()
    assert finetune_main(["check", "--config", config, f"data.root={root}", "data.classes=[Person,Car]",
                          "model.method=full"]) == 2
    said = capsys.readouterr().err
    boxes = _boxes_of(_scenes(), [f"{i:05d}" for i in range(N_TRAIN)]) + 1  # and frame 0's dog
    assert f"(train): none of its {boxes} boxes has a class of data.classes ['Person', 'Car']: the labels name " in said
    assert "dog (1)" in said and "set data.classes to the names they use" in said
    for labels in (root / "images_thermal_val").glob("coco.json"):
        coco = json.loads(labels.read_text())
        labels.write_text(json.dumps(dict(coco, annotations=[])))
    assert finetune_main(["check", "--config", config, f"data.root={root}", "model.method=full"]) == 2
    assert f"(val): the labels in {root / 'images_thermal_val' / 'coco.json'} give no box to any of its " \
           f"{N_VAL} frames" in capsys.readouterr().err
    (root / "images_thermal_val" / "coco.json").write_text("{not json")
    assert finetune_main(["check", "--config", config, f"data.root={root}", "model.method=full"]) == 2
    assert "(val): the COCO file" in capsys.readouterr().err


def test_the_check_scores_objects_by_height_and_border_as_evaluation_does(tmp_path, capsys):
    """Before training, the check refuses a validation split none of whose objects evaluation
    would score: YOLO boxes (fractions of the frame) by their height in pixels, and any boxes by
    eval.border, from each frame's size; the limit that keeps one object is accepted."""
    from finetune.cli import main as finetune_main
    from finetune.data.det import ScoringLimits, scored_objects

    def checked(preset, root, *overrides):
        code = finetune_main(["check", "--config", str(PRESETS / f"{preset}.yaml"), f"data.root={root}",
                              *overrides])
        return code, capsys.readouterr().err

    yolo = tmp_path / "yolo"
    build_replica("yolo", yolo)
    cfg = load_config(PRESETS / "yolo.yaml", [f"data.root={yolo}"])
    resolve_classes(cfg)  # from its data.yaml, as the CLI does
    val = det_dataset(cfg, "val")[0]
    heights = [float(b[3] - b[1]) for r in val.records for b in r.boxes]
    code, said = checked("yolo", yolo, "model.method=full", f"eval.min_height={max(heights) + 1:g}")
    assert code == 2 and (f"yolo.yaml (val): none of its {len(heights)} objects would be scored: every one is under "
                          f"eval.min_height={max(heights) + 1:g} px tall (the tallest: {max(heights):g} px)") in said
    assert checked("yolo", yolo, "model.method=full", f"eval.min_height={max(heights):g}")[0] == 0

    kaist = tmp_path / "kaist"
    build_replica("kaist", kaist)
    cfg = load_config(PRESETS / "kaist.yaml", [f"data.root={kaist}", "eval.min_height=0", "eval.max_occlusion=null"])
    records = det_dataset(cfg, "val")[0].records
    inside = max(min(b[0], b[1], r.size[1] - b[2], r.size[0] - b[3]) for r in records for b in r.boxes)
    for border, scored in ((inside, 1), (inside + 0.5, 0)):  # the object farthest from the edges, then none
        limits = ScoringLimits(0.0, None, float(border))
        assert sum(int(scored_objects(r.boxes, r.occlusion, r.size, limits).sum()) for r in records) == scored
        code, said = checked("kaist", kaist, "eval.min_height=0", "eval.max_occlusion=null", f"eval.border={border}")
        assert code == (0 if scored else 2), said
    assert f"every one is within eval.border={inside + 0.5:g} px of the frame's edge; lower the limits" in said


def test_check_points_at_the_layout_one_or_two_folders_below_the_root_given(tmp_path, capsys):
    """A download often unpacks into a folder of its own (LLVIP-main/): check names it."""
    from finetune.cli import main as finetune_main

    config = str(PRESETS / "llvip.yaml")
    downloads = tmp_path / "downloads"
    build_replica("llvip", downloads / "archive" / "LLVIP-main")
    (downloads / "a_partial" / "infrared" / "train").mkdir(parents=True)  # sorts first, incomplete
    assert finetune_main(["check", "--config", config, f"data.root={downloads}"]) == 2
    err = capsys.readouterr().err
    assert f"(train): not found: {downloads / 'infrared' / 'train'}" in err
    assert f"The whole layout is under {downloads / 'archive' / 'LLVIP-main'}: use data.root=" in err
    assert finetune_main(["check", "--config", config, f"data.root={downloads / 'archive' / 'LLVIP-main'}"]) == 0
    assert finetune_main(["check", "--config", config, f"data.root={downloads / 'a_partial'}"]) == 2
    assert "The whole layout is under" not in capsys.readouterr().err  # nothing complete below: no guess
    # Training itself checks the same before the run directory is touched (was a traceback after
    # building the model, with the run directory claimed).
    run_dir = tmp_path / "run"
    res = run_finetune_cli("det", run_dir, config, f"data.root={downloads}")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"(train): not found: {downloads / 'infrared' / 'train'}" in res.stderr
    assert "The whole layout is under" in res.stderr and not run_dir.exists()


def test_eval_only_needs_the_validation_folders_alone(tmp_path):
    """Re-scoring a run needs its validation split, not the training one (e.g. on another machine)."""
    root = tmp_path / "MSRS"
    build_replica("msrs_seg", root)
    config, run_dir = PRESETS / "msrs_seg.yaml", tmp_path / "run"
    res = run_finetune_cli("seg", run_dir, config, f"data.root={root}", *_tiny("msrs_seg"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "the backbone starts from random init" in res.stderr  # ivtuning without init.checkpoint
    shutil.rmtree(root / "train")
    res = run_finetune_cli("seg", run_dir, config, f"data.root={root}", *_tiny("msrs_seg"), eval_only=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "random init" not in res.stderr  # the trained weights are what it scores
    res = run_finetune_cli("seg", tmp_path / "new", config, f"data.root={root}", *_tiny("msrs_seg"))
    assert res.returncode == 2 and f"(train): not found: {root / 'train'}" in res.stderr


def test_a_class_list_the_dataset_ships_in_another_order_is_refused(tmp_path, capsys):
    """YOLO label files hold class ids; data.classes typed in another order than the dataset's own
    classes.txt (LabelImg writes it into the label folder) would train every box of a class as
    another. A text class file is read as data.classes_file too, one name or `id name` per line."""
    from finetune.cli import main as finetune_main

    root = tmp_path / "msrs"
    build_replica("msrs_det", root)
    check = ["check", "--config", str(PRESETS / "msrs_det.yaml"), f"data.root={root}"]
    assert finetune_main(check) == 0
    capsys.readouterr()
    (root / "train" / "labels_ir" / "classes.txt").write_text("person\ncar\nbicycle\n")
    assert finetune_main(check) == 2
    said = capsys.readouterr().err
    assert ("(train): data.classes ['person', 'bicycle', 'car'] puts bicycle at id 1, but the dataset's "
            f"{root / 'train' / 'labels_ir' / 'classes.txt'} names the classes in id order ['person', 'car', "
            "'bicycle'] (bicycle at 2)") in said
    assert "Use data.classes_file=train/labels_ir/classes.txt (data.classes then picks among its names" in said
    (root / "train" / "labels_ir" / "classes.txt").write_text("person\nbike\nautomobile\n")  # renamed: kept
    assert finetune_main(check) == 0
    capsys.readouterr()
    (root / "classes.txt").write_text("0 person\n2 car\n1 bicycle\n")
    assert finetune_main(check + ["data.classes=[]", "data.classes_file=classes.txt"]) == 0
    assert "3 classes (from classes.txt): person, bicycle, car" in capsys.readouterr().out
