"""The fixed-step implicit Runge-Kutta methods (torchdiffeq's names).

They also join every parametrised solver test through ``neuralode.METHODS`` (convergence order of
the steps and the interpolant, gradients by every strategy, batched rows, layouts); here is what is
theirs: stability on stiff problems where explicit methods of the same step blow up, agreement
with a reference on a nonlinear stiff problem, the Newton iteration's work and failure, the
implicit function theorem's gradient against finite differences, and the tableaus' data.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import default_dtype

import neuralode
from neuralode.solvers import get_solver
from neuralode.solvers.implicit import ImplicitRK
from neuralode.solvers.tableaus import IMPLICIT_TABLEAUS, ImplicitTableau

F64 = torch.float64
NAMES = tuple(IMPLICIT_TABLEAUS)
#: L-stable: the stiff component is damped to nothing in one step (|R(-inf)| = 0).
L_STABLE = ("implicit_euler", "radauIIA3", "radauIIA5", "sdirk2", "trbdf2")


def test_every_torchdiffeq_implicit_name_is_registered() -> None:
    assert set(NAMES) == {
        "implicit_euler",
        "implicit_midpoint",
        "trapezoid",
        "radauIIA3",
        "radauIIA5",
        "gl4",
        "gl6",
        "sdirk2",
        "trbdf2",
    }
    for name in NAMES:
        solver = get_solver(name)
        assert isinstance(solver, ImplicitRK) and not solver.adaptive and solver.uses_jacobian


def _prothero_robinson(lam: float):  # type: ignore[no-untyped-def]
    """``y' = -lam (y - cos t) - sin t``: exact solution ``cos t`` from ``y(0) = 1``."""
    return lambda t, y: -lam * (y - torch.cos(t)) - torch.sin(t)


@pytest.mark.parametrize("name", NAMES)
def test_stiff_problem_at_a_step_explicit_methods_cannot_take(name: str) -> None:
    """h lam = 1e5: rk4 overflows; every implicit method stays on cos t (the A-stable ones
    bounded, the L-stable ones damping the start-up error at once)."""
    f = _prothero_robinson(1e6)
    t = torch.linspace(0, 2, 21, dtype=F64)
    y0 = torch.tensor([1.2], dtype=F64)  # off the slow manifold: a stiff transient
    ys = neuralode.odeint(f, y0, t, method=name)
    err = (ys[1:, 0] - torch.cos(t[1:])).abs().max()
    bound = 1e-4 if name in L_STABLE else 0.25  # A-stable only: R(-inf) = -1 keeps the 0.2
    assert float(err) < bound, (name, float(err))
    if name in L_STABLE:
        assert float((ys[-1, 0] - torch.cos(t[-1])).abs()) < 1e-6
    with pytest.raises(neuralode.SolverError, match="NaN or Inf"):
        neuralode.odeint(f, y0, t, method="rk4")


@pytest.mark.parametrize("name", ["radauIIA5", "radauIIA3", "trbdf2", "gl4"])
def test_van_der_pol_matches_a_reference(name: str) -> None:
    """mu = 100, 400 fixed steps on [0, 2]: within the method's discretisation error of rodas5p
    at rtol 1e-10 (the limits are 3x the errors measured)."""

    def vdp(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], 100.0 * (1 - y[0] ** 2) * y[1] - y[0]])

    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 2, 401, dtype=F64)
    ref = neuralode.solve(vdp, y0, t, method="rodas5p", rtol=1e-10, atol=1e-12).ys
    sol = neuralode.solve(vdp, y0, t, method=name)
    assert sol.success
    err = float((sol.ys[:, 0] - ref[:, 0]).abs().max())
    limit = {"radauIIA5": 1e-8, "radauIIA3": 1e-6, "trbdf2": 1e-5, "gl4": 1e-6}[name]
    assert err < limit, (name, err)


@pytest.mark.parametrize("name", NAMES)
def test_a_linear_problem_takes_one_jacobian_and_two_iterations_per_step(name: str) -> None:
    """The simplified Newton matrix is exact for a linear field: the first iteration solves the
    stages, the second confirms it, and the contraction is so fast that every later step keeps
    the first step's Jacobian.  Work: one Jacobian (its forward pass is f(t0, y0)), two
    evaluations per implicit stage and step, one factorisation a step, and f(t, y) on the later
    steps only for a method with an explicit first stage."""
    A = torch.tensor([[-2.0, 1.0], [0.5, -30.0]], dtype=F64)
    y0 = torch.tensor([1.0, -1.0], dtype=F64)
    t = torch.linspace(0, 1, 11, dtype=F64)
    with torch.no_grad():
        sol = neuralode.solve(lambda t, y: A @ y, y0, t, method=name)
    solver = get_solver(name)
    assert isinstance(solver, ImplicitRK)
    steps = 10
    assert int(sol.stats.n_newton) == 2 * steps
    assert int(sol.stats.njev) == 1 and int(sol.stats.nlu) == steps
    explicit_first = int(IMPLICIT_TABLEAUS[name].explicit_first)
    # 1: the entry's check of f; 1: the Jacobian's forward pass
    want = 1 + 1 + steps * 2 * solver.r + (steps - 1) * explicit_first
    assert int(sol.stats.nfe) == want
    exact = torch.linalg.matrix_exp(A * t[-1]) @ y0
    bound = {1: 5e-2, 2: 2e-3, 3: 1e-4}.get(solver.order, 1e-5)
    assert float((sol.ys[-1] - exact).abs().max()) < bound


def test_a_step_keeps_the_jacobian_only_while_it_serves() -> None:
    """Van der Pol (mu = 1000) on a fixed grid: the prediction from the last step's stages and a
    Jacobian kept while Newton contracts fast (rate <= 0.1) take about two iterations a step,
    and fresh Jacobians only where the solution turns (measured: 4,004 iterations and 1
    Jacobian over 2,000 steps of radauIIA5)."""

    def vdp(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]])

    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 100, 2001, dtype=F64)
    with torch.no_grad():
        sol = neuralode.solve(vdp, y0, t, method="radauIIA5")
    assert sol.success
    assert int(sol.stats.n_newton) <= 2.5 * 2000
    assert int(sol.stats.njev) < 50


def test_slow_contraction_takes_fresh_jacobians() -> None:
    """A strongly nonlinear stage with a large step: the start's Jacobian contracts slowly, so the
    iteration switches to Newton proper (Jacobians at the current stages) and converges."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -50.0 * y**3

    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        sol = neuralode.solve(f, y0, t, method="implicit_euler")
    assert sol.success
    assert int(sol.stats.njev) > 1  # refreshed
    y1 = float(sol.ys[-1, 0])
    assert abs(y1 - 1.0 + 50.0 * y1**3) < 1e-12  # the implicit Euler equation, to round-off


def test_a_newton_failure_is_a_status_and_an_error() -> None:
    """One iteration allowed: it can never confirm convergence on a nonlinear stage."""
    solver = ImplicitRK(IMPLICIT_TABLEAUS["radauIIA5"], max_iters=1)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(y**3)

    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.linspace(0, 1, 5, dtype=F64)
    sol = neuralode.solve(f, y0, t, method=solver, throw=False)
    assert sol.status == neuralode.Status.NEWTON_FAILED
    with pytest.raises(neuralode.SolverError, match="Newton"):
        neuralode.odeint(f, y0, t, method=solver)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_max_iters_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="max_iters"):
        ImplicitRK(IMPLICIT_TABLEAUS["gl4"], max_iters=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_iters"):
        neuralode.odeint(
            lambda t, y: -y,
            torch.ones(1, dtype=F64),
            torch.linspace(0, 1, 3, dtype=F64),
            method="gl4",
            options={"max_iters": bad},
        )


def test_max_iters_reaches_the_solver_through_odeint() -> None:
    f = lambda t, y: -(y**3)  # noqa: E731
    y0 = torch.ones(1, dtype=F64)
    t = torch.linspace(0, 1, 5, dtype=F64)
    with pytest.raises(neuralode.SolverError, match="Newton"):
        neuralode.odeint(f, y0, t, method="radauIIA5", options={"max_iters": 1})
    ys = neuralode.odeint(f, y0, t, method="radauIIA5", options={"max_iters": 20})
    assert torch.isfinite(ys).all()


@pytest.mark.parametrize("name", ["radauIIA5", "trbdf2", "gl6"])
def test_gradcheck_through_the_implicit_function_theorem(name: str) -> None:
    """Backprop's gradient of the computed solution in y0 and a parameter, against finite
    differences (the iteration is not differentiated: the stages' IFT gives the same numbers).
    Output times' gradients are the exact flow's on a fixed grid (tests/test_gradients.py)."""
    W = torch.tensor([[-1.0, 2.0], [-3.0, -0.5]], dtype=F64, requires_grad=True)

    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)

    def fn(y0: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(lambda tt, y: torch.tanh(W @ y) - 0.3 * tt * y, y0, t, method=name)

    y0 = torch.tensor([0.5, -0.2], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (y0, W), atol=1e-7)


def test_hermite_interpolation_between_grid_points() -> None:
    """With ``step_size``, outputs inside a step come from the cubic Hermite interpolant
    (one more evaluation for f(t + h, y1)); its error falls at order 3 or better."""
    f = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    errs = []
    for h in (0.1, 0.05, 0.025):
        t = torch.tensor([0.0, 0.333, 0.777, 1.0], dtype=F64)
        sol = neuralode.solve(f, y0, t, method="gl6", step_size=h)
        exact = torch.stack([torch.cos(t), -torch.sin(t)], 1)
        errs.append(float((sol.ys - exact).abs().max()))
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert min(slopes) > 3.7, (errs, slopes)


def test_tableau_data_is_checked() -> None:
    half = Fraction(1, 2)
    with pytest.raises(ValueError, match="c\\[0\\] == sum"):
        ImplicitTableau("bad", 1, (half,), ((Fraction(1),),), (Fraction(1),))
    with pytest.raises(ValueError, match="order 3"):  # the midpoint rule is of order 2
        ImplicitTableau("bad", 3, (half,), ((half,),), (Fraction(1),))
    message = "^ImplicitRK needs an ImplicitTableau, got ButcherTableau$"
    with pytest.raises(TypeError, match=message):
        ImplicitRK(neuralode.get_tableau("rk4"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_stage_order_conditions(name: str) -> None:
    """The simplifying conditions behind each method's order, checked exactly in float64:
    B(p) (quadrature), and C(q) (stage order) for the collocation methods."""
    tab = IMPLICIT_TABLEAUS[name]
    A = torch.tensor([[float(x) for x in r] for r in tab.A], dtype=F64)
    b = torch.tensor([float(x) for x in tab.b], dtype=F64)
    c = torch.tensor([float(x) for x in tab.c], dtype=F64)
    for k in range(1, tab.order + 1):
        assert abs(float(b @ c ** (k - 1)) - 1 / k) < 1e-14
    stage_order = {"radauIIA3": 2, "radauIIA5": 3, "gl4": 2, "gl6": 3, "implicit_euler": 1}
    for k in range(1, stage_order.get(name, 1) + 1):
        torch.testing.assert_close(A @ c ** (k - 1), c**k / k, rtol=0, atol=1e-14)


def test_an_option_the_method_does_not_take_warns() -> None:
    """As torchdiffeq's unused options: ``max_iters`` to an explicit method, ``max_order`` to an
    implicit Runge-Kutta one."""
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(1, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.warns(UserWarning, match="max_iters"):
        neuralode.odeint(f, y0, t, method="dopri5", options={"max_iters": 3})
    with pytest.warns(UserWarning, match="max_order"):
        ys = neuralode.odeint(f, y0, t, method="gl4", options={"max_order": 3, "max_iters": 9})
    torch.testing.assert_close(ys[-1], torch.exp(-t[-1:]), rtol=1e-4, atol=0)


def _vdp(mu: float | torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda t, y: torch.stack(
        [y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1
    )


def test_checkpoint_replays_the_step_the_forward_pass_took() -> None:
    """Large gl4 steps on Van der Pol (mu = 10, h = 0.4): the stage equations have more than
    one root, and a replay started from zero with a fresh Jacobian found another one (a
    gradient of 314 where backprop's is 1,304; found in review).  The replay now starts from
    the forward pass's recorded stage prediction."""
    mu = torch.tensor(10.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 0.4 * 24, 25, dtype=F64)
    grads = {}
    for gradient in ("backprop", "checkpoint"):
        kw: dict[str, object] = {"adjoint_params": (mu,)} if gradient == "checkpoint" else {}
        sol = neuralode.solve(_vdp(mu), y0, t, method="gl4", gradient=gradient, **kw)
        grads[gradient] = torch.autograd.grad(sol.ys[-1].sum(), (y0, mu))
    for a, b in zip(grads["checkpoint"], grads["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_a_row_that_fails_stops_where_its_own_solve_stops() -> None:
    """A batched fixed-step row whose Newton iteration fails takes no more steps: its dense
    output past the failure is NaN, as its outputs are and as its single solve's is, and the
    other row is untouched (found in review: the failed row went on from the unconverged
    iterate)."""
    solver = ImplicitRK(IMPLICIT_TABLEAUS["trbdf2"])
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=F64)
    T = torch.tensor([[0.0, 0.3, 0.7, 1.0, 1.5], [0.0, 0.2, 0.4, 0.6, 1.2]], dtype=F64)
    with torch.no_grad():
        batch = neuralode.solve(
            _vdp(10.0), y0, T, batched=True, method=solver, throw=False, dense=True
        )
        singles = [
            neuralode.solve(_vdp(10.0), y0[i], T[i], method=solver, throw=False, dense=True)
            for i in range(2)
        ]
    assert batch.status.tolist() == [int(s.status) for s in singles] == [0, 4]
    q = torch.tensor([[0.9], [0.9]], dtype=F64)
    for i, single in enumerate(singles):
        torch.testing.assert_close(batch.ys[i], single.ys, equal_nan=True)
        torch.testing.assert_close(batch.evaluate(q)[i], single.evaluate(q[i]), equal_nan=True)
        assert batch.stats.nfe[i] == single.stats.nfe
    assert not torch.isnan(batch.evaluate(q)[0]).any() and torch.isnan(batch.evaluate(q)[1]).all()


@pytest.mark.parametrize("name", ["gl4", "radauIIA5"])
def test_batched_rows_take_the_iterations_they_take_alone(name: str) -> None:
    """Each step starts its stages from the last step's increments per unit step, carried per
    row (stage-major inside the step, batch-first between steps): on Van der Pol, a batch of
    as many rows as stages (a layout mixed up between the two keeps its shape), over grids of
    their own, takes each row's values, iterations, evaluations and Jacobians alone."""
    solver = ImplicitRK(IMPLICIT_TABLEAUS[name])
    rows = len(solver.c)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [-1.5, 1.0]][:rows], dtype=F64)
    T = torch.stack([torch.linspace(0.0, 1.0 + 0.3 * i, 13, dtype=F64) for i in range(rows)])
    with torch.no_grad():
        batch = neuralode.solve(_vdp(2.0), y0, T, batched=True, method=solver)
        for i in range(rows):
            one = neuralode.solve(_vdp(2.0), y0[i], T[i], method=solver)
            torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-12, atol=1e-12)
            for stat in ("n_newton", "nfe", "njev"):
                assert int(getattr(batch.stats, stat)[i]) == int(getattr(one.stats, stat)), stat


def test_an_explicit_first_stage_of_a_tableau_not_stiffly_accurate() -> None:
    """A user's tableau whose first stage is explicit and whose weights are not its last row
    (``c = (0, 1/2)``, ``A = ((0, 0), (1/3, 1/6))``, ``b = (0, 1)``: order 2): the step works on
    the stage increments, so ``f(t, y)``'s own part of the result (``e0``: zero for the
    registered methods, whose two with an explicit first stage, ``trapezoid`` and ``trbdf2``,
    are stiffly accurate) and of the stage (``A[:, 0]``) must both come in; the step is the
    one written out by hand, its stage solved by fixed point."""
    tableau = ImplicitTableau(
        "explicit_first", 2, (Fraction(0), Fraction(1, 2)),
        ((Fraction(0), Fraction(0)), (Fraction(1, 3), Fraction(1, 6))), (Fraction(0), Fraction(1)),
    )  # fmt: skip
    solver = ImplicitRK(tableau)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -2 * y + torch.cos(t) * y**2

    t, h, y = 0.2, 0.1, torch.tensor([0.7], dtype=F64)
    k1, t_half = f(torch.tensor(t, dtype=F64), y), torch.tensor(t + h / 2, dtype=F64)
    z = y.clone()
    for _ in range(200):  # contraction h / 6 |df/dy|, about 0.03: converged long before
        z = y + h * (k1 / 3 + f(t_half, z) / 6)
    want = y + h * f(t_half, z)
    with torch.no_grad():
        res = solver.step(f, torch.tensor(t, dtype=F64), torch.tensor(h, dtype=F64), y, None)
    torch.testing.assert_close(res.y1, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", ["trapezoid", "radauIIA5", "gl4"])
def test_built_now_float32_under_a_float64_default_and_every_evaluation_counted(
    name: str,
) -> None:
    """An ``ImplicitRK`` built now holds what the registry's (built at import) holds; a float32
    batch on float64 times under ``torch.set_default_dtype(torch.float64)`` is solved in
    float32 (the iteration matrix's identity, the step sizes and the coefficients in the
    state's dtype: float64 factors beside float32 stages are refused by ``lu_solve``); with
    gradients enabled and outputs inside the steps, ``nfe`` is the field's calls."""
    fresh, registered = ImplicitRK(IMPLICIT_TABLEAUS[name]), get_solver(name)
    ignore = {"_cache", "A_rr", "a_col"}  # tensors, compared below
    assert {k: v for k, v in vars(fresh).items() if k not in ignore} == {
        k: v for k, v in vars(registered).items() if k not in ignore
    }
    for key in ("A_rr", "a_col"):
        assert torch.equal(getattr(fresh, key), getattr(registered, key)), key
    # the signature's default iterations; the interpolant, cubic Hermite, caps the dense order
    assert fresh.max_iters == 50
    assert fresh.dense_order == min(3, IMPLICIT_TABLEAUS[name].order)
    T = torch.tensor([[0.0, 0.35, 1.0], [0.0, 0.55, 1.3]], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=F64)
    with default_dtype(torch.float64), torch.no_grad():
        sol = neuralode.solve(_vdp(2.0), y0.float(), T, method=fresh, step_size=0.1)
    assert sol.ys.dtype == torch.float32 and bool((sol.status == 0).all())
    ref = neuralode.solve(_vdp(2.0), y0, T, method=fresh, step_size=0.1)
    torch.testing.assert_close(sol.ys.double(), ref.ys, rtol=1e-4, atol=1e-5)
    calls = 0

    def counted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return _vdp(2.0)(t, y)

    y = y0[0].clone().requires_grad_()
    one = neuralode.solve(counted, y, T[0], method=fresh, step_size=0.1)
    assert int(one.stats.nfe) == calls
    torch.autograd.grad(one.ys.sum(), y)
