"""The reference control plane: CA, enrollment tokens, and (later) registry, routing and audit.

Nothing here imports the sandbox side of the launcher; the worker reaches the control plane only
through the tunnel.
"""
