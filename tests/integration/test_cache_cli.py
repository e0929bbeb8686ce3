"""The embedded default end to end, as a user runs it: ``duckcell query --catalog`` over the
sample table in a real sandbox, then ``duckcell cache stats|verify|evict`` on the cache it
filled, each command a subprocess.

The sample catalog and files are copied to a fresh directory first, so the test also shows
that the catalog's relative paths work from wherever the checkout is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.conftest import RUN_ID, TEST_LAUNCHER_PREFIX

from .conftest import REPO

pytestmark = pytest.mark.docker
SQL = "SELECT count(*) AS trips, round(sum(fare), 2) AS fares FROM trips"


def duckcell(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "-q", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def stats(env: dict[str, str]) -> dict[str, int]:
    done = duckcell("cache", "stats", "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_sample_catalog_query_then_cache_commands(
    image: str, policies_dir: Path, tmp_path: Path
) -> None:
    sample = tmp_path / "checkout" / "sample_data"
    shutil.copytree(REPO / "sample_data", sample, ignore=shutil.ignore_patterns("*.py"))
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUCKCELL_")}
    env |= {
        "DUCKCELL_IMAGE": image,
        "DUCKCELL_POLICIES_DIR": str(policies_dir),
        "DUCKCELL_STATE_DIR": str(tmp_path / "state"),
        "DUCKCELL_LAUNCHER_ID": f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-cachecli",
        "DUCKCELL_CACHE_DIR": str(cache),
    }
    expected = duckdb.sql(
        f"SELECT count(*), round(sum(fare), 2) FROM '{sample}/trips/*.parquet'"
    ).fetchall()[0]
    query = ("query", "--catalog", str(sample / "catalog.yaml"), "--format", "csv", SQL)

    first = duckcell(*query, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[1] == f"{expected[0]},{expected[1]}"
    files = len(list((sample / "trips").glob("*.parquet")))
    assert (stats(env)["entries"], stats(env)["downloads"]) == (files, files)

    assert duckcell(*query, env=env).stdout == first.stdout
    after = stats(env)
    assert (after["downloads"], after["hits"]) == (files, files)  # the second run downloaded none

    done = duckcell("cache", "verify", env=env)
    assert (done.returncode, done.stdout.strip()) == (
        0,
        f"checked {files} entries under {cache}: all good",
    )
    entry = sorted((cache / "objects").glob("*/*.parquet"))[0]
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a full disk
    done = duckcell("cache", "verify", "--repair", env=env)
    assert done.returncode == 1
    assert entry.name in done.stdout and not entry.exists()

    done = duckcell("cache", "evict", "--all", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed"] == files - 1
    assert stats(env)["entries"] == 0
    assert duckcell(*query, env=env).stdout == first.stdout
    assert stats(env)["downloads"] == 2 * files
