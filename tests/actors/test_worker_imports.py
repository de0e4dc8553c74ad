"""Source and sink processes import neither torch nor the model: a stream costs its decoding."""

from __future__ import annotations

import subprocess
import sys

import ray

from actors.sink import SinkActor
from actors.source_pool import SourcePoolActor
from paths import REPO
from pipeline.config import parse_config


def test_source_and_sink_modules_import_without_torch():
    code = (
        "import sys\n"
        "import actors.source_pool, actors.source, actors.sink, actors.processes\n"
        "import pipeline, pipeline.read, pipeline.windowing, pipeline.parquet, pipeline.config\n"
        "heavy = ('torch', 'perceiver_stream', 'actors.model', 'actors.predictor')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_pool_and_sink_worker_processes_hold_no_torch(ray_session, tmp_path):
    cfg = parse_config({"streams": [{"id": "s", "synthetic": {"seed": 1, "seconds": 2}}]})
    pool = ray.remote(SourcePoolActor).options(num_cpus=0.01).remote(cfg)
    sink = ray.remote(SinkActor).options(num_cpus=0.01).remote(str(tmp_path / "out"), config_hash="x")
    try:
        ray.get(pool.add.remote([(cfg.streams[0], 0, 0, None)]))
        event, window = pool.next.remote("s", 0)
        assert ray.get(event).window_id == 0 and ray.get(window).video is not None
        for actor in (pool, sink):
            assert ray.get(actor.__ray_call__.remote(lambda _actor: "torch" in sys.modules)) is False
    finally:
        ray.kill(pool)
        ray.kill(sink)
