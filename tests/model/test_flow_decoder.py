"""StreamingPerceiverIO's flow decoder: output shapes and validity, no decoder, no flow without two
frames, strided and chunked decoding, the query cache following weight updates."""

from __future__ import annotations

import pytest
import torch

from perceiver_stream.config import StreamingConfig
from perceiver_stream.streaming import StreamingPerceiverIO
from tiny import HW, assert_outputs_close, make_batch


@torch.no_grad()
def test_shapes_and_flow_validity(tiny_model):
    batch = make_batch(b=3, frames=[4, 1, 2])
    out = tiny_model(batch)
    assert out.embedding.shape == (3, 32)
    assert out.label_logits.shape == (3, 3)
    assert out.flow.shape == (3, HW, HW, 2)
    assert out.state.shape == (3, 8, 32)
    assert out.flow_valid.tolist() == [True, False, True]
    assert torch.all(out.flow[1] == 0)
    assert torch.isfinite(out.flow).all() and torch.isfinite(out.embedding).all()


@torch.no_grad()
def test_model_without_a_flow_decoder(tiny_config):
    torch.manual_seed(0)
    m = StreamingPerceiverIO(StreamingConfig.from_dict({**tiny_config.to_dict(), "flow": None})).eval()
    assert m.flow is None and not any(k.startswith("flow") for k in m.state_dict())
    out = m(make_batch(b=2))
    assert out.flow is None and out.flow_valid.tolist() == [False, False] and out.label_logits.shape == (2, 3)


@torch.no_grad()
def test_no_flow_without_two_frames(tiny_model):
    out = tiny_model(make_batch(b=2, frames=[1, 1]))
    assert out.flow is None and not out.flow_valid.any()


@torch.no_grad()
def test_flow_stride_decodes_a_coarser_grid_and_upsamples_it(tiny_config):
    torch.manual_seed(0)
    coarse = StreamingPerceiverIO(tiny_config.merged({"flow": {"stride": 2, "query_hidden": 4}})).eval()
    batch = make_batch(b=3, frames=[4, 1, 2])
    out = coarse(batch)
    assert out.flow.shape == (3, HW, HW, 2) and out.flow_valid.tolist() == [True, False, True]
    assert torch.all(out.flow[1] == 0)
    # bilinear x2 upsampling: inside, each pixel lies between coarse cells (no blocks of copies)
    f = out.flow[0]
    assert not torch.equal(f[2, 2], f[2, 3])
    # the decoder ran on 8 x 8 queries: a flow equal to its own 2x2 block means, up to upsampling
    pooled = torch.nn.functional.avg_pool2d(f.permute(2, 0, 1)[None], 2)[0]
    up = torch.nn.functional.interpolate(pooled[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    assert (up.permute(1, 2, 0) - f)[2:-2, 2:-2].abs().max() < 0.5 * f.abs().max()
    with pytest.raises(ValueError, match="flow.stride"):
        tiny_config.merged({"flow": {"stride": 3}})


@torch.no_grad()
def test_chunked_flow_equals_unchunked(tiny_model):
    batch = make_batch(b=2)
    chunked = StreamingPerceiverIO(tiny_model.config.merged({"flow": {"chunk": 37}})).eval()
    chunked.load_state_dict(tiny_model.state_dict())
    whole = StreamingPerceiverIO(tiny_model.config.merged({"flow": {"chunk": None}})).eval()
    whole.load_state_dict(tiny_model.state_dict())
    torch.testing.assert_close(chunked(batch).flow, whole(batch).flow, atol=1e-6, rtol=1e-5)


def test_cache_follows_weight_updates(tiny_model):
    m = StreamingPerceiverIO(tiny_model.config).eval()
    m.load_state_dict(tiny_model.state_dict())
    batch = make_batch(b=1)
    with torch.no_grad():
        first = m(batch).flow
        m.flow.pos_proj.weight.add_(0.5)
        m.encoder.latents.add_(0.5)
        second = m(batch)
    fresh = StreamingPerceiverIO(tiny_model.config).eval()
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert_outputs_close(second, fresh(batch))
    assert not torch.allclose(first, second.flow)
