"""The generated protocol code is reproducible: regenerate and compare byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ["runner_pb2.py", "runner_pb2.pyi", "runner_pb2_grpc.py"]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    (tmp_path / "launcher" / "protocol").mkdir(parents=True)
    proto = "launcher/protocol/runner.proto"
    (tmp_path / proto).write_bytes((REPO / proto).read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            proto,
        ],
        cwd=tmp_path,
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "launcher" / "protocol" / name).read_bytes()
        committed = (REPO / "launcher" / "protocol" / name).read_bytes()
        assert fresh == committed, f"launcher/protocol/{name} is stale: run `make proto`"
