"""Pieces of the training engine on their own: which evaluation makes the ``best`` checkpoint,
and how ``best`` is kept beside the step checkpoints."""
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.engine import Batching, Checkpointer, LoopSpec, TrainingPlan
from pretrain.engine.loop import MetricsLog, _evaluate_now
from pretrain.engine.streams import DataError, EpochLoader, ResumableStream


def test_best_is_the_first_evaluation_with_the_highest_metric(tmp_path):
    spec = LoopSpec(total_steps=10, steps_per_epoch=5, batching=Batching(1, 1, 1), seed=0, num_workers=0,
                    log_every=1, save_every=5, eval_every=2, best_metric="mIoU")
    values = {2: 0.5, 4: 0.7, 6: 0.7, 8: 0.6, 10: 0.65}
    state = {"step": 0}
    log = MetricsLog(tmp_path, 0, enabled=True)
    improved = {}
    for step, value in values.items():
        state["step"] = step
        improved[step] = _evaluate_now(lambda s, _: {"mIoU": value, "frames": 3, "per_class_iou": {"a": value}},
                                       state, spec, log, 0, None)
    assert improved == {2: True, 4: True, 6: False, 8: False, 10: False}
    assert state["best"] == {"metric": "mIoU", "value": 0.7, "step": 4}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1] == {"step": 4, "val/mIoU": 0.7, "val/frames": 3}  # scalars only
    # Other ranks take part in the evaluation but neither log nor decide.
    assert _evaluate_now(lambda s, _: {"mIoU": 0.9}, {"step": 12}, spec, log, 1, None) is False
    # A metric not defined on the split (None: a detection split whose objects are all ignored) is
    # logged as nothing and beats nothing.
    state["step"] = 12
    assert _evaluate_now(lambda s, _: {"mIoU": None, "frames": 3}, state, spec, log, 0, None) is False
    assert state["best"] == {"metric": "mIoU", "value": 0.7, "step": 4}
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 12, "val/frames": 3}


def test_keep_as_best_replaces_the_previous_best_with_a_complete_copy(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=1)
    for step, payload in ((4, b"four"), (8, b"eight")):
        tag = ckpt.directory / f"step{step:08d}"
        tag.mkdir(parents=True)
        (tag / "weights.pt").write_bytes(payload)
        ckpt.keep_as_best(tag.name, rank=0, best={"metric": "AP", "value": step / 10, "step": step})
        best = ckpt.directory / "best"
        assert (best / "weights.pt").read_bytes() == payload
        assert json.loads((best / "best.json").read_text()) == {"metric": "AP", "value": step / 10, "step": step,
                                                                "tag": tag.name}
    assert sorted(p.name for p in ckpt.directory.iterdir()) == ["best", "step00000004", "step00000008"]
    assert ckpt.tags() == ["step00000008", "step00000004"]  # best is no step checkpoint: never pruned, never resumed
    ckpt.keep_as_best("step00000004", rank=1, best={})  # only rank 0 writes
    assert json.loads((ckpt.directory / "best" / "best.json").read_text())["step"] == 8


def test_best_survives_pruning_of_its_step(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1)
    tag = tmp_path / "step00000002"
    tag.mkdir()
    (tag / "weights.pt").write_bytes(b"two")
    ckpt.keep_as_best(tag.name, 0, {"metric": "AP", "value": 0.1, "step": 2})
    (tmp_path / "step00000004").mkdir()
    ckpt._prune(keep="step00000004")
    assert not tag.exists() and (tmp_path / "best" / "weights.pt").read_bytes() == b"two"


def test_a_plan_that_takes_more_micro_batches_than_its_stream_yields_is_refused():
    def plan(steps_per_epoch, batches):
        return TrainingPlan(SimpleNamespace(stream=SimpleNamespace(batches_per_epoch=batches)), steps_per_epoch, 10)

    plan(3, 12).check(4, "seg")
    plan(3, 13).check(4, "seg")  # a micro-batch left over is no harm
    with pytest.raises(RuntimeError, match="seg: the training plan takes 1 steps x 4 accumulation = 4 micro-batches "
                                           "per epoch, but its data stream yields 3"):
        plan(1, 3).check(4, "seg")
    with pytest.raises(RuntimeError, match="takes 0 steps"):
        plan(0, 3).check(1, "det")


def test_an_effective_batch_that_is_no_multiple_of_the_batches_is_a_plan_error():
    from pretrain.engine import PlanError, resolve_batching

    train = SimpleNamespace(batch_size=4, accum_steps=1, effective_batch=24)
    assert resolve_batching(train, 2) == Batching(4, 3, 2)
    with pytest.raises(PlanError, match="effective_batch 24 is not a multiple of batch_size 4 x 4 processes"):
        resolve_batching(train, 4)


def test_a_first_ctrl_c_asks_to_save_a_second_stops_at_once_and_restore_puts_the_handlers_back():
    from pretrain.engine import StopSignals

    before = signal.getsignal(signal.SIGINT)
    signals = StopSignals(announce=False)
    try:
        assert not signals.requested
        signal.raise_signal(signal.SIGINT)
        assert signals.requested and signals.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("nested", [False, True], ids=["one-after-the-other", "inside-the-ctrl-c-handler"])
def test_ctrl_c_and_the_sigterm_passed_on_for_it_are_one_request_in_either_order(monkeypatch, nested):
    """The terminal's Ctrl-C reaches the trainer and run.sh (or torchrun), which passes it on as a
    SIGTERM. Where the SIGTERM's handler ran first, or inside the Ctrl-C's, the Ctrl-C was taken as the
    second one: the run ended unsaved (exit 130), now and then. Now both are one request, said as
    Ctrl-C; a Ctrl-C after that still stops at once."""
    import pretrain.engine.signals as signals_module
    from pretrain.engine import StopSignals

    first, second = (signal.SIGINT, signal.SIGTERM) if nested else (signal.SIGTERM, signal.SIGINT)
    if nested:  # the SIGTERM arrives while the Ctrl-C's handler runs
        arriving = [signal.SIGTERM]
        monkeypatch.setattr(signals_module, "leave_a_hung_up_terminal",
                            lambda: arriving and signal.raise_signal(arriving.pop()))
    signals = StopSignals(announce=False)
    try:
        try:
            signal.raise_signal(first)
            if not nested:
                signal.raise_signal(second)
        except KeyboardInterrupt:
            pytest.fail("the Ctrl-C was taken as a second one: stopped at once, unsaved")
        assert signals.requested and signals.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signals.restore()


def test_stop_polling_asks_before_each_of_the_first_polls_frames_and_stops_there():
    """An evaluation during training asks before each frame whether any rank got a stop request;
    only as many times as every rank has frames (the question is a collective)."""
    from pretrain.engine.signals import EvaluationStopped, stop_polling

    asked, seen = [], []
    with pytest.raises(EvaluationStopped):
        for frame in stop_polling("abcdef", 5, lambda: asked.append(1) or len(asked) == 3):
            seen.append(frame)
    assert seen == ["a", "b"] and len(asked) == 3
    asked.clear()
    assert list(stop_polling("abc", 2, lambda: asked.append(1) or False)) == list("abc") and len(asked) == 2
    assert list(stop_polling("abc", 3, None)) == list("abc")


def test_errors_the_user_acts_on_are_one_line_and_a_bug_keeps_its_traceback():
    import errno

    from torch._utils import ExceptionWrapper

    from pretrain.engine.loop import said_error
    from pretrain.engine.streams import DataError, PlanError

    full = said_error(OSError(errno.ENOSPC, "No space left on device"))
    assert full.startswith("error: a write failed (No space left on device): free space")
    assert said_error(OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/a/metrics.jsonl")).startswith(
        "error: a write failed (Disk quota exceeded: /runs/a/metrics.jsonl)")
    died = said_error(RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "))
    assert "died, perhaps for memory (PyTorch: DataLoader worker (pid 4242) is killed by signal: Killed)" in died
    assert said_error(PlanError("set data.samples_per_epoch=32 or more")) == "error: set data.samples_per_epoch=32 or more"
    lost = said_error(RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:19077. "
                                    "This is typically caused by a remote worker crashing."))
    assert lost.startswith("error: lost the connection to another process of this launch")
    try:  # raised in a loader worker: PyTorch writes the worker's traceback into the message
        raise DataError("no frame of the dataset could be loaded any more")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as raised:
        wrapped.reraise()
    assert "Original Traceback" in str(raised.value)
    assert said_error(raised.value) == "error: no frame of the dataset could be loaded any more"
    assert said_error(OSError(errno.EACCES, "Permission denied")) is None  # not the disk's fullness: a traceback
    assert said_error(RuntimeError("shape mismatch")) is None and said_error(KeyError("encoder")) is None


def test_a_background_threads_full_disk_is_left_to_the_main_thread(monkeypatch, capsys):
    """TensorBoard's writer thread hits the full disk first and hands the error to the main thread's
    next write (one line there); the thread's own traceback would print over that line."""
    import errno
    import threading

    from pretrain.engine.loop import _storage_errors_said_by_the_main_thread

    monkeypatch.setattr(threading, "excepthook", _storage_errors_said_by_the_main_thread)

    def fails(error):
        raise error

    for error in (OSError(errno.ENOSPC, "No space left on device"), ValueError("a bug in a thread")):
        t = threading.Thread(target=fails, args=(error,))
        t.start()
        t.join()
    err = capsys.readouterr().err
    assert "No space left" not in err and "ValueError: a bug in a thread" in err


class _StoppedAtUnpickling:
    """Sends its own process a Ctrl-C and a SIGTERM when a spawned loader worker unpickles it, before
    PyTorch's worker loop and its ``worker_init_fn`` run (a stop to the whole process group then)."""

    def __init__(self):
        self.pid = None  # a state to pickle: without one, unpickling does not call __setstate__

    def __setstate__(self, state):
        self.__dict__.update(state, pid=os.getpid())
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)

    def eval_sample(self, i):
        return self.pid


def test_evaluation_workers_outlive_a_stop_from_their_start():
    """A Ctrl-C in the second a fresh evaluation worker spends importing would kill it, read as a
    worker that died of memory, and end the run unsaved: the workers are born with the stop signals
    blocked, and discard them once they ignore them."""
    from finetune.data.eval_frames import eval_loader

    before = signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    (pid,) = list(eval_loader(_StoppedAtUnpickling(), [0], workers=1))
    assert pid not in (None, os.getpid())  # read by the worker, which outlived both signals
    assert (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])) == before


class _LargeFrames:
    """An evaluation dataset whose pickle (0.9 MB) outgrows a pipe's buffer, as a large split's frame list does."""

    def __init__(self):
        self.names = [f"frame{i:07d}" for i in range(60_000)]

    def eval_sample(self, i):
        return self.names[i]


class _LargeFrameList:
    """A training dataset whose pickle outgrows a pipe's buffer as well (frame names, one number each)."""

    def __init__(self):
        self.frames = [(f"frame{i:07d}", i) for i in range(60_000)]

    def __len__(self):
        return len(self.frames)

    def train_sample(self, i, rng):
        return {"name": self.frames[i][0], "value": torch.tensor([self.frames[i][1]])}

    def collate(self, samples):
        return {"value": torch.cat([s["value"] for s in samples])}


@pytest.fixture
def spawn_pipe_bytes(monkeypatch):
    """The bytes each process spawned from now on is handed through its pipe (what it runs, pickled)."""
    import multiprocessing.reduction

    sizes, dump = [], multiprocessing.reduction.dump

    def measured(obj, file, protocol=None):
        before = file.tell()
        dump(obj, file, protocol)
        if isinstance(obj, multiprocessing.process.BaseProcess):
            sizes.append(file.tell() - before)

    monkeypatch.setattr(multiprocessing.reduction, "dump", measured)
    return sizes


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_workers_get_a_large_dataset_in_shared_memory(workers, spawn_pipe_bytes, capfd):
    """Spawned evaluation workers were handed the whole dataset pickled through a pipe, and the spawn
    waited for each to import torch and read it, one after the other (1.6 s a worker for a 1 MB one,
    at every evaluation). It now travels in a block of shared memory each worker inherits; what goes
    through the pipe stays small, and the frames are the same, also when they are left early."""
    import pickle

    from finetune.data.eval_frames import eval_loader

    dataset, indices = _LargeFrames(), [5, 17, 59_999]
    assert len(pickle.dumps(dataset)) > 2**16  # a pipe's buffer
    assert list(eval_loader(dataset, indices, workers)) == ["frame0000005", "frame0000017", "frame0059999"]
    assert len(spawn_pipe_bytes) == workers and all(size < 2**14 for size in spawn_pipe_bytes)
    frames = eval_loader(dataset, indices, workers)
    assert next(frames) == "frame0000005"
    frames.close()  # left after one frame (a stop request): the other worker may still be starting
    assert "Traceback" not in capfd.readouterr().err


def test_training_loader_workers_get_a_large_dataset_in_shared_memory_and_the_position_beside_it(spawn_pipe_bytes):
    """The same for the persistent workers of a training loader, whose stream also holds its position in
    shared memory of its own: set after the workers started, each epoch's start reaches them."""
    from finetune.data.stream import MapBatchStream
    from pretrain.engine import EpochLoader

    def batches(workers: int, epoch: int, start: int) -> list[tuple[int, list[int]]]:
        return [(b["batch"], b["value"].tolist()) for b in loader[workers].epoch(epoch, start)]

    dataset = _LargeFrameList()
    loader = {w: EpochLoader(MapBatchStream(dataset, batch_size=2, seed=3), w) for w in (0, 2)}
    for w in (0, 2):
        loader[w].stream.batches_per_epoch = 5  # a few batches of the 30,000 an epoch holds
    first = batches(2, epoch=0, start=0)
    assert first == batches(0, epoch=0, start=0) and [b for b, _ in first] == [0, 1, 2, 3, 4]
    assert len(spawn_pipe_bytes) == 2 and all(size < 2**14 for size in spawn_pipe_bytes)
    assert batches(2, epoch=1, start=3) == batches(0, epoch=1, start=3) != first[3:]
    assert len(spawn_pipe_bytes) == 2  # persistent: started once
    assert loader[2].stream._shared_state is None  # the parent's own reference went after the start


def test_loader_workers_get_their_dataset_through_their_pipes_where_no_shared_memory_is_left(
        spawn_pipe_bytes, monkeypatch, capfd):
    """A full /dev/shm and temporary folder: the dataset goes the slow way, and a line says why."""
    import errno
    import multiprocessing as mp

    from finetune.data.eval_frames import eval_loader

    def no_room(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(mp.get_context("spawn")), "RawArray", no_room)
    assert list(eval_loader(_LargeFrames(), [5, 17], workers=1)) == ["frame0000005", "frame0000017"]
    assert len(spawn_pipe_bytes) == 1 and spawn_pipe_bytes[0] > 2**16
    err = capfd.readouterr().err
    assert "note: loader workers get their dataset through their pipes" in err and "No space left" in err


def test_a_stop_while_loader_workers_are_spawned_is_taken_once_they_are():
    """Handing each spawned worker a large pickled dataset takes seconds; a SIGTERM meanwhile was
    ignored with the workers (lost: the run went on until the scheduler's SIGKILL). It is held back
    while they are spawned, then taken."""
    from pretrain.engine import StopSignals
    from pretrain.engine.signals import stop_signals_held

    signals = StopSignals(announce=False)
    try:
        with stop_signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # taken in this thread at once; a few bytecodes later if another thread got it
            if signals.requested:
                break
            time.sleep(0.01)
        assert signals.requested and signals.signal_name == "SIGTERM"
    finally:
        signals.restore()


def test_the_resource_tracker_is_born_with_the_stop_signals_blocked():
    """Started inside ``stop_signals_held`` (with the first loader worker), Python's resource tracker
    keeps the stop signals it does not ignore itself blocked: a preemption notice (SIGUSR1) to the
    process group no longer kills it."""
    import subprocess

    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc")
    code = ("import multiprocessing.resource_tracker as rt\n"
            "from pretrain.engine.signals import stop_signals_held\n"
            "with stop_signals_held():\n    pass\n"
            "status = open(f'/proc/{rt._resource_tracker._pid}/status').read().splitlines()\n"
            "print(next(line for line in status if line.startswith('SigBlk')).split()[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert int(out, 16) & (1 << (signal.SIGUSR1 - 1))


def test_a_stop_request_on_any_rank_is_every_ranks_and_loader_workers_ignore_stops(monkeypatch):
    """Another rank stands in through the all-reduce (its flag set): this rank stops too."""
    import torch.distributed as dist

    from data_tools.command import STOP_SIGNALS, restore_handlers
    from pretrain.engine import StopSignals
    from pretrain.engine.signals import ignore_preemption_signals

    def another_rank_asked(flag, op):
        assert op == dist.ReduceOp.MAX
        flag.fill_(1.0)

    signals = StopSignals(announce=False)
    try:
        assert signals.requested is False
        monkeypatch.setattr(dist, "all_reduce", another_rank_asked)
        assert signals.any_rank_requested(torch.device("cpu")) is True
    finally:
        signals.restore()
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        ignore_preemption_signals(0)
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in STOP_SIGNALS)
    finally:
        restore_handlers(before)


def test_a_resume_by_a_version_that_deals_samples_otherwise_starts_the_streams_afresh():
    from pretrain.engine.batching import fit_positions_to_stream_order
    from pretrain.engine.loop import new_state

    state = dict(new_state(2), epoch=3, batch=5, positions=[40, 36])  # saved before the version was recorded
    note = fit_positions_to_stream_order(state, 2, needs_positions=True)
    assert state["positions"] == [0, 0] and state["stream_order"] == 2
    assert note.startswith("this version of the toolkit deals the samples to its loader streams otherwise than the "
                           "one that saved the checkpoint (order 1 -> 2): the rest of epoch 3 is read from the start")
    state["positions"] = [7, 9]  # the same version again: nothing changes
    assert fit_positions_to_stream_order(state, 2, needs_positions=True) is None and state["positions"] == [7, 9]
    state = dict(new_state(2), epoch=3, batch=0, positions=[40, 36])  # at an epoch's start: no note
    assert fit_positions_to_stream_order(state, 2, needs_positions=True) is None and state["positions"] == [0, 0]
    state = dict(new_state(1), batch=5)  # fine-tuning's streams keep order 1
    assert fit_positions_to_stream_order(state, 1, needs_positions=False) is None and state["stream_order"] == 1


def test_a_resume_under_a_plan_that_cuts_epochs_otherwise_says_so():
    from pretrain.engine.batching import fit_state_to_plan
    from pretrain.engine.loop import new_state

    state = dict(new_state(4), step=210)  # a checkpoint that recorded no plan: nothing to compare
    assert fit_state_to_plan(state, 43, 4300) is None and state["plan"] == {"steps_per_epoch": 43, "total_steps": 4300}
    assert fit_state_to_plan(state, 43, 4300) is None  # the same plan
    state["plan"] = {"steps_per_epoch": 40, "total_steps": 4000}
    assert fit_state_to_plan(state, 43, 4300) == (
        "this run's epochs were 40 steps (4000 in all) when the checkpoint was written and are 43 (4300) now: the "
        "learning-rate schedule goes on over the new length from step 210")
    assert state["plan"]["steps_per_epoch"] == 43


def test_an_optimiser_group_layout_that_changed_is_named_by_parameter():
    from pretrain.engine.optim import group_layout_problem

    then = [["a.weight", "b.weight"], ["a.bias"]]
    assert group_layout_problem(None, then) is None  # a checkpoint that recorded none: nothing to compare
    assert group_layout_problem(then, [list(g) for g in then]) is None
    said = group_layout_problem(then, [["a.weight"], ["b.weight", "a.bias"], ["c.gamma"]])
    assert said.startswith("the optimiser's parameter groups differ from the checkpoint's (trained now: 1 (e.g. "
                           "c.gamma); in another optimiser group: 2 (e.g. b.weight, a.bias)): its AdamW state")
    assert "no longer trained: 1 (e.g. a.bias)" in group_layout_problem(then, [["a.weight", "b.weight"]])


def test_each_group_steps_at_the_learning_rate_times_its_scale_and_a_gated_group_not_at_all():
    """Layer-wise lr decay: the loop's learning rate reaches each group times its ``lr_scale``. AdamW's
    first step moves every weight by about its group's rate (m / sqrt(v) = sign of the gradient), so a
    group at scale 0.25 moves a quarter as far; a gated group (PAD's held-back predictor) stays put."""
    from pretrain.engine.optim import UpdateHold, hold_gated_groups, set_lr

    weights = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    groups = [{"params": [w], "lr_scale": scale, "weight_decay": 0.0, "gated": gated}
              for w, scale, gated in zip(weights, (1.0, 0.25, 1.0), (False, False, True))]
    optimizer = hold_gated_groups(torch.optim.AdamW(groups, lr=0.0), UpdateHold())
    set_lr(optimizer, 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.025, 0.1])
    for w in weights:
        w.grad = torch.tensor([1.0, -2.0, 3.0, -4.0])
    optimizer.step()
    signs = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    torch.testing.assert_close(weights[0].detach(), 0.1 * signs, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights[1].detach(), 0.025 * signs, rtol=1e-4, atol=1e-6)
    assert torch.equal(weights[2].detach(), torch.zeros(4)) and weights[2].grad is not None


def test_the_deepspeed_config_counts_every_process_in_the_global_batch_and_names_its_precision():
    from pretrain.engine.optim import deepspeed_config

    cfg = deepspeed_config(4, 2, 8, "bf16_autocast", 1, 3.0)
    batch = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
    assert batch == (64, 4, 2)  # 4 frames x 2 micro-batches x 8 processes
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in cfg
    assert cfg["zero_optimization"] == {"stage": 1} and cfg["gradient_clipping"] == 3.0
    assert deepspeed_config(4, 2, 8, "bf16", 1, 3.0)["bf16"] == {"enabled": True}
    assert not {"bf16", "torch_autocast"} & set(deepspeed_config(4, 2, 8, "fp32", 1, 3.0))
    with pytest.raises(ValueError, match="precision must be bf16_autocast, bf16 or fp32, got 'fp16'"):
        deepspeed_config(4, 2, 8, "fp16", 1, 3.0)


def test_a_resume_with_another_loader_worker_count_starts_the_new_workers_streams_afresh():
    from pretrain.engine.batching import fit_positions_to_workers
    from pretrain.engine.loop import new_state

    state = dict(new_state(2), epoch=3, batch=5, positions=[40, 36])
    note = fit_positions_to_workers(state, 1, needs_positions=True)
    assert state["positions"] == [0]
    assert note.startswith("data.num_workers changed (2 -> 1 loader streams): the rest of epoch 3 is read from")
    state = dict(new_state(2), epoch=3, batch=0, positions=[40, 36])  # at an epoch's start nothing changes
    assert fit_positions_to_workers(state, 4, needs_positions=True) is None and state["positions"] == [0] * 4
    state = dict(new_state(2), batch=5, positions=[40, 36])  # fine-tuning: a batch is the same from any worker
    assert fit_positions_to_workers(state, 1, needs_positions=False) is None
    state = dict(new_state(0), batch=5, positions=[7])  # 0 workers read as one stream, as 1 worker does
    assert fit_positions_to_workers(state, 1, needs_positions=True) is None and state["positions"] == [7]


def test_a_config_equal_but_for_how_its_data_is_loaded():
    from data_tools.config import config_hash, equal_but_for
    from pretrain.engine.loop import LOADING_KEYS

    then = {"data": {"num_workers": 2, "prefetch_factor": 2, "shards": ["a"]}, "train": {"steps": 10}}
    now = {"data": {"num_workers": 1, "prefetch_factor": 4, "shards": ["a"]}, "train": {"steps": 10}}
    assert equal_but_for(then, config_hash(then), now, LOADING_KEYS)
    assert now["data"]["num_workers"] == 1  # the config compared is left as it was
    assert not equal_but_for(then, config_hash(then), dict(now, train={"steps": 11}), LOADING_KEYS)
    later = {"data": {**now["data"], "pin_memory": True}, "train": {"steps": 10}}  # a setting added since
    assert equal_but_for(then, config_hash(then), later, LOADING_KEYS)


def test_the_launchers_module_names_its_launchers_when_given_another(capsys):
    from pretrain.engine.launchers import main

    for argv in ([], ["mpirun", "-n", "2"]):
        assert main(argv) == 2
        said = capsys.readouterr().err
        assert "usage: python -m pretrain.engine.launchers {torchrun,deepspeed} LAUNCHER_ARGS..." in said


@pytest.mark.parametrize("ctrl_c_first", [False, True], ids=["sigterm-first", "ctrl-c-first"])
def test_torchrun_takes_a_repeated_stop_signal_as_one_request_but_a_second_ctrl_c_counts(ctrl_c_first):
    """A scheduler's SIGTERM to the group and run.sh's pass-on of it reach torchrun twice, as do a
    Ctrl-C's SIGINT and run.sh's SIGTERM for it, in either order; its handler (by the name torch
    installs it under) raises for the first only, and again for a second Ctrl-C."""
    from torch.distributed.elastic.multiprocessing import SignalException, api as elastic_api

    from pretrain.engine.launchers import _one_stop_request

    assert callable(elastic_api._terminate_process_handler)  # the name torchrun installs its handler by
    fake = SimpleNamespace(_terminate_process_handler=elastic_api._terminate_process_handler)
    requests = _one_stop_request(fake)
    with pytest.raises(SignalException):
        fake._terminate_process_handler(signal.SIGINT if ctrl_c_first else signal.SIGTERM, None)
    assert fake._terminate_process_handler(signal.SIGTERM, None) is None
    assert fake._terminate_process_handler(signal.SIGUSR1, None) is None
    if not ctrl_c_first:
        assert fake._terminate_process_handler(signal.SIGINT, None) is None  # the Ctrl-C run.sh passed on first
    assert requests.signum == signal.SIGINT  # said as the Ctrl-C it was
    with pytest.raises(SignalException):
        fake._terminate_process_handler(signal.SIGINT, None)


@pytest.fixture
def deepspeed_wrapper(monkeypatch):
    """The DeepSpeed launcher wrapper, run in this process: the launcher's own ``main`` is set by the
    test; the signal handlers and the environment variable the wrapper sets for its whole process are
    put back after."""
    import deepspeed.launcher.runner as runner

    from data_tools.command import HANGUP_STOPS_ENV, STOP_SIGNALS, restore_handlers
    from pretrain.engine.launchers import deepspeed

    monkeypatch.delenv(HANGUP_STOPS_ENV, raising=False)
    before = {sig: signal.getsignal(sig) for sig in {*STOP_SIGNALS, signal.SIGHUP, signal.SIGINT, signal.SIGTERM,
                                                     signal.SIGUSR1}}

    def run(launcher_main, argv):
        monkeypatch.setattr(runner, "main", launcher_main)
        return deepspeed(argv)

    yield run
    restore_handlers(before)
    os.environ.pop(HANGUP_STOPS_ENV, None)


@pytest.mark.parametrize("stop, passed_as, status", [(signal.SIGINT, signal.SIGINT, 130),
                                                     (signal.SIGUSR1, signal.SIGTERM, 138)])
def test_the_deepspeed_launcher_passes_a_stop_on_to_its_node_launcher_and_waits_for_it(
        deepspeed_wrapper, capsys, stop, passed_as, status):
    """DeepSpeed's launcher stands in as a function that starts one child (its per-node launcher),
    gets the stop signal, and waits for the child, ending with its status. The child gets the signal
    (a SIGUSR1, which would kill DeepSpeed's per-node launcher, as SIGTERM); the same request again is
    not passed on; the launcher's line names the stop, and its status is the shell's for it."""
    import subprocess

    child_code = ("import signal, sys, time\n"
                  "got = []\n"
                  "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):\n"
                  "    signal.signal(s, lambda n, f: got.append(n))\n"
                  "print('ready', flush=True)\n"
                  "while not got:\n    time.sleep(0.01)\n"
                  "time.sleep(0.3)\n"  # a repeat would arrive meanwhile
                  "sys.exit(len(got) * 100 + got[0])\n")
    seen = {}

    def launcher_main(argv):
        child = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        os.kill(os.getpid(), stop)
        os.kill(os.getpid(), signal.SIGTERM)  # the same request, passed on by run.sh
        seen["child"] = child.wait()
        raise SystemExit(seen["child"])

    assert deepspeed_wrapper(launcher_main, ["--num_gpus", "2", "train.py"]) == status
    assert seen["child"] == 100 + passed_as  # one signal, as passed on
    assert f"deepspeed: {stop.name} passed on to its processes" in capsys.readouterr().err


@pytest.mark.parametrize("ends, status", [(SystemExit(3), 3), (SystemExit(None), 0), (SystemExit("no hosts"), 1),
                                          (None, 0), (signal.SIGTERM, 143)])
def test_the_deepspeed_launcher_ends_with_its_processes_status_or_a_stops(deepspeed_wrapper, monkeypatch, capsys,
                                                                        ends, status):
    """Its status passed on as it ends (a message instead of a number: 1); a stop before it started
    any process ends it at once, with the stop's status and line."""
    import psutil

    def launcher_main(argv):
        if isinstance(ends, SystemExit):
            raise ends
        if ends is not None:
            os.kill(os.getpid(), ends)
            time.sleep(5)  # ended by the stop before this

    monkeypatch.setattr(psutil.Process, "children", lambda self, recursive=False: [])  # none started yet
    assert deepspeed_wrapper(launcher_main, []) == status
    assert ("deepspeed: SIGTERM passed on" in capsys.readouterr().err) == (ends == signal.SIGTERM)


@pytest.mark.parametrize("under_nohup", [False, True])
def test_torchrun_keeps_a_hang_up_ignored_under_nohup(monkeypatch, under_nohup):
    """torch before 2.9 handles SIGHUP whatever --signals-to-handle would say: under nohup the run
    ended with its terminal. The handler torchrun installs drops it there; otherwise it is a stop."""
    from torch.distributed.elastic.multiprocessing import SignalException, api as elastic_api

    from pretrain.engine import launchers

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) + (() if under_nohup else (signal.SIGHUP,))
    monkeypatch.setattr(launchers, "STOP_SIGNALS", stops)
    fake = SimpleNamespace(_terminate_process_handler=elastic_api._terminate_process_handler)
    launchers._one_stop_request(fake)
    if under_nohup:
        assert fake._terminate_process_handler(signal.SIGHUP, None) is None
        with pytest.raises(SignalException):  # and a stop request after it still counts
            fake._terminate_process_handler(signal.SIGTERM, None)
    else:
        with pytest.raises(SignalException):
            fake._terminate_process_handler(signal.SIGHUP, None)


@pytest.mark.parametrize("torch_has_the_flag", [False, True])
def test_torchrun_of_a_torch_before_2_9_passes_sigusr1_on(monkeypatch, torch_has_the_flag):
    """Without --signals-to-handle (torch before 2.9) torchrun left SIGUSR1 to its default action (the
    launcher died, its processes unsaved); there the launcher sets torchrun's own handler for it."""
    import argparse

    import torch.distributed.run as run
    from torch.distributed.elastic.multiprocessing import SignalException, api as elastic_api

    from pretrain.engine.launchers import _handle_sigusr1_before_torch_2_9

    def old_parser():
        parser = argparse.ArgumentParser()
        parser.add_argument("--nproc-per-node")
        if torch_has_the_flag:
            parser.add_argument("--signals-to-handle")
        return parser

    monkeypatch.setattr(run, "get_args_parser", old_parser)
    fake = SimpleNamespace(_terminate_process_handler=elastic_api._terminate_process_handler)
    before = signal.getsignal(signal.SIGUSR1)
    try:
        _handle_sigusr1_before_torch_2_9(fake)
        handler = signal.getsignal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, before)
    if torch_has_the_flag:
        assert handler is before
    else:
        with pytest.raises(SignalException) as stop:
            handler(signal.SIGUSR1, None)
        assert stop.value.sigval == signal.SIGUSR1


@pytest.mark.parametrize("args, apart", [
    (["--nnodes", "2", "--master_addr", "node0", "--master_port", "29500"], None),  # static: run.sh's
    (["--nnodes", "2:4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400"], "1"),
    (["--standalone", "--nproc_per_node", "2"], "1"),
])
def test_torchrun_rounds_form_their_groups_apart_under_a_dynamic_rendezvous(args, apart):
    from torch.distributed.run import get_args_parser

    from pretrain.engine.launchers import _round_stores_apart

    env = {}
    _round_stores_apart(get_args_parser().parse_args([*args, "-m", "pretrain", "train"]), env)
    assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == apart
    given = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}
    _round_stores_apart(get_args_parser().parse_args([*args, "train.py"]), given)
    assert given == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}  # a value given wins


def test_torchrun_leaves_no_folder_behind_unless_a_process_wrote_its_record(tmp_path):
    """torchrun makes a torchelastic_* folder per launch and never removes it; through run.sh's wrapper
    it is removed when empty, kept (and said) when a process wrote its error record there, and a
    --log-dir given is the user's."""
    import subprocess

    from pretrain.engine import free_port
    from tests.conftest import ROOT

    script = tmp_path / "worker.py"
    script.write_text("import sys\n"
                      "from torch.distributed.elastic.multiprocessing.errors import record\n"
                      "@record\n"
                      "def main():\n"
                      "    if len(sys.argv) > 1:\n"
                      "        raise RuntimeError('failed on purpose')\n"
                      "main()\n")

    def launch(*args):
        temp = tmp_path / f"tmp{len(list(tmp_path.glob('tmp*')))}"
        temp.mkdir()
        res = subprocess.run([sys.executable, "-m", "pretrain.engine.launchers", "torchrun", "--nproc_per_node", "1",
                              "--master_port", str(free_port()), *args], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, TMPDIR=str(temp), PYTHONPATH=str(ROOT)), timeout=300)
        return res, sorted(p.name for p in temp.glob("torchelastic_*"))

    res, left = launch(str(script))
    assert res.returncode == 0 and left == [], res.stderr[-2000:]
    res, left = launch(str(script), "fail")
    assert res.returncode != 0 and len(left) == 1 and left[0].startswith("torchelastic_")
    assert f"torchrun: its processes' records are kept in {tmp_path / 'tmp1' / left[0]}" in res.stderr
    assert [p.name for p in (tmp_path / "tmp1" / left[0]).rglob("*") if p.is_file()] == ["error.json"]
    res, left = launch("--log-dir", str(tmp_path / "logs"), str(script))
    assert res.returncode == 0 and left == [] and (tmp_path / "logs").is_dir()


@pytest.mark.parametrize("backend, expected", [("nccl", {"device_ids": [3]}), ("gloo", {})])
def test_a_barrier_names_the_gpu_of_its_process_on_nccl(monkeypatch, backend, expected):
    """NCCL without the device guesses it and warns at every barrier (seen on an H200); gloo takes none."""
    import torch
    import torch.distributed as dist

    from pretrain.engine.distributed import barrier

    calls = []
    monkeypatch.setattr(dist, "get_backend", lambda: backend)
    monkeypatch.setattr(dist, "barrier", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    barrier()
    assert calls == [expected]



def test_plain_batchnorm_statistics_are_averaged_over_ranks_and_syncbatchnorm_left_alone(monkeypatch):
    """Another rank stands in through the all-reduce, its running statistics 3 where ours are 1."""
    import torch.distributed as dist

    from pretrain.engine.distributed import average_over_ranks, batchnorm_statistics

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.SyncBatchNorm(3), torch.nn.BatchNorm1d(4),
                                torch.nn.BatchNorm1d(5, track_running_stats=False))
    stats = batchnorm_statistics(model)
    assert [tuple(b.shape) for b in stats] == [(2,), (2,), (4,), (4,)]  # mean and var of the plain ones
    for b in stats:
        b.fill_(1.0)
    average_over_ranks(stats)  # one process: nothing to average, no collective
    assert all(bool((b == 1.0).all()) for b in stats)

    def other_rank_holds_three(flat):
        flat += 3.0
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", other_rank_holds_three)
    average_over_ranks(stats)
    assert all(bool((b == 2.0).all()) for b in stats) and bool((model[1].running_mean == 0).all())


@pytest.mark.parametrize("version, world, bound", [("2.15.0", 2, True), ("2.15.0", 1, False), ("2.6.1", 2, False),
                                                    ("2.7.1", 2, True)])
def test_an_nccl_group_is_bound_to_its_gpu_except_alone_or_where_binding_hangs(monkeypatch, version, world, bound):
    from torch.torch_version import TorchVersion

    from pretrain.engine.distributed import _device_binding

    monkeypatch.setattr(torch, "__version__", TorchVersion(version))
    assert _device_binding(True, 1, {"WORLD_SIZE": str(world)}) == ({"device_id": torch.device("cuda", 1)}
                                                                    if bound else {})
    assert _device_binding(False, 0, {"WORLD_SIZE": "2"}) == {}


def test_each_restart_of_torchruns_workers_forms_its_group_under_a_prefix_of_its_own(monkeypatch):
    import torch.distributed as dist

    from pretrain.engine.distributed import restart_safe_store

    made = []
    monkeypatch.setattr(dist, "TCPStore", lambda *args, **kwargs: made.append((args, kwargs)) or "agent")
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: (prefix, store))
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "WORLD_SIZE": "8"}
    assert restart_safe_store(env, 60) is None and made == []  # not under torchrun's agent store
    env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    assert restart_safe_store(env, 60) == ("irpt/restart0", "agent")
    assert restart_safe_store({**env, "TORCHELASTIC_RESTART_COUNT": "2"}, 60) == ("irpt/restart2", "agent")
    assert made[0] == (("10.0.0.1", 29400, 8), {"is_master": False, "timeout": 60})


class ShortStream(ResumableStream):
    """6 batches an epoch, of which the workers hand over only the first ``delivered`` (the others
    lost, as when /dev/shm has no room for them)."""

    def __init__(self, delivered: int):
        super().__init__(6)
        self.delivered = delivered

    def __iter__(self):
        _, _, mine = self.my_batches()
        for b in mine[:self.delivered]:
            yield {"batch": b, "images": torch.zeros(2, 1, 8, 8, dtype=torch.uint8)}


def test_an_epoch_that_ends_short_is_an_error_saying_why_not_a_bare_stop_iteration(monkeypatch, capsys):
    """A loader worker whose batch does not fit in /dev/shm (64 MiB in a container by default) prints
    a traceback and the batch is lost: the epoch ended short and the loop died of a bare
    StopIteration. Now the epoch's end is checked, and the first batch's size against /dev/shm."""
    import shutil
    from collections import namedtuple

    assert [b["batch"] for b in EpochLoader(ShortStream(6), 0).epoch(0)] == list(range(6))
    assert [b["batch"] for b in EpochLoader(ShortStream(6), 0).epoch(1, 4)] == [4, 5]  # resumed: from batch 4
    batches = EpochLoader(ShortStream(3), 0).epoch(0)
    assert [next(batches)["batch"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(DataError, match=r"the data loader ended epoch 0 after 3 of 6 batches: .* `unable to allocate "
                                        r"shared memory`: the workers pass batches through /dev/shm, which holds "):
        next(batches)

    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 * 2**20, 0, 64 * 2**20))
    loader = EpochLoader(ShortStream(6), 2, prefetch_factor=4)
    frames = torch.zeros(256, 1, 224, 224, dtype=torch.uint8)  # 12.25 MiB
    loader._warn_if_shared_memory_is_short({"batch": 0, "images": frames})  # 2 x 4 + 1 of them
    assert capsys.readouterr().err == (
        "warning: the batches in flight may take 110 MiB of shared memory: the workers pass batches through "
        "/dev/shm, which holds 64 MiB here: give it more (a container: docker run --shm-size=8g), or lower "
        "data.num_workers (2), data.prefetch_factor (4) or the batch size\n")
    loader._warn_if_shared_memory_is_short({"batch": 0, "images": frames[:16]})  # 7 MiB: room
    assert capsys.readouterr().err == ""


def test_deepspeed_builds_its_cpu_op_in_the_environment_not_under_a_home_that_may_be_read_only(tmp_path):
    """Torch's extension cache defaults to HOME, and a CPU run whose HOME was missing or read-only (a
    container run as another user) ended with `No such file or directory: HOME` when DeepSpeed built
    its communication op. The first writable of the virtual environment's folder, torch's default and
    a temporary one is used, unless TORCH_EXTENSIONS_DIR says."""
    from pretrain.engine.distributed import default_extensions_dir

    env = {}
    default_extensions_dir(env, (Path("/proc/no-home/.cache/torch_extensions"), tmp_path / "tmp" / "torch_extensions"))
    assert env == {"TORCH_EXTENSIONS_DIR": str(tmp_path / "tmp" / "torch_extensions")}
    env = {"TORCH_EXTENSIONS_DIR": "/mine"}
    default_extensions_dir(env, (tmp_path,))
    assert env == {"TORCH_EXTENSIONS_DIR": "/mine"}
    env = {}
    default_extensions_dir(env, (Path("/proc/no-home/torch_extensions"),))
    assert env == {}  # torch's own default then
    env = {}
    default_extensions_dir(env)
    assert sys.prefix != sys.base_prefix  # the suite runs in run.sh's virtual environment
    assert env == {"TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}  # the environment's


def test_a_resume_onto_another_split_of_the_global_batch_goes_on_at_the_same_step_of_the_epoch():
    from pretrain.engine.batching import fit_state_to_batching
    from pretrain.engine.loop import new_state

    then, now = Batching(64, 1, 8), Batching(64, 2, 4)
    state = dict(new_state(8), step=700, epoch=2, batch=13, positions=[5] * 8)
    note = fit_state_to_batching(state, then, now, steps_per_epoch=344, workers=6, needs_positions=True)
    assert (state["epoch"], state["batch"], state["positions"]) == (2, (700 - 688) * 2, [0] * 6)
    assert state["batching"] == {"micro": 64, "accum": 2, "world": 4}
    assert note == ("the checkpoint's global batch 512 = 64 x 1 accumulation x 8 processes goes on as 512 = 64 x 2 "
                    "accumulation x 4 processes; the rest of epoch 2 is read from the start of the new streams, not "
                    "in the order an uninterrupted run reads it")
    state = dict(new_state(8), step=688, epoch=2, batch=0)  # at an epoch's start: the same samples
    assert fit_state_to_batching(state, then, now, 344, 8, True).endswith("4 processes")
    state = dict(new_state(8), step=700, epoch=2, batch=13)  # a map-style stream: the same frames
    assert fit_state_to_batching(state, then, now, 344, 8, False).endswith("4 processes")
    state = dict(new_state(8), step=700, epoch=2, batch=12, positions=[5] * 8)
    assert fit_state_to_batching(state, then, then, 344, 8, True) is None and state["positions"] == [5] * 8


def test_a_resume_keeps_the_global_batch_and_an_optimiser_state_split_among_its_processes(tmp_path):
    from omegaconf import OmegaConf

    from pretrain.engine.batching import layout_problem, saved_batching

    tag = tmp_path / "step00000004"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert layout_problem(Batching(64, 1, 8), Batching(64, 2, 4), tag) is None
    assert layout_problem(Batching(64, 1, 8), Batching(32, 1, 8), tag).startswith(
        "the checkpoint's global batch is 512 = 64 x 1 accumulation x 8 processes, this run's 256 = 32 x 1 "
        "accumulation x 8 processes: resume with the same global batch (train.effective_batch=512")
    (tag / "bf16_zero_pp_rank_7_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert layout_problem(Batching(64, 1, 8), Batching(64, 2, 4), tag) == (
        "the checkpoint was written by 8 processes with the optimiser state split among them (train.zero_stage >= 1), "
        "this run has 4: resume with 8 processes")
    assert layout_problem(Batching(64, 1, 8), Batching(32, 2, 8), tag) is None  # the same processes
    # a checkpoint that does not record its batching: the run's own config, with the world it was written by
    OmegaConf.save(OmegaConf.create({"train": {"batch_size": 8, "accum_steps": 1, "effective_batch": 64}}),
                   tmp_path / "config.yaml")
    assert saved_batching({"step": 4}, 2, tmp_path / "config.yaml") == Batching(8, 4, 2)
    assert saved_batching({"batching": {"micro": 2, "accum": 1, "world": 2}}, 2, tmp_path / "nowhere") == \
        Batching(2, 1, 2)


def _checkpoint(directory: Path, step: int, world_size: int = 1, states: int | None = None) -> str:
    """A checkpoint folder as a finished save leaves it: its files and their checksums."""
    from data_tools.files import sha256_file

    tag = f"step{step:08d}"
    folder = directory / tag
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(bytes([step]) * 64)
    for rank in range(world_size if states is None else states):
        (folder / f"state_rank{rank}.json").write_text(json.dumps({"step": step, "rank": rank}))
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    (folder / "checksums.json").write_text(json.dumps({"world_size": world_size, "files": files}))
    return tag


def test_each_way_a_checkpoint_can_be_unusable_is_named(tmp_path):
    ckpt = Checkpointer(tmp_path)
    assert ckpt.problem("step00000001") == "its folder is missing"
    tag = _checkpoint(tmp_path, 1, world_size=2)
    assert ckpt.problem(tag) is None
    checksums = tmp_path / tag / "checksums.json"
    listed = checksums.read_text()
    checksums.write_text(listed[:-3])
    assert ckpt.problem(tag) == "checksums.json is not readable JSON"
    checksums.write_bytes(b"\xff\xfe")
    assert ckpt.problem(tag) == "checksums.json is not readable JSON"
    checksums.unlink()
    assert ckpt.problem(tag) == "checksums.json is missing (the save did not finish)"
    checksums.write_text(listed)
    (tmp_path / tag / "state_rank1.json").write_text("{}")
    assert ckpt.problem(tag) == "state_rank1.json does not match its sha256 (corrupted or truncated)"
    (tmp_path / tag / "state_rank1.json").unlink()
    assert ckpt.problem(tag) == "state_rank1.json is missing"
    # a process of a two-process run that never wrote its state: the checksums list only the others
    partial = _checkpoint(tmp_path, 2, world_size=2, states=1)
    assert ckpt.problem(partial) == "state_rank1.json was not written"


def test_the_newest_intact_checkpoint_is_chosen_and_each_one_passed_over_is_said(tmp_path):
    from pretrain.engine import ResumeError
    from pretrain.engine.checkpoint import RESTART_ADVICE

    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert not ckpt.has_checkpoints() and ckpt.tags() == []
    with pytest.raises(ResumeError, match=r"no usable checkpoint in .*checkpoints: none written \(use --overwrite"):
        ckpt.choose(RESTART_ADVICE)  # a training resume's advice
    with pytest.raises(ResumeError, match=r"no usable checkpoint in .*checkpoints: none written$"):
        ckpt.choose()  # none by default: evaluation, export and predict cannot start again
    for step in (2, 4, 6):
        _checkpoint(ckpt.directory, step)
    assert ckpt.has_checkpoints()  # finished saves, even before any `latest`
    (ckpt.directory / "latest").write_text("step00000004\n")
    assert ckpt.latest_tag() == "step00000004" and ckpt.choose() == ("step00000004", [])  # latest, not the newest
    (ckpt.directory / "step00000004" / "mp_rank_00_model_states.pt").write_bytes(b"cut")
    assert ckpt.choose() == ("step00000006", ["step00000004: mp_rank_00_model_states.pt does not match its sha256 "
                                              "(corrupted or truncated)"])
    (ckpt.directory / "latest").write_text("step00000009")
    assert ckpt.choose()[1][0] == "latest names 'step00000009', which does not exist"
    for tag in ("step00000006", "step00000002"):
        (ckpt.directory / tag / "checksums.json").unlink()
    with pytest.raises(ResumeError, match="step00000006: checksums.json is missing .*; step00000004: .*; "
                                          "step00000002: checksums.json is missing"):
        ckpt.choose()
    (ckpt.directory / "step00000004" / "checksums.json").unlink()
    assert ckpt.has_checkpoints()  # a `latest` says a save finished once: resume refuses, never starts over
    (ckpt.directory / "latest").unlink()
    assert not ckpt.has_checkpoints()  # only saves cut short: a run starts again


def test_pruning_keeps_the_newest_and_the_one_just_written(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4, 5):
        _checkpoint(tmp_path, step)
    (tmp_path / "best").mkdir()
    ckpt._prune(keep="step00000001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step00000001", "step00000004", "step00000005"]


def test_a_process_the_saving_run_did_not_have_reads_rank_0s_state(tmp_path):
    ckpt = Checkpointer(tmp_path)
    tag = _checkpoint(tmp_path, 3, world_size=2)
    assert [ckpt._state(tag, r)["rank"] for r in (0, 1, 2, 3)] == [0, 1, 0, 0]


def test_the_space_a_save_needs_is_the_last_checkpoint_or_three_copies_of_the_trainable_weights(tmp_path,
                                                                                                 monkeypatch):
    from pretrain.engine.checkpoint import DISK_FULL_FAULT_ENV

    ckpt = Checkpointer(tmp_path)
    params = [torch.zeros(1000), torch.zeros(10, 50)]
    assert ckpt._needed_mb(params) == pytest.approx(3 * 1500 * 4 / 1e6)  # weights and AdamW's two moments, fp32
    tag = _checkpoint(tmp_path, 1)
    (tmp_path / "latest").write_text(tag)
    size = sum(p.stat().st_size for p in (tmp_path / tag).iterdir())
    assert ckpt._needed_mb(params) == pytest.approx(size / 1e6)
    monkeypatch.setenv(DISK_FULL_FAULT_ENV, "12")
    assert ckpt._free_mb("step00000012") == 0.0 and ckpt._free_mb("step00000013") > 0
    assert not ckpt._has_room("step00000012", params) and ckpt._has_room("step00000013", params)
    import shutil

    monkeypatch.delenv(DISK_FULL_FAULT_ENV)
    (tmp_path / "latest").unlink()
    weights = [torch.zeros(500_000)]  # 6 MB to save
    for free_mb, room in ((5.9, False), (6.0, True), (6.1, True)):
        monkeypatch.setattr(shutil, "disk_usage", lambda _, mb=free_mb: SimpleNamespace(free=mb * 1e6))
        assert ckpt._has_room("step00000014", weights) is room


def test_every_generator_is_a_function_of_seed_rank_and_step():
    import random

    import numpy as np

    from pretrain.engine.checkpoint import seed_step

    def draw(seed, rank, step):
        seed_step(seed, rank, step)
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    first = draw(0, 0, 5)
    draw(1, 1, 1)
    assert draw(0, 0, 5) == first
    for other in (draw(0, 0, 6), draw(0, 1, 5), draw(1, 0, 5)):
        assert all(a != b for a, b in zip(other, first))  # each generator moves with each of the three


def test_the_frozen_fingerprint_covers_frozen_weights_only():
    from pretrain.engine.checkpoint import frozen_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    before = frozen_fingerprint(model)
    with torch.no_grad():
        model[1].weight += 1  # trainable: not part of it
    assert frozen_fingerprint(model) == before
    with torch.no_grad():
        model[0].bias[2] += 1e-6
    assert frozen_fingerprint(model) != before
    with torch.no_grad():
        model[0].bias[2] -= 1e-6
    assert frozen_fingerprint(model) == before
    renamed = torch.nn.Sequential(torch.nn.Identity(), *model)  # the same weights under other names
    assert frozen_fingerprint(renamed) != before


class _Frozen(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def test_the_frozen_fingerprint_covers_the_shape_of_each_weight():
    weight = torch.arange(12.0)
    from pretrain.engine.checkpoint import frozen_fingerprint

    assert frozen_fingerprint(_Frozen(weight.reshape(3, 4))) != frozen_fingerprint(_Frozen(weight.reshape(4, 3)))
    same = _Frozen(weight.clone().reshape(3, 4))
    assert frozen_fingerprint(_Frozen(weight.reshape(3, 4))) == frozen_fingerprint(same)


def test_the_usable_cpus_are_the_affinity_lowered_to_the_quota_rounded_up(monkeypatch):
    """On a 16-CPU affinity (a pod on a big node): a quota of 2.5 CPUs is 3 processes' worth, 0.1 is 1."""
    import os

    from data_tools import cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for limit, usable in ((2.5, 3), (0.1, 1), (0.0, 1), (40.0, 16), (None, 16), (8.0, 8)):
        monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda limit=limit: limit)
        assert cpus.usable_cpus() == usable


def test_cgroup_quotas_of_every_layout_and_the_files_that_do_not_parse(tmp_path, monkeypatch):
    from pathlib import Path

    from data_tools import cpus

    def quota(folder, text, period=None):
        folder.mkdir(parents=True, exist_ok=True)
        if period is None:
            (folder / "cpu.max").write_text(text)
        else:
            (folder / "cpu.cfs_quota_us").write_text(text)
            (folder / "cpu.cfs_period_us").write_text(period)

    quota(tmp_path / "v2" / "pod", "100000 0\n")  # a period of 0: no quota, no division by zero
    assert cpus.cgroup_cpu_limit(tmp_path / "v2", "0::/pod\n") is None
    quota(tmp_path / "v1" / "cpu" / "c1", "300000\n", "200000\n")  # v1 with its own period
    assert cpus.cgroup_cpu_limit(tmp_path / "v1", "4:cpu:/c1\n") == 1.5
    # "cpu,cpuacct" mounted as a link named "cpu" alone: the quota is found there
    assert cpus.cgroup_cpu_limit(tmp_path / "v1", "4:cpu,cpuacct:/c1\n") == 1.5
    # cpuset is another controller (its name starts with "cpu"), and a line without three fields is passed by
    assert cpus.cgroup_cpu_limit(tmp_path / "v1", "5:cpuset:/c1\nnot a cgroup line\n") is None
    real_read = Path.read_text

    def locked(self, *args, **kwargs):
        if str(self) == "/proc/self/cgroup":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", locked)
    assert cpus.cgroup_cpu_limit(tmp_path / "v1") is None  # nothing readable: no quota known
