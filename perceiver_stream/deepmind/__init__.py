"""DeepMind's published Perceiver IO models: their input/output processors and configurations.

Modality-specific code lives here, outside the core model (``perceiver_stream.perceiver``).
"""

from perceiver_stream.deepmind.models import (
    ImageClassifierConvConfig,
    ImageClassifierFourierConfig,
    ImageClassifierLearnedConfig,
    MultimodalAutoencoderConfig,
    OpticalFlowConfig,
)

__all__ = [
    "ImageClassifierConvConfig",
    "ImageClassifierFourierConfig",
    "ImageClassifierLearnedConfig",
    "MultimodalAutoencoderConfig",
    "OpticalFlowConfig",
]
