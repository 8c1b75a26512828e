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


def public_names(module: str) -> list[str]:
    """``__all__``, or the names a module defines that do not start with ``_``."""
    mod = importlib.import_module(module)
    return list(getattr(mod, "__all__", None) or []) or [
        n
        for n, v in vars(mod).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module
    ]


def test_the_readme_has_python_blocks():
    assert len(python_blocks(README)) >= 1


def test_every_readme_python_block_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    run_in_order(python_blocks(README), "README.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_site_page_python_block_runs_in_order(page, tmp_path, monkeypatch, one_thread):
    # The tutorials train small models: one thread (two contend on this 2-core machine).
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    run_in_order(python_blocks(page), str(page.relative_to(ROOT)))


def test_the_package_is_marked_typed():
    import neuralode

    assert (Path(neuralode.__file__).parent / "py.typed").is_file()


#: The modules whose public names the API reference documents.
DOCUMENTED = [
    "neuralode",
    "neuralode.nn",
    "neuralode.data.mnist",
    "neuralode.data.timeseries",
    "neuralode.data.toy2d",
    "neuralode.solvers",
]


@pytest.mark.parametrize("module", DOCUMENTED)
def test_every_public_name_has_a_docstring(module):
    mod = importlib.import_module(module)
    names = public_names(module)
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
    # The tutorials run in their own test (above); here the build only renders them.
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", NEURALODE_DOCS_EXECUTE="0")
    out = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    # The API reference has every public name of neuralode, neuralode.nn and neuralode.data.
    for page, module in [
        ("neuralode", "neuralode"),
        ("nn", "neuralode.nn"),
        ("data", "neuralode.data.mnist"),
        ("data", "neuralode.data.timeseries"),
        ("data", "neuralode.data.toy2d"),
    ]:
        reference = (tmp_path / "site" / "api" / page / "index.html").read_text()
        missing = [n for n in public_names(module) if f'id="{module}.{n}"' not in reference]
        assert not missing, f"api/{page}.md lacks {module}: {missing}"
        # Sphinx roles render as code (docs/hooks/roles.py), examples as code blocks: an
        # ``Example:`` section (singular) would be a quotation with the code run together.
        assert ":class:" not in reference and ":func:" not in reference, page
        assert "<blockquote>" not in reference, page
    # The CLI page is the parsers' own help: every command and every experiment's options.
    from neuralode import experiments

    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text()
    for command in ("train", "resume", "evaluate", "plot"):
        assert f"neuralode {command}" in cli_page, command
    for name in experiments.EXPERIMENTS:
        assert f"neuralode train {name}" in cli_page, name
    assert "--preset" in cli_page


def _results_hook():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_hook", ROOT / "docs/hooks/results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_executed_page_shows_each_blocks_output_and_figures(tmp_path, monkeypatch):
    """The site's tutorials are executed at build time: each block's printed output follows it,
    a PNG the block wrote is embedded after it (once, where it was written), and a block that
    raises fails the build, naming the page and block."""
    hook = _results_hook()
    page = (
        "Intro\n\n```python\nx = 2\nprint('x is', x)\n```\n\nMiddle\n\n"
        "```python\nimport matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([0, x])\nplt.savefig('line.png')\nplt.close()\n```\n\n"
        "```python\nprint(x + 1)\n```\nEnd\n"
    )
    here = os.getcwd()
    out = hook.execute(page, "page.md")
    assert os.getcwd() == here
    assert out.count("```text\nx is 2\n```") == 1
    assert out.index("x is 2") < out.index("Middle") < out.index("data:image/png;base64,")
    assert out.count("data:image/png;base64,") == 1  # not again after the third block
    assert out.index("data:image/png") < out.index("```text\n3\n```") < out.index("End")
    with pytest.raises(ZeroDivisionError):
        hook.execute("```python\n1 / 0\n```\n", "bad.md")
    assert os.getcwd() == here


def test_run_figures_embed_the_newest_run_or_say_which_command_makes_it(tmp_path):
    hook = _results_hook()
    page = "<!-- figure: runs/latent-*/figures/predictions.png | Figure 8 -->\n"
    text, missing = hook.run_figures(page, root=tmp_path)
    assert missing == ["runs/latent-*/figures/predictions.png"]
    assert "`make latent`" in text and "data:image" not in text
    for n, name in enumerate(["latent-ode-30", "latent-ode-50"]):
        folder = tmp_path / "runs" / name / "figures"
        folder.mkdir(parents=True)
        (folder / "predictions.png").write_bytes(bytes([n]) * 8)
        os.utime(folder / "predictions.png", (1000 + n, 1000 + n))
    text, missing = hook.run_figures(page, root=tmp_path)
    assert missing == []
    assert "runs/latent-ode-50/figures/predictions.png" in text and "Figure 8" in text
    assert "data:image/png;base64,AQEBAQEBAQE=" in text  # the newest file's bytes


def _takes_arguments(obj: object) -> bool:
    import inspect

    target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "cls") for p in params)


def _returns_something(obj: object) -> bool:
    import inspect

    if inspect.isclass(obj):
        return False
    annotation = inspect.signature(obj).return_annotation  # type: ignore[arg-type]
    return annotation not in (None, "None", inspect.Signature.empty)


@pytest.mark.parametrize("module", DOCUMENTED)
def test_every_public_name_documents_its_arguments_returns_and_an_example(module):
    """The issue's bar for a public docstring: the arguments (``Args:``, or ``Attributes:`` for
    a record), what it returns (``Returns:``/``Yields:``), and a short example (``>>>``, run by
    ``tests/test_docstrings.py``)."""
    import inspect

    mod = importlib.import_module(module)
    gaps = []
    for name in public_names(module):
        obj = getattr(mod, name)
        if not callable(obj) or isinstance(obj, dict):
            continue
        doc = inspect.getdoc(obj) or ""
        if ">>>" not in doc:
            gaps.append(f"{name}: no example")
        if _takes_arguments(obj) and not re.search(r"^(Args|Attributes|Parameters):", doc, re.M):
            gaps.append(f"{name}: no Args")
        if _returns_something(obj) and not re.search(r"^(Returns|Yields):", doc, re.M):
            gaps.append(f"{name}: no Returns")
    assert not gaps, f"{module}: " + "; ".join(gaps)
