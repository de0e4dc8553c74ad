"""pipeline: sensor sources, media-time windows, config and Parquet output, without Ray."""

from pipeline.collate import collate
from pipeline.errors import PipelineError
from pipeline.read import open_stream, read_windows
from pipeline.window import Truth, Window
from pipeline.windowing import windows

__all__ = ["PipelineError", "Truth", "Window", "collate", "open_stream", "read_windows", "windows"]
