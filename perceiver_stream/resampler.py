"""Flamingo's Perceiver Resampler: a variable number of frames of tokens -> a fixed set of latents.

Per layer: ``latents += Attn(q=LN(latents), kv=[LN(media); LN(latents)])`` (the latents are
concatenated to the keys/values, so they can also attend to themselves), then
``latents += MLP(LN(latents))``; a final LayerNorm. Each frame's tokens get a learned time
embedding (so frame order matters, token order within a frame does not). Padded frames or tokens
are masked out of the keys; a batch row with no real frame still gets finite latents.
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver_stream.attention import MLP, MultiHeadAttention


class _ResamplerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, widening_factor: int) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, dim, qk_channels=dim, v_channels=dim, num_heads=num_heads, out_dim=dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, widening_factor)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, kv_mask: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        k, v = self.attn.project_kv(torch.cat([self.norm_media(media), q], dim=1))
        latents = latents + self.attn.attend(q, k, v, kv_mask)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    """``B x T x S x dim`` media tokens (T frames of S tokens) -> ``B x num_latents x dim``.

    ``max_frames`` bounds T (one learned time embedding per frame index).
    """

    def __init__(
        self, dim: int, *, depth: int = 2, num_latents: int = 64, num_heads: int = 8, max_frames: int = 8,
        widening_factor: int = 4,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.latents = nn.Parameter(0.02 * torch.randn(num_latents, dim))
        self.time_emb = nn.Parameter(0.02 * torch.randn(max_frames, dim))
        self.layers = nn.ModuleList(_ResamplerLayer(dim, num_heads, widening_factor) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, media: torch.Tensor, frame_mask: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``frame_mask`` ``B x T`` / ``token_mask`` ``B x T x S``: True where the frame / token is real."""
        b, t, s, _ = media.shape
        if t > self.time_emb.shape[0]:
            raise ValueError(f"{t} frames exceed the resampler's max_frames ({self.time_emb.shape[0]})")
        x = (media + self.time_emb[:t][None, :, None]).flatten(1, 2)
        mask = torch.ones(b, t, s, dtype=torch.bool, device=media.device)
        if frame_mask is not None:
            mask = mask & frame_mask[:, :, None]
        if token_mask is not None:
            mask = mask & token_mask
        mask = mask.flatten(1)
        # Masked tokens are zeroed too, so garbage there (even NaN) cannot reach the latents.
        x = torch.where(mask[..., None], x, 0.0)
        latents = self.latents[None].expand(b, -1, -1)
        kv_mask = torch.cat([mask, torch.ones(b, latents.shape[1], dtype=torch.bool, device=media.device)], dim=1)
        for layer in self.layers:
            latents = layer(latents, x, kv_mask)
        return self.norm(latents)
