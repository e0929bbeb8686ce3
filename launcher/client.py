"""A client of the control plane's ``Query`` service: run SQL on some worker, get Arrow back.

The control plane's enrollment port serves ``Query.Run`` over server-authenticated TLS; the
client verifies it against the CA (``duckcell controlplane ca``) and authenticates with an API
key in the ``authorization`` metadata. gRPC statuses are translated here: a failed query raises
the same ``QueryError`` subclass a local run would (its ``reason`` travels as trailing
metadata), a refused key ``ApiKeyError``, no or a lost worker ``WorkerUnavailableError`` (its
reason travels too), an unknown, ended or refused session ``SessionError``, and an UNAVAILABLE
without a reason (gRPC's own: no connection, or it dropped) ``ControlPlaneUnreachableError``.

Sessions (``open_session``, ``table(..., session_id=)``, ``close_session``) run every query of
the session in one sandbox on one worker, so temp tables survive between them; the session
belongs to the API key that opened it. ``tables`` lists the catalog tables the key's role may
read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pyarrow as pa
import pyarrow.ipc
from grpc import aio

from .errors import (
    ApiKeyError,
    ControlPlaneUnreachableError,
    DuckcellError,
    RemoteQueryError,
    reason_error,
)
from .link.wire import MESSAGE_OPTIONS, REASON_KEY
from .protocol import controlplane_pb2 as pb
from .protocol import controlplane_pb2_grpc as pb_grpc


@dataclass(frozen=True, slots=True)
class CatalogTable:
    """A table the caller's role may read: its name, format and connection's name."""

    name: str
    format: str
    connection: str


class ControlPlaneClient:
    """``async with ControlPlaneClient(address, api_key, ca_pem) as client``, then ``chunks``."""

    def __init__(self, address: str, api_key: str, ca_pem: bytes) -> None:
        self._address = address
        self._metadata = (("authorization", f"Bearer {api_key.strip()}"),)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        self._channel = aio.secure_channel(address, credentials, MESSAGE_OPTIONS)
        self._stub = pb_grpc.QueryStub(self._channel)

    async def chunks(
        self,
        sql: str,
        policy: str = "",
        *,
        timeout_s: float | None = None,
        session_id: str = "",
    ) -> AsyncIterator[bytes]:
        """The result's Arrow IPC stream bytes as they arrive; raises ``DuckcellError``s.
        With ``session_id`` the query runs in that session (its policy applies)."""
        request = pb.QueryRequest(sql=sql, policy=policy, session_id=session_id)
        call = self._stub.Run(request, metadata=self._metadata, timeout=timeout_s)
        finished = False
        try:
            async for chunk in call:
                if chunk.ipc:
                    yield chunk.ipc
                if chunk.HasField("outcome"):
                    # The outcome is the last message and says the query succeeded: waiting
                    # for the call's own end as well cost ~1.5 ms of SELECT 42 here (one more
                    # wake-up of each process); the cancel below then ends a finished call.
                    finished = True
                    break
        except aio.AioRpcError as error:
            raise self._translate(error) from None
        finally:
            call.cancel()  # a no-op when finished; stops the query when the caller left early
        if not finished:
            raise RemoteQueryError(
                f"control plane {self._address} ended the result without an outcome: run it again"
            )

    async def table(
        self,
        sql: str,
        policy: str = "",
        *,
        timeout_s: float | None = None,
        session_id: str = "",
    ) -> pa.Table:
        """Run ``sql`` and decode its whole result (the CLI; tests)."""
        chunks = self.chunks(sql, policy, timeout_s=timeout_s, session_id=session_id)
        parts = [chunk async for chunk in chunks]
        return pa.ipc.open_stream(b"".join(parts)).read_all()

    async def open_session(
        self, policy: str = "agent-session", *, timeout_s: float | None = None
    ) -> str:
        """Open a session of a session policy on some worker; returns its id."""
        request = pb.OpenSessionRequest(policy=policy)
        try:
            reply = await self._stub.OpenSession(
                request, metadata=self._metadata, timeout=timeout_s
            )
        except aio.AioRpcError as error:
            raise self._translate(error) from None
        return reply.session_id

    async def close_session(self, session_id: str, *, timeout_s: float | None = None) -> None:
        """Close the session and destroy its sandbox; an ended one closes quietly."""
        request = pb.CloseSessionRequest(session_id=session_id)
        try:
            await self._stub.CloseSession(request, metadata=self._metadata, timeout=timeout_s)
        except aio.AioRpcError as error:
            raise self._translate(error) from None

    async def tables(self, *, timeout_s: float | None = None) -> list[CatalogTable]:
        """The catalog tables this key's role may read, by name."""
        try:
            reply = await self._stub.ListTables(
                pb.ListTablesRequest(), metadata=self._metadata, timeout=timeout_s
            )
        except aio.AioRpcError as error:
            raise self._translate(error) from None
        return [CatalogTable(t.name, t.format, t.connection) for t in reply.tables]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> ControlPlaneClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _translate(self, error: aio.AioRpcError) -> DuckcellError:
        code = error.code()
        details = error.details() or code.name
        reason = dict(error.trailing_metadata() or ()).get(REASON_KEY)
        if reason:
            return reason_error(str(reason), details)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ApiKeyError(details)
        if code == grpc.StatusCode.UNAVAILABLE:
            return ControlPlaneUnreachableError(
                f"no answer from the control plane at {self._address} ({details}): check the "
                "address, the CA file, and that it is running"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RemoteQueryError(f"no complete answer from {self._address} in time: {details}")
        return RemoteQueryError(f"control plane {self._address}: {code.name}: {details}")
