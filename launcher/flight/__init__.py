"""The Arrow Flight SQL surface of the control plane, for ADBC and other Flight SQL clients.

``FlightSqlServer`` (server.py) listens beside the control plane's gRPC ports and routes every
statement through the ``QueryRouter`` to a worker's sandbox. Modules: ``messages`` (Flight SQL's
protobuf messages in and out), ``auth`` (API keys as bearer or basic auth, and the call's
connection), ``connections`` (handshake tokens and session cookies), ``sessions`` (a
connection's session sandbox), ``gateway`` (the role rule, then the router), ``bridge``
(handler threads <-> the control plane's event loop), ``statements`` (tickets and prepared
statements), ``placeholders`` (a statement's parameter placeholders), ``updates`` (bound
parameters, statements that change data), ``options`` (session options), ``transactions``
(transactions in a session), ``ingest`` (bulk ingest into a session), ``service`` (the
handlers), ``metadata`` (SqlInfo), ``listing`` (catalogs, schemas, tables and their schemas),
``status`` (errors as gRPC statuses), ``serve`` (a control plane with its Flight SQL endpoint:
the wiring, kept out of ``launcher.controlplane``).
"""

from .serve import ControlPlaneWithFlight
from .server import FlightListen, FlightSqlServer

__all__ = ["ControlPlaneWithFlight", "FlightListen", "FlightSqlServer"]
