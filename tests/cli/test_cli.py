"""The command line without running a pipeline: parsing, defaults, exit code 2 as one line, and
the Ray-free subcommands (train, eval, inspect) on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import run_pipeline
from jobs.datasets import default_data_settings
from paths import REPO
from perceiver_stream.checkpoint import load_checkpoint, read_config
from perceiver_stream.config import StreamingConfig
from perceiver_stream.distill import Distiller
from pipeline.config import DistillConfig
from pipeline.parquet import FlowRow, OutputWriter, WindowRow



def parse(argv: list[str]):
    return run_pipeline.build_parser().parse_args(argv)


def test_run_is_the_default_subcommand_with_documented_defaults():
    args = parse(["run"])
    assert args.config == run_pipeline.DEFAULT_CONFIG and args.config.is_file()
    assert args.dashboard_host == "127.0.0.1" and not args.no_dashboard
    assert args.overrides == [] and args.output is None and args.max_windows is None
    assert args.metrics_port is None and args.address is None and not args.realtime


def test_run_options():
    args = parse(
        ["run", "--set", "model.batch_size=4", "--set", "window.hop=0.25", "--output", "o", "--max-windows", "3"]
        + ["--address", "auto", "--dashboard-host", "0.0.0.0", "--metrics-port", "9100", "--realtime", "--no-dashboard"]
    )
    assert args.overrides == ["model.batch_size=4", "window.hop=0.25"]
    assert (args.output, args.max_windows, args.address) == ("o", 3, "auto")  # a path or a URI
    assert (args.dashboard_host, args.metrics_port, args.realtime, args.no_dashboard) == ("0.0.0.0", 9100, True, True)


def test_only_implemented_subcommands_are_offered():
    assert set(run_pipeline.SUBCOMMANDS) == {"run", "train", "eval", "rig", "distill", "inspect", "bench", "compact",
                                            "streams"}
    for name, sc in run_pipeline.SUBCOMMANDS.items():
        assert callable(sc.main) and sc.help


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max-windows", "0"], "positive integer"),
        (["--metrics-port", "99999"], "port"),
        (["--no-such-option"], "unrecognized arguments"),
        (["--set", "model.batch_size=0"], "model.batch_size"),
        (["--set", "nonsense"], "dotted.key=value"),
        (["--set", "model.batchsize=4"], "unknown key"),
        (["--config", "/nonexistent/config.yaml"], "does not exist"),
    ],
)
def test_bad_arguments_and_config_exit_2_with_one_line(argv, needle, capsys):
    assert run_pipeline.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("run_pipeline.py: error:") and needle in err


def test_bad_config_from_a_shell_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams: []\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "run_pipeline.py"), "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "streams" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        run_pipeline.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in run_pipeline.SUBCOMMANDS)


# -- train / eval / inspect ----------------------------------------------------------------------
SMOKE = REPO / "configs" / "train_smoke.yaml"
TRAIN_SEEDS = [0, 1, 2, 3]  # train_smoke.yaml's


def json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def flow_yaml(data: dict) -> str:
    """``data`` as one line of YAML for ``--set`` (JSON would not do: YAML reads ``1e-05`` as a string)."""
    return yaml.safe_dump(json.loads(json.dumps(data)), default_flow_style=True, width=1 << 20).strip()


def train_argv(out: Path, model: StreamingConfig) -> list[str]:
    """``train`` on the smoke config's seeds, cut to two steps (a checkpoint each) on short streams,
    of the tiny ``model`` with frames and audio as it reads them."""
    data = default_data_settings(model)
    sets = [f"output.dir={out}", "train.steps=2", "train.checkpoint_every=1", "train.seconds=3",
            "train.final_eval=false", f"video.size={json.dumps(data['video']['size'])}",
            f"audio.rate={data['audio']['rate']}", f"train.model={flow_yaml(model.to_dict())}"]
    return ["train", "--config", str(SMOKE), *(arg for s in sets for arg in ("--set", s))]


@pytest.fixture(scope="module")
def trained(rig_config, tmp_path_factory) -> Path:
    """A checkpoint of the tiny model made by ``train`` (see `train_argv`)."""
    out = tmp_path_factory.mktemp("train")
    torch.set_num_threads(1)
    assert run_pipeline.main(train_argv(out, rig_config)) == 0
    return out


def test_train_writes_a_checkpoint_and_prints_its_summary(trained, rig_config, capsys):
    assert (trained / "checkpoint" / "config.json").is_file()
    assert sorted(p.name for p in (trained / "_checkpoints" / "train").iterdir()) == ["step-0000001", "step-0000002"]
    model, meta = read_config(trained / "checkpoint")
    assert meta["train_seeds"] == TRAIN_SEEDS and meta["step"] == 2 and model == rig_config
    # Resuming at the last step trains nothing more and says where it resumed from.
    capsys.readouterr()
    assert run_pipeline.main(train_argv(trained, rig_config)) == 0
    summary = json_out(capsys)
    assert summary["checkpoint"] == str(trained / "checkpoint") and summary["resumed_from"] == 2
    assert summary["steps"] == 2 and summary["params"] > 0


def test_eval_prints_the_metrics_of_a_checkpoint_and_its_student(trained, tmp_path, capsys):
    teacher, meta = load_checkpoint(trained / "checkpoint")
    student = Distiller(teacher, DistillConfig(), metadata={"train_seeds": meta["train_seeds"]}).save(tmp_path / "s")
    argv = ["eval", "--seed", "77", "--checkpoint", str(trained / "checkpoint"), "--student", str(student)]
    assert run_pipeline.main(argv) == 0
    result = json_out(capsys)
    assert {"label_accuracy", "label_chance", "flow_epe", "flow_epe_zero", "cosine_to_teacher"} <= set(result)
    assert result["windows"] == 200 and result["seed"] == 77
    assert 0 <= result["label_accuracy"] <= 1 and 0 < result["label_chance"] <= 1
    assert result["flow_epe"] > 0 and result["flow_epe_zero"] > 0 and -1 <= result["cosine_to_teacher"] <= 1

    argv = ["eval", "--seed", "77", "--checkpoint", str(trained / "checkpoint"), "--drop", "video"]
    assert run_pipeline.main(argv) == 0
    dropped = json_out(capsys)
    assert dropped["drop"] == "video" and dropped["flow_epe"] is None and dropped["flow_epe_zero"] is None
    assert "cosine_to_teacher" not in dropped


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--seed", "2"], "seed 2"),  # a training seed
        (["--seed", "77", "--drop", "smell"], "smell"),
        (["--seed", "77", "--windows", "10"], "200"),
        (["--seed", "-1"], "non-negative"),
        ([], "one of --seed"),
        (["--seed", "77", "--config", "x.yaml"], "one of --seed"),
    ],
)
def test_eval_refuses_training_seeds_and_bad_arguments_with_exit_2(trained, extra, needle, capsys):
    assert run_pipeline.main(["eval", "--checkpoint", str(trained / "checkpoint"), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and needle in captured.err


def test_eval_of_a_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert run_pipeline.main(["eval", "--seed", "77", "--checkpoint", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_inspect_prints_a_line_per_stream_and_writes_its_pictures(tmp_path, capsys):
    rng = np.random.default_rng(0)
    with OutputWriter(tmp_path, model_name="m", config_hash="h") as w:
        for sid in ("cam0", "cam1"):
            rows = [WindowRow(i, 0.5 * i, 0.5 * i + 1, True, True, False, i == 0, [("walk", 0.8), ("run", 0.2)],
                              rng.normal(size=4).astype(np.float32), "m") for i in range(3)]
            flows = [FlowRow(i, 0.5 * i + 0.9, rng.normal(size=(6, 5, 2)).astype(np.float32)) for i in range(3)]
            w.write(sid, rows, flow=flows)
    assert run_pipeline.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cam0: 3 windows" in out and "cam1: 3 windows" in out
    pictures = sorted((tmp_path / "_inspect").glob("*.png"))
    assert [p.name for p in pictures] == ["flow_cam0.png", "flow_cam1.png", "labels_cam0.png", "labels_cam1.png"]
    assert all(str(p) in out for p in pictures)
    assert all(min(Image.open(p).size) > 50 for p in pictures)


def test_inspect_of_a_folder_without_outputs_is_exit_2(tmp_path, capsys):
    assert run_pipeline.main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
