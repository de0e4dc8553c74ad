"""The multimodal preprocessor: every modality's tokens padded to one width and concatenated.

Perceiver IO's multimodal trick: each modality's tokens are padded to a common width with a
learned per-modality vector (which also tells the encoder which modality a token comes from),
then all tokens are concatenated with a key mask. Nothing here knows modality names: the
adapters come in a dict keyed by name, and a batch's modalities are looked up in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_stream.adapters.base import Adapter
from perceiver_stream.batch import Batch


@dataclass
class Tokens:
    """The concatenated input array.

    tokens:   ``B x N x D`` float, zero wherever ``mask`` is False.
    mask:     ``B x N`` bool, True where the token is real (its modality present in that row).
    modality: ``N`` int64, index into ``MultimodalPreprocessor.names`` of each token's modality.
    pooled:   modality -> ``(B x n x c features, B x n mask)``: the adapter's `pool_channels` of the
              ``pool`` modalities, as the adapter made them (before MLPs, norms and padding).
              An adapter's `private_channels` appear only here, never in ``tokens``.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    modality: torch.Tensor
    pooled: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class TokenMLP(nn.Module):
    """Per-token residual MLP ``x + Linear(GELU(Linear(x)))`` at the adapter's width.

    Applied to each token on its own (a PointNet-style per-point MLP, a per-patch MLP for video):
    the encoder's key/value projections are linear, so cues that need a nonlinearity of one token's
    channels (a corner inside a patch, a point's place on a curved surface) are computed here.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"token MLP hidden width must be at least 1, got {hidden}")
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x channels`` -> same shape."""
        return x + self.fc2(F.gelu(self.fc1(x)))


class MultimodalPreprocessor(nn.Module):
    """Adapters keyed by modality name -> one padded, masked token array.

    ``width`` is the widest adapter's channels plus ``min_padding``. A modality missing from the
    batch, or absent (``present`` False) in every row, contributes no tokens at all; in rows where it
    is absent its tokens are masked out and zeroed, so whatever its values hold (even NaN) changes
    nothing. ``mask_probs`` (per modality) replaces tokens by a learned mask token with that
    probability, in training mode only. ``token_mlps`` (modality -> hidden width) passes that
    modality's tokens through a `TokenMLP` before padding. With ``norms``, each modality's tokens get a
    LayerNorm of their own before padding (its own scale and affine, where the encoder's key/value
    LayerNorm is shared by all). With ``own_channels``, each modality's channels sit in a slice of
    the token of its own (the rest zero, plus a learned per-modality vector over the whole width),
    so the encoder's key/value weights for one modality's features get no gradient from another's
    tokens. ``pool`` names modalities whose adapter's `pool_channels` are also returned on their own
    (``Tokens.pooled``); in the tokens those channels are detached, so only the pooled read trains
    them; an adapter's ``private_channels`` are cut off the tokens (such an adapter must be pooled).
    Batch modalities without an adapter are ignored.
    """

    def __init__(
        self,
        adapters: dict[str, Adapter],
        *,
        min_padding: int = 4,
        mask_probs: dict[str, float] | None = None,
        token_mlps: dict[str, int] | None = None,
        norms: bool = False,
        own_channels: bool = False,
        pool: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not adapters:
            raise ValueError("the multimodal preprocessor needs at least one adapter")
        mask_probs = dict(mask_probs or {})
        unknown = sorted(set(mask_probs) - set(adapters))
        if unknown:
            raise ValueError(f"mask_probs names modalities without an adapter: {unknown}")
        token_mlps = dict(token_mlps or {})
        unknown = sorted(set(token_mlps) - set(adapters))
        if unknown:
            raise ValueError(f"token_mlps names modalities without an adapter: {unknown}")
        unpoolable = [k for k in pool if k not in adapters or adapters[k].pool_channels is None]
        if unpoolable:
            raise ValueError(f"pool names modalities without an adapter or without poolable channels: {unpoolable}")
        unread = [k for k, a in adapters.items() if a.private_channels and k not in pool]
        if unread:
            raise ValueError(f"adapters of {unread} make channels for a pooled read alone, but pool does not "
                             "name them: pool them, or put those channels in the tokens")
        self.pool = tuple(pool)
        self.names: list[str] = list(adapters)
        self.adapters = nn.ModuleDict(adapters)
        widths = [a.out_channels for a in adapters.values()]
        if own_channels:
            self.width = sum(widths) + min_padding
            starts = [sum(widths[:i]) for i in range(len(widths))]
            self.offsets: dict[str, int] | None = dict(zip(adapters, starts))
            self.padding = nn.ParameterDict({k: nn.Parameter(0.02 * torch.randn(self.width)) for k in adapters})
        else:
            self.width = max(widths) + min_padding
            self.offsets = None
            self.padding = nn.ParameterDict(
                {k: nn.Parameter(0.02 * torch.randn(self.width - a.out_channels)) for k, a in adapters.items()}
            )
        self.token_mlps = nn.ModuleDict(
            {k: TokenMLP(adapters[k].out_channels, int(h)) for k, h in token_mlps.items()}
        )
        self.norms = nn.ModuleDict({k: nn.LayerNorm(a.out_channels) for k, a in adapters.items()}) if norms else None
        self.mask_probs = {k: float(p) for k, p in mask_probs.items() if p > 0}
        self.mask_tokens = nn.ParameterDict(
            {k: nn.Parameter(0.02 * torch.randn(self.width)) for k in self.mask_probs}
        )

    def forward(self, batch: Batch) -> Tokens:
        """Tokens of every modality of ``batch`` that has an adapter and is present somewhere."""
        t_ref = batch.t_end
        parts, masks, kinds = [], [], []
        pooled: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        device = None
        for i, name in enumerate(self.names):
            m = batch.modalities.get(name)
            if m is None or not bool(m.present.any()):
                continue
            x, mask = self.adapters[name](m, t_ref)
            if name in self.pool:
                # Trained by the pooled read alone: the flow loss (ten times the label loss in the
                # shipped recipe) does not reach them through the tokens.
                adapter = self.adapters[name]
                a, z = adapter.pool_channels
                pooled[name] = (x[..., a:z], mask & m.present[:, None])
                if adapter.private_channels:
                    x = x[..., : adapter.out_channels]  # (the pooled channels are the private ones)
                else:
                    x = torch.cat([x[..., :a], x[..., a:z].detach(), x[..., z:]], dim=-1)
            if name in self.token_mlps:
                x = self.token_mlps[name](x)
            if self.norms is not None:
                x = self.norms[name](x)
            b, n, c = x.shape
            if self.offsets is None:
                x = torch.cat([x, self.padding[name].to(x.dtype).expand(b, n, -1)], dim=-1)
            else:
                start = self.offsets[name]
                x = F.pad(x, (start, self.width - start - c)) + self.padding[name].to(x.dtype)
            if self.training and name in self.mask_probs:
                hit = torch.rand(b, n, device=x.device) < self.mask_probs[name]
                x = torch.where(hit[..., None], self.mask_tokens[name].to(x.dtype), x)
            mask = mask & m.present[:, None]
            # where(), not multiplication: garbage (inf, NaN) in absent rows must not survive.
            parts.append(torch.where(mask[..., None], x, 0.0))
            masks.append(mask)
            kinds.append(torch.full((n,), i, dtype=torch.long, device=x.device))
            device = x.device
        if not parts:
            b = len(batch)
            dev = device or next(self.parameters()).device
            return Tokens(
                torch.zeros(b, 0, self.width, device=dev),
                torch.zeros(b, 0, dtype=torch.bool, device=dev),
                torch.zeros(0, dtype=torch.long, device=dev),
            )
        return Tokens(torch.cat(parts, dim=1), torch.cat(masks, dim=1), torch.cat(kinds), pooled)


def drop_modalities(
    batch: Batch, p: float, generator: torch.Generator | None = None, draws: torch.Tensor | None = None
) -> Batch:
    """Modality dropout: mark each present modality of each row absent with probability ``p``.

    Each row and modality gets a uniform draw ``u`` (``draws``, ``B x K`` in the order of
    ``batch.modalities``, or fresh ones from ``generator``); the modality is dropped where
    ``u < p``. A row never loses all its modalities: if every present one is drawn, the present
    one with the largest draw is kept. Fixed ``draws`` thus drop the same modalities from every
    window they are given for (as in a stream that lacks a sensor). Values are untouched (the model
    ignores absent rows); returns a new Batch.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1), got {p}")
    names = list(batch.modalities)
    if p == 0.0 or len(names) < 2:
        return batch
    present = torch.stack([batch.modalities[k].present.cpu() for k in names], dim=1)  # B x K
    if draws is None:
        draws = torch.rand(present.shape, generator=generator)
    elif draws.shape != present.shape:
        raise ValueError(f"modality dropout draws must be {tuple(present.shape)} (rows x modalities), "
                         f"got {tuple(draws.shape)}")
    kept = present & (draws >= p)
    lost_all = present.any(dim=1) & ~kept.any(dim=1)
    if bool(lost_all.any()):
        scores = draws.masked_fill(~present, -1.0)
        choice = torch.zeros_like(present).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        kept = torch.where(lost_all[:, None], choice, kept)
    modalities = {
        k: replace(m, present=kept[:, i].to(m.present.device)) for i, (k, m) in enumerate(batch.modalities.items())
    }
    return replace(batch, modalities=modalities)
