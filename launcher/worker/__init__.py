"""The worker's side of the control-plane link: enrollment, the tunnel and what arrives on it.

``enroll`` (token for a certificate), ``dialing`` (proxy, backoff, keepalive), ``tunnel`` (the
long-lived stream), ``queries``, ``results`` and ``sessions`` (what the tunnel carries), ``audit``
(the worker's audit log).
"""
