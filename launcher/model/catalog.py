"""The catalog: named tables over files in object storage or local directories.

A catalog is a YAML file (or a JSON document pushed by the control plane), parsed once at load
into the frozen dataclasses below. It holds *names*: of connections, of tables, and of secrets
(``SecretRef``), which are resolved only on the worker, only when a query needs them, and never
travel into a sandbox. Any mistake raises ``CatalogError`` with one line naming the file, the
line and the field::

    cat.yaml:3: connections.lake.secret_access_key: expected a reference {env: NAME},
    {file: PATH} or {store: NAME}, not a literal value

Keys (``required`` or the default)::

    connections.NAME.kind               required; s3 | local
    connections.NAME.endpoint           null (AWS); s3 only; http:// or https:// URL
    connections.NAME.region             null; s3 only
    connections.NAME.path_style         false; s3 only
    connections.NAME.access_key_id      null; s3 only; {env: NAME}, {file: /ABSOLUTE/PATH} or
    connections.NAME.secret_access_key  null;   {store: NAME} (the worker's secret store, see
                                        launcher.data.secrets); both or neither of these two
    connections.NAME.session_token      null; only with the two above
    connections.NAME.worker             null; the worker (id or name) that must run queries
                                        reading this connection's tables
    connections.NAME.listing_ttl        0s; how long a table's object listing may be reused
                                        ("5s", "1m"; at most 1h). 0 lists on every query, so
                                        a query sees every object written before it started;
                                        above 0 a query may miss objects added, replaced or
                                        removed by others for up to that long (this worker's
                                        own writes are always seen): see launcher.data.listings
    tables.NAME.connection              required; a connection of this catalog
    tables.NAME.path                    required; s3://BUCKET/PREFIX for s3; for local a file or
                                        directory, relative to the catalog file's directory
    tables.NAME.format                  required; parquet | csv
    roles.NAME.policy                   null (the worker's default); the policy an API key of
                                        this role runs its queries under
    roles.NAME.tables                   null (every table); the tables this role may read and
                                        see; with no roles section every role reads everything

Connection names are ``[A-Za-z_][A-Za-z0-9_-]*``; table names are plain SQL identifiers
(``[A-Za-z_][A-Za-z0-9_]*``, at most 63 characters), unique ignoring case as SQL compares them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

from yaml.nodes import Node, ScalarNode

from ..errors import CatalogError
from ..yamlfile import Section, found, parse_duration, quote
from .catalog_yaml import CatalogReader

__all__ = ["Binding", "Catalog", "Connection", "Role", "SecretRef", "Table"]

_CONNECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,62}")
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The name of a secret in the worker's store, ``{store: NAME}`` (launcher.data.secrets).
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
_S3_PATH = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^*?\[\]]*")
_WORD = re.compile(r"\S+")
_ENDPOINT = re.compile(r"https?://[^\s/]+/?")
_SECRETS = ("access_key_id", "secret_access_key", "session_token")
_S3_ONLY = ("endpoint", "region", "path_style", *_SECRETS)
_MAX_LISTING_TTL_S = 3600.0
E = TypeVar("E", bound=StrEnum)


class Kind(StrEnum):
    S3 = "s3"
    LOCAL = "local"


class Format(StrEnum):
    PARQUET = "parquet"
    CSV = "csv"


@dataclass(frozen=True, slots=True)
class SecretRef:
    """The name of a secret on the worker (an environment variable, a file, or an entry of
    its encrypted secret store), never a value: ``launcher.data.secrets.resolve_secret`` reads
    the value, on the worker, when a query needs it."""

    env: str | None = None
    file: str | None = None
    store: str | None = None

    def __post_init__(self) -> None:
        if [self.env, self.file, self.store].count(None) != 2:
            raise ValueError("a SecretRef names exactly one of env, file or store")

    def describe(self) -> str:
        if self.store is not None:
            return f"store:{self.store}"
        return f"env:{self.env}" if self.env is not None else f"file:{self.file}"


@dataclass(frozen=True, slots=True)
class Connection:
    """Where a table's files live, and the names of the secrets that open it."""

    name: str
    kind: str  # "s3" | "local"
    endpoint: str | None = None
    region: str | None = None
    path_style: bool = False
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None
    worker: str | None = None  # pinning: the worker (id or name) that must run its queries
    listing_ttl: float = 0.0  # seconds a table listing may be reused; 0: list every query


@dataclass(frozen=True, slots=True)
class Table:
    """A name SQL can use for the files under ``path`` (a prefix, a directory or one file)."""

    name: str
    connection: str
    path: str
    format: str  # "parquet" | "csv"


@dataclass(frozen=True, slots=True)
class Binding:
    """A table as one sandbox sees it: its name, format and files (absolute sandbox paths)."""

    name: str
    format: str
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Role:
    """What an API key's role may do: the policy its queries run under, the tables it reads.

    ``policy`` None means the worker's default policy; ``tables`` None means every table.
    """

    name: str
    policy: str | None = None
    tables: tuple[str, ...] | None = None

    def may_read(self, table: str) -> bool:
        return self.tables is None or table.lower() in {t.lower() for t in self.tables}


@dataclass(frozen=True, slots=True)
class Catalog:
    connections: Mapping[str, Connection]
    tables: Mapping[str, Table]
    roles: Mapping[str, Role] = field(default_factory=lambda: MappingProxyType({}))
    EMPTY: ClassVar[Catalog]

    def role(self, name: str) -> Role | None:
        """The role of that name; with no ``roles`` section every role may read everything."""
        if not self.roles:
            return Role(name)
        return self.roles.get(name)

    def referenced(self, names: Iterable[str]) -> list[Table]:
        """The catalog tables among ``names`` (a statement's, as DuckDB's parser found them:
        ``ParsedSql.tables``), compared ignoring case; unknown names ignored.

        Names the catalog lacks may be the session's temp tables, so they are not an error.
        """
        by_name = {name.lower(): table for name, table in self.tables.items()}
        lowered = {name.lower() for name in names}
        return [by_name[name] for name in sorted(lowered) if name in by_name]

    def to_json(self) -> str:
        """The catalog as JSON (names and secret references only) for the tunnel."""
        connections = {name: _connection_doc(c) for name, c in self.connections.items()}
        tables = {
            name: {"connection": t.connection, "path": t.path, "format": t.format}
            for name, t in self.tables.items()
        }
        roles = {name: _role_doc(role) for name, role in self.roles.items()}
        doc = {"connections": connections, "tables": tables}
        return json.dumps({**doc, "roles": roles} if roles else doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Catalog:
        """The catalog ``to_json`` wrote, checked like a catalog file (JSON is YAML).

        Its local paths are absolute already: ``parse_catalog`` made them so where it was read.
        """
        return parse_catalog(text, "<catalog pushed by the control plane>", Path("/"))


Catalog.EMPTY = Catalog(MappingProxyType({}), MappingProxyType({}))


def _connection_doc(connection: Connection) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": connection.kind}
    for key in ("endpoint", "region", "worker", *_SECRETS):
        value = getattr(connection, key)
        if isinstance(value, SecretRef):
            value = _ref_doc(value)
        if value is not None:
            doc[key] = value
    if connection.path_style:
        doc["path_style"] = True
    if connection.listing_ttl:
        doc["listing_ttl"] = connection.listing_ttl
    return doc


def _ref_doc(ref: SecretRef) -> dict[str, str]:
    """The one-key map a reference was written as: {env: ...}, {file: ...} or {store: ...}."""
    named = {"env": ref.env, "file": ref.file, "store": ref.store}
    return {key: value for key, value in named.items() if value is not None}


def _role_doc(role: Role) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if role.policy is not None:
        doc["policy"] = role.policy
    if role.tables is not None:
        doc["tables"] = list(role.tables)
    return doc


def load_catalog(path: Path) -> Catalog:
    """Parse a catalog file; relative local table paths are taken from its directory."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        why = getattr(error, "strerror", None) or "not UTF-8 text"
        raise CatalogError(f"{path}: cannot read the catalog file ({why})") from None
    return parse_catalog(text, str(path), path.resolve().parent)


def parse_catalog(text: str, source: str, base_dir: Path | None = None) -> Catalog:
    """Parse a catalog document; ``source`` names it in errors, ``base_dir`` anchors local
    relative paths (default: the directory of ``source``)."""
    r = CatalogReader(source)
    top = r.section(r.compose(text), "", 1)
    base = base_dir if base_dir is not None else Path(source).resolve().parent
    connections = {
        name: _connection(r, name, sec)
        for name, _, sec in r.entries(top, "connections", _CONNECTION_NAME, "a connection name")
    }
    tables: dict[str, Table] = {}
    lowered: dict[str, str] = {}
    for name, node, sec in r.entries(top, "tables", _TABLE_NAME, "a SQL identifier"):
        if name.lower() in lowered:
            first = lowered[name.lower()]
            r.fail(node, f"tables.{name}", f"expected a unique name, but SQL reads it as {first}")
        lowered[name.lower()] = name
        tables[name] = _table(r, name, sec, connections, base)
    roles = {
        name: _role(r, name, sec, tables)
        for name, _, sec in r.entries(top, "roles", _CONNECTION_NAME, "a role name")
    }
    return Catalog(MappingProxyType(connections), MappingProxyType(tables), MappingProxyType(roles))


def _role(r: CatalogReader, name: str, sec: Section, tables: Mapping[str, Table]) -> Role:
    policy = r.get(sec, "policy", None, _pattern, r, _CONNECTION_NAME, "a policy name")
    known = {t.lower() for t in tables}
    listed = r.get(
        sec, "tables", None, r.strings, "a table of this catalog", lambda t: t.lower() in known
    )
    return Role(name, policy, listed)


def _connection(r: CatalogReader, name: str, sec: Section) -> Connection:
    kind = _choice(r, sec, "kind", Kind)
    if kind is Kind.LOCAL:
        for key in _S3_ONLY:
            if key in sec.values:
                r.fail(sec.keys[key], sec.field(key), "expected only with kind s3; remove it")
    refs = {key: r.get(sec, key, None, _secret, r) for key in _SECRETS}
    if (refs["access_key_id"] is None) != (refs["secret_access_key"] is None):
        missing = "access_key_id" if refs["access_key_id"] is None else "secret_access_key"
        other = "secret_access_key" if missing == "access_key_id" else "access_key_id"
        r.fail(sec.line, sec.field(missing), f"expected with {other} (both or neither); add it")
    if refs["session_token"] is not None and refs["access_key_id"] is None:
        expected = "only with access_key_id and secret_access_key"
        r.fail(sec.keys["session_token"], sec.field("session_token"), f"expected {expected}")
    return Connection(
        name=name,
        kind=kind.value,
        endpoint=r.get(
            sec, "endpoint", None, _pattern, r, _ENDPOINT, "a URL like http://host:9000"
        ),
        region=r.get(sec, "region", None, _pattern, r, _WORD, "a region like us-east-1"),
        path_style=r.get(sec, "path_style", False, r.boolean),
        worker=r.get(sec, "worker", None, _pattern, r, _WORD, "a worker id or name"),
        listing_ttl=r.get(sec, "listing_ttl", 0.0, _ttl, r),
        **refs,
    )


def _ttl(node: Node, name: str, r: CatalogReader) -> float:
    """A listing TTL: 0 (list every query) up to an hour."""
    expected = 'a duration like "5s" or "1m" (0 lists on every query)'
    kind = r.expect(node, name, ("int", "float", "str"), expected)
    try:
        value = parse_duration(node.value) if kind == "str" else float(node.value)
    except ValueError:  # a YAML number Python does not read, like 1_0 or .inf
        value = None
    if value is None or not 0 <= value <= _MAX_LISTING_TTL_S:
        r.fail(node, name, f"expected {expected}, at most 1h; got {found(node)}")
    return value


def _pattern(node: Node, name: str, r: CatalogReader, pattern: re.Pattern[str], what: str) -> str:
    text = r.text(node, name)
    if not pattern.fullmatch(text):
        r.fail(node, name, f"expected {what}, got {found(node)}")
    return text


def _secret(node: Node, name: str, r: CatalogReader) -> SecretRef:
    expected = "a reference {env: NAME}, {file: PATH} or {store: NAME}"
    if isinstance(node, ScalarNode):
        r.fail(node, name, f"expected {expected}, not a literal value")
    r.expect(node, name, ("map",), expected)
    sec = r.section(node, name, node.start_mark.line + 1)
    if len(sec.values) != 1:
        got = len(sec.values)
        r.fail(node, name, f"expected exactly one of env, file or store, got {got}")
    env = r.get(sec, "env", None, _pattern, r, _ENV_NAME, "an environment variable name")
    file = r.get(sec, "file", None, _pattern, r, re.compile(r"/.*"), "an absolute path")
    store = r.get(sec, "store", None, _pattern, r, SECRET_NAME, "a secret store name")
    return SecretRef(env=env, file=file, store=store)


def _table(
    r: CatalogReader, name: str, sec: Section, connections: Mapping[str, Connection], base: Path
) -> Table:
    conn_node = r.require(sec, "connection", "the name of a connection above")
    connection = connections.get(r.text(conn_node, sec.field("connection")))
    if connection is None:
        known = ", ".join(quote(c) for c in connections) or "a connection (none are defined)"
        got = found(conn_node)
        r.fail(conn_node, sec.field("connection"), f"expected one of {known}, got {got}")
    path = _table_path(r, sec, connection, base)
    return Table(name, connection.name, path, _choice(r, sec, "format", Format).value)


def _table_path(r: CatalogReader, sec: Section, connection: Connection, base: Path) -> str:
    """An s3 prefix as written, or a local path made absolute against the catalog's folder."""
    node = r.require(sec, "path", "s3://BUCKET/PREFIX or a local path")
    path, name = r.text(node, sec.field("path")), sec.field("path")
    if re.search(r"[*?\[\]]", path):
        r.fail(node, name, f"expected a prefix, directory or file, not a glob; got {found(node)}")
    if connection.kind == Kind.S3:
        if not _S3_PATH.fullmatch(path) or any(p in (".", "..") for p in path.split("/")[3:]):
            expected = 'a path like "s3://bucket/prefix/" (no . or .. segments) for kind s3'
            r.fail(node, name, f"expected {expected}, got {found(node)}")
        return path
    if "://" in path or not path.strip():
        expected = f"a local file or directory for the local connection {connection.name}"
        r.fail(node, name, f"expected {expected}, got {found(node)}")
    return os.path.normpath(base / path)


def _choice(r: CatalogReader, sec: Section, key: str, enum: type[E]) -> E:
    """``Reader.choice`` with the full field path in messages."""
    options = " or ".join(quote(member.value) for member in enum)
    node = r.require(sec, key, options)
    if r.text(node, sec.field(key)) not in {member.value for member in enum}:
        r.fail(node, sec.field(key), f"expected {options}, got {found(node)}")
    return enum(node.value)
