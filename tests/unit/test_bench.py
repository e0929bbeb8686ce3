"""The benchmark stays runnable: its modules import against the current launcher API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_script_starts() -> None:
    done = subprocess.run(
        [sys.executable, "bench/bench_sandbox.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout
