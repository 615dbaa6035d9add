"""How many CPUs this process may use: its affinity (``taskset``, a container's cpuset) and its
cgroup's CPU quota (``docker run --cpus``, a Kubernetes pod's CPU limit). ``os.cpu_count()`` and
torch's default thread count see neither: in a pod limited to 8 CPUs of a 128-core node the build
started 128 worker processes and each training process 64 threads, which the quota then throttles.
(Python 3.13's ``os.process_cpu_count`` reads the affinity only.)"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _upwards(mount: Path, path: str) -> list[Path]:
    """``mount / path`` and its parents up to ``mount``: a quota may be set on any of them (a
    container sees its own cgroup at ``mount``, whatever ``path`` says)."""
    folder, found = mount / path.lstrip("/"), []
    while True:
        found.append(folder)
        if folder == mount or mount not in folder.parents:
            return found
        folder = folder.parent


def _quota(text: str, period_text: str | None = None) -> float | None:
    """CPUs from cgroup v2's ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), or v1's quota and period
    files (-1: none)."""
    fields = text.split()
    quota, period = (fields[0], fields[1]) if period_text is None else (fields[0], period_text.strip())
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: str | None = None) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup and those above it, v2 or v1;
    None where none is set or none can be read."""
    try:
        lines = (self_cgroup if self_cgroup is not None else Path("/proc/self/cgroup").read_text()).splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one hierarchy
            for folder in _upwards(root, path):
                try:
                    limits.append(_quota((folder / "cpu.max").read_text()))
                except (OSError, ValueError, IndexError):
                    continue
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            for mount in dict.fromkeys((root / controllers, root / "cpu")):  # "cpu,cpuacct" or its "cpu" link
                for folder in _upwards(mount, path):
                    try:
                        limits.append(_quota((folder / "cpu.cfs_quota_us").read_text(),
                                             (folder / "cpu.cfs_period_us").read_text()))
                    except (OSError, ValueError, IndexError):
                        continue
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, lowered to its cgroup's quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
