"""What a catalog pushed by the control plane may make this worker do.

The control plane names connections, endpoints and local paths; the worker holds the secrets
and the files. Taken on trust, a pushed catalog could point a connection that carries one of
this worker's secrets at a server of anyone's choosing (the secret would travel in its requests:
put it in ``access_key_id`` and it is sent in clear in every request's Authorization header),
or declare a ``kind: local`` table over any file the worker can read (its TLS key, its secret
store's key). So the worker's operator says where pushed catalogs may reach: ``endpoints`` their
S3 connections may use (``aws`` for AWS S3 itself, a connection without an endpoint), and
``local_dirs`` their local tables may read. Anything else is refused, before anything is
listed or run, with a message naming the flag that would allow it. A catalog given on this
host (``duckcell query --catalog``) is the operator's own and is not checked.

The secrets a pushed connection names are limited too: ``{store: NAME}`` always (the worker's
secret store holds only what its operator put there for catalogs), ``{env: NAME}`` and
``{file: PATH}`` only where ``secrets`` allows them (``env:NAME``, ``file:PATH`` with PATH a
file or a directory). Otherwise a catalog could send any variable or file the worker can read
(its enrollment token, another service's password) to an allowed endpoint as a credential.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import DuckcellError, QueryDeniedError
from ..model.catalog import Catalog, Connection, Kind, SecretRef, Table

AWS = "aws"  # in ``endpoints``: AWS S3 itself (a connection with no endpoint)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_endpoint(url: str) -> str:
    """``scheme://host:port`` in lower case, the port made explicit; ``aws`` stays ``aws``.

    Raises DuckcellError for anything that is not an http(s) URL without a path.
    """
    if url.strip().lower() == AWS:
        return AWS
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:  # a bad port, an unclosed IPv6 bracket
        parts, port = urlsplit(""), -1
    if (
        parts.scheme.lower() not in _DEFAULT_PORTS
        or not parts.hostname
        or port == -1
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise DuckcellError(
            f"endpoint {url!r}: expected an http(s) URL such as https://minio.internal:9000 "
            f"(no path), or {AWS!r} for AWS S3"
        )
    scheme = parts.scheme.lower()
    return f"{scheme}://{parts.hostname.lower()}:{port or _DEFAULT_PORTS[scheme]}"


@dataclass(frozen=True, slots=True)
class SecretGrants:
    """The environment variables and files pushed connections may name as secrets
    (``{store: NAME}`` is always allowed)."""

    env: frozenset[str] = frozenset()
    # As given (absolute); a directory allows the files under it. Both sides are resolved at
    # each check, so a grant follows a symlink that is re-pointed (a rotated secret volume).
    files: tuple[Path, ...] = ()

    @classmethod
    def of(cls, entries: Iterable[str]) -> SecretGrants:
        """From ``env:NAME`` and ``file:PATH`` entries; raises DuckcellError for another form."""
        env: set[str] = set()
        files: list[Path] = []
        for entry in entries:
            kind, sep, name = entry.strip().partition(":")
            if sep and kind == "env" and name.strip():
                env.add(name.strip())
            elif sep and kind == "file" and name.strip().startswith("/"):
                files.append(Path(os.path.normpath(name.strip())))
            else:
                raise DuckcellError(
                    f"allowed secret {entry!r}: expected env:NAME or file:/ABSOLUTE/PATH "
                    "({store: NAME} references need no grant)"
                )
        return cls(frozenset(env), tuple(files))

    def allows(self, ref: SecretRef) -> bool:
        if ref.store is not None:
            return True
        if ref.env is not None:
            return ref.env in self.env
        assert ref.file is not None
        path = Path(os.path.realpath(ref.file))  # as reading it would follow links
        roots = (Path(os.path.realpath(root)) for root in self.files)
        return any(path.is_relative_to(root) for root in roots)

    def describe(self) -> str:
        names = sorted(f"env:{name}" for name in self.env) + [f"file:{f}" for f in self.files]
        return ", ".join(["store:*", *names])


@dataclass(frozen=True, slots=True)
class CatalogGrants:
    """The endpoints, local directories and secret references pushed catalogs may use
    (normalized, resolved)."""

    endpoints: frozenset[str] = frozenset()
    local_dirs: tuple[Path, ...] = ()
    secrets: SecretGrants = SecretGrants()

    @classmethod
    def of(
        cls, endpoints: Iterable[str], local_dirs: Iterable[Path], secrets: Iterable[str] = ()
    ) -> CatalogGrants:
        """From the operator's flags; raises DuckcellError for a malformed endpoint or secret
        entry, or a directory that is not one."""
        dirs = []
        for directory in local_dirs:
            resolved = Path(os.path.realpath(Path(directory).expanduser()))  # a loop: no raise
            if not resolved.is_dir():
                raise DuckcellError(f"allowed local directory {directory}: not a directory")
            dirs.append(resolved)
        allowed = frozenset(normalize_endpoint(e) for e in endpoints)
        return cls(allowed, tuple(dirs), SecretGrants.of(secrets))

    def check(self, connection: Connection, table: Table | None = None) -> None:
        """Raise QueryDeniedError unless this worker lets a pushed catalog use ``connection``
        (for S3, its endpoint and the secrets it names) and read ``table`` (for a local table,
        its path)."""
        if connection.kind == Kind.S3:
            try:
                endpoint = normalize_endpoint(connection.endpoint or AWS)
            except DuckcellError as error:  # the catalog's own check is looser
                raise QueryDeniedError(
                    f"connection {connection.name}: {error}; this worker uses no endpoint it "
                    "cannot compare with the ones its operator allowed"
                ) from None
            if endpoint not in self.endpoints:
                allow = connection.endpoint or AWS
                where = "AWS S3" if allow == AWS else allow
                raise QueryDeniedError(
                    f"connection {connection.name} points at {where}, which this worker does "
                    "not let the control plane's catalog use (it would get this worker's "
                    f"requests and credentials); its operator can allow it with `duckcell "
                    f"worker --allow-endpoint {allow}`"
                )
            self._check_secrets(connection)
        elif table is not None:
            path = Path(os.path.realpath(table.path))  # as the local store lists it
            if not any(path.is_relative_to(root) for root in self.local_dirs):
                raise QueryDeniedError(
                    f"table {table.name} reads {table.path} on the worker, outside the "
                    "directories it lets the control plane's catalog read; its operator can "
                    "allow a directory with `duckcell worker --allow-local-dir DIR`"
                )

    def _check_secrets(self, connection: Connection) -> None:
        for field in ("access_key_id", "secret_access_key", "session_token"):
            ref: SecretRef | None = getattr(connection, field)
            if ref is None or self.secrets.allows(ref):
                continue
            name = ref.describe()
            raise QueryDeniedError(
                f"connection {connection.name}: {field} names the secret {name}, which this "
                "worker does not let the control plane's catalog use (its value would go to "
                "the connection's endpoint); its operator can allow it with `duckcell worker "
                f"--allow-secret {name}`, or keep it in the worker's secret store (`duckcell "
                "secrets set NAME`) and have the catalog name {store: NAME}"
            )

    def refusals(self, catalog: Catalog) -> list[str]:
        """What this worker will refuse of ``catalog``, one message per connection or table
        (logged when a catalog arrives, so the operator hears of it before a query does)."""
        found: dict[str, str] = {}
        for table in catalog.tables.values():
            connection = catalog.connections[table.connection]
            key = connection.name if connection.kind == Kind.S3 else f"table {table.name}"
            try:
                self.check(connection, table)
            except QueryDeniedError as error:
                found.setdefault(key, str(error))
        return list(found.values())

    def describe(self) -> str:
        """One line for the worker's start-up message."""
        endpoints = ", ".join(sorted(self.endpoints)) or "none"
        dirs = ", ".join(str(d) for d in self.local_dirs) or "none"
        return (
            f"catalog endpoints allowed: {endpoints}; local directories allowed: {dirs}; "
            f"secrets allowed: {self.secrets.describe()}"
        )


def _split_list(text: str | None) -> list[str]:
    """A comma-separated environment value as a list (empty items dropped)."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


ENDPOINTS_ENV = "DUCKCELL_ALLOW_ENDPOINTS"
LOCAL_DIRS_ENV = "DUCKCELL_ALLOW_LOCAL_DIRS"
SECRETS_ENV = "DUCKCELL_ALLOW_SECRETS"


def grants_from(
    endpoints: list[str] | None,
    local_dirs: list[Path] | None,
    environ: Mapping[str, str],
    secrets: list[str] | None = None,
) -> CatalogGrants:
    """The flags where given, else the comma-separated ``DUCKCELL_ALLOW_ENDPOINTS``,
    ``DUCKCELL_ALLOW_LOCAL_DIRS`` and ``DUCKCELL_ALLOW_SECRETS``; raises DuckcellError for a
    bad entry."""
    if not endpoints:
        endpoints = _split_list(environ.get(ENDPOINTS_ENV))
    if not local_dirs:
        local_dirs = [Path(d) for d in _split_list(environ.get(LOCAL_DIRS_ENV))]
    if not secrets:
        secrets = _split_list(environ.get(SECRETS_ENV))
    return CatalogGrants.of(endpoints, local_dirs, secrets)
