"""Every method converges at its stated order, and so does its dense output.

Each method is driven with constant steps ``h = T/N`` -- fixed-step methods through ``step_size``,
adaptive ones through ``first_step=h`` with ``rtol = atol = 1e10`` (every step accepted) and
``ifactor=1`` (the step never grows), which the test confirms by ``n_accepted == N`` and
``n_rejected == 0``.  The global error at ``T`` against the exact solution, over four step sizes
halving each time, gives a least-squares log-log slope that must be within 0.3 of
``tableau.order``.

Dense output: the same constant-step solves, evaluated at the midpoints of the steps (never on the
step grid).  The global error there is ``O(h^p)`` (the error carried from the step start) plus the
interpolant's local error ``O(h^(q+1))``, so the slope must be at least ``min(p, q + 1) - 0.3``
with ``q = tableau.dense.order``.

Problems (float64, non-autonomous so the stage nodes ``c`` matter):

* ``"cos"`` on ``[0, 8]``: ``y0' = y0 cos t`` (``y0 = exp(sin t)``) and the nonlinear
  ``y1' = -2 t y1^2`` (``y1 = 1/(1 + t^2)``); for orders up to 5.
* ``"chirp"`` on ``[0, 4]``: a rotation with angular speed ``1 + t`` (``theta = t + t^2/2``);
  for order 8, where ``"cos"`` reaches round-off before its asymptotic regime.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import ALL_METHODS

import neuralode
from neuralode import get_solver
from neuralode.solvers.esdirk import Esdirk, NewtonSettings
from neuralode.solvers.tableaus import ESDIRK_TABLEAUS

DTYPE = torch.float64


def _cos_f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([y[0] * torch.cos(t), -2 * t * y[1] ** 2])


def _cos_exact(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.exp(torch.sin(t)), 1 / (1 + t**2)], dim=-1)


def _chirp_f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = 1 + t
    return torch.stack([-w * y[1], w * y[0]])


def _chirp_exact(t: torch.Tensor) -> torch.Tensor:
    th = t + t**2 / 2
    return torch.stack([torch.cos(th), torch.sin(th)], dim=-1)


PROBLEMS = {
    "cos": (_cos_f, _cos_exact, (1.0, 1.0), 8.0),
    "chirp": (_chirp_f, _chirp_exact, (1.0, 0.0), 4.0),
}

# Per order: the problem and the step counts N (h = T/N).  The ranges keep the errors between
# about 1e-1 and 1e-13: in the asymptotic regime and clear of float64 round-off.
PLAN = {
    1: ("cos", (64, 128, 256, 512)),
    2: ("cos", (32, 64, 128, 256)),
    3: ("cos", (32, 64, 128, 256)),
    4: ("cos", (32, 64, 128, 256)),
    5: ("cos", (64, 128, 256, 512)),
    6: ("chirp", (16, 32, 64, 128)),
    8: ("chirp", (16, 32, 64, 128)),
}


def _constant_step_solve(method: str, problem: str, n: int, dense: bool) -> neuralode.Solution:
    f, _, y0, T = PROBLEMS[problem]
    h = T / n  # T and n are powers of two: t accumulates exactly, no sliver step at the end
    if get_solver(method).adaptive:
        kw = dict(first_step=h, rtol=1e10, atol=1e10, ifactor=1.0)
    else:
        kw = dict(step_size=h)
    solver: object = method
    if method in ESDIRK_TABLEAUS:  # stages solved to round-off, whatever the step tolerance
        solver = Esdirk(ESDIRK_TABLEAUS[method], NewtonSettings(1e-13, 1e-13, max_iters=30))
    sol = neuralode.solve(
        f,
        torch.tensor(y0, dtype=DTYPE),
        torch.tensor([0.0, T], dtype=DTYPE),
        method=solver,  # type: ignore[arg-type]
        dense=dense,
        **kw,
    )
    assert int(sol.stats.n_steps) == n, f"{method}: {int(sol.stats.n_steps)} steps, wanted {n}"
    assert int(sol.stats.n_accepted) == n and int(sol.stats.n_rejected) == 0
    return sol


def _slope(hs: list[float], errs: list[float]) -> float:
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


# Kutta's 3/8 rule on "cos": the leading error term nearly cancels at the end point, so the
# errors fall irregularly (measured 3.6e-5, 7.2e-8, 6.4e-8, 6.2e-9 for N = 32..256); on the chirp
# they fall at order 4 from N = 32 (slopes 4.25, 3.87, 3.94).
# The Rodas methods on "cos" too: rodas5p's order-5 term is small there (errors fall at slopes
# 6.6, 6.3, 6.0 for N = 32..256), rodas4's errors cancel near N = 64 (slopes 7.2, 1.5, 3.5); on
# the chirp they fall at 4.94, 5.00, 5.01 and 4.07, 4.04, 4.02.
PLAN_FOR_METHOD = {
    "rk38": ("chirp", (32, 64, 128, 256)),
    "rodas4": ("chirp", (32, 64, 128, 256)),
    "rodas5p": ("chirp", (32, 64, 128, 256)),
}


def _plan(method: str) -> tuple[str, tuple[int, ...]]:
    if method in PLAN_FOR_METHOD:
        return PLAN_FOR_METHOD[method]
    order = get_solver(method).order
    assert order in PLAN, f"add step counts for order {order} ({method}) to PLAN"
    return PLAN[order]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_global_convergence_order(method: str) -> None:
    problem, ns = _plan(method)
    _, exact, _, T = PROBLEMS[problem]
    y_T = exact(torch.tensor(T, dtype=DTYPE))
    errs, hs = [], []
    for n in ns:
        sol = _constant_step_solve(method, problem, n, dense=False)
        errs.append(float((sol.ys[-1] - y_T).abs().max()))
        hs.append(T / n)
    p = get_solver(method).order
    slope = _slope(hs, errs)
    print(f"{method}: order {p}, measured {slope:.2f}, errors {[f'{e:.1e}' for e in errs]}")
    assert abs(slope - p) <= 0.3, f"{method}: slope {slope:.2f} vs order {p}; errors {errs}"


@pytest.mark.parametrize("method", ALL_METHODS)
def test_dense_output_convergence_order(method: str) -> None:
    problem, ns = _plan(method)
    _, exact, _, T = PROBLEMS[problem]
    solver = get_solver(method)
    want = min(solver.order, solver.dense_order + 1)
    errs, hs = [], []
    for n in ns:
        sol = _constant_step_solve(method, problem, n, dense=True)
        h = T / n
        mid = (torch.arange(n, dtype=DTYPE) + 0.5) * h
        errs.append(float((sol.evaluate(mid) - exact(mid)).abs().max()))
        hs.append(h)
    slope = _slope(hs, errs)
    print(f"{method}: dense order >= {want}, measured {slope:.2f}")
    assert slope >= want - 0.3, f"{method}: dense slope {slope:.2f} < {want}; errors {errs}"


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if not get_solver(m).adaptive])
def test_fixed_step_grid_equals_step_size(method: str) -> None:
    """``odeint`` on a grid (one step per output interval) is the same solve as ``step_size``,
    and its outputs inside the steps (a grid offset by h/2, with ``step_size``) are the
    interpolant's values."""
    f, _, y0, T = PROBLEMS["cos"]
    n = 32
    h = T / n
    y0_t = torch.tensor(y0, dtype=DTYPE)
    grid = torch.linspace(0.0, T, n + 1, dtype=DTYPE)
    ys = neuralode.odeint(f, y0_t, grid, method=method)
    sol = _constant_step_solve(method, "cos", n, dense=True)
    torch.testing.assert_close(ys[-1], sol.ys[-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ys, sol.evaluate(grid), rtol=1e-12, atol=1e-12)
    mid = torch.cat([grid[:1], (torch.arange(n, dtype=DTYPE) + 0.5) * h, grid[-1:]])
    ys_mid = neuralode.odeint(f, y0_t, mid, method=method, options={"step_size": h})
    torch.testing.assert_close(ys_mid, sol.evaluate(mid), rtol=1e-12, atol=1e-12)


def test_plan_covers_every_method() -> None:
    for m in ALL_METHODS:
        _plan(m)
    assert math.log2(PROBLEMS["cos"][3]).is_integer() and math.log2(PROBLEMS["chirp"][3]) == 2
