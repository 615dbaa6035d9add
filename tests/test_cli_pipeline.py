"""The data_tools CLI chain the run.sh shards stage uses: synth -> build -> verify -> preview."""
import json

import cv2

from data_tools.cli import main as cli_main


def test_synth_build_verify_preview(tmp_path, capsys):
    assert cli_main(["synth", "--out", str(tmp_path / "synth"), "--num", "12", "--width", "160", "--height", "128"]) == 0
    out = tmp_path / "shards"
    assert cli_main(["build", "--sources", str(tmp_path / "synth" / "sources.yaml"), "--out", str(out),
                     "--workers", "2", "--quiet", "shards.max_samples=5"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [e["samples"] for e in m["shards"]] == [5, 5, 2]
    # Synthetic YOLO boxes are annotation proposals of their frames.
    assert m["totals"]["proposals"] > 12
    assert (out / "config.yaml").is_file()
    assert cli_main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert cli_main(["summary", str(out)]) == 0
    assert capsys.readouterr().out == (f"shards     {out}: 3 shards, 12 samples (0 skipped of 12 found), "
                                       f"{m['totals']['proposals']} proposals\n")
    assert cli_main(["summary", str(tmp_path / "synth")]) == 2
    assert "no manifest.json (not a shard folder" in capsys.readouterr().err
    assert cli_main(["verify", str(tmp_path / "synth")]) == 1
    assert "no manifest.json (not a shard folder" in capsys.readouterr().out
    assert cli_main(["preview", str(out), "--out", str(tmp_path / "p.png"), "--samples", "4"]) == 0
    grid = cv2.imread(str(tmp_path / "p.png"))
    assert grid is not None and grid.shape[0] >= 2 * 192 and grid.shape[2] == 3
    for seed, name in ((0, "p0.png"), (1, "p1.png")):  # the seed picks the samples and their crops
        assert cli_main(["preview", str(out), "--out", str(tmp_path / name), "--samples", "4",
                         "--seed", str(seed)]) == 0
    assert (tmp_path / "p0.png").read_bytes() == (tmp_path / "p.png").read_bytes()  # 0 is the default
    assert (tmp_path / "p1.png").read_bytes() != (tmp_path / "p.png").read_bytes()
    assert cli_main(["reencode", str(out), "--out", str(tmp_path / "png9"), "--encoding", "png",
                     "--png-compression", "9"]) == 0
    assert json.loads((tmp_path / "png9" / "manifest.json").read_text())["config"]["shards"]["png_compression"] == 9
    # A second build of the same corpus is a no-op.
    assert cli_main(["build", "--sources", str(tmp_path / "synth" / "sources.yaml"), "--out", str(out),
                     "--quiet", "shards.max_samples=5"]) == 0
    assert "already complete" in capsys.readouterr().err


def test_build_needs_sources_and_takes_its_workers_from_the_command_or_the_cpus_it_may_use(tmp_path, monkeypatch,
                                                                                            capsys):
    import data_tools.build
    import data_tools.cli

    assert cli_main(["build", "--out", str(tmp_path / "o")]) == 2
    assert "error: no sources: pass --sources FILE.yaml and/or --source NAME=PATH" in capsys.readouterr().err
    given = []

    def recorded(sources, cfg, out, workers, **kwargs):  # the build's arguments, then a refusal (exit 2)
        given.append(workers)
        raise ValueError("recorded")

    monkeypatch.setattr(data_tools.build, "build_shards", recorded)
    monkeypatch.setattr(data_tools.cli, "usable_cpus", lambda: 7)
    assert cli_main(["build", "--source", f"a={tmp_path}", "--out", str(tmp_path / "o"), "--workers", "3"]) == 2
    assert cli_main(["build", "--source", f"a={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert given == [3, 7]


def test_parallel_build_after_opencv_threads_does_not_hang(tmp_path):
    """Regression: forked workers deadlocked when the parent had used OpenCV's thread pool."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = f"""
import cv2, numpy as np
from data_tools.proposals import ProposalConfig, compute_proposals
from data_tools.synth import SynthConfig, write_corpus
from data_tools.build import build_shards
from data_tools.cli import DEFAULT_BUILD_CONFIG
from data_tools.config import load_config
from data_tools.sources import load_sources
cv2.setNumThreads(4)
for _ in range(3):
    compute_proposals(np.random.default_rng(0).integers(0, 255, (256, 320), dtype=np.uint8), ProposalConfig())
write_corpus(r"{tmp_path / 's'}", SynthConfig(num_images=8, width=160, height=128))
m = build_shards(load_sources(r"{tmp_path / 's' / 'sources.yaml'}"), load_config(DEFAULT_BUILD_CONFIG),
                 r"{tmp_path / 'o'}", workers=2, progress=False)
assert m["totals"]["written"] == 8
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=180)
