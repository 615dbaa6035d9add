"""Region proposals: the recall measure on hand-made boxes, every method's output contract on real
frames (8- and 16-bit), the cap, builds with each method, and the proposals-eval CLI."""
import json
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data_tools.imageio import read_frame
from data_tools.proposal_eval import LabelledFrame, MethodResult, _score_frame, format_misses, missed_tile
from data_tools.proposals import (
    PROPOSAL_METHODS,
    ProposalConfig,
    _ring_contrast,
    _touching_unions,
    box_iou,
    compute_proposals,
    greedy_nms,
    inside_texture,
    selective_search,
    thermal_blob_candidates,
    unique_boxes,
)
from tests.conftest import msrs_labelled_frames, plain_ring_statistics, proposal_overrides, shared_path


def _summary(gt, proposals, cap=None, method="selective_search"):
    result = MethodResult(method)
    frame = LabelledFrame("s", "f.png", np.zeros((480, 640), np.uint8), np.asarray(gt, np.float64).reshape(-1, 4))
    props = np.asarray(proposals, np.float64).reshape(-1, 4)
    _score_frame(result, frame, props, 0.01, len(props) if cap is None else cap)
    return result.summary()


def test_recall_counts_exact_hits_and_iou_just_above_or_below_the_threshold():
    gt = [[0, 0, 100, 100]]
    assert _summary(gt, [[0, 0, 100, 100]])["recall"]["iou_0.5"]["all"] == 1.0
    # Shifted right by s on a 100x100 box: IoU = (100 - s) / (100 + s); 0.5 at s = 100/3.
    assert _summary(gt, [[33, 0, 100, 100]])["recall"]["iou_0.5"]["all"] == 1.0  # IoU 0.5038
    assert _summary(gt, [[34, 0, 100, 100]])["recall"]["iou_0.5"]["all"] == 0.0  # IoU 0.4925
    # IoU 0.7: shift 17 -> 0.7094 (hit), 18 -> 0.6949 (miss); both hit at 0.5.
    for shift, hit7 in ((17, 1.0), (18, 0.0)):
        s = _summary(gt, [[shift, 0, 100, 100]])
        assert s["recall"]["iou_0.7"]["all"] == hit7 and s["recall"]["iou_0.5"]["all"] == 1.0
    assert _summary(gt, [])["recall"]["iou_0.5"]["all"] == 0.0
    # IoU exactly at the threshold is a hit ("at or above"): half the box, 0.5; 70 % of it, 0.7.
    assert _summary(gt, [[0, 0, 100, 50]])["recall"]["iou_0.5"]["all"] == 1.0
    assert _summary(gt, [[0, 0, 100, 70]])["recall"]["iou_0.7"]["all"] == 1.0
    assert box_iou(np.array([[0, 0, 100, 100]]), np.array([[33, 0, 100, 100]]))[0, 0] == pytest.approx(67 / 133)


def test_recall_by_size_bucket_and_ranked_curve():
    # sqrt(w h): 50 (40-96), 120 (96-192), 300 (192+)
    gt = [[0, 0, 50, 50], [100, 100, 120, 120], [300, 0, 300, 300]]
    proposals = [[100, 100, 120, 120], [0, 0, 50, 50], [0, 300, 60, 60]]  # the large object is missed
    s = _summary(gt, proposals, cap=2, method="thermal_blobs")
    assert s["objects_by_size"] == {"40-96": 1, "96-192": 1, "192+": 1}
    # A bucket holds its lower edge: sqrt(w h) = 96 is medium, 192 large
    edges = _summary([[0, 0, 96, 96], [0, 0, 192, 192]], [[0, 0, 96, 96]])
    assert edges["objects_by_size"] == {"40-96": 0, "96-192": 1, "192+": 1}
    assert edges["recall"]["iou_0.5"] == {"all": 0.5, "40-96": None, "96-192": 1.0, "192+": 0.0}
    assert s["recall"]["iou_0.5"] == {"all": pytest.approx(2 / 3, abs=1e-4), "40-96": 1.0, "96-192": 1.0, "192+": 0.0}
    assert s["proposals_per_frame"] == 2  # scored on the cap
    curve = s["recall_at_k_iou_0.5"]  # rank 0 finds the medium object, rank 1 the small one
    assert curve["1"] == pytest.approx(1 / 3, abs=1e-4) and curve["2"] == pytest.approx(2 / 3, abs=1e-4)
    # A hit beyond the cap counts in the curve, not in the headline recall.
    s = _summary(gt, proposals, cap=1, method="thermal_blobs")
    assert s["recall"]["iou_0.5"]["all"] == pytest.approx(1 / 3, abs=1e-4) and s["recall_at_k_iou_0.5"]["2"] > 0.6
    # The missed objects are listed: the small one has a box, ranked 2nd, past the cap of 1; the large
    # one none (its best kept box, the medium object's, does not overlap it).
    assert s["missed_iou_0.5"] == [
        {"source": "s", "path": "f.png", "box": [0.0, 0.0, 50.0, 50.0], "best_iou": 0.0, "best_box": None,
         "first_hit_rank": 2},
        {"source": "s", "path": "f.png", "box": [300.0, 0.0, 300.0, 300.0], "best_iou": 0.0, "best_box": None,
         "first_hit_rank": None}]
    assert format_misses(dict(s, cap=1)) == ("thermal_blobs: missed 2 of 3 objects at IoU 0.5; 1 of them found "
                                             "past the cap of 1 (rank 2)")
    near = _summary(gt, [[300, 300, 9, 9], [20, 0, 50, 50]], cap=2)["missed_iou_0.5"][0]
    assert near["best_iou"] == pytest.approx(0.429, abs=1e-3) and near["best_box"] == [20.0, 0.0, 50.0, 50.0]
    # Its tile: the frame around both boxes, the object's green and the kept box red, a label above.
    frame = np.zeros((480, 640), np.uint8)
    tile = missed_tile(frame, near, height=160)
    assert tile.shape[0] == 18 + 160 and tile.dtype == np.uint8
    body = tile[18:]
    assert ((body[..., 1] == 200) & (body[..., 2] == 0)).any() and ((body[..., 2] == 255) & (body[..., 1] == 0)).any()


def test_eval_speed_leaves_out_the_first_call_of_each_method(monkeypatch):
    """The first call in a process pays one-time costs; the frames/s figure must not carry them.
    A fake clock advances only inside a fake proposal step: 5 s on its first call per method, then
    0.1 s a frame."""
    import data_tools.proposal_eval as proposal_eval

    clock, calls = [0.0], {}

    def fake_proposals(image, cfg, overlay=None):
        calls[cfg.method] = calls.get(cfg.method, 0) + 1
        clock[0] += 5.0 if calls[cfg.method] == 1 else 0.1
        return np.array([[0, 0, 50, 50]], np.float64)

    monkeypatch.setattr(proposal_eval, "compute_proposals", fake_proposals)
    monkeypatch.setattr(proposal_eval.time, "perf_counter", lambda: clock[0])
    frames = [LabelledFrame("s", f"{i}.png", np.zeros((64, 64), np.uint8), np.array([[0.0, 0, 50, 50]]))
              for i in range(4)]
    base = ProposalConfig()
    configs = {m: replace(base, method=m) for m in ("thermal_blobs", "selective_search")}
    results = proposal_eval.evaluate(iter(frames), configs, cap=50)  # frames stream through, once
    for name, result in results.items():
        assert calls[name] == 5 and result.frames == 4
        assert result.seconds == pytest.approx(0.4)  # four timed frames, the first call left out
        assert result.summary()["frames_per_second_one_core"] == pytest.approx(10.0)


def test_eval_keeps_pictures_of_the_first_missed_objects_only(monkeypatch):
    import data_tools.proposal_eval as proposal_eval

    monkeypatch.setattr(proposal_eval, "compute_proposals",
                        lambda image, cfg, overlay=None: np.array([[0, 0, 50, 50]], np.float64))
    frames = (LabelledFrame("s", f"{i}.png", np.zeros((64, 128), np.uint8), np.array([[60.0, 0, 50, 50]] * 2))
              for i in range(3))  # two objects a frame, none found
    results = proposal_eval.evaluate(frames, {"thermal_blobs": ProposalConfig()}, cap=50, missed_tiles=3)
    result = results["thermal_blobs"]
    assert len(result.missed) == 6 and [m["path"] for m in result.missed[:3]] == ["0.png", "0.png", "1.png"]
    assert len(result.tiles) == 3 and all(t.shape[0] == 18 + 160 for t in result.tiles)


def test_greedy_nms_keeps_the_best_and_stops_at_the_limit():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 10, 10], [0, 0, 40, 40]], np.float64)
    scores = np.array([1.0, 2.0, 0.5, 0.5])
    assert greedy_nms(boxes, scores, 0.5, 10).tolist() == [1, 3, 2]  # 0 overlaps 1; ties by box: (0,0,40,40) first
    assert greedy_nms(boxes, scores, 0.5, 2).tolist() == [1, 3]


@pytest.fixture(scope="module")
def real_frames():
    frames = [read_frame(str(shared_path("msrs20", "ir", f"{n}.png"))).image for n in ("00004N", "00081D")]
    frames.append(read_frame(str(shared_path("roadscene", "cropinfrared", "FLIR_00006.jpg"))).image)
    # A 16-bit version of a real frame (radiometric-like range around a warm offset).
    frames.append((frames[0].astype(np.uint16) * 40 + 20000).astype(np.uint16))
    return frames


@pytest.mark.parametrize("method", PROPOSAL_METHODS.names())
def test_each_method_returns_unique_in_image_filtered_deterministic_boxes(method, real_frames, msrs_ranker):
    cfg = ProposalConfig(**proposal_overrides(method, msrs_ranker))
    for image in real_frames:
        boxes = compute_proposals(image, cfg)
        h, w = image.shape
        assert boxes.dtype == np.int32 and boxes.shape[1] == 4 and len(boxes) > 0
        assert len(np.unique(boxes, axis=0)) == len(boxes)
        x, y, bw, bh = boxes.T
        assert (x >= 0).all() and (y >= 0).all() and (x + bw <= w).all() and (y + bh <= h).all()
        assert (bw >= 40).all() and (bh >= 40).all() and (np.maximum(bw / bh, bh / bw) <= 3).all()
        assert (bw * bh >= 600).all()
        if PROPOSAL_METHODS.get(method).ranked:
            assert len(boxes) <= cfg.max_proposals
        else:
            assert (np.lexsort(boxes.T[::-1]) == np.arange(len(boxes))).all()  # sorted
        assert np.array_equal(compute_proposals(image, cfg), boxes)  # same frame, same boxes


def test_16_bit_frames_see_the_8_bit_normalisation(real_frames):
    """A 16-bit frame goes through to_unit_intensity; an affine 16-bit copy of an 8-bit frame
    gives proposals that still land on its objects (the person of 00004N)."""
    person = np.array([[509.0, 204.0, 53.0, 143.0]])
    boxes = compute_proposals(real_frames[3], ProposalConfig())
    assert box_iou(person, boxes).max() >= 0.5


@pytest.mark.parametrize("cap", [1, 5, 20])
def test_cap_keeps_the_highest_ranked_boxes(cap, real_frames):
    full = compute_proposals(real_frames[0], ProposalConfig(max_proposals=100))
    capped = compute_proposals(real_frames[0], ProposalConfig(max_proposals=cap))
    assert len(full) > cap and np.array_equal(capped, full[:cap])


def test_bad_proposal_settings_are_refused():
    with pytest.raises(ValueError, match=r"proposals.method must be one of \('selective_search', 'thermal_blobs', "
                                         r"'thermal_blobs_fitted'\), got 'edge_boxes_v9'"):
        ProposalConfig(method="edge_boxes_v9")
    with pytest.raises(ValueError, match="max_proposals"):
        ProposalConfig(max_proposals=0)
    with pytest.raises(ValueError, match="one value each"):
        ProposalConfig(blob_sides=(320,), blob_backgrounds=(0.1, 0.2))
    for views in ((), ("linear", "gamma")):
        with pytest.raises(ValueError, match="blob_views must be one or more of"):
            ProposalConfig(blob_views=views)


def test_unique_boxes_and_touching_unions_match_the_plain_definitions():
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.integers(0, 300, (400, 2)), rng.integers(1, 40, (400, 2))], axis=1)
    boxes = np.concatenate([boxes, boxes[:50]])  # duplicates
    assert np.array_equal(unique_boxes(boxes), np.unique(boxes, axis=0))
    far = np.concatenate([boxes, [[0, 40_000, 50, 50], [0, 40_000, 50, 50], [-5, 0, 50, 50]]])  # beyond the key
    assert np.array_equal(unique_boxes(far), np.unique(far, axis=0))
    unions = _touching_unions(boxes[:400], 2)
    expected = []
    for i in range(400):
        for j in range(i + 1, 400):
            a, b = boxes[i], boxes[j]
            gap_x = max(a[0], b[0]) - min(a[0] + a[2], b[0] + b[2])
            gap_y = max(a[1], b[1]) - min(a[1] + a[3], b[1] + b[3])
            if gap_x <= 2 and gap_y <= 2:
                x0, y0 = min(a[0], b[0]), min(a[1], b[1])
                expected.append([x0, y0, max(a[0] + a[2], b[0] + b[2]) - x0, max(a[1] + a[3], b[1] + b[3]) - y0])
    assert len(expected) > 50 and np.array_equal(np.unique(unions, axis=0), np.unique(expected, axis=0))
    for block in (1, 7, 64):  # rows compared block by block: the same pairs
        assert np.array_equal(np.unique(_touching_unions(boxes[:400], 2, block), axis=0), np.unique(expected, axis=0))


def test_ring_contrast_on_a_hand_made_frame():
    image = np.zeros((100, 100), np.float32)
    image[40:60, 40:60] = 10.0
    boxes = np.array([[40, 40, 20, 20], [0, 0, 100, 100], [0, 0, 20, 20]], np.float64)
    contrast = _ring_contrast(image, boxes)
    assert contrast[0] == pytest.approx(10.0)  # the square against a dark ring 5 px wide
    assert contrast[1] == 0.0  # the whole frame: no ring to stand out from
    assert contrast[2] == pytest.approx(0.0)  # dark corner, dark ring


def test_the_equalised_view_finds_a_parked_car_the_linear_view_misses():
    """00051N (a held-out frame): a parked car at ambient temperature, cut by the frame's edge.
    No linear-view candidate overlaps it by 0.5; the histogram-equalised view finds it."""
    image = read_frame(str(shared_path("msrs20", "ir", "00051N.png"))).image
    car = np.array([[1.0, 145.0, 264.0, 257.0]])
    linear = compute_proposals(image, ProposalConfig(blob_views=("linear",), max_proposals=10_000))
    both = compute_proposals(image, ProposalConfig())
    assert box_iou(car, linear).max() < 0.5 <= box_iou(car, both).max()


@pytest.mark.parametrize("method", PROPOSAL_METHODS.names())
def test_build_with_each_method_writes_readable_shards(method, tmp_path, msrs_ranker):
    from data_tools.build import build_shards
    from data_tools.cli import DEFAULT_BUILD_CONFIG
    from data_tools.config import load_config
    from data_tools.shards import decode_sample, iter_shard
    from data_tools.sources import Source

    root = shared_path("msrs20", "ir")
    cfg = load_config(DEFAULT_BUILD_CONFIG, [f"proposals.{k}={'null' if v is None else v}"
                                             for k, v in proposal_overrides(method, msrs_ranker).items()])
    manifest = build_shards([Source("msrs", str(root), stride=5)], cfg, tmp_path / "out", workers=1, progress=False)
    assert manifest["totals"]["written"] == 4
    samples = [decode_sample(m) for e in manifest["shards"] for _, m in iter_shard(str(tmp_path / "out" / e["shard"]))]
    assert len(samples) == 4
    for image, proposals, meta in samples:
        assert meta["proposals_method"] == method and len(proposals) == meta["proposals_from_method"] > 0
        assert image.shape == (480, 640)


def _eval_by_method(sources, out_dir, *extra):
    """Run ``proposals-eval`` as a user would; its JSON summaries by method."""
    from data_tools.cli import main

    assert main(["proposals-eval", "--sources", str(sources), "--out", str(out_dir), *extra]) == 0
    return {s["method"]: s for s in json.loads((out_dir / "proposals_eval.json").read_text())}


def test_proposals_eval_cli_on_msrs(tmp_path, capsys):
    from data_tools.cli import main

    root = shared_path("msrs20")
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"""
sources:
  - name: msrs
    root: {root / 'ir'}
    boxes: {{format: yolo, path: {root / 'labels_ir'}, classes: [person, bicycle, car]}}
""")
    summaries = _eval_by_method(sources, tmp_path / "eval", "--every", "2", "--offset", "1")
    out = capsys.readouterr().out
    assert "thermal_blobs" in out and "selective_search" in out and "recall@.5" in out
    blobs, ss = summaries["thermal_blobs"], summaries["selective_search"]
    assert blobs["frames"] == ss["frames"] == 10 and blobs["objects"] == 17  # the odd frames' objects >= 40 px
    assert blobs["proposals_per_frame"] <= 50
    assert blobs["recall"]["iou_0.5"]["all"] >= 0.9  # held-out frames (the design used the even ones)
    assert blobs["recall"]["iou_0.5"]["all"] > ss["recall"]["iou_0.5"]["all"]
    row = next(line.split() for line in out.splitlines() if line.startswith("thermal_blobs"))
    assert row[1:4] == ["10", "17", str(blobs["found_iou_0.5"])]  # frames, objects, found: recall's granularity
    missed = blobs["missed_iou_0.5"]  # each missed object named by its frame, and said on the console
    assert len(missed) == 17 - blobs["found_iou_0.5"] and all(m["path"].endswith(".png") for m in missed)
    assert f"thermal_blobs: missed {len(missed)} of 17 objects at IoU 0.5" in out
    import cv2

    sheet = cv2.imread(str(tmp_path / "eval" / "missed_selective_search.png"))  # a tile per miss, 5 a row
    rows = -(-min(len(ss["missed_iou_0.5"]), 30) // 5)
    assert sheet is not None and sheet.shape[0] == rows * (18 + 160 + 4)
    assert (tmp_path / "eval" / "missed_thermal_blobs.png").exists() == bool(missed)
    assert (tmp_path / "eval" / "recall_vs_proposals.png").stat().st_size > 1000
    assert main(["proposals-eval", "--sources", str(sources), "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled.yaml"
    unlabelled.write_text(f"sources:\n  - name: ir\n    root: {root / 'ir'}\n")
    assert main(["proposals-eval", "--sources", str(unlabelled)]) == 2
    assert "no labelled frames" in capsys.readouterr().err


def test_eval_gives_each_source_its_own_figures(tmp_path, capsys):
    """Sources pooled in one evaluation (several cameras, or day and night) each get their objects,
    found and recall, in the JSON and on the console; they add up to the pooled figures."""
    root = shared_path("msrs20")
    sources = tmp_path / "sources.yaml"
    sources.write_text("sources:\n" + "".join(
        f"  - {{name: {name}, root: {root / 'ir'}, glob: '*{suffix}.png', "
        f"boxes: {{format: yolo, path: {root / 'labels_ir'}}}}}\n" for name, suffix in (("day", "D"), ("night", "N"))))
    blobs = _eval_by_method(sources, tmp_path / "eval", "--methods", "thermal_blobs")["thermal_blobs"]
    out = capsys.readouterr().out
    by_source = blobs["by_source"]
    assert sorted(by_source) == ["day", "night"] and all(s["frames"] > 0 for s in by_source.values())
    assert sum(s["frames"] for s in by_source.values()) == blobs["frames"]
    assert sum(s["objects"] for s in by_source.values()) == blobs["objects"] == 29
    assert sum(s["found_iou_0.5"] for s in by_source.values()) == blobs["found_iou_0.5"]
    for name, s in by_source.items():
        assert s["recall_iou_0.5"] == round(s["found_iou_0.5"] / s["objects"], 4)
        assert f"thermal_blobs on {name}: {s['found_iou_0.5']} of {s['objects']} objects" in out


def test_an_unreadable_labelled_frame_is_left_out_and_named_by_eval_and_fit(tmp_path, capsys):
    import shutil

    from data_tools.cli import main as data_main

    msrs = shared_path("msrs20")
    (tmp_path / "ir").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("00004N", "00016N", "00028N"):
        shutil.copy(msrs / "ir" / f"{name}.png", tmp_path / "ir")
        shutil.copy(msrs / "labels_ir" / f"{name}.txt", tmp_path / "labels")
    (tmp_path / "ir" / "00016N.png").write_bytes((msrs / "ir" / "00016N.png").read_bytes()[:3000])  # cut short
    (tmp_path / "s.yaml").write_text("sources:\n  - {name: m, root: ir, boxes: {format: yolo, path: labels}}\n")
    assert data_main(["proposals-eval", "--sources", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "eval"),
                      "--methods", "thermal_blobs"]) == 0
    said = capsys.readouterr()
    assert "warning: left out 1 labelled frame(s) that could not be read" in said.err
    assert "00016N.png: truncated" in said.err
    [summary] = json.loads((tmp_path / "eval" / "proposals_eval.json").read_text())
    assert summary["frames"] == 2 and [u["path"] for u in summary["unreadable_frames"]] == ["00016N.png"]
    assert data_main(["proposals-fit", "--sources", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "r.json")]) == 0
    assert "left out 1 labelled frame(s) that could not be read" in capsys.readouterr().err


def test_ignore_regions_are_not_objects_to_find_nor_examples_to_fit(tmp_path, capsys):
    """A COCO crowd box, a box flagged `ignore` (pedestrian sets converted to COCO) and a box of a
    class the source names in `ignore_classes` (KAIST's `people`) are regions, not objects:
    proposals-eval leaves them out of recall and counts them apart, and proposals-fit learns nothing
    from the candidates on them that hit no object."""
    import shutil

    from data_tools.proposal_ranker import fit_weights, frame_candidates, labelled_grey_frames
    from data_tools.sources import load_sources

    msrs = shared_path("msrs20")
    (tmp_path / "ir").mkdir()
    names = ("00004N", "00016N", "00028N")
    images, annotations = [], []
    for i, name in enumerate(names):
        shutil.copy(msrs / "ir" / f"{name}.png", tmp_path / "ir")
        images.append({"id": i, "file_name": f"{name}.png", "width": 640, "height": 480})
        rows = np.loadtxt(msrs / "labels_ir" / f"{name}.txt", ndmin=2)
        boxes = [[(cx - w / 2) * 640, (cy - h / 2) * 480, w * 640, h * 480] for _, cx, cy, w, h in rows]
        largest = int(np.argmax([w * h for _, _, w, h in boxes]))
        for k, box in enumerate(boxes):  # the largest box: a crowd, flagged, of a class named to ignore
            flag = ({0: {"iscrowd": 1}, 1: {"ignore": 1}, 2: {"category_id": 2}}[i] if k == largest else {})
            annotations.append({"image_id": i, "bbox": box, "category_id": 1, **flag})
    (tmp_path / "a.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "object"}, {"id": 2, "name": "people"}]}))
    (tmp_path / "yolo").mkdir()
    for name in names:
        shutil.copy(msrs / "labels_ir" / f"{name}.txt", tmp_path / "yolo")
    for fmt, path in (("coco", "a.json"), ("yolo", "yolo")):
        (tmp_path / f"{fmt}.yaml").write_text(f"sources:\n  - {{name: m, root: ir, boxes: {{format: {fmt}, "
                                             f"path: {path}, ignore_classes: [people]}}}}\n")
    coco = _eval_by_method(tmp_path / "coco.yaml", tmp_path / "eval_coco", "--methods", "thermal_blobs")
    said = capsys.readouterr().out
    every = _eval_by_method(tmp_path / "yolo.yaml", tmp_path / "eval_yolo", "--methods", "thermal_blobs")
    blobs, plain = coco["thermal_blobs"], every["thermal_blobs"]
    assert blobs["ignore_regions"] == {"class people": 1, "crowd": 1, "ignore flag": 1}
    assert plain["ignore_regions"] == {}  # YOLO's labels are 0-2 here: no `people`
    assert blobs["objects"] == plain["objects"] - 3  # the three largest boxes, all >= 40 px on a side
    assert "not counted as objects: 3 ignore region(s) (class people 1, crowd 1, ignore flag 1)" in said
    [coco_frames, yolo_frames] = [list(labelled_grey_frames(load_sources(tmp_path / f"{f}.yaml"), find_overlays=False))
                                  for f in ("coco", "yolo")]
    assert [len(ignored) for _, _, ignored in coco_frames] == [1, 1, 1]
    with_regions = frame_candidates(coco_frames, ProposalConfig())
    as_objects = frame_candidates(yolo_frames, ProposalConfig())
    for regions, objects in zip(with_regions, as_objects):
        on_region_only = objects.hits & ~regions.hits  # hit the region's box, and no other object
        assert np.array_equal(regions.in_fit, ~on_region_only)
    assert sum((~t.in_fit).sum() for t in with_regions) > 0
    assert all(t.in_fit.all() for t in as_objects)
    left_out = [replace(t, boxes=t.boxes[t.in_fit], scores=t.scores[t.in_fit], features=t.features[t.in_fit],
                        hits=t.hits[t.in_fit], in_fit=t.in_fit[t.in_fit]) for t in with_regions]
    fit, fit_without = fit_weights(with_regions, 0.01), fit_weights(left_out, 0.01)
    assert np.allclose(fit["weights"], fit_without["weights"]) and np.isclose(fit["bias"], fit_without["bias"])


def test_replace_keeps_a_valid_config():
    cfg = replace(ProposalConfig(), method="selective_search")
    assert cfg.method == "selective_search" and cfg.blob_closings == ((3, 3), (3, 9), (7, 7), (3, 15))


def test_ranked_boxes_stay_inside_odd_sized_frames():
    """Boxes from the working scale are rounded by their corners: rounding x and w apart ended a
    box one pixel outside a 363-pixel-wide SIRST frame."""
    paths = sorted(shared_path("roadscene", "cropinfrared").glob("*.jpg"))[::9]
    paths += sorted(shared_path("sirst", "images").glob("*.png"))[::9]
    for path in paths:
        image = read_frame(str(path)).image
        boxes = compute_proposals(image, ProposalConfig())
        h, w = image.shape
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= w).all() and \
            (boxes[:, 1] + boxes[:, 3] <= h).all(), path.name


def test_texture_inside_a_box_raises_an_object_above_smooth_regions_of_equal_contrast():
    """Daytime frames: smooth warm bands (sky against trees) out-contrast small objects; objects
    carry structure inside. The score is the contrast-and-size score x (1 + weight x texture)."""
    rng = np.random.default_rng(0)
    frame = np.full((240, 320), 80, np.uint8)
    frame[10:80, 20:200] = 150  # a smooth band
    obj = np.full((50, 40), 150, np.uint8)
    obj[::6] = 90  # an object as warm, with structure
    frame[150:200, 240:280] = obj
    frame = np.clip(frame + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)
    texture = inside_texture(frame, np.array([[20, 10, 180, 70], [240, 150, 40, 50]], float))
    assert texture[1] > 3 * texture[0]
    plain, textured = ProposalConfig(blob_texture_weight=0), ProposalConfig(blob_texture_weight=2)
    boxes, scores = thermal_blob_candidates(frame, plain)
    boxes2, scores2 = thermal_blob_candidates(frame, textured)
    np.testing.assert_array_equal(boxes, boxes2)
    np.testing.assert_allclose(scores2, scores * (1 + 2 * inside_texture(frame, boxes)))

    def object_rank(cfg):
        found = box_iou(compute_proposals(frame, cfg).astype(float), np.array([[240, 150, 40, 50]], float))[:, 0]
        return int(np.flatnonzero(found >= 0.5)[0])

    assert object_rank(textured) < object_rank(plain)


def test_roadscene_boxes_load_and_thermal_blobs_hold_on_another_camera(tmp_path):
    """The hand-drawn boxes shipped in bench/ (FLIR frames, never used in the design) load through
    the CLI, and thermal_blobs keeps most of its recall on that camera."""
    import yaml

    shipped = Path(__file__).resolve().parents[1] / "bench" / "roadscene_boxes" / "sources.yaml"
    spec = yaml.safe_load(shipped.read_text())["sources"][0]
    # As shipped, the frames are read from ../shared beside the repo; here wherever the tests find them.
    assert Path(spec["root"]).parts[-4:] == ("shared", "data", "roadscene", "cropinfrared")
    spec["root"] = str(shared_path("roadscene", "cropinfrared"))
    spec["boxes"]["path"] = str(shipped.parent / spec["boxes"]["path"])
    sources = tmp_path / "sources.yaml"
    sources.write_text(yaml.safe_dump({"sources": [spec]}))
    summaries = _eval_by_method(sources, tmp_path / "eval")
    blobs, ss = summaries["thermal_blobs"], summaries["selective_search"]
    assert blobs["frames"] == ss["frames"] == 61 and blobs["objects"] == 102  # 105 boxes, 102 with both sides >= 40 px
    assert blobs["proposals_per_frame"] <= 50
    # 87 of 102 (81 without the texture weight, blob_texture_weight=0; selective search 41).
    assert blobs["recall"]["iou_0.5"]["all"] >= 0.83 > ss["recall"]["iou_0.5"]["all"] + 0.3


def _found(frames, transform) -> int:
    """Objects the default finds on the transformed frames, scored as proposals-eval scores them."""
    from data_tools.proposal_eval import evaluate

    cfg = ProposalConfig()
    labelled = (LabelledFrame("msrs", str(i), transform(grey), objects) for i, (grey, objects, _) in enumerate(frames))
    return evaluate(labelled, {cfg.method: cfg}, cfg.max_proposals)[cfg.method].summary()["found_iou_0.5"]


def test_thermal_blobs_find_objects_on_black_hot_and_low_contrast_frames():
    """Cameras differ in polarity (black-hot palettes) and in how much of the 8-bit range their
    automatic gain uses: the default looks for warmer and colder blobs in views of the frame's own
    range, so the 20 MSRS frames give the same objects either way (25 of 29; BENCHMARKS.md)."""
    frames = msrs_labelled_frames(every=1)
    assert sum(len(objects) for _, objects, _ in frames) == 29
    white_hot = _found(frames, lambda g: g)
    assert white_hot >= 24
    assert _found(frames, lambda g: 255 - g) >= white_hot - 1
    assert _found(frames, lambda g: (g.astype(np.float64) * 0.4 + 80).round().astype(np.uint8)) >= white_hot - 1


def test_selective_search_without_opencv_contrib_is_refused_before_any_frame(tmp_path, monkeypatch, capsys):
    """Another OpenCV package installed over opencv-contrib-python-headless (opencv-python, which many
    tools pull in) leaves cv2 with an empty ximgproc: selective search failed at its first frame with
    an AttributeError. Now the config says so, with the fix; proposals-eval evaluates the others and
    says which it left out and why."""
    import cv2

    from data_tools.cli import main
    from data_tools.proposal_eval import runnable_methods

    monkeypatch.setattr(cv2, "ximgproc", types.SimpleNamespace(), raising=False)
    with pytest.raises(ValueError, match=r"proposals.method=selective_search needs OpenCV's contrib modules, which "
                                         r"this cv2 \(.*\) lacks.*opencv-contrib-python-headless"):
        ProposalConfig(method="selective_search")
    left_out: dict = {}
    assert runnable_methods(ProposalConfig(), left_out) == ["thermal_blobs"]
    assert sorted(left_out) == ["selective_search", "thermal_blobs_fitted"]
    root = shared_path("msrs20")
    first = sorted((root / "ir").iterdir())[0].name
    sources = tmp_path / "s.yaml"
    sources.write_text(f"sources:\n  - name: ir\n    root: {root / 'ir'}\n    globs: [{first}]\n"
                       f"    boxes: {{format: yolo, path: {root / 'labels_ir'}}}\n")
    assert list(_eval_by_method(sources, tmp_path / "eval")) == ["thermal_blobs"]
    assert ("not evaluated: selective_search: proposals.method=selective_search needs OpenCV's contrib"
            in capsys.readouterr().err)
    assert main(["build", "--source", f"ir={root / 'ir'}", "--out", str(tmp_path / "shards"),
                 "proposals.method=selective_search"]) == 2
    assert "needs OpenCV's contrib modules" in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()


def test_a_box_at_exactly_the_threshold_is_found_in_each_figure_and_an_unranked_method_has_no_curve():
    s = _summary([[0, 0, 100, 100]], [[0, 0, 100, 50]])  # IoU 0.5 exactly
    assert s["missed_iou_0.5"] == [] and s["found_iou_0.5"] == 1
    assert s["by_source"] == {"s": {"frames": 1, "objects": 1, "found_iou_0.5": 1, "recall_iou_0.5": 1.0}}
    assert s["recall_at_k_iou_0.5"] is None  # selective search keeps its boxes unranked: no first k


def test_an_unranked_method_is_scored_on_all_its_boxes_a_ranked_one_on_the_cap(monkeypatch):
    """PAD keeps every selective-search box (no cap applies); a ranked method keeps its first ``cap``.
    OpenCV's thread count is the caller's again afterwards."""
    import cv2

    import data_tools.proposal_eval as proposal_eval

    boxes = np.array([[300, 300, 50, 50], [200, 200, 50, 50], [0, 0, 50, 50]], np.float64)  # the hit ranked last
    monkeypatch.setattr(proposal_eval, "compute_proposals", lambda image, cfg, overlay=None: boxes)
    frames = [LabelledFrame("s", "f.png", np.zeros((480, 640), np.uint8), np.array([[0.0, 0, 50, 50]]))]
    configs = {m: replace(ProposalConfig(), method=m) for m in ("selective_search", "thermal_blobs")}
    threads = cv2.getNumThreads()
    cv2.setNumThreads(3)
    try:
        results = proposal_eval.evaluate(iter(frames), configs, cap=2)
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(threads)
    unranked, ranked = results["selective_search"].summary(), results["thermal_blobs"].summary()
    assert (unranked["found_iou_0.5"], unranked["proposals_per_frame"]) == (1, 3)
    assert (ranked["found_iou_0.5"], ranked["proposals_per_frame"]) == (0, 2)
    assert ranked["recall_at_k_iou_0.5"]["2"] == 0.0 and ranked["recall_at_k_iou_0.5"]["3"] == 1.0


def test_ranked_methods_propose_past_the_cap_for_the_curve_and_the_split_is_checked():
    from data_tools.proposal_eval import labelled_frames, method_configs

    configs = method_configs(ProposalConfig(max_proposals=50), ["thermal_blobs", "selective_search"], max_k=100)
    assert configs["thermal_blobs"].max_proposals == 100 and configs["selective_search"].max_proposals == 50
    wider = method_configs(ProposalConfig(max_proposals=120), ["thermal_blobs"], max_k=100)
    assert wider["thermal_blobs"].max_proposals == 120
    for every, offset in ((2, 2), (2, -1), (0, 0)):
        with pytest.raises(ValueError, match=f"--every {every} --offset {offset}"):
            next(labelled_frames([], every=every, offset=offset))


def test_the_console_says_sources_and_ignore_regions_only_where_there_is_something_to_tell():
    from data_tools.proposal_eval import format_by_source, format_ignored

    one = {"method": "m", "by_source": {"a": {"frames": 2, "objects": 3, "found_iou_0.5": 2, "recall_iou_0.5": 0.6667}}}
    assert format_by_source(one) == ""
    two = {"method": "m", "by_source": {**one["by_source"], "b": {"frames": 1, "objects": 0, "found_iou_0.5": 0,
                                                                     "recall_iou_0.5": None}}}
    assert format_by_source(two) == "m on a: 2 of 3 objects (0.667), 2 frames\nm on b: 0 of 0 objects (-), 1 frames"
    assert format_ignored({"ignore_regions": {}}) == "" and format_ignored({}) == ""


def test_eval_reads_a_frame_as_the_build_does_with_its_border_crop_and_names_the_ranker_it_used(msrs_ranker):
    from data_tools.files import sha256_file
    from data_tools.proposal_eval import labelled_frames, run
    from data_tools.sources import source_from_dict

    root = shared_path("msrs20")
    entry = {"name": "m", "root": str(root / "ir"), "glob": ["00004N.png"],
             "boxes": {"format": "yolo", "path": str(root / "labels_ir")}}
    [whole] = labelled_frames([source_from_dict(entry, root)])
    [cropped] = labelled_frames([source_from_dict({**entry, "border_crop": [10, 20, 30, 40]}, root)])
    assert cropped.image.shape == (480 - 30, 640 - 70)
    assert np.array_equal(cropped.image, whole.image[10:-20, 30:-40])
    [summary] = run([source_from_dict(entry, root)], ProposalConfig(method="thermal_blobs_fitted",
                                                                    ranker=str(msrs_ranker)),
                    ["thermal_blobs_fitted"], None)
    assert summary["ranker"] == {"path": str(msrs_ranker), "sha256": sha256_file(msrs_ranker)}


def test_selective_search_on_a_reduced_copy_gives_boxes_in_frame_pixels():
    """``proposals.max_side`` runs selective search on a smaller copy; its boxes come back scaled to
    the frame: the one bright object is still found where it is, and no box leaves the frame."""
    import cv2

    frame = np.full((480, 640), 60, np.uint8)
    cv2.rectangle(frame, (400, 200), (519, 359), 200, -1)  # 120 x 160 at (400, 200)
    frame = cv2.GaussianBlur(frame, (0, 0), 1)
    for max_side in (None, 320, 160):
        boxes = selective_search(frame, ProposalConfig(method="selective_search", max_side=max_side))
        assert box_iou(np.array([[400, 200, 120, 160]]), boxes).max() > 0.9, max_side
        assert (boxes[:, 0] + boxes[:, 2]).max() == 640 and (boxes[:, 1] + boxes[:, 3]).max() == 480


def test_box_helpers_at_their_edges():
    from data_tools.proposals import filter_mask, round_to_image

    big = np.array([[0, 40_000, 50, 50], [0, 40_000, 50, 50], [70_000, 0, 40, 40]])  # beyond the packed key
    assert unique_boxes(big).tolist() == [[0, 40_000, 50, 50], [70_000, 0, 40, 40]]
    # Past the key's 15 bits but nothing else sending them the slow way: a field would spill into the next.
    assert unique_boxes(big[:2]).tolist() == [[0, 40_000, 50, 50]]
    assert unique_boxes(np.array([[1 << 15, 0, 40, 40]])).tolist() == [[1 << 15, 0, 40, 40]]
    cfg = ProposalConfig()
    boxes = np.array([[0, 0, 40, 120], [0, 0, 40, 121], [0, 0, 39, 60], [0, 0, 60, 39], [0, 0, 50, 50]])
    assert filter_mask(boxes, cfg).tolist() == [True, False, False, False, True]  # aspect 3 is kept
    assert filter_mask(boxes, replace(cfg, min_region_pixels=2500)).tolist() == [True, False, False, False, True]
    assert filter_mask(boxes, replace(cfg, min_region_pixels=4801)).tolist() == [False, False, False, False, False]
    # Corners rounded, not sides: x 10.4 + w 20.4 ends at 30.8 -> 31, so w is 21; then cut to the frame.
    assert round_to_image(np.array([[10.4, 5.0, 20.4, 10.0], [-3.0, 90.0, 20.0, 20.0]]), 100, 100).tolist() == \
        [[10, 5, 21, 10], [0, 90, 17, 10]]
    # Boxes of no area overlap nothing (0, not 0/0); a box overlapping another by exactly the NMS
    # threshold survives it (suppressed only above).
    assert box_iou(np.zeros((1, 4)), np.zeros((2, 4))).tolist() == [[0.0, 0.0]]
    pair = np.array([[0, 0, 100, 100], [0, 0, 100, 50]], np.float64)  # IoU 0.5
    assert greedy_nms(pair, np.array([2.0, 1.0]), 0.5, 10).tolist() == [0, 1]
    assert greedy_nms(pair, np.array([2.0, 1.0]), 0.49, 10).tolist() == [0]


def test_a_one_pixel_wide_box_has_a_ring_on_every_side_and_disabled_proposals_are_none(real_frames):
    frame = np.zeros((9, 9), np.uint8)
    frame[:, 4] = 200  # a warm pole, one pixel wide
    # The box on the pole, rows 2-6: its ring is at least a pixel on each side (columns 3 and 5, rows 1
    # and 7: 16 pixels, 2 of them on the pole), not only above and below it.
    assert _ring_contrast(frame, np.array([[4.0, 2.0, 1.0, 5.0]]))[0] == pytest.approx(200 - 400 / 16)
    assert len(compute_proposals(real_frames[0], ProposalConfig())) > 0
    assert compute_proposals(real_frames[0], ProposalConfig(enabled=False)).shape == (0, 4)


def test_a_candidates_score_is_the_documented_product_at_every_working_scale(real_frames):
    """Each configured working scale gives candidates; a candidate's score is its ring contrast in each
    view over that view's spread, summed, times sqrt(area) ** blob_size_power, times (1 + the texture
    weight x the spread inside the box over the frame's, summed over the views at full resolution).
    A real frame at 320 x 240, so that the scales' boxes are whole pixels (factors 1 and 2)."""
    import cv2

    from data_tools.proposals import _blob_candidates

    grey = cv2.resize(real_frames[0], (320, 240), interpolation=cv2.INTER_AREA)
    cfg = ProposalConfig()
    assert cfg.blob_sides == (320, 160)
    rng = np.random.default_rng(0)
    parts = []
    for side, background in zip(cfg.blob_sides, cfg.blob_backgrounds):
        boxes, scores = _blob_candidates(grey, side, background, cfg)
        assert len(boxes) > 20, side
        factor = 320 / side
        small = cv2.resize(grey, (side, side * 3 // 4), interpolation=cv2.INTER_AREA) if factor != 1 else grey
        views = [small, cv2.equalizeHist(small)]
        for i in rng.choice(len(boxes), 20, replace=False):
            working = boxes[i] / factor
            assert np.array_equal(working, working.round())
            contrast = sum(abs(plain_ring_statistics(v, working)[0]) / v.astype(np.float64).std() for v in views)
            assert scores[i] == pytest.approx(contrast * (boxes[i, 2] * boxes[i, 3]) ** (0.5 * 0.75), rel=1e-4)
        parts.append((boxes, scores))
    boxes, scores = thermal_blob_candidates(grey, cfg)
    assert np.array_equal(boxes, np.concatenate([p[0] for p in parts]))  # both scales, in order (all whole here)
    hand = np.concatenate([p[1] for p in parts])
    full_views = [grey.astype(np.float64), cv2.equalizeHist(grey).astype(np.float64)]
    for i in rng.choice(len(boxes), 30, replace=False):
        x, y, w, h = boxes[i].astype(int)
        texture = sum(v[y:y + h, x:x + w].std() / v.std() for v in full_views)
        assert scores[i] == pytest.approx(hand[i] * (1 + 2.0 * texture), rel=1e-4)


def test_blobs_apart_by_at_most_the_merge_gap_give_their_union_and_the_background_gives_no_box():
    """Two warm bars 10 px apart, each too narrow for PAD's filter, at one working scale where no closing
    bridges 10 px: their union is a candidate when ``blob_merge_gap`` reaches 10, not at the default 2.
    No candidate is the frame's background (its bounding box, the whole frame)."""
    frame = np.full((240, 320), 60, np.uint8)
    frame[95:145, 130:150] = 200
    frame[95:145, 160:180] = 200
    both = np.array([[130.0, 95.0, 50.0, 50.0]])
    one_scale = dict(blob_sides=(320,), blob_backgrounds=(0.125,))
    near, _ = thermal_blob_candidates(frame, ProposalConfig(**one_scale))
    far, _ = thermal_blob_candidates(frame, ProposalConfig(**one_scale, blob_merge_gap=12))
    assert len(near) and box_iou(both, far).max() >= 0.9 > box_iou(both, near).max()
    whole = np.array([[0.0, 0.0, 320.0, 240.0]])
    for boxes in (near, far, thermal_blob_candidates(frame, ProposalConfig())[0]):
        assert box_iou(whole, boxes).max() < 0.9


def test_a_colour_frame_is_proposed_on_as_its_grey_conversion():
    """``compute_proposals`` takes B, G, R frames too (the build reads infrared frames as grey): thermal
    blobs look at their grey conversion; selective search segments the colours, as PAD's does."""
    import cv2

    colour = cv2.imread(str(shared_path("msrs20", "vi", "00004N.png")), cv2.IMREAD_COLOR)  # B, G, R
    assert colour.ndim == 3 and not np.array_equal(colour[..., 0], colour[..., 2])
    grey = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(compute_proposals(colour, ProposalConfig()), compute_proposals(grey, ProposalConfig()))
    selective = ProposalConfig(method="selective_search")
    assert not np.array_equal(compute_proposals(colour, selective), compute_proposals(grey, selective))


@pytest.mark.parametrize("shape", [(1, 700), (700, 1), (2, 2)])
def test_a_frame_too_thin_for_any_box_gives_none(shape):
    frame = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    assert compute_proposals(frame, ProposalConfig()).shape == (0, 4)


@pytest.mark.parametrize("size", [(504, 297), (423, 214), (370, 492)])
def test_candidates_pass_pads_filter_after_their_corners_are_rounded(size, real_frames):
    """At a working scale that does not divide the frame, a box of aspect exactly 3 (151.2 x 50.4 on
    504 x 297) rounds to 151 x 50 or is cut by the frame's edge: filtered again after rounding."""
    import cv2

    grey = cv2.resize(real_frames[0], size, interpolation=cv2.INTER_AREA)
    boxes, _ = thermal_blob_candidates(grey, ProposalConfig())
    w, h = boxes[:, 2], boxes[:, 3]
    assert len(boxes) > 100 and (w >= 40).all() and (h >= 40).all() and (np.maximum(w / h, h / w) <= 3).all()
    assert np.array_equal(boxes, boxes.round()) and (boxes[:, 0] + w <= size[0]).all()
