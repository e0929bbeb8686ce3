"""``duckcell secrets set|list|delete|rotate-key``: the worker's local secret store, by hand.

Catalogs name a secret ``{store: NAME}``; an operator puts its value into the store of the
worker that resolves it (``STATE/secrets``, where STATE is the worker's ``--state``, or the
launcher's state directory for local queries). ``set`` reads the value from stdin, never from
the command line, so it stays out of ``ps`` and shell history; ``list`` prints names only.

Exit codes follow ``duckcell``: 0 done, 2 anything refused (empty value, unknown name, a store
that cannot be read).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from ..config import LauncherConfig
from ..data.secrets import SecretStore
from ..errors import SecretError
from ..inputs import read_at_most

SECRETS_DIR = "secrets"


def add_secrets_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``secrets`` command and its three subcommands, on ``duckcell``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state",
        type=Path,
        metavar="DIR",
        help="the worker's state directory, as for `duckcell worker --state` (default: the "
        "launcher's state directory, DUCKCELL_STATE_DIR); the store is DIR/secrets",
    )
    secrets = commands.add_parser("secrets", help="the worker's encrypted local secret store")
    secret_commands = secrets.add_subparsers(dest="secrets_command", required=True)
    put = secret_commands.add_parser(
        "set",
        parents=[common],
        help="store a secret; its value is read from stdin (one trailing newline dropped)",
    )
    put.add_argument("name", help="the NAME catalogs use as {store: NAME}")
    secret_commands.add_parser("list", parents=[common], help="the stored names (not values)")
    delete = secret_commands.add_parser("delete", parents=[common], help="forget a secret")
    delete.add_argument("name")
    secret_commands.add_parser(
        "rotate-key",
        parents=[common],
        help="re-encrypt the store under a new key and drop the old one (crash-safe)",
    )


def secret_store(state: Path) -> SecretStore:
    """The secret store of the state directory ``state`` (worker or launcher)."""
    return SecretStore(state / SECRETS_DIR)


def run_secrets_command(args: argparse.Namespace, config: LauncherConfig) -> int:
    """Run ``duckcell secrets ...``; returns the exit code."""
    store = secret_store(args.state if args.state is not None else config.state_dir)
    if args.secrets_command == "set":
        store.set(args.name, _read_value(args.name))
        print(f"stored secret {args.name} in {store.path}", file=sys.stderr)
    elif args.secrets_command == "list":
        for name in store.names():
            print(name)
    elif args.secrets_command == "rotate-key":
        count = store.rotate_key()
        print(f"re-encrypted {count} secret(s) in {store.path} under a new key", file=sys.stderr)
    else:
        store.delete(args.name)
        print(f"deleted secret {args.name} from {store.path}", file=sys.stderr)
    return 0


def _read_value(name: str) -> str:
    """The value from stdin: typed without echo at a terminal, else piped in whole."""
    if sys.stdin.isatty():
        value = getpass.getpass(f"value of {name}: ")
    else:
        # Bounded: a secret is a few KiB, and `< /dev/zero` must not read until memory runs out.
        data = read_at_most(sys.stdin, "stdin", f"the value of secret {name}")
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(
                f"the value for secret {name} on stdin is not UTF-8 text; secrets are text "
                "(base64-encode binary values)"
            ) from None
        # One trailing newline is how `echo` and editors end input; it is not part of the secret.
        value = value.removesuffix("\n").removesuffix("\r") if value.endswith("\n") else value
    if not value:
        raise SecretError(
            f"no value for secret {name} on stdin; pipe it in, e.g. "
            f"`duckcell secrets set {name} < FILE`"
        )
    return value
