"""Statistics and invariants of PAD's object-sensitive random RoI crop (PAD, arXiv 2312.08192)."""
import numpy as np
import pytest

from data_tools.transforms import (IntensityConfig, RoICropConfig, object_sensitive_crop,
                                   random_hflip, random_resized_crop_box, to_unit_intensity)
from data_tools.imageio import read_frame
from data_tools.proposals import ProposalConfig, compute_proposals
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def real_frame():
    """A real RoadScene frame and its selective-search proposals."""
    path = shared_path("roadscene", "cropinfrared", "FLIR_00006.jpg")
    image = read_frame(str(path)).image
    proposals = compute_proposals(image, ProposalConfig())
    assert len(proposals) > 10
    return image, proposals


def test_crop_statistics_on_a_real_frame(real_frame):
    image, proposals = real_frame
    h, w = image.shape
    rng = np.random.default_rng(0)
    n = 4000
    results = [object_sensitive_crop(image, proposals, rng) for _ in range(n)]
    for r in results:
        assert r.image.shape == (224, 224) and r.image.dtype == image.dtype
        x, y, bw, bh = r.box
        assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
        if not r.fallback:
            assert bw >= 60 and bh >= 60
            if r.need_big:
                assert bw * bh / (w * h) >= 0.15
    big = np.mean([r.need_big for r in results])
    assert abs(big - 0.15) < 0.025  # 1 - p; binomial std at n=4000 is 0.0056
    assert np.mean([r.fallback for r in results]) < 0.1  # proposals drive most crops


def test_fallback_when_no_proposals(real_frame):
    image, _ = real_frame
    rng = np.random.default_rng(1)
    h, w = image.shape
    for _ in range(200):
        r = object_sensitive_crop(image, np.zeros((0, 4), np.int32), rng)
        assert r.fallback
        x, y, bw, bh = r.box
        assert 0.2 * w * h - 2 * (w + h) <= bw * bh <= w * h


def test_fallback_when_every_proposal_is_invalid(real_frame):
    image, _ = real_frame
    h, w = image.shape
    # leave the image (by 40 px, by one on the right, by one at the bottom) / < 40
    invalid = np.array([[w - 10, 0, 50, 50], [w - 60, 0, 61, 50], [0, h - 60, 50, 61], [0, 0, 30, 100],
                        [5, 5, 39, 200]], np.int32)
    rng = np.random.default_rng(2)
    assert all(object_sensitive_crop(image, invalid, rng).fallback for _ in range(100))


def test_crop_follows_the_proposal(real_frame):
    """With one proposal, the crop centre lies within the +-40% jitter of that proposal's centre."""
    image, _ = real_frame
    prop = np.array([[100, 80, 120, 100]], np.int32)
    rng = np.random.default_rng(3)
    for _ in range(300):
        r = object_sensitive_crop(image, prop, rng, RoICropConfig(p=1.0))  # never needs a big crop
        assert not r.fallback
        x, y, bw, bh = r.box
        cx, cy = x + bw / 2, y + bh / 2
        # Clipping can shift the centre by up to half the clipped amount; this box is far from the border.
        assert abs(cx - 160) <= 0.4 * 120 + 1 and abs(cy - 130) <= 0.4 * 100 + 1
        assert 0.7 * 120 - 1 <= bw <= 1.5 * 120 + 1 and 0.7 * 100 - 1 <= bh <= 1.5 * 100 + 1


def test_crops_are_resized_within_a_grey_level_of_pads_bicubic():
    """PAD resizes its crop with PIL's bicubic filter; ours is OpenCV's bilinear (BENCHMARKS, the crop's
    resize: 25x cheaper). On real frames the two stay within a grey level on average (nearest-neighbour
    resizing, for one, is 2-5 levels off)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    differences = []
    for name in ("FLIR_00006.jpg", "FLIR_00018.jpg"):
        image = read_frame(str(shared_path("roadscene", "cropinfrared", name))).image
        for _ in range(10):
            crop = object_sensitive_crop(image, np.zeros((0, 4), np.int32), rng)
            x, y, w, h = crop.box
            pads = np.asarray(Image.fromarray(image[y : y + h, x : x + w]).resize((224, 224), Image.BICUBIC))
            differences.append(np.abs(crop.image.astype(float) - pads).mean())
    assert np.mean(differences) < 1.0 and max(differences) < 1.5


def test_same_seed_same_crops(real_frame):
    image, proposals = real_frame
    a = [object_sensitive_crop(image, proposals, np.random.default_rng(7)).box for _ in range(1)]
    b = [object_sensitive_crop(image, proposals, np.random.default_rng(7)).box for _ in range(1)]
    ra, rb = np.random.default_rng(9), np.random.default_rng(9)
    seq_a = [object_sensitive_crop(image, proposals, ra).box for _ in range(50)]
    seq_b = [object_sensitive_crop(image, proposals, rb).box for _ in range(50)]
    assert a == b and seq_a == seq_b and len(set(seq_a)) > 10


def _pad_get_roi(proposals, width, height, rng, p=0.85, min_size=60):
    """PAD's RandomRoiCrop.get_roi as its pre-training code has it, written out on a numpy Generator in
    the same draw order: an integer centre plus an integer jitter, the crop's far edges clamped to
    width - 1 / height - 1. None: every try failed (PAD then draws a RandomResizedCrop)."""
    larger = rng.uniform() > p
    for _ in range(20):
        x, y, w, h = (int(v) for v in proposals[rng.integers(len(proposals))])
        if x < 0 or y < 0 or x + w > width or y + h > height or w < 40 or h < 40:
            continue
        xc = int(round(x + w / 2.0)) + int(round(w * rng.uniform(-0.4, 0.4)))
        yc = int(round(y + h / 2.0)) + int(round(h * rng.uniform(-0.4, 0.4)))
        wa, ha = max(w * rng.uniform(0.7, 1.5), min_size), max(h * rng.uniform(0.7, 1.5), min_size)
        x1, x2 = max(0, int(round(xc - wa / 2.0))), min(int(round(xc + wa / 2.0)), width - 1)
        y1, y2 = max(0, int(round(yc - ha / 2.0))), min(int(round(yc + ha / 2.0)), height - 1)
        if x2 <= x1 or y2 <= y1 or x2 - x1 < min_size or y2 - y1 < min_size:
            continue
        if larger and (x2 - x1) * (y2 - y1) / (width * height) < 0.15:
            continue
        return x1, y1, x2 - x1, y2 - y1
    return None


def test_crops_are_pads_get_roi_to_a_pixel_or_two():
    """The same draws through PAD's own algorithm: the same proposal each time, the same crop but for
    rounding (ours rounds the jittered centre once, and lets a crop reach the last row and column)."""
    width, height = 640, 480
    proposals = np.array([
        [100, 80, 120, 100],   # an ordinary object
        [300, 200, 40, 44],    # small: the 60 px minimum crop side binds
        [500, 20, 90, 30],     # too flat (h < 40): never a crop centre
        [20, 400, 36, 70],     # too narrow (w < 40)
        [600, 300, 60, 60],    # leaves the frame
        [560, 380, 80, 100],   # touches the right and bottom edges
        [0, 0, 640, 480],      # the whole frame (wanted when a large crop is drawn)
    ], np.int32)
    image = np.zeros((height, width), np.uint8)
    differ, fallbacks, small = 0, 0, 0
    for seed in range(3000):
        ours = object_sensitive_crop(image, proposals, np.random.default_rng(seed))
        pads = _pad_get_roi(proposals, width, height, np.random.default_rng(seed))
        if pads is None or ours.fallback:
            differ += (pads is None) != ours.fallback
            fallbacks += ours.fallback
            continue
        gap = max(abs(a - b) for a, b in zip(ours.box, pads))
        differ += gap > 2
        small += ours.box[2] <= 61 and ours.box[3] <= 61
    assert differ <= 15, differ  # rounding decides a few crops at the 60 px or 15 % limits
    assert small > 200 and fallbacks < 30  # the small proposal was drawn, and its crop kept at 60 px


def test_random_resized_crop_box_is_torchvisions_in_distribution():
    """Our numpy re-implementation against torchvision's RandomResizedCrop.get_params, 4,000 draws each:
    on a frame too wide for most draws (the tries and the centre-crop fallback matter) and on a square
    one (every draw fits: the log-uniform aspect shows), the mean crop position, width, height and area,
    and the shares of crops wider than tall and of fallbacks, agree within sampling error."""
    import torch
    from torchvision.transforms import RandomResizedCrop

    n = 4000
    for width, height in ((640, 160), (480, 480)):
        rng = np.random.default_rng(0)
        ours = np.array([random_resized_crop_box(width, height, (0.2, 1.0), (3 / 4, 4 / 3), rng) for _ in range(n)])
        torch.manual_seed(0)
        frame = torch.zeros(1, height, width)
        draws = (RandomResizedCrop.get_params(frame, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n))
        theirs = np.array([[j, i, w, h] for i, j, h, w in draws])  # torchvision's order: top, left, height, width
        for column in range(4):  # x, y, w, h
            assert abs(ours[:, column].mean() - theirs[:, column].mean()) < 0.05 * theirs[:, column].mean() + 1
        area = lambda c: (c[:, 2] * c[:, 3]).mean()
        assert abs(area(ours) - area(theirs)) < 0.05 * area(theirs)
        wider = lambda c: (c[:, 2] > c[:, 3]).mean()
        assert abs(wider(ours) - wider(theirs)) < 0.04
        centre = lambda c: ((c[:, 2] == 213) & (c[:, 3] == 160)).mean()  # the wide frame's fallback: 4:3, centred
        assert abs(centre(ours) - centre(theirs)) < 0.04
    assert 0.45 < wider(theirs) < 0.55  # square frame: log-uniform aspect, about half wider than tall


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    for _ in range(500):
        x, y, w, h = random_resized_crop_box(640, 512, (0.2, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 512
        assert w * h >= 0.2 * 640 * 512 * 0.97
    # a frame far taller or wider than any allowed ratio: ten draws fail and torchvision's fallback takes
    # the centred box of the nearest ratio, the whole width (height) kept
    assert random_resized_crop_box(40, 400, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (0, 173, 40, 53)
    assert random_resized_crop_box(400, 40, (0.9, 1.0), (3 / 4, 4 / 3), rng) == (173, 0, 53, 40)
    # A draw as wide as the frame is kept (torchvision's 0 < w <= width), at any of its rows: with it refused,
    # the fallback would centre the same box every time.
    rows = {random_resized_crop_box(100, 50, (0.5, 0.5), (4, 4), np.random.default_rng(s))[1] for s in range(30)}
    assert len(rows) > 5 and rows <= set(range(26))


def test_a_large_crop_at_exactly_the_area_share_is_kept():
    """PAD rejects a crop wanted large when its share of the frame is under 0.15: one of exactly 0.15
    is kept, one a pixel column narrower is not (and the draw falls back to RandomResizedCrop)."""
    exact = RoICropConfig(p=0.0, center_jitter=0.0, scale_min=1.0, scale_max=1.0)  # every draw wants a large crop
    image = np.zeros((200, 200), np.uint8)
    kept = object_sensitive_crop(image, np.array([[20, 20, 100, 60]]), np.random.default_rng(0), exact)
    assert kept.need_big and not kept.fallback and kept.box == (20, 20, 100, 60)  # 6,000 of 40,000 px
    short = object_sensitive_crop(image, np.array([[20, 20, 99, 60]]), np.random.default_rng(0), exact)
    assert short.need_big and short.fallback


def test_hflip_probability_and_content():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rng = np.random.default_rng(0)
    flips = [not np.array_equal(random_hflip(img, rng), img) for _ in range(2000)]
    assert abs(np.mean(flips) - 0.5) < 0.05
    np.testing.assert_array_equal(random_hflip(img, np.random.default_rng(0), p=1.0), img[:, ::-1])


def test_intensity_normalisation():
    u8 = np.array([[0, 255]], np.uint8)
    np.testing.assert_allclose(to_unit_intensity(u8), [[0, 1]])
    u16 = np.linspace(7000, 11000, 101).astype(np.uint16).reshape(1, -1)
    pct = to_unit_intensity(u16)
    assert pct.min() == 0 and pct.max() == 1  # 1st and 99th percentiles map to 0 and 1, clipped
    np.testing.assert_allclose(to_unit_intensity(u16, IntensityConfig("range")), u16 / 65535.0, rtol=1e-6)
    mm = to_unit_intensity(u16, IntensityConfig("minmax"))
    np.testing.assert_allclose(mm, (u16 - 7000.0) / 4000.0, atol=1e-6)
    # A flat frame whose percentiles lie under one count apart (here 1000.5 and 1001) is mapped with a span
    # of one count, not stretched to full contrast: its sensor noise stays noise.
    flat = np.array([1000, 1000] + [1001] * 149, np.uint16).reshape(1, -1)
    np.testing.assert_allclose(to_unit_intensity(flat)[0, [0, -1]], [0.0, 0.5])


def test_display_conversions_share_one_rule():
    from data_tools.transforms import stretch_to_uint8, to_uint8, to_unit_intensity

    frame8 = np.array([[0, 128, 255]], np.uint8)
    assert to_uint8(frame8) is frame8
    frame16 = np.linspace(0, 4000, 200, dtype=np.uint16).reshape(10, 20)
    assert np.array_equal(to_uint8(frame16), (to_unit_intensity(frame16) * 255.0 + 0.5).astype(np.uint8))
    assert stretch_to_uint8(np.array([-1.0, 0.0, 1.0])).tolist() == [0, 127, 255]
    assert stretch_to_uint8(np.array([-1.0, 0.5, 2.0]), lo=0.0, hi=1.0).tolist() == [0, 127, 255]
