"""The worker's encrypted secret store, its catalog references and ``duckcell secrets``.

A real store in a temporary directory (Fernet is fast); the data path gets it through its
constructor, and the CLI runs through ``main`` with stdin replaced.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from launcher.cli.main import main
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath, store_for
from launcher.data.secrets import DATA_FILE, KEY_FILE, SecretStore, resolve_secret
from launcher.errors import CatalogError, SecretError
from launcher.model.catalog import Catalog, SecretRef, parse_catalog
from launcher.model.policy import load_policy_text
from tests.support.parsers import InlineParser

VALUE = "wJalrXUtnFEMI/K7MDENG-s3cr3t"

CATALOG = """\
connections:
  lake: {kind: s3, endpoint: "http://127.0.0.1:9", access_key_id: {env: K}, \
secret_access_key: {store: LAKE_SECRET}}
tables:
  trips: {connection: lake, path: "s3://bucket/trips/", format: parquet}
"""

POLICY = """\
name: t
isolation: query
runtime: runc
limits: {cpus: 1, memory: 1GiB}
access: {connections: [lake]}
"""


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(tmp_path / "state" / "secrets")


def test_round_trip_set_get_names_delete(store: SecretStore) -> None:
    assert store.names() == []
    store.set("LAKE_SECRET", VALUE)
    store.set("OTHER", "x")
    store.set("OTHER", "y")  # replaces
    assert store.get("LAKE_SECRET") == VALUE
    assert store.get("OTHER") == "y"
    assert store.names() == ["LAKE_SECRET", "OTHER"]
    store.delete("OTHER")
    assert SecretStore(store.path).names() == ["LAKE_SECRET"]  # a fresh handle reads the disk
    with pytest.raises(SecretError, match="OTHER is not in the secret store"):
        store.delete("OTHER")


def test_the_value_is_not_on_disk_in_clear(store: SecretStore) -> None:
    store.set("LAKE_SECRET", VALUE)
    for path in store.path.iterdir():
        assert VALUE.encode() not in path.read_bytes(), path
    assert b"LAKE_SECRET" not in (store.path / DATA_FILE).read_bytes()  # names are hidden too


def test_key_file_is_0600_and_directory_0700(store: SecretStore) -> None:
    store.set("LAKE_SECRET", VALUE)
    assert stat.S_IMODE(os.stat(store.path / KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.path / DATA_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700
    assert sorted(p.name for p in store.path.iterdir()) == [".lock", DATA_FILE, KEY_FILE]


def test_a_key_file_open_to_other_users_is_refused(store: SecretStore) -> None:
    """A key restored or copied without its mode is not used silently (as the CA's key)."""
    store.set("LAKE_SECRET", VALUE)
    os.chmod(store.path / KEY_FILE, 0o644)
    with pytest.raises(SecretError, match=r"readable by other users: run `chmod 600 "):
        store.get("LAKE_SECRET")
    os.chmod(store.path / KEY_FILE, 0o600)
    assert store.get("LAKE_SECRET") == VALUE


def test_a_wrong_key_or_damaged_file_is_a_clear_error(store: SecretStore) -> None:
    store.set("LAKE_SECRET", VALUE)
    (store.path / KEY_FILE).write_bytes(Fernet.generate_key())
    with pytest.raises(SecretError, match="cannot be decrypted") as caught:
        store.get("LAKE_SECRET")
    assert "not the one it was written with" in str(caught.value)
    assert VALUE not in str(caught.value)
    (store.path / KEY_FILE).unlink()
    with pytest.raises(SecretError, match="has secrets but no key"):
        store.names()


def test_a_missing_name_is_named_with_the_store(store: SecretStore) -> None:
    store.set("LAKE_SECRET", VALUE)
    with pytest.raises(SecretError, match="secret store:NOPE is not in the secret store") as e:
        store.get("NOPE")
    assert str(store.path) in str(e.value)
    assert "duckcell secrets set NOPE" in str(e.value)
    assert VALUE not in str(e.value)


def test_empty_values_and_bad_names_are_refused(store: SecretStore) -> None:
    with pytest.raises(SecretError, match="empty value"):
        store.set("A", "")
    with pytest.raises(SecretError, match="not a secret name"):
        store.set("a b", "v")
    assert not store.path.exists()  # nothing made for a refused set


def test_catalog_parses_a_store_reference_and_round_trips_it() -> None:
    catalog = parse_catalog(CATALOG, "/x/cat.yaml")
    ref = catalog.connections["lake"].secret_access_key
    assert ref == SecretRef(store="LAKE_SECRET")
    assert ref.describe() == "store:LAKE_SECRET"
    assert Catalog.from_json(catalog.to_json()) == catalog
    with pytest.raises(SecretError, match="needs the worker's secret store"):
        resolve_secret(ref, {})


def test_catalog_refuses_store_with_another_source() -> None:
    text = CATALOG.replace("{store: LAKE_SECRET}", "{store: LAKE_SECRET, env: Y}")
    with pytest.raises(CatalogError, match=r"cat\.yaml:2: .*secret_access_key: expected exactly"):
        parse_catalog(text, "/x/cat.yaml")
    with pytest.raises(CatalogError, match="expected a secret store name"):
        parse_catalog(CATALOG.replace("LAKE_SECRET", "'a b'"), "/x/cat.yaml")
    with pytest.raises(ValueError):
        SecretRef(env="A", store="B")


def test_store_for_resolves_a_store_reference(store: SecretStore) -> None:
    lake = parse_catalog(CATALOG, "/x/cat.yaml").connections["lake"]
    with pytest.raises(SecretError, match="secret store:LAKE_SECRET is not in"):
        store_for(lake, {"K": "key"}, store)
    store.set("LAKE_SECRET", VALUE)
    assert store_for(lake, {"K": "key"}, store).source == "s3:http://127.0.0.1:9"


def test_data_path_hands_its_store_to_the_store_factory(tmp_path: Path, store: SecretStore) -> None:
    """The default factory gets the store: a query reading the connection resolves through it,
    and a missing secret fails the query naming it, before anything is listed."""
    catalog = parse_catalog(CATALOG, str(tmp_path / "cat.yaml"))
    cache = ObjectCache(tmp_path / "cache", budget_bytes=2**20)
    data = DataPath(catalog, cache, parser=InlineParser(), environ={"K": "key"}, secrets=store)
    policy = load_policy_text(POLICY, "policies/t.yaml")
    with pytest.raises(SecretError, match="secret store:LAKE_SECRET is not in"):
        asyncio.run(data.prepare("SELECT * FROM trips", policy))
    asyncio.run(cache.close())


def test_cli_set_from_stdin_then_list_and_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "worker"
    monkeypatch.setattr(sys, "stdin", io.StringIO(VALUE + "\n"))
    assert main(["secrets", "set", "LAKE_SECRET", "--state", str(state)]) == 0
    assert SecretStore(state / "secrets").get("LAKE_SECRET") == VALUE  # newline dropped
    assert main(["secrets", "list", "--state", str(state)]) == 0
    out, err = capsys.readouterr()
    assert out == "LAKE_SECRET\n"
    assert VALUE not in out + err
    assert main(["secrets", "delete", "LAKE_SECRET", "--state", str(state)]) == 0
    assert main(["secrets", "list", "--state", str(state)]) == 0
    assert capsys.readouterr().out == ""


def test_cli_refuses_an_empty_value_and_defaults_to_the_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [name for name in os.environ if name.startswith("DUCKCELL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DUCKCELL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["secrets", "set", "A"]) == 2
    assert "no value for secret A on stdin" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("v"))
    assert main(["secrets", "set", "A"]) == 0
    assert SecretStore(tmp_path / "state" / "secrets").names() == ["A"]


def test_rotate_key_re_encrypts_under_a_new_key_and_drops_the_old(store: SecretStore) -> None:
    store.set("A", VALUE)
    store.set("B", "other")
    old_key = (store.path / KEY_FILE).read_bytes().strip()
    assert store.rotate_key() == 2
    new_key = (store.path / KEY_FILE).read_bytes().strip()
    assert new_key != old_key and b"\n" not in new_key  # one key left
    token = (store.path / DATA_FILE).read_bytes()
    assert Fernet(new_key).decrypt(token)  # written under the new key
    with pytest.raises(InvalidToken):
        Fernet(old_key).decrypt(token)
    assert (store.get("A"), store.get("B")) == (VALUE, "other")
    assert stat.S_IMODE((store.path / KEY_FILE).stat().st_mode) == 0o600


def test_every_state_a_crash_mid_rotation_leaves_is_readable(store: SecretStore) -> None:
    """The three steps of rotate_key, stopped after the first and the second."""
    store.set("A", VALUE)
    old_key = (store.path / KEY_FILE).read_bytes().strip()
    new_key = Fernet.generate_key()
    (store.path / KEY_FILE).write_bytes(new_key + b"\n" + old_key + b"\n")  # after step 1
    assert store.get("A") == VALUE
    token = Fernet(new_key).encrypt(b'{"A": "%s"}' % VALUE.encode())
    (store.path / DATA_FILE).write_bytes(token)  # after step 2
    assert store.get("A") == VALUE
    store.set("B", "b")  # a write in between encrypts with the first key
    assert Fernet(new_key).decrypt((store.path / DATA_FILE).read_bytes())


def test_rotating_an_empty_store_just_makes_a_key(store: SecretStore) -> None:
    assert store.rotate_key() == 0
    assert (store.path / KEY_FILE).exists()
    assert store.names() == []


def test_cli_rotate_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "worker"
    SecretStore(state / "secrets").set("A", VALUE)
    assert main(["secrets", "rotate-key", "--state", str(state)]) == 0
    assert "re-encrypted 1 secret(s)" in capsys.readouterr().err
    assert SecretStore(state / "secrets").get("A") == VALUE


def test_a_read_racing_a_rotation_reads_both_files_again(
    store: SecretStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data file from before a rotation step and the key file from after it: retried."""
    store.set("A", VALUE)
    real = store._fernet
    calls = []

    def racing(*, create: bool) -> MultiFernet:
        calls.append(create)
        if len(calls) == 1:  # the key file already rotated, the data file not yet
            return MultiFernet([Fernet(Fernet.generate_key())])
        return real(create=create)

    monkeypatch.setattr(store, "_fernet", racing)
    assert store.get("A") == VALUE
    assert len(calls) == 2
