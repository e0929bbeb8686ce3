"""Where a sandbox finds the files of its tables: names the data path and the sandbox share.

The data path (``launcher.data``) leases cache entries and names them in a ``Binding`` under
``SANDBOX_CACHE``; the sandbox side (``launcher.sandbox.files``) links those entries into the
sandbox's own directory, readable by ``SANDBOX_GID``. Neither side imports the other: both
import these.
"""

from __future__ import annotations

SANDBOX_GID = 65534  # nogroup, the sandbox's group (launcher.sandbox.spec.SANDBOX_USER)
SANDBOX_CACHE = "/cache"  # the prefix of a leased entry's path: /cache/<path in the cache root>
