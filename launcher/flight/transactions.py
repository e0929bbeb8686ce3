"""Flight SQL transactions: ``BEGIN`` / ``COMMIT`` / ``ROLLBACK`` in a connection's session.

A transaction needs a session: ``BeginTransaction`` runs ``BEGIN TRANSACTION`` in the
connection's session sandbox and answers a fresh transaction id; statements of that connection
then run inside it (they share the session's DuckDB connection, whatever transaction id they
carry); ``EndTransaction`` runs ``COMMIT`` or ``ROLLBACK``. On a per-query connection every
statement runs in a fresh sandbox, so nothing outlives it: ``BeginTransaction`` is refused
(UNIMPLEMENTED) with that reason, and SqlInfo tells such a caller transactions are not
supported. One transaction per connection at a time, as in DuckDB.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

from launcher.controlplane.apikeys import ApiKey

from .connections import Connection
from .messages import InvalidRequest
from .statements import UnknownHandle

NO_TRANSACTIONS = (
    "transactions need a session, and role {role!r} runs each statement in a fresh sandbox "
    "that ends with it (nothing outlives a statement): use a role whose policy is "
    "session-mode, or name a session with the header x-duckcell-session: <name>"
)
ALREADY_OPEN = "this connection already has a transaction open: commit or roll it back first"
UNKNOWN_TRANSACTION = "unknown transaction (ended, or begun on another connection): begin a new one"


# Open transactions remembered at once (one per connection at most).
MAX_OPEN = 10_000


class Transactions:
    """The open transaction id of each connection, per API key (handler threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Bounded like the connections' other tables: past MAX_OPEN the oldest is dropped
        # (its connection's next EndTransaction is then an unknown one).
        self._open: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def begin(self, caller: ApiKey, connection: Connection) -> bytes:
        """A new id for the connection's transaction; ``InvalidRequest`` if one is open."""
        transaction_id = secrets.token_bytes(16)
        with self._lock:
            key = (caller.key_id, connection.key)
            if key in self._open:
                raise InvalidRequest(ALREADY_OPEN)
            self._open[key] = transaction_id
            while len(self._open) > MAX_OPEN:
                self._open.popitem(last=False)
        return transaction_id

    def end(self, caller: ApiKey, connection: Connection, transaction_id: bytes) -> None:
        """Forget the connection's transaction ``transaction_id``; ``UnknownHandle`` if it is
        not the one open there."""
        with self._lock:
            key = (caller.key_id, connection.key)
            if self._open.get(key) != transaction_id:
                raise UnknownHandle(UNKNOWN_TRANSACTION)
            del self._open[key]

    def cancel(self, caller: ApiKey, connection: Connection, transaction_id: bytes) -> None:
        """``begin`` failed to start it: forget it again."""
        with self._lock:
            if self._open.get((caller.key_id, connection.key)) == transaction_id:
                del self._open[(caller.key_id, connection.key)]

    def forget(self, caller: ApiKey, connection: Connection) -> None:
        """The session ended: its transaction with it."""
        with self._lock:
            self._open.pop((caller.key_id, connection.key), None)
