"""The runner: the one process inside a duckcell sandbox.

It opens DuckDB with a locked configuration, warms every code path a query uses, then serves
the ``duckcell.runner.v1.Runner`` gRPC service on a unix socket in a directory the launcher
bind-mounts. It imports nothing from the launcher but the generated protocol module.
"""

__version__ = "0.1.0"
