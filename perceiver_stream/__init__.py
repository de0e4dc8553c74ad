"""perceiver_stream: a faithful, fast Perceiver / Perceiver IO library (torch only)."""

from perceiver_stream.batch import Batch, ModalityBatch, Targets

__all__ = ["Batch", "ModalityBatch", "Targets"]
