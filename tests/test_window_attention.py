"""ViTDet's attention as PAD's FLIR detection runs it: the decomposed relative position term against
its formula, window attention against attending each zero-padded window by hand, which blocks stay
global, patch tokens only, a start that computes as the pre-trained blocks, what trains, and the
Faster R-CNN heads of ViTDet."""
import pytest
import torch

from finetune.models.backbone import Backbone, BackboneConfig
from pretrain.models.block_extras import is_block_extra
from pretrain.models.vit import EncoderConfig
from pretrain.models.window_attention import DecomposedRelPos, default_global_blocks

TINY = EncoderConfig(size="tiny", depth=2, img_size=(48, 80))  # a 3 x 5 patch grid


def test_global_blocks_are_vitdets():
    assert default_global_blocks(12) == (2, 5, 8, 11)
    assert default_global_blocks(24) == (5, 11, 17, 23)
    assert default_global_blocks(32) == (7, 15, 23, 31)


@pytest.mark.parametrize("h, w", [(2, 3), (3, 3)])  # square: a window, where the two tables have one shape
def test_decomposed_rel_pos_is_its_formula(h, w):
    """bias[i, j] = q_i . R_h[yi - yj + H - 1] + q_i . R_w[xi - xj + W - 1] on an H x W grid."""
    torch.manual_seed(0)
    c = 4
    rel = DecomposedRelPos((h, w), c)
    assert rel.rel_pos_h.shape == (2 * h - 1, c) and rel.rel_pos_w.shape == (2 * w - 1, c)
    assert rel.rel_pos_h.abs().max() == 0  # zero at the start
    with torch.no_grad():
        rel.rel_pos_h.normal_(), rel.rel_pos_w.normal_()
    q = torch.randn(2, 3, h * w, c)
    bias = rel(q)
    assert bias.shape == (2, 3, h * w, h * w)
    cells = [(y, x) for y in range(h) for x in range(w)]
    for i, (yi, xi) in enumerate(cells):
        for j, (yj, xj) in enumerate(cells):
            by_hand = q[:, :, i] @ rel.rel_pos_h[yi - yj + h - 1] + q[:, :, i] @ rel.rel_pos_w[xi - xj + w - 1]
            assert torch.allclose(bias[:, :, i, j], by_hand, atol=1e-5)
    assert set(rel.state_dict()) == {"rel_pos_h", "rel_pos_w"}  # the offsets are rebuilt, never loaded
    # folded into the queries and keys, the logits are the same: scale q . k + the term
    k = torch.randn(2, 3, h * w, c)
    q_folded, k_folded = rel.fold(q, k, 0.5)
    assert torch.allclose(q_folded @ k_folded.transpose(-2, -1), 0.5 * q @ k.transpose(-2, -1) + bias, atol=1e-5)
    # and attention through the fold is attention with the bias
    from timm.models.vision_transformer import Attention

    from pretrain.models.block_extras import attention_with_bias

    attn = Attention(3 * c, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(2, h * w, 3 * c)
    assert torch.allclose(attention_with_bias(attn, x, rel), attention_with_bias(attn, x, lambda q: rel(q)), atol=1e-5)


def _random_tables(backbone: Backbone) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for block in backbone.encoder.blocks:
            block.attn_bias.rel_pos_h.normal_(std=0.3), block.attn_bias.rel_pos_w.normal_(std=0.3)


def test_window_attention_is_each_padded_window_attended_alone():
    """A 3 x 5 grid in 2 x 2 windows: after the first norm the grid is zero-padded to 4 x 6, each
    window attends alone (its relative positions sized to the window), and the crop goes back."""
    torch.manual_seed(0)
    net = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY, window_size=2, global_blocks=(1,),
                                  decomposed_rel_pos=True)).eval()
    _random_tables(net)
    block = net.encoder.blocks[0]
    assert block.window == 2 and net.encoder.blocks[1].window == 0
    assert block.attn_bias.size == (2, 2) and net.encoder.blocks[1].attn_bias.size == (3, 5)
    x = torch.randn(2, 15, 192)
    padded = torch.zeros(2, 4, 6, 192)
    padded[:, :3, :5] = block.norm1(x).reshape(2, 3, 5, 192)
    attended = torch.zeros_like(padded)
    for y in range(0, 4, 2):
        for x0 in range(0, 6, 2):
            window = padded[:, y:y + 2, x0:x0 + 2].reshape(2, 4, 192)
            attended[:, y:y + 2, x0:x0 + 2] = block.attention(window).reshape(2, 2, 2, 192)
    a = attended[:, :3, :5].reshape(2, 15, 192)
    by_hand = x + a
    by_hand = by_hand + block.mlp(block.norm2(by_hand))
    from pretrain.models.adapters import TokenContext
    out = block(x, TokenContext(grid=(3, 5), num_prefix=0))
    assert torch.allclose(out, by_hand, atol=1e-5)


def test_a_windowed_block_keeps_windows_apart_and_a_global_one_does_not():
    torch.manual_seed(0)
    net = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY, window_size=2, global_blocks=(1,))).eval()
    from pretrain.models.adapters import TokenContext
    ctx = TokenContext(grid=(3, 5), num_prefix=0)
    x = torch.randn(1, 15, 192)
    moved = x.clone()
    moved[:, 0] += 1.0  # the token at (0, 0): window (0, 0) holds (0..1, 0..1)
    windowed, glob = net.encoder.blocks
    change = (windowed(moved, ctx) - windowed(x, ctx)).abs().amax(-1).reshape(3, 5)
    assert change[:2, :2].min() > 0 and change[2:].max() == 0 and change[:, 2:].max() == 0
    change = (glob(moved, ctx) - glob(x, ctx)).abs().amax(-1)
    assert change.min() > 0


def test_the_backbone_sees_patch_tokens_only_and_starts_as_the_pretrained_blocks():
    """Zero relative positions and a window that covers the grid: the plain encoder's blocks run on
    the patch tokens without the CLS token."""
    torch.manual_seed(0)
    plain = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY))
    vitdet = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY, window_size=8,
                                     decomposed_rel_pos=True))
    missing, unexpected = vitdet.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(is_block_extra(k) for k in missing)
    assert vitdet.num_prefix == 0 and plain.num_prefix == 1
    ir = torch.randn(2, 1, 48, 80)
    from pretrain.models.adapters import TokenContext
    from pretrain.models.vit import embed_patches, run_blocks

    vit = plain.eval().encoder
    ctx = TokenContext(grid=(3, 5), num_prefix=0)
    _, (last,) = run_blocks(vit, embed_patches(vit, ir), ctx, [1])
    assert torch.allclose(vitdet.eval()(ir)[-1], ctx.to_map(last), atol=1e-5)
    assert not torch.allclose(plain(ir)[-1], ctx.to_map(last), atol=1e-3)  # the CLS token changes the plain one


def test_the_relative_positions_train_and_the_unused_cls_token_does_not():
    from tests.conftest import changed_after_two_steps

    torch.manual_seed(0)
    net = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY, window_size=2, decomposed_rel_pos=True))
    assert "encoder.cls_token" not in net.trainable_names() and not net.encoder.cls_token.requires_grad
    ir = torch.randn(2, 1, 48, 80)
    changed = changed_after_two_steps(net.train(), lambda: sum(f.square().mean() for f in net(ir)))
    assert {"encoder.blocks.0.attn_bias.rel_pos_h", "encoder.blocks.1.attn_bias.rel_pos_w"} <= changed


def test_who_may_use_them():
    with pytest.raises(ValueError, match="choose one"):
        BackboneConfig(method="full", modality="ir", encoder=TINY, rel_pos_bias=True, decomposed_rel_pos=True)
    with pytest.raises(ValueError, match="keeps it frozen"):
        BackboneConfig(method="mona", modality="ir", encoder=TINY, decomposed_rel_pos=True)
    # window attention has no parameters: a frozen encoder may attend in windows
    assert Backbone(BackboneConfig(method="mona", modality="ir", encoder=TINY, window_size=2)).num_prefix == 0
    with pytest.raises(ValueError, match="must index the 2 blocks"):
        Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY, window_size=2, global_blocks=(2,)))


def test_the_config_checks_them():
    from data_tools.config import CONFIG_DIR, ConfigError, load_config
    from finetune.schema import DetConfig

    det = CONFIG_DIR / "finetune" / "det_tiny.yaml"
    with pytest.raises(ConfigError, match="must index the encoder's 4 blocks"):
        load_config(det, ["model.window_size=2", "model.global_blocks=[4]"], DetConfig)
    with pytest.raises(ConfigError, match="keeps it frozen"):
        load_config(det, ["model.decomposed_rel_pos=true"], DetConfig)  # det_tiny: ivtuning
    with pytest.raises(ConfigError, match="has its own"):
        load_config(det, ["model.head.detector=fcos", "model.head.box_head=conv"], DetConfig)
    with pytest.raises(ConfigError, match="box_head"):
        load_config(det, ["model.head.box_head=mask"], DetConfig)
    # a RetinaNet run saved before these settings existed still checks
    from omegaconf import OmegaConf

    from data_tools.config import check_config

    saved = OmegaConf.to_container(load_config(det, ["model.head.detector=retinanet"]))
    del saved["model"]["head"]["box_head"], saved["model"]["head"]["rpn_convs"]
    assert check_config(OmegaConf.create(saved), DetConfig).model.head.box_head is None


def test_faster_rcnn_takes_vitdets_heads_by_default_and_the_others_keep_their_own():
    from data_tools.config import CONFIG_DIR, load_config
    from finetune.factory import build_detector
    from finetune.schema import DetConfig

    def built(*overrides):
        torch.manual_seed(0)
        return build_detector(load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml", list(overrides), DetConfig)).model

    default = built()
    assert type(default.roi_heads.box_head).__name__ == "FastRCNNConvFCHead" and len(default.rpn.head.conv) == 2
    plain = built("model.head.box_head=mlp", "model.head.rpn_convs=1")  # torchvision's, as runs saved before
    assert type(plain.roi_heads.box_head).__name__ == "TwoMLPHead" and len(plain.rpn.head.conv) == 1
    assert type(built("model.head.detector=retinanet").head).__name__ == "RetinaNetHead"


def test_vitdets_heads_and_backbone_from_the_config(tmp_path):
    """The FLIR presets' model: windows of 14 patches but in blocks 2 / 5 / 8 / 11, relative positions
    sized to what each block attends over, four conv + LayerNorm layers and one 1024-wide layer in the
    box head, two convs in the RPN head; it trains and predicts."""
    from data_tools.config import CONFIG_DIR, load_config
    from finetune.factory import build_detector
    from finetune.models.detector import LayerNorm2d
    from finetune.schema import DetConfig

    cfg = load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml",
                      ["model.method=full", "model.modality=ir", "model.encoder.depth=12",
                       "model.encoder.img_size=[256,256]", "model.window_size=14", "model.decomposed_rel_pos=true",
                       "model.head.box_head=conv", "model.head.rpn_convs=2"], DetConfig)
    torch.manual_seed(0)
    det = build_detector(cfg)
    blocks = det.backbone.encoder.blocks
    assert [b.window for b in blocks] == [0 if i in (2, 5, 8, 11) else 14 for i in range(12)]
    assert [b.attn_bias.size for b in blocks][:3] == [(14, 14), (14, 14), (16, 16)]
    head = det.model.roi_heads.box_head
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)
    assert sum(isinstance(m, LayerNorm2d) for m in head.modules()) == 4
    assert [m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)] == [1024]
    assert det.model.roi_heads.box_predictor.cls_score.out_features == 3  # person, car and background
    assert len(det.model.rpn.head.conv) == 2
    ir = torch.rand(1, 1, 256, 256)
    targets = [{"boxes": torch.tensor([[40.0, 50.0, 120.0, 200.0]]), "labels": torch.tensor([0])}]
    det.train()
    loss = det(ir, None, targets)
    loss.backward()
    assert torch.isfinite(loss) and blocks[0].attn_bias.rel_pos_h.grad is not None
    out = det.eval().predict(ir, None)
    assert len(out) == 1 and out[0]["boxes"].shape[1] == 4


def test_window_attention_refuses_tokens_off_the_grid():
    from pretrain.models.window_attention import windowed

    with pytest.raises(ValueError, match="cannot run on masked tokens"):
        windowed(lambda t: t, torch.zeros(1, 6, 4), None, 2)
    with pytest.raises(ValueError, match="patch tokens only: 7 tokens on a 2x3 grid"):
        windowed(lambda t: t, torch.zeros(1, 7, 4), (2, 3), 2)  # a CLS token left in
