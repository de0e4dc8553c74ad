"""Perceiver encoder and Perceiver IO decoders: invariances, chunking, weight sharing, autocast."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perceiver_stream.decoders import (
    BasicDecoder,
    ClassificationDecoder,
    CrossAttentionDecoder,
    FlowDecoder,
    FourierQueries,
    GroupedDecoder,
    GroupedQueries,
    LearnedQueries,
    PooledEmbedding,
    subsampled_positions,
)
from perceiver_stream.fourier import grid_fourier_features
from perceiver_stream.perceiver import EncoderConfig, PerceiverEncoder, PerceiverIO, Tokens


def _encoder(**kw) -> PerceiverEncoder:
    cfg = dict(input_channels=12, num_latents=8, d_latents=16, num_self_attends_per_block=2, num_self_attention_heads=4)
    cfg.update(kw)
    torch.manual_seed(0)
    return PerceiverEncoder(EncoderConfig(**cfg)).eval()


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 1000))
def test_encoder_without_positions_is_permutation_invariant(n, seed):
    enc = _encoder(num_blocks=2, cross_attend_every_block=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 12, generator=g)
    perm = torch.randperm(n, generator=g)
    assert torch.allclose(enc(x), enc(x[:, perm]), atol=1e-5)


def test_masked_tokens_replaced_by_garbage_change_nothing():
    enc = _encoder()
    x = torch.randn(2, 10, 12)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 4:] = False
    garbage = x.clone()
    garbage[1, 4:] = torch.randn(6, 12) * 1e3
    assert torch.allclose(enc(x, mask), enc(garbage, mask), atol=1e-5)
    assert not torch.allclose(enc(x)[1], enc(garbage)[1], atol=1e-3)


def test_tower_weights_are_shared_across_blocks():
    one, four = _encoder(num_blocks=1), _encoder(num_blocks=4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(one) == count(four)
    # Repeated cross-attends: the first has its own weights, later ones share a second set.
    rep = _encoder(num_blocks=4, cross_attend_every_block=True)
    assert len(rep.cross_attends) == 2
    assert count(rep) == count(one) + sum(p.numel() for p in rep.cross_attends[1].parameters())
    x = torch.randn(1, 5, 12)
    assert not torch.allclose(one(x), four(x))


def test_encoder_accepts_initial_latents():
    enc = _encoder()
    x = torch.randn(3, 6, 12)
    z = enc(x)
    assert z.shape == (3, 8, 16)
    assert torch.allclose(enc(x, latents=enc.initial_latents()), z)
    assert not torch.allclose(enc(x, latents=z), z)


def test_encoder_config_is_validated():
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(input_channels=4, d_latents=10, num_self_attention_heads=4)
    with pytest.raises(ValueError, match="shape_for_attention"):
        EncoderConfig(input_channels=4, cross_attention_shape_for_attention="x")


@settings(max_examples=6, deadline=None)
@given(h=st.integers(2, 9), w=st.integers(2, 9), chunk=st.integers(1, 25))
def test_chunked_flow_decoding_equals_unchunked(h, w, chunk):
    torch.manual_seed(h * 10 + w)
    enc = _encoder()
    dec = FlowDecoder(12, 16, 2, 100.0).eval()
    model = PerceiverIO(enc, dec).eval()
    x = torch.randn(2, h * w, 12)
    tokens = Tokens(x, grid=(h, w))
    z = enc(x)
    full = dec(tokens, z)
    assert full.shape == (2, h, w, 2)
    assert torch.allclose(dec(tokens, z, query_chunk=chunk), full, atol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        model(x)


def test_fourier_queries_full_grid_and_subsampled_points():
    q = FourierQueries((4, 6), 3, (8, 8))
    full = q()
    assert full.shape == (1, 24, q.num_channels)
    assert torch.equal(full[0], grid_fourier_features((4, 6), 3, (8, 8)))
    pts = torch.tensor([0, 5, 23])
    pos = subsampled_positions(pts, (4, 6))
    # DeepMind's subsampled placement: -1 + 2 i / n per axis.
    assert torch.allclose(pos, torch.tensor([[-1.0, -1.0], [-1.0, -1 + 10 / 6], [-1 + 6 / 4, -1 + 10 / 6]]))
    assert q(points=pts).shape == (1, 3, q.num_channels)


def test_grouped_decoder_and_chunking():
    torch.manual_seed(1)
    queries = GroupedQueries({"b": FourierQueries((10,), 2), "a": LearnedQueries(3, 7)}, min_padding_size=2)
    assert queries.num_channels == max(5, 7) + 2
    dec = GroupedDecoder(queries, CrossAttentionDecoder(queries.num_channels, 16, 4)).eval()
    z = torch.randn(2, 8, 16)
    out = dec(None, z, points={"b": torch.tensor([1, 4])})
    assert list(out) == ["a", "b"] and out["a"].shape == (2, 3, 4) and out["b"].shape == (2, 2, 4)
    full = dec(None, z)
    chunked = dec(None, z, query_chunk=4)
    assert all(torch.allclose(full[k], chunked[k], atol=1e-6) for k in full)


def test_classification_and_pooled_embedding():
    torch.manual_seed(2)
    z = torch.randn(3, 8, 16)
    assert ClassificationDecoder(5, 16)(None, z).shape == (3, 5)
    emb = PooledEmbedding(16)
    assert torch.allclose(emb(None, z), z.mean(1))
    assert PooledEmbedding(16, 6)(None, z).shape == (3, 6)
    dec = BasicDecoder(LearnedQueries(4, 10), CrossAttentionDecoder(10, 16, None, shape_for_attention="q"))
    assert dec(None, z).shape == (3, 4, 10)


def test_perceiver_io_bf16_autocast_agrees_with_fp32():
    """End to end in bf16 autocast: within 5e-2 of the output scale."""
    torch.manual_seed(3)
    enc = _encoder(num_blocks=2)
    model = PerceiverIO(enc, FlowDecoder(12, 16, 2, 1.0)).eval()
    x = torch.randn(2, 30, 12)
    tokens = Tokens(x, grid=(5, 6))
    ref = model.decoder(tokens, enc(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.decoder(tokens, enc(x), query_chunk=7)
    assert (low.float() - ref).abs().max() <= 5e-2 * ref.abs().max()
