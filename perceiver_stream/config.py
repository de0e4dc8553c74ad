"""`StreamingConfig`: everything that determines a `StreamingPerceiverIO`'s architecture.

Nested sections, saved as the ``"model"`` object of a checkpoint's ``config.json``::

    modalities: {name: {kind: video | audio_mel | points, ...adapter options}}
    encoder:    the latent array, the cross-attention onto the tokens, the self-attention tower
    state:      how the latents that end a window seed the stream's next one
    flow:       the optical-flow decoder (null = none)
    labels:     the label decoder (no class names = none)

`StreamingConfig.from_dict` validates a JSON / YAML dict: unknown keys are refused with their names,
and a key of the flat layout of ``perceiver-stream/streaming-v1`` checkpoints is refused with the
place it has now (`MOVED`) or the reason it is gone (`REMOVED`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from perceiver_stream.adapters import adapter_spec

# Flat keys of the v1 layout -> their place in the nested one.
MOVED: dict[str, str] = {
    "min_padding": "encoder.min_padding",
    "num_latents": "encoder.num_latents",
    "latent_channels": "encoder.latent_channels",
    "modality_latents": "encoder.modality_latents",
    "cross_heads": "encoder.cross_heads",
    "cross_widening": "encoder.cross_widening",
    "self_heads": "encoder.self_heads",
    "self_widening": "encoder.self_widening",
    "self_attends_per_block": "encoder.self_attends_per_block",
    "num_blocks": "encoder.num_blocks",
    "state": "state.carry",
    "state_gate_init": "state.gate_init",
    "flow_modality": "flow.modality",
    "flow_size": "flow.size",
    "flow_pos_bands": "flow.pos_bands",
    "flow_channels": "flow.channels",
    "flow_widening": "flow.widening",
    "flow_chunk": "flow.chunk",
    "flow_scale": "flow.scale",
    "flow_corr_radius": "flow.corr_radius",
    "flow_query_hidden": "flow.query_hidden",
    "flow_stride": "flow.stride",
    "label_heads": "labels.heads",
    "label_pool": "labels.pool",
    "class_names": "labels.class_names",
}

# Options of the v1 layout that are gone -> (the value whose behaviour is now the only one, what it is).
REMOVED: dict[str, tuple[Any, str]] = {
    "mask_probs": ({}, "tokens are never replaced by mask tokens"),
    "token_mlps": ({}, "tokens reach the encoder as the adapters make them"),
    "flow_corr_stride": (1, "the correlation volume is computed on the flow grid itself"),
    "label_groups": (True, "every latent group has a label read of its own"),
    "labels_from_encoder": (True, "the label reads take the encoder's latents"),
    "own_channels": (True, "each modality's tokens have channels of their own"),
    "modality_norms": (True, "each modality's tokens have a LayerNorm of their own"),
}


def _default_modalities() -> dict[str, dict[str, Any]]:
    return {"video": {"kind": "video"}, "audio": {"kind": "audio_mel"}, "points": {"kind": "points"}}


@dataclass
class EncoderSection:
    """The latent array (``total_latents x latent_channels``) and the encoder.

    modality_latents: modality -> latents of its own, after the ``num_latents`` shared ones (in
                      modality order), that attend to that modality's tokens alone.
    min_padding:      learned channels every token gets beyond its modality's own (its identity).
    cross_*:          heads and MLP widening of the cross-attention onto the tokens.
    self_*:           heads and MLP widening of the tower's layers; its ``self_attends_per_block``
                      layers are applied ``num_blocks`` times (weights shared).
    """

    num_latents: int = 64
    latent_channels: int = 128
    modality_latents: dict[str, int] = field(default_factory=dict)
    min_padding: int = 4
    cross_heads: int = 1
    cross_widening: int = 1
    self_heads: int = 4
    self_widening: int = 2
    self_attends_per_block: int = 2
    num_blocks: int = 2

    def __post_init__(self) -> None:
        self.modality_latents = {str(k): int(v) for k, v in self.modality_latents.items()}
        for name in ("num_latents", "latent_channels", "cross_heads", "cross_widening", "self_heads",
                     "self_widening", "self_attends_per_block", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: encoder.{name} must be at least 1, got {getattr(self, name)}")
        if self.min_padding < 0:
            raise ValueError("model config: encoder.min_padding must be >= 0")
        for name in ("cross_heads", "self_heads"):
            if self.latent_channels % getattr(self, name):
                raise ValueError(f"model config: encoder.latent_channels ({self.latent_channels}) is not "
                                 f"divisible by encoder.{name} ({getattr(self, name)})")
        if any(n < 0 for n in self.modality_latents.values()):
            raise ValueError("model config: encoder.modality_latents must be >= 0")


@dataclass
class StateSection:
    """Streaming state: with ``carry``, window t+1 of a stream starts from
    ``learned latents + sigmoid(gate) * Linear(LayerNorm(z_t))``; ``gate_init`` is the per-channel
    gate's initial value (before the sigmoid)."""

    carry: bool = True
    gate_init: float = -1.0


@dataclass
class FlowSection:
    """The flow decoder: forward flow of the last two frames of ``modality`` (a video modality).

    size:         the flow grid ``(H, W)`` (px); frames of another size are resized to it.
    pos_bands:    Fourier bands of each pixel's position.
    channels:     query width; ``widening``: the decoder MLP's widening.
    chunk:        queries per attention chunk (None = all at once).
    scale:        multiplier from decoder output to pixels.
    corr_radius:  a local correlation volume of this radius (px) joins each pixel's query (0 = none).
    query_hidden: with h > 0, a two-layer 3x3 convolution of the frame pair (6 -> h -> channels) too.
    stride:       decode on frames averaged over ``s x s`` blocks, then upsample bilinearly (divides ``size``).
    refine:       steps of `FlowRefiner` (warp, correlate, correct) on the full grid after the decoder (0 = none);
    refine_channels: the refiner's convolution width.
    """

    modality: str = "video"
    size: tuple[int, int] = (64, 64)
    pos_bands: int = 16
    channels: int = 64
    widening: int = 1
    chunk: int | None = 8192
    scale: float = 1.0
    corr_radius: int = 0
    query_hidden: int = 0
    stride: int = 1
    refine: int = 0
    refine_channels: int = 32

    def __post_init__(self) -> None:
        self.size = tuple(int(x) for x in self.size)  # type: ignore[assignment]
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"model config: flow.size must be [H, W] positive, got {list(self.size)}")
        for name in ("pos_bands", "channels", "widening"):
            if getattr(self, name) < 1:
                raise ValueError(f"model config: flow.{name} must be at least 1, got {getattr(self, name)}")
        if self.corr_radius < 0 or self.query_hidden < 0 or self.refine < 0:
            raise ValueError("model config: flow.corr_radius, flow.query_hidden and flow.refine must be >= 0")
        if self.refine_channels < 1:
            raise ValueError(f"model config: flow.refine_channels must be at least 1, got {self.refine_channels}")
        if self.stride < 1 or any(n % self.stride for n in self.size):
            raise ValueError(f"model config: flow.stride ({self.stride}) must be >= 1 and divide flow.size "
                             f"{list(self.size)}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError("model config: flow.chunk must be positive or null")


@dataclass
class LabelsSection:
    """The label decoder: ``class_names`` in index order (empty = no label decoder), ``heads`` of
    its cross-attention, and ``pool``: modalities whose label read also takes a gated max over
    their tokens' content channels (the adapter's ``pool_channels``). ``from_flow``: the label read
    also takes the model's own predicted flow, average-pooled to a 4 x 4 grid (no gradient into the
    flow), for classes defined by motion that the latents carry too little of (camera pans)."""

    class_names: tuple[str, ...] = ()
    heads: int = 1
    pool: tuple[str, ...] = ()
    from_flow: bool = False

    def __post_init__(self) -> None:
        self.class_names = tuple(str(c) for c in self.class_names)
        self.pool = tuple(str(k) for k in self.pool)
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("model config: labels.class_names must be distinct")
        if self.heads < 1:
            raise ValueError(f"model config: labels.heads must be at least 1, got {self.heads}")


def _section(cls: type, data: Any, name: str) -> Any:
    """``cls`` built from the dict ``data``; a non-dict or an unknown key raises ValueError naming it."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"model config: {name} must be a mapping, got {data!r}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"model config: {name} has no option(s) {unknown}; options: {known}")
    return cls(**data)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, dict into dict; any other value replaces.

    Under ``modalities``, a spec naming another ``kind`` replaces the modality's spec whole.
    """
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        old = out.get(key)
        if key == "modalities" and isinstance(old, dict) and isinstance(value, dict):
            for name, spec in value.items():
                prior = old.get(name)
                same = isinstance(prior, dict) and isinstance(spec, dict)
                if same and spec.get("kind", prior.get("kind")) == prior.get("kind"):
                    old[name] = deep_merge(prior, spec)
                else:
                    old[name] = copy.deepcopy(spec)
        elif isinstance(old, dict) and isinstance(value, dict):
            out[key] = deep_merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class StreamingConfig:
    """A `StreamingPerceiverIO`'s architecture (see the module docstring for the sections).

    ``modalities`` maps a modality name to its adapter spec ``{"kind": ..., **options}`` (see
    ``perceiver_stream.adapters.ADAPTERS``), completed with every default on creation.
    """

    modalities: dict[str, dict[str, Any]] = field(default_factory=_default_modalities)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    state: StateSection = field(default_factory=StateSection)
    flow: FlowSection | None = field(default_factory=FlowSection)
    labels: LabelsSection = field(default_factory=LabelsSection)

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("model config: needs at least one modality")
        self.modalities = {str(k): adapter_spec(dict(v)) for k, v in self.modalities.items()}
        names = sorted(self.modalities)
        stray = [k for k in self.labels.pool if k not in self.modalities]
        if stray:
            raise ValueError(f"model config: labels.pool names {stray}, which are not modalities (modalities: {names})")
        stray = [k for k in self.encoder.modality_latents if k not in self.modalities]
        if stray:
            raise ValueError(f"model config: encoder.modality_latents names {stray}, which are not modalities "
                             f"(modalities: {names})")
        if self.encoder.latent_channels % self.labels.heads:
            raise ValueError(f"model config: encoder.latent_channels ({self.encoder.latent_channels}) is not "
                             f"divisible by labels.heads ({self.labels.heads})")
        if self.labels.from_flow and (self.flow is None or not self.labels.class_names):
            raise ValueError("model config: labels.from_flow needs a flow decoder and class_names")
        if self.flow is not None and self.modalities.get(self.flow.modality, {}).get("kind") != "video":
            raise ValueError(f"model config: flow.modality {self.flow.modality!r} is not a video modality of "
                             f"modalities {names}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamingConfig:
        """Build from a (JSON / YAML) dict; missing sections take their defaults, ``"flow": None``
        means no flow decoder. Unknown, moved and removed keys raise ValueError naming them."""
        for key in d:
            if key in MOVED and not (key == "state" and isinstance(d[key], dict)):
                raise ValueError(f"model config: {key!r} is now {MOVED[key]!r}")
            if key in REMOVED:
                raise ValueError(f"model config: option {key!r} was removed ({REMOVED[key][1]})")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"model config has no option(s) {unknown}; options: {known}")
        flow = d.get("flow", {})
        return cls(
            modalities=d.get("modalities", _default_modalities()),
            encoder=_section(EncoderSection, d.get("encoder", {}), "encoder"),
            state=_section(StateSection, d.get("state", {}), "state"),
            flow=None if flow is None else _section(FlowSection, flow, "flow"),
            labels=_section(LabelsSection, d.get("labels", {}), "labels"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly nested dict (tuples as lists) that ``from_dict`` turns back into an equal config."""
        d = asdict(self)
        if self.flow is not None:
            d["flow"]["size"] = list(self.flow.size)
        d["labels"]["class_names"] = list(self.labels.class_names)
        d["labels"]["pool"] = list(self.labels.pool)
        return d

    def merged(self, overrides: dict[str, Any]) -> StreamingConfig:
        """A validated copy with nested ``overrides`` deep-merged in (see `deep_merge`)."""
        return StreamingConfig.from_dict(deep_merge(self.to_dict(), overrides))

    @property
    def total_latents(self) -> int:
        """The shared latents plus every modality's own."""
        return self.encoder.num_latents + sum(self.encoder.modality_latents.values())

    @property
    def num_classes(self) -> int:
        """Number of label classes (0 = no label decoder)."""
        return len(self.labels.class_names)

    @property
    def video_frames(self) -> int | None:
        """How many trailing frames of a window the model reads (None = all of them)."""
        flow = 2 if self.flow is not None else 1
        spec = self.modalities.get("video")
        if spec is None:
            return flow if self.flow is not None else None
        return None if spec.get("frames") is None else max(int(spec["frames"]), flow)

    @property
    def points(self) -> tuple[int | None, int] | None:
        """``(scans, max_points)`` the model's points adapter reads of a window: at most ``max_points``
        points of its last ``scans`` scans (None = all scans); None without a points adapter."""
        spec = self.modalities.get("points")
        if spec is None or spec.get("kind") != "points":
            return None
        return spec.get("scans"), int(spec["max_points"])
