"""run.sh end to end at the embedded default size: every stage on a fresh output folder and the
summary; a rerun that skips every finished stage; an interrupted stage that fails loudly and
resumes when rerun; launcher options that reach torchrun and the DeepSpeed launcher."""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from omegaconf import OmegaConf

from pretrain.engine import free_port
from pretrain.engine.loop import FAULT_ENV
from tests.conftest import ROOT, alive


def _start_run_sh(*args, env_extra=None) -> subprocess.Popen:
    """run.sh in a session of its own: a Ctrl-C sent to its process group reaches run.sh and
    every process it starts, as in a terminal, and nothing else."""
    venv = Path(sys.prefix)
    if not list(venv.glob(".irpt-installed-*")):
        pytest.skip(f"{venv} was not set up by run.sh (run the suite with ./run.sh test)")
    env = dict(os.environ, IRPT_VENV=str(venv), PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen(["bash", str(ROOT / "run.sh"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_sh(*args, env_extra=None):
    return _finish(_start_run_sh(*args, env_extra=env_extra))


def _ok(res):
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout + res.stderr


# Folder names a user may have: YAML would read ' #' as a comment and ', ' or brackets as structure
# in the key=value overrides run.sh passes, unless it quotes the paths it puts there.
AWKWARD = "run #2, [v2] it's"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / AWKWARD
    return out, _ok(_run_sh("--out", str(out)))


def test_a_config_its_stage_would_refuse_is_refused_before_the_first_stage(tmp_path):
    """The `--` overrides with the pre-training config, and the `--seg-set` / `--det-set` overrides with
    the embedded default's fine-tuning configs, are checked before the corpus and the shard build (hours
    on a large corpus), over the processes the launch will start."""
    out = tmp_path / "out"
    for args, error, which in (
            (["--", "train.epoch=3"], "has no key 'train.epoch' (did you mean 'train.epochs'?)", "pre-training"),
            (["--", "train.effective_batch=8"], "effective_batch 8 is not a multiple of batch_size 4 x 3 processes",
             "pre-training"),
            (["--seg-set", "train.stpes=3"], "has no key 'train.stpes' (did you mean 'train.steps'?)", "seg"),
            # a valid --seg-set passes (its frames are not there yet: the synth stage writes them)
            (["--seg-set", "train.steps=3", "--det-set", "model.method=mona"], "model: method 'mona' takes one image",
             "det")):
        res = _run_sh("--out", str(out), "--nproc", "3", *args)
        said = res.stdout + res.stderr
        assert res.returncode == 1 and error in said, said[-3000:]
        assert f"the {which} config above is not usable: fix what it names; nothing was run" in said
        assert said.count("config above is not usable") == 1 and not (out / "synth").exists()


def _launchers_and_trainers(proc: subprocess.Popen) -> list:
    """The pre-training launchers and processes below run.sh now (not their loader workers or
    multiprocessing's helpers, which end with them, a moment after; not a process that ends while
    it is looked at)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is not None:  # it ended before training got going: its own words say why
        res = _finish(proc)
        raise AssertionError(f"run.sh ended early ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    found = []
    for process in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            command = process.cmdline()
            if "pretrain" in " ".join(command) and command != process.parent().cmdline():
                found.append(process)
    return found


def _still_running_when_it_ends(proc: subprocess.Popen, tree: list):
    """A list that gets the command lines of the processes of ``tree`` still running at the moment
    run.sh ends (they would hold its output pipes open: reading them to the end would wait for
    them), and the thread that fills it."""
    outlived = []

    def watch():
        while alive(proc.pid):
            time.sleep(0.01)
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                if alive(process.pid):
                    outlived.append(" ".join(process.cmdline()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return outlived, watcher


def _finished(out: Path) -> dict:
    files = [out / "synth" / "synth.json", out / "shards" / "manifest.json", out / "shards" / "preview.png",
             out / "pretrain" / "DONE", out / "backbone.pth", out / "backbone.json", out / "seg" / "metrics.json",
             out / "det" / "metrics.json", out / "det" / "predictions.json"]
    return {f: f.stat().st_mtime_ns for f in files}


def test_default_pipeline_runs_every_stage(pipeline):
    out, log = pipeline
    _finished(out)  # every stage's output exists
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["totals"]["written"] == manifest["totals"]["found"] > 0
    seg = json.loads((out / "seg" / "metrics.json").read_text())
    det = json.loads((out / "det" / "metrics.json").read_text())
    held_out = (out / "synth" / "val.txt").read_text().split()
    assert len(held_out) == 24 and not set(held_out) & set((out / "synth" / "train.txt").read_text().split())
    for m in (seg, det):  # scored on the held-out frames only
        assert m["method"] == "ivtuning" and m["modality"] == "both" and m["frames"] == len(held_out)
        assert 0 < m["params"]["trainable_backbone_share"] < 1
    assert 0 <= seg["mIoU"] <= 1 and 0 <= det["AP50"] <= 1
    assert list((out / "seg" / "overlays").glob("*.png")) and list((out / "det" / "overlays").glob("*.png"))
    summary = log[log.index("==> summary"):]
    for row in ("shards", "preview", "pretrain", "backbone", "seg", "det"):
        assert re.search(rf"^  {row} ", summary, re.M), row
    for task in ("seg", "det"):  # what to run next, as a command the shell reads back
        line = next(x for x in summary.splitlines() if x.startswith("  predict ") and f"the {task} run" in x)
        words = shlex.split(line.split("predict", 1)[1].split("--ir")[0])
        assert words == [str(Path(sys.prefix) / "bin" / "python"), "-m", "finetune", "predict", str(out / task)]
    assert f"mIoU {100 * seg['mIoU']:.1f}" in summary and f"AP50 {100 * det['AP50']:.1f}" in summary
    # each printed command line reads back, in a shell, as the words that were run
    words = shlex.split(next(line for line in log.splitlines() if " -m pretrain train " in line))
    assert words[words.index("--run-dir") + 1] == str(out / "pretrain")
    assert OmegaConf.from_dotlist([w for w in words if w.startswith("data.shards=")]).data.shards[0].path == \
        str(out / "shards")


def test_rerun_skips_every_finished_stage(pipeline):
    out, _ = pipeline
    before = _finished(out)
    log = _ok(_run_sh("--out", str(out)))
    for said in ("synth: ", "shards: ", "pretrain: already done", "export: ", "seg: already done",
                 "det: already done"):
        assert said in log, said
    assert "already generated" in log and "already complete" in log and "is up to date" in log
    assert _finished(out) == before  # nothing rewritten
    assert "==> summary" in log


def _new_out_with(pipeline, tmp_path, *names) -> Path:
    """A new output folder holding these outputs (files or folders) of the finished pipeline: a
    stage run alone there finds its input."""
    out, _ = pipeline
    new = tmp_path / "out"
    new.mkdir()
    for name in names:
        (shutil.copytree if (out / name).is_dir() else shutil.copy)(out / name, new / name)
    return new


def test_an_export_stopped_before_its_json_is_redone(pipeline, tmp_path):
    """A stop between the export's two files leaves a new backbone.pth without its JSON (or beside
    an older one): the stage is not taken for done, the rerun writes the pair."""
    new = _new_out_with(pipeline, tmp_path, "pretrain", "backbone.pth", "backbone.json")  # the .pth newer than DONE
    json_path = new / "backbone.json"
    for older in (False, True):
        if older:  # an earlier export's JSON: older than the pre-training that ended since
            json_path.write_text(json.dumps(dict(json.loads(json_path.read_text()), num_parameters=1)))
            done = (new / "pretrain" / "DONE").stat().st_mtime
            os.utime(json_path, (done - 60, done - 60))
        else:
            json_path.unlink()
        log = _ok(_run_sh("--out", str(new), "export"))
        assert "export: encoder + PAD adapters ->" in log and "is up to date" not in log
        assert json.loads(json_path.read_text()) == json.loads((pipeline[0] / "backbone.json").read_text())


def _seg_stage_folder(pipeline, tmp_path) -> tuple[Path, Path]:
    """A new output folder holding the finished pipeline's backbone, and a small segmentation
    config (8 synthetic pairs, 8 steps, a checkpoint every 4) for the seg stage alone."""
    new = _new_out_with(pipeline, tmp_path, "backbone.pth", "backbone.json")
    synth = pipeline[0] / "synth"
    split = tmp_path / "few.txt"
    split.write_text("\n".join(sorted(p.stem for p in (synth / "ir").glob("*.png"))[:8]) + "\n")
    config = tmp_path / "seg.yaml"
    config.write_text(f"_base_: {ROOT / 'configs' / 'finetune' / 'seg_tiny.yaml'}\n"
                      f"data: {{root: {json.dumps(str(synth))}, train_split: {split}, val_split: {split}}}\n"
                      "train: {steps: 8, save_every_steps: 4}\n")
    return new, config


# Two processes under torchrun in the slow tier (~35 s): the default suite stays near 15 min; the default tier
# kills and resumes 2-process fine-tuning under torchrun in test_finetune_dist_eval and test_finetune_seg.
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["one-process", "torchrun-2"])
def test_interrupted_stage_fails_then_resumes(pipeline, tmp_path, nproc):
    out, config = _seg_stage_folder(pipeline, tmp_path)
    args = ["--out", str(out), "--seg-config", str(config), "seg", "--nproc", str(nproc)]
    res = _run_sh(*args, "--master", f"127.0.0.1:{free_port()}", env_extra={FAULT_ENV: "6"})  # killed after step 6
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ERROR: stage seg failed or was interrupted" in res.stderr
    assert "the same command then goes on from the last checkpoint" in res.stderr
    launched = "pretrain.engine.launchers torchrun --nnodes 1 --node_rank 0 --nproc_per_node 2"
    assert (launched in res.stdout) == (nproc == 2)
    assert not (out / "seg" / "DONE").exists()
    log = _ok(_run_sh(*args, "--master", f"127.0.0.1:{free_port()}"))
    assert "resumed from step00000004" in log
    metrics = json.loads((out / "seg" / "metrics.json").read_text())
    assert metrics["processes"] == nproc and metrics["steps"] == 8 and metrics["frames"] == 8


def test_hostfile_runs_the_deepspeed_launcher(pipeline, tmp_path):
    out, config = _seg_stage_folder(pipeline, tmp_path)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # One host: the launcher runs it locally (no ssh needed with --no_ssh_check and a master address).
    log = _ok(_run_sh("--out", str(out), "--seg-config", str(config), "seg", "--hostfile", str(hostfile),
                      "--nproc", "2", "--master", f"127.0.0.1:{free_port()}", "--launcher-args", "--no_ssh_check"))
    assert re.search(r"pretrain.engine.launchers deepspeed --hostfile \S+ --num_gpus 2 --master_addr 127.0.0.1 "
                     r"--master_port \d+ "
                     r"--no_ssh_check --module finetune seg", log)
    # The launcher sets no thread count: each of the 2 processes takes half of torch's default.
    threads = os.environ.get("OMP_NUM_THREADS") or max(1, torch.get_num_threads() // 2)
    assert f"2 process(es) (gloo), {threads} CPU threads each" in log
    metrics = json.loads((out / "seg" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["frames"] == 8


def test_bad_launcher_options_are_refused_before_any_work(tmp_path):
    for args, said in ((["--node-rank", "2", "--nnodes", "2"], "must be below"),
                       (["--hostfile", str(tmp_path / "missing")], "hostfile not found"),
                       (["--nproc", "two"], "not a number"),
                       (["seg", "--nnodes", "2", "--master", "127.0.0.1:1"], "backbone.pth is missing"),
                       (["--seg-preset", "mfnett"], "no preset 'mfnett'; choose one of: "),
                       (["--seg-preset", "mfnet"], "--seg-preset mfnet needs --seg-root DIR"),
                       (["--det-preset", "llvip", "--det-root", str(tmp_path / "nowhere")], "not a folder"),
                       (["--det-root", str(tmp_path)], "--det-root needs --det-preset NAME or --det-config FILE"),
                       (["--ranker", str(tmp_path / "none.json")], "--ranker")):
        res = _run_sh("--out", str(tmp_path / "out"), *args)
        assert res.returncode != 0 and said in res.stderr, (args, res.stderr)
    assert not (tmp_path / "out" / "synth").exists()


def test_a_python_older_than_3_10_or_one_that_does_not_run_is_refused_before_the_environment_is_made(tmp_path):
    """pip said only `ResolutionImpossible` (or that irpt needs another Python), after a venv. An
    interpreter that does not run (a pyenv shim of a version not selected) is said as such, with its
    own words, not as too old."""
    old = tmp_path / "python3.9"  # answers as a Python 3.9 would: its version, and False for >= 3.10
    old.write_text('#!/bin/sh\n[ "$1" = -c ] && { echo "3.9.18"; exit 1; }\nexit 2\n')
    shim = tmp_path / "python3.10"  # as pyenv's shim of a version installed but not selected
    shim.write_text('#!/bin/sh\necho "pyenv: python3.10: command not found" >&2\nexit 127\n')
    for fake in (old, shim):
        fake.chmod(0o755)
    env = dict(os.environ, IRPT_VENV=str(tmp_path / "venv"))

    def setup(python):
        return subprocess.run(["bash", str(ROOT / "run.sh"), "setup", "--python", str(python)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    res = setup(old)
    assert res.returncode == 1 and (f"ERROR: {old} is not Python >= 3.10 (Python 3.9.18): pass --python with one "
                                    "that is (python3.11, python3.12)") in res.stderr, res.stderr
    res = setup(shim)
    assert res.returncode == 1 and (f"ERROR: {shim} does not run (pyenv: python3.10: command not found): pass "
                                    "--python with a Python >= 3.10 that does (python3.11, or its full path)"
                                    ) in res.stderr, res.stderr
    res = setup(tmp_path / "missing")
    assert res.returncode == 1 and f"ERROR: {tmp_path / 'missing'} does not run (" in res.stderr, res.stderr
    assert not (tmp_path / "venv").exists()


def _hold(root: Path, name: str, version: str) -> None:
    """``root``'s environment holds ``name`` at ``version`` (its installed metadata, in place of any other)."""
    for old in (root / "site").glob(f"{name}-*.dist-info"):
        shutil.rmtree(old)
    info = root / "site" / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _cluster_env(root: Path, torch_version: str, torchvision_version: str) -> Path:
    """An environment run.sh did not make, holding torch and torchvision as a cluster's would (their
    metadata only); its pip writes down how it was called instead of installing."""
    _hold(root, "torch", torch_version)
    _hold(root, "torchvision", torchvision_version)
    site = root / "site"
    (root / "bin").mkdir()
    python = root / "bin" / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$@" >> "{root}/pip.log"; exit 0; fi\n'
                      f'PYTHONPATH="{site}" exec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    return root


def _setup_in(env_dir: Path, pins: str | None = None):
    env = dict(os.environ, IRPT_VENV=str(env_dir))
    env.pop("IRPT_PINS", None)
    if pins is not None:
        env["IRPT_PINS"] = pins
    return subprocess.run(["bash", str(ROOT / "run.sh"), "setup"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _supported(name: str) -> tuple[str, str]:
    """pyproject.toml's range of a dependency: (lowest supported, first unsupported)."""
    return re.search(rf'"{name}>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text()).groups()


def test_set_up_refuses_to_replace_the_torch_of_an_environment_it_did_not_make(tmp_path):
    """IRPT_VENV pointed at a cluster's environment: pip with the tested pins would replace its CUDA
    build of torch; the set-up stops before pip and says how to keep it."""
    # the pins for the environment's Python (this one's, which the stand-in runs), as run.sh chooses them
    pins = ROOT / ("constraints.txt" if sys.version_info >= (3, 11) else "constraints-py310.txt")
    pinned = re.search(r"^torch==(\S+)", pins.read_text(), re.M).group(1)
    major, minor, patch = pinned.split(".")[:3]
    theirs = f"{major}.{minor}.{int(patch) + 1}+cu124"  # a patch release apart is enough
    env_dir = _cluster_env(tmp_path / "cluster", theirs, "0.26.0+cu124")
    res = _setup_in(env_dir)
    assert res.returncode == 1, res.stdout + res.stderr
    assert (f"ERROR: {env_dir} (IRPT_VENV) was not made by run.sh and holds torch {theirs}, which the set-up "
            f"would replace with the tested torch=={pinned} ({pins})") in res.stderr, res.stderr
    assert "IRPT_PINS=none keeps the versions it holds" in res.stderr
    assert not (env_dir / "pip.log").exists() and not list(env_dir.glob(".irpt-*"))


def test_set_up_without_pins_keeps_a_supported_torch_and_refuses_an_unsupported_one(tmp_path):
    low, high = _supported("torch")
    tv_low, _ = _supported("torchvision")
    old = _cluster_env(tmp_path / "old", "2.4.1+cu121", "0.19.1+cu121")
    res = _setup_in(old, pins="none")
    assert res.returncode == 1 and (f"holds torch 2.4.1+cu121, outside the supported range >={low},<{high} "
                                    "(pyproject.toml): pip would replace it") in res.stderr, res.stderr
    assert not (old / "pip.log").exists()

    ok = _cluster_env(tmp_path / "ok", f"{low}.1+cu124", f"{tv_low}.1+cu124")
    res = _setup_in(ok, pins="none")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "installing into" in res.stdout and "without the tested pins (IRPT_PINS=none)" in res.stdout
    calls = (ok / "pip.log").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("-m pip install -q -e ") and " -c " not in calls[0], calls
    assert (ok / ".irpt-foreign").read_text() == "none\n" and len(list(ok.glob(".irpt-installed-*"))) == 1
    # Remembered: the next commands need not say IRPT_PINS=none again, and find it set up.
    assert _setup_in(ok).returncode == 0 and len((ok / "pip.log").read_text().splitlines()) == 1
    # Set up once, it is still not run.sh's own: when pyproject.toml changes (the stamp with it), its torch
    # is checked again, here one replaced by an unsupported version since.
    for stamp in ok.glob(".irpt-installed-*"):
        stamp.unlink()
    _hold(ok, "torch", "2.4.1")
    res = _setup_in(ok)
    assert res.returncode == 1 and "holds torch 2.4.1, outside the supported range" in res.stderr, res.stderr
    assert len((ok / "pip.log").read_text().splitlines()) == 1

    res = _setup_in(ok, pins="constraints.txt")
    assert res.returncode == 1 and "IRPT_PINS=constraints.txt: leave it unset" in res.stderr, res.stderr


def test_fine_tuning_overrides_reach_the_check_and_the_stage(tmp_path):
    """`--det-set KEY=VALUE` overrides the detection config, first in the check that runs before
    any stage (a preset's split folder named otherwise), then in the stage itself."""
    from tests.test_presets import build_replica

    root = tmp_path / "flir"
    build_replica("flir_v2", root)
    (root / "images_thermal_val").rename(root / "images_thermal_test")
    args = ["--out", str(tmp_path / "out"), "--det-preset", "flir_v2", "--det-root", str(root), "det"]
    res = _run_sh(*args)
    assert res.returncode != 0 and "set data.split_dirs.val to one of them (now 'val';" in res.stdout + res.stderr
    # with both overrides the check passes; the stage then stops at once (two nodes need an export first)
    res = _run_sh(*args, "--det-set", "data.split_dirs.val=test", "--det-set", "data.classes=[person,car]",
                  "--nnodes", "2", "--master", "127.0.0.1:1")
    said = res.stdout + res.stderr
    assert "config fits its schema" in said and "2 classes: person, car" in said
    assert res.returncode != 0 and "backbone.pth is missing" in res.stderr and not (tmp_path / "out" / "det").exists()
    res = _run_sh(*args[:-1], "--det-set", "split_dirs", "det")
    assert res.returncode != 0 and "--det-set split_dirs: expected key=value" in res.stderr


def test_a_stop_to_run_sh_alone_between_stages_ends_it_before_the_next(tmp_path):
    """A SIGINT to run.sh alone (Ctrl-C under docker run without -t) while it checked the fine-tuning
    config up front was lost: the stages went on (here the first, which stops at once: two nodes
    need an export first). Now run.sh ends as the check returns, before any stage starts."""
    from tests.test_presets import build_replica

    root = tmp_path / "flir"
    build_replica("flir_v2", root)
    proc = _start_run_sh("--out", str(tmp_path / "out"), "--det-preset", "flir_v2", "--det-root", str(root), "det",
                         "--nnodes", "2", "--master", "127.0.0.1:1")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(
            "finetune check" in _command_of(p) for p in psutil.Process(proc.pid).children()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    res = _finish(proc)
    assert res.returncode == 130, res.stdout[-3000:] + res.stderr[-3000:]
    assert "STOPPED: on a signal, before the next stage" in res.stderr and "backbone.pth is missing" not in res.stderr


def test_data_may_be_one_folder_of_frames(tmp_path):
    """`--data FOLDER` (frames in subfolders too) builds a source named after the folder, as
    `data_tools build --source NAME=FOLDER`; a path that is not there is refused before set-up, and
    a file that is not a sources YAML is named as such."""
    from tests.conftest import shared_path

    frames = tmp_path / "_thermal cam #2"
    (frames / "day1").mkdir(parents=True)
    for png in sorted(shared_path("msrs20", "ir").glob("*.png"))[:6]:
        (frames / "day1" / png.name).write_bytes(png.read_bytes())
    said = _ok(_run_sh("--data", str(frames), "--out", str(tmp_path / "out"), "shards"))
    manifest = json.loads((tmp_path / "out" / "shards" / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 6 and "frames_thermal_cam__2: found 6" in said
    res = _run_sh("--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out2"), "shards")
    assert res.returncode != 0 and "--data " + str(tmp_path / "absent") + ": no such file or folder" in res.stderr
    res = _run_sh("--data", str(frames / "day1" / png.name), "--out", str(tmp_path / "out2"), "shards")
    assert res.returncode != 0 and "not a sources YAML (not text" in res.stderr


def test_the_check_counts_the_processes_a_launch_starts(tmp_path):
    """Segmentation at one frame per process trains only where SyncBatchNorm pools the GPUs'
    frames: the check before any stage is told how many processes the stages will launch (--nproc
    x --nnodes, or the hostfile's slots) and refuses it on CPU processes before pre-training."""
    import torch

    from tests.test_presets import build_replica

    if torch.cuda.is_available():
        pytest.skip("on GPUs one frame per process trains (SyncBatchNorm)")
    build_replica("msrs_seg", tmp_path / "MSRS")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=4\n\nnode-b slots=1\n")
    base = ["--out", str(tmp_path / "out"), "--seg-preset", "msrs_seg", "--seg-root", str(tmp_path / "MSRS"),
            "--seg-set", "train.batch_size=1"]
    for launch, said in ((["--nproc", "2"], "with 2 CPU processes"), (["--hostfile", str(hostfile)], "with 5 CPU"),
                         (["--hostfile", str(hostfile), "--nproc", "3"], "with 6 CPU")):
        res = _run_sh(*base, *launch)
        assert res.returncode != 0 and f"train.batch_size=1 {said}" in res.stdout + res.stderr, (launch, res.stderr)
        assert not (tmp_path / "out" / "shards").exists()


def test_own_data_pretrains_then_fine_tunes_what_it_is_given_and_says_how_to_run_the_rest(tmp_path):
    """`./run.sh --data SOURCES.yaml` used to pre-train on the user's frames and then fail at the
    segmentation stage (`data.root .../synth is not a folder`, advice: rerun). Now: the MSRS preset
    with `--seg-root`, made CPU-sized by `--seg-set` overrides, runs on that dataset; detection, not
    given, is skipped with the way to run it; a missing dataset folder is refused (here through a
    config file of the user's on the preset) before any stage runs."""
    from tests.conftest import shared_path
    from tests.test_presets import build_replica

    tmp_path = tmp_path / AWKWARD  # the dataset and the outputs under it
    build_replica("msrs_seg", tmp_path / "MSRS")
    config = tmp_path / "msrs_small.yaml"
    config.write_text(f"_base_: {ROOT / 'configs' / 'finetune' / 'presets' / 'msrs_seg.yaml'}\n"
                      "model: {encoder: {img_size: [64, 80]}, head: {channels: 32, aux_channels: 16}}\n"
                      "data: {num_workers: 0}\n"
                      "train: {steps: 2, batch_size: 2, effective_batch: null, precision: fp32, save_every_steps: 2}\n"
                      "eval: {overlays: 0}\n")
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - name: msrs\n    root: {shared_path('msrs20', 'ir')}\n")
    out = tmp_path / "out"
    res = _run_sh("--data", str(sources), "--out", str(out), "--seg-config", str(config), "--seg-root",
                  str(tmp_path / "nowhere_yet"))
    assert res.returncode != 0 and "--seg-root" in res.stderr and not out.joinpath("shards").exists()
    shutil.rmtree(tmp_path / "MSRS" / "test" / "vi")
    res = _run_sh("--data", str(sources), "--out", str(out), "--seg-config", str(config), "--seg-root",
                  str(tmp_path / "MSRS"))
    assert res.returncode != 0 and "(val): not found" in res.stdout + res.stderr and "nothing was run" in res.stderr
    assert not (out / "shards").exists()
    build_replica("msrs_seg", tmp_path / "MSRS")
    small = ["model.encoder.img_size=[64,80]", "model.head.channels=32", "model.head.aux_channels=16",
             "data.num_workers=0", "train.steps=2", "train.batch_size=2", "train.effective_batch=null",
             "train.precision=fp32", "train.save_every_steps=2", "eval.overlays=0", "data.img_scale=null"]
    # the preset itself, made CPU-sized by --seg-set (as the config file above does)
    log = _ok(_run_sh("--data", str(sources), "--out", str(out), "--seg-preset", "msrs_seg", "--seg-root",
                      str(tmp_path / "MSRS"), *[w for k in small for w in ("--seg-set", k)],
                      "--det-set", "train.steps=3", "--", "train.epochs=1"))
    seg = json.loads((out / "seg" / "metrics.json").read_text())
    assert seg["frames"] == 3 and seg["steps"] == 2  # the replica's test split
    assert (out / "backbone.pth").is_file() and not (out / "synth").exists()
    assert "det: skipped: --data gives pre-training frames only" in log and "--det-config" in log
    assert "--det-preset NAME --det-root DIR" in log and not (out / "det").exists()
    assert "with data.root set) (the --det-set overrides given, train.steps=3, apply to that config)" in log
    assert re.search(r"^  backbone ", log[log.index("==> summary"):], re.M)


def test_shards_stage_ranks_proposals_with_a_fitted_ranker(tmp_path, msrs_ranker):
    """`./run.sh shards --data SOURCES --ranker FILE` builds with thermal_blobs_fitted."""
    from data_tools.shards import decode_sample, iter_shard
    from tests.conftest import shared_path

    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - name: msrs\n    root: {shared_path('msrs20', 'ir')}\n    stride: 10\n")
    out = tmp_path / "out"
    _ok(_run_sh("shards", "--data", str(sources), "--out", str(out), "--workers", "1", "--ranker", str(msrs_ranker)))
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["config"]["proposals"]["method"] == "thermal_blobs_fitted"
    assert manifest["config"]["proposals_ranker_sha256"]
    metas = [decode_sample(m)[2] for e in manifest["shards"] for _, m in iter_shard(str(out / "shards" / e["shard"]))]
    assert len(metas) == 2 and {m["proposals_method"] for m in metas} == {"thermal_blobs_fitted"}


@pytest.mark.parametrize("option", ["--out", "--config", "--seg-config", "--det-config"])
def test_a_path_of_the_wrong_kind_is_refused_before_any_stage(tmp_path, option):
    """`--out FILE` failed with mkdir's message; a missing --config after the shards were built."""
    afile, absent = tmp_path / "afile", tmp_path / "absent.yaml"
    afile.write_text("a file\n")
    res = _run_sh(option, str(afile if option == "--out" else absent), "shards")
    said = (f"--out {afile} is a file: give a folder" if option == "--out"
            else f"{option} {absent}: no such file (a YAML config)")
    assert res.returncode != 0 and said in res.stderr


@pytest.mark.parametrize("stop, nproc, launcher, to", [
    (signal.SIGINT, 1, None, "group"), (signal.SIGINT, 2, "torchrun", "group"),
    (signal.SIGTERM, 2, "torchrun", "group"), (signal.SIGINT, 2, "deepspeed", "group"),
    (signal.SIGTERM, 2, "deepspeed", "launcher"), (signal.SIGUSR1, 2, "torchrun", "group"),
    (signal.SIGTERM, 1, None, "run.sh"), (signal.SIGINT, 1, None, "run.sh"),
    # the slow tier: about 40 s of two processes each, beside the group signals through the same torchrun path
    pytest.param(signal.SIGTERM, 2, "torchrun", "run.sh", marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, 2, "torchrun", "run.sh", marks=pytest.mark.slow)],
    ids=["ctrl_c-1", "ctrl_c-2", "sigterm-2", "ctrl_c-deepspeed", "sigterm-deepspeed-alone", "sigusr1-2",
         "sigterm-run.sh-alone", "ctrl_c-run.sh-alone", "sigterm-run.sh-alone-2", "ctrl_c-run.sh-alone-2"])
def test_ctrl_c_in_a_training_stage_saves_and_run_sh_says_to_rerun(pipeline, tmp_path, stop, nproc, launcher, to):
    """Ctrl-C in the terminal reaches run.sh and the trainer: the trainer saves and exits 75, and
    run.sh ends with that status (a requeueing wrapper's signal to rerun), saying so. Under
    torchrun (which gets the Ctrl-C and passes it on), the processes save too; torchrun says the
    stop in one line instead of its SignalException traceback, and run.sh says it was Ctrl-C and
    ends with 130. A scheduler's SIGTERM to the process group: run.sh waits for the processes to
    save (untrapped, it ended at once with 143 while they wrote) and ends with 75, also under
    torchrun. The DeepSpeed launcher ended at once on Ctrl-C (a KeyboardInterrupt traceback) while
    its per-node launcher still stopped the processes: run.sh said STOPPED before they had ended;
    now it returns after them. A SIGTERM to the DeepSpeed launcher alone reached no process; now
    they save, and run.sh says so. A SIGUSR1 (SLURM's preemption notice) ended run.sh and torchrun
    at once, and the processes with them, unsaved; now it is a stop request as SIGTERM is. A SIGTERM
    to run.sh alone (docker stop) waited for training to end, unsaved 10 s later by the SIGKILL that
    follows, and a SIGINT to run.sh alone (Ctrl-C under docker run without -t) was lost; now run.sh
    passes them on (SIGINT as SIGTERM)."""
    new = _new_out_with(pipeline, tmp_path, "shards")
    config = tmp_path / "long.yaml"  # far too long to finish during the test
    config.write_text(f"_base_: {ROOT / 'configs' / 'pretrain' / 'tiny.yaml'}\ntrain: {{epochs: 2000}}\n")
    launch = ["--nproc", str(nproc), "--master", f"127.0.0.1:{free_port()}"]
    if launcher == "deepspeed":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        launch += ["--hostfile", str(hostfile), "--launcher-args", "--no_ssh_check"]
    proc = _start_run_sh("--out", str(new), "--config", str(config), "pretrain", *launch)
    metrics = new / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    tree = _launchers_and_trainers(proc)
    outlived, watcher = _still_running_when_it_ends(proc, tree)
    if to == "group":
        os.killpg(proc.pid, stop)
    elif to == "run.sh":  # docker stop, a Kubernetes pod's end: PID 1 only
        proc.send_signal(stop)
    else:
        next(p for p in tree if "pretrain.engine.launchers" in " ".join(p.cmdline())).send_signal(stop)
    res = _finish(proc)
    watcher.join()
    saved = (75, "stopped on a signal (Ctrl-C, preemption) and saved its state: rerun the same command to resume")
    said = saved if nproc == 1 or stop != signal.SIGINT else (
        130, "interrupted (Ctrl-C); what it finished is kept: rerun the same command to go on")
    assert res.returncode == said[0], res.stdout[-3000:] + res.stderr[-3000:]
    assert f"STOPPED: stage pretrain {said[1]}" in res.stderr and "\nERROR: " not in res.stderr
    assert (new / "pretrain" / "checkpoints" / "latest").is_file() and not (new / "pretrain" / "DONE").exists()
    if launcher:
        # A Ctrl-C to the group reaches the launcher twice: the terminal's SIGINT and run.sh's SIGTERM a moment
        # later. Python runs the handlers of signals pending together in number order (SIGINT first), but a
        # SIGTERM arriving as the SIGINT's handler starts, before it has counted, runs inside it and raises
        # first: the launcher then passes SIGTERM on, and its line says so (seen once in some twenty runs).
        passed = {signal.SIGTERM} if to == "run.sh" else {stop, signal.SIGTERM} if stop == signal.SIGINT else {stop}
        assert any(f"{launcher}: {s.name} passed on to its processes" in res.stderr for s in passed), \
            res.stderr[-3000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(tree) == nproc + {None: 0, "torchrun": 1, "deepspeed": 2}[launcher], [p.pid for p in tree]
    assert not outlived, f"still running when run.sh ended: {outlived}"


@pytest.mark.parametrize("nproc, detached", [(1, False), (2, False), (2, True)],
                         ids=["one-process", "torchrun-2", "torchrun-2-nohup"])
def test_a_dropped_ssh_connection_saves_the_training_step_it_was_at(pipeline, tmp_path, nproc, detached):
    """An ssh login as it is: an interactive bash on a pseudo-terminal, run.sh typed into it; the
    connection drops (the terminal's master side closes): the shell sends SIGHUP to its jobs and the
    terminal fails every write (EIO). The run ended at once, unsaved (SIGHUP's default action), and a
    process that took the stop still died at its next line to the terminal; now it saves the step it
    was at. No periodic checkpoint falls inside the test, so any checkpoint is the stop's. Started
    with `nohup ... &`, the run goes on without its terminal, as the user asked."""
    import select

    venv = Path(sys.prefix)
    if not list(venv.glob(".irpt-installed-*")):
        pytest.skip(f"{venv} was not set up by run.sh (run the suite with ./run.sh test)")
    new = _new_out_with(pipeline, tmp_path, "shards")
    config = tmp_path / "long.yaml"
    config.write_text(f"_base_: {ROOT / 'configs' / 'pretrain' / 'tiny.yaml'}\n"
                      "train: {epochs: 2000, save_every_steps: 100000}\n")
    line = shlex.join(["env", f"IRPT_VENV={venv}", "bash", str(ROOT / "run.sh"), "--out", str(new), "--config",
                       str(config), "pretrain", "--nproc", str(nproc), "--master", f"127.0.0.1:{free_port()}"])
    if detached:
        line = f"nohup {line} > {shlex.quote(str(tmp_path / 'run.log'))} 2>&1 &"
    metrics, latest = new / "pretrain" / "metrics.jsonl", new / "pretrain" / "checkpoints" / "latest"
    steps = lambda: len(metrics.read_text().splitlines()) if metrics.is_file() else 0  # noqa: E731
    # The login shell: a session of its own whose controlling terminal is the pseudo-terminal (setsid -c),
    # with the SIGHUP disposition a login starts with. Started by exec from a fresh interpreter rather
    # than pty.fork(), which forks this multi-threaded test process.
    terminal, child_side = os.openpty()
    shell = subprocess.Popen(
        [sys.executable, "-c", "import os, signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
         "os.execvp('setsid', ['setsid', '-c', 'bash', '--norc', '--noprofile', '-i'])"],
        stdin=child_side, stdout=child_side, stderr=child_side)
    os.close(child_side)
    os.write(terminal, (line + "\n").encode())
    deadline = time.time() + 300
    while time.time() < deadline and steps() < 3:
        if select.select([terminal], [], [], 0.2)[0]:
            os.read(terminal, 65536)  # what the terminal shows
    logged = steps()
    os.close(terminal)  # the connection drops
    shell.wait()
    ours = lambda: [q.pid for q in _processes() if str(new) in _command_of(q)]  # noqa: E731
    if detached:
        while time.time() < deadline and steps() < logged + 10:
            time.sleep(0.2)
    else:
        while time.time() < deadline and ours():
            time.sleep(0.2)
    left = ours()
    for q in left:
        os.kill(q, signal.SIGKILL)
    if detached:
        assert steps() >= logged + 10 and not latest.is_file(), "the run under nohup stopped with its terminal"
        return
    assert not left, "still running after the connection dropped"
    assert latest.is_file(), "nothing saved"
    saved = int(latest.read_text()[4:])
    assert logged <= saved == steps()  # the step it was at when the stop came


def _command_of(process: psutil.Process) -> str:
    """``process``'s command line, or '' where it ended (or is a zombie not yet reaped) as it is looked at."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _processes():
    for q in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            q.cmdline()
            yield q


@pytest.mark.parametrize("stop, status", [("SIGINT", 130), ("SIGINT:parent", 130), ("SIGTERM:parent", 75),
                                          ("SIGTERM", 75)],
                         ids=["ctrl_c", "ctrl_c-run.sh-alone", "sigterm-run.sh-alone", "sigterm"])
def test_a_stop_in_the_shards_stage_ends_run_sh_saying_so_and_the_rerun_goes_on(tmp_path, stop, status):
    """Ctrl-C in a terminal (SIGINT to the process group) and a scheduler's SIGTERM to it stop the
    build, which keeps its finished shards, and run.sh ends saying so. A SIGINT to run.sh alone (Ctrl-C
    under docker run without -t) was lost: the build and the stages after it went on; a SIGTERM to it
    alone (docker stop) ended run.sh at once while the build went on writing. Now run.sh passes both on."""
    from data_tools.build import STOP_FAULT_ENV
    from tests.conftest import shared_path

    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - name: msrs\n    root: {shared_path('msrs20', 'ir')}\n    stride: 2\n")
    args = ("shards", "--data", str(sources), "--out", str(tmp_path / "out"), "--workers", "1")
    res = _run_sh(*args, env_extra={STOP_FAULT_ENV: f"3:{stop}"})  # the build signals its group, or run.sh
    assert res.returncode == status, res.stdout[-3000:] + res.stderr[-3000:]
    said = {130: "interrupted (Ctrl-C); what it finished is kept: rerun the same command to go on",
            75: "stopped on a signal (Ctrl-C, preemption) and saved its state: rerun the same command to resume"}
    assert f"STOPPED: stage shards {said[status]}" in res.stderr and "\nERROR: " not in res.stderr
    assert not (tmp_path / "out" / "shards" / "preview.png").exists()  # the stage's last command did not run
    log = _ok(_run_sh(*args))
    manifest = json.loads((tmp_path / "out" / "shards" / "manifest.json").read_text())
    assert manifest["totals"]["written"] == 10, log[-3000:]


def test_two_nodes_train_one_run_in_a_shared_output_folder(pipeline, tmp_path):
    """`--nnodes 2`: the same command on each node (here two on one machine, one process each,
    sharing --out as nodes share a file system) trains one run of two processes, and both
    commands end with 0 (the second node's sees the DONE that rank 0 writes)."""
    out, _ = pipeline
    new = _new_out_with(pipeline, tmp_path, "shards")
    master = f"127.0.0.1:{free_port()}"
    nodes = [_start_run_sh("--out", str(new), "pretrain", "--nnodes", "2", "--node-rank", str(rank), "--master", master,
                           env_extra={"OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    results = [_finish(node) for node in nodes]
    for rank, res in enumerate(results):
        assert res.returncode == 0, (rank, res.stdout[-3000:] + res.stderr[-3000:])
        assert f"pretrain.engine.launchers torchrun --nnodes 2 --node_rank {rank} --nproc_per_node 1" in res.stdout
    assert "2 process(es) (gloo), 1 CPU threads each" in results[0].stdout
    done, alone = (json.loads((o / "pretrain" / "DONE").read_text()) for o in (new, out))
    # the same epoch over two processes: the one-process run's samples in half its steps
    assert done["samples_seen"] == alone["samples_seen"] > 0 and 2 * done["steps"] == alone["steps"]
