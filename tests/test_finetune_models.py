"""Fine-tuning models: Mona (arXiv 2408.08345) and IV-tuning (arXiv 2412.16654) against their
formulas written out by hand, token geometry on non-square grids, step-0 behaviour, each method's
trainable set, parameter counts, heads, sliding windows, metrics."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from data_tools.config import CONFIG_DIR, load_config
from finetune.factory import build_detector, build_segmentor, parameter_report
from finetune.metrics import confusion_matrix, segmentation_metrics
from finetune.models.backbone import Backbone, BackboneConfig, default_out_indices
from finetune.models.detector import DETECTORS as DETECTOR_REGISTRY
from finetune.models.ivtuning import HybridAdapter, IVTuningConfig, SimAM, to_vit_prompt_keys
from finetune.models.methods import Method, get_method, method_names, register
from finetune.models.mona import Mona, MonaConfig
from finetune.models.segmentor import slide_inference
from finetune.weights import backbone_for
from pretrain.models.adapters import TokenContext
from pretrain.models.vit import EncoderConfig
from tests.conftest import changed_after_two_steps, tiny_pad_export

SEG = str(CONFIG_DIR / "finetune" / "seg_vitb.yaml")
TINY_ENC = EncoderConfig(size="tiny", depth=2, img_size=(64, 80))


def backbone(method, modality="ir", checkpoint=None, seed=0):
    torch.manual_seed(seed)
    return backbone_for(BackboneConfig(method=method, modality=modality, encoder=TINY_ENC, checkpoint=checkpoint))


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
    # Small tokens too, where the LayerNorm's epsilon (PyTorch's default 1e-5, as Mona's) shows.
    for x in (torch.randn(2, 1 + 15, d), 0.01 * torch.randn(2, 1 + 15, d)):
        _check_mona_by_hand(mona, x, grid)
    # Training: dropout (p 0.1, Mona's) on GELU's output, before the up projection.
    mona.train()
    x = torch.randn(2, 1 + 15, d)
    _check_mona_by_hand(mona, x, grid, dropout=lambda t: F.dropout(t, 0.1, training=True))
    ctx = TokenContext(grid=grid, num_prefix=1)
    torch.manual_seed(3)
    assert not torch.allclose(mona(x, ctx), mona.eval()(x, ctx), atol=1e-4)  # the dropout did act


def _check_mona_by_hand(mona, x, grid, dropout=lambda t: t):
    d = x.shape[-1]
    ctx = TokenContext(grid=grid, num_prefix=1)
    # Mona (arXiv 2408.08345) written out.
    z = mona.gamma * F.layer_norm(x, (d,), mona.norm.weight, mona.norm.bias, eps=1e-5) + mona.gamma_x * x
    h = z @ mona.down.weight.T + mona.down.bias
    cls, patches = h[:, :1], h[:, 1:]
    m = patches.transpose(1, 2).reshape(2, 8, *grid)
    op = mona.op
    convs = [F.conv2d(m, c.weight, c.bias, padding=c.padding, groups=8) for c in (op.conv3, op.conv5, op.conv7)]
    m = m + sum(convs) / 3
    m = m + F.conv2d(m, op.projector.weight, op.projector.bias)
    h = torch.cat([cls, m.flatten(2).transpose(1, 2)], dim=1)
    torch.manual_seed(3)
    expected = x + dropout(F.gelu(h)) @ mona.up.weight.T + mona.up.bias
    torch.manual_seed(3)
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


def test_mona_init_is_the_released_backbones():
    """Down / Up trunc-normal(0.02) with zero bias (Mona's init_weights on every Linear); the
    scales gamma = 1e-6, gamma_x = 1."""
    torch.manual_seed(0)
    mona = Mona(768)
    for linear in (mona.down, mona.up):
        assert abs(linear.weight.std().item() - 0.02) < 0.001 and torch.count_nonzero(linear.bias) == 0
    assert torch.all(mona.gamma == 1e-6) and torch.all(mona.gamma_x == 1)


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
    with torch.no_grad():  # zero biases: only the non-zero token and its neighbours respond
        for layer in (ha.down, ha.up, ha.op.pconv, ha.op.conv1, ha.op.conv2):
            layer.bias.zero_()
        for conv in (ha.op.pconv, ha.op.conv1, ha.op.conv2):
            torch.nn.init.normal_(conv.weight)
    got = _nonzero_tokens(ha, grid, where, dim, lambda x, ctx: torch.cat([x[:, :1], ha(x[:, 1:], ctx)], dim=1))
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


# --- IV-tuning (arXiv 2412.16654) written out (independent of finetune.models.ivtuning's code) ---------

def _ref_hybrid_op(m, op):
    q = m.shape[1] // 4  # PConv's n_div 4: a quarter of the channels through the 3x3 depthwise conv
    head = F.conv2d(m[:, :q], op.pconv.weight, op.pconv.bias, padding=1, groups=q)
    y = m + torch.cat([head, m[:, q:]], dim=1)
    t = F.conv2d(y, op.conv1.weight, op.conv1.bias)
    bn = op.bn  # eval: running statistics; epsilon PyTorch's default, as upstream's BatchNorm2d
    t = (t - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
    t = t * bn.weight[:, None, None] + bn.bias[:, None, None]
    return y + F.conv2d(F.relu(t), op.conv2.weight, op.conv2.bias)


def _ref_simam(u):
    d = (u - u.mean(dim=(2, 3), keepdim=True)) ** 2
    v = d.sum(dim=(2, 3), keepdim=True) / (u.shape[2] * u.shape[3] - 1)
    return u * torch.sigmoid(d / (4 * (v + 1e-4)) + 0.5)


def _to_map(t, grid):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def _from_map(m):
    return m.flatten(2).transpose(1, 2)


def _ref_ha(x, ha, grid, dropout=lambda t: t):
    z = F.layer_norm(x, x.shape[-1:], ha.norm.weight, ha.norm.bias, 1e-5) * ha.gamma + ha.beta
    h = _from_map(_ref_hybrid_op(_to_map(z @ ha.down.weight.T + ha.down.bias, grid), ha.op))
    return dropout(F.gelu(h)) @ ha.up.weight.T + ha.up.bias


def _ref_ipa(s, ipa, grid):
    z = F.layer_norm(s, s.shape[-1:], ipa.norm.weight, ipa.norm.bias, 1e-5) * ipa.gamma + ipa.beta
    h = _from_map(_ref_simam(_to_map(z @ ipa.down.weight.T + ipa.down.bias, grid)))
    return F.gelu((F.gelu(h) @ ipa.up.weight.T + ipa.up.bias) * ipa.scale + ipa.bias)


def _ref_block(x, s, block, grid):
    """IV-tuning block: the frozen timm sub-layers, then patch tokens += HA(x) + IPA(s) after the
    attention residual and again after the MLP residual; the CLS token only takes the frozen path."""
    x = x + block.attn(block.norm1(x))
    a = block.post_attn["ivtuning"]
    x = torch.cat([x[:, :1], x[:, 1:] + _ref_ha(x[:, 1:], a.hybrid, grid) + _ref_ipa(s, a.prompt, grid)], dim=1)
    x = x + block.mlp(block.norm2(x))
    a = block.post_mlp["ivtuning"]
    return torch.cat([x[:, :1], x[:, 1:] + _ref_ha(x[:, 1:], a.hybrid, grid) + _ref_ipa(s, a.prompt, grid)], dim=1)


def _random_ivtuning_backbone(img_size=(48, 80)):
    torch.manual_seed(0)
    model = Backbone(BackboneConfig(method="ivtuning", modality="both",
                                    encoder=EncoderConfig(size="tiny", depth=2, img_size=img_size), out_indices=(0, 1)))
    randomize(model)  # every weight non-zero, BatchNorm running statistics included
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.abs_().add_(0.5)
    return model.eval()


def test_ivtuning_block_equals_spec_by_hand_on_a_non_square_grid():
    model = _random_ivtuning_backbone()
    block, grid = model.encoder.blocks[0], (3, 5)
    x, s = torch.randn(2, 1 + 15, 192), torch.randn(2, 15, 192)
    with torch.no_grad():
        got = block(x, TokenContext(grid=grid, num_prefix=1, stream=s))
        expected = _ref_block(x, s, block, grid)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    # The CLS token bypasses the adapters: after the post-attention adapter it is what it was.
    adapter = block.post_attn["ivtuning"]
    with torch.no_grad():
        out = adapter(x, TokenContext(grid=grid, num_prefix=1, stream=s))
    assert torch.equal(out[:, 0], x[:, 0]) and not torch.allclose(out[:, 1:], x[:, 1:])


def test_ivtuning_hybrid_adapter_drops_out_after_its_gelu_in_training():
    """Upstream's Mona-style adapter: dropout(p 0.1) on GELU's output, before the up projection
    (the order matters only while training: the dropout scales what survives by 1 / 0.9)."""
    ha = _random_ivtuning_backbone().encoder.blocks[0].post_attn["ivtuning"].hybrid.train()
    ha.op.bn.eval()  # running statistics, as the reference uses them
    x, grid = torch.randn(2, 15, 192), (3, 5)
    ctx = TokenContext(grid=grid, num_prefix=0, stream=None)
    with torch.no_grad():
        torch.manual_seed(3)
        got = ha(x, ctx)
        torch.manual_seed(3)
        expected = _ref_ha(x, ha, grid, dropout=lambda t: F.dropout(t, 0.1, training=True))
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        assert not torch.allclose(got, _ref_ha(x, ha, grid), atol=1e-3)  # the dropout did act


def test_ivtuning_norms_match_by_hand_on_small_tokens():
    """Tokens of small spread, where each LayerNorm's and BatchNorm's epsilon (PyTorch's default
    1e-5, as upstream's) shows: both adapters of a block and the prompt LayerNorm."""
    model = _random_ivtuning_backbone()
    block, grid = model.encoder.blocks[0], (3, 5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(1e-4)
    x, s = 0.01 * torch.randn(2, 15, 192), 0.01 * torch.randn(2, 15, 192)
    ctx = TokenContext(grid=grid, num_prefix=0, stream=s)
    with torch.no_grad():
        for adapter in (block.post_attn["ivtuning"], block.post_mlp["ivtuning"]):
            torch.testing.assert_close(adapter.hybrid(x, ctx), _ref_ha(x, adapter.hybrid, grid), atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(adapter.prompt(s, ctx), _ref_ipa(s, adapter.prompt, grid), atol=2e-5, rtol=1e-5)
        norm = model.prompter.norm
        torch.testing.assert_close(norm(x), F.layer_norm(x, (192,), norm.weight, norm.bias, 1e-5), atol=1e-5, rtol=1e-5)


def test_ivtuning_backbone_equals_spec_by_hand():
    """The whole backbone (48x80 input: a 3x5 grid) against IV-tuning written out: infrared patch
    embedding, one shared prompt LayerNorm, EMPG, x + p + pos, s_0 = p, s_{i+1} = block i's output."""
    model = _random_ivtuning_backbone()
    vit, pr = model.encoder, model.prompter
    vi, ir = torch.randn(2, 3, 48, 80), torch.randn(2, 1, 48, 80)
    grid = (3, 5)
    with torch.no_grad():
        got = model(ir, vi)
        x = _from_map(F.conv2d(vi, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, stride=16))
        z = _from_map(F.conv2d(ir.expand(-1, 3, -1, -1), pr.infrared_embed.proj.weight, pr.infrared_embed.proj.bias,
                               stride=16))
        xn, zn = (F.layer_norm(t, (192,), pr.norm.weight, pr.norm.bias, 1e-5) for t in (x, z))
        g = pr.generator
        vis = _ref_hybrid_op(F.conv2d(_to_map(xn, grid), g.visible_in.weight, g.visible_in.bias), g.visible_op)
        inf = _ref_simam(F.conv2d(_to_map(zn, grid), g.infrared_in.weight, g.infrared_in.bias))
        p = _from_map(F.conv2d(vis + inf, g.out.weight, g.out.bias))
        tokens = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1),
                            x + p + vit.pos_embed[:, 1:]], dim=1)
        s, expected = p, []
        for block in vit.blocks:
            tokens = _ref_block(tokens, s, block, grid)
            s = tokens[:, 1:]
            expected.append(_to_map(tokens[:, 1:], grid))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)


def test_ivtuning_init_is_upstreams():
    """Adapters act from step 0 (Linear default init, gamma = scale = 1, beta = bias = 0); the
    infrared patch embedding is PyTorch's default, not a copy of the visible one; EMPG
    xavier-uniform on weights of more than one dimension."""
    torch.manual_seed(0)
    model = backbone("ivtuning", "both")
    a = model.encoder.blocks[0].post_mlp["ivtuning"]
    assert torch.all(a.hybrid.gamma == 1) and torch.all(a.hybrid.beta == 0)
    assert torch.all(a.prompt.scale == 1) and torch.all(a.prompt.bias == 0)
    assert a.hybrid.up.weight.abs().sum() > 0 and a.hybrid.op.pconv.bias is not None
    pe, ipe = model.encoder.patch_embed.proj.weight, model.prompter.infrared_embed.proj.weight
    assert not torch.equal(pe, ipe)
    bound = 1 / (3 * 16 * 16) ** 0.5  # kaiming-uniform(a = sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert ipe.abs().max() <= bound and ipe.std() > 0.5 * bound / 3**0.5
    w = model.prompter.generator.visible_op.conv1.weight  # xavier: U(+-sqrt(6 / (fan_in + fan_out)))
    assert w.abs().max() <= (6 / (64 + 64)) ** 0.5 and w.abs().max() > 0.9 * (6 / (64 + 64)) ** 0.5
    assert model.prompter.generator.out.weight.shape == (192, 64, 1, 1)  # EMPG width 64 (the ViT reference)
    assert a.prompt.down.out_features == 8 and a.hybrid.down.out_features == 64
    vi, ir = torch.randn(2, 3, 64, 80), torch.randn(2, 1, 64, 80)
    plain = backbone("frozen", "vi").eval()
    assert not torch.allclose(model.eval()(ir, vi)[-1], plain(None, vi)[-1], atol=1e-3)


def test_vit_prompt_state_dict_round_trips_through_the_key_map(tmp_path):
    from finetune.models.ivtuning import from_vit_prompt_keys

    model = _random_ivtuning_backbone()
    theirs = to_vit_prompt_keys(model.state_dict())
    # The authors' names (ViT_prompt), written out for one block and the input side.
    for key in ["patch_embed.proj.weight", "patch_embed_prompt.proj.weight", "prompt_norms.0.weight",
                "prompt_blocks.0.conv0_0.weight", "prompt_blocks.0.conv0_1.bias", "prompt_blocks.0.conv1x1.weight",
                "prompt_blocks.0.adapter_conv.partial_conv.weight", "prompt_blocks.0.adapter_conv.BN.running_var",
                "blocks.1.mona_prompt1.project1.weight", "blocks.1.mona_prompt1.gamma", "blocks.1.mona_prompt2.beta",
                "blocks.1.mona_prompt2.adapter_conv.project2.bias", "blocks.1.mona_prompt1.norm.weight",
                "blocks.0.extra_prompt1.down.weight", "blocks.0.extra_prompt2.scale", "blocks.0.extra_prompt2.bias",
                "blocks.0.attn.qkv.weight", "pos_embed"]:
        assert key in theirs, key
    assert not any(".post_attn." in k or ".post_mlp." in k or k.startswith("prompter.") for k in theirs)
    # Their EMPG sees a (w, h) map: its 3x3 kernel is ours transposed.
    ours_k = model.prompter.generator.visible_op.pconv.weight
    assert torch.equal(theirs["prompt_blocks.0.adapter_conv.partial_conv.weight"], ours_k.transpose(-1, -2))
    back = from_vit_prompt_keys(theirs)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.norm.")}
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)
    # Loading their file into a fresh backbone through the config gives the same model, run as
    # theirs runs: without a CLS token.
    torch.save({"state_dict": {"backbone." + k: v for k, v in theirs.items()}}, tmp_path / "ivt.pth")
    loaded = backbone_for(BackboneConfig(method="ivtuning", modality="both", checkpoint=str(tmp_path / "ivt.pth"),
                                     encoder=EncoderConfig(size="tiny", depth=2, img_size=(48, 80)),
                                     out_indices=(0, 1))).eval()
    assert loaded.load_report.missing == [] and loaded.num_prefix == 0
    without_cls = Backbone(dataclasses.replace(model.cfg, prefix_tokens=False)).eval()
    without_cls.load_state_dict(model.state_dict())
    vi, ir = torch.randn(1, 3, 48, 80), torch.randn(1, 1, 48, 80)
    with torch.no_grad():
        for a, b in zip(loaded(ir, vi), without_cls(ir, vi)):
            assert torch.equal(a, b)
    theirs["blocks.0.mona_prompt3.gamma"] = torch.ones(192)  # a tensor that lands nowhere
    torch.save(theirs, tmp_path / "stray.pth")
    from pretrain.weights import WeightsError
    with pytest.raises((WeightsError, StopIteration)):
        backbone_for(BackboneConfig(method="ivtuning", modality="both", checkpoint=str(tmp_path / "stray.pth"),
                                encoder=EncoderConfig(size="tiny", depth=2, img_size=(48, 80))))


def _vit_prompt_release(tmp_path, seed=0):
    """A file laid out as the authors' ViT_prompt checkpoints are: their key names, and the position
    embedding at the 224 px pre-training grid with its CLS slot (their ViT resamples it at every
    forward, so it never changes size)."""
    theirs = to_vit_prompt_keys(_random_ivtuning_backbone(img_size=(224, 224)).state_dict())
    del theirs["cls_token"]  # their ViT has none
    assert theirs["pos_embed"].shape == (1, 1 + 14 * 14, 192)
    path = tmp_path / f"vit_prompt_{seed}.pth"
    torch.save({"state_dict": {"backbone." + k: v for k, v in theirs.items()}}, path)
    return path, theirs


def test_a_vit_prompt_release_loads_at_another_input_size_resampled_as_theirs(tmp_path):
    """Their detectors run at 800-1024 px from a file that keeps 197 positions: the embedding is
    resampled once to our grid as their get_abs_pos does at every forward (bicubic, corners not
    aligned, no antialiasing), here to a non-square 6x10 grid."""
    path, theirs = _vit_prompt_release(tmp_path)
    loaded = backbone_for(BackboneConfig(method="ivtuning", modality="both", checkpoint=str(path),
                                         encoder=EncoderConfig(size="tiny", depth=2, img_size=(96, 160)),
                                         out_indices=(0, 1)))
    grid = theirs["pos_embed"][:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 10), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(loaded.encoder.pos_embed[:, 1:], expected, atol=1e-6)
    assert "encoder.pos_embed" in loaded.load_report.adapted and loaded.load_report.missing == []


def test_a_vit_prompt_release_with_zero_relative_position_tables_loads_and_with_learnt_ones_is_refused(tmp_path):
    """Their ViT built with ViTDet's use_rel_pos holds relative position tables, frozen at zero by
    IV-tuning: dropped (they add nothing); tables that are not zero are refused by name."""
    from pretrain.weights import WeightsError

    path, theirs = _vit_prompt_release(tmp_path)
    for i in (0, 1):
        theirs[f"blocks.{i}.attn.rel_pos_h"] = torch.zeros(27, 64)
        theirs[f"blocks.{i}.attn.rel_pos_w"] = torch.zeros(27, 64)
    torch.save(theirs, path)
    cfg = BackboneConfig(method="ivtuning", modality="both", checkpoint=str(path),
                         encoder=EncoderConfig(size="tiny", depth=2, img_size=(64, 80)), out_indices=(0, 1))
    assert "4 relative position tables, all zero, dropped" in backbone_for(cfg).load_report.adapted
    theirs["blocks.1.attn.rel_pos_w"][3, 5] = 0.1
    torch.save(theirs, path)
    with pytest.raises(WeightsError, match=r"1 relative position table\(s\) are not zero \(e.g. "
                                           r"encoder.blocks.1.attn.rel_pos_w\)"):
        backbone_for(cfg)


def test_a_vit_prompt_release_runs_without_a_cls_token_as_theirs_does(tmp_path):
    """Their ViT (a ViTDet backbone) has no CLS token; one in our attention would change every
    feature their adapters were trained on. A plain MAE start keeps the CLS token (SPEC)."""
    path, _ = _vit_prompt_release(tmp_path)
    cfg = BackboneConfig(method="ivtuning", modality="both", checkpoint=str(path),
                         encoder=EncoderConfig(size="tiny", depth=2, img_size=(64, 80)), out_indices=(0, 1))
    loaded = backbone_for(cfg).eval()
    assert loaded.num_prefix == 0 and "encoder.cls_token" not in loaded.trainable_names()
    vi, ir = torch.randn(1, 3, 64, 80), torch.randn(1, 1, 64, 80)
    with torch.no_grad():
        before = loaded(ir, vi)
        loaded.encoder.cls_token.normal_(0, 5.0)
        after = loaded(ir, vi)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert backbone("ivtuning", "both").num_prefix == 1


@pytest.fixture(scope="module")
def pad_export(tmp_path_factory):
    return tiny_pad_export(tmp_path_factory.mktemp("export"), depth=2)


DETECTORS = DETECTOR_REGISTRY.names()
# What each built-in method trains in the backbone (names inside it), stated apart from the registry.
EXPECTED_BACKBONE = {
    "full": lambda n: not n.startswith("encoder.norm."),
    "pad": lambda n: not n.startswith("encoder.norm."),
    "frozen": lambda n: False,
    "mona": lambda n: ".mona." in n,
    "ivtuning": lambda n: ".ivtuning." in n or n.startswith("prompter."),
}


def _registered_cases():
    """Every registered method with every image stream it takes, for both tasks."""
    cases = [(m, modality) for m in method_names() for modality in get_method(m).modalities]
    return [(task, m, modality) for task in ("seg", "det") for m, modality in cases]


@pytest.mark.parametrize("task,method,modality", _registered_cases())
def test_each_registered_method_trains_exactly_its_declared_parameters(task, method, modality, pad_export):
    """Forward + backward through the whole model; exactly the declared set changes."""
    case = _registered_cases().index((task, method, modality))
    overrides = [f"model.method={method}", f"model.modality={modality}", "model.encoder.depth=2",
                 f"init.checkpoint={pad_export if method == 'pad' else 'null'}", "model.encoder.img_size=[64,80]"]
    if task == "det":
        overrides.append(f"model.head.detector={DETECTORS[case % len(DETECTORS)]}")
    cfg = load_config(str(CONFIG_DIR / "finetune" / f"{task}_tiny.yaml"), overrides)
    torch.manual_seed(0)
    model = (build_segmentor if task == "seg" else build_detector)(cfg).train()
    declared = model.trainable_names()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == declared
    ir, vi = torch.randn(2, 1, 64, 80), torch.randn(2, 3, 64, 80)
    if task == "seg":
        targets = torch.randint(0, 4, (2, 64, 80))
    else:
        targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
                   {"boxes": torch.tensor([[30.0, 10.0, 70.0, 30.0]]), "labels": torch.tensor([0])}]
    changed = changed_after_two_steps(model, lambda: model(ir, vi, targets))
    prefix = model.backbone_prefix
    inside = lambda names: {n[len(prefix):] for n in names if n.startswith(prefix)}  # noqa: E731
    assert inside(changed) == inside(declared)
    if task == "seg":
        assert changed == declared
    else:  # a torchvision head can hold branches this loss does not reach (no gradient): never more
        assert changed <= declared
        model.eval()
        out = model.predict(ir, vi)
        assert len(out) == 2 and all(o["boxes"].shape[1] == 4 for o in out)
    assert changed - {n for n in changed if n.startswith(prefix)}  # the head trains
    rule = EXPECTED_BACKBONE[method]
    assert inside(declared) == {n for n in inside(n for n, _ in model.named_parameters()) if rule(n)}
    if method == "pad":
        assert any(".parallel_mlp.pad." in n for n in inside(declared))


@pytest.mark.parametrize("method", ["pad", "mona", "ivtuning", "full"])
def test_an_export_loads_under_every_method(method, pad_export):
    """The export's encoder and PAD adapters land whatever the method attaches on top of them."""
    from pretrain.weights import load_backbone

    modality = "both" if method == "ivtuning" else "ir"
    backbone = backbone_for(BackboneConfig(method=method, modality=modality, checkpoint=pad_export,
                                           encoder=EncoderConfig(size="tiny", depth=2, img_size=(64, 80))))
    assert backbone.load_report.missing == [] and backbone.load_report.unexpected == []
    exported, _, _ = load_backbone(pad_export, (64, 80))
    ours = backbone.encoder.state_dict()
    for k, v in exported.state_dict().items():
        assert torch.equal(ours[k], v), k
    assert any(f".{method}." in k for k in ours) == (method in ("pad", "mona", "ivtuning"))


def test_building_a_backbone_reads_no_file(tmp_path):
    """Model code builds from its config alone; the weights are a separate step."""
    missing = str(tmp_path / "not_there.pth")
    built = Backbone(BackboneConfig(method="mona", modality="ir", encoder=TINY_ENC, checkpoint=missing))
    assert built.load_report is None
    with pytest.raises(FileNotFoundError):
        backbone_for(BackboneConfig(method="mona", modality="ir", encoder=TINY_ENC, checkpoint=missing))


def test_registry_refuses_unknown_methods_and_streams_with_the_names():
    with pytest.raises(ValueError, match=r"method must be one of \('frozen', 'full', 'ivtuning', 'mona', "
                                         r"'pad'\), got 'lora'"):
        get_method("lora")
    with pytest.raises(ValueError, match="method 'mona' takes one image"):
        BackboneConfig(method="mona", modality="both")
    with pytest.raises(ValueError, match="already registered"):
        register(Method("mona", "another Mona"))
    with pytest.raises(ValueError, match="method lora: trains must be all, none or own, got 'some'"):
        Method("lora", "low-rank updates", trains="some")


def test_vitb_parameter_reports():
    def report(*overrides):
        return parameter_report(build_segmentor(load_config(SEG, list(overrides)), "meta"))

    mona = report("model.method=mona", "model.modality=ir")
    assert mona["trainable_backbone"] == 2_684_928 == 24 * (133 * 768 + 9728)
    d, k, c, e = 768, 64, 8, 64  # HA, IPA and EMPG widths
    hybrid_op = lambda ch: (ch // 4) * 10 + 2 * (ch * ch + ch) + 2 * ch  # pconv, two 1x1 convs (biases), BN
    ha = 2 * d + 2 * d + (d * k + k) + hybrid_op(k) + (k * d + d)  # LN, gamma / beta, Down, op, Up
    ipa = 2 * d + 2 * d + (d * c + c) + (c * d + d) + 2 * d  # LN, gamma / beta, Down, Up, scale / bias
    empg = 2 * (d * e + e) + hybrid_op(e) + (e * d + d)
    prompt_norm = 2 * d
    patch_embed = d * 3 * 16 * 16 + d
    ivt = report("model.method=ivtuning")
    assert ivt["trainable_backbone"] == 24 * (ha + ipa) + empg + prompt_norm + patch_embed == 3_832_800
    assert 0.04 < ivt["trainable_backbone_share"] < 0.045  # ViT-B: 4.2%
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


def test_linear_probe_is_one_1x1_conv_on_the_concatenated_block_maps():
    """UNIP's linear probing: the out_indices maps at stride 16, concatenated without a neck or a
    normalisation, one 1x1 convolution (N(0, 0.01), bias 0); with method frozen only it trains."""
    cfg = load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                      ["model.encoder.img_size=[48,96]", "model.method=frozen", "model.modality=ir",
                       "model.head.type=linear"])
    torch.manual_seed(0)
    model = build_segmentor(cfg).eval()
    assert model.aux_head is None
    conv = model.decode_head.classifier
    dim, classes = model.backbone.embed_dim, len(cfg.data.classes)
    assert conv.weight.shape == (classes, 4 * dim, 1, 1) and conv.bias.abs().max() == 0
    assert 0.008 < conv.weight.std().item() < 0.012
    randomize(model.decode_head)
    ir = torch.randn(2, 1, 48, 96)
    out, aux = model.logits(ir, None)
    maps = model.backbone(ir, None)
    assert len(maps) == 4 and maps[0].shape == (2, dim, 3, 6)
    by_hand = torch.einsum("kc,bchw->bkhw", conv.weight[:, :, 0, 0], torch.cat(maps, dim=1)) + conv.bias[:, None, None]
    assert aux is None and out.shape == (2, classes, 3, 6)
    assert torch.allclose(out, by_hand, atol=1e-5)
    assert model.trainable_names() == {"decode_head.classifier.weight", "decode_head.classifier.bias"}
    vitb = parameter_report(build_segmentor(load_config(SEG, ["model.method=frozen", "model.modality=ir",
                                                               "model.head.type=linear"]), "meta"))
    assert vitb["trainable_backbone"] == 0 and vitb["trainable"] == 9 * (4 * 768 + 1)  # MFNet's 9 classes
    # no BatchNorm: one frame per step trains, and the check lets it
    from finetune.preflight import check_batch

    model.train()(ir[:1], None, torch.zeros(1, 48, 96, dtype=torch.long)).backward()
    # a frozen encoder runs as at evaluation in training too: no stochastic depth
    deep = build_segmentor(load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                                       ["model.encoder.img_size=[48,96]", "model.method=frozen", "model.modality=ir",
                                        "model.head.type=linear", "model.encoder.drop_path=0.5"])).train()
    assert deep.training and not deep.backbone.encoder.training
    with torch.no_grad():
        assert torch.equal(deep.logits(ir, None)[0], deep.logits(ir, None)[0])
    check_batch(load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                            ["train.batch_size=1", "model.head.type=linear"]), "seg")


def test_neck_upernet_and_fcn_head_equal_mmsegmentations_computation_written_out():
    """The MAE / BEiT neck (deconv, BatchNorm, GELU, deconv; deconv; identity; 2x2 max-pool), UPerHead
    (pooling to 1, 2, 3 and 6 on the coarsest level, each a 1x1 block, upsampled and concatenated into a
    3x3 bottleneck; 1x1 laterals; top-down sums; 3x3 FPN blocks; all upsampled to the finest and fused
    by a 3x3 block; classifier) and the FCN auxiliary head (a 3x3 block on level 2), written out with
    functional operations on the modules' own weights, BatchNorm in eval mode."""
    from torch.nn import functional as F

    from finetune.models.seg_heads import FCNHead, MultiLevelNeck, UperHead

    torch.manual_seed(0)
    dim, channels, classes = 16, 8, 3
    neck, head = MultiLevelNeck(dim).eval(), UperHead([dim] * 4, channels, classes).eval()
    aux = FCNHead(dim, 4, classes).eval()
    for module in (neck, head, aux):
        randomize(module)
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_var.abs_().add_(0.5)
    features = [torch.randn(2, dim, 8, 12) for _ in range(4)]

    def norm(x, bn):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-5)

    def block(x, seq, k):  # k x k conv without bias, BatchNorm, ReLU
        assert seq[0].weight.shape[-2:] == (k, k)
        return F.relu(norm(F.conv2d(x, seq[0].weight, None, padding=k // 2), seq[1]))

    def up(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    d1, bn, _, d2 = neck.up4
    levels = [F.conv_transpose2d(F.gelu(norm(F.conv_transpose2d(features[0], d1.weight, d1.bias, stride=2), bn)),
                                 d2.weight, d2.bias, stride=2),
              F.conv_transpose2d(features[1], neck.up2.weight, neck.up2.bias, stride=2),
              features[2], F.max_pool2d(features[3], 2)]
    with torch.no_grad():
        for got, expected in zip(neck(features), levels):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        top = levels[3]
        pooled = [up(block(F.adaptive_avg_pool2d(top, scale), pool[1], 1), top.shape[2:])
                  for scale, pool in zip((1, 2, 3, 6), head.pools)]
        laterals = [block(f, lateral, 1) for f, lateral in zip(levels[:3], head.laterals)]
        laterals.append(block(torch.cat([top, *pooled], dim=1), head.bottleneck, 3))
        for i in (3, 2, 1):
            laterals[i - 1] = laterals[i - 1] + up(laterals[i], laterals[i - 1].shape[2:])
        outs = [block(lat, conv, 3) for lat, conv in zip(laterals[:3], head.fpn_convs)] + [laterals[3]]
        stacked = torch.cat([outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]], dim=1)
        fused = block(stacked, head.fpn_bottleneck, 3)
        expected = F.conv2d(fused, head.classifier.weight, head.classifier.bias)
        torch.testing.assert_close(head(levels), expected, atol=1e-5, rtol=1e-5)
        expected_aux = F.conv2d(block(levels[2], aux.conv, 3), aux.classifier.weight, aux.classifier.bias)
        torch.testing.assert_close(aux(levels[2]), expected_aux, atol=1e-5, rtol=1e-5)
    assert expected.shape == (2, classes, 32, 48) and expected_aux.shape == (2, classes, 8, 12)


def test_segformer_head_is_per_level_1x1_blocks_upsampled_concatenated_fused_and_classified():
    """SegFormer's all-MLP decoder (IV-tuning's segmentation head) on the neck's four levels, against
    the same computation written out per pixel: each level's 1x1 conv (no bias) + BatchNorm + ReLU,
    bilinear to the finest level, concatenated finest first, the fusing 1x1 block, the classifier."""
    from torch.nn import functional as F

    cfg = load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                      ["model.encoder.img_size=[64,96]", "model.head.type=segformer", "model.head.aux_weight=0"])
    torch.manual_seed(0)
    model = build_segmentor(cfg).eval()
    randomize(model.decode_head)
    assert model.aux_head is None
    ir, vi = torch.randn(2, 1, 64, 96), torch.randn(2, 3, 64, 96)
    out, aux = model.logits(ir, vi)
    levels = model.neck(model.backbone(ir, vi))
    assert [tuple(f.shape[2:]) for f in levels] == [(16, 24), (8, 12), (4, 6), (2, 3)] and aux is None

    def block(x, seq):  # 1x1 conv without bias, BatchNorm with its running statistics, ReLU
        conv, bn = seq[0], seq[1]
        y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return torch.relu((y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None])

    head = model.decode_head
    size = levels[0].shape[2:]
    per_level = [F.interpolate(block(f, seq), size=size, mode="bilinear", align_corners=False)
                 for f, seq in zip(levels, head.levels)]
    fused = block(torch.cat(per_level, dim=1), head.fuse)
    classifier = head.classifier
    by_hand = torch.einsum("kc,bchw->bkhw", classifier.weight[:, :, 0, 0], fused) + classifier.bias[:, None, None]
    assert out.shape == (2, len(cfg.data.classes), 16, 24)
    assert torch.allclose(out, by_hand, atol=1e-5)
    assert [seq[0].bias for seq in head.levels] == [None] * 4
    # one frame per step trains (BatchNorm sees 16 x 24 pixels, no pooled map)
    from finetune.preflight import check_batch

    model.train()(ir[:1], vi[:1], torch.zeros(1, 64, 96, dtype=torch.long)).backward()
    check_batch(load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                            ["train.batch_size=1", "model.head.type=segformer"]), "seg")
    vitb = parameter_report(build_segmentor(load_config(SEG, ["model.head.type=segformer", "model.head.aux_weight=0",
                                                              "model.method=frozen", "model.modality=ir"]), "meta"))
    # 4 levels of 768 -> 768 (+ BatchNorm), the 4 x 768 -> 768 fusion (+ BatchNorm), 768 -> 9 classes,
    # and the neck (two deconvolutions x4 with a BatchNorm between, one x2)
    neck = 3 * (768 * 768 * 4 + 768) + 2 * 768
    assert vitb["trainable_head"] == 4 * (768 * 768 + 2 * 768) + (4 * 768 * 768 + 2 * 768) + (768 * 9 + 9) + neck


@pytest.mark.parametrize("head_type", ["upernet", "segformer"])
def test_segmentation_heads_drop_whole_channels_before_their_classifiers_at_the_configured_rate(head_type):
    """mmsegmentation's heads (and their FCN auxiliary head) apply channel dropout (Dropout2d) to the
    classifier's input in training, at ``model.head.dropout``: each frame's channel map is zeroed or
    scaled by 1 / (1 - p) as a whole. Seen with the heads' dropout alone in training mode, so that
    only it differs between the two passes."""
    cfg = load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                      ["model.encoder.img_size=[64,96]", f"model.head.type={head_type}", "model.head.dropout=0.5"])
    torch.manual_seed(0)
    model = build_segmentor(cfg).eval()
    seen = {}
    for name in ("decode_head", "aux_head"):
        getattr(model, name).classifier.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0]))
    ir, vi = torch.randn(4, 1, 64, 96), torch.randn(4, 3, 64, 96)
    with torch.no_grad():
        model.logits(ir, vi)
        plain = dict(seen)
        for module in [*model.decode_head.modules(), *model.aux_head.modules()]:  # the heads' own dropout only
            if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):
                module.train()
        model.logits(ir, vi)
    for name in ("decode_head", "aux_head"):
        before, after = plain[name].flatten(2), seen[name].flatten(2)
        live = before.abs().amax(dim=2) > 0  # (frames, channels) maps a ReLU left some signal in
        ratio = (after.sum(dim=2) / before.sum(dim=2))[live]
        assert torch.allclose(after, before * (after.sum(dim=2, keepdim=True) / before.sum(dim=2, keepdim=True))
                              .nan_to_num(), atol=1e-5), name  # one factor per whole map
        assert all(min(abs(r), abs(r - 2.0)) < 1e-4 for r in ratio.tolist()), name  # dropped, or x 1 / (1 - 0.5)
        share = (ratio.abs() < 1e-4).float().mean().item()
        assert live.sum() >= 40 and 0.3 < share < 0.7, (name, share)  # 4 frames x 32 (16) channels


def test_the_neck_takes_four_levels():
    from finetune.models.seg_heads import MultiLevelNeck

    with pytest.raises(ValueError, match="the neck takes 4 feature maps, got 3"):
        MultiLevelNeck(8)([torch.zeros(1, 8, 4, 4)] * 3)


def test_a_segmentation_head_type_not_registered_is_refused_by_name():
    from data_tools.config import ConfigError, check_config
    from finetune.models.segmentor import SegHeadConfig, Segmentor
    from finetune.schema import SegConfig

    with pytest.raises(ConfigError, match=r"model.head.type: segmentation head type must be one of "
                                          r"\('linear', 'segformer', 'upernet'\), got 'fcn'"):
        check_config(load_config(SEG, ["model.head.type=fcn"]), SegConfig)
    with pytest.raises(ConfigError, match=r"model: .*out_indices \[11\]: the neck under UperNet turns 4 block outputs"):
        check_config(load_config(SEG, ["model.out_indices=[11]"]), SegConfig)
    with pytest.raises(ConfigError, match=r"out_indices \[11\]: the neck under SegFormer's decoder turns 4 block"):
        check_config(load_config(SEG, ["model.out_indices=[11]", "model.head.type=segformer"]), SegConfig)
    check_config(load_config(SEG, ["model.out_indices=[11,11,11,11]"]), SegConfig)
    check_config(load_config(SEG, ["model.out_indices=[5]", "model.head.type=linear"]), SegConfig)
    with pytest.raises(ValueError, match="head type must be one of .*, got 'fcn'"):
        Segmentor(BackboneConfig(method="frozen", modality="ir", encoder=TINY_ENC), SegHeadConfig(type="fcn"), 2)


def test_a_segmentation_head_registered_by_one_module_is_built_from_the_config(monkeypatch):
    """A new head is one registration: the config accepts its name, the segmentor builds it on the neck
    (or on the raw block maps when it declares no neck), a training step runs; a second head under a
    taken name is refused."""
    from torch import nn

    from data_tools.config import check_config
    from finetune.models import seg_heads
    from finetune.schema import SegConfig

    class Pointwise(nn.Module):  # one 1x1 convolution on the finest level
        def __init__(self, chans, n):
            super().__init__()
            self.levels, self.classifier = len(chans), nn.Conv2d(chans[0], n, 1)

        def forward(self, features):
            assert len(features) == self.levels
            return self.classifier(features[0])

    monkeypatch.setattr(seg_heads.SEG_HEADS, "_entries", dict(seg_heads.SEG_HEADS._entries))
    seg_heads.register_seg_head(seg_heads.SegHead("pointwise", "a 1x1 head", lambda c, cfg, n: Pointwise(c, n)))
    seg_heads.register_seg_head(seg_heads.SegHead("pointwise_raw", "a 1x1 head", lambda c, cfg, n: Pointwise(c, n),
                                                  neck=False))
    with pytest.raises(ValueError, match="a segmentation head named 'linear' is already registered"):
        seg_heads.register_seg_head(seg_heads.SegHead("linear", "another", lambda c, cfg, n: Pointwise(c, n)))
    tiny = str(CONFIG_DIR / "finetune" / "seg_tiny.yaml")
    for name, levels, stride in (("pointwise", 4, 4), ("pointwise_raw", 2, 16)):
        cfg = load_config(tiny, ["model.encoder.img_size=[64,96]", f"model.head.type={name}",
                                 "model.out_indices=[0,1]" if levels == 2 else "model.head.aux_weight=0.4"])
        check_config(cfg, SegConfig)
        model = build_segmentor(cfg)
        assert isinstance(model.decode_head, Pointwise) and model.decode_head.levels == levels
        assert (model.aux_head is not None) == (name == "pointwise")
        out, _ = model.logits(torch.randn(2, 1, 64, 96), torch.randn(2, 3, 64, 96))
        assert tuple(out.shape) == (2, len(cfg.data.classes), 64 // stride, 96 // stride)
        loss = model(torch.randn(2, 1, 64, 96), torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.long))
        loss.backward()
        assert model.decode_head.classifier.weight.grad.abs().sum() > 0


class PointwiseModel:
    """Logits that depend on each pixel alone: sliding windows must reproduce them exactly."""
    num_classes = 3

    def predict(self, ir, vi):
        x = ir[:, :1]
        return torch.cat([x, 2 * x, -x], dim=1)


def test_sliding_window_reproduces_a_pointwise_model():
    ir = torch.randn(2, 1, 70, 101)
    expected = PointwiseModel().predict(ir, None).softmax(dim=1)
    for crop, stride in [((32, 48), (21, 32)), ((64, 64), (40, 40)), ((80, 128), (53, 85))]:  # last: padded
        for windows_per_batch in (1, 3, 64):
            got = slide_inference(PointwiseModel(), ir, None, crop, stride, windows_per_batch)
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-6)


class WindowOffsetModel:
    """Class-0 logit 4 in the first window it sees, -2 in the next: where two windows overlap,
    mmsegmentation averages the logits (1: softmax 0.731), not the softmax scores (0.550)."""
    num_classes = 2

    def __init__(self):
        self.offsets = [4.0, -2.0]

    def predict(self, ir, vi):
        out = torch.zeros(ir.shape[0], 2, *ir.shape[-2:])
        out[:, 0] = self.offsets.pop(0)
        return out


def test_overlapping_windows_average_logits_then_resize_then_softmax():
    ir = torch.zeros(1, 1, 8, 12)
    got = slide_inference(WindowOffsetModel(), ir, None, (8, 8), (8, 4), windows_per_batch=1)  # x = 0 and 4
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    assert np.allclose(got[0, 0, 0].numpy(), [sig(4)] * 4 + [sig(1)] * 4 + [sig(-2)] * 4, atol=1e-6)
    # resized to the frame's own size (inference on a rescaled frame): the logits, before the softmax
    # (5 x 7: not a whole fraction, so corners aligned or not read other points, as mmsegmentation's resize)
    resized = slide_inference(WindowOffsetModel(), ir, None, (8, 8), (8, 4), 1, out_size=(5, 7))
    logits = torch.zeros(1, 2, 8, 12)
    logits[:, 0] = torch.tensor([4.0] * 4 + [1.0] * 4 + [-2.0] * 4)
    expected = F.interpolate(logits, size=(5, 7), mode="bilinear", align_corners=False).softmax(dim=1)
    assert resized.shape == (1, 2, 5, 7) and torch.allclose(resized, expected, atol=1e-6)


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
    accuracy = {"a": 1 / 2, "b": 1.0, "c": 1 / 2}  # per class: its pixels predicted as it
    for k, v in accuracy.items():
        assert m["per_class_accuracy"][k] == pytest.approx(v)
    assert m["per_class_accuracy"]["d"] is None
    assert m["mean_accuracy"] == pytest.approx(sum(accuracy.values()) / 3)
    # a class predicted but absent from the ground truth scores 0 (its union is not empty), as mmsegmentation's
    m = segmentation_metrics(confusion_matrix(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), 2, 255), ["a", "b"])
    assert m["per_class_iou"] == {"a": 0.5, "b": 0.0} and m["mIoU"] == pytest.approx(0.25)


def test_class_weights_weigh_the_cross_entropy_of_each_pixel_by_its_class():
    """model.head.class_weight: sum of w(class) x -log p(class) over the labelled pixels, over the sum of
    their weights (PyTorch's and mmsegmentation's weighted mean); ignored pixels count in neither."""
    def segmentor(*overrides):
        return build_segmentor(load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"), list(overrides)))

    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 3, 5), torch.randint(0, 4, (2, 3, 5))
    target[0, 0, :2] = 255
    keep = target != 255
    labelled = target.clamp(max=3)  # any class at the ignored pixels: they are left out below
    nll = -logits.log_softmax(dim=1).gather(1, labelled[:, None])[:, 0]
    weights = torch.tensor([1.0, 10.0, 2.0, 0.5])[labelled]
    expected = (weights * nll)[keep].sum() / weights[keep].sum()
    assert torch.allclose(segmentor("model.head.class_weight=[1,10,2,0.5]")._ce(logits, target), expected, atol=1e-6)
    assert not torch.allclose(segmentor()._ce(logits, target), expected, atol=1e-3)


@pytest.mark.parametrize("method,decays", [("full", True), ("pad", True), ("mona", False), ("ivtuning", False),
                                           ("frozen", False)])
def test_layer_decay_applies_where_the_whole_encoder_trains(method, decays, pad_export):
    from finetune.seg import SegTask

    modality = "both" if method == "ivtuning" else "ir"
    cfg = load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                      [f"model.method={method}", f"model.modality={modality}", "model.encoder.depth=2",
                       f"init.checkpoint={pad_export if method == 'pad' else 'null'}", "optim.layer_decay=0.5"])
    model = build_segmentor(cfg, "meta")
    scales = {g.get("lr_scale", 1.0) for g in SegTask().param_groups(model, cfg)}
    assert (scales == {1.0}) != decays
    if decays:  # depth 2: embeddings 0.5^3, blocks 0.5^2 and 0.5, the rest 1
        assert scales == {0.125, 0.25, 0.5, 1.0}


def test_fine_tuning_keeps_weight_decay_off_the_cls_token_and_position_embedding():
    """MAE's fine-tuning (timm's no_weight_decay()) and mmsegmentation's / detectron2's ViT recipes: no
    decay on cls_token and pos_embed, as on biases and norms; MAE's pre-training decays the CLS token."""
    from finetune.seg import SegTask
    from pretrain.engine.optim import param_groups

    cfg = load_config(str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"),
                      ["model.method=full", "model.modality=ir", "model.encoder.depth=2", "optim.weight_decay=0.05"])
    model = build_segmentor(cfg, "meta")
    decay = {n: g["weight_decay"] for g in SegTask().param_groups(model, cfg) for n in g["names"]}
    assert decay["backbone.encoder.cls_token"] == decay["backbone.encoder.pos_embed"] == 0.0
    assert decay["backbone.encoder.blocks.0.attn.qkv.weight"] == 0.05
    assert decay["backbone.encoder.blocks.0.norm1.weight"] == 0.0
    pre = {n: g["weight_decay"] for g in param_groups(model.backbone, 0.05, prefix="encoder.") for n in g["names"]}
    assert pre["encoder.cls_token"] == 0.05


def test_pad_refuses_weights_without_pad_adapters(tmp_path):
    from pretrain.weights import export_backbone
    from tests.test_mae_pad import tiny

    enc = EncoderConfig(size="tiny", depth=2, img_size=(64, 80))
    with pytest.raises(ValueError, match="method 'pad' needs init.checkpoint = a backbone exported by"):
        backbone_for(BackboneConfig(method="pad", modality="ir", encoder=enc))
    plain, _ = export_backbone(tiny(adapter="none", paradigm="continual"), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match=r"method 'pad' fine-tunes an export with pad adapters; .* has adapters \[\]"):
        backbone_for(BackboneConfig(method="pad", modality="ir", encoder=enc, checkpoint=str(plain)))
    assert backbone_for(BackboneConfig(method="full", modality="ir", encoder=enc, checkpoint=str(plain))).load_report
    plain.with_suffix(".json").unlink()  # an export stopped before its JSON: the message says what is not there
    with pytest.raises(ValueError, match=r"plain.pth is neither \(no export JSON, plain.json, beside it; no adapter "
                                         r"tensors with PAD's names in it\)"):
        backbone_for(BackboneConfig(method="pad", modality="ir", encoder=enc, checkpoint=str(plain)))


def test_params_cli_reports_the_segmentor_or_the_detector_of_a_config(capsys):
    """`finetune params`: the model a seg config builds, or the detector of a det config (one whose
    data names boxes), with the method's trainable share; pad without its pre-trained adapters refused."""
    from finetune.cli import main as finetune_main

    det_config = CONFIG_DIR / "finetune" / "det_vitb.yaml"
    # --local_rank as DeepSpeed's launcher passes it to each process
    assert finetune_main(["--local_rank=1", "params", "model.method=mona", "model.modality=ir"]) == 0
    seg = json.loads(capsys.readouterr().out)
    assert finetune_main(["params", "--config", str(det_config), "model.method=mona", "model.modality=ir"]) == 0
    det = json.loads(capsys.readouterr().out)
    assert seg["config"] == det["config"] == {"method": "mona", "modality": "ir", "size": "base"}
    detector = parameter_report(build_detector(load_config(det_config, ["model.method=mona", "model.modality=ir"]),
                                               "meta"))
    assert det["trainable_head"] == detector["trainable_head"] != seg["trainable_head"]
    assert det["trainable_backbone"] == seg["trainable_backbone"] > 0  # the same Mona adapters
    assert finetune_main(["params", "model.method=pad", "model.modality=ir"]) == 2
    assert "model.method=pad fine-tunes a backbone pre-trained with pad adapters: give init.checkpoint=FILE" in \
        capsys.readouterr().err
