"""Every error duckcell raises on purpose, in one tree.

    DuckcellError                      root; ``str(err)`` is a one-line message for a person
    ├── ConfigError                    launcher configuration (file, env, flags)
    ├── PolicyError                    a policy file is invalid (file, line, field)
    │   └── UnknownPolicyError         a policy name that no file defines
    ├── BackendError                   the container engine failed or is missing
    │   ├── EngineUnavailableError     no Docker daemon answers
    │   ├── ImageMissingError          the sandbox image is not built
    │   └── EngineTimeoutError         an engine call passed its deadline
    ├── ImageBuildError                building the sandbox image failed
    ├── PoolError                      the warm pool cannot hand out a sandbox
    │   ├── OverCapacityError          every sandbox slot stayed busy for the whole wait
    │   └── SandboxStartError          a sandbox did not become ready
    ├── SessionError                   unknown, closed or expired session
    ├── CatalogError                   a catalog file is invalid (file, line, field) or names
    │                                  an unknown table or connection
    ├── SecretError                    a secret reference cannot be resolved on this host
    ├── ObjectStoreError               object storage (S3 or a local source) failed
    ├── CacheError                     the cache directory is unusable or an entry is bad
    ├── QueryError                     the query itself did not complete
    │   ├── SqlError                   DuckDB refused or failed the statement (its message)
    │   │   ├── StatementLimitError    too large to take, or too slow or big to parse
    │   │   └── StatementTextError     not UTF-8 text, or holds a NUL byte (bad input: exit 2)
    │   ├── ParserUnavailableError     no SQL parser process was free in time (reason capacity)
    │   ├── QueryTimeoutError          statement timeout or hard wall-clock kill
    │   ├── MemoryLimitError           the sandbox hit its memory limit
    │   ├── ResultLimitError           the result passed max_result_rows / max_result_bytes
    │   ├── QueryCancelledError        cancelled by the caller
    │   ├── WorkerShutdownError        the worker shut down (drained) before the query ended
    │   ├── QueryDeniedError           refused before anything ran (statement, table, prefix)
    │   └── SandboxLostError           the sandbox died for another reason
    │       └── RunnerInvalidError     the runner sent a malformed result or lied about it
    │                                  (a possible compromise: its sandbox is destroyed)
    └── ControlPlaneError              the control plane's CA, store, enrollment or tunnel failed
        ├── CertificateError           a CA, certificate or CSR is invalid or unreadable
        ├── TunnelRefusedError         the control plane refused this worker's tunnel for good
        ├── ApiKeyError                an API key is missing, malformed or unknown
        ├── ControlPlaneUnreachableError
        │                              the control plane did not answer (address, TLS, down)
        ├── WorkerUnavailableError     no worker online, or the worker left during the query
        ├── RemoteQueryError           the control plane failed a query for another reason
        └── EnrollmentError            an enrollment token was refused (``reason`` says why)
            ├── MalformedTokenError    the text is not a well-formed enrollment token
            ├── UnknownTokenError      no such token, or its secret does not match
            ├── ExpiredTokenError      the token's lifetime has passed
            ├── UsedTokenError         the token was already redeemed once
            ├── CaMismatchError        the token was made for another control plane's CA
            └── WorkerNameTakenError   another worker has that name (or it is a worker's id)

A query run through the control plane fails with the same ``QueryError`` subclass as a local
one: its ``reason`` crosses the wire and ``query_error`` turns it back into the class.

``exit_code`` is what ``duckcell query`` exits with: 1 for every failure of the query itself,
local or through a control plane (``QueryError``, and ``WorkerUnavailableError`` and
``RemoteQueryError``: the control plane took the query and it did not complete); 2 for every
problem that is not the query's (the root's default: no engine, bad flags or input, a control
plane that does not answer, a refused key).

Outcome reasons are one vocabulary: ``REASONS`` says, for each word, the gRPC status of the
control plane's ``Query`` service, the status its Flight SQL surface sends, whether running it
again can help, and the exit code. Every other table is derived from it (``QueryError`` and
``WorkerUnavailableError`` take their ``exit_code`` from it, ``controlplane.query`` its
statuses, ``flight.status`` its errors); ``tests/unit/test_reasons.py`` checks that every
reason a class carries has its row and that both surfaces agree on each.

External errors (docker, grpc, DuckDB) are translated where they are met: the Docker backend,
the runner client, the runner. Nothing outside those modules sees a foreign exception type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class DuckcellError(Exception):
    """Root of duckcell's errors. The message says what happened and what to do."""

    exit_code = 2


class ConfigError(DuckcellError):
    """The launcher configuration is invalid."""


class PolicyError(DuckcellError):
    """A policy document is invalid; the message names file, line and field."""


class UnknownPolicyError(PolicyError):
    """No policy of that name exists."""


class BackendError(DuckcellError):
    """The container engine failed."""


class EngineUnavailableError(BackendError):
    """No Docker daemon answers."""


class ImageMissingError(BackendError):
    """The sandbox image is not present in the engine."""


class EngineTimeoutError(BackendError):
    """An engine call did not answer before its deadline."""


class ImageBuildError(DuckcellError):
    """Building the sandbox image failed."""


class PoolError(DuckcellError):
    """The pool could not provide a sandbox."""


class OverCapacityError(PoolError):
    """All sandbox slots stayed busy for the whole queue wait."""


class SandboxStartError(PoolError):
    """A sandbox container did not reach ready."""


class SessionError(DuckcellError):
    """The session is unknown, closed or expired. ``reason`` is the word that crosses the wire
    (a worker's Outcome, the ``Query`` service's trailing metadata) for it."""

    reason = "session"


class CatalogError(DuckcellError):
    """A catalog file is invalid (file, line, field), or a name it lacks was asked for."""


class SecretError(DuckcellError):
    """A secret reference ({env: NAME}, {file: PATH}, {store: NAME}) cannot be resolved here.

    The message names the reference, never a value.
    """


class ObjectStoreError(DuckcellError):
    """Listing or fetching objects failed (S3 or S3-compatible endpoint, or a local source)."""


class CacheError(DuckcellError):
    """The cache directory is unusable, or an entry failed its integrity check twice."""


class QueryError(DuckcellError):
    """The query did not complete. ``reason`` is a short machine-readable word (``REASONS``)."""

    reason = "error"

    @property
    def exit_code(self) -> int:  # type: ignore[override]  # the reason's, from ``REASONS``
        return meaning(self.reason).exit_code


class SqlError(QueryError):
    """DuckDB refused or failed the statement; the message is DuckDB's."""

    reason = "sql"


class StatementLimitError(SqlError):
    """A statement over the size limit, or whose parse passed its time or memory bound
    (``launcher.model.sql.pool``): refused before it reached a sandbox."""


class StatementTextError(SqlError):
    """The statement is not valid UTF-8, or holds a NUL byte (``launcher.inputs``): refused
    where it enters, before anything parses, records or runs it. INVALID_ARGUMENT on the wire,
    like any ``SqlError``; but the caller's input, not a query that failed, so exit code 2."""

    exit_code = 2


class ParserUnavailableError(QueryError):
    """No SQL parser process was free within the parse timeout, or none could be started:
    retrying later can help, hence the reason "capacity" (like a full sandbox pool)."""

    reason = "capacity"


class QueryTimeoutError(QueryError):
    reason = "timeout"


class MemoryLimitError(QueryError):
    reason = "memory"


class ResultLimitError(QueryError):
    reason = "result_limit"


class QueryCancelledError(QueryError):
    reason = "cancelled"


class WorkerShutdownError(QueryError):
    """The worker was shutting down and cancelled the query after its drain grace period."""

    reason = "worker_shutdown"


class WorkerDrainingError(WorkerShutdownError):
    """The worker was draining and refused the query before running anything of it.

    The control plane runs such a query on another worker when there is one; a client sees
    this only when there was none (it is a ``WorkerShutdownError``: run it again later).
    """

    reason = "worker_draining"


class QueryDeniedError(QueryError):
    """Refused before anything ran: a denied statement, table or write destination."""

    reason = "denied"


class SandboxLostError(QueryError):
    reason = "sandbox_lost"


class RunnerInvalidError(SandboxLostError):
    """The runner sent what no honest runner sends: a malformed Arrow IPC result, or a summary
    that disagrees with what it sent (``launcher.sandbox.result_check``). Its sandbox is destroyed
    and the event logged as a possible compromise. Not worth retrying: the query may be the
    exploit."""

    reason = "runner_invalid"


def runner_invalid(detail: str) -> RunnerInvalidError:
    """The error for anything no honest runner sends (its sandbox is then destroyed). Here, not
    in ``sandbox.runner_client``: the data path's write check (``data.writes``) raises it too."""
    return RunnerInvalidError(
        f"runner sent an invalid result: {detail}; the sandbox was destroyed as possibly "
        "compromised and the worker logged it (tell the worker's operator)"
    )


class ControlPlaneError(DuckcellError):
    """The control plane's CA, store or enrollment failed."""


class CertificateError(ControlPlaneError):
    """A CA, certificate or CSR is invalid, unreadable or not signed by the expected CA."""


class EnrollmentError(ControlPlaneError):
    """An enrollment token was refused. ``reason`` is a short machine-readable word.

    Messages never contain the token's secret: they end up in logs and on terminals.
    """

    reason = "refused"


class MalformedTokenError(EnrollmentError):
    reason = "malformed"


class UnknownTokenError(EnrollmentError):
    reason = "unknown"


class ExpiredTokenError(EnrollmentError):
    reason = "expired"


class UsedTokenError(EnrollmentError):
    reason = "used"


class CaMismatchError(EnrollmentError):
    reason = "ca_mismatch"


class WorkerNameTakenError(EnrollmentError):
    """Another worker (not revoked) has the name, or the name is another worker's id: pins
    and the registry name workers by either, so a second one would take its queries."""

    reason = "name_taken"


class TunnelRefusedError(ControlPlaneError):
    """The control plane refused the worker's tunnel (revoked, unknown, incompatible version).

    ``reason`` is the control plane's word for it; retrying cannot help, so the worker stops.
    """

    def __init__(self, message: str, reason: str = "refused") -> None:
        super().__init__(message)
        self.reason = reason


class ApiKeyError(ControlPlaneError):
    """An API key is missing, malformed, unknown or does not match."""


class ControlPlaneUnreachableError(ControlPlaneError):
    """The control plane did not answer (wrong address, TLS refused, not running) or the
    connection to it dropped: nothing says the query itself failed."""


class WorkerUnavailableError(ControlPlaneError):
    """No worker is online to run the query, or its worker disconnected during the query.

    The query's failure (exit code 1), told apart from an unreachable control plane by
    ``reason``, which crosses the wire like a ``QueryError``'s."""

    reason = "worker_unavailable"

    @property
    def exit_code(self) -> int:  # type: ignore[override]  # the reason's, from ``REASONS``
        return meaning(self.reason).exit_code


class RemoteQueryError(ControlPlaneError):
    """The control plane answered a query with an error that is not a ``QueryError``."""

    exit_code = 1


# Reasons no class of its own carries: a worker sends them in its Outcome for an error that is
# not a ``QueryError`` (``launcher.worker.queries``), and the client raises a ``QueryError``
# with the word.
POLICY_REASON = "policy"  # a PolicyError: the policy asked for is unknown or invalid there
CAPACITY_REASON = "capacity"  # a PoolError: every sandbox stayed busy (ParserUnavailableError too)
WORKER_ERROR_REASON = "worker_error"  # any other DuckcellError of the worker (its log says)


@dataclass(frozen=True, slots=True)
class Meaning:
    """What one outcome reason tells each surface, and the caller.

    ``status`` is the gRPC status (a ``grpc.StatusCode`` name) the control plane's ``Query``
    service ends the call with. ``flight_status`` is the one its Flight SQL surface sends: the
    same, except where pyarrow cannot send it (RESOURCE_EXHAUSTED, FAILED_PRECONDITION; see
    ``launcher.flight.status``): UNAVAILABLE then when running the query again can help, else
    UNKNOWN. ``retry``: running the same query again (later, or on another worker) can
    succeed. ``query_failure``: the query's own failure, ``duckcell query`` exits 1 (else 2).
    """

    status: str
    flight_status: str
    retry: bool
    query_failure: bool = True

    @property
    def exit_code(self) -> int:
        return 1 if self.query_failure else 2


# Reason -> its meaning: the one table; every other is derived from it.
REASONS: Mapping[str, Meaning] = MappingProxyType(
    {
        # The statement: DuckDB refused it, the role may not run it. Fix it, do not retry.
        SqlError.reason: Meaning("INVALID_ARGUMENT", "INVALID_ARGUMENT", retry=False),
        QueryDeniedError.reason: Meaning("PERMISSION_DENIED", "PERMISSION_DENIED", retry=False),
        POLICY_REASON: Meaning("INVALID_ARGUMENT", "INVALID_ARGUMENT", retry=False),
        # It ran too long, or was cancelled (by the caller, or on the worker).
        QueryTimeoutError.reason: Meaning("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", retry=False),
        QueryCancelledError.reason: Meaning("CANCELLED", "CANCELLED", retry=False),
        # A limit it passed fails the same way each time; the message says what to change.
        MemoryLimitError.reason: Meaning("RESOURCE_EXHAUSTED", "UNKNOWN", retry=False),
        ResultLimitError.reason: Meaning("RESOURCE_EXHAUSTED", "UNKNOWN", retry=False),
        # Every sandbox (or SQL parser) stayed busy: later it may not be.
        CAPACITY_REASON: Meaning("RESOURCE_EXHAUSTED", "UNAVAILABLE", retry=True),
        # The worker or its sandbox went away: another one may take the query.
        WorkerShutdownError.reason: Meaning("UNAVAILABLE", "UNAVAILABLE", retry=True),
        WorkerDrainingError.reason: Meaning("UNAVAILABLE", "UNAVAILABLE", retry=True),
        SandboxLostError.reason: Meaning("UNAVAILABLE", "UNAVAILABLE", retry=True),
        WorkerUnavailableError.reason: Meaning("UNAVAILABLE", "UNAVAILABLE", retry=True),
        # ...but not when the runner sent a malformed result: the query may be the exploit.
        RunnerInvalidError.reason: Meaning("INTERNAL", "INTERNAL", retry=False),
        WORKER_ERROR_REASON: Meaning("INTERNAL", "INTERNAL", retry=False),
        QueryError.reason: Meaning("FAILED_PRECONDITION", "UNKNOWN", retry=False),
        # Unknown, ended or refused session: the caller's, not the query's (exit 2).
        SessionError.reason: Meaning("NOT_FOUND", "NOT_FOUND", retry=False, query_failure=False),
    }
)
# A word this build does not know (a newer worker's): the query failed, nobody here knows why.
UNKNOWN_REASON = Meaning("INTERNAL", "INTERNAL", retry=False)


def meaning(reason: str) -> Meaning:
    """What ``reason`` means on each surface; ``UNKNOWN_REASON`` for a word not in ``REASONS``."""
    return REASONS.get(reason, UNKNOWN_REASON)


_QUERY_ERRORS: dict[str, type[QueryError]] = {
    cls.reason: cls
    for cls in (
        SqlError,
        QueryTimeoutError,
        MemoryLimitError,
        ResultLimitError,
        QueryCancelledError,
        WorkerShutdownError,
        WorkerDrainingError,
        QueryDeniedError,
        SandboxLostError,
        RunnerInvalidError,
    )
}


def first_domain_error(error: BaseException) -> BaseException:
    """The error to show for a failed ``TaskGroup``: its first duckcell error, else its
    first error (a plain exception is itself)."""
    if not isinstance(error, BaseExceptionGroup):
        return error
    found: BaseException = error.subgroup(lambda e: isinstance(e, DuckcellError)) or error
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


def query_error(reason: str, message: str) -> QueryError:
    """The ``QueryError`` for a ``reason`` that crossed the wire; unknown reasons keep theirs."""
    cls = _QUERY_ERRORS.get(reason)
    if cls is not None:
        return cls(message)
    error = QueryError(message)
    error.reason = reason or QueryError.reason
    return error


def reason_error(reason: str, message: str) -> DuckcellError:
    """The error for a failed call's ``reason`` (the ``Query`` service's trailing metadata):
    a session's, no worker's, else a query's (``query_error``)."""
    if reason == SessionError.reason:
        return SessionError(message)
    if reason == WorkerUnavailableError.reason:
        return WorkerUnavailableError(message)
    return query_error(reason, message)


_ENROLLMENT_ERRORS: dict[str, type[EnrollmentError]] = {
    cls.reason: cls
    for cls in (
        MalformedTokenError,
        UnknownTokenError,
        ExpiredTokenError,
        UsedTokenError,
        CaMismatchError,
        WorkerNameTakenError,
    )
}


def enrollment_error(reason: str, message: str) -> EnrollmentError:
    """The ``EnrollmentError`` for a refusal ``reason`` that crossed the wire."""
    return _ENROLLMENT_ERRORS.get(reason, EnrollmentError)(message)
