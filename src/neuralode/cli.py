"""The ``neuralode`` command.

Usage::

    neuralode train spiral [--out DIR] [--iters N] [--method M] [--seed S] [--quiet]

Commands are subparsers of the top-level parser, each with a handler ``_cmd_NAME(args) -> int``.
``train`` has one sub-command per experiment registered in
:data:`neuralode.experiments.EXPERIMENTS`; each experiment module supplies
``add_arguments(parser)`` and ``train(args)``. Commands planned next (``evaluate RUN``,
``resume RUN``, ``plot RUN``) slot in the same way: a subparser in :func:`build_parser` and a
handler that calls the matching function of the run's experiment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from neuralode import experiments

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
        sub = names.add_parser(name, help=f"the {name} experiment")
        if name == load:
            module = experiments.load(name)
            sub.description = (module.__doc__ or "").strip().split("\n\n")[0]
            module.add_arguments(sub)
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    module = experiments.load(args.experiment)
    module.train(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``neuralode`` command on ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Usage errors return 2 with argparse's message; invalid settings (``ValueError``) are reported
    as ``neuralode: error: ...`` on stderr and also return 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(load=_requested_experiment(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.handler(args))
    except ValueError as exc:
        print(f"neuralode: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuralode: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
