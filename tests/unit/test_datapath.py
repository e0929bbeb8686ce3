"""The data path: referenced tables -> listings -> cache leases -> bindings, with an in-memory
object store handed in through the constructor and a real cache in a temporary directory."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath, store_for
from launcher.data.listings import ListingCache
from launcher.data.objectstore import ObjectRef, ObjectStore
from launcher.data.writes import result_ipc
from launcher.errors import CatalogError, ObjectStoreError, QueryDeniedError, SecretError, SqlError
from launcher.model.catalog import Catalog, Connection, parse_catalog
from launcher.model.policy import Policy, load_policy_text
from tests.support.parsers import InlineParser

CATALOG = """\
connections:
  lake: {kind: s3, endpoint: "http://127.0.0.1:9", access_key_id: {env: K}, \
secret_access_key: {env: S}}
  hr: {kind: s3}
tables:
  trips: {connection: lake, path: "s3://bucket/trips/", format: parquet}
  zones: {connection: lake, path: "s3://bucket/zones.csv", format: csv}
  empty: {connection: lake, path: "s3://bucket/empty/", format: parquet}
  payroll: {connection: hr, path: "s3://hr-data/payroll/", format: parquet}
"""

POLICY = """\
name: t
isolation: query
runtime: runc
limits: {cpus: 1, memory: 1GiB}
access: {connections: [lake]}
"""


@dataclass
class MemoryStore:
    """An ObjectStore over a dict of key -> bytes; counts listings and downloads."""

    objects: dict[str, bytes]
    source: str = "memory"
    listed: list[str] = field(default_factory=list)
    downloads: int = 0

    async def list(self, url: str) -> list[ObjectRef]:
        self.listed.append(url)
        prefix = url.removeprefix("s3://bucket/")
        return [
            ObjectRef(self.source, "bucket", key, f"e{len(data)}", len(data))
            for key, data in sorted(self.objects.items())
            if key.startswith(prefix)
        ]

    async def download(self, ref: ObjectRef, dest: Path) -> None:
        self.downloads += 1
        dest.write_bytes(self.objects[ref.key])


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(
        {
            "trips/a.parquet": b"PAR1a",
            "trips/b.parquet": b"PAR1bb",
            "trips/_SUCCESS": b"",
            "trips/.a.parquet.crc": b"x",
            "zones.csv": b"id\n1\n",
            "empty/README.md": b"nothing here",
        }
    )


@pytest.fixture
def policy() -> Policy:
    return load_policy_text(POLICY, "policies/t.yaml")


def data_path(tmp_path: Path, store: MemoryStore, made: list[str] | None = None) -> DataPath:
    def stores(connection: Connection, environ: Mapping[str, str] | None) -> ObjectStore:
        if made is not None:
            made.append(connection.name)
        return store

    catalog = parse_catalog(CATALOG, str(tmp_path / "cat.yaml"))
    cache = ObjectCache(tmp_path / "cache", budget_bytes=2**20)
    return DataPath(catalog, cache, parser=InlineParser(), stores=stores)


def test_bindings_name_the_cached_files_of_each_referenced_table(
    tmp_path: Path, store: MemoryStore, policy: Policy
) -> None:
    async def body() -> None:
        data = data_path(tmp_path, store)
        files = await data.prepare("SELECT * FROM trips JOIN Zones USING (id)", policy)
        trips, zones = files.bindings
        assert (trips.name, trips.format, len(trips.paths)) == ("trips", "parquet", 2)
        assert (zones.name, zones.format, len(zones.paths)) == ("zones", "csv", 1)
        for path in trips.paths + zones.paths:
            assert path.startswith("/cache/objects/")
            assert (tmp_path / "cache" / path.removeprefix("/cache/")).is_file()
        assert data.cache.stats().in_use == 3
        files.release()
        assert data.cache.stats().in_use == 0
        again = await data.prepare("FROM trips", policy)
        assert store.downloads == 3  # the second query found its files in the cache
        again.release()
        await data.cache.close()

    asyncio.run(body())


def test_queries_without_catalog_tables_touch_no_store(
    tmp_path: Path, store: MemoryStore, policy: Policy
) -> None:
    made: list[str] = []

    async def body() -> None:
        data = data_path(tmp_path, store, made)
        files = await data.prepare("CREATE TEMP TABLE t AS SELECT 1; SELECT * FROM t", policy)
        assert files.bindings == ()
        await data.cache.close()

    asyncio.run(body())
    assert made == [] and store.listed == []


def test_a_table_without_files_of_its_format_is_an_error(
    tmp_path: Path, store: MemoryStore, policy: Policy
) -> None:
    async def body() -> None:
        data = data_path(tmp_path, store)
        with pytest.raises(CatalogError, match=r"table empty has no parquet files \(.parquet"):
            await data.prepare("SELECT * FROM trips, empty", policy)
        assert data.cache.stats().in_use == 0  # nothing stays leased
        await data.cache.close()

    asyncio.run(body())


def test_the_policy_must_allow_the_tables_connection(
    tmp_path: Path, store: MemoryStore, policy: Policy
) -> None:
    async def body() -> None:
        data = data_path(tmp_path, store)
        with pytest.raises(QueryDeniedError, match="policy t may not read connection hr"):
            await data.prepare("SELECT * FROM payroll", policy)
        with pytest.raises(SqlError, match="Parser Error"):
            await data.prepare("SELEC 1", policy)
        await data.cache.close()

    asyncio.run(body())
    assert store.listed == []  # refused before anything was listed


def test_store_for_resolves_secrets_on_the_host_or_names_the_missing_one() -> None:
    catalog = parse_catalog(CATALOG, "/x/cat.yaml")
    with pytest.raises(SecretError, match="secret env:K is not set"):
        store_for(catalog.connections["lake"], {"S": "secret"})
    store = store_for(catalog.connections["lake"], {"K": "key", "S": "secret"})
    assert store.source == "s3:http://127.0.0.1:9"
    assert store_for(parse_catalog("connections: {d: {kind: local}}", "/x/c.yaml").connections["d"])
    assert Catalog.EMPTY.referenced(["trips"]) == []


# --- listing_ttl: reusing a table's listing ---------------------------------------------------
WRITER = POLICY + 'writes: {allowed: true, prefixes: ["s3://bucket/trips/"]}\n'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class VersionedStore(MemoryStore):
    """A MemoryStore whose downloads, like S3's If-Match, refuse a version no longer there,
    and whose uploads put the object."""

    async def download(self, ref: ObjectRef, dest: Path) -> None:
        data = self.objects.get(ref.key)
        if data is None or f"e{len(data)}" != ref.etag:
            raise ObjectStoreError(f"{ref.key} changed since it was listed")
        await super().download(ref, dest)

    async def upload(self, source: Path, url: str) -> None:
        self.objects[url.removeprefix("s3://bucket/")] = source.read_bytes()


def ttl_data_path(tmp_path: Path, store: MemoryStore, ttl: str, clock: Clock) -> DataPath:
    lake = "secret_access_key: {env: S}"
    text = CATALOG.replace(lake + "}", f"{lake}, listing_ttl: {ttl}}}")
    catalog = parse_catalog(text, str(tmp_path / "cat.yaml"))
    cache = ObjectCache(tmp_path / "cache", budget_bytes=2**20)
    return DataPath(
        catalog,
        cache,
        parser=InlineParser(),
        stores=lambda c, e: store,
        listings=ListingCache(clock),
    )


def test_by_default_every_query_lists(tmp_path: Path, store: MemoryStore, policy: Policy) -> None:
    async def body() -> None:
        data = data_path(tmp_path, store)
        assert data.catalog.connections["lake"].listing_ttl == 0
        for _ in range(3):
            (await data.prepare("FROM trips", policy)).release()
        await data.cache.close()

    asyncio.run(body())
    assert store.listed == ["s3://bucket/trips/"] * 3


def test_a_listing_is_reused_for_its_ttl_and_no_longer(tmp_path: Path, policy: Policy) -> None:
    store = VersionedStore({"trips/a.parquet": b"PAR1a"})
    clock = Clock()

    async def body() -> None:
        data = ttl_data_path(tmp_path, store, "10s", clock)
        (await data.prepare("FROM trips", policy)).release()
        store.objects["trips/b.parquet"] = b"PAR1bb"  # added by another writer
        clock.now += 9.9
        files = await data.prepare("FROM trips", policy)
        assert len(files.bindings[0].paths) == 1  # within the TTL: the listing as it was
        files.release()
        clock.now += 0.1
        files = await data.prepare("FROM trips", policy)
        assert len(files.bindings[0].paths) == 2  # expired: listed again
        files.release()
        await data.cache.close()

    asyncio.run(body())
    assert store.listed == ["s3://bucket/trips/"] * 2


def test_a_reused_listing_naming_a_changed_object_is_dropped_and_listed_again(
    tmp_path: Path, policy: Policy
) -> None:
    store = VersionedStore({"trips/a.parquet": b"PAR1a"})

    async def body() -> None:
        data = ttl_data_path(tmp_path, store, "1m", Clock())
        (await data.prepare("FROM trips", policy)).release()
        store.objects["trips/a.parquet"] = b"PAR1-new"  # a new version (new ETag)...
        data.cache.evict(all=True)  # ...and the old one no longer cached
        files = await data.prepare("FROM trips", policy)
        [path] = files.bindings[0].paths
        assert (tmp_path / "cache" / path.removeprefix("/cache/")).read_bytes() == b"PAR1-new"
        files.release()
        await data.cache.close()

    asyncio.run(body())
    assert store.listed == ["s3://bucket/trips/"] * 2


def test_a_write_through_this_worker_drops_the_listings_it_makes_stale(
    tmp_path: Path,
) -> None:
    store = VersionedStore({"trips/a.parquet": b"PAR1a", "zones.csv": b"id\n1\n"})
    writer = load_policy_text(WRITER, "policies/t.yaml")

    async def body() -> None:
        data = ttl_data_path(tmp_path, store, "1m", Clock())
        (await data.prepare("FROM trips", writer)).release()
        (await data.prepare("FROM zones", writer)).release()
        files = await data.prepare(
            "COPY (SELECT 1 AS x) TO 's3://bucket/trips/new.parquet'", writer
        )
        assert files.write is not None
        await files.write.accept_output(b"PAR1new")
        files.write.accept_result(result_ipc(1, 7, "ignored"))
        await files.write.publish()
        files.release()
        files = await data.prepare("SELECT * FROM trips, zones", writer)
        trips, zones = files.bindings
        assert (len(trips.paths), len(zones.paths)) == (2, 1)  # read-your-writes
        files.release()
        await data.cache.close()

    asyncio.run(body())
    assert store.listed == ["s3://bucket/trips/", "s3://bucket/zones.csv", "s3://bucket/trips/"]


def test_listing_cache_drops_win_over_a_listing_in_flight() -> None:
    clock = Clock()
    listings = ListingCache(clock)
    ref = ObjectRef("memory", "bucket", "trips/a.parquet", "e1", 1)
    started = listings.start()
    listings.drop_overlapping("lake", "s3://bucket/trips/x.parquet")  # a write meanwhile
    listings.put("lake", "s3://bucket/trips/", [ref], started)
    assert listings.get("lake", "s3://bucket/trips/", 60) is None
    listings.put("lake", "s3://bucket/trips/", [ref], listings.start())
    assert listings.get("lake", "s3://bucket/trips/", 0) is None  # TTL 0: never reused
    assert listings.get("lake", "s3://bucket/trips/", 60) == [ref]
    assert listings.get("other", "s3://bucket/trips/", 60) is None
    listings.drop_overlapping("lake", "s3://bucket/zones/z.parquet")  # elsewhere: kept
    assert listings.get("lake", "s3://bucket/trips/", 60) == [ref]
    listings.drop_overlapping("lake", "s3://bucket/")  # above it: dropped
    assert listings.get("lake", "s3://bucket/trips/", 60) is None


# --- early: binding the last listing while a fresh LIST runs -----------------------------------
class GatedStore(VersionedStore):
    """A VersionedStore whose LISTs wait for ``gate`` once it is set to an unset Event."""

    gate: asyncio.Event | None = None
    broken: bool = False

    async def list(self, url: str) -> list[ObjectRef]:
        if self.gate is not None:
            await self.gate.wait()
        if self.broken:
            raise ObjectStoreError("LIST failed: connection refused")
        return await super().list(url)


async def listed_once(tmp_path: Path, store: MemoryStore, policy: Policy) -> DataPath:
    """A data path (listing_ttl 0) whose ``trips`` was listed by one earlier query."""
    data = ttl_data_path(tmp_path, store, "0s", Clock())
    (await data.prepare("FROM trips", policy, early=True)).release()
    return data


def test_early_binds_the_last_listing_before_the_fresh_list_is_back(
    tmp_path: Path, policy: Policy
) -> None:
    store = GatedStore({"trips/a.parquet": b"PAR1a"})

    async def body() -> None:
        data = ttl_data_path(tmp_path, store, "0s", Clock())
        first = await data.prepare("FROM trips", policy, early=True)
        assert first.pending is None  # never listed before: listed first, nothing to confirm
        assert await first.confirmed()
        first.release()
        store.gate = asyncio.Event()  # LISTs now hang until the gate opens
        files = await data.prepare("FROM trips", policy, early=True)
        assert len(files.bindings[0].paths) == 1 and files.pending is not None
        assert not files.pending.done()  # prepared while its LIST is still out
        store.gate.set()
        assert await files.confirmed()  # unchanged: the early bindings stand
        files.release()
        await data.cache.close()

    asyncio.run(body())
    assert store.listed == ["s3://bucket/trips/"] * 2  # one LIST per query, early or not


def test_early_bindings_of_a_changed_table_are_refuted_and_prepared_again(
    tmp_path: Path, policy: Policy
) -> None:
    store = GatedStore({"trips/a.parquet": b"PAR1a"})

    async def body() -> None:
        data = await listed_once(tmp_path, store, policy)
        store.objects["trips/b.parquet"] = b"PAR1bb"  # added by another writer
        files = await data.prepare("FROM trips", policy, early=True)
        assert len(files.bindings[0].paths) == 1  # the last listing...
        assert not await files.confirmed()  # ...which the fresh LIST refutes
        assert files.again is not None
        files.release()
        fresh = await files.again()
        assert fresh.pending is None and len(fresh.bindings[0].paths) == 2
        fresh.release()
        await data.cache.close()

    asyncio.run(body())


def test_a_failed_confirming_list_fails_the_query_with_the_stores_error(
    tmp_path: Path, policy: Policy
) -> None:
    store = GatedStore({"trips/a.parquet": b"PAR1a"})

    async def body() -> None:
        data = await listed_once(tmp_path, store, policy)
        store.broken = True
        files = await data.prepare("FROM trips", policy, early=True)
        with pytest.raises(ObjectStoreError, match="connection refused"):
            await files.confirmed()
        files.release()
        await data.cache.close()

    asyncio.run(body())


def test_releasing_early_tables_stops_their_fresh_list(tmp_path: Path, policy: Policy) -> None:
    store = GatedStore({"trips/a.parquet": b"PAR1a"})

    async def body() -> None:
        data = await listed_once(tmp_path, store, policy)
        store.gate = asyncio.Event()
        files = await data.prepare("FROM trips", policy, early=True)
        assert files.pending is not None
        files.release()  # the query ended before its LIST came back
        await asyncio.wait([files.pending])  # done, though the gate never opened
        with pytest.raises(asyncio.CancelledError):
            files.pending.result()
        await data.cache.close()

    asyncio.run(body())


def test_without_early_a_query_never_binds_an_unconfirmed_listing(
    tmp_path: Path, policy: Policy
) -> None:
    store = GatedStore({"trips/a.parquet": b"PAR1a"})

    async def body() -> None:
        data = await listed_once(tmp_path, store, policy)
        store.objects["trips/b.parquet"] = b"PAR1bb"
        files = await data.prepare("FROM trips", policy)
        assert files.pending is None and len(files.bindings[0].paths) == 2
        files.release()
        await data.cache.close()

    asyncio.run(body())


class PausedStore(MemoryStore):
    """Its LISTs say they started (``listing``), then wait until the test opens ``gate``."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__(objects)
        self.listing = asyncio.Event()
        self.gate = asyncio.Event()

    async def list(self, url: str) -> list[ObjectRef]:
        self.listing.set()
        await self.gate.wait()
        return await super().list(url)


def test_a_catalog_push_while_a_query_is_prepared_leaves_that_query_on_its_catalog(
    tmp_path: Path, store: MemoryStore, policy: Policy
) -> None:
    """A push that drops the query's connection lands between its LIST and its lease: the
    query finishes on the catalog and store client it started with (it raised KeyError)."""

    async def body() -> None:
        gated = PausedStore(store.objects)
        made: list[str] = []

        def stores(connection: Connection, environ: Mapping[str, str] | None) -> ObjectStore:
            made.append(connection.name)
            return gated

        catalog = parse_catalog(CATALOG, str(tmp_path / "cat.yaml"))
        cache = ObjectCache(tmp_path / "cache", budget_bytes=2**20)
        data = DataPath(catalog, cache, parser=InlineParser(), stores=stores)
        preparing = asyncio.create_task(data.prepare("FROM trips", policy))
        await gated.listing.wait()
        data.replace_catalog(Catalog.EMPTY)
        gated.gate.set()
        files = await preparing
        assert [len(b.paths) for b in files.bindings] == [2] and made == ["lake"]
        files.release()
        after = await data.prepare("FROM trips", policy)  # the next query: the new catalog
        assert after.bindings == () and made == ["lake"]
        await cache.close()

    asyncio.run(body())


def test_a_local_table_naming_a_link_to_one_file_binds_that_file(
    tmp_path: Path, policy: Policy
) -> None:
    """`zones.csv -> .zones-v2.csv`, the usual atomic swap: the table is that one file, not a
    directory whose hidden files are skipped (it failed with "no csv files")."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / ".zones-v2.csv").write_text("id\n1\n2\n")
    (data_dir / "zones.csv").symlink_to(data_dir / ".zones-v2.csv")
    catalog = parse_catalog(
        f"connections:\n  disk: {{kind: local}}\ntables:\n"
        f"  zones: {{connection: disk, path: '{data_dir}/zones.csv', format: csv}}\n",
        str(tmp_path / "c.yaml"),
    )
    local = load_policy_text(POLICY.replace("[lake]", "[disk]"), "policies/t.yaml")

    async def body() -> None:
        cache = ObjectCache(tmp_path / "cache", budget_bytes=2**20)
        data = DataPath(catalog, cache, parser=InlineParser())
        files = await data.prepare("FROM zones", local)
        (zones,) = files.bindings
        assert len(zones.paths) == 1
        cached = tmp_path / "cache" / zones.paths[0].removeprefix("/cache/")
        assert cached.read_text() == "id\n1\n2\n"
        files.release()
        await data.cache.close()

    asyncio.run(body())


def test_a_listing_through_a_replaced_catalog_is_not_kept_for_the_new_one(
    tmp_path: Path, policy: Policy
) -> None:
    """An early query's confirming LIST starts after a catalog push: it lists through the old
    catalog's store, so its result must not become the new catalog's last listing (a changed
    endpoint's store would refuse those refs on every later query)."""
    store = GatedStore({"trips/a.parquet": b"PAR1a"})

    async def body() -> None:
        data = await listed_once(tmp_path, store, policy)
        files = await data.prepare("FROM trips", policy, early=True)
        assert files.pending is not None  # its confirming LIST has not run yet
        data.replace_catalog(parse_catalog(CATALOG, str(tmp_path / "new.yaml")))
        assert await files.confirmed()  # the query itself stands on its own listing
        files.release()
        assert data.listings.last("lake", "s3://bucket/trips/") is None
        await data.cache.close()

    asyncio.run(body())
