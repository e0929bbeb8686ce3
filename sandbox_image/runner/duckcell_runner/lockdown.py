"""Open DuckDB with the sandbox's configuration, and lock it down to one query's files.

Locking happens in two steps. At start, ``open_locked`` applies every setting that does not
depend on a query (memory, threads, timeouts, the temp directory...); no tenant SQL runs yet.
Before the sandbox's first query, the runner applies ``lock_statements``: file access narrowed
to the /scratch directory plus exactly the cached files of that query's tables
(``allowed_paths``), external access off, configuration locked. So a query cannot list or read
another table's files in the shared /cache, not even with ``glob('/cache/*')``.

A session's sandbox (``session_dir`` set) serves many queries but can be locked only once, so
it is locked to a directory instead: /scratch plus its session directory under the cache
(``allowed_directories``), no ``allowed_paths``. The launcher alone writes that directory (the
cache is mounted read-only): before each query it hard-links the query's cached files there,
and the runner binds only paths inside it. DuckDB refuses paths outside the allowed
directories, ``..`` traversal included; the integration tests probe this against the image.

The order matters and was established against hostile probes: startup-only options go into
``connect``; ``temp_directory``, ``allowed_directories`` and ``allowed_paths`` must be set while
external access is still on; ``lock_configuration`` comes last because nothing can be set after
it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb

CONFIG_ENV = "DUCKCELL_RUNNER_CONFIG"


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """What the launcher tells the runner at start (no secrets ever travel this way)."""

    socket_path: str = "/run/duckcell/runner.sock"
    cache_dir: str = "/cache"
    scratch_dir: str = "/scratch"
    memory_limit_bytes: int = 512 * 1024 * 1024
    threads: int = 1
    max_temp_directory_bytes: int = 256 * 1024 * 1024
    statement_timeout_ms: int = 60_000
    batch_rows: int = 65_536
    session_dir: str = ""  # set for session sandboxes: lock to this directory, not to files

    @classmethod
    def from_env(cls) -> RunnerConfig:
        raw = os.environ.get(CONFIG_ENV, "")
        values = json.loads(raw) if raw else {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"runner: unknown config keys {unknown}")
        return cls(**values)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _dir(path: str) -> str:
    return path.rstrip("/") + "/"


def startup_statements(config: RunnerConfig) -> list[str]:
    """The SET statements applied at start, before anything is known of the first query."""
    temp_dir = _dir(config.scratch_dir) + "duckdb_tmp"
    return [
        "SET allow_persistent_secrets = false",
        "SET enable_progress_bar = false",
        # Otherwise SQL can read the runner's Python variables by name.
        "SET python_enable_replacements = false",
        "SET allow_extension_repositories = 'forbidden'",
        f"SET memory_limit = '{config.memory_limit_bytes}B'",
        f"SET threads = {int(config.threads)}",
        f"SET max_execution_time = {int(config.statement_timeout_ms)}",
        # Without an explicit temp directory DuckDB spills to ./.tmp and allowlists it.
        f"SET temp_directory = {_quote(temp_dir)}",
        f"SET max_temp_directory_size = '{config.max_temp_directory_bytes}B'",
    ]


def lock_statements(config: RunnerConfig, paths: Sequence[str]) -> list[str]:
    """The SET statements that lock the sandbox to /scratch and ``paths`` (or, in a session
    sandbox, its session directory, whatever ``paths``), ending with the lock.

    ``paths`` must have passed ``path_problem``: an allowed path is compared as written, so a
    glob in it would allow that glob.
    """
    scratch = _quote(_dir(config.scratch_dir))
    if config.session_dir:
        directories = f"[{scratch}, {_quote(_dir(config.session_dir))}]"
        return [
            f"SET allowed_directories = {directories}",
            "SET enable_external_access = false",
            "SET lock_configuration = true",
        ]
    allowed = ", ".join(_quote(path) for path in paths)
    return [
        f"SET allowed_directories = [{scratch}]",
        f"SET allowed_paths = [{allowed}]",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ]


def lockdown_statements(config: RunnerConfig, paths: Sequence[str] = ()) -> list[str]:
    """Every SET statement a sandbox gets, in the only order that works."""
    return startup_statements(config) + lock_statements(config, paths)


_GLOB = re.compile(r"[*?\[\]{}]")


def path_problem(config: RunnerConfig, path: str) -> str | None:
    """Why ``path`` may not be bound (None if it may): a plain file path under the cache, or
    under the session directory in a session sandbox."""
    root = config.session_dir or config.cache_dir
    if not path.startswith(_dir(root)) or os.path.normpath(path) != path:
        return f"table file {json.dumps(path)} is not a normalised path under {root}"
    if _GLOB.search(path) or "\0" in path:
        return f"table file {json.dumps(path)} contains glob or NUL characters"
    return None


def session_dir_problem(config: RunnerConfig) -> str | None:
    """Why the configured session directory cannot be locked to (None if it can)."""
    path = config.session_dir
    if not path:
        return None
    if not path.startswith(_dir(config.cache_dir)) or os.path.normpath(path) != path:
        return f"session directory {json.dumps(path)} is not a normalised path under the cache"
    if _GLOB.search(path) or "\0" in path or path.rstrip("/") == config.cache_dir.rstrip("/"):
        return f"session directory {json.dumps(path)} is not a directory of its own"
    return None


def open_locked(config: RunnerConfig) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory connection of its own (never the module-level default one).

    Only ``startup_statements`` are applied: the caller must apply ``lock_statements`` before
    it runs any SQL it did not write (``RunnerService`` does, on the first Execute).
    """
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
        },
    )
    for statement in startup_statements(config):
        con.execute(statement)
    return con
