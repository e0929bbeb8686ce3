"""Build the sandbox image: offline when needed, and only when its content changed.

The image is a base image plus what the host prepares: the wheels the runner needs, pinned to
the versions installed next to the launcher (so both ends speak the same protocol), the runner,
and the generated protocol package. A sha256 over everything that decides the image
(``content_hash``) is stored as a label; when it matches, a build returns at once, running
neither pip nor docker build.

Base selection, first match wins: an explicit base; ``python:3.11-slim`` present locally; a
pull of it with a short deadline; ``duckcell-base:bookworm`` present locally; building that
with debootstrap (``sandbox_image/build-offline-base.sh``, needs root).

Raises ImageBuildError when the build cannot be done, EngineUnavailableError when no engine
answers and EngineTimeoutError when it stops answering.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import queue
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
import requests.exceptions

from .errors import EngineTimeoutError, EngineUnavailableError, ImageBuildError

Progress = Callable[[str], None]

DEFAULT_TAG = "duckcell-sandbox:latest"
PYTHON_BASE = "python:3.11-slim"
OFFLINE_BASE = "duckcell-base:bookworm"
HASH_LABEL = "duckcell.content-hash"
BASE_LABEL = "duckcell.base"
WHEELS_LABEL = "duckcell.wheels"
SANDBOX_PACKAGES = ("duckdb", "pyarrow", "grpcio", "protobuf")
# Part of the hash: bump it when this module changes what goes into the image.
HASH_SCHEME = "duckcell-sandbox/1"

_PACKAGE_DIR = Path(__file__).resolve().parent
# Both bases are Debian bookworm: CPython 3.11 on glibc 2.36.
_PYTHON_VERSION = "3.11"
_GLIBC_MINOR = 36
_ARCHES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
# Build-time material in the wheels that nothing imports at run time.
_STRIP = ("pyarrow/tests", "pyarrow/include", "pyarrow/src")
# A fixed timestamp keeps the context byte-identical across rebuilds, so the wheel layer
# stays cached however often the wheels are unpacked again.
_MTIME = 315532800
_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_ENGINE_HELP = "run `sudo scripts/ensure-docker.sh` or point DOCKER_HOST at a Docker engine"


@dataclass(frozen=True, slots=True)
class BuiltImage:
    tag: str
    image_id: str
    content_hash: str
    reused: bool
    seconds: float


def find_sandbox_dir(package_dir: Path = _PACKAGE_DIR) -> Path:
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
    def collect(cls, sandbox_dir: Path, package_dir: Path = _PACKAGE_DIR) -> ContextFiles:
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


def content_hash(files: ContextFiles, wheels: WheelSet, base_id: str) -> str:
    """sha256 over everything that decides the image; needs neither pip nor the engine."""
    digest = hashlib.sha256(f"{HASH_SCHEME}\n".encode())
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


def _pip_install(wheels: WheelSet, target: Path, pip_cache: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-input",
        "--disable-pip-version-check", "--target", str(target), "--cache-dir", str(pip_cache),
        # Binary wheels for the image's Python and CPU, not this host's. --no-deps: the
        # requirements already list every dependency (the build's import check proves it).
        "--only-binary=:all:", "--no-deps", "--no-compile", "--implementation", "cp",
        "--python-version", _PYTHON_VERSION, "--abi", "cp" + _PYTHON_VERSION.replace(".", ""),
        *(flag for platform in wheels.platforms() for flag in ("--platform", platform)),
        *wheels.requirements(),
    ]  # fmt: skip
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ImageBuildError("pip did not install the sandbox wheels within 30 minutes") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
        detail = (errors or done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageBuildError(f"pip could not fetch the sandbox wheels: {detail}")


def write_context(out: BinaryIO, files: ContextFiles, site: Path) -> None:
    """The build context as a tar with normalized owners, modes and times."""

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
            name = f"site/{path.relative_to(site).as_posix()}"
            tar.add(path, name, recursive=False, filter=normalized)


@contextmanager
def _engine_errors(what: str) -> Iterator[None]:
    """Docker and HTTP exceptions become duckcell errors here and nowhere else."""
    try:
        yield
    except docker.errors.APIError as error:
        raise ImageBuildError(
            f"Docker engine refused {what}: {error.explanation or error}"
        ) from None
    except requests.exceptions.ReadTimeout:
        raise EngineTimeoutError(f"Docker engine stopped answering during {what}") from None
    except (requests.exceptions.RequestException, docker.errors.DockerException) as error:
        raise EngineUnavailableError(
            f"no Docker engine answers ({error}); {_ENGINE_HELP}"
        ) from None


class ImageBuilder:
    """Builds the sandbox image when its content hash changed; see the module docstring."""

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        tag: str = DEFAULT_TAG,
        progress: Progress | None = None,
        *,
        sandbox_dir: Path | None = None,
        package_dir: Path = _PACKAGE_DIR,
        cache_dir: Path | None = None,
        timeout_s: float = 30.0,
        pull_deadline_s: float = 5.0,
    ) -> None:
        self._client = client
        self._tag = tag
        self._progress = progress or (lambda line: None)
        self._sandbox_dir = sandbox_dir or find_sandbox_dir(package_dir)
        self._package_dir = package_dir
        self._cache_dir = cache_dir or Path.home() / ".cache" / "duckcell"
        self._timeout_s = timeout_s
        self._pull_deadline_s = pull_deadline_s

    def build(self, base: str | None = None, force: bool = False) -> BuiltImage:
        started = time.monotonic()
        files = ContextFiles.collect(self._sandbox_dir, self._package_dir)
        wheels = WheelSet.pinned(self._engine_arch())
        existing = self._inspect(self._tag)
        if not force and (reused := self._reusable(existing, files, wheels, base, started)):
            return reused
        self._progress("resolving base image")
        base_ref = self._resolve_base(base)
        base_id = self._require(base_ref)["Id"]
        digest = content_hash(files, wheels, base_id)
        self._progress(f"base image {base_ref} ({base_id.removeprefix('sha256:')[:12]})")
        if not force and existing and _labels(existing).get(HASH_LABEL) == digest:
            return self._done(existing, digest, True, started)
        self._progress(f"installing wheels ({wheels.describe()})")
        site = prepare_site(wheels, self._cache_dir)
        labels = {HASH_LABEL: digest, BASE_LABEL: base_ref, WHEELS_LABEL: wheels.describe()}
        with tempfile.TemporaryFile(prefix="duckcell-context-") as context:
            write_context(context, files, site)
            self._progress(f"sending build context ({context.tell() / 2**20:.0f} MiB)")
            context.seek(0)
            self._docker_build(context, base_ref, labels)
        built = self._require(self._tag)
        if _labels(built).get(HASH_LABEL) != digest:
            raise ImageBuildError(f"docker build finished but {self._tag} lacks the new label")
        if existing and existing["Id"] != built["Id"]:
            # Else the replaced build lingers as a dangling ~500 MB image. The engine refuses
            # while a sandbox still uses it or another tag names it; then it stays.
            with suppress(docker.errors.DockerException, requests.exceptions.RequestException):
                self._api().remove_image(existing["Id"])
        return self._done(built, digest, False, started)

    def is_current(self) -> bool:
        """True when the tagged image matches the sources and wheels as they are now."""
        files = ContextFiles.collect(self._sandbox_dir, self._package_dir)
        wheels = WheelSet.pinned(self._engine_arch())
        existing = self._inspect(self._tag)
        return self._reusable(existing, files, wheels, None, time.monotonic()) is not None

    def _reusable(
        self,
        existing: Mapping[str, Any] | None,
        files: ContextFiles,
        wheels: WheelSet,
        base: str | None,
        started: float,
    ) -> BuiltImage | None:
        # Decided before resolving the base, so an up-to-date image never waits for a pull:
        # compared against the preferred base if present, else the one it was built on.
        if existing is None:
            return None
        labels = _labels(existing)
        base_ref = base or (PYTHON_BASE if self._inspect(PYTHON_BASE) else labels.get(BASE_LABEL))
        base_image = self._inspect(base_ref) if base_ref else None
        if base_image is None:
            return None
        digest = content_hash(files, wheels, base_image["Id"])
        if labels.get(HASH_LABEL) != digest:
            return None
        return self._done(existing, digest, True, started)

    def _done(
        self, image: Mapping[str, Any], digest: str, reused: bool, began: float
    ) -> BuiltImage:
        seconds = time.monotonic() - began
        state = "is up to date" if reused else f"ready in {seconds:.0f} s"
        self._progress(f"image {self._tag} {state} (hash {digest[:12]})")
        return BuiltImage(self._tag, image["Id"], digest, reused, seconds)

    def _resolve_base(self, base: str | None) -> str:
        if base:
            if self._inspect(base) or self._pull(base):
                return base
            raise ImageBuildError(f"base image {base} is not present and could not be pulled")
        if self._inspect(PYTHON_BASE) or self._pull(PYTHON_BASE):
            return PYTHON_BASE
        if self._inspect(OFFLINE_BASE):
            self._progress(f"no registry: using the offline base {OFFLINE_BASE}")
            return OFFLINE_BASE
        self._build_offline_base()
        return OFFLINE_BASE

    def _pull(self, ref: str) -> bool:
        """Gives up when the registry does not answer within the deadline, or a started pull
        stalls for a minute. The pulling thread is then abandoned: a blocked HTTP read cannot
        be interrupted, and the engine finishes or drops the pull by itself."""
        self._progress(f"pulling {ref}")
        events: queue.Queue[tuple[str, str]] = queue.Queue()

        def consume() -> None:
            try:
                for event in self._api().pull(ref, stream=True, decode=True):
                    kind = "error" if "error" in event else "progress"
                    events.put((kind, str(event.get("error") or event.get("status", ""))))
                events.put(("done", ""))
            except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
                events.put(("error", str(error)))

        threading.Thread(target=consume, name="duckcell-pull", daemon=True).start()
        wait_s = self._pull_deadline_s
        while True:
            try:
                kind, text = events.get(timeout=wait_s)
            except queue.Empty:
                self._progress(f"cannot pull {ref}: no answer within {wait_s:.0f} s")
                return False
            if kind == "error":
                self._progress(f"cannot pull {ref}: {(text.strip() or 'failed')[:160]}")
                return False
            if kind == "done":
                return self._inspect(ref) is not None
            wait_s = 60.0

    def _build_offline_base(self) -> None:
        script = self._sandbox_dir / "build-offline-base.sh"
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            raise ImageBuildError(
                f"no base image: {PYTHON_BASE} cannot be pulled and {OFFLINE_BASE} is missing; "
                f"run `sudo bash {script}` (needs debootstrap, which scripts/ensure-docker.sh "
                "installs) or pass --base IMAGE"
            )
        self._progress(f"building the offline base {OFFLINE_BASE} with debootstrap")
        with subprocess.Popen(
            ["bash", str(script), OFFLINE_BASE],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as process:
            for line in process.stdout or ():
                self._progress(line.rstrip())
        if process.returncode != 0:
            raise ImageBuildError(f"building {OFFLINE_BASE} failed (exit {process.returncode})")

    def _docker_build(self, context: BinaryIO, base_ref: str, labels: dict[str, str]) -> None:
        step, output = "the start", deque[str](maxlen=4)
        with _engine_errors("the image build"):
            events = self._api().build(
                fileobj=context,
                custom_context=True,
                tag=self._tag,
                buildargs={"BASE_IMAGE": base_ref},
                labels=labels,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
                # Between reads, not in total: a quiet step (compileall) must not time out.
                timeout=600,
            )
            for event in events:
                if "error" in event:
                    message = (event.get("errorDetail") or {}).get("message") or event["error"]
                    seen = f" (output: {' | '.join(output)})" if output else ""
                    raise ImageBuildError(f"docker build failed at {step}: {message.strip()}{seen}")
                for line in str(event.get("stream", "")).splitlines():
                    line = line.strip()
                    if match := _STEP.match(line):
                        step = f"step {match[1]}/{match[2]}"
                        output.clear()
                        self._progress(f"building image: {step}: {match[3][:70]}")
                    elif line and not line.startswith("--->"):
                        output.append(line[:200])

    def _inspect(self, ref: str) -> dict[str, Any] | None:
        with _engine_errors(f"inspecting {ref}"):
            try:
                return self._api().inspect_image(ref)
            except docker.errors.ImageNotFound:
                return None

    def _require(self, ref: str) -> dict[str, Any]:
        image = self._inspect(ref)
        if image is None:
            raise ImageBuildError(f"image {ref} vanished from the engine during the build")
        return image

    def _engine_arch(self) -> str:
        with _engine_errors("the version query"):
            arch = str(self._api().version().get("Arch", ""))
        if arch not in _ARCHES:
            raise ImageBuildError(f"the engine runs on {arch!r}; sandboxes need amd64 or arm64")
        return _ARCHES[arch]

    def _api(self) -> docker.APIClient:
        if self._client is None:
            with _engine_errors("connecting"):
                client = docker.from_env(timeout=int(self._timeout_s))
                client.ping()
            self._client = client
        return self._client.api


def _labels(image: Mapping[str, Any]) -> dict[str, str]:
    return dict((image.get("Config") or {}).get("Labels") or {})
