"""BEiT's block additions of PAD's segmentation backbone: the relative position bias indexed as
BEiT's code indexes it, attention with the bias against its formula, a start that computes as the
plain encoder, pre-trained weights that load without them, and who may use them."""
import pytest
import torch

from finetune.models.backbone import Backbone, BackboneConfig
from pretrain.models.block_extras import RelativePositionBias, attention_with_bias, is_block_extra
from pretrain.models.vit import EncoderConfig

TINY = EncoderConfig(size="tiny", depth=2, img_size=(32, 48))  # a 2 x 3 patch grid


def test_relative_position_index_is_beits():
    """For patches i, j at (yi, xi), (yj, xj) on an H x W grid: (yi - yj + H - 1) * (2W - 1) + (xi - xj + W - 1);
    CLS to a patch, a patch to CLS and CLS to CLS take the table's last three rows."""
    h, w = 2, 3
    rpb = RelativePositionBias((h, w), num_heads=2)
    assert rpb.relative_position_bias_table.shape == ((2 * h - 1) * (2 * w - 1) + 3, 2)
    torch.manual_seed(0)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    bias, table = rpb(torch.randn(3, 2, 1 + h * w, 8))[0], rpb.relative_position_bias_table
    assert bias.shape == (2, 1 + h * w, 1 + h * w)  # the same for every query
    cells = [(y, x) for y in range(h) for x in range(w)]
    for i, (yi, xi) in enumerate(cells):
        for j, (yj, xj) in enumerate(cells):
            assert torch.equal(bias[:, 1 + i, 1 + j], table[(yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)])
    n = table.shape[0]
    assert torch.equal(bias[:, 0, 1:], table[n - 3][:, None].expand(2, h * w))
    assert torch.equal(bias[:, 1:, 0], table[n - 2][:, None].expand(2, h * w))
    assert torch.equal(bias[:, 0, 0], table[n - 1])
    assert "index" not in rpb.state_dict()  # rebuilt from the grid: nothing to load


def test_attention_with_a_bias_is_its_formula():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, qkv_bias=True).eval()
    x, bias = torch.randn(3, 7, 16), torch.randn(2, 7, 7)
    q, k, v = attn.qkv(x).reshape(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / 8 ** 0.5 + bias).softmax(dim=-1)
    by_hand = attn.proj((weights @ v).transpose(1, 2).reshape(3, 7, 16))
    assert torch.allclose(attention_with_bias(attn, x, lambda q: bias[None]), by_hand, atol=1e-5)
    assert torch.allclose(attention_with_bias(attn, x, lambda q: torch.zeros(1, 2, 7, 7)), attn(x), atol=1e-5)


def test_the_encoder_with_them_starts_as_the_plain_one_and_trains_them():
    from tests.conftest import changed_after_two_steps

    torch.manual_seed(0)
    plain = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY))
    extra = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY, rel_pos_bias=True, layer_scale=1.0))
    missing, unexpected = extra.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(is_block_extra(k) for k in missing)
    assert {k.split(".", 3)[3] for k in missing} == {"attn_bias.relative_position_bias_table", "ls1.gamma", "ls2.gamma"}
    ir = torch.randn(2, 1, 32, 48)
    for a, b in zip(plain.eval()(ir), extra.eval()(ir)):
        assert torch.allclose(a, b, atol=1e-5)
    extra.train()
    changed = changed_after_two_steps(extra, lambda: sum(f.square().mean() for f in extra(ir)))
    assert {"encoder.blocks.1.attn_bias.relative_position_bias_table", "encoder.blocks.1.ls1.gamma"} <= changed


def test_pretrained_weights_load_without_them_and_they_start_at_their_values(tmp_path):
    from finetune.weights import load_weights

    torch.manual_seed(0)
    plain = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY))
    path = tmp_path / "mae.pth"
    torch.save({"model": plain.encoder.state_dict()}, path)  # MAE's release layout
    cfg = BackboneConfig(method="full", modality="ir", encoder=TINY, checkpoint=str(path), rel_pos_bias=True,
                         layer_scale=0.5)
    extra = Backbone(cfg)
    report = load_weights(extra, cfg)  # no allow_missing needed
    assert not report.missing
    assert torch.equal(extra.encoder.blocks[0].attn.qkv.weight, plain.encoder.blocks[0].attn.qkv.weight)
    assert extra.encoder.blocks[0].attn_bias.relative_position_bias_table.abs().max() == 0
    assert extra.encoder.blocks[1].ls2.gamma.eq(0.5).all()


def test_a_pad_export_loads_into_pads_segmentation_backbone(tmp_path):
    from finetune.weights import backbone_for
    from tests.conftest import tiny_pad_export

    export = tiny_pad_export(tmp_path, depth=2)
    backbone = backbone_for(BackboneConfig(method="pad", modality="ir", encoder=EncoderConfig(size="tiny", depth=2,
                                           img_size=(64, 80)), checkpoint=export, rel_pos_bias=True, layer_scale=1.0))
    assert not backbone.load_report.missing
    assert backbone.encoder.blocks[1].attn_bias.index.shape == (1 + 4 * 5, 1 + 4 * 5)
    assert {"encoder.blocks.0.parallel_mlp.pad.scale.weight", "encoder.blocks.0.ls1.gamma",
            "encoder.blocks.0.attn_bias.relative_position_bias_table"} <= backbone.trainable_names()


def test_a_method_that_keeps_the_encoder_frozen_refuses_them():
    from data_tools.config import CONFIG_DIR, ConfigError, check_config, load_config
    from finetune.schema import SegConfig

    with pytest.raises(ValueError, match="method 'mona' keeps it frozen"):
        BackboneConfig(method="mona", modality="ir", encoder=TINY, rel_pos_bias=True)
    soda = CONFIG_DIR / "finetune" / "presets" / "soda.yaml"
    cfg = check_config(load_config(soda, ["data.root=/data"]), SegConfig)
    assert cfg.model.rel_pos_bias and cfg.model.layer_scale == 1.0 and cfg.model.method == "pad"
    with pytest.raises(ConfigError, match="model.rel_pos_bias=false model.layer_scale=null"):
        check_config(load_config(soda, ["model.method=mona"]), SegConfig)
    # the README's linear probe on SODA
    check_config(load_config(soda, ["data.root=/data", "model.method=frozen", "model.head.type=linear",
                                    "model.rel_pos_bias=false", "model.layer_scale=null"]), SegConfig)


def test_a_parallel_adapter_reads_the_mlp_output_before_the_layer_scale():
    """PAD's block (BEiT's code with its adapter): the scale predictor reads the MLP's own output,
    and only the MLP branch is multiplied by the layer scale: x + gamma_2 * m + adapter(x, m)."""
    from pretrain.models.adapters import ParallelMLPAdapter, TokenContext, attach

    class Probe(ParallelMLPAdapter):
        def forward(self, x, mlp_out, ctx):
            self.seen = mlp_out
            return 0.25 * mlp_out

    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY, layer_scale=0.5)).eval()
    attach(backbone.encoder, "probe", "parallel_mlp", lambda i, dim: Probe())
    block = backbone.encoder.blocks[0]
    x = torch.randn(2, 7, 192)
    out = block(x, TokenContext(grid=(2, 3)))
    after_attn = x + 0.5 * block.attn(block.norm1(x))
    m = block.mlp(block.norm2(after_attn))
    assert torch.allclose(block.parallel_mlp["probe"].seen, m, atol=1e-6)
    assert torch.allclose(out, after_attn + 0.5 * m + 0.25 * m, atol=1e-5)


def test_an_adapter_name_is_attached_once_per_position_and_token_maps_need_the_whole_grid():
    from pretrain.models.adapters import TokenContext, attach

    backbone = Backbone(BackboneConfig(method="full", modality="ir", encoder=TINY))
    attach(backbone.encoder, "probe", "post_mlp", lambda i, dim: torch.nn.Identity())
    assert [list(block.post_mlp) for block in backbone.encoder.blocks] == [["probe"], ["probe"]]
    with pytest.raises(ValueError, match="block 0 already has an adapter 'probe' at post_mlp"):
        attach(backbone.encoder, "probe", "post_mlp", lambda i, dim: torch.nn.Identity())
    tokens = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)
    assert torch.equal(TokenContext(grid=(2, 3)).to_map(tokens)[1, :, 1, 2], tokens[1, 5])
    with pytest.raises(ValueError, match="cannot run on masked tokens"):
        TokenContext(grid=None).to_map(tokens)
    with pytest.raises(ValueError, match="5 patch tokens do not fill a 2x3 grid"):
        TokenContext(grid=(2, 3)).to_map(tokens[:, :5])
    with pytest.raises(ValueError, match="7 patch tokens do not fill a 2x3 grid"):
        TokenContext(grid=(2, 3)).to_map(torch.cat([tokens, tokens[:, :1]], dim=1))
