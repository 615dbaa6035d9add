"""The shard builder on the real infrared samples in ../shared/data."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.build import build_shards
from data_tools.cli import DEFAULT_BUILD_CONFIG, main as cli_main
from data_tools.config import load_config
from data_tools.imageio import read_frame
from data_tools.shards import decode_sample, iter_shard
from data_tools.sources import Source, discover
from data_tools.verify import verify_shards
from tests.conftest import ROOT, shared_path


def _all_samples(out: Path, manifest: dict):
    for entry in manifest["shards"]:
        yield from iter_shard(str(out / entry["shard"]))


def test_counts_match_the_data(real_build):
    out, m = real_build
    s = m["sources"]
    # Each folder's image count, as listed on disk, must be what was found and written.
    assert s["sirst"]["found"] == len(list(shared_path("sirst", "images").glob("*.png"))) == 427
    assert s["roadscene"]["found"] == len(list(shared_path("roadscene", "cropinfrared").glob("*.jpg"))) == 221
    assert s["msrs"]["found"] == 20
    for ps in s.values():
        assert ps["found"] == ps["written"] + ps["skipped"]
    assert m["totals"]["written"] == 668 and m["totals"]["skipped"] == 0
    assert [e["samples"] for e in m["shards"]] == [200, 200, 200, 68]
    assert verify_shards(out) == []


def test_misc_111_mask_mismatch_is_reported_not_fatal(real_build):
    _, m = real_build
    mism = [i for i in m["annotation_issues"] if i["reason"] == "mask_size_mismatch"]
    assert len(mism) == 1 and "Misc_111" in mism[0]["name"] and "592x400" in mism[0]["detail"]
    assert m["sources"]["sirst"]["annotation_issues"] >= 1


def test_lossless_round_trip_and_metadata(real_build):
    out, m = real_build
    roots = {s["name"]: s["root"] for s in m["config"]["sources"]}
    n = 0
    for key, members in _all_samples(out, m):
        image, proposals, meta = decode_sample(members)
        original = read_frame(os.path.join(roots[meta["source"]], meta["path"])).image
        np.testing.assert_array_equal(image, original)
        assert image.dtype == np.uint8 and meta["dtype"] == "uint8"
        assert (meta["width"], meta["height"]) == (image.shape[1], image.shape[0])
        assert proposals.dtype == np.int32 and proposals.shape[1] == 4
        if len(proposals):
            assert proposals[:, 0].min() >= 0 and (proposals[:, 0] + proposals[:, 2]).max() <= image.shape[1]
        n += 1
    assert n == 668


def test_annotation_boxes_are_proposals(real_build):
    """SIRST's VOC boxes (and mask components) enter the proposals of their frame."""
    out, m = real_build
    for key, members in _all_samples(out, m):
        image, proposals, meta = decode_sample(members)
        if meta["path"] == "Misc_1.png":
            # Misc_1.xml: xmin 71, ymin 75, xmax 221, ymax 134 -> x, y, w, h = 71, 75, 150, 59
            assert [71, 75, 150, 59] in proposals.tolist()
            assert meta["proposals_from_annotations"] >= 1
            return
    pytest.fail("Misc_1 not found in the shards")


def test_proposal_filters_hold(real_build):
    out, m = real_build
    for key, members in _all_samples(out, m):
        _, proposals, meta = decode_sample(members)
        if meta["source"] == "roadscene":  # no annotations: every proposal is a filtered one
            w, h = proposals[:, 2], proposals[:, 3]
            assert (w >= 40).all() and (h >= 40).all()
            assert (np.maximum(w / h, h / w) <= 3).all()
            assert len(np.unique(proposals, axis=0)) == len(proposals)


def test_standard_webdataset_reader_opens_the_shards(real_build):
    out, m = real_build
    urls = [str(out / e["shard"]) for e in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None).decode()
    keys = []
    for sample in ds:
        assert sample["json"]["source"] in {"sirst", "roadscene", "msrs"}
        assert sample["proposals.npy"].shape[1] == 4
        keys.append(sample["__key__"])
    assert len(keys) == 668 == len(set(keys))


def test_verify_detects_a_corrupted_shard(real_build, tmp_path):
    out, m = real_build
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    assert cli_main(["verify", str(copy)]) == 0
    shard = copy / m["shards"][1]["shard"]
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_shards(copy)
    assert any("sha256" in p and m["shards"][1]["shard"] in p for p in problems)
    assert cli_main(["verify", str(copy)]) == 1


def _subset_source() -> Source:
    root = shared_path("roadscene", "cropinfrared")
    return Source("roadscene", str(root), stride=4)  # 56 frames


def test_build_is_deterministic_across_worker_counts(tmp_path):
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=10"])
    a = build_shards([_subset_source()], cfg, tmp_path / "a", workers=1, progress=False)
    build_shards([_subset_source()], cfg, tmp_path / "b", workers=2, progress=False)
    assert len(a["shards"]) == 6
    for entry in a["shards"]:
        assert (tmp_path / "a" / entry["shard"]).read_bytes() == (tmp_path / "b" / entry["shard"]).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    # A rerun of a complete build changes nothing.
    again = build_shards([_subset_source()], cfg, tmp_path / "a", workers=1, progress=False)
    assert again == a


def test_resume_after_early_stop_gives_identical_output(tmp_path):
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=10"])
    full = build_shards([_subset_source()], cfg, tmp_path / "full", workers=2, progress=False)
    partial = build_shards([_subset_source()], cfg, tmp_path / "res", workers=2, progress=False, stop_after_shards=2)
    assert partial["status"] == "stopped"
    assert json.loads((tmp_path / "res" / "manifest.json").read_text())["status"] == "building"
    assert verify_shards(tmp_path / "res") == [  # an unfinished build does not verify
        f"{tmp_path / 'res'}: the shard build is not complete (status 'building'); rerun it to finish"]
    # A half-written shard left behind by a kill is discarded, not trusted.
    (tmp_path / "res" / "shard-000002.tar.tmp").write_bytes(b"partial")
    resumed = build_shards([_subset_source()], cfg, tmp_path / "res", workers=1, progress=False)
    assert resumed == full
    for entry in full["shards"]:
        assert (tmp_path / "res" / entry["shard"]).read_bytes() == (tmp_path / "full" / entry["shard"]).read_bytes()
    assert not list((tmp_path / "res").glob("*.tmp"))


def test_resume_after_sigkill_of_the_cli(tmp_path):
    """Kill a real build process mid-way, rerun the same command: identical shards to a clean build."""
    root = shared_path("roadscene", "cropinfrared")
    (tmp_path / "s.yaml").write_text(f"sources:\n  - {{name: roadscene, root: {root}, stride: 3}}\n")
    args = ["build", "--sources", str(tmp_path / "s.yaml"), "--quiet", "shards.max_samples=6"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "data_tools", *args, "--workers", "1",
                             "--out", str(tmp_path / "killed")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed" / ".progress"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(progress.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["status"] == "building", "the build finished before it could be killed"
    assert cli_main([*args, "--out", str(tmp_path / "killed")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "clean")]) == 0
    killed = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    clean = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    assert killed["shards"] == clean["shards"] and killed["totals"]["written"] == 74
    assert verify_shards(tmp_path / "killed") == []


STOPPED_BUILD = ["--workers", "2", "shards.max_samples=10"]


@pytest.fixture(scope="module")
def roadscene_sources(tmp_path_factory):
    """RoadScene's infrared frames, every 4th (56), and their uninterrupted build."""
    tmp = tmp_path_factory.mktemp("stopped")
    root = shared_path("roadscene", "cropinfrared")
    (tmp / "s.yaml").write_text(f"sources:\n  - {{name: roadscene, root: {root}, stride: 4}}\n")
    assert cli_main(["build", "--sources", str(tmp / "s.yaml"), "--quiet", *STOPPED_BUILD, "--out",
                     str(tmp / "clean")]) == 0
    return tmp / "s.yaml", json.loads((tmp / "clean" / "manifest.json").read_text())


@pytest.mark.parametrize("stop", ["worker_killed", "ctrl_c", "sigterm"])
def test_a_build_stopped_midway_says_so_and_the_rerun_resumes(roadscene_sources, tmp_path, stop):
    """A worker killed while reading a frame (the kernel's OOM killer) left multiprocessing.Pool
    waiting for that frame forever; Ctrl-C in a terminal (SIGINT to the whole process group) ended
    in a traceback; a scheduler's SIGTERM to the group ended the build and its workers at once,
    unsaid. All three now end the build with one line (exit 2, 130 and 143), no half-written shard,
    and the rerun finishes it with the shards of an uninterrupted build."""
    from data_tools.build import STOP_FAULT_ENV, WORKER_KILL_FAULT_ENV

    sources, clean = roadscene_sources
    args = ["build", "--sources", str(sources), "--quiet", *STOPPED_BUILD, "--out", str(tmp_path / "stopped")]
    # Ctrl-C once the last frame is in: the workers then wait for work, where one not told to leave
    # SIGINT to the build dies with a traceback of its own.
    fault = {"worker_killed": (WORKER_KILL_FAULT_ENV, "25"), "ctrl_c": (STOP_FAULT_ENV, "55"),
             "sigterm": (STOP_FAULT_ENV, "55:SIGTERM")}[stop]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **dict([fault]))
    res = subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    if stop == "worker_killed":
        assert res.returncode == 2, res.stderr[-2000:]
        assert "error: a worker process died after frame " in res.stderr and " of 56 (killed: out of memory?)" in res.stderr
    else:
        status, said = {"ctrl_c": (130, "interrupted"), "sigterm": (143, "stopped by SIGTERM")}[stop]
        assert res.returncode == status, res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1] == (f"{said}: 5 finished shard record(s) in {tmp_path / 'stopped'}"
                                                      " are kept: rerun the same command to resume")
    assert "Traceback" not in res.stderr, res.stderr[-2000:]  # the workers' included
    assert json.loads((tmp_path / "stopped" / "manifest.json").read_text())["status"] == "building"
    assert not list((tmp_path / "stopped").glob("*.tmp"))  # the shard being written was let go
    assert cli_main(args) == 0
    resumed = json.loads((tmp_path / "stopped" / "manifest.json").read_text())
    assert resumed["shards"] == clean["shards"] and resumed["totals"]["written"] == 56


def test_discovery_of_real_folders_is_sorted_naturally():
    root = shared_path("sirst", "images")
    items = discover(Source("sirst", str(root), stride=100)).items
    # Misc_1, Misc_2, ... Misc_427 in natural order, every 100th: 1, 101, 201, 301, 401.
    assert [it.rel for it in items] == ["Misc_1.png", "Misc_101.png", "Misc_201.png", "Misc_301.png", "Misc_401.png"]
    assert [it.frame for it in items] == [0, 100, 200, 300, 400]
