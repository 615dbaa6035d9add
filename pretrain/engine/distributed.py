"""Processes of a run: the process group, threads per process, a clean exit, and what DeepSpeed
leaves per rank (BatchNorm statistics) or behind (the names of its CPU all-reduce buffers)."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from data_tools.cpus import usable_cpus
from pretrain.engine.runlock import die_with_launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_process(env: dict, threads: int) -> int:
    """Intra-op threads for one process: torch's default for the machine (``threads``) shared
    among the processes of its node. torchrun sets OMP_NUM_THREADS=1 itself; the DeepSpeed
    launcher and srun do not, and processes that each take every core oversubscribe the machine
    and run many times slower."""
    if env.get("SLURM_CPUS_PER_TASK"):  # srun gives each task its own CPUs
        return max(1, min(threads, int(env["SLURM_CPUS_PER_TASK"])))
    local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or "1"
    return max(1, threads // int(local))


def _under_srun(env) -> bool:
    """SLURM's srun started this process as one task (it sets SLURM_*, not RANK / WORLD_SIZE)."""
    return "RANK" not in env and "SLURM_PROCID" in env


def default_extensions_dir(env: dict, candidates: tuple[Path, ...] | None = None) -> None:
    """Where DeepSpeed builds its CPU communication op on first use (torch's extension cache), unless
    ``TORCH_EXTENSIONS_DIR`` says: in a virtual environment (run.sh's) its own folder, so that two
    checkouts never rebuild each other's copy; else torch's default under HOME where this user can
    write there; else a folder
    of this user's in the temporary one. Where HOME was missing or read-only (a container run as
    another user, a cluster's compute nodes) a CPU run ended with `No such file or directory: HOME`."""
    if env.get("TORCH_EXTENSIONS_DIR"):
        return
    if candidates is None:
        from torch.utils.cpp_extension import get_default_build_root

        venv = (Path(sys.prefix) / "torch_extensions",) if sys.prefix != sys.base_prefix else ()
        candidates = (*venv, Path(get_default_build_root()),
                      Path(tempfile.gettempdir()) / f"irpt-{os.getuid()}" / "torch_extensions")
    for folder in candidates:
        with contextlib.suppress(OSError):  # made as torch would (access() says yes to root in /proc)
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                env["TORCH_EXTENSIONS_DIR"] = str(folder)
                return


def launched_world_size(env=os.environ) -> int:
    """The number of processes of this launch, from the launcher's variables (torchrun, the
    deepspeed launcher, SLURM's srun), before the process group exists; 1 without a launcher."""
    if _under_srun(env):
        return int(env.get("SLURM_NTASKS") or 1)
    return int(env.get("WORLD_SIZE") or 1)


def launched_rank(env=os.environ) -> int:
    """This process's rank in its launch, from the launcher's variables, before the process group
    exists (as :func:`launched_world_size`); 0 without a launcher."""
    if _under_srun(env):
        return int(env.get("SLURM_PROCID") or 0)
    return int(env.get("RANK") or 0)


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed. Works under torchrun, the deepspeed
    launcher, SLURM's srun (SLURM_* variables) and as a single process without a launcher."""
    import deepspeed

    env = os.environ
    die_with_launcher(env)  # before the SLURM / single-process defaults below set LOCAL_RANK
    if _under_srun(env):  # one task per process
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:  # a plain single process
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    if "OMP_NUM_THREADS" not in env:
        torch.set_num_threads(threads_per_process(env, min(torch.get_num_threads(), usable_cpus())))
    default_extensions_dir(env)
    cuda = torch.cuda.is_available()
    local_rank = int(env.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    from deepspeed.constants import default_pg_timeout  # DeepSpeed's own (DEEPSPEED_TIMEOUT)

    if (store := restart_safe_store(env, default_pg_timeout)) is not None:  # DeepSpeed adopts this group
        dist.init_process_group(backend, store=store, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                                timeout=default_pg_timeout, **_device_binding(cuda, local_rank, env))
    deepspeed.init_distributed(dist_backend=backend)
    if not cuda:
        release_shared_buffer_name(dist.get_rank(), env)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def restart_safe_store(env, timeout) -> dist.Store | None:
    """The store of the process group under torchrun, apart for each restart of its workers
    (``--max-restarts``); None elsewhere (the default rendezvous is then right). torchrun's workers
    form their group through its agent's store, which outlives a restart: the restarted workers
    found the previous round's addresses there and failed to connect (gloo's `connectFullMesh
    failed ... Connection refused`) or waited for ever, in most restarts (pytorch issues 135712,
    167288). Each restart count keys its own round: right under a static rendezvous, where every
    restart is a node's own; under a dynamic one the counts of the nodes can differ, and the
    launcher gives each round a store of its own instead (``launchers._round_stores_apart``)."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"irpt/restart{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)


def _device_binding(cuda: bool, local_rank: int, env) -> dict:
    """The ``device_id`` DeepSpeed binds an NCCL group to when it forms the group itself (several
    processes; not on the torch versions where binding hangs, pytorch issue 153960)."""
    hangs = "2.6.0" < torch.__version__ < "2.7.1"  # TorchVersion compares as a version
    if not cuda or int(env["WORLD_SIZE"]) == 1 or hangs:
        return {}
    return {"device_id": torch.device("cuda", local_rank)}


SHM_DIR = Path("/dev/shm")  # where shm_open keeps its names on Linux


def shared_buffer_name(rank: int, env) -> str:
    """The name DeepSpeed's CPU all-reduce gives the shared buffer of ``rank`` (its shm.cpp)."""
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def release_shared_buffer_name(rank: int, env) -> None:
    """DeepSpeed's CPU all-reduce shares a 64 MiB buffer per process through /dev/shm and never
    unlinks its name, so every multi-process CPU run left its buffers behind, killed or not (a day
    of test runs filled a 24 GB machine's memory with them). Its init returns once every process
    has mapped every other's buffer; after a barrier the names can go: the mappings stay valid, and
    the memory is freed when the last process ends."""
    barrier()
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / shared_buffer_name(rank, env)).unlink()


def barrier() -> None:
    """Wait for every process. On NCCL name this process's GPU: without it torch guesses the device
    and warns at every barrier."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def finish(code: int) -> None:
    """End a distributed entry point. torch/gloo can abort at interpreter shutdown after all work
    is done (pytorch issue 190489, ~3-6% of 2-process runs): barrier, destroy the group, flush and
    leave with os._exit so that no late destructor turns a finished run into a failure."""
    try:
        if dist.is_initialized():
            barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)



def batchnorm_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    """The running mean / var buffers of every plain BatchNorm of ``model``. Plain BatchNorm
    (IV-tuning's hybrid operation, the heads) keeps per-rank statistics and DeepSpeed does not
    sync buffers, so ranks would evaluate different models and only rank 0's would be saved.
    SyncBatchNorm (CUDA) needs no help; gloo on CPU has none, so the loop averages these over
    ranks after every step (:func:`average_over_ranks`): ranks then hold one model at every step
    boundary (save, resume, evaluation), for one small all-reduce per step. Loading a checkpoint
    copies into these same tensors."""
    return [b for m in model.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]


def average_over_ranks(stats: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in one all-reduce."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 or not stats:
        return
    flat = torch.cat([b.detach().float().reshape(-1) for b in stats])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for b in stats:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()

