"""Fine-tuning models: Mona and IV-tuning against SPEC §5-6 by hand, token geometry on non-square
grids, step-0 behaviour, each method's trainable set, parameter counts, heads, sliding windows,
metrics."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from data_tools.config import CONFIG_DIR, load_config
from finetune.factory import build_segmentor, parameter_report
from finetune.metrics import confusion_matrix, segmentation_metrics
from finetune.models.backbone import Backbone, BackboneConfig, default_out_indices
from finetune.models.ivtuning import HybridAdapter, IVTuningConfig, SimAM
from finetune.models.mona import Mona, MonaConfig
from finetune.models.segmentor import slide_inference
from pretrain.models.adapters import TokenContext
from pretrain.models.vit import EncoderConfig
from tests.conftest import changed_after_two_steps, tiny_pad_export

SEG = str(CONFIG_DIR / "finetune" / "seg_vitb.yaml")
TINY_ENC = EncoderConfig(size="tiny", depth=2, img_size=(64, 80))


def backbone(method, modality="ir", checkpoint=None, seed=0):
    torch.manual_seed(seed)
    return Backbone(BackboneConfig(method=method, modality=modality, encoder=TINY_ENC, checkpoint=checkpoint))


def randomize(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_mona_equals_spec_by_hand():
    torch.manual_seed(0)
    d, grid = 32, (3, 5)
    mona = Mona(d, MonaConfig(hidden=8)).eval()
    randomize(mona)
    x = torch.randn(2, 1 + 15, d)
    ctx = TokenContext(grid=grid, num_prefix=1)
    # SPEC §5 written out.
    z = mona.gamma * F.layer_norm(x, (d,), mona.norm.weight, mona.norm.bias) + mona.gamma_x * x
    h = z @ mona.down.weight.T + mona.down.bias
    cls, patches = h[:, :1], h[:, 1:]
    m = patches.transpose(1, 2).reshape(2, 8, *grid)
    op = mona.op
    convs = [F.conv2d(m, c.weight, c.bias, padding=c.padding, groups=8) for c in (op.conv3, op.conv5, op.conv7)]
    m = m + sum(convs) / 3
    m = m + F.conv2d(m, op.projector.weight, op.projector.bias)
    h = torch.cat([cls, m.flatten(2).transpose(1, 2)], dim=1)
    expected = x + F.gelu(h) @ mona.up.weight.T + mona.up.bias
    assert torch.allclose(mona(x, ctx), expected, atol=1e-5)


def test_mona_parameter_count_and_cls_bypass():
    d = 48
    mona = Mona(d).eval()
    assert sum(p.numel() for p in mona.parameters()) == 133 * d + 9728
    randomize(mona)
    ctx = TokenContext(grid=(4, 6), num_prefix=1)
    x = torch.randn(1, 25, d)
    y = x.clone()
    y[:, 1:] = torch.randn(1, 24, d)  # other patch tokens, same CLS
    assert torch.allclose(mona(x, ctx)[:, 0], mona(y, ctx)[:, 0], atol=1e-6)
    assert not torch.allclose(mona(x, ctx)[:, 1:], mona(y, ctx)[:, 1:])


def _nonzero_tokens(module, grid, where, dim, call):
    """Token indices that respond to a single non-zero patch token at (row, col) = where."""
    h, w = grid
    x = torch.zeros(1, 1 + h * w, dim)
    x[0, 1 + where[0] * w + where[1]] = torch.randn(dim)
    out = call(x, TokenContext(grid=grid, num_prefix=1))
    return {int(i) for i in torch.nonzero(out[0, 1:].abs().sum(-1) > 1e-7).flatten()}


def _neighbourhood(grid, where, radius):
    h, w = grid
    r, c = where
    return {y * w + x for y in range(max(r - radius, 0), min(r + radius + 1, h))
            for x in range(max(c - radius, 0), min(c + radius + 1, w))}


@pytest.mark.parametrize("where", [(5, 30), (0, 39), (29, 1)])
def test_hybrid_adapter_spreads_to_true_neighbours_on_a_640x480_grid(where):
    grid = (30, 40)  # 480 x 640 frame, patch 16: rows first
    dim = 24
    ha = HybridAdapter(dim, IVTuningConfig()).eval()  # eval: BatchNorm uses its (0, 1) running stats
    with torch.no_grad():
        torch.nn.init.normal_(ha.up.weight)  # zero at init: make the output visible
        ha.down.bias.zero_()
        for conv in (ha.op.pconv, ha.op.conv1, ha.op.conv2):
            torch.nn.init.normal_(conv.weight)
    got = _nonzero_tokens(ha, grid, where, dim, lambda x, ctx: ha(x, ctx))
    assert got == _neighbourhood(grid, where, 1)


def test_mona_spreads_to_its_7x7_neighbourhood_on_a_non_square_grid():
    grid, where, dim = (30, 40), (10, 3), 16
    mona = Mona(dim, MonaConfig(hidden=8)).eval()
    with torch.no_grad():
        mona.down.bias.zero_()
        mona.up.bias.zero_()
        for c in (mona.op.conv3, mona.op.conv5, mona.op.conv7, mona.op.projector):
            c.bias.zero_()
    got = _nonzero_tokens(mona, grid, where, dim, lambda x, ctx: mona(x, ctx) - x)
    assert got == _neighbourhood(grid, where, 3)


def test_simam_matches_its_formula():
    u = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    a = u.numpy()
    mean = a.mean(axis=(2, 3), keepdims=True)
    v = ((a - mean) ** 2).sum(axis=(2, 3), keepdims=True) / (5 * 7 - 1)
    expected = a / (1 + np.exp(-(((a - mean) ** 2) / (4 * (v + 1e-4)) + 0.5)))
    np.testing.assert_allclose(SimAM()(u).numpy(), expected, rtol=1e-10)


def test_ivtuning_step0_is_the_frozen_vit_on_prompted_visible_tokens():
    ivt, plain = backbone("ivtuning", "both").eval(), backbone("frozen", "vi").eval()
    vi, ir = torch.randn(2, 3, 64, 80), torch.randn(2, 1, 64, 80)
    # The per-block adapters add exactly zero at step 0: with the prompt generator's output conv
    # zeroed, IV-tuning equals the frozen ViT on the visible image.
    with torch.no_grad():
        ivt.prompter.generator.out.weight.zero_()
        ivt.prompter.generator.out.bias.zero_()
    for a, b in zip(ivt(ir, vi), plain(None, vi)):
        assert torch.allclose(a, b, atol=1e-5)
    # With its xavier init the prompt is non-zero and changes the features.
    fresh = backbone("ivtuning", "both").eval()
    assert not torch.allclose(fresh(ir, vi)[-1], plain(None, vi)[-1], atol=1e-3)


@pytest.fixture(scope="module")
def pad_export(tmp_path_factory):
    return tiny_pad_export(tmp_path_factory.mktemp("export"), depth=2)


@pytest.mark.parametrize("method,modality", [("full", "ir"), ("frozen", "vi"), ("pad", "ir"), ("mona", "ir"),
                                             ("ivtuning", "both"), ("ivtuning", "ir")])
def test_each_method_trains_exactly_its_declared_parameters(method, modality, pad_export):
    cfg = load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                      [f"model.method={method}", f"model.modality={modality}", "model.encoder.depth=2",
                       f"init.checkpoint={pad_export if method == 'pad' else 'null'}"])
    torch.manual_seed(0)
    model = build_segmentor(cfg).train()
    declared = model.trainable_names()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == declared
    ir, vi, label = torch.randn(2, 1, 64, 80), torch.randn(2, 3, 64, 80), torch.randint(0, 4, (2, 64, 80))
    changed = changed_after_two_steps(model, lambda: model(ir, vi, label))
    assert changed == declared
    backbone_names = {n for n in declared if n.startswith("backbone.")}
    expected_backbone = {
        "full": lambda n: not n.startswith("backbone.encoder.norm."),
        "pad": lambda n: not n.startswith("backbone.encoder.norm."),
        "frozen": lambda n: False,
        "mona": lambda n: ".mona." in n,
        "ivtuning": lambda n: ".ivtuning." in n or n.startswith("backbone.prompter."),
    }[method]
    assert backbone_names == {n for n, _ in model.named_parameters() if n.startswith("backbone.") and expected_backbone(n)}
    if method == "pad":
        assert any(".parallel_mlp.pad." in n for n in backbone_names)


def test_vitb_parameter_reports():
    def report(*overrides):
        return parameter_report(build_segmentor(load_config(SEG, list(overrides)), "meta"))

    mona = report("model.method=mona", "model.modality=ir")
    assert mona["trainable_backbone"] == 2_684_928 == 24 * (133 * 768 + 9728)
    d, k, c = 768, 64, 8
    hybrid_op = lambda ch: (ch // 4) * 9 + 2 * ch * ch + 2 * ch  # pconv, two 1x1 convs, BatchNorm
    ha = 2 * d + (d * k + k) + hybrid_op(k) + (k * d + d)
    ipa = 2 * d + (d * c + c) + (c * d + d) + 2 * d
    empg = 2 * (d * c + c) + hybrid_op(c) + (c * d + d)
    patch_embed = d * 3 * 16 * 16 + d
    ivt = report("model.method=ivtuning")
    assert ivt["trainable_backbone"] == 24 * (ha + ipa) + empg + patch_embed
    assert 0.03 < ivt["trainable_backbone_share"] < 0.045  # ViT-B: 4.0%
    large = report("model.method=ivtuning", "model.encoder.size=large")
    assert 0.025 < large["trainable_backbone_share"] < 0.032  # paper: 8.90M (2.84%) for ViT-L
    assert report("model.method=frozen", "model.modality=ir")["trainable_backbone"] == 0
    full = report("model.method=full", "model.modality=ir")
    assert full["trainable_backbone"] == full["backbone_total"] - 2 * 768  # all but the unused final norm


def test_out_indices_scale_with_depth():
    assert default_out_indices(12) == (3, 5, 7, 11)
    assert default_out_indices(24) == (7, 11, 15, 23)
    assert max(default_out_indices(2)) == 1


def test_segmentor_shapes_on_non_square_input():
    cfg = load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"), ["model.encoder.img_size=[48,96]"])
    model = build_segmentor(cfg).eval()
    out, aux = model.logits(torch.randn(1, 1, 48, 96), torch.randn(1, 3, 48, 96))
    assert out.shape == (1, 4, 12, 24) and aux.shape == (1, 4, 3, 6)
    assert model.predict(torch.randn(1, 1, 48, 96), torch.randn(1, 3, 48, 96)).shape == (1, 4, 48, 96)


class PointwiseModel:
    """Scores that depend on each pixel alone: sliding windows must reproduce them exactly."""
    num_classes = 3

    def predict(self, ir, vi):
        x = ir[:, :1]
        return torch.cat([x, 2 * x, -x], dim=1).softmax(dim=1)


def test_sliding_window_reproduces_a_pointwise_model():
    ir = torch.randn(2, 1, 70, 101)
    expected = PointwiseModel().predict(ir, None)
    for crop, stride in [((32, 48), (21, 32)), ((64, 64), (40, 40)), ((80, 128), (53, 85))]:  # last: padded
        for windows_per_batch in (1, 3, 64):
            got = slide_inference(PointwiseModel(), ir, None, crop, stride, windows_per_batch)
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-6)


def test_batched_windows_give_the_scores_of_one_window_at_a_time():
    cfg = load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"), ["model.encoder.img_size=[32,48]"])
    torch.manual_seed(0)
    model = build_segmentor(cfg).eval()
    ir, vi = torch.randn(1, 1, 70, 101), torch.randn(1, 3, 70, 101)
    one = slide_inference(model, ir, vi, (32, 48), (21, 32), windows_per_batch=1)  # 4 x 3 windows
    for windows_per_batch in (5, 16):
        assert torch.allclose(slide_inference(model, ir, vi, (32, 48), (21, 32), windows_per_batch), one, atol=1e-5)
    with pytest.raises(ValueError, match="windows_per_batch must be at least 1"):
        slide_inference(model, ir, vi, (32, 48), (21, 32), windows_per_batch=0)


def test_segmentation_metrics_on_fixed_input():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, target, 4, 255)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(cm, ["a", "b", "c", "d"])
    iou = {"a": 1 / 3, "b": 3 / 4, "c": 1 / 2}
    for k, v in iou.items():
        assert m["per_class_iou"][k] == pytest.approx(v)
    assert m["per_class_iou"]["d"] is None  # absent from both: no IoU, not a zero
    assert m["mIoU"] == pytest.approx(sum(iou.values()) / 3)
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)
