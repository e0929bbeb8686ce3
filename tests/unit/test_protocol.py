"""The generated protocol code is reproducible: regenerate and compare byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.protocol import flightsql_pb2

REPO = Path(__file__).resolve().parents[2]
PROTOS = ["runner", "controlplane", "flightsql"]


@pytest.mark.parametrize("name", PROTOS)
def test_generated_code_is_up_to_date(tmp_path: Path, name: str) -> None:
    (tmp_path / "launcher" / "protocol").mkdir(parents=True)
    proto = f"launcher/protocol/{name}.proto"
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
    for generated in [f"{name}_pb2.py", f"{name}_pb2.pyi", f"{name}_pb2_grpc.py"]:
        fresh = (tmp_path / "launcher" / "protocol" / generated).read_bytes()
        committed = (REPO / "launcher" / "protocol" / generated).read_bytes()
        assert fresh == committed, f"launcher/protocol/{generated} is stale: run `make proto`"


def test_flightsql_messages_live_in_duckcells_own_package() -> None:
    """The specification's own package in protobuf's global pool belongs to whichever client
    library loads it (pyarrow, the Altertable client): duckcell's copy keeps its own."""
    assert flightsql_pb2.DESCRIPTOR.package == "duckcell.flightsql.v1"
