"""``launcher/protocol/flightsql_pb2*`` is what ``make proto`` makes of ``flightsql.proto``.

The sibling of ``test_protocol.py`` for the Flight SQL messages (same check, one more file), and
a guard that the definitions stay in their own package: the specification's own package in
protobuf's global pool belongs to whichever client library loads it.
"""

from __future__ import annotations

from pathlib import Path

from launcher.protocol import flightsql_pb2
from tests.unit import test_protocol


def test_generated_flightsql_code_is_up_to_date(tmp_path: Path) -> None:
    test_protocol.test_generated_code_is_up_to_date(tmp_path, "flightsql")


def test_flightsql_messages_live_in_duckcells_own_package() -> None:
    assert flightsql_pb2.DESCRIPTOR.package == "duckcell.flightsql.v1"
