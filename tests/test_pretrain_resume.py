"""Pre-training under DeepSpeed with 2 CPU processes: SIGKILL at a step and resume gives the same
trainable weights, bit for bit, after the same samples in the same order; refusals; SIGTERM; export."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data_tools.build import build_shards
from data_tools.cli import DEFAULT_BUILD_CONFIG
from data_tools.config import CONFIG_DIR, load_config
from data_tools.sources import load_sources
from data_tools.synth import SynthConfig, write_corpus
from pretrain.engine.loop import FAULT_ENV
from tests.conftest import ROOT, kill_process_tree

TINY = str(CONFIG_DIR / "pretrain" / "tiny.yaml")
NO_TRACEBACK_OF_OURS = f'File "{ROOT / "pretrain"}'  # a traceback's frame in our code


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    write_corpus(root / "synth", SynthConfig(num_images=24, width=160, height=128))
    cfg = load_config(DEFAULT_BUILD_CONFIG, ["shards.max_samples=8"])
    build_shards(load_sources(root / "synth" / "sources.yaml"), cfg, root / "shards", progress=False)
    return root / "shards"


def launch(run_dir, shards, nproc=2, extra=(), env_extra=None, wait=True, launcher_args=()):
    """torchrun with `nproc` gloo processes; 6 steps per epoch, 2 epochs, a checkpoint every 2 steps."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env_extra or {}))
    from pretrain.engine import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *launcher_args, "-m", "pretrain", "train", "--config", TINY, "--run-dir", str(run_dir),
           f"data.shards=[{{path: {shards}}}]", "train.batch_size=2", "train.save_every_steps=2",
           "train.record_samples=true", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def trainable(run_dir, tag="step00000012"):
    return torch.load(Path(run_dir) / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)


def samples(run_dir):
    return [(Path(run_dir) / f"samples_rank{r}.jsonl").read_text() for r in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pt") / "clean"
    res = launch(run_dir, shards)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "effective batch 4 = 2 x 1 accumulation x 2 processes" in res.stdout
    assert res.stderr.count("the encoder starts from random init") == 1  # by the first process only
    return run_dir


# mid-epoch (before a checkpoint) and at the epoch boundary (slow: the default suite stays near 15 min)
@pytest.mark.parametrize("kill_after", [3, pytest.param(6, marks=pytest.mark.slow)])
def test_sigkill_and_resume_is_bit_exact(shards, uninterrupted, tmp_path, kill_after):
    run_dir = tmp_path / "run"
    killed = launch(run_dir, shards, env_extra={FAULT_ENV: str(kill_after)})
    assert killed.returncode != 0 and not (run_dir / "DONE").exists()
    res = launch(run_dir, shards)
    assert res.returncode == 0, res.stdout + res.stderr
    resumed_at = {3: 2, 6: 6}[kill_after]  # the last checkpoint before the kill
    assert f"resumed from step{resumed_at:08d} at step {resumed_at}" in res.stdout
    a, b = trainable(uninterrupted), trainable(run_dir)
    assert a["module"].keys() == b["module"].keys()
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k])
    assert samples(run_dir) == samples(uninterrupted)  # same samples, same order, on both ranks


def test_a_run_of_an_earlier_version_resumes_with_the_settings_it_lacked(shards, uninterrupted, tmp_path):
    """A setting a later version of the toolkit added (here a shard set's `weight`, left out of the
    config as an earlier version wrote it) does not lock a run out: it resumes as it was, names the
    setting's value, and ends as the uninterrupted run. A changed setting of its own is refused
    (test_refusals_for_other_config_and_non_empty_dir)."""
    run_dir = tmp_path / "earlier"
    killed = launch(run_dir, shards, env_extra={FAULT_ENV: "3"})
    assert killed.returncode != 0 and "weight" not in OmegaConf.load(run_dir / "config.yaml").data.shards[0]
    res = launch(run_dir, shards, extra=[f"data.shards=[{{path: {shards}, weight: 1.0}}]"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"{run_dir} goes on with settings that differ from its start but not what it learns (how its data is " \
           f"loaded or its global batch split, or settings this toolkit added since it started): " \
           f'data.shards: [{{"path": "{shards}"}}] -> [{{"path": "{shards}", "weight": 1.0}}]' in out
    assert "resumed from step00000002 at step 2" in out
    a, b = trainable(uninterrupted), trainable(run_dir)
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])


def test_checkpoint_holds_only_trainable_weights(uninterrupted):
    from data_tools.config import to_container
    from pretrain.models.mae import build_mae

    saved = trainable(uninterrupted)["module"]
    model = build_mae(to_container(load_config(TINY).model))
    assert set(saved) == model.trainable_names()
    assert not any(k.startswith("encoder.blocks.0.attn") for k in saved)
    metrics = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "lr", "images_per_s", "data_wait_fraction", "pad_scale_mean/0", "bad_samples"} <= set(metrics[-1])
    import cv2

    preview = cv2.imread(str(uninterrupted / "previews" / "step00000012.png"), cv2.IMREAD_GRAYSCALE)
    assert preview.shape == (4 * 64, 3 * 80)  # 4 fixed frames x (original | masked | reconstruction)
    assert (uninterrupted / "tensorboard").is_dir() and (uninterrupted / "config.yaml").is_file()


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _adamw_steps(run_dir, tag="step00000012") -> set:
    return {float(s["step"]) for s in trainable(run_dir, tag)["optimizer"]["state"].values()}


def test_a_run_resumes_on_fewer_then_more_processes_with_its_global_batch(shards, uninterrupted, killed_at_4, tmp_path):
    """A lost node: the 2-process run killed at step 4 goes on with 1 process at twice the batch,
    is killed at step 8, and ends on 2 processes: the optimiser state and the schedule go on as
    in the uninterrupted run, and every step's global batch is 4 samples."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(killed_at_4, run_dir)
    res = launch(run_dir, shards, nproc=1, extra=["train.batch_size=4"], env_extra={FAULT_ENV: "8"})
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "resumed from step00000004 at step 4 (epoch 0, micro-batch 4)" in out, out[-3000:]
    assert ("the checkpoint's global batch 4 = 2 x 1 accumulation x 2 processes goes on as 4 = 4 x 1 accumulation "
            "x 1 processes; the rest of epoch 0 is read from the start of the new streams") in out
    assert _adamw_steps(run_dir, "step00000008") == {8.0}
    res = launch(run_dir, shards, nproc=2)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "resumed from step00000008 at step 8 (epoch 1, micro-batch 2)" in out
    assert out.count("4 = 4 x 1 accumulation x 1 processes goes on as 4 = 2 x 1 accumulation x 2 processes") == 1
    # the optimiser state went on (a fresh one would count at most 4 updates); the scale predictor's
    # gate closes at the same step
    assert _adamw_steps(run_dir) == _adamw_steps(uninterrupted) and max(_adamw_steps(run_dir)) == 12
    then, now = _metrics(uninterrupted), _metrics(run_dir)
    assert [m["step"] for m in now] == list(range(1, 13))
    assert [m["lr"] for m in now] == [m["lr"] for m in then]  # the same schedule, step for step
    assert now[-1]["samples_seen"] == then[-1]["samples_seen"] == 48
    assert all(np.isfinite(m["loss"]) for m in now)
    state = json.loads((run_dir / "checkpoints" / "step00000012" / "state_rank1.json").read_text())
    assert state["data"]["batching"] == {"micro": 2, "accum": 1, "world": 2}


def test_torchrun_restarts_the_killed_workers_and_they_resume_bit_exactly(shards, uninterrupted, tmp_path):
    """`--max-restarts`: torchrun starts the workers again after one is killed; they form their
    process group anew (the agent's store still held the first round's addresses: most restarts
    failed to connect or hung) and resume from the checkpoint as a rerun would."""
    run_dir = tmp_path / "run"
    res = launch(run_dir, shards, env_extra={FAULT_ENV: "4"}, launcher_args=["--max-restarts", "1"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "exitcode: -9" in out and "resumed from step00000004 at step 4" in out
    a, b = trainable(uninterrupted), trainable(run_dir)
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
    assert samples(run_dir) == samples(uninterrupted)


ROUND_WORKER = """
import os, signal, sys, time
import torch, torch.distributed as dist
from pretrain.engine.distributed import finish, init_distributed
mark, node = sys.argv[1], os.environ["GROUP_RANK"]
first_round = not os.path.exists(mark)  # read before the all-reduce, which node 0 passes only with node 1
init_distributed()
x = torch.ones(1)
dist.all_reduce(x)
print(f"node {node} restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: {x.item():.0f} processes", flush=True)
if first_round and node == "0":
    open(mark, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)  # a fault on node 0
if first_round:
    time.sleep(120)  # node 1 between collectives (on a GPU: waiting in one) until its agent restarts it
dist.all_reduce(x)
print(f"node {node}: done", flush=True)
finish(0)  # as our entry points end (the gloo exit crash)
"""


def test_a_restart_caused_by_another_node_forms_the_new_group(tmp_path):
    """Two torchrun agents (nodes) under a c10d rendezvous, a process each, node 0's killed: node 0
    restarts for its own fault (restart count 1), node 1 for the new round (count 0). Through the
    launcher both form the second round's group and finish; keyed by the restart counts on the
    shared store, each round waited for the other node's count until every restart was spent."""
    from pretrain.engine import free_port

    script = tmp_path / "worker.py"
    script.write_text(ROUND_WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", DEEPSPEED_TIMEOUT="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "pretrain.engine.launchers", "torchrun", "--nnodes", "2",
                               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "two_nodes", "--max-restarts", "1", "--monitor-interval", "0.5",
                               str(script), str(tmp_path / "killed")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    outs = []
    for node in nodes:
        try:
            outs.append(node.communicate(timeout=200)[0])
        except subprocess.TimeoutExpired:
            kill_process_tree(node)
            outs.append("(killed after 200 s)")
    said = "\n".join(outs)
    assert "node 0 restart 1: 2 processes" in said, said[-4000:]
    assert said.count("node 1 restart 0: 2 processes") == 2  # in both rounds: the counts differed
    assert "node 0: done" in said and "node 1: done" in said
    assert [node.returncode for node in nodes] == [0, 0], said[-4000:]


def _latest_step(run_dir) -> int:
    latest = Path(run_dir) / "checkpoints" / "latest"
    return int(latest.read_text()[4:]) if latest.is_file() else 0


def _wait_for_step(run_dir, step, node, timeout=240):
    start = time.time()
    while _latest_step(run_dir) < step:
        assert node.poll() is None and time.time() - start < timeout, f"no checkpoint at step {step}"
        time.sleep(0.2)


def _wait_for_said(log, said, times, process, timeout=240):
    start = time.time()
    while log.read_text().count(said) < times:
        assert process.poll() is None and time.time() - start < timeout, f"never said {times} times: {said}"
        time.sleep(0.2)


@pytest.mark.slow  # four launches (~45 s): the default suite stays near 15 min
def test_an_elastic_run_goes_on_as_a_node_joins_and_as_one_is_lost(shards, tmp_path):
    """torchrun `--nnodes 1:2` (c10d): node 0 trains alone; node 1 joins (node 0's process saves on
    torchrun's stop and both resume as a world of 2); node 1 is killed, whole (node 0's process loses
    its peer, and resumes alone); a SIGTERM then ends the run, saved. The global batch stays 4
    throughout, each step logged once. With the agent's store shared among the rounds (torch's
    default), the join timed out in the agents."""
    from pretrain.engine import free_port

    run_dir, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    cmd = [sys.executable, "-m", "pretrain.engine.launchers", "torchrun", "--nnodes", "1:2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "elastic", "--rdzv-conf",
           "last_call_timeout=1", "--max-restarts", "3", "--monitor-interval", "0.5", "-m", "pretrain", "train",
           "--config", TINY, "--run-dir", str(run_dir), f"data.shards=[{{path: {shards}}}]", "train.batch_size=2",
           "train.effective_batch=4", "train.epochs=100000", "train.save_every_steps=10"]  # ended by the test
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    alone, joined = "2 x 2 accumulation x 1 processes", "2 x 1 accumulation x 2 processes"

    def start(node):
        with open(logs[node], "w") as log:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    node0 = start(0)
    try:
        _wait_for_step(run_dir, 10, node0)
        node1 = start(1)
        try:
            _wait_for_said(logs[0], joined, 1, node1)  # rank 0 (node 0) says the new split
            _wait_for_step(run_dir, _latest_step(run_dir) + 10, node0)  # and saved as a world of 2
        finally:
            kill_process_tree(node1)
        _wait_for_said(logs[0], alone, 2, node0)
        _wait_for_step(run_dir, _latest_step(run_dir) + 10, node0)  # saved alone again
        node0.send_signal(signal.SIGTERM)  # the launcher passes it on; the process saves
        node0.wait(timeout=120)
    finally:
        kill_process_tree(node0)
    said = logs[0].read_text()
    assert node0.returncode == 128 + signal.SIGTERM, said[-4000:]
    assert [said.count(f"effective batch 4 = {split}") for split in (alone, joined)] == [2, 1]
    assert said.index(alone) < said.index(joined) < said.rindex(alone)
    assert said.count("resumed from step") == 2
    last = _latest_step(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, last + 1))
    assert [r["samples_seen"] for r in records if "loss" in r] == [4 * s for s in steps]


def test_another_global_batch_is_refused_on_resume(shards, killed_at_4, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(killed_at_4, run_dir)
    res = launch(run_dir, shards, nproc=1)
    assert res.returncode != 0
    assert ("checkpoint step00000004: the checkpoint's global batch is 4 = 2 x 1 accumulation x 2 processes, this "
            "run's 2 = 2 x 1 accumulation x 1 processes: resume with the same global batch (train.effective_batch=4 "
            "sets the accumulation") in res.stdout + res.stderr
    assert NO_TRACEBACK_OF_OURS not in res.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000004"  # nothing written


def test_a_checkpoint_whose_optimiser_groups_differ_from_this_codes_is_refused(shards, killed_at_4, tmp_path):
    """AdamW's state is matched to the parameters by position: a checkpoint written by code that
    grouped them otherwise (a parameter moved to another weight-decay group) would load its
    moments onto other parameters, which first fails steps later with a shape error. Refused
    before anything is loaded, naming the parameter."""
    import shutil

    from data_tools.files import sha256_file

    run_dir = tmp_path / "copy"
    shutil.copytree(killed_at_4, run_dir)
    tag_dir = run_dir / "checkpoints" / "step00000004"
    sums = json.loads((tag_dir / "checksums.json").read_text())
    for rank in (0, 1):
        path = tag_dir / f"state_rank{rank}.json"
        state = json.loads(path.read_text())
        groups = state["optimizer_groups"]
        assert len(groups) >= 2 and "mask_token" in groups[0] + groups[1]
        moved = groups[0].pop(0)  # as an earlier version that decayed it otherwise would have laid it out
        groups[1].insert(0, moved)
        path.write_text(json.dumps(state))
        sums["files"][path.name] = sha256_file(path)
    (tag_dir / "checksums.json").write_text(json.dumps(sums))
    res = launch(run_dir, shards)
    assert res.returncode != 0
    said = res.stdout + res.stderr
    assert ("checkpoint step00000004: the optimiser's parameter groups differ from the checkpoint's (in another "
            "optimiser group: ") in said and moved in said and "--overwrite" in said, said[-3000:]
    assert NO_TRACEBACK_OF_OURS not in res.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000004"  # nothing written


def test_refusals_for_other_config_and_non_empty_dir(shards, uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    res = launch(run_dir, shards, nproc=1, extra=["optim.blr=2e-4"])
    out = res.stdout + res.stderr
    then = json.dumps(OmegaConf.load(uninterrupted / "config.yaml").optim.blr)
    assert res.returncode != 0 and "holds a run of another config (hash " in out
    assert f"): optim.blr: {then} -> 0.0002; use another --run-dir" in out  # what changed, named
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = launch(other, shards, nproc=1)
    assert res.returncode != 0 and "not empty" in res.stdout + res.stderr


def test_an_effective_batch_larger_than_the_corpus_is_refused_with_what_to_change(shards, tmp_path):
    """24 samples cannot fill one step of 16 micro-batches of 2: said in one line, with the settings
    that fix it; the rerun with the one it names trains in the same directory."""
    run_dir = tmp_path / "big"
    res = launch(run_dir, shards, nproc=1, extra=["train.effective_batch=32"])
    out = res.stdout + res.stderr
    assert res.returncode == 1
    assert ("error: an epoch of 24 samples holds fewer than 16 micro-batches of 2 per process "
            "(one step of 16 accumulation)") in out
    assert "set data.samples_per_epoch=32 or more" in out and "pretrain/train.py" not in out  # no traceback of ours
    res = launch(run_dir, shards, nproc=1, extra=["train.effective_batch=32", "data.samples_per_epoch=40",
                                                  "train.epochs=1"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "effective batch 32 = 2 x 16 accumulation x 1 processes" in res.stdout and "1 steps/epoch, 1 steps" in res.stdout
    assert "1 warm-up; 32 of the 40 samples of an epoch (whole steps of 32 samples per process" in res.stdout  # 8 left


def test_sigterm_saves_and_exits_then_resumes(shards, tmp_path):
    run_dir = tmp_path / "term"
    proc = launch(run_dir, shards, extra=["train.epochs=6", "train.save_every_steps=1000"], wait=False)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler sends before preempting the whole job
    out, _ = proc.communicate(timeout=300)
    (tmp_path / "sigterm.log").write_text(out)
    # torchrun's agent itself exits non-zero on SIGTERM by design; the trainer saved and said so.
    assert "SIGTERM: saved step" in out and not (run_dir / "DONE").exists(), out
    tag = (run_dir / "checkpoints" / "latest").read_text()
    res = launch(run_dir, shards, extra=["train.epochs=6", "train.save_every_steps=1000"])
    assert res.returncode == 0 and f"resumed from {tag}" in res.stdout, res.stdout + res.stderr


def test_ctrl_c_saves_and_exits_75_then_the_rerun_finishes_with_0(shards, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole process group, loader workers included) on a run
    without a launcher: the trainer saves at the end of the step and exits 75 (EX_TEMPFAIL, so a
    wrapper knows to rerun), its loader workers ignore the signal; the rerun finishes with 0."""
    run_dir = tmp_path / "alone"
    args = [sys.executable, "-m", "pretrain", "train", *_common_args(run_dir, shards), "train.epochs=6",
            "train.save_every_steps=1000", "data.num_workers=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75 and "Ctrl-C: saving at the end of this step" in out, out[-3000:]
    step = int(out.split("SIGINT: saved step ")[1].split(",")[0])
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{step:08d}"
    assert "DataLoader worker" not in out and NO_TRACEBACK_OF_OURS not in out
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and f"resumed from step{step:08d}" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert "took over the lock" not in res.stdout + res.stderr  # a run that stopped let go of it, unlike a killed one


def test_export_from_a_run(uninterrupted, shards, tmp_path, capsys):
    from pretrain.cli import main
    from pretrain.weights import load_backbone

    assert main(["export", str(uninterrupted), "--out", str(tmp_path / "backbone.pth")]) == 0
    assert "random init" not in capsys.readouterr().err  # said when the run trained, not on its export
    vit, meta, _ = load_backbone(tmp_path / "backbone.pth")
    saved = trainable(uninterrupted)["module"]
    assert torch.equal(vit.blocks[1].parallel_mlp["pad"].up.weight, saved["encoder.blocks.1.parallel_mlp.pad.up.weight"])
    assert [a["name"] for a in meta["adapters"]] == ["pad"]
    # the corpus it was pre-trained on, for fine-tuning to say which evaluation frames it may have seen
    assert meta["pretraining_corpus"] == [{"shards": str(shards), "sources": [
        {"name": "synth", "root": str(shards.parent / "synth" / "ir"), "globs": ["*.png"], "stride": 1}]}]
    assert main(["export", str(uninterrupted), "--tag", "step00000010", "--out", str(tmp_path / "at10.pth")]) == 0
    vit, _, _ = load_backbone(tmp_path / "at10.pth")  # an earlier checkpoint's weights, not the latest's
    at10 = trainable(uninterrupted, "step00000010")["module"]["encoder.blocks.1.parallel_mlp.pad.up.weight"]
    assert torch.equal(vit.blocks[1].parallel_mlp["pad"].up.weight, at10) and not torch.equal(at10, saved[
        "encoder.blocks.1.parallel_mlp.pad.up.weight"])
    # The input normalisation of the run travels with the export, and fine-tuning uses it.
    assert meta["input"] == {"mean": 0.3801, "std": 0.1871, "intensity": {"uint16_mode": "percentile",
                                                                        "percentiles": [1.0, 99.0]}}
    from finetune.factory import intensity_rule_mismatch, ir_normalisation

    meta_path = tmp_path / "backbone.json"
    meta_path.write_text(json.dumps(dict(meta, input=dict(meta["input"], mean=0.5, std=0.25))))
    ft = load_config(CONFIG_DIR / "finetune" / "seg_tiny.yaml", [f"init.checkpoint={tmp_path / 'backbone.pth'}"])
    assert ir_normalisation(ft) == (0.5, 0.25) and intensity_rule_mismatch(ft) is None
    meta_path.write_text(json.dumps(dict(meta, input=dict(meta["input"], intensity={"uint16_mode": "minmax"}))))
    assert "pre-trained with the 16-bit rule {'uint16_mode': 'minmax'}" in intensity_rule_mismatch(ft)
    assert ir_normalisation(load_config(CONFIG_DIR / "finetune" / "seg_tiny.yaml")) == (0.3801, 0.1871)  # PAD's


def _common_args(run_dir, shards):
    return ["--config", TINY, "--run-dir", str(run_dir), f"data.shards=[{{path: {shards}}}]", "train.batch_size=2",
            "train.save_every_steps=2", "train.record_samples=true"]


def _assert_same_run(a_dir, b_dir):
    a, b = trainable(a_dir), trainable(b_dir)
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k
    assert samples(a_dir) == samples(b_dir)


def test_slurm_srun_environment_gives_the_same_run(shards, uninterrupted, tmp_path):
    """Two tasks started the way srun starts them (SLURM_PROCID / SLURM_NTASKS, no launcher)."""
    from pretrain.engine import free_port

    run_dir, port = tmp_path / "slurm", str(free_port())
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(PYTHONPATH=str(ROOT), SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")  # as torchrun sets it
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", "train", *_common_args(run_dir, shards)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    _assert_same_run(uninterrupted, run_dir)


def test_deepspeed_launcher_gives_the_same_run(shards, uninterrupted, tmp_path):
    """... and leaves no shared memory behind: DeepSpeed's CPU all-reduce (on one node it sets
    LOCAL_SIZE, which turns it on) never unlinked its two 64 MiB buffers in /dev/shm, so every
    such run left them there (a day of test runs filled the machine's memory)."""
    import shutil

    from pretrain.engine import free_port
    from pretrain.engine.distributed import SHM_DIR

    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    run_dir, port = tmp_path / "ds", free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # as torchrun sets it: same float order
    res = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(port), "--module", "pretrain", "train",
                          *_common_args(run_dir, shards)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _assert_same_run(uninterrupted, run_dir)
    assert not list(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_cpu_threads_are_shared_among_the_processes_of_a_node():
    from pretrain.engine import threads_per_process

    assert threads_per_process({}, 16) == 16  # a single process keeps torch's default
    assert threads_per_process({"LOCAL_WORLD_SIZE": "4"}, 16) == 4  # torchrun
    assert threads_per_process({"LOCAL_SIZE": "2"}, 2) == 1  # the DeepSpeed launcher
    assert threads_per_process({"LOCAL_SIZE": "8"}, 2) == 1  # never zero
    assert threads_per_process({"SLURM_NTASKS_PER_NODE": "4"}, 32) == 8  # srun
    assert threads_per_process({"SLURM_CPUS_PER_TASK": "6", "SLURM_NTASKS_PER_NODE": "4"}, 32) == 6


def test_bf16_autocast_and_zero1_run(shards, tmp_path):
    res = launch(tmp_path / "bf16", shards, nproc=2, extra=["train.precision=bf16_autocast", "train.zero_stage=1",
                                                           "train.epochs=1"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    losses = [json.loads(l)["loss"] for l in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(l == l and l < 10 for l in losses)
    # ZeRO 1 splits the optimiser state among the processes, in files a resume on another number of
    # processes is refused by: DeepSpeed's names for them are what that refusal looks for
    from pretrain.engine.batching import PARTITIONED_STATE_MARK

    split = [p.name for p in (tmp_path / "bf16" / "checkpoints" / "step00000006").iterdir()
             if PARTITIONED_STATE_MARK in p.name]
    assert len(split) == 2, split
    res = launch(tmp_path / "bf16", shards, nproc=1, extra=["train.precision=bf16_autocast", "train.zero_stage=1",
                                                           "train.epochs=1", "train.batch_size=4"])
    assert res.returncode == 1 and ("the checkpoint was written by 2 processes with the optimiser state split among "
                                    "them (train.zero_stage >= 1), this run has 1") in res.stdout + res.stderr


def test_the_checkpoint_records_which_shards_it_trained_on():
    """A corpus rebuilt or extended (other shards, other counts, another weight) is other training
    data to the resume check; the same manifest is the same data."""
    from pretrain.data import ShardSet
    from pretrain.train import shard_inputs

    def corpus(counts=(8, 8), weight=1.0, names=("a-000000.tar", "a-000001.tar")):
        return [ShardSet("a", tuple(f"/data/a/{n}" for n in names), sum(counts), weight, counts)]

    same = shard_inputs(corpus())
    assert same == shard_inputs(corpus()) and same["count"] == 16 and same["what"] == "samples in shards"
    for other in (corpus(counts=(8, 7)), corpus(weight=2.0), corpus(names=("a-000000.tar", "b-000001.tar")),
                  corpus() + corpus()):
        assert shard_inputs(other)["sha256"] != same["sha256"]


def test_changed_init_checkpoint_is_refused_on_resume(shards, tmp_path):
    from tests.test_weights import official_mae_checkpoint

    init = tmp_path / "mae.pth"
    official_mae_checkpoint(init)
    run_dir = tmp_path / "init"
    res = launch(run_dir, shards, nproc=1, extra=[f"init.checkpoint={init}"], env_extra={FAULT_ENV: "3"})
    assert res.returncode != 0 and (run_dir / "checkpoints" / "latest").is_file()
    official_mae_checkpoint(init, seed=1)  # the frozen weights it references are not the same any more
    res = launch(run_dir, shards, nproc=1, extra=[f"init.checkpoint={init}"])
    assert res.returncode != 0 and "frozen weights differ" in res.stdout + res.stderr


def test_a_start_that_failed_before_its_first_checkpoint_starts_again(tmp_path):
    """A run of this config that never checkpointed (e.g. bad weights found at start) restarts on
    the same command; a start of another config that failed before its first step (e.g. an
    effective batch that is not a multiple of the processes) claims nothing either; a run of
    another config that logged steps, and any folder not ours, stay refused."""
    from pretrain.engine.loop import _run_dir_decision

    run = tmp_path / "run"
    run.mkdir()
    (run / "config_hash.txt").write_text("abc\n")
    (run / "params.json").write_text("{}")
    assert _run_dir_decision(run, False, "abc") == ("wipe", None)
    assert _run_dir_decision(run, False, "def") == ("wipe", None)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    action, error = _run_dir_decision(run, False, "def")
    assert action == "fresh" and "not empty" in error
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert "not empty" in _run_dir_decision(tmp_path / "mine", False, "def")[1]
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step00000002")
    assert _run_dir_decision(run, False, "abc") == ("resume", None)


def test_a_torn_final_log_line_is_dropped_and_reported(tmp_path, capsys):
    """A kill in the middle of an append leaves a partial last line: resume trims the log without
    failing; a bad line elsewhere is corruption and names its line."""
    from data_tools.files import read_jsonl, trim_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    records, torn = read_jsonl(log)
    assert [r["step"] for r in records] == [1, 2] and torn == '{"step": 3, "lo'
    trim_jsonl(log, lambda r: r["step"] <= 1)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n'
    assert "torn final line" in capsys.readouterr().err
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(log)


def test_resume_after_a_torn_metrics_line(shards, killed_at_4, tmp_path):
    """The whole path: a run killed after step 4 whose metrics log then ends in half a line
    resumes to the end (it died with JSONDecodeError before)."""
    import shutil

    run_dir = tmp_path / "torn"
    shutil.copytree(killed_at_4, run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')
    res = launch(run_dir, shards)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "torn final line" in res.stderr
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 12


# --- checkpoint integrity: corruption, fallback, code in files ---------------------------------

@pytest.fixture(scope="module")
def killed_at_4(shards, tmp_path_factory):
    """A 2-process run killed after step 4: checkpoints step 2 and step 4 (latest)."""
    run_dir = tmp_path_factory.mktemp("pt") / "killed"
    res = launch(run_dir, shards, env_extra={FAULT_ENV: "4"})
    assert res.returncode != 0
    return run_dir


def _corrupt(ckpt_dir: Path, kind: str) -> None:
    step = ckpt_dir / "step00000004"
    model = step / "mp_rank_00_model_states.pt"
    if kind == "flipped_bytes":
        data = bytearray(model.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):
            data[i] ^= 0xFF
        model.write_bytes(bytes(data))
    elif kind == "truncated_model":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif kind == "deleted_model":
        model.unlink()
    elif kind == "truncated_state":
        state = step / "state_rank1.json"
        state.write_text(state.read_text()[:10])
    elif kind == "no_checksums":
        (step / "checksums.json").unlink()
    elif kind == "empty_latest":
        (ckpt_dir / "latest").write_text("")
    elif kind == "dangling_latest":
        (ckpt_dir / "latest").write_text("step00000099")


@pytest.mark.parametrize("kind,reason", [
    ("flipped_bytes", "mp_rank_00_model_states.pt does not match its sha256"),
    ("truncated_model", "mp_rank_00_model_states.pt does not match its sha256"),
    ("deleted_model", "mp_rank_00_model_states.pt is missing"),
    ("truncated_state", "state_rank1.json does not match its sha256"),
    ("no_checksums", "checksums.json is missing"),
    ("empty_latest", "latest is empty"),
    ("dangling_latest", "'step00000099', which does not exist"),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(killed_at_4, tmp_path, kind, reason):
    import shutil

    from pretrain.engine import Checkpointer, ResumeError

    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(killed_at_4 / "checkpoints", ckpt_dir)
    ckpt = Checkpointer(ckpt_dir)
    assert ckpt.choose() == ("step00000004", [])
    _corrupt(ckpt_dir, kind)
    tag, skipped = ckpt.choose()
    expected = "step00000002" if "latest" not in kind else "step00000004"  # a bad pointer: the newest intact
    assert tag == expected and any(reason in why for why in skipped), skipped
    shutil.rmtree(ckpt_dir / "step00000002")
    if "latest" not in kind:
        with pytest.raises(ResumeError, match="no usable checkpoint"):
            ckpt.choose()


def test_resume_after_flipped_bytes_ends_like_an_uninterrupted_run(shards, uninterrupted, killed_at_4, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(killed_at_4, run_dir)
    _corrupt(run_dir / "checkpoints", "flipped_bytes")
    res = launch(run_dir, shards)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "checkpoint skipped: step00000004: mp_rank_00_model_states.pt does not match its sha256" in out
    assert "resumed from step00000002 at step 2" in out
    a, b = trainable(uninterrupted), trainable(run_dir)
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k


class _Planted:
    """Unpickling this creates a marker file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_object_in_a_checkpoint_is_refused_and_never_runs(shards, killed_at_4, tmp_path):
    """Someone who can write to the run folder replaces a checkpoint file with a pickle that runs a
    command, and updates the checksums too: resume refuses the file by name; nothing runs."""
    import hashlib
    import pickle
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(killed_at_4, run_dir)
    marker = tmp_path / "code_ran"
    step = run_dir / "checkpoints" / "step00000004"
    target = step / "mp_rank_00_model_states.pt"
    target.write_bytes(pickle.dumps({"module": _Planted(marker)}))
    sums = json.loads((step / "checksums.json").read_text())
    sums["files"][target.name] = hashlib.sha256(target.read_bytes()).hexdigest()
    (step / "checksums.json").write_text(json.dumps(sums))
    res = launch(run_dir, shards)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "refused to load" in out and "mp_rank_00_model_states.pt" in out
    assert not marker.exists()


def test_verify_cli_reports_each_checkpoint_and_the_one_resume_uses(killed_at_4, tmp_path, capsys):
    import shutil

    from pretrain.cli import main as pretrain_main

    run_dir = tmp_path / "run"
    shutil.copytree(killed_at_4, run_dir)
    assert pretrain_main(["verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step00000004: complete, checksums match" in out and "resume would use step00000004" in out
    _corrupt(run_dir / "checkpoints", "flipped_bytes")
    assert pretrain_main(["verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step00000004: mp_rank_00_model_states.pt does not match its sha256" in out
    assert "resume would use step00000002" in out
    assert pretrain_main(["export", str(run_dir), "--tag", "step00000004", "--out", str(tmp_path / "b.pth")]) == 2
    assert capsys.readouterr().err == ("error: checkpoint step00000004: mp_rank_00_model_states.pt does not match "
                                       "its sha256 (corrupted or truncated)\n")  # one line, no traceback
    shutil.rmtree(run_dir / "checkpoints" / "step00000002")
    assert pretrain_main(["verify", str(run_dir)]) == 1
    said = capsys.readouterr().out
    assert "resume would fail" in said and said.endswith("(use --overwrite to start again)\n")  # a resume's advice
    assert pretrain_main(["verify", str(tmp_path)]) == 1
    assert capsys.readouterr().out == f"{tmp_path}: no checkpoints\n"


def test_non_finite_weights_never_become_a_checkpoint(shards, tmp_path):
    """blr 1e6 breaks the weights one step before the loss shows it: the save refuses them, and
    every checkpoint left (and latest) holds finite weights, so a resume can start from it."""
    from pretrain.engine import Checkpointer

    run_dir = tmp_path / "nan"
    res = launch(run_dir, shards, nproc=1, extra=["optim.blr=1e6", "train.save_every_steps=1"])
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "non-finite" in out
    ckpt = Checkpointer(run_dir / "checkpoints")
    latest = ckpt.latest_tag()
    assert latest is not None and ckpt.problem(latest) is None
    for tag in ckpt.tags():
        sd = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        assert all(torch.isfinite(v).all() for v in sd.values()), tag
    if "weights are non-finite" in out:
        assert f"checkpoint not written, {latest} stays the latest" in out


def test_a_full_disk_while_saving_is_said_on_every_rank_and_resume_works(shards, uninterrupted, tmp_path):
    """The disk is full at the save of step 4 (injected free space 0): both ranks stop with the
    message (no raw iostream error, no gloo 'connection closed'), the previous checkpoint stays
    intact, and the same command resumes to the uninterrupted run's weights."""
    from pretrain.engine.checkpoint import DISK_FULL_FAULT_ENV, Checkpointer

    run_dir = tmp_path / "full"
    res = launch(run_dir, shards, env_extra={DISK_FULL_FAULT_ENV: "4"})
    out = res.stdout + res.stderr
    assert res.returncode != 0
    message = f"checkpoint step00000004 could not be written to {run_dir / 'checkpoints'}: no space left (needs ~"
    assert out.count(message) == 2  # both ranks say it
    assert "previous checkpoint step00000002 is intact" in out and "Connection closed" not in out
    assert NO_TRACEBACK_OF_OURS not in out  # our message alone (torchrun reports the exit)
    ckpt = Checkpointer(run_dir / "checkpoints")
    assert ckpt.latest_tag() == "step00000002" and ckpt.problem("step00000002") is None
    assert not (run_dir / "checkpoints" / "step00000004").exists()
    res = launch(run_dir, shards)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = trainable(uninterrupted), trainable(run_dir)
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k


def test_a_first_save_cut_short_is_not_a_checkpoint(tmp_path):
    """A step folder without checksums (a kill during the very first save) does not make a run
    folder resumable: the same config starts again instead of demanding --overwrite."""
    from pretrain.engine import Checkpointer
    from pretrain.engine.loop import _run_dir_decision

    (tmp_path / "checkpoints" / "step00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (tmp_path / "config_hash.txt").write_text("abc\n")
    assert not Checkpointer(tmp_path / "checkpoints").has_checkpoints()
    assert _run_dir_decision(tmp_path, False, "abc") == ("wipe", None)
    (tmp_path / "checkpoints" / "step00000002" / "checksums.json").write_text('{"files": {}}')
    assert _run_dir_decision(tmp_path, False, "abc") == ("resume", None)


def _checkpoint(run_dir, step: int) -> dict:
    return trainable(run_dir, f"step{step:08d}")


def _same_training_state(a: dict, b: dict) -> bool:
    """Trainable weights and every AdamW state tensor (moments and step counts) equal."""
    if a["module"].keys() != b["module"].keys():
        return False
    if not all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"]):
        return False
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[i][k]) for i, st in sa.items() for k, v in st.items())


def test_a_loader_worker_killed_ends_the_run_with_one_line_per_process(shards, tmp_path):
    """Rank 1's data-loader worker SIGKILLed (the out-of-memory killer) as it starts epoch 1: rank 1
    says so and how to go on, rank 0 that it lost its peer (gloo's traceback before), one line each,
    no traceback of ours, no warning of leaked semaphores after them (os._exit skips
    multiprocessing's clean-up); epoch 0's checkpoints stay, and the run resumes with fewer workers."""
    from pretrain.engine import Checkpointer
    from pretrain.engine.streams import LOADER_KILL_FAULT_ENV

    run_dir = tmp_path / "oom"
    res = launch(run_dir, shards, extra=["data.num_workers=2"], env_extra={LOADER_KILL_FAULT_ENV: "1@1"})
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert out.count("error: a data-loader worker process died, perhaps for memory (PyTorch: DataLoader worker") == 1
    assert "The same command resumes from the last checkpoint, also with fewer data.num_workers" in out
    assert out.count("error: lost the connection to another process of this launch: it stopped") == 1, out[-3000:]
    assert NO_TRACEBACK_OF_OURS not in out and "leaked semaphore" not in out, out[-3000:]
    assert Checkpointer(run_dir / "checkpoints").latest_tag() == "step00000006"  # 6 steps per epoch
    assert (run_dir / ".lock").read_text() == ""  # let go of, not left to be taken over as a killed run's
    # As the message says: the run resumes with fewer loader workers (not refused as another config).
    res = launch(run_dir, shards, extra=["data.num_workers=1"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "resumed from step00000006" in out and "data.num_workers: 2 -> 1" in out


def _finished_with_nan_at(run_dir, shards, steps: str, extra: list[str]) -> str:
    """A 2-process run whose rank-0 loss is NaN at ``steps``; it must finish. Returns its output."""
    from pretrain.engine.health import NONFINITE_FAULT_ENV

    res = launch(run_dir, shards, extra=[*extra, "train.keep_last=20"], env_extra={NONFINITE_FAULT_ENV: steps})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert (run_dir / "DONE").is_file()
    return out


def test_skip_drops_the_update_of_a_non_finite_step_on_every_rank(shards, tmp_path):
    """Rank 0's loss is NaN at step 3 only: both ranks drop that step's update (weights and AdamW
    state stay those of step 2), count it, and the run goes on to the end."""
    run_dir = tmp_path / "skip"
    out = _finished_with_nan_at(run_dir, shards, "3", ["train.nonfinite=skip", "train.save_every_steps=1"])
    assert "non-finite loss at step 3: its update dropped (1 so far)" in out
    assert _same_training_state(_checkpoint(run_dir, 2), _checkpoint(run_dir, 3))
    assert not _same_training_state(_checkpoint(run_dir, 3), _checkpoint(run_dir, 4))
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert rows[3]["loss"] is None and rows[3]["nonfinite_steps"] == 1
    assert rows[2]["nonfinite_steps"] == 0 and rows[12]["nonfinite_steps"] == 1 and rows[12]["loss"] > 0
    assert (run_dir / "DONE").is_file()


def test_rollback_reloads_the_last_good_checkpoint_and_goes_on(shards, tmp_path):
    """NaN at step 4 with checkpoints every 2 steps: the weights and AdamW state saved at step 4
    are those of step 2, and the run finishes."""
    run_dir = tmp_path / "rollback"
    out = _finished_with_nan_at(run_dir, shards, "4", ["train.nonfinite=rollback"])
    assert "rolled back to step00000002; going on at step 4 with the next data" in out
    assert _same_training_state(_checkpoint(run_dir, 2), _checkpoint(run_dir, 4))
    assert not _same_training_state(_checkpoint(run_dir, 4), _checkpoint(run_dir, 6))
    assert (run_dir / "DONE").is_file()


def test_consecutive_non_finite_steps_stop_the_run(shards, tmp_path):
    from pretrain.engine import Checkpointer
    from pretrain.engine.health import NONFINITE_FAULT_ENV

    run_dir = tmp_path / "twice"
    res = launch(run_dir, shards, nproc=1, extra=["train.nonfinite=skip", "train.nonfinite_max_consecutive=2"],
                 env_extra={NONFINITE_FAULT_ENV: "3,4"})
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "non-finite loss at step 4: 2 consecutive non-finite steps (train.nonfinite_max_consecutive=2)" in out
    assert NO_TRACEBACK_OF_OURS not in out and "leaked semaphore" not in out  # our message alone
    assert Checkpointer(run_dir / "checkpoints").latest_tag() == "step00000002"


# slow: four launches (~30 s); the default suite keeps test_sigkill_and_resume_is_bit_exact[3] and stays near 15 min
@pytest.mark.slow
def test_three_kills_at_random_moments_end_like_an_uninterrupted_run(shards, uninterrupted, tmp_path):
    """The whole job is SIGKILLed 3 times at seeded random moments while it trains (a random step
    to reach, then a random fraction of a step: inside a step, a save, a log write); the rerun
    that follows ends with the uninterrupted run's weights, AdamW state and samples, bit for bit."""
    import random

    rng = random.Random(int(os.environ.get("IRPT_KILL_SEED", "0")))
    run_dir, metrics = tmp_path / "killed", tmp_path / "killed" / "metrics.jsonl"

    def logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.is_file() else 0

    moments = []
    for _ in range(3):
        proc = launch(run_dir, shards, wait=False)
        target, extra = rng.randint(0, 11), rng.uniform(0.0, 0.05)  # 12 steps take ~0.3 s on 2 cores
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and (logged() < target or not (run_dir / "config.yaml").is_file()):
            time.sleep(0.002)
        time.sleep(extra)
        moments.append((target, round(extra, 3), logged(), "ended first" if proc.poll() is not None else "killed"))
        kill_process_tree(proc)
    print("kills (target step, extra s, steps logged, what happened):", moments)
    res = launch(run_dir, shards)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _same_training_state(trainable(uninterrupted), trainable(run_dir)), moments
    assert samples(run_dir) == samples(uninterrupted), moments


def test_one_run_per_run_dir_and_no_orphaned_workers(shards, tmp_path):
    """While a run trains, a second launch on its directory is refused with the holder named.
    SIGKILL of the launcher alone (its workers live in sessions of their own) ends the workers
    too; the next launch takes the stale lock over and resumes (and is stopped one step later by
    the kill fault: the first run is made far too long to finish during the test)."""
    import psutil

    from pretrain.engine import Checkpointer

    run_dir, extra = tmp_path / "locked", ["train.epochs=2000", "train.save_every_steps=10"]
    first = launch(run_dir, shards, extra=extra, wait=False)
    ckpt = Checkpointer(run_dir / "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and ckpt.latest_tag() is None:
        time.sleep(0.05)
    workers = psutil.Process(first.pid).children(recursive=True)
    holder = json.loads((run_dir / ".lock").read_text())
    assert holder["pid"] in {w.pid for w in workers}
    second = launch(run_dir, shards, extra=extra)
    out = second.stdout + second.stderr
    assert second.returncode != 0 and f"{run_dir} is in use by PID {holder['pid']} on {holder['host']}" in out
    assert first.poll() is None
    os.kill(first.pid, signal.SIGKILL)  # the launcher alone
    first.communicate(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [p.pid for p in alive]
    resume_step = int(ckpt.choose()[0].removeprefix("step"))
    third = launch(run_dir, shards, extra=extra, env_extra={FAULT_ENV: str(resume_step + 1)})
    out = third.stdout + third.stderr
    assert f"took over the lock of {run_dir} from PID {holder['pid']}" in out, out[-3000:]
    assert f"resumed from step{resume_step:08d}" in out


def test_the_cpus_a_process_may_use_count_its_cgroups_quota(tmp_path, monkeypatch):
    """A pod limited to 8 CPUs of a 128-core node (a CFS quota, which os.cpu_count() and torch's
    thread count do not see) started a build worker per core and 64 threads per training process.
    The quota is read from the process's cgroup and those above it, v2 and v1."""
    from data_tools import cpus

    v2 = tmp_path / "v2"
    (v2 / "kubepods" / "pod1").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "kubepods" / "cpu.max").write_text("1600000 100000\n")  # 16 CPUs above
    (v2 / "kubepods" / "pod1" / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs on the pod
    assert cpus.cgroup_cpu_limit(v2, "0::/kubepods/pod1\n") == 2.5
    assert cpus.cgroup_cpu_limit(v2, "0::/\n") is None  # "max": no quota
    assert cpus.cgroup_cpu_limit(v2, "0::/elsewhere/abc\n") is None  # not mounted here, the root has none
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "c1").mkdir(parents=True)
    for folder, quota in ((v1 / "cpu,cpuacct", "-1"), (v1 / "cpu,cpuacct" / "docker" / "c1", "400000")):
        (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
        (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.cgroup_cpu_limit(v1, "4:cpu,cpuacct:/docker/c1\n3:memory:/docker/c1\n") == 4.0
    assert cpus.cgroup_cpu_limit(v1, "4:cpu,cpuacct:/\n") is None
    assert cpus.cgroup_cpu_limit(tmp_path / "none", "0::/\n") is None  # nothing readable

    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 2.5)
    affinity = len(os.sched_getaffinity(0))
    assert cpus.usable_cpus() == min(affinity, 3)  # a part of a CPU counts as one
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 0.1)
    assert cpus.usable_cpus() == 1
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    assert cpus.usable_cpus() == affinity
