"""The suite's one tiny model (``TINY``, built by the fixtures in conftest.py) and hand-made batches
sized for it: windows of 1 s with video at the flow grid's size and audio at the mel adapter's rate."""

from __future__ import annotations

import torch

from perceiver_stream.batch import Batch, ModalityBatch, Targets

TINY = {  # video, audio and points, fast on one CPU thread
    "modalities": {
        "video": {"kind": "video", "patch": 4, "frames": 2, "pos_bands": 4, "time_bands": 4},
        "audio": {"kind": "audio_mel", "sample_rate": 4000, "n_fft": 128, "hop_length": 64, "n_mels": 16,
                  "time_bands": 4},
        "points": {"kind": "points", "pos_bands": 4, "max_points": 48, "time_bands": 4},
    },
    "encoder": {"num_latents": 8, "latent_channels": 32, "self_heads": 2},
    "flow": {"size": (16, 16), "pos_bands": 4, "channels": 16},
    "labels": {"class_names": ("a", "b", "c")},
}
RATE = TINY["modalities"]["audio"]["sample_rate"]
HW = TINY["flow"]["size"][0]


def make_batch(b: int = 3, seed: int = 0, frames: list[int] | None = None, points: list[int] | None = None,
               targets: bool = True) -> Batch:
    """Random windows of 1 s with per-row frame / point counts (padding at the end of each row)."""
    g = torch.Generator().manual_seed(seed)
    frames = frames or [4] * b
    points = points or [40] * b
    t0 = 1000.0 + torch.arange(b, dtype=torch.float64) * 0.5
    tmax, pmax, s = max(frames), max(points), RATE
    fmask = torch.arange(tmax)[None] < torch.tensor(frames)[:, None]
    pmask = torch.arange(pmax)[None] < torch.tensor(points)[:, None]
    video = ModalityBatch(
        torch.randint(0, 256, (b, tmax, HW, HW, 3), dtype=torch.uint8, generator=g),
        t0[:, None] + torch.arange(tmax, dtype=torch.float64) * 0.25,
        fmask,
        torch.tensor(frames) > 0,
    )
    audio = ModalityBatch(
        0.3 * torch.randn(b, s, 1, generator=g),
        t0[:, None] + torch.arange(s, dtype=torch.float64) / RATE,
        torch.ones(b, s, dtype=torch.bool),
        torch.ones(b, dtype=torch.bool),
        rate=float(RATE),
    )
    pts = ModalityBatch(
        3 * torch.randn(b, pmax, 4, generator=g),
        t0[:, None] + 0.5 + torch.zeros(b, pmax, dtype=torch.float64),
        pmask,
        torch.tensor(points) > 0,
    )
    tg = None
    if targets:
        tg = Targets(torch.randn(b, HW, HW, 2, generator=g), torch.ones(b, dtype=torch.bool),
                     torch.randint(0, 3, (b,), generator=g))
    return Batch([f"s{i}" for i in range(b)], torch.arange(b), t0, t0 + 1.0, torch.ones(b, dtype=torch.bool),
                 {"video": video, "audio": audio, "points": pts}, tg)


def row(batch: Batch, i: int) -> Batch:
    """Window ``i`` of ``batch`` alone, trimmed to its own length (no foreign padding)."""
    mods = {}
    for k, m in batch.modalities.items():
        n = int(m.mask[i].sum()) or 1
        mods[k] = ModalityBatch(m.values[i:i + 1, :n], m.times[i:i + 1, :n], m.mask[i:i + 1, :n],
                                m.present[i:i + 1], m.rate)
    return Batch([batch.stream_ids[i]], batch.window_ids[i:i + 1], batch.t_start[i:i + 1], batch.t_end[i:i + 1],
                 batch.reset[i:i + 1], mods)


def assert_outputs_close(a, b, atol=1e-5) -> None:
    torch.testing.assert_close(a.embedding, b.embedding, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.label_logits, b.label_logits, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.flow, b.flow, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.state, b.state, atol=atol, rtol=1e-4)
