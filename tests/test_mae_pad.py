"""MAE + PAD model (MAE, He et al. 2022; PAD, arXiv 2312.08192): identity at init, the adapter
formula, masking, loss, gradients, parameter counts, layer decay."""
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from data_tools.config import CONFIG_DIR, load_config
from pretrain.cli import main as pretrain_main
from pretrain.models.mae import build_mae, patchify, random_masking
from pretrain.models.pad import (SCALE_VARIANTS, PADAdapter, PADConfig, scale_predictor_trainable,
                                 set_scale_predictors_trainable)
from pretrain.models.vit import encode
from pretrain.engine import param_groups
from pretrain.params import parameter_report
from pretrain.schema import PretrainConfig

TINY = {"encoder": {"size": "tiny", "depth": 2, "img_size": [64, 80]}, "decoder": {"dim": 64, "depth": 1, "num_heads": 2}}


def tiny(**kw):
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for k, v in kw.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    return build_mae(cfg)


def plain_vit(model) -> VisionTransformer:
    """timm's own ViT with the same weights and no adapters."""
    enc = model.cfg.encoder
    dim, depth, heads = enc.dims()
    vit = VisionTransformer(img_size=enc.img_size, patch_size=enc.patch_size, in_chans=enc.in_chans, num_classes=0,
                            global_pool="", embed_dim=dim, depth=depth, num_heads=heads, qkv_bias=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    sd = {k: v for k, v in model.encoder.state_dict().items() if ".parallel_mlp." not in k}
    vit.load_state_dict(sd, strict=True)
    return vit.eval()


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("scale", SCALE_VARIANTS)
def test_step0_encoder_equals_plain_vit(scale):
    torch.manual_seed(0)
    model = tiny(pad={"scale": scale}).eval()
    randomize(model.encoder.blocks)  # any backbone weights; adapters keep their PAD init
    for a in model.modules():
        if isinstance(a, PADAdapter):
            a.reset_parameters()
    x = torch.randn(2, 1, 64, 80)
    ours, _ = encode(model.encoder, x)
    ref = plain_vit(model).forward_features(x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", SCALE_VARIANTS)
def test_block_matches_spec_formula_with_random_adapter(scale):
    torch.manual_seed(1)
    model = tiny(pad={"scale": scale}).eval()
    block = model.encoder.blocks[0]
    adapter = block.parallel_mlp["pad"]
    randomize(adapter, seed=3)
    x = torch.randn(2, 7, model.encoder.embed_dim)

    def by_hand(dropout=lambda t: t):  # PAD's adapter formula (arXiv 2312.08192)
        x1 = x + block.attn(block.norm1(x))
        a_in = F.layer_norm(x1, (x1.shape[-1],), adapter.norm.weight, adapter.norm.bias, eps=1e-5)
        hidden = dropout(F.relu(F.linear(a_in, adapter.down.weight, adapter.down.bias)))
        a = F.linear(hidden, adapter.up.weight, adapter.up.bias)
        m = block.mlp(block.norm2(x1))
        if scale == "fixed":
            s = 0.5
        elif scale == "layer":
            s = adapter.scale
        else:
            inp = {"concat": torch.cat([m, a], -1), "sum": m + a, "side": a, "gside": m}[scale]
            s = torch.sigmoid(inp @ adapter.scale.weight.t())
            assert s.shape == (2, 7, 1)  # one scale per token
        return x1 + s * a + m

    torch.testing.assert_close(block(x), by_hand(), atol=1e-5, rtol=1e-5)
    # Training: PAD's Adapter drops out (p 0.1) after its ReLU, before Up.
    block.train()
    with torch.no_grad():
        torch.manual_seed(5)
        got = block(x)
        torch.manual_seed(5)
        torch.testing.assert_close(got, by_hand(lambda t: F.dropout(t, 0.1, training=True)), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, by_hand(), atol=1e-4)  # the dropout did act


def test_the_shipped_pretraining_recipes_hold_the_papers_constants():
    """configs/pretrain/*_vitb.yaml as PAD and MAE run them (SPEC 2-4), and the model's own PAD
    defaults equal the shipped ones, so that a config leaving a key out gets the same adapter."""
    import dataclasses

    def recipe(name):
        return load_config(CONFIG_DIR / "pretrain" / f"{name}.yaml", schema=PretrainConfig)

    cfg = recipe("pad_vitb")
    m, o, d = cfg.model, cfg.optim, cfg.data
    assert (m.encoder.size, list(m.encoder.img_size), m.encoder.patch_size, m.encoder.drop_path) == ("base", [224, 224],
                                                                                                    16, 0.0)
    assert dict(m.decoder) == {"dim": 512, "depth": 8, "num_heads": 16, "mlp_ratio": 4.0}
    assert (m.adapter, m.paradigm, m.mask_ratio, m.norm_pix_loss, m.train_decoder_embed) == ("pad", "pad", 0.75,
                                                                                             True, False)
    assert dict(m.pad) == dataclasses.asdict(PADConfig()) == {"hidden": 64, "dropout": 0.1, "scale": "concat",
                                                              "fixed_scale": 0.5, "scale_freeze_fraction": 0.6}
    assert (o.blr, list(o.betas), o.weight_decay, o.layer_decay, o.min_lr, o.warmup_epochs) == (1e-4, [0.9, 0.95],
                                                                                                0.05, None, 0.0, 30)
    assert (cfg.train.epochs, cfg.train.effective_batch, cfg.train.grad_clip) == (100, 4096, 0.0)
    assert (d.mean, d.std, d.hflip) == (0.3801, 0.1871, 0.5)
    assert dict(d.roi) == {"p": 0.85, "tries": 20, "min_proposal_side": 40, "center_jitter": 0.4, "scale_min": 0.7,
                           "scale_max": 1.5, "min_crop_side": 60, "big_area_ratio": 0.15, "fallback_scale": [0.2, 1.0],
                           "fallback_ratio": [0.75, 1.3333333]}
    scratch, continual = recipe("scratch_vitb"), recipe("continual_vitb")
    assert (scratch.model.paradigm, scratch.model.adapter, scratch.train.epochs, scratch.optim.warmup_epochs) == (
        "scratch", "none", 400, 40)
    assert (continual.model.paradigm, continual.model.adapter, continual.train.epochs,
            continual.optim.warmup_epochs) == ("continual", "none", 100, 30)


def test_layer_norm_epsilons_are_maes_and_pads():
    """MAE's encoder and decoder LayerNorms take eps 1e-6 (norm_layer=partial(nn.LayerNorm, eps=1e-6));
    PAD's adapter keeps PyTorch's default 1e-5 for its own LayerNorm."""
    model = tiny()
    eps = {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    adapter_norms = {n for n in eps if ".parallel_mlp.pad." in n}
    assert len(adapter_norms) == 2 and all(eps[n] == 1e-5 for n in adapter_norms)
    others = {n: e for n, e in eps.items() if n not in adapter_norms}
    assert {"decoder_norm", "decoder_blocks.0.norm1", "decoder_blocks.0.norm2", "encoder.norm",
            "encoder.blocks.1.norm2"} <= set(others)
    assert all(e == 1e-6 for e in others.values()), others


@pytest.mark.parametrize("length,ratio,keep", [(196, 0.9, 19), (30, 0.75, 7), (22, 0.75, 5), (1280, 0.75, 320),
                                               (196, 0.75, 49), (30, 0.9, 2)])
def test_masking_keeps_int_of_visible_share_as_mae(length, ratio, keep):
    """MAE keeps int(L * (1 - ratio)) tokens; each case here is one where round() keeps one more
    (or, at 196/0.75 and 1280/0.75, where both agree). In floating point 30 x (1 - 0.9) is
    2.9999999999999996, so MAE keeps 2 of 30 there, and so do we."""
    kept, mask, _ = random_masking(torch.zeros(2, length, 3), ratio, torch.Generator().manual_seed(0))
    assert kept.shape == (2, keep, 3)
    assert (mask.sum(1) == length - keep).all()


def test_masking_restores_order():
    g = torch.Generator().manual_seed(0)
    for length in (20, 30, 196, 1280):
        x = torch.arange(3 * length, dtype=torch.float32).reshape(3, length, 1).expand(-1, -1, 4).contiguous()
        kept, mask, ids_restore = random_masking(x, 0.75, g)
        keep = int(length * 0.25)
        assert kept.shape == (3, keep, 4)
        assert (mask.sum(1) == length - keep).all()
        # The kept tokens are exactly the unmasked positions; ids_restore inverts the shuffle.
        for n in range(3):
            visible = torch.nonzero(mask[n] == 0).flatten()
            assert sorted(kept[n, :, 0].long().tolist()) == sorted((x[n, visible, 0]).long().tolist())
        ids_shuffle = torch.argsort(ids_restore, dim=1)
        assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(3, -1))
    assert not torch.equal(mask[0], mask[1])  # per-sample masks


def test_loss_ignores_visible_patches_and_targets_are_per_patch():
    torch.manual_seed(0)
    model = tiny().eval()
    imgs = torch.rand(2, 1, 64, 80)
    loss, pred, mask = model(imgs)
    pred2 = pred.clone()
    pred2[mask == 0] += 10.0  # change predictions of visible patches only
    assert torch.allclose(model.forward_loss(imgs, pred2, mask), loss)
    pred3 = pred.clone()
    pred3[mask == 1] += 0.5
    assert not torch.allclose(model.forward_loss(imgs, pred3, mask), loss)
    target = model.targets(imgs)
    raw = patchify(imgs.expand(-1, 3, -1, -1), 16)
    i = 5
    hand = (raw[0, i] - raw[0, i].mean()) / (raw[0, i].var() + 1e-6) ** 0.5
    torch.testing.assert_close(target[0, i], hand)
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("paradigm,adapter,in_chans", [("pad", "pad", 3), ("pad", "pad", 1), ("continual", "none", 3),
                                                       ("scratch", "none", 1), ("continual", "pad", 3)])
def test_gradients_reach_exactly_the_trainable_set_on_640x512(paradigm, adapter, in_chans):
    torch.manual_seed(0)
    model = tiny(paradigm=paradigm, adapter=adapter, encoder={"img_size": [512, 640], "in_chans": in_chans})
    loss, pred, mask = model(torch.rand(2, 1, 512, 640))
    assert pred.shape == (2, 32 * 40, 16 * 16 * in_chans) and mask.shape == (2, 1280)
    loss.backward()
    trainable = model.trainable_names()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, f"{name} should train under {paradigm}"
        else:
            assert p.grad is None, f"{name} must stay frozen under {paradigm}"
    if paradigm == "pad":
        assert not any(n.startswith("encoder.") and ".parallel_mlp." not in n for n in trainable)
        ups = [p for n, p in model.named_parameters() if n.endswith("pad.up.weight")]
        assert all(p.grad.abs().sum() > 0 for p in ups)


def test_scale_predictor_gate():
    assert not scale_predictor_trainable(59, 100, 0.6) and scale_predictor_trainable(60, 100, 0.6)
    model = tiny()
    set_scale_predictors_trainable(model, False)
    model(torch.rand(1, 1, 64, 80))[0].backward()
    scales = [p for n, p in model.named_parameters() if n.endswith("pad.scale.weight")]
    assert len(scales) == 2 and all(p.grad is None for p in scales)
    set_scale_predictors_trainable(model, True)
    model(torch.rand(1, 1, 64, 80))[0].backward()
    assert all(p.grad is not None for p in scales)


def _adamw_steps(model, optimizer, steps, gate_open_at, seed=0):
    """AdamW steps on the MAE loss with the PAD gate; gradients of parameters that got none are
    filled with zeros, as DeepSpeed does before its optimiser step."""
    for step in range(steps):
        set_scale_predictors_trainable(model, step >= gate_open_at, optimizer)
        optimizer.zero_grad()
        model(torch.rand(2, 1, 64, 80, generator=torch.Generator().manual_seed(seed + step)))[0].backward()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        optimizer.step()


def test_gated_scale_predictor_collects_no_optimizer_state_then_steps_like_a_fresh_adamw():
    from pretrain.engine import hold_gated_groups
    from pretrain.models.pad import gated_parameter_names

    torch.manual_seed(0)
    model = tiny()
    gated = gated_parameter_names(model)
    assert gated == {f"encoder.blocks.{i}.parallel_mlp.pad.scale.weight" for i in range(2)}
    groups = param_groups(model, 0.05, gates={"scale_predictor": gated})
    optimizer = hold_gated_groups(torch.optim.AdamW([{k: g[k] for k in ("params", "weight_decay", "gate")}
                                                     for g in groups], lr=1e-3, betas=(0.9, 0.95)))
    named = dict(model.named_parameters())
    w_s = [named[n] for n in sorted(gated)]
    before = [p.detach().clone() for p in w_s]
    _adamw_steps(model, optimizer, 3, gate_open_at=3)
    for p, b in zip(w_s, before):  # held: unchanged, no state (no step count, no moments, no decay)
        assert torch.equal(p, b) and optimizer.state.get(p, {}) == {}
    others = [p for g in optimizer.param_groups if not g["gate"] for p in g["params"]]
    assert all(int(optimizer.state[p]["step"]) == 3 for p in others)
    # Gate open: the first update equals a fresh AdamW's first step on the same gradient.
    set_scale_predictors_trainable(model, True, optimizer)
    optimizer.zero_grad()
    model(torch.rand(2, 1, 64, 80, generator=torch.Generator().manual_seed(99)))[0].backward()
    grads = [p.grad.clone() for p in w_s]
    start = [p.detach().clone() for p in w_s]
    optimizer.step()
    lr, wd, eps = 1e-3, 0.05, 1e-8
    for p, g, p0 in zip(w_s, grads, start):
        assert g.abs().sum() > 0
        # fresh AdamW, step 1: m = (1 - b1) g, v = (1 - b2) g^2, bias-corrected update = g / (|g| + eps')
        m_hat, v_hat = g, g * g
        expected = p0 * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-5)
        assert int(optimizer.state[p]["step"]) == 1


def test_layer_scale_is_not_gated():
    """PAD gates only its token-wise predictor: the `layer` variant's scale trains from step 0."""
    from pretrain.engine import hold_gated_groups
    from pretrain.models.pad import gated_parameter_names

    torch.manual_seed(0)
    model = tiny(pad={"scale": "layer"})
    assert gated_parameter_names(model) == set()
    optimizer = hold_gated_groups(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    scales = [p for n, p in model.named_parameters() if n.endswith("pad.scale")]
    with torch.no_grad():  # the adapters' up-projection is zero at init: open it so that a reaches s
        for n, p in model.named_parameters():
            if n.endswith("pad.up.weight"):
                p.normal_(std=0.1)
    _adamw_steps(model, optimizer, 1, gate_open_at=10)
    assert len(scales) == 2 and all(float(p.detach()) != 0.5 for p in scales)


def _vit_b_encoder_params() -> int:
    d, h = 768, 3072
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    return (16 * 16 * 3 * d + d) + d + 197 * d + 12 * block + 2 * d


DECODER_EMBED = 768 * 512 + 512  # PAD keeps it frozen by default: 393,728


def _decoder_trainable() -> int:
    """Mask token, decoder blocks, norm and pixel head: PAD's trainable decoder (no decoder_embed)."""
    d, h = 512, 2048
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
    return d + 8 * block + 2 * d + (d * 16 * 16 * 3 + 16 * 16 * 3)


@pytest.mark.parametrize("scale,per_block", [("concat", 102208), ("sum", 101440), ("side", 101440),
                                             ("gside", 101440), ("fixed", 100672), ("layer", 100673)])
def test_vit_b_pad_parameter_counts(scale, per_block):
    with torch.device("meta"):
        model = build_mae({"pad": {"scale": scale}})
    r = parameter_report(model)
    assert r["trainable_encoder"] == 12 * per_block
    assert r["trainable_decoder"] == _decoder_trainable()
    assert r["total"] == _vit_b_encoder_params() + 12 * per_block + _decoder_trainable() + DECODER_EMBED + 197 * 512
    assert r["per_module"]["encoder.blocks"]["trainable"] == 0


def test_pad_keeps_decoder_embed_frozen_unless_asked():
    """PAD's trainable set: adapters, predictors, mask token, decoder blocks, norm and head;
    decoder_embed frozen (PAD's released code), trainable with model.train_decoder_embed."""
    with torch.device("meta"):
        frozen, trained = build_mae({}), build_mae({"train_decoder_embed": True})
    assert {"decoder_embed.weight", "decoder_embed.bias"}.isdisjoint(frozen.trainable_names())
    assert trained.trainable_names() - frozen.trainable_names() == {"decoder_embed.weight", "decoder_embed.bias"}
    assert not frozen.decoder_embed.weight.requires_grad and trained.decoder_embed.weight.requires_grad
    r_frozen, r_trained = parameter_report(frozen), parameter_report(trained)
    assert r_trained["trainable_decoder"] - r_frozen["trainable_decoder"] == DECODER_EMBED == 393_728
    assert r_frozen["trainable_decoder"] == _decoder_trainable() == 25_614_592
    expected = {"mask_token"} | {n for n, _ in frozen.named_parameters()
                                 if n.startswith(("decoder_blocks.", "decoder_norm.", "decoder_pred."))}
    expected |= {n for n, _ in frozen.named_parameters() if ".parallel_mlp.pad." in n}
    assert frozen.trainable_names() == expected
    with torch.device("meta"):  # the full paradigms train everything, decoder_embed included
        assert "decoder_embed.weight" in build_mae({"paradigm": "continual", "adapter": "none"}).trainable_names()


def test_vit_b_pad_concat_is_the_papers_1_23m():
    with torch.device("meta"):
        r = parameter_report(build_mae({}))
    assert r["trainable_encoder"] == 1_226_496 and r["scale_predictor"] == 12 * 1536


@pytest.mark.parametrize("paradigm", ["continual", "scratch"])
def test_vit_b_full_paradigms_train_the_whole_encoder(paradigm):
    with torch.device("meta"):
        r = parameter_report(build_mae({"paradigm": paradigm, "adapter": "none"}))
    assert r["trainable_encoder"] == _vit_b_encoder_params() - 197 * 768  # all but the fixed sin-cos
    assert r["frozen"] == 197 * 768 + 197 * 512


def test_params_cli_prints_json(capsys):
    assert pretrain_main(["params"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_encoder"] == 1_226_496
    assert {"total", "trainable", "frozen", "trainable_encoder", "trainable_decoder", "per_module"} <= set(out)
    assert out["config"] == {"paradigm": "pad", "adapter": "pad", "scale": "concat", "size": "base"}
    assert pretrain_main(["params", "model.pad.scale=side", "model.encoder.size=large"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_encoder"] == 24 * (2 * 1024 + 2 * 64 * 1024 + 64 + 1024 + 1024)
    assert out["config"] == {"paradigm": "pad", "adapter": "pad", "scale": "side", "size": "large"}
    assert pretrain_main(["--local_rank=1", "params"]) == 0  # as the DeepSpeed launcher starts each process
    assert json.loads(capsys.readouterr().out)["trainable_encoder"] == 1_226_496
    assert pretrain_main(["params", "model.pad.scale=bogus"]) == 2


def test_layer_decay_groups():
    model = tiny(paradigm="continual", adapter="none")
    groups = param_groups(model, 0.05, layer_decay=0.7, num_layers=2)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["encoder.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.7**3)
    assert by_name["encoder.blocks.0.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.7**2)
    assert by_name["encoder.blocks.1.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.7)
    assert by_name["decoder_pred.weight"]["lr_scale"] == 1.0
    assert by_name["encoder.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["encoder.blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["encoder.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert "encoder.pos_embed" not in by_name  # fixed
    # The run's groups: with layer decay the CLS token is spared, as MAE's / PAD's param_groups_lrd
    # spare no_weight_decay(); without it, decayed, as their timm add_weight_decay groups do
    from pretrain.factory import build_model_from_config
    from pretrain.train import PretrainTask

    for layer_decay, decay in (("0.7", 0.0), ("null", 0.05)):
        cfg = load_config(CONFIG_DIR / "pretrain" / "tiny.yaml", ["model.paradigm=continual", "model.adapter=none",
                                                                 f"optim.layer_decay={layer_decay}"], PretrainConfig)
        run_groups = PretrainTask().param_groups(build_model_from_config(cfg), cfg)
        by_name = {n: g for g in run_groups for n in g["names"]}
        assert by_name["encoder.cls_token"]["weight_decay"] == decay
        assert by_name["encoder.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05


def test_random_init_is_maes_initialize_weights():
    """A randomly initialised encoder (scratch, or no weights given) starts as MAE's
    initialize_weights: xavier-uniform Linears (std sqrt(2 / (fan_in + fan_out))) and patch
    projection (viewed as a Linear), zero biases, unit LayerNorms, cls token N(0, 0.02)."""
    torch.manual_seed(0)
    model = build_mae({"paradigm": "scratch", "adapter": "none"})
    enc = model.encoder

    def xavier_std(fan_out, fan_in):
        return (2.0 / (fan_in + fan_out)) ** 0.5

    cases = {"patch_embed.proj.weight": xavier_std(768, 768), "blocks.0.attn.qkv.weight": xavier_std(2304, 768),
             "blocks.5.attn.proj.weight": xavier_std(768, 768), "blocks.11.mlp.fc1.weight": xavier_std(3072, 768),
             "blocks.3.mlp.fc2.weight": xavier_std(768, 3072)}
    named = dict(enc.named_parameters())
    for name, std in cases.items():
        w = named[name].detach()
        assert abs(w.std().item() - std) < 0.02 * std, name
        assert w.abs().max().item() <= std * 3**0.5 * 1.0001, name  # uniform: bounded by sqrt(3) std
    assert abs(enc.cls_token.std().item() - 0.02) < 0.003 and enc.cls_token.abs().max() < 0.1
    assert abs(model.mask_token.std().item() - 0.02) < 0.006
    for name, p in named.items():
        if name.startswith("blocks.") and name.endswith(".bias") and ".norm" not in name:
            assert torch.count_nonzero(p) == 0, name
        if ".norm" in name or name.startswith("norm."):
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name


@pytest.mark.parametrize("paradigm", ["pad", "scratch"])
def test_pad_adapters_start_as_pads_init_after_the_encoders(paradigm):
    """PAD initialises its adapters after MAE's initialize_weights: Down kaiming-uniform with
    a = sqrt(5) (uniform on +-1 / sqrt(fan_in), std 1 / sqrt(3 fan_in)), not xavier; zero Down bias,
    zero Up, zero W_s. On ViT-B: 768 x 64 draws per block."""
    torch.manual_seed(0)
    model = build_mae({"paradigm": paradigm})
    adapters = [m for m in model.modules() if isinstance(m, PADAdapter)]
    assert len(adapters) == 12
    bound = 768 ** -0.5
    for adapter in adapters:
        w = adapter.down.weight.detach()
        assert w.shape == (64, 768)
        assert abs(w.std().item() - bound / 3**0.5) < 0.02 * bound / 3**0.5
        assert 0.99 * bound <= w.abs().max().item() <= bound * 1.0001
        assert torch.count_nonzero(adapter.down.bias) == 0
        assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
        assert torch.count_nonzero(adapter.scale.weight) == 0
    # the per-layer scale ablation starts at PAD's init_value 0.5, after a reset too
    layer = PADAdapter(32, PADConfig(scale="layer"))
    with torch.no_grad():
        layer.scale.fill_(2.0)
    layer.reset_parameters()
    assert layer.scale.tolist() == [0.5]
