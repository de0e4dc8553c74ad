"""pipeline: sensor sources, media-time windows, config and Parquet output, without Ray."""

from pipeline.errors import PipelineError
from pipeline.window import Truth, Window

__all__ = ["PipelineError", "Truth", "Window"]
