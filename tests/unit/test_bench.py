"""The benchmark stays runnable: its modules import against the current launcher API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
from grpc import aio

from bench.bench_data import BENCH_POLICY, POLICY, QUERIES, TABLES, catalog_text, ratio
from bench.bench_load import parse_args as parse_load_args
from bench.bench_load import phases as load_phases
from bench.client_process import error_fields
from bench.engine import sandbox_spec
from bench.load_report import cpu_summary, error_key, phase_summary, render_load
from bench.report import flight_summary, render_data, render_flight, render_tunnel, target
from bench.stats import Json, MachineCpu, summarize
from bench.transfer import Transfer
from bench.tunnel import transfer_summary
from launcher.config import load_config
from launcher.errors import DuckcellError, query_error
from launcher.model.catalog import parse_catalog
from launcher.model.policy import load_policies, load_policy_file
from launcher.model.sql.tables import table_names

REPO = Path(__file__).resolve().parents[2]


def test_bench_script_starts() -> None:
    done = subprocess.run(
        [sys.executable, "bench/bench_sandbox.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout


def test_data_bench_script_starts() -> None:
    done = subprocess.run(
        [sys.executable, "bench/bench_data.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--data-dir" in done.stdout and "--quick" in done.stdout


def test_data_bench_catalog_names_the_tables_each_query_reads(tmp_path: Path) -> None:
    catalog = parse_catalog(catalog_text("http://127.0.0.1:9"), str(tmp_path / "c.yaml"))
    assert sorted(catalog.tables) == sorted(TABLES)
    scan, join = (table_names(QUERIES[name]) for name in ("scan", "join"))
    assert {t.name for t in catalog.referenced(scan)} == {"lineitem"}
    assert {t.name for t in catalog.referenced(join)} == set(TABLES)


def test_data_bench_policy_leaves_room_beside_duckdbs_buffer_pool(tmp_path: Path) -> None:
    (tmp_path / f"{POLICY}.yaml").write_text(BENCH_POLICY)
    policy = load_policies(tmp_path).get(POLICY)
    duck = policy.duckdb
    assert duck.memory_limit_bytes + duck.max_temp_directory_bytes < policy.limits.memory_bytes


def test_render_data_shows_ratios_and_targets() -> None:
    def case(median: float, **parts: float) -> dict[str, float]:
        return {"n": 3, "median_ms": median, "p95_ms": median + 1} | parts

    sandbox = {
        "prepare_median_ms": 10.0,
        "checkout_median_ms": 0.1,
        "runner_median_ms": 100.0,
        "s3_cpu_mean_ms": 12.5,
    }
    row = {
        "in_process": case(100.0),
        "warm": case(110.0, **sandbox),
        "cold": case(500.0, **sandbox),
        "in_process_fresh_connection": case(105.0),
        "in_process_new_process": case(120.0),
    }
    result = {
        "date_utc": "2026-01-01T00:00:00Z",
        "nproc": 2,
        "loadavg": {"start": (0.5, 0.4, 0.3), "end": (1.25, 0.5, 0.3)},
        "plan": {"scale": 1},
        "data_bytes": 310e6,
        "policy_name": "bench-data",
        "cases": {"scan": row},
        "targets": [target("scan: warm p50 / in-process p50", ratio(row), "<=", 1.15)],
    }
    text = render_data(result)
    assert "load average (1 min) 0.50 at start, 1.25 at end" in text
    warm = next(line for line in text.splitlines() if line.startswith("scan  sandbox, warm"))
    assert (
        " ".join(warm.split()) == "scan sandbox, warm cache 3 110.0 111.0 1.10x 10.0 0.1 100.0 12.5"
    )
    in_process = next(line for line in text.splitlines() if line.startswith("scan  in-process"))
    assert in_process.split()[-1] == "1.00x"  # no sandbox parts, no S3 server column
    assert "scan: warm p50 / in-process p50            1.10x  target <= 1.15x  met" in text


def test_flight_bench_script_starts() -> None:
    done = subprocess.run(
        [sys.executable, "bench/bench_flight.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--warm" in done.stdout and "--quick" in done.stdout


def test_flight_summary_checks_both_targets_from_the_same_samples() -> None:
    latency = {"in_process": [0.001, 0.002, 0.003], "one_hop": [0.002] * 3, "chain": [0.012] * 3}
    wide = {
        "in_process": [0.1] * 3,
        "one_hop": [0.2] * 3,
        "one_hop_tls": [0.25] * 3,
        "chain": [0.4, 0.5, 0.3],
    }
    bursts = {"in_process": [0.001] * 3, "chain": [0.021] * 3}
    result = flight_summary(latency, wide, 160_000_000, bursts_s=bursts)
    assert result["added_p50_ms"] == 10.0  # the settled figure, never the bursts'
    # The TLS one-hop is a diagnostic beside the target's plaintext bar, never instead of it.
    assert result["throughput_ratio_vs_tls_one_hop"] == 0.625
    assert result["select42_bursts"]["chain"]["median_ms"] == 21.0
    assert result["wide"]["one_hop"]["mb_per_s"] == 800.0
    assert result["throughput_ratio"] == 0.5
    verdicts = {row["name"]: row["met"] for row in result["targets"]}
    assert verdicts == {
        "SELECT 42: chain p50 added over in-process": True,
        "10M-row result: chain MB/s / one-hop MB/s": False,
    }
    result |= {
        "date_utc": "2026-01-01T00:00:00Z",
        "nproc": 2,
        "loadavg": [0.5, 1.25],
        "plan": {"warm": 10},
    }
    text = render_flight(result)
    assert "load average (1 min) 0.50 at start, 1.25 at end" in text
    assert "SELECT 42, pool settled before each query" in text
    assert "SELECT 42, pause-free bursts of 10" in text
    chain = [line.split()[-4:] for line in text.splitlines() if line.startswith("ADBC")]
    assert chain == [
        ["3", "12.00", "12.00", "+10.00ms"],
        ["3", "21.00", "21.00", "+20.00ms"],
        ["3", "400", "400", "0.50x"],
    ]
    assert "diag: the same one-hop server over TLS" in text
    assert "diag: chain MB/s / one-hop-over-TLS MB/s: 0.62x (not the target)" in text
    assert text.endswith("one-hop MB/s          0.50x  target >= 0.6x   MISSED")


def test_tunnel_table_shows_machine_cpu_and_the_ceiling_it_sets() -> None:
    local = [Transfer(0.28, 0.01, 160, 10, 155, MachineCpu(0.55, 0.0)) for _ in range(3)]
    tunnel = [Transfer(0.56, 0.02, 160, 10, 154, MachineCpu(1.2, 0.01)) for _ in range(3)]
    result = {
        "select42_local": summarize([0.005]),
        "select42_tunnel": summarize([0.009]),
        "added_p50_ms": 4.0,
        "added_p95_ms": 5.0,
        "wide_local": transfer_summary(local),
        "wide_tunnel": transfer_summary(tunnel),
        "throughput_ratio": 0.5,
        "throughput_ratio_cpu_ceiling": 2 * 280 / 1200,
        "cores": 2,
    }
    text = "\n".join(render_tunnel(result))
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:2] == "4c"}
    rows |= {line.split()[0]: line.split() for line in text.splitlines() if line[:2] == "4d"}
    assert rows["4c"][-1] == "550" and rows["4d"][-1] == "1200"  # the CPU ms column
    assert "ceiling of the ratio on these 2 cores" in text and "= 0.47" in text
    before = MachineCpu.now()
    sum(range(2_000_000))
    assert MachineCpu.now().since(before).busy >= 0.0


def test_load_bench_script_starts() -> None:
    done = subprocess.run(
        [sys.executable, "bench/bench_load.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert all(flag in done.stdout for flag in ("--clients", "--queries", "--quick"))


def test_load_bench_plans_both_phases() -> None:
    assert (parse_load_args([]).clients, parse_load_args([]).queries) == (20, 50)
    quick = parse_load_args(["--quick", "--clients", "7"])
    assert (quick.clients, quick.queries) == (2, 5)
    per_query, session = load_phases(quick)
    assert per_query.statements == ("SELECT 42",) * 5 and per_query.session == ""
    assert session.session == "agent-session"
    assert session.statements[0].startswith("CREATE TEMP TABLE")
    # Every read after the first statement proves the temp table survived in the session.
    assert session.expected_rows == (None, 42, 42, 42, 42)


def test_load_client_reports_the_status_code_under_duckcells_error() -> None:
    trailing = aio.Metadata(("duckcell-reason", "capacity"))
    rpc = aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, aio.Metadata(), trailing, "full")
    try:
        try:
            raise rpc
        except aio.AioRpcError:  # as ControlPlaneClient translates it
            raise query_error("capacity", "no parser was free") from None
    except DuckcellError as error:
        fields = error_fields(error)
    name = type(query_error("capacity", "")).__name__
    assert error_key(fields) == f"RESOURCE_EXHAUSTED {name} (capacity)"
    assert fields["message"] == "no parser was free"


def test_load_summary_counts_errors_audit_rows_and_renders() -> None:
    def query(seconds: float, rows: int = 1, error: dict[str, str] | None = None) -> Json:
        return {"started": 0.0, "seconds": seconds, "rows": rows, "error": error}

    full = {"class": "OverCapacityError", "reason": "capacity", "code": "RESOURCE_EXHAUSTED"}
    answers = [
        {"queries": [query(0.1), query(0.2), query(0.3, rows=0)], "session": None},
        {"queries": [query(0.4), query(5.0, 0, full | {"message": "busy"}), query(0.5)]},
    ]

    def row(qid: str, queued: float) -> Json:
        return {"query_id": qid, "outcome": "ok", "reason": "", "queued_s": queued, "run_s": 0.01}

    audits = {
        "controlplane": [row(f"q{i}", 0.5) for i in range(6)],
        "worker": [row(f"q{i}", 0.5) for i in range(5)],  # one row short
    }
    cpu = cpu_summary(3.0, 0.0, 2.0, 2, worker_s=1.0, controlplane_s=0.5, clients_s=0.25)
    summary = phase_summary([1, 1, 1], answers, 2.0, audits, cpu, containers_peak=7)
    assert (summary["sent"], summary["ok"], summary["queries_per_s"]) == (6, 4, 2.0)
    assert summary["errors"] == {
        "RESOURCE_EXHAUSTED OverCapacityError (capacity)": {"count": 1, "example": "busy"},
        "OK WrongResult": {"count": 1, "example": "0 rows, expected 1"},
    }
    assert summary["latency"]["median_ms"] == 300.0  # the ok queries only
    assert summary["audit"]["worker"]["rows"] == 5
    assert cpu["busy_share"] == 0.75 and cpu["other_s"] == 1.25
    result = {
        "date_utc": "2026-01-01T00:00:00Z",
        "nproc": 2,
        "loadavg": [0.5, 1.25],
        "plan": {"clients": 2, "max_sandboxes": 8, "warm": {"default": 2}},
        "label": "duckcell.launcher=load-1",
        "phases": {"per_query": summary | {"title": "per-query SELECT 42 (default)"}},
        "containers_left": 0,
        "worker_exit": 0,
    }
    text = render_load(result)
    line = next(ln for ln in text.splitlines() if ln.startswith("per-query SELECT 42"))
    assert line.split()[-7:] == ["6", "4", "2.0", "2.00", "300.0", "500.0", "500.0"]
    assert "per_query                     worker             5/6" in text
    assert "per_query: 1 x RESOURCE_EXHAUSTED OverCapacityError (capacity): busy" in text
    assert "(exit 0): 0" in text


def test_the_sandbox_bench_specs_its_containers_as_the_launcher_does(tmp_path: Path) -> None:
    """bench_sandbox churns containers with the launcher's own spec; a renamed spec field
    broke it once without any test noticing."""
    config = load_config(flags={"state_dir": tmp_path}, env={})
    for name in ("default", "strict"):
        policy = load_policy_file(REPO / "policies" / f"{name}.yaml")
        spec = sandbox_spec(config, policy)
        assert spec.files_dir is None and spec.image == config.image
        assert spec.runtime == policy.runtime.value
