"""How many CPUs this process may really use, for the llama engines' default thread counts.

`os.cpu_count()` counts the host's CPUs. A worker pinned to fewer (taskset, cpusets) or given a
CPU limit (a container's cgroup quota) that started one ggml thread per host CPU would have its
threads wait for each other at every operation while the quota or the other processes hold them
back: a step then takes several scheduler slices instead of a few milliseconds.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""cgroup v2: "<quota> <period>" in microseconds, or "max <period>" without a limit."""


def quota_cpus(cpu_max: str) -> int | None:
    """The CPUs a cgroup v2 `cpu.max` allows (its quota over its period, rounded up), or None
    when it sets no limit or is not what cgroup v2 writes there."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def available_cpus() -> int:
    """CPUs in this process's affinity mask, capped by its cgroup's CPU quota if it has one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota = quota_cpus(CGROUP_CPU_MAX.read_text())
    except OSError:
        quota = None
    return min(cpus, quota) if quota else cpus
