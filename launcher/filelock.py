"""Whether another process holds a file's ``flock``: the probe behind "is that launcher alive"
(its instance lock) and "does a query pin that cache entry" (its pin file).

The probe takes the lock exclusively without waiting and lets go at once: failing means some
holder (in any process on the host) has it. A missing file (or a symlink planted in its place)
is nobody's lock; a file that cannot be opened for another reason (permissions) raises
``OSError``: "not held" would let a caller remove what a live process still uses.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


def lock_held(path: Path) -> bool:
    """True while another open file description holds a ``flock`` on ``path``.

    Opened read-only and without following a symlink: the probe needs no write access, and a
    link planted in place of the lock file is never followed (it is then nobody's lock).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as error:
        if error.errno == errno.ELOOP:  # a symlink in place of the lock file
            return False
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
