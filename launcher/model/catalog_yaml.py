"""Reading catalog YAML: the policy reader's mechanics, with catalog errors and named entries.

``launcher.model.catalog`` owns the catalog model and decides which keys mean what; this module
adapts ``launcher.yamlfile.Reader`` (composed nodes that keep their line numbers, one-line errors
naming source, line and field) to catalogs: every mistake is a ``CatalogError``, and the two
mappings whose keys are names the author chose (``connections`` and ``tables``) are read entry by
entry, each entry checked against the keys its kind of section knows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import NoReturn

from yaml.nodes import Node

from ..errors import CatalogError
from ..yamlfile import Reader, Section, found

# Section paths with the author's names replaced by "*"; values are the known keys.
_SCHEMA = {
    "": "connections tables roles",
    "connections.*": "kind endpoint region path_style access_key_id secret_access_key "
    "session_token worker listing_ttl",
    "connections.*.*": "env file store",
    "tables.*": "connection path format",
    "roles.*": "policy tables",
}


class _Schema(Mapping[str, str]):
    """``Reader``'s schema lookup, by section path ("connections.lake" -> "connections.*")."""

    def __getitem__(self, path: str) -> str:
        parts = path.split(".")  # names are checked before their sections are read: no dots
        return _SCHEMA[".".join("*" if i else part for i, part in enumerate(parts))]

    def __iter__(self) -> Iterator[str]:
        return iter(_SCHEMA)

    def __len__(self) -> int:
        return len(_SCHEMA)


class CatalogReader(Reader):
    """A ``Reader`` for catalog documents: same checks and messages, ``CatalogError`` raised."""

    def __init__(self, source: str) -> None:
        super().__init__(source, _Schema())

    def fail(self, where: Node | int, name: str, text: str) -> NoReturn:
        line = where if isinstance(where, int) else where.start_mark.line + 1
        # The shared reader calls the document's root "a mapping of policy keys".
        text = text.replace("policy keys", "catalog keys")
        message = f"{self.source}:{line}: " + (f"{name}: " if name else "") + text
        raise CatalogError(message.replace("\r", "\\r").replace("\n", "\\n"))

    def entries(
        self, parent: Section, key: str, pattern: re.Pattern[str], what: str
    ) -> Iterator[tuple[str, Node, Section]]:
        """Each ``name: {...}`` of an optional mapping of named entries, as its own Section.

        Names must match ``pattern`` (``what`` describes a good one) and appear once, exactly.
        """
        node = parent.values.get(key)
        if node is None or node.tag.endswith(":null"):
            return
        self.expect(node, key, ("map",), "a mapping from each name to its settings")
        seen: dict[str, int] = {}
        for name_node, value in node.value:
            self.expect(name_node, key, ("str",), what)
            name = str(name_node.value)
            if not pattern.fullmatch(name):
                self.fail(name_node, key, f"expected {what}, got {found(name_node)}")
            if name in seen:
                self.fail(
                    name_node,
                    f"{key}.{name}",
                    f"expected each name once, got it again (first on line {seen[name]})",
                )
            seen[name] = name_node.start_mark.line + 1
            yield name, name_node, self.section(value, f"{key}.{name}", seen[name])
