"""The ESDIRK methods (``kvaerno3``, ``kvaerno5``): Newton's method per stage, per sample.

* Their coefficients satisfy the Runge-Kutta order conditions (every rooted tree, with the full
  lower-triangular matrix) up to the stated order and fail at the next, for the solution and the
  embedded solution; a tableau with a wrong node, predictor or last row is refused.
* One step evaluates ``f`` only at the step's nodes, and counts its Newton iterations.
* Gradients: ``gradcheck`` in float64 through the implicit function theorem (backprop and
  checkpoint), never through the iterations.
* A step whose iteration fails is rejected and retried smaller; a solve whose iterations cannot
  converge says so (``Status.NEWTON_FAILED``); a NaN from the field is reported as such.
* Outputs come from steps that end on them (the cubic Hermite interpolant would cost kvaerno5
  its order: measured 162 tolerance units on HIRES at rtol 1e-6 when interpolating, 1.0 landing).
(``test_stiff.py`` runs them on the stiff problems against scipy, batched, with the adjoint;
``test_convergence.py`` measures their orders.)
"""

from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction
from typing import Any

import pytest
import torch
from stiff_problems import van_der_pol
from trees import Tree, assert_sharp_orders, residuals

import neuralode
from neuralode.solvers import esdirk as esdirk_module
from neuralode.solvers.base import DenseStep, Solver, StepResult
from neuralode.solvers.esdirk import Esdirk, NewtonSettings
from neuralode.solvers.tableaus import ESDIRK_TABLEAUS, KVAERNO3, EsdirkTableau

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
ESDIRK = tuple(ESDIRK_TABLEAUS)


# -- coefficients ------------------------------------------------------------------------------
def _residuals(tab: EsdirkTableau, b: list[Fraction], order: int) -> dict[int, float]:
    """Largest ``|sum_i b_i Phi_i(t) - 1/gamma(t)|`` per tree order, exactly, with
    ``Phi(t) = prod over children (A Phi(child))`` and ``A`` the full matrix (diagonal too)."""
    A, s = tab.A, tab.stages

    @functools.cache
    def phi(t: Tree) -> tuple[Fraction, ...]:
        out = [Fraction(1)] * s
        for child in t:
            pc = phi(child)
            out = [
                x * sum((A[i][j] * pc[j] for j in range(s)), Fraction(0)) for i, x in enumerate(out)
            ]
        return tuple(out)

    return residuals(b, phi, order)


@pytest.mark.parametrize("name", ESDIRK)
def test_order_conditions(name: str) -> None:
    tab = ESDIRK_TABLEAUS[name]
    cases = (
        ("solution", list(tab.b), tab.order),
        ("embedded", [x - e for x, e in zip(tab.b, tab.b_err)], tab.error_order),
    )
    assert_sharp_orders(name, lambda b, n: _residuals(tab, list(b), n), cases, 1e-14)


def test_tableau_checks_its_data() -> None:
    fields = {k: getattr(KVAERNO3, k) for k in KVAERNO3.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"c\[1\]"):
        EsdirkTableau(**{**fields, "c": (Fraction(0), Fraction(87, 100), *KVAERNO3.c[2:])})
    bad_pred = (*KVAERNO3.pred[:2], (Fraction(1, 2), Fraction(1, 3)), KVAERNO3.pred[3])
    with pytest.raises(ValueError, match=r"pred\[2\] sums to 1"):
        EsdirkTableau(**{**fields, "pred": bad_pred})
    with pytest.raises(ValueError, match="stiffly accurate"):
        EsdirkTableau(**{**fields, "b": (*KVAERNO3.b[:2], KVAERNO3.b[2] + 1, KVAERNO3.b[3] - 1)})
    with pytest.raises(TypeError, match="^Esdirk needs an EsdirkTableau, got ButcherTableau$"):
        Esdirk(neuralode.get_tableau("dopri5"))  # type: ignore[arg-type]
    # A two-stage pair whose rows are consistent but whose last stage sits at 3/4 of the step
    # (so sum(b) == 3/4): it was accepted.
    g = Fraction(1, 2)
    with pytest.raises(ValueError, match=r"c\[-1\] == 1"):
        EsdirkTableau(
            "bad", 1, 1, g, ((), (Fraction(1, 4),)), (Fraction(1, 4), g), (Fraction(0),) * 2,
            (Fraction(0), Fraction(3, 4)), ((), (Fraction(1),)),
        )  # fmt: skip


# -- one step --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ESDIRK)
def test_one_step_evaluates_at_its_nodes(method: str) -> None:
    """A step evaluates ``f`` at ``t0`` (the Jacobian's forward pass) and at the implicit stages'
    nodes, once per Newton iteration; ``nfe`` counts them all (with the entry's check)."""
    # Stages solved to round-off, one step whatever its error (the step's nodes are the point).
    solver = Esdirk(ESDIRK_TABLEAUS[method], NewtonSettings(1e-10, 1e-10, max_iters=30))
    seen: list[float] = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(float(t.detach()))
        return -(y**2) + torch.sin(t)

    t0, h = 0.25, 0.125
    with torch.no_grad():  # no graph: no evaluation for the implicit function theorem
        sol = neuralode.solve(
            f,
            torch.tensor([0.5, 1.0], dtype=DTYPE),
            torch.tensor([t0, t0 + h], dtype=DTYPE),
            method=method,
            first_step=h,
            rtol=1e10,
            atol=1e10,
        )
    stats = sol.stats
    assert int(stats.n_steps) == 1 and int(stats.njev) == int(stats.nlu) == 1
    assert int(stats.nfe) == len(seen) == 2 + int(stats.n_newton)
    nodes = {round(t0 + c * h, 12) for c in solver.c_list}
    assert {round(t, 12) for t in seen} == nodes  # every node, nothing else
    assert int(stats.n_newton) >= solver.n_stages - 1  # at least one iteration per stage


def test_outputs_are_step_ends() -> None:
    """Every output time is where a step starts (the next step's Jacobian is taken there)."""
    seen: set[float] = set()

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.add(round(float(t.detach()), 12))
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, 5 * (1 - x**2) * v - x], -1)

    ts = torch.tensor([0.0, 0.37, 1.2, 2.05, 3.0], dtype=DTYPE)
    y0 = torch.tensor([2.0, 0.0], dtype=DTYPE)
    with torch.no_grad():
        neuralode.solve(f, y0, ts, method="kvaerno5", rtol=1e-6, atol=1e-8)
        batch = neuralode.solve(f, y0.expand(3, 2), ts, method="kvaerno5", rtol=1e-6, atol=1e-8)
    assert {round(float(t), 12) for t in ts[1:-1]} <= seen
    assert batch.success


# -- gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ESDIRK)
@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_gradcheck(method: str, gradient: str) -> None:
    """Exact gradients of the computed solution, with stages solved to round-off (a Newton
    tolerance of 1e-13: finite differences then see the same stages).  Constant steps
    (``first_step``, ``ifactor=1``, loose step tolerances) so that they see the same steps."""
    solver = Esdirk(ESDIRK_TABLEAUS[method], NewtonSettings(1e-13, 1e-13, max_iters=30))
    theta = torch.tensor([30.0, 1.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)

    def run(y0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -theta[0] * (y - torch.cos(t)) - theta[1] * y**3

        kw = {} if gradient == "backprop" else {"adjoint_params": (theta,)}
        sol = neuralode.solve(
            f, y0, ts, method=solver, first_step=0.0625, rtol=1e10, atol=1e10, ifactor=1.0,
            gradient=gradient, **kw,
        )  # fmt: skip
        assert int(sol.stats.n_rejected) == 0
        return sol.ys

    assert torch.autograd.gradcheck(run, (y0, theta), atol=1e-7, rtol=1e-6)


# -- failures --------------------------------------------------------------------------------------
class _Recording(Esdirk):
    """Records each step's Newton status."""

    def __init__(self, method: str, settings: NewtonSettings | None = None) -> None:
        super().__init__(ESDIRK_TABLEAUS[method], settings)
        self.statuses: list[int] = []

    def configured(self, controller: object) -> Solver:
        return self

    def step(self, *args: object, **kwargs: object) -> StepResult:
        res = super().step(*args, **kwargs)  # type: ignore[arg-type]
        assert res.status is not None
        self.statuses.append(int(res.status))
        return res


@pytest.mark.parametrize("linear", ["dense", "gmres"])
def test_a_failed_iteration_rejects_the_step_and_the_retry_succeeds(linear: str) -> None:
    """A first step of 1 on ``y' = -100 y^3`` from 10: the stages' chord iterations (with the
    Jacobian ``-3e4``; by GMRES, Newton's iterations, limited to 2) cannot converge, the step
    is rejected, and the smaller retries reach the exact solution ``y = 10 / sqrt(1 + 2e4 t)``."""
    iters = 2 if linear == "gmres" else 10
    settings = NewtonSettings(rtol=1e-6, atol=1e-8, linear=linear, max_iters=iters)
    solver = _Recording("kvaerno5", settings)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -100 * y**3

    ts = torch.tensor([0.0, 1.0], dtype=DTYPE)
    sol = neuralode.solve(
        f, torch.tensor([10.0], dtype=DTYPE), ts, method=solver, first_step=1.0, rtol=1e-6,
        atol=1e-8,
    )  # fmt: skip
    assert solver.statuses[0] == neuralode.Status.NEWTON_FAILED
    assert sol.success and int(sol.stats.n_rejected) >= 1
    exact = 10 / (1 + 2e4) ** 0.5
    assert abs(float(sol.ys[-1, 0]) - exact) < 1e-5 * exact


@pytest.mark.usefixtures("newton_never_converges")
def test_iterations_that_never_converge_say_so() -> None:
    """Iterations that never converge (made so): every step fails, the steps shrink to nothing
    and the error names the Newton iteration, per row in a batch."""
    solver = neuralode.get_solver("kvaerno3")

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(y**3) + torch.sin(10 * t).unsqueeze(-1)

    y0, ts = torch.tensor([1.0], dtype=DTYPE), torch.tensor([0.0, 1.0], dtype=DTYPE)
    with pytest.raises(neuralode.SolverError, match="Newton iteration did not converge"):
        neuralode.solve(f, y0, ts, method=solver, rtol=1e-8, atol=1e-8)
    rows = neuralode.solve(f, y0.expand(2, 1), ts, method=solver, throw=False, batched=True)
    assert rows.status.tolist() == [int(neuralode.Status.NEWTON_FAILED)] * 2


class _FailsOnThirdStep(Solver):
    """A fixed-step method (explicit Euler) whose third step reports a failed iteration."""

    name, order, dense_order = "failing_euler", 1, 1

    def init(self, f, t, y, f0):  # type: ignore[no-untyped-def]
        return 0

    def step(self, f, t, h, y, state, times=None):  # type: ignore[no-untyped-def]
        status = torch.tensor(int(neuralode.Status.NEWTON_FAILED) if state == 2 else 0)
        return StepResult(
            y + h * f(torch.as_tensor(t, dtype=y.dtype), y), None, None, state + 1, 1, status
        )

    def dense(self, f, t, h, y, result):  # type: ignore[no-untyped-def]
        k = (result.y1 - y) / h
        return DenseStep(y, h, [k], torch.tensor([[1.0]], dtype=torch.float64)), 0, None

    def merge(self, accept, new, old):  # type: ignore[no-untyped-def]
        return new


def test_a_fixed_step_that_fails_stops_its_row() -> None:
    """A fixed step cannot shrink: the row stops where its step failed and says why."""
    ts = torch.linspace(0, 1, 6, dtype=DTYPE)
    sol = neuralode.solve(
        lambda t, y: -y, torch.tensor([1.0], dtype=DTYPE), ts, method=_FailsOnThirdStep(),
        throw=False,
    )  # fmt: skip
    assert int(sol.status) == neuralode.Status.NEWTON_FAILED
    assert float(sol.t_end) == pytest.approx(0.4)
    assert int(sol.stats.n_accepted) == 2 and int(sol.stats.n_steps) == 3


class _RowFailsOnThirdStep(_FailsOnThirdStep):
    """Per-row explicit Euler whose first row reports a failed iteration on its third step;
    records the step each call hands each row."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []

    def step(self, f, t, h, y, state, times=None):  # type: ignore[no-untyped-def]
        self.steps.append(torch.as_tensor(h).tolist())
        ts = torch.as_tensor(t, dtype=y.dtype)
        y1 = y + torch.as_tensor(h, dtype=y.dtype).unsqueeze(-1) * f(ts, y)
        failed = torch.zeros(y.shape[0], dtype=torch.long)
        failed[0] = int(neuralode.Status.NEWTON_FAILED) if state == 2 else 0
        return StepResult(y1, None, None, state + 1, 1, failed)


def test_a_batch_row_whose_fixed_step_fails_is_handed_no_more_steps() -> None:
    """A row whose fixed step failed stops there; the loop hands it a step of zero from then on
    (the protocol's masked row: a solver need not step a row that has stopped), while the
    other row runs on to the end as it does alone."""
    ts = torch.linspace(0, 1, 6, dtype=DTYPE)
    solver = _RowFailsOnThirdStep()
    y0 = torch.tensor([[1.0], [2.0]], dtype=DTYPE)
    sol = neuralode.solve(lambda t, y: -y, y0, ts, method=solver, batched=True, throw=False)
    assert sol.status.tolist() == [int(neuralode.Status.NEWTON_FAILED), 0]
    assert sol.t_end.tolist() == pytest.approx([0.4, 1.0])
    assert sol.stats.n_accepted.tolist() == [2, 5] and sol.stats.n_steps.tolist() == [3, 5]
    assert [row[0] for row in solver.steps] == pytest.approx([0.2, 0.2, 0.2, 0.0, 0.0])
    assert [row[1] for row in solver.steps] == pytest.approx([0.2] * 5)
    torch.testing.assert_close(sol.ys[1, :, 0], 2 * 0.8 ** torch.arange(6, dtype=DTYPE))


# -- Jacobian reuse ------------------------------------------------------------------------------
def _stale_state(y: torch.Tensor, J: torch.Tensor, current: bool) -> object:
    """A carried state whose Jacobian ``J`` is a previous step's (``current=False``), or the
    retry's own (``current=True``), with ``f(t, y)`` still to take."""
    from neuralode.solvers.esdirk import _Carried
    from neuralode.solvers.newton import Linearisation

    rows = y.shape[:1] if J.ndim == 3 else ()
    known = torch.ones(rows, dtype=torch.bool)
    return _Carried(Linearisation(y, J, y), ~known, known, known & current, math.nan)


def test_a_stale_jacobian_that_fails_is_replaced_within_the_step() -> None:
    """scipy's Radau policy, per row: an iteration that fails with a previous step's Jacobian
    is run again at the same step with a fresh one (the step succeeds, one Jacobian and a
    second factorisation charged to that row only); one that fails with the step's own
    Jacobian rejects the step.  The carried Jacobian here is zero, which makes the chord
    iteration the fixed-point one: on ``y' = A y`` with ``h |A| = 100`` it diverges."""
    A = torch.diag(torch.tensor([-1e3, -1.0], dtype=DTYPE))
    f = lambda t, y: y @ A.T  # noqa: E731
    solver = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], NewtonSettings(1e-10, 1e-10))
    y = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=DTYPE)
    t, h = torch.zeros(2, dtype=DTYPE), torch.full((2,), 0.1, dtype=DTYPE)
    with torch.no_grad():
        fresh = solver.step(f, t, h, y, None)
        assert fresh.status is not None and not bool(fresh.status.any())
        # Row 0 carries a wrong Jacobian, row 1 the right one.
        J = torch.stack([torch.zeros(2, 2, dtype=DTYPE), A])
        res = solver.step(f, t, h, y, _stale_state(y, J, current=False))
        assert res.status is not None and res.status.tolist() == [0, 0]
        assert res.njev.tolist() == [1, 0]  # type: ignore[union-attr]
        assert res.nlu.tolist() == [2, 1]  # type: ignore[union-attr]
        torch.testing.assert_close(res.y1, fresh.y1, rtol=1e-9, atol=1e-12)
        # Row 1 iterates as the fresh step did; row 0 spends its failed iterations and then
        # the fresh Jacobian's (at least one per stage), and its forward pass.
        newton, nfe = res.n_newton.tolist(), res.nfe.tolist()  # type: ignore[union-attr]
        assert newton[1] == int(fresh.n_newton[1])  # type: ignore[index]
        assert newton[0] >= int(fresh.n_newton[0]) + 1  # type: ignore[index]
        assert nfe[0] - newton[0] == nfe[1] - newton[1] + 1
        # Row 0's Jacobian is now its step's own: a retry of this step (had the loop rejected
        # it for its error) that fails is rejected rather than given another; row 1's is
        # still the carried one.
        assert res.retry_state.j_current.tolist() == [True, False]
        # The same wrong Jacobian as the step's own: no second try, the step fails.
        failed = solver.step(f, t, h, y, _stale_state(y, J, current=True))
        assert failed.status is not None
        assert failed.status.tolist() == [int(neuralode.Status.NEWTON_FAILED), 0]
        assert int(torch.as_tensor(failed.njev).sum()) == 0


def test_jacobians_and_factorisations_are_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant steps on a linear field (one iteration per stage, never slow): one Jacobian and
    one factorisation for the whole solve (counted, and done: ``_factor`` runs once), the values
    of a Jacobian per step to round-off; an adaptive solve of a nonlinear field takes fewer
    Jacobians than steps, and ``reuse_jacobian=False`` one per accepted step."""
    factored = []
    factor = esdirk_module._factor
    monkeypatch.setattr(esdirk_module, "_factor", lambda *a: factored.append(1) or factor(*a))
    A = torch.tensor([[-200.0, 1.0], [0.5, -1.0]], dtype=DTYPE)
    y0, ts = torch.tensor([1.0, -2.0], dtype=DTYPE), torch.tensor([0.0, 1.0], dtype=DTYPE)
    kw = dict(first_step=1 / 16, rtol=1e10, atol=1e10, ifactor=1.0)
    sols, calls = {}, {}
    for reuse in (True, False):
        solver = Esdirk(ESDIRK_TABLEAUS["kvaerno3"], NewtonSettings(reuse_jacobian=reuse))
        factored.clear()
        sols[reuse] = neuralode.solve(lambda t, y: A @ y, y0, ts, method=solver, **kw)
        calls[reuse] = len(factored)
    stats = sols[True].stats
    assert int(stats.n_steps) == 16 and int(stats.njev) == 1 and int(stats.nlu) == 1
    assert calls == {True: 1, False: 16}
    assert int(sols[False].stats.njev) == int(sols[False].stats.nlu) == 16
    torch.testing.assert_close(sols[True].ys, sols[False].ys, rtol=1e-12, atol=1e-14)

    def vdp(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], 10 * (1 - y[0] ** 2) * y[1] - y[0]])

    y0, ts = torch.tensor([2.0, 0.0], dtype=DTYPE), torch.tensor([0.0, 20.0], dtype=DTYPE)
    for reuse in (True, False):
        solver = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], NewtonSettings(reuse_jacobian=reuse))
        sols[reuse] = neuralode.solve(vdp, y0, ts, method=solver, rtol=1e-6, atol=1e-8)
    on, off = sols[True].stats, sols[False].stats
    assert int(on.njev) < 0.8 * int(on.n_steps)
    assert int(off.njev) <= int(off.n_steps) == int(off.nlu)
    assert int(off.njev) >= int(off.n_accepted)
    scale = 1e-8 + 1e-6 * sols[False].ys.abs()
    assert float(((sols[True].ys - sols[False].ys).abs() / scale).max()) < 10


@pytest.mark.parametrize("method", ESDIRK)
def test_batched_rows_across_a_jump_are_their_own_solves(method: str) -> None:
    """The carried Jacobian, factorisation and ``f(t, y)`` per row across ``jump_t`` (a row that
    lands on the jump restarts with nothing known; one that rejected keeps its retry's state):
    rows of different stiffness and grids, solved as one batch, take exactly their own solves'
    steps, evaluations, Jacobians, factorisations and iterations, with their values.  The field
    is smooth at the "jump", so that only the restart is tested: across a real discontinuity
    the batch's and a single solve's round-off (1e-12 in the step times here) decide borderline
    rejections differently."""
    lam = torch.tensor([[30.0], [800.0], [5.0]], dtype=DTYPE)

    def field(t: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return -lam * y + torch.stack([y[..., 1], -y[..., 0]], -1)

    grids = torch.tensor([[0.0, 2.0], [0.25, 1.75], [0.0, 3.0]], dtype=DTYPE)
    y0 = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]], dtype=DTYPE)
    kw = dict(method=method, rtol=1e-6, atol=1e-8, jump_t=[1.0])
    batch = neuralode.solve(lambda t, y: field(t, y, lam), y0, grids, **kw)  # type: ignore[arg-type]
    assert batch.success
    for i in range(3):
        row = functools.partial(field, lam=lam[i])
        one = neuralode.solve(row, y0[i], grids[i], **kw)  # type: ignore[arg-type]
        torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-12, atol=1e-13)
        for name in ("n_steps", "n_rejected", "nfe", "njev", "nlu", "n_newton"):
            got, want = int(getattr(batch.stats, name)[i]), int(getattr(one.stats, name))
            assert got == want, (i, name, got, want)


def _stage_iteration_by_hand(
    ns: list[float], max_iters: int, kappa: float, stale: bool
) -> tuple[bool, int, bool]:
    """The stage iteration's rules written out for the corrections ``ns`` (scaled norms):
    the rate ``theta`` estimated from successive corrections (from the third on, the geometric
    mean of the last two ratios, as Hairer's RADAU5), ``eta = theta / (1 - theta)``; converged
    once ``eta n <= kappa`` (``eta = 1`` before a rate is known); abandoned from the third
    correction on when diverging (``theta >= 0.99``) or too slow to reach ``kappa`` in the
    iterations left (``theta^left eta n > kappa``).  Rows iterating with a previous step's
    Jacobian (``stale``) stop after two corrections only at a ratio below 0.01, else after
    three.  Returns ``(converged, iterations, slow)``: ``slow``, more than two corrections,
    the last ratio above 1e-3 (the step then asks for a fresh Jacobian)."""
    prev = ratio = None
    eta, last = 1.0, 0.0
    for m in range(max_iters):
        n = ns[m]
        diverged = False
        if prev is not None:
            new = n / prev
            rate = new if ratio is None else math.sqrt(new * ratio)
            ratio = last = new
            eta = rate / max(1 - rate, 1e-30)
            if m >= 2:
                left = max_iters - 1 - m
                diverged = rate >= 0.99 or rate**left * eta * n > kappa
        small = eta * n <= kappa
        if m < 2 and stale:
            small = small and m == 1 and ratio is not None and ratio < 0.01
        if diverged or small:
            return small and not diverged, m + 1, m + 1 > 2 and last > 1e-3
        prev = n
    return False, max_iters, max_iters > 2 and last > 1e-3


def test_the_stage_iteration_stops_and_gives_up_by_its_rules() -> None:
    """The iteration of one stage, ``z = base + hg f(z)`` with ``f = lam z`` and the identity
    for its matrix, so each correction is the last times ``theta = hg lam`` exactly, against
    the rules written out by hand, with the threshold ``kappa`` the module documents: for
    tolerances 1e-13, 1e-6 and 1e-2, rates from 5e-4 to 1.5, first corrections from 1.1e-4 to
    1.7e5 tolerance units, 4, 7 and 10 iterations allowed, a fresh and a stale Jacobian (1,080
    cases), and corrections whose rate changes from one to the next."""
    from neuralode.solvers.esdirk import NewtonSettings, _Newton

    hg, eps = 0.5, torch.finfo(DTYPE).eps
    thetas = (5e-4, 0.005, 0.05, 0.2, 0.3, 0.45, 0.6, 0.9, 0.995, 1.5)
    cases = itertools.product(
        (1e-13, 1e-6, 1e-2),
        thetas,
        (1.1e-4, 0.7, 3.3, 1.1e2, 1.3e3, 1.7e5),
        (4, 7, 10),
        (False, True),
    )
    outcomes = set()
    for tol, theta, n0, max_iters, stale in cases:
        # scipy Radau's threshold: 0.022, 1e-3 and 0.03 for these tolerances
        kappa = max(10 * eps / tol, min(0.03, math.sqrt(tol)))
        y, base = torch.ones(1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE)  # scale: 2 tol
        newton = _Newton(NewtonSettings(max_iters=max_iters, rtol=tol, atol=tol), y, hg, False)
        newton.linear = lambda r, t, z, fz, active: r
        if stale:
            newton.stale = torch.tensor(True)
        # the root is 0, where the iterates theta^m z0 carry no round-off of a larger value
        start = n0 * 2 * tol / (1 - theta) * torch.ones(1, dtype=DTYPE)  # first: n0 units
        lam = theta / hg
        _, ok, its, slow = newton.solve(
            lambda t, z, lam=lam: lam * z, torch.tensor(0.0, dtype=DTYPE), base, start
        )
        ns = [n0 * theta**m for m in range(max_iters)]
        want = _stage_iteration_by_hand(ns, max_iters, kappa, stale)
        assert (bool(ok), int(its), bool(slow)) == want, (tol, theta, n0, max_iters, stale)
        outcomes.add(want)
    # Rates that change from one correction to the next (the estimate is the geometric mean of
    # the last two ratios): each correction scaled by s_m, so z_{m+1} = (1 - s_m (1 - theta)) z_m.
    scales = (1.0, 1.0, 0.2, 1.4, 0.3, 1.2, 0.5, 1.0, 1.0, 1.0)
    for n0, theta in itertools.product((0.9, 3.1, 47.0, 510.0), (0.05, 0.3, 0.6)):
        tol, max_iters, calls = 1e-6, 10, [0]

        def scaled(r: torch.Tensor, *_: Any, calls: list[int] = calls) -> torch.Tensor:
            calls[0] += 1
            return r * scales[calls[0] - 1]

        newton = _Newton(
            NewtonSettings(max_iters=max_iters, rtol=tol, atol=tol), torch.ones(1, dtype=DTYPE),
            hg, False,
        )  # fmt: skip
        newton.linear = scaled
        z0 = n0 * 2 * tol / (1 - theta)  # a first correction of n0 units
        lam = theta / hg
        _, ok, its, slow = newton.solve(
            lambda t, z, lam=lam: lam * z, torch.tensor(0.0, dtype=DTYPE),
            torch.zeros(1, dtype=DTYPE), torch.full((1,), z0, dtype=DTYPE),
        )  # fmt: skip
        ns, z = [], z0
        for s in scales:
            ns.append(abs(s * (1 - theta) * z) / (2 * tol))
            z *= 1 - s * (1 - theta)
        kappa = min(0.03, math.sqrt(tol))
        want = _stage_iteration_by_hand(ns, max_iters, kappa, False)
        assert (bool(ok), int(its), bool(slow)) == want, (n0, theta)
        outcomes.add(want)
    # converged after 1 to 10 corrections (slow or not), abandoned after 3 to 5
    assert {(True, m, False) for m in (1, 2, 3)} | {(True, m, True) for m in (3, 10)} <= outcomes
    assert {(False, m, True) for m in (3, 4, 5)} <= outcomes and len(outcomes) == 14


@pytest.mark.parametrize("method", ESDIRK)
def test_a_step_alone_solves_its_stages_to_round_off(method: str) -> None:
    """A step taken directly (the solver protocol, no solve: no controller, so the stage
    iteration's own tolerance, ``eps ** 0.75`` relative and absolute) ends within 1e-13 of the
    step whose stage equations are solved by full Newton to the last bit (measured: 2.7e-15
    ``kvaerno3``, 1.3e-15 ``kvaerno5``, Van der Pol at mu = 5, h = 0.05 and 0.2)."""

    f = van_der_pol(5.0)
    tableau = ESDIRK_TABLEAUS[method]
    A, b, c = ([[float(x) for x in row] for row in tableau.A], [float(x) for x in tableau.b],
               [float(x) for x in tableau.c])  # fmt: skip

    def residual(z: torch.Tensor, base: torch.Tensor, ha: float, ti: torch.Tensor) -> torch.Tensor:
        return z - base - ha * f(ti, z)

    def by_newton(t: float, h: float, y: torch.Tensor) -> torch.Tensor:
        ks: list[torch.Tensor] = []
        for i, ci in enumerate(c):
            ti = torch.tensor(t + ci * h, dtype=DTYPE)
            base = y + h * sum((A[i][j] * ks[j] for j in range(i)), torch.zeros_like(y))
            r = functools.partial(residual, base=base, ha=h * A[i][i], ti=ti)
            z = base.clone()
            for _ in range(50 if A[i][i] else 0):
                dz = torch.linalg.solve(torch.autograd.functional.jacobian(r, z), -r(z))
                z = z + dz
                if not bool(dz.any()):
                    break
            ks.append(f(ti, z))
        return y + h * sum((bj * k for bj, k in zip(b, ks)), torch.zeros_like(y))

    solver, y = neuralode.get_solver(method), torch.tensor([2.0, 0.0], dtype=DTYPE)
    for h in (0.05, 0.2):
        res = solver.step(f, torch.tensor(0.3, dtype=DTYPE), torch.tensor(h, dtype=DTYPE), y, None)
        torch.testing.assert_close(res.y1, by_newton(0.3, h, y), rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", ESDIRK)
def test_tolerances_per_row_reach_the_stage_iteration(method: str) -> None:
    """``rtol`` as a tensor, one per row (``[batch, 1]``) or one per component (``[N]``): the
    stage iteration's scale and threshold take it as it is (a float of it would need one
    value), and each row of the batch is solved as alone with its own tolerance."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([-1000 * (y[..., 0] - torch.cos(t)), -y[..., 1]], -1)

    y0 = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=DTYPE)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)
    rtols = [1e-5, 1e-7]
    batch = neuralode.solve(
        f, y0, t, method=method, rtol=torch.tensor(rtols, dtype=DTYPE).view(2, 1), atol=1e-9,
        batched=True,
    )  # fmt: skip
    for i, rtol in enumerate(rtols):
        alone = neuralode.solve(f, y0[i], t, method=method, rtol=rtol, atol=1e-9)
        torch.testing.assert_close(batch.ys[i], alone.ys, rtol=1e-12, atol=1e-13)
        for name in ("n_steps", "n_newton", "nfe"):
            assert int(getattr(batch.stats, name)[i]) == int(getattr(alone.stats, name)), name
    per_component = torch.tensor([1e-5, 1e-7], dtype=DTYPE)
    sol = neuralode.solve(f, y0[0], t, method=method, rtol=per_component, atol=1e-9)
    assert sol.success and int(sol.stats.n_steps) > int(batch.stats.n_steps[0])


@pytest.mark.parametrize("own_tolerances", [False, True])
@pytest.mark.parametrize("method", ESDIRK)
def test_a_batch_of_scalar_states_iterates_each_row_alone(
    method: str, own_tolerances: bool
) -> None:
    """A batch of one-component states (``y0`` ``[batch]``, ``batched=True``), with the solve's
    norm or with Newton tolerances of its own (then a root mean square of its own, which has
    no feature dimension to reduce here: a mean over ``dim=()`` would reduce the whole batch):
    each row takes its own solve's steps, iterations and values."""
    lam = torch.tensor([-1e3, -5.0, -50.0], dtype=DTYPE)
    y0 = torch.tensor([1.0, 2.0, 0.5], dtype=DTYPE)
    ts = torch.linspace(0.0, 1.0, 3, dtype=DTYPE)
    solver: Any = method
    if own_tolerances:
        solver = Esdirk(ESDIRK_TABLEAUS[method], NewtonSettings(rtol=1e-9, atol=1e-12))
    kw = dict(method=solver, rtol=1e-6, atol=1e-8)

    def field(t: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return lam * (y - torch.cos(t)) - y**3

    batch = neuralode.solve(lambda t, y: field(t, y, lam), y0, ts, batched=True, **kw)
    assert batch.ys.shape == (3, 3)
    for i in range(3):
        one = neuralode.solve(functools.partial(field, lam=lam[i]), y0[i], ts, **kw)
        torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-12, atol=1e-13)
        for name in ("n_steps", "n_rejected", "nfe", "n_newton"):
            got, want = int(getattr(batch.stats, name)[i]), int(getattr(one.stats, name))
            assert got == want, (i, name, got, want)


def test_a_solver_built_from_a_tableau_is_named_by_it() -> None:
    """``Esdirk(tableau)`` takes the tableau's name, which messages about the solve show."""
    solver = Esdirk(ESDIRK_TABLEAUS["kvaerno3"], NewtonSettings(max_iters=5))
    assert solver.name == "kvaerno3"
    with pytest.raises(ValueError, match="^step_size applies to fixed-step methods; 'kvaerno3' is"):
        neuralode.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method=solver,
                        step_size=0.1)  # fmt: skip


@pytest.mark.parametrize("norm", ["rms", "max"])
def test_the_newton_iteration_takes_the_solves_tolerances_and_norm(norm: str) -> None:
    """Without tolerances of its own, the stage iteration stops by the solve's ``rtol``,
    ``atol`` and ``norm``: the same solve as Newton settings that give those explicitly,
    iteration for iteration; other settings change the iterations (so the comparison can
    fail)."""
    from neuralode.controllers import max_norm, rms_norm

    norm_fn = {"rms": rms_norm, "max": max_norm}[norm]
    mu = 50.0

    def vdp(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    y0 = torch.tensor([2.0, 0.0], dtype=DTYPE)
    ts = torch.tensor([0.0, 5.0], dtype=DTYPE)
    tol = dict(rtol=1e-4, atol=1e-2)
    kw: dict = dict(norm=norm, **tol)
    default = neuralode.solve(vdp, y0, ts, method="kvaerno5", **kw)
    own = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], NewtonSettings(norm=norm_fn, **tol))
    explicit = neuralode.solve(vdp, y0, ts, method=own, **kw)
    assert int(default.stats.n_newton) == int(explicit.stats.n_newton)
    torch.testing.assert_close(default.ys, explicit.ys, rtol=0, atol=0)
    other_norm = {"rms": max_norm, "max": rms_norm}[norm]
    for settings in (dict(norm=norm_fn, rtol=1e-4, atol=1e-8), dict(norm=other_norm, **tol)):
        other = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], NewtonSettings(**settings))
        changed = neuralode.solve(vdp, y0, ts, method=other, **kw)
        assert int(changed.stats.n_newton) != int(default.stats.n_newton), settings
