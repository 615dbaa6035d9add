"""The synthetic thermal/visible scene generator."""
import cv2
import numpy as np

from data_tools.cli import main as cli_main
from data_tools.synth import SEG_CLASSES, SynthConfig, render_scene, write_corpus


def test_same_seed_same_scene_other_seed_other_scene():
    cfg = SynthConfig(width=160, height=128)
    a, b = render_scene(cfg, 3), render_scene(cfg, 3)
    np.testing.assert_array_equal(a["ir"], b["ir"])
    np.testing.assert_array_equal(a["vi"], b["vi"])
    c = render_scene(SynthConfig(width=160, height=128, seed=1), 3)
    assert not np.array_equal(a["ir"], c["ir"])


def test_scenes_are_varied_and_consistent():
    cfg = SynthConfig(width=160, height=128)
    scenes = [render_scene(cfg, i) for i in range(24)]
    n_boxes = [len(s["boxes"]) for s in scenes]
    assert len(set(n_boxes)) >= 3  # object counts vary
    assert {s["night"] for s in scenes} == {True, False}
    for s in scenes:
        assert s["ir"].shape == (128, 160) and s["vi"].shape == (128, 160, 3) and s["mask"].shape == (128, 160)
        assert set(np.unique(s["mask"])) <= set(range(len(SEG_CLASSES)))
        assert s["ir"].std() > 5  # not a flat frame
        for cls, x, y, w, h in s["boxes"]:
            region = s["mask"][int(y):int(y + h), int(x):int(x + w)]
            assert (region == (2 if cls == 0 else 3)).any()  # a box encloses pixels of its class
        # People are warmer than the sky in infrared (the defining thermal cue).
        people, sky = s["mask"] == 2, np.zeros_like(s["mask"], bool)
        sky[:5] = True
        assert s["ir"][people].mean() > s["ir"][sky & (s["mask"] == 0)].mean() + 40


def test_16_bit_output_and_cli(tmp_path):
    assert cli_main(["synth", "--out", str(tmp_path), "--num", "3", "--width", "96", "--height", "80",
                     "--bit-depth", "16"]) == 0
    names = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert len(names) == 3
    ir = cv2.imread(str(tmp_path / "ir" / names[0]), cv2.IMREAD_UNCHANGED)
    assert ir.dtype == np.uint16 and ir.max() > 255
    assert sorted(p.name for p in (tmp_path / "vi").iterdir()) == names
    assert (tmp_path / "sources.yaml").is_file() and (tmp_path / "classes.txt").read_text().startswith("0 person")


def test_write_corpus_is_deterministic(tmp_path):
    cfg = SynthConfig(num_images=4, width=96, height=80)
    write_corpus(tmp_path / "a", cfg)
    write_corpus(tmp_path / "b", cfg)
    for f in sorted((tmp_path / "a").rglob("*")):
        if f.is_file():
            assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_a_corpus_stopped_before_its_last_file_has_no_synth_json(tmp_path, monkeypatch):
    """synth.json is what marks the corpus complete (run.sh skips the stage by it): a stop while any
    other file is written leaves none, so the rerun writes the corpus again."""
    import pathlib

    write_text = pathlib.Path.write_text

    def stopped_at_sources(self, *args, **kwargs):
        if self.name == "sources.yaml":
            raise KeyboardInterrupt
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", stopped_at_sources)
    try:
        write_corpus(tmp_path, SynthConfig(num_images=2, width=96, height=80))
    except KeyboardInterrupt:
        pass
    assert (tmp_path / "classes.txt").is_file() and not (tmp_path / "synth.json").exists()
    monkeypatch.undo()
    write_corpus(tmp_path, SynthConfig(num_images=2, width=96, height=80))
    assert (tmp_path / "sources.yaml").is_file() and (tmp_path / "synth.json").is_file()
