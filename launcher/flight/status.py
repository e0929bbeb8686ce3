"""duckcell's errors as the Flight statuses clients understand; the one place that knows both.

Only ``Flight*Error`` classes are raised to pyarrow.flight: any other exception (``ArrowInvalid``
for INVALID_ARGUMENT, ``NotImplementedError`` for UNIMPLEMENTED) reaches the client with the
server's Python traceback in its message, file paths included. So a SQL error, a refused or
unsupported request fail with ``FlightServerError`` (Flight's "failed", gRPC UNKNOWN) carrying
DuckDB's message or what to do, and a bug with ``FlightInternalError`` and a pointer to the log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pyarrow.flight as flight

from launcher.errors import (
    ApiKeyError,
    DuckcellError,
    QueryError,
    SessionError,
    WorkerUnavailableError,
)

from .messages import UnsupportedRequest

log = logging.getLogger(__name__)

# QueryError.reason -> what the client gets; anything else (sql, policy, memory,
# result_limit, capacity, cancelled) fails with FlightServerError and the message. Never
# FlightCancelledError: a pyarrow client raises KeyboardInterrupt for a CANCELLED status, and a
# client that cancelled itself is not listening any more anyway.
_BY_REASON: dict[str, type[flight.FlightError]] = {
    # A role refused: PERMISSION_DENIED (the client sees "Unauthorized" and the message).
    "denied": flight.FlightUnauthorizedError,
    "timeout": flight.FlightTimedOutError,
    "sandbox_lost": flight.FlightUnavailableError,
    "worker_shutdown": flight.FlightUnavailableError,
}


def flight_error(error: DuckcellError) -> flight.FlightError:
    """The exception a handler raises for ``error``."""
    if isinstance(error, WorkerUnavailableError):
        return flight.FlightUnavailableError(str(error))
    if isinstance(error, ApiKeyError):
        return flight.FlightUnauthenticatedError(str(error))
    if isinstance(error, QueryError):
        return _BY_REASON.get(error.reason, flight.FlightServerError)(str(error))
    if isinstance(error, SessionError):  # unknown or ended session: its message says what to do
        return flight.FlightServerError(str(error))
    return flight.FlightInternalError(str(error))


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise every exception of the block as a Flight status (see the module docstring)."""
    try:
        yield
    except flight.FlightError:
        raise
    except DuckcellError as error:
        raise flight_error(error) from None
    except UnsupportedRequest as error:
        raise flight.FlightServerError(str(error)) from None
    except Exception:
        log.exception("Flight SQL handler failed")
        raise flight.FlightInternalError(
            "internal error in the control plane's Flight SQL server; its log has the details"
        ) from None
