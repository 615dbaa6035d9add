"""Weight loading (official MAE, timm .pth / .safetensors, ours) and the backbone export."""
import argparse
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from pretrain.models.pos_embed import sincos_2d
from pretrain.models.vit import encode
from pretrain.weights import WeightsError, export_backbone, load_backbone, load_into_mae, read_state_dict
from tests.test_mae_pad import tiny


def official_mae_checkpoint(path, seed=0, img_size=(64, 80), in_chans=3):
    """An official-MAE-layout checkpoint: real key names (no 'encoder.' prefix), random weights."""
    ref = tiny(adapter="none", paradigm="scratch", encoder={"img_size": list(img_size), "in_chans": in_chans})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ref.state_dict().items():
        key = k[len("encoder."):] if k.startswith("encoder.") else k
        sd[key] = v if "pos_embed" in k else torch.randn(v.shape, generator=g) * 0.05
    # as MAE's (and PAD's) training script saves it: the weights beside its state and its arguments
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=img_size[0], mask_ratio=0.75, norm_pix_loss=True,
                              blr=1.5e-4, output_dir="./output_dir", resume="", gpu=None)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}, "epoch": 799,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}, path)
    return sd


def test_official_mae_round_trip_through_export(tmp_path):
    sd = official_mae_checkpoint(tmp_path / "mae_pretrain.pth")
    assert "blocks.0.attn.qkv.weight" in sd and "decoder_blocks.0.mlp.fc1.weight" in sd and "mask_token" in sd
    model = tiny()
    report = load_into_mae(model, tmp_path / "mae_pretrain.pth")
    assert report.unexpected == [] and all(".parallel_mlp." in k for k in report.missing)
    assert torch.equal(model.encoder.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.decoder_pred.weight, sd["decoder_pred.weight"])
    with torch.no_grad():  # give the adapters non-trivial weights so the export carries them
        for n, p in model.named_parameters():
            if ".parallel_mlp." in n:
                p.normal_(0, 0.1)
    model.eval()
    (tmp_path / "exports").mkdir()
    pth, js = export_backbone(model, tmp_path / "exports")  # a folder: its backbone.pth
    assert (pth, js) == (tmp_path / "exports" / "backbone.pth", tmp_path / "exports" / "backbone.json")
    meta = json.loads(js.read_text())
    assert meta["version"] == 2 and meta["encoder"]["size"] == "tiny" and meta["input"] is None
    assert meta["adapters"] == [{"name": "pad", "settings": dataclasses.asdict(model.cfg.pad)}]
    exported = torch.load(pth, weights_only=True)
    assert "blocks.0.attn.qkv.weight" in exported and "blocks.0.parallel_mlp.pad.up.weight" in exported
    assert not any(k.startswith(("decoder", "mask_token")) for k in exported)
    vit, meta2, rep2 = load_backbone(pth)
    vit.eval()
    x = torch.rand(2, 1, 64, 80)
    with torch.no_grad():
        a, _ = encode(model.encoder, x)
        b, _ = encode(vit, x)
    assert torch.equal(a, b)
    # A version-1 export (one adapter by name, PAD's settings beside it) still loads, the same.
    v1 = dict(meta, version=1, adapter="pad", pad=meta["adapters"][0]["settings"])
    del v1["adapters"], v1["input"]
    js.write_text(json.dumps(v1))
    vit1, meta1, _ = load_backbone(pth)
    assert meta1["adapters"] == meta["adapters"] and meta1["input"] is None
    with torch.no_grad():
        assert torch.equal(encode(vit1.eval(), x)[0], a)
    # An export naming an adapter this installation does not know is refused with the known names.
    js.write_text(json.dumps(dict(meta, adapters=[{"name": "lora", "settings": {}}])))
    with pytest.raises(ValueError, match=r"adapter must be one of \('pad',\), got 'lora'"):
        load_backbone(pth)
    # Our own MAE state dict (encoder.* keys) reloads too.
    torch.save(model.state_dict(), tmp_path / "ours.pth")
    other = tiny()
    assert load_into_mae(other, tmp_path / "ours.pth").missing == []


def test_timm_safetensors_without_decoder_reports_keys(tmp_path):
    model = tiny(adapter="none", paradigm="continual")
    timm_sd = {k[len("encoder."):]: torch.randn(v.shape) for k, v in model.state_dict().items() if k.startswith("encoder.")}
    timm_sd["head.weight"] = torch.zeros(10, model.encoder.embed_dim)
    save_file(timm_sd, str(tmp_path / "vit.safetensors"))
    report = load_into_mae(model, tmp_path / "vit.safetensors")
    assert report.unexpected == ["encoder.head.weight"]
    assert "mask_token" in report.missing and "decoder_pred.weight" in report.missing
    assert torch.equal(model.encoder.blocks[0].norm1.weight, timm_sd["blocks.0.norm1.weight"])


def test_missing_backbone_weights_fail_unless_allowed(tmp_path):
    sd = official_mae_checkpoint(tmp_path / "full.pth")
    del sd["blocks.1.attn.proj.weight"]
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="blocks.1.attn.proj.weight"):
        load_into_mae(tiny(), tmp_path / "partial.pth")
    report = load_into_mae(tiny(), tmp_path / "partial.pth", allow_missing=True)
    assert "encoder.blocks.1.attn.proj.weight" in report.missing


def test_an_mae_fine_tuned_checkpoint_without_the_final_norm_starts_fine_tuning_but_not_pre_training(tmp_path):
    """MAE's fine-tuned ViTs (global pooling) replace the final norm by fc_norm: fine-tuning never
    reads that norm (its heads take block outputs), so the file loads there; MAE's encoder applies
    it, so pre-training still refuses the file without it."""
    from finetune.models.backbone import BackboneConfig
    from finetune.weights import backbone_for
    from pretrain.models.vit import EncoderConfig

    sd = official_mae_checkpoint(tmp_path / "pre.pth")
    sd = {k: v for k, v in sd.items() if not k.startswith(("norm.", "decoder", "mask_token"))}
    sd.update({"fc_norm.weight": torch.ones(192), "fc_norm.bias": torch.zeros(192),
               "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)})
    torch.save({"model": sd}, tmp_path / "finetuned.pth")
    cfg = BackboneConfig(method="full", modality="ir", checkpoint=str(tmp_path / "finetuned.pth"),
                         encoder=EncoderConfig(size="tiny", depth=2, img_size=(64, 80)))
    report = backbone_for(cfg).load_report
    assert report.missing == [] and {"fc_norm.weight", "head.weight"} <= set(report.unexpected)
    with pytest.raises(WeightsError, match="norm.bias"):
        load_into_mae(tiny(adapter="none", paradigm="continual"), tmp_path / "finetuned.pth")


def test_position_embedding_resampled_to_a_non_square_grid(tmp_path):
    official_mae_checkpoint(tmp_path / "sq.pth", img_size=(64, 64))  # 4x4 grid
    model = tiny(encoder={"img_size": [128, 160]})  # 8x10 grid
    report = load_into_mae(model, tmp_path / "sq.pth")
    assert "encoder.pos_embed" in report.adapted and "decoder_pos_embed" in report.adapted
    assert model.encoder.pos_embed.shape == (1, 1 + 80, model.encoder.embed_dim)
    # Resampling a sin-cos grid gives a smooth embedding close to the exact sin-cos of the new grid
    # in its low-frequency channels; the cls slot is kept as is.
    assert torch.equal(model.encoder.pos_embed[0, 0], torch.zeros(model.encoder.embed_dim))
    model(torch.rand(1, 1, 128, 160))  # and the model runs on that grid


def _as_mae_resamples(pos: torch.Tensor, side: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's interpolate_pos_embed (DeiT's; ViTDet's get_abs_pos and mmsegmentation's resize_pos_embed
    alike): the patch positions bicubically, corners not aligned, the CLS slot kept."""
    patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def test_fine_tuning_at_another_size_resamples_the_position_embedding_as_mae(tmp_path):
    """An export and an official MAE checkpoint (4 x 4 grid) fine-tuned on an 8 x 10 grid start from
    the same resampled embedding as MAE's / PAD's / ViTDet's fine-tuning give theirs."""
    from finetune.models.backbone import Backbone, BackboneConfig
    from finetune.weights import load_weights, resolve
    from pretrain.models.vit import EncoderConfig

    sd = official_mae_checkpoint(tmp_path / "mae.pth", img_size=(64, 64))
    model = tiny(encoder={"img_size": [64, 64]})
    load_into_mae(model, tmp_path / "mae.pth")
    pth, _ = export_backbone(model, tmp_path / "export")
    pos = sd["pos_embed"]
    assert torch.equal(model.encoder.pos_embed, pos)
    expected = _as_mae_resamples(pos, 4, (8, 10))
    encoder = EncoderConfig(size="tiny", depth=2, img_size=(128, 160))
    for path, method in ((pth, "pad"), (tmp_path / "mae.pth", "full")):
        cfg = BackboneConfig(method=method, modality="ir", encoder=encoder, checkpoint=str(path))
        if method == "pad":
            cfg = resolve(cfg)
        backbone = Backbone(cfg)
        report = load_weights(backbone, cfg)
        assert any("pos_embed" in k for k in report.adapted), report.adapted
        torch.testing.assert_close(backbone.encoder.pos_embed, expected, atol=1e-6, rtol=0)
        assert backbone.encoder.pos_embed.requires_grad  # it trains with the encoder, as in MAE's fine-tuning
    # an export pre-trained on a 4 x 5 grid: its own grid, from its JSON
    wide = tiny(encoder={"img_size": [64, 80]})
    pth, _ = export_backbone(wide, tmp_path / "wide")
    patches = wide.encoder.pos_embed[:, 1:].reshape(1, 4, 5, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(8, 10), mode="bicubic", align_corners=False)
    cfg = resolve(BackboneConfig(method="pad", modality="ir", encoder=encoder, checkpoint=str(pth)))
    backbone = Backbone(cfg)
    load_weights(backbone, cfg)
    torch.testing.assert_close(backbone.encoder.pos_embed[:, 1:], patches.permute(0, 2, 3, 1).flatten(1, 2),
                               atol=1e-6, rtol=0)


def test_a_position_embedding_that_does_not_fill_its_grid_is_named():
    from pretrain.weights import _resample_pos

    with pytest.raises(WeightsError, match="cannot infer the grid of a position embedding with 20 tokens"):
        _resample_pos(torch.zeros(1, 21, 8), (8, 10))
    with pytest.raises(WeightsError, match="20 tokens does not fill the 4x4 grid"):
        _resample_pos(torch.zeros(1, 21, 8), (8, 10), (4, 4))
    assert _resample_pos(torch.zeros(1, 21, 8), (8, 10), (4, 5)).shape == (1, 81, 8)


def test_three_channel_weights_fold_into_one_channel_model(tmp_path):
    sd = official_mae_checkpoint(tmp_path / "rgb.pth")
    model = tiny(encoder={"in_chans": 1})
    report = load_into_mae(model, tmp_path / "rgb.pth")
    assert {"encoder.patch_embed.proj.weight", "decoder_pred.weight", "decoder_pred.bias"} <= set(report.adapted)
    torch.testing.assert_close(model.encoder.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    # A grey image through the folded 1-channel embedding equals it replicated through the RGB one.
    x = torch.rand(1, 1, 64, 80)
    rgb = torch.nn.functional.conv2d(x.expand(-1, 3, -1, -1), sd["patch_embed.proj.weight"], stride=16)
    grey = torch.nn.functional.conv2d(x, model.encoder.patch_embed.proj.weight, stride=16)
    torch.testing.assert_close(grey, rgb, atol=1e-5, rtol=1e-5)
    w = sd["decoder_pred.weight"].reshape(-1, 3, sd["decoder_pred.weight"].shape[1]).mean(1)
    torch.testing.assert_close(model.decoder_pred.weight, w)


def test_one_channel_weights_spread_over_a_three_channel_model(tmp_path):
    """An infrared (1-channel) backbone into a visible-light encoder (IV-tuning's visible branch):
    its patch weights are copied to each colour and divided by 3, so a grey image gives the infrared
    frame's embedding."""
    from pretrain.models.vit import EncoderConfig, build_encoder
    from pretrain.weights import load_into_encoder

    sd = official_mae_checkpoint(tmp_path / "ir.pth", in_chans=1)
    rgb = build_encoder(EncoderConfig(size="tiny", depth=2, img_size=(64, 80), in_chans=3))
    report = load_into_encoder(rgb, tmp_path / "ir.pth")
    assert "patch_embed.proj.weight" in report.adapted
    x = torch.rand(1, 1, 64, 80)
    grey = torch.nn.functional.conv2d(x.expand(-1, 3, -1, -1), rgb.patch_embed.proj.weight, stride=16)
    infrared = torch.nn.functional.conv2d(x, sd["patch_embed.proj.weight"], stride=16)
    torch.testing.assert_close(grey, infrared, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrap", ["state_dict", "module", "model_state_dict", "data_parallel"])
def test_wrapped_and_data_parallel_checkpoints_read_as_their_weights(tmp_path, wrap):
    """The layouts other trainers save: mmsegmentation / Lightning (``state_dict``), DeepSpeed
    (``module``), a plain loop (``model_state_dict``) and DataParallel / DDP (``module.`` before each
    key) all read as the same weights."""
    sd = official_mae_checkpoint(tmp_path / "plain.pth")
    saved = ({f"module.{k}": v for k, v in sd.items()} if wrap == "data_parallel"
             else {wrap: sd, "epoch": 3, "meta": {"note": "text"}})
    torch.save(saved, tmp_path / "wrapped.pth")
    got = read_state_dict(tmp_path / "wrapped.pth")
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)


def test_a_fixed_pad_scale_is_read_from_the_file_and_must_equal_the_models(tmp_path):
    from pretrain.weights import pad_config_from_state

    sd = pad_author_checkpoint(tmp_path / "fixed.pth", "fixed")
    for i in range(2):
        sd[f"blocks.{i}.adaptmlp.scale"] = torch.tensor([0.25])
    torch.save({"model": sd}, tmp_path / "quarter.pth")
    assert pad_config_from_state(sd, "fixed").fixed_scale == 0.25  # not the default 0.5
    report = load_into_mae(tiny(pad={"scale": "fixed", "fixed_scale": 0.25}), tmp_path / "quarter.pth")
    assert report.missing == [] and report.unexpected == []
    with pytest.raises(WeightsError, match=r"does not fit this model's PAD scale \(fixed at 0.26\)"):
        load_into_mae(tiny(pad={"scale": "fixed", "fixed_scale": 0.26}), tmp_path / "quarter.pth")


class NotATensor:
    pass


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"holds a pickled tests\.test_weights\.NotATensor; such objects are never "):
        read_state_dict(tmp_path / "evil.pth")
    marker = tmp_path / "code_ran"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": RunsACommand(marker)}, tmp_path / "evil2.pth")
    with pytest.raises(WeightsError, match=r"holds a pickled posix\.system; .* \(unpickling can run code\)"):
        read_state_dict(tmp_path / "evil2.pth")
    assert not marker.exists()


def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"notes\.pth: not a PyTorch checkpoint \(\.pth / \.pt\) nor a \.safe"):
        read_state_dict(tmp_path / "notes.pth")
    official_mae_checkpoint(tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(WeightsError, match=r"cut\.pth: not readable as a PyTorch checkpoint \(RuntimeError: "):
        read_state_dict(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x08" + bytes(20))
    with pytest.raises(WeightsError, match=r"cut\.safetensors: not a readable safetensors file"):
        read_state_dict(tmp_path / "cut.safetensors")


def _mapped_from(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's memory (Linux's /proc/self/maps), or None."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        span, *rest = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in span.split("-"))
        if start <= address < end:
            return rest[-1].strip() if len(rest) == 5 and rest[-1].startswith("/") else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_zip_checkpoint_is_mapped_and_a_legacy_one_read_alike(tmp_path):
    """torch.save's zip format is read through a private file mapping (a method that looks at a release
    before the load reads little of it); the legacy format, which cannot be mapped, reads as before."""
    sd = official_mae_checkpoint(tmp_path / "zip.pth")
    torch.save({"model": sd}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    mapped, legacy = read_state_dict(tmp_path / "zip.pth"), read_state_dict(tmp_path / "legacy.pth")
    assert mapped.keys() == legacy.keys() == sd.keys()
    assert all(torch.equal(mapped[k], legacy[k]) for k in sd)
    assert _mapped_from(mapped["blocks.0.attn.qkv.weight"]) == str(tmp_path / "zip.pth")
    assert _mapped_from(legacy["blocks.0.attn.qkv.weight"]) is None
    mapped["blocks.0.attn.qkv.weight"].add_(1.0)  # a change in memory never reaches the file
    again = read_state_dict(tmp_path / "zip.pth")
    assert torch.equal(again["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])


def test_a_file_system_that_cannot_map_files_reads_the_checkpoint_whole(tmp_path, monkeypatch):
    sd = official_mae_checkpoint(tmp_path / "zip.pth")
    load = torch.load

    def unmappable(*args, mmap=None, **kwargs):
        if mmap:
            raise RuntimeError("mmap: No such device")  # what mmap(2) says on a mount without it
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", unmappable)
    read = read_state_dict(tmp_path / "zip.pth")
    assert read.keys() == sd.keys() and all(torch.equal(read[k], sd[k]) for k in sd)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "zip.pth").read_bytes()[:1000])  # damaged: said as before
    with pytest.raises(WeightsError, match=r"cut\.pth: not readable as a PyTorch checkpoint \(RuntimeError: "):
        read_state_dict(tmp_path / "cut.pth")


def test_sincos_matches_mae_reference_layout():
    """First half of the channels encodes the column, second half the row (MAE's layout)."""
    emb = sincos_2d(8, 2, 3, cls_token=False)  # 2 rows x 3 cols
    assert emb.shape == (6, 8)
    # Tokens in the same column share the first half; tokens in the same row share the second.
    assert torch.equal(emb[0, :4], emb[3, :4]) and not torch.equal(emb[0, :4], emb[1, :4])
    assert torch.equal(emb[0, 4:], emb[2, 4:]) and not torch.equal(emb[0, 4:], emb[3, 4:])
    # Column 1: sin(1 * omega), cos(1 * omega) with omega = 1 / 10000^(k / 2), k = 0, 1.
    omega = torch.tensor([1.0, 0.01])
    torch.testing.assert_close(emb[1, :4], torch.cat([torch.sin(omega), torch.cos(omega)]))


def test_load_check_cli(tmp_path, capsys):
    from pretrain.cli import main

    official_mae_checkpoint(tmp_path / "mae.pth")
    from data_tools.config import CONFIG_DIR

    tiny_cfg = str(CONFIG_DIR / "pretrain" / "tiny.yaml")
    assert main(["load-check", "--config", tiny_cfg, f"init.checkpoint={tmp_path / 'mae.pth'}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unexpected"] == [] and report["loaded"] > 0
    assert all(".parallel_mlp." in k for k in report["missing"])
    # scratch refuses a checkpoint; a missing file is a clear error.
    assert main(["load-check", "--config", tiny_cfg, "model.paradigm=scratch",
                 f"init.checkpoint={tmp_path / 'mae.pth'}"]) == 2
    assert "random init" in capsys.readouterr().err
    assert main(["load-check", "--config", tiny_cfg, f"init.checkpoint={tmp_path / 'nope.pth'}"]) == 2
    assert "not found" in capsys.readouterr().err


def pad_author_checkpoint(path, scale="concat", seed=1):
    """A checkpoint in the layout of PAD's released pre-training code (built here from its key
    names: blocks.i.adaptmlp.{adapter_layer_norm_before, down_proj, up_proj}, blocks.i.scalar_pred,
    blocks.i.adaptmlp.scale), random non-zero values everywhere."""
    sd = official_mae_checkpoint(path, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    d, hidden = 192, 64
    for i in range(2):
        a = f"blocks.{i}.adaptmlp."
        sd.update({a + "adapter_layer_norm_before.weight": torch.randn(d, generator=g),
                   a + "adapter_layer_norm_before.bias": torch.randn(d, generator=g),
                   a + "down_proj.weight": torch.randn(hidden, d, generator=g), a + "down_proj.bias": torch.randn(hidden, generator=g),
                   a + "up_proj.weight": torch.randn(d, hidden, generator=g), a + "up_proj.bias": torch.randn(d, generator=g)})
        if scale == "concat":
            sd[f"blocks.{i}.scalar_pred.weight"] = torch.randn(1, 2 * d, generator=g)
        elif scale == "layer":
            sd[a + "scale"] = torch.tensor([0.3 + i])
        elif scale == "fixed":
            sd[a + "scale"] = torch.tensor([0.5])
    torch.save({"model": sd}, path)
    return sd


@pytest.mark.parametrize("scale", ["concat", "layer", "fixed"])
def test_pad_authors_checkpoint_lands_every_adapter_tensor(tmp_path, scale):
    from pretrain.weights import load_into_encoder
    from pretrain.models.vit import build_encoder, EncoderConfig

    sd = pad_author_checkpoint(tmp_path / "pad.pth", scale)
    model = tiny(pad={"scale": scale})
    report = load_into_mae(model, tmp_path / "pad.pth")
    assert report.missing == [] and report.unexpected == []
    named = dict(model.named_parameters())
    for i in range(2):
        ours = f"encoder.blocks.{i}.parallel_mlp.pad."
        assert torch.equal(named[ours + "norm.weight"], sd[f"blocks.{i}.adaptmlp.adapter_layer_norm_before.weight"])
        assert torch.equal(named[ours + "down.bias"], sd[f"blocks.{i}.adaptmlp.down_proj.bias"])
        assert torch.equal(named[ours + "up.weight"], sd[f"blocks.{i}.adaptmlp.up_proj.weight"])
        if scale == "concat":
            assert torch.equal(named[ours + "scale.weight"], sd[f"blocks.{i}.scalar_pred.weight"])
        if scale == "layer":
            assert torch.equal(named[ours + "scale"], sd[f"blocks.{i}.adaptmlp.scale"])
    # The same file as a fine-tuning backbone (method pad rebuilds the adapters from the weights;
    # a stored per-layer scale is `layer` unless the config names it fixed).
    from finetune.models.backbone import backbone_config_from_dict
    from finetune.weights import backbone_for
    bb = backbone_for(backbone_config_from_dict({"method": "pad", "modality": "ir", "checkpoint": str(tmp_path / "pad.pth"),
                                             "encoder": {"size": "tiny", "depth": 2, "img_size": [64, 80]},
                                             "pad_scale": "fixed" if scale == "fixed" else None}))
    assert bb.encoder.blocks[1].parallel_mlp.pad.variant == scale
    assert torch.equal(bb.encoder.blocks[1].parallel_mlp.pad.up.weight, sd["blocks.1.adaptmlp.up_proj.weight"])
    vit = build_encoder(EncoderConfig(size="tiny", depth=2, img_size=(64, 80)))
    with pytest.raises(WeightsError, match="adapter / scale-predictor tensor"):  # no adapters to receive them
        load_into_encoder(vit, tmp_path / "pad.pth")


def test_stray_or_mismatched_adapter_keys_are_errors_naming_them(tmp_path):
    sd = pad_author_checkpoint(tmp_path / "pad.pth", "concat")
    with pytest.raises(WeightsError, match=r"blocks\.0\.parallel_mlp\.pad\.scale\.weight"):
        load_into_mae(tiny(pad={"scale": "fixed"}), tmp_path / "pad.pth")  # a predictor the model lacks
    sd["blocks.0.adaptmlp.extra_proj.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "stray.pth")
    with pytest.raises(WeightsError, match=r"blocks\.0\.adaptmlp\.extra_proj\.weight"):
        load_into_mae(tiny(), tmp_path / "stray.pth")
    pad_author_checkpoint(tmp_path / "fixed.pth", "fixed")
    with pytest.raises(WeightsError, match="does not fit"):  # PAD's fixed 0.5 into a model fixed at 0.3
        load_into_mae(tiny(pad={"scale": "fixed", "fixed_scale": 0.3}), tmp_path / "fixed.pth")
    with pytest.raises(WeightsError, match="14 adapter"):  # a model without adapters never drops them silently
        load_into_mae(tiny(adapter="none", paradigm="continual"), tmp_path / "pad.pth")


def test_a_bad_init_checkpoint_stops_fine_tuning_with_one_line(tmp_path):
    from data_tools.config import CONFIG_DIR
    from tests.conftest import run_finetune_cli

    (tmp_path / "notes.pth").write_text("not a checkpoint")
    import cv2

    for folder in ("ir", "vi", "masks"):  # the layout the config names, with a frame
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), torch.zeros(64, 80, dtype=torch.uint8).numpy())
    res = run_finetune_cli("seg", tmp_path / "run", CONFIG_DIR / "finetune" / "seg_tiny.yaml", f"data.root={tmp_path}",
                           f"init.checkpoint={tmp_path / 'notes.pth'}")
    assert res.returncode == 1
    assert f"error: {tmp_path / 'notes.pth'}: not a PyTorch checkpoint" in res.stderr and "Traceback" not in res.stderr


def test_a_checkpoint_folder_names_the_file_inside(tmp_path):
    folder = tmp_path / "checkpoint-99"  # what MAE's and PAD's scripts write when run under DeepSpeed
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-99 is a folder$"):
        read_state_dict(folder)
    sd = {"blocks.0.norm1.weight": torch.ones(4)}
    torch.save({"module": sd, "epoch": 99}, folder / "mp_rank_00_model_states.pt")
    with pytest.raises(FileNotFoundError, match=r"is a folder; its weights are in .*99/mp_rank_00_model_states"):
        read_state_dict(folder)
    assert torch.equal(read_state_dict(folder / "mp_rank_00_model_states.pt")["blocks.0.norm1.weight"], torch.ones(4))


def test_load_check_cli_reports_what_the_init_checkpoint_fills(tmp_path, capsys):
    """`pretrain load-check`: the configured model loads init.checkpoint and the command prints the
    load report as JSON (stdout) and its one-line summary (stderr); without an init checkpoint, null."""
    from data_tools.config import CONFIG_DIR
    from pretrain.cli import main as pretrain_main

    sd = official_mae_checkpoint(tmp_path / "mae.pth")  # the tiny config's encoder and decoder
    config = str(CONFIG_DIR / "pretrain" / "tiny.yaml")
    assert pretrain_main(["load-check", "--config", config, f"init.checkpoint={tmp_path / 'mae.pth'}"]) == 0
    said = capsys.readouterr()
    report = json.loads(said.out)
    assert report["path"] == str(tmp_path / "mae.pth") and report["loaded"] == len(sd) and report["unexpected"] == []
    assert report["missing"] and all(".parallel_mlp." in k for k in report["missing"])  # the PAD adapters
    assert said.err == (f"{tmp_path / 'mae.pth'}: loaded {len(sd)} tensors, {len(report['missing'])} missing, "
                        f"0 unexpected, adapted none\n")
    assert pretrain_main(["load-check", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out) == {"checkpoint": None}


def test_an_export_is_written_whole_or_not_at_all_and_a_broken_pair_is_named(tmp_path, monkeypatch):
    """A stopped export leaves the earlier pair as it was; a JSON cut short, of a newer version or
    lacking a key, and a .pth of another export beside a JSON, are refused naming the file, not
    taken for a plain checkpoint or loaded into the wrong architecture."""
    from omegaconf import OmegaConf

    from pretrain.engine.run import check_init_checkpoint
    from pretrain.weights import is_exported_backbone, read_backbone_meta

    first = tiny(encoder={"img_size": [64, 80]})
    pth, js = export_backbone(first, tmp_path)
    saved, meta_text = pth.read_bytes(), js.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.json", "backbone.pth"]  # no temporary left

    def stopped(sd, f):  # the disk fills half-way through the second export's tensors
        f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", stopped)
    with pytest.raises(OSError, match="No space"):
        export_backbone(tiny(adapter="none", paradigm="continual"), tmp_path)
    monkeypatch.undo()
    assert (pth.read_bytes(), js.read_text()) == (saved, meta_text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.json", "backbone.pth"]  # the half file removed
    vit, _, _ = load_backbone(pth)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, first.encoder.blocks[0].attn.qkv.weight)
    syncs = []

    def json_stopped(fd):  # the second file made durable, the JSON: stopped before its rename
        syncs.append(fd)
        if len(syncs) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", json_stopped)
    with pytest.raises(OSError, match="No space"):
        export_backbone(tiny(adapter="none", paradigm="continual"), tmp_path)
    monkeypatch.undo()
    assert js.read_text() == meta_text and pth.read_bytes() != saved  # the new tensors, the old JSON
    assert not (tmp_path / "backbone.json.tmp").exists()
    with pytest.raises(WeightsError, match="the two files are of different exports"):
        load_backbone(pth)
    pth.write_bytes(saved)

    def init(path):
        return OmegaConf.create({"init": {"checkpoint": str(path)}})

    meta = json.loads(meta_text)
    broken = {"cut short": (meta_text[:100], "not readable JSON .* an export stopped while writing it"),
              "newer": (json.dumps(dict(meta, version=3)), "export format version 3, and this toolkit reads "
                                                            "versions 1 to 2: written by a newer release"),
              "lacking": (json.dumps({k: v for k, v in meta.items() if k != "adapters"}),
                          r"format version 2 lacks \['adapters'\]; re-run `python -m pretrain export`")}
    for name, (text, said) in broken.items():
        js.write_text(text)
        with pytest.raises(WeightsError, match=said):
            is_exported_backbone(pth) and read_backbone_meta(pth)
        with pytest.raises(WeightsError, match=said):
            check_init_checkpoint(init(pth))  # `finetune check`, `pretrain check` and every run refuse it
    js.write_text('{"epoch": 3, "lr": ')  # another program's JSON beside a checkpoint, cut short: not ours
    assert not is_exported_backbone(pth)
    check_init_checkpoint(init(pth))
    # the .pth of another export beside this JSON: counts differ, refused before any tensor is loaded
    js.write_text(json.dumps(dict(meta, num_parameters=meta["num_parameters"] + 1)))
    with pytest.raises(WeightsError, match=r"holds \d+ tensors, \d+ parameters; backbone.json beside it says "
                                           r"\d+, \d+: the two files are of different exports"):
        load_backbone(pth)
    js.write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("num_")}))  # not written: not checked
    load_backbone(pth)
