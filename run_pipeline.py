"""perceiver-stream's command line: ``python run_pipeline.py [run|train|eval|rig|distill|inspect|bench|compact|streams]``.

``run`` (the default) runs the pipeline over the config's streams on a local Ray (or the cluster
at ``--address``) and writes Parquet under the output folder. ``train`` trains the model on the
synthetic rig and files, ``eval`` scores a checkpoint on a held-out synthetic seed or files, ``rig``
renders the real-texture rig, ``distill`` distils a student offline (no Ray), ``inspect`` summarises an output folder and draws
its pictures; each prints JSON or lines. ``bench`` measures the model alone and the whole
pipeline on the same config and prints JSON; ``compact`` publishes an output folder's rows;
``streams`` adds, removes or lists the streams of a running pipeline.

Exit codes: 0 every stream ended normally, or a clean drain after SIGINT / SIGTERM; 1 every
stream failed or the run could not go on; 2 bad config or arguments; 3 some streams failed while
the others finished.

Each subcommand is one entry in ``SUBCOMMANDS``: a function that adds its arguments to its parser
and a function that runs it and returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NoReturn

from actors.memory import allocator_env, preload_driver

if __name__ == "__main__":
    preload_driver()  # before the imports below: the driver of a run of weeks under jemalloc too (actors.memory)

from jobs.compact import add_compact_arguments, cmd_compact
from jobs.distill import distill_job
from jobs.evaluate import MIN_WINDOWS, MODALITIES, evaluate, evaluate_config
from jobs.inspect import summarize, write_pictures
from jobs.rig_command import add_rig_arguments, cmd_rig
from jobs.streams import add_streams_arguments, cmd_streams
from jobs.train import train_job
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.logs import FORMATS, LEVELS, adopt_logger, setup_logging
from pipeline.outputfs import is_uri
from pipeline.preflight import check_paths
from pipeline.published import check_published
from pipeline.redact import redact_text
from pipeline.resume import prepare_output

CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIGS / "default.yaml"
TRAIN_CONFIG = CONFIGS / "train_synthetic.yaml"
DISTILL_CONFIG = CONFIGS / "distill_synthetic.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # 3 (some streams failed) comes from RunSummary.exit_code
EXIT_CODES = """exit codes:
  0  every stream ended normally, or a clean drain after SIGINT / SIGTERM
  1  every stream failed, or the run could not go on
  2  bad config or arguments
  3  some streams failed while the others finished"""


class UsageError(Exception):
    """Bad arguments: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (no usage block) through `UsageError`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _int_in(what: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_in("a positive integer", 1)
_port = _int_in("a port number in 1..65535", 1, 65535)
_seed = _int_in("a non-negative integer seed", 0)


# -- shared options ------------------------------------------------------------------------------
def add_config_arguments(p: argparse.ArgumentParser, default: Path = DEFAULT_CONFIG) -> None:
    """``--config`` (default ``default``) and repeatable ``--set``."""
    p.add_argument("--config", type=Path, default=default, help=f"YAML config (default: configs/{default.name})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. --set model.batch_size=4 (repeatable)")


def add_log_arguments(p: argparse.ArgumentParser) -> None:
    """``--log-level`` and ``--log-format`` (every subcommand)."""
    p.add_argument("--log-level", choices=LEVELS, default="info", help="least severe log records shown (default info)")
    p.add_argument("--log-format", choices=FORMATS, default="text",
                   help="log lines on stderr: text, or json (one object a line: ts, level, logger, msg, fields)")


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """Where Ray runs and what it exposes."""
    p.add_argument("--address", help="join this Ray cluster (e.g. ray://host:10001 or auto); default: start a local Ray")
    p.add_argument("--dashboard-host", default="127.0.0.1", help="interface the Ray dashboard binds to (default 127.0.0.1)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    p.add_argument("--metrics-port", type=_port, help="serve Prometheus metrics on this port (ray_pstream_* series)")


def load(args: argparse.Namespace) -> Config:
    """The validated config named by ``--config`` / ``--set`` (raises `ConfigError`)."""
    return load_config(args.config, args.overrides)


def start_ray(args: argparse.Namespace, num_cpus: int | None = None) -> bool:
    """Join ``--address`` or start a local Ray with the dashboard and metrics options.

    Returns False, starting nothing, when this process has already joined a Ray (a notebook, a
    test): the run uses it and leaves it running. Otherwise logs the dashboard and metrics endpoints.
    """
    import ray  # local import: Ray adds ~0.7 s to every start (--help, train, eval); only run and bench need it
    from actors.status import announce  # local import: the actors import Ray

    if ray.is_initialized():
        return False
    adopt_logger("ray")  # Ray's driver lines in our level and format (it set up its logger when imported)
    if args.address:
        ignored = [
            name
            for name, given in (
                ("--metrics-port", args.metrics_port is not None),
                ("--dashboard-host", args.dashboard_host != "127.0.0.1"),
                ("--no-dashboard", args.no_dashboard),
            )
            if given
        ]
        if ignored:
            logging.warning("%s belong to the cluster at %s and are ignored", ", ".join(ignored), args.address)
        announce(ray.init(address=args.address, log_to_driver=False, configure_logging=False).dashboard_url,
                 package_version())
        return True
    kwargs = {}
    if args.metrics_port is not None:
        kwargs["_metrics_export_port"] = args.metrics_port
    ctx = ray.init(
        address="local",  # a Ray of its own, even when another cluster runs on the machine (DESIGN "Operations")
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=not args.no_dashboard,
        dashboard_host=args.dashboard_host,
        log_to_driver=False,
        configure_logging=False,  # Ray's driver lines go through our handler (level, format, redaction)
        runtime_env={"env_vars": allocator_env()},  # every worker of the run (actors.memory)
        **kwargs,
    )
    announce(ctx.dashboard_url, package_version())
    return True


# -- run -----------------------------------------------------------------------------------------
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``run``."""
    add_config_arguments(p)
    p.add_argument("--output", help="output folder or pyarrow.fs URI, e.g. s3://bucket/prefix (default: output.dir)")
    p.add_argument("--max-windows", type=_positive_int, metavar="N", help="at most N windows per stream in this run")
    p.add_argument("--realtime", action="store_true", help="pace file and synthetic sources at media speed")
    p.add_argument("--no-progress", action="store_true",
                   help="no live display: a status line every --status-every seconds instead (as without a TTY)")
    p.add_argument("--status-every", type=float, default=30.0, metavar="S",
                   help="seconds between status lines without the live display (default 30)")
    add_ray_arguments(p)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline; returns the exit code."""
    import ray  # local import: Ray adds ~0.7 s to every start (--help, train, eval); only run and bench need it
    from actors.display import ProgressDisplay, print_summary  # local import: the actors import Ray
    from actors.runner import RunFailed, run  # local import: the actors import Ray
    from actors.signals import SignalDrain  # local import: only run drains on a signal
    from actors.status import StatusLine  # local import: the actors import Ray

    cfg = load(args)
    check_published(cfg)  # before Ray starts: a published model the windows cannot feed is exit 2
    output = (args.output if is_uri(args.output) else str(Path(args.output).resolve())) if args.output else cfg.output.dir
    check_paths(cfg)  # before Ray and before any folder: a missing file costs no cluster start
    prepare_output(cfg, output)
    live = not args.no_progress and sys.stderr.isatty()
    status = StatusLine(cfg.window.hop, args.status_every)
    drain = SignalDrain()
    started = start_ray(args)
    drain.install()
    try:
        with ProgressDisplay() if live else contextlib.nullcontext() as display:
            summary = run(cfg, output, max_windows=args.max_windows, realtime=args.realtime or None,
                          on_start=drain.attach, on_progress=display.update if live else status.update)
    except KeyboardInterrupt:
        print("interrupted before the actors started: stopped" if drain.pipeline is None else
              "interrupted again: stopped without draining; uncommitted windows are redone on resume", file=sys.stderr)
        return EXIT_FAILED
    except RunFailed as exc:
        print(f"run_pipeline.py: run failed: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        drain.restore()
        if started:
            ray.shutdown()
    print_summary(summary, output)
    return summary.exit_code


# -- bench ---------------------------------------------------------------------------------------
def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``bench``."""
    add_config_arguments(p)
    p.add_argument("--max-windows", type=_positive_int, metavar="N", help="windows per stream to time (default: all)")
    p.add_argument("--output", type=Path, help="scratch output folder (default: a temporary folder)")
    p.add_argument(
        "--student", type=Path, help="student checkpoint to time (default: a student of the model with random weights)"
    )
    p.add_argument("--repeat", type=_positive_int, default=3, metavar="N",
                   help="runs of each phase, interleaved; the medians are reported (default 3)")
    p.add_argument("--streams", type=_stream_counts, metavar="N,N,...",
                   help="instead: the pipeline on N synthetic streams sharing --total-windows, for each N "
                        "(windows/s, first commit, peak RSS), each on a fresh local Ray")
    p.add_argument("--replicas", type=_stream_counts, metavar="N,N,...",
                   help="instead: 64 streams of replayed windows through N model replicas standing in for GPUs "
                        "(200 ms a batch), for each N, on one local 4-node Ray (windows/s, ratio, CPU ms per window)")
    p.add_argument("--total-windows", type=_positive_int, default=768, metavar="N",
                   help="with --streams or --replicas: windows at every point, split evenly over its streams "
                        "(default 768)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="with --streams or --replicas: drain a point's run after S seconds (default 300)")
    add_ray_arguments(p)


def _stream_counts(text: str) -> list[int]:
    """``--streams 4,16,64`` (or ``--replicas 1,2,4``) as a list of positive counts."""
    return [_positive_int(x) for x in text.split(",")]


def cmd_bench(args: argparse.Namespace) -> int:
    """Print the bench JSON; returns the exit code."""
    import ray  # local import: Ray adds ~0.7 s to every start (--help, train, eval); only run and bench need it
    from actors.bench import bench  # local import: the actors import Ray

    cfg = load(args)
    check_published(cfg)
    if args.replicas or args.streams:
        from actors.replica_bench import bench_replicas  # local import: the actors import Ray
        from actors.scale_bench import bench_streams  # local import: the actors import Ray

        sizes = {"total_windows": args.total_windows, "timeout_s": args.timeout, "output": args.output}
        table = (bench_replicas(cfg, args.replicas, **sizes) if args.replicas else
                 bench_streams(cfg, args.streams, **sizes, start_ray=lambda: start_ray(args)))
        print(json.dumps(table, indent=2))
        return EXIT_OK
    if args.student is not None and not (args.student / "config.json").is_file():
        raise UsageError(f"--student {args.student}: not a checkpoint folder (no config.json)")
    started = start_ray(args)
    try:
        result = bench(cfg, max_windows=args.max_windows, output=args.output, student=args.student,
                       repeat=args.repeat)
    finally:
        if started:
            ray.shutdown()
    print(json.dumps(result, indent=2))
    return EXIT_OK


# -- train ---------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``train``."""
    add_config_arguments(p, TRAIN_CONFIG)
    p.add_argument(
        "--no-resume", action="store_true", help="start afresh instead of resuming from the latest periodic checkpoint"
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train per the config's ``train`` section; prints the summary JSON."""
    result = train_job(load(args), resume=not args.no_resume, progress=True)
    print(json.dumps(result, indent=2))
    return EXIT_OK


# -- eval ----------------------------------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``eval``."""
    p.add_argument("--seed", type=_seed, help="synthetic rig to evaluate on (not a training seed)")
    p.add_argument("--config", type=Path, help="instead of --seed: score the recorded streams of this config's eval.data")
    p.add_argument(
        "--drop", metavar="MODALITY", help=f"remove a modality from every window ({', '.join(MODALITIES)}; "
        "several separated by commas, e.g. video,audio to score the points alone)"
    )
    p.add_argument(
        "--checkpoint", type=Path, help="model checkpoint folder (default: model.checkpoint of configs/default.yaml)"
    )
    p.add_argument("--student", type=Path, help="also score this student checkpoint against the model")
    p.add_argument(
        "--windows", type=_positive_int, default=MIN_WINDOWS, metavar="N", help=f"windows to score (>= {MIN_WINDOWS})"
    )


def default_checkpoint() -> str:
    """The checkpoint ``configs/default.yaml`` runs (``model.checkpoint``); ConfigError if none."""
    path = load_config(DEFAULT_CONFIG).model.checkpoint
    if path is None:
        raise ConfigError(f"{DEFAULT_CONFIG} names no model.checkpoint; pass --checkpoint PATH")
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a held-out seed; prints the metrics JSON."""
    if (args.seed is None) == (args.config is None):
        raise UsageError("eval needs one of --seed (a synthetic rig) or --config (its eval.data)")
    checkpoint = args.checkpoint if args.checkpoint is not None else default_checkpoint()
    try:
        result = (evaluate_config(checkpoint, args.config, drop=args.drop) if args.config is not None else
                  evaluate(checkpoint, args.seed, drop=args.drop, student=args.student, windows=args.windows))
    except PipelineError as exc:  # a refused seed, or a checkpoint that does not load: bad arguments
        raise UsageError(str(exc)) from None
    print(json.dumps(result, indent=2))
    return EXIT_OK


# -- distill -------------------------------------------------------------------------------------
def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``distill``."""
    add_config_arguments(p, DISTILL_CONFIG)


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a student from ``model.checkpoint`` on the config's streams, without Ray; prints JSON."""
    try:
        result = distill_job(load(args), progress=True)
    except PipelineError as exc:  # a bad config, or a teacher that does not load
        raise UsageError(str(exc)) from None
    print(json.dumps(result, indent=2))
    return EXIT_OK


# -- inspect -------------------------------------------------------------------------------------
def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``inspect``."""
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="a run's output folder")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print one summary line per stream and write the pictures under ``OUTPUT_DIR/_inspect/``."""
    if not args.output_dir.is_dir():
        raise UsageError(f"{args.output_dir} is not a folder")
    try:
        for s in summarize(args.output_dir):
            print(redact_text(s.line()))
        pictures = write_pictures(args.output_dir)
    except PipelineError as exc:  # not an output folder
        raise UsageError(str(exc)) from None
    print(f"{len(pictures)} pictures under {args.output_dir / '_inspect'}:")
    for path in pictures:
        print(f"  {path}")
    return EXIT_OK


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its help line, how it adds arguments, and what runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {
    "run": Subcommand("run the pipeline (the default)", add_run_arguments, cmd_run),
    "train": Subcommand("train the model on the synthetic rig (checkpoints, resume)", add_train_arguments, cmd_train),
    "eval": Subcommand("score a checkpoint (and a student) on a held-out synthetic seed, as JSON", add_eval_arguments,
                       cmd_eval),
    "rig": Subcommand("render the real-texture rig (clips, true flow, labels)", add_rig_arguments, cmd_rig),
    "distill": Subcommand("distil a student offline from model.checkpoint (no Ray), as JSON", add_distill_arguments,
                          cmd_distill),
    "inspect": Subcommand("summarise an output folder and write pictures under OUTPUT_DIR/_inspect/",
                          add_inspect_arguments, cmd_inspect),
    "bench": Subcommand("model-only vs whole-pipeline throughput, as JSON", add_bench_arguments, cmd_bench),
    "compact": Subcommand("publish an output folder's committed rows, apply retention; JSON", add_compact_arguments,
                          cmd_compact),
    "streams": Subcommand("add, remove or list the streams of a running pipeline (--output its folder), as JSON",
                          add_streams_arguments, cmd_streams),
}


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from a tree that was never installed)."""
    try:
        return version("perceiver-stream")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The parser with one sub-parser per entry of ``SUBCOMMANDS``."""
    parser = _Parser(
        prog="run_pipeline.py",
        description="perceiver-stream: Perceiver IO over live sensor streams on Ray (default subcommand: run).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"perceiver-stream {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, sc in SUBCOMMANDS.items():
        p = sub.add_parser(
            name, help=sc.help, description=sc.help, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sc.add_arguments(p)
        add_log_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code."""
    if argv is None:
        preload_driver()  # the `perceiver-stream` script (done before the imports for run_pipeline.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "run")
    try:
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level, args.log_format)
        return SUBCOMMANDS[args.command].main(args)
    except (UsageError, ConfigError) as exc:
        print(f"run_pipeline.py: error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
