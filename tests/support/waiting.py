"""Wait on state, never on the clock: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

DEADLINE_S = 10.0
_POLL_S = 0.01


async def eventually(
    condition: Callable[[], bool], what: str = "the condition", deadline_s: float = DEADLINE_S
) -> None:
    """Return once ``condition()`` is true; fail the test, naming ``what``, after the deadline.

    The poll interval is short and only bounds how soon a change is seen, never what a test
    asserts.
    """
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {deadline_s:g} s")
        await asyncio.sleep(_POLL_S)


def run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout_s: float = 30.0) -> None:
    """Run a test's async ``scenario`` on a new loop; a hang fails it after ``timeout_s``."""
    asyncio.run(asyncio.wait_for(scenario(), timeout=timeout_s))
