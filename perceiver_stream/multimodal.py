"""The multimodal preprocessor: every modality's tokens brought to one width and concatenated.

After Perceiver IO's multimodal trick (a learned per-modality vector tells the encoder which
modality a token comes from), with a slice of channels per modality. Nothing here knows modality
names: the adapters come in a dict keyed by name, and a batch's modalities are looked up in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from perceiver_stream.adapters.base import Adapter
from perceiver_stream.batch import Batch
from perceiver_stream.perceiver import Tokens


class MultimodalPreprocessor(nn.Module):
    """Adapters keyed by modality name -> one padded, masked token array.

    Each modality's tokens get a LayerNorm of their own, then sit in a slice of the token of their
    own (``offsets``; zeros elsewhere) plus a learned per-modality vector over the whole ``width``
    (the sum of the adapters' widths plus ``min_padding``): the encoder's key/value weights for one
    modality's features learn nothing from another's tokens, and the vector tells the modalities
    apart. A modality missing from the batch, or absent (``present`` False) in every row, adds no
    tokens; in rows where it is absent its tokens are masked out and zeroed, so whatever its values
    hold (even NaN) changes nothing. ``pool`` names modalities whose adapter's `pool_channels` are
    also returned on their own (``Tokens.without_pos``, for pooled label reads); in the tokens those
    channels are detached, and an adapter's ``private_channels`` are cut off them. Batch
    modalities without an adapter are ignored.
    """

    def __init__(self, adapters: dict[str, Adapter], *, min_padding: int = 4, pool: Sequence[str] = ()) -> None:
        super().__init__()
        if not adapters:
            raise ValueError("the multimodal preprocessor needs at least one adapter")
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
        self.width = sum(widths) + min_padding
        self.offsets: dict[str, int] = {k: sum(widths[:i]) for i, k in enumerate(adapters)}
        self.padding = nn.ParameterDict({k: nn.Parameter(0.02 * torch.randn(self.width)) for k in adapters})
        self.norms = nn.ModuleDict({k: nn.LayerNorm(a.out_channels) for k, a in adapters.items()})

    def forward(self, batch: Batch) -> Tokens:
        """Tokens of every modality of ``batch`` that has an adapter and is present somewhere."""
        t_ref = batch.t_end
        parts, masks, sizes = [], [], {}
        pooled: dict[str, torch.Tensor] = {}
        device = None
        for name in self.names:
            m = batch.modalities.get(name)
            if m is None or not bool(m.present.any()):
                continue
            x, mask = self.adapters[name](m, t_ref)
            if name in self.pool:
                # Detached in the tokens: only the pooled read trains these channels, not the
                # (much larger) flow loss.
                adapter = self.adapters[name]
                a, z = adapter.pool_channels
                pooled[name] = x[..., a:z]
                if adapter.private_channels:
                    x = x[..., : adapter.out_channels]  # (the pooled channels are the private ones)
                else:
                    x = torch.cat([x[..., :a], x[..., a:z].detach(), x[..., z:]], dim=-1)
            x = self.norms[name](x)
            n, c = x.shape[1:]
            start = self.offsets[name]
            x = F.pad(x, (start, self.width - start - c)) + self.padding[name].to(x.dtype)
            mask = mask & m.present[:, None]
            # where(), not multiplication: garbage (inf, NaN) in absent rows must not survive.
            parts.append(torch.where(mask[..., None], x, 0.0))
            masks.append(mask)
            sizes[name] = n
            device = x.device
        if not parts:
            b = len(batch)
            dev = device or next(self.parameters()).device
            return Tokens(torch.zeros(b, 0, self.width, device=dev), torch.zeros(b, 0, dtype=torch.bool, device=dev),
                          sizes={}, without_pos={})
        return Tokens(torch.cat(parts, dim=1), torch.cat(masks, dim=1), sizes=sizes, without_pos=pooled)

    def token_modality(self, tokens: Tokens) -> torch.Tensor:
        """``N`` int64: each token's modality as an index into ``names``."""
        index = torch.tensor([self.names.index(k) for k in tokens.sizes], dtype=torch.long)
        counts = torch.tensor(list(tokens.sizes.values()), dtype=torch.long)
        return torch.repeat_interleave(index, counts).to(tokens.tokens.device)


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
