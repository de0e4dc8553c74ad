"""Attention blocks on ``torch.nn.functional.scaled_dot_product_attention``.

The blocks follow Perceiver IO's conventions (and the ``transformers`` port's), so weights map
one to one: pre-LayerNorm with separate query and key/value norms for cross-attention, an
optional residual to the raw queries, separate qk and v channel counts, then
``x + MLP(LayerNorm(x))`` with a widening factor and exact GELU.

Key-padding masks are ``B x N`` bool, True where a token is real. A query whose keys are all
masked gets zeros, never NaN. Large query sets can be processed in chunks (``query_chunk``):
keys and values are projected once and each chunk attends to them, which gives the same result
as one pass because every query is independent of the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA over ``B x H x N x D`` heads with an optional ``B x Nk`` key mask (True = attend).

    Batch rows with no valid key return zeros instead of the NaN a fully masked softmax gives.
    """
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    empty = ~key_mask.any(dim=-1)  # B
    # Let empty rows attend to everything (finite), then zero them.
    attend = (key_mask | empty[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    if bool(empty.any()):
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


class MLP(nn.Module):
    """``Linear(d, w*d) -> GELU -> Linear(w*d, d)``, the dense block after attention."""

    def __init__(self, dim: int, widening_factor: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, widening_factor * dim)
        self.fc2 = nn.Linear(widening_factor * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MultiHeadAttention(nn.Module):
    """Projections around SDPA: ``q: q_dim -> qk``, ``k: kv_dim -> qk``, ``v: kv_dim -> v``, ``out: v -> out_dim``."""

    def __init__(
        self, q_dim: int, kv_dim: int, *, qk_channels: int, v_channels: int, num_heads: int, out_dim: int
    ) -> None:
        super().__init__()
        for name, ch in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if ch % num_heads:
                raise ValueError(f"{name} ({ch}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.q = nn.Linear(q_dim, qk_channels)
        self.k = nn.Linear(kv_dim, qk_channels)
        self.v = nn.Linear(kv_dim, v_channels)
        self.out = nn.Linear(v_channels, out_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values split into heads: each ``B x H x N x D``."""
        return self._heads(self.k(kv)), self._heads(self.v(kv))

    def attend(
        self, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of (normalised) queries ``B x Nq x q_dim`` to projected keys/values."""
        q = self._heads(self.q(q_in))
        if q.shape[0] != k.shape[0]:
            # Input-independent queries (learned latents) arrive with batch 1.
            q = q.expand(k.shape[0], -1, -1, -1)
        o = masked_attention(q, k, v, key_mask)
        b, h, n, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, h * d))


class CrossAttention(nn.Module):
    """Perceiver IO cross-attention layer: queries attend to inputs, then an MLP.

    ``qk_channels`` defaults to ``kv_dim`` (DeepMind's ``shape_for_attn='kv'``), ``v_channels`` to
    ``qk_channels``; the output has ``q_dim`` channels.
    """

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        *,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        num_heads: int = 1,
        widening_factor: int = 1,
        use_query_residual: bool = True,
    ) -> None:
        super().__init__()
        qk_channels = qk_channels or kv_dim
        v_channels = v_channels or qk_channels
        self.q_norm = nn.LayerNorm(q_dim)
        self.kv_norm = nn.LayerNorm(kv_dim)
        self.attn = MultiHeadAttention(
            q_dim, kv_dim, qk_channels=qk_channels, v_channels=v_channels, num_heads=num_heads, out_dim=q_dim
        )
        self.mlp_norm = nn.LayerNorm(q_dim)
        self.mlp = MLP(q_dim, widening_factor)
        self.use_query_residual = use_query_residual

    def project_inputs(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised, projected keys and values of ``inputs``, split into heads (computed once per input)."""
        return self.attn.project_kv(self.kv_norm(inputs))

    def attend(
        self, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer for ``queries`` given keys/values from :meth:`project_inputs`."""
        x = self.attn.attend(self.q_norm(queries), k, v, key_mask)
        if self.use_query_residual:
            x = x + queries
        return x + self.mlp(self.mlp_norm(x))

    def forward(
        self,
        queries: torch.Tensor,
        inputs: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        *,
        query_chunk: int | None = None,
    ) -> torch.Tensor:
        """``queries``: ``B x Nq x q_dim`` (or ``1 x Nq x q_dim``); ``inputs``: ``B x Nk x kv_dim``."""
        k, v = self.project_inputs(inputs)
        if query_chunk is None or queries.shape[1] <= query_chunk:
            return self.attend(queries, k, v, key_mask)
        return torch.cat([self.attend(q, k, v, key_mask) for q in queries.split(query_chunk, dim=1)], dim=1)


class SelfAttention(nn.Module):
    """Perceiver latent self-attention layer: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        widening_factor: int = 4,
    ) -> None:
        super().__init__()
        qk_channels = qk_channels or dim
        v_channels = v_channels or qk_channels
        self.norm = nn.LayerNorm(dim)
        # The reference projects back to v_channels; it must equal dim for the residual.
        self.attn = MultiHeadAttention(
            dim, dim, qk_channels=qk_channels, v_channels=v_channels, num_heads=num_heads, out_dim=v_channels
        )
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, widening_factor)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        k, v = self.attn.project_kv(h)
        x = x + self.attn.attend(h, k, v, key_mask)
        return x + self.mlp(self.mlp_norm(x))
