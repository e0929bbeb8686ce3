"""What goes into the sandbox image, decided without an engine: the wheels pinned to the
versions installed next to the launcher, the runner and protocol files, the content hash over
all of it, the wheels installed into a site directory with pip, and the build context as a tar.

Nothing here talks to Docker; ``launcher.sandbox.image.build`` (the engine side) builds on it.

Raises ImageBuildError when a source file or an installed package is missing, or pip fails.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ...errors import ImageBuildError
from ...resources import PACKAGE_DIR

SANDBOX_PACKAGES = ("duckdb", "pyarrow", "grpcio", "protobuf")
# Part of the hash: bump it when this module changes what goes into the image.
HASH_SCHEME = "duckcell-sandbox/1"

# Both bases are Debian bookworm: CPython 3.11 on glibc 2.36.
_PYTHON_VERSION = "3.11"
_GLIBC_MINOR = 36
# Build-time material in the wheels that nothing imports at run time.
_STRIP = ("pyarrow/tests", "pyarrow/include", "pyarrow/src")
# A fixed timestamp keeps the context byte-identical across rebuilds, so the wheel layer
# stays cached however often the wheels are unpacked again.
_MTIME = 315532800


def find_sandbox_dir(package_dir: Path = PACKAGE_DIR) -> Path:
    """``sandbox_image/``: the repo's next to ``launcher/`` (editable install) if there, else
    the copy a wheel ships in ``launcher/_resources``."""
    for candidate in (
        package_dir.parent / "sandbox_image",
        package_dir / "_resources" / "sandbox_image",
    ):
        if (candidate / "Dockerfile").is_file():
            return candidate
    raise ImageBuildError(
        f"sandbox_image/ is neither next to {package_dir} nor in its _resources; reinstall duckcell"
    )


@dataclass(frozen=True, slots=True)
class Installed:
    """A distribution installed next to the launcher: its version and what it requires."""

    version: str
    requires: tuple[str, ...]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_here(name: str) -> Installed | None:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    # "name<op>version; marker": only the name matters, and nothing needed only by an extra.
    requires = tuple(
        match[0]
        for line in dist.requires or ()
        if "extra" not in line.partition(";")[2]
        and (match := re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line))
    )
    return Installed(dist.version, requires)


@dataclass(frozen=True, slots=True)
class WheelSet:
    """The wheels the image gets: the launcher's own versions, for the engine's CPU."""

    versions: tuple[tuple[str, str], ...]
    arch: str

    @classmethod
    def pinned(
        cls,
        arch: str,
        packages: Iterable[str] = SANDBOX_PACKAGES,
        installed: Callable[[str], Installed | None] = installed_here,
    ) -> WheelSet:
        """The packages and all they require, each at the version installed here. (grpcio
        needs typing-extensions.) A requirement not installed here was not needed here."""
        roots = {_normalize(name) for name in packages}
        pins: dict[str, str] = {}
        pending = sorted(roots)
        while pending:
            name = _normalize(pending.pop())
            if name in pins:
                continue
            found = installed(name)
            if found is None and name in roots:
                raise ImageBuildError(
                    f"{name} is not installed next to the launcher, so the sandbox's version is "
                    "unknown; install duckcell with its dependencies (make install)"
                )
            if found is not None:
                pins[name] = found.version
                pending += found.requires
        return cls(tuple(sorted(pins.items())), arch)

    def requirements(self) -> list[str]:
        return [f"{name}=={version}" for name, version in self.versions]

    def platforms(self) -> list[str]:
        newer = [f"manylinux_2_{minor}_{self.arch}" for minor in range(17, _GLIBC_MINOR + 1)]
        return [f"manylinux2014_{self.arch}", *newer]

    def describe(self) -> str:
        return ", ".join(f"{name} {version}" for name, version in self.versions)

    def key(self) -> str:
        return f"cp{_PYTHON_VERSION} {self.arch} " + " ".join(self.requirements())


@dataclass(frozen=True, slots=True)
class ContextFiles:
    """The small part of the build context, all of it hashed: (path in context, source)."""

    entries: tuple[tuple[str, Path], ...]

    @classmethod
    def collect(cls, sandbox_dir: Path, package_dir: Path = PACKAGE_DIR) -> ContextFiles:
        runner = sandbox_dir / "runner" / "duckcell_runner"
        if not (runner / "__main__.py").is_file():
            raise ImageBuildError(f"the sandbox runner is missing: no {runner / '__main__.py'}")
        protocol = package_dir / "protocol"
        for generated in ("runner_pb2.py", "runner_pb2_grpc.py"):
            if not (protocol / generated).is_file():
                raise ImageBuildError(f"{protocol / generated} is missing; run `make proto`")
        entries = [("Dockerfile", sandbox_dir / "Dockerfile")]
        entries += [
            (f"app/duckcell_runner/{path.relative_to(runner).as_posix()}", path)
            for path in runner.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
        ]
        # The package marker and the generated code: the runner imports nothing else of ours.
        entries.append(("app/launcher/__init__.py", package_dir / "__init__.py"))
        entries += [(f"app/launcher/protocol/{p.name}", p) for p in protocol.glob("*.py")]
        return cls(tuple(sorted(entries)))


def content_hash(
    files: ContextFiles, wheels: WheelSet, base_id: str, scheme: str = HASH_SCHEME
) -> str:
    """sha256 over everything that decides the image; needs neither pip nor the engine."""
    digest = hashlib.sha256(f"{scheme}\n".encode())
    for name, source in files.entries:
        digest.update(f"file {name} {hashlib.sha256(source.read_bytes()).hexdigest()}\n".encode())
    digest.update(f"wheels {wheels.key()}\nbase {base_id}\n".encode())
    return digest.hexdigest()


def site_dir(wheels: WheelSet, cache_dir: Path) -> Path:
    """Where ``prepare_site`` keeps the installed wheels of one wheel set."""
    return cache_dir / f"site-{hashlib.sha256(wheels.key().encode()).hexdigest()[:16]}"


def prepare_site(wheels: WheelSet, cache_dir: Path) -> Path:
    """The wheels installed into a site-packages directory, kept per wheel set so rebuilding
    for a runner change runs no pip; pip's own cache spares downloads when the set changes."""
    target = site_dir(wheels, cache_dir)
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=cache_dir))
    try:
        _pip_install(wheels, staging / "site", cache_dir / "pip")
        for relative in _STRIP:
            shutil.rmtree(staging / "site" / relative, ignore_errors=True)
        # The rename makes the directory appear whole or not at all. Losing the race to a
        # concurrent build is fine: its copy is identical.
        try:
            (staging / "site").rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # Older wheel sets take ~250 MB each and will not be used again.
    for stale in cache_dir.glob("site-*"):
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def binary_wheel_flags(wheels: WheelSet) -> list[str]:
    """pip's flags for binary wheels of the image's Python and CPU, not this host's."""
    return [
        "--only-binary=:all:", "--no-deps", "--implementation", "cp",
        "--python-version", _PYTHON_VERSION, "--abi", "cp" + _PYTHON_VERSION.replace(".", ""),
        *(flag for platform in wheels.platforms() for flag in ("--platform", platform)),
    ]  # fmt: skip


def _pip_install(wheels: WheelSet, target: Path, pip_cache: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
        "--disable-pip-version-check", "--target", str(target), "--cache-dir", str(pip_cache),
        # --no-deps (in the flags): the requirements already list every dependency (the
        # build's import check proves it).
        "--no-compile", *binary_wheel_flags(wheels), *wheels.requirements(),
    ]  # fmt: skip
    run_pip(command, "the sandbox wheels")


def write_context(out: BinaryIO, files: ContextFiles, site: Path, prefix: str = "site") -> None:
    """The build context as a tar with normalized owners, modes and times; ``site`` goes in
    under ``prefix`` (the sandbox's installed wheels, or the duckcell image's wheel files)."""

    def normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = _MTIME
        info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
        return info

    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, source in files.entries:
            tar.add(source, name, recursive=False, filter=normalized)
        for path in sorted(site.rglob("*")):
            name = f"{prefix}/{path.relative_to(site).as_posix()}"
            tar.add(path, name, recursive=False, filter=normalized)


def run_pip(command: list[str], what: str) -> None:
    """Run pip (``command``, fetching or installing ``what``) within 30 minutes; raises
    ``ImageBuildError`` with pip's last error line."""
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"pip did not fetch {what} within 30 minutes") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
        detail = (errors or done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageBuildError(f"pip could not fetch {what}: {detail}")
