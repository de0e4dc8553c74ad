"""Memory soak: the pipeline paced at media speed, the RSS of every actor process over time.

Runs ``run_pipeline.py`` (``--realtime``, 8 synthetic streams by default, the default
checkpoint) for ``--minutes``, samples the RSS of the driver and of every Ray actor process it
started (found among the driver's descendants by their ``ray::Class`` process titles), each
sample the mean of readings over ``--interval`` seconds, one at a random moment of each
``--read-every``-second slot (`interval_mean`), then
drains the run with SIGINT. For each process it reports the RSS slope after the first
``--warmup-minutes`` in MB per hour (ordinary least squares) with two 95% intervals: the
textbook t interval and the Newey-West one, which allows for the autocorrelation of RSS samples
(allocator and GC cycles, steps), under which the textbook one is too narrow.
Target: an interval that includes 0, or under 1 MB/h.

The JSON (``--out``) is rewritten after every sample, so a soak cut short still leaves its
result.

    python bench/soak.py [--minutes 60] [--streams 8] [--interval 30] [--out bench/results/soak.json]
    python bench/soak.py --analyse bench/results/soak.json [--warmup-minutes 5]

A machine whose load changes during the soak moves the queues between stages (bounded by
``runtime.max_in_flight``) and the allocators to new high-water marks: a step in RSS, not a
leak, which an OLS line over the whole run reads as a slope. ``--analyse`` also gives the slope
over the second half, and over the samples taken while the run kept up with its streams (the
lag of its status lines at most `KEPT_UP_LAG_S`): a run that falls behind real time fills its
queues and its model's batches, and the model's and the driver's RSS step up by tens of MB until
it has caught up. Each sample also records every process's thread count and the RSS of its
threads' stacks (`stacks_mb`), and the JSON each
process's allocator settings (``MALLOC_*``, ``LD_PRELOAD``, ``ARROW_DEFAULT_MEMORY_POOL``; see
`actors.memory.allocator_env`), and the RSS of any child process running one of the sink's large
copies (`pipeline.partcopy`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


# Student's t 0.975 quantiles for 1..10 degrees of freedom; above, the expansion below is within 0.003.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def t975(df: int) -> float:
    """Student's t 0.975 quantile (a table, then a Cornish-Fisher expansion around the normal)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def newey_west_lags(n: int) -> int:
    """The Bartlett kernel's lag count for ``n`` samples (the usual ``4 (n/100)^(2/9)`` rule)."""
    return int(4 * (n / 100) ** (2 / 9))


def slope_per_hour(t_s: list[float], rss_mb: list[float]) -> dict[str, float] | None:
    """OLS slope of RSS (MB) on time, in MB per hour, with two 95% intervals; None under 3 points.

    ``lo``/``hi``: the textbook t interval, which assumes independent residuals. ``nw_lo``/``nw_hi``:
    the Newey-West (Bartlett kernel, `newey_west_lags`) interval, which stays right when the
    residuals are autocorrelated (an allocator cycle longer than the sampling interval, steps);
    ``r1`` is the residuals' lag-1 autocorrelation, which says how far apart the two may be.
    """
    n = len(t_s)
    if n < 3:
        return None
    t = np.asarray(t_s, np.float64) / 3600.0
    y = np.asarray(rss_mb, np.float64)
    tc = t - t.mean()
    sxx = float(tc @ tc)
    if sxx == 0:
        return None
    b = float(tc @ (y - y.mean())) / sxx
    resid = y - y.mean() - b * tc
    q = t975(n - 2)
    h = q * math.sqrt(float(resid @ resid) / (n - 2) / sxx)
    u = tc * resid
    lags = newey_west_lags(n)
    s = float(u @ u) + sum(2 * (1 - k / (lags + 1)) * float(u[k:] @ u[:-k]) for k in range(1, lags + 1))
    h_nw = q * math.sqrt(max(s, 0.0) * n / (n - 2)) / sxx
    r1 = float(resid[1:] @ resid[:-1] / (resid @ resid)) if float(resid @ resid) > 0 else 0.0
    return {"slope_mb_h": b, "lo": b - h, "hi": b + h, "nw_lo": b - h_nw, "nw_hi": b + h_nw, "r1": r1,
            "n": n, "first_mb": float(y[0]), "last_mb": float(y[-1])}


def soak_config(streams: int, seconds: float) -> dict:
    """The run's config: ``streams`` paced synthetic rigs lasting ``seconds``, the default model."""
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    cfg["streams"] = [{"id": f"soak{i}", "synthetic": {"seed": 5000 + i, "seconds": seconds}} for i in range(streams)]
    cfg["model"]["checkpoint"] = str(ROOT / "checkpoints" / "default")
    cfg["runtime"]["realtime"] = True
    cfg["distill"]["enabled"] = False
    return cfg


def actor_processes(driver: psutil.Process) -> dict[str, psutil.Process]:
    """``{"Class:pid": process}`` for the driver and each Ray actor process below it."""
    found = {f"driver:{driver.pid}": driver}
    for p in driver.children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not title.startswith("ray::"):
            continue
        name = title[5:].split()[0].split(".")[0]
        if name and name != "IDLE":
            found[f"{name}:{p.pid}"] = p
    return found


def copy_children_mb(driver: psutil.Process) -> list[float]:
    """RSS (MB) of the child processes running a sink's large copies at this moment
    (`pipeline.partcopy`): short-lived, so kept apart from the actors' slopes."""
    out = []
    for p in driver.children(recursive=True):
        try:
            if "pipeline.partcopy" in p.cmdline():
                out.append(p.memory_info().rss / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def proc_files(processes: dict[str, psutil.Process], name: str) -> Iterator[tuple[str, str]]:
    """``(key, text)`` of each process's ``/proc/PID/<name>``, leaving out processes that ended."""
    for key, p in processes.items():
        try:
            yield key, Path(f"/proc/{p.pid}/{name}").read_text()
        except OSError:
            continue


def rss_parts_mb(processes: dict[str, psutil.Process]) -> dict[str, dict[str, float]]:
    """Each process's RSS in MB as Linux counts it (``/proc/PID/status``): ``total``, and its
    parts ``anon`` (its heaps), ``file`` (mapped files: libraries), ``shmem`` (shared memory it
    has touched: Ray's object store, whose pages a process counts once it has written or read an
    object there)."""
    out = {}
    for key, status in proc_files(processes, "status"):
        kb = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith(("Rss", "VmRSS"))}
        out[key] = {"total": kb.get("VmRSS", 0) / 1024,
                    **{part: kb.get(f"Rss{part.capitalize()}", 0) / 1024 for part in ("anon", "file", "shmem")}}
    return out


def interval_mean(processes: dict[str, psutil.Process], seconds: float, every: float) -> dict[str, dict[str, float]]:
    """`rss_parts_mb` read about every ``every`` seconds for ``seconds``, averaged per process,
    with the range of ``total`` (``min``, ``max``) and the number of ``reads``.

    A sample is the mean over its interval, not one reading: an actor's RSS swings by up to 20 MB
    within seconds. Each reading falls at a random moment of its own ``every``-second slot
    (stratified sampling): in a paced run the source pool's RSS cycles with a 2 s
    period, and readings at a fixed step lock onto a phase of that cycle which drifts with the
    readings' own cost, so their means wander by a few MB over minutes, a slow wave a line fitted
    over an hour reads as a trend. Random moments give a mean whose error is independent from
    one sample to the next.
    """
    slots = max(1, round(seconds / every))
    start = time.monotonic()
    reads: dict[str, list[dict[str, float]]] = {}
    for k in range(slots):
        time.sleep(max(0.0, start + (k + random.random()) * seconds / slots - time.monotonic()))
        for key, parts in rss_parts_mb(processes).items():
            reads.setdefault(key, []).append(parts)
    time.sleep(max(0.0, start + seconds - time.monotonic()))
    out = {}
    for key, rows in reads.items():
        totals = [r["total"] for r in rows]
        out[key] = {part: sum(r[part] for r in rows) / len(rows) for part in rows[0]}
        out[key].update(min=min(totals), max=max(totals), reads=len(rows))
    return out


def stacks_mb(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """Each process's RSS (MB) in its threads' stacks: the anonymous mappings of the thread stack
    size (``ulimit -s``) right after a guard page (``/proc/PID/smaps``). A stack's pages stay
    resident once a call has run deep on it, so a pool of threads that take turns at the deep
    work (decoding, serialising) grows in RSS until each has: a bounded warm-up, told apart here
    from the heap (``anon`` less this)."""
    size_kb = resource.getrlimit(resource.RLIMIT_STACK)[0] // 1024
    out = {}
    for key, text in proc_files(processes, "smaps"):
        total_kb, guard = 0, False
        for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
            head = block.split("\n", 1)[0].split()
            start, stop = (int(x, 16) for x in head[0].split("-"))
            kb = (stop - start) // 1024
            if guard and kb == size_kb and head[1] == "rw-p" and len(head) == 5:
                rss = re.search(r"^Rss:\s+(\d+)", block, re.M)
                total_kb += int(rss.group(1)) if rss else 0
            guard = kb == 4 and head[1] == "---p"
        out[key] = total_kb / 1024
    return out


def threads(processes: dict[str, psutil.Process]) -> dict[str, int]:
    """Each process's thread count (a step in RSS that comes with new threads shows here)."""
    out = {}
    for key, p in processes.items():
        try:
            out[key] = p.num_threads()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


ALLOCATOR_VARIABLES = ("MALLOC_", "LD_PRELOAD", "ARROW_DEFAULT_MEMORY_POOL")


def allocator_settings(processes: dict[str, psutil.Process]) -> dict[str, dict[str, str]]:
    """The ``MALLOC_*``, ``LD_PRELOAD`` and ``ARROW_DEFAULT_MEMORY_POOL`` variables of each process
    (read at every sample: the driver starts itself again under jemalloc,
    `actors.memory.preload_driver`)."""
    out = {}
    for key, p in processes.items():
        try:
            out[key] = {k: v for k, v in p.environ().items() if k.startswith(ALLOCATOR_VARIABLES)}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def summarise(samples: list[dict], warmup_s: float, max_lag_s: float | None = None) -> dict[str, dict | None]:
    """Each process's slope over the samples from ``warmup_s`` on; with ``max_lag_s``, over those
    of them taken while the run kept up (``lag_s`` at most that)."""
    keys = sorted({k for s in samples for k in s["rss_mb"]})
    out = {}
    for key in keys:
        pts = [(s["t_s"], s["rss_mb"][key]) for s in samples if key in s["rss_mb"] and s["t_s"] >= warmup_s
               and (max_lag_s is None or (s.get("lag_s") is not None and s["lag_s"] <= max_lag_s))]
        out[key] = slope_per_hour([p[0] for p in pts], [p[1] for p in pts])
    return out


_STATUS = re.compile(r"^(\S+) INFO perceiver_stream: status: .*?, lag ([0-9.]+) s", re.M)
# A run keeps up while its worst stream lags by at most this (a paced stream's lag is about a hop).
KEPT_UP_LAG_S = 1.0


def add_lag(samples: list[dict], started: str, run_log: Path) -> None:
    """Give each sample ``lag_s``: the worst lag the run's status lines (one every 30 s,
    `actors.status`) reported within 15 s of the sample's middle; None without one."""
    start = datetime.fromisoformat(started).timestamp()
    lines = [(datetime.fromisoformat(t).timestamp() - start, float(lag)) for t, lag in _STATUS.findall(run_log.read_text())]
    for sample in samples:
        near = [lag for t, lag in lines if abs(t - sample["t_s"]) <= 15.0]
        sample["lag_s"] = max(near) if near else None


def analyse(path: Path, warmup_s: float) -> dict:
    """A saved soak's slopes from ``warmup_s`` on, over its second half (after the high-water
    marks that a busy machine pushes the queues and allocators to), and over the samples taken
    while the run kept up with its paced streams.

    A run that falls behind real time (a machine that slows down) fills every in-flight slot and
    the model's batches: the model's and the driver's RSS step up by tens of MB while it is
    behind and come back when it has caught up, a bounded swing that a line read as a slope. The
    lags come from the run's log (`add_lag`) while the soak's work folder still holds it; the
    JSON keeps them."""
    result = json.loads(path.read_text())
    samples = result["samples"]
    run_log = Path(result.get("work_dir", "")) / "run.log"
    if samples and "lag_s" not in samples[0] and run_log.is_file():
        add_lag(samples, result["started"], run_log)
    half = samples[-1]["t_s"] / 2 if samples else 0.0
    return {"samples": samples, "slopes_mb_per_hour": summarise(samples, warmup_s),
            "second_half_mb_per_hour": summarise(samples, half),
            "kept_up_mb_per_hour": summarise(samples, warmup_s, KEPT_UP_LAG_S),
            "kept_up_samples": sum(1 for s in samples if s["t_s"] >= warmup_s and s.get("lag_s") is not None
                                   and s["lag_s"] <= KEPT_UP_LAG_S)}


def table(slopes: dict[str, dict | None]) -> str:
    lines = [f"{'process':<28} {'n':>4} {'first MB':>9} {'last MB':>9} {'MB/h':>8} {'95% (OLS)':>17} "
             f"{'95% (Newey-West)':>17} {'r1':>6}"]
    for key, s in slopes.items():
        if s is None:
            lines.append(f"{key:<28} (too few samples after the warm-up)")
            continue
        ols = f"[{s['lo']:.2f}, {s['hi']:.2f}]"
        nw = f"[{s['nw_lo']:.2f}, {s['nw_hi']:.2f}]"
        lines.append(f"{key:<28} {s['n']:>4} {s['first_mb']:>9.1f} {s['last_mb']:>9.1f} {s['slope_mb_h']:>8.2f} "
                     f"{ols:>17} {nw:>17} {s['r1']:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between RSS samples")
    ap.add_argument("--read-every", type=float, default=0.25,
                    help="the RSS readings a sample averages: one at a random moment of each slot of this many seconds")
    ap.add_argument("--warmup-minutes", type=float, default=5.0, help="left out of the slopes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    ap.add_argument("--analyse", type=Path, metavar="JSON", help="only (re)compute the slopes of a saved soak, into it")
    args = ap.parse_args(argv)
    if args.analyse is not None:
        slopes = analyse(args.analyse, args.warmup_minutes * 60)
        saved = json.loads(args.analyse.read_text())
        args.analyse.write_text(json.dumps({**saved, **slopes, "warmup_s": args.warmup_minutes * 60}, indent=1))
        print(f"after the first {args.warmup_minutes:g} minutes:\n{table(slopes['slopes_mb_per_hour'])}")
        print(f"second half:\n{table(slopes['second_half_mb_per_hour'])}")
        print(f"while the run kept up (lag at most {KEPT_UP_LAG_S:g} s; {slopes['kept_up_samples']} samples after the"
              f" first {args.warmup_minutes:g} minutes):\n{table(slopes['kept_up_mb_per_hour'])}")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pstream-soak-"))
    cfg_path = work / "soak.yaml"
    # The streams outlast the soak, so no stream ends (and frees its memory) while it is measured.
    cfg_path.write_text(yaml.safe_dump(soak_config(args.streams, args.minutes * 60 + 300)))
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "run", "--config", str(cfg_path),
           "--output", str(work / "out"), "--realtime", "--no-progress", "--no-dashboard"]
    log = (work / "run.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    driver = psutil.Process(proc.pid)
    result = {
        "command": " ".join(sys.argv), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "minutes": args.minutes, "streams": args.streams, "interval_s": args.interval, "read_every_s": args.read_every,
        "warmup_s": args.warmup_minutes * 60, "work_dir": str(work), "samples": [], "slopes_mb_per_hour": {},
        "allocator_env": {},  # per process: the allocator settings it runs with
    }
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    try:
        while time.monotonic() < end and proc.poll() is None:
            processes = actor_processes(driver)
            span = min(args.interval, end - time.monotonic())
            t_mid = time.monotonic() - t0 + span / 2
            means = interval_mean(processes, span, args.read_every)
            sample = {"t_s": round(t_mid, 1), "rss_mb": {k: m["total"] for k, m in means.items()},
                      "rss_parts_mb": means, "threads": threads(processes),
                      "stacks_mb": stacks_mb(processes), "copy_children_mb": copy_children_mb(driver)}
            result["allocator_env"].update(allocator_settings(processes))
            result["samples"].append(sample)
            result["slopes_mb_per_hour"] = summarise(result["samples"], result["warmup_s"])
            args.out.write_text(json.dumps(result, indent=1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # a clean drain
            try:
                proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["exit_code"] = proc.wait()
        result["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        args.out.write_text(json.dumps(result, indent=1))
        result.update(analyse(args.out, result["warmup_s"]))
        args.out.write_text(json.dumps(result, indent=1))
    print(table(result["slopes_mb_per_hour"]))
    print(f"while the run kept up ({result['kept_up_samples']} samples):\n{table(result['kept_up_mb_per_hour'])}")
    print(f"exit code {result['exit_code']}; JSON: {args.out}; run log: {work / 'run.log'}")
    return 0 if result["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
