"""Open DuckDB with the sandbox's locked configuration.

The order matters and was established against hostile probes: startup-only options go into
``connect``; ``temp_directory`` and ``allowed_directories`` must be set while external access is
still on; ``lock_configuration`` comes last because nothing can be set after it.
"""

from __future__ import annotations

import json
import os
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


def lockdown_statements(config: RunnerConfig) -> list[str]:
    """The SET statements, in the only order that works, ending with the lock."""
    temp_dir = _dir(config.scratch_dir) + "duckdb_tmp"
    allowed = ", ".join(_quote(_dir(d)) for d in (config.cache_dir, config.scratch_dir))
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
        f"SET allowed_directories = [{allowed}]",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ]


def open_locked(config: RunnerConfig) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory connection of its own (never the module-level default one), locked."""
    con = duckdb.connect(
        ":memory:",
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
        },
    )
    for statement in lockdown_statements(config):
        con.execute(statement)
    return con
