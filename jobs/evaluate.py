"""`run_pipeline.py eval`: a trained checkpoint (and a student) on held-out synthetic streams.

`evaluate(checkpoint, seed)` renders one synthetic stream of ``seed`` long enough for ``windows``
windows (at least 200) with the window / video / audio settings stored in the checkpoint, runs
the model over it window by window with its latent state carried (as the pipeline does), and
returns::

    {"seed", "windows", "drop", "label_accuracy", "label_chance", "flow_epe", "flow_epe_zero"}

``label_chance`` is the accuracy of always answering the stream's most frequent label;
``flow_epe`` is the mean end-point error (px of the flow grid) over the windows with truth flow,
``flow_epe_zero`` the same for predicting no motion; both are None when video is dropped.
``drop`` removes a modality (or several, comma-separated) from every window, so the model sees
the others only. With a ``student`` checkpoint the result also holds ``cosine_to_teacher`` (mean
cosine of the student's and the checkpoint's embeddings) and the student's own metrics under
``"student"``. A seed the model (or the student) was trained on is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.datasets import default_data_settings, heldout_windows
from jobs.files_dataset import file_streams
from perceiver_stream.checkpoint import load_checkpoint
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.photometric import backward_flow, last_pair, photometric_loss
from perceiver_stream.streaming import StreamingPerceiverIO, StreamStates
from perceiver_stream.student import embedding_cosine
from pipeline.collate import collate
from pipeline.config import DataConfig, load_config
from pipeline.errors import CheckpointError, ConfigError
from pipeline.window import Window

MIN_WINDOWS = 200
MODALITIES = ("video", "audio", "points")


def load_model(path: str | Path, role: str) -> tuple[StreamingPerceiverIO, dict[str, Any]]:
    """The model and metadata of checkpoint ``path``; CheckpointError naming the ``role`` if it does not load."""
    try:
        return load_checkpoint(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the {role}: {e}", source=str(path)) from None


def dropped(drop: str | None) -> tuple[str, ...]:
    """The modalities that ``--drop`` names: one, or several separated by commas (``"video,audio"``
    leaves the points alone). Raises ConfigError for an unknown name or for all of them."""
    names = tuple(n.strip() for n in drop.split(",")) if drop else ()
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ConfigError(f"--drop {drop!r}: {unknown} not a modality; choose from {list(MODALITIES)}")
    if set(names) >= set(MODALITIES):
        raise ConfigError(f"--drop {drop!r}: at least one modality must remain")
    return names


def _without(window: Window, drop: str | None) -> Window:
    for name in dropped(drop):
        if name == "video":
            window = replace(window, video=None, video_t=None)
        elif name == "audio":
            window = replace(window, audio=None, audio_rate=None, audio_t0=None)
        else:
            window = replace(window, points=None, points_t=None)
    return window


@torch.no_grad()
def run_stream(model: StreamingPerceiverIO, windows: list[Window], *, batch_size: int = 1) -> list[ModelOutput]:
    """The model's outputs for consecutive windows of one stream, state carried window to window
    (``batch_size`` > 1 only for models without state: it batches the windows)."""
    step = 1 if model.config.state.carry else batch_size
    states = StreamStates()
    outs = []
    for i in range(0, len(windows), step):
        batch = collate(windows[i : i + step])
        batch, state = states.gather(batch) if model.config.state.carry else (batch, None)
        out = model(batch, state)
        states.update(batch, out.state)
        outs.append(out)
    return outs


@torch.no_grad()
def photometric_error(model: StreamingPerceiverIO, windows: list[Window], outs: list[ModelOutput]) -> float | None:
    """Mean photometric data term (census, occlusion-masked: `perceiver_stream.photometric`) of the
    model's flow over the windows with two frames; None when there is none."""
    errors, i = [], 0
    for o in outs:
        batch = collate(windows[i : i + len(o.flow_valid)])
        i += len(o.flow_valid)
        video = batch.modalities.get(model.config.flow.modality) if model.config.flow is not None else None
        if o.flow is None or video is None:
            continue
        image1, image2, valid = last_pair(video, tuple(o.flow.shape[1:3]))
        valid = valid & o.flow_valid
        if bool(valid.any()):
            back = backward_flow(model, batch)
            errors += photometric_loss(image1[valid], image2[valid], o.flow[valid], back[valid])["photo_census"].tolist()
    return round(float(np.mean(errors)), 4) if errors else None


def _metrics(outs: list[ModelOutput], windows: list[Window], with_flow: bool) -> dict[str, Any]:
    labels = np.array([w.truth.label if w.truth is not None else -1 for w in windows])
    pred = torch.cat([o.label_logits for o in outs]).argmax(dim=1).numpy()
    known = labels >= 0  # windows without a label are not counted
    epe, zero = [], []
    if with_flow:
        i = 0
        for o in outs:
            for r in range(len(o.flow_valid)):
                truth = windows[i].truth.flow if windows[i].truth is not None else None
                i += 1
                if truth is None or o.flow is None or not bool(o.flow_valid[r]):
                    continue
                epe.append(float(np.linalg.norm(o.flow[r].numpy() - truth, axis=-1).mean()))
                zero.append(float(np.linalg.norm(truth, axis=-1).mean()))
    return {
        "labelled": int(known.sum()),
        "label_accuracy": round(float((pred[known] == labels[known]).mean()), 4) if known.any() else None,
        "label_chance": round(float(np.bincount(labels[known]).max() / known.sum()), 4) if known.any() else None,
        "flow_epe": round(float(np.mean(epe)), 4) if epe else None,
        "flow_epe_zero": round(float(np.mean(zero)), 4) if zero else None,
    }


def evaluate_model(
    model: StreamingPerceiverIO,
    windows: list[Window],
    *,
    drop: str | None = None,
    student: StreamingPerceiverIO | None = None,
) -> dict[str, Any]:
    """Metrics (see the module docstring) of ``model`` (and ``student``) on one stream's windows."""
    no_video = "video" in dropped(drop)
    windows = [_without(w, drop) for w in windows]
    model.eval()
    outs = run_stream(model, windows)
    result: dict[str, Any] = {"windows": len(windows), "drop": drop}
    result.update(_metrics(outs, windows, with_flow=not no_video))
    result["photometric"] = None if no_video else photometric_error(model, windows, outs)
    if student is not None:
        student.eval()
        s_outs = run_stream(student, windows)
        cos = embedding_cosine(torch.cat([o.embedding for o in s_outs]), torch.cat([o.embedding for o in outs]))
        result["cosine_to_teacher"] = round(float(cos.mean()), 4)
        result["student"] = _metrics(s_outs, windows, with_flow=not no_video)
    return result


def _refuse_trained_seed(seed: int, meta: dict[str, Any], path: str | Path) -> None:
    for key in ("train_seeds", "distill_seeds"):
        if seed in meta.get(key, []):
            raise ConfigError(f"seed {seed} was used to train checkpoint {path} ({key}); pick a held-out seed",
                              source=str(path))


def evaluate(
    checkpoint: str | Path,
    seed: int,
    *,
    drop: str | None = None,
    student: str | Path | None = None,
    windows: int = MIN_WINDOWS,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (and ``student``) on ``windows`` windows of synthetic rig ``seed``.

    Raises ConfigError for a seed used in training, fewer than 200 windows or an unknown
    modality; CheckpointError for a checkpoint that does not load.
    """
    if windows < MIN_WINDOWS:
        raise ConfigError(f"--windows {windows}: evaluation needs at least {MIN_WINDOWS} windows")
    dropped(drop)
    model, meta = load_model(checkpoint, "checkpoint")
    _refuse_trained_seed(seed, meta, checkpoint)
    s_model = None
    frames = model.config.video_frames
    if student is not None:
        s_model, s_meta = load_model(student, "student")
        _refuse_trained_seed(seed, s_meta, student)
        s_frames = s_model.config.video_frames
        frames = None if frames is None or s_frames is None else max(frames, s_frames)
    data = meta.get("data") or default_data_settings(model.config)
    result = {"seed": seed, "checkpoint": str(checkpoint)}
    if student is not None:
        result["student_checkpoint"] = str(student)
    result.update(evaluate_model(model, heldout_windows(data, seed, windows, video_frames=frames),
                                 drop=drop, student=s_model))
    return result


def evaluate_files(
    checkpoint: str | Path, data: DataConfig, output_dir: str | Path, *, drop: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on recorded streams ``data`` (labels as indices into its class
    names), each stream run with its state carried: ``{"streams", "windows", "labelled",
    "label_accuracy", "flow_epe", "flow_epe_zero", "photometric"}`` over all their windows. Decoded
    windows are cached under ``output_dir``. Raises ConfigError for a file the checkpoint was
    trained on (by content) and for labels the checkpoint does not know."""
    dropped(drop)
    model, meta = load_model(checkpoint, "checkpoint")
    settings = meta.get("data") or default_data_settings(model.config)
    files = file_streams(data, settings, output_dir, video_frames=model.config.video_frames,
                         classes=tuple(model.config.labels.class_names), progress=progress)
    trained = set(meta.get("train_files", []))
    seen = sorted(path for path, digest in files.digests.items() if digest in trained)
    if seen:
        raise ConfigError(f"{seen} were used to train checkpoint {checkpoint} (same contents); evaluate on "
                          "held-out files", source=str(checkpoint))
    windows = [w for s in files.streams for w in s]
    no_video = "video" in dropped(drop)
    model.eval()
    outs = [o for s in files.streams for o in run_stream(model, [_without(w, drop) for w in s])]
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "streams": len(files.ids), "windows": len(windows),
                              "drop": drop}
    result.update(_metrics(outs, windows, with_flow=not no_video))
    result["photometric"] = None if no_video else photometric_error(model, windows, outs)
    return result


def evaluate_config(checkpoint: str | Path, config: str | Path, *, drop: str | None = None) -> dict[str, Any]:
    """`evaluate_files` on the ``eval.data`` of config file ``config`` (cache under its
    ``output.dir``); ConfigError when it has none."""
    cfg = load_config(config)
    if not isinstance(cfg.eval.data, DataConfig):
        raise ConfigError(f"{config} has no eval.data to evaluate on")
    return evaluate_files(checkpoint, cfg.eval.data, cfg.output.dir, drop=drop)
