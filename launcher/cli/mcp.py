"""``duckcell mcp``: the MCP server over stdio, on this host or through a control plane (wiring).

Local mode (the default) starts an embedded launcher with ``--catalog`` (the repository's
sample catalog when none is given, so ``duckcell mcp`` works after ``make demo``); with
``--control-plane`` it is a client of that control plane's ``Query`` service. Either way the
process serves one conversation: stdin closing (or SIGTERM) ends it, its session and sandbox.
Stdout is the protocol's; progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import Callable
from pathlib import Path

from ..client import ControlPlaneClient
from ..config import LauncherConfig
from ..data.datapath import DataPath
from ..errors import DuckcellError, SessionError
from ..host import LocalLauncher
from ..inputs import read_small_file
from ..mcp.conversation import Conversation
from ..mcp.export import Exports
from ..mcp.local import LocalBackend
from ..mcp.remote import AGENT_POLICY, RemoteBackend
from ..mcp.results import DEFAULT_MAX_CHARS, DEFAULT_MAX_ROWS, Bounds
from ..mcp.server import ToolSettings, build_server
from ..model.sql import ParserPool
from ..resources import PACKAGE_DIR
from ..sandbox.backend.docker_engine import DockerBackend
from .arguments import dial_address
from .wiring import control_plane_ca, local_data_path, placed

SAMPLE_CATALOG = PACKAGE_DIR.parent / "sample_data" / "catalog.yaml"


def add_mcp_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mcp = commands.add_parser(
        "mcp",
        help="serve duckcell to an AI agent over MCP (stdio): a sandboxed session per conversation",
        description="An MCP server on stdin/stdout for one agent conversation: its SQL runs in "
        "a session of its own (one sandbox, temp tables kept between calls, destroyed when the "
        "conversation ends). Local by default (this host's Docker engine, --catalog tables); "
        "with --control-plane on a worker of that control plane, as your API key's role. "
        "See docs/mcp.md.",
    )
    mcp.add_argument(
        "--catalog",
        type=Path,
        help="local mode: catalog YAML whose tables SQL can name (default: the sample catalog)",
    )
    mcp.add_argument(
        "--policy",
        help=f"session policy (default: {AGENT_POLICY}; through a control plane, your role's "
        f"if it is bound to one, else {AGENT_POLICY})",
    )
    mcp.add_argument(
        "--export-dir",
        type=Path,
        help="directory export_result writes files into (default: exports are off)",
    )
    mcp.add_argument("--max-rows", type=_positive, default=DEFAULT_MAX_ROWS, help="rows per answer")
    mcp.add_argument(
        "--max-chars",
        type=_positive,
        default=DEFAULT_MAX_CHARS,
        help="characters of row data per answer (default keeps answers near 5,000 tokens)",
    )
    mcp.add_argument(
        "--cache-dir", type=Path, help="object cache (DUCKCELL_CACHE_DIR; default STATE/cache)"
    )
    mcp.add_argument(
        "--control-plane", type=dial_address, help="HOST:PORT: run on a control plane's worker"
    )
    mcp.add_argument(
        "--api-key-file",
        type=Path,
        help="file holding the API key for --control-plane (or DUCKCELL_API_KEY)",
    )
    mcp.add_argument(
        "--ca-file", type=Path, help="the control plane's CA (`duckcell controlplane ca`)"
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def run_mcp_command(args: argparse.Namespace, config: Callable[[], LauncherConfig]) -> int:
    bounds = Bounds(max_rows=args.max_rows, max_chars=args.max_chars)
    settings = ToolSettings(bounds=bounds, exports=Exports(args.export_dir))
    if args.control_plane:
        if args.catalog:
            raise DuckcellError("--catalog is for local mode; the control plane has its own")
        return asyncio.run(_until_signal(_serve_remote(args, settings)))
    return asyncio.run(_until_signal(_serve_local(args, config(), settings)))


async def _until_signal(serving: object) -> int:
    """Serve; SIGTERM or SIGINT cancels it, so the session and sandbox are still removed."""
    task = asyncio.ensure_future(serving)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return 0


async def _serve(conversation: Conversation, settings: ToolSettings) -> None:
    server = build_server(lambda ctx: conversation, settings, on_close=conversation.close)
    try:
        await server.run_stdio_async()
    finally:
        await conversation.close()


async def _serve_local(
    args: argparse.Namespace, config: LauncherConfig, settings: ToolSettings
) -> None:
    catalog_file = args.catalog or (SAMPLE_CATALOG if SAMPLE_CATALOG.is_file() else None)
    if args.cache_dir is not None:
        config = dataclasses.replace(config, cache_dir=args.cache_dir)
    config = await placed(config)
    parser = ParserPool(size=1) if catalog_file else None
    data: DataPath | None = None
    try:
        if parser is not None:
            await parser.start()
        data = local_data_path(catalog_file, config, parser)
        if data is not None:
            config = dataclasses.replace(config, cache_dir=data.cache.root)
        async with LocalLauncher(
            config, DockerBackend.for_config(config), warm_override=0
        ) as launcher:
            backend = LocalBackend(launcher, data, args.policy or AGENT_POLICY)
            await _serve(Conversation(backend), settings)
    finally:
        if data is not None:
            await data.cache.close()
        if parser is not None:
            await parser.close()


async def _serve_remote(args: argparse.Namespace, settings: ToolSettings) -> None:
    api_key = _api_key(args.api_key_file)
    ca_pem = control_plane_ca(args.ca_file)
    async with ControlPlaneClient(args.control_plane, api_key, ca_pem) as client:
        # Refuse a wrong key (or an unreachable control plane) now, not at the agent's first
        # statement: closing a session that does not exist authenticates, and changes nothing.
        with contextlib.suppress(SessionError):
            await client.close_session("mcp-startup-check", timeout_s=30)
        backend = RemoteBackend(client, args.control_plane, args.policy or "")
        await _serve(Conversation(backend), settings)


def _api_key(path: Path | None) -> str:
    if path is not None:
        data = read_small_file(path, "--api-key-file", "the API key `controlplane apikey` printed")
        try:
            key = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            key = ""
        if not key:
            raise DuckcellError(f"--api-key-file: {path} does not hold an API key")
        return key
    key = os.environ.get("DUCKCELL_API_KEY", "").strip()
    if not key:
        raise DuckcellError("--control-plane needs --api-key-file FILE (or DUCKCELL_API_KEY)")
    return key
