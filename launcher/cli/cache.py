"""``duckcell cache stats|evict|verify``: look after the host's object cache by hand.

The cache maintains itself (it evicts down to the budget after a download and after each
query releases its files; a lease fetches again an entry that is truncated, or damaged when its
process first uses it), so these commands are for operators: to see what the cache holds and
how often it found damage, to free disk now, and to re-hash every entry after a disk scare.
They open the cache root directly, like a running launcher does, and are safe beside running
queries: eviction and repair skip entries a query has pinned, in any process on the host.

Exit codes follow ``duckcell``: 0 done, 1 ``verify`` found problems (repaired or not), 2 the
cache cannot be used (missing directory, bad size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path

from ..config import LauncherConfig, parse_size
from ..data.cache import CacheStats, EvictReport, ObjectCache, VerifyReport
from ..errors import CacheError, DuckcellError


def add_cache_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``cache`` command and its three subcommands, on ``duckcell``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="the cache root (DUCKCELL_CACHE_DIR; default STATE/cache)",
    )
    common.add_argument(
        "--cache-budget",
        metavar="SIZE",
        help="size budget, e.g. 10GiB (DUCKCELL_CACHE_BUDGET; default 10GiB)",
    )
    common.add_argument("--json", action="store_true", help="one JSON object instead of text")
    cache = commands.add_parser("cache", help="the host's object cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    cache_commands.add_parser(
        "stats",
        parents=[common],
        help="entries, size against the budget, hits and misses, integrity checks",
    )
    evict = cache_commands.add_parser(
        "evict",
        parents=[common],
        help="remove least recently used entries (never one a running query uses)",
        description="Without options, evict down to the budget.",
    )
    target = evict.add_mutually_exclusive_group()
    target.add_argument("--all", action="store_true", help="evict every entry not in use")
    target.add_argument("--to", metavar="SIZE", help="evict until the cache holds at most SIZE")
    verify = cache_commands.add_parser(
        "verify",
        parents=[common],
        help="re-hash every entry; exit 1 when one is damaged or missing",
    )
    verify.add_argument(
        "--repair",
        action="store_true",
        help="remove damaged entries (not in use) so the next query fetches them again",
    )


def run_cache_command(args: argparse.Namespace, config: LauncherConfig) -> int:
    """Run ``duckcell cache ...`` against ``config.cache_root``; returns the exit code."""
    to_bytes = _size_flag("--to", args.to) if getattr(args, "to", None) else None
    cache = open_cache(config)
    try:
        if args.cache_command == "stats":
            stats = cache.stats()
            _emit(args.json, {"root": str(cache.root)} | asdict(stats), format_stats(cache, stats))
            return 0
        if args.cache_command == "evict":
            report = cache.evict(all=args.all, to_bytes=to_bytes)
            _emit(args.json, asdict(report), format_evict(report))
            return 0
        verified = cache.verify(repair=args.repair)
        body: dict[str, object] = {"checked": verified.checked, "ok": verified.ok}
        body["problems"] = [asdict(problem) for problem in verified.problems]
        _emit(args.json, body, format_verify(verified, cache.root))
        return 0 if verified.ok else 1
    finally:
        asyncio.run(cache.close())


def open_cache(config: LauncherConfig) -> ObjectCache:
    """The cache at ``config.cache_root``; it must exist (a query creates it, not this command)."""
    root = config.cache_root
    if not root.is_dir():
        raise CacheError(
            f"there is no cache at {root}; run a `duckcell query --catalog FILE` first, or point "
            "--cache-dir (DUCKCELL_CACHE_DIR) at the cache the launcher uses"
        )
    return ObjectCache(root, budget_bytes=config.cache_budget_bytes)


def format_stats(cache: ObjectCache, stats: CacheStats) -> list[str]:
    lookups = stats.hits + stats.misses
    hit_rate = f" ({stats.hits / lookups:.0%} hits)" if lookups else ""
    share = stats.bytes / stats.budget_bytes
    over = "  OVER BUDGET: entries in use keep it there" if stats.over_budget else ""
    size = f"{format_size(stats.bytes)} of {format_size(stats.budget_bytes)} budget"
    rows = [
        ("cache", str(cache.root)),
        ("entries", f"{stats.entries} ({stats.in_use} in use)"),
        ("size", f"{size} ({share:.0%}){over}"),
        ("hits/misses", f"{stats.hits} / {stats.misses}{hit_rate}"),
        ("downloads", str(stats.downloads)),
        ("evictions", str(stats.evictions)),
        ("verified", f"{stats.verified} (sha256 checked on first use in a process)"),
        ("damaged", f"{stats.refetched_damaged} (found damaged in use, fetched again)"),
    ]
    return [f"{name:<13}{value}" for name, value in rows]


def format_evict(report: EvictReport) -> list[str]:
    kept = f"; {report.skipped_in_use} in use kept" if report.skipped_in_use else ""
    return [
        f"removed {report.removed} entr{'y' if report.removed == 1 else 'ies'} "
        f"({format_size(report.freed_bytes)}){kept}; the cache holds "
        f"{format_size(report.bytes_after)} (target {format_size(report.target_bytes)})"
    ]


def format_verify(report: VerifyReport, root: Path) -> list[str]:
    if report.ok:
        return [f"checked {report.checked} entries under {root}: all good"]
    lines = [f"checked {report.checked} entries under {root}: {len(report.problems)} bad"]
    width = max(len(problem.path) for problem in report.problems)
    lines.append(f"{'ENTRY':<{width}}  {'REMOVED':<7}  PROBLEM")
    for problem in report.problems:
        removed = "yes" if problem.removed else "no"
        lines.append(f"{problem.path:<{width}}  {removed:<7}  {problem.reason}")
    if not all(problem.removed for problem in report.problems):
        lines.append(
            "run `duckcell cache verify --repair` to remove them (entries in use are kept); "
            "the next query fetches them again"
        )
    return lines


def format_size(size: int) -> str:
    """Bytes the way people read them: 1.5 GiB, 320 KiB, 12 B."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def _size_flag(flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise DuckcellError(f"{flag}: {error}, got {text!r}") from None


def _emit(as_json: bool, body: dict[str, object], lines: list[str]) -> None:
    print(json.dumps(body, indent=2) if as_json else "\n".join(lines))
