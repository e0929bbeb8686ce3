"""The allocator settings: checked by what they are for, the page faults of reused buffers.

Each case runs in a fresh interpreter (the settings cannot be undone in this one) with no
MALLOC_* variables inherited, builds and serializes a 4 MB runner message 50 times, as each hop
of a result does, and reports its minor page faults. With glibc's defaults the message's
buffers are fresh mmaps each time: ~1000 faults for every MB.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import allocator

_PROBE = """
import json, resource, sys
tuned = None
if sys.argv[1] == "tuned":
    from launcher.cli.allocator import tune_allocator
    tuned = tune_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
from launcher.protocol import runner_pb2
payload = bytes(4 * 1024 * 1024)
runner_pb2.ExecuteChunk(ipc=payload).SerializeToString()  # the first may fault regardless
before = faults()
for i in range(50):  # what every hop does to each result message
    runner_pb2.ExecuteChunk(ipc=payload).SerializeToString()
print(json.dumps({"tuned": tuned, "faults": faults() - before}))
"""

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the settings are glibc's (mallopt)"
)


def _faults(mode: str) -> dict[str, object]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "PYTHONSAFEPATH")
    }
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return dict(json.loads(out.stdout))


def test_tuned_allocator_reuses_large_buffers() -> None:
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned["tuned"] is True
    assert isinstance(default["faults"], int) and isinstance(tuned["faults"], int)
    # Each message's buffers faulted in again, against the same heap pages reused. A ratio, not
    # counts: transparent huge pages ("always") fault 2 MiB at a time.
    assert default["faults"] > 20 * max(tuned["faults"], 10)


def test_the_sandbox_image_sets_the_same_values() -> None:
    dockerfile = (ROOT / "sandbox_image" / "Dockerfile").read_text()
    for name, value in allocator.ENVIRONMENT.items():
        assert f"{name}={value}" in dockerfile
