"""What every benchmark module shares: the JSON shape, progress lines, and sample summaries."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
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
