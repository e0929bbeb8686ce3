"""API keys: the format, what is stored, and every refusal."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.controlplane.apikeys import ApiKeys
from launcher.controlplane.store import MIGRATIONS, open_database
from launcher.errors import ApiKeyError, ControlPlaneError


def test_a_key_verifies_to_its_role_and_only_its_secrets_hash_is_stored(tmp_path: Path) -> None:
    conn = open_database(tmp_path / "cp.db")
    keys = ApiKeys(conn, clock=lambda: 1000.0)
    key = keys.create("analyst")
    prefix, key_id, secret = key.split(".")
    assert prefix == "dck1" and len(key_id) == 16 and len(secret) == 43

    verified = keys.verify(key)
    assert (verified.key_id, verified.role) == (key_id, "analyst")
    rows = conn.execute("SELECT id, secret_hash, role, created_at FROM api_keys").fetchall()
    assert rows == [(key_id, hashlib.sha256(secret.encode()).hexdigest(), "analyst", 1000.0)]
    dump = "\n".join(conn.iterdump())
    assert secret not in dump


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda key: key[:-1] + ("A" if key[-1] != "A" else "B"), "unknown API key"),
        (lambda key: "dck1.0123456789abcdef." + key.split(".")[2], "unknown API key"),
        (lambda key: key[:-3], "malformed"),
        (lambda key: "", "malformed"),
    ],
)
def test_wrong_unknown_and_malformed_keys_are_refused_without_quoting_them(
    tmp_path: Path, mangle: object, message: str
) -> None:
    keys = ApiKeys(open_database(tmp_path / "cp.db"))
    key = keys.create("analyst")
    bad = mangle(key)  # type: ignore[operator]
    with pytest.raises(ApiKeyError, match=message) as refused:
        keys.verify(bad)
    assert key.split(".")[2] not in str(refused.value)


def test_a_role_must_be_a_plain_word(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError, match="--role"):
        ApiKeys(open_database(tmp_path / "cp.db")).create("no spaces please")


def test_the_cli_lists_and_revokes_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "cp")
    assert main(["controlplane", "apikey", "create", "--data", data, "--role", "analyst"]) == 0
    key = capsys.readouterr().out.strip()
    key_id = key.split(".")[1]
    assert main(["controlplane", "apikey", "list", "--data", data]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "analyst" in listed and key.split(".")[2] not in listed
    assert main(["controlplane", "apikey", "revoke", "--data", data, key_id]) == 0
    keys = ApiKeys(open_database(tmp_path / "cp" / "controlplane.db"))
    # Its holder is told it was revoked; a wrong secret for the same id stays "unknown".
    with pytest.raises(ApiKeyError, match=rf"API key {key_id} was revoked at \d{{4}}-"):
        keys.verify(key)
    with pytest.raises(ApiKeyError, match=f"unknown API key {key_id}"):
        keys.verify(key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert main(["controlplane", "apikey", "list", "--data", data]) == 0
    assert key_id not in capsys.readouterr().out
    assert main(["controlplane", "apikey", "revoke", "--data", data, key_id]) == 2
    assert f"API key {key_id} is already revoked" in capsys.readouterr().err
    assert main(["controlplane", "apikey", "revoke", "--data", data, "0123456789abcdef"]) == 2
    assert "API key 0123456789abcdef does not exist" in capsys.readouterr().err


def test_keys_made_before_revocation_was_kept_still_verify(tmp_path: Path) -> None:
    path = tmp_path / "cp.db"
    old = sqlite3.connect(path)
    for sql in MIGRATIONS[:7]:
        old.executescript(sql)
    old.execute("PRAGMA user_version = 7")
    old.commit()
    key = ApiKeys(old).create("analyst")  # the columns create() writes existed then
    old.close()
    keys = ApiKeys(open_database(path))
    assert keys.verify(key).role == "analyst"
    keys.revoke(key.split(".")[1])
    with pytest.raises(ApiKeyError, match="was revoked"):
        keys.verify(key)
