"""Fourier position features.

Two forms:

* ``fourier_features`` / ``grid_fourier_features``: DeepMind's Perceiver IO encoding, bit for bit
  as ``io_processors.py`` and the ``transformers`` port compute it: positions ``linspace(-1, 1, n)``
  per index dimension, frequencies ``linspace(1, res/2, K)`` per dimension, channels ordered
  ``[pos_1..pos_d, sin(pi f pos) (dimension-major), cos(pi f pos) (dimension-major)]``, all in
  float32 as the reference does (so published checkpoints see the features they were trained on).
* ``time_fourier_features``: the sliding-window encoding of absolute media time used by the
  streaming pipeline. Frequencies are integer multiples of ``1/period`` so that ``t`` and
  ``t mod period`` have the same code, and the phase is computed in float64 from ``t mod period``,
  so a stream that runs for days keeps full precision. It never runs under autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

_GRID_CACHE: dict[tuple, torch.Tensor] = {}


def fourier_channels(num_dims: int, num_bands: int, *, concat_pos: bool = True, sine_only: bool = False) -> int:
    """Number of channels ``fourier_features`` returns for ``num_dims``-D positions."""
    return num_dims * (num_bands * (1 if sine_only else 2) + (1 if concat_pos else 0))


def linear_positions(
    index_dims: Sequence[int], *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Positions ``linspace(-1, 1, n)`` on an index grid: ``(*index_dims, len(index_dims))``."""
    axes = [torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device) for n in index_dims]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def fourier_features(
    pos: torch.Tensor,
    num_bands: int,
    max_resolution: Sequence[int],
    *,
    concat_pos: bool = True,
    sine_only: bool = False,
) -> torch.Tensor:
    """DeepMind's Fourier features of arbitrary positions ``pos`` (``... x d``, roughly in [-1, 1]).

    Frequencies per dimension ``i`` are ``linspace(1, max_resolution[i] / 2, num_bands)``; the
    output is ``... x fourier_channels(d, num_bands)`` in the reference channel order.
    """
    d = pos.shape[-1]
    if len(max_resolution) != d:
        raise ValueError(f"max_resolution has {len(max_resolution)} entries for {d}-D positions")
    freqs = torch.stack(
        [torch.linspace(1.0, res / 2, num_bands, dtype=pos.dtype, device=pos.device) for res in max_resolution]
    )  # d x K
    per_pos = (pos[..., :, None] * freqs).flatten(-2)  # ... x (d*K), dimension-major
    # np.pi times a float32 tensor, as the reference writes it, keeps the same rounding.
    feats = [torch.sin(np.pi * per_pos)] if sine_only else [torch.sin(np.pi * per_pos), torch.cos(np.pi * per_pos)]
    if concat_pos:
        feats.insert(0, pos)
    return torch.cat(feats, dim=-1)


def grid_fourier_features(
    index_dims: Sequence[int],
    num_bands: int,
    max_resolution: Sequence[int] | None = None,
    *,
    concat_pos: bool = True,
    sine_only: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fourier features of the linear position grid ``index_dims``, flattened: ``prod(dims) x C``.

    Computed once per (shape, bands, device, dtype) and cached: the grid does not depend on the
    input, so a forward pass only looks it up. Treat the result as read-only.
    """
    dims = tuple(int(n) for n in index_dims)
    res = tuple(int(r) for r in (max_resolution or dims))
    key = (dims, num_bands, res, concat_pos, sine_only, str(torch.device(device or "cpu")), dtype)
    cached = _GRID_CACHE.get(key)
    if cached is None:
        pos = linear_positions(dims, device=device).reshape(-1, len(dims))
        with torch.autocast(device_type=pos.device.type, enabled=False):
            cached = fourier_features(pos, num_bands, res, concat_pos=concat_pos, sine_only=sine_only).to(dtype)
        _GRID_CACHE[key] = cached
    return cached


def time_frequencies(num_bands: int, *, period: float, max_freq: float) -> torch.Tensor:
    """Integer multiples ``k`` (float64) of ``1/period``, geometric from ``1/period`` to ``max_freq``.

    Rounded to integers and made strictly increasing so every band is distinct.
    """
    return _time_frequencies(num_bands, float(period), float(max_freq)).clone()


@lru_cache(maxsize=64)
def _time_frequencies(num_bands: int, period: float, max_freq: float) -> torch.Tensor:
    # Cached (callers must not write into it): every adapter asks for the same few sets on every
    # forward, ~50 us each to build.
    if num_bands < 1:
        raise ValueError("num_bands must be at least 1")
    top = max_freq * period
    if top < num_bands:
        raise ValueError(f"max_freq * period = {top:g} leaves room for fewer than {num_bands} distinct bands")
    ks = np.round(np.geomspace(1.0, top, num_bands))
    for i in range(1, num_bands):
        ks[i] = max(ks[i], ks[i - 1] + 1)
    return torch.from_numpy(ks.astype(np.float64))


def time_fourier_features(
    t: torch.Tensor,
    num_bands: int,
    *,
    period: float = 2.0**17,
    max_freq: float = 16.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sliding-window Fourier code of absolute media time ``t`` (seconds): ``... x 2*num_bands``.

    Channels are ``[sin(2 pi k t / P) for each k, cos(...) for each k]`` with integer ``k``. The
    phase ``(k * (t mod P)) mod P`` is computed in float64 and only the result is cast to ``dtype``,
    so the code of ``t = 3 days + 0.04 s`` is as exact as that of ``t = 0.04 s``.
    """
    ks = _time_frequencies(num_bands, float(period), float(max_freq)).to(t.device)
    with torch.autocast(device_type=t.device.type, enabled=False):
        tm = torch.remainder(t.to(torch.float64), period)
        phase = torch.remainder(tm[..., None] * ks, period) * (2.0 * math.pi / period)
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1).to(dtype)
