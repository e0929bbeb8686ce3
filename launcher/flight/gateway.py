"""Where a Flight call meets the control plane: the role rule, then the router.

Every statement, prepared statement and table-schema lookup passes ``Gateway.route``: the
caller's role (``access.authorize`` over the catalog as it is now) must be allowed to read the
tables the SQL names, and fixes the policy the query runs under; the router then records the
caller (``<key id>/<role>``) in the audit log. A refusal is a ``QueryDeniedError``, which
``status.translated`` turns into a PERMISSION_DENIED status with its message. A statement over
the size limit is refused first (``StatementLimitError``, INVALID_ARGUMENT). The SQL is parsed
in the control plane's parser processes (``launcher.model.sql``), reached through the loop.

The catalog is a callable, not a value: the control plane reloads its catalog while the server
runs, and each call must see the current one.
"""

from __future__ import annotations

from collections.abc import Callable

from launcher.controlplane.access import authorize, tables_read
from launcher.controlplane.apikeys import ApiKey
from launcher.controlplane.query import caller_name
from launcher.model.catalog import Catalog
from launcher.model.sql import ParsedSql, SqlParser, check_statement

from .bridge import LoopBridge, RoutedResult
from .connections import Connection, SessionRequired
from .sessions import FlightSessions
from .types import Router

CatalogSource = Callable[[], Catalog]
# Whether a role's statements run in its connection's session (its policy is session-mode).
SessionRoles = Callable[[str], bool]
NEEDS_SESSION = (
    "role {role!r} runs each connection in a session sandbox (its policy is session-mode), "
    "and this call names no connection: authenticate with a handshake (basic auth with the "
    "API key as the password; ADBC: the username and password options) and send the token it "
    "returns, or accept the arrow_flight_session_id cookie (ADBC: "
    "adbc.flight.sql.rpc.with_cookie_middleware=true), or name a session with the header "
    "x-duckcell-session: <name>"
)


def no_session_roles(role: str) -> bool:
    """A server nobody told which roles are session-mode: none is."""
    return False


def empty_catalog() -> Catalog:
    """The catalog of a server nobody gave one: no tables, every role allowed."""
    return Catalog.EMPTY


class Gateway:
    """Authorizes and routes queries for handler threads (``route`` waits only for the
    parse, when the role or the pins need one; never for the query)."""

    def __init__(
        self,
        router: Router,
        catalog: CatalogSource,
        sessions: FlightSessions,
        *,
        parser: SqlParser,
        bridge: LoopBridge,
        session_roles: SessionRoles = no_session_roles,
    ) -> None:
        self._router = router
        self.session_roles = session_roles
        self.catalog = catalog
        self.sessions = sessions
        self._parser = parser
        self._bridge = bridge

    def parse(self, sql: str) -> ParsedSql:
        """DuckDB's parse of ``sql``; raises what ``SqlParser.parse`` raises."""
        return self._bridge.call(self._parser.parse(sql))

    def runs_in_session(self, caller: ApiKey, connection: Connection | None) -> bool:
        """Whether statements of ``caller`` on ``connection`` run in the connection's session
        (``sessions.py``); ``SessionRequired`` for a session-mode role without a connection."""
        if self.session_roles(caller.role):
            if connection is None:
                raise SessionRequired(NEEDS_SESSION.format(role=caller.role))
            return True
        return connection is not None and connection.kind == "header"

    def session_of(self, caller: ApiKey, connection: Connection | None, catalog: Catalog) -> str:
        """The router's session id a statement of ``caller`` on ``connection`` runs in ("" for
        a fresh sandbox), the session opened now if needed (``sessions.py``). Raises
        ``SessionRequired`` for a session-mode role on a call that names no connection."""
        if connection is not None and self.runs_in_session(caller, connection):
            return self.sessions.session_id(caller, connection, catalog)
        if connection is None and self.session_roles(caller.role):
            raise SessionRequired(NEEDS_SESSION.format(role=caller.role))
        return ""

    def route(
        self,
        caller: ApiKey,
        sql: str,
        parameters: bytes = b"",
        connection: Connection | None = None,
    ) -> RoutedResult:
        """The routed query, not started yet (the router starts when first read).

        Raises ``QueryDeniedError`` (role or table refused) or ``SqlError`` (the SQL does not
        parse, or is too large: ``StatementLimitError``) before anything reaches a worker.
        ``parameters`` is an Arrow IPC stream with one row of values for the SQL's ``?``
        placeholders, bound by DuckDB in the sandbox.
        ``connection`` is the call's (``session_of`` decides whether it runs in a session).
        """
        check_statement(sql)
        catalog = self.catalog()
        tables = self._bridge.call(tables_read(catalog, caller.role, sql, self._parser))
        authorize(catalog, caller.role, tables)  # refused here, before the Flight stream starts
        name = caller_name(caller)
        session_id = self.session_of(caller, connection, catalog)
        # The role goes along: the router checks it again against the catalog of the moment it
        # places the query (a push may land in between) and when it moves it off a draining
        # worker; the policy is the role's, decided there too.
        items = self._router.run(
            sql,
            "",
            caller=name,
            role=caller.role,
            parameters=parameters,
            session_id=session_id,
            owner=name if session_id else "",
        )
        return RoutedResult(items)
