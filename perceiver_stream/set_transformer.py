"""Set Transformer blocks (Lee et al., 2019): MAB, SAB, ISAB, PMA, with key-padding masks.

Sets are ``B x N x C`` with an optional ``B x N`` bool mask (True = element present). Masked
elements never influence the others; where a block returns one row per input element (SAB,
ISAB) the masked rows are zeros. Attention runs through ``attention.MultiHeadAttention`` (SDPA).
"""

from __future__ import annotations

import torch
from torch import nn

from perceiver_stream.attention import MLP, MultiHeadAttention


def _zero_masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else torch.where(mask[..., None], x, 0.0)


class MAB(nn.Module):
    """Multihead attention block: ``H = LN(q(X) + Attn(X, Y))``, ``out = LN(H + rFF(H))``.

    ``q`` is the identity when ``dim_q == dim`` (else a linear map, so the residual has ``dim``
    channels); ``ln=False`` drops both LayerNorms, as the paper's variant without them.
    """

    def __init__(self, dim_q: int, dim_kv: int, dim: int, *, num_heads: int = 4, ln: bool = True,
                 widening_factor: int = 2) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim_q, dim_kv, qk_channels=dim, v_channels=dim, num_heads=num_heads, out_dim=dim)
        self.residual = nn.Identity() if dim_q == dim else nn.Linear(dim_q, dim)
        self.norm0 = nn.LayerNorm(dim) if ln else nn.Identity()
        self.norm1 = nn.LayerNorm(dim) if ln else nn.Identity()
        self.rff = MLP(dim, widening_factor)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``B|1 x Nq x dim_q`` attends to ``y`` ``B x Nk x dim_kv`` (``y_mask`` ``B x Nk``)."""
        k, v = self.attn.project_kv(y)
        h = self.norm0(self.residual(x) + self.attn.attend(x, k, v, y_mask))
        return self.norm1(h + self.rff(h))


class SAB(nn.Module):
    """Set attention block ``MAB(X, X)``: permutation-equivariant, O(N^2)."""

    def __init__(self, dim_in: int, dim: int, *, num_heads: int = 4, ln: bool = True) -> None:
        super().__init__()
        self.mab = MAB(dim_in, dim_in, dim, num_heads=num_heads, ln=ln)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``B x N x dim`` (zeros where ``mask`` is False)."""
        return _zero_masked(self.mab(x, x, mask), mask)


class ISAB(nn.Module):
    """Induced set attention block: ``MAB(X, MAB(I, X))`` with ``num_inducing`` learned points, O(N*m)."""

    def __init__(self, dim_in: int, dim: int, num_inducing: int, *, num_heads: int = 4, ln: bool = True) -> None:
        super().__init__()
        self.inducing = nn.Parameter(0.02 * torch.randn(1, num_inducing, dim))
        self.mab0 = MAB(dim, dim_in, dim, num_heads=num_heads, ln=ln)
        self.mab1 = MAB(dim_in, dim, dim, num_heads=num_heads, ln=ln)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``B x N x dim`` (zeros where ``mask`` is False)."""
        h = self.mab0(self.inducing.expand(x.shape[0], -1, -1), x, mask)
        return _zero_masked(self.mab1(x, h), mask)


class PMA(nn.Module):
    """Pooling by multihead attention: ``num_seeds`` learned seeds attend to ``rFF(Z)``; permutation-invariant."""

    def __init__(self, dim: int, num_seeds: int = 1, *, num_heads: int = 4, ln: bool = True) -> None:
        super().__init__()
        self.seeds = nn.Parameter(0.02 * torch.randn(1, num_seeds, dim))
        self.rff = MLP(dim, 1)
        self.mab = MAB(dim, dim, dim, num_heads=num_heads, ln=ln)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``B x num_seeds x dim`` summary of the set ``z`` (``B x N x dim``)."""
        return self.mab(self.seeds.expand(z.shape[0], -1, -1), self.rff(z), mask)
