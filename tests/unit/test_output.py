from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.cli.main import main
from launcher.cli.output import check_output, render_table, write_result

TABLE = pa.table({"n": [1, None], "s": ["dück", "x" * 60]})


def test_table_has_header_types_nulls_and_row_count() -> None:
    text = render_table(TABLE)
    assert "│ n " in text and "int64" in text and "NULL" in text
    assert "…" in text  # long cells are cut
    assert text.rstrip().endswith("(2 rows)")


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("csv", '"n","s"\n1,"dück"\n'),
        ("json", '[{"n": 1, "s": "dück"}]\n'),
    ],
)
def test_csv_and_json(fmt: str, expected: str) -> None:
    out = io.StringIO()
    write_result(TABLE.slice(0, 1), fmt, None, stdout=out)
    assert out.getvalue() == expected


def test_parquet_needs_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--output"):
        write_result(TABLE, "parquet", None)
    write_result(TABLE, "parquet", tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").equals(TABLE)


def test_an_output_that_cannot_be_written_is_refused_before_the_query_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before config, engine or sandbox: a typo in --output costs no query (the file
    error used to come as a traceback after the query had run)."""
    missing = tmp_path / "no-such-dir" / "out.csv"
    assert main(["query", "--format", "csv", "--output", str(missing), "SELECT 1"]) == 2
    assert f"directory {missing.parent} does not exist" in capsys.readouterr().err
    assert main(["query", "--output", str(tmp_path), "SELECT 1"]) == 2
    assert "is a directory" in capsys.readouterr().err
    check_output(tmp_path / "fine.csv")
    check_output(None)
