"""Policies: named, validated limits for the sandboxes that run queries.

A policy is a YAML file in the policies directory, named after its file stem. It is parsed once,
at load, into the frozen dataclasses below; the launcher reads those and calls the pure helpers
``writes_allowed`` and ``visible``. Any mistake raises ``PolicyError`` with one line naming the
file, the line, the field, what was expected and what was found::

    policies/strict.yaml:7: limits.memory: expected a size like "512MiB", got "lots"

Keys (``required`` or the default):

    name                            required; [a-z0-9][a-z0-9-]{0,62}; equals the file stem
    description                     "" (free text)
    isolation                       required; query (a sandbox per query) | session
    runtime                         required; runc | runsc (gVisor: needs limits.pids >= 128)
    limits.cpus                     required; CPU cores, 0.01 to 64
    limits.memory                   required; container memory limit, at least 64MiB
    limits.pids                     128; at least 16
    limits.scratch                  1GiB; size of the tmpfs at /scratch, at least 1MiB
    limits.statement_timeout        60s
    limits.max_result_rows          null (unlimited)
    limits.max_result_bytes         null (unlimited)
    duckdb.threads                  max(1, ceil(limits.cpus)); 1 to 1024
    duckdb.memory_limit             60% of limits.memory; must stay below limits.memory
    duckdb.max_temp_directory_size  90% of limits.scratch; at most limits.scratch
    session.idle_ttl                5m; at most session.max_lifetime
    session.max_lifetime            1h
    access.catalogs                 ["*"] (case-sensitive globs, see ``visible``)
    access.connections              ["*"]
    writes.allowed                  false
    writes.prefixes                 []; URL prefixes like "s3://bucket/out/": at least one
                                    when writes.allowed is true, none when it is false
    pool.warm                       1; ready sandboxes kept warm, 0 to 64

Sizes are whole bytes or a number with a unit: B, kB/KB, MB, GB, TB (powers of 1000) or KiB,
MiB, GiB, TiB (powers of 1024). Durations are seconds or a number with ms, s, m or h, at least
1ms. Optional sections may be empty. Only plain YAML is read: no tags beyond the standard
scalar, list and mapping types, no merge keys, no duplicate keys.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NoReturn, TypeVar
from urllib.parse import unquote

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from .errors import PolicyError, UnknownPolicyError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


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
        message = f"unknown policy {_quote(name)}; known policies{where}: "
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


def load_policy_file(path: Path) -> Policy:
    """Read and validate one policy file; its ``name`` must equal the file stem."""
    return _load_file(path)[0]


def load_policy_text(text: str, source: str) -> Policy:
    """Validate a policy document; ``source`` names it in error messages."""
    return _load(text, source)[0]


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
                f"{path}:{line}: name: policy {_quote(policy.name)} is already defined in "
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


# --- loading: YAML nodes (which keep their line numbers) to typed values ----------------------

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_SIZE_UNITS |= {"kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|)")
_DURATION_UNITS = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_URL_PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+(/\S*)?")
_PATTERN = 'a glob pattern like "*" or "sales_*"'
_URL_PREFIX = 'a URL prefix like "s3://bucket/out/" without "." or ".." segments'
_TAG = "tag:yaml.org,2002:"
_INT64_MAX = 2**63 - 1  # what the engine accepts; larger counts are typos
# Implicitly resolved tags; timestamp and merge are then refused as wrong types or keys.
_PLAIN_KINDS = ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge")
_SCHEMA = {  # known keys per section, split on use
    "": "name description isolation runtime limits duckdb session access writes pool",
    "limits": "cpus memory pids scratch statement_timeout max_result_rows max_result_bytes",
    "duckdb": "threads memory_limit max_temp_directory_size",
    "session": "idle_ttl max_lifetime",
    "access": "catalogs connections",
    "writes": "allowed prefixes",
    "pool": "warm",
}
_SCALARS = SafeConstructor()  # only its stateless construct_yaml_{int,float,bool} are called
_RESOLVER = Resolver()
E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


def _load_file(path: Path) -> tuple[Policy, int]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError(f"{path}: cannot read the policy file: {error}") from None
    policy, name_node = _load(text, str(path))
    if policy.name != path.stem:
        expected = f"{_quote(path.stem)} to match the file name {path.name}"
        _Reader(str(path)).fail(
            name_node, "name", f"expected {expected}, got {_quote(policy.name)}"
        )
    return policy, name_node.start_mark.line + 1


def _load(text: str, source: str) -> tuple[Policy, Node]:
    r = _Reader(source)
    try:  # compose, not load: nodes keep their marks and no Python object is ever built
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        what = ", ".join(part for part in (error.context, error.problem) if part)
        where = f" (column {mark.column + 1})" if mark else ""
        r.fail(mark.line + 1 if mark else 1, "", f"invalid YAML: {what}{where}")
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, max(error.position, 0)) + 1
        char = error.character if isinstance(error.character, int) else ord(error.character)
        r.fail(line, "", f"invalid YAML: {error.reason} (character {char:#04x})")
    except yaml.YAMLError as error:
        r.fail(1, "", f"invalid YAML: {error}")
    except RecursionError:
        r.fail(1, "", "invalid YAML: nested too deeply")
    if root is None:
        r.fail(1, "", "expected a mapping of policy keys, got an empty document")
    return _parse(r, root)


def _parse(r: _Reader, root: Node) -> tuple[Policy, Node]:
    top = r.section(root, "", root.start_mark.line + 1)
    name_node = r.require(top, "name", 'a policy name like "default"')
    name = r.text(name_node, "name")
    if not _NAME_RE.fullmatch(name):
        expected = "lowercase letters, digits and dashes (at most 63, not starting with a dash)"
        r.fail(name_node, "name", f"expected {expected}, got {_quote(name)}")
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


def _limits(r: _Reader, top: _Section, runtime: Runtime) -> Limits:
    node = r.require(top, "limits", "a mapping with at least cpus and memory")
    sec = r.section(node, "limits", top.keys["limits"].start_mark.line + 1)
    cpus = r.number(r.require(sec, "cpus", "CPU cores, like 1"), "limits.cpus", 0.01, 64)
    memory = r.size(r.require(sec, "memory", 'a size like "1GiB"'), "limits.memory", 64 * MiB)
    pids = r.get(sec, "pids", 128, r.integer, 16)
    if runtime is Runtime.RUNSC and pids < 128:
        why = "because gVisor counts its own threads in the pids limit"
        r.fail(
            sec.values["pids"], "limits.pids", f"expected at least 128 with runsc {why}, got {pids}"
        )
    return Limits(
        cpus=cpus,
        memory_bytes=memory,
        pids=pids,
        scratch_bytes=r.get(sec, "scratch", GiB, r.size, MiB),
        statement_timeout_s=r.get(sec, "statement_timeout", 60.0, r.duration),
        max_result_rows=r.get(sec, "max_result_rows", None, r.integer, 1),
        max_result_bytes=r.get(sec, "max_result_bytes", None, r.size, 1),
    )


def _duckdb(r: _Reader, sec: _Section, limits: Limits) -> DuckDBSettings:
    threads = r.get(sec, "threads", max(1, math.ceil(limits.cpus)), r.integer, 1, 1024)
    memory = r.get(sec, "memory_limit", limits.memory_bytes * 6 // 10, r.size, MiB)
    if memory >= limits.memory_bytes:
        node, limit = sec.values["memory_limit"], _format_size(limits.memory_bytes)
        expected = f"less than limits.memory ({limit}) so DuckDB spills before the kernel kills it"
        r.fail(node, "duckdb.memory_limit", f"expected {expected}, got {_found(node)}")
    temp = r.get(sec, "max_temp_directory_size", limits.scratch_bytes * 9 // 10, r.size, 0)
    if temp > limits.scratch_bytes:
        node, scratch = sec.values["max_temp_directory_size"], _format_size(limits.scratch_bytes)
        expected = f"at most limits.scratch ({scratch}), the tmpfs DuckDB spills to"
        r.fail(node, "duckdb.max_temp_directory_size", f"expected {expected}, got {_found(node)}")
    return DuckDBSettings(threads, memory, temp)


def _session(r: _Reader, sec: _Section) -> SessionSettings:
    idle = r.get(sec, "idle_ttl", 300.0, r.duration)
    lifetime = r.get(sec, "max_lifetime", 3600.0, r.duration)
    if idle > lifetime and "idle_ttl" in sec.values:
        expected = f"at most session.max_lifetime ({_format_duration(lifetime)})"
        node, key = sec.values["idle_ttl"], "idle_ttl"
    elif idle > lifetime:
        expected = f"at least session.idle_ttl ({_format_duration(idle)} by default)"
        node, key = sec.values["max_lifetime"], "max_lifetime"
    else:
        return SessionSettings(idle, lifetime)
    r.fail(node, f"session.{key}", f"expected {expected}, got {_found(node)}")


def _access(r: _Reader, sec: _Section) -> Access:
    return Access(
        catalogs=r.get(sec, "catalogs", ("*",), r.strings, _PATTERN, bool),
        connections=r.get(sec, "connections", ("*",), r.strings, _PATTERN, bool),
    )


def _writes(r: _Reader, sec: _Section) -> Writes:
    allowed = r.get(sec, "allowed", False, r.boolean)
    prefixes = r.get(sec, "prefixes", (), r.strings, _URL_PREFIX, _valid_prefix)
    if prefixes and not allowed:
        found = f"{len(prefixes)} prefix(es); set allowed: true or remove them"
        expected = "no prefixes while writes.allowed is false"
        r.fail(sec.values["prefixes"], "writes.prefixes", f"expected {expected}, got {found}")
    if allowed and not prefixes:
        where = sec.values.get("prefixes") or sec.values["allowed"]
        expected = 'a prefix like "s3://bucket/out/" while writes.allowed is true'
        r.fail(where, "writes.prefixes", f"expected {expected}, got none")
    return Writes(allowed, prefixes)


def _valid_prefix(text: str) -> bool:
    return bool(_URL_PREFIX_RE.fullmatch(text)) and not _has_dot_segment(text)


@dataclass(slots=True)
class _Section:
    """One mapping's entries; ``line`` is where a missing key is reported."""

    path: str
    line: int
    keys: dict[str, Node] = field(default_factory=dict)
    values: dict[str, Node] = field(default_factory=dict)

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key


class _Reader:
    """Reads typed values out of one document's nodes; every mistake is a one-line PolicyError."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: Node | int, name: str, text: str) -> NoReturn:
        line = where if isinstance(where, int) else where.start_mark.line + 1
        message = f"{self.source}:{line}: " + (f"{name}: " if name else "") + text
        raise PolicyError(message.replace("\r", "\\r").replace("\n", "\\n"))

    def expect(self, node: Node, name: str, kinds: tuple[str, ...], expected: str) -> str:
        """The node's kind ("str", "int", "map"...) if it is one of ``kinds``."""
        kind = str(node.tag).removeprefix(_TAG)
        forced = kind in ("int", "float", "bool", "null") and _implicit(node) != node.tag
        if kind not in _PLAIN_KINDS or forced:  # forced: "!!int abc" would not construct
            tag = str(node.tag).replace(_TAG, "!!")
            self.fail(node, name, f"expected plain YAML, got the tag {tag}; remove it")
        if kind not in kinds:
            self.fail(node, name, f"expected {expected}, got {_found(node)}")
        return kind

    def section(self, node: Node, path: str, line: int) -> _Section:
        self.expect(node, path, ("map",), "a mapping" if path else "a mapping of policy keys")
        known, sec = _SCHEMA[path].split(), _Section(path, line)
        for key, value in node.value:
            if key.tag == _TAG + "merge":
                self.fail(key, path, 'expected plain keys, got a merge key "<<"; write keys out')
            self.expect(key, path, ("str",), "a key name")
            name = sec.field(key.value)
            if key.value in sec.keys:
                first = sec.keys[key.value].start_mark.line + 1
                self.fail(
                    key, name, f"expected each key once, got it again (first on line {first})"
                )
            if key.value not in known:
                close = difflib.get_close_matches(key.value, known, n=1)
                hint = f'did you mean "{close[0]}"?' if close else "expected " + ", ".join(known)
                self.fail(key, name, f"unknown key; {hint}")
            sec.keys[key.value], sec.values[key.value] = key, value
        return sec

    def subsection(self, parent: _Section, key: str) -> _Section:
        """An optional nested section: absent or null means empty."""
        node = parent.values.get(key)
        if node is None or node.tag == _TAG + "null":
            return _Section(key, parent.line)
        return self.section(node, key, parent.keys[key].start_mark.line + 1)

    def require(self, sec: _Section, key: str, expected: str) -> Node:
        if key not in sec.values:
            self.fail(sec.line, sec.field(key), f"missing required key; expected {expected}")
        return sec.values[key]

    def get(self, sec: _Section, key: str, default: T, read: Callable[..., T], *args: object) -> T:
        """``read`` of the key's node; the default if absent, or null where the default is None."""
        node = sec.values.get(key)
        if node is None or (default is None and node.tag == _TAG + "null"):
            return default
        return read(node, sec.field(key), *args)

    def text(self, node: Node, name: str) -> str:
        self.expect(node, name, ("str",), "a string")
        return str(node.value)

    def strings(
        self, node: Node, name: str, each: str, check: Callable[[str], bool]
    ) -> tuple[str, ...]:
        """A list of strings, each passing ``check``; ``each`` describes a good item."""
        self.expect(node, name, ("seq",), f"a list, each {each}")
        for i, item in enumerate(node.value):
            if not check(self.text(item, f"{name}[{i}]")):
                self.fail(item, f"{name}[{i}]", f"expected {each}, got {_found(item)}")
        return tuple(str(item.value) for item in node.value)

    def choice(self, sec: _Section, key: str, enum: type[E]) -> E:
        options = " or ".join(_quote(member.value) for member in enum)
        node = self.require(sec, key, options)
        self.expect(node, key, ("str",), options)
        if node.value not in {member.value for member in enum}:
            self.fail(node, key, f"expected {options}, got {_found(node)}")
        return enum(node.value)

    def boolean(self, node: Node, name: str) -> bool:
        self.expect(node, name, ("bool",), "true or false")
        return bool(_SCALARS.construct_yaml_bool(node))

    def number(self, node: Node, name: str, low: float, high: float) -> float:
        return float(self._bounded(node, name, low, high, ("int", "float"), "a number"))

    def integer(self, node: Node, name: str, low: int, high: int = _INT64_MAX) -> int:
        return int(self._bounded(node, name, low, high, ("int",), "a whole number"))

    def _bounded(
        self, node: Node, name: str, low: float, high: float, kinds: tuple[str, ...], what: str
    ) -> int | float:
        span = f"from {low:g} to {high:g}" if high < _INT64_MAX else f"of at least {low:g}"
        kind = self.expect(node, name, kinds, f"{what} {span}")
        value = _SCALARS.construct_yaml_int(node) if kind == "int" else _float(node)
        if not low <= value <= high:  # also refuses nan
            span = "below 2**63" if value > _INT64_MAX else span
            self.fail(node, name, f"expected {what} {span}, got {_found(node)}")
        return int(value) if kind == "int" else float(value)

    def size(self, node: Node, name: str, minimum: int) -> int:
        kind = self.expect(node, name, ("int", "str"), 'a size like "512MiB"')
        value = _SCALARS.construct_yaml_int(node) if kind == "int" else _parse_size(node.value)
        if value is None:
            self.fail(node, name, f'expected a size like "512MiB", got {_found(node)}')
        if value < minimum:
            self.fail(node, name, f"expected at least {_format_size(minimum)}, got {_found(node)}")
        if value > _INT64_MAX:
            self.fail(node, name, f"expected a size below 8EiB, got {_found(node)}")
        return int(value)

    def duration(self, node: Node, name: str) -> float:
        expected = 'a duration like "30s", "5m" or "250ms"'
        kind = self.expect(node, name, ("int", "float", "str"), expected)
        value = _parse_duration(node.value) if kind == "str" else _float(node)
        if value is None or not math.isfinite(value):
            self.fail(node, name, f"expected {expected}, got {_found(node)}")
        if value < 0.001:
            self.fail(node, name, f"expected at least 1ms, got {_found(node)}")
        return value


def _float(node: Node) -> float:
    return float(_SCALARS.construct_yaml_float(node))


def _found(node: Node) -> str:
    """The offending node as a person wrote it; says so when quotes made it a string."""
    if isinstance(node, MappingNode | SequenceNode):
        return "a mapping" if isinstance(node, MappingNode) else "a list"
    if node.tag == _TAG + "null":
        return "null"
    if node.tag != _TAG + "str":
        return _quote(str(node.value))[1:-1]
    return _quote(node.value) + (
        "" if _implicit(node) == node.tag else " (a string: remove the quotes)"
    )


def _implicit(node: Node) -> str:
    """The tag the scalar's text would get unquoted and untagged."""
    return str(_RESOLVER.resolve(ScalarNode, node.value, (True, False)))


def _quote(text: str) -> str:
    return json.dumps(text if len(text) <= 60 else text[:57] + "...", ensure_ascii=False)


def _parse_size(text: str) -> int | None:
    match = _SIZE_RE.fullmatch(text.strip())
    factor = _SIZE_UNITS.get(match[2].lower()) if match else None
    if match is None or factor is None:
        return None
    return int(Decimal(match[1]) * factor)  # Decimal: no float rounding or overflow


def _parse_duration(text: str) -> float | None:
    match = _DURATION_RE.fullmatch(text.strip())
    return float(match[1]) * _DURATION_UNITS[match[2]] if match else None


def _format_size(size: int) -> str:
    for unit, factor in (("TiB", 1024 * GiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size / MiB:.1f}MiB" if size >= MiB else f"{size} bytes"


def _format_duration(seconds: float) -> str:
    for unit, factor in (("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{seconds / factor:g}{unit}"
    return f"{seconds:g}s"


def _normalise_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme.lower() + sep + rest if sep else url


def _has_dot_segment(url: str) -> bool:
    return any(part in (".", "..") for part in unquote(url.partition("://")[2] or url).split("/"))
