"""Every Python block of the README runs as written, in order (one namespace, as a reader pasting
them into one session would)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


def test_every_python_block_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for i, block in enumerate(BLOCKS):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - report which block, then fail
            pytest.fail(f"README python block {i} failed: {type(err).__name__}: {err}\n{block}")


def test_the_package_is_marked_typed():
    import neuralode

    assert (Path(neuralode.__file__).parent / "py.typed").is_file()
