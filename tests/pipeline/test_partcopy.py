"""Copies of committed parts: large ones in a child process, with the same rows and the same errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.partcopy
from paths import REPO
from pipeline.errors import OutputError
from pipeline.manifest import Part
from pipeline.outputfs import open_output
from pipeline.parquet import FlowRow, OutputWriter, WindowRow

COPY_IN_CHILD = pipeline.partcopy._copy_in_child


def wrow(k: int) -> WindowRow:
    return WindowRow(k, 5.0 * k, 5.0 * k + 1.0, True, False, False, k == 0, [("a", 0.5)],
                     np.full(2, k, np.float32), "tiny")


def frow(k: int) -> FlowRow:
    return FlowRow(k, 5.0 * k + 0.9, np.full((2, 2, 2), k, np.float32))


def run_writer(root, monkeypatch, child_from: int) -> list[str]:
    """20 commits of one window, periods of 12 windows: a merge of 8 parts and a publication per
    table. Returns the files each copy in a child process wrote."""
    in_child: list[str] = []

    def spy(out, rel, parts, compression):
        in_child.append(rel)
        COPY_IN_CHILD(out, rel, parts, compression)

    monkeypatch.setattr(pipeline.partcopy, "_copy_in_child", spy)
    monkeypatch.setattr(pipeline.partcopy, "CHILD_COPY_BYTES", child_from)
    with OutputWriter(root, model_name="tiny", config_hash="h", publish_every_s=60) as w:
        for k in range(20):
            w.write("cam0", [wrow(k)], flow=[frow(k)])
    return in_child


def test_copies_from_the_size_limit_run_in_a_child_process_and_write_the_same_rows(tmp_path, monkeypatch):
    here = run_writer(tmp_path / "here", monkeypatch, child_from=1 << 40)
    child = run_writer(tmp_path / "child", monkeypatch, child_from=0)
    assert here == []
    assert any(rel.startswith("_parts/flow/") for rel in child)  # the merge of period 1's 8 parts
    assert "flow/stream_id=cam0/part-000000-000-00.parquet" in child  # period 0's publication
    for table in ("windows", "flow"):
        a = pq.read_table(tmp_path / "here" / table).sort_by("window_id")
        b = pq.read_table(tmp_path / "child" / table).sort_by("window_id")
        assert b.column("window_id").to_pylist() == list(range(20))
        assert a.equals(b), table


def write_part(root, name: str, table: pa.Table) -> Part:
    pq.write_table(table, root / name)
    return Part(name, "flow", 0, table.num_rows)


def test_a_copy_failing_in_its_child_raises_an_output_error_naming_the_cause_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.partcopy, "CHILD_COPY_BYTES", 0)
    out = open_output(tmp_path)
    good = write_part(tmp_path, "a.parquet", pa.table({"window_id": [0, 1]}))
    with pytest.raises(OutputError, match="b.parquet"):  # an OSError in the child: our message, sent back
        pipeline.partcopy.copy_parts(out, "flow/x.parquet", [good, Part("b.parquet", "flow", 0, 1)], "zstd")
    other = write_part(tmp_path, "c.parquet", pa.table({"t": ["late"]}))
    with pytest.raises(OutputError, match="failed in its child process: ArrowInvalid: Schema"):  # anything else: named
        pipeline.partcopy.copy_parts(out, "flow/x.parquet", [good, other], "zstd")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.parquet", "c.parquet", "flow"]


def test_a_child_whose_parent_has_ended_writes_nothing(tmp_path):
    part = write_part(tmp_path, "a.parquet", pa.table({"window_id": [0, 1]}))
    job = pickle.dumps({"parent": 1, "out": open_output(tmp_path), "rel": "flow/x.parquet", "parts": [part],
                        "compression": "zstd"})  # its parent is this test, not pid 1: an orphan's check fails
    done = subprocess.run([sys.executable, "-m", "pipeline.partcopy"], input=job, capture_output=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 1 and b"has ended" in done.stderr
    assert not (tmp_path / "flow").exists()
