"""What both ends of the control-plane link agree on: addresses, refusal metadata, limits.

The worker side (``launcher/enroll.py``) imports this, never the server module.
"""

from __future__ import annotations

from launcher.errors import ControlPlaneError

# Trailing metadata naming why enrollment was refused (EnrollmentError.reason), so the worker can
# raise the same error class; the message itself travels as the status details.
REASON_KEY = "duckcell-reason"

# Arrow IPC chunks can pass gRPC's default 4 MiB message limit; every channel and server on the
# query path takes this one instead.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MESSAGE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` into (host, port); raises ``ControlPlaneError``."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ControlPlaneError(f"expected HOST:PORT (for example localhost:7443), got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)
