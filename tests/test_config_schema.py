"""Every config is checked against its stage's schema at load: unknown keys, wrong types and
out-of-range values are one line each naming the key's path; a failed start claims nothing."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_tools.config import CONFIG_DIR, ConfigError, check_config, load_config
from data_tools.schema import BuildConfig
from finetune.schema import DetConfig, SegConfig
from pretrain.schema import PretrainConfig

TINY = CONFIG_DIR / "pretrain" / "tiny.yaml"


def _schema_of(path: Path):
    if path.parent.name == "data":
        return BuildConfig
    if path.parent.name == "pretrain":
        return PretrainConfig
    if path.parent.name == "presets":  # a detection preset names boxes
        return DetConfig if "boxes" in load_config(path).data else SegConfig
    return SegConfig if path.name.startswith("seg") else DetConfig


@pytest.mark.parametrize("path", sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.name != "msip.yaml"),
                         ids=lambda p: p.name)  # msip.yaml is a sources list (test_msip_recipe.py)
def test_every_shipped_config_fits_its_schema(path):
    cfg = load_config(path)
    if OmegaConf.select(cfg, "data.classes_file"):  # its class names come from the dataset (yolo's data.yaml)
        cfg.data.classes = ["object"]
    check_config(cfg, _schema_of(path))


def test_every_shipped_yaml_reads_the_same_with_any_yaml_reader():
    """Users copy our YAML into their own tools (PyYAML, ruamel, other languages' readers): each
    file reads the same with PyYAML's safe loader as with ours (a bare `person?]` in a flow list
    is an error to PyYAML, where OmegaConf's reader takes it)."""
    import yaml

    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        assert yaml.safe_load(path.read_text()) == OmegaConf.to_container(OmegaConf.load(path)), path


def _the_one_problem(path, overrides, schema) -> str:
    """The line naming the one problem of ``path`` with ``overrides`` (the error's first line says which
    file and schema)."""
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, schema)
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    return lines[1].strip()


@pytest.mark.parametrize("override,line", [
    ("train.epochs=two", "train.epochs: Input should be a valid number, unable to parse string as a number (got 'two')"),
    ("train.batch_size=0", "train.batch_size: Input should be greater than 0 (got 0)"),
    ("train.save_every_steps=0", "train.save_every_steps: Input should be greater than 0 (got 0)"),
    ("optim.blr=fast", "optim.blr: Input should be a valid number, unable to parse string as a number (got 'fast')"),
    ("model.mask_ratio=1.5", "model.mask_ratio: Input should be less than 1 (got 1.5)"),
    ("train.epochs=0", "train.epochs: Input should be greater than 0 (got 0)"),
    ("train.nonfinite=ignore", "train.nonfinite: Input should be 'stop', 'skip' or 'rollback' (got 'ignore')"),
    ("data.shards=[{path: s, wieght: 2}]", "data.shards[0].wieght: unknown key (allowed: path, weight)"),
    ("data.shards=shards/msip", "data.shards: a list of shard folders, each with its sampling weight: "
                                "data.shards='[{path: shards/msip}]' (weight 1 when left out) (got 'shards/msip')"),
    ("data.shards=[a,{path: b}]", "data.shards: a list of shard folders, each with its sampling weight: "
                                  "data.shards='[{path: a}, ...]' (weight 1 when left out) (got ['a', {'path': 'b'}])"),
    ("model.encoder.img_size=[64,81]", "model.encoder: img_size [64, 81] must be a multiple of patch_size 16"),
    ("optim.warmup_epochs=3", "optim.warmup_epochs 3.0 exceeds train.epochs 2.0"),
    ("train.loss_spike_factor=1", "train.loss_spike_factor: Input should be greater than 1 (got 1)"),
    ("optim.layer_decay=0", "optim.layer_decay: Input should be greater than 0 (got 0)"),
    ("data.shards=[{path: ''}]", "data.shards[0].path: String should have at least 1 character (got '')"),
    ("data.roi.scale_min=5", "data.roi: scale_min / scale_max must not fall, got 5.0 > 1.5"),
    ("data.roi.fallback_scale=[0.5,1.5]", "data.roi.fallback_scale[1]: Input should be less than or equal to 1 "
                                          "(got 1.5)"),
    ("data.intensity.percentiles=[50,50]", "data.intensity: percentiles must rise, got [50.0, 50.0]"),
    ("data.intensity.percentiles=[1,101]", "data.intensity.percentiles[1]: Input should be less than or equal to 100 "
                                           "(got 101)"),
])
def test_each_bad_value_is_one_line_naming_the_key_and_range(override, line):
    assert _the_one_problem(TINY, [override], PretrainConfig) == line


def test_a_range_may_be_one_value_and_warm_up_may_fill_the_run():
    cfg = load_config(TINY, ["data.roi.scale_min=1.5", "data.roi.scale_max=1.5", "optim.warmup_epochs=2"],
                      PretrainConfig)
    assert (cfg.data.roi.scale_min, cfg.data.roi.scale_max, cfg.optim.warmup_epochs) == (1.5, 1.5, 2)


@pytest.mark.parametrize("override,line", [
    ("proposals.max_aspect=0.5", "proposals.max_aspect: Input should be greater than or equal to 1 (got 0.5)"),
    ("proposals.blob_backgrounds=[0.1,1.0]", "proposals.blob_backgrounds[1]: Input should be less than 1 (got 1.0)"),
    ("proposals.blob_views=[]", "proposals.blob_views: List should have at least 1 item after validation, not 0 "
                                "(got [])"),
    ("proposals.nms_iou=0", "proposals.nms_iou: Input should be greater than 0 (got 0)"),
    ("proposals.blob_sides=[320]", "proposals: blob_sides and blob_backgrounds need one value each per scale"),
    ("shards.prefix=a/b", "shards.prefix: String should match pattern '^[A-Za-z0-9_.-]+$' (got 'a/b')"),
    ("shards.png_compression=10", "shards.png_compression: Input should be less than or equal to 9 (got 10)"),
])
def test_each_bad_build_setting_is_one_line_naming_the_key_and_range(override, line):
    from data_tools.cli import DEFAULT_BUILD_CONFIG

    assert _the_one_problem(DEFAULT_BUILD_CONFIG, [override], BuildConfig) == line


SEG_TINY = CONFIG_DIR / "finetune" / "seg_tiny.yaml"  # 64 x 80 windows, 4 classes


@pytest.mark.parametrize("config,overrides,line", [
    # each used to fail with a traceback: at the first step (image too small for the heads, class weights
    # of another class count) or after training, in evaluation (a stride with gaps)
    ("seg_tiny.yaml", ["model.encoder.img_size=[16,32]"], "model: encoder.img_size [16, 32] must be at least 2 "
     "patches (32 px) a side: the heads' stride-32 level halves the patch grid"),
    ("det_tiny.yaml", ["model.encoder.img_size=[32,16]"], "model: encoder.img_size [32, 16] must be at "
     "least 2 patches (32 px) a side: the heads' stride-32 level halves the patch grid"),
    ("seg_tiny.yaml", ["model.head.class_weight=[1,10]"], "model.head.class_weight has 2 values for "
     "the 4 classes of data.classes (background, road, person, car): one per class, in their order"),
    ("seg_tiny.yaml", ["eval.stride=72"], "eval.stride [72, 72] is larger than the sliding window "
     "(model.encoder.img_size [64, 80]): pixels between windows would get no prediction"),
    ("det_tiny.yaml", ["data.classes=[person,car,person]"], "data: data.classes names person more than "
     "once: one name per class"),
    ("seg_tiny.yaml", ["model.encoder.img_size=512"], "model.encoder.img_size: give [height, width], e.g. "
     "[512,512] for 512 x 512 inputs (got 512)"),
    ("seg_tiny.yaml", ["eval.stride=[32,96]"], "eval.stride [32, 96] is larger than the sliding "
     "window (model.encoder.img_size [64, 80]): pixels between windows would get no prediction"),
    ("det_tiny.yaml", ["model.head.detector=retinanet", "model.head.box_head=conv"], "model.head: box_head shape "
     "Faster R-CNN's heads; detector 'retinanet' has its own: set model.head.box_head=null"),
    ("det_vitb.yaml", ["model.global_blocks=[2,5,8,12]"], "model: global_blocks [2, 5, 8, 12] must index the "
     "encoder's 12 blocks"),
    ("det_vitb.yaml", ["model.encoder.depth=6", "model.global_blocks=[5,6]"], "model: global_blocks [5, 6] must "
     "index the encoder's 6 blocks"),
    ("det_tiny.yaml", ["data.val_boxes.format=coco"], "data.val_boxes: data.val_boxes.format is set but not "
     "data.val_boxes.path (the validation boxes)"),
    ("det_tiny.yaml", ["data.ignore_classes=[person]"], "data: data.ignore_classes and data.classes both name "
     "['person']: a box is an object or an ignore region, not both"),
    ("det_tiny.yaml", ["data.class_aliases={pedestrian: walker}"], "data: data.class_aliases renames labels to "
     "['walker'], which neither data.classes nor data.ignore_classes names"),
    ("det_tiny.yaml", ["data.class_aliases={car: person}"], "data: data.class_aliases renames ['car'], which "
     "data.classes or data.ignore_classes names: a label is a class or another spelling of one, not both"),
    ("seg_tiny.yaml", ["optim.milestones=[0.5,3]"], "optim.milestones: milestones must be all steps (integers >= 1) "
     "or all shares of train.steps (between 0 and 1) (got [0.5, 3])"),
    ("seg_tiny.yaml", ["optim.milestones=[1.0]"], "optim.milestones: milestones must be all steps (integers >= 1) "
     "or all shares of train.steps (between 0 and 1) (got [1.0])"),
    ("seg_tiny.yaml", ["optim.milestones=[0.5,0.5]"], "optim.milestones: milestones must be ascending, each once "
     "(got [0.5, 0.5])"),
    ("seg_tiny.yaml", ["model.head.aux_level=4"], "model.head.aux_level: Input should be less than or equal to 3 "
     "(got 4)"),
    ("det_tiny.yaml", ["model.head.anchor_sizes=[32,64,128,256]"], "model.head.anchor_sizes: List should have at "
     "least 5 items after validation, not 4 (got [32, 64, 128, 256])"),
    ("seg_tiny.yaml", ["data.augment.cat_max_ratio=0"], "data.augment.cat_max_ratio: Input should be greater than 0 "
     "(got 0)"),
    ("seg_tiny.yaml", ["data.classes=[]"], "data.classes: List should have at least 1 item after validation, not 0 "
     "(got [])"),
    # a registry's own words name the value: said once
    ("seg_tiny.yaml", ["model.method=nope"], "model.method: method must be one of ('frozen', 'full', 'ivtuning', "
     "'mona', 'pad'), got 'nope'"),
    ("det_tiny.yaml", ["model.head.detector=yolo"], "model.head.detector: detector must be one of ('faster_rcnn', "
     "'fcos', 'retinanet'), got 'yolo'"),
    ("seg_tiny.yaml", ["model.head.type=fpnx"], "model.head.type: segmentation head type must be one of ('linear', "
     "'segformer', 'upernet'), got 'fpnx'"),
])
def test_each_fine_tuning_setting_out_of_its_range_or_at_odds_with_another_is_one_line(config, overrides, line):
    path = CONFIG_DIR / "finetune" / config
    assert _the_one_problem(path, overrides, DetConfig if "boxes" in load_config(path).data else SegConfig) == line


@pytest.mark.parametrize("stride", ["32", "[64,80]", "[48,40]", "null"])
def test_a_sliding_window_stride_is_one_number_or_height_and_width(stride):
    """``eval.stride`` as one number used to pass the schema and then fail in evaluation (``tuple(32)``);
    both forms give the windows mmsegmentation's slide mode would, each pixel scored."""
    import torch

    from finetune.factory import build_segmentor
    from finetune.seg import SegTask

    cfg = load_config(SEG_TINY, [f"eval.stride={stride}", "model.method=full", "model.modality=ir"], SegConfig)
    model = build_segmentor(cfg).eval()
    calls = []
    model.predict = lambda ir, vi: calls.append(ir.shape[0]) or torch.ones(ir.shape[0], 4, 64, 80)
    frame = {"ir": torch.rand(1, 150, 170).numpy()}
    pred = SegTask.predict_frame(model, cfg, frame, torch.device("cpu"))
    windows = {"32": 4 * 4, "[64,80]": 3 * 3, "[48,40]": 3 * 4, "null": 4 * 3}[stride]  # rows x columns
    assert pred.shape == (150, 170) and sum(calls) == windows


def test_a_typo_in_a_yaml_file_is_refused(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(f"_base_: {CONFIG_DIR / 'finetune' / 'seg_tiny.yaml'}\ntrain: {{stpes: 3}}\n")
    with pytest.raises(ConfigError, match=r"train\.stpes: unknown key \(allowed: accum_steps, batch_size,"):
        load_config(bad, schema=SegConfig)
    with pytest.raises(ConfigError, match="model: method 'mona' takes one image"):
        load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml", ["model.method=mona"], DetConfig)
    with pytest.raises(ConfigError, match=r"model.method: method must be one of \('frozen', 'full', "
                                          r"'ivtuning', 'mona', 'pad'\), got 'lora'"):
        load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml", ["model.method=lora"], DetConfig)
    with pytest.raises(ConfigError, match=r"model.head.detector: detector must be one of "
                                          r"\('faster_rcnn', 'fcos', 'retinanet'\), got 'yolo'"):
        load_config(CONFIG_DIR / "finetune" / "det_tiny.yaml", ["model.head.detector=yolo"], DetConfig)
    with pytest.raises(ConfigError, match=r"proposals.blob_views\[1\]: Input should be 'linear' or 'equalized' "
                                          r"\(got 'gamma'\)"):
        load_config(CONFIG_DIR / "data" / "build.yaml", ["proposals.blob_views=[linear,gamma]"], BuildConfig)
    with pytest.raises(ConfigError, match=r"proposals.blob_texture_weight: Input should be greater than or equal to 0"):
        load_config(CONFIG_DIR / "data" / "build.yaml", ["proposals.blob_texture_weight=-1"], BuildConfig)


def test_the_cli_refuses_a_bad_value_before_touching_the_run_dir(tmp_path, capsys):
    from finetune.cli import main as finetune_main
    from pretrain.cli import main as pretrain_main

    run_dir = tmp_path / "run"
    assert pretrain_main(["train", "--config", str(TINY), "--run-dir", str(run_dir), "train.batch_size=0"]) == 2
    assert "train.batch_size: Input should be greater than 0 (got 0)" in capsys.readouterr().err
    assert finetune_main(["seg", "--config", str(CONFIG_DIR / "finetune" / "seg_tiny.yaml"), "--run-dir", str(run_dir),
                          "optim.lr=-1"]) == 2
    assert "optim.lr: Input should be greater than 0 (got -1)" in capsys.readouterr().err
    assert not run_dir.exists()



def test_a_comment_in_an_override_is_refused_unless_quoted(tmp_path, capsys):
    """YAML reads ' #' as the start of a comment: `data.root=/data/run #2` used to train on /data/run."""
    from finetune.cli import main as finetune_main

    seg = CONFIG_DIR / "finetune" / "seg_tiny.yaml"
    with pytest.raises(ValueError, match=r"as a comment .* quote the value: \"data.root='/data/run #2'\"$"):
        load_config(seg, ["data.root=/data/run #2"])
    with pytest.raises(ValueError, match="as a comment"):
        load_config(seg, ["data.classes=[a, b] # c"])
    assert load_config(seg, ["data.root='/data/run #2'"]).data.root == "/data/run #2"
    assert load_config(seg, ["data.root=/data/run#2"]).data.root == "/data/run#2"  # no space before it: no comment
    assert list(load_config(seg, ["data.classes=[a, 'b #c', \"it's #d\"]"]).data.classes) == ["a", "b #c", "it's #d"]
    run_dir = tmp_path / "run"
    assert finetune_main(["seg", "--config", str(seg), "--run-dir", str(run_dir), "data.root=/data/run #2"]) == 2
    assert "YAML reads what follows '#' as a comment" in capsys.readouterr().err and not run_dir.exists()


def test_a_config_file_yaml_cannot_read_is_one_line_naming_where(tmp_path, capsys):
    from finetune.cli import main as finetune_main
    from pretrain.cli import main as pretrain_main

    broken, listed = tmp_path / "broken.yaml", tmp_path / "listed.yaml"
    broken.write_text("train: {steps: 3\n")
    listed.write_text("- train\n- data\n")
    # the reason in YAML's words: libyaml's (omegaconf 2.4) or PyYAML's own parser's (omegaconf 2.3)
    with pytest.raises(ConfigError, match=rf"^{broken}, line 2, column 1: not valid YAML \((did not find )?expected "
                                          r"',' or '}'[^)]*\); a value holding"):
        load_config(broken)
    with pytest.raises(ConfigError, match="a config is a mapping of sections .* not a list"):
        load_config(listed)
    run_dir = tmp_path / "run"
    assert pretrain_main(["train", "--config", str(broken), "--run-dir", str(run_dir)]) == 2
    assert f"{broken}, line 2, column 1: not valid YAML" in capsys.readouterr().err and not run_dir.exists()
    assert finetune_main(["check", "--config", str(listed)]) == 2
    assert "not a list" in capsys.readouterr().err


def test_a_home_folder_path_is_expanded_in_files_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "seg.yaml"
    config.write_text(f"_base_: {CONFIG_DIR / 'finetune' / 'seg_tiny.yaml'}\ndata: {{root: ~/MSRS, train_split: ~}}\n")
    cfg = load_config(config, ["init.checkpoint=~/weights/backbone.pth", "data.classes=[~a, b~, '~/c']"], SegConfig)
    assert cfg.data.root == str(tmp_path / "MSRS") and cfg.data.train_split is None  # YAML's ~ is null
    assert cfg.init.checkpoint == str(tmp_path / "weights" / "backbone.pth")
    assert list(cfg.data.classes) == ["~a", "b~", str(tmp_path / "c")]  # only a leading ~/ is the home folder
    pre = load_config(TINY, ["data.shards=[{path: ~/shards}, {path: /abs}]"], PretrainConfig)
    assert [s.path for s in pre.data.shards] == [str(tmp_path / "shards"), "/abs"]


def test_a_missing_init_checkpoint_is_refused_before_the_run_dir(tmp_path, capsys):
    from pretrain.cli import main as pretrain_main

    run_dir = tmp_path / "run"
    assert pretrain_main(["train", "--config", str(TINY), "--run-dir", str(run_dir),
                          f"init.checkpoint={tmp_path / 'mae_pretrain_vit_base.pth'}"]) == 2
    assert f"init.checkpoint {tmp_path / 'mae_pretrain_vit_base.pth'}: no such file" in capsys.readouterr().err
    assert not run_dir.exists()


def test_config_changes_name_each_setting_that_differs_from_a_saved_run(tmp_path):
    from data_tools.config import config_changes, save_resolved

    saved = OmegaConf.create({"optim": {"lr": 0.001, "betas": [0.9, 0.95]}, "data": {"root": "/a"}, "old": {}})
    save_resolved(saved, tmp_path)
    now = OmegaConf.create({"optim": {"lr": 0.002, "betas": [0.9, 0.95]}, "data": {"root": "/a", "new": None}})
    assert config_changes(tmp_path / "config.yaml", now) == [
        "data.new: absent -> null", "old: {} -> absent", "optim.lr: 0.001 -> 0.002"]
    assert config_changes(tmp_path / "config.yaml", now, most=1) == ["data.new: absent -> null", "2 more"]
    assert config_changes(tmp_path / "missing.yaml", now) == []


def test_a_run_begun_by_an_earlier_version_keeps_its_sections_settings_as_they_were(tmp_path):
    from data_tools.config import as_the_run_began, save_resolved

    save_resolved(OmegaConf.create({"model": {"head": {"channels": 64}, "depth": 2}, "data": {"root": "a"}}), tmp_path)
    now = OmegaConf.create({"model": {"head": {"channels": 64, "beta": None, "new": {"a": 1, "b": 2}}, "depth": 2,
                                      "window": 14}, "data": {"root": "a", "workers": 3}})
    cfg, left_out = as_the_run_began(now, tmp_path / "config.yaml", "model")
    assert left_out == ["model.head.beta", "model.head.new.a", "model.head.new.b", "model.window"]
    assert OmegaConf.to_container(cfg) == {"model": {"head": {"channels": 64}, "depth": 2},
                                           "data": {"root": "a", "workers": 3}}  # other sections as given
    same = OmegaConf.create({"model": {"head": {"channels": 64}, "depth": 2}})
    assert as_the_run_began(same, tmp_path / "config.yaml", "model") == (same, [])
    assert as_the_run_began(now, tmp_path / "missing.yaml", "model") == (now, [])


def test_a_config_is_an_earlier_versions_only_when_it_lacks_settings_and_changes_none(tmp_path):
    from data_tools.config import config_hash, earlier_version_of, save_resolved

    saved = OmegaConf.create({"optim": {"lr": 0.001}, "shards": [{"path": "a"}, {"path": "b"}]})
    save_resolved(saved, tmp_path)
    path, saved_hash = tmp_path / "config.yaml", config_hash(saved)

    def now(**changes):
        cfg = {"optim": {"lr": 0.001, "new": None}, "shards": [{"path": "a", "weight": 1.0}, {"path": "b"}]}
        cfg.update(changes)
        return OmegaConf.create(cfg)

    assert earlier_version_of(path, saved_hash, now())  # only settings it lacked
    assert not earlier_version_of(path, saved_hash, now(optim={"lr": 0.002, "new": None}))  # one of its own changed
    assert not earlier_version_of(path, saved_hash, now(shards=[{"path": "a"}]))  # a shard set fewer
    assert not earlier_version_of(path, saved_hash, OmegaConf.create({"shards": [{"path": "a"}, {"path": "b"}]}))
    assert not earlier_version_of(path, "another hash", now())
    assert not earlier_version_of(tmp_path / "x", saved_hash, now())


def test_a_printed_override_reads_back_as_written_through_a_shell(tmp_path):
    """``override_arg``: the key=value words run.sh and hints print; a shell splits them back into one
    word whose value the override parser reads as written (quotes doubled inside YAML's own)."""
    import shlex

    from data_tools.config import override_arg

    seg = CONFIG_DIR / "finetune" / "seg_tiny.yaml"
    for value in ["/data/MSRS", "/data/run #2", "/data/a b", "/data/a, b", "/data/[x]", "/data/it's", "/data/$HOME"]:
        word = override_arg("data.root", value)
        (arg,) = shlex.split(word)
        assert load_config(seg, [arg]).data.root == value, word
    assert override_arg("data.root", "/data/MSRS") == "data.root=/data/MSRS"  # nothing to quote, none added


def test_override_and_option_forms_are_checked(tmp_path):
    import argparse

    from data_tools.config import config_hash, float_in, int_in

    seg = CONFIG_DIR / "finetune" / "seg_tiny.yaml"
    with pytest.raises(ValueError, match="override 'train.steps' is not of the form key=value"):
        load_config(seg, ["train.steps"])
    with pytest.raises(ConfigError, match=r"has no key 'train.stpes' \(did you mean 'train.steps'\?\)$"):
        load_config(seg, ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"has no key 'model.head.channel' \(did you mean 'model.head.channels'\?\)$"):
        load_config(seg, ["model.head.channel=3"])
    with pytest.raises(ConfigError, match=r"the config .*seg_tiny.yaml has no key 'nothing.like.it'$"):
        load_config(seg, ["nothing.like.it=3"])
    at_least_one, fraction = int_in(1), float_in(0.0, 1.0)
    assert at_least_one("1") == 1 and fraction("0") == 0.0 and fraction("1") == 1.0  # the ends are in
    for parse, text in ((at_least_one, "0"), (fraction, "1.5"), (fraction, "-0.1")):
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(text)
    # The hash of a config does not depend on the order its keys were written in.
    assert config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == config_hash({"b": {"d": 3, "c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_a_quoted_tilde_alone_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    seg = CONFIG_DIR / "finetune" / "seg_tiny.yaml"
    assert load_config(seg, ["data.root='~'"]).data.root == str(tmp_path)  # unquoted, YAML's ~ is null


def test_a_saved_config_is_resolved_and_an_unreadable_or_older_one_changes_nothing(tmp_path):
    """The config saved into a run holds values, not interpolations; a saved config that YAML cannot
    read, or that lacks a section, names no change and leaves that section as given; a list that grew
    is not the list it was (an earlier version's run had fewer shard sets, not fewer settings)."""
    from data_tools.config import (as_the_run_began, config_changes, config_hash, earlier_version_of,
                                   save_resolved)

    save_resolved(OmegaConf.create({"train": {"steps": 8, "warmup": "${train.steps}"}}), tmp_path)
    assert (tmp_path / "config.yaml").read_text() == "train:\n  steps: 8\n  warmup: 8\n"
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {steps: 3\n")
    now = OmegaConf.create({"model": {"depth": 2}, "train": {"steps": 3}})
    assert config_changes(broken, now) == [] and as_the_run_began(now, broken, "model") == (now, [])
    save_resolved(OmegaConf.create({"train": {"steps": 3}}), tmp_path, "no_model.yaml")
    assert as_the_run_began(now, tmp_path / "no_model.yaml", "model") == (now, [])
    saved = OmegaConf.create({"shards": [{"path": "a"}, {"path": "b"}]})
    save_resolved(saved, tmp_path, "two.yaml")
    grown = OmegaConf.create({"shards": [{"path": "a"}, {"path": "b"}, {"path": "c"}]})
    assert not earlier_version_of(tmp_path / "two.yaml", config_hash(saved), grown)
