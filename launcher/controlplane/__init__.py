"""The reference control plane: CA, enrollment, registry, tunnel, API keys and query routing.

Nothing here imports the sandbox side of the launcher; the worker reaches the control plane only
through the tunnel.
"""
