"""`duckcell controlplane ca` and `token create`: output a script can use, clear errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.controlplane.datadir import ControlPlaneData
from launcher.errors import UsedTokenError
from launcher.link.pki import fingerprint_of
from launcher.link.tokens import parse_token


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


@pytest.mark.parametrize(
    "command",
    [
        "workers",
        "audit",
        "apikey list",
        "apikey revoke k1",
        "catalog show",
        "policy list",
        "worker revoke wkr-1",
    ],
)
def test_a_listing_command_refuses_a_data_dir_no_control_plane_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """A mistyped --data is an error naming the path, not an empty listing, and creates
    nothing there."""
    typo = tmp_path / "cpx"
    argv = ["controlplane", *command.split(), "--data", str(typo)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--data {typo}: no control plane data there" in err
    assert f"duckcell controlplane serve --data {typo}" in err
    assert not typo.exists()


def test_a_creating_command_on_a_new_data_dir_says_so_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "cp"
    assert main(["controlplane", "ca", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("-----BEGIN CERTIFICATE-----")  # stdout stays the PEM alone
    assert f"--data {data} held no control plane: this started a new one" in captured.err
    assert main(["controlplane", "workers", "--data", str(data)]) == 0
    assert main(["controlplane", "ca", "--data", str(data)]) == 0
    assert capsys.readouterr().err == ""  # said once, when it was new


@pytest.mark.parametrize("limit", ["0", "-1", "ten"])
def test_audit_limit_must_be_positive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    assert main(["controlplane", "ca", "--data", str(tmp_path)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["controlplane", "audit", "--data", str(tmp_path), "--limit", limit])
    assert exit_info.value.code == 2
    assert "expected a whole number of at least 1" in capsys.readouterr().err


def test_data_defaults_to_the_environment_as_in_the_duckcell_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "cp"
    monkeypatch.setenv("DUCKCELL_CONTROLPLANE_DATA", str(data))
    assert main(["controlplane", "ca"]) == 0
    assert capsys.readouterr().out == ControlPlaneData(data).ca().cert_pem().decode()
    monkeypatch.delenv("DUCKCELL_CONTROLPLANE_DATA")
    with pytest.raises(SystemExit) as usage:
        main(["controlplane", "ca"])
    assert usage.value.code == 2
    assert "--data" in capsys.readouterr().err
