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
        # The catalog first, whatever order the client sent: a schema is one of the catalog's.
        for name, value in sorted(values.items(), key=lambda item: item[0] != CATALOG):
            if name not in DEFAULTS:
                errors[name] = INVALID_OPTION_NAME
                continue
            wanted = DEFAULTS[name] if value is None else value
            if not isinstance(wanted, str) or not wanted:
                errors[name] = INVALID_OPTION_VALUE
                continue
            if wanted == current[name]:
                continue
            if use is None:  # no session: only the defaults, which are in force already
                errors[name] = INVALID_OPTION_VALUE
                continue
            # Always fully qualified: a bare name is a database first to DuckDB's USE.
            catalog = wanted if name == CATALOG else current[CATALOG]
            schema = SCHEMA_NAME if name == CATALOG else wanted
            try:
                use(f"USE {quote(_database(catalog))}.{quote(schema)}")
            except Exception:  # DuckDB's refusal: the value is not one the session has
                errors[name] = INVALID_OPTION_VALUE
                continue
            current[CATALOG], current[SCHEMA] = catalog, schema
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


def _database(catalog: str) -> str:
    """The DuckDB database of a catalog name: ``duckcell`` (what clients are shown) is where a
    session's statements run before any USE, the session's own database."""
    return SESSION_DATABASE if catalog == CATALOG_NAME else catalog
