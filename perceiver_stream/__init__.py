"""perceiver_stream: a faithful, fast Perceiver / Perceiver IO library (torch only)."""

from perceiver_stream.batch import Batch, ModalityBatch, Targets

__all__ = ["Batch", "ModalityBatch", "Targets"]

from perceiver_stream.multimodal import MultimodalPreprocessor, drop_modalities
from perceiver_stream.streaming import StreamingConfig, StreamingPerceiverIO, StreamStates

__all__ += ["MultimodalPreprocessor", "StreamStates", "StreamingConfig", "StreamingPerceiverIO", "drop_modalities"]

from perceiver_stream.checkpoint import load_checkpoint, read_config, save_checkpoint
from perceiver_stream.resampler import PerceiverResampler
from perceiver_stream.set_transformer import ISAB, MAB, PMA, SAB
from perceiver_stream.train import train

__all__ += ["ISAB", "MAB", "PMA", "PerceiverResampler", "SAB", "load_checkpoint", "read_config", "save_checkpoint", "train"]

from perceiver_stream.convert import from_transformers, load_pretrained
from perceiver_stream.flow import estimate_flow
from perceiver_stream.perceiver import EncoderConfig, PerceiverEncoder, PerceiverIO, Tokens

__all__ += ["EncoderConfig", "PerceiverEncoder", "PerceiverIO", "Tokens", "estimate_flow", "from_transformers", "load_pretrained"]
