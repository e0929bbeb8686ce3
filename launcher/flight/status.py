"""duckcell's errors as the gRPC statuses Flight SQL clients act on; the one place that knows both.

pyarrow.flight picks a call's gRPC status from the exception its handler raises, and only these
statuses can be sent (``tests/unit/test_flight_status.py`` checks each, with the ADBC driver and
pyarrow's client):

    handler raises               gRPC status         ADBC dbapi error, adbc status
    FlightUnauthenticatedError   UNAUTHENTICATED     ProgrammingError, UNAUTHENTICATED
    FlightUnauthorizedError      PERMISSION_DENIED   ProgrammingError, UNAUTHORIZED
    FlightTimedOutError          DEADLINE_EXCEEDED   OperationalError, TIMEOUT
    FlightCancelledError         CANCELLED           OperationalError, CANCELLED
    FlightUnavailableError       UNAVAILABLE         OperationalError, IO
    FlightServerError            UNKNOWN             OperationalError, UNKNOWN
    FlightInternalError          INTERNAL            InternalError, INTERNAL
    pa.ArrowInvalid              INVALID_ARGUMENT    ProgrammingError, INVALID_ARGUMENT
    pa.ArrowKeyError             NOT_FOUND           ProgrammingError, NOT_FOUND
    pa.ArrowNotImplementedError  UNIMPLEMENTED       NotSupportedError, NOT_IMPLEMENTED

A ``Flight*Error`` carries exactly its message. The last three are plain Python exceptions to
pyarrow's server, which appends a rendering of them to the message and to the
``x-arrow-status-detail-bin`` trailer, by default their traceback with the server's file paths
("<message>. Detail: Python exception: Traceback ... File ".../launcher/flight/...""), with no
option to turn it off (apache/arrow#34251). So a client never sees one: ``handler`` and
``streamed`` wrap every handler (and the auth middleware) and send each error as ``sendable``
makes it, its status and message only. A plain status leaves as a fresh ``InvalidArgument``,
``NotFound`` or ``Unimplemented`` carrying a note no UTF-8 encoder takes (a lone surrogate):
pyarrow's renderer (``PythonErrorDetail::ToString``) then fails to encode the formatted lines
and falls back to the class name, so the client reads "<message>. Detail: Python exception:
InvalidArgument" (``tests/unit/test_flight_input.py`` checks it with the ADBC driver). Any
other exception is ``status_of``'s: logged here with its traceback, sent as its status.

RESOURCE_EXHAUSTED and FAILED_PRECONDITION cannot be sent at all: a per-key limit
(``LimitReached``) is UNAVAILABLE, the code clients already retry with backoff, and its message
says what to close; a query over its memory or result limit fails the same way each time, so it
is UNKNOWN with the executor's message (what to change).

pyarrow's own client raises ``KeyboardInterrupt`` (not ``FlightCancelledError``) when a stream it
reads with ``read_all`` ends CANCELLED; ADBC reports CANCELLED. The server sends CANCELLED only
for a query cancelled on the worker or by the client itself; the server stopping is UNAVAILABLE.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import ParamSpec, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from launcher.errors import (
    ApiKeyError,
    DuckcellError,
    MemoryLimitError,
    QueryCancelledError,
    QueryDeniedError,
    QueryError,
    QueryTimeoutError,
    ResultLimitError,
    RunnerInvalidError,
    SandboxLostError,
    SessionError,
    SqlError,
    WorkerShutdownError,
    WorkerUnavailableError,
)

from .messages import InvalidRequest, UnsupportedRequest
from .statements import LimitReached, UnknownHandle

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
Status = Callable[[str], Exception]
# Statuses pyarrow sends as Python exceptions, with their traceback (see the module docstring).
PLAIN_STATUSES = (pa.ArrowInvalid, pa.ArrowKeyError, pa.ArrowNotImplementedError)

# The status of each error a handler may meet; the first class an error is an instance of
# decides, so subclasses come before their bases.
STATUSES: tuple[tuple[type[Exception], Status], ...] = (
    # The query: DuckDB refused it (fix the SQL), the role may not read it, it ran too long.
    (SqlError, pa.ArrowInvalid),
    (QueryDeniedError, flight.FlightUnauthorizedError),
    (QueryTimeoutError, flight.FlightTimedOutError),
    (QueryCancelledError, flight.FlightCancelledError),
    # Retrying can help: the worker or its sandbox went away, another one may take it.
    (WorkerShutdownError, flight.FlightUnavailableError),
    # ...but not when the runner sent a malformed result: the query may be the exploit.
    (RunnerInvalidError, flight.FlightInternalError),
    (SandboxLostError, flight.FlightUnavailableError),
    (WorkerUnavailableError, flight.FlightUnavailableError),
    # Retrying the same query fails the same way; the message says what to change.
    (MemoryLimitError, flight.FlightServerError),
    (ResultLimitError, flight.FlightServerError),
    # Unknown, ended (or unopenable) session; the next call with its name opens a new one.
    (SessionError, pa.ArrowKeyError),
    (ApiKeyError, flight.FlightUnauthenticatedError),
    # The Flight surface's own: a stale handle, a per-key limit, a request it cannot serve.
    (UnknownHandle, pa.ArrowKeyError),
    (LimitReached, flight.FlightUnavailableError),
    (InvalidRequest, pa.ArrowInvalid),
    (UnsupportedRequest, pa.ArrowNotImplementedError),
)

# A ``QueryError`` whose reason has no class (it only crosses the wire from a worker).
BY_REASON: dict[str, Status] = {
    "capacity": flight.FlightUnavailableError,  # every sandbox stayed busy: retry later
}


def status_of(error: Exception) -> Exception:
    """The exception a handler raises for ``error``: its status, with ``str(error)``."""
    for cls, status in STATUSES:
        if isinstance(error, cls):
            return status(str(error))
    if isinstance(error, QueryError):
        return BY_REASON.get(error.reason, flight.FlightServerError)(str(error))
    if isinstance(error, DuckcellError):
        return flight.FlightInternalError(str(error))
    log.error("Flight SQL handler failed", exc_info=error)
    return flight.FlightInternalError(
        "internal error in the control plane's Flight SQL server; its log has the details"
    )


class translated:  # a class named like a function: used as ``with translated():``
    """Raise every exception of the block as its status (``status_of``); Flight's pass."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if isinstance(error, Exception) and not isinstance(error, flight.FlightError):
            raise status_of(error) from None
        return False


class InvalidArgument(pa.ArrowInvalid):
    """INVALID_ARGUMENT as sent: its class name is what a client reads after the message."""


class NotFound(pa.ArrowKeyError):
    """NOT_FOUND as sent."""


class Unimplemented(pa.ArrowNotImplementedError):
    """UNIMPLEMENTED as sent."""


# Each plain status and the class it is sent as.
SENT_AS: tuple[tuple[type[Exception], type[Exception]], ...] = (
    (pa.ArrowInvalid, InvalidArgument),
    (pa.ArrowKeyError, NotFound),
    (pa.ArrowNotImplementedError, Unimplemented),
)
# A lone surrogate: no formatted line holding it encodes to UTF-8 (module docstring).
_UNRENDERABLE_NOTE = "\udc80"


def sendable(error: Exception) -> Exception:
    """``error`` as a handler raises it so that the client gets its status and message only
    (module docstring): a Flight error as it is, a plain status bare, anything else through
    ``status_of`` (which logs what it does not know)."""
    if isinstance(error, flight.FlightError):
        return error
    status = error if isinstance(error, PLAIN_STATUSES) else status_of(error)
    for plain, sent_as in SENT_AS:
        if isinstance(status, plain):
            bare = sent_as(str(status))
            bare.add_note(_UNRENDERABLE_NOTE)
            return bare
    return status


def handler(method: Callable[P, R]) -> Callable[P, R]:
    """A Flight handler (or middleware hook) whose every error leaves ``sendable``."""

    @functools.wraps(method)
    def answer(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except Exception as error:
            raise sendable(error) from None

    return answer


def streamed(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches`` for a ``GeneratorStream``, whose errors leave ``sendable`` too."""
    try:
        yield from batches
    except Exception as error:
        raise sendable(error) from None
