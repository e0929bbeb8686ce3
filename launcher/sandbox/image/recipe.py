"""What an image is made of: the two images ``duckcell image build`` makes, as data.

``ImageBuilder`` (the engine side) builds any ``Recipe``: it collects the recipe's files, pins
its packages to the versions installed next to the launcher, hashes both with the base image
into the content-hash label, and sends the files plus the directory ``prepare`` returns (under
``context_dir``) as the build context. Two recipes exist:

- ``sandbox_recipe``: the sandbox, small (Python, DuckDB, pyarrow, gRPC and the runner); its
  wheels are installed on the host and copied in (``site/``).
- ``duckcell_recipe``: the ``duckcell`` package itself (worker, control plane, CLI) from
  ``deploy/Dockerfile``; its wheel files are downloaded on the host (``wheels/``, pip included)
  and installed inside with ``pip --no-index``, so the build needs no network either.

Raises ImageBuildError when a source file is missing or pip cannot fetch a wheel.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import ImageBuildError
from ...resources import PACKAGE_DIR
from .context import (
    HASH_SCHEME,
    SANDBOX_PACKAGES,
    ContextFiles,
    WheelSet,
    binary_wheel_flags,
    find_sandbox_dir,
    installed_here,
    prepare_site,
    run_pip,
)

SANDBOX_TAG = "duckcell-sandbox:latest"
DUCKCELL_TAG = "duckcell:latest"
DUCKCELL_SCHEME = "duckcell-image/1"
# What the package needs at run time when its metadata cannot say (it always can once
# installed); pip installs the rest inside the image and is not kept there.
_RUNTIME_FALLBACK = (
    "boto3", "cryptography", "docker", "duckdb", "grpcio", "protobuf", "pyarrow", "pyyaml",
)  # fmt: skip
_SKIP_DIRS = {"__pycache__", "_resources"}
# What of deploy/ the image runs; the compose files and scripts stay on the host.
_DEPLOY_FILES = {"catalog.yaml", "controlplane-start.sh"}


@dataclass(frozen=True, slots=True)
class Recipe:
    """One image: its default tag, hash scheme, root packages, files and wheel directory."""

    name: str
    tag: str
    scheme: str
    packages: tuple[str, ...]
    collect: Callable[[], ContextFiles]
    prepare: Callable[[WheelSet, Path], Path]
    context_dir: str


def sandbox_recipe(sandbox_dir: Path | None = None, package_dir: Path = PACKAGE_DIR) -> Recipe:
    directory = sandbox_dir or find_sandbox_dir(package_dir)
    return Recipe(
        name="sandbox",
        tag=SANDBOX_TAG,
        scheme=HASH_SCHEME,
        packages=SANDBOX_PACKAGES,
        collect=lambda: ContextFiles.collect(directory, package_dir),
        prepare=prepare_site,
        context_dir="site",
    )


def duckcell_recipe(package_dir: Path = PACKAGE_DIR) -> Recipe:
    repo = package_dir.parent
    return Recipe(
        name="duckcell",
        tag=DUCKCELL_TAG,
        scheme=DUCKCELL_SCHEME,
        packages=(*runtime_packages(), "pip"),
        collect=lambda: duckcell_files(repo, package_dir),
        prepare=download_wheels,
        context_dir="wheels",
    )


def runtime_packages() -> tuple[str, ...]:
    """The duckcell distribution's own requirements (not its extras)."""
    installed = installed_here("duckcell")
    return tuple(installed.requires) if installed else _RUNTIME_FALLBACK


def duckcell_files(repo: Path, package_dir: Path = PACKAGE_DIR) -> ContextFiles:
    """The Dockerfile, the package's sources, the shipped policies, the compose files the
    image runs (``deploy/``) and the sample table the compose catalog serves."""
    deploy = repo / "deploy"
    if not (deploy / "Dockerfile").is_file():
        raise ImageBuildError(
            f"the duckcell image is built from a source checkout: no {deploy / 'Dockerfile'}"
        )
    entries = [("Dockerfile", deploy / "Dockerfile")]
    entries += _tree(package_dir, "app/launcher", lambda p: p.suffix == ".py")
    entries += _tree(repo / "policies", "app/policies", lambda p: p.suffix in (".yaml", ".yml"))
    entries += _tree(deploy, "app/deploy", lambda p: p.name in _DEPLOY_FILES)
    trips = repo / "sample_data" / "trips"
    entries += _tree(trips, "app/sample_data/trips", lambda p: p.suffix == ".parquet")
    if not any(name.startswith("app/sample_data/") for name, _ in entries):
        raise ImageBuildError(f"no sample table in {trips}: run `make demo` or make_sample.py")
    return ContextFiles(tuple(sorted(entries)))


def _tree(root: Path, prefix: str, keep: Callable[[Path], bool]) -> list[tuple[str, Path]]:
    return [
        (f"{prefix}/{path.relative_to(root).as_posix()}", path)
        for path in root.rglob("*")
        if path.is_file() and keep(path) and not _SKIP_DIRS & set(path.parts)
    ]


def wheels_dir(wheels: WheelSet, cache_dir: Path) -> Path:
    return cache_dir / f"wheels-{hashlib.sha256(wheels.key().encode()).hexdigest()[:16]}"


def download_wheels(wheels: WheelSet, cache_dir: Path) -> Path:
    """The wheel files of ``wheels`` for the image's Python and CPU, downloaded once per wheel
    set (pip's cache spares downloads when the set changes); installed inside the build."""
    target = wheels_dir(wheels, cache_dir)
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=cache_dir))
    try:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-input",
            "--disable-pip-version-check", "--dest", str(staging),
            "--cache-dir", str(cache_dir / "pip"), *binary_wheel_flags(wheels),
            *wheels.requirements(),
        ]  # fmt: skip
        run_pip(command, "the duckcell wheels")
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in cache_dir.glob("wheels-*"):
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target
