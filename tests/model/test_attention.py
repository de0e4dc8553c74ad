"""Attention blocks: SDPA against explicit softmax math, masks, chunking, autocast, GPU path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perceiver_stream.attention import CrossAttention, MultiHeadAttention, SelfAttention, masked_attention


def _reference(q, k, v, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def test_masked_attention_matches_softmax_math_on_partial_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0], [1] * 8], dtype=torch.bool)
    k, v = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 4, generator=g)
    assert torch.allclose(masked_attention(q, k, v, mask), _reference(q, k, v, mask), atol=1e-6)
    assert torch.allclose(masked_attention(q, k, v), _reference(q, k, v), atol=1e-6)


def test_fully_masked_rows_give_zeros_not_nan():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 3, 4, generator=g)
    k, v = torch.randn(2, 1, 6, 4, generator=g), torch.randn(2, 1, 6, 4, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, :2] = True
    out = masked_attention(q, k, v, mask)
    assert not out.isnan().any()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.allclose(out[1], _reference(q[1:], k[1:], v[1:], mask[1:])[0], atol=1e-6)


def test_cross_attention_masked_tokens_do_not_matter():
    torch.manual_seed(2)
    layer = CrossAttention(16, 12, num_heads=2, qk_channels=8, v_channels=8, widening_factor=2).eval()
    q, x = torch.randn(2, 5, 16), torch.randn(2, 9, 12)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    garbage = x.clone()
    garbage[0, 6:] = 1e4 * torch.randn(3, 12)
    assert torch.allclose(layer(q, x, mask), layer(q, garbage, mask), atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(nq=st.integers(1, 40), chunk=st.integers(1, 17), heads=st.sampled_from([1, 2, 4]), residual=st.booleans())
def test_chunked_queries_equal_one_pass(nq, chunk, heads, residual):
    torch.manual_seed(nq * 31 + chunk)
    layer = CrossAttention(8, 12, qk_channels=8, num_heads=heads, use_query_residual=residual).eval()
    q, x = torch.randn(1, nq, 8), torch.randn(3, 10, 12)  # batch-1 queries broadcast over the inputs
    full = layer(q, x)
    assert full.shape == (3, nq, 8)
    assert torch.allclose(layer(q, x, query_chunk=chunk), full, atol=1e-6)


def test_self_attention_heads_and_channels():
    torch.manual_seed(3)
    layer = SelfAttention(32, num_heads=4, widening_factor=2)
    x = torch.randn(2, 7, 32)
    assert layer(x).shape == (2, 7, 32)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(8, 8, qk_channels=10, v_channels=8, num_heads=4, out_dim=8)


def test_bf16_autocast_agrees_with_fp32():
    """bf16 keeps 8 mantissa bits: outputs agree to 5e-2 relative to their scale."""
    torch.manual_seed(4)
    cross = CrossAttention(32, 24, num_heads=1, widening_factor=1).eval()
    layer = SelfAttention(32, num_heads=4).eval()
    q, x = torch.randn(2, 16, 32), torch.randn(2, 50, 24)
    ref = layer(cross(q, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(cross(q, x))
    assert not torch.equal(low.float(), ref)  # autocast did run the matmuls in bf16
    assert (low.float() - ref).abs().max() <= 5e-2 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_sdpa_matches_fp32():
    torch.manual_seed(5)
    cross = CrossAttention(64, 48, num_heads=1).cuda().eval()
    layer = SelfAttention(64, num_heads=8).cuda().eval()
    q, x = torch.randn(4, 128, 64, device="cuda"), torch.randn(4, 2000, 48, device="cuda")
    mask = torch.rand(4, 2000, device="cuda") > 0.3
    mask[1] = False
    with torch.no_grad():
        ref = layer(cross(q, x, mask))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = layer(cross(q, x, mask, query_chunk=32))
    assert not low.isnan().any()
    assert (low.float() - ref).abs().max() <= 5e-2 * ref.abs().max()


@pytest.mark.parametrize("fold", ["keys", "queries"])
def test_folded_projections_equal_the_standard_arrangement(fold):
    torch.manual_seed(6)
    layer = CrossAttention(20, 12, qk_channels=16, v_channels=8, num_heads=1, widening_factor=2).eval()
    q, x = torch.randn(1, 9, 20), torch.randn(3, 14, 12)
    mask = torch.ones(3, 14, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False  # no valid key: zeros from the attention, in every arrangement
    layer.fold = "never"
    ref = layer(q, x, mask)
    layer.fold = fold
    assert layer.project_inputs(x).mode == f"fold_{fold}"
    assert torch.allclose(layer(q, x, mask, query_chunk=4), ref, atol=1e-5)
    assert torch.allclose(layer(q, x), (setattr(layer, "fold", "never"), layer(q, x))[1], atol=1e-5)


def test_auto_fold_picks_the_cheaper_arrangement():
    flow_decoder = CrossAttention(322, 512, num_heads=1)
    assert flow_decoder.project_inputs(torch.randn(1, 64, 512), num_queries=182528).mode == "fold_keys"
    encoder = CrossAttention(512, 322, num_heads=1)
    assert encoder.project_inputs(torch.randn(1, 4096, 322), num_queries=2048).mode == "fold_queries"
    multi_head = CrossAttention(64, 64, num_heads=4)
    assert multi_head.project_inputs(torch.randn(1, 10, 64), num_queries=1000).mode == "standard"
    multi_head.fold = "keys"
    with pytest.raises(ValueError, match="single attention head"):
        multi_head.project_inputs(torch.randn(1, 10, 64))
