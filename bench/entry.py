"""What every benchmark script's ``main`` does around its run: progress lines, cleanup of its
containers whatever happens (SIGTERM included), the table on stdout and the results file."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench.engine import remove_leftovers
from bench.report import write_results
from bench.stats import Json, Progress
from launcher.cli.allocator import tune_allocator
from launcher.errors import DuckcellError

Run = Callable[[str, Progress], Coroutine[Any, Any, Json]]


RESULTS = Path(__file__).resolve().parent / "results"


def add_image_and_output(parser: argparse.ArgumentParser) -> None:
    """The two arguments every benchmark script takes: the sandbox image, the results folder."""
    parser.add_argument("--image", default="duckcell-sandbox:latest", help="sandbox image tag")
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS,
        help="directory for the JSON results (default bench/results)",
    )


def make_progress() -> Progress:
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return progress


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that SIGTERM (a killed `make bench`) also cleans up


def run_benchmark(
    run: Run, *, prefix: str, render: Callable[[Json], str], output: Path, name: str
) -> int:
    """Run ``run(launcher_id, progress)``, print ``render(result)`` and write the results as
    ``name`` (``latest-<name>.json`` beside a timestamped copy). Exit code: 0, 2 on a duckcell
    error, 130 when interrupted (then nothing is written)."""
    progress = make_progress()
    tune_allocator()  # as the duckcell command does: this process is the launcher
    launcher_id = f"{prefix}-{os.getpid()}"
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = asyncio.run(run(launcher_id, progress))
    except (DuckcellError, RuntimeError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; no results written", file=sys.stderr)
        return 130
    finally:
        leftovers = remove_leftovers(launcher_id)
        if leftovers:
            progress(f"removed {len(leftovers)} leftover container(s): {', '.join(leftovers)}")
    print(render(result))
    path = write_results(result, output, name=name)
    progress(f"wrote {path} and {path.with_name(f'latest-{name}.json')}")
    return 0
