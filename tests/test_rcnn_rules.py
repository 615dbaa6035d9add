"""Faster R-CNN's training rules as detectron2 runs them for ViTDet: L1 box losses, ROIAlignV2 pooling,
1000 proposals per training image; torchvision's on request and for runs saved before."""
import copy

import pytest
import torch
from torch.nn import functional as F

from data_tools.config import CONFIG_DIR, ConfigError, check_config, load_config
from finetune.factory import build_detector
from finetune.models.rcnn_rules import AlignedRoIPool, box_head_losses, rpn_losses, set_box_loss_beta
from finetune.schema import DetConfig

TINY = CONFIG_DIR / "finetune" / "det_tiny.yaml"
SMALL = ["model.method=full", "model.modality=ir", "model.encoder.depth=1"]
TORCHVISION_RULES = ["model.head.box_loss_beta=0.1111111111111111", "model.head.rpn_post_nms_train=2000",
                     "model.head.aligned_roi_pool=false"]


def _built(*overrides):
    torch.manual_seed(0)
    return build_detector(load_config(TINY, [*SMALL, *overrides], DetConfig))


def _smooth_l1(d, beta):
    d = d.abs()
    return torch.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta) if beta > 0 else d


class _SampleAll:
    """Stands in for the RPN's sampler: every labelled anchor is sampled."""

    def __call__(self, labels):
        return [lab == 1 for lab in labels], [lab == 0 for lab in labels]


def test_rpn_box_loss_by_hand_for_l1_and_torchvisions_beta():
    labels = [torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0])]  # two positives, two negatives, one ignored
    targets = [torch.tensor([[0.5, -0.2, 0.1, 0.0]] * 5)]
    deltas = torch.tensor([[0.3, -0.2, 0.15, 0.5], [0.5, 0.0, 0.1, -0.05], [9.0] * 4, [9.0] * 4, [9.0] * 4])
    objectness = torch.tensor([2.0, -1.0, 0.5, -3.0, 7.0])
    rpn = type("RPN", (), {"fg_bg_sampler": _SampleAll()})()
    for beta in (0.0, 1 / 9):
        cls, box = rpn_losses(rpn, objectness, deltas, labels, targets, beta)
        want = _smooth_l1(deltas[:2] - targets[0][:2], beta).sum() / 4  # summed over positives / 4 sampled
        assert box.item() == pytest.approx(want.item(), rel=1e-6)
        want_cls = F.binary_cross_entropy_with_logits(objectness[:4], labels[0][:4])
        assert cls.item() == pytest.approx(want_cls.item(), rel=1e-6)
    l1 = rpn_losses(rpn, objectness, deltas, labels, targets, 0.0)[1]
    assert l1.item() == pytest.approx((0.2 + 0.05 + 0.5 + 0.2 + 0.05) / 4, rel=1e-6)


def test_box_head_loss_takes_each_roi_its_own_class():
    labels = [torch.tensor([2, 0]), torch.tensor([1])]  # classes 1..2, 0 background; 3 RoIs sampled
    targets = [torch.tensor([[0.1, 0.2, 0.0, 0.0], [5.0] * 4]), torch.tensor([[0.0, 0.0, -0.3, 0.4]])]
    deltas = torch.zeros(3, 3 * 4)
    deltas[0, 8:] = torch.tensor([0.4, 0.2, 0.0, 0.0])  # class 2's deltas on RoI 0: off by 0.3 in x
    deltas[0, 4:8] = 100.0  # another class's deltas on RoI 0 never count
    deltas[2, 4:8] = torch.tensor([0.0, 0.0, -0.3, 0.0])  # class 1 on RoI 2: off by 0.4 in h
    logits = torch.randn(3, 3)
    cls, box = box_head_losses(logits, deltas, labels, targets, 0.0)
    assert box.item() == pytest.approx((0.3 + 0.4) / 3, rel=1e-6)
    assert cls.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([2, 0, 1])).item(), rel=1e-6)
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    torchvisions = fastrcnn_loss(logits, deltas, labels, targets)
    ours = box_head_losses(logits, deltas, labels, targets, 1 / 9)
    torch.testing.assert_close(torch.stack(ours), torch.stack(torchvisions))


def test_the_rules_with_torchvisions_beta_train_exactly_as_torchvision():
    """Re-classed with beta 1/9, the same model on the same batch gives torchvision's four losses;
    with beta 0 the classification terms stay and the box terms change."""
    stock = _built(*TORCHVISION_RULES)
    assert type(stock.model.rpn).__name__ == "RegionProposalNetwork"
    ours = copy.deepcopy(stock)
    set_box_loss_beta(ours.model, 1 / 9)
    ir = torch.rand(2, 1, 128, 160)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 90.0]]), "labels": torch.tensor([1])}] * 2

    def losses(det):
        torch.manual_seed(1)  # the samplers draw
        targets1 = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        return det.train().model(list(ir), targets1)

    want, got = losses(stock), losses(ours)
    assert set(got) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    set_box_loss_beta(ours.model, 0.0)
    l1 = losses(ours)
    for k in ("loss_objectness", "loss_classifier"):
        torch.testing.assert_close(l1[k], want[k])
    for k in ("loss_rpn_box_reg", "loss_box_reg"):
        assert l1[k].item() > want[k].item() > 0  # L1 >= smooth L1, and positives exist


def test_aligned_pool_is_roialignv2_by_hand():
    """Feature value = its column index + 1000 x level: the pooled values show which level each box
    went to (224 px on p4, one level per octave) and where its bins sit (half-pixel aligned)."""
    strides = (4, 8, 16, 32)
    names = ["p2", "p3", "p4", "p5"]
    features = {}
    for level, (name, s) in enumerate(zip(names, strides)):
        w = 512 // s
        features[name] = (torch.arange(w, dtype=torch.float32) + 1000 * level).expand(2, 2, w, w).contiguous()
    pool = AlignedRoIPool(names, strides)
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [0, 0, 112, 112], [16, 16, 240, 240], [0, 0, 448, 448],
                          [0, 0, 500, 500], [100, 100, 150, 400]])
    out = pool(features, [boxes[:3], boxes[3:]], [(512, 512)] * 2)
    assert out.shape == (6, 2, 7, 7)
    assert (out[:, 0, 3, 3] // 1000).tolist() == [0, 1, 2, 3, 3, 1]  # sqrt(50 x 300) = 122: p3
    # the 224-px box at x 16 on stride 16: from 16 / 16 - 0.5 = 0.5, bins 2 wide, centres 1.5, 3.5, ...
    torch.testing.assert_close(out[2, 1, 4] - 2000, torch.arange(7) * 2.0 + 1.5)
    from torchvision.ops import MultiScaleRoIAlign

    unaligned = MultiScaleRoIAlign(names, 7, 2)
    legacy = unaligned(features, [boxes[2:3]], [(512, 512)])
    torch.testing.assert_close(legacy[0, 1, 4] - 2000, torch.arange(7) * 2.0 + 2.0)  # torchvision's: no shift
    with pytest.raises(ValueError, match="one stride per level: 4 levels, strides"):
        AlignedRoIPool(names, strides[:3])


def test_vitdets_rules_by_default_torchvisions_for_runs_saved_before(tmp_path):
    from omegaconf import OmegaConf

    from finetune.models.rcnn_rules import AlignedRoIPool as Pool

    vitdet = _built().model
    assert (type(vitdet.rpn).__name__, vitdet.rpn.box_loss_beta, vitdet.roi_heads.box_loss_beta) == ("BetaRPN", 0, 0)
    assert vitdet.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert isinstance(vitdet.roi_heads.box_roi_pool, Pool) and vitdet.roi_heads.box_roi_pool.sampling_ratio == 0
    pool = vitdet.roi_heads.box_roi_pool  # p2..p5 at their own strides, as detectron2's ROIPooler
    assert pool.featmap_names == ["p2", "p3", "p4", "p5"] and pool.strides == (4, 8, 16, 32)
    assert vitdet.backbone.strides == (4, 8, 16, 32, 64)
    # a run's config saved before these settings (the keys absent), as `predict` reads it: torchvision's rules,
    # as it trained with; the same as naming them
    saved = OmegaConf.to_container(load_config(TINY, SMALL))
    for k in ("box_loss_beta", "rpn_post_nms_train", "aligned_roi_pool"):
        del saved["model"]["head"][k]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    for old in (build_detector(load_config(tmp_path / "config.yaml")).model, _built(*TORCHVISION_RULES).model):
        assert type(old.rpn).__name__ == "RegionProposalNetwork" and type(old.roi_heads).__name__ == "RoIHeads"
        assert old.rpn._post_nms_top_n["training"] == 2000
        assert type(old.roi_heads.box_roi_pool).__name__ == "MultiScaleRoIAlign"


def test_the_rules_are_faster_rcnns_alone():
    with pytest.raises(ConfigError, match="box_loss_beta / aligned_roi_pool shape Faster R-CNN"):
        load_config(TINY, ["model.head.detector=retinanet", "model.head.box_loss_beta=0",
                           "model.head.aligned_roi_pool=true"], DetConfig)
    with pytest.raises(ConfigError, match="rpn_post_nms_train"):
        load_config(TINY, ["model.head.rpn_post_nms_train=0"], DetConfig)
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(load_config(TINY, ["model.head.detector=fcos"]))
    for k in ("box_loss_beta", "rpn_post_nms_train", "aligned_roi_pool"):
        del saved["model"]["head"][k]
    assert check_config(OmegaConf.create(saved), DetConfig).model.head.aligned_roi_pool is None


@pytest.mark.slow  # three training processes (~35 s): the default suite stays near 15 min
def test_a_detection_run_begun_before_the_rules_resumes_by_torchvisions(tmp_path):
    """A run an earlier version began (its saved config without the three settings) and killed, resumed
    with today's config (the settings null: detectron2's): it goes on by torchvision's rules, as it began,
    says so, and ends with the weights of an uninterrupted run by torchvision's rules."""
    from omegaconf import OmegaConf

    from data_tools.synth import SynthConfig, write_corpus
    from pretrain.engine.loop import FAULT_ENV
    from tests.conftest import run_finetune_cli

    write_corpus(str(tmp_path / "pairs"), SynthConfig(num_images=4, width=160, height=128))
    args = [f"data.root={tmp_path / 'pairs'}", f"data.boxes.path={tmp_path / 'pairs' / 'labels'}", "train.steps=4",
            "train.save_every_steps=2", "train.batch_size=2", "eval.overlays=0", *SMALL]

    def run(name, *extra):
        res = run_finetune_cli("det", tmp_path / name, TINY, *args, *extra, env_extra={"OMP_NUM_THREADS": "1"})
        return res, res.stdout + res.stderr

    res, out = run("clean", *TORCHVISION_RULES)
    assert res.returncode == 0, out[-3000:]
    earlier = OmegaConf.to_container(load_config(TINY, args))  # the config as an earlier version had it
    for k in ("box_loss_beta", "rpn_post_nms_train", "aligned_roi_pool"):
        del earlier["model"]["head"][k]
    (tmp_path / "earlier.yaml").write_text(OmegaConf.to_yaml(earlier))
    killed = run_finetune_cli("det", tmp_path / "earlier", tmp_path / "earlier.yaml",
                              env_extra={"OMP_NUM_THREADS": "1", FAULT_ENV: "3"})
    assert killed.returncode != 0 and (tmp_path / "earlier" / "checkpoints" / "step00000002").is_dir()
    res, out = run("earlier")  # today's config
    assert res.returncode == 0 and "resumed from step00000002 at step 2" in out, out[-3000:]
    assert "began before these model settings existed and goes on as it began, without them (their values here " \
           "are not used): model.head.aligned_roi_pool, model.head.box_loss_beta, model.head.rpn_post_nms_train" in out
    a, b = (torch.load(tmp_path / name / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt",
                       weights_only=True)["module"] for name in ("clean", "earlier"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
