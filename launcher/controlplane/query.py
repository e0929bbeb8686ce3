"""The client-facing query service: ``Query.Run`` on the enrollment (server-TLS) port.

Each call is authenticated by the API key in its ``authorization: Bearer <key>`` metadata, then
handed to the ``QueryRouter``; the worker's Arrow IPC bytes are written to the client as they
arrive. The router's errors become gRPC statuses here, the one place that knows both; the
trailing metadata ``duckcell-reason`` carries ``QueryError.reason`` so the client can raise the
same error class a local query would.
"""

from __future__ import annotations

import contextlib
import logging

import grpc
from grpc import aio

from launcher.errors import ApiKeyError, QueryError, WorkerUnavailableError
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc

from .apikeys import ApiKey, ApiKeys
from .routing import QueryDone, QueryRouter
from .wire import REASON_KEY

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
BEARER = "Bearer "

# QueryError.reason -> the status a client sees; anything else is INTERNAL.
STATUS_BY_REASON = {
    "sql": grpc.StatusCode.INVALID_ARGUMENT,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "memory": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "result_limit": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "sandbox_lost": grpc.StatusCode.UNAVAILABLE,
    "policy": grpc.StatusCode.INVALID_ARGUMENT,
    "capacity": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "error": grpc.StatusCode.FAILED_PRECONDITION,
}


class QueryService(pb_grpc.QueryServicer):
    def __init__(self, api_keys: ApiKeys, router: QueryRouter) -> None:
        self._api_keys = api_keys
        self._router = router

    async def Run(  # the generated servicer's method name
        self, request: pb.QueryRequest, context: aio.ServicerContext[pb.QueryRequest, pb.QueryChunk]
    ) -> None:
        caller = await self._authenticate(context)
        log.info("query from key %s (%s)", caller.key_id, caller.role)
        try:
            # aclosing: when this call is cancelled the router's cleanup cancels the query.
            async with contextlib.aclosing(self._router.run(request.sql, request.policy)) as items:
                async for item in items:
                    if isinstance(item, QueryDone):
                        outcome = pb.Outcome(ok=True, rows=item.rows)
                        await context.write(pb.QueryChunk(outcome=outcome))
                    else:
                        await context.write(pb.QueryChunk(ipc=item))
        except WorkerUnavailableError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        except QueryError as error:
            code = STATUS_BY_REASON.get(error.reason, grpc.StatusCode.INTERNAL)
            await context.abort(code, str(error), trailing_metadata=((REASON_KEY, error.reason),))

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
