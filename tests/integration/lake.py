"""Set-up shared by the write tests (local and through the tunnel): the admin's S3 client with
the source table in place, and a policies directory that adds the writing policy."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq


def admin_client(url: str, bucket: str) -> Any:
    """A plain boto3 client on ``url`` (as admin) that sets ``bucket`` up, once per server,
    with ``trips/part-0.parquet`` (i = 0..999), and reads back what the workers wrote."""
    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="admin",
        aws_secret_access_key="admin",
    )
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
        sink = io.BytesIO()
        pq.write_table(pa.table({"i": pa.array(range(1000), pa.int64())}), sink)
        client.put_object(Bucket=bucket, Key="trips/part-0.parquet", Body=sink.getvalue())
    return client


def policies_with(shipped: Path, directory: Path, name: str, text: str) -> Path:
    """``directory`` made to hold the shipped policies plus ``name``.yaml with ``text``."""
    directory.mkdir()
    for policy in shipped.glob("*.yaml"):
        (directory / policy.name).write_text(policy.read_text())
    (directory / f"{name}.yaml").write_text(text)
    return directory


def writer_policy(bucket: str) -> str:
    """A per-query policy named ``writer`` that may write under ``s3://BUCKET/out/``."""
    return f"""\
name: writer
isolation: query
runtime: runc
limits: {{cpus: 1, memory: 1GiB, scratch: 256MiB, statement_timeout: 60s}}
duckdb: {{memory_limit: 512MiB, max_temp_directory_size: 128MiB}}
writes: {{allowed: true, prefixes: ["s3://{bucket}/out/"]}}
pool: {{warm: 0}}
"""
