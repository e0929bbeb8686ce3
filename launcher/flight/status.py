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

Which status a query's error is sent as is its reason's row of ``launcher.errors.REASONS``
(``flight_status``), the same table the ``Query`` service reads: both surfaces agree.
RESOURCE_EXHAUSTED and FAILED_PRECONDITION cannot be sent at all: a per-key limit
(``LimitReached``) and a full pool (reason "capacity") are UNAVAILABLE, the code clients
already retry with backoff, and the message says what to close or when to retry; a query over
its memory or result limit fails the same way each time, so it is UNKNOWN with the executor's
message (what to change).

pyarrow's own client raises ``KeyboardInterrupt`` (not ``FlightCancelledError``) when a stream it
reads with ``read_all`` ends CANCELLED; ADBC reports CANCELLED. The server sends CANCELLED only
for a query cancelled on the worker or by the client itself; the server stopping is UNAVAILABLE.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType, TracebackType
from typing import ParamSpec, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from launcher.errors import (
    ApiKeyError,
    DuckcellError,
    QueryError,
    SessionError,
    WorkerUnavailableError,
    meaning,
)

from .connections import ConnectionRefused, SessionRequired
from .messages import InvalidRequest, UnsupportedRequest
from .statements import LimitReached, UnknownHandle

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
Status = Callable[[str], Exception]
# Statuses pyarrow sends as Python exceptions, with their traceback (see the module docstring).
PLAIN_STATUSES = (pa.ArrowInvalid, pa.ArrowKeyError, pa.ArrowNotImplementedError)

# Each status a handler can send, by its gRPC name, and what the handler raises for it.
SENDABLE: Mapping[str, Status] = MappingProxyType(
    {
        "UNAUTHENTICATED": flight.FlightUnauthenticatedError,
        "PERMISSION_DENIED": flight.FlightUnauthorizedError,
        "DEADLINE_EXCEEDED": flight.FlightTimedOutError,
        "CANCELLED": flight.FlightCancelledError,
        "UNAVAILABLE": flight.FlightUnavailableError,
        "UNKNOWN": flight.FlightServerError,
        "INTERNAL": flight.FlightInternalError,
        "INVALID_ARGUMENT": pa.ArrowInvalid,
        "NOT_FOUND": pa.ArrowKeyError,
        "UNIMPLEMENTED": pa.ArrowNotImplementedError,
    }
)

# Errors that carry an outcome reason: their status is the reason's ``flight_status``
# (``launcher.errors.REASONS``, the table the ``Query`` service's statuses come from too).
REASONED = (QueryError, SessionError, WorkerUnavailableError)

# The status of each other error a handler may meet; the first class an error is an instance
# of decides, so subclasses come before their bases.
STATUSES: tuple[tuple[type[Exception], Status], ...] = (
    (ApiKeyError, flight.FlightUnauthenticatedError),
    # The Flight surface's own: a stale handle, a per-key limit, a request it cannot serve.
    (UnknownHandle, pa.ArrowKeyError),
    (LimitReached, flight.FlightUnavailableError),
    (InvalidRequest, pa.ArrowInvalid),
    (SessionRequired, pa.ArrowInvalid),
    (ConnectionRefused, flight.FlightUnauthorizedError),
    (UnsupportedRequest, pa.ArrowNotImplementedError),
)


def status_of(error: Exception) -> Exception:
    """The exception a handler raises for ``error``: its status, with ``str(error)``."""
    if isinstance(error, REASONED):
        return SENDABLE[meaning(error.reason).flight_status](str(error))
    for cls, status in STATUSES:
        if isinstance(error, cls):
            return status(str(error))
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
