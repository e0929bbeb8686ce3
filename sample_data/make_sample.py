#!/usr/bin/env python3
"""Write the embedded default's sample table: ``sample_data/trips/trips-<month>.parquet``.

Taxi-like trips over three months, one Parquet file per month (about 100 KB each), so a demo
query reads a multi-file table through the cache. The rows come from a seeded
``random.Random``, so every run with the same pyarrow writes the same bytes; the files are
committed, and ``make demo`` runs this only to rebuild a file that is missing. ``--force``
rewrites them all.
"""

from __future__ import annotations

import argparse
import random
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUTPUT = Path(__file__).resolve().parent / "trips"
MONTHS = ("2024-01", "2024-02", "2024-03")
ROWS_PER_MONTH = 8000
ZONES = ("Airport", "Central", "Docks", "Harbour", "Museum", "North", "Old Town", "Station")
PAYMENTS = ("card", "cash", "app")
SCHEMA = pa.schema(
    [
        ("trip_id", pa.int64()),
        ("pickup_at", pa.timestamp("s")),
        ("pickup_zone", pa.string()),
        ("dropoff_zone", pa.string()),
        ("passengers", pa.int8()),
        ("distance_km", pa.float64()),
        ("fare", pa.float64()),
        ("tip", pa.float64()),
        ("payment", pa.string()),
    ]
)


def month_table(index: int, month: str) -> pa.Table:
    """One month of trips; the seed depends only on the month, so files are independent."""
    rng = random.Random(f"duckcell-sample-{month}")
    start = datetime.strptime(month, "%Y-%m")
    columns: dict[str, list[object]] = {name: [] for name in SCHEMA.names}
    for row in range(ROWS_PER_MONTH):
        distance = round(rng.lognormvariate(1.2, 0.7), 2)
        fare = round(3.0 + 1.6 * distance + rng.uniform(0, 2), 2)
        payment = rng.choices(PAYMENTS, weights=(6, 2, 3))[0]
        columns["trip_id"].append(index * ROWS_PER_MONTH + row + 1)
        columns["pickup_at"].append(start + timedelta(seconds=rng.randrange(28 * 86400)))
        columns["pickup_zone"].append(rng.choice(ZONES))
        columns["dropoff_zone"].append(rng.choice(ZONES))
        columns["passengers"].append(rng.choices((1, 2, 3, 4), weights=(10, 4, 2, 1))[0])
        columns["distance_km"].append(distance)
        columns["fare"].append(fare)
        columns["tip"].append(round(fare * rng.uniform(0.05, 0.2), 2) if payment != "cash" else 0)
        columns["payment"].append(payment)
    return pa.table(columns, schema=SCHEMA)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = parser.parse_args(argv)
    OUTPUT.mkdir(exist_ok=True)
    for index, month in enumerate(MONTHS):
        path = OUTPUT / f"trips-{month}.parquet"
        if path.exists() and not args.force:
            continue
        partial = path.with_name(f".{path.name}.partial")  # hidden: LocalStore skips it
        pq.write_table(month_table(index, month), partial, compression="zstd")
        partial.replace(path)
        print(f"wrote {path.relative_to(OUTPUT.parent.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
