"""The control plane's policies: validated YAML documents in its data directory, watched.

``duckcell controlplane policy apply --data DIR FILE...`` (or ``serve --policies DIR``) checks
each policy file with the worker's own parser (``launcher.model.policy``: errors name file and line)
and, only when every file is valid, writes the whole set into ``DATA/policies.json`` at once
(temporary name, then rename): a running server never reads half a set, and a bad file changes
nothing. ``policy remove NAME`` takes one out the same way. The running server's
``PolicyWatcher`` notices a new revision within its poll interval and the server pushes it to
every worker with the catalog (``ConfigPush.policies``); each worker then replaces the pools of
the policies whose settings changed, without a restart.

While the control plane holds no policy, workers use their own ``policies/`` directories (the
behaviour before policies moved here). Once it holds some, every policy a catalog role names
must be one of them: ``apply`` and ``remove`` refuse a set that would leave a role's policy
undefined, and ``launcher.controlplane.catalogs.apply_catalog`` refuses such a catalog.

The stored text is the file as written, comments included, so ``policy show`` gives it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from launcher.atomic import write_atomically
from launcher.errors import PolicyError
from launcher.model.catalog import Catalog
from launcher.model.policy import Policy, load_policy_text, read_policy_file

from .catalogs import config_lock, read_catalog, unknown_role_policies
from .watch import POLL_INTERVAL_S, FileWatcher

log = logging.getLogger(__name__)

POLICIES_FILE = "policies.json"


@dataclass(frozen=True, slots=True)
class PolicyDocuments:
    """The control plane's policies as YAML texts by name, and the revision naming the set."""

    texts: Mapping[str, str]
    revision: str

    @classmethod
    def of(cls, texts: Mapping[str, str]) -> PolicyDocuments:
        ordered = dict(sorted(texts.items()))
        digest = "" if not ordered else hashlib.sha256(_to_json(ordered).encode()).hexdigest()[:16]
        return cls(MappingProxyType(ordered), digest)

    def names(self) -> list[str]:
        return list(self.texts)


EMPTY = PolicyDocuments.of({})


def apply_policies(
    data_root: Path,
    sources: Iterable[Path],
    *,
    catalog: Catalog | None = None,
    replace: bool = False,
) -> tuple[PolicyDocuments, list[Policy]]:
    """Check every file and add (or update) them all, or none. Raises PolicyError.

    ``catalog`` is what the roles are checked against; by default the applied one (``serve``
    passes the catalog it is about to apply, so the two can change together). With
    ``replace`` the files become the whole set (``serve --policies DIR``: a file deleted from
    DIR is no longer pushed); else they are added to the stored ones.
    """
    texts: dict[str, str] = {}
    policies: list[Policy] = []
    seen: dict[str, Path] = {}
    for path in (Path(source) for source in sources):
        policy, text = read_policy_file(path)  # read once: what is checked is what is stored
        if policy.name in seen:
            raise PolicyError(
                f"{path}: policy {policy.name!r} is also in {seen[policy.name]}; apply one of them"
            )
        seen[policy.name] = path
        texts[policy.name] = text
        policies.append(policy)
    with config_lock(data_root):
        stored = {} if replace else dict(read_policies(data_root).texts)
        documents = PolicyDocuments.of(stored | texts)
        _check_roles(data_root, documents, catalog)
        _write(data_root, documents)
    return documents, policies


def remove_policy(data_root: Path, name: str) -> PolicyDocuments:
    """Take one policy out. Raises PolicyError when it is unknown or a role still names it."""
    with config_lock(data_root):
        current = read_policies(data_root)
        if name not in current.texts:
            known = ", ".join(current.names()) or "none"
            raise PolicyError(f"no control-plane policy {name!r}; known: {known}")
        documents = PolicyDocuments.of({k: v for k, v in current.texts.items() if k != name})
        _check_roles(data_root, documents, None)
        _write(data_root, documents)
    return documents


def read_policies(data_root: Path) -> PolicyDocuments:
    """The stored policies (none when nothing was applied). Raises PolicyError.

    Every text is validated again, so a hand-edited file is refused here rather than by
    every worker.
    """
    path = data_root / POLICIES_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return EMPTY
    except (OSError, ValueError) as error:
        raise PolicyError(f"{path}: cannot read the stored policies ({error})") from None
    texts = doc.get("policies") if isinstance(doc, dict) else None
    if not isinstance(texts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in texts.items()
    ):
        raise PolicyError(f'{path}: expected {{"policies": {{NAME: YAML}}}}; apply them again')
    for name, text in texts.items():
        policy = load_policy_text(text, f"{path}[{name}]")
        if policy.name != name:
            raise PolicyError(f"{path}: policy {name!r} is stored under another name")
    return PolicyDocuments.of(texts)


def policy_files(directory: Path) -> list[Path]:
    """The policy files in a directory, as ``launcher.model.policy.load_policies`` picks them."""
    if not directory.is_dir():
        raise PolicyError(f"{directory}: expected a directory of policy files, found none")
    return [
        path
        for path in sorted(directory.iterdir())
        if path.suffix in (".yaml", ".yml") and not path.name.startswith(".") and path.is_file()
    ]


def stored_policy_names(data_root: Path) -> list[str]:
    """Names of the control plane's policies; empty when workers use their own."""
    return read_policies(data_root).names()


def _check_roles(data_root: Path, documents: PolicyDocuments, catalog: Catalog | None) -> None:
    if not documents.texts:
        return  # no policies of its own: roles name the workers' policies
    roles = catalog if catalog is not None else read_catalog(data_root).catalog
    missing = unknown_role_policies(roles, documents.names())
    if missing:
        raise PolicyError(
            "the control plane's policies would not include "
            + "; ".join(f"{policy!r} (named by role {role!r})" for role, policy in missing)
            + ": apply those policies too, or change the roles in the catalog"
        )


def _write(data_root: Path, documents: PolicyDocuments) -> None:
    data_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    # 0600 like everything in the control plane's data directory (which is 0700).
    write_atomically(data_root / POLICIES_FILE, _to_json(dict(documents.texts)).encode(), 0o600)


def _to_json(texts: Mapping[str, str]) -> str:
    return json.dumps({"policies": dict(texts)}, sort_keys=True, indent=1)


class PolicyWatcher(FileWatcher[PolicyDocuments]):
    """Holds the current policies; ``run`` polls the data directory and reports changes (see
    ``watch.FileWatcher``): a set that fails to load leaves the last good one in force."""

    def __init__(
        self,
        data_root: Path,
        on_change: Callable[[PolicyDocuments], object] = lambda documents: None,
        *,
        interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        super().__init__(
            data_root / POLICIES_FILE,
            lambda: read_policies(data_root),
            on_change,
            what="policies",
            errors=(PolicyError,),
            interval_s=interval_s,
        )
