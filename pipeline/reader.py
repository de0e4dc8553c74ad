"""The project's manifest-aware reader: every committed row of a table, each once, at once.

Plain glob readers of ``<out>/<table>/**/*.parquet`` see the *published* rows (see
`pipeline.parquet`); `open_dataset` reads each stream's manifest and returns a
`pyarrow.dataset.Dataset` over the published files it names plus the committed parts not yet
published, with ``stream_id`` as a string column::

    from pipeline.reader import open_dataset
    windows = open_dataset("outputs", "windows")
    duckdb.sql("select stream_id, count(*) from windows group by 1")   # DuckDB reads Arrow datasets
    polars.scan_pyarrow_dataset(windows).collect()

The dataset is a snapshot of the manifest: a publication after it may delete a part it names
(the rows are then in a published file), so a long-lived reader opens a new one to catch up.
Reading takes no lock and writes nothing; it works on a folder a run is writing.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import OutputError
from pipeline.manifest import ManifestStore, StreamState, stream_ids
from pipeline.outputfs import OutputFS, open_output
from pipeline.tables import TABLES, table_schema

LOAD_TRIES = 5  # a compaction running while the manifest is read removes objects: read it again


def committed_files(out: OutputFS, table: str) -> dict[str, list[str]]:
    """Per stream, the files (relative paths) holding ``table``'s committed rows: published
    files first, then unpublished parts in commit order."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    files: dict[str, list[str]] = {}
    for sid in stream_ids(out):
        state = _load(out, sid)
        paths = [f["path"] for f in state.published(table)] + [p.path for p in state.parts if p.table == table]
        if paths:
            files[sid] = paths
    return files


def open_dataset(output_dir: str | Path, table: str) -> ds.Dataset:
    """Every committed row of ``table`` under ``output_dir`` (local path or URI), each once, as a
    `pyarrow.dataset.Dataset` with a ``stream_id`` string column (see the module docstring)."""
    out = open_output(output_dir)
    files = committed_files(out, table)
    paths = [out.path(p) for sid in files for p in files[sid]]
    if not paths:
        dim = {"embedding_dim": 0} if table in ("windows", "student") else {}
        schema = table_schema(table, **dim).append(pa.field("stream_id", pa.string()))
        return ds.dataset(schema.empty_table())
    schema = pq.read_schema(paths[0], filesystem=out.fs).append(pa.field("stream_id", pa.string()))
    parts = [ds.field("stream_id") == pa.scalar(sid, pa.string()) for sid in files for _ in files[sid]]
    return ds.FileSystemDataset.from_paths(
        paths, schema=schema, format=ds.ParquetFileFormat(), filesystem=out.fs, partitions=parts
    )


def _load(out: OutputFS, stream_id: str) -> StreamState:
    for _ in range(LOAD_TRIES - 1):
        try:
            return ManifestStore(out, stream_id).load(tidy=False)
        except (FileNotFoundError, OutputError):
            continue
    return ManifestStore(out, stream_id).load(tidy=False)
