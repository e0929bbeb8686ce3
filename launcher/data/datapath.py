"""The data path of one query: catalog tables -> object listings -> cache lease -> bindings.

``DataPath.prepare`` runs on the host before the query reaches a sandbox. It asks DuckDB's
parser (in the worker's parser processes, ``launcher.model.sql``) which catalog tables the SQL names
and whether it writes, lists each table's objects through its connection,
leases them in the shared cache (downloading what is missing), and returns the bindings the
runner turns into temp views over ``/cache/...`` files, together with the lease that keeps those
files from eviction until the query ends. Secrets are resolved here, on the host, only for the
connections a query uses, from the worker's environment, files or secret store
(``launcher.data.secrets``); they go into the object store client and nowhere else: never into a
sandbox, its environment or its files.

Tables are listed and leased concurrently, each table's lease starting as soon as its own
listing is back. A connection with a ``listing_ttl`` reuses a table's listing for that long
(``launcher.data.listings``: what that trades, and how a write through this worker or an object
that is gone drops it); by default every query lists.

A query prepared ``early`` does not wait for that LIST when its table was listed before: its
files are leased from the last listing at once and the fresh LIST runs beside the query.
``TableFiles.confirmed()`` says whether the fresh listing matched (same keys, ETags, sizes); the
executor holds every result byte and any upload until it has, and runs the query again on
fresh files when it has not. A warm query so pays max(LIST, run) instead of LIST + run.

A query that writes (``COPY (SELECT ...) TO 's3://...'``, see ``launcher.data.writes``) is checked
against the policy first, before any listing or download, and comes back with a
``PendingWrite``: the executor runs its rewritten SQL and uploads the output through the
connection's store once the query succeeded.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

from ..errors import (
    CatalogError,
    ObjectStoreError,
    QueryDeniedError,
    first_domain_error,
)
from ..model.catalog import Binding, Catalog, Connection, Kind, Table
from ..model.mounts import SANDBOX_CACHE
from ..model.policy import Policy, visible
from ..model.sql import ParsedSql, SqlParser
from .cache import CacheLease, ObjectCache
from .grants import CatalogGrants
from .listings import ListingCache
from .objectstore import LocalStore, ObjectRef, ObjectStore, S3Store
from .secrets import SecretStore, resolve_secret
from .writes import PendingWrite, plan_write

# Files a table made of a prefix or directory reads; a table naming one object reads it as is.
_EXTENSIONS = {
    "parquet": (".parquet", ".parq", ".pq"),
    "csv": (".csv", ".csv.gz", ".csv.zst", ".tsv", ".tsv.gz"),
}

StoreFactory = Callable[[Connection, Mapping[str, str] | None], ObjectStore]
# A write is a COPY statement, which starts with that keyword: SQL without the word needs no
# parse when the catalog has no tables either (nothing to fetch, nothing to upload).
_COPY = re.compile("copy", re.IGNORECASE)
_NOTHING = ParsedSql(frozenset(), ())


@dataclass(slots=True)
class TableFiles:
    """A query's bindings, the cache leases that pin their files, and its write if it writes;
    release when it ends (which also drops an output not uploaded)."""

    bindings: tuple[Binding, ...] = ()
    leases: list[CacheLease] = field(default_factory=list)
    write: PendingWrite | None = None
    # Set when prepared early on last listings: the fresh LISTs' verdict (see ``confirmed``),
    # and how to prepare the query again on fresh files when they disagree.
    pending: asyncio.Future[list[bool]] | None = None
    again: Callable[[], Awaitable[TableFiles]] | None = None

    async def confirmed(self) -> bool:
        """Whether these bindings are the tables' files as listed now: True at once unless
        prepared early; else waits for the fresh LISTs (raising what they raised)."""
        if self.pending is None:
            return True
        return all(await asyncio.shield(self.pending))

    async def suspect(self, error: str) -> bool:
        """DuckDB could not read a file (``error`` is its message): whether a cached file it
        names was damaged and is now dropped, so preparing again fetches it anew."""
        for lease in self.leases:
            if await lease.suspect(error):
                return True
        return False

    def release(self) -> None:
        if self.pending is not None:
            _drop(self.pending)
        if self.write is not None:
            self.write.discard()
        leases, self.leases = self.leases, []
        for lease in leases:
            lease.release()

    async def __aenter__(self) -> TableFiles:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def store_for(
    connection: Connection,
    environ: Mapping[str, str] | None = None,
    secrets: SecretStore | None = None,
) -> ObjectStore:
    """An object store client for ``connection``, its secrets resolved on this host (from
    ``environ``, files, or the ``secrets`` store for ``{store: NAME}`` references).

    Raises SecretError naming a reference that cannot be resolved.
    """
    if connection.kind == "local":
        return LocalStore()
    refs = (connection.access_key_id, connection.secret_access_key, connection.session_token)
    key_id, secret, token = (resolve_secret(ref, environ, secrets) if ref else None for ref in refs)
    return S3Store(
        endpoint_url=connection.endpoint,
        region=connection.region,
        path_style=connection.path_style,
        access_key_id=key_id,
        secret_access_key=secret,
        session_token=token,
    )


class DataPath:
    """Prepares the catalog tables of queries; one per launcher, shared by its queries.

    Object store clients are built once per connection, when a query first needs one, so a
    connection whose secret is missing fails only the queries that read it. ``secrets`` is the
    worker's secret store for ``{store: NAME}`` references; it reaches the default ``stores``
    factory (a factory handed in resolves references its own way). ``listings`` keeps every
    table's last listing: reused within a connection's ``listing_ttl``, and the start of an
    early prepare whatever its age (tests hand in one with their own clock). ``grants``: the
    catalog is the control plane's, and may use only the endpoints and local directories this
    worker allows (``launcher.data.grants``); None for a catalog of this host's own. ``parser``
    parses each query's SQL (``launcher.model.sql.ParserPool`` in a worker or the CLI).
    """

    def __init__(
        self,
        catalog: Catalog,
        cache: ObjectCache,
        *,
        parser: SqlParser,
        environ: Mapping[str, str] | None = None,
        secrets: SecretStore | None = None,
        stores: StoreFactory | None = None,
        listings: ListingCache | None = None,
        grants: CatalogGrants | None = None,
    ) -> None:
        self.cache = cache
        self._parser = parser
        self._grants = grants
        self.listings = listings if listings is not None else ListingCache()
        self._environ = environ
        self._make_store = stores or functools.partial(store_for, secrets=secrets)
        self._view = _View(catalog)

    @property
    def catalog(self) -> Catalog:
        return self._view.catalog

    def replace_catalog(self, catalog: Catalog) -> None:
        """Use ``catalog`` from the next query on (a worker's catalog push); store clients are
        rebuilt because a connection's endpoint or secret names may have changed. A query
        being prepared finishes with the catalog (and store clients) it started with."""
        self._view = _View(catalog)
        self.listings.clear()

    async def prepare(self, sql: str, policy: Policy, *, early: bool = False) -> TableFiles:
        """The bindings for the catalog tables ``sql`` names, their files leased in the cache.

        ``early``: a table listed before is bound to its last listing without waiting for a
        fresh LIST; the result's ``confirmed()`` must then be true before its results are used
        (its ``again()`` prepares the query anew when it is not).

        Raises SqlError (unparseable SQL; StatementLimitError for one too large or costly to
        parse), ParserUnavailableError, QueryDeniedError (the policy may not read a table's
        connection, or not write where the SQL writes; this worker's grants do not cover a
        table's endpoint or directory), CatalogError (a table without files),
        SecretError, ObjectStoreError or CacheError; nothing stays leased then.
        """
        view = self._view
        needed = view.catalog.tables or _COPY.search(sql)
        parsed = await self._parser.parse(sql) if needed else _NOTHING
        plan = plan_write(parsed, policy, view.catalog)
        write = None
        if plan is not None:
            if self._grants is not None:
                self._grants.check(view.catalog.connections[plan.connection])
            dropper = functools.partial(self.listings.drop_overlapping, plan.connection)
            write = PendingWrite(plan, self._store(view, plan.connection), uploaded=dropper)
        # A write's rewritten SQL differs only in its destination literal: the same tables.
        tables = view.catalog.referenced(parsed.tables)
        for table in tables:
            if not visible(policy.access.connections, table.connection):
                raise QueryDeniedError(
                    f"policy {policy.name} may not read connection {table.connection} (table "
                    f"{table.name}); use a policy whose access.connections includes it"
                )
            if self._grants is not None:
                self._grants.check(view.catalog.connections[table.connection], table)
        files = TableFiles(write=write)
        unconfirmed: list[tuple[Table, list[ObjectRef]]] = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._bind(view, t, files, unconfirmed, early))
                    for t in tables
                ]
        except BaseException as error:
            files.release()
            raise first_domain_error(error) from None
        files.bindings = tuple(task.result() for task in tasks)
        if unconfirmed:
            # Started once the leases are in, so they do not slow the leases down: from here
            # on they run beside the sandbox.
            # gather: cancelling it cancels every check, and it reads every check's error.
            files.pending = asyncio.gather(*(self._still_listed(view, *u) for u in unconfirmed))
        # Also for a query whose cached file proves damaged (TableFiles.suspect): once.
        files.again = functools.partial(self.prepare, sql, policy)
        return files

    async def _bind(
        self,
        view: _View,
        table: Table,
        files: TableFiles,
        unconfirmed: list[tuple[Table, list[ObjectRef]]],
        early: bool,
    ) -> Binding:
        """List (or reuse a listing of) one table and lease its files. ``early``: lease the
        last listing, adding it to ``unconfirmed`` for a fresh LIST to check."""
        ttl = view.catalog.connections[table.connection].listing_ttl
        reused = self.listings.get(table.connection, table.path, ttl)
        last = None
        if reused is None and early:
            reused = last = self.listings.last(table.connection, table.path)
        if reused is not None:
            try:
                binding = await self._lease(view, table, reused, files)
            except ObjectStoreError:
                # An object the reused listing names changed or went: list afresh, once.
                self.listings.drop(table.connection, table.path)
            else:
                if last is not None:
                    unconfirmed.append((table, last))
                return binding
        started = self.listings.start()
        refs = await self._list(view, table)
        self._keep(view, table, refs, started)
        return await self._lease(view, table, refs, files)

    async def _still_listed(self, view: _View, table: Table, refs: list[ObjectRef]) -> bool:
        """List ``table`` afresh, keep that listing, and say whether it is still ``refs``."""
        started = self.listings.start()
        fresh = await self._list(view, table)
        self._keep(view, table, fresh, started)
        return sorted(fresh, key=_order) == sorted(refs, key=_order)

    def _keep(
        self, view: _View, table: Table, refs: list[ObjectRef], started: tuple[float, int]
    ) -> None:
        """Keep a listing for the next queries, unless it came through a catalog that has
        been replaced since (its store may no longer be the connection's)."""
        if self._view is view:
            self.listings.put(table.connection, table.path, refs, started)

    async def _list(self, view: _View, table: Table) -> list[ObjectRef]:
        refs = await self._store(view, table.connection).list(table.path)
        path = table.path
        if view.catalog.connections[table.connection].kind == Kind.LOCAL:
            path = os.path.realpath(path)  # the local store lists a link's target
        named = len(refs) == 1 and (path == refs[0].key or path.endswith("/" + refs[0].key))
        if not named:  # a prefix or directory: only its data files, not _SUCCESS, .crc, README
            refs = [ref for ref in refs if _reads(ref.key, table.format)]
        if not refs:
            suffixes = ", ".join(_EXTENSIONS[table.format])
            raise CatalogError(
                f"table {table.name} has no {table.format} files ({suffixes}) under "
                f"{table.path}; check the table's path in the catalog"
            )
        return refs

    async def _lease(
        self, view: _View, table: Table, refs: list[ObjectRef], files: TableFiles
    ) -> Binding:
        lease = await self.cache.lease(self._store(view, table.connection), refs)
        files.leases.append(lease)
        paths = tuple(f"{SANDBOX_CACHE}/{path}" for path in lease.paths)
        return Binding(table.name, table.format, paths)

    def _store(self, view: _View, name: str) -> ObjectStore:
        store = view.stores.get(name)
        if store is None:
            store = self._make_store(view.catalog.connections[name], self._environ)
            view.stores[name] = store
        return store


@dataclass(slots=True)
class _View:
    """A catalog and the store clients built for its connections: replaced together, so a
    query holding one never meets a connection of another catalog."""

    catalog: Catalog
    stores: dict[str, ObjectStore] = field(default_factory=dict)


def _drop(checks: asyncio.Future[list[bool]]) -> None:
    """Cancel checks nobody will await; an error they ended with is not an unretrieved one."""
    checks.cancel()
    checks.add_done_callback(lambda done: done.cancelled() or done.exception())


def _order(ref: ObjectRef) -> tuple[str, str]:
    return ref.bucket, ref.key


def _reads(key: str, fmt: str) -> bool:
    """Whether a table of format ``fmt`` reads the object at ``key`` (not _SUCCESS, .crc...)."""
    name = key.rsplit("/", 1)[-1].lower()
    return not name.startswith(("_", ".")) and name.endswith(_EXTENSIONS[fmt])
