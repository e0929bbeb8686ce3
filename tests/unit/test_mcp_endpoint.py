"""The MCP endpoint's guard, over real HTTP on loopback: keys, session ownership, listen rules.

No control plane is needed for these (nothing runs SQL): ``verify`` is a table of keys. The
whole endpoint with a control plane and a worker is ``tests/integration/test_mcp_http.py``.
"""

from __future__ import annotations

import socket

import httpx2
import pytest

from launcher.errors import ApiKeyError, ControlPlaneError
from launcher.mcp.endpoint import McpHttpEndpoint, check_listen
from launcher.mcp.server import ToolSettings
from tests.support.waiting import run

KEYS = {"dck_a_secret": "a", "dck_b_secret": "b"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


def _verify(key: str) -> str:
    if key not in KEYS:
        raise ApiKeyError("unknown API key: create one with `duckcell controlplane apikey create`")
    return KEYS[key]


def _endpoint(listen: str = "127.0.0.1:0") -> McpHttpEndpoint:
    return McpHttpEndpoint(
        listen,
        query_address="127.0.0.1:1",  # never dialled here
        ca_pem=b"",
        verify=_verify,
        tls=None,
        settings=ToolSettings(),
    )


def _headers(key: str, **extra: str) -> dict[str, str]:
    return {**ACCEPT, "Authorization": f"Bearer {key}", **extra}


def test_keys_are_checked_and_a_session_belongs_to_its_key() -> None:
    async def scenario() -> None:
        endpoint = _endpoint()
        await endpoint.start()
        try:
            async with httpx2.AsyncClient(timeout=30) as http:
                missing = await http.post(endpoint.url, json=INITIALIZE, headers=ACCEPT)
                assert missing.status_code == 401 and "no API key" in missing.json()["error"]
                wrong = await http.post(endpoint.url, json=INITIALIZE, headers=_headers("dck_x"))
                assert wrong.status_code == 401 and "unknown API key" in wrong.json()["error"]
                opened = await http.post(
                    endpoint.url, json=INITIALIZE, headers=_headers("dck_a_secret")
                )
                assert opened.status_code == 200
                session = opened.headers["mcp-session-id"]
                listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
                version = {"mcp-protocol-version": "2025-06-18", "mcp-session-id": session}
                own = await http.post(
                    endpoint.url, json=listing, headers=_headers("dck_a_secret", **version)
                )
                assert own.status_code == 200 and "run_sql" in own.text
                # Bound to key a from its opening: key b is told it does not exist.
                other = await http.post(
                    endpoint.url, json=listing, headers=_headers("dck_b_secret", **version)
                )
                assert other.status_code == 404
                ending = await http.delete(
                    endpoint.url, headers=_headers("dck_b_secret", **version)
                )
                assert ending.status_code == 404  # nor may it end it
                assert (
                    await http.post(
                        endpoint.url, json=listing, headers=_headers("dck_a_secret", **version)
                    )
                ).status_code == 200
                # A session id the guard never saw opened is unknown to every key.
                unknown = {**version, "mcp-session-id": "0123456789abcdef0123456789abcdef"}
                guessed = await http.post(
                    endpoint.url, json=listing, headers=_headers("dck_a_secret", **unknown)
                )
                assert guessed.status_code == 404
        finally:
            await endpoint.stop()

    run(scenario)


def test_a_sessionless_request_is_told_to_use_the_handshake() -> None:
    async def scenario() -> None:
        endpoint = _endpoint()
        await endpoint.start()
        try:
            async with httpx2.AsyncClient(timeout=30) as http:
                probe = {"jsonrpc": "2.0", "id": 7, "method": "server/discover", "params": {}}
                headers = _headers("dck_a_secret", **{"mcp-protocol-version": "2026-07-28"})
                answer = await http.post(endpoint.url, json=probe, headers=headers)
            error = answer.json()
            assert error["id"] == 7 and error["error"]["code"] == -32022
            assert "2025-06-18" in error["error"]["data"]["supported"]
        finally:
            await endpoint.stop()

    run(scenario)


def test_plaintext_only_on_loopback() -> None:
    assert check_listen("127.0.0.1:0", plaintext=True) == ("127.0.0.1", 0)
    assert check_listen("0.0.0.0:7444", plaintext=False) == ("0.0.0.0", 7444)
    with pytest.raises(ControlPlaneError, match="loopback only"):
        check_listen("0.0.0.0:7444", plaintext=True)


def test_a_port_in_use_is_one_clear_error() -> None:
    """uvicorn would sys.exit() from inside its task; the endpoint binds first and says why."""

    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            with pytest.raises(ControlPlaneError, match="is the port in use"):
                await _endpoint(f"127.0.0.1:{port}").start()

    run(scenario)
