"""What every benchmark module shares: the JSON shape, progress lines, and sample summaries."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Progress = Callable[[str], None]
Json = dict[str, Any]


def summarize(samples_s: list[float]) -> Json:
    """Median and nearest-rank p95 in milliseconds, plus the raw samples."""
    ms = sorted(sample * 1000 for sample in samples_s)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "p95_ms": ms[max(0, math.ceil(0.95 * len(ms)) - 1)],
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
