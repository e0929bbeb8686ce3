"""How a worker dials the control plane: keepalive, HTTP proxies, reconnect backoff.

Half-open connections: a control plane that vanished without a FIN/RST (host gone, NAT or
firewall state dropped) would leave the stream looking alive forever, since the worker only
writes heartbeats and writes into a dead TCP connection succeed until buffers fill. gRPC
keepalive pings (``Keepalive``) notice it: a ping every 10 s, the connection is dropped when one
is not answered within 10 s, so a silently dead peer is noticed within about 20 s and the
worker redials. grpcio 1.85 ends an unanswered ping after ``grpc.http2.ping_timeout_ms`` (60 s
by default), not after ``keepalive_timeout_ms``, so both are set: measured through a proxy that
stops forwarding, the worker noticed after 62 s with keepalive alone and after 4 s with 2 s/2 s
and both options. The control plane's server accepts pings this often (see its
``min_ping_interval_without_data_ms``) and pings workers the same way.

Proxies: gRPC tunnels the TLS connection through an HTTP proxy with CONNECT, but by itself
(grpcio 1.85, measured) it reads only the lower-case ``grpc_proxy``/``https_proxy``/
``http_proxy`` and ``no_proxy``, not the upper-case ``HTTPS_PROXY``/``NO_PROXY`` most
deployments set. So the worker passes a ``ProxyConfig`` (``ProxyConfig.from_env``, read once by
the CLI) and the choice is made here, per dial: the channel option ``grpc.http_proxy`` names
the proxy (it takes precedence over gRPC's own reading of the environment), and a tunnel host
that ``NO_PROXY`` names turns proxying off (``grpc.enable_http_proxy`` 0). ``NO_PROXY`` entries
are host names, domain suffixes (``example.com`` and ``.example.com`` both match
``cp.example.com``), IP addresses or ``*``; ports and CIDR ranges are not understood.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Precedence as in curl and gRPC: the gRPC-specific name first, lower case before upper case.
_PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")
_NO_PROXY_VARIABLES = ("no_grpc_proxy", "no_proxy", "NO_PROXY")


@dataclass(frozen=True, slots=True)
class Keepalive:
    """gRPC keepalive on the worker's channel (see the module docstring): ping every ``time_s``
    even with no call in flight, drop the connection when a ping is not answered within
    ``timeout_s``, and never stop pinging for lack of data (the tunnel can be idle for hours).
    """

    time_s: float = 10.0
    timeout_s: float = 10.0

    def channel_options(self) -> tuple[tuple[str, int], ...]:
        timeout_ms = round(self.timeout_s * 1000)
        return (
            ("grpc.keepalive_time_ms", round(self.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.http2.ping_timeout_ms", timeout_ms),  # what grpcio 1.85 actually waits
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        )


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Which HTTP proxy the worker dials the control plane through, and which hosts bypass it."""

    url: str = ""
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProxyConfig:
        url = next((env[name] for name in _PROXY_VARIABLES if env.get(name)), "")
        bypass = next((env[name] for name in _NO_PROXY_VARIABLES if env.get(name)), "")
        return cls(url, tuple(filter(None, (part.strip() for part in bypass.split(",")))))

    def bypasses(self, host: str) -> bool:
        host = host.strip("[]").lower().rstrip(".")
        for entry in (e.lower().lstrip(".").rstrip(".") for e in self.no_proxy):
            if entry == "*" or host == entry or host.endswith("." + entry):
                return True
        return False

    def channel_options(self, address: str) -> tuple[tuple[str, str | int], ...]:
        """gRPC channel options for dialling ``address`` (``HOST:PORT``)."""
        if self.bypasses(address.rpartition(":")[0]):
            return (("grpc.enable_http_proxy", 0),)
        if self.url:
            return (("grpc.http_proxy", self.url),)
        return ()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter; ``random`` returns a float in [0, 1)."""

    base_s: float = 0.5
    cap_s: float = 30.0
    random: Callable[[], float] = _random.random

    def delay(self, attempt: int) -> float:
        return self.random() * min(self.cap_s, self.base_s * 2 ** min(attempt, 32))
