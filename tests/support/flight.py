"""The control plane with its Flight SQL endpoint, and the ADBC driver that talks to it.

``FlightControlPlane`` is ``ControlPlane`` (on its own loop in a thread) serving Flight SQL on
loopback too; ``adbc_connect`` opens a connection trusting its CA. The ADBC driver blocks: call
it through ``in_thread`` so the test's loop, where the worker runs, goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import adbc_driver_flightsql.dbapi as adbc_flightsql
from adbc_driver_flightsql import DatabaseOptions

from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.server import ControlPlaneServer
from launcher.flight import ControlPlaneWithFlight, FlightListen

from .controlplane import ControlPlane

T = TypeVar("T")


class FlightControlPlane(ControlPlane):
    """``ControlPlane`` with the Flight SQL endpoint on loopback (TLS unless ``plaintext``)."""

    def __init__(self, data: ControlPlaneData, *, plaintext: bool = False) -> None:
        super().__init__(data)
        self.plaintext = plaintext
        self.flight_listen = "127.0.0.1:0"

    async def start(self) -> None:
        self.server = ControlPlaneServer(
            self.data,
            self.listen,
            tunnel_listen=self.tunnel_listen,
            heartbeat_interval_s=self.heartbeat_interval_s,
        )
        listen = FlightListen.parse(self.flight_listen, plaintext=self.plaintext)
        self.served = ControlPlaneWithFlight(self.server, listen)
        await self._on_loop(self.served.start())
        self.listen, self.tunnel_listen = self.server.address, self.server.tunnel_address
        assert self.served.flight is not None
        self.flight_listen = f"127.0.0.1:{self.served.flight.port}"

    async def stop(self) -> None:
        """Flight SQL first, then the control plane (``ControlPlaneWithFlight.stop``)."""
        if self.server is not None:
            await self._on_loop(self.served.stop(0))
            self.server = None

    @property
    def location(self) -> str:
        assert self.server is not None and self.served.flight is not None
        return self.served.flight.location


def adbc_connect(
    cp: FlightControlPlane, api_key: str | None, **options: str
) -> adbc_flightsql.Connection:
    """An ADBC connection trusting the control plane's CA, with ``api_key`` as bearer token."""
    db_kwargs = {DatabaseOptions.TLS_ROOT_CERTS.value: cp.data.ca().cert_pem().decode()}
    if api_key is not None:
        db_kwargs[DatabaseOptions.AUTHORIZATION_HEADER.value] = f"Bearer {api_key}"
    db_kwargs.update(options)
    return adbc_flightsql.connect(cp.location, db_kwargs=db_kwargs, autocommit=True)


async def in_thread(function: Callable[..., T], *args: object, **kwargs: object) -> T:
    return await asyncio.to_thread(function, *args, **kwargs)
