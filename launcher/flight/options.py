"""Flight session options: ``catalog`` and ``schema``, per connection.

``SetSessionOptions`` answers per option (the specification's ``SetSessionOptionsResult``): an
option this server does not know is INVALID_NAME, a value it cannot take INVALID_VALUE, and the
others are set; the call itself succeeds. ``GetSessionOptions`` answers the connection's
current values. What is accepted:

- the names clients are shown (catalog ``duckcell``, schema ``main``, ``listing.py``) on every
  connection: they are where statements already run, so nothing changes;
- in a session (``sessions.py``), any other catalog or schema the session's DuckDB has (a temp
  schema, an attached in-memory database): the server runs ``USE`` there, and DuckDB's refusal
  is INVALID_VALUE;
- on a per-query connection nothing else: a fresh sandbox per statement keeps no ``USE``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from launcher.controlplane.apikeys import ApiKey

from .connections import Connection
from .listing import CATALOG_NAME, SCHEMA_NAME
from .messages import INVALID_OPTION_NAME, INVALID_OPTION_VALUE

CATALOG, SCHEMA = "catalog", "schema"
DEFAULTS = {CATALOG: CATALOG_NAME, SCHEMA: SCHEMA_NAME}

# The database a session's statements run in before any USE (DuckDB's in-memory default); the
# catalog clients are shown, ``duckcell``, holds views of the catalog tables beside it.
SESSION_DATABASE = "memory"
# Runs a statement in the connection's session; raises DuckDB's error.
Use = Callable[[str], None]


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# Connections whose options are remembered: a client that sets options on every new
# connection and never closes one must not grow the table without end.
MAX_CONNECTIONS = 10_000


class SessionOptions:
    """Each connection's options, per API key (handler threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Per (key, connection), the most recently set last; the oldest are dropped past
        # MAX_CONNECTIONS (a connection that comes back then reads the defaults again).
        self._values: OrderedDict[tuple[str, str], dict[str, str]] = OrderedDict()

    def get(self, caller: ApiKey, connection: Connection | None) -> dict[str, str]:
        if connection is None:
            return dict(DEFAULTS)
        with self._lock:
            return {**DEFAULTS, **self._values.get((caller.key_id, connection.key), {})}

    def set(
        self,
        caller: ApiKey,
        connection: Connection | None,
        values: dict[str, object],
        use: Use | None,
    ) -> dict[str, int]:
        """Set what can be set; the error code of each option that cannot. ``use`` runs
        ``USE`` in the connection's session (``None``: it runs in no session)."""
        current = self.get(caller, connection)
        errors: dict[str, int] = {}
        for name, value in values.items():
            if name not in DEFAULTS:
                errors[name] = INVALID_OPTION_NAME
                continue
            wanted = DEFAULTS[name] if value is None else value
            if not isinstance(wanted, str) or not wanted:
                errors[name] = INVALID_OPTION_VALUE
                continue
            if wanted == DEFAULTS[name]:
                if current[name] != wanted and use is not None:
                    # Back home from another catalog or schema: the session's own database
                    # (its default schema), where statements ran before any USE.
                    home = (
                        quote(SESSION_DATABASE)
                        if name == CATALOG or current[CATALOG] == CATALOG_NAME
                        else quote(current[CATALOG])
                    )
                    try:
                        use(f"USE {home}.{quote(SCHEMA_NAME)}")
                    except Exception:  # DuckDB's refusal (the session detached its database)
                        errors[name] = INVALID_OPTION_VALUE
                        continue
                    if name == CATALOG:
                        current[SCHEMA] = SCHEMA_NAME
                current[name] = wanted
                continue
            if use is None:
                errors[name] = INVALID_OPTION_VALUE
                continue
            target = (
                quote(wanted)
                if name == CATALOG
                else f"{quote(current[CATALOG])}.{quote(wanted)}"
                if current[CATALOG] != CATALOG_NAME
                else quote(wanted)
            )
            try:
                use(f"USE {target}")
            except Exception:  # DuckDB's refusal: the value is not one the session has
                errors[name] = INVALID_OPTION_VALUE
                continue
            current[name] = wanted
        if connection is not None:
            with self._lock:
                self._values[(caller.key_id, connection.key)] = current
                self._values.move_to_end((caller.key_id, connection.key))
                while len(self._values) > MAX_CONNECTIONS:
                    self._values.popitem(last=False)
        return errors

    def forget(self, caller: ApiKey, connection: Connection) -> None:
        with self._lock:
            self._values.pop((caller.key_id, connection.key), None)
