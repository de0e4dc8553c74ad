"""DistillActor: trains a student on the running model's outputs while the pipeline runs.

A thin Ray wrapper around `perceiver_stream.distill.Distiller`. The model actor offers it every
``distill.every_windows``-th batch it ran: the batch it already collated (CPU tensors, the
windows' raw samples are not shipped again) and the teacher's outputs for it (embedding, label
scores, flow; float32 on the CPU, without the latent state). Each offered batch is one optimiser
step; the student's embeddings of the batch and their cosine to the teacher's go to the sink as
``student`` rows, committed with (or after) their window's own rows.

**Never blocking the pipeline: drop with a count.** The model actor keeps at most
`MAX_PENDING` offered batches unfinished; a batch offered while that many are pending is not
distilled, and ``pstream_distill_dropped_total`` counts its windows (those windows have no
``student`` row). The model actor never waits for this actor, so a slow student costs
distillation coverage, never pipeline throughput.

Checkpoints: the student goes to ``<output>/_checkpoints/student`` every
``distill.checkpoint_every`` steps and at `finish`; a run into a folder that has one resumes it,
and so does the actor when Ray restarts it (`actors.distill_watch`).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch

from actors.memory import HeapTrimmer
from actors.metrics import Metrics
from actors.predictor import ShippedModel, load_predictor
from perceiver_stream.batch import Batch
from perceiver_stream.checkpoint import read_config
from perceiver_stream.distill import Distiller
from perceiver_stream.outputs import ModelOutput
from pipeline.config import Config, student_checkpoint_path
from pipeline.errors import CheckpointError, ConfigError
from pipeline.parquet import StudentRow

MAX_PENDING = 2  # offered batches the model actor lets wait for the student before it drops


def teacher_outputs(out: ModelOutput) -> ModelOutput:
    """What the student learns from, ready to ship: float32 CPU tensors without the latent state."""
    return ModelOutput(
        embedding=out.embedding.detach().float().cpu(),
        label_logits=out.label_logits.detach().float().cpu(),
        flow=None if out.flow is None else out.flow.detach().float().cpu(),
        flow_valid=out.flow_valid.detach().cpu(),
        state=torch.empty(0),
    )


class DistillActor:
    """Online distillation in the pipeline (see the module docstring).

    ``output`` is the run's output folder, ``sink`` the SinkActor handle the ``student`` rows go
    to; ``device`` and ``num_cpus`` as for the ModelActor. The teacher is the model the pipeline
    runs (``model.checkpoint``), as the driver read it (``teacher``, through the object store, so the
    actor's node needs no copy of the checkpoint; read from its path only without one); its weights initialise the student, its metadata (training seeds,
    data settings) is kept in the student's checkpoint so ``eval --student`` refuses those seeds.
    """

    def __init__(self, cfg: Config, output: str, sink: Any, teacher: ShippedModel | None = None, *,
                 device: str = "cpu", num_cpus: float = 1) -> None:
        torch.set_num_threads(max(1, int(num_cpus)))
        self._device = torch.device(device)
        meta: dict[str, Any] = {"teacher": cfg.model.checkpoint}
        if teacher is not None:
            t_meta = teacher.metadata
        else:
            t_meta = {} if cfg.model.checkpoint is None else read_config(cfg.model.checkpoint)[1]
        meta.update({k: t_meta[k] for k in ("train_seeds", "data", "class_names") if k in t_meta})
        teacher_model = load_predictor(cfg, self._device, teacher).model
        meta["distill_seeds"] = [s.synthetic.seed for s in cfg.streams if s.synthetic is not None]
        try:
            self._distiller = Distiller(teacher_model, cfg.distill, metadata=meta)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"distill.student: {e}") from None
        del teacher, teacher_model  # the student holds what it needs
        self._path = student_checkpoint_path(output)
        self._resumed = (self._path / "config.json").is_file()
        if self._resumed:
            try:
                self._distiller.resume(self._path)
            except ValueError as e:
                raise CheckpointError(f"{e}; remove it or use a new output folder", source=str(self._path)) from None
        self._checkpoint_every = cfg.distill.checkpoint_every
        self._sink = sink
        self._writes: list[ray.ObjectRef] = []
        self._cosine: list[float] = []
        self._metrics = Metrics()
        self._trim = HeapTrimmer()

    def info(self) -> dict[str, Any]:
        """Where the student goes, whether it resumed one, its steps so far, and the process id."""
        return {
            "pid": os.getpid(),
            "checkpoint": str(self._path),
            "resumed": self._resumed,
            "steps": self._distiller.steps,
            "params": sum(p.numel() for p in self._distiller.student.parameters()),
        }

    def step(self, batch: Batch, teacher: ModelOutput) -> int:
        """One distillation step on ``batch`` towards ``teacher``; sends its ``student`` rows to
        the sink. Returns the windows distilled."""
        t0 = time.perf_counter()
        result = self._distiller.step(batch, teacher)
        rows: dict[str, list[StudentRow]] = {}
        for i, (sid, wid) in enumerate(zip(batch.stream_ids, batch.window_ids.tolist())):
            rows.setdefault(sid, []).append(
                StudentRow(
                    window_id=int(wid), embedding=result.embedding[i].numpy(), cosine_to_teacher=float(result.cosine[i])
                )
            )
        if self._writes:  # forget the sink writes already taken
            self._writes = ray.wait(self._writes, num_returns=len(self._writes), timeout=0)[1]
        self._writes.append(self._sink.write_student.remote(rows))
        self._cosine.append(result.losses["cosine_to_teacher"])
        if self._distiller.steps % self._checkpoint_every == 0:
            self._distiller.save(self._path)
        self._metrics.latency.observe(time.perf_counter() - t0, tags={"stage": "distill"})
        self._metrics.distill_cosine.set(result.losses["cosine_to_teacher"])
        self._trim()
        for sid, r in rows.items():
            self._metrics.windows_out.inc(len(r), tags={"stage": "distill", "stream": sid})
        return len(batch)

    def finish(self) -> dict[str, Any]:
        """Save the student, wait until the sink has taken (or, dying, lost) every row sent; a
        JSON-ready summary."""
        self._distiller.save(self._path)
        ray.wait(self._writes, num_returns=len(self._writes))
        self._writes = []
        tail = self._cosine[-20:]
        return {
            **self.info(),
            "windows": self._distiller.windows,
            "cosine_to_teacher": round(sum(tail) / len(tail), 4) if tail else None,
        }

