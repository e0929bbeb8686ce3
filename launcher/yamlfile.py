"""Reading YAML: composed nodes (which keep their line numbers) to checked, typed values.

A shared leaf: the policy reader (``launcher.model.policy``), the catalog reader
(``launcher.model.catalog_yaml``, which turns its errors into ``CatalogError``) and the config
file (``launcher.config``: a ``Reader`` raising ``ConfigError``) build on it. The models decide
which keys mean what; this module owns the mechanics under them: composing a document
without building Python objects, walking its mappings against a schema of known keys, reading
strings, numbers, booleans, sizes and durations out of nodes, and turning every mistake into a
one-line error naming the source, line and field (``PolicyError`` unless a reader says
otherwise). It imports nothing from the models.

Sizes are whole bytes or a number with a unit: B, kB/KB, MB, GB, TB (powers of 1000) or KiB,
MiB, GiB, TiB (powers of 1024). Durations are seconds or a number with ms, s, m or h.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import NoReturn, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from .errors import DuckcellError, PolicyError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_SIZE_UNITS |= {"kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB}
_DURATION_RE = re.compile(r"(\d*\.?\d+)\s*(ms|s|m|h|)")  # "30s", "1.5m", ".5"
_DURATION_UNITS = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_TAG = "tag:yaml.org,2002:"
_INT64_MAX = 2**63 - 1  # what the engine accepts; larger counts are typos
# Implicitly resolved tags; timestamp and merge are then refused as wrong types or keys.
_PLAIN_KINDS = ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge")
_SCALARS = SafeConstructor()  # only its stateless construct_yaml_{int,float,bool} are called
_RESOLVER = Resolver()
E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


@dataclass(slots=True)
class Section:
    """One mapping's entries; ``line`` is where a missing key is reported."""

    path: str
    line: int
    keys: dict[str, Node] = field(default_factory=dict)
    values: dict[str, Node] = field(default_factory=dict)

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key


class Reader:
    """Reads typed values out of one document's nodes; every mistake is a one-line error.

    ``schema`` maps each section path ("" for the top level) to its known keys, space-separated.
    ``error`` is what a mistake raises (``PolicyError`` unless the document is something else)
    and ``keys`` names the top-level keys in messages ("a mapping of policy keys").
    """

    def __init__(
        self,
        source: str,
        schema: Mapping[str, str],
        *,
        error: type[DuckcellError] = PolicyError,
        keys: str = "policy keys",
    ) -> None:
        self.source = source
        self._schema = schema
        self._error = error
        self._keys = keys

    def fail(self, where: Node | int, name: str, text: str) -> NoReturn:
        line = where if isinstance(where, int) else where.start_mark.line + 1
        message = f"{self.source}:{line}: " + (f"{name}: " if name else "") + text
        raise self._error(message.replace("\r", "\\r").replace("\n", "\\n"))

    def compose(self, text: str) -> Node:
        """The document's root node; a YAML syntax error or an empty document is an error."""
        root = self.compose_optional(text)
        if root is None:
            self.fail(1, "", f"expected a mapping of {self._keys}, got an empty document")
        return root

    def compose_optional(self, text: str) -> Node | None:
        """The document's root node, or None for a document with no content (comments only)."""
        try:  # compose, not load: nodes keep their marks and no Python object is ever built
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            what = ", ".join(part for part in (error.context, error.problem) if part)
            where = f" (column {mark.column + 1})" if mark else ""
            self.fail(mark.line + 1 if mark else 1, "", f"invalid YAML: {what}{where}")
        except yaml.reader.ReaderError as error:
            line = text.count("\n", 0, max(error.position, 0)) + 1
            char = error.character if isinstance(error.character, int) else ord(error.character)
            self.fail(line, "", f"invalid YAML: {error.reason} (character {char:#04x})")
        except yaml.YAMLError as error:
            self.fail(1, "", f"invalid YAML: {error}")
        except RecursionError:
            self.fail(1, "", "invalid YAML: nested too deeply")
        return root

    def expect(self, node: Node, name: str, kinds: tuple[str, ...], expected: str) -> str:
        """The node's kind ("str", "int", "map"...) if it is one of ``kinds``."""
        kind = str(node.tag).removeprefix(_TAG)
        forced = kind in ("int", "float", "bool", "null") and _implicit(node) != node.tag
        if kind not in _PLAIN_KINDS or forced:  # forced: "!!int abc" would not construct
            tag = str(node.tag).replace(_TAG, "!!")
            self.fail(node, name, f"expected plain YAML, got the tag {tag}; remove it")
        if kind not in kinds:
            self.fail(node, name, f"expected {expected}, got {found(node)}")
        return kind

    def section(self, node: Node, path: str, line: int) -> Section:
        self.expect(node, path, ("map",), "a mapping" if path else f"a mapping of {self._keys}")
        known, sec = self._schema[path].split(), Section(path, line)
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

    def subsection(self, parent: Section, key: str) -> Section:
        """An optional nested section: absent or null means empty."""
        node = parent.values.get(key)
        if node is None or node.tag == _TAG + "null":
            return Section(key, parent.line)
        return self.section(node, key, parent.keys[key].start_mark.line + 1)

    def require(self, sec: Section, key: str, expected: str) -> Node:
        if key not in sec.values:
            self.fail(sec.line, sec.field(key), f"missing required key; expected {expected}")
        return sec.values[key]

    def get(self, sec: Section, key: str, default: T, read: Callable[..., T], *args: object) -> T:
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
                self.fail(item, f"{name}[{i}]", f"expected {each}, got {found(item)}")
        return tuple(str(item.value) for item in node.value)

    def choice(self, sec: Section, key: str, enum: type[E]) -> E:
        options = " or ".join(quote(member.value) for member in enum)
        node = self.require(sec, key, options)
        self.expect(node, key, ("str",), options)
        if node.value not in {member.value for member in enum}:
            self.fail(node, key, f"expected {options}, got {found(node)}")
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
            self.fail(node, name, f"expected {what} {span}, got {found(node)}")
        return int(value) if kind == "int" else float(value)

    def size(self, node: Node, name: str, minimum: int) -> int:
        kind = self.expect(node, name, ("int", "str"), 'a size like "512MiB"')
        value = _SCALARS.construct_yaml_int(node) if kind == "int" else parse_size(node.value)
        if value is None:
            self.fail(node, name, f'expected a size like "512MiB", got {found(node)}')
        if value < minimum:
            self.fail(node, name, f"expected at least {format_size(minimum)}, got {found(node)}")
        if value > _INT64_MAX:
            self.fail(node, name, f"expected a size below 8EiB, got {found(node)}")
        return int(value)

    def duration(self, node: Node, name: str) -> float:
        expected = 'a duration like "30s", "5m" or "250ms"'
        kind = self.expect(node, name, ("int", "float", "str"), expected)
        value = parse_duration(node.value) if kind == "str" else _float(node)
        if value is None or not math.isfinite(value):
            self.fail(node, name, f"expected {expected}, got {found(node)}")
        if value < 0.001:
            self.fail(node, name, f"expected at least 1ms, got {found(node)}")
        return value


def found(node: Node) -> str:
    """The offending node as a person wrote it; says so when quotes made it a string."""
    if isinstance(node, MappingNode | SequenceNode):
        return "a mapping" if isinstance(node, MappingNode) else "a list"
    if node.tag == _TAG + "null":
        return "null"
    if node.tag != _TAG + "str":
        return quote(str(node.value))[1:-1]
    return quote(node.value) + (
        "" if _implicit(node) == node.tag else " (a string: remove the quotes)"
    )


def quote(text: str) -> str:
    """``text`` in double quotes for a message, cut to 60 characters."""
    return json.dumps(text if len(text) <= 60 else text[:57] + "...", ensure_ascii=False)


def format_size(size: int) -> str:
    """A byte count the way a policy would write it ("512MiB"), for messages."""
    for unit, factor in (("TiB", 1024 * GiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size / MiB:.1f}MiB" if size >= MiB else f"{size} bytes"


def format_duration(seconds: float) -> str:
    """Seconds the way a policy would write them ("5m"), for messages."""
    for unit, factor in (("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{seconds / factor:g}{unit}"
    return f"{seconds:g}s"


def _float(node: Node) -> float:
    return float(_SCALARS.construct_yaml_float(node))


def _implicit(node: Node) -> str:
    """The tag the scalar's text would get unquoted and untagged."""
    return str(_RESOLVER.resolve(ScalarNode, node.value, (True, False)))


def parse_size(text: str) -> int | None:
    """ "10GiB", "500MB", "1.5 GiB" or plain bytes; None when it is none of those."""
    match = _SIZE_RE.fullmatch(text.strip())
    factor = _SIZE_UNITS.get(match[2].lower()) if match else None
    if match is None or factor is None:
        return None
    return int(Decimal(match[1]) * factor)  # Decimal: no float rounding or overflow


def parse_duration(text: str) -> float | None:
    """ "30s", "5m", "1h", "250ms" or plain seconds; None when it is none of those."""
    match = _DURATION_RE.fullmatch(text.strip())
    return float(match[1]) * _DURATION_UNITS[match[2]] if match else None
