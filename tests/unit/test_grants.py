"""What a pushed catalog may make a worker do (``launcher.data.grants``), and DataPath enforcing it
before any store client is built or anything is listed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.data.grants import AWS, CatalogGrants, SecretGrants, grants_from, normalize_endpoint
from launcher.data.objectstore import ObjectStore
from launcher.errors import DuckcellError, QueryDeniedError
from launcher.model.catalog import Connection, SecretRef, Table, parse_catalog
from launcher.model.policy import load_policy_text
from tests.support.parsers import InlineParser

POLICY = """\
name: w
isolation: query
runtime: runc
limits: {cpus: 1, memory: 1GiB}
access: {connections: ["*"]}
writes: {allowed: true, prefixes: ["s3://open-data/out/"]}
"""


def catalog_text(data_dir: Path) -> str:
    return f"""\
connections:
  lake: {{kind: s3, endpoint: "http://Minio.Internal:9000/", access_key_id: {{env: K}},
         secret_access_key: {{env: S}}}}
  evil: {{kind: s3, endpoint: "http://collector.example:80", access_key_id: {{store: LAKE}},
         secret_access_key: {{store: LAKE}}}}
  aws: {{kind: s3, region: eu-west-1}}
  disk: {{kind: local}}
tables:
  trips: {{connection: lake, path: "s3://lake/trips/", format: parquet}}
  loot: {{connection: evil, path: "s3://any/x/", format: csv}}
  public: {{connection: aws, path: "s3://open-data/p/", format: parquet}}
  zones: {{connection: disk, path: "{data_dir}/zones.csv", format: csv}}
  keys: {{connection: disk, path: "{data_dir}/link/worker.key", format: csv}}
"""


def test_endpoints_are_compared_normalized() -> None:
    assert normalize_endpoint("HTTP://Minio.Internal:9000/") == "http://minio.internal:9000"
    assert normalize_endpoint("https://s3.example") == "https://s3.example:443"
    assert normalize_endpoint(" AWS ") == AWS
    for bad in ("minio:9000", "ftp://x", "http://x/path", "http://x:99999", "http://u@x"):
        with pytest.raises(DuckcellError, match="expected an http"):
            normalize_endpoint(bad)


def test_a_pushed_catalog_reaches_only_the_granted_endpoints_and_directories(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "zones.csv").write_text("id\n1\n")
    secret_dir = tmp_path / "state"
    secret_dir.mkdir()
    (secret_dir / "worker.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (data_dir / "link").symlink_to(secret_dir)  # a way out of the granted directory
    catalog = parse_catalog(catalog_text(data_dir), str(tmp_path / "c.yaml"))
    grants = CatalogGrants.of(["http://minio.internal:9000"], [data_dir], ["env:K", "env:S"])

    def check(table: str) -> None:
        t = catalog.tables[table]
        grants.check(catalog.connections[t.connection], t)

    check("trips")
    check("zones")
    with pytest.raises(
        QueryDeniedError, match=re.escape("--allow-endpoint http://collector.example:80")
    ):
        check("loot")
    with pytest.raises(QueryDeniedError, match=r"AWS S3.*--allow-endpoint aws"):
        check("public")
    with pytest.raises(QueryDeniedError, match=r"table keys reads .*--allow-local-dir DIR"):
        check("keys")
    assert len(grants.refusals(catalog)) == 3
    assert CatalogGrants.of([AWS], []).refusals(catalog)[0].startswith("connection lake ")


def test_a_pushed_connection_names_only_store_secrets_and_the_granted_env_and_files(
    tmp_path: Path,
) -> None:
    """A pushed catalog could name any variable or file the worker can read as a credential
    and send its value to an (allowed) endpoint: {store:} is always allowed, env and file
    references only as granted (a granted directory covers the files under it, resolved)."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "key").write_text("k")
    (tmp_path / "other").write_text("o")
    (secrets / "link").symlink_to(tmp_path / "other")  # a way out of the granted directory
    grants = CatalogGrants.of(["http://m:9"], [], ["env:LAKE_KEY", f"file:{secrets}"])

    def connection(**refs: SecretRef) -> Connection:
        return Connection("lake", "s3", endpoint="http://m:9", **refs)

    grants.check(connection(access_key_id=SecretRef(store="ANY"), session_token=None))
    grants.check(connection(access_key_id=SecretRef(env="LAKE_KEY")))
    grants.check(connection(secret_access_key=SecretRef(file=str(secrets / "key"))))
    refused = {
        "access_key_id": SecretRef(env="DUCKCELL_ENROLL_TOKEN"),
        "secret_access_key": SecretRef(file=str(secrets / "link")),
        "session_token": SecretRef(file=str(tmp_path / "other")),
    }
    for field, ref in refused.items():
        with pytest.raises(
            QueryDeniedError,
            match=rf"connection lake: {field} names the secret {re.escape(ref.describe())},"
            rf".*--allow-secret {re.escape(ref.describe())}`.*\{{store: NAME\}}",
        ):
            grants.check(connection(**{field: ref}))
    assert "secrets allowed: store:*, env:LAKE_KEY, file:" in grants.describe()
    for bad in ("LAKE_KEY", "env:", "file:relative/path", "store:X"):
        with pytest.raises(DuckcellError, match="expected env:NAME or file:/ABSOLUTE/PATH"):
            CatalogGrants.of([], [], [bad])


def test_grants_come_from_flags_else_the_environment(tmp_path: Path) -> None:
    env = {
        "DUCKCELL_ALLOW_ENDPOINTS": "aws, https://s3.example",
        "DUCKCELL_ALLOW_LOCAL_DIRS": "",
        "DUCKCELL_ALLOW_SECRETS": "env:A, env:B",
    }
    assert grants_from(None, None, env).endpoints == {AWS, "https://s3.example:443"}
    assert grants_from(None, None, env).secrets.env == {"A", "B"}
    assert grants_from(None, None, env, ["env:C"]).secrets.env == {"C"}
    flagged = grants_from(["http://m:9"], [tmp_path], env)
    assert flagged.endpoints == {"http://m:9"} and flagged.local_dirs == (tmp_path.resolve(),)
    assert grants_from(None, None, {}) == CatalogGrants()
    with pytest.raises(DuckcellError, match="not a directory"):
        grants_from(None, [tmp_path / "missing"], {})


def test_datapath_refuses_an_ungranted_table_or_write_before_building_a_store(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    catalog = parse_catalog(catalog_text(data_dir), str(tmp_path / "c.yaml"))
    built: list[str] = []

    def stores(connection: Connection, environ: Mapping[str, str] | None) -> ObjectStore:
        built.append(connection.name)
        raise AssertionError("no store may be built for a refused query")

    policy = load_policy_text(POLICY, "w.yaml")

    async def body() -> None:
        cache = ObjectCache(tmp_path / "cache", budget_bytes=2**20)
        data = DataPath(
            catalog, cache, parser=InlineParser(), stores=stores, grants=CatalogGrants()
        )
        with pytest.raises(QueryDeniedError, match="connection evil points at"):
            await data.prepare("SELECT * FROM loot", policy)
        with pytest.raises(QueryDeniedError, match="connection aws points at AWS S3"):
            await data.prepare("COPY (SELECT 1) TO 's3://open-data/out/r.parquet'", policy)
        assert built == [] and cache.stats().in_use == 0
        await cache.close()

    asyncio.run(body())


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://minio:9000?x=1",
        "http://u@minio:9000",
        "http://minio:abc",
        "http://[::1",
        "http://m#f",
    ],
)
def test_an_endpoint_the_catalog_accepts_but_grants_cannot_compare_is_refused_not_fatal(
    endpoint: str,
) -> None:
    """The catalog's own endpoint check is looser; such a connection is refused per query
    (and reported at push), never an error that would end the worker's tunnel."""
    connection = Connection("odd", "s3", endpoint=endpoint)
    grants = CatalogGrants.of(["http://minio:9000"], [])
    with pytest.raises(QueryDeniedError, match="connection odd: endpoint"):
        grants.check(connection)
    catalog = parse_catalog(
        f'connections:\n  odd: {{kind: s3, endpoint: "{endpoint}"}}\n'
        "tables:\n  t: {connection: odd, path: 's3://bkt/t/', format: parquet}\n",
        "pushed.yaml",
    )
    assert [r.split(":")[0] for r in grants.refusals(catalog)] == ["connection odd"]


def test_a_symlink_loop_is_refused_not_raised(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    table = Table("t", "disk", str(tmp_path / "loop"), "csv")
    with pytest.raises(QueryDeniedError, match="outside the directories"):
        CatalogGrants().check(Connection("disk", "local"), table)
    with pytest.raises(DuckcellError, match="not a directory"):
        CatalogGrants.of([], [tmp_path / "loop"])


def test_a_file_grant_follows_a_rotated_secret_volume(tmp_path: Path) -> None:
    """Kubernetes-style rotation re-points `..data`; a grant of the file's path keeps
    allowing it, because both sides are resolved at each check, not at start."""
    volume = tmp_path / "vol"
    for version in ("..v1", "..v2"):
        (volume / version).mkdir(parents=True)
        (volume / version / "key").write_text(version)
    (volume / "..data").symlink_to("..v1")
    (volume / "key").symlink_to("..data/key")
    grants = SecretGrants.of([f"file:{volume / 'key'}"])
    ref = SecretRef(file=str(volume / "key"))
    assert grants.allows(ref)
    (volume / "..data").unlink()
    (volume / "..data").symlink_to("..v2")
    assert grants.allows(ref)
    assert not grants.allows(SecretRef(file=str(volume / "..v1" / "key")))
