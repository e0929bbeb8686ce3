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

What goes into the image is decided without an engine in ``launcher.sandbox.image.context``; this
module is the engine side and re-exports those names, so ``launcher.sandbox.image.build`` stays the
one import path.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
import requests.exceptions

from ...errors import EngineTimeoutError, EngineUnavailableError, ImageBuildError
from .context import (
    HASH_SCHEME,
    PACKAGE_DIR,
    SANDBOX_PACKAGES,
    ContextFiles,
    Installed,
    WheelSet,
    content_hash,
    find_sandbox_dir,
    installed_here,
    prepare_site,
    site_dir,
    write_context,
)
from .recipe import SANDBOX_TAG, Recipe, sandbox_recipe

__all__ = [
    "BASE_LABEL",
    "DEFAULT_TAG",
    "HASH_LABEL",
    "HASH_SCHEME",
    "OFFLINE_BASE",
    "PYTHON_BASE",
    "SANDBOX_PACKAGES",
    "WHEELS_LABEL",
    "BuiltImage",
    "ContextFiles",
    "ImageBuilder",
    "Installed",
    "Progress",
    "Recipe",
    "WheelSet",
    "content_hash",
    "find_sandbox_dir",
    "installed_here",
    "prepare_site",
    "site_dir",
    "write_context",
]

Progress = Callable[[str], None]

DEFAULT_TAG = SANDBOX_TAG
PYTHON_BASE = "python:3.11-slim"
OFFLINE_BASE = "duckcell-base:bookworm"
HASH_LABEL = "duckcell.content-hash"
BASE_LABEL = "duckcell.base"
WHEELS_LABEL = "duckcell.wheels"
# The engine's CPU names, as the wheel platform tags spell them (``WheelSet.arch``).
_ARCHES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_ENGINE_HELP = "run `sudo scripts/ensure-docker.sh` or point DOCKER_HOST at a Docker engine"


@dataclass(frozen=True, slots=True)
class BuiltImage:
    tag: str
    image_id: str
    content_hash: str
    reused: bool
    seconds: float


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
    """Builds an image (the sandbox's unless ``recipe`` says otherwise: see
    ``launcher.sandbox.image.recipe``) when its content hash changed; see the module docstring."""

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        tag: str = DEFAULT_TAG,
        progress: Progress | None = None,
        *,
        sandbox_dir: Path | None = None,
        package_dir: Path = PACKAGE_DIR,
        cache_dir: Path | None = None,
        timeout_s: float = 30.0,
        pull_deadline_s: float = 5.0,
        recipe: Recipe | None = None,
    ) -> None:
        self._client = client
        self._tag = tag
        self._progress = progress or (lambda line: None)
        self._sandbox_dir = sandbox_dir or (None if recipe else find_sandbox_dir(package_dir))
        self._package_dir = package_dir
        self._cache_dir = cache_dir or Path.home() / ".cache" / "duckcell"
        self._timeout_s = timeout_s
        self._pull_deadline_s = pull_deadline_s
        self._recipe = recipe or sandbox_recipe(self._sandbox_dir, package_dir)

    def build(self, base: str | None = None, force: bool = False) -> BuiltImage:
        started = time.monotonic()
        files, wheels = self._recipe.collect(), self._wheels()
        existing = self._inspect(self._tag)
        if not force and (reused := self._reusable(existing, files, wheels, base, started)):
            return reused
        self._progress("resolving base image")
        base_ref = self._resolve_base(base)
        base_id = self._require(base_ref)["Id"]
        digest = content_hash(files, wheels, base_id, self._recipe.scheme)
        self._progress(f"base image {base_ref} ({base_id.removeprefix('sha256:')[:12]})")
        if not force and existing and _labels(existing).get(HASH_LABEL) == digest:
            return self._done(existing, digest, True, started)
        verb = "installing" if self._recipe.context_dir == "site" else "fetching"
        self._progress(f"{verb} wheels ({wheels.describe()})")
        site = self._recipe.prepare(wheels, self._cache_dir)
        labels = {HASH_LABEL: digest, BASE_LABEL: base_ref, WHEELS_LABEL: wheels.describe()}
        with tempfile.TemporaryFile(prefix="duckcell-context-") as context:
            write_context(context, files, site, self._recipe.context_dir)
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
        files, wheels = self._recipe.collect(), self._wheels()
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
        digest = content_hash(files, wheels, base_image["Id"], self._recipe.scheme)
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

    def _wheels(self) -> WheelSet:
        return WheelSet.pinned(self._engine_arch(), self._recipe.packages)

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
        sandbox_dir = self._sandbox_dir or find_sandbox_dir(self._package_dir)
        script = sandbox_dir / "build-offline-base.sh"
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
