"""The child process of ``altertable.run_client``: runs a script of Altertable client calls."""

from __future__ import annotations

import json
import sys
from typing import Any

import pyarrow as pa
from altertable_flightsql import Client
from altertable_flightsql.client import IngestTableMode
from altertable_flightsql.generated import arrow_flight_pb2


def _main() -> None:
    port, key = int(sys.argv[1]), sys.argv[2]
    client = Client("anyone", key, host="localhost", port=port)
    transaction = None
    for step in json.load(sys.stdin):
        try:
            kind, *args = step
            value: Any = None
            if kind == "query":
                value = client.query(args[0], transaction=transaction).read_all().to_pylist()
            elif kind == "execute":
                value = client.execute(args[0], transaction=transaction)
            elif kind == "prepare":
                params = args[1]
                if isinstance(params, dict) and "arrow" in params:
                    params = pa.RecordBatch.from_pydict(params["arrow"])
                with client.prepare(args[0], transaction=transaction) as prepared:
                    value = prepared.query(parameters=params).read_all().to_pylist()
            elif kind == "begin":
                transaction = client.begin_transaction()
            elif kind in ("commit", "rollback"):
                assert transaction is not None
                getattr(transaction, kind)()
                transaction = None
            elif kind == "ingest":
                table = pa.Table.from_pylist(args[2])
                mode = IngestTableMode[args[1]]
                with client.ingest(table_name=args[0], schema=table.schema, mode=mode) as writer:
                    writer.write_table(table)
            elif kind == "catalogs":
                value = client.get_catalogs().read_all().to_pylist()
            elif kind == "schemas":
                value = client.get_schemas().read_all().to_pylist()
            elif kind == "tables":
                value = client.get_tables().read_all().to_pylist()
            elif kind == "options":
                client._set_options(  # what its constructor sends for catalog=/schema=
                    {name: _option(v) for name, v in args[0].items()}
                )
            answer = {"ok": value}
        except Exception as error:  # reported to the test
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer, default=str), flush=True)
    client.close()


def _option(value: str) -> Any:
    return arrow_flight_pb2.SessionOptionValue(string_value=value)


if __name__ == "__main__":
    _main()
