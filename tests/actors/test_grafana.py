"""The Grafana dashboard and alert rules name only series that `actors.metrics.Metrics` registers,
filter per-stream panels by the ``stream`` variable, and alert on a stalled stream and a restart."""

from __future__ import annotations

import json
import re
from functools import cached_property

import yaml

from actors.metrics import Metrics
from paths import REPO

SERIES = re.compile(r"\bray_pstream_\w+")


def registered() -> dict[str, str]:
    """Prometheus name (``ray_`` + the metric's name) -> kind, for every series of `Metrics`."""
    m = Metrics()
    out = {}
    for attr, value in vars(Metrics).items():
        if isinstance(value, cached_property):
            metric = getattr(m, attr)
            out["ray_" + metric.info["name"]] = type(metric).__name__.lower()
    return out


def names_ok(expr: str, series: dict[str, str]) -> list[str]:
    """The series ``expr`` names that are not registered (a histogram's _bucket/_sum/_count are)."""
    bad = []
    for name in SERIES.findall(expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in series and series.get(base) != "histogram":
            bad.append(name)
    return bad


def test_dashboard_and_alerts_name_registered_series_and_filter_by_stream():
    series = registered()
    new = {"ray_pstream_last_window_timestamp_seconds", "ray_pstream_restarts_total", "ray_pstream_build_info"}
    assert new <= set(series)

    dash = json.loads((REPO / "configs" / "grafana_dashboard.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "stream" in variables["stream"]["definition"] and variables["stream"]["includeAll"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert all(names_ok(e, series) == [] for e in exprs), [names_ok(e, series) for e in exprs]
    per_stream = [e for e in exprs if "by (stream" in e]
    assert len(per_stream) >= 4 and all('stream=~"$stream"' in e for e in per_stream)
    assert any("ray_pstream_last_window_timestamp_seconds" in e for e in per_stream)

    alerts = yaml.safe_load((REPO / "configs" / "grafana_alerts.yaml").read_text())
    rules = {r["uid"]: r for g in alerts["groups"] for r in g["rules"]}
    for rule in rules.values():
        queries = {d["refId"]: d["model"] for d in rule["data"]}
        assert rule["condition"] in queries and queries[rule["condition"]]["expression"] in queries
        for q in queries.values():
            assert names_ok(q.get("expr", ""), series) == []
    stalled = {d["refId"]: d["model"] for d in rules["pstream-stalled-stream"]["data"]}
    assert "time() - max by (stream) (ray_pstream_last_window_timestamp_seconds)" in stalled["A"]["expr"]
    assert stalled["C"]["conditions"][0]["evaluator"] == {"type": "gt", "params": [120]}
    restarting = {d["refId"]: d["model"] for d in rules["pstream-restarting-actor"]["data"]}
    assert "increase(ray_pstream_restarts_total[15m])" in restarting["A"]["expr"]
    assert restarting["C"]["conditions"][0]["evaluator"] == {"type": "gt", "params": [0]}
