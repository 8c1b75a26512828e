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
    iteration switches to Newton proper (Jacobians at the current stages) and converges; each
    fresh Jacobian's forward pass is counted as the evaluation it is."""
    calls = 0

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return -50.0 * y**3

    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        sol = neuralode.solve(f, y0, t, method="implicit_euler")
    assert sol.success
    assert int(sol.stats.njev) > 1  # refreshed
    assert int(sol.stats.nfe) == calls
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


@pytest.mark.parametrize("name", ["gl4", "trbdf2"])
def test_a_batchs_gradient_is_each_rows_own(name: str) -> None:
    """Backprop through a batch (the stages' transposed solve per row, with each row's Newton
    matrix ``I - h [a_ij J(z_j*)]``, not symmetric) gives each row the gradient of its solve
    alone, in its initial state and, summed, in a shared parameter."""
    W = torch.tensor([[-1.0, 2.0], [-3.0, -0.5]], dtype=F64, requires_grad=True)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ W.T) - 0.3 * y**3

    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64)
    y0 = torch.tensor([[0.5, -0.2], [1.5, 0.7], [-0.8, 0.1]], dtype=F64, requires_grad=True)
    sol = neuralode.solve(f, y0, t, batched=True, method=name)
    g_y0, g_W = torch.autograd.grad(sol.ys.square().sum(), (y0, W))
    total = torch.zeros_like(W)
    for i in range(3):
        yi = y0[i].detach().requires_grad_()
        one = neuralode.solve(f, yi, t, method=name)
        gi, gw = torch.autograd.grad(one.ys.square().sum(), (yi, W))
        torch.testing.assert_close(g_y0[i], gi, rtol=1e-10, atol=1e-12)
        total += gw
    torch.testing.assert_close(g_W, total, rtol=1e-10, atol=1e-12)


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
    their own, takes each row's values, iterations, evaluations and Jacobians alone (integer
    counts)."""
    solver = ImplicitRK(IMPLICIT_TABLEAUS[name])
    rows = len(solver.c)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [-1.5, 1.0]][:rows], dtype=F64)
    T = torch.stack([torch.linspace(0.0, 1.0 + 0.3 * i, 13, dtype=F64) for i in range(rows)])
    # and on a grid of its own with outputs inside the steps, where some rows keep their
    # Jacobian and others take a new one in the same step (the interpolant's f(t, y) is then
    # each row's own evaluation, as alone)
    for kw in ({}, {"step_size": 0.15}):
        with torch.no_grad():
            batch = neuralode.solve(_vdp(2.0), y0, T, batched=True, method=solver, **kw)
            for i in range(rows):
                one = neuralode.solve(_vdp(2.0), y0[i], T[i], method=solver, **kw)
                torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-12, atol=1e-12)
                for stat in ("n_newton", "nfe", "njev"):
                    got, want = int(getattr(batch.stats, stat)[i]), int(getattr(one.stats, stat))
                    assert got == want, (stat, kw)
    for stat in ("n_newton", "nfe", "njev", "nlu"):  # counts, as every solver's
        assert getattr(batch.stats, stat).dtype == torch.int64, stat


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
    # with gradients (the step's graph through the implicit function theorem): the same step
    y_grad = y.clone().requires_grad_()
    res = solver.step(f, torch.tensor(t, dtype=F64), torch.tensor(h, dtype=F64), y_grad, None)
    torch.testing.assert_close(res.y1.detach(), want, rtol=1e-13, atol=1e-14)


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


def _implicit_iteration_by_hand(
    c1: float, theta: float, max_iters: int, kappa: float
) -> tuple[bool, int, int, int, bool]:
    """The module's iteration rules written out for corrections ``c1, c1 theta, c1 theta^2,
    ...`` (scaled norms; a simplified iteration of exact rate ``theta``) of a linear problem:
    a row has converged when ``theta / (1 - theta) |dw| <= kappa``, or, before its rate is
    known (the first correction, the first with a new matrix), when ``|dw| <= kappa / 1000``;
    at an observed rate above 0.5 it takes fresh Jacobians at its stages (Newton proper,
    exact here: the next correction is the whole remaining error ``c theta / (1 - theta)``,
    the one after it round-off); it fails after ``max_iters``.  The Jacobian is kept for the
    next step while every observed rate stayed at or below 0.1 and none was taken fresh.
    Returns ``(converged, iterations, jacobians, factorisations, stale)`` for one stage."""
    c, worst, m = c1, 0.0, 1
    if c <= kappa * 1e-3:
        return True, 1, 0, 1, False
    while m < max_iters:
        m, c = m + 1, c * theta
        worst = max(worst, theta)
        if theta / (1 - theta) * c <= kappa if theta < 1 else False:
            return True, m, 0, 1, worst > 0.1
        if theta > 0.5:  # fresh Jacobians: Newton's method proper from here
            rest = c * theta / abs(1 - theta)
            if m + 1 <= max_iters and rest <= kappa * 1e-3:
                return True, m + 1, 1, 2, True
            return m + 2 <= max_iters, min(m + 2, max_iters), 1, 2, True
    return False, max_iters, 0, 1, worst > 0.1


def test_the_stage_iteration_follows_its_rules() -> None:
    """implicit Euler's one stage on ``y' = lam y`` from the identity as its matrix (a zero
    start Jacobian): each correction is the last times ``theta = h |lam|`` exactly (the
    iteration ``w <- h lam (y + w)``), so the iteration's stops, refreshes and failures are
    known in advance: rates from 1e-3 to 1.5, first corrections from 1e-7 to 1e9 tolerance
    units (``eps^0.75 (1 + |y|)``, ``kappa = 10 eps^0.25``, as the module documents), 3, 6 and
    12 iterations allowed, as 8 x 8 rows of one batch and two rows alone."""
    from neuralode.solvers.implicit import _StageNewton

    eps = torch.finfo(F64).eps
    tol = eps**0.75
    kappa = max(10 * eps / tol, min(0.03, math.sqrt(tol)))
    thetas = torch.tensor([1e-3, 0.02, 0.09, 0.2, 0.35, 0.49, 0.7, 1.5], dtype=F64)
    units = torch.tensor([1e-7, 3e-6, 1e-4, 0.4, 5.0, 3e2, 7e4, 1e9], dtype=F64)
    theta, c1 = (v.reshape(-1) for v in torch.meshgrid(thetas, units, indexing="ij"))
    h = 0.25
    lam = theta / h  # y' = lam y: the first correction h lam y, scaled: c1
    y = (c1 * tol / (h * lam - c1 * tol)).unsqueeze(-1)  # |h lam y| / (tol (1 + |y|)) = c1
    for max_iters in (3, 6, 12):
        solver = ImplicitRK(IMPLICIT_TABLEAUS["implicit_euler"], max_iters=max_iters)
        want = [_implicit_iteration_by_hand(float(a), float(b), max_iters, kappa)
                for a, b in zip(c1, theta)]  # fmt: skip

        def iterate(
            solver: ImplicitRK, lam_: torch.Tensor, y_: torch.Tensor, batched: bool
        ) -> list[tuple]:
            def f(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
                return lam_.unsqueeze(-1) * z if batched else lam_ * z

            rows = y_.shape[:1] if batched else ()
            t = torch.zeros(rows, dtype=F64)
            h_t = torch.full(rows, h, dtype=F64)
            h_y = h_t.unsqueeze(-1) if batched else h
            newton = _StageNewton(solver, f, [t + h_t], y_, h_t, h_y, None, batched)
            J0 = torch.zeros(*rows, 1, 1, dtype=F64)
            _, ok, its, njev, nlu, stale = newton.solve(J0)
            out = (ok, its, njev, nlu, stale)
            return list(zip(*(v.reshape(-1).tolist() for v in out)))

        got = iterate(solver, lam, y, True)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, (max_iters, float(theta[i]), float(c1[i]), g, w)
        for i in (5, 50):
            assert iterate(solver, lam[i], y[i], False) == [want[i]], (max_iters, i)


def test_a_fully_implicit_tableau_of_a_user() -> None:
    """A user's two-stage tableau with no explicit stage, whose coefficients do not round
    exactly (``b_r^T A_rr^-1 A[:, 0]`` is ``b_0`` only to 1e-16 in float64): every step is the
    step written out by hand (stages by fixed point, ``y1 = y + h sum b_j f(z_j)``), with no
    part of ``f(t, y)`` in it (none is evaluated after the first step)."""
    A = ((Fraction(1, 6), -Fraction(2, 5)), (Fraction(3, 7), Fraction(2, 9)))
    c = (sum(A[0]), sum(A[1]))
    b = (Fraction(3, 8), Fraction(5, 8))
    solver = ImplicitRK(ImplicitTableau("user_implicit", 1, c, A, b))

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -2 * y + torch.cos(t) * y**2

    h, y = 0.1, torch.tensor([0.7], dtype=F64)
    ts = torch.arange(5, dtype=F64) * h
    want = [y]
    for t in ts[:-1].tolist():  # contraction about h |A| |df/dy|, 0.1: converged long before
        z = [y.clone(), y.clone()]
        for _ in range(200):
            fz = [f(torch.tensor(t + float(c[j]) * h, dtype=F64), z[j]) for j in range(2)]
            z = [y + h * sum(float(A[i][j]) * fz[j] for j in range(2)) for i in range(2)]
        fz = [f(torch.tensor(t + float(c[j]) * h, dtype=F64), z[j]) for j in range(2)]
        y = y + h * sum(float(b[j]) * fz[j] for j in range(2))
        want.append(y)
    with torch.no_grad():
        sol = neuralode.solve(f, want[0], ts, method=solver)
    torch.testing.assert_close(sol.ys, torch.stack(want), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("name", ["trapezoid", "trbdf2"])
def test_an_interpolated_step_evaluates_only_its_end(name: str, grad: bool) -> None:
    """With an explicit first stage the step knows ``f(t, y)``: an output inside the step costs
    one evaluation, ``f(t + h, y1)`` (the interpolant's other end), per step that has one, with
    gradients enabled or not."""
    y0 = torch.tensor([2.0, 0.0], dtype=F64, requires_grad=grad)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    inside = torch.tensor([0.0, 0.05, 0.37, 0.38, 0.91, 1.0], dtype=F64)  # in 3 of the 10 steps
    with torch.set_grad_enabled(grad):
        plain = neuralode.solve(_vdp(2.0), y0, ends, method=name, step_size=0.1)
        between = neuralode.solve(_vdp(2.0), y0, inside, method=name, step_size=0.1)
    assert int(between.stats.nfe) == int(plain.stats.nfe) + 3


@pytest.mark.parametrize("name", ["gl4", "trapezoid"])
def test_a_field_that_turns_nan_is_reported_as_nan(name: str) -> None:
    """A field that returns NaN from t = 0.25 on: the stage iteration stops at the non-finite
    correction (iterating on NaN cannot converge), and the solve reports a non-finite field at
    the step that met it, not a Newton failure a step earlier."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(t > 0.25, torch.nan, -(y**3))

    y0, ts = torch.tensor([1.0], dtype=F64), torch.linspace(0, 1, 11, dtype=F64)
    sol = neuralode.solve(f, y0, ts, method=name, throw=False)
    assert int(sol.status) == neuralode.Status.NONFINITE
    assert float(sol.t_end) == pytest.approx(0.3)
    assert bool(torch.isfinite(sol.ys[:3]).all())
    with pytest.raises(neuralode.SolverError, match="returned NaN or Inf"):
        neuralode.solve(f, y0, ts, method=name)


def test_rows_that_ended_keep_finite_gradients() -> None:
    """Rows over different spans with ``step_size``: the shorter rows end early and sit at
    ``h = 0`` while the others go on, and row 1's output at 1.77 lies inside a step taken after
    they ended (the interpolant is built for every row).  Values, counts and gradients are each
    row's alone (finite: a row at ``h = 0`` divides by no zero step)."""
    T = torch.tensor([[0.0, 0.5, 1.0], [0.2, 1.77, 2.0], [1.0, 1.5, 1.7]], dtype=F64)
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, -1.0]], dtype=F64)
    for name in ("gl4", "trapezoid"):
        y = y0.clone().requires_grad_()
        sol = neuralode.solve(_vdp(2.0), y, T, method=name, step_size=0.05)
        (grad,) = torch.autograd.grad(sol.ys.square().sum(), y)
        assert bool(torch.isfinite(grad).all()), name
        for i in range(3):
            yi = y0[i].clone().requires_grad_()
            one = neuralode.solve(_vdp(2.0), yi, T[i], method=name, step_size=0.05)
            torch.testing.assert_close(sol.ys[i], one.ys, rtol=1e-12, atol=1e-12)
            assert int(sol.stats.nfe[i]) == int(one.stats.nfe), (name, i)
            (grad_i,) = torch.autograd.grad(one.ys.square().sum(), yi)
            torch.testing.assert_close(grad[i], grad_i, rtol=1e-10, atol=1e-12)


def test_merge_picks_each_rows_carried_stages() -> None:
    """``merge`` (the solver protocol's per-row choice after a partly accepted step; the
    fixed-step loop accepts every running row, so only a caller of the protocol reaches it):
    a batch of 3 rows (gl4: 2 stages, so a layout with the stages first does not fit) takes
    its next step from each row's chosen state, as the row alone does from its own."""
    solver, f = get_solver("gl4"), _vdp(5.0)
    t, h = torch.zeros(3, dtype=F64), torch.full((3,), 0.2, dtype=F64)
    ya = torch.tensor([[2.0, 0.0], [1.0, 0.5], [-1.5, 1.0]], dtype=F64)
    yb = torch.tensor([[0.3, -2.0], [-1.0, 1.5], [0.5, 0.2]], dtype=F64)
    with torch.no_grad():
        a = solver.step(f, t, h, ya, None)
        b = solver.step(f, t, h, yb, None)
        accept = torch.tensor([True, False, True])
        merged = solver.merge(accept, a.state, b.state)
        y1 = torch.where(accept[:, None], a.y1, b.y1)
        batch = solver.step(f, t + h, h, y1, merged)
        for i, y0 in enumerate(torch.where(accept[:, None], ya, yb)):
            one = solver.step(f, t[i], h[i], y0, None)
            again = solver.step(f, t[i] + h[i], h[i], one.y1, one.state)
            torch.testing.assert_close(batch.y1[i], again.y1, rtol=1e-12, atol=1e-12)
            assert int(batch.n_newton[i]) == int(again.n_newton), i


@pytest.mark.parametrize("name", ["gl4", "trbdf2"])
def test_a_scalar_state(name: str) -> None:
    """A 0-d state (its stages a vector of ``r`` numbers): the steps of the same problem as a
    1-element state, to round-off, with the same iterations."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(y**3) + torch.sin(t)

    ts = torch.linspace(0, 1, 6, dtype=F64)
    scalar = neuralode.solve(f, torch.tensor(1.0, dtype=F64), ts, method=name)
    vector = neuralode.solve(f, torch.tensor([1.0], dtype=F64), ts, method=name)
    assert scalar.ys.shape == (6,)
    torch.testing.assert_close(scalar.ys, vector.ys[:, 0], rtol=1e-14, atol=1e-14)
    assert int(scalar.stats.n_newton) == int(vector.stats.n_newton)
