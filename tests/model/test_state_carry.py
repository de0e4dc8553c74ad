"""StreamingPerceiverIO's latent state: batched equals per window, state off equals offline, a carried
state and a reset, stream states over gaps and restarts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates
from tiny import assert_outputs_close, make_batch, row


@torch.no_grad()
def test_batched_equals_per_window(tiny_model):
    batch = make_batch(b=3, frames=[4, 2, 3], points=[40, 12, 25])
    out = tiny_model(batch)
    for i in range(3):
        alone = tiny_model(row(batch, i))
        torch.testing.assert_close(out.embedding[i:i + 1], alone.embedding, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.flow[i:i + 1], alone.flow, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_state_off_equals_offline(tiny_config):
    torch.manual_seed(1)
    m = StreamingPerceiverIO(tiny_config.merged({"state": {"carry": False}})).eval()
    batch = replace(make_batch(b=3), reset=torch.zeros(3, dtype=torch.bool))
    state = torch.randn(3, 8, 32)
    assert_outputs_close(m(batch, state), m(batch))


@torch.no_grad()
def test_state_carried_changes_output_and_reset_ignores_it(tiny_model):
    batch = make_batch(b=3)
    fresh = tiny_model(batch)
    carried = replace(batch, reset=torch.tensor([False, True, False]))
    out = tiny_model(carried, fresh.state)
    assert not torch.allclose(out.embedding[0], fresh.embedding[0], atol=1e-4)
    assert not torch.allclose(out.flow[2], fresh.flow[2], atol=1e-5)
    torch.testing.assert_close(out.embedding[1], fresh.embedding[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.flow[1], fresh.flow[1], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_stream_states_reset_on_gap_and_restart(tiny_model):
    states = StreamStates()
    b1 = replace(make_batch(b=2), stream_ids=["x", "y"], window_ids=torch.tensor([4, 9]))
    b1, s = states.gather(b1)
    assert s is None and b1.reset.all()
    states.update(b1, tiny_model(b1, s).state)
    # x continues (window 5), y skips a window (gap): only x carries state.
    b2 = replace(make_batch(b=2, seed=1), stream_ids=["x", "y"], window_ids=torch.tensor([5, 11]),
                 reset=torch.zeros(2, dtype=torch.bool))
    b2g, s2 = states.gather(b2)
    assert b2g.reset.tolist() == [False, True]
    assert s2 is not None and s2.shape == (2, 8, 32)
    # An explicit reset (gap flag) wins over a held state.
    b3 = replace(b2, reset=torch.tensor([True, False]))
    assert states.gather(b3)[0].reset.tolist() == [True, True]
    with pytest.raises(ValueError, match="more than once"):
        states.gather(replace(b2, stream_ids=["x", "x"]))
