"""Configurations of DeepMind's published Perceiver IO models, and builders of our modules for them.

Each config is a dataclass with the fields of ``transformers``' ``PerceiverConfig`` it uses (same
names, same defaults as the published checkpoints' where the task fixes them), ``from_dict`` to read
a ``config.json`` and ``build()`` returning a :class:`~perceiver_stream.perceiver.PerceiverIO`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from perceiver_stream.decoders import (
    ClassificationDecoder,
    CrossAttentionDecoder,
    FlowDecoder,
    FourierQueries,
    GroupedDecoder,
    GroupedQueries,
    LearnedQueries,
)
from perceiver_stream.deepmind.processors import (
    AudioPatchHead,
    AudioPatchPreprocessor,
    ClassHead,
    GroupHeads,
    ImagePreprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    ProjectionHead,
)
from perceiver_stream.perceiver import EncoderConfig, PerceiverEncoder, PerceiverIO


# ``PerceiverConfig``'s own defaults: ``save_pretrained`` leaves out fields that equal them.
HF_DEFAULTS: dict[str, Any] = {
    "num_latents": 256,
    "d_latents": 1280,
    "num_blocks": 1,
    "num_self_attends_per_block": 26,
    "num_self_attention_heads": 8,
    "num_cross_attention_heads": 8,
    "qk_channels": None,
    "v_channels": None,
    "cross_attention_shape_for_attention": "kv",
    "self_attention_widening_factor": 1,
    "cross_attention_widening_factor": 1,
    "use_query_residual": True,
    "num_labels": 2,
    "image_size": 56,
    "train_size": (368, 496),
    "num_frames": 16,
    "audio_samples_per_frame": 1920,
    "samples_per_patch": 16,
    "output_shape": (1, 16, 224, 224),
    "output_num_channels": 512,
    "_label_trainable_num_channels": 1024,
}


@dataclass
class _PerceiverSettings:
    """Encoder fields shared by every preset (``PerceiverConfig`` names)."""

    architecture: ClassVar[str] = ""
    num_latents: int = 256
    d_latents: int = 1280
    num_blocks: int = 1
    num_self_attends_per_block: int = 26
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    qk_channels: int | None = None
    v_channels: int | None = None
    cross_attention_shape_for_attention: str = "kv"
    self_attention_widening_factor: int = 1
    cross_attention_widening_factor: int = 1
    use_query_residual: bool = True
    num_labels: int = 2

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> _PerceiverSettings:
        """Read the fields this preset uses from a ``PerceiverConfig`` dict (``config.json``).

        Fields absent from the dict take ``PerceiverConfig``'s defaults, as ``transformers`` does.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        merged = {**HF_DEFAULTS, **config}
        kw = {k: v for k, v in merged.items() if k in names}
        if "num_labels" not in config and config.get("id2label"):
            kw["num_labels"] = len(config["id2label"])
        for k, v in kw.items():
            if isinstance(v, list):
                kw[k] = tuple(v)
        return cls(**kw)

    def encoder(self, input_channels: int) -> PerceiverEncoder:
        return PerceiverEncoder(
            EncoderConfig(
                input_channels=input_channels,
                num_latents=self.num_latents,
                d_latents=self.d_latents,
                num_blocks=self.num_blocks,
                num_self_attends_per_block=self.num_self_attends_per_block,
                num_self_attention_heads=self.num_self_attention_heads,
                num_cross_attention_heads=self.num_cross_attention_heads,
                qk_channels=self.qk_channels,
                v_channels=self.v_channels,
                cross_attention_shape_for_attention=self.cross_attention_shape_for_attention,
                self_attention_widening_factor=self.self_attention_widening_factor,
                cross_attention_widening_factor=self.cross_attention_widening_factor,
                use_query_residual=self.use_query_residual,
            )
        )


@dataclass
class OpticalFlowConfig(_PerceiverSettings):
    """DeepMind's optical-flow Perceiver IO; the defaults are the published model (41 M parameters).

    Input: ``B x 2 x 27 x H x W`` (3x3 patches of two RGB frames, see ``perceiver_stream.flow``),
    output ``B x H x W x 2``; ``H x W`` must equal ``train_size`` for the published weights'
    positions to mean what they were trained on (``perceiver_stream.flow`` tiles larger frames).
    """

    architecture: ClassVar[str] = "PerceiverForOpticalFlow"
    num_latents: int = 2048
    d_latents: int = 512
    num_self_attends_per_block: int = 24
    num_self_attention_heads: int = 16
    num_cross_attention_heads: int = 1
    train_size: tuple[int, int] = (368, 496)
    num_bands: int = 64
    patch_channels: int = 64
    rescale_factor: float = 100.0

    def build(self) -> PerceiverIO:
        pre = ImagePreprocessor(
            "patches",
            out_channels=self.patch_channels,
            spatial_downsample=1,
            temporal_downsample=2,
            conv_after_patching=True,
            conv_after_patching_in_channels=54,
            num_bands=self.num_bands,
            max_resolution=self.train_size,
        )
        dec = FlowDecoder(
            pre.num_channels,
            self.d_latents,
            2,
            self.rescale_factor,
            shape_for_attention=self.cross_attention_shape_for_attention,
        )
        return PerceiverIO(self.encoder(pre.num_channels), dec, pre)


@dataclass
class ImageClassifierFourierConfig(_PerceiverSettings):
    """DeepMind's ImageNet Perceiver with Fourier positions on raw pixels (``B x 3 x H x W`` -> logits)."""

    architecture: ClassVar[str] = "PerceiverForImageClassificationFourier"
    num_latents: int = 512
    d_latents: int = 1024
    num_self_attends_per_block: int = 6
    num_blocks: int = 8
    num_labels: int = 1000
    num_bands: int = 64
    max_resolution: tuple[int, int] = (224, 224)

    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor(
            "pixels", spatial_downsample=1, num_bands=self.num_bands, max_resolution=self.max_resolution
        )

    def build(self) -> PerceiverIO:
        pre = self.preprocessor()
        dec = ClassificationDecoder(
            self.num_labels,
            self.d_latents,
            self.d_latents,
            use_query_residual=True,
            shape_for_attention=self.cross_attention_shape_for_attention,
        )
        return PerceiverIO(self.encoder(pre.num_channels), dec, pre)


@dataclass
class ImageClassifierLearnedConfig(ImageClassifierFourierConfig):
    """DeepMind's ImageNet Perceiver with a 1x1 convolution and learned positions (``image_size`` square images)."""

    architecture: ClassVar[str] = "PerceiverForImageClassificationLearned"
    image_size: int = 224

    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor(
            "conv1x1",
            out_channels=256,
            spatial_downsample=1,
            position_encoding="trainable",
            num_positions=self.image_size**2,
            pos_channels=256,
            project_pos_dim=256,
        )


@dataclass
class ImageClassifierConvConfig(ImageClassifierFourierConfig):
    """DeepMind's ImageNet Perceiver with a convolutional stem (4x downsampling) and Fourier positions."""

    architecture: ClassVar[str] = "PerceiverForImageClassificationConvProcessing"
    max_resolution: tuple[int, int] = (56, 56)

    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor(
            "conv", spatial_downsample=1, num_bands=self.num_bands, max_resolution=self.max_resolution
        )


@dataclass
class MultimodalAutoencoderConfig(_PerceiverSettings):
    """DeepMind's Kinetics video + audio + label autoencoder.

    Inputs ``{"image": B x T x 3 x H x W, "audio": B x S x 1, "label": B x num_labels}``; outputs
    ``{"audio": B x samples, "image": B x n x 3, "label": B x num_labels}`` for the decoded points
    (``points={"image": flat indices, "audio": patch indices, "label": None}``; all when omitted).
    """

    architecture: ClassVar[str] = "PerceiverForMultimodalAutoencoding"
    num_latents: int = 784
    d_latents: int = 512
    num_self_attends_per_block: int = 8
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 1
    num_labels: int = 700
    num_frames: int = 16
    image_size: int = 224
    audio_samples_per_frame: int = 1920
    samples_per_patch: int = 16
    output_shape: tuple[int, ...] = (1, 16, 224, 224)
    output_num_channels: int = 512
    label_query_channels: int = 1024

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MultimodalAutoencoderConfig:
        cfg = super().from_dict(config)
        cfg.label_query_channels = {**HF_DEFAULTS, **config}["_label_trainable_num_channels"]
        return cfg

    def build(self) -> PerceiverIO:
        n_audio = self.num_frames * self.audio_samples_per_frame
        image_res = (self.num_frames, self.image_size, self.image_size)
        pre = MultimodalPreprocessor(
            {
                "audio": AudioPatchPreprocessor(self.samples_per_patch, 192, (n_audio,)),
                "image": ImagePreprocessor("patches", spatial_downsample=4, num_bands=32, max_resolution=image_res),
                "label": OneHotPreprocessor(self.num_labels),
            },
            min_padding_size=4,
            mask_probs={"image": 0.0, "audio": 0.0, "label": 1.0},
        )
        queries = GroupedQueries(
            {
                "audio": FourierQueries((n_audio // self.samples_per_patch,), 192, (n_audio,)),
                "image": FourierQueries(tuple(self.output_shape[1:4]), 32, image_res),
                "label": LearnedQueries(1, self.label_query_channels),
            },
            min_padding_size=2,
        )
        dec = GroupedDecoder(
            queries,
            CrossAttentionDecoder(
                queries.num_channels,
                self.d_latents,
                self.output_num_channels,
                shape_for_attention=self.cross_attention_shape_for_attention,
            ),
        )
        c = self.output_num_channels
        post = GroupHeads(
            {
                "audio": AudioPatchHead(c, self.samples_per_patch),
                "image": ProjectionHead(c, 3),
                "label": ClassHead(c, self.num_labels),
            }
        )
        return PerceiverIO(self.encoder(pre.num_channels), dec, pre, post)


PRESETS: dict[str, type[_PerceiverSettings]] = {
    c.architecture: c
    for c in (
        OpticalFlowConfig,
        ImageClassifierFourierConfig,
        ImageClassifierLearnedConfig,
        ImageClassifierConvConfig,
        MultimodalAutoencoderConfig,
    )
}
