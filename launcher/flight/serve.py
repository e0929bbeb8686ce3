"""A control plane with its Flight SQL endpoint, started and stopped as one.

The wiring lives here, not in ``launcher.controlplane``: the control plane's core knows nothing
of Flight SQL, and Flight SQL depends on the control plane (its router, API keys, CA and
catalog), never the reverse. ``duckcell controlplane serve --flight-listen`` and the benchmark's
control plane thread use ``ControlPlaneWithFlight``.

Order matters both ways: the endpoint starts after the control plane (it needs the router and
the database the control plane opens in ``start``) and stops before it, so that its queries
are cancelled through a router that is still there.
"""

from __future__ import annotations

from launcher.controlplane.apikeys import ApiKey
from launcher.controlplane.policies import PolicyDocuments
from launcher.controlplane.server import ControlPlaneServer
from launcher.errors import ControlPlaneError, PolicyError
from launcher.model.policy import Isolation, load_policy_text

from .server import FlightListen, FlightSqlServer


class ControlPlaneWithFlight:
    """``control_plane`` and, with ``listen``, Flight SQL beside it: ``await start()``, then
    ``await stop()``. ``flight`` is the endpoint while it runs (``None`` without ``listen``)."""

    def __init__(self, control_plane: ControlPlaneServer, listen: FlightListen | None) -> None:
        self.control_plane = control_plane
        self._listen = listen
        self.flight: FlightSqlServer | None = None

    @property
    def address(self) -> str:
        """The control plane's enrollment and query address (workers and clients dial it)."""
        return self.control_plane.address

    async def start(self) -> None:
        """Start the control plane, then Flight SQL; a Flight failure stops the control plane
        again and raises (``ControlPlaneError`` when the port cannot be bound)."""
        await self.control_plane.start()
        if self._listen is None:
            return
        try:
            self.flight = _flight_server(self.control_plane, self._listen)
            await self.flight.start()
        except BaseException:
            self.flight = None
            await self.control_plane.stop()
            raise

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop Flight SQL (its waiting queries cancelled, its sessions closed), then the
        control plane with ``grace`` for its running calls."""
        flight, self.flight = self.flight, None
        try:
            if flight is not None:
                await flight.stop()
        finally:
            await self.control_plane.stop(grace)


def _flight_server(control_plane: ControlPlaneServer, listen: FlightListen) -> FlightSqlServer:
    """The endpoint over a started control plane's router, API keys, CA and catalog."""
    router, api_keys = control_plane.router, control_plane.api_keys
    if router is None or api_keys is None:
        raise ControlPlaneError("start the control plane before its Flight SQL endpoint")

    async def verify_key(key: str) -> ApiKey:  # on the control plane's loop: it owns the database
        return api_keys.verify(key)

    return FlightSqlServer(
        listen,
        router,
        verify_key,
        ca=control_plane.ca(),
        hosts=control_plane.hosts,
        catalog=lambda: control_plane.catalog.current.catalog,
        parser=control_plane.parser,
        session_roles=SessionModeRoles(control_plane).__call__,
        audit=control_plane.audit,
    )


class SessionModeRoles:
    """Whether a role is session-mode: its policy, as the control plane holds it
    (``controlplane policy apply``), has ``isolation: session``. A role whose policy the
    control plane does not hold (the workers' own ``policies/`` directories) counts as
    per-query: the worker then refuses its statements with the policy's reason. The parsed
    policies are kept per revision of the set."""

    def __init__(self, control_plane: ControlPlaneServer) -> None:
        self._control_plane = control_plane
        self._revision: str | None = None
        self._session_policies: frozenset[str] = frozenset()

    def __call__(self, role_name: str) -> bool:
        role = self._control_plane.catalog.current.catalog.role(role_name)
        if role is None or not role.policy:
            return False
        return role.policy in self._sessions(self._control_plane.policies.current)

    def _sessions(self, documents: PolicyDocuments) -> frozenset[str]:
        if documents.revision != self._revision:
            names = set()
            for name, text in documents.texts.items():
                try:
                    policy = load_policy_text(text, name)
                except PolicyError:  # validated when applied; a bad one is the workers' to refuse
                    continue
                if policy.isolation == Isolation.SESSION:
                    names.add(name)
            self._session_policies, self._revision = frozenset(names), documents.revision
        return self._session_policies
