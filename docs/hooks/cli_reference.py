"""mkdocs hook: the CLI reference page, generated from the ``neuralode`` argument parsers.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; this replaces it with the help of
the command, of each subcommand and of each experiment (with its options), so the page always
says what the parsers accept.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-reference -->"


def _help(parser: argparse.ArgumentParser) -> str:
    return "```text\n" + parser.format_help().rstrip() + "\n```\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subcommands here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def reference() -> str:
    """The CLI reference in Markdown."""
    os.environ["COLUMNS"] = "100"  # argparse wraps its help at the terminal's width
    from neuralode import cli, experiments

    root = cli.build_parser()
    parts = ["## `neuralode`\n", _help(root)]
    commands = _subparsers(root)
    for name, sub in commands.items():
        parts += [f"## `neuralode {name}`\n", _help(sub)]
        if name == "train":
            for exp in experiments.EXPERIMENTS:
                loaded = _subparsers(_subparsers(cli.build_parser(load=exp))["train"])[exp]
                parts += [f"### `neuralode train {exp}`\n", _help(loaded)]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
