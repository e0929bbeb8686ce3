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
pyarrow's server, which appends their traceback to the message ("<message>. Detail: Python
exception: Traceback ...") with no way to turn it off. The message still comes first, and
``handler`` and ``streamed`` raise them afresh at the handler's edge, so that traceback is one
frame of pyarrow's and one of this module's, never the handler's internals. RESOURCE_EXHAUSTED
and FAILED_PRECONDITION cannot be sent at all: a per-key limit (``LimitReached``) is
UNAVAILABLE, the code clients already retry with backoff, and its message says what to close;
a query over its memory or result limit fails the same way each time, so it is UNKNOWN with the
executor's message (what to change).

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
    """Raise every exception of the block as its status (``status_of``); Flight's pass.

    A class, not a generator: raising from ``__exit__`` keeps contextlib's frames out of the
    traceback pyarrow appends to INVALID_ARGUMENT, NOT_FOUND and UNIMPLEMENTED messages.
    """

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


def handler(method: Callable[P, R]) -> Callable[P, R]:
    """A Flight handler whose plain statuses leave with a one-frame traceback (module docstring)."""

    @functools.wraps(method)
    def answer(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except PLAIN_STATUSES as status:
            raise status.with_traceback(None) from None

    return answer


def streamed(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches`` for a ``GeneratorStream``, its plain statuses cut as ``handler`` cuts them."""
    try:
        yield from batches
    except PLAIN_STATUSES as status:
        raise status.with_traceback(None) from None
