"""The distillation step: a student learns a teacher's outputs one batch of windows at a time.

`Distiller` holds the student (`perceiver_stream.student`), its AdamW optimiser, its own latent
state per stream and its modality-dropout draws. The pipeline's DistillActor and the offline
distillation job both call ``step(batch, teacher_output)``; where checkpoints go and how the
settings are parsed belong to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from perceiver_stream.batch import Batch
from perceiver_stream.checkpoint import load_checkpoint, save_checkpoint
from perceiver_stream.multimodal import drop_modalities
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates
from perceiver_stream.student import distill_losses, embedding_cosine, init_from_teacher, student_config


class DistillSettings(Protocol):
    """What a `Distiller` reads of its settings (the pipeline's ``distill`` config section has them).

    student: overrides of the teacher's model config (`student_config`). The loss is
    ``embedding_weight * (1 - cosine)`` + ``label_weight * KL`` of label scores at ``temperature``
    + ``flow_weight * L1`` to the teacher's flow. ``modality_dropout`` p drops each modality of a
    stream with probability p, drawn per stream for ``dropout_windows`` windows at a time.
    """

    student: Mapping[str, Any]
    lr: float
    temperature: float
    embedding_weight: float
    label_weight: float
    flow_weight: float
    modality_dropout: float
    dropout_windows: int


@dataclass
class DistillStep:
    """What one distillation step returns.

    losses:    ``loss`` (the weighted total), ``embedding``, ``labels``, ``flow`` (those present)
               and ``cosine_to_teacher`` (mean over the batch), as floats.
    embedding: ``B x D`` float32 student embeddings of the batch's windows (before the update).
    cosine:    ``B`` float32 cosine of each student embedding with the teacher's.
    """

    losses: dict[str, float]
    embedding: torch.Tensor
    cosine: torch.Tensor


class Distiller:
    """A student, its AdamW optimiser and its per-stream latent state.

    teacher: the running model; its config shapes the student (``settings.student`` overrides)
    and its weights initialise every student tensor of the same shape. ``metadata`` is stored in
    every checkpoint `save` writes. Raises ValueError (or TypeError) for student overrides the model
    refuses.
    """

    def __init__(
        self,
        teacher: StreamingPerceiverIO,
        settings: DistillSettings,
        *,
        metadata: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        config = student_config(teacher.config, dict(settings.student))
        device = next(teacher.parameters()).device
        torch.manual_seed(seed)
        self.student = StreamingPerceiverIO(config).to(device)
        init_from_teacher(self.student, teacher)
        self.settings = settings
        self.metadata = dict(metadata or {})
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=settings.lr)
        self.states = StreamStates()
        self.steps = 0
        self.windows = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._draws: dict[str, tuple[dict[str, float], int]] = {}  # stream -> (draw per modality, windows left)

    def resume(self, path: str | Path) -> None:
        """Continue from a student checkpoint a distiller wrote; ValueError if its config differs."""
        model, meta = load_checkpoint(path, device=next(self.student.parameters()).device)
        if model.config != self.student.config:
            raise ValueError(f"the student saved at {path} has another config than this student")
        self.student.load_state_dict(model.state_dict())
        self.steps, self.windows = int(meta.get("steps", 0)), int(meta.get("windows", 0))

    def step(self, batch: Batch, teacher: ModelOutput) -> DistillStep:
        """One optimiser step on ``batch`` towards the ``teacher``'s outputs for it."""
        s = self.settings
        model = self.student
        model.train()
        device = next(model.parameters()).device
        batch = self._dropout(batch).to(device)
        state = None
        if model.config.state.carry:
            batch, state = self.states.gather(batch, strict=False)
        out = model(batch, state)
        parts = distill_losses(out, teacher, temperature=s.temperature)
        weights = {"embedding": s.embedding_weight, "labels": s.label_weight, "flow": s.flow_weight}
        loss = sum(weights[k] * v for k, v in parts.items())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.optimizer.step()
        model.eval()
        if model.config.state.carry:
            self.states.update(batch, out.state)
        self.steps += 1
        self.windows += len(batch)
        cosine = embedding_cosine(out.embedding.detach(), teacher.embedding.to(device)).cpu()
        losses = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
        losses["cosine_to_teacher"] = float(cosine.mean())
        return DistillStep(losses, out.embedding.detach().float().cpu(), cosine)

    def _dropout(self, batch: Batch) -> Batch:
        """``batch`` as the student sees it under ``modality_dropout``: each stream keeps its draws
        for ``dropout_windows`` windows; a row with new draws starts from a reset state, so no
        state carries evidence of a modality its window lacks."""
        p, names = self.settings.modality_dropout, list(batch.modalities)
        if p == 0.0 or len(names) < 2:
            return batch
        reset = batch.reset.clone()
        rows = []
        for i, sid in enumerate(batch.stream_ids):
            draws, left = self._draws.get(sid, ({}, 0))
            if left <= 0 or set(draws) != set(names):
                draws = {k: float(torch.rand((), generator=self._generator)) for k in names}
                left = self.settings.dropout_windows
                reset[i] = True
            self._draws[sid] = (draws, left - 1)
            rows.append([draws[k] for k in names])
        return replace(drop_modalities(batch, p, draws=torch.tensor(rows)), reset=reset)

    def forget(self, stream_id: str) -> None:
        """Drop a finished stream's student state."""
        self.states.forget(stream_id)
        self._draws.pop(stream_id, None)

    def save(self, path: str | Path) -> Path:
        """Write the student checkpoint (safetensors + config JSON; metadata: ``role``, ``steps``,
        ``windows`` and this distiller's metadata) to folder ``path``."""
        meta = {**self.metadata, "role": "student", "steps": self.steps, "windows": self.windows}
        return save_checkpoint(path, self.student, meta)
