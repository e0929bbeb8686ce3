"""The load benchmark's figures (``bench_load.py``): from the clients' answers, both sides'
audit rows and the CPU readings of one phase to its summary, and the summaries to the table.

Pure functions of plain data, so the unit tests check them without Docker. A statement counts
as sent once its client called it (the statements of a session that never opened were not); it
is ok when it returned no error and, where the phase expects a row count, that many rows.
"""

from __future__ import annotations

from collections import Counter

from bench.stats import Json, summarize

AUDIT_SIDES = (("controlplane", "control plane"), ("worker", "worker"))
CPU_ROLES = (("worker_s", "worker"), ("controlplane_s", "control plane"), ("clients_s", "clients"))


def error_key(error: Json) -> str:
    """``STATUS ErrorClass (reason)``: the gRPC status the client got, then duckcell's words."""
    reason = f" ({error['reason']})" if error.get("reason") else ""
    return f"{error.get('code') or 'no-status'} {error['class']}{reason}"


def phase_summary(
    expected_rows: list[int | None],
    answers: list[Json],
    elapsed_s: float,
    audits: dict[str, list[Json]],
    cpu: Json,
    containers_peak: int,
) -> Json:
    """One phase: ``answers`` from ``ClientProcess.run_script`` (one per client),
    ``expected_rows`` per statement of the script (None: not checked), ``audits`` the rows each
    side wrote for the phase (``controlplane``, ``worker``)."""
    latencies: list[float] = []
    errors: dict[str, Json] = {}
    sent = 0

    def count(error: Json) -> None:
        row = errors.setdefault(error_key(error), {"count": 0, "example": error.get("message", "")})
        row["count"] += 1

    for answer in answers:
        session = answer.get("session") or {}
        for step in ("open", "close"):
            if session.get(f"{step}_error"):
                error = session[f"{step}_error"]
                count(error | {"class": f"{error['class']} at session {step}"})
        for expected, query in zip(expected_rows, answer["queries"], strict=False):
            sent += 1
            error = query["error"]
            if error is None and expected is not None and query["rows"] != expected:
                message = f"{query['rows']} rows, expected {expected}"
                error = {"class": "WrongResult", "reason": "", "code": "OK", "message": message}
            if error is None:
                latencies.append(query["seconds"])
            else:
                count(error)
    result: Json = {
        "planned": len(answers) * len(expected_rows),
        "sent": sent,
        "ok": len(latencies),
        "elapsed_s": elapsed_s,
        "queries_per_s": len(latencies) / elapsed_s if elapsed_s else 0.0,
        "latency": summarize(latencies),
        "errors": errors,
        "audit": {side: audit_summary(rows) for side, rows in audits.items()},
        # Near 100% busy, throughput is cores / this: the CPU each query costs the machine.
        "cpu": cpu | {"per_ok_query_ms": 1000 * cpu["machine_busy_s"] / max(1, len(latencies))},
        "containers_peak": containers_peak,
    }
    sessions = [answer["session"] for answer in answers if answer.get("session")]
    if sessions:
        opened = [s for s in sessions if not s.get("open_error")]
        result["sessions"] = {
            "asked": len(sessions),
            "opened": len(opened),
            "open": summarize([s["open_s"] for s in opened]),
            "close": summarize([s["close_s"] for s in opened if "close_s" in s]),
        }
    return result


def audit_summary(rows: list[Json]) -> Json:
    """One side's rows: how many (and distinct query ids), outcomes, queue and run times."""
    outcomes = Counter(
        row["outcome"] + (f":{row['reason']}" if row.get("reason") else "") for row in rows
    )
    times = {
        part: summarize([float(row[f"{part}_s"]) for row in rows]) for part in ("queued", "run")
    }
    for summary in times.values():  # the rows themselves are the record; keep the JSON small
        summary.pop("samples_ms", None)
    return {
        "rows": len(rows),
        "query_ids": len({row["query_id"] for row in rows}),
        "outcomes": dict(sorted(outcomes.items())),
    } | times


def cpu_summary(
    busy_s: float, steal_s: float, elapsed_s: float, cores: int, **roles: float
) -> Json:
    """The machine's busy CPU over the phase (all cores) and the share of it each role took;
    ``other`` is the rest: the engine, the sandboxes, this bench, anything else running."""
    capacity = elapsed_s * cores
    return roles | {
        "machine_busy_s": busy_s,
        "machine_steal_s": steal_s,
        "busy_share": busy_s / capacity if capacity else 0.0,
        "steal_share": steal_s / capacity if capacity else 0.0,
        "cores": cores,
        "other_s": busy_s - sum(roles.values()),
    }


def render_load(result: Json) -> str:
    plan = result["plan"]
    warm = ", ".join(f"{name} {n}" for name, n in sorted(plan["warm"].items()))
    lines = [
        f"duckcell load benchmark, {result['date_utc']}, nproc {result['nproc']}, load average "
        f"(1 min) {result['loadavg'][0]:.2f} at start, {result['loadavg'][1]:.2f} at end",
        f"control plane and `duckcell worker` in processes of their own (warm pools: {warm}; "
        f"host cap {plan['max_sandboxes']}); {plan['clients']} client processes, each its own "
        "API key and TLS channel to the gRPC Query service (ControlPlaneClient)",
        "",
        f"{'phase':<40}{'sent':>6}{'ok':>6}{'secs':>8}{'ok q/s':>8}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}",
    ]
    phases = result["phases"]
    for phase in phases.values():
        lat = phase["latency"]
        pcts = "".join(
            f"{lat.get(p, float('nan')):>9.1f}" for p in ("median_ms", "p95_ms", "p99_ms")
        )
        lines.append(
            f"{phase['title']:<40}{phase['sent']:>6}{phase['ok']:>6}{phase['elapsed_s']:>8.1f}"
            f"{phase['queries_per_s']:>8.2f}{pcts}"
        )
    lines += [
        "latency: the client's, from the call to the result decoded; ok q/s: ok results over "
        "the phase's wall time",
        "",
        f"{'audit rows, queue vs run (ms)':<30}{'side':<15}{'rows/sent':>10}"
        f"{'queue p50':>10}{'p95':>8}{'p99':>8}{'run p50':>9}{'p95':>8}{'p99':>8}",
    ]
    for key, phase in phases.items():
        for side, title in AUDIT_SIDES:
            audit = phase["audit"][side]
            times = "".join(
                f"{audit[part].get(p, float('nan')):>{w}.1f}"
                for part in ("queued", "run")
                for p, w in (
                    ("median_ms", 10 if part == "queued" else 9),
                    ("p95_ms", 8),
                    ("p99_ms", 8),
                )
            )
            lines.append(f"{key:<30}{title:<15}{audit['rows']:>5}/{phase['sent']:<4}{times}")
    lines += ["", "errors by class (gRPC status, error class, reason)"]
    for key, phase in phases.items():
        errors = phase["errors"]
        if not errors:
            lines.append(f"  {key}: none")
        for name, row in sorted(errors.items(), key=lambda item: -item[1]["count"]):
            lines.append(f"  {key}: {row['count']} x {name}: {row['example'][:100]}")
    lines += ["", *_render_outcomes(phases), *_render_sessions(phases), "", *_render_cpu(result)]
    return "\n".join(lines)


def _render_outcomes(phases: Json) -> list[str]:
    lines = ["audit outcomes"]
    for key, phase in phases.items():
        for side, title in AUDIT_SIDES:
            audit = phase["audit"][side]
            outcomes = ", ".join(f"{name} {n}" for name, n in audit["outcomes"].items())
            lines.append(
                f"  {key}, {title}: {audit['rows']} rows, {audit['query_ids']} query ids "
                f"for {phase['sent']} sent: {outcomes or 'none'}"
            )
    return lines


def _render_sessions(phases: Json) -> list[str]:
    lines = []
    for key, phase in phases.items():
        sessions = phase.get("sessions")
        if sessions:
            lines.append(
                f"{key}: {sessions['opened']}/{sessions['asked']} sessions opened; open p50 "
                f"{sessions['open'].get('median_ms', 0):.0f} ms, max "
                f"{sessions['open'].get('max_ms', 0):.0f} ms; close p50 "
                f"{sessions['close'].get('median_ms', 0):.0f} ms"
            )
    return lines


def _render_cpu(result: Json) -> list[str]:
    phases = result["phases"]
    cores = next(iter(phases.values()))["cpu"]["cores"] if phases else 0
    lines = [
        f"CPU per phase (/proc, all {cores} cores)  {'busy':>6}{'steal':>7}"
        + "".join(f"{title:>15}" for _, title in CPU_ROLES)
        + f"{'other':>9}{'CPU/query':>11}{'peak containers':>17}"
    ]
    for key, phase in phases.items():
        cpu = phase["cpu"]
        roles = "".join(f"{cpu[role]:>13.1f} s" for role, _ in CPU_ROLES)
        lines.append(
            f"{key:<36}{cpu['busy_share']:>6.0%}{cpu['steal_share']:>7.0%}{roles}"
            f"{cpu['other_s']:>7.1f} s{cpu['per_ok_query_ms']:>8.0f} ms"
            f"{phase['containers_peak']:>17}"
        )
    lines.append(
        "busy: the machine's busy CPU over the phase / (wall time x cores); worker with its "
        "child processes (the SQL parsers); other: the engine, the sandboxes, this bench, "
        "anything else on the machine; CPU/query: the machine's busy CPU per ok result"
    )
    left = result["containers_left"]
    lines.append(
        f"containers left with label {result['label']} after the worker drained and exited "
        f"(exit {result['worker_exit']}): {left}"
    )
    return lines
