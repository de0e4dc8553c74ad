"""`perceiver_stream.train.fit`: phases from a start step, the schedule, and the progress and checkpoint hooks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from perceiver_stream.train import Phase, cosine_schedule, fit


def _phase(model: nn.Module, name: str, first: int, steps: int, lr: float = 0.1, **kw) -> Phase:
    def objective(step: int, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = model(x).square().mean()
        return loss, {f"{name}_mse": loss}

    batches = (torch.ones(2, 3) for _ in itertools.count())
    return Phase(name, first, steps, batches, objective, torch.optim.SGD(model.parameters(), lr=lr), lr, **kw)


def test_fit_runs_the_phases_left_from_start_and_builds_each_when_reached():
    model = nn.Linear(3, 1)
    built, seen, saved = [], [], []

    def phases():
        for name, first, steps in (("main", 0, 4), ("pool", 4, 3)):
            built.append((name, len(seen)))  # how many steps had run when this phase was built
            yield _phase(model, name, first, steps)

    history = fit(model, phases(), start=2, callback=lambda s, m: seen.append((s, set(m))),
                  checkpoint=lambda s, p: saved.append((s, p.name, model.training)), checkpoint_every=3)
    assert [s for s, _ in seen] == [3, 4, 5, 6, 7] and len(history) == 5
    assert seen[0][1] == {"loss", "lr", "main_mse"} and seen[-1][1] == {"loss", "lr", "pool_mse"}
    assert built == [("main", 0), ("pool", 2)]  # the pool phase only once the main one had ended
    # every 3 steps and at each phase's end, with the model in eval mode
    assert saved == [(3, "main", False), (4, "main", False), (6, "pool", False), (7, "pool", False)]
    assert not model.training
    assert fit(model, [_phase(model, "main", 0, 4)], start=4) == []  # an ended phase is skipped


def test_fit_sets_each_step_s_learning_rate_from_the_phase_s_schedule():
    model = nn.Linear(3, 1)
    lrs: list[float] = []
    fit(model, [_phase(model, "main", 0, 6, warmup_steps=2), _phase(model, "pool", 6, 2, lr=0.5)],
        callback=lambda s, m: lrs.append(m["lr"]))
    assert lrs[:6] == pytest.approx([0.1 * cosine_schedule(i, 6, 2) for i in range(6)])
    assert lrs[:2] == pytest.approx([0.05, 0.1]) and lrs[1:6] == sorted(lrs[1:6], reverse=True)  # warm-up, then decay
    assert lrs[6:] == pytest.approx([0.5, 0.5 * cosine_schedule(1, 2, 0)])  # the pool phase counts from its first


def test_fit_clips_gradients_and_ends_a_phase_whose_batches_run_out():
    model = nn.Linear(3, 1)
    before = model.weight.detach().clone()
    phase = _phase(model, "main", 0, 10, lr=1.0, grad_clip=1e-3)
    phase.batches = iter([torch.full((2, 3), 100.0)] * 2)
    history = fit(model, [phase])
    assert len(history) == 2
    assert float((model.weight.detach() - before).norm()) <= 2e-3 + 1e-6  # two steps of at most 1e-3 each
