"""The Flight SQL key check's short cache: fewer hops to the loop, revocation still bounded.

Pure logic over a stand-in bridge (the real one hops to the control plane's loop; its use is
covered by every Flight test): a clock the test moves and a verify function that counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pyarrow.flight as flight
import pytest

from launcher.controlplane.apikeys import ApiKey
from launcher.errors import ApiKeyError
from launcher.flight.auth import ApiKeyMiddlewareFactory

KEY = "dck1.0123456789abcdef." + "a" * 43


class _Bridge:
    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run(coroutine)


def test_a_verified_key_is_reused_for_a_few_seconds_then_checked_again() -> None:
    now = [100.0]
    known = {KEY: ApiKey("0123456789abcdef", "analyst")}
    asked: list[str] = []

    async def verify(key: str) -> ApiKey:
        asked.append(key)
        if key not in known:
            raise ApiKeyError("unknown API key")
        return known[key]

    factory = ApiKeyMiddlewareFactory(
        _Bridge(),  # type: ignore[arg-type]
        verify,
        cache_s=5.0,
        clock=lambda: now[0],
    )
    assert factory._check(KEY).role == "analyst"
    now[0] += 4.9
    assert factory._check(KEY).role == "analyst"
    assert len(asked) == 1  # the second call never left the handler's thread
    del known[KEY]  # revoked
    now[0] += 0.2
    with pytest.raises(flight.FlightUnauthenticatedError, match="unknown API key"):
        factory._check(KEY)
    with pytest.raises(flight.FlightUnauthenticatedError):
        factory._check(KEY)
    assert len(asked) == 3  # refusals are never cached
