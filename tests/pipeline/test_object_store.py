"""Outputs on an object store: an S3-protocol server (moto) on 127.0.0.1 started by the test,
written through `OutputWriter` at ``s3://bucket/prefix``, read back with pyarrow and DuckDB (over
the Arrow data: DuckDB's own S3 extension would be downloaded at run time), and the lease that
keeps one writer per folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import boto3
import duckdb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
import yaml
from moto.server import ThreadedMotoServer

from paths import REPO
from perceiver_stream.checkpoint import read_config

import pipeline.partcopy
from pipeline.errors import OutputError
from pipeline.parquet import ErrorRow, FlowRow, OutputWriter, WindowRow
from pipeline.reader import open_dataset

BUCKET = "pstream"
KEY, SECRET = "test-key-id", "test-secret-never-logged"


class _FixCompleteMultipartUpload:
    """moto 5.2.1 answers CompleteMultipartUpload with a ``CompleteMultipartUploadResponse`` root
    element where S3 sends ``...Result``, and pyarrow then fails the upload
    (https://github.com/getmoto/moto/issues/10055): rename it in the response."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        if not (environ["REQUEST_METHOD"] == "POST" and "uploadId=" in environ.get("QUERY_STRING", "")):
            return self.app(environ, start_response)
        answer: list = []
        body = b"".join(self.app(environ, lambda status, headers, *exc: answer.extend((status, headers))))
        body = body.replace(b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult")
        headers = [(k, v) for k, v in answer[1] if k.lower() != "content-length"]
        start_response(answer[0], [*headers, ("Content-Length", str(len(body)))])
        return [body]


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    server._server.app = _FixCompleteMultipartUpload(server._server.app)
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request) -> str:
    """A fresh ``s3://`` prefix, with the endpoint and credentials in the environment."""
    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_server)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/{request.node.name}"


def s3fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", access_key=KEY, secret_key=SECRET)


def wrow(k: int) -> WindowRow:
    return WindowRow(k, 0.5 * k, 0.5 * k + 1.0, True, True, False, k == 0, [("a", 0.5)], np.full(3, k, np.float32), "tiny")


def frow(k: int) -> FlowRow:
    return FlowRow(k, 0.5 * k + 0.9, np.full((2, 3, 2), k, np.float32))


def writer(uri: str, **kw) -> OutputWriter:
    return OutputWriter(uri, model_name="tiny", config_hash="h", **kw)


@pytest.mark.parametrize("child_from", [None, 0], ids=["copies-here", "copies-in-a-child"])
def test_write_publish_and_read_back_over_s3(s3, s3_server, child_from, monkeypatch):
    if child_from is not None:  # every merge and publication in a child process, which opens the store itself
        monkeypatch.setattr(pipeline.partcopy, "CHILD_COPY_BYTES", child_from)
    with writer(s3, publish_every_s=10) as w:
        for start in range(0, 40, 8):  # 20 s of media time: period 0 published on the way
            w.write("cam0", [wrow(k) for k in range(start, start + 8)], flow=[frow(k) for k in range(start, start + 8)])
        w.write("cam1", [wrow(k) for k in range(5)])
        w.write_errors("cam1", [ErrorRow("DecodeError", "bad packet", window_id=3)])
        got = open_dataset(s3, "windows").to_table()  # the project's reader: every committed row, now
        assert sorted(zip(got["stream_id"].to_pylist(), got["window_id"].to_pylist())) == (
            [("cam0", k) for k in range(40)] + [("cam1", k) for k in range(5)])
    fs, base = s3fs(s3_server), s3[len("s3://"):]
    names = sorted(i.path[len(base) + 1:] for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                   if i.type == pafs.FileType.File)
    assert "_lease.json" not in names  # released at close
    assert [n for n in names if n.startswith("windows/")] == [
        "windows/stream_id=cam0/part-000000-000-00.parquet", "windows/stream_id=cam0/part-000001-000-00.parquet",
        "windows/stream_id=cam1/part-000000-000-00.parquet"]
    assert not [n for n in names if n.startswith("_parts/") or n.endswith(".tmp")]
    # a plain reader of the hive layout, as any pyarrow user would point it at the bucket
    table = ds.dataset(f"{base}/windows", filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert duckdb.from_arrow(table).aggregate("stream_id, count(*), count(distinct window_id)", "stream_id").order(
        "stream_id").fetchall() == [("cam0", 40, 40), ("cam1", 5, 5)]
    flow = ds.dataset(f"{base}/flow", filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert sorted(flow["window_id"].to_pylist()) == list(range(40))
    np.testing.assert_array_equal(np.array(flow.sort_by("window_id")["flow"][7].as_py()), np.full(12, 7.0))
    with writer(s3) as w:  # a resume reads the manifest back from the store
        assert w.resume_from("cam0") == 40 and w.resume_from("cam1") == 5
        assert w.write("cam0", [wrow(k) for k in range(38, 42)]) == [40, 41]
    assert SECRET not in json.dumps(names)


def test_one_writer_per_store_folder_by_lease(s3, s3_server):
    first = writer(s3, owner="run-a")
    with pytest.raises(OutputError, match="owned by run-a until") as err:
        writer(s3, owner="run-b")
    assert s3.replace("s3://", "") in str(err.value) and "\n" not in str(err.value)
    again = writer(s3, owner="run-a")  # the same owner (a restarted sink) takes its folder back
    again.close(publish=False)
    first.close(publish=False)

    fs, base = s3fs(s3_server), s3[len("s3://"):]
    with fs.open_output_stream(f"{base}/_lease.json") as fh:  # a run that died: its lease expired
        fh.write(json.dumps({"owner": "run-dead", "expires": time.time() - 1, "renewed": 0}).encode())
    taker = writer(s3, owner="run-c", lease_s=0.0)  # ttl 0: every renewal checks the lease
    taker.write("cam0", [wrow(0)])
    with fs.open_output_stream(f"{base}/_lease.json") as fh:  # another writer took the folder
        fh.write(json.dumps({"owner": "run-d", "expires": time.time() + 60, "renewed": 0}).encode())
    with pytest.raises(OutputError, match="lost the output folder's lease to run-d"):
        taker.write("cam0", [wrow(1)])
    taker.close(publish=False)  # leaves run-d's lease alone
    with pytest.raises(OutputError, match="owned by run-d"):
        writer(s3, owner="run-e")


@pytest.mark.slow
def test_a_pipeline_run_writes_to_s3(s3, s3_server, tiny_checkpoint, tmp_path):
    """The whole pipeline (its own local Ray, so the sink's process has the environment's endpoint
    and credentials) into ``s3://``, read back with pyarrow; the secret appears nowhere."""
    streams = [{"id": "a", "synthetic": {"seed": 1, "seconds": 4.0}}, {"id": "b", "synthetic": {"seed": 2, "seconds": 3.0}}]
    cfg = {"streams": streams, **read_config(tiny_checkpoint)[1]["data"],
           "model": {"checkpoint": str(tiny_checkpoint), "device": "cpu", "batch_size": 4},
           "output": {"dir": s3, "publish_every_s": 2.0}}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "--config", str(cfg_file), "--no-progress",
                           "--no-dashboard"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fs, base = s3fs(s3_server), s3[len("s3://"):]
    table = ds.dataset(f"{base}/windows", filesystem=fs, format="parquet", partitioning="hive").to_table()
    got = duckdb.from_arrow(table).aggregate("stream_id, count(*), count(distinct window_id), min(window_id)",
                                             "stream_id").order("stream_id").fetchall()
    assert got == [("a", 7, 7, 0), ("b", 5, 5, 0)]  # 4 s and 3 s at 1 s / 0.5 s
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{base}/windows", recursive=True))
             if i.type == pafs.FileType.File]
    periods = {(f.split("/")[-2], f.split("/")[-1][:11]) for f in files}  # publish_every_s 2: windows 0-3, 4-
    assert periods == {(sid, f"part-00000{k}") for sid in ("stream_id=a", "stream_id=b") for k in (0, 1)}
    assert SECRET not in proc.stdout + proc.stderr


def test_a_password_in_the_output_uri_is_refused_without_repeating_it():
    with pytest.raises(OutputError, match="credentials in the environment") as err:
        OutputWriter(f"s3://{KEY}:{SECRET}@{BUCKET}/x", model_name="m", config_hash="h")
    assert SECRET not in str(err.value) and "***" in str(err.value)
