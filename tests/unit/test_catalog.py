"""Catalog loading and table references: every bad document names its line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.data.secrets import resolve_secret
from launcher.errors import CatalogError, SecretError, SqlError
from launcher.model.catalog import (
    Catalog,
    Connection,
    SecretRef,
    Table,
    load_catalog,
    parse_catalog,
)
from launcher.model.sql.tables import table_names

SOURCE = "/srv/catalogs/cat.yaml"

# Lines 1 to 8; the bad documents below append from line 9 or replace a line.
BASE = """\
connections:
  lake: {kind: s3, endpoint: "http://127.0.0.1:9000", region: us-east-1, path_style: true,
         access_key_id: {env: LAKE_KEY_ID}, secret_access_key: {env: LAKE_SECRET}}
  samples: {kind: local}
tables:
  trips: {connection: lake, path: "s3://bucket/trips/", format: parquet}
  zones: {connection: samples, path: "sample_data/zones.csv", format: csv}
  # end of the base document
"""


def with_line(line: int, text: str) -> str:
    """BASE with one line (1-based) replaced."""
    lines = BASE.splitlines()
    lines[line - 1] = text
    return "\n".join(lines) + "\n"


def load(text: str) -> Catalog:
    return parse_catalog(text, SOURCE)


def error_of(text: str) -> str:
    with pytest.raises(CatalogError) as caught:
        load(text)
    return str(caught.value)


def test_the_documented_shape_loads() -> None:
    catalog = load(BASE)
    assert catalog.connections["lake"] == Connection(
        name="lake",
        kind="s3",
        endpoint="http://127.0.0.1:9000",
        region="us-east-1",
        path_style=True,
        access_key_id=SecretRef(env="LAKE_KEY_ID"),
        secret_access_key=SecretRef(env="LAKE_SECRET"),
    )
    assert catalog.connections["samples"] == Connection(name="samples", kind="local")
    assert catalog.tables["trips"] == Table("trips", "lake", "s3://bucket/trips/", "parquet")
    # A local path is taken from the catalog file's directory.
    assert catalog.tables["zones"].path == "/srv/catalogs/sample_data/zones.csv"


def test_extended_keys_load() -> None:
    text = (
        "connections:\n"
        "  vault:\n"
        "    kind: s3\n"
        "    access_key_id: {file: /run/secrets/key_id}\n"
        "    secret_access_key: {file: /run/secrets/secret}\n"
        "    session_token: {env: AWS_SESSION_TOKEN}\n"
        "    worker: wkr-0123456789ab\n"
        "  disk: {kind: local}\n"
        "tables:\n"
        "  Events: {connection: vault, path: 's3://logs.example/events/2026/', format: csv}\n"
        "  archive: {connection: disk, path: /data/../data/archive, format: parquet}\n"
    )
    catalog = load(text)
    vault = catalog.connections["vault"]
    assert vault.worker == "wkr-0123456789ab"
    assert vault.session_token == SecretRef(env="AWS_SESSION_TOKEN")
    assert vault.secret_access_key is not None
    assert vault.secret_access_key.describe() == "file:/run/secrets/secret"
    assert vault.endpoint is None and vault.path_style is False
    assert catalog.tables["archive"].path == "/data/archive"


def test_empty_sections_make_an_empty_catalog() -> None:
    assert load("connections:\ntables:\n") == Catalog.EMPTY
    assert load("{}\n") == Catalog.EMPTY


BAD_DOCUMENTS = [
    # --- YAML itself and the top level --------------------------------------------------------
    ("syntax", BASE + "  x: {connection: [a\n", 10, "", "invalid YAML"),
    ("empty-document", "# nothing\n", 1, "", "expected a mapping of catalog keys, got an empty"),
    ("top-level-list", "- lake\n", 1, "", "expected a mapping of catalog keys, got a list"),
    ("unknown-top", BASE + "tabels: {}\n", 9, "tabels", 'did you mean "tables"?'),
    (
        "tables-list",
        "connections:\ntables: [trips]\n",
        2,
        "tables",
        "expected a mapping from each name",
    ),
    # --- connections ---------------------------------------------------------------------------
    (
        "literal-secret",
        with_line(3, "         access_key_id: {env: A}, secret_access_key: hunter2}"),
        3,
        "connections.lake.secret_access_key",
        "expected a reference {env: NAME}, {file: PATH} or {store: NAME}, not a literal value",
    ),
    (
        "literal-secret-number",
        with_line(3, "         access_key_id: 12345, secret_access_key: {env: S}}"),
        3,
        "connections.lake.access_key_id",
        "not a literal value",
    ),
    (
        "secret-value-key",
        with_line(3, "         access_key_id: {value: AKIA}, secret_access_key: {env: S}}"),
        3,
        "connections.lake.access_key_id.value",
        "unknown key; expected env, file, store",
    ),
    (
        "secret-both",
        with_line(3, "         access_key_id: {env: A, file: /k}, secret_access_key: {env: S}}"),
        3,
        "connections.lake.access_key_id",
        "expected exactly one of env, file or store, got 2",
    ),
    (
        "secret-relative-file",
        with_line(3, "         access_key_id: {file: k.txt}, secret_access_key: {env: S}}"),
        3,
        "connections.lake.access_key_id.file",
        'expected an absolute path, got "k.txt"',
    ),
    (
        "secret-bad-env",
        with_line(3, "         access_key_id: {env: 'A B'}, secret_access_key: {env: S}}"),
        3,
        "connections.lake.access_key_id.env",
        "expected an environment variable name",
    ),
    (
        "secret-half",
        with_line(3, "         access_key_id: {env: A}}"),
        2,
        "connections.lake.secret_access_key",
        "expected with access_key_id (both or neither); add it",
    ),
    ("kind-missing", with_line(4, "  samples: {}"), 4, "connections.samples.kind", "missing"),
    (
        "kind-unknown",
        with_line(4, "  samples: {kind: gcs}"),
        4,
        "connections.samples.kind",
        'expected "s3" or "local", got "gcs"',
    ),
    (
        "local-with-endpoint",
        with_line(4, "  samples: {kind: local, endpoint: 'http://x'}"),
        4,
        "connections.samples.endpoint",
        "expected only with kind s3",
    ),
    (
        "table-connection-typo",
        BASE + "  more: {connection: lake2, path: x, format: csv}\n",
        9,
        "tables.more.connection",
        'expected one of "lake", "samples", got "lake2"',
    ),
    (
        "endpoint-scheme",
        with_line(
            2, '  lake: {kind: s3, endpoint: "ftp://h", region: us-east-1, path_style: true,'
        ),
        2,
        "connections.lake.endpoint",
        "expected a URL like http://host:9000",
    ),
    (
        "path-style-quoted",
        with_line(2, '  lake: {kind: s3, region: us-east-1, path_style: "yes",'),
        2,
        "connections.lake.path_style",
        "remove the quotes",
    ),
    (
        "unknown-connection-key",
        with_line(4, "  samples: {kind: local, root: /data}"),
        4,
        "connections.samples.root",
        "unknown key",
    ),
    (
        "connection-name",
        with_line(4, "  'my lake': {kind: local}"),
        4,
        "connections",
        'expected a connection name, got "my lake"',
    ),
    (
        "token-without-keys",
        with_line(4, "  samples: {kind: s3, session_token: {env: T}}"),
        4,
        "connections.samples.session_token",
        "expected only with access_key_id and secret_access_key",
    ),
    # --- tables --------------------------------------------------------------------------------
    (
        "table-name-not-identifier",
        BASE + "  trips-2024: {connection: lake, path: 's3://bucket/t/', format: parquet}\n",
        9,
        "tables",
        'expected a SQL identifier, got "trips-2024"',
    ),
    (
        "table-name-case-duplicate",
        BASE + "  TRIPS: {connection: lake, path: 's3://bucket/t/', format: parquet}\n",
        9,
        "tables.TRIPS",
        "expected a unique name, but SQL reads it as trips",
    ),
    (
        "table-name-duplicate",
        BASE + "  trips: {connection: lake, path: 's3://bucket/t/', format: parquet}\n",
        9,
        "tables.trips",
        "first on line 6",
    ),
    (
        "table-unknown-connection",
        with_line(6, "  trips: {connection: pond, path: 's3://bucket/t/', format: parquet}"),
        6,
        "tables.trips.connection",
        'expected one of "lake", "samples", got "pond"',
    ),
    (
        "table-connection-missing",
        with_line(6, "  trips: {path: 's3://bucket/t/', format: parquet}"),
        6,
        "tables.trips.connection",
        "missing required key",
    ),
    (
        "s3-path-not-s3",
        with_line(6, "  trips: {connection: lake, path: '/data/trips', format: parquet}"),
        6,
        "tables.trips.path",
        'expected a path like "s3://bucket/prefix/"',
    ),
    (
        "s3-path-no-slash",
        with_line(6, "  trips: {connection: lake, path: 's3://bucket', format: parquet}"),
        6,
        "tables.trips.path",
        'got "s3://bucket"',
    ),
    (
        "s3-path-dot-dot",
        with_line(6, "  trips: {connection: lake, path: 's3://bucket/a/../b/', format: parquet}"),
        6,
        "tables.trips.path",
        "no . or .. segments",
    ),
    (
        "path-glob",
        with_line(6, "  trips: {connection: lake, path: 's3://bucket/*.parquet', format: parquet}"),
        6,
        "tables.trips.path",
        "not a glob",
    ),
    (
        "local-path-url",
        with_line(7, "  zones: {connection: samples, path: 's3://bucket/z/', format: csv}"),
        7,
        "tables.zones.path",
        "a local file or directory for the local connection samples",
    ),
    (
        "format-unknown",
        with_line(7, "  zones: {connection: samples, path: z.json, format: json}"),
        7,
        "tables.zones.format",
        'expected "parquet" or "csv", got "json"',
    ),
    (
        "format-missing",
        with_line(7, "  zones: {connection: samples, path: z.csv}"),
        7,
        "tables.zones.format",
        "missing required key",
    ),
    (
        "table-scalar",
        with_line(7, "  zones: samples"),
        7,
        "tables.zones",
        'expected a mapping, got "samples"',
    ),
    (
        "table-unknown-key",
        with_line(7, "  zones: {connection: samples, path: z.csv, format: csv, header: true}"),
        7,
        "tables.zones.header",
        "unknown key",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "field", "fragment"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_DOCUMENTS],
)
def test_bad_document_names_line_and_field(text: str, line: int, field: str, fragment: str) -> None:
    message = error_of(text)
    prefix = f"{SOURCE}:{line}: " + (f"{field}: " if field else "")
    assert message.startswith(prefix), message
    assert fragment in message, message
    assert "\n" not in message


def test_a_literal_secret_never_appears_in_the_message() -> None:
    message = error_of(with_line(3, "         access_key_id: {env: A}, secret_access_key: s3kr1t}"))
    assert "s3kr1t" not in message


def test_load_catalog_reads_a_file_and_anchors_local_paths(tmp_path: Path) -> None:
    (tmp_path / "cat.yaml").write_text(BASE)
    catalog = load_catalog(tmp_path / "cat.yaml")
    assert catalog.tables["zones"].path == str(tmp_path / "sample_data" / "zones.csv")
    with pytest.raises(CatalogError, match=r"missing.yaml: cannot read the catalog file"):
        load_catalog(tmp_path / "missing.yaml")


def test_json_round_trip_keeps_names_and_references_only() -> None:
    catalog = load(BASE)
    text = catalog.to_json()
    assert Catalog.from_json(text) == catalog
    assert "LAKE_SECRET" in text  # the reference's name, which is all the catalog holds
    with pytest.raises(CatalogError, match=r"tables\.x\.connection"):
        Catalog.from_json(
            '{"tables": {"x": {"connection": "nope", "path": "/a", "format": "csv"}}}'
        )


# --- secrets ---------------------------------------------------------------------------------


def test_env_secret_resolves_or_names_the_reference() -> None:
    ref = SecretRef(env="LAKE_SECRET")
    assert resolve_secret(ref, {"LAKE_SECRET": "v4lue"}) == "v4lue"
    with pytest.raises(SecretError, match="secret env:LAKE_SECRET is not set") as caught:
        resolve_secret(ref, {"OTHER": "v4lue"})
    assert "v4lue" not in str(caught.value)


def test_file_secret_strips_one_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("abc\n\n")
    assert resolve_secret(SecretRef(file=str(path))) == "abc\n"
    path.write_text("abc\r\n")
    assert resolve_secret(SecretRef(file=str(path))) == "abc"
    path.write_text("abc")
    assert resolve_secret(SecretRef(file=str(path))) == "abc"
    missing = SecretRef(file=str(tmp_path / "nope"))
    with pytest.raises(SecretError, match=r"secret file:.*/nope cannot be read on this worker"):
        resolve_secret(missing)
    path.write_text("\n")
    with pytest.raises(SecretError, match="is empty"):
        resolve_secret(SecretRef(file=str(path)))


def test_a_secret_ref_names_exactly_one_source() -> None:
    with pytest.raises(ValueError):
        SecretRef()
    with pytest.raises(ValueError):
        SecretRef(env="A", file="/b")


# --- referenced tables -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM trips", ["trips"]),
        ("SELECT * FROM TRIPS t JOIN Zones z ON t.zone = z.id", ["trips", "zones"]),
        ("SELECT * FROM trips JOIN zones USING (id)", ["trips", "zones"]),  # binds nothing
        ("WITH zones AS (SELECT 1 AS id) SELECT * FROM zones", []),  # a CTE, not the table
        ("SELECT * FROM other_temp_table", []),
        ("SELECT count(*) FROM trips WHERE zone IN (SELECT id FROM zones)", ["trips", "zones"]),
        ("CREATE TEMP TABLE mine AS SELECT * FROM zones; SELECT * FROM mine", ["zones"]),
        ("COPY (SELECT * FROM trips) TO '/scratch/out.parquet'", ["trips"]),
        ("SELECT * FROM read_parquet('/etc/passwd')", []),  # never opened on this host
        ("SELECT 42", []),
        # Binding fails (a session's temp table, USING): every identifier token, a superset.
        ("INSERT INTO mine SELECT * FROM trips JOIN zones USING (id)", ["trips", "zones"]),
        ("DROP TABLE mine", []),
        ('EXPLAIN SELECT * FROM "Trips"', ["trips"]),
    ],
)
def test_referenced_tables_come_from_the_parser(sql: str, expected: list[str]) -> None:
    assert [table.name for table in load(BASE).referenced(table_names(sql))] == expected


def test_unparseable_sql_raises_duckdbs_message() -> None:
    with pytest.raises(SqlError, match='Parser Error: syntax error at or near "SELEC"'):
        table_names("SELEC * FROM trips")


def test_table_names_do_not_touch_the_host_filesystem() -> None:
    # A non-SELECT statement is bound on a private connection that has no file access.
    with pytest.raises(SqlError, match="Permission Error"):
        table_names("CREATE TEMP TABLE t AS SELECT * FROM read_text('/etc/hostname')")


ROLES = """
connections:
  local: {kind: local}
tables:
  trips: {connection: local, path: /data/trips, format: parquet}
  Zones: {connection: local, path: /data/zones, format: csv}
roles:
  analyst: {policy: default, tables: [trips, zones]}
  agent: {policy: agent-session, tables: [trips]}
  admin: {}
"""


def test_roles_choose_policy_and_visible_tables() -> None:
    catalog = parse_catalog(ROLES, "roles.yaml", Path("/"))
    analyst, agent, admin = (catalog.role(n) for n in ("analyst", "agent", "admin"))
    assert analyst is not None and analyst.policy == "default"
    assert analyst.may_read("TRIPS") and analyst.may_read("Zones")
    assert agent is not None and agent.policy == "agent-session"
    assert agent.may_read("trips") and not agent.may_read("zones")
    assert admin is not None and admin.policy is None and admin.may_read("zones")
    assert catalog.role("intruder") is None
    assert Catalog.from_json(catalog.to_json()) == catalog


def test_without_roles_every_role_reads_everything() -> None:
    role = Catalog.EMPTY.role("anyone")
    assert role is not None and role.policy is None and role.may_read("anything")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "roles:\n  r: {tables: [nope]}\n",
            r"roles\.yaml:8: roles\.r\.tables\[0\]: expected a table",
        ),
        ("roles:\n  r: {policy: 3}\n", r"roles\.yaml:8: roles\.r\.policy: expected a string"),
        ("roles:\n  r: {color: red}\n", r"roles\.yaml:8: roles\.r\.color"),
        ("roles:\n  r: {tables: trips}\n", r"roles\.yaml:8: roles\.r\.tables: expected a list"),
    ],
)
def test_bad_roles_name_file_line_and_field(extra: str, message: str) -> None:
    text = ROLES.split("roles:")[0] + extra
    with pytest.raises(CatalogError, match=message):
        parse_catalog(text, "roles.yaml", Path("/"))


def test_listing_ttl_defaults_to_listing_every_query_and_reads_durations() -> None:
    def ttl(value: str) -> float:
        text = f"connections:\n  c: {{kind: s3{value}}}\n"
        return parse_catalog(text, SOURCE).connections["c"].listing_ttl

    assert (ttl(""), ttl(", listing_ttl: 0"), ttl(", listing_ttl: 5s")) == (0, 0, 5)
    assert ttl(", listing_ttl: 1m") == ttl(", listing_ttl: 60") == 60
    catalog = parse_catalog("connections:\n  c: {kind: local, listing_ttl: 2.5s}\n", SOURCE)
    assert Catalog.from_json(catalog.to_json()) == catalog
    assert "listing_ttl" not in parse_catalog("connections: {c: {kind: s3}}", SOURCE).to_json()
    for bad in ("2h", "-1s", "soon", "[1]"):
        message = error_of(f"connections:\n  c: {{kind: s3, listing_ttl: {bad}}}\n")
        assert message.startswith(f"{SOURCE}:2: connections.c.listing_ttl: expected"), message
