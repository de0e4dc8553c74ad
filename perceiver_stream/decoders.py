"""Perceiver IO decoders: output queries that cross-attend to the latents.

A decoder is called as ``decoder(tokens, latents, *, points=None, query_chunk=None)``: it builds
its output queries (from learned parameters, Fourier codes of output positions, or the input tokens
themselves), lets them attend to the latents with one cross-attention layer, and projects the result.

Query providers return ``1 x Nq x C`` when the queries do not depend on the input (they broadcast
over the batch and can be cached) and ``B x Nq x C`` otherwise. ``points`` selects a subset of the
output positions (DeepMind's subsampled decoding); ``query_chunk`` bounds how many queries attend at
once, so a decoder with one query per pixel runs in bounded memory. Chunking gives the same result as
one pass because output queries are independent of each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from perceiver_stream.attention import CrossAttention, ProjectedInputs
from perceiver_stream.fourier import fourier_channels, fourier_features, grid_fourier_features
from perceiver_stream.perceiver import Tokens


class LearnedQueries(nn.Module):
    """``num_queries`` learned query vectors; ``points`` picks rows."""

    def __init__(self, num_queries: int, channels: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, channels) * 0.02)

    @property
    def num_channels(self) -> int:
        return self.queries.shape[1]

    def forward(self, tokens: Tokens | None = None, points: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries if points is None else self.queries[points.to(self.queries.device)]
        return q[None]


def subsampled_positions(points: torch.Tensor, index_dims: Sequence[int]) -> torch.Tensor:
    """Positions of flat output indices ``points`` on the grid ``index_dims``: ``n x d`` in [-1, 1).

    DeepMind's subsampled decoding maps index ``i`` of an axis of size ``n`` to ``-1 + 2 i / n``
    (not the ``linspace(-1, 1, n)`` of the full grid); reproduced here in the same float32 steps.
    """
    idx = torch.stack(torch.unravel_index(points, tuple(index_dims)), dim=1)
    dims = torch.tensor(list(index_dims), device=idx.device)
    return -1 + (2 * idx).to(torch.float32) / dims.to(torch.float32)[None, :]


class FourierQueries(nn.Module):
    """Fourier codes of output positions on the grid ``index_dims`` (no parameters).

    Without ``points`` the whole grid is queried (positions ``linspace(-1, 1, n)``, cached); with
    ``points`` (flat indices) only those positions, placed as DeepMind's subsampled decoding does.
    """

    def __init__(
        self,
        index_dims: Sequence[int],
        num_bands: int,
        max_resolution: Sequence[int] | None = None,
        *,
        concat_pos: bool = True,
        sine_only: bool = False,
    ) -> None:
        super().__init__()
        self.index_dims = tuple(int(n) for n in index_dims)
        self.num_bands = num_bands
        self.max_resolution = tuple(int(r) for r in (max_resolution or self.index_dims))
        if len(self.max_resolution) != len(self.index_dims):
            raise ValueError(f"max_resolution {self.max_resolution} does not match index_dims {self.index_dims}")
        self.concat_pos = concat_pos
        self.sine_only = sine_only

    @property
    def num_channels(self) -> int:
        dims = len(self.index_dims)
        return fourier_channels(dims, self.num_bands, concat_pos=self.concat_pos, sine_only=self.sine_only)

    def forward(self, tokens: Tokens | None = None, points: torch.Tensor | None = None) -> torch.Tensor:
        device = tokens.tokens.device if tokens is not None else None
        kw = dict(concat_pos=self.concat_pos, sine_only=self.sine_only)
        if points is None:
            grid = grid_fourier_features(self.index_dims, self.num_bands, self.max_resolution, device=device, **kw)
            return grid[None]
        pos = subsampled_positions(points.to(device), self.index_dims)
        return fourier_features(pos, self.num_bands, self.max_resolution, **kw)[None]


class InputQueries(nn.Module):
    """The input tokens themselves are the queries (one output per input token, as in flow)."""

    def forward(self, tokens: Tokens, points: torch.Tensor | None = None) -> torch.Tensor:
        if points is None:
            return tokens.tokens
        return tokens.tokens[:, points.to(tokens.tokens.device)]


class GroupedQueries(nn.Module):
    """Queries of several named groups, each padded to a common width with a learned vector.

    The common width is the widest group's plus ``min_padding_size``; groups are concatenated in
    sorted name order (DeepMind's multimodal decoder). Returns the queries and each group's count.
    """

    def __init__(self, providers: Mapping[str, nn.Module], min_padding_size: int = 2) -> None:
        super().__init__()
        self.providers = nn.ModuleDict(dict(providers))
        self.num_channels = max(p.num_channels for p in providers.values()) + min_padding_size
        self.padding = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(1, self.num_channels - p.num_channels) * 0.02)
                for name, p in providers.items()
            }
        )

    def forward(
        self, tokens: Tokens | None = None, points: Mapping[str, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, dict[str, int]]:
        points = points or {}
        parts, sizes = [], {}
        batch = 1
        for name in sorted(self.providers):
            q = self.providers[name](tokens, points.get(name))
            pad = self.padding[name].to(q.dtype).expand(q.shape[0], q.shape[1], -1)
            parts.append(torch.cat([q, pad], dim=-1))
            sizes[name] = q.shape[1]
            batch = max(batch, q.shape[0])
        return torch.cat([p.expand(batch, -1, -1) for p in parts], dim=1), sizes


class CrossAttentionDecoder(nn.Module):
    """One cross-attention layer from queries to latents, then an optional linear projection.

    ``qk_channels`` defaults to the latent width (DeepMind's ``"kv"``) or the query width (``"q"``).
    """

    def __init__(
        self,
        query_channels: int,
        latent_channels: int,
        out_channels: int | None,
        *,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        num_heads: int = 1,
        widening_factor: int = 1,
        use_query_residual: bool = False,
        shape_for_attention: str = "kv",
    ) -> None:
        super().__init__()
        if qk_channels is None:
            qk_channels = latent_channels if shape_for_attention == "kv" else query_channels
        self.layer = CrossAttention(
            query_channels,
            latent_channels,
            qk_channels=qk_channels,
            v_channels=v_channels,
            num_heads=num_heads,
            widening_factor=widening_factor,
            use_query_residual=use_query_residual,
        )
        self.proj = nn.Linear(query_channels, out_channels) if out_channels is not None else None

    def _chunk(self, queries: torch.Tensor, kv: ProjectedInputs) -> torch.Tensor:
        x = self.layer.attend(queries, kv)
        return self.proj(x) if self.proj is not None else x

    def forward(self, queries: torch.Tensor, latents: torch.Tensor, query_chunk: int | None = None) -> torch.Tensor:
        """``queries`` ``B x Nq x Cq`` (or batch 1), ``latents`` ``B x M x D`` -> ``B x Nq x out``."""
        kv = self.layer.project_inputs(latents, queries.shape[1])
        if query_chunk is None or queries.shape[1] <= query_chunk:
            return self._chunk(queries, kv)
        return torch.cat([self._chunk(q, kv) for q in queries.split(query_chunk, dim=1)], dim=1)


class BasicDecoder(nn.Module):
    """A query provider plus a :class:`CrossAttentionDecoder`: ``B x Nq x out``."""

    def __init__(self, queries: nn.Module, attend: CrossAttentionDecoder) -> None:
        super().__init__()
        self.queries = queries
        self.attend = attend

    def forward(
        self,
        tokens: Tokens,
        latents: torch.Tensor,
        *,
        points: torch.Tensor | None = None,
        query_chunk: int | None = None,
    ) -> torch.Tensor:
        return self.attend(self.queries(tokens, points), latents, query_chunk)


class ClassificationDecoder(BasicDecoder):
    """One learned query attends to the latents and is projected to class logits: ``B x num_classes``."""

    def __init__(self, num_classes: int, latent_channels: int, query_channels: int | None = None, **attend_kw) -> None:
        query_channels = query_channels or latent_channels
        super().__init__(
            LearnedQueries(1, query_channels),
            CrossAttentionDecoder(query_channels, latent_channels, num_classes, **attend_kw),
        )

    def forward(
        self,
        tokens: Tokens,
        latents: torch.Tensor,
        *,
        points: torch.Tensor | None = None,
        query_chunk: int | None = None,
    ) -> torch.Tensor:
        return super().forward(tokens, latents)[:, 0]


class FlowDecoder(BasicDecoder):
    """Queries are the input tokens (first-frame features with their positions); one output per pixel.

    The projected outputs are divided by ``rescale_factor`` (DeepMind trains with a scaled target)
    and reshaped to the token grid: ``B x H x W x out_channels``.
    """

    def __init__(
        self,
        token_channels: int,
        latent_channels: int,
        out_channels: int = 2,
        rescale_factor: float = 100.0,
        **attend_kw,
    ) -> None:
        attend = CrossAttentionDecoder(token_channels, latent_channels, out_channels, **attend_kw)
        super().__init__(InputQueries(), attend)
        self.rescale_factor = rescale_factor

    def forward(
        self,
        tokens: Tokens,
        latents: torch.Tensor,
        *,
        points: torch.Tensor | None = None,
        query_chunk: int | None = None,
    ) -> torch.Tensor:
        if points is not None:
            raise ValueError("FlowDecoder decodes every pixel; subsampled points are not supported")
        if tokens.grid is None:
            raise ValueError("FlowDecoder needs tokens on a grid (Tokens.grid is None)")
        out = super().forward(tokens, latents, query_chunk=query_chunk) / self.rescale_factor
        return out.reshape(out.shape[0], *tokens.grid, out.shape[-1])


class GroupedDecoder(nn.Module):
    """Decodes several named query groups with one shared cross-attention: ``{name: B x n x out}``."""

    def __init__(self, queries: GroupedQueries, attend: CrossAttentionDecoder) -> None:
        super().__init__()
        self.queries = queries
        self.attend = attend

    def forward(
        self,
        tokens: Tokens,
        latents: torch.Tensor,
        *,
        points: Mapping[str, torch.Tensor | None] | None = None,
        query_chunk: int | None = None,
    ) -> dict[str, torch.Tensor]:
        queries, sizes = self.queries(tokens, points)
        out = self.attend(queries, latents, query_chunk)
        return dict(zip(sizes, out.split(list(sizes.values()), dim=1)))


class PooledEmbedding(nn.Module):
    """Mean of the latents, optionally projected: ``B x out`` (a window embedding, or linear-probe logits)."""

    def __init__(self, latent_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(latent_channels, out_channels) if out_channels is not None else None

    def forward(
        self, tokens: Tokens | None, latents: torch.Tensor, *, points: None = None, query_chunk: int | None = None
    ) -> torch.Tensor:
        z = latents.mean(dim=1)
        return self.proj(z) if self.proj is not None else z
