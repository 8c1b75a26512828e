"""The examples in the package's docstrings run and print what they say (``doctest``): an
example that no longer works is a wrong document.  Every module of ``neuralode`` is imported
and its examples run (about 2 s; the ESDIRK example solves Van der Pol with mu = 1e3)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import neuralode

# The package itself (``load_run``'s example lives in its __init__) and every submodule.
MODULES = ["neuralode"] + sorted(
    m.name
    for m in pkgutil.walk_packages(neuralode.__path__, "neuralode.")
    if "__main__" not in m.name
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_the_examples_are_found() -> None:
    """The collection is not empty: the solver modules carry examples."""
    found = {
        name: doctest.testmod(importlib.import_module(name), report=False).attempted
        for name in ("neuralode.solvers.esdirk", "neuralode.solvers.rosenbrock", "neuralode.solve")
    }
    assert all(n > 0 for n in found.values()), found
