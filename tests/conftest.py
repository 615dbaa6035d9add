import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from tests
# Under pytest-xdist the workers share the cores: each takes its share of threads (inherited by the
# processes it launches), or the OpenMP threads of several workers oversubscribe the cores. The
# cores this process may use, as `nproc` counts them in run.sh (not the machine's, under taskset).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("IRPT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _no_training_inside_pytest(monkeypatch):
    """Tests call the training commands in this process only to see them refused before the engine
    starts. The engine ends its process when a run ends (os._exit, for a clean distributed exit):
    a run that was not refused would end pytest itself, with the run's status (0: a silent pass).
    Training runs in subprocesses."""
    import importlib

    engine_run = importlib.import_module("pretrain.engine.run")  # the module; the package exports run()

    def started(*args, **kwargs):
        raise AssertionError("a training run started inside the pytest process instead of being refused")

    monkeypatch.setattr(engine_run, "run_entry_point", started)


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytests_folder(tmp_path_factory):
    """The processes the tests launch keep their temporary files (multiprocessing's pymp-*, the
    torchelastic_* folder torchrun makes for each launch and never removes, those a killed process
    leaves) in pytest's own folder, whose old copies pytest removes, not in the machine's /tmp."""
    import tempfile

    folder = tmp_path_factory.mktemp("tmp")
    before = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(folder), str(folder)
    yield folder
    if before[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[0]
    tempfile.tempdir = before[1]


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data; the test is skipped with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (expected ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def real_sources_yaml(tmp_path_factory) -> Path:
    sirst = shared_path("sirst")
    roadscene = shared_path("roadscene")
    msrs = shared_path("msrs20")
    path = tmp_path_factory.mktemp("sources") / "sources.yaml"
    path.write_text(f"""
sources:
  - name: sirst
    root: {sirst / 'images'}
    glob: "*.png"
    boxes: {{format: voc, path: {sirst / 'masks'}}}
    masks: {{path: {sirst / 'masks'}, suffix: _pixels0.png}}
  - name: roadscene
    root: {roadscene / 'cropinfrared'}
  - name: msrs
    root: {msrs / 'ir'}
    boxes: {{format: yolo, path: {msrs / 'labels_ir'}, classes: [person, bicycle, car]}}
""")
    return path


@pytest.fixture(scope="session")
def real_build(real_sources_yaml, tmp_path_factory):
    """All three real sets built once (2 workers, shards of 200 samples)."""
    from data_tools.build import build_shards
    from data_tools.cli import DEFAULT_BUILD_CONFIG
    from data_tools.config import load_config
    from data_tools.sources import load_sources

    out = tmp_path_factory.mktemp("real_shards")
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=200"])
    manifest = build_shards(load_sources(real_sources_yaml), cfg, out, workers=2, progress=False)
    return out, manifest


def alive(pid: int) -> bool:
    """Running, not a zombie (a container's first process may never reap an orphan)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
        return False


def kill_process_tree(proc) -> None:
    """SIGKILL a launched process and every process under it at once, as a node failure does."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.communicate(timeout=120)


@contextlib.contextmanager
def folder_locked_by_another_process(folder: Path):
    """A live process holding ``folder``'s lock (a build, reencode or training elsewhere); yields its PID."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from data_tools import dirlock; dirlock.acquire(Path(sys.argv[1]), ''); "
                               "print('held', flush=True); time.sleep(600)", str(folder)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def disk_full_when_saving(monkeypatch, path_end: str):
    """Make every durable write of a file whose temporary name ends with ``path_end`` fail as on a full
    disk (our atomic writes fsync before their rename: where a full disk shows at the latest)."""
    import errno

    fsync = os.fsync

    def full_at(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(path_end):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_at)


def run_finetune_cli(task: str, run_dir, config, *overrides: str, nproc: int = 0, eval_only: bool = False,
                     env_extra: dict | None = None, wait: bool = True):
    """``python -m finetune TASK`` in a subprocess (nproc > 0: under torchrun with nproc gloo
    processes); returns the CompletedProcess with its output captured (``wait=False``: the
    running Popen)."""
    import subprocess
    import sys

    from pretrain.engine import free_port

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env_extra or {}))
    launcher = [sys.executable] if not nproc else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    cmd = [*launcher, "-m", "finetune", task, "--config", str(config), "--run-dir", str(run_dir),
           *(["--eval-only"] if eval_only else []), *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def tiny_pad_export(folder: Path, depth: int) -> str:
    """A random tiny MAE + PAD encoder exported as the fine-tuning backbone (64x80 input)."""
    import torch
    from pretrain.models.mae import build_mae
    from pretrain.weights import export_backbone

    torch.manual_seed(0)
    mae = build_mae({"encoder": {"size": "tiny", "depth": depth, "img_size": [64, 80]},
                     "decoder": {"dim": 32, "depth": 1, "num_heads": 2}})
    return str(export_backbone(mae, folder / "backbone.pth")[0])


def changed_after_two_steps(model, loss) -> set[str]:
    """Names of the parameters that two Adam steps on ``loss()`` change (zero-initialised adapter
    outputs open after the first step, so two are needed to reach everything trainable)."""
    import torch

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def plain_ring_statistics(view, box, ring: float = 0.25) -> tuple[float, float, float]:
    """A box's mean inside minus the mean of the ring around it (``ring`` of each side wide, at least a
    pixel, cut to the frame; 0 without a ring), and the standard deviations inside and in the ring:
    the definition, pixel by pixel (the code under test uses integral images)."""
    import numpy as np

    x, y, w, h = (int(v) for v in box)
    rx, ry = max(round(w * ring), 1), max(round(h * ring), 1)
    inside = view[y:y + h, x:x + w].astype(np.float64)
    outer = view[max(y - ry, 0):y + h + ry, max(x - rx, 0):x + w + rx].astype(np.float64)
    mask = np.ones(outer.shape, bool)
    mask[y - max(y - ry, 0):y - max(y - ry, 0) + h, x - max(x - rx, 0):x - max(x - rx, 0) + w] = False
    ring_pixels = outer[mask]
    if ring_pixels.size == 0:
        return 0.0, float(inside.std()), 0.0
    return float(inside.mean() - ring_pixels.mean()), float(inside.std()), float(ring_pixels.std())


def msrs_labelled_frames(every: int = 2, offset: int = 0) -> list:
    """(grey uint8 frame, boxes >= 40 px) of the labelled MSRS frames; by default the even ones (10
    frames, 12 objects), every=1: all 20 (29 objects)."""
    from data_tools.proposal_ranker import labelled_grey_frames
    from data_tools.sources import source_from_dict

    source = source_from_dict({"name": "msrs", "root": "ir", "boxes": {
        "format": "yolo", "path": "labels_ir", "classes": ["person", "bicycle", "car"]}}, shared_path("msrs20"))
    return list(labelled_grey_frames([source], every=every, offset=offset))


@pytest.fixture(scope="session")
def msrs_ranker(tmp_path_factory) -> Path:
    """A thermal_blobs_fitted ranker fitted on the even labelled MSRS frames (a few seconds)."""
    from data_tools.proposal_ranker import fit_ranker, save_ranker
    from data_tools.proposals import ProposalConfig

    path = tmp_path_factory.mktemp("ranker") / "msrs_even.json"
    save_ranker(fit_ranker(msrs_labelled_frames(), ProposalConfig()), path)
    return path


def proposal_overrides(method: str, ranker: Path) -> dict:
    """The proposals settings a method needs besides its name (the fitted one: its ranker)."""
    return {"method": method, "ranker": str(ranker) if method == "thermal_blobs_fitted" else None}


@pytest.fixture(scope="module")
def one_process_group():
    """A process group of this process alone (gloo, in memory), for engine code that calls
    collectives, tested in the pytest process; taken down after the module."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()
