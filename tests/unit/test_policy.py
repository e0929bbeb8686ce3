"""Policy loading: every bad document names its line and field; good ones get sane defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import PolicyError, UnknownPolicyError
from launcher.model.policy import (
    Access,
    GiB,
    Isolation,
    MiB,
    Policy,
    PolicySet,
    Runtime,
    Writes,
    load_policies,
    load_policy_file,
    load_policy_text,
    visible,
    writes_allowed,
)

SOURCE = "policies/t.yaml"
POLICIES_DIR = Path(__file__).resolve().parents[2] / "policies"

# Lines 1 to 6; the bad documents below append from line 7 or replace a line.
BASE = """\
name: t
isolation: query
runtime: runc
limits:
  cpus: 1
  memory: 1GiB
"""


def with_line(line: int, text: str) -> str:
    """BASE with one line (1-based) replaced."""
    lines = BASE.splitlines()
    lines[line - 1] = text
    return "\n".join(lines) + "\n"


def load(text: str) -> Policy:
    return load_policy_text(text, SOURCE)


def error_of(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        load(text)
    return str(caught.value)


BAD_DOCUMENTS = [
    # --- YAML itself -------------------------------------------------------------------------
    ("syntax-flow", BASE + "access: {catalogs: [a\n", 8, "", "invalid YAML"),
    ("syntax-colon", with_line(5, "  cpus: 1: 2"), 5, "", "mapping values are not allowed"),
    ("syntax-tab", BASE + "pool:\n\twarm: 1\n", 8, "", "'\\t'"),
    ("two-documents", BASE + "---\nname: u\n", 7, "", "single document"),
    ("control-character", with_line(2, "isolation: query\x07"), 2, "", "character 0x07"),
    ("empty-document", "# nothing\n", 1, "", "got an empty document"),
    ("top-level-list", "- name: t\n", 1, "", "expected a mapping of policy keys, got a list"),
    ("top-level-scalar", "just words\n", 1, "", 'got "just words"'),
    # --- keys --------------------------------------------------------------------------------
    ("unknown-top", with_line(2, "isolaton: query"), 2, "isolaton", 'did you mean "isolation"?'),
    ("unknown-nested", with_line(6, "  memroy: 1GiB"), 6, "limits.memroy", 'mean "memory"?'),
    ("unknown-far", BASE + "colour: red\n", 7, "colour", "unknown key; expected name,"),
    ("unknown-in-section", BASE + "pool:\n  size: 2\n", 8, "pool.size", "unknown key"),
    ("duplicate-top", BASE + "runtime: runsc\n", 7, "runtime", "first on line 3"),
    ("duplicate-nested", BASE + "  cpus: 2\n", 7, "limits.cpus", "first on line 5"),
    ("merge-key", BASE + "<<: {pool: {warm: 1}}\n", 7, "", 'merge key "<<"'),
    ("complex-key", BASE + "? [a]\n: 1\n", 7, "", "expected a key name, got a list"),
    ("number-key", BASE + "1: one\n", 7, "", "expected a key name, got 1"),
    # --- missing required keys (reported on the line of the mapping that lacks them) ----------
    ("missing-name", BASE.replace("name: t\n", ""), 1, "name", "missing required key"),
    ("missing-isolation", with_line(2, "# none"), 1, "isolation", '"query" or "session"'),
    ("missing-runtime", with_line(3, "# none"), 1, "runtime", '"runc" or "runsc"'),
    ("missing-limits", "name: t\nisolation: query\nruntime: runc\n", 1, "limits", "missing"),
    ("missing-cpus", with_line(5, "  pids: 128"), 4, "limits.cpus", "missing required key"),
    ("missing-memory", with_line(6, "  pids: 128"), 4, "limits.memory", "missing required key"),
    # --- types -------------------------------------------------------------------------------
    ("name-number", with_line(1, "name: 5"), 1, "name", "expected a string, got 5"),
    ("name-date", with_line(1, "name: 2024-01-01"), 1, "name", "got 2024-01-01"),
    ("name-shape", with_line(1, "name: Bad_Name"), 1, "name", "lowercase letters, digits"),
    ("name-dash", with_line(1, "name: -t"), 1, "name", 'got "-t"'),
    ("name-long", with_line(1, "name: " + "a" * 64), 1, "name", "at most 63"),
    (
        "limits-scalar",
        BASE.split("  cpus")[0].replace("limits:", "limits: 5"),
        4,
        "limits",
        "expected a mapping, got 5",
    ),
    (
        "limits-null",
        "name: t\nisolation: query\nruntime: runc\nlimits:\n",
        4,
        "limits",
        "expected a mapping, got null",
    ),
    ("section-list", BASE + "duckdb: [1]\n", 7, "duckdb", "expected a mapping, got a list"),
    ("cpus-word", with_line(5, "  cpus: one"), 5, "limits.cpus", 'to 64, got "one"'),
    ("cpus-quoted", with_line(5, '  cpus: "1"'), 5, "limits.cpus", "remove the quotes"),
    ("cpus-list", with_line(5, "  cpus: [1]"), 5, "limits.cpus", "got a list"),
    ("cpus-null", with_line(5, "  cpus:"), 5, "limits.cpus", "got null"),
    ("pids-float", BASE + "  pids: 128.5\n", 7, "limits.pids", "expected a whole number"),
    ("pids-quoted", BASE + "  pids: '128'\n", 7, "limits.pids", '"128" (a string: remove'),
    ("warm-float", BASE + "pool: {warm: 1.5}\n", 7, "pool.warm", "whole number from 0 to 64"),
    ("description-list", BASE + "description: [a]\n", 7, "description", "expected a string"),
    ("catalogs-string", BASE + "access: {catalogs: '*'}\n", 7, "access.catalogs", "a list"),
    (
        "catalogs-item",
        BASE + "access:\n  catalogs:\n    - a\n    - 1\n",
        10,
        "access.catalogs[1]",
        "expected a string, got 1",
    ),
    (
        "catalogs-empty-item",
        BASE + "access: {catalogs: ['']}\n",
        7,
        "access.catalogs[0]",
        'expected a glob pattern like "*"',
    ),
    # --- booleans given as strings -----------------------------------------------------------
    (
        "allowed-quoted",
        BASE + "writes:\n  allowed: 'false'\n",
        8,
        "writes.allowed",
        'expected true or false, got "false" (a string: remove the quotes)',
    ),
    (
        "allowed-quoted-yes",
        BASE + 'writes: {allowed: "yes"}\n',
        7,
        "writes.allowed",
        "remove the quotes",
    ),
    ("allowed-number", BASE + "writes: {allowed: 1}\n", 7, "writes.allowed", "got 1"),
    # --- enums -------------------------------------------------------------------------------
    (
        "isolation-case",
        with_line(2, "isolation: Query"),
        2,
        "isolation",
        'expected "query" or "session", got "Query"',
    ),
    (
        "runtime-unknown",
        with_line(3, "runtime: gvisor"),
        3,
        "runtime",
        'expected "runc" or "runsc", got "gvisor"',
    ),
    ("runtime-number", with_line(3, "runtime: 1"), 3, "runtime", "got 1"),
    # --- sizes and durations -----------------------------------------------------------------
    (
        "memory-word",
        with_line(6, "  memory: lots"),
        6,
        "limits.memory",
        'expected a size like "512MiB", got "lots"',
    ),
    ("memory-unit", with_line(6, "  memory: 1 parsec"), 6, "limits.memory", "a size like"),
    ("memory-bool", with_line(6, "  memory: true"), 6, "limits.memory", "got true"),
    ("memory-float", with_line(6, "  memory: 1.5"), 6, "limits.memory", "got 1.5"),
    (
        "memory-small",
        with_line(6, "  memory: 32MiB"),
        6,
        "limits.memory",
        'expected at least 64MiB, got "32MiB"',
    ),
    ("memory-negative", with_line(6, "  memory: -1"), 6, "limits.memory", "at least 64MiB"),
    ("scratch-small", BASE + "  scratch: 512KiB\n", 7, "limits.scratch", "at least 1MiB"),
    (
        "timeout-word",
        BASE + "  statement_timeout: soon\n",
        7,
        "limits.statement_timeout",
        'expected a duration like "30s"',
    ),
    (
        "timeout-spelled",
        BASE + "  statement_timeout: 5 minutes\n",
        7,
        "limits.statement_timeout",
        "a duration",
    ),
    (
        "timeout-zero",
        BASE + "  statement_timeout: 0s\n",
        7,
        "limits.statement_timeout",
        "at least 1ms",
    ),
    (
        "timeout-negative",
        BASE + "  statement_timeout: -5\n",
        7,
        "limits.statement_timeout",
        "at least 1ms",
    ),
    (
        "timeout-inf",
        BASE + "  statement_timeout: .inf\n",
        7,
        "limits.statement_timeout",
        "a duration",
    ),
    ("ttl-unit", BASE + "session: {idle_ttl: 1d}\n", 7, "session.idle_ttl", "a duration"),
    # --- ranges ------------------------------------------------------------------------------
    ("cpus-zero", with_line(5, "  cpus: 0"), 5, "limits.cpus", "from 0.01 to 64, got 0"),
    ("cpus-many", with_line(5, "  cpus: 65"), 5, "limits.cpus", "got 65"),
    ("cpus-nan", with_line(5, "  cpus: .nan"), 5, "limits.cpus", "got .nan"),
    ("pids-few", BASE + "  pids: 8\n", 7, "limits.pids", "of at least 16, got 8"),
    ("rows-zero", BASE + "  max_result_rows: 0\n", 7, "limits.max_result_rows", "at least 1"),
    ("bytes-zero", BASE + "  max_result_bytes: 0\n", 7, "limits.max_result_bytes", "at least"),
    ("threads-zero", BASE + "duckdb: {threads: 0}\n", 7, "duckdb.threads", "from 1 to 1024"),
    ("warm-many", BASE + "pool:\n  warm: 65\n", 8, "pool.warm", "got 65"),
    ("warm-negative", BASE + "pool: {warm: -1}\n", 7, "pool.warm", "got -1"),
    # --- cross-field rules -------------------------------------------------------------------
    (
        "duckdb-memory-equal",
        BASE + "duckdb:\n  memory_limit: 1GiB\n",
        8,
        "duckdb.memory_limit",
        "expected less than limits.memory (1GiB)",
    ),
    (
        "duckdb-memory-above",
        BASE + "duckdb: {memory_limit: 2GiB}\n",
        7,
        "duckdb.memory_limit",
        "less than limits.memory",
    ),
    (
        "duckdb-temp-above",
        BASE + "  scratch: 256MiB\nduckdb:\n  max_temp_directory_size: 1GiB\n",
        9,
        "duckdb.max_temp_directory_size",
        "at most limits.scratch (256MiB)",
    ),
    (
        "idle-above-lifetime",
        BASE + "session:\n  idle_ttl: 2h\n  max_lifetime: 1h\n",
        8,
        "session.idle_ttl",
        'at most session.max_lifetime (1h), got "2h"',
    ),
    (
        "lifetime-below-default-idle",
        BASE + "session:\n  max_lifetime: 1m\n",
        8,
        "session.max_lifetime",
        "at least session.idle_ttl (5m by default)",
    ),
    (
        "prefixes-not-allowed",
        BASE + "writes:\n  allowed: false\n  prefixes: ['s3://b/out/']\n",
        9,
        "writes.prefixes",
        "no prefixes while writes.allowed is false",
    ),
    (
        "prefixes-default-allowed",
        BASE + "writes:\n  prefixes: ['s3://b/out/']\n",
        8,
        "writes.prefixes",
        "writes.allowed is false",
    ),
    (
        "allowed-without-prefixes",
        BASE + "writes:\n  allowed: true\n",
        8,
        "writes.prefixes",
        "while writes.allowed is true, got none",
    ),
    (
        "prefix-path",
        BASE + "writes: {allowed: true, prefixes: [/tmp/out]}\n",
        7,
        "writes.prefixes[0]",
        'a URL prefix like "s3://bucket/out/"',
    ),
    (
        "prefix-dots",
        BASE + "writes: {allowed: true, prefixes: ['s3://b/out/../x']}\n",
        7,
        "writes.prefixes[0]",
        'got "s3://b/out/../x"',
    ),
    (
        "prefix-no-bucket",
        BASE + "writes: {allowed: true, prefixes: ['s3:///x']}\n",
        7,
        "writes.prefixes[0]",
        "a URL prefix",
    ),
    # --- tags --------------------------------------------------------------------------------
    (
        "python-tag",
        BASE + "description: !!python/object/apply:os.system [id]\n",
        7,
        "description",
        "got the tag !!python/object/apply:os.system",
    ),
    (
        "python-tag-nested",
        BASE + "  pids: !!python/int 128\n",
        7,
        "limits.pids",
        "got the tag !!python/int",
    ),
    ("custom-tag", with_line(6, "  memory: !size 1GiB"), 6, "limits.memory", "tag !size"),
    ("set-tag", BASE + "access:\n  catalogs: !!set {a, b}\n", 8, "access.catalogs", "!!set"),
    ("binary-tag", BASE + "description: !!binary aGk=\n", 7, "description", "!!binary"),
    ("tagged-section", BASE + "pool: !!omap [warm: 1]\n", 7, "pool", "!!omap"),
    ("forced-int", BASE + "  pids: !!int abc\n", 7, "limits.pids", "got the tag !!int"),
    ("forced-bool", BASE + "writes: {allowed: !!bool maybe}\n", 7, "writes.allowed", "!!bool"),
    ("forced-float", with_line(5, "  cpus: !!float x"), 5, "limits.cpus", "!!float"),
    ("forced-null", with_line(5, "  cpus: !!null 1"), 5, "limits.cpus", "!!null"),
    ("pids-huge", BASE + "  pids: " + "9" * 40 + "\n", 7, "limits.pids", "below 2**63"),
    (
        "bytes-huge",
        BASE + "  max_result_bytes: 9999999999EiB\n",
        7,
        "limits.max_result_bytes",
        "a size like",
    ),
    (
        "bytes-huge-unit",
        BASE + "  max_result_bytes: 99999999TiB\n",
        7,
        "limits.max_result_bytes",
        "below 8EiB",
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


def test_error_messages_stay_on_one_line() -> None:
    message = error_of(BASE + '"a\\nb": 1\n')
    assert message.startswith(f"{SOURCE}:7: a\\nb: unknown key"), message
    assert "\n" not in message


def test_aliases_are_followed_and_cycles_do_not_hang() -> None:
    policy = load(BASE + "access: {catalogs: &c [a, b], connections: *c}\n")
    assert policy.access == Access(("a", "b"), ("a", "b"))
    assert "unknown key" in error_of(BASE + "loop: &l [*l]\n")


def test_defaults() -> None:
    policy = load(BASE)
    assert policy.name == "t"
    assert policy.source == SOURCE
    assert policy.isolation is Isolation.QUERY
    assert policy.runtime is Runtime.RUNC
    assert policy.description == ""
    limits = policy.limits
    assert (limits.cpus, limits.memory_bytes, limits.pids) == (1.0, GiB, 128)
    assert (limits.scratch_bytes, limits.statement_timeout_s) == (GiB, 60.0)
    assert (limits.max_result_rows, limits.max_result_bytes) == (None, None)
    assert policy.duckdb.threads == 1
    assert policy.duckdb.memory_limit_bytes == GiB * 6 // 10
    # The spill default is capped so buffer pool + spill (tmpfs, charged to memory) fit.
    assert policy.duckdb.max_temp_directory_bytes == GiB - GiB * 6 // 10 - 64 * MiB
    assert (policy.session.idle_ttl_s, policy.session.max_lifetime_s) == (300.0, 3600.0)
    assert policy.access == Access(("*",), ("*",))
    assert policy.writes == Writes(False, ())
    assert policy.warm_pool == 1


@pytest.mark.parametrize(
    ("cpus", "threads"), [("0.5", 1), ("1", 1), ("1.5", 2), ("2", 2), ("2.01", 3), ("64", 64)]
)
def test_default_threads_follow_cpus(cpus: str, threads: int) -> None:
    assert load(with_line(5, f"  cpus: {cpus}")).duckdb.threads == threads


def test_full_document() -> None:
    policy = load(
        with_line(3, "runtime: runsc")
        + """\
  pids: 256
  scratch: 256MiB
  statement_timeout: 250ms
  max_result_rows: 1000
  max_result_bytes: 64MB
description: everything spelled out
duckdb: {threads: 4, memory_limit: 700MiB, max_temp_directory_size: 200MiB}
session: {idle_ttl: 30s, max_lifetime: 30s}
access: {catalogs: ["sales_*", lake], connections: []}
writes: {allowed: true, prefixes: ["s3://b/out/", "gs://c/"]}
pool: {warm: 0}
"""
    )
    assert policy.runtime is Runtime.RUNSC
    assert policy.description == "everything spelled out"
    assert policy.limits.pids == 256
    assert policy.limits.statement_timeout_s == 0.25
    assert (policy.limits.max_result_rows, policy.limits.max_result_bytes) == (1000, 64_000_000)
    assert (policy.duckdb.threads, policy.duckdb.memory_limit_bytes) == (4, 700 * MiB)
    assert policy.duckdb.max_temp_directory_bytes == 200 * MiB
    assert (policy.session.idle_ttl_s, policy.session.max_lifetime_s) == (30.0, 30.0)
    assert policy.access == Access(("sales_*", "lake"), ())
    assert policy.writes == Writes(True, ("s3://b/out/", "gs://c/"))
    assert policy.warm_pool == 0


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param("duckdb:\nsession:\naccess:\nwrites:\npool:\n", id="empty-sections"),
        pytest.param("duckdb: {}\npool: {}\n", id="empty-flow-sections"),
        pytest.param("  max_result_rows: null\n  max_result_bytes: ~\n", id="explicit-nulls"),
        pytest.param("description: |\n  two\n  lines\n", id="block-description"),
        pytest.param("# trailing comment\n", id="comment"),
        pytest.param("writes: {allowed: no}\n", id="yaml11-boolean"),
        pytest.param("description: !!str 42\n", id="explicit-str-tag"),
        pytest.param("  pids: !!int 256\n", id="explicit-int-tag"),
    ],
)
def test_good_documents(extra: str) -> None:
    assert load(BASE + extra).name == "t"


def test_flow_style_document() -> None:
    policy = load(
        "name: q\nisolation: session\nruntime: runc\n"
        "limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}\n"
    )
    assert policy.isolation is Isolation.SESSION
    assert policy.limits.scratch_bytes == 64 * MiB


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("1", 1),
        ("4096", 4096),
        ('"4096"', 4096),
        ("1B", 1),
        ("1kB", 1000),
        ("1KB", 1000),
        ("64MB", 64_000_000),
        ("2GB", 2_000_000_000),
        ("1TB", 10**12),
        ("1KiB", 1024),
        ("512MiB", 512 * MiB),
        ("512mib", 512 * MiB),
        ("1GiB", GiB),
        ("2 GiB", 2 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("1TiB", 1024 * GiB),
        ("1_000", 1000),
    ],
)
def test_sizes(written: str, size: int) -> None:
    assert load(BASE + f"  max_result_bytes: {written}\n").limits.max_result_bytes == size


@pytest.mark.parametrize("written", ["lots", "MiB", "1.2.3MiB", "1 parsec", "''", "-1MiB", "1e9"])
def test_bad_sizes(written: str) -> None:
    assert 'expected a size like "512MiB"' in error_of(BASE + f"  max_result_bytes: {written}\n")


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("1ms", 0.001),
        ("45", 45.0),
        ("2.5", 2.5),
        ('"90"', 90.0),
        ("10 s", 10.0),
        (".5s", 0.5),  # as the config file's float seconds always allowed
    ],
)
def test_durations(written: str, seconds: float) -> None:
    policy = load(BASE + f"  statement_timeout: {written}\n")
    assert policy.limits.statement_timeout_s == pytest.approx(seconds)


@pytest.mark.parametrize("written", ["soon", "5 minutes", "1d", "5S", "m", "5.s", "''"])
def test_bad_durations(written: str) -> None:
    assert "expected a duration like" in error_of(BASE + f"  statement_timeout: {written}\n")


def policy_writing_to(*prefixes: str, allowed: bool = True) -> Policy:
    return load(BASE + f"writes: {{allowed: {str(allowed).lower()}, prefixes: {list(prefixes)}}}\n")


@pytest.mark.parametrize("prefix", ["s3://b/out/", "s3://b/out", "s3://b/out//"])
@pytest.mark.parametrize(
    ("destination", "allowed"),
    [
        ("s3://b/out/x.parquet", True),
        ("s3://b/out/year=2024/x.parquet", True),
        ("s3://b/out/", True),
        ("s3://b/out", True),
        ("S3://b/out/x.parquet", True),
        ("s3://b/outside/x.parquet", False),
        ("s3://b/outx", False),
        ("s3://b/ou", False),
        ("s3://b/other/x", False),
        ("s3://b2/out/x", False),
        ("s3://b", False),
        ("gs://b/out/x", False),
        ("b/out/x", False),
        ("s3://b/out/../secret/x", False),
        ("s3://b/out/./x", False),
        ("s3://b/out/%2e%2e/x", False),
        ("", False),
    ],
)
def test_writes_allowed(prefix: str, destination: str, allowed: bool) -> None:
    assert writes_allowed(policy_writing_to(prefix), destination) is allowed


def test_writes_allowed_with_several_prefixes_and_whole_buckets() -> None:
    policy = policy_writing_to("s3://b/out/", "gs://c")
    assert writes_allowed(policy, "gs://c/anything/at/all")
    assert writes_allowed(policy, "s3://b/out/x")
    assert not writes_allowed(policy, "s3://b/x")
    assert not writes_allowed(policy, "gs://cc/x")


def test_writes_never_allowed_when_disallowed() -> None:
    policy = load(BASE)
    assert not writes_allowed(policy, "s3://b/out/x")
    assert not writes_allowed(policy, "")


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        (("*",), "anything", True),
        (("*",), "", True),
        ((), "anything", False),
        (("lake",), "lake", True),
        (("lake",), "lakehouse", False),
        (("sales_*",), "sales_eu", True),
        (("sales_*",), "Sales_eu", False),
        (("sales_*",), "marketing", False),
        (("a", "b?"), "b1", True),
        (("a", "b?"), "b12", False),
        (("[ab]*",), "alpha", True),
        (("[ab]*",), "gamma", False),
        (("[!x]*",), "y", True),
    ],
)
def test_visible(patterns: tuple[str, ...], name: str, expected: bool) -> None:
    assert visible(patterns, name) is expected


def write_policy(directory: Path, filename: str, name: str | None = None) -> Path:
    path = directory / filename
    stem = name or filename.split(".")[0]
    path.write_text(BASE.replace("name: t", f"name: {stem}"))
    return path


def test_load_policies_reads_yaml_and_yml_only(tmp_path: Path) -> None:
    write_policy(tmp_path, "alpha.yaml")
    write_policy(tmp_path, "beta.yml")
    (tmp_path / "notes.txt").write_text("not a policy")
    (tmp_path / ".alpha.yaml.swp").write_text("\x00")
    (tmp_path / "sub.yaml").mkdir()
    policies = load_policies(tmp_path)
    assert policies.names() == ["alpha", "beta"]
    assert len(policies) == 2
    assert [policy.name for policy in policies] == ["alpha", "beta"]
    assert "alpha" in policies
    assert policies.get("beta").source == str(tmp_path / "beta.yml")


def test_load_policies_duplicate_names_name_both_files(tmp_path: Path) -> None:
    first = write_policy(tmp_path, "alpha.yaml")
    second = write_policy(tmp_path, "alpha.yml")
    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{second}:1: name: ")
    assert str(first) in message


def test_load_policies_error_points_into_the_bad_file(tmp_path: Path) -> None:
    write_policy(tmp_path, "alpha.yaml")
    (tmp_path / "beta.yaml").write_text(with_line(1, "name: beta").replace("1GiB", "lots"))
    with pytest.raises(PolicyError, match=r"beta\.yaml:6: limits\.memory: "):
        load_policies(tmp_path)


def test_load_policies_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="expected a directory of policy files"):
        load_policies(tmp_path / "absent")


def test_file_name_must_match_policy_name(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "alpha.yaml", name="beta")
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path)
    assert str(caught.value) == (
        f'{path}:1: name: expected "alpha" to match the file name alpha.yaml, got "beta"'
    )


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "alpha.yaml"
    path.write_bytes(b"name: \xff\n")
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy_file(path)


def test_unknown_policy_lists_known_names_and_directory(tmp_path: Path) -> None:
    write_policy(tmp_path, "beta.yaml")
    write_policy(tmp_path, "alpha.yaml")
    with pytest.raises(UnknownPolicyError) as caught:
        load_policies(tmp_path).get("gamma")
    message = str(caught.value)
    assert f'unknown policy "gamma"; known policies in {tmp_path}: alpha, beta' in message
    assert str(tmp_path / "gamma.yaml") in message


def test_unknown_policy_in_an_empty_set() -> None:
    with pytest.raises(UnknownPolicyError, match="known policies: none"):
        PolicySet([]).get("default")


def test_shipped_policies_load() -> None:
    policies = load_policies(POLICIES_DIR)
    assert policies.names() == ["agent-session", "default", "strict"]
    for policy in policies:
        assert load_policy_file(Path(policy.source)) == policy
        assert not writes_allowed(policy, "s3://anything/at/all")


def test_shipped_default() -> None:
    policy = load_policies(POLICIES_DIR).get("default")
    assert (policy.isolation, policy.runtime) == (Isolation.QUERY, Runtime.RUNC)
    limits = policy.limits
    assert (limits.cpus, limits.memory_bytes, limits.pids) == (1.0, GiB, 128)
    assert (limits.scratch_bytes, limits.statement_timeout_s) == (GiB, 60.0)
    assert policy.warm_pool == 2


def test_shipped_strict() -> None:
    policy = load_policies(POLICIES_DIR).get("strict")
    assert (policy.isolation, policy.runtime) == (Isolation.QUERY, Runtime.RUNSC)
    limits = policy.limits
    assert (limits.cpus, limits.memory_bytes, limits.pids) == (1.0, 512 * MiB, 128)
    assert (limits.scratch_bytes, limits.statement_timeout_s) == (256 * MiB, 30.0)
    assert (limits.max_result_rows, limits.max_result_bytes) == (1_000_000, 256 * MiB)
    assert policy.writes == Writes(False, ())
    assert policy.warm_pool == 1


def test_shipped_agent_session() -> None:
    policy = load_policies(POLICIES_DIR).get("agent-session")
    assert (policy.isolation, policy.runtime) == (Isolation.SESSION, Runtime.RUNC)
    assert (policy.limits.cpus, policy.limits.memory_bytes) == (1.0, GiB)
    assert (policy.session.idle_ttl_s, policy.session.max_lifetime_s) == (600.0, 7200.0)
    assert policy.warm_pool == 1


@pytest.mark.parametrize("name", ["default", "strict", "agent-session"])
def test_shipped_policies_leave_room_beside_duckdb(name: str) -> None:
    """/scratch is a tmpfs whose pages count against limits.memory, as DuckDB's buffers do."""
    policy = load_policies(POLICIES_DIR).get(name)
    used = policy.duckdb.memory_limit_bytes + policy.duckdb.max_temp_directory_bytes
    assert used <= policy.limits.memory_bytes - 64 * MiB


def test_spill_and_buffer_pool_must_fit_in_memory(tmp_path: Path) -> None:
    text = (
        "name: t\nisolation: query\nruntime: runc\nlimits:\n  cpus: 1\n  memory: 1GiB\n"
        "  scratch: 1GiB\nduckdb:\n  memory_limit: 600MiB\n  max_temp_directory_size: 900MiB\n"
    )
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path)
    message = str(caught.value)
    assert f"{path}:10: duckdb.max_temp_directory_size" in message
    assert "counts against limits.memory" in message


@pytest.mark.parametrize("name", ["default", "strict", "agent-session"])
def test_shipped_policies_write_nothing(name: str) -> None:
    """Writes are opt-in: no shipped policy may write, and strict never will."""
    policy = load_policies(POLICIES_DIR).get(name)
    assert policy.writes == Writes(False, ())
    assert not writes_allowed(policy, "s3://any-bucket/out/x.parquet")
