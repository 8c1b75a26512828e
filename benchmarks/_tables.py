"""What the experiment table scripts (``latent_table.py``, ``density_table.py``,
``mnist_table.py``) share: the command line (run folders, a figure file and the runs to draw in
it) and the finish of a figure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def parse(doc: str, what: str, title: bool = False) -> argparse.Namespace:
    """Parse ``RUNS... [--figure PNG] [--curves LABEL=RUN...] [--title TEXT]``.

    Args:
        doc: the script's docstring (its first paragraph describes the command).
        what: the kind of run folders, for the help text.
        title: also take ``--title``.

    Returns:
        ``runs`` (the given folders that hold a ``config.json``), ``figure`` (a path or None),
        ``curves`` (``(label, run)`` pairs) and, when asked for, ``title``.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help=f"{what} run folders")
    parser.add_argument("--figure", type=Path, help="draw the --curves runs into this PNG")
    parser.add_argument(
        "--curves", nargs="*", default=[], help="LABEL=RUN: runs to draw against iterations"
    )
    if title:
        parser.add_argument("--title", default="", help="the figure's title")
    args = parser.parse_args()
    args.runs = [r for r in args.runs if (r / "config.json").is_file()]
    args.curves = [(c.rsplit("=", 1)[0], Path(c.rsplit("=", 1)[1])) for c in args.curves]
    return args


def save_figure(fig: Any, axes: Any, path: Path, title: str = "") -> None:
    """Grid and legend (where something is labelled) on each of ``axes``, the ``title`` above
    them, then ``path`` written at 100 dpi and the figure closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
