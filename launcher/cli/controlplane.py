"""``duckcell controlplane ...``: the reference control plane's commands (parse and wire only).

Every command takes ``--data DIR`` (default: DUCKCELL_CONTROLPLANE_DATA) and reaches the
control plane's parts through ``ControlPlaneData``; ``serve`` runs the servers until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from ..controlplane.audit import DEFAULT_LIMIT as DEFAULT_AUDIT_LIMIT
from ..controlplane.audit import AuditLog, format_records
from ..controlplane.catalogs import apply_catalog, read_catalog
from ..controlplane.datadir import ControlPlaneData
from ..controlplane.policies import (
    apply_policies,
    policy_files,
    read_policies,
    remove_policy,
    stored_policy_names,
)
from ..controlplane.registry import Worker, WorkerRegistry
from ..controlplane.server import ControlPlaneServer
from ..errors import DuckcellError
from ..flight import ControlPlaneWithFlight, FlightListen
from ..link.wire import split_address
from ..mcp.endpoint import McpHttpEndpoint, check_listen
from ..mcp.server import ToolSettings
from ..model.catalog import load_catalog
from ..yamlfile import parse_duration
from .arguments import listen_address, positive_days, positive_int


def add_controlplane_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    control = commands.add_parser("controlplane", help="the reference control plane")
    control_commands = control.add_subparsers(dest="controlplane_command", required=True)
    ca = control_commands.add_parser("ca", help="print the CA certificate (PEM), creating it")
    _add_data(ca)
    token = control_commands.add_parser("token", help="enrollment tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="print a new one-time enrollment token")
    _add_data(create)
    create.add_argument("--ttl", default="1h", help="lifetime, e.g. 30m, 1h (default 1h)")
    apikey = control_commands.add_parser("apikey", help="API keys for query clients")
    apikey_commands = apikey.add_subparsers(dest="apikey_command", required=True)
    key_create = apikey_commands.add_parser("create", help="print a new API key")
    _add_data(key_create)
    key_create.add_argument("--role", required=True, help="the role the key's queries run as")
    key_list = apikey_commands.add_parser("list", help="key ids, roles and creation times")
    _add_data(key_list)
    key_revoke = apikey_commands.add_parser("revoke", help="refuse a key from now on")
    _add_data(key_revoke)
    key_revoke.add_argument(
        "key_id", metavar="ID", help="the key's id (the middle part of the key)"
    )
    serve = control_commands.add_parser("serve", help="run the control plane until interrupted")
    _add_data(serve)
    serve.add_argument(
        "--listen", required=True, type=listen_address, help="HOST:PORT to listen on"
    )
    serve.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra name the TLS certificate is valid for (repeatable)",
    )
    serve.add_argument(
        "--tunnel-listen",
        type=listen_address,
        help="HOST:PORT for the workers' mTLS tunnel (default: next port)",
    )
    serve.add_argument(
        "--flight-listen",
        type=listen_address,
        help="HOST:PORT for Arrow Flight SQL clients (ADBC); TLS by default",
    )
    serve.add_argument(
        "--flight-plaintext",
        action="store_true",
        help="serve Flight SQL without TLS (only on a loopback --flight-listen)",
    )
    serve.add_argument(
        "--mcp-listen",
        type=listen_address,
        help="HOST:PORT for AI agents over MCP (streamable HTTP at /mcp; API key as bearer "
        "token); TLS with the control plane's certificate",
    )
    serve.add_argument(
        "--mcp-plaintext",
        action="store_true",
        help="serve MCP without TLS (only on a loopback --mcp-listen)",
    )
    serve.add_argument(
        "--catalog", type=Path, help="catalog YAML to apply at start (see `controlplane catalog`)"
    )
    serve.add_argument(
        "--policies",
        type=Path,
        metavar="DIR",
        help="policy YAML directory to apply at start (see `controlplane policy`)",
    )
    serve.add_argument(
        "--audit-retention-days",
        type=positive_days,
        metavar="DAYS",
        help="delete audit records older than DAYS, at start and hourly (default: keep all)",
    )
    catalog = control_commands.add_parser(
        "catalog", help="the catalog workers get: tables, connections, roles"
    )
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    apply = catalog_commands.add_parser(
        "apply", help="check a catalog YAML file and make it current (running servers push it)"
    )
    _add_data(apply)
    apply.add_argument("file", type=Path, help="catalog YAML file")
    show = catalog_commands.add_parser("show", help="print the current catalog (JSON)")
    _add_data(show)
    _add_policy_parser(control_commands)
    workers = control_commands.add_parser("workers", help="list enrolled workers and their state")
    _add_data(workers)
    worker_admin = control_commands.add_parser("worker", help="manage one worker")
    worker_commands = worker_admin.add_subparsers(dest="worker_command", required=True)
    revoke = worker_commands.add_parser(
        "revoke", help="revoke a worker: its tunnel closes and it cannot reconnect"
    )
    _add_data(revoke)
    revoke.add_argument("worker_id", metavar="ID", help="worker id (wkr-...)")
    audit = control_commands.add_parser("audit", help="list recently routed queries, newest first")
    _add_data(audit)
    audit.add_argument(
        "--limit", type=positive_int, default=DEFAULT_AUDIT_LIMIT, help="how many (default 50)"
    )
    audit.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    audit.add_argument(
        "--prune-older-than",
        type=positive_days,
        metavar="DAYS",
        help="instead of listing, delete the records of queries started more than DAYS ago",
    )


DATA_ENV = "DUCKCELL_CONTROLPLANE_DATA"


def _add_data(parser: argparse.ArgumentParser) -> None:
    """``--data DIR``: required unless DUCKCELL_CONTROLPLANE_DATA names it (the duckcell image
    sets it, so `docker compose exec controlplane duckcell controlplane ca` works)."""
    default = os.environ.get(DATA_ENV) or None
    parser.add_argument(
        "--data",
        type=Path,
        required=default is None,
        default=Path(default) if default else None,
        help=f"control plane data directory (default: {DATA_ENV})",
    )


def _add_policy_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = commands.add_parser(
        "policy", help="policies pushed to workers (none: workers use their own policies/)"
    )
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    apply = policy_commands.add_parser(
        "apply", help="check policy YAML files and add them, or none (running servers push them)"
    )
    _add_data(apply)
    apply.add_argument("files", type=Path, nargs="+", metavar="FILE", help="policy YAML file")
    listing = policy_commands.add_parser("list", help="list the control plane's policies")
    _add_data(listing)
    show = policy_commands.add_parser("show", help="print one policy's YAML")
    _add_data(show)
    show.add_argument("name", metavar="NAME")
    remove = policy_commands.add_parser("remove", help="take a policy out (workers are told)")
    _add_data(remove)
    remove.add_argument("name", metavar="NAME")


def _run_policy_command(args: argparse.Namespace, data: ControlPlaneData) -> int:
    if args.policy_command == "apply":
        documents, applied = apply_policies(data.root, args.files)
        names = ", ".join(policy.name for policy in applied)
        print(f"policies revision {documents.revision} applied: {names}", file=sys.stderr)
    elif args.policy_command == "remove":
        documents = remove_policy(data.root, args.name)
        print(f"policy {args.name} removed; revision {documents.revision or '-'}", file=sys.stderr)
    elif args.policy_command == "show":
        texts = read_policies(data.root).texts
        if args.name not in texts:
            raise DuckcellError(f"no control-plane policy {args.name!r}")
        sys.stdout.write(texts[args.name])
    else:
        documents = read_policies(data.root)
        for name, text in documents.texts.items():
            print(f"{name}  sha256:{hashlib.sha256(text.encode()).hexdigest()[:12]}")
        print(f"revision {documents.revision or '- (workers use their own)'}", file=sys.stderr)
    return 0


async def _serve(args: argparse.Namespace) -> int:
    data = ControlPlaneData(args.data)
    if args.policies is not None:
        catalog = load_catalog(args.catalog) if args.catalog is not None else None
        apply_policies(data.root, policy_files(args.policies), catalog=catalog, replace=True)
    if args.catalog is not None:
        apply_catalog(data.root, args.catalog, policies=lambda: stored_policy_names(data.root))
    # Checked before anything listens: plaintext Flight SQL is refused off loopback.
    flight_listen = (
        FlightListen.parse(args.flight_listen, plaintext=args.flight_plaintext)
        if args.flight_listen
        else None
    )
    retention = args.audit_retention_days
    server = ControlPlaneServer(
        data,
        args.listen,
        args.host,
        tunnel_listen=args.tunnel_listen,
        audit_retention_s=retention * DAY_S if retention is not None else None,
    )
    if args.mcp_listen:
        check_listen(args.mcp_listen, plaintext=args.mcp_plaintext)  # before anything listens
    served = ControlPlaneWithFlight(server, flight_listen)
    await served.start()
    try:
        mcp = _mcp_endpoint(args, server)
        if mcp is not None:
            await mcp.start()
    except BaseException:
        await served.stop()
        raise
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    print(
        f"duckcell: control plane listening on {server.address}, tunnel on "
        f"{server.tunnel_address}"
        f"{f', Flight SQL on {served.flight.location}' if served.flight else ''}"
        f"{f', MCP on {mcp.url}' if mcp else ''}"
        f" (CA {server.fingerprint()})",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stopping.wait()
    finally:
        if mcp is not None:
            await mcp.stop()
        await served.stop()
    return 0


def _mcp_endpoint(args: argparse.Namespace, server: ControlPlaneServer) -> McpHttpEndpoint | None:
    """The MCP endpoint, a client of this control plane's own Query service (on loopback when
    the control plane listens on every address), with the caller's key."""
    if not args.mcp_listen:
        return None
    keys, ca = server.api_keys, server.ca()
    assert keys is not None  # started
    host, _ = split_address(server.address, listening=True)
    query = f"127.0.0.1:{server.port}" if host in {"", "0.0.0.0", "::", "[::]"} else server.address

    tls = None
    if not args.mcp_plaintext:
        cert_pem, key_pem = ca.issue_server_cert(server.hosts)
        tls = (cert_pem + ca.cert_pem(), key_pem)
    return McpHttpEndpoint(
        args.mcp_listen,
        query_address=query,
        ca_pem=ca.cert_pem(),
        verify=lambda key: keys.verify(key).key_id,
        tls=tls,
        settings=ToolSettings(),
    )


# The commands that may start a control plane's data directory; the others (they list, show,
# revoke, remove) refuse a directory no control plane has used, so a mistyped --data is an
# error rather than an empty listing.
_CREATING = {"serve", "ca", "token create", "apikey create", "catalog apply", "policy apply"}


def _command_name(args: argparse.Namespace) -> str:
    command = args.controlplane_command
    sub = getattr(args, f"{command}_command", None)
    return f"{command} {sub}" if sub else command


def run_controlplane_command(args: argparse.Namespace) -> int:
    data = ControlPlaneData(args.data)
    if data.initialized():
        return _run(args, data)
    command = _command_name(args)
    if command not in _CREATING:
        raise DuckcellError(
            f"--data {data.root}: no control plane data there (no CA, database, catalog or "
            f"policies); check the path, or start one with `duckcell controlplane serve --data "
            f"{data.root}`"
        )
    code = _run(args, data)
    if command != "serve" and data.initialized():  # serve's start-up line names the CA
        print(
            f"duckcell: --data {data.root} held no control plane: this started a new one "
            "there; if you meant an existing control plane, check the path",
            file=sys.stderr,
        )
    return code


def _run(args: argparse.Namespace, data: ControlPlaneData) -> int:
    if args.controlplane_command == "serve":
        return asyncio.run(_serve(args))
    if args.controlplane_command == "ca":
        sys.stdout.write(data.ca().cert_pem().decode())
        return 0
    if args.controlplane_command == "apikey":
        return _apikey_command(args, data)
    if args.controlplane_command == "catalog":
        if args.catalog_command == "show":
            print(read_catalog(data.root).catalog.to_json())
            return 0
        version = apply_catalog(
            data.root, args.file, policies=lambda: stored_policy_names(data.root)
        )
        tables = len(version.catalog.tables)
        print(f"catalog revision {version.revision} applied: {tables} table(s)", file=sys.stderr)
        return 0
    if args.controlplane_command == "policy":
        return _run_policy_command(args, data)
    if args.controlplane_command == "audit":
        if args.prune_older_than is not None:
            pruned = AuditLog(data.database()).prune(time.time() - args.prune_older_than * DAY_S)
            print(f"deleted {pruned} audit record(s) older than {args.prune_older_than:g} days")
            return 0
        records = AuditLog(data.database()).recent(args.limit)
        if args.json:
            print(json.dumps([record.as_dict() for record in records], indent=2))
        else:
            print("\n".join(format_records(records)))
        return 0
    if args.controlplane_command == "workers":
        _print_workers(WorkerRegistry(data.database()).list(), time.time())
        return 0
    if args.controlplane_command == "worker":
        worker = WorkerRegistry(data.database()).revoke(args.worker_id)
        print(
            f"revoked {worker.worker_id} ({worker.name}); a running control plane closes its "
            "tunnel within one heartbeat"
        )
        return 0
    ttl = parse_duration(args.ttl)
    if ttl is None or ttl <= 0:
        raise DuckcellError(f"--ttl: expected a duration like 30m or 1h, got {args.ttl!r}")
    # The token alone on stdout, so `TOKEN=$(duckcell controlplane token create ...)` works.
    print(data.tokens().create(ttl))
    return 0


def _print_workers(workers: list[Worker], now: float) -> None:
    rows = [("ID", "NAME", "STATE", "LAST HEARTBEAT", "VERSION")]
    for worker in workers:
        state = "revoked" if worker.revoked_at else "online" if worker.online else "offline"
        state = "draining" if state == "online" and worker.draining else state
        beat = "-" if worker.last_heartbeat is None else f"{now - worker.last_heartbeat:.0f}s ago"
        rows.append((worker.worker_id, worker.name, state, beat, worker.version))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


DAY_S = 86_400.0


def _apikey_command(args: argparse.Namespace, data: ControlPlaneData) -> int:
    keys = data.api_keys()
    if args.apikey_command == "create":
        # The key alone on stdout, so `KEY=$(duckcell controlplane apikey create ...)` works.
        print(keys.create(args.role))
        try:
            catalog = read_catalog(data.root).catalog
        except DuckcellError as error:  # the key exists: say so, do not fail the command
            print(f"duckcell: warning: role not checked ({error})", file=sys.stderr)
            return 0
        if catalog.role(args.role) is None:  # a key now, a refusal at every query later
            print(
                f"duckcell: warning: the current catalog defines no role {args.role!r} "
                f"(roles: {', '.join(sorted(catalog.roles))}); this key's queries are refused "
                "until it does",
                file=sys.stderr,
            )
    elif args.apikey_command == "list":
        print(f"{'ID':<18}{'ROLE':<20}CREATED (UTC)")
        for key_id, role, created in keys.list():
            print(
                f"{key_id:<18}{role:<20}{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(created))}"
            )
    else:
        keys.revoke(args.key_id)
        print(f"revoked API key {args.key_id}", file=sys.stderr)
    return 0
