"""The runner's lock-down and statement gate, in-process against real DuckDB.

The same probes run inside a real container in tests/integration/test_sandbox.py; here they
run fast and also check the layer beneath the gate (DuckDB's own lock) directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.ipc as ipc
import pytest

from duckcell_runner.lockdown import RunnerConfig, lockdown_statements, open_locked
from duckcell_runner.service import RunnerService
from launcher.protocol import runner_pb2 as pb


@pytest.fixture
def dirs(tmp_path: Path) -> RunnerConfig:
    (tmp_path / "cache").mkdir()
    (tmp_path / "scratch").mkdir()
    (tmp_path / "outside.csv").write_text("a\n1\n")
    return RunnerConfig(
        socket_path=str(tmp_path / "r.sock"),
        cache_dir=str(tmp_path / "cache"),
        scratch_dir=str(tmp_path / "scratch"),
        statement_timeout_ms=2000,
    )


@pytest.fixture
def service(dirs: RunnerConfig) -> Iterator[RunnerService]:
    runner = RunnerService(open_locked(dirs), default_timeout_s=2, batch_rows=1024)
    runner.warm_up(0.0)
    yield runner


class _Context:
    def add_callback(self, callback: object) -> None:
        pass


def execute(service: RunnerService, sql: str, **kwargs: int) -> tuple[list, pb.ExecuteChunk]:
    chunks = list(service.Execute(pb.ExecuteRequest(query_id="q", sql=sql, **kwargs), _Context()))
    data = b"".join(c.ipc for c in chunks if c.HasField("ipc"))
    rows = ipc.open_stream(data).read_all().to_pylist() if data else []
    return rows, chunks[-1]


def test_lock_is_the_last_setting() -> None:
    statements = lockdown_statements(RunnerConfig())
    assert statements[-1] == "SET lock_configuration = true"
    assert statements[-2] == "SET enable_external_access = false"
    # These two cannot be set once external access is off.
    order = [s.split()[1] for s in statements]
    assert order.index("allowed_directories") < order.index("enable_external_access")
    assert order.index("temp_directory") < order.index("enable_external_access")


def test_locked_connection_refuses_changes_directly(dirs: RunnerConfig) -> None:
    con = open_locked(dirs)
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error, match="Permission"):
        con.execute(f"SELECT * FROM read_csv('{Path(dirs.cache_dir).parent}/outside.csv')")
    assert con.execute("SELECT current_setting('python_enable_replacements')").fetchone() == (
        False,
    )


def test_python_variables_are_not_visible_to_sql(service: RunnerService) -> None:
    _, last = execute(service, "SELECT * FROM service")
    assert last.failure.reason == pb.FAILURE_REASON_SQL


@pytest.mark.parametrize(
    ("sql", "reason", "message"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", pb.FAILURE_REASON_SQL, "Permission Error"),
        ("SELECT * FROM read_text('/proc/self/environ')", pb.FAILURE_REASON_SQL, "Permission"),
        ("INSTALL httpfs", pb.FAILURE_REASON_DENIED, "INSTALL and LOAD are not allowed"),
        ("LOAD parquet", pb.FAILURE_REASON_DENIED, "INSTALL and LOAD are not allowed"),
        ("SELECT 1; ATTACH ':memory:' AS m", pb.FAILURE_REASON_DENIED, "ATTACH is not allowed"),
        ("DETACH memory", pb.FAILURE_REASON_DENIED, "DETACH is not allowed"),
        ("EXPORT DATABASE '/scratch/x'", pb.FAILURE_REASON_DENIED, "EXPORT DATABASE"),
        ("SET threads = 64", pb.FAILURE_REASON_SQL, "configuration has been locked"),
        ("RESET memory_limit", pb.FAILURE_REASON_SQL, "configuration has been locked"),
        ("COPY (SELECT 1) TO '/tmp/out.csv'", pb.FAILURE_REASON_SQL, "Permission Error"),
        ("SELEC 1", pb.FAILURE_REASON_SQL, "Parser Error"),
        ("", pb.FAILURE_REASON_SQL, "no SQL statement"),
    ],
)
def test_hostile_or_bad_sql_is_refused(
    service: RunnerService, sql: str, reason: int, message: str
) -> None:
    _, last = execute(service, sql)
    assert last.HasField("failure")
    assert last.failure.reason == reason
    assert message in last.failure.message
    # The connection stays usable after every refusal.
    rows, _ = execute(service, "SELECT 1 AS ok")
    assert rows == [{"ok": 1}]


def test_scratch_is_writable(service: RunnerService, dirs: RunnerConfig) -> None:
    _, last = execute(service, f"COPY (SELECT 1 AS a) TO '{dirs.scratch_dir}/out.csv'")
    assert last.HasField("summary")
    assert (Path(dirs.scratch_dir) / "out.csv").exists()


def test_multi_statement_streams_the_last_result(service: RunnerService) -> None:
    rows, last = execute(service, "CREATE TEMP TABLE t AS SELECT 3 AS v; SELECT v * 2 AS w FROM t")
    assert rows == [{"w": 6}]
    assert last.summary.statement_type == "SELECT"


def test_result_limits(service: RunnerService) -> None:
    _, last = execute(service, "FROM range(5000)", max_rows=100)
    assert last.failure.reason == pb.FAILURE_REASON_RESULT_LIMIT
    _, last = execute(service, "FROM range(5000)", max_bytes=1000)
    assert last.failure.reason == pb.FAILURE_REASON_RESULT_LIMIT
    rows, _ = execute(service, "SELECT 1 AS ok")  # a half-read result was cleaned up
    assert rows == [{"ok": 1}]


def test_statement_timeout_interrupts(service: RunnerService) -> None:
    _, last = execute(service, "SELECT sum(hash(range)) FROM range(100000000000)")
    assert last.failure.reason == pb.FAILURE_REASON_TIMEOUT


def test_large_batches_are_cut_below_the_message_cap(service: RunnerService) -> None:
    chunks = list(
        service.Execute(
            pb.ExecuteRequest(query_id="q", sql="SELECT repeat('x', 1000) AS s FROM range(20000)"),
            _Context(),
        )
    )
    assert max(len(c.ipc) for c in chunks if c.HasField("ipc")) < 5 * 1024 * 1024
    assert chunks[-1].summary.rows == 20000
