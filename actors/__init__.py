"""actors: the Ray actors that wrap the pipeline's stages, their wiring, and `run`.

`run(config, output, ...)` runs the pipeline on an already initialised Ray (tests, notebooks);
``run_pipeline.py`` is the command line around it.
"""

from actors.distill import DistillActor
from actors.model import ModelActor, WindowResult
from actors.runner import RunFailed, RunningPipeline, RunSummary, StreamStatus, run
from actors.sink import SinkActor
from actors.source import ErrorRecord, SourceActor, SourceEvent

__all__ = [
    "DistillActor",
    "ErrorRecord",
    "ModelActor",
    "RunFailed",
    "RunSummary",
    "RunningPipeline",
    "SinkActor",
    "SourceActor",
    "SourceEvent",
    "StreamStatus",
    "WindowResult",
    "run",
]
