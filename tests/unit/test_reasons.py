"""One vocabulary of outcome reasons (``launcher.errors.REASONS``), and the tables derived from
it: every reason a class carries has its row, the control plane's ``Query`` service and its
Flight SQL surface send each reason as the same status (or, where Flight SQL cannot send that
one, the stand-in that tells a client the same thing: retry or not), and exit codes follow."""

from __future__ import annotations

import grpc
import pytest

from launcher.controlplane.query import status_of as query_status
from launcher.errors import (
    CAPACITY_REASON,
    POLICY_REASON,
    REASONS,
    UNKNOWN_REASON,
    WORKER_ERROR_REASON,
    QueryError,
    SessionError,
    StatementTextError,
    WorkerDrainingError,
    WorkerUnavailableError,
    meaning,
    reason_error,
)
from launcher.flight.status import SENDABLE
from launcher.flight.status import status_of as flight_status_of

FLIGHT_NAME = {status: name for name, status in SENDABLE.items()}


def query_error_classes(root: type[QueryError] = QueryError) -> list[type[QueryError]]:
    found = [root]
    for sub in root.__subclasses__():
        found += query_error_classes(sub)
    return found


def flight_status(reason: str) -> str:
    """The gRPC status name Flight SQL sends for an error with ``reason``."""
    return FLIGHT_NAME[type(flight_status_of(reason_error(reason, "it failed")))]


# Every word that crosses the wire: each class's own, and those only a worker's Outcome carries.
WORDS = sorted(
    {cls.reason for cls in query_error_classes()}
    | {SessionError.reason, WorkerUnavailableError.reason}
    | {POLICY_REASON, CAPACITY_REASON, WORKER_ERROR_REASON}
)


@pytest.mark.parametrize("cls", query_error_classes(), ids=lambda cls: cls.__name__)
def test_every_query_error_reason_has_a_meaning(cls: type[QueryError]) -> None:
    assert cls.reason in REASONS


def test_every_reason_in_the_table_is_a_word_that_crosses_the_wire() -> None:
    assert sorted(REASONS) == WORDS


@pytest.mark.parametrize("reason", WORDS)
def test_both_surfaces_send_a_reason_as_the_same_status(reason: str) -> None:
    meant = REASONS[reason]
    on_query, on_flight = query_status(reason).name, flight_status(reason)
    assert (on_query, on_flight) == (meant.status, meant.flight_status)
    if on_query in SENDABLE:
        assert on_flight == on_query
    else:  # RESOURCE_EXHAUSTED, FAILED_PRECONDITION: the stand-in says retry or not
        assert on_flight == ("UNAVAILABLE" if meant.retry else "UNKNOWN")
    # UNAVAILABLE, the status clients retry on, on either surface means retrying can help.
    assert (on_flight == "UNAVAILABLE") == meant.retry
    assert on_query != "UNAVAILABLE" or meant.retry


def test_a_draining_worker_is_unavailable_on_both_surfaces() -> None:
    reason = WorkerDrainingError.reason
    assert (query_status(reason), flight_status(reason)) == (
        grpc.StatusCode.UNAVAILABLE,
        "UNAVAILABLE",
    )


def test_an_unknown_word_is_internal_on_both_surfaces() -> None:
    assert meaning("from_a_newer_worker") is UNKNOWN_REASON
    assert query_status("from_a_newer_worker") == grpc.StatusCode.INTERNAL
    assert flight_status("from_a_newer_worker") == "INTERNAL"


@pytest.mark.parametrize("reason", WORDS)
def test_a_reason_comes_back_as_an_error_with_that_reason_and_exit_code(reason: str) -> None:
    error = reason_error(reason, "it failed")
    assert getattr(error, "reason", None) == reason
    assert error.exit_code == REASONS[reason].exit_code


@pytest.mark.parametrize("cls", query_error_classes(), ids=lambda cls: cls.__name__)
def test_a_query_error_exits_as_its_reason_says(cls: type[QueryError]) -> None:
    # StatementTextError is the caller's input refused where it enters (its docstring).
    expected = 2 if cls is StatementTextError else REASONS[cls.reason].exit_code
    assert cls("it failed").exit_code == expected


def test_only_a_session_is_not_the_querys_failure() -> None:
    assert [r for r, meant in REASONS.items() if not meant.query_failure] == [SessionError.reason]
