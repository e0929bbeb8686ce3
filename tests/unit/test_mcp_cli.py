"""``duckcell mcp`` refuses what it cannot serve before it starts anything, with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli.main import main


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--control-plane", "localhost:1"], "--api-key-file FILE (or DUCKCELL_API_KEY)"),
        (["--control-plane", "localhost:1", "--api-key-file", "{key}"], "needs --ca-file"),
        (
            ["--control-plane", "localhost:1", "--api-key-file", "{key}", "--ca-file", "{key}"],
            "is not a PEM certificate",
        ),
        (["--control-plane", "localhost:1", "--catalog", "{key}"], "--catalog is for local mode"),
        (["--control-plane", "localhost:1", "--api-key-file", "{empty}"], "does not hold an API"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(
    argv: list[str],
    says: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DUCKCELL_API_KEY", raising=False)
    (tmp_path / "key").write_text("dck_some_key\n")
    (tmp_path / "empty").write_text("\n")
    filled = [a.format(key=tmp_path / "key", empty=tmp_path / "empty") for a in argv]
    assert main(["mcp", *filled]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def test_bounds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["mcp", "--max-rows", "0"])
    assert usage.value.code == 2
    assert "expected a positive whole number" in capsys.readouterr().err
