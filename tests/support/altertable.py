"""The Altertable Flight SQL client (PyPI ``altertable-flightsql``) in a process of its own.

Its ``Client`` takes no CA argument: TLS trusts gRPC's default roots, which
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` points at the control plane's CA for this process only
(gRPC reads it once per process). ``run_client`` sends a script of calls as JSON on stdin and
returns one answer per call: ``{"ok": <value>}`` or ``{"error": "<class>: <message>"}``. The
client itself is imported only there (``altertable_child.py``): its generated protobuf modules
register ``arrow.flight.protocol.sql`` in the global pool, as another client's do.

Script steps: ``["query", sql]`` (rows), ``["execute", sql]`` (row count),
``["prepare", sql, params]`` (rows; params a dict, a list, or ``{"arrow": {...}}`` for a
RecordBatch), ``["begin"]``, ``["commit"]``, ``["rollback"]``, ``["ingest", table, mode, rows]``,
``["catalogs"]``, ``["schemas"]``, ``["tables"]``, ``["options", {name: value}]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0


def run_client(ca_file: Path, port: int, key: str, script: list[list[Any]]) -> list[Any]:
    env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(ca_file), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.altertable_child", str(port), key],
        input=json.dumps(script),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=DEADLINE_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]
