"""A training loop for ``StreamingPerceiverIO`` over any iterable of ``Batch``es.

Loss = ``flow_weight * EPE`` (mean end-point error in pixels over the windows with ground-truth
flow, where the model also has two frames) ``+ label_weight * cross-entropy`` (windows with a
label >= 0). Latent state is carried between consecutive windows of a stream (detached: one-step
truncated backpropagation through time) unless ``carry_state`` is False. Progress goes to
``callback(step, metrics)``; the library draws no progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from perceiver_stream.batch import Batch, Targets
from perceiver_stream.multimodal import drop_modalities
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates


def flow_epe(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean end-point error (px) over the rows where ``valid``; 0 (with a graph) when none is."""
    if not bool(valid.any()):
        return pred.sum() * 0.0
    diff = pred[valid] - truth[valid].to(pred.dtype)
    return torch.sqrt(diff.square().sum(dim=-1) + 1e-12).mean()


def losses(output: ModelOutput, targets: Targets) -> dict[str, torch.Tensor]:
    """``flow_epe``, ``label_ce`` and ``group_ce`` of ``output`` against ``targets`` (each present only
    if supervised). ``group_ce`` is the mean cross-entropy of ``output.group_logits`` over the
    (row, group) pairs whose group's modality is present; training adds it to the label loss."""
    out: dict[str, torch.Tensor] = {}
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


def label_loss(parts: dict[str, torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """The label objective of ``losses``' parts: ``label_ce`` plus ``group_ce`` where there is one."""
    return parts.get("label_ce", zero) + parts.get("group_ce", zero)


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
    """Train ``model`` in place for ``steps`` steps (fewer if a one-shot iterator runs out).

    AdamW with linear warm-up over ``warmup_steps`` then cosine decay to 10% of ``lr``. Each batch
    gets modality dropout with probability ``modality_dropout`` (never all of a window's
    modalities). ``optimizer`` resumes a previous run's AdamW state (pass the same object back).
    ``callback(step, {"loss", "flow_epe", "label_ce", "lr"})`` is called after every step
    (``step`` counts from 1). Returns the total loss of every step.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"train needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    device = next(model.parameters()).device
    opt = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    generator = torch.Generator().manual_seed(seed)
    states = StreamStates()
    history: list[float] = []
    model.train()
    for step, batch in enumerate(_cycle(batches)):
        if step >= steps:
            break
        if batch.targets is None:
            raise ValueError(f"training batch {step} has no targets (collate windows that carry truth)")
        for group in opt.param_groups:
            group["lr"] = lr * factor(step)
        batch = drop_modalities(batch.to(device), modality_dropout, generator)
        state = None
        if carry_state and model.config.state.carry:
            batch, state = states.gather(batch, strict=False)
        output = model(batch, state)
        parts = losses(output, batch.targets)
        loss = flow_weight * parts.get("flow_epe", output.embedding.sum() * 0.0)
        loss = loss + label_weight * label_loss(parts, output.embedding.sum() * 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if carry_state and model.config.state.carry:
            states.update(batch, output.state)
        history.append(loss.item())
        if callback is not None:
            metrics = {"loss": history[-1], "lr": opt.param_groups[0]["lr"]}
            metrics.update({k: v.item() for k, v in parts.items()})
            callback(step + 1, metrics)
    model.eval()
    return history
