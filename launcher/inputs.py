"""What reaches duckcell from outside, checked where it enters: statement text, small files.

**Statement text.** A statement must be UTF-8 text without a NUL byte, at every entry:
``duckcell query`` (its argument or stdin), the control plane's ``Query`` service and Flight
SQL. No SQL a person writes holds a NUL (``chr(0)`` writes the character), DuckDB's parser
reads one inconsistently (a syntax error here, part of a literal there), and the logs and the
audit log that keep the text are read by tools that stop at one, so the text recorded would not
be the text run. A refusal is ``StatementTextError``, one line naming the byte and its offset
in bytes: INVALID_ARGUMENT on the wire, exit code 2 at the CLI (the input is bad, no query
failed). The size limit is ``launcher.model.sql.check_statement``'s, checked right after.

**Small files.** Flags that name a file holding a token, a key or a certificate read it with
``read_small_file``: at most ``MAX_SMALL_FILE_BYTES``, from a regular file or a pipe (``<(...)``,
``/dev/stdin`` fed by a pipe), so ``--token-file /dev/zero`` is one line, not a MemoryError.
``read_at_most`` bounds a stream the same way (a secret's value piped to ``duckcell secrets``).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import IO, Any

from .errors import DuckcellError, StatementTextError

# Tokens, API keys and PEM certificates are a few KiB at most.
MAX_SMALL_FILE_BYTES = 64 * 1024
# What surrogateescape (argv, file names) turns an undecodable byte into: U+DC80..U+DCFF.
_ESCAPED_BYTES = range(0xDC80, 0xDD00)


def statement_text(data: bytes) -> str:
    """``data`` as a statement's text; ``StatementTextError`` when it is not UTF-8 or holds
    a NUL byte, naming the first such byte."""
    try:
        sql = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise StatementTextError(_not_utf8(data[error.start], error.start)) from None
    check_statement_text(sql)
    return sql


def check_statement_text(sql: str) -> None:
    """``StatementTextError`` if ``sql`` holds a NUL, or characters no UTF-8 text has (bytes
    that were not UTF-8, kept as surrogates by Python's decoding of ``argv``)."""
    nul = sql.find("\0")
    if nul >= 0:
        raise StatementTextError(
            f"the statement contains a NUL byte (offset {_offset(sql, nul)}): remove it; "
            "write chr(0) where a value needs the character"
        )
    if sql.isascii():
        return
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError as error:
        char, offset = ord(sql[error.start]), _offset(sql, error.start)
        if char in _ESCAPED_BYTES:
            raise StatementTextError(_not_utf8(char - 0xDC00, offset)) from None
        raise StatementTextError(
            f"the statement is not valid UTF-8 (a lone surrogate U+{char:04X} at offset "
            f"{offset}): re-encode it as UTF-8"
        ) from None


def _offset(sql: str, index: int) -> int:
    """The byte offset of ``sql[index]`` in UTF-8 (everything before it encodes)."""
    return len(sql[:index].encode("utf-8", "surrogateescape"))


def _not_utf8(byte: int, offset: int) -> str:
    return (
        f"the statement is not valid UTF-8 (byte 0x{byte:02x} at offset {offset}): "
        "re-encode it as UTF-8"
    )


def read_small_file(path: Path, flag: str, holds: str) -> bytes:
    """The bytes of ``path``, given as ``flag``, which should hold ``holds`` (for messages).

    Raises ``DuckcellError`` (one line) for a file that cannot be read (a directory), is not a
    regular file or a pipe (``/dev/zero``, a terminal), or holds more than
    ``MAX_SMALL_FILE_BYTES``: nothing more than that is ever read.
    """
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
                raise DuckcellError(
                    f"{flag}: {path} is not a regular file; give the file that holds {holds}"
                )
            return read_at_most(file, f"{flag}: {path}", holds)
    except OSError as error:
        raise DuckcellError(f"{flag}: cannot read {path}: {error.strerror or error}") from None


def read_at_most(stream: IO[Any], source: str, holds: str) -> bytes:
    """All of ``stream`` if it holds at most ``MAX_SMALL_FILE_BYTES``, else ``DuckcellError``
    naming ``source``; reads one byte past the bound at most."""
    data = stream_bytes(stream, MAX_SMALL_FILE_BYTES + 1)
    if len(data) > MAX_SMALL_FILE_BYTES:
        raise DuckcellError(
            f"{source} holds more than {MAX_SMALL_FILE_BYTES // 1024} KiB; it should hold "
            f"only {holds}"
        )
    return data


def stream_bytes(stream: IO[Any], limit: int = -1) -> bytes:
    """Up to ``limit`` bytes of ``stream`` (all: -1), binary or text. A text stream is read
    through its buffer (``sys.stdin``: the bytes as sent, before any decoding), or, without one
    (a ``StringIO`` in stdin's place), its text as UTF-8."""
    if not isinstance(stream, io.TextIOBase):
        return bytes(stream.read(limit))
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        return bytes(buffer.read(limit))
    return str(stream.read(limit)).encode("utf-8", "surrogateescape")
