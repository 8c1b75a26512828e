"""Stiff solvers: the Rosenbrock methods (``rosenbrock23``, ``rodas4``, ``rodas5p``) and, where
the test is about any stiff method, the ESDIRK ones (``kvaerno3``, ``kvaerno5``; their own
machinery is tested in ``test_esdirk.py``).

* Their coefficients satisfy the Rosenbrock order conditions (Hairer and Wanner II, IV.7) for
  every rooted tree up to the stated order, and fail at the next order (the stated order is the
  exact one), for the solution and the embedded solution.
* They are L-stable: one step of ``y' = lambda y`` with ``h lambda -> -inf`` damps to zero, and
  ``|R(i w)| <= 1`` on the imaginary axis.
* On stiff benchmark problems (Robertson to ``t = 4e5``, Van der Pol with ``mu = 1e3``, HIRES,
  OREGO; ``stiff_problems.py``) they reach scipy ``Radau``'s reference solution (``rtol =
  1e-12``) within the measured bounds below, where dopri5 runs out of 3,000 steps on Robertson
  before ``t = 1000``.
* rosenbrock23 is a W-method (its order holds with a wrong Jacobian), rodas4 is not.
* Batched, every sample keeps its own steps: 8 Robertson problems with different rate constants
  solved together give each one's single solve.
* Gradients: ``gradcheck`` in float64 through every Rosenbrock method with backprop and
  checkpoint, and the adjoint's gradient agrees with backprop's for every stiff method.
* Robertson to ``t = 4e10`` and Prothero-Robinson's order reduction, as measured below.
* The Jacobian helper agrees with ``torch.autograd.functional.jacobian``, batched and unbatched,
  and so does its fallback for fields that ``torch.func`` cannot transform.
(Convergence orders of the solution and dense output are in ``test_convergence.py``, with every
method.)
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import default_dtype
from fields import opaque
from stiff_problems import K_ROBERTSON, PROBLEMS, robertson, van_der_pol
from trees import Tree, assert_sharp_orders, residuals

import neuralode
from neuralode.solvers.newton import jacobian
from neuralode.solvers.tableaus import RODAS4, ROSENBROCK_TABLEAUS, RosenbrockTableau

scipy_integrate = pytest.importorskip(
    "scipy.integrate", reason="needs scipy: pip install -e '.[dev]'"
)

# Small tensors: two xdist workers each running two intra-op threads on two cores slowed the
# gradchecks here from 1 s to 50 s.
pytestmark = pytest.mark.usefixtures("one_thread")

ROSENBROCK = ("rosenbrock23", "rodas4", "rodas5p")
#: Every stiff method: the Rosenbrock ones and the ESDIRK ones (Newton iterations; more in
#: test_esdirk.py).
STIFF = (*ROSENBROCK, "kvaerno3", "kvaerno5")
DTYPE = torch.float64


# -- order conditions ------------------------------------------------------------------------------
def _residuals(tab: RosenbrockTableau, weights: list[Fraction], order: int) -> dict[int, float]:
    """Largest ``|sum_j b_j Phi_j(t) - 1/gamma(t)|`` per tree order, in exact arithmetic on the
    published decimals: a vertex with one child uses ``beta = alpha + Gamma``, a vertex with
    several the product of ``alpha Phi`` over its children (Hairer and Wanner II, Table IV.7.1,
    with the diagonal ``gamma`` folded into ``beta``); ``b = weights Gamma``."""
    s = tab.stages
    G, alpha = tab.Gamma, tab.alpha
    beta = [[alpha[i][j] + G[i][j] for j in range(s)] for i in range(s)]
    b = [sum((weights[k] * G[k][j] for k in range(s)), Fraction(0)) for j in range(s)]

    def mul(M: list[list[Fraction]], v: list[Fraction]) -> list[Fraction]:
        return [sum((M[i][j] * v[j] for j in range(s)), Fraction(0)) for i in range(s)]

    @functools.cache
    def phi(t: Tree) -> tuple[Fraction, ...]:
        if not t:
            return (Fraction(1),) * s
        if len(t) == 1:
            return tuple(mul(beta, list(phi(t[0]))))
        out = [Fraction(1)] * s
        for c in t:
            out = [x * y for x, y in zip(out, mul(alpha, list(phi(c))))]
        return tuple(out)

    return residuals(b, phi, order)


@pytest.mark.parametrize("name", sorted(ROSENBROCK_TABLEAUS))
def test_rosenbrock_order_conditions(name: str) -> None:
    tab = ROSENBROCK_TABLEAUS[name]
    cases = (
        ("solution", list(tab.m), tab.order),
        ("embedded", [m - e for m, e in zip(tab.m, tab.m_err)], tab.error_order),
    )
    assert_sharp_orders(name, lambda w, n: _residuals(tab, list(w), n), cases, 1e-13)


def test_rosenbrock_tableau_checks_its_data() -> None:
    """A typo in a coefficient is caught when the tableau is built: the nodes and the
    time-derivative coefficients are checked against the ones the matrices imply."""
    fields = {k: getattr(RODAS4, k) for k in RODAS4.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"c\[2\]"):
        RosenbrockTableau(**{**fields, "c": (*RODAS4.c[:2], Fraction("0.22"), *RODAS4.c[3:])})
    bad_C = list(RODAS4.C)
    bad_C[3] = (bad_C[3][0], bad_C[3][1], bad_C[3][2] + Fraction(1, 1000))
    with pytest.raises(ValueError, match=r"d\[3\]"):
        RosenbrockTableau(**{**fields, "C": tuple(bad_C)})
    with pytest.raises(ValueError, match="strictly lower"):
        RosenbrockTableau(**{**fields, "a": RODAS4.a[:-1]})


def test_get_tableau_says_what_a_stiff_method_is() -> None:
    with pytest.raises(ValueError, match=r"ROSENBROCK_TABLEAUS\['rodas5p'\]"):
        neuralode.get_tableau("rodas5p")
    with pytest.raises(ValueError, match="Rosenbrock23"):
        neuralode.get_tableau("rosenbrock23")
    with pytest.raises(ValueError, match=r"ESDIRK_TABLEAUS\['kvaerno5'\]"):
        neuralode.get_tableau("kvaerno5")


# -- stability -------------------------------------------------------------------------------------
def _one_step(method: str, z: complex) -> complex:
    """``R(z)``: one step of size 1 of ``y' = z y``, as a real 2x2 system."""
    solver = neuralode.get_solver(method)
    A = torch.tensor([[z.real, -z.imag], [z.imag, z.real]], dtype=DTYPE)
    res = solver.step(lambda t, y: A @ y, 0.0, 1.0, torch.tensor([1.0, 0.0], dtype=DTYPE), None)
    return complex(float(res.y1[0]), float(res.y1[1]))


@pytest.mark.parametrize("method", STIFF)
def test_l_stable(method: str) -> None:
    for z in (-1e3, -1e6, -1e9):
        assert abs(_one_step(method, z)) < 100 / abs(z), (method, z)  # R(z) = O(1/z)
    for w in (0.1, 1.0, 10.0, 1e3):
        assert abs(_one_step(method, 1j * w)) <= 1 + 1e-12, (method, w)
    # Non-stiff accuracy: R(z) = exp(z) + O(z^(p+1)).
    z = -0.01
    p = neuralode.get_solver(method).order
    assert abs(_one_step(method, z) - math.exp(z)) < 10 * abs(z) ** (p + 1)


@pytest.mark.parametrize("method", STIFF)
@pytest.mark.parametrize("batched", [False, True])
def test_a_float32_state_is_solved_in_float32(method: str, batched: bool) -> None:
    """Robertson in float32 (its time in float64): the linear algebra runs in the state's
    dtype (``h gamma`` per row cast to it), the outputs are float32 and agree with the float64
    solve to float32's tolerance."""
    t = torch.tensor([0.0, 1.0, 10.0], dtype=DTYPE)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)
    if batched:
        y0 = y0.expand(2, 3)
    kw = dict(method=method, rtol=1e-4, atol=1e-7, batched=batched)
    ref = neuralode.solve(robertson(), y0, t, **kw)
    sol = neuralode.solve(robertson(), y0.float(), t, **kw)
    assert sol.ys.dtype == torch.float32 and sol.success
    torch.testing.assert_close(sol.ys.double(), ref.ys, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", STIFF)
def test_a_float32_state_under_a_float64_default_dtype(method: str) -> None:
    """``torch.set_default_dtype(torch.float64)`` (common in scientific code) does not leak into
    a float32 solve: the iteration matrix's identity is built in the Jacobian's dtype (one in
    the default dtype makes the LU factors float64, which ``lu_solve`` refuses beside float32
    stages)."""
    t = torch.tensor([0.0, 1.0, 10.0], dtype=DTYPE)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float32)
    with default_dtype(torch.float64):
        sol = neuralode.solve(robertson(), y0, t, method=method, rtol=1e-4, atol=1e-7)
    assert sol.ys.dtype == torch.float32 and sol.success


@pytest.mark.parametrize("method", ROSENBROCK)
def test_one_step_evaluates_at_its_nodes(method: str) -> None:
    """One accepted step evaluates ``f`` once per stage, at ``t0 + c_i h`` (the first through
    the Jacobian's own forward pass), and says so in ``nfe`` (with the entry's check of f)."""
    solver = neuralode.get_solver(method)
    seen: list[float] = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(float(t.detach()))
        return -(y**2) + torch.sin(t)

    t0, h = 0.25, 0.5
    sol = neuralode.solve(
        f,
        torch.tensor([0.5, 1.0], dtype=DTYPE),
        torch.tensor([t0, t0 + h], dtype=DTYPE),
        method=method,
        first_step=h,
        rtol=1e10,
        atol=1e10,
    )
    assert int(sol.stats.n_steps) == 1 and int(sol.stats.nfe) == 1 + solver.n_stages == len(seen)
    assert seen == pytest.approx([t0] + [t0 + c * h for c in solver.c_list], abs=1e-15)
    # The Rosenbrock23 error estimate's f(t + h, y1) is the third evaluation: c = 1.


def test_method_as_name_or_solver() -> None:
    from neuralode.solvers.rosenbrock import Rosenbrock
    from neuralode.solvers.tableaus import RODAS5P

    f, y0 = van_der_pol(10.0), torch.tensor([2.0, 0.0], dtype=DTYPE)
    ts = torch.linspace(0, 5, 4, dtype=DTYPE)
    by_name = neuralode.solve(f, y0, ts, method="rodas5p", rtol=1e-6, atol=1e-8)
    by_solver = neuralode.solve(f, y0, ts, method=Rosenbrock(RODAS5P), rtol=1e-6, atol=1e-8)
    assert torch.equal(by_name.ys, by_solver.ys)
    assert int(by_name.stats.nfe) == int(by_solver.stats.nfe)
    with pytest.raises(TypeError, match="needs a RosenbrockTableau, got ButcherTableau$"):
        Rosenbrock(neuralode.get_tableau("dopri5"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["rodas4", "rodas5p"])
def test_a_rosenbrock_built_now_holds_what_the_registrys_does(name: str) -> None:
    """``Rosenbrock`` derives its name, orders and stage terms from the tableau once; built
    now, it holds what the registry's instance holds (the per-device cache aside)."""
    from neuralode.solvers.rosenbrock import Rosenbrock
    from neuralode.solvers.tableaus import ROSENBROCK_TABLEAUS

    fresh, registered = Rosenbrock(ROSENBROCK_TABLEAUS[name]), neuralode.get_solver(name)
    want = {k: v for k, v in vars(registered).items() if k != "_P_cache"}
    assert {k: v for k, v in vars(fresh).items() if k != "_P_cache"} == want
    assert fresh.name == name and fresh.order == ROSENBROCK_TABLEAUS[name].order


def test_rosenbrock23_interpolant_is_shampine_and_reichelts() -> None:
    """A ``Rosenbrock23`` built now (the registry's instance is built at import) interpolates
    a step as the method's paper writes it, ``y0 + h (theta (1 - theta) K1 + theta (theta - 2 d)
    K2) / (1 - 2 d)``, and as the registry's instance does."""
    from neuralode.interpolation import evaluate
    from neuralode.solvers.rosenbrock import Rosenbrock23

    f, y = van_der_pol(10.0), torch.tensor([[2.0, 0.0], [1.0, -3.0]], dtype=DTYPE)
    t, h = torch.tensor([0.0, 0.5], dtype=DTYPE), torch.tensor([0.01, 0.002], dtype=DTYPE)
    theta = torch.tensor([[0.0, 0.3, 0.7, 1.0]] * 2, dtype=DTYPE)
    d = 1 / (2 + math.sqrt(2))
    for solver in (Rosenbrock23(), neuralode.get_solver("rosenbrock23")):
        res = solver.step(f, t, h, y, None)
        dense, extra, _ = solver.dense(f, t, h, y, res)
        k1, k2 = (k.unsqueeze(1) for k in res.dense_info)
        th, hh = theta.unsqueeze(-1), h.view(-1, 1, 1)
        want = y.unsqueeze(1) + hh * (th * (1 - th) * k1 + th * (th - 2 * d) * k2) / (1 - 2 * d)
        got = evaluate(dense, theta, batched=True)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(got[:, -1], res.y1, rtol=1e-14, atol=1e-14)
        assert extra == 0


def test_rosenbrock23_error_estimate_is_its_local_error() -> None:
    """``Rosenbrock23`` compares its order-2 step with a third-order one, so its estimate is the
    step's own local error to leading order: on ``y' = -2 y + cos t`` (exact flow known) the
    ratio tends to 1 as ``h`` shrinks (measured 0.9977 at ``h = 0.01``, 0.9988 at 0.005)."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -2 * y + torch.cos(t)

    def exact(t0: float, y0: float, t: float) -> float:
        p = lambda s: (2 * math.cos(s) + math.sin(s)) / 5  # noqa: E731
        return (y0 - p(t0)) * math.exp(-2 * (t - t0)) + p(t)

    solver, t0, y0 = neuralode.get_solver("rosenbrock23"), 0.3, 1.0
    for h in (0.01, 0.005):
        res = solver.step(
            f, torch.tensor(t0, dtype=DTYPE), torch.tensor(h, dtype=DTYPE),
            torch.tensor([y0], dtype=DTYPE), None,
        )  # fmt: skip
        local = float(res.y1[0]) - exact(t0, y0, t0 + h)
        assert abs(abs(float(res.y_error[0]) / local) - 1) < 0.005, (h, local, res.y_error)


@pytest.mark.parametrize(("method", "order"), [("rosenbrock23", 2), ("rodas4", 1)])
def test_w_method_keeps_its_order_with_a_wrong_jacobian(
    method: str, order: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rosenbrock23 is a W-method: its order 2 holds with any matrix in place of ``J`` (slope
    2.13 measured with ``0.3 J + 0.1``); rodas4 needs the true Jacobian (slope 0.86, order 1)."""
    import test_convergence as conv

    import neuralode.solvers.rosenbrock as ros
    from neuralode.solvers.newton import Linearisation

    true = ros.jacobian

    def wrong(f, t, y, structured=False):
        lin = true(f, t, y)
        return Linearisation(lin.f0, 0.3 * lin.J + 0.1, lin.ft)

    monkeypatch.setattr(ros, "jacobian", wrong)
    _, exact, _, T = conv.PROBLEMS["cos"]
    y_T = exact(torch.tensor(T, dtype=DTYPE))
    ns = (32, 64, 128, 256)
    errs = [
        float((conv._constant_step_solve(method, "cos", n, False).ys[-1] - y_T).abs().max())
        for n in ns
    ]
    slope = conv._slope([T / n for n in ns], errs)
    assert abs(slope - order) <= 0.3, (method, slope, errs)


# -- stiff problems against scipy ------------------------------------------------------------------
@functools.cache
def _reference(problem: str) -> np.ndarray:
    """scipy's Radau at rtol 1e-12 on the NumPy copy of the field (independent of our code, and
    ten times quicker than calling torch per evaluation); computed once per process."""
    _, f_np, y0, ts, _ = PROBLEMS[problem]
    sol = scipy_integrate.solve_ivp(
        f_np, (ts[0], ts[-1]), y0, method="Radau", t_eval=ts, rtol=1e-12, atol=1e-14
    )
    assert sol.success
    return sol.y.T


ROBERTSON_TIMES = torch.tensor(PROBLEMS["robertson"][3], dtype=DTYPE)

# Measured errors in tolerance units (|error| / (atol + rtol |y_ref|)) at rtol 1e-3 / 1e-6
# (scipy's Radau and BDF beside them, from the same references; tests/stiff_problems.py):
#   robertson  rosenbrock23 5.6 / 48, rodas4 0.08 / 0.14, rodas5p 0.14 / 1.3, auto 0.14 / 1.3
#              (Radau 0.10 / 0.17, BDF 1.6 / 6.1)
#   vdp_mu1e3  rosenbrock23 15 / 135, rodas4 3.6 / 3.8, rodas5p 22 / 1.0, auto 24 / 1.0
#              (Radau 0.73 / 0.33, BDF 30 / 89: a relaxation oscillator's phase error at 1e-3)
#   hires      rosenbrock23 1.9 / 8.0, rodas4 0.07 / 0.17, rodas5p 1.0 / 0.26, auto 1.0 / 0.31
#              (Radau 0.07 / 1.5, BDF 12 / 8.6)
#   orego      rosenbrock23 108 at 1e-3 (an order-2 method's phase error on a relaxation
#              oscillator; 486 at 1e-6, in 5,000 steps: not run), rodas4 5.8 / 2.8, rodas5p
#              1.2 / 0.72, auto 1.2 / 0.74 (Radau 0.91 / 0.15, BDF 10 / 58)
#   robertson  kvaerno3 0.67 / 1.1, kvaerno5 0.18 / 3.2
#   vdp_mu1e3  kvaerno3 0.83 / (6.0: 3,346 steps, 8 s: not run), kvaerno5 2.1 / 2.1
#   hires      kvaerno3 2.9 / 14, kvaerno5 0.15 / 1.0
#   orego      kvaerno3 14 / (14: 3,536 steps, 10 s: not run), kvaerno5 8.4 / 12
#   (the ESDIRK ones with Jacobians reused across steps; with a Jacobian per step they were
#   within 0.5 of these but for robertson kvaerno5 at 1e-3, 0.05.  Reuse with the usual
#   stopping test took vdp_mu1e3 kvaerno3 at 1e-3 to 1053 units: see esdirk._STALE_RATE.)
# The Rodas methods interpolated the outputs until they ended steps on them: hires rodas5p was
# 19 units at 1e-6 then (the interpolant, not the error estimate), vdp_mu1e3 1.4 at 1e-3 (its
# steps now differ: 22).
UNITS = {
    "rosenbrock23": 300.0,
    "rodas4": 10.0,
    "rodas5p": 10.0,
    "kvaerno3": 40.0,
    "kvaerno5": 30.0,
    "auto": 10.0,
}
UNITS_FOR = {("vdp_mu1e3", "rodas5p"): 40.0, ("vdp_mu1e3", "auto"): 40.0}
SLOW = {("orego", "rosenbrock23"), ("orego", "kvaerno3"), ("vdp_mu1e3", "kvaerno3")}
CASES = [
    (problem, rtol, method)
    for problem in PROBLEMS
    for rtol in (1e-3, 1e-6)
    for method in (*STIFF, "auto")
    if not ((problem, method) in SLOW and rtol < 1e-3)
]


@pytest.mark.parametrize(("problem", "rtol", "method"), CASES)
def test_stiff_problems_against_radau(problem: str, rtol: float, method: str) -> None:
    f, _, y0, ts, scale = PROBLEMS[problem]
    atol = rtol * scale
    y0_t, ts_t = torch.tensor(y0, dtype=DTYPE), torch.tensor(ts, dtype=DTYPE)
    sol = neuralode.solve(f, y0_t, ts_t, method=method, rtol=rtol, atol=atol)
    ref = _reference(problem)
    units = np.abs(sol.ys.numpy() - ref) / (atol + rtol * np.abs(ref))
    steps = int(sol.stats.n_steps)
    print(f"{problem} {method} rtol={rtol:g}: {steps} steps, error {units.max():.2f} units")
    bound = UNITS_FOR.get((problem, method), UNITS[method])
    assert units.max() < bound, (problem, method, rtol, units.max())
    assert steps < (6000 if method in ("rosenbrock23", "kvaerno3") else 1500), steps


# Robertson to t = 4e10, outputs at 4e-5 * 10^k (the span people plot): errors measured at rtol
# 1e-6 (tolerance units against Radau at rtol 1e-10, atol 1e-16, itself within 2e-5 units of
# Radau at 1e-12): rosenbrock23 47, rodas4 0.14, rodas5p 1.3, kvaerno5 4.5 (the Rodas ones
# 0.74 and 1.1 when they interpolated the outputs).  Before the loop
# measured the smallest step against where a row is (not where it ends), every method stopped
# at t = 0 here with "step size fell below the resolution" (4e10's resolution is 9e-5).
@pytest.mark.parametrize("method", ("rosenbrock23", "rodas4", "rodas5p", "kvaerno5"))
def test_robertson_to_4e10(method: str) -> None:
    _, f_np, y0, _, scale = PROBLEMS["robertson"]
    ts = np.array([0.0] + [4e-5 * 10**k for k in range(16)])
    ref = _robertson_long_reference()
    rtol = 1e-6
    atol = rtol * scale
    sol = neuralode.solve(
        robertson(), torch.tensor(y0, dtype=DTYPE), torch.tensor(ts, dtype=DTYPE),
        method=method, rtol=rtol, atol=atol,
    )  # fmt: skip
    units = np.abs(sol.ys.numpy() - ref) / (atol + rtol * np.abs(ref))
    print(f"robertson to 4e10 {method}: {int(sol.stats.n_steps)} steps, {units.max():.2f} units")
    assert units.max() < UNITS[method]
    assert float(sol.ys[-1, 2]) > 0.9999999  # nearly all converted by then


@functools.cache
def _robertson_long_reference() -> np.ndarray:
    _, f_np, y0, _, _ = PROBLEMS["robertson"]
    ts = np.array([0.0] + [4e-5 * 10**k for k in range(16)])
    sol = scipy_integrate.solve_ivp(
        f_np, (0.0, ts[-1]), y0, method="Radau", t_eval=ts, rtol=1e-10, atol=1e-16
    )
    assert sol.success
    return sol.y.T


# Prothero and Robinson's problem y' = lambda (y - phi(t)) + phi'(t), y = phi = sin t, with
# lambda = -1e6 and constant steps h = 2/N, h lambda from -1.6e4 to -1.6e5: the stiff regime,
# where a method's order falls to what its stages can keep (Hairer and Wanner II, VI.15).
# Measured slopes (N = 16..128): rosenbrock23 2.00, rodas4 0.89-0.96 (the RODAS coefficients
# do not meet the Prothero-Robinson conditions), rodas5p 3.01-3.03 (Steinebach built them in:
# the "P"), kvaerno3 1.87-1.99 and kvaerno5 1.77-1.98 (stage order 2, the most an ESDIRK's
# explicit first stage allows).  Their errors are all small (below 4e-9 at N = 16 but
# rosenbrock23's 1e-3): the stiff component's error is damped by 1/|lambda|.
PR_ORDER = {"rosenbrock23": 2, "rodas4": 1, "rodas5p": 3, "kvaerno3": 2, "kvaerno5": 2}


@pytest.mark.parametrize("method", STIFF)
def test_prothero_robinson_order_reduction(method: str) -> None:
    from neuralode.solvers import ESDIRK_TABLEAUS, Esdirk, NewtonSettings

    solver: object = method
    if method in ESDIRK_TABLEAUS:  # stages to round-off, whatever the step tolerance
        solver = Esdirk(ESDIRK_TABLEAUS[method], NewtonSettings(1e-13, 1e-13, max_iters=30))

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -1e6 * (y - torch.sin(t)) + torch.cos(t)

    T, ns, errs = 2.0, (16, 32, 64, 128), []
    for n in ns:
        sol = neuralode.solve(
            f, torch.zeros(1, dtype=DTYPE), torch.tensor([0.0, T], dtype=DTYPE),
            method=solver, first_step=T / n, rtol=1e10, atol=1e10, ifactor=1.0,
        )  # fmt: skip
        assert int(sol.stats.n_steps) == n
        errs.append(abs(float(sol.ys[-1, 0]) - math.sin(T)))
    slope = float(np.polyfit(np.log([T / n for n in ns]), np.log(errs), 1)[0])
    print(f"prothero-robinson {method}: slope {slope:.2f}, errors {errs}")
    assert abs(slope - PR_ORDER[method]) <= 0.3, (method, slope, errs)


# Prothero-Robinson with outputs between steps, in tolerance units at rtol 1e-6 (measured for
# lambda = 1e4 / 1e6): rosenbrock23 0.27 / 0.24, rodas4 1.2 / 0.14, rodas5p 0.06 / 0.0006,
# kvaerno3 0.8 / 0.04, kvaerno5 11 / 0.11, auto 0.06 / 0.0006.  Before the Rodas methods ended
# their steps on outputs, their interpolants gave rodas5p 116 / 4.3e5 and rodas4 2.3e3 / 1.2e6
# (the steps' ends within 1 unit): an interpolant's error is not controlled, and in the stiff
# regime the steps grow long (8 of them over [0, 10] at lambda = 1e6).
@pytest.mark.parametrize("lam", [1e4, 1e6])
@pytest.mark.parametrize("method", [*STIFF, "auto"])
def test_outputs_between_steps_in_the_stiff_regime(method: str, lam: float) -> None:
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -lam * (y - torch.cos(t)) - torch.sin(t)

    ts = torch.linspace(0.0, 10.0, 40, dtype=DTYPE)
    sol = neuralode.solve(f, torch.ones(1, dtype=DTYPE), ts, method=method, rtol=1e-6, atol=1e-9)
    units = (sol.ys[:, 0] - torch.cos(ts)).abs() / (1e-9 + 1e-6 * torch.cos(ts).abs())
    assert float(units.max()) < 30.0, (method, lam, float(units.max()))


def test_explicit_methods_cannot_do_what_the_stiff_ones_do() -> None:
    """The point of the stiff solvers: dopri5 exhausts its steps on Robertson's problem."""
    sol = neuralode.solve(
        robertson(K_ROBERTSON),
        torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE),
        ROBERTSON_TIMES,
        method="dopri5",
        rtol=1e-3,
        atol=1e-7,
        max_num_steps=3000,
        throw=False,
    )
    assert int(sol.status) == neuralode.Status.MAX_STEPS_REACHED
    assert float(sol.t_end) < 1e3


@pytest.mark.parametrize("method", STIFF)
def test_batched_rows_keep_their_own_steps(method: str) -> None:
    """8 Robertson problems, rate constants spread over an order of magnitude, solved as one
    batch: each row takes exactly the steps and values of its own single solve."""
    g = torch.Generator().manual_seed(0)
    scale = 10 ** torch.rand(8, 3, generator=g, dtype=DTYPE)
    k = torch.tensor(K_ROBERTSON, dtype=DTYPE) * scale
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE).expand(8, 3)
    ts = ROBERTSON_TIMES[:5]
    kw = dict(method=method, rtol=1e-4, atol=1e-8)
    batch = neuralode.solve(robertson(k), y0, ts, batched=True, **kw)
    assert len(set(batch.stats.n_steps.tolist())) > 1  # the rows did differ
    for i in range(8):
        one = neuralode.solve(robertson(k[i]), y0[i], ts, **kw)
        assert int(one.stats.n_steps) == int(batch.stats.n_steps[i])
        assert int(one.stats.nfe) == int(batch.stats.nfe[i])
        assert int(one.stats.njev) == int(batch.stats.njev[i])
        assert int(one.stats.nlu) == int(batch.stats.nlu[i])
        # ESDIRK: a step with the previous step's Jacobian and h keeps its factorisation.
        n_lu = int(one.stats.n_steps) if method in ROSENBROCK else int(one.stats.nlu)
        assert 0 < int(one.stats.nlu) == n_lu <= int(one.stats.n_steps)
        assert int(one.stats.n_newton) == int(batch.stats.n_newton[i])
        torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-10, atol=1e-14)


# -- gradients -------------------------------------------------------------------------------------
def _stiff_field(theta: torch.Tensor):
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -theta[0] * (y - torch.cos(t)) - theta[1] * y**3

    return f


@pytest.mark.parametrize("method", ROSENBROCK)
@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_gradcheck(method: str, gradient: str) -> None:
    """Exact gradients of the computed solution with respect to y0 and the parameters: the
    Jacobian inside each step is differentiated too.  Constant steps (``first_step``, every
    step accepted, ``ifactor=1``), so that finite differences see the same steps;
    ``test_gradients.py`` checks the adaptive solves of every method, and the output times'
    gradient (that of the exact flow, by design) against the exact flow."""
    theta = torch.tensor([30.0, 1.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)

    def run(y0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        kw = {} if gradient == "backprop" else {"adjoint_params": (theta,)}
        sol = neuralode.solve(
            _stiff_field(theta),
            y0,
            ts,
            method=method,
            first_step=0.0625,
            rtol=1e10,
            atol=1e10,
            ifactor=1.0,
            gradient=gradient,
            **kw,
        )
        assert int(sol.stats.n_rejected) == 0
        return sol.ys

    assert torch.autograd.gradcheck(run, (y0, theta), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("method", STIFF)
def test_adjoint_agrees_with_backprop(method: str) -> None:
    """On a mildly stiff problem (decay rate 5): the adjoint integrates y backwards, which grows
    like exp(5 t) there (see the next test for where that fails)."""
    theta = torch.tensor([5.0, 1.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=DTYPE)
    grads = {}
    for gradient in ("backprop", "adjoint"):
        kw = {} if gradient == "backprop" else {"adjoint_params": (theta,)}
        sol = neuralode.solve(
            _stiff_field(theta),
            y0,
            ts,
            method=method,
            rtol=1e-7,
            atol=1e-9,
            gradient=gradient,
            **kw,
        )
        grads[gradient] = torch.autograd.grad(sol.ys.square().sum(), (y0, theta))
        if gradient == "adjoint":  # the backward solve is a stiff solve too
            back = sol.backward_stats
            assert back is not None and back.njev is not None and back.nlu is not None
            assert 0 < int(back.njev) <= int(back.nlu) <= int(back.n_steps)
            if method in ROSENBROCK:  # a factorisation per step (ESDIRK: while h changes)
                assert int(back.nlu) == int(back.n_steps)
    for a, b in zip(grads["adjoint"], grads["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
        DTYPE
    )


@pytest.mark.parametrize("per_row", [False, True])
def test_block_solve_of_the_augmented_system_is_exact(per_row: bool) -> None:
    """The adjoint's augmented Jacobian is block lower-triangular in ``[y, a, g]``; its
    systems ``(I - hg J_aug) u = r``, solved block by block (two LU factorisations of func's own
    Jacobian, two products with J_aug), equal the dense solve with the augmented field's
    Jacobian taken component by component, for a batch with a shared grid and with per-sample
    grids (whose clock scales each row by its interval's length)."""
    from neuralode.gradients.adjoint import _Augmented

    net = _small_net()
    # (its largest column sum, 40.5, above its largest row sum, 31: the stiffness estimate
    # below must take both norms)
    A = torch.tensor([[-30.0, 1.0, 0.0], [10.0, -1.0, 2.0], [0.5, 0.0, -3.0]], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ A.T + torch.cos(t).unsqueeze(-1) * net(y)

    params = tuple(net.parameters())
    B = 2
    ys = torch.randn(B, 3, 3, dtype=DTYPE)
    s = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.7, 1.6]] if per_row else [[0.0, 0.5, 1.0]] * B,
                     dtype=DTYPE)  # fmt: skip
    aug = _Augmented(f, params, True, ys, s, None)
    assert aug.per_row == per_row
    aug.at_interval(2)
    n_p = sum(p.numel() for p in params)
    x = torch.randn(2 * ys[:, 0].numel() + n_p, dtype=DTYPE)
    sigma = torch.tensor(0.3, dtype=DTYPE)
    with torch.no_grad():
        block = jacobian(aug, sigma, x, structured=True)
        dense = jacobian(aug, sigma, x)  # structured off: the dense Jacobian
    assert not isinstance(block.J, torch.Tensor) and isinstance(dense.J, torch.Tensor)
    torch.testing.assert_close(block.f0, dense.f0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.ft, dense.ft, rtol=1e-10, atol=1e-12)
    r = torch.randn_like(x)
    for hg in (0.01, 0.3):
        u = block.J.factored(hg).solve(r)
        eye = torch.eye(x.numel(), dtype=DTYPE)
        expected = torch.linalg.solve(eye - hg * dense.J, r)
        torch.testing.assert_close(u, expected, rtol=1e-10, atol=1e-12)
    # The stiffness estimate is the diagonal blocks' (the y block's, -S J per sample, and the
    # adjoint's, S J^T): the larger of the y block's row-sum and column-sum norms.
    n = ys[:, 0].numel()
    Jy = dense.J[:n, :n].abs()
    expected_norm = torch.maximum(Jy.sum(-1).amax(), Jy.sum(-2).amax())
    assert Jy.sum(-2).amax() > 1.2 * Jy.sum(-1).amax()
    torch.testing.assert_close(block.J.inf_norm(), expected_norm, rtol=1e-12, atol=0.0)
    # the same with the row sums the larger (the blocks transposed: the estimate is symmetric)
    block.J.Jf = block.J.Jf.transpose(-1, -2)
    torch.testing.assert_close(block.J.inf_norm(), expected_norm, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(
    ("method", "cubic"), [("rodas5p", 0.0), ("kvaerno5", 0.0), ("kvaerno5", -40.0)]
)
def test_stiff_adjoint_with_the_block_jacobian(method: str, cubic: float, monkeypatch) -> None:
    """A network's stiff adjoint: the backward solve with the block-form Jacobian takes the same
    steps and gives the same gradients as with the dense one (2 N + P = 137 components here,
    each row of it a second-order product), and both agree with backprop; the block form never
    builds the dense Jacobian of the augmented field (its first step's neither).  With a cubic
    term, kvaerno5's reused Jacobians fail to converge and are taken again within an interval
    (43 Jacobians for 2 intervals): the block form is refreshed as the dense one is."""
    from neuralode.gradients.adjoint import _Augmented
    from neuralode.solvers import newton

    dense_of_augmented = []
    for name in ("_by_func", "_by_autograd"):
        original = getattr(newton, name)

        def counted(f, *args, _original=original):  # type: ignore[no-untyped-def]
            if isinstance(f, _Augmented):
                dense_of_augmented.append(1)
            return _original(f, *args)

        monkeypatch.setattr(newton, name, counted)
    net = _small_net()
    A = torch.tensor([[-30.0, 1.0, 0.0], [0.0, -1.0, 2.0], [0.5, 0.0, -3.0]], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ A.T + cubic * y**3 + 0.5 * net(y)

    y0 = torch.tensor([[1.0, 0.5, -0.2], [0.3, -0.4, 0.8]], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=DTYPE)
    params = tuple(net.parameters())
    kw = dict(method=method, rtol=1e-7, atol=1e-9, batched=True)
    out = {}
    dense_calls = {}
    for structured in (True, False):
        monkeypatch.setattr(_Augmented, "structured", structured)
        dense_of_augmented.clear()
        sol = neuralode.solve(f, y0, ts, gradient="adjoint", adjoint_params=params, **kw)
        grads = torch.autograd.grad(sol.ys.square().sum(), (y0, *params))
        out[structured] = (grads, sol.backward_stats)
        dense_calls[structured] = len(dense_of_augmented)
    assert dense_calls[True] == 0 < dense_calls[False], dense_calls
    if cubic:
        assert out[True][1] is not None and int(out[True][1].njev.sum()) > 2 * len(ts)
    if method == "kvaerno5" and not cubic:  # a Jacobian every step: the block form too
        from neuralode.solvers.esdirk import Esdirk, NewtonSettings
        from neuralode.solvers.tableaus import ESDIRK_TABLEAUS

        monkeypatch.setattr(_Augmented, "structured", True)
        dense_of_augmented.clear()
        fresh = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], NewtonSettings(reuse_jacobian=False))
        sol = neuralode.solve(
            f, y0, ts, gradient="adjoint", adjoint_params=params, **{**kw, "method": fresh}
        )
        grads = torch.autograd.grad(sol.ys.square().sum(), (y0, *params))
        assert sol.backward_stats is not None and int(sol.backward_stats.njev.sum()) > 1
        assert not dense_of_augmented
        flat_fresh = torch.cat([g.reshape(-1) for g in grads])
        flat_kept = torch.cat([g.reshape(-1) for g in out[True][0]])
        assert float((flat_fresh - flat_kept).norm() / flat_kept.norm()) < 1e-4
    (g_block, s_block), (g_dense, s_dense) = out[True], out[False]
    assert s_block is not None and s_dense is not None
    for name in ("n_steps", "n_accepted", "njev", "nlu", "n_newton"):
        assert torch.equal(getattr(s_block, name), getattr(s_dense, name)), name
    for a, b in zip(g_block, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    ref = neuralode.solve(f, y0, ts, **kw)
    g_ref = torch.autograd.grad(ref.ys.square().sum(), (y0, *params))
    flat = torch.cat([g.reshape(-1) for g in g_block])
    flat_ref = torch.cat([g.reshape(-1) for g in g_ref])
    # (the adjoint's and backprop's gradients differ by the solves' errors: 1.9e-4 with the
    # cubic term)
    assert float((flat - flat_ref).norm() / flat_ref.norm()) < (1e-3 if cubic else 1e-4)


def test_adjoint_on_a_dissipative_stiff_problem_says_to_use_checkpoint() -> None:
    """Decay rate 30: integrated backwards, y's error grows like exp(30 t) and the cubic term
    then blows it up (rosenbrock23 at rtol 1e-4: |y| > 1e6 by t = 0.34 of the backward
    solve).  The failure says so and names the remedy; the checkpoint strategy, which
    recomputes forward steps, gives backprop's gradient."""
    theta = torch.tensor([30.0, 1.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=DTYPE)
    kw = dict(method="rosenbrock23", rtol=1e-4, atol=1e-4, adjoint_params=(theta,))
    sol = neuralode.solve(_stiff_field(theta), y0, ts, gradient="adjoint", **kw)
    with pytest.raises(neuralode.SolverError, match="gradient='checkpoint'"):
        sol.ys.square().sum().backward()
    sol = neuralode.solve(_stiff_field(theta), y0, ts, gradient="checkpoint", **kw)
    got = torch.autograd.grad(sol.ys.square().sum(), (y0, theta))
    kw.pop("adjoint_params")
    sol = neuralode.solve(_stiff_field(theta), y0, ts, **kw)
    want = torch.autograd.grad(sol.ys.square().sum(), (y0, theta))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fit_robertson_rate_constants() -> None:
    """Robertson's three rate constants, started 2x, 0.5x and 3x off, fitted by L-BFGS through
    ``rodas5p`` with the checkpoint strategy to observations of all three species at 7 times
    (log-spaced, 0.04 to 4e4) with 0.5% noise: recovered within 1% (measured: 0.13%, 0.75%,
    0.04%; with 1% noise, k2 comes out 1.5% off, the noise's own floor).  The adjoint cannot
    (measured): Robertson's kinetics is dissipative, its backward reconstruction of the state
    fails on the last output interval, with the message that names the checkpoint strategy
    (``test_adjoint_on_a_dissipative_stiff_problem_says_to_use_checkpoint``)."""
    k_true = torch.tensor(K_ROBERTSON, dtype=DTYPE)
    ts = torch.tensor([0.0, 0.04, 0.4, 4.0, 40.0, 400.0, 4e3, 4e4], dtype=DTYPE)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)
    with torch.no_grad():
        exact = neuralode.solve(robertson(k_true), y0, ts, method="rodas5p", rtol=1e-10, atol=1e-14)
    noise = 0.005
    g = torch.Generator().manual_seed(0)
    observed = exact.ys * (1 + noise * torch.randn(exact.ys.shape, generator=g, dtype=DTYPE))
    sigma = noise * exact.ys[1:].abs()
    log_k = torch.log(k_true * torch.tensor([2.0, 0.5, 3.0], dtype=DTYPE)).requires_grad_()

    def loss(gradient: str) -> torch.Tensor:
        k = log_k.exp()
        sol = neuralode.solve(
            robertson(k), y0, ts, method="rodas5p", rtol=1e-7, atol=1e-12,
            gradient=gradient, adjoint_params=(log_k,),
        )  # fmt: skip
        return (((sol.ys[1:] - observed[1:]) / sigma) ** 2).mean()

    opt = torch.optim.LBFGS([log_k], max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss("checkpoint")
        value.backward()
        return value

    opt.step(closure)
    ratio = (log_k.detach().exp() / k_true).tolist()
    print("fitted / true rate constants:", [f"{r:.4f}" for r in ratio])
    assert all(abs(r - 1) < 0.01 for r in ratio), ratio


# -- the Jacobian helper ---------------------------------------------------------------------------
def _mlp_field():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, 1).expand(*y.shape[:-1], 1) if y.ndim > 1 else t.reshape(1)
        return net(torch.cat([y, torch.sin(tt)], -1))

    return f


@pytest.mark.parametrize("fallback", [False, True])
def test_jacobian_matches_autograd(fallback: bool) -> None:
    """``f(t, y)``, ``df/dy`` and ``df/dt`` per row, batched and unbatched, by ``torch.func``
    and by the ``torch.autograd.grad`` fallback for a field it cannot transform (which must be
    the path taken: an earlier version of this test wrapped the field in a ``.item()`` that
    ``torch.func`` runs, and never reached the fallback)."""
    from neuralode.solvers.newton import _AUTOGRAD_ONLY

    f = _mlp_field()
    f = opaque(f) if fallback else f
    y = torch.randn(5, 3, dtype=DTYPE)
    t = torch.rand(5, dtype=DTYPE)
    lin = jacobian(f, t, y)
    assert (f in _AUTOGRAD_ONLY) == fallback
    torch.testing.assert_close(lin.f0, f(t, y))
    for b in range(5):
        tb, yb = t[b : b + 1], y[b : b + 1]
        J = torch.autograd.functional.jacobian(lambda yy, tb=tb: f(tb, yy[None])[0], yb[0])
        ft = torch.autograd.functional.jacobian(lambda tt, yb=yb: f(tt, yb)[0], tb)
        torch.testing.assert_close(lin.J[b], J)
        torch.testing.assert_close(lin.ft[b], ft[:, 0])
    one = jacobian(f, t[0], y[0])  # unbatched
    torch.testing.assert_close(one.J, lin.J[0])
    torch.testing.assert_close(one.ft, lin.ft[0])


def test_inf_norm_is_each_samples_largest_absolute_row_sum() -> None:
    """``newton.inf_norm`` (the automatic switch's stiffness estimate): per sample, over rows
    whose sums differ from the columns' (a column sum or a batch-wide maximum would pass a
    symmetric test), and a structured Jacobian's own estimate."""
    from neuralode.solvers.newton import inf_norm

    J = torch.tensor([[[1.0, -2.0], [0.5, 0.25]], [[-3.0, 0.0], [4.0, 1.0]]], dtype=DTYPE)
    # row sums 3, 0.75 and 3, 5; column sums 1.5, 2.25 and 7, 1
    assert torch.equal(inf_norm(J), torch.tensor([3.0, 5.0], dtype=DTYPE))
    assert torch.equal(inf_norm(J[1]), torch.tensor(5.0, dtype=DTYPE))

    class Structured:
        def inf_norm(self) -> torch.Tensor:
            return torch.tensor(7.5, dtype=DTYPE)

    assert torch.equal(inf_norm(Structured()), torch.tensor(7.5, dtype=DTYPE))


@pytest.mark.parametrize("fallback", [False, True])
def test_jacobian_of_a_field_free_of_y_or_of_t(fallback: bool) -> None:
    """A field that does not depend on ``y`` has ``df/dy = 0``; one that does not depend on
    ``t`` has ``df/dt = 0`` (autograd's gradient is then ``None``, not zeros), batched and not."""
    A = torch.tensor([[-2.0, 1.0], [0.5, -3.0]], dtype=DTYPE)
    c = torch.tensor([1.0, -2.0], dtype=DTYPE)

    def free_of_y(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cos(t).unsqueeze(-1) * c if t.ndim else torch.cos(t) * c

    def free_of_t(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ A.T

    wrap = opaque if fallback else (lambda g: g)
    for batched in (False, True):
        y = torch.tensor([[0.3, -0.7], [1.1, 0.2]], dtype=DTYPE)
        t = torch.tensor([0.4, 1.3], dtype=DTYPE)
        if not batched:
            y, t = y[0], t[0]
        lin = jacobian(wrap(free_of_y), t, y)
        assert torch.equal(lin.J, torch.zeros(*y.shape, 2, dtype=DTYPE))
        want = -torch.sin(t).unsqueeze(-1) * c if batched else -torch.sin(t) * c
        torch.testing.assert_close(lin.ft, want, rtol=1e-15, atol=0)
        lin = jacobian(wrap(free_of_t), t, y)
        torch.testing.assert_close(lin.J, A.expand(*y.shape[:-1], 2, 2), rtol=0, atol=0)
        assert torch.equal(lin.ft, torch.zeros_like(y))


@pytest.mark.parametrize("batched", [False, True])
def test_the_autograd_fallback_differentiates_its_jacobian(batched: bool) -> None:
    """Backprop through a Rosenbrock solve differentiates its matrix ``I - h gamma J`` too: the
    fallback's Jacobian, for a field ``torch.func`` cannot transform, must carry the graph to
    the state, the times and the parameters as ``torch.func``'s does; the same steps, values
    and gradients."""
    from fields import _params, mlp

    results = []
    for wrap in (lambda g: g, opaque):
        ts = torch.tensor([0.0, 0.5, 1.5], dtype=DTYPE, requires_grad=True)
        params = [p.clone().requires_grad_() for p in _params(dim=2, hidden=4, seed=3)]
        y0 = torch.tensor([0.5, -0.3], dtype=DTYPE)
        if batched:
            y0 = torch.stack([y0, -2 * y0])
        y0.requires_grad_()
        sol = neuralode.solve(wrap(mlp(params)), y0, ts, method="rodas5p", rtol=1e-6, atol=1e-8)
        grads = torch.autograd.grad(sol.ys.square().sum(), [y0, ts, *params])
        results.append((sol, grads))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got.stats.n_steps, want.stats.n_steps)
    torch.testing.assert_close(got.ys, want.ys, rtol=1e-13, atol=1e-15)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # jacobian() itself, at a time and state that require gradients (a user's call): the
    # linearisation's derivatives in both, as torch.func's
    f = mlp(_params(dim=2, hidden=4, seed=3))
    derivatives = []
    for g in (f, opaque(f)):
        t = torch.tensor([0.3, 0.8] if batched else 0.3, dtype=DTYPE, requires_grad=True)
        y = torch.tensor([[0.5, -0.3], [0.1, 0.9]] if batched else [0.5, -0.3], dtype=DTYPE)
        y.requires_grad_()
        lin = jacobian(g, t, y)
        w = torch.arange(1.0, 1.0 + lin.J.numel(), dtype=DTYPE).reshape(lin.J.shape)
        derivatives.append(torch.autograd.grad((lin.J * w).sum() + lin.ft.square().sum(), [t, y]))
    for a, b in zip(*derivatives):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_unrolled_lu_is_lapacks(n: int) -> None:
    """The elimination written out for compiled graphs (small systems) pivots as LAPACK does
    and solves to round-off, on random matrices, one that needs every row swapped, and the
    iteration matrix of a stiff step (Robertson, h gamma = 1e4); its gradient is the solve's."""
    from neuralode.solvers.rosenbrock import _lu_solve_unrolled, _lu_unrolled

    torch.manual_seed(n)
    mats = [torch.randn(4, n, n, dtype=DTYPE), torch.eye(n, dtype=DTYPE).flip(0).unsqueeze(0)]
    # ``[..., N, N]``: one matrix alone, and a stack with two leading dimensions
    mats += [torch.randn(n, n, dtype=DTYPE), torch.randn(2, 7, n, n, dtype=DTYPE)]
    if n == 3:
        J = jacobian(robertson(), torch.tensor(0.0, dtype=DTYPE),
                     torch.tensor([0.9, 3e-5, 0.1], dtype=DTYPE)).J  # fmt: skip
        mats.append((torch.eye(3, dtype=DTYPE) - 1e4 * J).unsqueeze(0))
    for A in mats:
        LU, perm = _lu_unrolled(A)
        LU_ref, _, _ = torch.linalg.lu_factor_ex(A)
        torch.testing.assert_close(LU, LU_ref, rtol=1e-12, atol=1e-14)
        b = torch.randn(A.shape[:-1], dtype=DTYPE)
        x = _lu_solve_unrolled(LU, perm, b)
        torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    A = mats[0].clone().requires_grad_()
    b = torch.randn(A.shape[:-1], dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda A, b: _lu_solve_unrolled(*_lu_unrolled(A), b), (A, b))


@pytest.mark.parametrize("method", ["rodas5p", "kvaerno5"])
def test_batched_large_systems_on_two_threads(method: str) -> None:
    """torch 2.13's batched CPU LU runs LAPACK's ``getrf`` on several threads at once, which
    MKL does not survive from about 150 unknowns (pytorch/pytorch#181570): two 160-component
    linear systems solved as a batch on two threads stopped with "Pivots given to lu_solve
    must all be greater or equal to 1" (and a batch of 2 x 160 random matrices factored to
    residuals of 1e10).  Now batches of large CPU matrices are factored one by one
    (``newton.lu_factor``) and the solve reaches ``expm(A) y0``."""
    from neuralode.solvers.newton import lu_factor

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        N = 160
        A = -torch.diag(torch.logspace(0, 3, N, dtype=DTYPE))
        A = A + 0.3 * torch.randn(N, N, generator=g, dtype=DTYPE) / N**0.5
        M = torch.randn(2, N, N, generator=g, dtype=DTYPE)
        LU, piv = lu_factor(M)
        # LAPACK's column-major layout, as the batched kernel gives: a row-major batch would
        # be copied by every lu_solve (16 x 512: 19 ms a solve instead of 2.5).
        assert LU.stride()[-2:] == (1, N)
        b = torch.randn(2, N, 1, generator=g, dtype=DTYPE)
        torch.testing.assert_close(M @ torch.linalg.lu_solve(LU, piv, b), b)
        y0 = torch.stack([torch.ones(N, dtype=DTYPE), torch.linspace(-1, 1, N, dtype=DTYPE)])
        ts = torch.tensor([0.0, 0.5], dtype=DTYPE)
        sol = neuralode.solve(
            lambda t, y: y @ A.T, y0, ts, method=method, batched=True, rtol=1e-7, atol=1e-9,
        )  # fmt: skip
        exact = y0 @ torch.linalg.matrix_exp(0.5 * A).T
        torch.testing.assert_close(sol.ys[:, -1], exact, rtol=1e-5, atol=1e-7)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("method", ["rodas5p", "kvaerno5"])
def test_a_stiff_adjoint_shows_func_time_in_the_states_dtype(method: str) -> None:
    """float32 state, float64 times: the stiff backward solve's linearisation (func's Jacobian
    and its derivative in time) calls func with float32 times, as every other call does."""
    seen: set[torch.dtype] = set()
    A = torch.tensor([[-30.0, 1.0], [0.0, -1.0]])
    k = torch.tensor(1.0, requires_grad=True)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.add(t.dtype)
        return k * (y @ A.T) + torch.sin(t)

    y0 = torch.tensor([1.0, 0.5], requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    sol = neuralode.solve(f, y0, t, method=method, gradient="adjoint", adjoint_params=(k,),
                          rtol=1e-5, atol=1e-7)  # fmt: skip
    seen.clear()
    grads = torch.autograd.grad(sol.ys.sum(), (y0, k))
    assert seen == {torch.float32}
    assert all(g.dtype == torch.float32 for g in grads)
