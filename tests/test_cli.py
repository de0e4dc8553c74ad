"""The command line without running a pipeline: parsing, defaults, and exit code 2 as one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import run_pipeline

REPO = Path(__file__).resolve().parents[1]


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
    assert (args.output, args.max_windows, args.address) == (Path("o"), 3, "auto")
    assert (args.dashboard_host, args.metrics_port, args.realtime, args.no_dashboard) == ("0.0.0.0", 9100, True, True)


def test_only_implemented_subcommands_are_offered():
    assert set(run_pipeline.SUBCOMMANDS) >= {"run", "bench"}
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
    assert "run" in out and "bench" in out
