"""duckcell launcher: runs every query in its own hardened DuckDB sandbox container.

This file stays import-free: the sandbox image copies it with ``launcher.protocol`` so the
runner can import the generated protocol module and nothing else of the launcher.
"""

__version__ = "0.1.0"
