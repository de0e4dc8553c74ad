"""The YAML configuration schema (DESIGN.md "Configuration"), validated at load.

`load_config(path, overrides)` reads a YAML file, applies ``--set dotted.key=value`` overrides
(values parsed as YAML scalars or flow collections; list items by index, e.g.
``streams.0.synthetic.seed=3``), validates the result and resolves relative paths (stream
sources, checkpoints, the output folder) against the config file's folder. Every problem raises
`pipeline.errors.ConfigError` with a one-line message that names the key and the problem; unknown
keys are errors, so a typo never silently falls back to a default.

A string value's ``${NAME}`` is replaced by that environment variable (`pipeline.envvars`).

`config_hash(cfg)` is a short stable digest of everything that can change an output row, written
into the Parquet file metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.envvars import Key, restore_templates, substitute_env
from pipeline.errors import ConfigError
from pipeline.overrides import apply_override, first_line, validation_message
from pipeline.redact import redact_data
from pipeline.sources.policy import is_device

# A stream id becomes a hive folder name (`stream_id=<id>`): keep it path-safe, and never
# starting with "_" or "." (readers skip such names).
_STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Section(BaseModel):
    """Base of every section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """A stream from the seeded synthetic sensor rig (`pipeline.sources.synthetic.SyntheticRig`)."""

    seed: int
    seconds: float = Field(30.0, gt=0)
    fps: float = Field(25.0, gt=0, description="frames per second the rig renders")
    scan_rate: float = Field(10.0, gt=0, description="point-cloud scans per second")
    segment_seconds: float = Field(4.0, gt=0, description="how long one scene (one label) lasts")
    objects: int = Field(3, ge=1, le=8, description="moving objects per scene")


class StreamConfig(_Section):
    """One sensor rig: file/URL sources, or a synthetic rig."""

    id: str = Field(pattern=_STREAM_ID_PATTERN)
    video: str | None = None
    audio: str | None = None  # "same" = the video's audio track
    points: str | None = None  # a scan file or a folder of scans
    synthetic: SyntheticConfig | None = None
    # The Ray node the sensor is attached to (a node id, a node IP, or a custom resource only that
    # node has): the stream is decoded there. None: any node.
    node: str | None = Field(None, min_length=1)
    # live: is an end of data a drop to reconnect (True) or the stream's end (False)? None: by the
    # source (`pipeline.sources.policy`). format/options: FFmpeg's, for the video source (the audio
    # one without video), e.g. format v4l2 for /dev/video0, options {rtsp_transport: tcp}.
    live: bool | None = None
    format: str | None = Field(None, min_length=1)
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sources_are_consistent(self) -> "StreamConfig":
        media = [k for k, v in (("live", self.live), ("format", self.format), ("options", self.options)) if v]
        if media and self.video is None and self.audio is None:
            raise ValueError(f"{'/'.join(media)} apply to a video or audio source, and this stream has none")
        if self.synthetic is not None:
            given = [k for k in ("video", "audio", "points") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"a synthetic stream takes no {'/'.join(given)} source")
        elif self.video is None and self.audio is None and self.points is None:
            raise ValueError("needs at least one of video, audio, points or synthetic")
        if self.audio == "same" and self.video is None:
            raise ValueError("audio: same needs a video source")
        return self


class WindowConfig(_Section):
    """Window length and hop in media seconds."""

    seconds: float = Field(1.0, gt=0)
    hop: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _hop_fits(self) -> "WindowConfig":
        if self.seconds < self.hop:
            raise ValueError(f"seconds ({self.seconds}) must be >= hop ({self.hop})")
        return self


class VideoConfig(_Section):
    """Decode-time resize ``[H, W]`` (None = native size) and frame-rate decimation (None = all)."""

    size: tuple[int, int] | None = None
    fps: float | None = Field(None, gt=0)

    @field_validator("size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and (v[0] < 1 or v[1] < 1):
            raise ValueError(f"size must be two positive integers [H, W], got {list(v)}")
        return v


class AudioConfig(_Section):
    """Output sample rate and channel count (PyAV's resampler converts to these)."""

    rate: int = Field(16000, gt=0)
    channels: int = Field(1, ge=1, le=8)


class SourcesConfig(_Section):
    """Timeouts and reconnect policy for file and live sources."""

    open_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0)
    reconnect_tries: int | None = Field(5, ge=0, description="null: retry for ever")
    reconnect_backoff_s: float = Field(1.0, ge=0)
    # How long a stream pinned to a node (streams[].node) waits for that node to come back once
    # no source actor is left on it, before the stream fails.
    node_wait_s: float = Field(300.0, ge=0)
    max_backoff_s: float = Field(30.0, ge=0, description="the doubling wait between attempts stops growing here")


class ModelConfig(_Section):
    """The model the pipeline runs and how the model actor batches."""

    checkpoint: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(8, ge=1)
    max_wait_ms: float = Field(50.0, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    state: bool = True
    student: str | None = None  # run on a distilled student checkpoint instead
    # Model actors, each owning a share of the streams: auto = one per GPU of the cluster, or one
    # per node on a CPU-only cluster.
    replicas: Literal["auto"] | Annotated[int, Field(ge=1)] = 1


class RuntimeConfig(_Section):
    """Backpressure bounds, pacing, CPU priority, source processes and restarts.

    ``helper_nice`` is the Linux niceness the source and sink actors' processes take on (0 = the
    model actor's priority): they have read-ahead and buffering slack, the model has none, so where
    they share cores with it the model goes first. ``source_actors`` is how many source pool
    actors (processes) decode the streams, each hosting many: ``auto`` = the cluster's CPUs less
    the model replicas', at least one, at most one per stream. ``max_restarts_per_hour`` is how often any
    one actor (model, source pool) may be restarted within an hour before the run gives it up.
    ``schedule_timeout_s`` is how long an actor may take to be placed on a node and answer at the
    start of a run before the run ends (exit 1) naming it and what it asked for.
    """

    max_in_flight_per_stream: int = Field(4, ge=1)
    max_in_flight: int = Field(32, ge=1)
    realtime: bool = False
    helper_nice: int = Field(10, ge=0, le=19)
    source_actors: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    max_restarts_per_hour: int = Field(10, ge=0)
    schedule_timeout_s: float = Field(60.0, gt=0)
    max_lag_s: float | None = Field(None, gt=0, description="a live stream further behind skips to its live edge")


class DistillConfig(_Section):
    """Online distillation of a smaller student from the running model (`actors.distill.DistillActor`).

    ``student`` holds overrides of the teacher's model config (fewer latents / layers; empty =
    `perceiver_stream.student.student_config`'s defaults), checked by the model library when the
    student is built. The loss is ``embedding_weight * (1 - cosine)`` on embeddings +
    ``label_weight * KL`` of label scores at ``temperature`` + ``flow_weight * L1`` to the
    teacher's flow. A step is taken on every ``every_windows``-th batch; a student checkpoint is
    written to ``<output>/_checkpoints/`` every ``checkpoint_every`` steps and at the end.
    With ``modality_dropout`` p > 0 the student sees each modality of a stream dropped with
    probability p, drawn per stream for ``dropout_windows`` windows at a time (its state reset at
    each new draw), and still learns the teacher's outputs on the whole window: the student then
    answers when a sensor is missing, as the teacher, trained with modality dropout, does.
    """

    enabled: bool = False
    student: dict[str, Any] = Field(default_factory=dict)
    every_windows: int = Field(1, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0)
    temperature: float = Field(2.0, gt=0)
    embedding_weight: float = Field(1.0, ge=0)
    label_weight: float = Field(1.0, ge=0)
    flow_weight: float = Field(0.2, ge=0)
    modality_dropout: float = Field(0.0, ge=0, lt=1)
    dropout_windows: int = Field(8, ge=1)


def student_checkpoint_path(output_dir: str | Path) -> Path:
    """Where a run keeps its latest distilled student: ``<output>/_checkpoints/student`` (readers of
    the output tables skip underscore names)."""
    return Path(output_dir) / "_checkpoints" / "student"


class DataConfig(_Section):
    """Recorded streams to train or evaluate on (`jobs.files_dataset`): ``streams`` exactly as the
    top-level ``streams`` list, and ``labels``, a CSV or Parquet table ``stream_id, t_start, t_end,
    label`` (media seconds; None: no labels). A window takes the label that covers more than half
    of it, or none."""

    streams: list[StreamConfig] = Field(min_length=1)
    labels: str | None = None

    @field_validator("streams")
    @classmethod
    def _unique_ids(cls, v: list[StreamConfig]) -> list[StreamConfig]:
        ids = [s.id for s in v]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"stream ids {twice} are used twice")
        return v


class TrainConfig(_Section):
    """`run_pipeline.py train`: synthetic seeds, recorded files, optimisation and the model to build.

    ``seeds`` are the synthetic rigs trained on (``seconds`` long each); the config's synthetic
    ``streams`` are the held-out streams of the final evaluation (they must not share a seed).
    ``model`` holds overrides of the model library's config (validated there; ``flow.size``
    defaults to ``video.size``, the class names are the rig's). ``checkpoint`` is where the
    trained checkpoint is written (default ``<output>/checkpoint``); periodic checkpoints with
    optimiser state go to ``<output>/_checkpoints/train/`` and a new run resumes from the latest
    (refused if the model, data or optimisation settings differ; ``steps`` may grow).
    ``final_eval`` evaluates the result on the held-out synthetic streams (``eval_windows`` windows each;
    only when ``seeds`` trains on the rig) and on ``eval.data``.
    ``label_start``: the label loss joins the flow loss from this step on (0 = from the start).
    ``chain`` is how many consecutive windows a batch lane walks (carrying the latent state when
    ``carry_state``) before it jumps to a random window of another stream.
    ``pool_steps``: after ``steps``, this many steps of ``pool_batch_size`` windows train the model's
    ``labels.pool`` reads alone (the rest frozen) on the label loss, each window lacking one other
    modality (`jobs.train.PoolPhase`).
    ``data``: recorded streams trained on besides the seeds (``seeds: []`` for files alone); the
    class names are then the label table's. ``init``: a checkpoint to start from (its model config,
    ``model`` overrides deep-merged into it, e.g. ``{labels: {from_flow: true}}``); ``freeze``:
    parameter-name prefixes kept fixed (``encoder``, ``flow``, ``preprocess.video``...). ``flow_loss``: ``truth`` (EPE to the known flow),
    ``photometric`` (self-supervised: census, smoothness, occlusion mask; no truth read) or
    ``teacher`` (EPE to the flow of checkpoint ``flow_teacher``); ``smooth_weight``: the weight
    of ``photometric``'s edge-aware smoothness term against its census term.
    """

    seeds: list[int] = Field(default_factory=lambda: list(range(16)))
    data: DataConfig | str | None = None
    init: str | None = None
    freeze: list[str] = Field(default_factory=list)
    flow_loss: Literal["truth", "photometric", "teacher"] = "truth"
    flow_teacher: str | None = None
    smooth_weight: float = Field(1.0, ge=0)
    seconds: float = Field(30.0, gt=0)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    modality_dropout: float = Field(0.0, ge=0, lt=1)
    flow_weight: float = Field(1.0, ge=0)
    label_weight: float = Field(1.0, ge=0)
    label_start: int = Field(0, ge=0)
    carry_state: bool = True
    chain: int = Field(4, ge=1)
    pool_steps: int = Field(0, ge=0)
    pool_batch_size: int = Field(128, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_windows: int = Field(200, ge=200)
    final_eval: bool = True
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None = torch's default)")
    checkpoint: str | None = None
    model: dict[str, Any] = Field(default_factory=dict)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _has_data(self) -> "TrainConfig":
        if not self.seeds and self.data is None:
            raise ValueError("needs at least one seed or train.data")
        if (self.flow_loss == "teacher") != (self.flow_teacher is not None):
            raise ValueError("flow_teacher (a checkpoint) is needed with flow_loss: teacher, and only then")
        return self


class EvalConfig(_Section):
    """`run_pipeline.py eval --config`: recorded streams (and labels) to score a checkpoint on."""

    data: DataConfig | str | None = None


class OutputConfig(_Section):
    """Where the Parquet tables go (a local folder or a `pyarrow.fs` URI such as ``s3://bucket/prefix``),
    how much media time one published file covers, and how long published files are kept."""

    dir: str = "outputs"
    publish_every_s: float = Field(3600.0, gt=0, description="media seconds per published file (per table, stream)")
    retain_days: float | None = Field(None, gt=0, description="delete published periods this many days of media "
                                      "time older than a stream's latest window; null keeps all")


class Config(_Section):
    """The whole configuration (DESIGN.md "Configuration")."""

    streams: list[StreamConfig] = Field(min_length=1)
    window: WindowConfig = Field(default_factory=WindowConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # The strings that held ``${NAME}`` before substitution, by their place (`pipeline.envvars`).
    _env_templates: dict[Key, str] = PrivateAttr(default_factory=dict)

    @field_validator("streams")
    @classmethod
    def _unique_ids(cls, v: list[StreamConfig]) -> list[StreamConfig]:
        seen: set[str] = set()
        for s in v:
            if s.id in seen:
                raise ValueError(f"stream id {s.id!r} is used twice")
            seen.add(s.id)
        return v

    @property
    def env_templates(self) -> dict[Key, str]:
        """The original of each string value that held ``${NAME}``, by its place in the config."""
        return dict(self._env_templates)

    def stream(self, stream_id: str) -> StreamConfig:
        """The stream with this id (KeyError if none)."""
        for s in self.streams:
            if s.id == stream_id:
                return s
        raise KeyError(stream_id)


def _is_url(value: str) -> bool:
    return "://" in value


def _resolve(value: str | None, base: Path) -> str | None:
    """A path relative to the config folder made absolute; URLs and "same" pass through."""
    if value is None or value == "same" or _is_url(value):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def parse_config(data: dict[str, Any], *, base_dir: Path | str = ".", source: str = "<config>") -> Config:
    """Validate raw config data (``${NAME}`` substituted from the environment) and resolve its
    relative paths against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data, templates = substitute_env(data)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(validation_message(e), source=source) from None
    cfg._env_templates = templates
    base = Path(base_dir).resolve()
    _resolve_streams(cfg.streams, base)
    cfg.model.checkpoint = _resolve(cfg.model.checkpoint, base)
    cfg.model.student = _resolve(cfg.model.student, base)
    cfg.train.checkpoint = _resolve(cfg.train.checkpoint, base)
    cfg.train.init = _resolve(cfg.train.init, base)
    cfg.train.flow_teacher = _resolve(cfg.train.flow_teacher, base)
    for section in (cfg.train, cfg.eval):
        if isinstance(section.data, str):
            section.data = _data_file(Path(_resolve(section.data, base)))
        elif section.data is not None:
            _resolve_streams(section.data.streams, base)
            section.data.labels = _resolve(section.data.labels, base)
    cfg.output.dir = _resolve(cfg.output.dir, base) or cfg.output.dir
    return cfg


def _data_file(path: Path) -> DataConfig:
    """The `DataConfig` in YAML file ``path``, its paths resolved against the file's folder."""
    try:
        raw = yaml.safe_load(path.read_text())
        data = DataConfig.model_validate(raw)
    except OSError as e:
        raise ConfigError(f"data file cannot be read: {e.strerror}", source=str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {first_line(e)}", source=str(path)) from None
    except ValidationError as e:
        raise ConfigError(validation_message(e), source=str(path)) from None
    _resolve_streams(data.streams, path.parent)
    data.labels = _resolve(data.labels, path.parent)
    return data


def _resolve_streams(streams: list[StreamConfig], base: Path) -> None:
    for s in streams:
        if not is_device(s.format):  # a device name ("hw:0", "default") is not a path
            s.video = _resolve(s.video, base)
            s.audio = _resolve(s.audio, base)
        s.points = _resolve(s.points, base)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override, validate and resolve a YAML config file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {first_line(e)}", source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping, got {type(data).__name__}", source=str(path))
    for ov in overrides:
        apply_override(data, ov)
    return parse_config(data, base_dir=path.parent, source=str(path))


def config_hash(cfg: Config) -> str:
    """A 16-hex-digit digest of the config, stable across runs and key order.

    The ``output`` and ``runtime`` sections are left out: where outputs go and how fast windows
    flow do not change any row. It digests the config as saved (``${NAME}`` kept, URLs redacted),
    so that it reveals nothing of a password.
    """
    data = redact_data(restore_templates(cfg.model_dump(mode="json", exclude={"output", "runtime"}), cfg.env_templates))
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
