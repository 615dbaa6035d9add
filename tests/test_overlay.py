"""A camera's burned-in overlay: found as the pixels static across a source's frames, filled in
before the proposal methods look, never changed in the stored frames."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_tools.build import build_shards
from data_tools.cli import DEFAULT_BUILD_CONFIG
from data_tools.config import load_config
from data_tools.imageio import read_frame
from data_tools.overlay import (
    GROW,
    MAX_SHARE,
    MIN_FRAMES,
    MIN_PIXELS,
    TOLERANCE,
    fill_overlay,
    find_overlay,
    find_source_overlay,
    sample_indices,
)
from data_tools.proposals import ProposalConfig, box_iou, compute_proposals
from data_tools.shards import decode_sample, iter_shard
from data_tools.sources import discover, source_from_dict
from data_tools.synth import burn_in_overlay
from tests.conftest import shared_path


def moving_scene(n: int, shape=(240, 320), seed: int = 0) -> list[np.ndarray]:
    """Frames of a camera that moves: smooth random scenes, each its own."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        noise = rng.normal(0, 1, shape).astype(np.float32)
        smooth = cv2.GaussianBlur(noise, (0, 0), 4)
        frames.append(cv2.normalize(smooth, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8))
    return frames


def test_a_static_overlay_is_found_on_a_moving_scene_and_nothing_else_is():
    scene = moving_scene(12)
    on_black, on_white = burn_in_overlay(np.zeros_like(scene[0])), burn_in_overlay(np.full_like(scene[0], 255))
    covered = on_black == on_white  # the overlay's own pixels (its thin, anti-aliased strokes blend with the scene)
    touched = (on_black > 0) | (on_white < 255)
    assert covered.sum() > 0.6 * touched.sum()
    finding = find_overlay([burn_in_overlay(f) for f in scene])
    assert finding.mask is not None and finding.frames == 12
    # the pixels the overlay covers (less a few isolated bits of thin glyphs: groups under MIN_PIXELS
    # are taken for chance), and a little around them ...
    assert finding.mask[covered].mean() > 0.99
    assert finding.share < 2 * touched.mean()  # ... not much more than it touches
    # The same frames without it: nothing static.
    clean = find_overlay(scene)
    assert clean.mask is None and clean.share == 0 and clean.why_not == "no static pixels"
    # 16-bit frames are compared as the proposal methods see them (each through its own percentile
    # stretch): white text stays at the top of every frame's range, a palette bar's middle does not.
    wide = find_overlay([burn_in_overlay(f).astype(np.uint16) * 257 for f in scene])
    assert wide.mask[covered & (on_black == 255)].mean() > 0.8 and wide.share < finding.share


def test_a_noisy_fixed_camera_leaves_no_scattered_mask():
    """Sensor noise (sigma 3 grey levels) on a scene that does not move leaves scattered pixels
    within the tolerance by chance: groups under MIN_PIXELS are not taken for an overlay."""
    rng = np.random.default_rng(1)
    still = moving_scene(1)[0].astype(np.float64)
    frames = [np.clip(still + rng.normal(0, 3, still.shape), 0, 255).round().astype(np.uint8) for _ in range(32)]
    assert find_overlay(frames).share < 0.01


def test_a_still_scene_too_few_frames_and_mixed_sizes():
    scene = moving_scene(12)
    still = find_overlay([scene[0]] * 12)  # a fixed camera on a scene that does not change
    assert still.mask is None and still.share == 1.0 and f"more than the {MAX_SHARE:.0%}" in still.why_not
    few = find_overlay([burn_in_overlay(f) for f in scene[:MIN_FRAMES - 1]])
    assert few.mask is None and f"{MIN_FRAMES} needed" in few.why_not
    # The most common size decides; frames of another size are left out of the comparison.
    mixed = find_overlay([burn_in_overlay(f) for f in scene[:MIN_FRAMES]] + moving_scene(3, (100, 100), seed=1))
    assert mixed.mask is not None and mixed.mask.shape == (240, 320) and mixed.frames == MIN_FRAMES
    # Filling leaves a frame of another size alone, and on the frame's size replaces the overlay.
    other = moving_scene(1, (100, 100))[0]
    assert fill_overlay(other, mixed.mask) is other
    filled = fill_overlay(burn_in_overlay(scene[0]), mixed.mask)
    assert np.abs(filled.astype(int) - scene[0])[mixed.mask > 0].mean() < 30  # overlay white is ~200 off
    assert np.array_equal(filled[mixed.mask == 0], burn_in_overlay(scene[0])[mixed.mask == 0])


def _noise_frames(n: int, shape, seed: int = 0) -> list[np.ndarray]:
    """Frames of independent uniform noise: no pixel stays within the tolerance by chance."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def test_the_tolerance_the_smallest_group_and_the_largest_share_are_each_the_last_value_kept():
    frames = _noise_frames(12, (60, 80))
    for i, f in enumerate(frames):
        f[10:12, 10:14] = 100 + (TOLERANCE if i % 2 else 0)  # 8 px that vary by the tolerance: static
        f[10:12, 40:44] = 100 + (TOLERANCE + 1 if i % 2 else 0)  # ... by one grey level more: not static
        f[40, 10:10 + MIN_PIXELS] = 50  # the smallest group taken for an overlay ...
        f[40, 40:40 + MIN_PIXELS - 1] = 50  # ... and one pixel fewer: chance
    mask = find_overlay(frames).mask
    assert mask[10:12, 10:14].all() and not mask[10:12, 40:44].any()
    assert mask[40, 10:10 + MIN_PIXELS].all() and not mask[40, 40:40 + MIN_PIXELS - 1].any()
    # A square that its GROW-pixel margin takes to exactly MAX_SHARE of a 40 x 40 frame is still an
    # overlay; one row more is refused as a still scene.
    side = int(round((MAX_SHARE * 1600) ** 0.5)) - 2 * GROW
    for rows, kept in ((side, True), (side + 1, False)):
        frames = _noise_frames(12, (40, 40), seed=1)
        for f in frames:
            f[10:10 + rows, 10:10 + side] = 200
        finding = find_overlay(frames)
        assert (finding.mask is not None) == kept, (rows, finding.share)
        assert finding.share == pytest.approx((rows + 2 * GROW) * (side + 2 * GROW) / 1600)


def test_a_source_is_compared_as_the_build_reads_it_border_crop_and_channel(tmp_path):
    """The overlay of a source is found on its frames cut and channel-picked as the build reads
    them: the mask has the cropped frame's size (a mask of another size is never applied) and
    follows the stored channel the source names."""
    (tmp_path / "ir").mkdir()
    for i, (f, other) in enumerate(zip(_noise_frames(10, (60, 80)), _noise_frames(10, (60, 80), seed=2))):
        f[20:30, 30:50] = 255  # the overlay, in the stored channel 2 only
        cv2.imwrite(str(tmp_path / "ir" / f"{i:02d}.png"), np.dstack([other, other, f]))
    source = source_from_dict({"name": "cam", "root": "ir", "channel": 2, "border_crop": [5, 5, 10, 10]}, tmp_path)
    finding = find_source_overlay(source, discover(source).items)
    assert finding.mask is not None and finding.mask.shape == (50, 60) and finding.frames == 10
    assert finding.mask[15:25, 20:40].all() and finding.mask[:10].sum() == 0
    grey = source_from_dict({"name": "cam", "root": "ir", "border_crop": [5, 5, 10, 10]}, tmp_path)
    assert find_source_overlay(grey, discover(grey).items).mask is None  # luma of the noisy channels: not static


def test_frames_are_sampled_across_the_whole_source():
    assert sample_indices(0) == [] and sample_indices(5) == [0, 1, 2, 3, 4]
    picks = sample_indices(1000)
    assert len(picks) == 32 and picks[0] == 0 and picks[-1] == 999 and max(np.diff(picks)) <= 33


def _msrs_frames():
    """The 20 labelled MSRS infrared frames: (names, frames, boxes of objects >= 40 px)."""
    from data_tools.proposal_eval import labelled_frames

    source = source_from_dict({"name": "msrs", "root": "ir", "boxes": {
        "format": "yolo", "path": "labels_ir", "classes": ["person", "bicycle", "car"]}}, shared_path("msrs20"))
    frames = list(labelled_frames([source], find_overlays=False))
    return [f.path for f in frames], [f.image for f in frames], [f.boxes for f in frames]


def _found(frames, boxes, mask=None) -> int:
    cfg = ProposalConfig()
    return sum(int((box_iou(compute_proposals(f, cfg, mask).astype(float), b).max(axis=0) >= 0.5).sum())
               for f, b in zip(frames, boxes) if len(b))


def test_on_real_frames_the_filled_overlay_gives_back_the_objects_it_hid():
    """The 20 labelled MSRS frames (29 objects >= 40 px) with a bar, text and a crosshair burned
    in: `thermal_blobs` loses objects to them (BENCHMARKS: 23 of the 25 it finds on the clean
    frames) and finds them again once the overlay is filled in; the clean frames show no overlay."""
    _, frames, boxes = _msrs_frames()
    assert find_overlay(frames).mask is None
    burned = [burn_in_overlay(f) for f in frames]
    finding = find_overlay(burned)
    assert finding.mask is not None and finding.share < 0.07
    clean, hidden, filled = _found(frames, boxes), _found(burned, boxes), _found(burned, boxes, finding.mask)
    print(f"objects found: clean {clean}, overlay {hidden}, overlay filled {filled} of 29")
    assert hidden < filled and filled >= clean - 1


@pytest.fixture(scope="module")
def burned_frames(tmp_path_factory):
    """10 of the MSRS frames with the overlay burned in, as a camera would write them."""
    names, frames, _ = _msrs_frames()
    folder = tmp_path_factory.mktemp("burned") / "ir"
    folder.mkdir()
    for name, frame in zip(names[:MIN_FRAMES + 2], frames):
        cv2.imwrite(str(folder / name), burn_in_overlay(frame))
    return folder


def test_proposals_eval_sees_the_frames_as_the_build_does(burned_frames, capsys):
    from data_tools.proposal_eval import labelled_frames, run

    source = source_from_dict({"name": "cam", "root": str(burned_frames), "boxes": {
        "format": "yolo", "path": str(Path(shared_path("msrs20")) / "labels_ir"),
        "classes": ["person", "bicycle", "car"]}}, burned_frames)
    frames = list(labelled_frames([source]))
    assert len(frames) == MIN_FRAMES + 2 and all(f.overlay is not None for f in frames)
    assert all(f.overlay is None for f in labelled_frames([source], find_overlays=False))
    summaries = {on: run([source], ProposalConfig(overlay_mask=on), ["thermal_blobs"], None)[0] for on in (True, False)}
    # Filled in, the burned frames give what the same frames without the overlay give (a strict gain over
    # not filling it in is one object here with OpenCV 5.0 and none with 4.10).
    clean = source_from_dict({"name": "cam", "root": str(Path(shared_path("msrs20")) / "ir"),
                              "glob": sorted(p.name for p in burned_frames.iterdir()),
                              "boxes": {"format": "yolo", "path": str(Path(shared_path("msrs20")) / "labels_ir")}},
                             burned_frames)
    as_clean = run([clean], ProposalConfig(overlay_mask=False), ["thermal_blobs"], None)[0]["found_iou_0.5"]
    assert summaries[True]["found_iou_0.5"] == as_clean >= summaries[False]["found_iou_0.5"]
    assert summaries[True]["overlays"]["cam"]["masked"] and summaries[False]["overlays"] == {}
    share = summaries[True]["overlays"]["cam"]["static_share"]
    said = capsys.readouterr().err
    assert "source 'cam': a burned-in overlay covers " in said and f" px, {share:.2%} of the frame" in said


def test_the_build_fills_the_overlay_for_the_proposals_and_stores_the_frames_as_read(burned_frames, tmp_path):
    source = source_from_dict({"name": "cam", "root": str(burned_frames)}, tmp_path)
    manifests = {}
    for mask_on in (True, False):
        cfg = load_config(DEFAULT_BUILD_CONFIG, [f"proposals.overlay_mask={str(mask_on).lower()}"])
        out = tmp_path / f"out_{mask_on}"
        manifests[mask_on] = build_shards([source], cfg, out, workers=2, progress=False)
    on = manifests[True]["sources"]["cam"]
    assert on["overlay"]["masked"] and on["overlay"]["frames_compared"] == MIN_FRAMES + 2
    assert "overlay" not in manifests[False]["sources"]["cam"]
    mask = (cv2.imread(str(tmp_path / "out_True" / "overlay-cam.png"), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
    assert abs(mask.mean() - on["overlay"]["static_share"]) < 1e-4
    shard = tmp_path / "out_True" / manifests[True]["shards"][0]["shard"]
    cfg = ProposalConfig()
    differ = 0
    for _, members in iter_shard(str(shard)):
        image, proposals, meta = decode_sample(members)
        as_read = read_frame(str(burned_frames / meta["path"])).image
        assert np.array_equal(image, as_read)  # every pixel as read, overlay included
        # the spawned workers got the mask: their boxes are the ones computed here with it
        assert np.array_equal(proposals, compute_proposals(as_read, cfg, mask))
        differ += not np.array_equal(proposals, compute_proposals(as_read, cfg))
    assert differ > 0


def test_the_build_cli_says_where_an_overlay_was_filled_in(burned_frames, tmp_path, capsys):
    from data_tools.cli import main as cli_main

    out = tmp_path / "out"
    assert cli_main(["build", "--source", f"cam={burned_frames}", "--out", str(out), "--workers", "1", "--quiet"]) == 0
    said = capsys.readouterr()
    assert f"see {out / 'overlay-cam.png'}" in said.err and (out / "overlay-cam.png").is_file()
    assert "written 10, skipped 0 (none), burned-in overlay filled in for the proposals (" in said.out
    clean = tmp_path / "clean"  # the same camera's frames without an overlay: looked for, not found, not said
    assert cli_main(["build", "--source", f"cam={Path(shared_path('msrs20')) / 'ir'}", "--out", str(clean),
                     "--workers", "1", "--quiet"]) == 0
    assert not json.loads((clean / "manifest.json").read_text())["sources"]["cam"]["overlay"]["masked"]
    assert "  cam: found 20 (of 20 matched), written 20, skipped 0 (none)\n" in capsys.readouterr().out
