"""`run_pipeline.py train`: train the fused model on the synthetic rig, with checkpoints and resume.

`train_job(cfg)` renders one synthetic stream per seed of ``cfg.train.seeds`` through the same
windower as the pipeline (`pipeline.read.open_stream`), keeps each window's last frames, audio,
points and truth in memory (rendering costs about a second per 30 s stream, far less than
training on it, so nothing is written to disk), and trains with `perceiver_stream.train.losses`
(flow EPE + label cross-entropy) under modality dropout. The label loss can join late
(``train.label_start``): trained together from the first step, the labels' gradients kept the
shared latents from ever learning the camera's pan (held-out background EPE stuck near 0.4 px),
while 400 flow-only steps first brought it to 0.12 px within 200 steps of the labels joining.

Batches are ``batch_size`` *lanes*: each lane walks a chain of ``train.chain`` consecutive windows
of one stream, so batch ``t+1`` holds the successors of most of batch ``t``'s windows and the
latent state is carried as in the pipeline (one-step truncated backpropagation through time),
then jumps to a random window of another stream (a new chain, the state reset). Modality
dropout is drawn once per chain, so a modality dropped from a chain is missing from all of its
windows, as from a stream without that sensor (what `eval --drop` measures): drawn per window,
the state carried from the window before still held the dropped modality's evidence. Short chains
keep a batch's windows from many streams and times: walking the same 16 streams for a whole
stream at a time made consecutive batches so alike that flow barely trained (a training EPE of
0.80-0.86 px after 2750 steps, where a trial on independent windows reached a held-out 0.61 px
in 400). The order is a function of ``(step, train seeds)``, so a resumed run sees the batches
the interrupted one would have seen.

After ``train.steps``, ``train.pool_steps`` more train the model's ``labels.pool`` reads alone, the
rest frozen (`PoolPhase`); the main steps never touch them, so their gates stay shut until then.

Checkpoints: every ``checkpoint_every`` steps to ``<output>/_checkpoints/train/step-NNNNNNN/``
(safetensors + config JSON, plus the optimiser state); a new run of the same config resumes from
the latest, and refuses one whose model, seeds or data settings differ; a run without resume
deletes the earlier run's periodic checkpoints first. At the end the model is
written to ``train.checkpoint`` with the training seeds, class names and data settings in its
metadata, then evaluated on the config's (held-out) synthetic streams.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perceiver_stream.batch import Batch
from perceiver_stream.checkpoint import load_checkpoint, read_config, save_checkpoint
from perceiver_stream.multimodal import drop_modalities
from perceiver_stream.streaming import StreamingConfig, StreamingPerceiverIO, StreamStates
from perceiver_stream.train import label_loss, losses
from pipeline.collate import collate
from pipeline.config import Config, StreamConfig, SyntheticConfig
from pipeline.errors import ConfigError
from pipeline.read import open_stream
from pipeline.window import Window

TRAIN_CHECKPOINTS = Path("_checkpoints") / "train"
OPTIMIZER = "optimizer.pt"


# ---- data -------------------------------------------------------------------------------------


def data_settings(cfg: Config) -> dict[str, Any]:
    """What shapes the windows a model sees (stored in checkpoints so evaluation can match it)."""
    return {
        "window": cfg.window.model_dump(mode="json"),
        "video": {"size": list(cfg.video.size or (64, 64)), "fps": cfg.video.fps},
        "audio": cfg.audio.model_dump(mode="json"),
    }


def settings_config(data: dict[str, Any], streams: list[dict[str, Any]]) -> Config:
    """A `Config` with ``data``'s window / video / audio settings and ``streams``."""
    return Config.model_validate({"streams": streams, **data})


def video_frames_needed(config: StreamingConfig) -> int | None:
    """How many trailing frames of a window the model reads (None = all of them)."""
    return config.video_frames


def points_needed(config: StreamingConfig) -> tuple[int | None, int] | None:
    """``(scans, max_points)`` of the model's ``points`` adapter: it reads at most ``max_points``
    points of each window's last ``scans`` scans (None = all scans); None without one."""
    return config.points


def compact(window: Window, video_frames: int | None) -> Window:
    """``window`` keeping only its last ``video_frames`` frames, copied out of the windower's slabs."""
    if window.video is None or video_frames is None:
        return window
    return replace(window, video=window.video[-video_frames:].copy(), video_t=window.video_t[-video_frames:].copy())


def synthetic_stream(
    cfg: Config, seed: int, seconds: float, *, video_frames: int | None, stream_id: str | None = None
) -> list[Window]:
    """Every window of the synthetic rig ``seed`` (``seconds`` long) under ``cfg``'s settings."""
    spec = StreamConfig(id=stream_id or f"seed{seed}", synthetic=SyntheticConfig(seed=seed, seconds=seconds))
    return [compact(w, video_frames) for w in open_stream(spec, cfg)]


def lane_plan(lengths: list[int], batch_size: int, seed: int, chain: int) -> Iterator[list[tuple[int, int]]]:
    """Endless ``[(stream, window index), ...]`` batches of ``batch_size`` *lanes*: each lane walks
    ``chain`` consecutive windows of one stream from a random start (fewer at the stream's end),
    then draws a new stream and start (see the module docstring). No two lanes hold the same
    stream while there are enough streams, and the lanes' first chains are cut short by different
    amounts so that their restarts spread evenly over the steps."""
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
    """Modality dropout drawn once per lane chain (see the module docstring).

    ``dropout(batch, places)`` drops modalities from ``batch``, whose row ``i`` is window
    ``places[i] = (stream, window index)`` of lane ``i``: a lane that goes on to the next window of
    its stream keeps its draws, a lane that starts a new chain gets new ones.
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


# ---- checkpoints ------------------------------------------------------------------------------


def _latest(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / OPTIMIZER).is_file() and (p / "config.json").is_file())
    return done[-1] if done else None


_RESUME_FIXED = ("batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "modality_dropout",
                 "flow_weight", "label_weight", "label_start", "carry_state", "chain")


def _differences(new: dict[str, Any], old: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the options that differ between two nested config dicts."""
    nested = [k for k in new if isinstance(new[k], dict) and isinstance(old.get(k), dict)]
    return sorted([d for k in nested for d in _differences(new[k], old[k], f"{prefix}{k}.")]
                  + [prefix + k for k in new.keys() | old.keys() if k not in nested and new.get(k) != old.get(k)])


def _check_resumable(path: Path, config: StreamingConfig, meta: dict[str, Any]) -> None:
    saved, saved_meta = read_config(path)
    diffs = _differences(config.to_dict(), saved.to_dict())
    diffs += [k for k in ("train_seeds", "seconds", "data") if saved_meta.get(k) != meta[k]]
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


def build_model_config(cfg: Config) -> StreamingConfig:
    """The model to train: ``train.model`` overrides, flow grid = ``video.size``, the rig's classes."""
    from pipeline.sources.synthetic import CLASSES

    overrides = dict(cfg.train.model)
    if isinstance(overrides.get("flow", {}), dict):
        overrides["flow"] = {"size": list(cfg.video.size or (64, 64)), **overrides.get("flow", {})}
    overrides["labels"] = {**overrides.get("labels", {}), "class_names": list(CLASSES)}
    try:
        return StreamingConfig.from_dict(overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.model: {e}") from None


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (the library loop's schedule, resumable at ``step``)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def eval_seeds(cfg: Config) -> list[int]:
    """The seeds of the config's synthetic streams (the held-out streams of the final evaluation)."""
    return [s.synthetic.seed for s in cfg.streams if s.synthetic is not None]


def train_job(cfg: Config, *, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train per ``cfg.train`` (see the module docstring); returns a JSON-ready summary with the
    final checkpoint path, losses, timings and the final evaluation of each held-out stream."""
    from tqdm import tqdm

    from pipeline.evaluation import evaluate_model, heldout_windows

    tc = cfg.train
    overlap = sorted(set(eval_seeds(cfg)) & set(tc.seeds))
    if overlap:
        raise ConfigError(f"streams: seeds {overlap} are also train.seeds; evaluation streams must be held out")
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    config = build_model_config(cfg)
    out_dir = Path(cfg.output.dir)
    ckpt_dir = out_dir / TRAIN_CHECKPOINTS
    final_path = Path(tc.checkpoint) if tc.checkpoint else out_dir / "checkpoint"
    meta: dict[str, Any] = {
        "train_seeds": list(tc.seeds),
        "seconds": tc.seconds,
        "data": data_settings(cfg),
        "class_names": list(config.labels.class_names),
        "train": tc.model_dump(mode="json", exclude={"checkpoint"}),
    }

    torch.manual_seed(0)
    model = StreamingPerceiverIO(config)
    if tc.pool_steps and not model.pool_parameters():
        raise ConfigError("train.pool_steps trains the model's labels.pool reads, but train.model has none; "
                          "set train.model.labels.pool or train.pool_steps: 0")
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
    opt = _optimizer(model, tc, pool_phase=tc.pool_steps > 0 and start >= tc.steps)
    if latest is not None and start != tc.steps:  # (at ``steps`` the pool phase starts afresh)
        opt.load_state_dict(torch.load(latest / OPTIMIZER, weights_only=True))

    t0 = time.perf_counter()
    frames = video_frames_needed(config)
    seeds = tqdm(tc.seeds, desc="rendering synthetic streams", unit="stream", disable=not progress)
    streams = [synthetic_stream(cfg, s, tc.seconds, video_frames=frames) for s in seeds]
    render_s = time.perf_counter() - t0
    plan = lane_plan([len(s) for s in streams], tc.batch_size, seed=tc.seeds[0], chain=tc.chain)
    for _ in range(min(start, tc.steps)):
        next(plan)
    pool: PoolPhase | None = None

    generator = torch.Generator().manual_seed(start)
    states = StreamStates()
    carry = tc.carry_state and config.state
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not progress)
    t1, cpu1 = time.perf_counter(), time.process_time()
    model.train()
    dropout = ChainDropout(tc.modality_dropout, generator)
    for step in range(start, total):
        if step == tc.steps and step > start:
            opt = _optimizer(model, tc, pool_phase=True)
        if step >= tc.steps:
            if pool is None:
                pool = PoolPhase(model, [w for s in streams for w in s], frames, progress=progress)
                # Its own draws, seeded by where it starts: a run resumed at ``steps`` repeats a fresh one.
                generator = torch.Generator().manual_seed(step)
                model.train()
            for group in opt.param_groups:
                group["lr"] = tc.lr * _schedule(step - tc.steps, tc.pool_steps, 0)
            parts = {"pool_ce": pool.loss(tc.pool_batch_size, generator)}
            loss = parts["pool_ce"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            places = next(plan)
            batch = collate([streams[s][t] for s, t in places], video_frames=frames)
            for group in opt.param_groups:
                group["lr"] = tc.lr * _schedule(step, tc.steps, tc.warmup_steps)
            batch = dropout(batch, places)
            state = None
            if carry:
                batch, state = states.gather(batch, strict=False)
            output = model(batch, state)
            parts = losses(output, batch.targets)
            zero = output.embedding.sum() * 0.0
            label_weight = tc.label_weight if step >= tc.label_start else 0.0
            loss = tc.flow_weight * parts.get("flow_epe", zero) + label_weight * label_loss(parts, zero)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            if carry:
                states.update(batch, output.state)
        history.append({"loss": loss.item(), **{k: v.item() for k, v in parts.items()}})
        bar.update(1)
        bar.set_postfix({k: f"{np.mean([h.get(k, np.nan) for h in history[-20:]]):.3f}" for k in history[-1]})
        done = step + 1
        if done % tc.checkpoint_every == 0 or done in (tc.steps, total):
            model.eval()
            _save(ckpt_dir / f"step-{done:07d}", model, opt, {**meta, "step": done, "recent": _recent(history)})
            for old in sorted(ckpt_dir.glob("step-*"))[: -tc.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            model.train()
    bar.close()
    model.eval()
    train_s, train_cpu_s = time.perf_counter() - t1, time.process_time() - cpu1

    final_meta = {**meta, "step": total}
    save_checkpoint(final_path, model, final_meta)
    results: dict[str, Any] = {}
    for seed in tqdm(eval_seeds(cfg) if tc.final_eval else [], desc="evaluating", unit="seed", disable=not progress):
        windows = heldout_windows(meta["data"], seed, tc.eval_windows, video_frames=frames)
        results[str(seed)] = {"all": evaluate_model(model, windows)}
        if seed == eval_seeds(cfg)[0]:
            for name in config.modalities:
                results[str(seed)][f"drop_{name}"] = evaluate_model(model, windows, drop=name)
    summary = {
        "checkpoint": str(final_path),
        "steps": total,
        "resumed_from": start,
        "params": sum(p.numel() for p in model.parameters()),
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


def _optimizer(model: StreamingPerceiverIO, tc: Any, *, pool_phase: bool) -> torch.optim.Optimizer:
    """AdamW over the parameters a phase trains: all but the ``labels.pool`` reads (whose gates
    stay shut), or in the pool phase those reads alone (the rest frozen)."""
    pool = {id(p) for p in model.pool_parameters()}
    params = [p for p in model.parameters() if (id(p) in pool) == pool_phase]
    for p in model.parameters():
        p.requires_grad_(not pool_phase or id(p) in pool)
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)


class PoolPhase:
    """The pool phase's data (``train.pool_steps``): each training window's latent label read
    (`StreamingPerceiverIO.latent_label_read`, frozen, without state) computed once for each
    modality that no ``labels.pool`` read takes, with that modality dropped. A step then draws
    windows and, for each, which modality it lacks, and runs only the pooled reads: the loss is
    the label cross-entropy of ``labels.head(cached read + pooled read)``, exactly the model's
    labels for that window without that modality (`eval --drop`'s case). So the pooled reads
    learn what one missing modality would have told the others, at the cost of the pooled
    modalities' adapters alone: the frozen model runs once per window and modality, not per step.
    """

    def __init__(
        self, model: StreamingPerceiverIO, windows: list[Window], video_frames: int | None, *,
        progress: bool = True, chunk: int = 64,
    ) -> None:
        from tqdm import tqdm

        self.model, self.windows, self.video_frames = model, windows, video_frames
        self.others = [k for k in model.config.modalities if k not in model.config.labels.pool]
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
        self.reads = torch.cat(reads)  # windows x others x C
        self.labels = torch.cat(labels)
        self.labelled = (self.labels >= 0).nonzero().squeeze(1)
        if self.labelled.numel() == 0:
            raise ConfigError("train.pool_steps: the training windows carry no labels")

    def loss(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The label cross-entropy of ``batch_size`` drawn (window, dropped modality) pairs."""
        rows = self.labelled[torch.randint(self.labelled.numel(), (batch_size,), generator=generator)]
        lack = torch.randint(len(self.others), (batch_size,), generator=generator)
        batch = collate([self.windows[i] for i in rows.tolist()], video_frames=self.video_frames,
                        only=self.model.config.labels.pool)
        pooled = self.model.pooled_label_read(batch)
        logits = self.model.labels.head(self.reads[rows, lack].to(pooled.device) + pooled)
        return torch.nn.functional.cross_entropy(logits.float(), self.labels[rows].to(logits.device))


def _drop(batch: Batch, name: str) -> Batch:
    """``batch`` with modality ``name`` absent from every row."""
    if name not in batch.modalities:
        return batch
    m = batch.modalities[name]
    return replace(batch, modalities={**batch.modalities, name: replace(m, present=torch.zeros_like(m.present))})


def _recent(history: list[dict[str, float]], n: int = 20) -> dict[str, float]:
    """Mean of each loss term over the last ``n`` steps."""
    tail = history[-n:]
    keys = sorted({k for h in tail for k in h})
    return {k: round(float(np.nanmean([h.get(k, np.nan) for h in tail])), 4) for k in keys}
