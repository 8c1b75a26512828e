"""The ``neuralode`` command.

Usage::

    neuralode train EXPERIMENT [--config FILE] [--out DIR] [options]   # a new run folder
    neuralode resume RUN [--quiet] [--device D]     # continue a killed or finished run
    neuralode evaluate RUN [--device D]            # test metrics of the run's checkpoint
    neuralode plot RUN                             # redraw the run's figures

Commands are subparsers of the top-level parser, each with a handler ``_cmd_NAME(args) -> int``.
``train`` has one sub-command per experiment registered in
:data:`neuralode.experiments.EXPERIMENTS`. Every experiment runs on the training engine and
supplies ``CONFIG`` (its config dataclass: every field becomes a flag, ``--config FILE`` fills
them) and the rest of :class:`neuralode.experiments.engine.Experiment` (build, optimizer,
schedule, summary, figures); the engine's ``train``, ``evaluate`` and ``plot`` serve the commands.
The commands other than ``train`` find the run's experiment in ``RUN/config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from neuralode import experiments
from neuralode.experiments import engine
from neuralode.experiments.common import FIGURE_NEEDS, require
from neuralode.experiments.config import (
    add_config_arguments,
    flag_name,
    load_config_file,
    load_preset,
    resolve_config,
)

__all__ = ["build_parser", "main"]


def _version() -> str:
    try:
        return metadata.version("neuralode")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _requested_experiment(argv: Sequence[str]) -> str | None:
    """The experiment named after ``train`` in ``argv``, if any (only it gets imported)."""
    args = list(argv)
    if "train" in args:
        i = args.index("train")
        if i + 1 < len(args) and args[i + 1] in experiments.EXPERIMENTS:
            return args[i + 1]
    return None


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """Build the ``neuralode`` argument parser.

    Args:
        load: name of the experiment whose module is imported to add its options. Other
            experiments are listed by name only, so their modules are not imported.
    """
    parser = argparse.ArgumentParser(
        prog="neuralode",
        description="Neural ODE experiments: train models and write results into run folders.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train an experiment into a run folder", description="Train an experiment."
    )
    train.set_defaults(handler=_cmd_train)
    names = train.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name in experiments.EXPERIMENTS:
        summary = experiments.SUMMARIES[name]
        sub = names.add_parser(name, help=summary, description=summary)
        sub.set_defaults(leaf_parser=sub)
        if name == load:
            module = experiments.load(name)
            sub.description = (module.__doc__ or "").strip().split("\n\n")[0]
            add_config_arguments(sub, module.CONFIG, name)  # one flag per field of its config

    for name, summary in (
        ("resume", "continue a run from its last checkpoint (same config, same results)"),
        ("evaluate", "evaluate a run's checkpoint on its test data; writes RUN/evaluation.json"),
        ("plot", "redraw a run's figures from its metrics and checkpoint"),
    ):
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.set_defaults(leaf_parser=sub)
        sub.add_argument("run", metavar="RUN", help="run folder written by 'neuralode train'")
        if name != "plot":
            sub.add_argument(
                "--device",
                choices=("auto", "cpu", "cuda"),
                default=None,
                help="device (default: the run's own setting)",
            )
        if name == "resume":
            sub.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
            length = sub.add_mutually_exclusive_group()
            for flag, unit in (("--epochs", "epochs"), ("--iterations", "iterations")):
                length.add_argument(
                    flag,
                    type=int,
                    metavar="N",
                    help=f"train a run counted in {unit} to N {unit} in all (N greater than its "
                    "own; runs whose learning-rate schedule depends on their length refuse)",
                )
        sub.set_defaults(handler=_cmd_run_command)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    module = experiments.load(args.experiment)
    try:
        config = resolve_config(module.CONFIG, args, args.experiment)
        engine.train(module, config)
    except ValueError as exc:
        raise ValueError(_as_flags(str(exc), module.CONFIG, args)) from None
    return 0


def _as_flags(message: str, cls: type, args: argparse.Namespace) -> str:
    """``message`` with the settings a user gave as flags, or left at their defaults, named as
    the flags (``--batch-size``); those that came from a ``--config`` file or a ``--preset``
    keep their key."""
    from_file: set[str] = set()
    try:
        if getattr(args, "preset", None):
            from_file |= set(load_preset(args.experiment, args.preset))
        if getattr(args, "config", None):
            from_file |= set(load_config_file(args.config))
    except (OSError, ValueError):
        pass
    for f in dataclasses.fields(cls):
        name = f.name
        if name in from_file and name not in vars(args):
            continue
        flag = flag_name(name)
        # Names with an underscore are unmistakable anywhere; a one-word name ("model") is
        # replaced only where it is the subject of a requirement, not where it is plain English.
        pattern = rf"(?<![\w-]){name}(?!\w)" if "_" in name else rf"(?<![\w-]){name}(?= must)"
        message = re.sub(pattern, flag, message)
    return message


def _cmd_run_command(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    module = engine.experiment_of(run_dir)
    if args.command == "resume":
        config = engine.extended(engine.stored_config(module.CONFIG, run_dir, args), args)
        engine.train(module, config, resume_run=True)
    elif args.command == "evaluate":
        require(engine.stored_config(module.CONFIG, run_dir, args).data_requirements())
        result = engine.evaluate(module, run_dir, args)
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:  # plot
        require(FIGURE_NEEDS)
        if not engine.read_metrics(run_dir):
            raise ValueError(f"run {str(run_dir)!r} has no metrics yet: there is nothing to plot")
        for path in engine.plot(module, run_dir):
            print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``neuralode`` command on ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Usage errors return 2 with argparse's message; invalid settings (``ValueError``) are reported
    as ``neuralode: error: ...`` on stderr and also return 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load=_requested_experiment(argv))
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the command's own parser, with its usage line
            args.leaf_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.handler(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"neuralode: error: {exc}", file=sys.stderr)
        return 2
    except engine.TrainingFailed as exc:
        print(f"neuralode: error: {exc}", file=sys.stderr)
        return 1
    except engine.TrainingInterrupted as exc:
        print(f"neuralode: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("neuralode: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
