"""Attention blocks on ``torch.nn.functional.scaled_dot_product_attention``.

The blocks follow Perceiver IO's conventions (and the ``transformers`` port's), so weights map
one to one: pre-LayerNorm with separate query and key/value norms for cross-attention, an
optional residual to the raw queries, separate qk and v channel counts, then
``x + MLP(LayerNorm(x))`` with a widening factor and exact GELU.

Key-padding masks are ``B x N`` bool, True where a token is real, or ``B x Nq x N`` to give each
query its own keys. A ``H x N`` float ``key_bias`` is added to every query's logits in each head
(e.g. a learned per-source gate). A query whose keys are all masked gets zeros, never NaN. Large
query sets can be processed in chunks (``query_chunk``): keys and values are projected once and
each chunk attends to them, which gives the same result as one pass because every query is
independent of the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA over ``B x H x N x D`` heads with an optional key mask (True = attend: ``B x Nk``, or
    ``B x Nq x Nk`` per query) and an optional ``H x Nk`` logit bias.

    Queries with no valid key return zeros instead of the NaN a fully masked softmax gives.
    """
    return _masked_sdpa(q, k, v, key_mask, None, key_bias)


def _masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float | None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if k.shape[2] == 0:  # no keys at all: every query gets zeros
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    if key_bias is None and (key_mask is None or key_mask.ndim == 2):
        if key_mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        empty = ~key_mask.any(dim=-1)  # B
        # Let empty rows attend to everything (finite), then zero them.
        attend = (key_mask | empty[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale)
        if bool(empty.any()):
            out = out.masked_fill(empty[:, None, None, None], 0.0)
        return out
    # A float mask: the bias where a key is attended, -inf where not.
    if key_mask is None:
        key_mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    mask = key_mask[:, None, :] if key_mask.ndim == 2 else key_mask  # B x 1|Nq x Nk
    empty = ~mask.any(dim=-1)  # B x 1|Nq
    attend = mask | empty[..., None]
    bias = q.new_zeros(1, k.shape[2]) if key_bias is None else key_bias.to(q.dtype)  # H|1 x Nk
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.where(attend[:, None], bias[None, :, None, :], float("-inf")), scale=scale
    )
    return torch.where(empty[:, None, :, None], 0.0, out)


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
        self,
        q_in: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of (normalised) queries ``B x Nq x q_dim`` to projected keys/values."""
        q = self._heads(self.q(q_in))
        if q.shape[0] != k.shape[0]:
            # Input-independent queries (learned latents) arrive with batch 1.
            q = q.expand(k.shape[0], -1, -1, -1)
        o = masked_attention(q, k, v, key_mask, key_bias)
        b, h, n, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, h * d))


def _round_up(n: int, multiple: int = 8) -> int:
    return n + -n % multiple


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension to ``width``.

    SDPA's CPU kernel runs about twice as fast when the query/key and value head sizes are equal
    and a multiple of 8; zero channels change neither the scores nor the outputs we keep.
    """
    extra = width - x.shape[-1]
    return F.pad(x, (0, extra)) if extra else x


@dataclass
class ProjectedInputs:
    """Keys and values of one input, prepared once and attended by any number of query chunks.

    ``mode`` says how the layer's projections were arranged (see :class:`CrossAttention`):
    ``"standard"`` (``k``, ``v`` are ``B x H x N x d`` heads), ``"fold_keys"`` (query and output
    projections folded into ``k``/``v``), ``"fold_queries"`` (``k`` = ``v`` = the normalised inputs;
    key/value projections are applied on the query side).
    """

    mode: str
    k: torch.Tensor
    v: torch.Tensor


class CrossAttention(nn.Module):
    """Perceiver IO cross-attention layer: queries attend to inputs, then an MLP.

    ``qk_channels`` defaults to ``kv_dim`` (DeepMind's ``shape_for_attn='kv'``), ``v_channels`` to
    ``qk_channels``; the output has ``q_dim`` channels.

    With one head, the linear projections can be re-associated with the attention products, which
    is the same function with fewer FLOPs when one side is much larger than the other:

    * ``fold_keys`` (few keys, many queries, e.g. a per-pixel decoder): scores
      ``(LN(x) Wq + bq) K^T = [LN(x), 1] [K Wq, K bq]^T`` and ``P V Wo = P (V Wo)``, so the per-query
      work is two products with the keys and no projections;
    * ``fold_queries`` (few queries, many keys, e.g. latents reading a large input): scores
      ``q (LN(x) Wk + bk)^T = (q Wk^T) LN(x)^T + const`` (the constant cancels in the softmax) and
      ``P (LN(x) Wv + bv) = (P LN(x)) Wv + bv`` (rows of P sum to one), so the inputs are never projected.

    ``fold`` picks the arrangement: ``"auto"`` (the cheapest by a FLOP count), ``"never"``,
    ``"keys"`` or ``"queries"``. All give the same outputs up to float rounding. A ``key_bias`` or a
    per-query key mask always takes the standard arrangement.
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
        self.fold = "auto"

    def _mode(self, num_keys: int, num_queries: int) -> str:
        if self.fold != "auto":
            if self.fold != "never" and self.attn.num_heads != 1:
                raise ValueError("folded projections need a single attention head")
            return {"never": "standard", "keys": "fold_keys", "queries": "fold_queries"}[self.fold]
        if self.attn.num_heads != 1:
            return "standard"
        a = self.attn
        cq, ckv, qk, v, co = a.q.in_features, a.k.in_features, a.q.out_features, a.v.out_features, a.out.out_features
        n, m = num_keys, num_queries
        # Multiply-accumulates of each arrangement (per batch element).
        cost = {
            "standard": n * ckv * (qk + v) + m * cq * qk + m * n * (qk + v) + m * v * co,
            "fold_keys": n * (qk * (cq + 1) + v * co) + m * n * (cq + 1 + co),
            "fold_queries": m * (cq * qk + qk * ckv + ckv * v + v * co) + 2 * m * n * ckv,
        }
        return min(cost, key=cost.get)

    def project_inputs(
        self, inputs: torch.Tensor, num_queries: int | None = None, *, standard: bool = False
    ) -> ProjectedInputs:
        """Prepare ``inputs`` (``B x N x kv_dim``) for attention by ``num_queries`` queries (chunks
        reuse it); ``standard`` forces the unfolded arrangement."""
        mode = "standard" if standard else self._mode(inputs.shape[1], num_queries or inputs.shape[1])
        x = self.kv_norm(inputs)
        if mode == "standard":
            return ProjectedInputs(mode, *self.attn.project_kv(x))
        if mode == "fold_queries":
            x = _pad_to(x, _round_up(x.shape[-1]))[:, None]
            return ProjectedInputs(mode, x, x)
        a = self.attn
        k, v = a.k(x), a.v(x)
        k_fold = torch.cat([k @ a.q.weight.to(k.dtype), (k @ a.q.bias.to(k.dtype))[..., None]], dim=-1)
        v_fold = v @ a.out.weight.to(v.dtype).t()
        width = _round_up(max(k_fold.shape[-1], v_fold.shape[-1]))
        return ProjectedInputs(mode, _pad_to(k_fold, width)[:, None], _pad_to(v_fold, width)[:, None])

    def _attention(
        self, q_in: torch.Tensor, kv: ProjectedInputs, key_mask: torch.Tensor | None, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        a = self.attn
        if kv.mode == "standard":
            return a.attend(q_in, kv.k, kv.v, key_mask, key_bias)
        if key_bias is not None or (key_mask is not None and key_mask.ndim == 3):
            raise ValueError("a key bias or a per-query key mask needs inputs projected with standard=True")
        scale = a.q.out_features**-0.5
        batch = kv.k.shape[0]
        if kv.mode == "fold_keys":
            # [LN(x), 1, 0...] built in one buffer: this runs once per query chunk of a huge set.
            q = q_in.new_zeros(*q_in.shape[:-1], kv.k.shape[-1])
            q[..., : q_in.shape[-1]] = q_in
            q[..., q_in.shape[-1]] = 1
            q = q[:, None].expand(batch, -1, -1, -1)
            o = _masked_sdpa(q, kv.k, kv.v, key_mask, scale)[:, 0, :, : a.out.out_features]
            return o + a.out.bias.to(o.dtype)
        q = a.q(q_in) @ a.k.weight.to(q_in.dtype)
        q = _pad_to(q, kv.k.shape[-1])[:, None].expand(batch, -1, -1, -1)
        o = _masked_sdpa(q, kv.k, kv.v, key_mask, scale)[:, 0, :, : a.k.in_features]
        o = a.v(o)
        if key_mask is not None:
            # Queries with no valid key get a zero attention output, as in the standard arrangement.
            o = o * key_mask.any(dim=-1).to(o.dtype)[:, None, None]
        return a.out(o)

    def attend(
        self,
        queries: torch.Tensor,
        kv: ProjectedInputs,
        key_mask: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer for ``queries`` given inputs prepared by :meth:`project_inputs`."""
        x = self._attention(self.q_norm(queries), kv, key_mask, key_bias)
        if self.use_query_residual:
            x = x + queries
        return x + self.mlp(self.mlp_norm(x))

    def forward(
        self,
        queries: torch.Tensor,
        inputs: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        *,
        key_bias: torch.Tensor | None = None,
        query_chunk: int | None = None,
    ) -> torch.Tensor:
        """``queries``: ``B x Nq x q_dim`` (or ``1 x Nq x q_dim``); ``inputs``: ``B x Nk x kv_dim``;
        ``key_mask``: ``B x Nk`` or ``B x Nq x Nk`` bool; ``key_bias``: ``H x Nk`` logit bias."""
        per_query = key_mask is not None and key_mask.ndim == 3
        kv = self.project_inputs(inputs, queries.shape[1], standard=key_bias is not None or per_query)
        if query_chunk is None or queries.shape[1] <= query_chunk:
            return self.attend(queries, kv, key_mask, key_bias)
        if per_query:
            raise ValueError("query_chunk cannot split a per-query key mask")
        return torch.cat([self.attend(q, kv, key_mask, key_bias) for q in queries.split(query_chunk, dim=1)], dim=1)


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
