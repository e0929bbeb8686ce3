"""The control plane's audit log: one row per query routed, in its SQLite database.

Who asked (the API key id and role, or whatever caller name a future surface such as Flight SQL
passes), what (the SQL and its SHA-256), where it ran (worker, sandbox), under which policy, when,
how long it waited for a sandbox and ran, how many rows and bytes came back, and how it ended.
The router (``routing.QueryRouter.run``) writes the row through a ``QueryTrail`` before the
client sees the end of its stream, and also when the client leaves, the worker is lost, or no
worker was online; every query surface that goes through the router is audited the same way.

Outcomes: "ok"; "error" with ``reason`` = the ``QueryError.reason`` ("sql", "timeout",
"worker_shutdown", ...) or "no_worker" / "worker_lost"; "cancelled" with reason "client_gone".
A failed write is logged as an error and never fails the query: the worker keeps its own audit
(``launcher.worker.audit``) as a second record. Writes happen on the control plane's event-loop
thread like every other database write (see ``server``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

from launcher.errors import ControlPlaneError

log = logging.getLogger(__name__)

Clock = Callable[[], float]
DEFAULT_LIMIT = 50


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One routed query, as the audit table stores it (times in seconds since the epoch)."""

    query_id: str
    caller: str
    sql: str
    worker_id: str
    policy: str
    started_at: float
    finished_at: float
    queued_s: float
    run_s: float
    rows: int
    bytes: int
    outcome: str
    reason: str
    message: str
    sandbox: str = ""
    reruns: int = 0  # runs the worker threw away: a table's listing changed under them
    sql_sha256: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sql_sha256:
            digest = hashlib.sha256(self.sql.encode()).hexdigest()
            object.__setattr__(self, "sql_sha256", digest)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


_COLUMNS = (
    "query_id, caller, sql, worker_id, policy, started_at, finished_at, queued_s, run_s, rows, "
    "bytes, outcome, reason, message, sandbox, reruns, sql_sha256"
)
_FIELDS = tuple(name.strip() for name in _COLUMNS.split(","))


class AuditSink(Protocol):
    """What a ``QueryTrail`` writes to: ``AuditLog``, or a test's list-backed stand-in."""

    def write(self, record: AuditRecord) -> None: ...


class NoAudit:
    """A router without an audit log (tests of routing alone)."""

    def write(self, record: AuditRecord) -> None:
        return None


class AuditLog:
    """Writes and reads ``AuditRecord``s; takes a connection owned by the caller (one thread)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def write(self, record: AuditRecord) -> None:
        values = tuple(getattr(record, name) for name in _FIELDS)
        marks = ", ".join("?" * len(values))
        try:
            with self._conn:
                self._conn.execute(f"INSERT INTO query_audit ({_COLUMNS}) VALUES ({marks})", values)
        except sqlite3.Error as exc:
            log.error("audit record of query %s not written: %s", record.query_id, exc)

    def prune(self, before: float, *, limit: int | None = None) -> int:
        """Delete the records of queries started before ``before`` (epoch seconds), at most
        ``limit`` of them; returns how many went. Raises ``ControlPlaneError`` when the
        database refuses."""
        try:
            with self._conn:
                cursor = self._conn.execute(
                    "DELETE FROM query_audit WHERE rowid IN (SELECT rowid FROM query_audit "
                    "WHERE started_at < ? LIMIT ?)",
                    (before, -1 if limit is None else limit),
                )
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"pruning the audit log failed: {exc}") from None
        return cursor.rowcount

    def recent(self, limit: int = DEFAULT_LIMIT) -> list[AuditRecord]:
        """The ``limit`` most recently started queries, newest first."""
        try:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM query_audit ORDER BY started_at DESC, rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"reading the audit log failed: {exc}") from None
        return [AuditRecord(*row) for row in rows]


PRUNE_INTERVAL_S = 3600.0
PRUNE_BATCH = 5000


async def prune_forever(
    audit: AuditLog,
    keep_s: float,
    *,
    clock: Clock = time.time,
    interval_s: float = PRUNE_INTERVAL_S,
) -> None:
    """Delete records older than ``keep_s`` now and every ``interval_s`` (a server's task);
    a failed pass is logged and the next one tries again."""
    while True:
        pruned = 0
        try:
            # In batches, yielding to the loop between them: a first pass over a large table
            # must not hold up heartbeats and queries.
            while (batch := audit.prune(before=clock() - keep_s, limit=PRUNE_BATCH)) > 0:
                pruned += batch
                await asyncio.sleep(0)
        except ControlPlaneError as error:
            log.error("%s", error)
        if pruned:
            log.info("audit retention: deleted %d record(s) older than %g s", pruned, keep_s)
        await asyncio.sleep(interval_s)


class QueryTrail:
    """One query's audit record while it runs: ``end`` writes it, once; later ends are no-ops.

    The router creates it when a query arrives, fills in the worker when one is picked, counts
    the bytes relayed, and ends it with how the query ended.
    """

    def __init__(
        self,
        sink: AuditSink,
        *,
        query_id: str,
        caller: str,
        sql: str,
        policy: str,
        clock: Clock = time.time,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._ended = False
        self.worker_id = ""
        self.bytes = 0
        self._draft = AuditRecord(
            query_id, caller, sql, "", policy, clock(), 0.0, 0.0, 0.0, 0, 0, "", "", ""
        )

    @property
    def ended(self) -> bool:
        return self._ended

    def end(
        self,
        outcome: str,
        reason: str = "",
        message: str = "",
        *,
        rows: int = 0,
        queued_s: float | None = None,
        run_s: float | None = None,
        sandbox: str = "",
        policy: str = "",
        reruns: int = 0,
    ) -> None:
        """Write the record. Timings default to the control plane's view: no queue, and the
        whole time from arrival to now as run time (the worker's view is used when it sent one).
        ``policy`` is the one the worker resolved, when it says; else the one asked for.
        """
        if self._ended:
            return
        self._ended = True
        finished = self._clock()
        record = replace(
            self._draft,
            worker_id=self.worker_id,
            finished_at=finished,
            queued_s=0.0 if queued_s is None else queued_s,
            run_s=finished - self._draft.started_at if run_s is None else run_s,
            rows=rows,
            bytes=self.bytes,
            outcome=outcome,
            reason=reason,
            message=message,
            sandbox=sandbox,
            policy=policy or self._draft.policy,
            reruns=reruns,
        )
        self._sink.write(record)


def format_records(records: list[AuditRecord]) -> list[str]:
    """Lines for ``duckcell controlplane audit``: a header, then one line per record."""
    header = ["STARTED (UTC)", "QUERY", "CALLER", "WORKER", "POLICY", "OUTCOME", "ROWS", "BYTES"]
    rows = [[*header, "SECONDS", "SQL"]]
    for r in records:
        sql = " ".join(r.sql.split())
        rows.append(
            [
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.started_at)),
                r.query_id[:12],
                r.caller or "-",
                r.worker_id or "-",
                r.policy or "-",
                f"{r.outcome}:{r.reason}" if r.reason else r.outcome,
                str(r.rows),
                str(r.bytes),
                f"{r.finished_at - r.started_at:.2f}",
                sql if len(sql) <= 60 else sql[:57] + "...",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) + 2)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
