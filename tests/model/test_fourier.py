"""Fourier position features: bit-equality with transformers, caching, and media-time codes."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perceiver_stream.fourier import (
    fourier_channels,
    fourier_features,
    grid_fourier_features,
    linear_positions,
    time_fourier_features,
    time_frequencies,
)

hf = pytest.importorskip("transformers.models.perceiver.modeling_perceiver")


@pytest.mark.parametrize(
    "dims,bands,res,concat_pos,sine_only",
    [
        ((368, 496), 64, (368, 496), True, False),
        ((7, 9), 5, (224, 224), True, False),
        ((4, 6, 6), 32, (16, 224, 224), True, False),
        ((1920,), 192, (30720,), True, False),
        ((5, 3), 4, (10, 12), False, False),
        ((5, 3), 4, (10, 12), True, True),
    ],
)
def test_grid_features_bit_equal_to_transformers(dims, bands, res, concat_pos, sine_only):
    theirs = hf.generate_fourier_features(
        hf.build_linear_positions(dims).reshape(1, -1, len(dims)),
        num_bands=bands,
        max_resolution=res,
        concat_pos=concat_pos,
        sine_only=sine_only,
    )
    # transformers drops the batch axis when it does not concatenate the positions.
    theirs = theirs[0] if concat_pos else theirs
    ours = grid_fourier_features(dims, bands, res, concat_pos=concat_pos, sine_only=sine_only)
    channels = fourier_channels(len(dims), bands, concat_pos=concat_pos, sine_only=sine_only)
    assert ours.shape == (math.prod(dims), channels)
    assert torch.equal(ours, theirs)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 3), bands=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_arbitrary_positions_bit_equal_to_transformers(n, d, bands, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(1, n, d, generator=g) * 2 - 1
    res = [int(r) for r in torch.randint(2, 500, (d,), generator=g)]
    theirs = hf.generate_fourier_features(pos, num_bands=bands, max_resolution=res)[0]
    assert torch.equal(fourier_features(pos[0], bands, res), theirs)


def test_grid_is_cached_and_linear_positions_span_minus_one_to_one():
    a = grid_fourier_features((6, 8), 4)
    assert grid_fourier_features((6, 8), 4) is a
    pos = linear_positions((3, 5))
    assert pos.shape == (3, 5, 2)
    assert pos[0, 0].tolist() == [-1.0, -1.0] and pos[-1, -1].tolist() == [1.0, 1.0]


def test_mismatched_resolution_is_an_error():
    with pytest.raises(ValueError, match="max_resolution"):
        fourier_features(torch.zeros(3, 2), 4, (10,))


def test_time_frequencies_are_distinct_integer_multiples():
    ks = time_frequencies(16, period=2.0**17, max_freq=16.0)
    assert ks.dtype == torch.float64
    assert torch.equal(ks, ks.round()) and bool((ks.diff() > 0).all())
    with pytest.raises(ValueError):
        time_frequencies(8, period=4.0, max_freq=1.0)


@settings(max_examples=15, deadline=None)
@given(t=st.floats(0, 600, allow_nan=False), n=st.integers(1, 40))
def test_time_code_is_periodic(t, n):
    period = 2.0**17
    code = lambda s: time_fourier_features(  # noqa: E731
        torch.tensor([s], dtype=torch.float64), 12, period=period, dtype=torch.float64
    )
    a, b = code(t), code(t + n * period)
    # t + n*P is itself rounded to float64 (n*P ~ 5e6 s leaves ~1e-9 s of resolution).
    assert torch.allclose(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("t", [0.04, 3 * 86400 + 0.04, 9 * 86400 + 12345.678])
def test_time_code_keeps_float64_phase_precision_at_days(t):
    period, bands = 2.0**17, 16
    ks = time_frequencies(bands, period=period, max_freq=16.0).tolist()
    # Exact reference: the phase of the float64 value t, reduced with rationals, then one sin/cos.
    tf = Fraction(t)
    phases = [2 * math.pi * float((int(k) * tf) % Fraction(period) / Fraction(period)) for k in ks]
    ref = torch.tensor([math.sin(p) for p in phases] + [math.cos(p) for p in phases], dtype=torch.float64)
    ours = time_fourier_features(torch.tensor([t], dtype=torch.float64), bands, period=period, dtype=torch.float64)[0]
    assert torch.allclose(ours, ref, atol=1e-9, rtol=0)
    f32 = time_fourier_features(torch.tensor([t], dtype=torch.float64), bands, period=period)[0]
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), ref, atol=1e-6, rtol=0)


def test_time_code_ignores_autocast():
    t = torch.tensor([86400.5, 1.25], dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = time_fourier_features(t, 8)
    assert a.dtype == torch.float32 and torch.equal(a, time_fourier_features(t, 8))
