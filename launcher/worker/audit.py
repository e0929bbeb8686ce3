"""The worker's local audit log: one JSON line per query it was asked to run, whatever happened.

The control plane keeps its own audit (``launcher.controlplane.audit``); this one stays on the
worker host so its operators can answer "what ran in our sandboxes" without trusting the
control plane, and it names what only the worker knows (the sandbox, its timings). The file is
append-only JSON lines (``STATE/audit.jsonl``): a line is written and flushed as each query
ends, so a crash loses at most the line being written, and tools like ``jq`` or a log shipper
read it as it grows. The SQL is kept whole beside its SHA-256, so identical statements can be
grouped without comparing long texts.

Writes are small and happen on the event loop's thread, one per query; the file is opened for
appending each time, so rotating it (rename, then a new file appears) needs no signal. It is
created mode 0600, like the worker's key: SQL text can be as sensitive as the data it names.
Raises nothing to the query path: a failed write is logged, never turned into a failed query.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"


@dataclass(frozen=True, slots=True)
class WorkerAuditRecord:
    """One query as the worker saw it. ``outcome`` is "ok" or "error"; ``reason`` is the
    ``QueryError.reason`` ("cancelled", "worker_shutdown", ...) when it is not ok."""

    query_id: str
    sql: str
    policy: str
    started_at: float  # seconds since the epoch
    finished_at: float
    outcome: str
    reason: str = ""
    message: str = ""
    sandbox: str = ""
    queued_s: float = 0.0
    run_s: float = 0.0
    rows: int = 0
    bytes: int = 0
    reruns: int = 0  # runs thrown away because a table's listing changed under them

    def as_json(self) -> str:
        fields = asdict(self)
        fields["sql_sha256"] = sql_sha256(self.sql)
        return json.dumps(fields, sort_keys=True)


def sql_sha256(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


class WorkerAuditLog:
    """Appends ``WorkerAuditRecord``s to ``path`` as JSON lines, one flushed write each."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: WorkerAuditRecord) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(descriptor, "a", encoding="utf-8") as file:
                file.write(record.as_json() + "\n")  # closing the file flushes it
        except OSError as exc:
            log.error("audit record of query %s not written to %s: %s", record.query_id, self, exc)

    def __str__(self) -> str:
        return str(self.path)


class NoAuditLog:
    """For workers (and tests) that keep no local audit."""

    def write(self, record: WorkerAuditRecord) -> None:
        return None


def read_audit(path: Path) -> list[dict[str, object]]:
    """Every record in an audit file, oldest first (tests and tools)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
