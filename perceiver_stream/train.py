"""The training loop for ``StreamingPerceiverIO``: phases of optimiser steps over batches.

A run is a sequence of `Phase`s (e.g. the main phase, then one that trains the pooled label reads
alone). Each step of a phase takes its next batch, runs the phase's objective (forward and losses:
the total and its parts), then backward, gradient clipping, the optimiser's step, at the learning
rate ``lr * schedule(i, steps, warmup_steps)`` of the phase's i-th step. `fit` runs the phases
from any step (to resume), calling ``callback(step, metrics)`` after every step and
``checkpoint(step, phase)`` every ``checkpoint_every`` steps and when a phase ends. `train` is
the one-phase run over any iterable of `Batch`es. The library draws no progress bar.

The supervised objective is ``flow_weight * EPE`` (mean end-point error in pixels over the
windows with ground-truth flow where the model also has two frames) ``+ label_weight *
cross-entropy`` (windows with a label >= 0), latent state carried between consecutive windows of
a stream (detached: one-step truncated backpropagation through time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from perceiver_stream.batch import Batch, Targets
from perceiver_stream.multimodal import drop_modalities
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates

Parts = dict[str, torch.Tensor]
Objective = Callable[[int, Any], tuple[torch.Tensor, Parts]]  # (step, batch) -> (loss, its parts)
FlowTerm = Callable[[Batch, ModelOutput], Parts]  # a flow loss without truth: "flow_loss" and its parts


def flow_epe(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean end-point error (px) over the rows where ``valid``; 0 (with a graph) when none is."""
    if not bool(valid.any()):
        return pred.sum() * 0.0
    diff = pred[valid] - truth[valid].to(pred.dtype)
    return torch.sqrt(diff.square().sum(dim=-1) + 1e-12).mean()


def losses(output: ModelOutput, targets: Targets) -> Parts:
    """``flow_epe``, ``label_ce`` and ``group_ce`` of ``output`` against ``targets`` (each present only
    if supervised). ``group_ce`` is the mean cross-entropy of ``output.group_logits`` over the
    (row, group) pairs whose group's modality is present; training adds it to the label loss."""
    out: Parts = {}
    if output.flow is not None:
        valid = targets.flow_valid.to(output.flow_valid.device) & output.flow_valid
        if bool(valid.any()):
            out["flow_epe"] = flow_epe(output.flow, targets.flow.to(output.flow.device), valid)
    labelled = targets.label.to(output.label_logits.device) >= 0
    if output.label_logits.shape[1] and bool(labelled.any()):
        label = targets.label.to(labelled.device)
        out["label_ce"] = F.cross_entropy(output.label_logits[labelled], label[labelled])
        if output.group_logits is not None:
            valid = output.group_valid & labelled[:, None]
            if bool(valid.any()):
                g = output.group_logits.shape[1]
                out["group_ce"] = F.cross_entropy(output.group_logits[valid], label[:, None].expand(-1, g)[valid])
    return out


def label_loss(parts: Parts, zero: torch.Tensor) -> torch.Tensor:
    """The label objective of ``losses``' parts: ``label_ce`` plus ``group_ce`` where there is one."""
    return parts.get("label_ce", zero) + parts.get("group_ce", zero)


def cosine_schedule(step: int, steps: int, warmup_steps: int) -> float:
    """The learning-rate factor at ``step`` (from 0) of ``steps``: linear warm-up over
    ``warmup_steps``, then cosine decay to 0.1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class SupervisedObjective:
    """The supervised objective (see the module docstring) of ``model`` on a `Batch`.

    ``label_weight`` applies from step ``label_start`` on (0 before). With ``carry_state`` (and a
    model with state) each stream's latent state is carried from its previous window, detached.
    ``flow_term`` (e.g. `perceiver_stream.photometric.PhotometricFlowLoss`) replaces the EPE to the
    truth flow by its ``flow_loss``; the truth's EPE is still reported, detached, where known.
    """

    def __init__(
        self,
        model: StreamingPerceiverIO,
        *,
        flow_weight: float = 1.0,
        label_weight: float = 1.0,
        label_start: int = 0,
        carry_state: bool = True,
        flow_term: FlowTerm | None = None,
    ) -> None:
        self.model, self.flow_term = model, flow_term
        self.flow_weight, self.label_weight, self.label_start = flow_weight, label_weight, label_start
        self.carry = carry_state and model.config.state.carry
        self.states = StreamStates()

    def __call__(self, step: int, batch: Batch) -> tuple[torch.Tensor, Parts]:
        if batch.targets is None:
            raise ValueError(f"training batch of step {step} has no targets (collate windows that carry truth)")
        batch = batch.to(next(self.model.parameters()).device)
        state = None
        if self.carry:
            batch, state = self.states.gather(batch, strict=False)
        output = self.model(batch, state)
        if self.carry:
            self.states.update(batch, output.state)
        parts = losses(output, batch.targets)
        zero = output.embedding.sum() * 0.0
        flow = parts.get("flow_epe", zero)
        if self.flow_term is not None:
            parts = {k: v.detach() if k == "flow_epe" else v for k, v in parts.items()}
            parts.update(self.flow_term(batch, output))
            flow = parts.get("flow_loss", zero)
        label_weight = self.label_weight if step >= self.label_start else 0.0
        return self.flow_weight * flow + label_weight * label_loss(parts, zero), parts


@dataclass
class PooledBatch:
    """A pool-phase batch: windows with only the ``labels.pool`` modalities (``batch``), each one's
    latent label read computed without one other modality (``reads``, ``B x C``) and its label
    (``labels``, ``B`` int64)."""

    batch: Batch
    reads: torch.Tensor
    labels: torch.Tensor


class PooledLabelObjective:
    """The pool phase's objective: label cross-entropy of ``labels.head(read + pooled read)``, which
    is the model's label logits for a window lacking the modality its cached read left out."""

    def __init__(self, model: StreamingPerceiverIO) -> None:
        self.model = model

    def __call__(self, step: int, item: PooledBatch) -> tuple[torch.Tensor, Parts]:
        pooled = self.model.pooled_label_read(item.batch)
        logits = self.model.labels.head(item.reads.to(pooled.device) + pooled)
        loss = F.cross_entropy(logits.float(), item.labels.to(logits.device))
        return loss, {"pool_ce": loss}


@dataclass
class Phase:
    """A run of ``steps`` optimiser steps from global step ``first``.

    ``batches`` yields the batch of each step from the step `fit` starts the phase at on;
    ``objective(step, batch)`` gives the loss and its parts; ``optimizer`` holds the parameters
    the phase trains, at ``lr * schedule(step - first, steps, warmup_steps)``; gradients are
    clipped to norm ``grad_clip`` (None: not clipped).
    """

    name: str
    first: int
    steps: int
    batches: Iterator[Any]
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr: float
    warmup_steps: int = 0
    grad_clip: float | None = None
    schedule: Callable[[int, int, int], float] = cosine_schedule

    @property
    def end(self) -> int:
        """The global step after the phase's last."""
        return self.first + self.steps


def fit(
    model: StreamingPerceiverIO,
    phases: Iterable[Phase],
    *,
    start: int = 0,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: Callable[[int, Phase], None] | None = None,
    checkpoint_every: int | None = None,
) -> list[dict[str, float]]:
    """Run each phase's steps from global step ``start`` on (a phase that ends by then is skipped:
    ``phases`` may build each one lazily, when the one before has ended).

    A phase also ends when its batches run out. After step ``s`` (counted from 1)
    ``callback(s, metrics)`` gets ``{"loss", "lr", <the objective's parts>}``; ``checkpoint(s,
    phase)`` is called, with the model in eval mode, when ``s`` is a multiple of
    ``checkpoint_every`` or the phase's last step. Returns every step's metrics; the model is
    left in eval mode.
    """
    history: list[dict[str, float]] = []
    for phase in phases:
        if phase.end <= start:
            continue
        model.train()
        opt = phase.optimizer
        for step in range(max(start, phase.first), phase.end):
            batch = next(phase.batches, None)
            if batch is None:
                break
            for group in opt.param_groups:
                group["lr"] = phase.lr * phase.schedule(step - phase.first, phase.steps, phase.warmup_steps)
            loss, parts = phase.objective(step, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if phase.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), phase.grad_clip)
            opt.step()
            metrics = {"loss": loss.item(), "lr": opt.param_groups[0]["lr"], **{k: v.item() for k, v in parts.items()}}
            history.append(metrics)
            if callback is not None:
                callback(step + 1, metrics)
            if checkpoint is not None and ((checkpoint_every and (step + 1) % checkpoint_every == 0)
                                           or step + 1 == phase.end):
                model.eval()
                checkpoint(step + 1, phase)
                model.train()
    model.eval()
    return history


def _cycle(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Iterate ``batches``, restarting re-iterable collections when they run out."""
    while True:
        it = iter(batches)
        empty = True
        for b in it:
            empty = False
            yield b
        if empty or it is batches:
            return


def train(
    model: StreamingPerceiverIO,
    batches: Iterable[Batch],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    modality_dropout: float = 0.0,
    flow_weight: float = 1.0,
    label_weight: float = 1.0,
    carry_state: bool = True,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> list[float]:
    """Train ``model`` in place for ``steps`` steps (fewer if a one-shot iterator runs out): one
    `Phase` of the supervised objective over every parameter, AdamW (``optimizer`` resumes a
    previous run's), `cosine_schedule`. Each batch gets modality dropout with probability
    ``modality_dropout`` (never all of a window's modalities). ``callback`` as in `fit`.
    Returns the total loss of every step.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"train needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    generator = torch.Generator().manual_seed(seed)
    phase = Phase(
        "main", 0, steps,
        batches=(drop_modalities(b, modality_dropout, generator) for b in _cycle(batches)),
        objective=SupervisedObjective(model, flow_weight=flow_weight, label_weight=label_weight,
                                      carry_state=carry_state),
        optimizer=optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay),
        lr=lr, warmup_steps=warmup_steps, grad_clip=grad_clip,
    )
    return [m["loss"] for m in fit(model, [phase], callback=callback)]
