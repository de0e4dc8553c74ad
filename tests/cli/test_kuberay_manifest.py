"""configs/kuberay_rayjob.yaml: the RayJob's entrypoint is a command line the CLI's own parser
takes, and the config it names (the ConfigMap mounted where the entrypoint looks) is valid."""

from __future__ import annotations

import json
import shlex
import tomllib
from pathlib import Path

import yaml

import run_pipeline
from paths import REPO
from pipeline.config import parse_config

MANIFEST = REPO / "configs" / "kuberay_rayjob.yaml"


def test_the_rayjob_entrypoint_parses_with_the_cli_and_its_config_is_valid():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    job = docs["RayJob"]
    program, *argv = shlex.split(job["spec"]["entrypoint"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[program] == "run_pipeline:main"
    args = run_pipeline.build_parser().parse_args(["run", *argv])  # main() makes `run` the default
    assert (args.command, args.address, args.no_progress) == ("run", "auto", True)

    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in head["volumes"] if v["name"] == "config")
    config_map = docs["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert args.config == Path(mount["mountPath"]) / next(iter(config_map["data"]))
    cfg = parse_config(yaml.safe_load(config_map["data"][args.config.name]))
    assert cfg.model.replicas == "auto" and cfg.output.dir.startswith("s3://")
    # A stream pinned by a custom resource: one worker group's nodes hold it.
    pins = {s.node for s in cfg.streams if s.node is not None}
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    # KubeRay's form: a JSON string of a JSON object, as `ray start --resources` takes it.
    held = [json.loads(json.loads(g["rayStartParams"]["resources"]))
            for g in groups if "resources" in g["rayStartParams"]]
    assert pins and all(sum(pin in r for r in held) == 1 for pin in pins)
