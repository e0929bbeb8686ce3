"""The worker's side of the control-plane link: enrollment, the tunnel and what arrives on it.

``daemon`` (``Worker``: host, data path, grants, audit and tunnel wired once; the CLI, the
benchmarks and the tests start a worker through it), ``enroll`` (token for a certificate),
``dialing`` (proxy, backoff, keepalive), ``tunnel`` (the long-lived stream), ``queries``,
``results`` and ``sessions`` (what the tunnel carries), ``audit`` (the worker's audit log).
"""
