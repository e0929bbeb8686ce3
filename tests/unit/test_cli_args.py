"""Command-line values that would fail only later (at SIGTERM, at the first query, in a
traceback) are refused when given, with one line saying what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import load_config
from launcher.controlplane.server import _next_port
from launcher.errors import ConfigError, ControlPlaneError


def test_cli_values_that_would_fail_later_are_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for grace in ("nan", "-1", "inf", "5000000"):
        with pytest.raises(SystemExit) as usage:
            main(["worker", "--state", str(tmp_path), "--drain-grace", grace])
        assert usage.value.code == 2
        assert "expected seconds from 0 to 86400" in capsys.readouterr().err
    binary = tmp_path / "token"
    binary.write_bytes(b"\xff\xfe\x00token")
    argv = ["enroll", "--control-plane", "localhost:1", "--token-file", str(binary)]
    assert main([*argv, "--state", str(tmp_path / "w")]) == 2
    assert "is not a token (not text)" in capsys.readouterr().err
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(config_file=config, env={})
    with pytest.raises(ControlPlaneError, match="leaves none"):
        _next_port("127.0.0.1:65535", 65535)
