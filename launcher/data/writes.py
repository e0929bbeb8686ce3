"""Writes: a query stores its result as one Parquet object in object storage.

The SQL form is DuckDB's own COPY, with the object's real URL as the destination::

    COPY (SELECT ...) TO 's3://BUCKET/PREFIX/NAME.parquet' [(FORMAT parquet, COMPRESSION zstd)]
    COPY my_table TO 's3://BUCKET/PREFIX/NAME.parquet'

It must be the last statement of the SQL text (earlier ones may prepare temp tables). The
destination is a plain single-quoted string naming one object (no glob, no "." or ".."
segments); the format is Parquet (``FORMAT parquet``, or a name ending in ``.parquet``); the
options allowed are ``FORMAT``, ``COMPRESSION``, ``COMPRESSION_LEVEL``, ``ROW_GROUP_SIZE``,
``ROW_GROUP_SIZE_BYTES`` and ``PARQUET_VERSION`` (no ``PARTITION_BY`` or per-thread output:
those write directories, not one object). The URL is the one a catalog table's ``path`` uses,
so the written object can be declared a table and read back; DuckDB users know the form.

Before anything runs, ``plan_write`` reads DuckDB's parse of the SQL (``launcher.model.sql``: which
statements are a COPY, and the tokens after a COPY's TO), checks the destination against the policy
(``writes.allowed`` and ``writes.prefixes``, see ``policy.writes_allowed``) and picks the
catalog connection that uploads it: the s3 connection, visible to the policy's
``access.connections``, whose tables live in the destination's bucket; none, several, or one
the policy may not use refuse the query (``QueryDeniedError``). The destination is then
rewritten to a file under the sandbox's /scratch. The sandbox writes there (it has no network
and no credentials); the runner streams the closed file back over its gRPC stream in slices
under 4 MiB (``ExecuteChunk.output``), and ``PendingWrite`` spools them on the host and uploads
only once the query succeeded. A stream rather than a bind-mounted output directory: the warm
pool creates sandboxes before their query is known, so a mount would have to exist per sandbox,
be emptied between session queries and be guarded against links; the stream needs none of this
and reuses the query's own cancellation and deadline. A failed query uploads nothing; a failed
upload leaves no object (``ObjectStore.upload``). The query's result is one row like DuckDB's
COPY result: ``Count`` (rows written), ``bytes`` (object size) and ``destination``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import pyarrow as pa
import pyarrow.ipc

from ..errors import ObjectStoreError, QueryDeniedError, QueryError, runner_invalid
from ..model.catalog import Catalog, Connection
from ..model.policy import Policy, visible, writes_allowed
from ..model.sql import ParsedSql, Token
from .objectstore import ObjectStore

SANDBOX_OUTPUT_DIR = "/scratch/duckcell-out"  # where a sandbox writes a query's output file
_OPTIONS = (
    "format",
    "compression",
    "compression_level",
    "row_group_size",
    "row_group_size_bytes",
    "parquet_version",
)
_GLOB = set("*?[]{}")
_PARQUET = b"PAR1"  # a Parquet file's first and last 4 bytes
_MAX_COPY_RESULT = 64 * 1024  # DuckDB's COPY result (one int64 row) is a few hundred bytes


@dataclass(frozen=True, slots=True)
class WritePlan:
    """A checked write: where it goes, who uploads it, and the SQL the sandbox runs instead."""

    destination: str  # s3://bucket/key, as written in the SQL
    connection: str  # the catalog connection that uploads it
    sql: str  # the SQL text with the destination replaced by ``output_path``
    output_path: str  # the file the sandbox writes, under /scratch


class _Target(NamedTuple):
    destination: str
    start: int  # the destination literal's span in the statement text
    end: int
    options: dict[str, str]


def plan_write(parsed: ParsedSql, policy: Policy, catalog: Catalog) -> WritePlan | None:
    """The write a SQL text (``parsed`` by DuckDB) asks for, checked and rewritten; None if it
    writes no object.

    Raises QueryDeniedError (what is wrong and what to write instead).
    """
    statements = [statement.text for statement in parsed.statements]
    # DuckDB's parser says which statements are a COPY; its tokens say where the TO points.
    targets = [
        None if statement.copy_to is None else _target_at(statement.copy_to, 0)
        for statement in parsed.statements
    ]
    if not any(targets):
        return None
    if any(targets[:-1]):
        raise QueryDeniedError(
            "a COPY ... TO object storage must be the last statement of the query; "
            "run it last (or alone)"
        )
    target = targets[-1]
    assert target is not None
    bucket = _check_destination(target, policy)
    connection = write_connection(catalog, policy, bucket)
    output = f"{SANDBOX_OUTPUT_DIR}/{uuid.uuid4().hex}.parquet"
    last = statements[-1]
    rewritten = last[: target.start] + "'" + output + "'" + last[target.end :]
    # Each statement's text but the last ends with its ";" (DuckDB keeps it).
    return WritePlan(
        target.destination, connection.name, "\n".join([*statements[:-1], rewritten]), output
    )


def write_connection(catalog: Catalog, policy: Policy, bucket: str) -> Connection:
    """The s3 connection that holds ``bucket`` (its tables live there) and the policy may use.

    Raises QueryDeniedError when no connection, only connections the policy may not use, or
    several connections hold the bucket.
    """
    holders = sorted(
        {
            table.connection
            for table in catalog.tables.values()
            if table.path.startswith(f"s3://{bucket}/")
            and catalog.connections[table.connection].kind == "s3"
        }
    )
    usable = [name for name in holders if visible(policy.access.connections, name)]
    if len(usable) == 1:
        return catalog.connections[usable[0]]
    if len(usable) > 1:
        raise QueryDeniedError(
            f"bucket {bucket} belongs to several connections ({', '.join(usable)}); the "
            "launcher cannot tell which one to upload with: keep one connection per bucket"
        )
    if holders:
        raise QueryDeniedError(
            f"policy {policy.name} may not use connection {holders[0]}, which holds bucket "
            f"{bucket}; use a policy whose access.connections includes it"
        )
    raise QueryDeniedError(
        f"no catalog connection holds bucket {bucket}; add a table under s3://{bucket}/ to "
        "the catalog so the worker knows which endpoint and secrets to upload with"
    )


def _check_destination(target: _Target, policy: Policy) -> str:
    """The destination's bucket, once its form, format, options and policy are checked."""
    url = target.destination
    if not url.startswith("s3://"):
        raise QueryDeniedError(f"cannot write to {url!r}: only s3:// destinations are written")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key or key.endswith("/") or _GLOB & set(url) or "\0" in url:
        raise QueryDeniedError(
            f"cannot write to {url!r}: name one object, like s3://bucket/prefix/name.parquet"
        )
    unknown = sorted(set(target.options) - set(_OPTIONS))
    if unknown:
        raise _unsupported(unknown[0])
    fmt = target.options.get("format")
    if fmt != "parquet" and (fmt is not None or not key.lower().endswith(".parquet")):
        raise QueryDeniedError(
            f"writes to object storage are Parquet; add (FORMAT parquet) to the COPY to {url}"
        )
    if not writes_allowed(policy, url):
        if not policy.writes.allowed:
            why = "writes nothing (writes.allowed is false)"
        else:
            why = f"writes only under {', '.join(policy.writes.prefixes)}"
        raise QueryDeniedError(
            f"policy {policy.name} may not write {url}: it {why}; write under an allowed "
            "prefix or use a policy that allows this one"
        )
    return bucket


def _unsupported(option: str) -> QueryDeniedError:
    return QueryDeniedError(
        f"COPY option {option.upper()} is not supported when writing to object storage (one "
        f"Parquet object per query); use only {', '.join(o.upper() for o in _OPTIONS)}"
    )


def _target_at(tokens: tuple[Token, ...], i: int) -> _Target | None:
    if i >= len(tokens):
        return None
    literal = tokens[i]
    if "://" not in literal.text:
        return None  # a local file: the sandbox may only write its own /scratch
    plain = literal.kind == "string_const" and literal.text[:1] == literal.text[-1:] == "'"
    if not plain or len(literal.text) < 2:
        raise QueryDeniedError(
            f"write the COPY destination as a plain single-quoted string, not {literal.text}"
        )
    destination = literal.text[1:-1].replace("''", "'")
    return _Target(destination, literal.start, literal.end, _options(tokens[i + 1 :]))


def _options(tokens: tuple[Token, ...]) -> dict[str, str]:
    """``[WITH] (NAME value, ...)`` after the destination, names and values lowercased."""
    if tokens and tokens[0].kind == "keyword" and tokens[0].text.upper() == "WITH":
        tokens = tokens[1:]
    if not tokens:
        return {}
    if tokens[0].text != "(" or tokens[-1].text != ")":
        raise QueryDeniedError("write COPY options as (NAME value, ...) after the destination")
    options: dict[str, str] = {}
    item: list[str] = []
    for token in [*tokens[1:-1], Token(0, 0, "operator", ",")]:
        if token.kind == "operator" and token.text != ",":
            raise _unsupported(item[0] if item else token.text)
        if token.text != ",":
            item.append(token.text.strip("'\"").lower())
        elif item:
            options[item[0]] = " ".join(item[1:])
            item = []
    return options


class PendingWrite:
    """One write query's output on its way from the sandbox to object storage.

    The executor feeds it the runner's result and output chunks, and ``check``s them when the
    runner's summary comes (while the sandbox still runs, so a lie is contained like a bad
    result): the file no larger than the sandbox's /scratch (``accept_output``'s
    ``max_bytes``), a Parquet file's magic at both ends, DuckDB's COPY result one int64 count.
    What fails is RunnerInvalidError. ``publish`` uploads once the query has succeeded and
    returns the result to send instead; ``discard`` (always called when the query ends) removes
    the spooled file, so a failed query uploads nothing.
    ``uploaded`` is called with the destination once an upload was tried, whatever its end:
    a cancelled or failed one may still have written the object, and the data path drops the
    cached listings it would make stale (dropping them needlessly costs one LIST).
    """

    def __init__(
        self,
        plan: WritePlan,
        store: ObjectStore,
        spool_dir: Path | None = None,
        *,
        uploaded: Callable[[str], None] | None = None,
    ):
        self.plan = plan
        self._store = store
        self._spool_dir = spool_dir
        self._uploaded = uploaded
        self._spool: Path | None = None
        self._file: BinaryIO | None = None
        self._result: list[bytes] = []
        self._result_size = 0
        self._head = b""  # the file's first 4 bytes
        self._tail = b""  # and its last 8
        self._rows: int | None = None  # the COPY count, once checked
        self.size = 0

    def accept_result(self, ipc: bytes) -> None:
        """Take (checked) bytes of DuckDB's COPY result: one row, the row count."""
        self._result_size += len(ipc)
        if self._result_size > _MAX_COPY_RESULT:
            raise runner_invalid(
                f"a COPY result of more than {_MAX_COPY_RESULT} bytes (DuckDB's is one row)"
            )
        self._result.append(ipc)

    async def accept_output(self, data: bytes, *, max_bytes: int | None = None) -> None:
        """Spool the next slice of the output file; past ``max_bytes`` (the sandbox's /scratch,
        where the file was written) RunnerInvalidError, nothing written."""
        if max_bytes is not None and self.size + len(data) > max_bytes:
            raise runner_invalid(
                f"an output file of more than {max_bytes} bytes, larger than the sandbox's "
                "/scratch it was written to"
            )
        if self._file is None:
            fd, name = tempfile.mkstemp(prefix="duckcell-write-", dir=self._spool_dir)
            self._spool = Path(name)
            self._file = os.fdopen(fd, "wb")
        await asyncio.to_thread(self._file.write, data)
        self.size += len(data)
        if len(self._head) < len(_PARQUET):
            self._head += data[: len(_PARQUET) - len(self._head)]
        self._tail = (self._tail + data[-8:])[-8:]

    def check(self) -> None:
        """Check the output file's framing and the COPY result before anything is uploaded;
        RunnerInvalidError when either is not what DuckDB writes. No file at all is left to
        ``publish`` (an image older than the launcher sends none)."""
        if self._file is None:
            return
        footer = int.from_bytes(self._tail[:4], "little")  # the footer's length, then PAR1
        if (
            self.size < 12
            or self._head != _PARQUET
            or self._tail[4:] != _PARQUET
            or footer > self.size - 12
        ):
            raise runner_invalid(
                f"an output file of {self.size} bytes that is not a Parquet file (no PAR1 "
                "magic at both ends, or a footer longer than the file)"
            )
        table = self._copy_result()
        if table.num_columns != 1:
            raise runner_invalid(f"a COPY result of {table.num_columns} columns, not the count")
        self._rows = self._count(table)

    def _copy_result(self) -> pa.Table:
        try:
            return pa.ipc.open_stream(b"".join(self._result)).read_all()
        except (pa.ArrowException, OSError, ValueError) as error:
            raise runner_invalid(f"a COPY result that does not decode ({error})") from None

    @staticmethod
    def _count(table: pa.Table) -> int:
        """The row count: the first column, one non-negative int64."""
        if table.num_columns and table.num_rows == 1 and table.schema.types[0] == pa.int64():
            count = table.column(0)[0].as_py()
            if count is not None and count >= 0:
                return int(count)
        first = table.schema.types[0] if table.num_columns else "no column"
        raise runner_invalid(
            f"a COPY result that is not one row count ({table.num_rows} rows, first {first})"
        )

    async def publish(self) -> bytes:
        """Upload the spooled file; the one-row result table as Arrow IPC stream bytes.

        Raises QueryError when the sandbox sent no file, RunnerInvalidError (before any upload)
        when its COPY result holds no row count (``check``, which the executor runs earlier,
        also checks the file), ObjectStoreError when the upload failed (a failed upload leaves
        nothing at the destination; a cancelled one may have landed it, see
        ``S3Store._upload``).
        """
        if self._file is None or self._spool is None:
            raise QueryError(
                "the sandbox sent no output file for the write; the sandbox image may be older "
                "than the launcher: run `duckcell image build`"
            )
        rows = self._rows if self._rows is not None else self._count(self._copy_result())
        self._file.close()
        try:
            await self._store.upload(self._spool, self.plan.destination)
        except ObjectStoreError as error:
            raise ObjectStoreError(
                f"the query succeeded but its result was not written to "
                f"{self.plan.destination}: {error}"
            ) from None
        finally:
            if self._uploaded is not None:
                self._uploaded(self.plan.destination)
        return result_ipc(rows, self.size, self.plan.destination)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._spool is not None:
            self._spool.unlink(missing_ok=True)
        self._file, self._spool = None, None


def result_ipc(rows: int, size: int, destination: str) -> bytes:
    """A write's result, one row like DuckDB's COPY result, as an Arrow IPC stream."""
    table = pa.table(
        {
            "Count": pa.array([rows], pa.int64()),
            "bytes": pa.array([size], pa.int64()),
            "destination": pa.array([destination], pa.string()),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
