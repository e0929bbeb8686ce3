"""What both ends of the control-plane link agree on: addresses, reason words, limits.

The worker side (``launcher/worker/enroll.py``) imports this, never the server module.
"""

from __future__ import annotations

import ipaddress

from launcher.errors import ControlPlaneError, SessionError

# Trailing metadata naming why enrollment was refused (EnrollmentError.reason), so the worker can
# raise the same error class; the message itself travels as the status details.
REASON_KEY = "duckcell-reason"
# The ``duckcell-reason`` of a call that failed on its session (unknown, ended, refused) and
# the Outcome reason of a worker's query whose session is not open there: SessionError.
SESSION_REASON = SessionError.reason

# Arrow IPC chunks can pass gRPC's default 4 MiB message limit; every channel and server on the
# query path takes this one instead.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def split_address(address: str, *, listening: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` into (host, port); raises ``ControlPlaneError``.

    The host is required (``0.0.0.0`` listens on every interface), an IPv6 one in brackets, and
    the port runs from 1 to 65535; an address to listen on (``listening``) may also take port
    0, any free port.
    """
    host, sep, port_text = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    lowest = 0 if listening else 1
    if (
        not sep
        or not host
        or bracketed != is_ipv6(host)  # [a name], or a bare IPv6 address (ambiguous)
        or (not bracketed and ":" in host)
        or host != host.strip()
        or not (port_text.isascii() and port_text.isdigit())
        or not lowest <= int(port_text) <= 65535
    ):
        example = "0.0.0.0:7443" if listening else "localhost:7443"
        raise ControlPlaneError(
            f"expected HOST:PORT (for example {example}, or [::1]:7443), got {address!r}"
        )
    return host, int(port_text)


def is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
