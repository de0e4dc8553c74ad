"""DeepMind's published Perceiver IO models behind the pipeline's predictor interface.

A ``transformers`` ``save_pretrained`` folder (``config.json`` naming the architecture, and the
weights) is recognised by `published_spec` and run by `PublishedPerceiver`: a `Batch` of windows in,
a `ModelOutput` out, through our exact ports (`perceiver_stream.convert.load_pretrained`), without
importing ``transformers``. What each model reads of a window:

- ``PerceiverForOpticalFlow``: the window's last two frames, at their decoded size, tiled at the
  model's training size as DeepMind's colab does (`perceiver_stream.flow.estimate_flows`); the tiles
  of every window of the batch share forward passes. Flow in pixels of the decoded grid; no labels.
- ``PerceiverForMultimodalAutoencoding``: the last ``num_frames`` frames in [0, 1] and the
  ``num_frames * audio_samples_per_frame`` mono samples starting at the first of them; only the
  label query is decoded (Kinetics-700 scores), not the image and audio reconstructions.
- the ImageNet classifiers (``...Learned``, ``...Fourier``, ``...ConvProcessing``): the window's last
  frame, normalised with ImageNet's mean and deviation as ``transformers``' image processor does.

The models are stateless: nothing is carried between windows (``stateful = False``). The
embedding is the mean of the final latents (for flow, also over a window's tiles).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from perceiver_stream.batch import Batch, ModalityBatch
from perceiver_stream.convert import load_pretrained
from perceiver_stream.deepmind.models import (
    PRESETS,
    ImageClassifierLearnedConfig,
    MultimodalAutoencoderConfig,
    OpticalFlowConfig,
)
from perceiver_stream.flow import estimate_flows
from perceiver_stream.outputs import ModelOutput
from perceiver_stream.perceiver import PerceiverIO

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # transformers' IMAGENET_DEFAULT_MEAN / _STD, on [0, 1] pixels
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PublishedSpec:
    """What a published model reads of a window, from its ``config.json``.

    task:          ``"flow"``, ``"multimodal"`` or ``"classify"``.
    video_frames:  trailing frames of a window it reads (2, ``num_frames``, 1).
    frame_size:    ``(H, W)`` the frames must have (None: any size).
    tile_size:     flow only: the training size the frames are tiled at.
    num_frames, audio_samples_per_frame: multimodal only (audio per window =
                   ``num_frames * audio_samples_per_frame`` mono samples, one frame's worth per frame).
    class_names:   the label names (``id2label``), empty for flow.
    """

    architecture: str
    task: str
    video_frames: int
    frame_size: tuple[int, int] | None = None
    tile_size: tuple[int, int] | None = None
    num_frames: int | None = None
    audio_samples_per_frame: int | None = None
    class_names: list[str] = field(default_factory=list)

    @property
    def audio_samples(self) -> int | None:
        """Mono samples per window the multimodal model reads (None: no audio)."""
        if self.num_frames is None or self.audio_samples_per_frame is None:
            return None
        return self.num_frames * self.audio_samples_per_frame

    @property
    def points(self) -> None:
        """No published model reads point clouds (the sources then ship none)."""
        return None


def _class_names(config: dict, num_labels: int) -> list[str]:
    names = config.get("id2label") or {}
    return [str(names.get(str(i), names.get(i, f"LABEL_{i}"))) for i in range(num_labels)]


def published_spec(folder: str | Path) -> PublishedSpec | None:
    """The spec of the ``transformers`` Perceiver saved in ``folder``; None when ``folder`` holds no
    ``transformers`` model (no ``config.json``, or one without ``architectures``, as a perceiver-stream
    checkpoint). A Perceiver of another architecture raises ValueError naming the supported ones."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not archs:
        return None
    arch = next((a for a in archs if a in PRESETS), None)
    if arch is None:
        raise ValueError(f"{folder}: a transformers {'/'.join(archs)} model, which the pipeline cannot run; "
                         f"it runs {sorted(PRESETS)}")
    preset = PRESETS[arch].from_dict(config)
    if isinstance(preset, OpticalFlowConfig):
        return PublishedSpec(arch, "flow", 2, tile_size=tuple(preset.train_size))
    if isinstance(preset, MultimodalAutoencoderConfig):
        return PublishedSpec(
            arch, "multimodal", preset.num_frames, frame_size=(preset.image_size, preset.image_size),
            num_frames=preset.num_frames, audio_samples_per_frame=preset.audio_samples_per_frame,
            class_names=_class_names(config, preset.num_labels),
        )
    size = (preset.image_size, preset.image_size) if isinstance(preset, ImageClassifierLearnedConfig) else None
    return PublishedSpec(arch, "classify", 1, frame_size=size, class_names=_class_names(config, preset.num_labels))


def _trailing_frames(video: ModalityBatch, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window's last ``count`` frames, ``B x count x H x W x 3`` uint8 (a window with fewer
    repeats its first frame at the front; one without video gets its zero padding), and the time of
    the first of them, ``B`` float64."""
    n = video.mask.sum(1)
    b = torch.arange(len(n), device=n.device)
    idx = (n[:, None] - count + torch.arange(count, device=n.device)[None]).clamp(min=0)
    return video.values[b[:, None], idx], video.times[b, idx[:, 0]]


class PublishedPerceiver:
    """A published model on one device, as the pipeline's predictor (see the module docstring).

    ``max_tiles``: flow tiles per forward pass (the tiles of the batch's windows share them);
    ``query_chunk``: decoder queries attended at once (flow decodes one query per pixel).
    """

    stateful = False

    def __init__(
        self, folder: str | Path, device: torch.device, *, name: str | None = None, max_tiles: int = 8,
        query_chunk: int | None = 16384,
    ) -> None:
        spec = published_spec(folder)
        if spec is None:
            raise ValueError(f"{folder} is not a transformers save_pretrained folder (no config.json naming "
                             "an architecture)")
        self.spec = spec
        self.model: PerceiverIO = load_pretrained(folder).to(device)
        self.name = name or Path(folder).name
        self.device = device
        self.class_names = list(spec.class_names)
        self.video_frames: int | None = spec.video_frames
        self.max_tiles = max_tiles
        # DeepMind's colab overlaps its 368 x 496 tiles by 20 pixels; small (test) tiles by a quarter.
        self.min_overlap = min(20, min(spec.tile_size) // 4) if spec.tile_size else 0
        self.query_chunk = query_chunk
        self._latent_means: list[torch.Tensor] = []

    def __call__(self, batch: Batch, state: torch.Tensor | None = None) -> ModelOutput:
        """Outputs of ``batch`` (on this predictor's device); ``state`` is ignored (stateless)."""
        run = {"flow": self._flow, "multimodal": self._multimodal, "classify": self._classify}[self.spec.task]
        embedding, logits, flow, valid = run(batch)
        return ModelOutput(
            embedding=embedding.float(),
            label_logits=logits.float(),
            flow=flow,
            flow_valid=valid,
            state=embedding.new_zeros(len(batch), 0, embedding.shape[-1]),
        )

    # -- the three tasks ----------------------------------------------------------------------
    def _encode(self, inputs) -> tuple:
        tokens = self.model.tokenize(inputs)
        return tokens, self.model.encoder(tokens.tokens, tokens.mask)

    def _flow_tiles(self, patches: torch.Tensor, query_chunk: int | None = None) -> torch.Tensor:
        """The flow network on ``T x 2 x 27 x h x w`` tiles, noting each tile's mean latent."""
        tokens, z = self._encode(patches)
        self._latent_means.append(z.mean(1).float())
        return self.model.decoder(tokens, z, query_chunk=query_chunk)

    def _flow(self, batch: Batch):
        b, width = len(batch), self.model.encoder.latents.shape[-1]
        video = batch.modalities.get("video")
        embedding = torch.zeros(b, width, device=self.device)
        logits = torch.zeros(b, 0, device=self.device)
        if video is None:
            return embedding, logits, None, torch.zeros(b, dtype=torch.bool)
        pairs, _ = _trailing_frames(video, 2)
        valid = video.mask.sum(1) >= 2
        flow = torch.zeros(b, *pairs.shape[2:4], 2, device=self.device)
        if valid.any():
            self._latent_means = []
            flow[valid] = estimate_flows(
                self._flow_tiles, pairs[valid, 0], pairs[valid, 1], tile_size=self.spec.tile_size,
                min_overlap=self.min_overlap, query_chunk=self.query_chunk, tiles_per_batch=self.max_tiles, device=self.device,
            )
            # Tiles come in (window, tile) order: average each window's.
            embedding[valid] = torch.cat(self._latent_means).reshape(int(valid.sum()), -1, width).mean(1)
        return embedding, logits, flow, valid.cpu()

    def _multimodal(self, batch: Batch):
        spec = self.spec
        b, n_audio = len(batch), spec.audio_samples
        size = spec.frame_size
        video, audio = batch.modalities.get("video"), batch.modalities.get("audio")
        images = torch.zeros(b, spec.num_frames, 3, *size, device=self.device)
        sound = torch.zeros(b, n_audio, device=self.device)
        first_t = None
        if video is not None:
            frames, first_t = _trailing_frames(video, spec.num_frames)
            images = frames.permute(0, 1, 4, 2, 3).to(torch.float32) / 255.0
        if audio is not None:
            count = audio.mask.sum(1)
            if first_t is None:
                start = count - n_audio
            else:  # the samples from the first frame's time on
                start = torch.round((first_t - audio.times[:, 0]) * audio.rate).long()
                start = torch.where(video.present, start, count - n_audio)
            start = torch.minimum(start, count - n_audio).clamp(min=0)
            idx = start[:, None] + torch.arange(n_audio, device=start.device)[None]
            inside = idx < count[:, None]
            picked = audio.values[..., 0].gather(1, idx.clamp(max=audio.values.shape[1] - 1))
            sound = torch.where(inside, picked, torch.zeros_like(picked))
        labels = torch.zeros(b, len(self.class_names), device=self.device)  # hidden by the model's mask token
        inputs = {"image": images, "audio": sound[..., None], "label": labels}
        tokens, z = self._encode(inputs)
        none = torch.zeros(0, dtype=torch.long, device=self.device)
        out = self.model.decoder(tokens, z, points={"image": none, "audio": none, "label": None})
        logits = self.model.postprocessor.heads["label"](out["label"])
        seen = torch.zeros(b, dtype=torch.bool, device=self.device)
        for m in (video, audio):
            if m is not None:
                seen |= m.present.to(self.device)
        logits = torch.where(seen[:, None], logits, torch.zeros_like(logits))
        return z.mean(1), logits, None, torch.zeros(b, dtype=torch.bool)

    def _classify(self, batch: Batch):
        b = len(batch)
        video = batch.modalities.get("video")
        if video is None:  # nothing to classify: uniform scores
            width = self.model.encoder.latents.shape[-1]
            return (torch.zeros(b, width, device=self.device), torch.zeros(b, len(self.class_names), device=self.device),
                    None, torch.zeros(b, dtype=torch.bool))
        frames, _ = _trailing_frames(video, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=self.device)[:, None, None]
        images = (frames[:, 0].permute(0, 3, 1, 2).to(torch.float32) / 255.0 - mean) / std
        tokens, z = self._encode(images)
        logits = self.model.decoder(tokens, z)
        logits = torch.where(video.present.to(self.device)[:, None], logits, torch.zeros_like(logits))
        return z.mean(1), logits, None, torch.zeros(b, dtype=torch.bool)
