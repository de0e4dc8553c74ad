"""`run_pipeline.py distill`: distil a student offline, without Ray.

`distill_job(cfg)` reads the config's streams in lockstep (one window of each per batch, as the
model actor batches them), runs the teacher (``model.checkpoint``) with its state carried and
takes one `perceiver_stream.distill.Distiller` step on every ``distill.every_windows``-th batch,
as the pipeline's DistillActor does. The student goes to ``<output>/_checkpoints/student``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from jobs.datasets import compact
from jobs.evaluate import load_model
from perceiver_stream.batch import Batch
from perceiver_stream.distill import Distiller
from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates
from pipeline.collate import collate
from pipeline.config import Config, student_checkpoint_path
from pipeline.errors import ConfigError
from pipeline.read import open_stream


def _teacher(cfg: Config) -> tuple[StreamingPerceiverIO, dict[str, Any]]:
    if cfg.model.checkpoint is None:
        raise ConfigError("model.checkpoint: distillation needs a trained teacher checkpoint")
    return load_model(cfg.model.checkpoint, "teacher")


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
    docstring); returns a JSON-ready summary (steps, windows, parameters, mean losses of the last
    20 steps, milliseconds per window of teacher and student, the student's speed-up).
    Raises ConfigError for streams that trained the teacher or bad student overrides."""
    teacher, t_meta = _teacher(cfg)
    seeds = [s.synthetic.seed for s in cfg.streams if s.synthetic is not None]
    refused = sorted(set(seeds) & set(t_meta.get("train_seeds", [])))
    if refused:
        raise ConfigError(f"streams: seeds {refused} trained the teacher; distil on other streams so the "
                          "student can be evaluated on seeds neither model saw")
    meta = {"teacher": str(cfg.model.checkpoint), "distill_seeds": seeds,
            "train_seeds": t_meta.get("train_seeds", []), "data": t_meta.get("data")}
    try:
        distiller = Distiller(teacher, cfg.distill, metadata=meta)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"distill.student: {e}") from None
    path = student_checkpoint_path(cfg.output.dir)
    frames = teacher.config.video_frames
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
            batch, state = states.gather(batch, strict=False) if teacher.config.state.carry else (batch, None)
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
