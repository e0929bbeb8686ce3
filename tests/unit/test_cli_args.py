"""Command-line values that would fail only later (at SIGTERM, at the first query, in a
traceback) are refused when given, with one line saying what is expected."""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.config import load_config
from launcher.controlplane.server import _next_port
from launcher.errors import ConfigError, ControlPlaneError
from launcher.inputs import MAX_SMALL_FILE_BYTES, read_small_file
from launcher.link.wire import split_address

NOT_UTF8 = b"SELECT '\xff'"  # the bad byte at offset 8


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


def test_a_ca_file_that_is_no_certificate_is_named_before_dialing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    argv = ["query", "--control-plane", "localhost:1", "--api-key", "dck1.x.y"]
    assert main([*argv, "--ca-file", str(junk), "SELECT 1"]) == 2
    assert f"--ca-file: {junk} is not a PEM certificate" in capsys.readouterr().err


def test_a_key_for_a_role_the_catalog_lacks_is_made_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "cp"
    catalog = tmp_path / "roles.yaml"
    catalog.write_text("roles:\n  analyst: {}\n")
    assert main(["controlplane", "catalog", "apply", "--data", str(data), str(catalog)]) == 0
    capsys.readouterr()
    assert main(["controlplane", "apikey", "create", "--data", str(data), "--role", "anlyst"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("dck1.") and "defines no role 'anlyst' (roles: analyst)" in err
    assert main(["controlplane", "apikey", "create", "--data", str(data), "--role", "analyst"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("address", "dial", "listen"),
    [
        ("localhost:7443", ("localhost", 7443), ("localhost", 7443)),
        ("[::1]:7443", ("::1", 7443), ("::1", 7443)),
        ("0.0.0.0:0", None, ("0.0.0.0", 0)),  # any free port: only to listen on
        ("abc", None, None),  # no port (gRPC would have dialled 443)
        (":7443", None, None),  # no host
        ("a:b:7443", None, None),
        ("::1:7443", None, None),  # IPv6 without brackets is ambiguous
        ("[cp.example]:7443", None, None),
        ("h:", None, None),
        ("h:65536", None, None),
        (" h:1", None, None),
        ("h:\u0663", None, None),  # a non-ASCII digit: int() takes it, gRPC would not
        ("h:\u00b2", None, None),  # isdigit() but not int()
    ],
)
def test_host_port_is_checked_one_way_everywhere(
    address: str, dial: tuple[str, int] | None, listen: tuple[str, int] | None
) -> None:
    for listening, expected in ((False, dial), (True, listen)):
        if expected is None:
            with pytest.raises(ControlPlaneError, match="expected HOST:PORT"):
                split_address(address, listening=listening)
        else:
            assert split_address(address, listening=listening) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "--control-plane", "cp.example", "SELECT 1"],
        ["enroll", "--control-plane", "cp:0", "--state", "w", "--token", "t"],
        ["worker", "--state", "w", "--control-plane", ":7444"],
        ["controlplane", "serve", "--data", "cp", "--listen", "abc"],
        ["controlplane", "serve", "--data", "cp", "--listen", "h:1", "--tunnel-listen", "abc"],
        ["controlplane", "serve", "--data", "cp", "--listen", "h:1", "--flight-listen", "h:x"],
    ],
)
def test_every_host_port_flag_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    argv = [str(tmp_path / a) if a in ("w", "cp") else a for a in argv]
    with pytest.raises(SystemExit) as usage:
        main(argv)
    assert usage.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_a_statement_that_is_not_utf8_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the argument (Python keeps argv's undecodable bytes as surrogates) and on stdin; it
    used to be a traceback (stdin) or exit 1 (argument). ``--format parquet`` without
    ``--output`` would be refused next, so nothing starts either way."""
    argument = NOT_UTF8.decode("utf-8", "surrogateescape")
    for sql, stdin in ((argument, b""), ("-", NOT_UTF8)):
        _stdin(monkeypatch, stdin)
        assert main(["query", "--format", "parquet", sql]) == 2
        assert capsys.readouterr().err == (
            "duckcell: error: the statement is not valid UTF-8 (byte 0xff at offset 8): "
            "re-encode it as UTF-8\n"
        )


def test_a_statement_with_a_nul_byte_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _stdin(monkeypatch, b"SELECT 1\0")
    assert main(["query", "--format", "parquet", "-"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("duckcell: error: the statement contains a NUL byte (offset 8)")
    assert err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--token-file", "--ca-file"])
def test_a_token_or_certificate_file_is_read_only_when_small_and_regular(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """``/dev/zero`` used to be read until MemoryError."""
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_SMALL_FILE_BYTES + 1))
    for path, refusal in (("/dev/zero", "is not a regular file"), (big, "more than 64 KiB")):
        if flag == "--token-file":
            argv = ["enroll", "--control-plane", "localhost:1", "--state", str(tmp_path / "w")]
        else:
            argv = ["query", "--control-plane", "localhost:1", "--api-key", "dck1.x.y", "SELECT 1"]
        assert main([*argv, flag, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"duckcell: error: {flag}: {path} ") and refusal in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_a_token_file_may_be_a_pipe(tmp_path: Path) -> None:
    """``--token-file <(pass show token)``: a FIFO is read, bounded like a file."""
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(b"dct1.a.b.c\n",))
    writer.start()
    try:
        assert read_small_file(fifo, "--token-file", "a token") == b"dct1.a.b.c\n"
    finally:
        writer.join(10)


def test_a_secret_value_on_stdin_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with open("/dev/zero", "rb") as zero:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(zero))
        assert main(["secrets", "set", "--state", str(tmp_path), "A"]) == 2
    err = capsys.readouterr().err
    assert "stdin holds more than 64 KiB" in err and err.count("\n") == 1
