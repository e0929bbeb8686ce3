"""What every benchmark module shares: the JSON shape, progress lines, and sample summaries."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]
Json = dict[str, Any]


def summarize(samples_s: list[float]) -> Json:
    """Median and nearest-rank p95 and p99 in milliseconds, plus the raw samples."""
    ms = sorted(sample * 1000 for sample in samples_s)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "p95_ms": ms[max(0, math.ceil(0.95 * len(ms)) - 1)],
        "p99_ms": ms[max(0, math.ceil(0.99 * len(ms)) - 1)],
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "samples_ms": [round(value, 4) for value in ms],
    }


@dataclass(frozen=True, slots=True)
class MachineCpu:
    """CPU seconds the whole machine has spent so far (``/proc/stat``, every core): busy
    (user, nice, system, irq, softirq) and stolen by the hypervisor (a virtual machine's
    neighbours)."""

    busy: float
    steal: float

    @classmethod
    def now(cls) -> MachineCpu:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        tick = os.sysconf("SC_CLK_TCK")
        return cls((user + nice + system + irq + softirq) / tick, steal / tick)

    def since(self, earlier: MachineCpu) -> MachineCpu:
        return MachineCpu(self.busy - earlier.busy, self.steal - earlier.steal)


def process_cpu_seconds(pid: int) -> float:
    """CPU one process has used so far (user + system, from ``/proc``; its children not)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants alive now (``/proc/PID/task/*/children``)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # it ended meanwhile
            continue
    return found


def cpu_seconds_of(pids: list[int]) -> dict[int, float]:
    """CPU seconds so far of each of ``pids`` still alive (ended ones are left out)."""
    seconds = {}
    for pid in pids:
        try:
            seconds[pid] = process_cpu_seconds(pid)
        except OSError:
            continue
    return seconds


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two ``cpu_seconds_of`` readings; a process that started in between
    counts whole, one that ended in between is lost (so this is a lower bound)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
