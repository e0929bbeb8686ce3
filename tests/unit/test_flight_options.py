"""Session options as USE statements: the catalog before the schema, always fully qualified,
and what the options say is where the session's statements run."""

from __future__ import annotations

from launcher.controlplane.apikeys import ApiKey
from launcher.flight.connections import Connection
from launcher.flight.messages import INVALID_OPTION_NAME, INVALID_OPTION_VALUE
from launcher.flight.options import SessionOptions

CALLER = ApiKey(key_id="k1", role="notebook")
CONNECTION = Connection("token", "c1")


def test_catalog_then_schema_fully_qualified_whatever_the_order_sent() -> None:
    options, ran = SessionOptions(), []
    errors = options.set(CALLER, CONNECTION, {"schema": "t", "catalog": "pad"}, ran.append)
    assert errors == {} and ran == ['USE "pad"."main"', 'USE "pad"."t"']
    assert options.get(CALLER, CONNECTION) == {"catalog": "pad", "schema": "t"}
    ran.clear()
    # Back to the catalog clients are shown: the session's own database, its main schema.
    assert options.set(CALLER, CONNECTION, {"catalog": "duckcell"}, ran.append) == {}
    assert ran == ['USE "memory"."main"']
    assert options.get(CALLER, CONNECTION) == {"catalog": "duckcell", "schema": "main"}
    ran.clear()
    # A schema named like an attached database is still a schema of the catalog in force.
    assert options.set(CALLER, CONNECTION, {"schema": "pad"}, ran.append) == {}
    assert ran == ['USE "memory"."pad"']


def test_refusals_are_per_option_and_change_nothing() -> None:
    options = SessionOptions()

    def refuse(sql: str) -> None:
        raise RuntimeError(f"Catalog Error: {sql}")

    errors = options.set(CALLER, CONNECTION, {"catalog": "nope", "colour": "red"}, refuse)
    assert errors == {"catalog": INVALID_OPTION_VALUE, "colour": INVALID_OPTION_NAME}
    assert options.get(CALLER, CONNECTION) == {"catalog": "duckcell", "schema": "main"}
    # Without a session only the defaults, which are in force: nothing runs.
    assert options.set(CALLER, None, {"catalog": "duckcell", "schema": "main"}, None) == {}
    assert options.set(CALLER, None, {"schema": "other"}, None) == {"schema": INVALID_OPTION_VALUE}
