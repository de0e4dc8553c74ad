"""Online distillation without Ray: a student learns the running model's outputs window by window.

`Distiller` holds the student (see `perceiver_stream.student`), its optimiser and its own latent
state per stream. The pipeline's DistillActor is a thin wrapper: for every ``every_windows``-th
batch the model actor runs, it calls ``step(batch, teacher_output)`` and writes the returned
per-window student embeddings and cosines to the ``student`` table; every ``checkpoint_every``
steps and at the end it calls ``save(student_checkpoint_path(output_dir))``.

`distill_job(cfg)` is the same loop in one process: the config's streams are read in lockstep
(one window of each per batch, as the model actor batches them), the teacher
(``model.checkpoint``) runs with its state carried, and the student learns from its outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from perceiver_stream.batch import Batch
from perceiver_stream.checkpoint import load_checkpoint, save_checkpoint
from perceiver_stream.multimodal import drop_modalities
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates
from perceiver_stream.student import distill_losses, embedding_cosine, init_from_teacher, student_config
from pipeline.collate import collate
from pipeline.config import Config, DistillConfig
from pipeline.errors import CheckpointError, ConfigError

CHECKPOINTS = "_checkpoints"
STUDENT = "student"


def student_checkpoint_path(output_dir: str | Path) -> Path:
    """Where the pipeline keeps the latest student: ``<output>/_checkpoints/student`` (readers of
    the output tables skip underscore names)."""
    return Path(output_dir) / CHECKPOINTS / STUDENT


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
    """A student, its AdamW optimiser and its per-stream latent state (see the module docstring).

    teacher: the running model; its config shapes the student (``settings.student`` overrides)
    and its weights initialise every student tensor of the same shape. ``metadata`` is stored
    in every student checkpoint (e.g. the teacher's path, data settings, the seeds distilled on).
    """

    def __init__(
        self,
        teacher: StreamingPerceiverIO,
        settings: DistillConfig,
        *,
        metadata: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        try:
            config = student_config(teacher.config, settings.student)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"distill.student: {e}") from None
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
        """Continue from a student checkpoint this distiller wrote (same student config)."""
        model, meta = load_checkpoint(path, device=next(self.student.parameters()).device)
        if model.config != self.student.config:
            raise CheckpointError("the saved student's config differs from distill.student; remove it or "
                                  "use a new output folder", source=str(path))
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
        if model.config.state:
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
        if model.config.state:
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
        """Write the student checkpoint (safetensors + config JSON, metadata: steps, windows and
        this distiller's metadata) to folder ``path``."""
        meta = {**self.metadata, "role": "student", "steps": self.steps, "windows": self.windows}
        return save_checkpoint(path, self.student, meta)


# ---- the loop without Ray ---------------------------------------------------------------------


def _teacher(cfg: Config) -> tuple[StreamingPerceiverIO, dict[str, Any]]:
    if cfg.model.checkpoint is None:
        raise ConfigError("model.checkpoint: distillation needs a trained teacher checkpoint")
    try:
        return load_checkpoint(cfg.model.checkpoint)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the teacher: {e}", source=cfg.model.checkpoint) from None


@torch.no_grad()
def per_window_seconds(model: StreamingPerceiverIO, batch: Batch, repeats: int = 5) -> float:
    """Best-of-``repeats`` CPU seconds per window of one stateless forward pass over ``batch``.

    CPU time of this process, not wall time: on a shared machine it still measures the work
    (with one torch thread it equals the wall time on an idle core)."""
    best = float("inf")
    model.eval()
    for _ in range(repeats):
        t = time.process_time()
        model(batch)
        best = min(best, time.process_time() - t)
    return best / len(batch)


def distill_job(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Distil a student from ``model.checkpoint`` on the config's streams (see the module
    docstring); writes it to ``<output>/_checkpoints/student`` and returns a JSON-ready summary
    (steps, final losses, the student's speed-up per window over the teacher)."""
    from tqdm import tqdm

    from pipeline.read import open_stream
    from jobs.train import compact, video_frames_needed

    teacher, t_meta = _teacher(cfg)
    seeds = [s.synthetic.seed for s in cfg.streams if s.synthetic is not None]
    refused = sorted(set(seeds) & set(t_meta.get("train_seeds", [])))
    if refused:
        raise ConfigError(f"streams: seeds {refused} trained the teacher; distil on other streams so the "
                          "student can be evaluated on seeds neither model saw")
    meta = {"teacher": str(cfg.model.checkpoint), "distill_seeds": seeds,
            "train_seeds": t_meta.get("train_seeds", []), "data": t_meta.get("data")}
    distiller = Distiller(teacher, cfg.distill, metadata=meta)
    path = student_checkpoint_path(cfg.output.dir)
    frames = video_frames_needed(teacher.config)
    streams = {s.id: open_stream(s, cfg) for s in cfg.streams}
    states = StreamStates()
    history: list[dict[str, float]] = []
    bar = tqdm(desc="distilling", unit="batch", disable=not progress)
    batch_no = 0
    last_batch = None
    while streams:
        windows = []
        for sid in list(streams):
            w = next(streams[sid], None)
            if w is None:
                del streams[sid]
                distiller.forget(sid)
                states.forget(sid)
            else:
                windows.append(compact(w, frames))
        if not windows:
            break
        batch = collate(windows, video_frames=frames)
        with torch.no_grad():
            batch, state = states.gather(batch, strict=False) if teacher.config.state else (batch, None)
            t_out = teacher(batch, state)
            states.update(batch, t_out.state)
        batch_no += 1
        if batch_no % cfg.distill.every_windows == 0:
            history.append(distiller.step(batch, t_out).losses)
            bar.set_postfix({k: f"{v:.3f}" for k, v in history[-1].items()})
            if distiller.steps % cfg.distill.checkpoint_every == 0:
                distiller.save(path)
        bar.update(1)
        last_batch = batch
    bar.close()
    if last_batch is None:
        raise ConfigError("streams: no windows to distil on")
    distiller.save(path)
    t_s = per_window_seconds(teacher, last_batch)
    s_s = per_window_seconds(distiller.student, last_batch)
    tail = history[-20:]
    return {
        "student": str(path),
        "steps": distiller.steps,
        "windows": distiller.windows,
        "student_params": sum(p.numel() for p in distiller.student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "last_losses": {k: round(sum(h[k] for h in tail if k in h) / max(1, sum(k in h for h in tail)), 4)
                        for k in tail[-1]} if tail else {},
        "teacher_ms_per_window": round(1e3 * t_s, 3),
        "student_ms_per_window": round(1e3 * s_s, 3),
        "speedup": round(t_s / s_s, 2),
    }
