#!/usr/bin/env python3
"""What the worker's check of a runner's result costs (``launcher.sandbox.result_check``, issue 16).

The result is the one the sandbox benchmark streams (``bench.tunnel.WIDE``: 10M rows of two
int64 columns), sliced as the runner slices it: DuckDB's Arrow reader in 65,536-row batches,
pyarrow's stream writer, one slice per batch. Each repetition feeds every slice through a new
``ResultGuard`` and finishes it with the runner's summary, timing wall clock and this process's
CPU. A second result adds a VARCHAR column, whose UTF-8 full validation reads every byte. No
Docker, no sandbox: the guard is pure CPU on the worker, and this measures only it.

Table on stdout, JSON to ``<output>/result-check-<UTC>.json`` and ``latest-result-check.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.ipc

# Run as a script from a checkout: the launcher package and bench/ sit in the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import write_results
from bench.stats import Json, summarize
from bench.tunnel import WIDE, WIDE_ROWS
from launcher.sandbox.result_check import ResultGuard
from launcher.sandbox.runner_client import QuerySummary

BATCH_ROWS = 65_536  # the runner's default (``RunnerConfig.batch_rows``)
RESULTS = {
    "wide": WIDE,
    "wide_varchar": "SELECT i, i * 2 AS j, 'row-' || i AS s FROM range(10000000) t(i)",
}


class _Slices:
    """The runner's sink: what the stream writer wrote since the last ``take``."""

    closed = False

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def runner_slices(sql: str) -> list[bytes]:
    reader = duckdb.connect().sql(sql).to_arrow_reader(BATCH_ROWS)
    sink, slices = _Slices(), []
    with pa.ipc.new_stream(sink, reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            slices.append(sink.take())
    slices.append(sink.take())
    return slices


def checked_once(slices: list[bytes]) -> tuple[float, float]:
    """Wall and CPU seconds for one guard over the whole result."""
    claimed = QuerySummary(WIDE_ROWS, sum(map(len, slices)), 0.0, "SELECT")
    wall, cpu = time.perf_counter(), time.process_time()
    guard = ResultGuard(None, None)
    for data in slices:
        guard.feed(data)
    guard.finish(claimed)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(sql: str, reps: int) -> Json:
    slices = runner_slices(sql)
    size = sum(map(len, slices))
    checked_once(slices)  # warm-up: pyarrow's first decode of the types
    runs = [checked_once(slices) for _ in range(reps)]
    wall = summarize([seconds for seconds, _ in runs])
    cpu = summarize([seconds for _, seconds in runs])
    return {
        "sql": sql,
        "rows": WIDE_ROWS,
        "ipc_bytes": size,
        "slices": len(slices),
        "wall": wall,
        "cpu": cpu,
        "mb_per_s": size / 1e6 / (wall["median_ms"] / 1000),
    }


def render(result: Json) -> str:
    lines = [
        f"{'result checked (10M rows)':<32}{'MB':>8}{'slices':>8}{'median ms':>11}"
        f"{'cpu ms':>9}{'MB/s':>10}"
    ]
    for name, row in result["results"].items():
        lines.append(
            f"{name:<32}{row['ipc_bytes'] / 1e6:>8.0f}{row['slices']:>8}"
            f"{row['wall']['median_ms']:>11.1f}{row['cpu']['median_ms']:>9.1f}"
            f"{row['mb_per_s']:>10.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per result (5)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    result = {
        "reps": args.reps,
        "pyarrow": pa.__version__,
        "results": {name: measure(sql, args.reps) for name, sql in RESULTS.items()},
    }
    print(render(result))
    path = write_results(result, args.output, name="result-check")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
