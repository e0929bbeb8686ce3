"""The ``duckcell`` command. It parses arguments and wires components; nothing else.

Exit codes: 0 success, 1 the query failed (DuckDB's message on stderr; through a control plane
also no worker online, or the worker lost), 2 anything else (bad flags or input, no engine,
missing image, a control plane that does not answer, a refused key), 130 interrupted: each
error's ``exit_code`` (``launcher.errors``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..client import ControlPlaneClient
from ..config import LauncherConfig, load_config
from ..data.datapath import DataPath
from ..errors import DuckcellError
from ..executor import collect_table
from ..host import LocalLauncher
from ..inputs import check_statement_text, read_small_file, statement_text, stream_bytes
from ..model.policy import load_policies, load_policy_file
from ..model.sql import ParserPool, check_statement
from ..sandbox.backend.base import LABEL_LAUNCHER, LABEL_POLICY
from ..sandbox.backend.docker_engine import DockerBackend
from ..sandbox.files import remove_stale
from ..sandbox.image.build import ImageBuilder
from ..sandbox.image.recipe import DUCKCELL_TAG, duckcell_recipe
from ..sandbox.instance import instance_alive, reap_orphans
from ..worker.enroll import enroll
from .allocator import tune_allocator
from .arguments import dial_address
from .cache import add_cache_parser, run_cache_command
from .controlplane import add_controlplane_parser, run_controlplane_command
from .mcp import add_mcp_parser, run_mcp_command
from .output import FORMATS, check_output, write_result
from .secrets import add_secrets_parser, run_secrets_command
from .wiring import control_plane_ca, local_data_path, placed
from .worker import add_worker_parser, run_worker

log = logging.getLogger("duckcell.worker")


class Progress:
    """Short progress lines on stderr for long steps; quiet when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._start = time.monotonic()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self._start
            print(f"duckcell [{elapsed:5.1f}s] {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duckcell",
        description="Run DuckDB queries, each in its own hardened sandbox container.",
    )
    parser.add_argument("--version", action="version", version=f"duckcell {__version__}")
    parser.add_argument("--config", type=Path, help="launcher config YAML (or DUCKCELL_CONFIG)")
    parser.add_argument("--state-dir", type=Path, help="launcher state (DUCKCELL_STATE_DIR)")
    parser.add_argument("--policies-dir", type=Path, help="policy YAML directory")
    parser.add_argument("--image", help="sandbox image tag (DUCKCELL_IMAGE)")
    parser.add_argument("--launcher-id", help="label identifying this launcher's sandboxes")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    query = commands.add_parser("query", help="run one query in a fresh sandbox and print it")
    query.add_argument("sql", help="SQL text (use - to read it from stdin)")
    query.add_argument(
        "--policy",
        help="policy name (default: `default`; through a control plane, the one your role "
        "fixes, else the worker's default)",
    )
    query.add_argument("--format", choices=FORMATS, default="table")
    query.add_argument("--output", "-o", type=Path, help="write the result to FILE")
    query.add_argument("--catalog", type=Path, help="catalog YAML whose tables SQL can name")
    query.add_argument(
        "--cache-dir", type=Path, help="object cache (DUCKCELL_CACHE_DIR; default STATE/cache)"
    )
    query.add_argument(
        "--cache-budget",
        metavar="SIZE",
        help="cache size budget, e.g. 10GiB (DUCKCELL_CACHE_BUDGET; default 10GiB)",
    )
    query.add_argument(
        "--control-plane",
        type=dial_address,
        help="HOST:PORT: run on a worker through this control plane",
    )
    query.add_argument("--api-key", help="API key for --control-plane (or DUCKCELL_API_KEY)")
    query.add_argument(
        "--ca-file", type=Path, help="the control plane's CA (`duckcell controlplane ca`)"
    )

    image = commands.add_parser("image", help="sandbox image")
    image_commands = image.add_subparsers(dest="image_command", required=True)
    build = image_commands.add_parser(
        "build", help="build the sandbox image (or --duckcell: the package's) if out of date"
    )
    build.add_argument("--base", help="base image (default: python:3.11-slim or offline)")
    build.add_argument(
        "--duckcell",
        action="store_true",
        help=f"build the duckcell image ({DUCKCELL_TAG}: worker, control plane, CLI) for "
        "docker compose, instead of the sandbox image",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")

    policy = commands.add_parser("policy", help="policies")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    policy_commands.add_parser("list", help="list the policies the launcher would load")
    check = policy_commands.add_parser("check", help="validate policy files")
    check.add_argument("files", nargs="*", type=Path)

    add_controlplane_parser(commands)

    join = commands.add_parser("enroll", help="enroll this worker with a control plane")
    join.add_argument(
        "--control-plane", required=True, type=dial_address, help="HOST:PORT of the control plane"
    )
    token_source = join.add_mutually_exclusive_group()
    token_source.add_argument("--token", help="one-time token (or DUCKCELL_ENROLL_TOKEN)")
    token_source.add_argument("--token-file", type=Path, help="read the token from FILE")
    join.add_argument("--state", type=Path, required=True, help="worker state directory")
    join.add_argument("--name", default=socket.gethostname(), help="worker name (host name)")

    add_worker_parser(commands, dial_address)

    add_cache_parser(commands)
    add_secrets_parser(commands)
    add_mcp_parser(commands)

    sandboxes = commands.add_parser("sandboxes", help="this launcher's sandbox containers")
    sandbox_commands = sandboxes.add_subparsers(dest="sandboxes_command", required=True)
    sandbox_commands.add_parser("list", help="list them")
    sandbox_commands.add_parser("reap", help="remove those whose launcher process is gone")
    return parser


def _config(args: argparse.Namespace) -> LauncherConfig:
    return load_config(
        flags={
            "state_dir": args.state_dir,
            "policies_dir": args.policies_dir,
            "image": args.image,
            "launcher_id": args.launcher_id,
            "cache_dir": getattr(args, "cache_dir", None),
            "cache_budget_bytes": getattr(args, "cache_budget", None),
        },
        config_file=args.config,
    )


async def _query(args: argparse.Namespace, progress: Progress) -> int:
    sql = _statement(args.sql)
    check_statement(sql)  # first: a statement over the limit is refused on every path
    if args.format == "parquet" and args.output is None:
        raise DuckcellError("--format parquet needs --output FILE")
    check_output(args.output)  # before the query runs, not after
    if args.control_plane:
        if args.catalog:
            raise DuckcellError("--catalog is for local queries; the control plane has its own")
        return await _remote_query(args, sql, progress)
    config = await placed(_config(args))
    # Only a catalog's tables need the SQL parsed; its child starts while the launcher does.
    parser = ParserPool(size=1) if args.catalog else None
    data: DataPath | None = None
    try:
        if parser is not None:
            await parser.start()
        data = local_data_path(args.catalog, config, parser)
        if data is not None:
            config = dataclasses.replace(config, cache_dir=data.cache.root)
        async with LocalLauncher(
            config, DockerBackend.for_config(config), warm_override=0, progress=progress
        ) as launcher:
            policy = launcher.policies.get(args.policy or "default")
            progress(f"starting a {policy.runtime.value} sandbox (policy {policy.name})")
            session = None
            if policy.isolation.value == "session":
                session = await launcher.sessions.open(policy)
            async with launcher.executor.run_query(
                sql,
                policy=policy,
                session_id=session.session_id if session else None,
                data=data,
            ) as execution:
                table = await collect_table(execution)
            record = execution.record
            progress(
                f"{table.num_rows} row(s) from sandbox {record.sandbox} in {record.total_s:.2f} s"
            )
    finally:
        if data is not None:
            await data.cache.close()
        if parser is not None:
            await parser.close()
    write_result(table, args.format, args.output)
    return 0


def _statement(given: str) -> str:
    """The statement from the argument, or stdin for ``-``, as UTF-8 text without NUL; else
    ``StatementTextError`` (exit 2) naming the offending byte (``launcher.inputs``)."""
    if given != "-":
        check_statement_text(given)
        return given
    return statement_text(stream_bytes(sys.stdin))


async def _remote_query(args: argparse.Namespace, sql: str, progress: Progress) -> int:
    api_key = args.api_key or os.environ.get("DUCKCELL_API_KEY")
    if not api_key:
        raise DuckcellError("--control-plane needs --api-key KEY (or DUCKCELL_API_KEY)")
    ca_pem = control_plane_ca(args.ca_file)
    chosen = f"policy {args.policy}" if args.policy else "your role's policy, else the default"
    progress(f"running on a worker through {args.control_plane} ({chosen})")
    async with ControlPlaneClient(args.control_plane, api_key, ca_pem) as client:
        table = await client.table(sql, args.policy or "")
    progress(f"{table.num_rows} row(s)")
    write_result(table, args.format, args.output)
    return 0


def _image_build(args: argparse.Namespace, progress: Progress) -> int:
    if args.duckcell:
        builder = ImageBuilder(tag=DUCKCELL_TAG, progress=Progress(True), recipe=duckcell_recipe())
    else:
        builder = ImageBuilder(tag=_config(args).image, progress=Progress(True))
    built = builder.build(base=args.base, force=args.force)
    state = "up to date" if built.reused else f"built in {built.seconds:.0f} s"
    print(f"{built.tag} {state} (content hash {built.content_hash[:12]})")
    return 0


def _policy(args: argparse.Namespace) -> int:
    if args.policy_command == "list":
        config = _config(args)
        policies = load_policies(config.policies_dir)
        for policy in policies:
            limits = policy.limits
            print(
                f"{policy.name:<16} {policy.isolation.value:<8} {policy.runtime.value:<6} "
                f"cpus={limits.cpus:g} memory={limits.memory_bytes // 2**20}MiB "
                f"timeout={limits.statement_timeout_s:g}s warm={policy.warm_pool}  "
                f"({policy.source})"
            )
        return 0
    files = args.files or sorted(_config(args).policies_dir.glob("*.y*ml"))
    for path in files:
        load_policy_file(path)
        print(f"{path}: ok")
    return 0


def _enroll_token(args: argparse.Namespace) -> str:
    """The token from --token, --token-file or DUCKCELL_ENROLL_TOKEN (kept out of `ps`)."""
    if args.token is not None:
        return args.token
    if args.token_file is not None:
        holds = "the line `duckcell controlplane token create` printed"
        data = read_small_file(args.token_file, "--token-file", holds)
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DuckcellError(
                f"--token-file: {args.token_file} is not a token (not text); it should hold {holds}"
            ) from None
    token = os.environ.get("DUCKCELL_ENROLL_TOKEN")
    if not token:
        raise DuckcellError(
            "no enrollment token: pass --token-file FILE, set DUCKCELL_ENROLL_TOKEN, or --token"
        )
    return token


async def _enroll(args: argparse.Namespace) -> int:
    identity = await enroll(args.control_plane, _enroll_token(args), args.state, args.name)
    print(identity.worker_id)
    return 0


async def _sandboxes(args: argparse.Namespace, progress: Progress) -> int:
    # In the worker's container, the same label as the worker's sandboxes (docs/deploy.md).
    config = await placed(_config(args))
    backend = DockerBackend.for_config(config)
    try:
        await backend.ping()
        if args.sandboxes_command == "list":
            for info in await backend.list({LABEL_LAUNCHER: config.launcher_id}):
                print(f"{info.name}  policy={info.labels.get(LABEL_POLICY, '?')}")
            return 0
        report = await reap_orphans(
            backend,
            launcher_id=config.launcher_id,
            instances_dir=config.instances_dir,
            run_dir=config.run_dir,
            own_instance=None,
        )
        print(f"removed {len(report.removed)} orphaned sandbox(es); {report.kept_live} in use")
        # And the sandbox directories those launchers left in the cache.
        stale = remove_stale(
            config.cache_root, lambda owner: instance_alive(config.instances_dir, owner)
        )
        if stale:
            print(f"removed the sandbox directories of {len(stale)} gone launcher(s)")
        return 0
    finally:
        backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="duckcell: %(levelname)s %(name)s: %(message)s",
    )
    tune_allocator()  # every command may pass a large result along
    progress = Progress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        if args.command == "query":
            return asyncio.run(_query(args, progress))
        if args.command == "image":
            return _image_build(args, progress)
        if args.command == "policy":
            return _policy(args)
        if args.command == "controlplane":
            return run_controlplane_command(args)
        if args.command == "enroll":
            return asyncio.run(_enroll(args))
        if args.command == "worker":
            return asyncio.run(run_worker(args, _config(args), progress))
        if args.command == "sandboxes":
            return asyncio.run(_sandboxes(args, progress))
        if args.command == "cache":
            return run_cache_command(args, _config(args))
        if args.command == "secrets":
            return run_secrets_command(args, _config(args))
        if args.command == "mcp":
            return run_mcp_command(args, lambda: _config(args))
    except DuckcellError as error:
        print(f"duckcell: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print("duckcell: interrupted", file=sys.stderr)
        return 130
    return 2
