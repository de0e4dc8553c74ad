"""bench/soak.py's statistics: the OLS slope in MB per hour, its 95% t interval and its Newey-West interval."""

from __future__ import annotations

import importlib.util
import json
import mmap
import threading
import time

import numpy as np
import psutil
import pytest

from paths import REPO

_spec = importlib.util.spec_from_file_location("soak", REPO / "bench" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def test_t_quantiles():
    # Student's t 0.975 quantiles (from tables) at 1, 3, 10, 11, 20, 30, 100 degrees of freedom.
    want = {1: 12.706, 3: 3.182, 10: 2.228, 11: 2.201, 20: 2.086, 30: 2.042, 100: 1.984}
    assert {df: round(soak.t975(df), 3) for df in want} == pytest.approx(want, abs=3e-3)


def test_slope_and_interval():
    t = np.arange(0, 3600, 30.0)  # an hour at 30 s
    noise = np.random.default_rng(0).normal(0, 0.5, len(t))
    growing = soak.slope_per_hour(list(t), list(300 + 4.0 * t / 3600 + noise))
    assert growing["lo"] < 4.0 < growing["hi"] and growing["lo"] > 0 and growing["n"] == len(t)
    flat = soak.slope_per_hour(list(t), list(300 + noise))
    assert flat["lo"] < 0 < flat["hi"]
    # The interval is the textbook one: slope +- t * s / sqrt(Sxx).
    x = t / 3600
    b, a = np.polyfit(x, 300 + noise, 1)
    s = np.sqrt(np.sum((300 + noise - a - b * x) ** 2) / (len(t) - 2) / np.sum((x - x.mean()) ** 2))
    assert flat["slope_mb_h"] == pytest.approx(b) and flat["hi"] - flat["slope_mb_h"] == pytest.approx(soak.t975(len(t) - 2) * s)
    assert soak.slope_per_hour([0, 30], [1, 2]) is None


def test_summary_leaves_out_the_warm_up():
    samples = [{"t_s": t, "rss_mb": {"SourcePoolActor:1": (100.0 if t < 300 else 200.0) + t / 1e4}} for t in range(0, 1200, 30)]
    (only,) = soak.summarise(samples, 300).values()
    assert only["n"] == 30 and only["slope_mb_h"] == pytest.approx(0.36)  # 1e-4 MB/s, the step left out


def test_newey_west_interval_widens_for_autocorrelated_samples():
    # A random walk (each sample its predecessor plus noise) has no trend, but its OLS residuals
    # are strongly autocorrelated: the textbook interval is too narrow, Newey-West's is wider.
    t = np.arange(0, 3600, 30.0)
    walk = 300 + np.cumsum(np.random.default_rng(1).normal(0, 0.5, len(t)))
    s = soak.slope_per_hour(list(t), list(walk))
    assert s["r1"] > 0.5
    assert s["nw_hi"] - s["nw_lo"] > 1.5 * (s["hi"] - s["lo"])
    assert s["nw_lo"] < s["slope_mb_h"] < s["nw_hi"]
    # With independent noise the two agree to within the kernel's small-sample shrinkage.
    white = soak.slope_per_hour(list(t), list(300 + np.random.default_rng(2).normal(0, 0.5, len(t))))
    assert abs(white["r1"]) < 0.3
    assert 0.6 < (white["nw_hi"] - white["nw_lo"]) / (white["hi"] - white["lo"]) < 1.4
    assert soak.newey_west_lags(110) == 4 and soak.newey_west_lags(200) == 4 and soak.newey_west_lags(1000) == 6


def test_a_sample_is_the_mean_of_its_interval_readings():
    # 20 MiB mapped and written early in a 1 s interval: the sample's range spans that growth, its
    # mean lies within the range, and its parts add up to the total. Fresh mappings, since the
    # heap may hold freed pages of earlier tests that an allocation would reuse without growing.
    me = psutil.Process()
    ballast = []

    def grow():
        for _ in range(5):
            ballast.append(mmap.mmap(-1, 4 << 20))  # 4 MiB each, resident once written
            ballast[-1].write(b"\x01" * (4 << 20))
            time.sleep(0.05)

    before = me.memory_info().rss / 2**20
    worker = threading.Thread(target=grow)
    worker.start()
    (m,) = soak.interval_mean({"me": me}, 1.0, 0.02).values()
    worker.join()
    after = me.memory_info().rss / 2**20
    assert m["reads"] >= 10
    assert before - 1 <= m["min"] <= m["total"] <= m["max"] <= after + 1
    assert m["max"] - m["min"] >= 12  # it saw the growth, not one reading
    assert m["anon"] + m["file"] + m["shmem"] == pytest.approx(m["total"], abs=0.5)


def test_each_reading_falls_at_a_random_moment_of_its_own_slot(monkeypatch):
    # A fixed step would lock onto one phase of a periodic RSS cycle (the paced windows').
    moments: list[float] = []

    def read(processes):
        moments.append(time.monotonic())
        return {"me": {"total": 1.0, "anon": 1.0, "file": 0.0, "shmem": 0.0}}

    monkeypatch.setattr(soak, "rss_parts_mb", read)
    start = time.monotonic()
    (m,) = soak.interval_mean({"me": psutil.Process()}, 2.0, 0.02).values()
    assert m["reads"] == len(moments) == 100
    assert time.monotonic() - start >= 2.0
    slot = np.floor((np.asarray(moments) - start) / 0.02)
    phase = (np.asarray(moments) - start) / 0.02 - slot
    assert np.mean(slot == np.arange(100)) > 0.9  # each in its own slot (a loaded machine may wake one late)
    assert 0.2 < phase.std() < 0.37  # uniform: 0.29; a fixed step: about 0


def _deep(n: int) -> int:
    # Each level passes through C (sorted's key call), so it uses the thread's C stack.
    return 0 if n == 0 else sorted([n], key=lambda _: _deep(n - 1))[0]


def test_stack_rss_counts_what_a_thread_ran_deep_on_and_keeps_it():
    me = {"me": psutil.Process()}
    ran, release = threading.Event(), threading.Event()

    def work() -> None:
        _deep(300)
        ran.set()
        release.wait()

    before = soak.stacks_mb(me)["me"]
    thread = threading.Thread(target=work)
    thread.start()
    try:
        assert ran.wait(10)
        after = soak.stacks_mb(me)["me"]
    finally:
        release.set()
        thread.join()
    # ~5 KB per level: the 300 levels' pages stay resident after the calls returned.
    assert after - before > 0.5
    assert after < psutil.Process().memory_full_info().rss / 2**20


def test_samples_taken_while_the_run_fell_behind_are_left_out_of_the_kept_up_slope(tmp_path):
    # A flat actor that steps up by 20 MB while the run lags (its queues full), then comes back.
    started = "2026-12-07T10:00:00+00:00"
    behind = range(40, 60)
    lines = [f"2026-12-07T10:{30 * i // 60:02d}:{30 * i % 60:02d}.000+00:00 INFO perceiver_stream: status: "
             f"{i} windows, 16.0/s, lag {12.5 if i in behind else 0.4} s, restarts 0, in flight 32; s0 running"
             for i in range(1, 120)]
    (tmp_path / "run.log").write_text("\n".join(["2026-12-07T10:00:01.000+00:00 INFO ray: started", *lines]) + "\n")
    rng = np.random.default_rng(1)
    samples = [{"t_s": 30.0 * i, "rss_mb": {"ModelActor:1": 400 + (20 if i in behind else 0) + rng.normal(0, 0.3)}}
               for i in range(1, 120)]
    saved = tmp_path / "soak.json"
    saved.write_text(json.dumps({"started": started, "work_dir": str(tmp_path), "samples": samples}))
    out = soak.analyse(saved, 300)
    assert [s["lag_s"] for s in out["samples"][38:42]] == [0.4, 12.5, 12.5, 12.5]
    assert out["kept_up_samples"] == 110 - len(behind)  # samples 10..119 are past the warm-up
    whole = out["slopes_mb_per_hour"]["ModelActor:1"]
    kept = out["kept_up_mb_per_hour"]["ModelActor:1"]
    assert whole["n"] == 110 and kept["n"] == 90
    assert kept["nw_lo"] < 0 < kept["nw_hi"] and abs(kept["slope_mb_h"]) < 1
    assert abs(whole["slope_mb_h"] - kept["slope_mb_h"]) > 1  # the step moves the whole-run line
