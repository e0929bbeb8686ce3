"""The control plane's worker registry: who enrolled, with which certificate, and when.

A worker id (``wkr-<12 hex>``) is assigned by the control plane at enrollment and becomes the
CN of the worker's client certificate; the certificate serial recorded here is what mTLS on
the tunnel checks, and a revoked worker is refused there. The tunnel also records here whether a
worker is online (and whether it is draining: shutting down, routed no new query), its last
heartbeat, version and labels. Raises ``ControlPlaneError`` when SQLite fails.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field

from launcher.errors import ControlPlaneError, WorkerNameTakenError

from .tokens import Clock

WORKER_ID_PREFIX = "wkr-"


def new_worker_id() -> str:
    """A fresh worker id; 48 random bits, so collisions are left to the primary key to catch."""
    return WORKER_ID_PREFIX + secrets.token_hex(6)


@dataclass(frozen=True, slots=True)
class Worker:
    """One enrolled worker, as the registry stores it."""

    worker_id: str
    name: str
    cert_serial: int
    token_id: str
    version: str
    enrolled_at: float
    revoked_at: float | None
    online: bool = False
    last_heartbeat: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    draining: bool = False


_COLUMNS = "id, name, cert_serial, token_id, version, enrolled_at, revoked_at"
_ALL_COLUMNS = f"{_COLUMNS}, online, last_heartbeat, labels, draining"
_Row = tuple[str, str, str, str, str, float, float | None, int, float | None, str, int]


def _worker(row: _Row) -> Worker:
    worker_id, name, serial_hex, token_id, version, enrolled, revoked, online, beat = row[:9]
    labels, draining = row[9:]
    return Worker(
        worker_id,
        name,
        int(serial_hex, 16),
        token_id,
        version,
        enrolled,
        revoked,
        bool(online),
        beat,
        json.loads(labels),
        bool(draining),
    )


class WorkerRegistry:
    """Records enrolled workers in the control plane's database.

    Takes a SQLite connection (see ``store.open_database``) owned by the caller and used from one
    thread, and a clock (seconds since the epoch) so tests control time.
    """

    def __init__(self, conn: sqlite3.Connection, *, clock: Clock = time.time) -> None:
        self._conn = conn
        self._clock = clock

    def register(
        self, *, worker_id: str, name: str, cert_serial: int, token_id: str, version: str
    ) -> Worker:
        """Store a newly enrolled worker and return it.

        Raises WorkerNameTakenError when a worker that is not revoked has ``name``, or ``name``
        is any worker's id: pins name a worker by either, so a second holder would be handed
        the first one's pinned queries (its data, its credentials).
        """
        worker = Worker(worker_id, name, cert_serial, token_id, version, self._clock(), None)
        try:
            with self._conn:
                self.check_name(name, token_spent=True)  # again: an enrollment may have raced
                self._conn.execute(
                    f"INSERT INTO workers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        worker_id,
                        name,
                        f"{cert_serial:x}",
                        token_id,
                        version,
                        worker.enrolled_at,
                        None,
                    ),
                )
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"registering worker {worker_id} failed: {exc}") from None
        return worker

    def check_name(self, name: str, *, token_spent: bool = False) -> None:
        """Raise WorkerNameTakenError when a worker that is not revoked has ``name``, or
        ``name`` is any worker's id."""
        try:
            holder = self._conn.execute(
                "SELECT id FROM workers WHERE (name = ? AND revoked_at IS NULL) OR id = ?",
                (name, name),
            ).fetchone()
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"reading the worker registry failed: {exc}") from None
        if holder is not None:
            token = (
                "with a new token (this one is spent)" if token_spent else "(the token is unused)"
            )
            raise WorkerNameTakenError(
                f"the name {name!r} is taken by worker {holder[0]}: enroll again with another "
                f"--name, or revoke that worker first (`duckcell controlplane worker revoke "
                f"{holder[0]}`), {token}"
            )

    def get(self, worker_id: str) -> Worker | None:
        rows = self._select("WHERE id = ?", (worker_id,))
        return rows[0] if rows else None

    def list(self) -> list[Worker]:
        """Every worker, oldest enrollment first."""
        return self._select("ORDER BY enrolled_at, id", ())

    def revoke(self, worker_id: str) -> Worker:
        """Mark a worker revoked (its certificate is refused from now on) and return it.

        Revoking twice keeps the first time. Raises ``ControlPlaneError`` for an unknown id. A
        running control plane closes the worker's tunnel at its next heartbeat at the latest.
        """
        self._write(
            "UPDATE workers SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
            (self._clock(), worker_id),
        )
        worker = self.get(worker_id)
        if worker is None:
            raise ControlPlaneError(
                f"no worker {worker_id!r}: `duckcell controlplane workers` lists the ids"
            )
        return worker

    def mark_online(
        self, worker_id: str, *, version: str | None = None, labels: dict[str, str] | None = None
    ) -> None:
        """Record a heartbeat (and, on Hello, the worker's version and labels; a Hello also
        starts a new stream, which is not draining)."""
        self._write(
            "UPDATE workers SET online = 1, last_heartbeat = ?, version = coalesce(?, version), "
            "labels = coalesce(?, labels), draining = CASE WHEN ? IS NULL THEN draining ELSE 0 END "
            "WHERE id = ?",
            (
                self._clock(),
                version,
                None if labels is None else json.dumps(labels, sort_keys=True),
                version,  # a Hello: the new stream is not draining
                worker_id,
            ),
        )

    def mark_draining(self, worker_id: str) -> None:
        """The worker said Draining: it is shutting down and gets no new query."""
        self._write("UPDATE workers SET draining = 1 WHERE id = ?", (worker_id,))

    def mark_offline(self, worker_id: str | None = None) -> None:
        """Mark one worker offline, or every worker (on start, after a crash left some online)."""
        if worker_id is None:
            self._write("UPDATE workers SET online = 0, draining = 0", ())
        else:
            self._write("UPDATE workers SET online = 0, draining = 0 WHERE id = ?", (worker_id,))

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            with self._conn:
                self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"writing the worker registry failed: {exc}") from None

    def _select(self, where: str, params: tuple[object, ...]) -> list[Worker]:
        try:
            sql = f"SELECT {_ALL_COLUMNS} FROM workers {where}"
            rows = self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"reading the worker registry failed: {exc}") from None
        return [_worker(row) for row in rows]
