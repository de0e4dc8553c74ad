"""Published Perceiver IO models through the pipeline's predictor: windows (or flow tiles) per second.

Builds the models with random weights in ``transformers``, saves them with ``save_pretrained`` and
runs them as the model actor does (`perceiver_stream.deepmind.published.PublishedPerceiver` on
`pipeline.collate` batches, under ``torch.inference_mode``, bf16 autocast on CUDA), on windows of
random frames (and audio): a warm-up batch, then ``--repeats`` timed ones. Prints one JSON object.

- With CUDA (or ``--preset``): DeepMind's flow preset (41 M parameters, 368 x 496 tiles) on windows
  of 368 x 496 frames, one tile each: ms per tile and tiles/s at each ``--batch`` (default 8 and 16),
  and the peak GPU memory.
- Without CUDA: the tests' tiny models (flow with 12 x 16 tiles on 20 x 24 frames, a multimodal
  autoencoder over 2 frames of 8 x 8 and 320 samples, a learned-position classifier of 8 x 8
  images): windows/s through the predictor at each ``--batch``.

    python bench/bench_published.py                        # CPU: the tiny models
    python bench/bench_published.py --batch 8,16           # on a GPU machine: the preset in bf16
    python bench/bench_published.py --preset --batch 1 --repeats 2   # the preset on CPU (slow)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers as tr

from bench_flow import FLOW_CONFIG
from perceiver_stream.deepmind.published import PublishedPerceiver
from pipeline.collate import collate
from pipeline.window import Window

SMALL = dict(num_latents=8, d_latents=32, num_self_attends_per_block=1, num_self_attention_heads=4,
             num_cross_attention_heads=1)
TINY = {  # name: (model, frame size, frames per window, audio rate or None)
    "flow": (lambda: tr.PerceiverForOpticalFlow(tr.PerceiverConfig(**SMALL, train_size=[12, 16])), (20, 24), 2, None),
    "multimodal": (
        lambda: tr.PerceiverForMultimodalAutoencoding(tr.PerceiverConfig(
            **SMALL, num_labels=7, num_frames=2, image_size=8, audio_samples_per_frame=160, samples_per_patch=16,
            output_shape=[1, 2, 8, 8], output_num_channels=24, _label_trainable_num_channels=20)),
        (8, 8), 10, 1600,
    ),
    "classifier": (
        lambda: tr.PerceiverForImageClassificationLearned(tr.PerceiverConfig(**SMALL, num_labels=4, image_size=8)),
        (8, 8), 10, None,
    ),
}


def windows(n: int, size: tuple[int, int], frames: int, rate: int | None, seed: int = 0) -> list[Window]:
    """``n`` one-second windows of ``frames`` random frames at 10 fps (and a second of noise at ``rate``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        audio = None if rate is None else rng.uniform(-0.5, 0.5, (rate, 1)).astype(np.float32)
        out.append(Window(
            f"s{i}", 0, 0.0, 1.0, video=rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8),
            video_t=np.arange(frames) * 0.1, audio=audio, audio_rate=rate, audio_t0=0.0 if rate else None,
        ))
    return out


def time_batches(pred: PublishedPerceiver, batch: list[Window], repeats: int) -> float:
    """Median seconds of collate + forward of ``batch``, as the model actor runs it."""
    cuda = pred.device.type == "cuda"
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast(pred.device.type, dtype=torch.bfloat16, enabled=cuda):
            out = pred(collate(batch, video_frames=pred.video_frames).to(pred.device))
            (out.flow if out.flow is not None else out.label_logits).float().cpu()
        if cuda:
            torch.cuda.synchronize()
        if i:  # the first batch warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_preset(device: torch.device, batches: list[int], repeats: int) -> dict:
    """The 41 M flow preset: ms per tile and tiles/s at each batch."""
    torch.manual_seed(0)
    result: dict = {"model": "PerceiverForOpticalFlow preset (random weights)", "tile": [368, 496],
                    "device": str(device), "bf16_autocast": device.type == "cuda", "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = tr.PerceiverForOpticalFlow(tr.PerceiverConfig(**FLOW_CONFIG))
        result["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        model.save_pretrained(tmp)
        del model
        for b in batches:
            pred = PublishedPerceiver(Path(tmp), device, max_tiles=b)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            s = time_batches(pred, windows(b, (368, 496), 2, None), repeats)
            row = {"ms_per_tile": round(1000 * s / b, 2), "tiles_per_s": round(b / s, 2)}
            if device.type == "cuda":
                row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result["batches"][str(b)] = row
            del pred
    return result


def bench_tiny(batches: list[int], repeats: int) -> dict:
    """The tests' tiny models on the CPU: windows/s through the predictor at each batch."""
    result: dict = {"device": "cpu", "threads": torch.get_num_threads(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, size, frames, rate) in TINY.items():
            torch.manual_seed(0)
            build().save_pretrained(Path(tmp) / name)
            pred = PublishedPerceiver(Path(tmp) / name, torch.device("cpu"))
            rates = {}
            for b in batches:
                pred.max_tiles = b
                rates[str(b)] = round(b / time_batches(pred, windows(b, size, frames, rate), repeats), 1)
            result["models"][name] = {"frame_size": list(size), "windows_per_s": rates}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="8,16", help="windows per batch, comma-separated (default 8,16)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per point (default 5)")
    p.add_argument("--preset", action="store_true", help="the 41 M flow preset even without CUDA")
    args = p.parse_args()
    batches = [int(x) for x in args.batch.split(",")]
    if torch.cuda.is_available() or args.preset:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(bench_preset(device, batches, args.repeats), indent=2))
    else:
        print(json.dumps(bench_tiny(batches, args.repeats), indent=2))


if __name__ == "__main__":
    main()
