"""The worked example of ``docs/formats-table.md`` as files (its YAML and CSV blocks, and the Parquet
test file it describes), so that tests keep the docs real."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats-table.md"


def doc_text(marker: str) -> str:
    """The text after ``<!-- marker -->`` in the table format's docs."""
    return DOC.read_text(encoding="utf-8").split(f"<!-- {marker} -->", 1)[1]


def doc_block(marker: str) -> str:
    """The fenced block after ``<!-- marker -->`` (without its fence lines)."""
    return doc_text(marker).split("```", 2)[1].split("\n", 1)[1]


def write_doc_example(folder: Path) -> tuple[Path, Path, Path]:
    """The docs' ``shop.yaml``, its train CSV and the Parquet test file the docs describe (same rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = folder / "shop.yaml"
    schema.write_text(doc_block("table-example-yaml"), encoding="utf-8")
    train = folder / "train-0.csv"
    train.write_text(doc_block("table-example-csv"), encoding="utf-8")
    lines = doc_block("table-example-csv").strip().splitlines()
    header = lines[0].split(",")
    cols = {name: [line.split(",")[i] for line in lines[1:]] for i, name in enumerate(header)}
    pq.write_table(pa.table({
        "clicked": pa.array([int(v) for v in cols["clicked"]], pa.int8()),
        "bought": pa.array([v == "1" for v in cols["bought"]]),
        "user": cols["user"],
        "pageview": [int(v) for v in cols["pageview"]],
        "category": [int(v) for v in cols["category"]],
        "shop": pa.array([int(v) for v in cols["shop"]], pa.int32()),
        "keywords": pa.array([v.split("|") if v else None for v in cols["keywords"]], pa.list_(pa.string())),
        "tags": cols["tags"],
        "price": [float(v) for v in cols["price"]],
        "age": [int(v) for v in cols["age"]],
    }), folder / "test.parquet")
    return schema, train, folder / "test.parquet"
