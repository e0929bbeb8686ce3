"""One-time enrollment tokens against a real SQLite file; time moves by argument, never by sleep."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.controlplane.store import open_database
from launcher.controlplane.tokens import EnrollmentTokens
from launcher.errors import (
    CaMismatchError,
    ControlPlaneError,
    EnrollmentError,
    ExpiredTokenError,
    MalformedTokenError,
    UnknownTokenError,
    UsedTokenError,
)
from launcher.link.tokens import TOKEN_LENGTH, parse_token

CA_FP = "sha256:" + "ab" * 32
OTHER_CA_FP = "sha256:" + "cd" * 32
T0 = 1_700_000_000.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cp.sqlite3"


@pytest.fixture
def conn(db_path: Path) -> Iterator[sqlite3.Connection]:
    connection = open_database(db_path)
    yield connection
    connection.close()


@pytest.fixture
def tokens(conn: sqlite3.Connection) -> EnrollmentTokens:
    return EnrollmentTokens(conn, ca_fingerprint=CA_FP, clock=lambda: T0)


def _replace_secret(token: str, secret: str) -> str:
    prefix, token_id, _, ca = token.split(".")
    return ".".join([prefix, token_id, secret, ca])


def test_token_format_carries_the_ca_fingerprint(tokens: EnrollmentTokens) -> None:
    token = tokens.create()
    assert len(token) == TOKEN_LENGTH
    parsed = parse_token(f"  {token}\n")
    assert token == f"dct1.{parsed.token_id}.{parsed.secret}.{CA_FP.removeprefix('sha256:')}"
    assert parsed.ca_fingerprint == CA_FP
    assert parsed.secret not in repr(parsed)


def test_only_a_hash_of_the_secret_is_stored(
    tokens: EnrollmentTokens, conn: sqlite3.Connection
) -> None:
    secret = parse_token(tokens.create()).secret
    dump = "\n".join(conn.iterdump())
    assert secret not in dump


def test_redeem_once(tokens: EnrollmentTokens) -> None:
    token = tokens.create(ttl_s=60)
    assert tokens.redeem(token, now=T0 + 59) == parse_token(token).token_id
    with pytest.raises(
        UsedTokenError, match=r"already used .* `duckcell controlplane token create`"
    ):
        tokens.redeem(token, now=T0 + 59)


def test_expired_token(tokens: EnrollmentTokens) -> None:
    token = tokens.create(ttl_s=60)
    with pytest.raises(ExpiredTokenError, match="has expired: create a new token"):
        tokens.redeem(token, now=T0 + 60)


def test_default_lifetime_is_one_hour_from_the_clock(conn: sqlite3.Connection) -> None:
    clock = [T0]
    tokens = EnrollmentTokens(conn, ca_fingerprint=CA_FP, clock=lambda: clock[0])
    fresh, stale = tokens.create(), tokens.create()
    clock[0] = T0 + 3599
    tokens.redeem(fresh)
    clock[0] = T0 + 3601
    with pytest.raises(ExpiredTokenError):
        tokens.redeem(stale)


def test_used_wins_over_expired_in_the_message(tokens: EnrollmentTokens) -> None:
    token = tokens.create(ttl_s=60)
    tokens.redeem(token, now=T0)
    with pytest.raises(UsedTokenError):
        tokens.redeem(token, now=T0 + 3600)


def test_unknown_and_tampered_tokens(tokens: EnrollmentTokens) -> None:
    token = tokens.create()
    other_secret = parse_token(tokens.create()).secret
    unknown = f"dct1.{'0' * 16}.{'A' * 43}.{CA_FP.removeprefix('sha256:')}"
    for text in (unknown, _replace_secret(token, other_secret)):
        with pytest.raises(UnknownTokenError, match="not known to this control plane") as info:
            tokens.redeem(text)
        assert other_secret not in str(info.value)
    assert tokens.redeem(token)  # a failed attempt does not burn the real token


def test_token_for_another_ca(conn: sqlite3.Connection, tokens: EnrollmentTokens) -> None:
    foreign = EnrollmentTokens(conn, ca_fingerprint=OTHER_CA_FP, clock=lambda: T0).create()
    with pytest.raises(CaMismatchError, match="made for another control plane") as info:
        tokens.redeem(foreign)
    assert OTHER_CA_FP in str(info.value) and CA_FP in str(info.value)


SECRET = "S3cr3t-value_that-must-never-be-echoed-xxxx"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a duckcell enrollment token"),
        (SECRET, "not a duckcell enrollment token"),
        (f"dct2.{'0' * 16}.{SECRET}.{'ab' * 32}", "not a duckcell enrollment token"),
        (f"dct1.{'0' * 16}.{SECRET}", "malformed"),
        (f"dct1.{'0' * 16}.{SECRET}.{'ab' * 32}.extra", "malformed"),
        (f"dct1.{'0' * 16}.{SECRET[:-1]}.{'ab' * 32}", "malformed"),
        (f"dct1.{'0' * 16}.{SECRET}!.{'ab' * 32}", "malformed"),
        (f"dct1.{'Z' * 16}.{SECRET}.{'ab' * 32}", "malformed"),
        (f"dct1.{'0' * 16}.{SECRET}.{'AB' * 32}", "malformed"),
    ],
)
def test_malformed_tokens_never_echo_the_secret(
    tokens: EnrollmentTokens, text: str, message: str
) -> None:
    with pytest.raises(MalformedTokenError, match=message) as info:
        tokens.redeem(text)
    assert SECRET[:20] not in str(info.value)
    assert info.value.reason == "malformed"


def test_non_positive_ttl_is_refused(tokens: EnrollmentTokens) -> None:
    with pytest.raises(ControlPlaneError, match="must be positive"):
        tokens.create(ttl_s=0)


def test_tokens_survive_reopening_the_database(db_path: Path, tokens: EnrollmentTokens) -> None:
    token = tokens.create()
    reopened = open_database(db_path)
    try:
        assert EnrollmentTokens(reopened, ca_fingerprint=CA_FP, clock=lambda: T0).redeem(token)
    finally:
        reopened.close()


def test_concurrent_redeems_have_exactly_one_winner(
    db_path: Path, tokens: EnrollmentTokens
) -> None:
    token = tokens.create()
    start = threading.Barrier(20)
    winners: list[str] = []
    refusals: list[EnrollmentError] = []
    lock = threading.Lock()

    def redeem() -> None:
        conn = open_database(db_path)  # each thread its own connection, as sqlite3 requires
        try:
            mine = EnrollmentTokens(conn, ca_fingerprint=CA_FP, clock=lambda: T0)
            start.wait(10)
            try:
                won = mine.redeem(token)
            except EnrollmentError as exc:
                with lock:
                    refusals.append(exc)
            else:
                with lock:
                    winners.append(won)
        finally:
            conn.close()

    threads = [threading.Thread(target=redeem) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert winners == [parse_token(token).token_id]
    assert len(refusals) == 19
    assert all(isinstance(exc, UsedTokenError) for exc in refusals)
