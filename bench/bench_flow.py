"""Full-size optical-flow Perceiver IO: ours vs ``transformers``, same weights, same input.

Builds DeepMind's published flow preset (41 M parameters, 368 x 496 input, 2048 x 512 latents,
24 self-attention layers of 16 heads, one cross-attention head) with random weights in
``transformers``, saves it with ``save_pretrained`` and runs each implementation in its own
subprocess (``transformers`` loads it with ``from_pretrained``, ours with ``load_pretrained``):
a warm-up forward, then ``--repeats`` timed forwards. Prints one JSON object: max abs difference of
the outputs, each median, the ratio, achieved GFLOP/s (nominal FLOPs of the model, counted
analytically, over the median) and each process's peak resident memory.

    python bench/bench_flow.py                     # CPU, fp32, all cores
    python bench/bench_flow.py --profile           # also where our time goes (torch.profiler)
    python bench/bench_flow.py --device cuda --bf16  # on a GPU machine: ours in bf16 autocast too
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from perceiver_stream.convert import load_pretrained

FLOW_CONFIG = dict(
    num_latents=2048,
    d_latents=512,
    num_blocks=1,
    num_self_attends_per_block=24,
    num_self_attention_heads=16,
    num_cross_attention_heads=1,
    self_attention_widening_factor=1,
    cross_attention_widening_factor=1,
    cross_attention_shape_for_attention="kv",
    train_size=[368, 496],
)


def flow_flops(h: int = 368, w: int = 496, latents: int = 2048, d: int = 512, layers: int = 24) -> int:
    """Nominal FLOPs of one forward of the flow preset (2 per multiply-accumulate, matmuls only)."""
    n, c = h * w, 64 + 2 * (2 * 64) + 2  # tokens; patch features + Fourier channels = 322
    mm = lambda m, k, o: 2 * m * k * o  # noqa: E731
    pre = mm(n, 54, 64)
    enc = mm(latents, d, c) + 2 * mm(n, c, c) + 2 * mm(latents, n, c) + mm(latents, c, d) + 2 * mm(latents, d, d)
    self_attn = layers * (4 * mm(latents, d, d) + 2 * mm(latents, latents, d) + 2 * mm(latents, d, d))
    dec = mm(n, c, d) + 2 * mm(latents, d, d) + 2 * mm(n, latents, d) + mm(n, d, c) + 2 * mm(n, c, c) + mm(n, c, 2)
    return pre + enc + self_attn + dec


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    """One implementation's timed forwards in this process; prints its JSON line."""
    torch.set_num_threads(args.threads)
    folder = Path(args.dir)
    device = torch.device(args.device)
    if args.impl == "transformers":
        # local import: transformers (a test extra) loads only where it runs; our worker's memory must not count it
        from transformers import PerceiverForOpticalFlow

        model = PerceiverForOpticalFlow.from_pretrained(folder / "model").eval().to(device)
        run = lambda x: model(inputs=x).logits  # noqa: E731
    else:
        model = load_pretrained(folder / "model").to(device)
        run = lambda x: model(x, query_chunk=args.query_chunk)  # noqa: E731
    x = torch.load(folder / "input.pt").to(device)
    rss_loaded = _peak_rss_mb()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    times = []
    with torch.no_grad(), autocast:
        out = run(x)  # warm-up
        sync()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = run(x)
            sync()
            times.append(time.perf_counter() - t0)
    torch.save(out.float().cpu(), folder / f"out_{args.impl}{'_bf16' if args.bf16 else ''}.pt")
    result = {
        "times_s": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3),
        "rss_after_load_mb": round(rss_loaded),
        "peak_rss_mb": round(_peak_rss_mb()),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if args.profile:
        with torch.no_grad(), autocast, profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run(x)
        rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:12]
        result["profile_top"] = [
            {
                "op": e.key,
                "shapes": str(e.input_shapes)[:120],
                "calls": e.count,
                "self_s": round(e.self_cpu_time_total / 1e6, 3),
            }
            for e in rows
        ]
        result["profile_total_s"] = round(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6, 3)
    print(json.dumps(result))


def _spawn(args: argparse.Namespace, impl: str, folder: str, bf16: bool = False) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", impl, "--dir", folder, "--threads", str(args.threads),
        "--repeats", str(args.repeats), "--device", args.device, "--query-chunk", str(args.query_chunk),
    ]
    if bf16:
        cmd.append("--bf16")
    if args.profile and impl == "ours":
        cmd.append("--profile")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--query-chunk", type=int, default=16384)
    p.add_argument("--bf16", action="store_true", help="also time ours under bf16 autocast")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--worker", choices=["transformers", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.impl = args.worker
        worker(args)
        return

    # local import: transformers (a test extra) loads only where it runs; our worker's memory must not count it
    from transformers import PerceiverConfig, PerceiverForOpticalFlow

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = PerceiverForOpticalFlow(PerceiverConfig(**FLOW_CONFIG))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(folder) / "model")
        del model
        torch.save(torch.randn(1, 2, 27, 368, 496), Path(folder) / "input.pt")
        load_before = os.getloadavg()
        res = {"transformers": _spawn(args, "transformers", folder), "ours": _spawn(args, "ours", folder)}
        if args.bf16:
            res["ours_bf16"] = _spawn(args, "ours", folder, bf16=True)
        outs = {k: torch.load(Path(folder) / f"out_{k}.pt") for k in res}
    flops = flow_flops()
    ref = outs["transformers"]
    summary = {
        "device": args.device,
        "threads": args.threads,
        "params_m": round(params / 1e6, 2),
        "tflop_per_forward": round(flops / 1e12, 3),
        "output_abs_max": round(ref.abs().max().item(), 4),
        "max_abs_diff": float(f"{(outs['ours'] - ref).abs().max().item():.3g}"),
        "speedup": round(res["transformers"]["median_s"] / res["ours"]["median_s"], 2),
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    for k, r in res.items():
        r["gflop_per_s"] = round(flops / r["median_s"] / 1e9, 1)
        summary[k] = r
    if "ours_bf16" in outs:
        summary["max_abs_diff_bf16"] = float(f"{(outs['ours_bf16'] - ref).abs().max().item():.3g}")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
