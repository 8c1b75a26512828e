"""mkdocs hook: executed tutorials, and figures from the last runs.

Two jobs, both at build time, so the site shows what the code does today rather than what
someone pasted:

- **Tutorials** (pages under ``tutorials/``): the page's ``python`` blocks run in order in one
  namespace, in a temporary working folder (as ``tests/test_docs.py`` runs them). After each
  block the page shows what it printed, and every PNG it wrote into the working folder, embedded
  in the page as a data URI. A block that raises fails the build. ``NEURALODE_DOCS_EXECUTE=0``
  skips the execution (the test of the build does, since the tutorials' own test runs them).
- **Run figures**: a line ``<!-- figure: runs/GLOB | caption -->`` on any page becomes the newest
  file that matches ``GLOB`` under the repository's ``runs/`` folder, embedded; where no run has
  written it yet, a note says which command makes it. The build ends by listing the figures it
  did not find, so ``make docs`` says which results are missing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.results")

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"```python\n(.*?)```\n?", flags=re.S)
FIGURE = re.compile(r"^<!-- figure: (?P<glob>\S+)(?: \| (?P<caption>.*?))? -->$", flags=re.M)
#: The command that writes each run folder's figures, for the note on a missing one.
MAKERS = {
    "runs/demo": "make demo",
    "runs/mnist-quick": "make mnist-quick",
    "runs/mnist-paper": "make mnist-paper",
    "runs/latent": "make latent",
    "runs/density": "make density",
    "runs/bench/compare": "make bench",
    "runs/bench/quick": "make bench-quick",
    "runs/bench/figure3": "make bench",
    "runs/bench/stiff": "make bench-stiff",
    "runs/examples/bouncing_balls": "python examples/bouncing_balls.py",
}

_missing: list[str] = []


def _image(data: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"


def _maker(pattern: str) -> str:
    for prefix, command in MAKERS.items():
        if pattern.startswith(prefix):
            return command
    return "the experiment that writes it"


def run_figures(markdown: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """Replace each figure marker with the newest matching file under ``root``; returns the new
    text and the patterns that matched nothing."""
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        pattern, caption = match["glob"], match["caption"] or ""
        found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
        if not found:
            missing.append(pattern)
            return (
                f'!!! note "Figure not built here"\n    `{pattern}` is written by '
                f"`{_maker(pattern)}`; no run of it was found when this site was built."
            )
        path = found[-1]
        name = f"`{path.relative_to(root)}`"
        where = f"*{caption}* ({name})" if caption else name
        return _image(path.read_bytes(), caption or path.name) + "\n\n" + where

    return FIGURE.sub(replace, markdown), missing


def execute(markdown: str, where: str) -> str:
    """Run the page's python blocks in order; return the page with each block's printed output
    and written PNGs after it."""
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    pieces: list[str] = []
    last = 0
    here = os.getcwd()
    import torch  # the tutorials train small models: one thread (two contend on small ops)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            seen: dict[str, float] = {}
            for i, match in enumerate(BLOCK.finditer(markdown)):
                pieces.append(markdown[last : match.end()])
                last = match.end()
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(match[1], f"{where} block {i}", "exec"), namespace)
                printed = out.getvalue().rstrip()
                if printed:
                    pieces.append(f"\n```text\n{printed}\n```\n")
                for png in sorted(Path(folder).glob("*.png")):
                    stamp = png.stat().st_mtime
                    if seen.get(png.name) != stamp:
                        seen[png.name] = stamp
                        pieces.append("\n" + _image(png.read_bytes(), png.stem) + "\n")
                pieces.append("\n")
        finally:
            os.chdir(here)
            torch.set_num_threads(threads)
    pieces.append(markdown[last:])
    return "".join(pieces)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    src = page.file.src_uri
    markdown, missing = run_figures(markdown)
    _missing.extend(missing)
    if src.startswith("tutorials/") and os.environ.get("NEURALODE_DOCS_EXECUTE", "1") != "0":
        log.info("executing %s", src)
        markdown = execute(markdown, f"docs/{src}")
    return markdown


def on_post_build(config: Any) -> None:
    if _missing:
        log.info(
            "results not found under runs/ (their pages say which command writes them): %s",
            ", ".join(sorted(set(_missing))),
        )
    _missing.clear()
