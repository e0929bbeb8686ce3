"""``duckcell worker``: keep this worker's tunnel open (parse and wire only).

Before the ``Worker`` starts, in this order, each failure one line on stderr and exit 2 (so
``docker compose logs worker`` says what to do and the restart policy sees the failure):

1. the state directory (and the cache, when apart) must be writable;
2. in a container (``--host-paths`` not ``none``): an engine socket must be mounted, and the
   host paths of the state and cache directories found (``launcher.worker.hostpaths``);
3. with no identity in the state directory and a token given (``--enroll-token-file``,
   ``DUCKCELL_ENROLL_TOKEN``, or the Docker secret ``/run/secrets/duckcell_enroll_token``), it
   enrolls at ``--enroll-address``; with an identity it skips enrollment, so a restarted
   container is the same worker.

While it runs it keeps ``STATE/health`` saying ``connected`` or ``disconnected`` (the compose
health check reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import math
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import LauncherConfig, default_launcher_id
from ..data.grants import grants_from
from ..errors import ControlPlaneError, DuckcellError
from ..inputs import read_small_file
from ..sandbox.backend.docker_engine import DockerBackend
from ..worker.audit import AUDIT_FILE
from ..worker.daemon import Worker, host_data_path
from ..worker.dialing import ProxyConfig
from ..worker.enroll import IDENTITY_DIR, Identity, enroll
from ..worker.hostpaths import MOUNTINFO, parse_host_paths, resolve_host_paths
from ..worker.tunnel import DEFAULT_DRAIN_GRACE_S
from .secrets import secret_store

MAX_DRAIN_GRACE_S = 86400.0
SECRET_TOKEN_FILE = Path("/run/secrets/duckcell_enroll_token")
HEALTH_FILE = "health"
ENGINE_SOCKET = Path("/var/run/docker.sock")
_HEALTH_POLL_S = 1.0


def add_worker_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    address: Callable[[str], str],
) -> None:
    run = commands.add_parser(
        "worker",
        help="keep this worker's tunnel to the control plane open until SIGTERM",
        description="Dial out to the control plane over mTLS, send heartbeats, reconnect with "
        "backoff, and run the queries the control plane routes here in this host's sandboxes "
        "(launcher config as for `duckcell query`). On SIGTERM or SIGINT it drains: takes no "
        "new query, lets running ones finish for --drain-grace seconds, stops the rest (their "
        "clients are told to retry), removes its sandboxes and exits 0; a second signal stops "
        "at once. Each query is recorded in STATE/audit.jsonl before it runs and when it ends "
        "(one a crash cut short, as lost at the next start); catalog secrets named "
        "{store: NAME} come from STATE/secrets (`duckcell secrets`). HTTPS_PROXY/NO_PROXY are "
        "honoured. With no identity in STATE and an enrollment token given, it enrolls first.",
    )
    state = os.environ.get("DUCKCELL_STATE_DIR")
    run.add_argument(
        "--state",
        type=Path,
        required=not state,
        default=Path(state) if state else None,
        help="worker state directory (default: DUCKCELL_STATE_DIR)",
    )
    run.add_argument(
        "--control-plane",
        type=address,
        help="HOST:PORT of the tunnel (default: from the enrolled identity)",
    )
    run.add_argument(
        "--enroll-token-file",
        type=Path,
        help="enroll first when STATE holds no identity, with the token in FILE (else "
        f"DUCKCELL_ENROLL_TOKEN, else the Docker secret {SECRET_TOKEN_FILE}); ignored once "
        "enrolled",
    )
    run.add_argument(
        "--enroll-address",
        type=address,
        default=os.environ.get("DUCKCELL_ENROLL_ADDRESS") or None,
        help="HOST:PORT of the control plane to enroll with (DUCKCELL_ENROLL_ADDRESS)",
    )
    run.add_argument(
        "--name",
        default=os.environ.get("DUCKCELL_WORKER_NAME") or socket.gethostname(),
        help="worker name when enrolling (DUCKCELL_WORKER_NAME; default: the host name)",
    )
    run.add_argument(
        "--host-paths",
        default=os.environ.get("DUCKCELL_HOST_PATHS") or "none",
        metavar="none|auto|INSIDE=HOST,...",
        help="where the engine sees STATE and the cache when this worker runs in a container: "
        "`auto` inspects its own container's mounts, INSIDE=HOST pairs say it (default: "
        "DUCKCELL_HOST_PATHS, else none: the same paths)",
    )
    run.add_argument(
        "--drain-grace",
        type=_grace_seconds,
        default=DEFAULT_DRAIN_GRACE_S,
        help="seconds running queries may take to finish on SIGTERM (default 30)",
    )
    run.add_argument(
        "--local-policies-only",
        action="store_true",
        help="ignore policies the control plane pushes; use only this host's policies/ "
        "(pushed ones may never turn a gVisor policy of this host into runc either way)",
    )
    run.add_argument(
        "--allow-endpoint",
        action="append",
        metavar="URL",
        help="an S3 endpoint the control plane's catalog may point this worker at, with its "
        "secrets (repeatable; `aws` for AWS S3; default: DUCKCELL_ALLOW_ENDPOINTS, "
        "comma-separated, else none)",
    )
    run.add_argument(
        "--allow-local-dir",
        action="append",
        type=Path,
        metavar="DIR",
        help="a directory whose files the control plane's catalog may declare as local tables "
        "(repeatable; default: DUCKCELL_ALLOW_LOCAL_DIRS, comma-separated, else none)",
    )
    run.add_argument(
        "--allow-secret",
        action="append",
        metavar="REF",
        help="a secret the control plane's catalog may name besides this worker's secret store: "
        "env:NAME or file:PATH (a file, or a directory for the files under it) (repeatable; "
        "default: DUCKCELL_ALLOW_SECRETS, comma-separated, else none)",
    )


def _grace_seconds(text: str) -> float:
    """``--drain-grace``: finite seconds from 0 to a day (it travels as milliseconds in a
    uint32 when the worker drains; a bad value would fail only then, at SIGTERM)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_DRAIN_GRACE_S:
        raise argparse.ArgumentTypeError(
            f"expected seconds from 0 to {MAX_DRAIN_GRACE_S:.0f}, got {text!r}"
        )
    return seconds


async def run_worker(
    args: argparse.Namespace, config: LauncherConfig, progress: Callable[[str], None]
) -> int:
    state: Path = args.state
    for directory, what in (
        (state, "state directory"),
        (config.state_dir, "launcher state directory"),
        (config.cache_root, "cache directory"),
    ):
        require_writable(directory, what)
    # First, before anything slow: a killed worker left `connected` there.
    health = Health(state / HEALTH_FILE)
    config = await place_sandboxes(args.host_paths, config, os.environ)
    identity = await identity_at_start(
        state,
        token_file=args.enroll_token_file,
        address=args.enroll_address,
        name=args.name,
        env=os.environ,
    )
    grants = grants_from(args.allow_endpoint, args.allow_local_dir, os.environ, args.allow_secret)
    async with (
        host_data_path(config, grants, secret_store(state)) as data,
        Worker(
            identity,
            config,
            data=data,
            grants=grants,
            audit_file=state / AUDIT_FILE,
            address=args.control_plane,
            proxy=ProxyConfig.from_env(os.environ),
            drain_grace_s=args.drain_grace,
            accept_policies=not args.local_policies_only,
            progress=progress,
        ) as worker,
    ):
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, worker.drain)
        address = args.control_plane or identity.tunnel_address
        _say(f"worker {identity.worker_id} dialing the control plane at {address}")
        _say(grants.describe())
        if config.engine_paths:
            _say(f"in a container: sandboxes' mounts as the engine sees them: {_pairs(config)}")
        if args.local_policies_only:
            _say("--local-policies-only: policies the control plane pushes are ignored")
        watcher = asyncio.create_task(health.follow(worker.tunnel.connected))
        try:
            await worker.run()
        finally:
            watcher.cancel()
            health.write("stopped")
    return 0


def _say(line: str) -> None:
    print(f"duckcell: {line}", file=sys.stderr, flush=True)


def _pairs(config: LauncherConfig) -> str:
    return ", ".join(f"{inside} -> {engine}" for inside, engine in config.engine_paths)


def require_writable(directory: Path, what: str) -> None:
    """A volume the container may not write fails here, in one line, not in a traceback."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as error:
        raise DuckcellError(
            f"the {what} {directory} is not writable ({error.strerror or error}): mount a "
            "writable volume or host directory there, owned by the user the worker runs as"
        ) from None


async def place_sandboxes(
    setting: str, config: LauncherConfig, env: Mapping[str, str]
) -> LauncherConfig:
    """The config with the engine's view of STATE/run and the cache (``--host-paths``), and in
    a container, the launcher id its sandboxes are labelled with (``duckcell sandboxes`` uses
    it too, so it lists and reaps the worker's own)."""
    if parse_host_paths(setting) == ():
        return config
    if not env.get("DOCKER_HOST") and not ENGINE_SOCKET.exists():
        raise DuckcellError(
            f"no Docker engine socket at {ENGINE_SOCKET}: mount the engine's socket into the "
            f"worker container (-v /var/run/docker.sock:{ENGINE_SOCKET}; rootless: "
            f"$XDG_RUNTIME_DIR/docker.sock), or set DOCKER_HOST"
        )
    try:
        mountinfo = MOUNTINFO.read_text()
    except OSError:
        mountinfo = ""
    backend = DockerBackend.for_config(config)
    try:
        await backend.ping()
        needed = {"state directory": config.state_dir, "cache": config.cache_root}
        paths = await resolve_host_paths(setting, needed, backend, mountinfo)
    finally:
        backend.close()
    placed = dataclasses.replace(config, engine_paths=paths.pairs)
    if config.launcher_id == default_launcher_id(config.state_dir):
        # Every worker container has the same STATE path inside: the default label (a hash of
        # it) would let one compose project reap another's sandboxes. Hash the engine's path
        # of STATE instead (one per volume or host directory), unless an id was given.
        # Not the host name either: a recreated container has another.
        engine_state = paths.engine_path(str(config.state_dir))
        digest = hashlib.sha256(engine_state.encode()).hexdigest()[:12]
        placed = dataclasses.replace(placed, launcher_id=f"container-{digest}")
    return placed


async def identity_at_start(
    state: Path,
    *,
    token_file: Path | None,
    address: str | None,
    name: str,
    env: Mapping[str, str],
    secret_file: Path = SECRET_TOKEN_FILE,
) -> Identity:
    """The enrolled identity in ``state``; when there is none and a token is given
    (``token_file``, else DUCKCELL_ENROLL_TOKEN in ``env``, else ``secret_file``), enrolls at
    ``address`` first. A token is never used over an existing identity."""
    if (state / IDENTITY_DIR).exists():
        return Identity.load(state)
    token = _start_token(token_file, env, secret_file)
    if token is None:
        raise ControlPlaneError(
            f"{state / IDENTITY_DIR} holds no worker identity and no enrollment token is given: "
            "pass --enroll-token-file FILE, set DUCKCELL_ENROLL_TOKEN or mount the Docker "
            f"secret duckcell_enroll_token (or run `duckcell enroll --state {state}` first)"
        )
    if not address:
        raise DuckcellError(
            "an enrollment token is given but not where to enroll: pass --enroll-address "
            "HOST:PORT (or set DUCKCELL_ENROLL_ADDRESS) of the control plane"
        )
    try:
        identity = await enroll(address, token, state, name)
    except DuckcellError as error:
        raise type(error)(
            f"enrollment at start failed: {error} (the state {state} holds no identity; give "
            "this worker a new token from `duckcell controlplane token create`)"
        ) from None
    _say(f"enrolled as {identity.worker_id} ({identity.name}) with {address}")
    return identity


def _start_token(given: Path | None, env: Mapping[str, str], secret_file: Path) -> str | None:
    """The token from --enroll-token-file, DUCKCELL_ENROLL_TOKEN or the Docker secret."""
    path = given
    if path is None:
        if env.get("DUCKCELL_ENROLL_TOKEN", "").strip():
            return env["DUCKCELL_ENROLL_TOKEN"].strip()
        if not secret_file.is_file():
            return None
        path = secret_file
    holds = "the line `duckcell controlplane token create` printed"
    data = read_small_file(path, "--enroll-token-file", holds)
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DuckcellError(
            f"--enroll-token-file: {path} is not a token (not text); it should hold {holds}"
        ) from None
    if not token:
        raise DuckcellError(f"--enroll-token-file: {path} is empty; it should hold {holds}")
    return token


class Health:
    """``STATE/health``: one word the container's health check reads (``connected`` while the
    tunnel is up). Polled once a second: a health check needs no finer grain."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._last = ""
        self.write("starting")

    def write(self, word: str) -> None:
        if word == self._last:
            return
        with contextlib.suppress(OSError):  # a report only: never ends the worker
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(word + "\n")
            tmp.replace(self._path)
            self._last = word

    async def follow(self, connected: asyncio.Event) -> None:
        while True:
            self.write("connected" if connected.is_set() else "disconnected")
            await asyncio.sleep(_HEALTH_POLL_S)
