"""perceiver_stream: a faithful, fast Perceiver / Perceiver IO library (torch only)."""

from perceiver_stream.batch import Batch, ModalityBatch, Targets
from perceiver_stream.checkpoint import load_checkpoint, read_config, save_checkpoint
from perceiver_stream.config import StreamingConfig
from perceiver_stream.convert import from_transformers, load_pretrained
from perceiver_stream.flow import estimate_flow
from perceiver_stream.multimodal import MultimodalPreprocessor, drop_modalities
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.perceiver import EncoderConfig, PerceiverEncoder, PerceiverIO, Tokens
from perceiver_stream.resampler import PerceiverResampler
from perceiver_stream.set_transformer import ISAB, MAB, PMA, SAB
from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates
from perceiver_stream.train import train

__all__ = [
    "ISAB", "MAB", "PMA", "SAB", "Batch", "EncoderConfig", "ModalityBatch", "ModelOutput", "MultimodalPreprocessor",
    "PerceiverEncoder", "PerceiverIO", "PerceiverResampler", "StreamStates", "StreamingConfig",
    "StreamingPerceiverIO", "Targets", "Tokens", "drop_modalities", "estimate_flow", "from_transformers",
    "load_checkpoint", "load_pretrained", "read_config", "save_checkpoint", "train",
]
