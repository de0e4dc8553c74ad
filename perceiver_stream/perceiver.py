"""Perceiver and Perceiver IO.

A Perceiver encoder cross-attends from a fixed set of learned latents to the input tokens, then
refines the latents with a tower of self-attention layers; Perceiver IO adds a decoder that
cross-attends from output queries to the latents. The numerics follow DeepMind's Perceiver IO
(and its ``transformers`` port) exactly, so converted checkpoints give the same outputs.

The pieces a model is assembled from:

* a *preprocessor* (any module) turning raw inputs into :class:`Tokens`;
* the :class:`PerceiverEncoder` (configured by :class:`EncoderConfig`);
* a *decoder* (see ``decoders.py``) building its queries from the tokens and attending to the latents;
* an optional *postprocessor* turning decoder outputs into task outputs.

Nothing here knows about modalities: multimodal models name their token groups in ``Tokens.sizes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from perceiver_stream.attention import CrossAttention, SelfAttention


@dataclass
class Tokens:
    """What a preprocessor hands to the encoder and to the decoder's query builder.

    ``tokens``: ``B x N x C`` byte array (features and position codes).
    ``mask``: ``B x N`` bool, True where a token is real (None: all real).
    ``grid``: the index shape the ``N`` tokens were flattened from, when they lie on a grid.
    ``without_pos``: the features without position or time codes (a dict per group for multimodal
    inputs: ``B x n x c`` each), for decoders that query with input features and pooled reads.
    ``sizes``: token count per named group, in token order, for multimodal inputs.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    grid: tuple[int, ...] | None = None
    without_pos: Any = None
    sizes: dict[str, int] | None = None

    def span(self, name: str) -> slice:
        """Where group ``name``'s tokens lie along ``N`` (from ``sizes``)."""
        start = 0
        for key, n in (self.sizes or {}).items():
            if key == name:
                return slice(start, start + n)
            start += n
        raise KeyError(f"no token group {name!r}; groups: {list(self.sizes or {})}")


@dataclass
class EncoderConfig:
    """Shape of a :class:`PerceiverEncoder`.

    The self-attention tower is ``num_blocks`` repeats of ``num_self_attends_per_block`` layers whose
    weights are shared across blocks. ``cross_attend_every_block`` re-reads the inputs before every
    block, as the original Perceiver does (the first cross-attend has its own weights, later ones
    share one set). Cross-attention qk channels default to the input width (``"kv"``) or the latent
    width (``"q"``), as DeepMind's ``shape_for_attn``.
    """

    input_channels: int
    num_latents: int = 256
    d_latents: int = 512
    num_blocks: int = 1
    num_self_attends_per_block: int = 6
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 1
    qk_channels: int | None = None
    v_channels: int | None = None
    cross_attention_shape_for_attention: str = "kv"
    self_attention_widening_factor: int = 1
    cross_attention_widening_factor: int = 1
    use_query_residual: bool = True
    cross_attend_every_block: bool = False

    def __post_init__(self) -> None:
        if self.cross_attention_shape_for_attention not in ("kv", "q"):
            raise ValueError(
                "cross_attention_shape_for_attention must be 'kv' or 'q', "
                f"not {self.cross_attention_shape_for_attention!r}"
            )
        for name in ("input_channels", "num_latents", "d_latents", "num_blocks", "num_self_attends_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for heads in (self.num_self_attention_heads, self.num_cross_attention_heads):
            if self.d_latents % heads:
                raise ValueError(f"d_latents ({self.d_latents}) must be divisible by the number of heads ({heads})")


class PerceiverEncoder(nn.Module):
    """Learned latents, cross-attention to the inputs, then the shared self-attention tower."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.d_latents) * 0.02)
        qk = c.qk_channels
        if qk is None:
            qk = c.input_channels if c.cross_attention_shape_for_attention == "kv" else c.d_latents
        num_cross = 2 if c.cross_attend_every_block and c.num_blocks > 1 else 1
        self.cross_attends = nn.ModuleList(
            CrossAttention(
                c.d_latents,
                c.input_channels,
                qk_channels=qk,
                v_channels=c.v_channels,
                num_heads=c.num_cross_attention_heads,
                widening_factor=c.cross_attention_widening_factor,
                use_query_residual=c.use_query_residual,
            )
            for _ in range(num_cross)
        )
        self.self_attends = nn.ModuleList(
            SelfAttention(
                c.d_latents,
                num_heads=c.num_self_attention_heads,
                qk_channels=c.qk_channels,
                v_channels=c.v_channels,
                widening_factor=c.self_attention_widening_factor,
            )
            for _ in range(c.num_self_attends_per_block)
        )

    def initial_latents(self) -> torch.Tensor:
        """The learned latents as a ``1 x M x D`` batch (broadcast over the input batch)."""
        return self.latents[None]

    def forward(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        *,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode ``inputs`` (``B x N x C``, ``mask`` ``B x N`` True = real) into ``B x M x D`` latents.

        ``latents`` overrides the learned initial latents (a streaming model seeds a window with the
        latents that ended the previous one); ``mask`` may also be ``B x M x N`` (each latent its own
        inputs) and ``key_bias`` (``H x N``) is added to the cross-attention logits.
        """
        z = self.attend_inputs(inputs, mask, latents, key_bias=key_bias)
        return self.refine(z, inputs, mask, key_bias=key_bias)

    def attend_inputs(
        self,
        inputs: torch.Tensor,
        mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        *,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The first cross-attention's output ``B x M x D``: the latents after reading the inputs."""
        z = self.initial_latents() if latents is None else latents
        z = self.cross_attends[0](z, inputs, mask, key_bias=key_bias)
        return z.expand(inputs.shape[0], -1, -1) if z.shape[0] != inputs.shape[0] else z

    def refine(
        self,
        z: torch.Tensor,
        inputs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The rest of the encoder after `attend_inputs`: ``num_blocks`` passes through the tower
        (re-reading ``inputs`` before each later one with ``cross_attend_every_block``)."""
        for block in range(self.config.num_blocks):
            if block and self.config.cross_attend_every_block:
                if inputs is None:
                    raise ValueError("an encoder that cross-attends every block needs the inputs to refine")
                z = self.cross_attends[-1](z, inputs, mask, key_bias=key_bias)
            for layer in self.self_attends:
                z = layer(z)
        return z


class PerceiverIO(nn.Module):
    """Preprocessor -> encoder -> decoder -> postprocessor.

    ``forward(inputs, mask=None, *, points=None, query_chunk=None, latents=None)``: ``inputs`` go to
    the preprocessor (or are used as tokens directly when there is none), ``points`` select a subset
    of the decoder's output queries, ``query_chunk`` bounds how many queries attend at once.
    """

    def __init__(
        self,
        encoder: PerceiverEncoder,
        decoder: nn.Module,
        preprocessor: nn.Module | None = None,
        postprocessor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.preprocessor = preprocessor
        self.encoder = encoder
        self.decoder = decoder
        self.postprocessor = postprocessor

    def tokenize(self, inputs: Any, mask: torch.Tensor | None = None) -> Tokens:
        """Run the preprocessor (if any) and attach ``mask``."""
        tokens = self.preprocessor(inputs) if self.preprocessor is not None else Tokens(inputs)
        if mask is not None:
            tokens.mask = mask if tokens.mask is None else tokens.mask & mask
        return tokens

    def forward(
        self,
        inputs: Any,
        mask: torch.Tensor | None = None,
        *,
        points: Any = None,
        query_chunk: int | None = None,
        latents: torch.Tensor | None = None,
    ) -> Any:
        tokens = self.tokenize(inputs, mask)
        z = self.encoder(tokens.tokens, tokens.mask, latents)
        out = self.decoder(tokens, z, points=points, query_chunk=query_chunk)
        return self.postprocessor(out) if self.postprocessor is not None else out

