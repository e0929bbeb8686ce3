"""The worker's local secret store: named secrets encrypted at rest with a key only it holds.

A catalog names a secret (``SecretRef``: ``{env: NAME}``, ``{file: PATH}`` or ``{store: NAME}``);
``resolve_secret`` reads its value here, on the worker's own host, when a query first needs the
connection (see ``launcher.data.datapath``). The store is a directory, by
default ``STATE/secrets/``, mode 0700, holding two files:

    secrets.key        Fernet keys (mode 0600), one per line, the newest first; made the
                       first time a secret is set
    secrets.json.enc   one Fernet token of the JSON map name -> value

Encryption keeps values out of backups, disk images and ``grep`` of the state directory that do
not also carry the key; it does not protect against someone who can read the key file, which is
why both files belong to the worker's user alone. Writes go to a temporary file that is synced
and renamed over the old one, so a crash leaves the previous map or the new one, never half of
either; a lock file serialises concurrent ``set``/``delete``/``rotate_key`` on one host.

``rotate_key`` replaces the key in three durable steps, each leaving a readable store if the
host dies right after it: the new key is put in front of the old one, the map is re-encrypted
with the new key, then the old key is dropped. Reading tries every key of the file (Fernet's
``MultiFernet``), so the middle states decrypt too.

Every failure is a ``SecretError`` that names the secret and the store, never a value.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..atomic import fsync_directory, write_atomically
from ..errors import SecretError
from ..model.catalog import SECRET_NAME, SecretRef

__all__ = ["SecretStore", "resolve_secret"]

KEY_FILE = "secrets.key"
DATA_FILE = "secrets.json.enc"
_LOCK_FILE = ".lock"


class SecretStore:
    """Named secrets under ``path``; ``get`` raises SecretError rather than returning nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, name: str, value: str) -> None:
        """Store ``value`` under ``name``, replacing an older value; makes the key if none."""
        _check_name(name)
        if not value:
            raise SecretError(f"secret {name}: refusing an empty value; give the secret itself")
        with self._locked():
            secrets = self._read()
            secrets[name] = value
            self._write(secrets)

    def get(self, name: str) -> str:
        """The value of ``name``. The message of a missing one says how to add it."""
        value = self._read().get(name)
        if value is None:
            raise SecretError(
                f"secret store:{name} is not in the secret store at {self.path}; add it on this "
                f"worker with `duckcell secrets set {name} --state {self.path.parent}` "
                "(the value is read from stdin)"
            )
        return value

    def names(self) -> list[str]:
        """The names of the stored secrets, sorted; never their values."""
        return sorted(self._read())

    def delete(self, name: str) -> None:
        """Forget ``name``; a name the store does not hold is an error (likely a typo)."""
        with self._locked():
            secrets = self._read()
            if name not in secrets:
                raise SecretError(
                    f"secret {name} is not in the secret store at {self.path}; "
                    "`duckcell secrets list` shows the names it holds"
                )
            del secrets[name]
            self._write(secrets)

    def rotate_key(self) -> int:
        """Encrypt the store under a new key and forget the old one; returns how many secrets
        were re-encrypted. A store with no key yet just gets one."""
        with self._locked():
            key_file = self.path / KEY_FILE
            if not key_file.exists():
                self._make_key(key_file)
                return 0
            old = self._keys()
            new = Fernet.generate_key()
            write_atomically(key_file, b"\n".join([new, *old]) + b"\n", 0o600)
            secrets = self._read()
            write_atomically(self.path / DATA_FILE, Fernet(new).encrypt(_encode(secrets)), 0o600)
            write_atomically(key_file, new + b"\n", 0o600)
            return len(secrets)

    def _read(self) -> dict[str, str]:
        """The decrypted map; empty when nothing was ever stored.

        Readers take no lock, so a read may see the data file from before a ``rotate_key``
        step and the key file from after it: a token no key opens is read once more, both
        files again, before it counts as a wrong key."""
        data_file = self.path / DATA_FILE
        for attempt in (1, 2):
            try:
                token = data_file.read_bytes()
            except FileNotFoundError:
                return {}
            except OSError as error:
                raise SecretError(
                    f"cannot read the secret store {data_file} ({error.strerror}); run as the "
                    "worker's user, who owns it"
                ) from None
            try:
                plain = self._fernet(create=False).decrypt(token)
                break
            except InvalidToken:
                if attempt == 1:
                    continue
                raise SecretError(
                    f"the secret store {data_file} cannot be decrypted with "
                    f"{self.path / KEY_FILE}: the key is not the one it was written with, or "
                    "the file is damaged; restore the matching key, or move both files away "
                    "and set the secrets again"
                ) from None
        secrets = json.loads(plain)
        if not isinstance(secrets, dict):
            raise SecretError(f"the secret store {data_file} is not a map of names to values")
        return {str(name): str(value) for name, value in secrets.items()}

    def _write(self, secrets: dict[str, str]) -> None:
        sealed = self._fernet(create=True).encrypt(_encode(secrets))
        write_atomically(self.path / DATA_FILE, sealed, 0o600)

    def _fernet(self, *, create: bool) -> MultiFernet:
        """Every key of the key file, the first one encrypting."""
        if create and not (self.path / KEY_FILE).exists():
            self._make_key(self.path / KEY_FILE)
        key_file = self.path / KEY_FILE
        try:
            return MultiFernet([Fernet(key) for key in self._keys()])
        except ValueError:
            raise SecretError(
                f"{key_file} is not a Fernet key; restore the store's key file"
            ) from None

    def _keys(self) -> list[bytes]:
        key_file = self.path / KEY_FILE
        try:
            keys = [line.strip() for line in key_file.read_bytes().splitlines() if line.strip()]
        except FileNotFoundError:
            raise SecretError(
                f"the secret store {self.path} has secrets but no key {key_file}; restore "
                "the key file from where it was backed up"
            ) from None
        except OSError as error:
            raise SecretError(
                f"cannot read the secret store key {key_file} ({error.strerror}); run as the "
                "worker's user, who owns it"
            ) from None
        if not keys:
            raise SecretError(f"{key_file} is empty; restore the store's key file")
        if key_file.stat().st_mode & 0o077:  # restored or copied without its mode
            raise SecretError(f"{key_file} is readable by other users: run `chmod 600 {key_file}`")
        return keys

    def _make_key(self, key_file: Path) -> bytes:
        """A new key, written whole or not at all: a temporary file is linked into place, and
        a store another process keyed first keeps its key (``link`` refuses to replace)."""
        self._make_dir()
        key = Fernet.generate_key()
        fd, temp = tempfile.mkstemp(dir=self.path, prefix=".key-")  # O_EXCL, mode 0600
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(key)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(temp, key_file)
            except FileExistsError:
                return key_file.read_bytes()
        finally:
            os.unlink(temp)
        fsync_directory(self.path)
        return key

    def _make_dir(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)  # mkdir's mode passes through the umask; be exact
        except OSError as error:
            raise SecretError(
                f"cannot create the secret store {self.path} ({error.strerror}); check --state"
            ) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write, so two `secrets set` on one host lose nothing."""
        self._make_dir()
        fd = os.open(self.path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def resolve_secret(
    ref: SecretRef, environ: Mapping[str, str] | None = None, store: SecretStore | None = None
) -> str:
    """The value of the secret ``ref`` names; raises SecretError naming the reference (never
    a value).

    ``store`` is the worker's secret store; only ``{store: NAME}`` references need one.
    """
    if ref.store is not None:
        if store is None:
            raise SecretError(
                f"secret {ref.describe()} needs the worker's secret store, which this "
                "command does not open; use env or file references here"
            )
        return store.get(ref.store)
    if ref.env is not None:
        value = (os.environ if environ is None else environ).get(ref.env, "")
        if not value:
            raise SecretError(
                f"secret {ref.describe()} is not set in the worker's environment; "
                f"set {ref.env} where the worker runs"
            )
        return value
    assert ref.file is not None
    try:
        text = Path(ref.file).read_text()
    except (OSError, UnicodeDecodeError) as error:
        why = getattr(error, "strerror", None) or "not UTF-8 text"
        raise SecretError(
            f"secret {ref.describe()} cannot be read on this worker ({why}); "
            "check the file exists and the worker's user may read it"
        ) from None
    # One trailing newline is how editors and `echo` end files; it is not part of the secret.
    value = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    if not value:
        raise SecretError(f"secret {ref.describe()} is empty; write the secret into it")
    return value


def _encode(secrets: dict[str, str]) -> bytes:
    return json.dumps(secrets, sort_keys=True).encode()


def _check_name(name: str) -> None:
    if not SECRET_NAME.fullmatch(name):
        raise SecretError(
            f"{name!r} is not a secret name; use letters, digits, _ . - (starting with a "
            "letter or _), at most 128 characters"
        )
