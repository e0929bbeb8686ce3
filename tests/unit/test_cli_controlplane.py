"""`duckcell controlplane ca` and `token create`: output a script can use, clear errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.controlplane.ca import fingerprint_of
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.tokens import parse_token
from launcher.errors import UsedTokenError


def test_ca_prints_one_stable_pem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "cp"
    assert main(["controlplane", "ca", "--data", str(data)]) == 0
    first = capsys.readouterr().out
    assert first.startswith("-----BEGIN CERTIFICATE-----")
    assert main(["controlplane", "ca", "--data", str(data)]) == 0
    assert capsys.readouterr().out == first
    key = data / "ca" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_token_create_prints_the_token_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "cp"
    assert main(["controlplane", "token", "create", "--data", str(data), "--ttl", "30m"]) == 0
    out = capsys.readouterr().out
    token = out.strip()
    assert out == token + "\n"
    assert main(["controlplane", "ca", "--data", str(data)]) == 0
    ca_pem = capsys.readouterr().out.encode()
    assert parse_token(token).ca_fingerprint == fingerprint_of(ca_pem)
    tokens = ControlPlaneData(data).tokens()
    tokens.redeem(token)
    with pytest.raises(UsedTokenError):
        tokens.redeem(token)


def test_bad_ttl_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["controlplane", "token", "create", "--data", str(tmp_path), "--ttl", "soon"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--ttl" in err and "soon" in err and len(err.strip().splitlines()) == 1
