"""Fine-tuning as PAD's (MAE's) and UNIP's released configs run it. Segmentation (mmsegmentation):
frames rescaled to fit img_scale (2048, 512) x ratio in training and x 1 in evaluation, scored back at
their own size; crops redrawn while one class fills 75 % of them (cat_max_ratio); photometric
distortion of thermal frames; 16-bit frames normalised whole. Detection (detectron2's ViTDet): the
multi-step schedule of PAD's FLIR run."""
import numpy as np
import pytest
import torch

from data_tools.config import CONFIG_DIR, load_config
from finetune.data.augment import crop_corner, scale_factor, scaled_size
from finetune.schema import SegConfig

SEG_TINY = CONFIG_DIR / "finetune" / "seg_tiny.yaml"
SEG_VITB = CONFIG_DIR / "finetune" / "seg_vitb.yaml"


def one_frame(folder, ir, label):
    """A one-frame segmentation record: ``ir`` and ``label`` written as PNG under ``folder``."""
    import cv2

    from finetune.data.pairs import PairRecord

    for sub, array in (("ir", ir), ("labels", label)):
        (folder / sub).mkdir(exist_ok=True)
        cv2.imwrite(str(folder / sub / "a.png"), array)
    return PairRecord(name="a", ir=str(folder / "ir" / "a.png"), vi=None, label=str(folder / "labels" / "a.png"))


@pytest.mark.parametrize("hw, ratio, scale, expected", [
    ((480, 640), 1.0, (2048, 512), (512, 683)),    # MFNet / SODA: short side to 512
    ((480, 640), 0.5, (2048, 512), (256, 341)),
    ((480, 640), 2.0, (2048, 512), (1024, 1365)),
    ((512, 384), 1.0, (2048, 512), (683, 512)),    # portrait: the short side is the width
    ((200, 1600), 1.0, (2048, 512), (256, 2048)),  # a panorama: the long side bounds it
    ((480, 640), 0.75, None, (360, 480)),          # no img_scale: the frame's own size x ratio
    ((480, 640), 0.77, (2048, 512), (394, 525)),   # img_scale x ratio truncated first: 512 x 0.77 -> 394
])
def test_frames_are_rescaled_to_fit_img_scale_as_mmsegmentation(hw, ratio, scale, expected):
    assert scaled_size(*hw, scale_factor(*hw, ratio, scale)) == expected


class ScriptedRng:
    """Hands out the crop corners given, in order, and counts the draws."""

    def __init__(self, corners):
        self.values = [v for corner in corners for v in corner]
        self.draws = 0

    def integers(self, low, high):
        value = self.values.pop(0)
        assert low <= value < high
        self.draws += 1
        return value


def test_crops_are_redrawn_while_one_class_fills_three_quarters():
    label = np.zeros((4, 8), np.int64)
    label[:, :2] = 255  # ignore: not counted
    label[:, 6:] = 1
    # x = 0: one class among the labelled pixels; 3: class 0 at 0.75, not under it; 4: half and half
    rng = ScriptedRng([(0, 0), (0, 3), (0, 4), (0, 1)])
    assert crop_corner(label, (4, 4), rng, 0.75, 255) == (0, 4) and rng.draws == 6
    rng = ScriptedRng([(0, 0)] * 11)  # never good: the 11th draw is kept, as mmsegmentation's RandomCrop
    assert crop_corner(label, (4, 4), rng, 0.75, 255) == (0, 0) and rng.draws == 22
    rng = ScriptedRng([(0, 1), (0, 4)])  # cat_max_ratio 1: the first draw, whatever it holds
    assert crop_corner(label, (4, 4), rng, 1.0, 255) == (0, 1) and rng.draws == 2
    ignored = np.full((4, 8), 255, np.int64)  # no labelled pixel at all: redrawn to the 11th draw, no error
    rng = ScriptedRng([(0, 2)] * 11)
    assert crop_corner(ignored, (4, 4), rng, 0.75, 255) == (0, 2) and rng.draws == 22


def test_training_rescales_to_img_scale_before_the_crop(tmp_path):
    from finetune.data.seg import SegDataset
    from finetune.factory import seg_spec

    record = one_frame(tmp_path, np.full((480, 640), 100, np.uint8), np.ones((480, 640), np.uint8))
    for scale, seen in (("[2048,512]", 512 * 683), ("null", 480 * 640)):
        cfg = load_config(SEG_TINY, ["model.method=full", "model.modality=ir", "model.encoder.img_size=[704,704]",
                                     f"data.img_scale={scale}", "data.augment.ratio_range=[1.0,1.0]",
                                     "data.classes=[a,b]"], SegConfig)
        sample = SegDataset([record], seg_spec(cfg)).train_sample(0, np.random.default_rng(0))
        assert (sample["label"] == 1).sum() == seen  # the crop, larger than the frame, padded with ignore


def test_evaluation_infers_at_img_scale_and_scores_at_the_frames_own_size(monkeypatch):
    import finetune.models.segmentor as segmentor
    from finetune.seg import SegTask

    frame = np.linspace(-1, 1, 480 * 640, dtype=np.float32).reshape(1, 480, 640)
    seen = []

    def slide(model, ir, vi, crop, stride, windows_per_batch, out_size=None):
        seen.append((tuple(ir.shape), out_size))
        if ir.shape[-2:] != frame.shape[-2:]:  # bilinear, as cv2 resizes the frame before its normalisation
            import cv2
            expected = cv2.resize(frame[0], (ir.shape[-1], ir.shape[-2]), interpolation=cv2.INTER_LINEAR)
            assert np.allclose(ir[0, 0].numpy(), expected, atol=1e-5)
        return torch.ones(1, 4, *out_size)

    monkeypatch.setattr(segmentor, "slide_inference", slide)
    for scale in ("[2048,512]", "null"):
        cfg = load_config(SEG_TINY, ["model.method=full", "model.modality=ir", f"data.img_scale={scale}"], SegConfig)
        pred = SegTask.predict_frame(None, cfg, {"ir": frame}, torch.device("cpu"))
        assert pred.shape == (480, 640)
    assert seen == [((1, 1, 512, 683), (480, 640)), ((1, 1, 480, 640), (480, 640))]


def test_the_vitb_defaults_are_pads_pipeline():
    cfg = load_config(SEG_VITB, [], SegConfig)
    assert list(cfg.data.img_scale) == [2048, 512] and cfg.data.augment.cat_max_ratio == 0.75
    assert list(cfg.data.augment.ratio_range) == [0.5, 2.0] and list(cfg.model.encoder.img_size) == [512, 512]


def test_the_soda_and_flir_presets_hold_pads_released_recipes():
    """PAD's SODA UperNet run (mmsegmentation: AdamW lr 1e-4, betas 0.9 / 0.999, weight decay 0.05, layer
    decay 0.65, poly from 1,500 warm-up steps, 14,400 steps of 8 frames, drop path 0.1, blocks 3 / 5 / 7 /
    11, 512 crops slid at 341, UperNet 768 channels with an FCN auxiliary head of 256 at 0.4, BEiT's
    relative position bias and layer scale 1) and its FLIR ViTDet run (detectron2's AdamW: lr 1e-4, weight
    decay 0.1, layer decay 0.7, drop path 0.1, 1024 px, windows of 14 with relative positions)."""
    from finetune.models.segmentor import slide_stride
    from finetune.schema import DetConfig

    soda = load_config(CONFIG_DIR / "finetune" / "presets" / "soda.yaml", ["data.root=/data"], SegConfig)
    o, m, t = soda.optim, soda.model, soda.train
    assert (o.lr, list(o.betas), o.weight_decay, o.layer_decay, o.warmup_steps, o.poly_power, o.min_lr,
            o.milestones) == (1e-4, [0.9, 0.999], 0.05, 0.65, 1500, 1.0, 0.0, None)
    assert (t.steps, t.effective_batch, t.grad_clip) == (14400, 8, 0.0)
    assert (m.method, m.modality, m.encoder.drop_path, m.rel_pos_bias, m.layer_scale) == ("pad", "ir", 0.1, True, 1.0)
    assert m.out_indices is None and list(m.encoder.img_size) == [512, 512]  # None: 3, 5, 7, 11 of 12 blocks
    assert slide_stride(soda.eval.stride, (512, 512)) == (341, 341)
    h = m.head
    assert (h.type, h.channels, h.aux_channels, h.aux_weight, h.aux_level, h.dropout) == ("upernet", 768, 256, 0.4,
                                                                                        2, 0.1)
    flir = load_config(CONFIG_DIR / "finetune" / "presets" / "flir_v1.yaml", ["data.root=/data"], DetConfig)
    o, m = flir.optim, flir.model
    assert (o.lr, list(o.betas), o.weight_decay, o.layer_decay, o.warmup_steps) == (1e-4, [0.9, 0.999], 0.1, 0.7, 250)
    assert (m.method, m.encoder.drop_path, list(m.encoder.img_size), m.window_size, m.global_blocks,
            m.decomposed_rel_pos) == ("pad", 0.1, [1024, 1024], 14, None, True)


def _gradient16(height, width):
    """A 16-bit frame rising left to right over 20,000-40,000 (raw counts of a radiometric camera)."""
    return np.tile(np.linspace(20000, 40000, width), (height, 1)).astype(np.uint16)


def test_a_16_bit_frame_is_normalised_as_a_whole_before_the_training_crop(tmp_path):
    """The 1st / 99th percentiles are the frame's, as at pre-training and evaluation: a crop of the
    left half of a gradient spans about half the unit range. Normalised per crop, as before, every
    crop was stretched over the whole range, which evaluation (the whole frame) never does."""
    from data_tools.transforms import IR_MEAN, IR_STD
    from finetune.data.seg import SegDataset
    from finetune.factory import seg_spec

    record = one_frame(tmp_path, _gradient16(64, 160), np.ones((64, 160), np.uint8))
    cfg = load_config(SEG_TINY, ["model.method=full", "model.modality=ir", "model.encoder.img_size=[64,80]",
                                 "data.augment.ratio_range=[1.0,1.0]", "data.augment.hflip=0", "data.classes=[a,b]"],
                      SegConfig)
    dataset = SegDataset([record], seg_spec(cfg))
    whole = dataset.eval_sample(0)["ir"][0] * IR_STD + IR_MEAN
    for seed in range(4):
        unit = dataset.train_sample(0, np.random.default_rng(seed))["ir"][0] * IR_STD + IR_MEAN
        assert 0.45 < unit.max() - unit.min() < 0.55
        x = int(np.argmin(np.abs(whole[0] - unit[0, 0])))  # where the crop starts in the whole frame
        np.testing.assert_allclose(unit, whole[:, x:x + 80], atol=1e-5)


def test_a_16_bit_detection_frame_is_normalised_before_its_padding(tmp_path):
    """Evaluation pads a frame to the input size (with the normalised mean, after normalisation); padded
    in raw 16-bit counts, zeros would be half the pixels of this frame and move its 1st percentile from
    20,200 to 0."""
    import cv2

    from data_tools.transforms import IR_MEAN, IR_STD, IntensityConfig, to_unit_intensity
    from finetune.factory import det_dataset

    for folder in ("ir", "labels"):
        (tmp_path / folder).mkdir()
    frame = _gradient16(80, 160)
    cv2.imwrite(str(tmp_path / "ir" / "a.png"), frame)
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    cfg = load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml",
                      [f"data.root={tmp_path}", "data.dirs.vi=null", "model.modality=ir", "model.method=full",
                       "data.boxes.format=yolo", f"data.boxes.path={tmp_path / 'labels'}", "data.classes=[person]",
                       "model.encoder.img_size=[160,160]"])
    dataset, issues, _ = det_dataset(cfg, "val")
    sample = dataset.eval_sample(0)
    unit = sample["ir"][0] * IR_STD + IR_MEAN
    assert sample["scale"] == 1.0 and unit.shape == (160, 160)
    np.testing.assert_allclose(unit[:80], to_unit_intensity(frame, IntensityConfig()), atol=1e-5)
    np.testing.assert_allclose(sample["ir"][0][80:], 0.0, atol=1e-6)


def _mmseg_photometric(bgr, rng):
    """mmsegmentation's PhotoMetricDistortion written out from its transforms, on the BGR frame it
    loads, with its draws taken from a numpy Generator in its order."""
    import cv2

    def convert(img, alpha=1.0, beta=0.0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(img):
        return convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    img = convert(bgr, beta=rng.uniform(-32, 32)) if rng.integers(2) else bgr
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast(img)
    return img


def test_photometric_distortion_is_mmsegmentations_step_by_step():
    """Each step clipped and cut to 8 bits (a bright pixel pushed past 255 stays at 255 for the contrast
    that follows), contrast first or last, hue moved by whole OpenCV units up to 18 (36 degrees)."""
    from finetune.data.augment import photometric

    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    rgb[0, :4] = (250, 250, 250)
    changed = 0
    for seed in range(300):
        ours = photometric(rgb, np.random.default_rng(seed))
        theirs = _mmseg_photometric(np.ascontiguousarray(rgb[..., ::-1]), np.random.default_rng(seed))[..., ::-1]
        assert np.array_equal(ours, theirs), seed
        changed += not np.array_equal(ours, rgb)
    assert changed > 250  # four coins: 15 in 16 frames change
    # On grey (PAD's thermal frames) saturation and hue do nothing: brightness, then contrast, each cut
    # to 8 bits; a pixel at 250 brightened past 255 and then darkened starts from 255
    from finetune.data.augment import photometric_infrared

    grey = np.array([[250, 120, 3]], np.uint8)
    both = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        beta = rng.uniform(-32, 32) if rng.integers(2) else 0.0
        alpha = rng.uniform(0.5, 1.5) if rng.integers(2) else 1.0
        step = np.clip(grey + np.float32(beta), 0, 255).astype(np.uint8)
        expected = np.clip(step * np.float32(alpha), 0, 255).astype(np.uint8)
        assert np.array_equal(photometric_infrared(grey, np.random.default_rng(seed)), expected), seed
        both += beta > 5 and alpha < 1
    assert both > 10


def test_photometric_distortion_reaches_infrared_only_when_asked():
    """PAD's and UNIP's thermal pipelines run PhotoMetricDistortion on the thermal frame: on grey,
    brightness +-32 and contrast 0.5-1.5 (p 0.5 each), clipped; 16-bit frames on their [0, 1] scale."""
    from finetune.data.augment import photometric_infrared

    frame = np.full((4, 4), 200, np.uint8)
    outs = [photometric_infrared(frame, np.random.default_rng(seed)) for seed in range(64)]
    assert all(o.dtype == np.uint8 and len(np.unique(o)) == 1 for o in outs)
    values = {int(o[0, 0]) for o in outs}
    assert 200 in values and 255 in values and min(values) >= (200 - 32) * 0.5 - 1 and len(values) > 20
    unit = photometric_infrared(np.full((4, 4), 0.9, np.float32), np.random.default_rng(3))
    assert unit.dtype == np.float32 and 0 <= unit.min() and unit.max() <= 1
    # The 16-bit path is the 8-bit one on the [0, 1] scale (brightness +-32 / 255), but for the 8-bit cuts
    # (a level or less after brightness, contrast x1.5 at most after it, a level again).
    for seed in range(32):
        eight = photometric_infrared(np.full((2, 2), 128, np.uint8), np.random.default_rng(seed)) / 255.0
        wide = photometric_infrared(np.full((2, 2), 128 / 255, np.float32), np.random.default_rng(seed))
        assert np.abs(eight - wide).max() <= 3 / 255, seed


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_a_crop_larger_than_the_frame_is_padded_after_normalisation_as_mmsegmentation(tmp_path, flip):
    """mmsegmentation's Resize, RandomCrop, RandomFlip, ..., Normalize, Pad: a frame smaller than the crop
    is flipped as it is, then padded at the bottom / right with 0 (the normalised mean, not black) and its
    label with the ignore index."""
    from finetune.data.seg import SegDataset
    from finetune.factory import seg_spec

    ir = np.tile(np.linspace(150, 250, 50).astype(np.uint8), (40, 1))  # brighter to the right
    record = one_frame(tmp_path, ir, np.ones((40, 50), np.uint8))
    cfg = load_config(SEG_TINY, ["model.method=full", "model.modality=ir", "model.encoder.img_size=[64,80]",
                                 "data.augment.ratio_range=[1.0,1.0]", "data.img_scale=null", "data.classes=[a,b]",
                                 f"data.augment.hflip={flip}"], SegConfig)
    sample = SegDataset([record], seg_spec(cfg)).train_sample(0, np.random.default_rng(0))
    image, label = sample["ir"][0], sample["label"]
    assert image.shape == (64, 80) and label.shape == (64, 80)
    assert (image[40:] == 0).all() and (image[:, 50:] == 0).all()
    assert (label[40:] == 255).all() and (label[:, 50:] == 255).all() and (label[:40, :50] == 1).all()
    frame = image[:40, :50]
    assert (frame > 0.5).all() and (frame[:, 0] > frame[:, -1]).all() == bool(flip)


def test_the_thermal_presets_distort_infrared_as_pad_does(tmp_path):
    from finetune.data.seg import SegDataset
    from finetune.factory import seg_spec

    record = one_frame(tmp_path, np.full((64, 80), 100, np.uint8), np.ones((64, 80), np.uint8))
    assert load_config(CONFIG_DIR / "finetune" / "presets" / "soda.yaml", [], SegConfig).data.augment.photometric_ir
    for on in (True, False):
        cfg = load_config(SEG_TINY, ["model.method=full", "model.modality=ir", "model.encoder.img_size=[64,80]",
                                     "data.augment.ratio_range=[1.0,1.0]", "data.classes=[a,b]",
                                     f"data.augment.photometric_ir={str(on).lower()}"], SegConfig)
        dataset = SegDataset([record], seg_spec(cfg))
        means = {round(float(dataset.train_sample(0, np.random.default_rng(s))["ir"].mean()), 4) for s in range(8)}
        assert (len(means) > 1) == on


def test_the_poly_schedule_is_mmcvs_as_pads_segmentation_ran_it():
    """mmcv's poly policy with linear warm-up (PAD's, UNIP's and Mona's mmsegmentation 0.x configs):
    (1 - step / total)^power from step 0, times 1 - (1 - step / warmup)(1 - 1e-6) during the warm-up."""
    from finetune.seg import SegTask
    from pretrain.engine import poly_lr_at

    def mmcv(step, total, warmup, power=1.0, min_lr=0.0):
        regular = (1.0 - min_lr) * (1 - step / total) ** power + min_lr
        return regular * (1 - (1 - step / warmup) * (1 - 1e-6)) if step < warmup else regular

    for step in (0, 1, 500, 999, 1000, 1001, 5400, 9799, 9800):
        assert poly_lr_at(step, 9800, 1000, 1.0) == pytest.approx(mmcv(step, 9800, 1000), rel=1e-12, abs=1e-15)
        assert poly_lr_at(step, 9800, 1000, 1.0, 0.9, 0.01) == pytest.approx(mmcv(step, 9800, 1000, 0.9, 0.01))
    assert poly_lr_at(1000, 9800, 1000, 1.0) == pytest.approx(1 - 1000 / 9800)  # not back at the base rate
    assert poly_lr_at(0, 9800, 1000, 1.0) == pytest.approx(1e-6)
    assert poly_lr_at(9900, 9800, 1000, 1.0, 0.9, 0.01) == pytest.approx(0.01)  # past the end: the floor, no NaN
    task = SegTask()  # PAD's SODA schedule: 14,400 steps, 1,500 warm-up, lr 1e-4
    task.cfg = load_config(CONFIG_DIR / "finetune" / "presets" / "soda.yaml", ["data.root=/data"], SegConfig)
    task.total_steps = int(task.cfg.train.steps)
    for step in (750, 1500, 7200, 14399):
        assert task.learning_rate(step) == pytest.approx(1e-4 * mmcv(step, 14400, 1500))


def test_a_multi_step_schedule_is_detectron2s_and_the_flir_preset_runs_pads():
    """detectron2's WarmupMultiStepLR (warm-up from 0.001 x lr over 250 steps). PAD's FLIR detection
    (ViTDet): lr x 0.1 at step 35,448 and again at 48,741; the other detection presets: ViTDet's and
    IV-tuning's shares, 8/9 and 26/27 of the steps (163,889 and 177,546 of 184,375)."""
    from data_tools.config import ConfigError
    from finetune.det import DetTask
    from finetune.schema import DetConfig
    from pretrain.engine import step_lr_at

    def warm(step):  # detectron2's linear warm-up factor
        return 0.001 + 0.999 * step / 250 if step < 250 else 1.0

    steps = (0, 125, 250, 399, 400, 499, 500, 900)
    assert [step_lr_at(s, 250, 1.0, [400, 500]) for s in steps] == pytest.approx(
        [warm(0), warm(125), 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    task = DetTask()
    task.cfg = load_config(CONFIG_DIR / "finetune" / "presets" / "flir_v1.yaml", ["data.root=/data"], DetConfig)
    task.total_steps = int(task.cfg.train.steps)
    assert task.total_steps == 53172 and task.cfg.train.effective_batch == 2
    lrs = [task.learning_rate(s) for s in (100, 1000, 35447, 35448, 48741, 53171)]
    assert lrs == pytest.approx([1e-4 * warm(100), 1e-4, 1e-4, 1e-5, 1e-6, 1e-6])
    task.cfg = load_config(CONFIG_DIR / "finetune" / "presets" / "m3fd.yaml", ["data.root=/data", "train.steps=184375"],
                           DetConfig)
    task.total_steps = 184375
    lrs = [task.learning_rate(s) for s in (0, 163888, 163889, 177545, 177546)]
    assert lrs == pytest.approx([1e-7, 1e-4, 1e-5, 1e-5, 1e-6])
    with pytest.raises(ConfigError, match="milestones must be ascending"):
        load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml", ["optim.milestones=[20,10]"], DetConfig)
    for mixed in ("[0.5,30]", "[1.5]", "[0.0]"):
        with pytest.raises(ConfigError, match="all steps .integers >= 1. or all shares of train.steps"):
            load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml", [f"optim.milestones={mixed}"], DetConfig)
