"""The client-facing query service: ``Query.Run`` on the enrollment (server-TLS) port.

Each call is authenticated by the API key in its ``authorization: Bearer <key>`` metadata, then
handed to the ``QueryRouter``; the worker's Arrow IPC bytes are written to the client as they
arrive. The router's errors become gRPC statuses here, the one place that knows both; the
trailing metadata ``duckcell-reason`` carries ``QueryError.reason`` (and
``WorkerUnavailableError.reason``) so the client can raise the same error class a local query
would. A statement with a NUL byte is refused before the router sees it (``launcher.inputs``);
one that is not UTF-8 never reaches ``Run``: protobuf's parse fails in gRPC (UNKNOWN).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc import aio

from launcher.errors import (
    ApiKeyError,
    QueryError,
    SessionError,
    StatementTextError,
    WorkerUnavailableError,
    meaning,
)
from launcher.inputs import check_statement_text
from launcher.model.catalog import Catalog
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc

from ..link.wire import REASON_KEY
from .access import visible_tables
from .apikeys import ApiKey, ApiKeys
from .routing import QueryDone, QueryRouter, WholeResult

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "Bearer "


def status_of(reason: str) -> grpc.StatusCode:
    """The ``Query`` service's status for a call that failed with ``reason``: its row of
    ``launcher.errors.REASONS`` (INTERNAL for a word not there)."""
    return grpc.StatusCode[meaning(reason).status]


class QueryService(pb_grpc.QueryServicer):
    """``catalog`` (the current one) answers ``ListTables``; without it the list is empty."""

    def __init__(
        self,
        api_keys: ApiKeys,
        router: QueryRouter,
        *,
        catalog: Callable[[], Catalog] | None = None,
    ) -> None:
        self._api_keys = api_keys
        self._router = router
        self._catalog = catalog

    async def Run(  # the generated servicer's method name
        self, request: pb.QueryRequest, context: aio.ServicerContext[pb.QueryRequest, pb.QueryChunk]
    ) -> None:
        caller = await self._authenticate(context)
        try:
            check_statement_text(request.sql)  # a NUL: before the router keeps or parses it
        except StatementTextError as error:
            await _fail(context, error)
        log.info("query from key %s (%s)", caller.key_id, caller.role)
        run = self._router.run(
            request.sql,
            request.policy,
            caller=caller_name(caller),
            role=caller.role,
            session_id=request.session_id,
        )
        try:
            # aclosing: when this call is cancelled the router's cleanup cancels the query.
            async with contextlib.aclosing(run) as items:
                whole = b""
                async for item in items:
                    if isinstance(item, QueryDone):
                        outcome = pb.Outcome(ok=True, rows=item.rows)
                        await context.write(pb.QueryChunk(ipc=whole, outcome=outcome))
                    elif isinstance(item, WholeResult):
                        whole = item  # only its outcome follows: sent in one message with it
                    else:
                        await context.write(pb.QueryChunk(ipc=item))
        except (WorkerUnavailableError, QueryError, SessionError) as error:
            await _fail(context, error)

    async def OpenSession(  # the generated servicer's method name
        self, request: pb.OpenSessionRequest, context: aio.ServicerContext
    ) -> pb.OpenSessionReply:
        caller = await self._authenticate(context)
        try:
            # The owner is the caller's name, the router's default owner of a session's
            # queries, so the Flight SQL surface shares sessions' rules without passing it.
            session_id = await self._router.open_session(
                request.policy, owner=caller_name(caller), role=caller.role
            )
        except (WorkerUnavailableError, QueryError, SessionError) as error:
            # Here a SessionError is the worker's refusal (say, not a session policy).
            await _fail(context, error, session_code=grpc.StatusCode.FAILED_PRECONDITION)
        return pb.OpenSessionReply(session_id=session_id)

    async def CloseSession(  # the generated servicer's method name
        self, request: pb.CloseSessionRequest, context: aio.ServicerContext
    ) -> pb.CloseSessionReply:
        caller = await self._authenticate(context)
        try:
            await self._router.close_session(request.session_id, owner=caller_name(caller))
        except SessionError as error:
            await _fail(context, error)
        return pb.CloseSessionReply()

    async def ListTables(  # the generated servicer's method name
        self, request: pb.ListTablesRequest, context: aio.ServicerContext
    ) -> pb.ListTablesReply:
        """The tables the caller's role may read (none for a role the catalog does not define),
        as ``access.visible_tables`` gives them to Flight SQL's metadata."""
        caller = await self._authenticate(context)
        if self._catalog is None:
            return pb.ListTablesReply()
        tables = visible_tables(self._catalog(), caller.role)
        return pb.ListTablesReply(
            tables=[
                pb.CatalogTable(name=t.name, format=t.format, connection=t.connection)
                for t in tables
            ]
        )

    async def _authenticate(self, context: aio.ServicerContext) -> ApiKey:
        metadata = dict(context.invocation_metadata() or ())
        header = str(metadata.get(AUTHORIZATION, ""))
        try:
            if not header.startswith(BEARER):
                raise ApiKeyError(
                    "no API key: send metadata 'authorization: Bearer <key>' "
                    "(`duckcell query --api-key KEY`)"
                )
            return self._api_keys.verify(header.removeprefix(BEARER))
        except ApiKeyError as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        raise AssertionError("unreachable: abort raises")


async def _fail(
    context: aio.ServicerContext,
    error: WorkerUnavailableError | QueryError | SessionError,
    *,
    session_code: grpc.StatusCode | None = None,
) -> None:
    """End the call with the status for ``error``'s reason (``status_of``), and the reason as
    trailing metadata so the client raises the same class; for a WorkerUnavailableError it tells
    the client that this UNAVAILABLE is about the query, not the connection. ``session_code``
    overrides a SessionError's status (OpenSession: the worker refused the session)."""
    code = status_of(error.reason)
    if isinstance(error, SessionError) and session_code is not None:
        code = session_code
    await context.abort(code, str(error), trailing_metadata=((REASON_KEY, error.reason),))


def caller_name(key: ApiKey) -> str:
    """How the audit log names an API key's caller: ``<key id>/<role>``."""
    return f"{key.key_id}/{key.role}"
