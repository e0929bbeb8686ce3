"""Policies: named, validated limits for the sandboxes that run queries.

A policy is a YAML file in the policies directory, named after its file stem. It is parsed once,
at load, into the frozen dataclasses below; the launcher reads those and calls the pure helpers
``writes_allowed`` and ``visible``. Any mistake raises ``PolicyError`` with one line naming the
file, the line, the field, what was expected and what was found::

    policies/strict.yaml:9: limits.memory: expected a size like "512MiB", got "lots"

Keys (``required`` or the default):

    name                            required; [a-z0-9][a-z0-9-]{0,62}; equals the file stem
    description                     "" (free text)
    isolation                       required; query (a sandbox per query) | session
    runtime                         required; runc | runsc (gVisor)
    limits.cpus                     required; CPU cores, 0.01 to 64
    limits.memory                   required; container memory limit, at least 64MiB
    limits.pids                     128; at least 16; the query's processes and threads
    limits.scratch                  1GiB; size of the tmpfs at /scratch, at least 1MiB
    limits.statement_timeout        60s
    limits.max_result_rows          null (unlimited)
    limits.max_result_bytes         null (unlimited)
    duckdb.threads                  max(1, ceil(limits.cpus)); 1 to 1024
    duckdb.memory_limit             60% of limits.memory; must stay below limits.memory
    duckdb.max_temp_directory_size  90% of limits.scratch, but no more than limits.memory less
                                    duckdb.memory_limit and 64MiB (or a quarter) of headroom:
                                    the /scratch tmpfs counts against limits.memory
    session.idle_ttl                5m; at most session.max_lifetime
    session.max_lifetime            1h
    access.catalogs                 ["*"] (case-sensitive globs, see ``visible``)
    access.connections              ["*"]
    writes.allowed                  false
    writes.prefixes                 []; URL prefixes like "s3://bucket/out/": at least one
                                    when writes.allowed is true, none when it is false; the
                                    catalog connection holding the bucket uploads (see
                                    ``launcher.data.writes``), if access.connections allows it
    pool.warm                       1; ready sandboxes kept warm, 0 to 64

Sizes are whole bytes or a number with a unit: B, kB/KB, MB, GB, TB (powers of 1000) or KiB,
MiB, GiB, TiB (powers of 1024). Durations are seconds or a number with ms, s, m or h, at least
1ms. Optional sections may be empty. Only plain YAML is read: no tags beyond the standard
scalar, list and mapping types, no merge keys, no duplicate keys.

This module holds the typed model, the schema and the pure evaluators; the YAML mechanics
under it (nodes with line numbers, typed reads, sizes, durations, messages) are in
``launcher.yamlfile``, which knows nothing of the model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import unquote

from yaml.nodes import Node

from ..errors import PolicyError, UnknownPolicyError
from ..yamlfile import GiB, KiB, MiB, Reader, Section, format_duration, format_size, found, quote

__all__ = [
    "Access",
    "DuckDBSettings",
    "GiB",
    "Isolation",
    "KiB",
    "Limits",
    "MiB",
    "Policy",
    "PolicySet",
    "Runtime",
    "SessionSettings",
    "Writes",
    "load_policies",
    "load_policy_file",
    "load_policy_text",
    "load_pushed_policies",
    "same_settings",
    "visible",
    "writes_allowed",
]


class Isolation(StrEnum):
    QUERY = "query"
    SESSION = "session"


class Runtime(StrEnum):
    RUNC = "runc"
    RUNSC = "runsc"


@dataclass(frozen=True, slots=True)
class Limits:
    cpus: float
    memory_bytes: int
    pids: int
    scratch_bytes: int
    statement_timeout_s: float
    max_result_rows: int | None
    max_result_bytes: int | None


@dataclass(frozen=True, slots=True)
class DuckDBSettings:
    threads: int
    memory_limit_bytes: int
    max_temp_directory_bytes: int


@dataclass(frozen=True, slots=True)
class SessionSettings:
    idle_ttl_s: float
    max_lifetime_s: float


@dataclass(frozen=True, slots=True)
class Access:
    catalogs: tuple[str, ...]
    connections: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Writes:
    allowed: bool
    prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    source: str
    isolation: Isolation
    runtime: Runtime
    limits: Limits
    duckdb: DuckDBSettings
    session: SessionSettings
    access: Access
    writes: Writes
    warm_pool: int
    description: str = ""


class PolicySet:
    """The loaded policies by name; ``get`` resolves the name a caller asked for."""

    def __init__(self, policies: Iterable[Policy], directory: Path | None = None) -> None:
        self.directory = directory
        self._by_name = {policy.name: policy for policy in policies}

    def get(self, name: str) -> Policy:
        """The policy called ``name``; raises UnknownPolicyError listing the known ones."""
        if name in self._by_name:
            return self._by_name[name]
        where = f" in {self.directory}" if self.directory is not None else ""
        message = f"unknown policy {quote(name)}; known policies{where}: "
        message += ", ".join(self.names()) or "none"
        if self.directory is not None and _NAME_RE.fullmatch(name):
            message += f"; add {self.directory / (name + '.yaml')} to define it"
        raise UnknownPolicyError(message)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Policy]:
        return (self._by_name[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._by_name)

    def overlaid(self, pushed: Iterable[Policy]) -> PolicySet:
        """A new set: ``pushed`` policies override same-named ones here, the rest stay."""
        return PolicySet({**self._by_name, **{p.name: p for p in pushed}}.values(), self.directory)

    def replace(self, other: PolicySet) -> None:
        """Take ``other``'s policies in place.

        The set is shared (the launcher and the tunnel's query runner hold the same object), so
        a policy update from the control plane must reach every holder at once.
        """
        self._by_name = dict(other._by_name)


def load_policy_file(path: Path) -> Policy:
    """Read and validate one policy file; its ``name`` must equal the file stem."""
    return _load_file(path)[0]


def load_policy_text(text: str, source: str) -> Policy:
    """Validate a policy document; ``source`` names it in error messages."""
    return _load(text, source)[0]


def load_pushed_policies(documents: Iterable[tuple[str, str]]) -> list[Policy]:
    """Validate policies the control plane pushed as ``(name, yaml)`` pairs; all or nothing.

    Each is named ``controlplane:NAME.yaml`` in errors; the first invalid one raises
    PolicyError (naming the policy and the line), as does a document whose ``name`` is not the
    name it was pushed under.
    """
    policies = []
    for name, text in documents:
        policy, name_node = _load(text, f"controlplane:{name}.yaml")
        if policy.name != name:
            Reader(policy.source, _SCHEMA).fail(
                name_node, "name", f"expected {quote(name)}, got {quote(policy.name)}"
            )
        policies.append(policy)
    return policies


def check_no_downgrade(local: PolicySet, pushed: Iterable[Policy]) -> None:
    """Raise ``PolicyError`` when a pushed policy would run a local runsc policy under runc."""
    for policy in pushed:
        if policy.name not in local:
            continue
        own = local.get(policy.name)
        if own.runtime is Runtime.RUNSC and policy.runtime is not Runtime.RUNSC:
            raise PolicyError(
                f"{policy.source}: runtime: {policy.runtime.value} would drop this worker's "
                f"gVisor isolation for policy {quote(policy.name)} (runsc in {own.source}); "
                "a pushed policy may not; push it under another name, or change the worker's "
                "own policy file"
            )


def same_settings(a: Policy, b: Policy) -> bool:
    """Whether two policies set the same limits (where they were read from does not count)."""
    return dataclasses.replace(a, source="", description="") == dataclasses.replace(
        b, source="", description=""
    )


def load_policies(directory: Path) -> PolicySet:
    """Every ``*.yaml`` and ``*.yml`` file in ``directory`` but hidden ones; names are unique."""
    if not directory.is_dir():
        raise PolicyError(f"{directory}: expected a directory of policy files, found none")
    by_name: dict[str, Policy] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in (".yaml", ".yml") or path.name.startswith(".") or path.is_dir():
            continue
        policy, line = _load_file(path)
        if policy.name in by_name:
            raise PolicyError(
                f"{path}:{line}: name: policy {quote(policy.name)} is already defined in "
                f"{by_name[policy.name].source}; keep one of the two files"
            )
        by_name[policy.name] = policy
    return PolicySet(by_name.values(), directory)


def writes_allowed(policy: Policy, destination: str) -> bool:
    """Whether ``destination`` is at or under one of the policy's write prefixes.

    Prefixes match whole path segments ("s3://b/out" covers "s3://b/out/x", not
    "s3://b/outside/x"); the scheme is case-insensitive; "." and ".." segments never match.
    """
    if not policy.writes.allowed or _has_dot_segment(destination):
        return False
    target = _normalise_url(destination)
    bases = (_normalise_url(prefix).rstrip("/") for prefix in policy.writes.prefixes)
    return any(target == base or target.startswith(base + "/") for base in bases)


def visible(patterns: tuple[str, ...], name: str) -> bool:
    """Whether ``name`` matches one of the globs (``*``, ``?``, ``[...]``; case-sensitive)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


# --- loading: the policy schema on top of the YAML reader ------------------------------------

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_URL_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+(/\S*)?")
_PATTERN = 'a glob pattern like "*" or "sales_*"'
_URL_PREFIX = 'a URL prefix like "s3://bucket/out/" without "." or ".." segments'
_SCHEMA = {  # known keys per section, split on use
    "": "name description isolation runtime limits duckdb session access writes pool",
    "limits": "cpus memory pids scratch statement_timeout max_result_rows max_result_bytes",
    "duckdb": "threads memory_limit max_temp_directory_size",
    "session": "idle_ttl max_lifetime",
    "access": "catalogs connections",
    "writes": "allowed prefixes",
    "pool": "warm",
}


def read_policy_file(path: Path) -> tuple[Policy, str]:
    """``load_policy_file``, and the very text it validated (what a control plane stores)."""
    text = _read(path)
    return _check_file(path, text)[0], text


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError(f"{path}: cannot read the policy file: {error}") from None


def _load_file(path: Path) -> tuple[Policy, int]:
    return _check_file(path, _read(path))


def _check_file(path: Path, text: str) -> tuple[Policy, int]:
    policy, name_node = _load(text, str(path))
    if policy.name != path.stem:
        expected = f"{quote(path.stem)} to match the file name {path.name}"
        Reader(str(path), _SCHEMA).fail(
            name_node, "name", f"expected {expected}, got {quote(policy.name)}"
        )
    return policy, name_node.start_mark.line + 1


def _load(text: str, source: str) -> tuple[Policy, Node]:
    r = Reader(source, _SCHEMA)
    return _parse(r, r.compose(text))


def _parse(r: Reader, root: Node) -> tuple[Policy, Node]:
    top = r.section(root, "", root.start_mark.line + 1)
    name_node = r.require(top, "name", 'a policy name like "default"')
    name = r.text(name_node, "name")
    if not _NAME_RE.fullmatch(name):
        expected = "lowercase letters, digits and dashes (at most 63, not starting with a dash)"
        r.fail(name_node, "name", f"expected {expected}, got {quote(name)}")
    isolation = r.choice(top, "isolation", Isolation)
    runtime = r.choice(top, "runtime", Runtime)
    limits = _limits(r, top, runtime)
    policy = Policy(
        name=name,
        source=r.source,
        isolation=isolation,
        runtime=runtime,
        limits=limits,
        duckdb=_duckdb(r, r.subsection(top, "duckdb"), limits),
        session=_session(r, r.subsection(top, "session")),
        access=_access(r, r.subsection(top, "access")),
        writes=_writes(r, r.subsection(top, "writes")),
        warm_pool=r.get(r.subsection(top, "pool"), "warm", 1, r.integer, 0, 64),
        description=r.get(top, "description", "", r.text),
    )
    return policy, name_node


def _limits(r: Reader, top: Section, runtime: Runtime) -> Limits:
    node = r.require(top, "limits", "a mapping with at least cpus and memory")
    sec = r.section(node, "limits", top.keys["limits"].start_mark.line + 1)
    cpus = r.number(r.require(sec, "cpus", "CPU cores, like 1"), "limits.cpus", 0.01, 64)
    memory = r.size(r.require(sec, "memory", 'a size like "1GiB"'), "limits.memory", 64 * MiB)
    # What the query's processes and threads may use, under either runtime: under runsc the
    # host limit is raised for gVisor's own threads (launcher.sandbox.host_pids).
    pids = r.get(sec, "pids", 128, r.integer, 16)
    return Limits(
        cpus=cpus,
        memory_bytes=memory,
        pids=pids,
        scratch_bytes=r.get(sec, "scratch", GiB, r.size, MiB),
        statement_timeout_s=r.get(sec, "statement_timeout", 60.0, r.duration),
        max_result_rows=r.get(sec, "max_result_rows", None, r.integer, 1),
        max_result_bytes=r.get(sec, "max_result_bytes", None, r.size, 1),
    )


def _duckdb(r: Reader, sec: Section, limits: Limits) -> DuckDBSettings:
    threads = r.get(sec, "threads", max(1, math.ceil(limits.cpus)), r.integer, 1, 1024)
    memory = r.get(sec, "memory_limit", limits.memory_bytes * 6 // 10, r.size, MiB)
    if memory >= limits.memory_bytes:
        node, limit = sec.values["memory_limit"], format_size(limits.memory_bytes)
        expected = f"less than limits.memory ({limit}) so DuckDB spills before the kernel kills it"
        r.fail(node, "duckdb.memory_limit", f"expected {expected}, got {found(node)}")
    # Spilled data lives in the /scratch tmpfs, whose pages count against the container's
    # memory limit: buffer pool + spill must leave headroom for the runner, or a spilling
    # query is OOM-killed instead of failing with DuckDB's own message.
    budget = max(0, limits.memory_bytes - memory - _headroom(limits))
    default_temp = min(limits.scratch_bytes * 9 // 10, budget)
    temp = r.get(sec, "max_temp_directory_size", default_temp, r.size, 0)
    if temp > limits.scratch_bytes:
        node, scratch = sec.values["max_temp_directory_size"], format_size(limits.scratch_bytes)
        expected = f"at most limits.scratch ({scratch}), the tmpfs DuckDB spills to"
        r.fail(node, "duckdb.max_temp_directory_size", f"expected {expected}, got {found(node)}")
    if temp > budget:
        node = sec.values.get("max_temp_directory_size") or sec.values["memory_limit"]
        key = (
            "max_temp_directory_size" if "max_temp_directory_size" in sec.values else "memory_limit"
        )
        expected = (
            f"duckdb.memory_limit + duckdb.max_temp_directory_size at most "
            f"{format_size(limits.memory_bytes - _headroom(limits))} (limits.memory less "
            f"{format_size(_headroom(limits))} for the runner): spilled data in the /scratch "
            "tmpfs counts against limits.memory"
        )
        r.fail(node, f"duckdb.{key}", f"expected {expected}, got {found(node)}")
    return DuckDBSettings(threads, memory, temp)


def _headroom(limits: Limits) -> int:
    return min(64 * MiB, limits.memory_bytes // 4)


def _session(r: Reader, sec: Section) -> SessionSettings:
    idle = r.get(sec, "idle_ttl", 300.0, r.duration)
    lifetime = r.get(sec, "max_lifetime", 3600.0, r.duration)
    if idle > lifetime and "idle_ttl" in sec.values:
        expected = f"at most session.max_lifetime ({format_duration(lifetime)})"
        node, key = sec.values["idle_ttl"], "idle_ttl"
    elif idle > lifetime:
        expected = f"at least session.idle_ttl ({format_duration(idle)} by default)"
        node, key = sec.values["max_lifetime"], "max_lifetime"
    else:
        return SessionSettings(idle, lifetime)
    r.fail(node, f"session.{key}", f"expected {expected}, got {found(node)}")


def _access(r: Reader, sec: Section) -> Access:
    return Access(
        catalogs=r.get(sec, "catalogs", ("*",), r.strings, _PATTERN, bool),
        connections=r.get(sec, "connections", ("*",), r.strings, _PATTERN, bool),
    )


def _writes(r: Reader, sec: Section) -> Writes:
    allowed = r.get(sec, "allowed", False, r.boolean)
    prefixes = r.get(sec, "prefixes", (), r.strings, _URL_PREFIX, _valid_prefix)
    if prefixes and not allowed:
        got = f"{len(prefixes)} prefix(es); set allowed: true or remove them"
        expected = "no prefixes while writes.allowed is false"
        r.fail(sec.values["prefixes"], "writes.prefixes", f"expected {expected}, got {got}")
    if allowed and not prefixes:
        where = sec.values.get("prefixes") or sec.values["allowed"]
        expected = 'a prefix like "s3://bucket/out/" while writes.allowed is true'
        r.fail(where, "writes.prefixes", f"expected {expected}, got none")
    return Writes(allowed, prefixes)


def _valid_prefix(text: str) -> bool:
    return bool(_URL_PREFIX_RE.fullmatch(text)) and not _has_dot_segment(text)


def _normalise_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme.lower() + sep + rest if sep else url


def _has_dot_segment(url: str) -> bool:
    return any(part in (".", "..") for part in unquote(url.partition("://")[2] or url).split("/"))
