"""pipeline: sensor sources, media-time windows, config and Parquet output, without Ray."""

from pipeline.errors import PipelineError
from pipeline.window import Truth, Window

__all__ = ["PipelineError", "Truth", "Window"]
from pipeline.read import open_stream, read_windows  # noqa: E402
from pipeline.windowing import windows  # noqa: E402

__all__ += ["open_stream", "read_windows", "windows"]
from pipeline.collate import collate  # noqa: E402

__all__ += ["collate"]
