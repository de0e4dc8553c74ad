"""`run_pipeline.py train`: train the fused model on the synthetic rig and recorded files, with
checkpoints and resume.

`train_job(cfg)` renders one synthetic stream per seed of ``train.seeds`` through the pipeline's
windower and keeps its windows in memory (rendering costs far less than training on them), adds
the recorded streams of ``train.data`` (decoded once, cached on disk: `jobs.files_dataset`),
starts from a fresh model or the ``train.init`` checkpoint (`jobs.finetune`), then drives the library's loop (`perceiver_stream.train.fit`) through two phases:

* main, ``train.steps`` steps: flow EPE (or ``train.flow_loss``'s term) + label cross-entropy (the label loss from step
  ``train.label_start`` on) under modality dropout, on every parameter but the ``labels.pool``
  reads (their gates stay shut). A batch is ``batch_size`` *lanes*: each lane walks ``train.chain``
  consecutive windows of one stream, the latent state carried as in the pipeline, then jumps to a
  random window of another stream (`lane_plan`); modality dropout is drawn once per chain
  (`ChainDropout`), as a stream without a sensor lacks it in every window. Short chains keep a
  batch's windows from many streams and times.
* pool, ``train.pool_steps`` steps: the ``labels.pool`` reads alone, the rest frozen (`PoolPhase`).

The batch order is a function of ``(step, train seeds)``, so a resumed run sees the batches the
interrupted one would have seen. Checkpoints: every ``checkpoint_every`` steps and at the end of
each phase to ``<output>/_checkpoints/train/step-NNNNNNN/`` (safetensors + config JSON + optimiser
state); a run of the same config resumes from the latest and refuses one whose model, seeds, data
or optimisation settings differ; a run without resume first deletes the earlier run's. At the end
the model goes to ``train.checkpoint`` (metadata: seeds, content digests of the files, class
names, data settings) and is evaluated on the config's held-out synthetic streams and ``eval.data``.
Parameters that ``train.freeze`` names stay fixed in every phase.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from jobs.datasets import data_settings, heldout_windows, synthetic_stream
from jobs.evaluate import evaluate_files, evaluate_model
from jobs.files_dataset import file_streams
from jobs.finetune import class_names, flow_term, frozen, inherited_data, initial_model
from perceiver_stream.batch import Batch
from perceiver_stream.checkpoint import load_checkpoint, read_config, save_checkpoint
from perceiver_stream.config import StreamingConfig
from perceiver_stream.multimodal import drop_modalities
from perceiver_stream.streaming import StreamingPerceiverIO
from perceiver_stream.train import FlowTerm, Phase, PooledBatch, PooledLabelObjective, SupervisedObjective, fit
from pipeline.collate import collate
from pipeline.config import Config, DataConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.window import Window

TRAIN_CHECKPOINTS = Path("_checkpoints") / "train"
OPTIMIZER = "optimizer.pt"


# ---- the main phase's batches -----------------------------------------------------------------


def lane_plan(lengths: list[int], batch_size: int, seed: int, chain: int) -> Iterator[list[tuple[int, int]]]:
    """Endless ``[(stream, window index), ...]`` batches of ``batch_size`` lanes over streams of
    ``lengths`` windows: each lane walks ``chain`` consecutive windows of one stream from a random
    start (fewer at the stream's end), then draws a new stream and start. No two lanes hold the
    same stream while there are enough streams; the lanes' first chains are cut short by
    different amounts so that their restarts spread evenly over the steps."""
    rng = np.random.default_rng([seed, 1])
    lanes: list[list[int]] = []  # [stream, window index, windows left in the chain]

    def draw(left: int) -> list[int]:
        busy = {lane[0] for lane in lanes}
        free = [s for s in range(len(lengths)) if s not in busy and lengths[s] > 0] or [
            s for s in range(len(lengths)) if lengths[s] > 0
        ]
        s = free[int(rng.integers(len(free)))]
        return [s, int(rng.integers(lengths[s])), left]

    for i in range(batch_size):
        lanes.append(draw(chain - i % chain))
    while True:
        yield [(s, t) for s, t, _ in lanes]
        for i, (s, t, left) in enumerate(lanes):
            if left > 1 and t + 1 < lengths[s]:
                lanes[i] = [s, t + 1, left - 1]
            else:
                lanes[i] = draw(chain)  # the lane's own stream is still busy: it moves to another


class ChainDropout:
    """Modality dropout with probability ``p``, drawn once per lane chain.

    ``dropout(batch, places)`` drops modalities from ``batch``, whose row ``i`` is window
    ``places[i] = (stream, window index)`` of lane ``i``: a lane that goes on to the next window of
    its stream keeps its draws (the carried state holds no evidence of a dropped modality), a lane
    that starts a new chain gets new ones.
    """

    def __init__(self, p: float, generator: torch.Generator) -> None:
        self.p = p
        self.generator = generator
        self._places: list[tuple[int, int]] = []
        self._draws: dict[str, torch.Tensor] = {}  # modality -> each lane's draw

    def __call__(self, batch: Batch, places: list[tuple[int, int]]) -> Batch:
        for name in batch.modalities:
            if name not in self._draws:
                self._draws[name] = torch.rand(len(places), generator=self.generator)
        for i, (s, t) in enumerate(places):
            if self._places and self._places[i] != (s, t - 1):
                for d in self._draws.values():
                    d[i] = torch.rand((), generator=self.generator)
        self._places = list(places)
        draws = torch.stack([self._draws[k] for k in batch.modalities], dim=1)
        return drop_modalities(batch, self.p, draws=draws)


def lane_batches(
    streams: list[list[Window]], tc: TrainConfig, video_frames: int | None, start: int
) -> Iterator[Batch]:
    """The main phase's collated batches from step ``start`` on, under `ChainDropout` (its draws
    seeded by ``start``)."""
    plan = lane_plan([len(s) for s in streams], tc.batch_size, seed=tc.seeds[0] if tc.seeds else 0, chain=tc.chain)
    for _ in range(start):
        next(plan)
    dropout = ChainDropout(tc.modality_dropout, torch.Generator().manual_seed(start))
    for places in plan:
        yield dropout(collate([streams[s][t] for s, t in places], video_frames=video_frames), places)


# ---- the pool phase ---------------------------------------------------------------------------


class PoolPhase:
    """The pool phase's data: each training window's latent label read
    (`StreamingPerceiverIO.latent_label_read` of the frozen model, without state), computed once
    for each modality that no ``labels.pool`` read takes, with that modality dropped.

    ``reads`` is ``windows x len(others) x C``, ``labels`` ``windows``. `batches` then draws
    windows and which modality each lacks; `PooledLabelObjective` runs only the pooled reads on
    them, so the frozen model runs once per window and modality, not once per step.
    """

    def __init__(
        self, model: StreamingPerceiverIO, windows: list[Window], video_frames: int | None, *,
        progress: bool = True, chunk: int = 64,
    ) -> None:
        self.windows, self.video_frames = windows, video_frames
        self.pooled = list(model.config.labels.pool)
        self.others = [k for k in model.config.modalities if k not in self.pooled]
        if not self.others:
            raise ConfigError("train.pool_steps: the pool phase needs a modality that no labels.pool read takes")
        reads, labels = [], []
        model.eval()
        with torch.no_grad():
            for i in tqdm(range(0, len(windows), chunk), desc="pool phase: reading windows", unit="chunk",
                          disable=not progress):
                batch = collate(windows[i : i + chunk], video_frames=video_frames)
                reads.append(torch.stack([model.latent_label_read(_drop(batch, k)) for k in self.others], dim=1))
                labels.append(batch.targets.label.cpu())
        self.reads = torch.cat(reads)
        self.labels = torch.cat(labels)
        self.labelled = (self.labels >= 0).nonzero().squeeze(1)
        if self.labelled.numel() == 0:
            raise ConfigError("train.pool_steps: the training windows carry no labels")

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[PooledBatch]:
        """Endless batches of ``batch_size`` drawn (labelled window, lacking modality) pairs."""
        while True:
            rows = self.labelled[torch.randint(self.labelled.numel(), (batch_size,), generator=generator)]
            lack = torch.randint(len(self.others), (batch_size,), generator=generator)
            batch = collate([self.windows[i] for i in rows.tolist()], video_frames=self.video_frames,
                            only=self.pooled)
            yield PooledBatch(batch, self.reads[rows, lack], self.labels[rows])


def _drop(batch: Batch, name: str) -> Batch:
    """``batch`` with modality ``name`` absent from every row."""
    if name not in batch.modalities:
        return batch
    m = batch.modalities[name]
    return replace(batch, modalities={**batch.modalities, name: replace(m, present=torch.zeros_like(m.present))})


def _optimizer(model: StreamingPerceiverIO, tc: TrainConfig, *, pool_phase: bool) -> torch.optim.Optimizer:
    """AdamW over the parameters a phase trains: all but the ``labels.pool`` reads, or in the pool
    phase those reads alone (the rest frozen); never those ``train.freeze`` names."""
    pool = {id(p) for p in model.pool_parameters()}
    fixed = frozen(model, tc.freeze)
    params = [p for p in model.parameters() if (id(p) in pool) == pool_phase and id(p) not in fixed]
    if not params:
        raise ConfigError(f"train.freeze {tc.freeze} leaves the {'pool' if pool_phase else 'main'} phase "
                          "nothing to train")
    for p in model.parameters():
        p.requires_grad_((not pool_phase or id(p) in pool) and id(p) not in fixed)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


def phases(
    model: StreamingPerceiverIO, tc: TrainConfig, streams: list[list[Window]], video_frames: int | None,
    *, start: int, resumed: Path | None, progress: bool, flow_loss: FlowTerm | None = None,
) -> Iterator[Phase]:
    """The phases left from step ``start`` on, each built when the one before has ended (the pool
    phase reads the windows with the main phase's weights). ``resumed``: the checkpoint whose
    optimiser state continues (a pool phase resumed at its first step starts afresh). ``flow_loss``:
    the main phase's flow objective without truth (`jobs.finetune.flow_term`)."""
    if start < tc.steps:
        opt = _optimizer(model, tc, pool_phase=False)
        if resumed is not None:
            opt.load_state_dict(torch.load(resumed / OPTIMIZER, weights_only=True))
        objective = SupervisedObjective(model, flow_weight=tc.flow_weight, label_weight=tc.label_weight,
                                        label_start=tc.label_start, carry_state=tc.carry_state,
                                        flow_term=flow_loss)
        yield Phase("main", 0, tc.steps, lane_batches(streams, tc, video_frames, start), objective, opt, tc.lr,
                    warmup_steps=tc.warmup_steps, grad_clip=tc.grad_clip)
    if tc.pool_steps and start < tc.steps + tc.pool_steps:
        opt = _optimizer(model, tc, pool_phase=True)
        if resumed is not None and start > tc.steps:
            opt.load_state_dict(torch.load(resumed / OPTIMIZER, weights_only=True))
        pool = PoolPhase(model, [w for s in streams for w in s], video_frames, progress=progress)
        # Its own draws, seeded by where it starts: a run resumed at ``steps`` repeats a fresh one.
        generator = torch.Generator().manual_seed(max(start, tc.steps))
        yield Phase("pool", tc.steps, tc.pool_steps, pool.batches(tc.pool_batch_size, generator),
                    PooledLabelObjective(model), opt, tc.lr)


# ---- checkpoints ------------------------------------------------------------------------------


def _latest(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / OPTIMIZER).is_file() and (p / "config.json").is_file())
    return done[-1] if done else None


_RESUME_FIXED = ("batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "modality_dropout",
                 "flow_weight", "label_weight", "label_start", "carry_state", "chain", "init", "freeze",
                 "flow_loss", "flow_teacher")


def _differences(new: dict[str, Any], old: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the options that differ between two nested config dicts."""
    nested = [k for k in new if isinstance(new[k], dict) and isinstance(old.get(k), dict)]
    return sorted([d for k in nested for d in _differences(new[k], old[k], f"{prefix}{k}.")]
                  + [prefix + k for k in new.keys() | old.keys() if k not in nested and new.get(k) != old.get(k)])


def _check_resumable(path: Path, config: StreamingConfig, meta: dict[str, Any]) -> None:
    saved, saved_meta = read_config(path)
    diffs = _differences(config.to_dict(), saved.to_dict())
    diffs += [k for k in ("train_seeds", "seconds", "data", "train_files") if saved_meta.get(k) != meta.get(k)]
    # A run resumed under another optimisation would be neither run; only its length may change.
    saved_train = saved_meta.get("train", {})
    diffs += [f"train.{k}" for k in _RESUME_FIXED if k in saved_train and saved_train[k] != meta["train"][k]]
    if saved_meta.get("step", 0) > saved_train.get("steps", 0) and saved_train.get("steps") != meta["train"]["steps"]:
        diffs.append("train.steps (the pool phase has begun)")
    if diffs:
        raise ConfigError(
            f"checkpoint {path} was trained with different {diffs}; train into a new output.dir "
            "or pass resume=False (--no-resume) to start afresh",
            source=str(path),
        )


def _save(path: Path, model: StreamingPerceiverIO, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, meta)
    torch.save(opt.state_dict(), tmp / OPTIMIZER)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


# ---- the job ----------------------------------------------------------------------------------


def eval_seeds(cfg: Config) -> list[int]:
    """The seeds of the config's synthetic streams (the held-out streams of the final evaluation)."""
    return [s.synthetic.seed for s in cfg.streams if s.synthetic is not None]


def train_job(cfg: Config, *, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train per ``cfg.train`` (see the module docstring); returns a JSON-ready summary: the final
    checkpoint path, steps, the step resumed from, timings, mean losses of the first and last 20
    steps and the final evaluation of each held-out stream (and of ``eval.data``). Raises
    ConfigError for held-out seeds that are also training seeds, a pool phase without pooled
    reads, a checkpoint it cannot resume, a bad label table or ``train.freeze`` name."""
    tc = cfg.train
    init_seeds, init_files = inherited_data(cfg)
    overlap = sorted(set(eval_seeds(cfg)) & (set(tc.seeds) | set(init_seeds)))
    if overlap:
        raise ConfigError(f"streams: seeds {overlap} are also train.seeds (or the train.init checkpoint's); "
                          "evaluation streams must be held out")
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    classes = class_names(cfg)
    model, fresh = initial_model(cfg, classes)
    config = model.config
    out_dir = Path(cfg.output.dir)
    ckpt_dir = out_dir / TRAIN_CHECKPOINTS
    final_path = Path(tc.checkpoint) if tc.checkpoint else out_dir / "checkpoint"
    meta: dict[str, Any] = {
        "train_seeds": sorted(set(tc.seeds) | set(init_seeds)),
        "seconds": tc.seconds,
        "data": data_settings(cfg),
        "class_names": list(classes),
        "train": tc.model_dump(mode="json", exclude={"checkpoint"}),
    }
    frozen(model, tc.freeze)  # a bad name fails before any decoding
    if tc.pool_steps and not model.pool_parameters():
        raise ConfigError("train.pool_steps trains the model's labels.pool reads, but train.model has none; "
                          "set train.model.labels.pool or train.pool_steps: 0")
    frames = config.video_frames
    t0 = time.perf_counter()
    files = None
    if isinstance(tc.data, DataConfig):
        files = file_streams(tc.data, meta["data"], out_dir, video_frames=frames, classes=classes, progress=progress)
        meta["train_files"] = sorted(set(files.digests.values()) | set(init_files))
    elif init_files:
        meta["train_files"] = sorted(init_files)
    total = tc.steps + tc.pool_steps
    start = 0
    if not resume:
        # A fresh run's checkpoints replace an earlier run's: left there, a longer earlier run's
        # would sort after them, outlive them in the rotation and be what a later resume found.
        for old in ckpt_dir.glob("step-*"):
            shutil.rmtree(old, ignore_errors=True)
    latest = _latest(ckpt_dir) if resume else None
    if latest is not None:
        _check_resumable(latest, config, meta)
        model, saved = load_checkpoint(latest)
        start = int(saved["step"])

    seeds = tqdm(tc.seeds, desc="rendering synthetic streams", unit="stream", disable=not progress)
    streams = [synthetic_stream(cfg, s, tc.seconds, video_frames=frames) for s in seeds]
    streams += files.streams if files is not None else []
    render_s = time.perf_counter() - t0

    history: list[dict[str, float]] = []
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not progress)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        history.append({k: v for k, v in metrics.items() if k != "lr"})
        bar.update(1)
        bar.set_postfix({k: f"{np.mean([h.get(k, np.nan) for h in history[-20:]]):.3f}" for k in history[-1]})

    def checkpoint(step: int, phase: Phase) -> None:
        _save(ckpt_dir / f"step-{step:07d}", model, phase.optimizer, {**meta, "step": step, "recent": _recent(history)})
        for old in sorted(ckpt_dir.glob("step-*"))[: -tc.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    t1, cpu1 = time.perf_counter(), time.process_time()
    run = phases(model, tc, streams, frames, start=start, resumed=latest, progress=progress,
                 flow_loss=flow_term(cfg, model))
    fit(model, run, start=start, callback=on_step, checkpoint=checkpoint, checkpoint_every=tc.checkpoint_every)
    bar.close()
    train_s, train_cpu_s = time.perf_counter() - t1, time.process_time() - cpu1

    final_meta = {**meta, "step": total}
    save_checkpoint(final_path, model, final_meta)
    results: dict[str, Any] = {}
    # Synthetic held-out streams score a model of the rig's classes: one trained on seeds.
    heldout = eval_seeds(cfg) if tc.final_eval and tc.seeds else []
    for seed in tqdm(heldout, desc="evaluating", unit="seed", disable=not progress):
        windows = heldout_windows(meta["data"], seed, tc.eval_windows, video_frames=frames)
        results[str(seed)] = {"all": evaluate_model(model, windows)}
        if seed == heldout[0]:
            for name in config.modalities:
                results[str(seed)][f"drop_{name}"] = evaluate_model(model, windows, drop=name)
    if tc.final_eval and isinstance(cfg.eval.data, DataConfig):
        results["eval.data"] = evaluate_files(final_path, cfg.eval.data, out_dir, progress=progress)
    summary = {
        "checkpoint": str(final_path),
        "steps": total,
        "resumed_from": start,
        "params": sum(p.numel() for p in model.parameters()),
        "new_weights": len(fresh) if tc.init is not None else None,
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
        "s_per_step": round(train_s / max(1, total - start), 4),
        "cpu_s_per_step": round(train_cpu_s / max(1, total - start), 4),
        "first_loss": _recent(history[:20]),
        "last_loss": _recent(history),
        "eval": results,
    }
    if results:
        save_checkpoint(final_path, model, {**final_meta, "eval": results})
    return summary


def _recent(history: list[dict[str, float]], n: int = 20) -> dict[str, float]:
    """Mean of each loss term over the last ``n`` steps."""
    tail = history[-n:]
    keys = sorted({k for h in tail for k in h})
    return {k: round(float(np.nanmean([h.get(k, np.nan) for h in tail])), 4) for k in keys}
