"""The CPUs a worker counts for its default llama threads: affinity, capped by a cgroup quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import cpus


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),  # 1.5 CPUs: two threads, each held back part of the time
        ("50000 100000", 1),
        ("", None),
        ("garbage", None),
        ("x 100000", None),
        ("0 100000", None),
    ],
)
def test_quota_cpus(cpu_max: str, expected: int | None) -> None:
    assert cpus.quota_cpus(cpu_max) == expected


def test_available_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(cpus, "CGROUP_CPU_MAX", limit)
    assert cpus.available_cpus() == affinity  # no cgroup file: the affinity mask
    limit.write_text("100000 100000\n")
    assert cpus.available_cpus() == 1
    limit.write_text(f"{(affinity + 3) * 100000} 100000\n")
    assert cpus.available_cpus() == affinity
    limit.write_text("max 100000\n")
    assert cpus.available_cpus() == affinity
