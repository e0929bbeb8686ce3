"""The control plane's catalog: one normalized document in its data directory, watched.

``duckcell controlplane catalog apply --data DIR FILE`` (or ``serve --catalog FILE``) checks a
catalog YAML file and writes it into the data directory as JSON with every local path made
absolute, atomically (temporary name, then rename), so a running server never reads half a
file and a bad file never replaces a good one. The running server's ``CatalogWatcher`` notices
the new revision within its poll interval and hands it to whoever pushes it to workers: a
catalog change reaches every worker without restarting anything.

The document holds names only: connections, tables, and *references* to secrets
(``{env: NAME}``, ``{file: PATH}``, ``{store: NAME}``) that each worker resolves on its own
host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from launcher.atomic import write_atomically
from launcher.errors import CatalogError
from launcher.model.catalog import Catalog, load_catalog, parse_catalog

from .watch import POLL_INTERVAL_S, FileWatcher

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.json"
CONFIG_LOCK = ".config.lock"


@dataclass(frozen=True, slots=True)
class CatalogVersion:
    """A catalog and the revision that names it (a hash of its normalized document)."""

    catalog: Catalog
    revision: str

    @classmethod
    def of(cls, catalog: Catalog) -> CatalogVersion:
        digest = hashlib.sha256(catalog.to_json().encode()).hexdigest()[:16]
        return cls(catalog, digest)


EMPTY = CatalogVersion.of(Catalog.EMPTY)


@contextlib.contextmanager
def config_lock(data_root: Path) -> Iterator[None]:
    """Hold the data directory's configuration lock: a catalog or policy change checks the
    other and writes its own file under it, so two admin commands cannot each pass their
    check and together leave a role naming a policy that is gone."""
    data_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data_root / CONFIG_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def apply_catalog(
    data_root: Path,
    source: Path,
    *,
    policies: Collection[str] | Callable[[], Collection[str]] = (),
) -> CatalogVersion:
    """Check ``source`` and make it the control plane's catalog. Raises CatalogError.

    ``policies`` are the control plane's own policy names (or a function reading them, called
    under ``config_lock``): when there are any, every policy a role names must be one of them
    (with none, roles name the workers' local policies).
    """
    version = CatalogVersion.of(load_catalog(source))
    with config_lock(data_root):
        _check_and_write(data_root, source, version, policies)
    return version


def _check_and_write(
    data_root: Path,
    source: Path,
    version: CatalogVersion,
    policies: Collection[str] | Callable[[], Collection[str]],
) -> None:
    if callable(policies):
        policies = policies()
    missing = unknown_role_policies(version.catalog, policies) if policies else []
    if missing:
        raise CatalogError(
            f"{source}: "
            + "; ".join(f"role {role!r} names policy {policy!r}" for role, policy in missing)
            + f", which the control plane does not have (it has {', '.join(sorted(policies))})"
            + ": apply the policy first with `duckcell controlplane policy apply`"
        )
    data_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    # 0600 like everything in the control plane's data directory (which is 0700).
    write_atomically(data_root / CATALOG_FILE, version.catalog.to_json().encode(), 0o600)


def unknown_role_policies(catalog: Catalog, policies: Collection[str]) -> list[tuple[str, str]]:
    """``(role, policy)`` for each role naming a policy that is not in ``policies``."""
    return [
        (name, role.policy)
        for name, role in sorted(catalog.roles.items())
        if role.policy is not None and role.policy not in policies
    ]


def read_catalog(data_root: Path) -> CatalogVersion:
    """The applied catalog, or the empty one when none was applied. Raises CatalogError."""
    path = data_root / CATALOG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return EMPTY
    except OSError as error:
        raise CatalogError(f"{path}: cannot read the catalog ({error.strerror})") from None
    return CatalogVersion.of(parse_catalog(text, str(path), Path("/")))


class CatalogWatcher(FileWatcher[CatalogVersion]):
    """Holds the current catalog; ``run`` polls the data directory and reports changes (see
    ``watch.FileWatcher``): a catalog that fails to parse leaves the last good one in force."""

    def __init__(
        self,
        data_root: Path,
        on_change: Callable[[CatalogVersion], object] = lambda version: None,
        *,
        interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        super().__init__(
            data_root / CATALOG_FILE,
            lambda: read_catalog(data_root),
            on_change,
            what="catalog",
            errors=(CatalogError,),
            interval_s=interval_s,
        )
