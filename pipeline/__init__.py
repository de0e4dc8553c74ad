"""pipeline: sensor sources, media-time windows, config and Parquet output, without Ray.

Importing the package (and its sources, windowing, config and Parquet modules) does not import
torch, so a process that only decodes or writes stays small; `pipeline.collate.collate`, which
builds the model's `Batch`, is imported from its module where the model needs it.
"""

from pipeline.errors import PipelineError
from pipeline.read import open_stream, read_windows
from pipeline.window import Truth, Window
from pipeline.windowing import windows

__all__ = ["PipelineError", "Truth", "Window", "open_stream", "read_windows", "windows"]
