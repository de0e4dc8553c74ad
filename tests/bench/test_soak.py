"""bench/soak.py's statistics: the OLS slope in MB per hour and its 95% t interval."""

from __future__ import annotations

import importlib.util

import numpy as np
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
