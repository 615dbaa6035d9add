"""thermal_blobs_fitted: the logistic fit, the ranker file (every bad file refused with a reason),
the config check, and the point of it: fitted on one half of a camera's labelled frames, it finds
more objects than the hand ranking on the other half."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data_tools.imageio import read_frame
from data_tools.proposal_eval import runnable_methods
from data_tools.proposal_ranker import (
    FEATURES,
    RankerError,
    fit_logistic,
    load_ranker,
    parse_ranker,
)
from data_tools.proposals import ProposalConfig, compute_proposals
from tests.conftest import msrs_labelled_frames, plain_ring_statistics, shared_path

ROADSCENE_BOXES = Path(__file__).resolve().parents[1] / "bench" / "roadscene_boxes" / "sources.yaml"


def test_logistic_fit_weights_the_separating_feature_and_is_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3))
    y = x[:, 1] + 0.3 * rng.normal(size=2000) > 1.0  # rare positives, told by feature 1
    weights, bias = fit_logistic(x, y.astype(np.float64), l2=0.01)
    assert weights[1] > 2.0 and abs(weights[0]) < 0.3 and abs(weights[2]) < 0.3
    assert fit_logistic(x, y.astype(np.float64), l2=0.01)[0].tolist() == weights.tolist()
    # Stronger shrinkage, smaller weights; the balanced classes keep the bias near the boundary.
    assert fit_logistic(x, y.astype(np.float64), l2=1.0)[0][1] < weights[1]
    with pytest.raises(RankerError, match="all hits or all misses"):
        fit_logistic(x, np.zeros(2000), l2=0.01)
    # The bias is not shrunk: on a feature far from 0 the boundary stays where the classes part.
    far = rng.normal(5.0, 1.0, size=(2000, 1))
    w, b = fit_logistic(far, (far[:, 0] > 5.5).astype(np.float64), l2=0.01)
    assert -b / w[0] == pytest.approx(5.5, abs=0.2) and w[0] > 2.0  # shrunk too: 5.07 and 0.8 (bias -4 for -20)


def test_the_fit_learns_from_what_it_should_and_says_what_it_cannot():
    """A candidate at IoU exactly 0.5 with an object is a hit (as proposals-eval counts it); a feature
    that is the same on every candidate (no box touches the top, say) keeps finite weights; an L2 of
    0 (an unbounded fit where the classes separate) is refused."""
    from data_tools.proposal_ranker import FrameCandidates, _hits, fit_ranker, fit_weights

    assert _hits(np.array([[0, 0, 100, 100], [0, 0, 100, 101]], np.float64),
                 np.array([[0, 0, 100, 50]], np.float64)).tolist() == [True, False]
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, len(FEATURES)))
    features[:, 3] = 1.0
    hits = features[:, 0] > 1.0
    table = FrameCandidates(np.zeros((200, 4)), np.ones(200), features, hits, np.zeros((0, 4)), np.ones(200, bool))
    fitted = fit_weights([table], l2=0.01)
    assert np.isfinite(fitted["weights"]).all() and fitted["scale"][3] == 1.0 and fitted["weights"][0] > 1.0
    for l2 in (0.0, -1.0):
        with pytest.raises(RankerError, match="l2 must be > 0"):
            fit_ranker([], ProposalConfig(), l2=l2)


def _plain_features(grey, boxes, scores) -> list[list[float]]:
    """The features of each box as the module docstring names them, pixel by pixel."""
    import cv2

    height, width = grey.shape
    equalized = cv2.equalizeHist(grey)
    spreads = [view.astype(np.float64).std() + 1e-6 for view in (grey, equalized)]
    smooth = cv2.GaussianBlur(equalized, (0, 0), 1.5)
    gradient = np.hypot(cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1)).astype(np.float64)
    rows = []
    for box, score in zip(boxes, scores):
        row = [np.log(max(score, 1e-9))]
        for view, spread in zip((grey, equalized), spreads):
            for ring in (0.1, 0.25, 0.5):
                diff, std_in, std_ring = plain_ring_statistics(view, box, ring)
                row += [abs(diff) / spread, np.sign(diff), std_in / spread, std_ring / spread]
        x, y, w, h = box
        row += [np.log(w * h / (width * height)), np.log(w / h), (y + h / 2) / height,
                abs((x + w / 2) / width - 0.5), float(y <= 1), float(y + h >= height - 1),
                float(x <= 1 or x + w >= width - 1),
                plain_ring_statistics(gradient, box, 0.1)[0] / (gradient.mean() + 1e-6)]
        rows.append(row)
    return rows


def test_box_features_are_their_definitions():
    """Every feature of boxes on a real frame, against its definition computed plainly: boxes at each
    edge (touching within a pixel), one a pixel short of each, and candidates of the frame."""
    from data_tools.proposal_ranker import box_features
    from data_tools.proposals import thermal_blob_candidates

    grey = read_frame(str(shared_path("msrs20", "ir", "00004N.png"))).image
    height, width = grey.shape
    edges = np.array([[0, 0, 60, 60], [100, 1, 50, 80], [100, 2, 50, 80], [300, 420, 60, 59], [300, 419, 60, 59],
                      [1, 200, 50, 50], [2, 200, 50, 50], [589, 100, 50, 50], [588, 100, 50, 50],
                      [200, 150, 120, 40]], np.float64)
    candidates, scores = thermal_blob_candidates(grey, ProposalConfig())
    pick = np.random.default_rng(0).choice(len(candidates), 10, replace=False)
    boxes = np.concatenate([edges, candidates[pick]])
    scores = np.concatenate([[0.0, 1.0, 2.5, 10.0, 0.1, 3.0, 3.0, 7.0, 7.0, 1e3], scores[pick]])
    features = box_features(grey, boxes, scores)
    assert features.shape == (20, len(FEATURES)) and (width, height) == (640, 480)
    for i, plain in enumerate(_plain_features(grey, boxes, scores)):
        for name, got, expected in zip(FEATURES, features[i], plain):
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), (i, name)
    touches = [FEATURES.index(f) for f in ("touches_top", "touches_bottom", "touches_side")]
    assert features[:9, touches].tolist() == [[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1],
                                              [0, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_the_fitted_ranker_file_is_numbers_and_reads_back(msrs_ranker):
    data = json.loads(msrs_ranker.read_text())
    assert data["features"] == list(FEATURES) and len(data["weights"]) == len(FEATURES)
    assert data["fitted_on"]["frames"] == 10 and data["fitted_on"]["objects"] == 12  # even MSRS frames
    assert 0 < data["fitted_on"]["hits"] < data["fitted_on"]["candidates"]
    ranker = load_ranker(msrs_ranker)
    assert ranker.score(np.zeros((2, len(FEATURES)))).shape == (2,)
    assert load_ranker(msrs_ranker) is ranker  # read once per process and content


def test_cross_validation_holds_each_frame_out_once(msrs_ranker, tmp_path):
    """proposals-fit's comparison: its hand count is the hand method's own, and its fitted count is
    that of rankers fitted without the frames they are scored on (two folds, rebuilt here by hand)."""
    from data_tools.proposal_ranker import (
        cross_validate,
        fit_ranker,
        frame_candidates,
        save_ranker,
    )
    from data_tools.proposals import box_iou

    frames = msrs_labelled_frames()
    cfg = ProposalConfig()

    def found(cfg_used, subset):
        return sum(int((box_iou(compute_proposals(image, cfg_used).astype(float), boxes).max(axis=0) >= 0.5).sum())
                   for image, boxes, _ in subset)

    cv = cross_validate(frame_candidates(frames, cfg), cfg, l2=0.01, folds=2)
    assert (cv["folds"], cv["frames"], cv["objects"]) == (2, 10, 12)
    assert cv["found"]["thermal_blobs"] == found(cfg, frames)
    fitted = 0
    for fold in (0, 1):
        path = tmp_path / f"fold{fold}.json"
        save_ranker(fit_ranker([f for i, f in enumerate(frames) if i % 2 != fold], cfg, folds=0), path)
        fitted += found(replace(cfg, method="thermal_blobs_fitted", ranker=str(path)), frames[fold::2])
    assert cv["found"]["thermal_blobs_fitted"] == fitted
    # The five-fold comparison the fixture's file carries covers the same frames.
    saved = json.loads(msrs_ranker.read_text())["fitted_on"]["cross_validation"]
    assert (saved["folds"], saved["objects"], saved["found"]["thermal_blobs"]) == (5, 12, cv["found"]["thermal_blobs"])
    assert "skipped" in cross_validate(frame_candidates(frames[:1], cfg), cfg, l2=0.01, folds=5)


def test_cross_validation_folds_interleave_the_frames(monkeypatch):
    """Frame i is held out in fold i % folds (neighbouring frames of a sequence fall in different
    folds), and each fold's ranker is fitted on every other frame."""
    import data_tools.proposal_ranker as ranker_module

    tables = [ranker_module.FrameCandidates(np.zeros((1, 4)), np.ones(1), np.zeros((1, len(FEATURES))),
                                            np.zeros(1, bool), np.zeros((0, 4)), np.ones(1, bool)) for _ in range(7)]
    fitted_on = []

    def fit_weights(used, l2):
        fitted_on.append(sorted(next(i for i, t in enumerate(tables) if t is u) for u in used))
        zeros = [0.0] * len(FEATURES)
        return {"mean": zeros, "scale": [1.0] * len(FEATURES), "weights": zeros, "bias": 0.0}

    scored = []  # (fold, frame) of each frame scored, by the hand ranking and by the fold's ranker

    def objects_found(table, scores, cfg):
        scored.append((len(fitted_on) - 1, next(i for i, t in enumerate(tables) if t is table)))
        return 0

    monkeypatch.setattr(ranker_module, "fit_weights", fit_weights)
    monkeypatch.setattr(ranker_module, "objects_found", objects_found)
    result = ranker_module.cross_validate(tables, ProposalConfig(), l2=0.01, folds=3)
    assert result["folds"] == 3 and fitted_on == [[1, 2, 4, 5], [0, 2, 3, 5, 6], [0, 1, 3, 4, 6]]
    assert sorted(set(scored)) == [(0, 0), (0, 3), (0, 6), (1, 1), (1, 4), (2, 2), (2, 5)] and len(scored) == 14


def test_fitting_twice_writes_the_same_file_and_unlabelled_sources_are_refused(msrs_ranker, tmp_path, capsys):
    from data_tools.cli import main

    msrs = shared_path("msrs20")
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - name: msrs\n    root: {msrs / 'ir'}\n    boxes: {{format: yolo, "
                       f"path: {msrs / 'labels_ir'}, classes: [person, bicycle, car]}}\n")
    again = tmp_path / "again.json"
    assert main(["proposals-fit", "--sources", str(sources), "--every", "2", "--out", str(again)]) == 0
    first, second = json.loads(msrs_ranker.read_text()), json.loads(again.read_text())
    assert {**first, "fitted_on": None} == {**second, "fitted_on": None}  # same weights to the last digit
    # The cross-validated comparison is printed as the file records it, with the advice that follows.
    found = second["fitted_on"]["cross_validation"]["found"]
    out = capsys.readouterr().out
    assert (f"thermal_blobs {found['thermal_blobs']}/12, thermal_blobs_fitted {found['thermal_blobs_fitted']}/12"
            in out)
    assert ("does not beat the hand ranking" in out) == (found["thermal_blobs_fitted"] <= found["thermal_blobs"])
    assert ("to use it anyway: proposals.method=thermal_blobs_fitted" in out) == \
        (found["thermal_blobs_fitted"] <= found["thermal_blobs"])
    assert main(["proposals-fit", "--sources", str(sources), "--folds", "1", "--out", str(tmp_path / "y.json")]) == 2
    assert "folds must be 0" in capsys.readouterr().err and not (tmp_path / "y.json").exists()
    unlabelled = tmp_path / "unlabelled.yaml"
    unlabelled.write_text(f"sources:\n  - name: ir\n    root: {msrs / 'ir'}\n")
    assert main(["proposals-fit", "--sources", str(unlabelled), "--out", str(tmp_path / "x.json")]) == 2
    assert "no labelled frames" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def _good(msrs_ranker) -> dict:
    return json.loads(msrs_ranker.read_text())


@pytest.mark.parametrize("change, reason", [
    (lambda d: "{not json", "invalid JSON"),
    (lambda d: {**d, "format": "pickle"}, "format"),
    (lambda d: {**d, "version": 99}, "version 99"),
    (lambda d: {**d, "features": d["features"][:-1]}, "feature list"),
    (lambda d: {**d, "weights": d["weights"][:-1]}, "'weights' must be"),
    (lambda d: {**d, "weights": [float("nan")] + d["weights"][1:]}, "'weights' must be"),
    (lambda d: {**d, "mean": [True] + d["mean"][1:]}, "'mean' must be"),
    (lambda d: {**d, "scale": [0.0] + d["scale"][1:]}, "'scale' must be positive"),
    (lambda d: {**d, "bias": "1"}, "'bias'"),
    (lambda d: {**d, "bias": True}, "'bias'"),
    (lambda d: {k: v for k, v in d.items() if k != "candidates"}, "'candidates'"),
])
def test_bad_ranker_files_are_refused_with_the_reason(msrs_ranker, change, reason):
    changed = change(_good(msrs_ranker))
    text = changed if isinstance(changed, str) else json.dumps(changed)
    with pytest.raises(RankerError, match=reason):
        parse_ranker(text, "bad.json")


def test_the_fitted_method_needs_its_ranker_and_the_candidates_it_was_fitted_on(msrs_ranker, tmp_path):
    with pytest.raises(ValueError, match="needs proposals.ranker"):
        ProposalConfig(method="thermal_blobs_fitted")
    with pytest.raises(ValueError, match="no such file"):
        ProposalConfig(method="thermal_blobs_fitted", ranker=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="is a folder; name the JSON file proposals-fit wrote in it"):
        ProposalConfig(method="thermal_blobs_fitted", ranker=str(tmp_path))
    (tmp_path / "frame.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # not UTF-8
    with pytest.raises(ValueError, match=r"frame.png: not a usable proposal ranker: not text \(an image"):
        ProposalConfig(method="thermal_blobs_fitted", ranker=str(tmp_path / "frame.png"))
    with pytest.raises(ValueError, match="blob_size_power=0.75 \\(now 0.5\\)"):
        ProposalConfig(method="thermal_blobs_fitted", ranker=str(msrs_ranker), blob_size_power=0.5)
    # A ranker written before the texture weight existed was fitted without it.
    earlier = _good(msrs_ranker)
    del earlier["candidates"]["blob_texture_weight"]
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    with pytest.raises(ValueError, match="blob_texture_weight=0.0 \\(now 2.0\\); fit it again or use those"):
        ProposalConfig(method="thermal_blobs_fitted", ranker=str(tmp_path / "earlier.json"))
    ProposalConfig(method="thermal_blobs_fitted", ranker=str(tmp_path / "earlier.json"), blob_texture_weight=0)
    cfg = ProposalConfig(method="thermal_blobs_fitted", ranker=str(msrs_ranker))
    assert "thermal_blobs_fitted" not in runnable_methods(ProposalConfig())
    assert "thermal_blobs_fitted" in runnable_methods(cfg)
    # Same candidates as thermal_blobs, another order: the sets of kept boxes differ, each capped.
    from data_tools.imageio import read_frame

    image = read_frame(str(shared_path("msrs20", "ir", "00081D.png"))).image
    fitted, hand = compute_proposals(image, cfg), compute_proposals(image, replace(cfg, method="thermal_blobs"))
    assert len(fitted) == len(hand) == cfg.max_proposals
    assert {tuple(b) for b in fitted} != {tuple(b) for b in hand}


def test_build_refuses_the_fitted_method_without_a_ranker(tmp_path, capsys):
    from data_tools.cli import main

    rc = main(["build", "--source", f"msrs={shared_path('msrs20', 'ir')}", "--out", str(tmp_path / "out"),
               "proposals.method=thermal_blobs_fitted"])
    assert rc == 2 and "needs proposals.ranker" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.tar"))


def _roadscene_sources(tmp_path) -> Path:
    """The shipped RoadScene boxes, with the frames wherever the tests find ../shared."""
    import yaml

    spec = yaml.safe_load(ROADSCENE_BOXES.read_text())["sources"][0]
    spec["root"] = str(shared_path("roadscene", "cropinfrared"))
    spec["boxes"]["path"] = str(ROADSCENE_BOXES.parent / spec["boxes"]["path"])
    path = tmp_path / "sources.yaml"
    path.write_text(yaml.safe_dump({"sources": [spec]}))
    return path


def test_fitted_on_half_a_camera_it_finds_more_on_the_other_half(tmp_path, capsys):
    """The CLI path a user takes: proposals-fit on the even RoadScene frames, proposals-eval of both
    rankings on the odd ones (measured: 46 of 47 objects against 40)."""
    from data_tools.cli import main

    sources, ranker = _roadscene_sources(tmp_path), tmp_path / "roadscene_even.json"
    assert main(["proposals-fit", "--sources", str(sources), "--every", "2", "--offset", "0",
                 "--out", str(ranker)]) == 0
    out = capsys.readouterr().out
    assert "fitted on 31 frames, 55 objects" in out and f"use it: proposals.method=thermal_blobs_fitted " \
        f"proposals.ranker={ranker}" in out
    cv = json.loads(ranker.read_text())["fitted_on"]["cross_validation"]["found"]
    assert cv["thermal_blobs_fitted"] > cv["thermal_blobs"]  # measured: 47 of 55 against 41
    assert main(["proposals-eval", "--sources", str(sources), "--every", "2", "--offset", "1",
                 "--methods", "thermal_blobs,thermal_blobs_fitted", "--out", str(tmp_path / "eval"),
                 f"proposals.ranker={ranker}"]) == 0
    summaries = {s["method"]: s for s in json.loads((tmp_path / "eval" / "proposals_eval.json").read_text())}
    fitted, hand = summaries["thermal_blobs_fitted"], summaries["thermal_blobs"]
    assert fitted["ranker"]["path"] == str(ranker) and len(fitted["ranker"]["sha256"]) == 64 and "ranker" not in hand
    assert fitted["objects"] == hand["objects"] == 47 and fitted["proposals_per_frame"] <= 50
    assert fitted["recall"]["iou_0.5"]["all"] >= 0.90
    assert fitted["recall"]["iou_0.5"]["all"] >= hand["recall"]["iou_0.5"]["all"] + 0.08
    # A file that is not a ranker stops the command with the reason, not a traceback.
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["proposals-eval", "--sources", str(sources), "--methods", "thermal_blobs_fitted",
                 f"proposals.ranker={bad}"]) == 2
    assert "not a usable proposal ranker" in capsys.readouterr().err


def test_a_refitted_ranker_is_another_build(msrs_ranker, tmp_path):
    """The ranker's content is part of the build's identity: the same file name with other weights
    does not resume or confirm shards ranked by the old ones."""
    from data_tools.build import BuildError, build_shards
    from data_tools.cli import DEFAULT_BUILD_CONFIG
    from data_tools.config import load_config
    from data_tools.sources import Source

    ranker = tmp_path / "ranker.json"
    ranker.write_text(msrs_ranker.read_text())
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["proposals.method=thermal_blobs_fitted", f"proposals.ranker={ranker}"])
    sources = [Source("msrs", str(shared_path("msrs20", "ir")), stride=10)]
    assert build_shards(sources, cfg, tmp_path / "out", progress=False)["totals"]["written"] == 2
    assert build_shards(sources, cfg, tmp_path / "out", progress=False)["totals"]["written"] == 2  # confirmed
    data = json.loads(ranker.read_text())
    ranker.write_text(json.dumps({**data, "bias": data["bias"] + 1.0}))
    with pytest.raises(BuildError, match="different config"):
        build_shards(sources, cfg, tmp_path / "out", progress=False)


def test_a_rewritten_ranker_file_is_read_again(msrs_ranker, tmp_path):
    """Loaded once per version of the file: the same path with new content gives the new ranker."""
    path = tmp_path / "ranker.json"
    data = json.loads(msrs_ranker.read_text())
    path.write_text(json.dumps(data))
    first = load_ranker(path)
    assert load_ranker(path) is first
    path.write_text(json.dumps({**data, "bias": data["bias"] + 10.0}))
    assert load_ranker(path).bias == pytest.approx(first.bias + 10.0)


def test_proposals_fit_takes_its_settings_and_says_when_it_could_not_compare(tmp_path, monkeypatch, capsys):
    """--l2 and --folds reach the fit and proposals.overlay_mask the frames it reads; without a
    cross-validation (--folds 0, or too few frames) nothing speaks against the fitted ranking, so the
    advice is to use it, with a reminder to compare it on other frames."""
    import data_tools.proposal_ranker as proposal_ranker
    from data_tools.cli import _cross_validation_verdict, main

    assert _cross_validation_verdict(None) == (
        "not cross-validated (--folds 0): compare it with proposals-eval on frames it was not fitted on", True)
    assert _cross_validation_verdict({"skipped": "needs at least 2 labelled frames"}) == (
        "not cross-validated: needs at least 2 labelled frames; compare it with proposals-eval on other labelled "
        "frames", True)
    line, better = _cross_validation_verdict({"folds": 5, "objects": 9, "found": {"thermal_blobs": 6,
                                                                                  "thermal_blobs_fitted": 6}})
    assert not better and line.startswith("cross-validated (5 folds, each frame held out once): objects found at the "
                                          "cap thermal_blobs 6/9, thermal_blobs_fitted 6/9\nthe fitted ranking does "
                                          "not beat the hand ranking")
    read_with_overlay_mask = []
    real = proposal_ranker.labelled_grey_frames

    def reading(*args):
        read_with_overlay_mask.append(args[-1])
        return real(*args)

    monkeypatch.setattr(proposal_ranker, "labelled_grey_frames", reading)
    msrs = shared_path("msrs20")
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - name: msrs\n    root: {msrs / 'ir'}\n    boxes: {{format: yolo, "
                       f"path: {msrs / 'labels_ir'}, classes: [person, bicycle, car]}}\n")
    out = tmp_path / "r.json"
    assert main(["proposals-fit", "--sources", str(sources), "--every", "4", "--l2", "0.5", "--folds", "0",
                 "--out", str(out), "proposals.overlay_mask=false"]) == 0
    ranker = json.loads(out.read_text())
    assert ranker["l2"] == 0.5 and "cross_validation" not in ranker["fitted_on"] and read_with_overlay_mask == [False]
    said = capsys.readouterr().out
    assert "not cross-validated (--folds 0)" in said and f"use it: proposals.method=thermal_blobs_fitted " \
        f"proposals.ranker={out}" in said
