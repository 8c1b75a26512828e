"""The documentation: the README's and the site's Python blocks run as written, every public
name has a docstring, and the site builds with ``mkdocs build --strict``."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_in_order(blocks: list[str], where: str) -> None:
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{where} block {i}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - report which block, then fail
            pytest.fail(f"{where}: python block {i} failed: {type(err).__name__}: {err}\n{block}")


def test_the_readme_has_python_blocks():
    assert len(python_blocks(README)) >= 5


def test_every_readme_python_block_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    run_in_order(python_blocks(README), "README.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_site_page_python_block_runs_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_in_order(python_blocks(page), str(page.relative_to(ROOT)))


def test_the_package_is_marked_typed():
    import neuralode

    assert (Path(neuralode.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize(
    "module",
    [
        "neuralode",
        "neuralode.nn",
        "neuralode.data.mnist",
        "neuralode.data.timeseries",
        "neuralode.data.toy2d",
        "neuralode.solvers",
    ],
)
def test_every_public_name_has_a_docstring(module):
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None) or [
        n
        for n, v in vars(mod).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module
    ]
    missing = [
        name
        for name in names
        if callable(getattr(mod, name)) and not (getattr(mod, name).__doc__ or "").strip()
    ]
    assert names and not missing, f"{module}: public names without a docstring: {missing}"


def test_the_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("needs the dev extra's mkdocs: pip install -e '.[dev]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    reference = (tmp_path / "site" / "api" / "neuralode" / "index.html").read_text()
    for name in ("solve", "odeint_event", "Event", "Solution", "GrazingEventError"):
        assert f'id="neuralode.{name}"' in reference, name
    # The CLI page is the parsers' own help: every command and every experiment's options.
    from neuralode import experiments

    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text()
    for command in ("train", "resume", "evaluate", "plot"):
        assert f"neuralode {command}" in cli_page, command
    for name in experiments.EXPERIMENTS:
        assert f"neuralode train {name}" in cli_page, name
    assert "--preset" in cli_page
