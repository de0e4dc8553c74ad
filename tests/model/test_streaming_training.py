"""Training StreamingPerceiverIO on hand-made batches: the loss falls; dropout and carried state run."""

from __future__ import annotations

from dataclasses import replace

import torch

from perceiver_stream.streaming import StreamingPerceiverIO
from perceiver_stream.train import losses, train
from tiny import make_batch


def test_training_reduces_loss(tiny_config):
    torch.manual_seed(3)
    m = StreamingPerceiverIO(tiny_config)
    batch = make_batch(b=4, seed=5)
    with torch.no_grad():
        m.eval()
        before = losses(m(batch), batch.targets)
    seen = []
    history = train(m, [batch], steps=40, lr=3e-3, modality_dropout=0.0,
                    callback=lambda step, metrics: seen.append((step, metrics)))
    assert len(history) == 40 and [s for s, _ in seen] == list(range(1, 41))
    assert {"loss", "lr", "flow_epe", "label_ce"} <= set(seen[0][1])
    with torch.no_grad():
        after = losses(m(batch), batch.targets)
    assert after["label_ce"] < 0.5 * before["label_ce"]
    assert after["flow_epe"] < before["flow_epe"]
    assert not m.training


def test_training_with_dropout_and_state_runs(tiny_config):
    torch.manual_seed(4)
    m = StreamingPerceiverIO(tiny_config)
    b1 = make_batch(b=2, seed=1)
    b2 = replace(make_batch(b=2, seed=2), window_ids=torch.tensor([1, 2]), reset=torch.zeros(2, dtype=torch.bool))
    history = train(m, iter([b1, b2, b1]), steps=10, lr=1e-3, modality_dropout=0.5)
    assert len(history) == 3  # a one-shot iterator ends training early
    assert all(torch.isfinite(torch.tensor(history)))
