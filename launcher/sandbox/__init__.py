"""Sandboxes: containers that run one runner each, and the pools that keep them.

``backend`` (the container seam and its Docker implementation), ``spec`` (a sandbox and its
container spec), ``runner_client`` and ``result_check`` (the gRPC runner call and the check of
what comes back), ``factory``, ``pool``, ``capacity``, ``pools`` (one pool per policy),
``sessions`` (a sandbox held for a session), ``files`` (a sandbox's own files directory),
``instance`` (which launcher owns which containers), ``image`` (the sandbox image).
Never imports ``launcher.data``: the executor joins the two.
"""
