"""The results: targets met or missed, the table on stdout, and the JSON files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from bench.stats import Json, summarize


def target(name: str, value: float, op: str, limit: float, unit: str = "x") -> Json:
    met = value <= limit if op == "<=" else value >= limit
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "target": f"{op} {limit:g}{unit}",
        "met": met,
    }


def targets(cases: Json, throughput: list[Json], tunnel: Json | None = None) -> list[Json]:
    p50 = {key: float(row["median_ms"]) for key, row in cases.items()}
    warm = p50["select42_warm_pool"]
    added = warm - p50["select42_in_process"]
    rows = [
        target("SELECT 42: warm-pool p50 added over in-process", added, "<=", 10, " ms"),
        target(
            "SELECT 42: cold docker run p50 / warm-pool p50",
            p50["select42_cold_docker_run"] / warm,
            ">=",
            50,
        ),
        target(
            "aggregate: warm-pool p50 / in-process p50",
            p50["aggregate_warm_pool"] / p50["aggregate_in_process"],
            "<=",
            1.2,
        ),
    ]
    for row in throughput:
        concurrency = row["launcher"]["concurrency"]
        name = f"sustained, concurrency {concurrency}: launcher q/s / engine churn c/s"
        rows.append(target(name, row["ratio"], ">=", 0.9))
    if tunnel:
        added = tunnel["added_p50_ms"]
        rows.append(
            target("SELECT 42: tunnel p50 added over local warm pool", added, "<=", 5, " ms")
        )
        ratio = tunnel["throughput_ratio"]
        rows.append(target("10M-row result: tunnel MB/s / local MB/s", ratio, ">=", 0.6))
    return rows


# --- reporting ------------------------------------------------------------------------------
_CASES = (
    ("1a", "select42_in_process", "SELECT 42, in-process DuckDB"),
    ("1b", "select42_warm_pool", "SELECT 42, warm-pool sandbox"),
    ("1b*", "select42_warm_pool_refill_held", "SELECT 42, warm pool, refill held (diag.)"),
    ("1c", "select42_cold_docker_run", "SELECT 42, cold docker run --rm"),
    ("2a", "aggregate_in_process", "10M-row aggregate, in-process, threads=1"),
    ("2b", "aggregate_warm_pool", "10M-row aggregate, warm-pool sandbox"),
    ("2b*", "aggregate_warm_pool_refill_held", "aggregate, warm pool, refill held (diag.)"),
)
_PARTS = ("total", "checkout", "first_chunk", "stream", "runner", "decode")


def render(result: Json) -> str:
    machine, cases, pol = result["machine"], result["cases"], result["machine"]["policy"]
    threads = pol["duckdb_threads"]
    lines = [
        f"duckcell sandbox benchmark, {machine['date_utc']}, nproc {machine['nproc']}, "
        f"docker {machine['docker_server']}, runtime {machine['runtime']}, {machine['image']}",
        f"policy {pol['name']}: {pol['cpus']:g} CPU, DuckDB threads {threads}; the in-process "
        f"aggregate runs with SET threads={threads} to match",
        f"load average (1 min) {machine['loadavg_at_start'][0]:.2f} at start, "
        f"{machine['loadavg_at_end'][0]:.2f} at end; in-process and warm-pool reps are "
        "interleaved, so both see the same background load",
        "",
        f"{'case':<48}{'n':>4}{'median ms':>11}{'p95 ms':>10}{'vs 1a/2a':>10}",
    ]
    for tag, key, title in _CASES:
        row = cases[key]
        base = cases["aggregate_in_process" if tag[0] == "2" else "select42_in_process"]
        ratio = row["median_ms"] / base["median_ms"]
        lines.append(
            f"{tag:<4}{title:<44}{row['n']:>4}{row['median_ms']:>11.2f}{row['p95_ms']:>10.2f}"
            f"{ratio:>9.1f}x"
        )
    lines += ["", "warm-pool query, where the time goes (medians, ms)"]
    lines.append(f"{'':<22}" + "".join(f"{part:>12}" for part in _PARTS) + f"{'chunks':>8}")
    for tag, key, title in _CASES:
        if "breakdown" in cases[key]:
            parts = cases[key]["breakdown"]
            values = "".join(f"{parts[part + '_median_ms']:>12.2f}" for part in _PARTS)
            lines.append(f"{tag:<4}{title.split(',')[0]:<18}{values}{parts['chunks_median']:>8g}")
    lines.append(
        "1b*/2b*: diagnostic, the pool's warm size set to 0 during the query, so no container "
        "start can run beside it (the pool already replaces a sandbox at release, not checkout)"
    )
    lines += ["", *render_throughput(result), *render_tunnel(result.get("tunnel")), "", "targets"]
    for row in result["targets"]:
        value = f"{row['value']:.2f}{row['unit']}"
        verdict = "met" if row["met"] else "MISSED"
        lines.append(f"  {row['name']:<62}{value:>9}  target {row['target']:<9} {verdict}")
    return "\n".join(lines)


def render_throughput(result: Json) -> list[str]:
    starts = result["sandbox_start"]
    phases = ("create", "start", "socket", "ready", "runner_startup", "remove")
    n = starts["dial_at_once"]["create"]["n"]
    lines = [
        f"sandbox start, n={n} each (medians, ms; socket and ready count from start's return)",
        f"{'':<36}"
        + "".join(f"{phase:>9}" for phase in phases[:-2])
        + f"{'runner':>9}{'remove':>9}",
    ]
    for mode, title in (
        ("dial_at_once", "dial at once (as the factory)"),
        ("dial_after_socket", "dial once runner.sock exists"),
    ):
        values = "".join(f"{starts[mode][phase]['median_ms']:>9.0f}" for phase in phases)
        lines.append(f"  {title:<34}{values}")
    lines += [
        "",
        f"{'sustained SELECT 42':<20}{'conc':>5}{'queries':>8}{'launcher q/s':>14}"
        f"{'engine c/s':>12}{'ratio':>7}{'query p50 ms':>14}{'queued p50 ms':>15}",
    ]
    for row in result["sustained"]:
        run_, churn = row["launcher"], row["engine_churn"]
        lines.append(
            f"{'':<20}{run_['concurrency']:>5}{run_['queries']:>8}{run_['queries_per_s']:>14.2f}"
            f"{churn['containers_per_s']:>12.2f}{row['ratio']:>7.2f}"
            f"{run_['latency']['median_ms']:>14.0f}{run_['queued']['median_ms']:>15.0f}"
        )
    lines.append(
        "engine c/s: create + start + remove(force) with the sandbox's flags via the docker SDK; "
        "it never waits for the runner"
    )
    return lines


def render_tunnel(tunnel: Json | None) -> list[str]:
    if not tunnel:
        return []
    local, remote = tunnel["select42_local"], tunnel["select42_tunnel"]
    lines = [
        "",
        "control plane + mTLS tunnel vs the local path, same warm pool, reps interleaved",
        f"{'case':<48}{'n':>4}{'median ms':>11}{'p95 ms':>10}{'added':>10}",
        f"{'4a':<4}{'SELECT 42, local warm pool (execute)':<44}{local['n']:>4}"
        f"{local['median_ms']:>11.2f}{local['p95_ms']:>10.2f}",
        f"{'4b':<4}{'SELECT 42, control plane + tunnel':<44}{remote['n']:>4}"
        f"{remote['median_ms']:>11.2f}{remote['p95_ms']:>10.2f}"
        f"{tunnel['added_p50_ms']:>+8.2f}ms",
        f"{'':<48}{'':>4}{'':>11}{'p95 added':>10}{tunnel['added_p95_ms']:>+8.2f}ms",
        "",
        f"{'10M-row result, 2 x int64':<36}{'n':>4}{'median ms':>11}{'1st chunk':>11}"
        f"{'MB':>8}{'chunks':>8}{'MB/s':>8}{'ratio':>7}{'CPU ms':>8}",
    ]
    for tag, key, title in (("4c", "wide_local", "local"), ("4d", "wide_tunnel", "tunnel")):
        row = tunnel[key]
        ratio = row["mb_per_s"] / tunnel["wide_local"]["mb_per_s"]
        cpu = f"{row['cpu']['median_ms']:>8.0f}" if "cpu" in row else ""
        lines.append(
            f"{tag:<4}{title:<32}{row['time']['n']:>4}{row['time']['median_ms']:>11.0f}"
            f"{row['first_chunk']['median_ms']:>11.0f}{row['bytes'] / 1e6:>8.0f}"
            f"{row['chunks']:>8}{row['mb_per_s']:>8.0f}{ratio:>7.2f}{cpu}"
        )
    lines.append(
        "from the call to the last chunk decoded with pyarrow; MB = 10^6 bytes of Arrow IPC;"
    )
    lines.append("CPU ms: the whole machine's busy CPU (all cores, /proc/stat) during the rep")
    if "throughput_ratio_cpu_ceiling" in tunnel:
        lines.append(
            f"ceiling of the ratio on these {tunnel['cores']} cores (estimate, low by the pool "
            f"refill's CPU): cores x local ms / tunnel CPU ms = "
            f"{tunnel['throughput_ratio_cpu_ceiling']:.2f}"
        )
    return lines


def write_results(result: Json, output: Path, name: str = "sandbox") -> Path:
    """``<name>-<UTC>.json`` and ``latest-<name>.json`` (one name per benchmark script)."""
    output.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    path = output / f"{name}-{stamp}.json"
    path.write_text(text)
    (output / f"latest-{name}.json").write_text(text)
    return path


# --- the data benchmark (bench_data.py) ----------------------------------------------------
_DATA_CASES = (
    ("in_process", "in-process DuckDB, same files"),
    ("warm", "sandbox, warm cache"),
    ("warm_listing_reused", "sandbox, warm, listings reused"),
    ("cold", "sandbox, cold cache (download)"),
    ("in_process_fresh_connection", "diag: in-process, new connection"),
    ("in_process_new_process", "diag: in-process, new process"),
)


def render_data(result: Json) -> str:
    """The table of ``bench_data.py``: per query, the baseline, the sandbox, the diagnostics."""
    lines = [
        f"duckcell data benchmark, {result['date_utc']}, nproc {result['nproc']}, TPC-H "
        f"SF{result['plan']['scale']} Parquet ({result['data_bytes'] / 1e6:.0f} MB) in a "
        f"loopback S3 server, policy {result['policy_name']}; in-process DuckDB with the same "
        "threads and memory_limit",
        f"load average (1 min) {result['loadavg']['start'][0]:.2f} at start, "
        f"{result['loadavg']['end'][0]:.2f} at end; warm and in-process reps interleaved, the "
        "pool settled before each sandbox rep",
        "",
        f"{'query':<6}{'case':<34}{'n':>4}{'median ms':>11}{'p95 ms':>10}{'vs in-proc':>12}"
        f"{'prepare':>9}{'checkout':>10}{'runner':>8}{'s3 cpu':>8}",
    ]
    for name, row in result["cases"].items():
        base = row["in_process"]["median_ms"]
        for key, title in _DATA_CASES:
            if key not in row:  # a case added after the result was written
                continue
            case = row[key]
            parts = "".join(
                f"{case[f'{part}_median_ms']:>{width}.1f}" if f"{part}_median_ms" in case else ""
                for part, width in (("prepare", 9), ("checkout", 10), ("runner", 8))
            )
            if "s3_cpu_mean_ms" in case:
                parts += f"{case['s3_cpu_mean_ms']:>8.1f}"
            lines.append(
                f"{name:<6}{title:<34}{case['n']:>4}{case['median_ms']:>11.1f}"
                f"{case['p95_ms']:>10.1f}{case['median_ms'] / base:>11.2f}x{parts}"
            )
    lines += [
        "prepare: list the objects in S3 and lease them in the cache (downloads when cold); "
        "runner: the query inside the sandbox (medians, ms); s3 cpu: CPU the loopback S3 "
        "server spent during the rep (mean, ms), on the cores the sandbox uses: a remote store "
        "would not take it from the query",
        "diag: what a sandbox pays per query besides isolation: a new DuckDB connection and "
        "views, then also a new process (timed after its imports and a SELECT 42)",
        "",
        "targets",
    ]
    for row in result["targets"]:
        verdict = "met" if row["met"] else "MISSED"
        lines.append(f"  {row['name']:<40}{row['value']:>7.2f}x  target {row['target']}  {verdict}")
    return "\n".join(lines)


# --- the Flight SQL benchmark (bench_flight.py) ---------------------------------------------
_FLIGHT_PATHS = (
    ("in_process", "in-process DuckDB, Arrow fetch"),
    ("one_hop", "one-hop Flight server, FlightClient"),
    ("one_hop_tls", "diag: the same one-hop server over TLS"),
    ("worker_local", "diag: worker's launcher, same pool, no Flight"),
    ("chain", "ADBC -> control plane -> tunnel -> sandbox"),
)


def flight_summary(
    latency_s: dict[str, list[float]],
    wide_s: dict[str, list[float]],
    wide_bytes: int,
    *,
    bursts_s: dict[str, list[float]] | None = None,
) -> Json:
    """Medians, MB/s and the issue's two targets, from raw samples of one run: the chain's p50
    added over in-process (``latency_s``: each query on a settled warm pool), and its
    large-result MB/s as a share of the one-hop server's. ``bursts_s``, pause-free bursts on a
    refilling pool, is reported beside them."""
    latency = {name: summarize(samples) for name, samples in latency_s.items()}
    bursts = {name: summarize(samples) for name, samples in (bursts_s or {}).items()}
    wide: Json = {}
    for name, samples in wide_s.items():
        times = summarize(samples)
        wide[name] = {"time": times, "mb_per_s": wide_bytes / (times["median_ms"] / 1000) / 1e6}
    added_p50 = latency["chain"]["median_ms"] - latency["in_process"]["median_ms"]
    added_p95 = latency["chain"]["p95_ms"] - latency["in_process"]["p95_ms"]
    ratio = wide["chain"]["mb_per_s"] / wide["one_hop"]["mb_per_s"]
    extra: Json = {}
    if "one_hop_tls" in wide:  # beside the target, never instead of it
        extra["throughput_ratio_vs_tls_one_hop"] = (
            wide["chain"]["mb_per_s"] / wide["one_hop_tls"]["mb_per_s"]
        )
    return extra | {
        "select42": latency,
        "select42_bursts": bursts,
        "added_p50_ms": added_p50,
        "added_p95_ms": added_p95,
        "wide": wide,
        "wide_bytes": wide_bytes,
        "throughput_ratio": ratio,
        "targets": [
            target("SELECT 42: chain p50 added over in-process", added_p50, "<=", 15, " ms"),
            target("10M-row result: chain MB/s / one-hop MB/s", ratio, ">=", 0.6),
        ],
    }


def render_flight(result: Json) -> str:
    """The table of ``bench_flight.py``: latency, throughput, targets."""
    plan, in_proc = result["plan"], result["select42"]["in_process"]
    lines = [
        f"duckcell Flight SQL benchmark, {result['date_utc']}, nproc {result['nproc']}, load "
        f"average (1 min) {result['loadavg'][0]:.2f} at start, {result['loadavg'][1]:.2f} at end",
        f"warm pool {plan['warm']}; paths take turns query by query (settled) and burst by "
        "burst (bursts)",
        "",
    ]
    for section, title in (
        ("select42", "SELECT 42, pool settled before each query"),
        ("select42_bursts", f"SELECT 42, pause-free bursts of {plan['warm']}"),
    ):
        rows = result.get(section) or {}
        if not rows:
            continue
        base = rows["in_process"]["median_ms"] if "in_process" in rows else in_proc["median_ms"]
        lines.append(f"{title:<48}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'p50 added':>11}")
        for key, path in _FLIGHT_PATHS:
            if key not in rows:
                continue
            row = rows[key]
            added = row["median_ms"] - base
            lines.append(
                f"{path:<48}{row['n']:>4}{row['median_ms']:>9.2f}{row['p95_ms']:>9.2f}"
                f"{added:>+9.2f}ms"
            )
        lines.append("")
    lines += [
        "",
        f"{'10M rows x 2 int64 (' + format(result['wide_bytes'] / 1e6, '.0f') + ' MB)':<48}"
        f"{'n':>4}{'p50 ms':>9}{'MB/s':>9}{'vs 1-hop':>11}",
    ]
    one_hop = result["wide"]["one_hop"]["mb_per_s"]
    for key, title in _FLIGHT_PATHS:
        if key not in result["wide"]:
            continue
        row = result["wide"][key]
        lines.append(
            f"{title:<48}{row['time']['n']:>4}{row['time']['median_ms']:>9.0f}"
            f"{row['mb_per_s']:>9.0f}{row['mb_per_s'] / one_hop:>10.2f}x"
        )
    lines += ["MB = 10^6 bytes of Arrow buffers in the client's table; call to whole table"]
    if "throughput_ratio_vs_tls_one_hop" in result:
        vs_tls = result["throughput_ratio_vs_tls_one_hop"]
        lines.append(f"diag: chain MB/s / one-hop-over-TLS MB/s: {vs_tls:.2f}x (not the target)")
    if "sandbox_queries_per_chain_select42" in result:
        per_query = result["sandbox_queries_per_chain_select42"]
        lines.append(f"sandbox queries per ADBC SELECT 42 through the chain: {per_query:.2f}")
    lines.append("")
    lines.append("targets")
    for row in result["targets"]:
        verdict = "met" if row["met"] else "MISSED"
        value = f"{row['value']:.2f}{row['unit']}"
        lines.append(f"  {row['name']:<46}{value:>10}  target {row['target']:<9} {verdict}")
    return "\n".join(lines)
