"""The solve loop, driven by a recording vector field: where it evaluates, and how it counts.

A mock field records every ``(t, y)`` it is called with, so the tests see the loop from outside:

* One step of every method evaluates its stages at exactly ``t0 + c_i h`` on the states
  ``y0 + h sum_j a_ij k_j`` built from the recorded stage values, and returns
  ``y0 + h sum_j b_j k_j``; rk4 forward and backward in time lands on the exact nodes.
* ``stats.nfe`` equals the number of calls, and the exact counts follow from ``solve.py``:
  ``f(t0, y0)`` is evaluated once at the entry (counted); each step evaluates stages ``1..s-1``;
  the first stage comes from the previous step when the method is FSAL (adaptive tableaus here)
  and is evaluated afresh otherwise; Hairer's initial step costs one probe unless
  ``first_step`` is given; the interpolant's extra stages cost ``len(dense.extra_c)`` per step
  that needs them (dopri8: 3).
  So fixed grid: ``nfe = s (T - 1)``; fixed steps with ``dense`` or ``step_size`` (outputs by
  Hermite interpolation on the grid, which needs ``f`` at the last grid point too):
  ``s n_steps + 1``; adaptive: ``2 + (s - 1) n_steps`` (``1 + ...`` with ``first_step``,
  ``+ extras * n_steps`` with ``dense``).
* ``y' = 0`` takes a handful of steps (the step grows by ``ifactor`` each time) and returns
  ``y0`` bit for bit.
* A float32 state with float64 time: the field sees ``t`` in float32 while the loop's clock is
  float64 (100 steps of 0.01 starting at t = 1000 stay exactly 100 steps).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import ADAPTIVE, FIXED

import neuralode
from neuralode import get_solver, get_tableau
from neuralode.solvers.auto import AutoSwitch
from neuralode.solvers.esdirk import Esdirk, NewtonSettings
from neuralode.solvers.rosenbrock import Rosenbrock, Rosenbrock23
from neuralode.solvers.tableaus import ESDIRK_TABLEAUS

DTYPE = torch.float64

#: The fixed-step explicit Runge-Kutta methods, whose evaluation counts these tests derive from
#: their tableaus (the implicit and multistep ones count their own: tests/test_implicit.py and
#: tests/test_adams.py).
FIXED_RK = tuple(m for m in FIXED if m in neuralode.TABLEAUS)


class Recorder:
    """A vector field that records its calls: ``t``, ``y`` and the returned ``dy/dt``."""

    def __init__(self, field=None) -> None:
        self.field = field or (lambda t, y: torch.sin(t) * y + 0.5 * y**2 * torch.cos(y))
        self.ts: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.ks: list[torch.Tensor] = []

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.field(t, y)
        self.ts.append(t.detach().clone())
        self.ys.append(y.detach().clone())
        self.ks.append(k.detach().clone())
        return k

    @property
    def n(self) -> int:
        return len(self.ts)


Y0 = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)


def _one_step(method: str, t0: float, h: float, rec: Recorder) -> neuralode.Solution:
    t = torch.tensor([t0, t0 + h], dtype=DTYPE)
    if get_solver(method).adaptive:
        # rtol/atol huge: the first step (exactly h) is accepted.
        return neuralode.solve(rec, Y0, t, method=method, first_step=abs(h), rtol=1e10, atol=1e10)
    return neuralode.solve(rec, Y0, t, method=method)


@pytest.mark.parametrize("method", tuple(neuralode.TABLEAUS))  # stiff ones: test_stiff.py
def test_one_step_evaluates_stages_at_nodes(method: str) -> None:
    tab = get_tableau(method)
    t0, h = 0.25, 0.5
    rec = Recorder()
    sol = _one_step(method, t0, h, rec)
    s = tab.stages
    assert rec.n == s == int(sol.stats.nfe)
    assert int(sol.stats.n_steps) == 1
    for t in rec.ts:
        assert t.shape == () and t.dtype == DTYPE
    for i in range(s):
        want_t = t0 + float(tab.c[i]) * h
        assert abs(float(rec.ts[i]) - want_t) <= 1e-15, (i, float(rec.ts[i]), want_t)
        y_i = Y0 + h * sum((float(a) * rec.ks[j] for j, a in enumerate(tab.a[i])), Y0 * 0)
        torch.testing.assert_close(rec.ys[i], y_i, rtol=1e-14, atol=1e-14)
    y1 = Y0 + h * sum((float(b) * k for b, k in zip(tab.b, rec.ks)), Y0 * 0)
    torch.testing.assert_close(sol.ys[-1], y1, rtol=1e-14, atol=1e-14)
    assert torch.equal(sol.ys[0], Y0)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_rk4_step_nodes_are_exact(direction: float) -> None:
    rec = Recorder()
    t0, h = 0.25, 0.5 * direction
    _one_step("rk4", t0, h, rec)
    want = [t0, t0 + h / 2, t0 + h / 2, t0 + h]  # dyadic: exact in float64
    assert [float(t) for t in rec.ts] == want


GRID = torch.tensor([0.0, 0.1, 0.3, 0.35, 0.8, 1.0], dtype=DTYPE)


@pytest.mark.parametrize("method", FIXED_RK)
def test_fixed_grid_takes_one_step_per_interval(method: str) -> None:
    s = get_tableau(method).stages
    steps = len(GRID) - 1
    rec = Recorder()
    sol = neuralode.solve(rec, Y0, GRID, method=method)
    assert int(sol.stats.n_steps) == int(sol.stats.n_accepted) == steps
    assert int(sol.stats.n_rejected) == 0
    # f(t0, y0) once, then s - 1 stages per step, plus a fresh first stage on steps 2..T-1.
    assert int(sol.stats.nfe) == rec.n == s * steps
    # Every call's time is a node of the step it belongs to.
    c = [float(x) for x in get_tableau(method).c]
    want = [float(GRID[n] + ci * (GRID[n + 1] - GRID[n])) for n in range(steps) for ci in c]
    assert [float(t) for t in rec.ts] == pytest.approx(want, abs=1e-15)

    # Dense output is Hermite interpolation on the grid states and slopes: the slopes are the
    # steps' first stages, plus one evaluation at the last grid point.
    rec_d = Recorder()
    dense = neuralode.solve(rec_d, Y0, GRID, method=method, dense=True)
    assert int(dense.stats.nfe) == rec_d.n == 1 + s * steps
    torch.testing.assert_close(dense.ys, sol.ys, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("method", FIXED_RK)
def test_fixed_step_size_counts(method: str) -> None:
    s = get_tableau(method).stages
    rec = Recorder()
    sol = neuralode.solve(
        rec, Y0, torch.tensor([0.0, 1.0], dtype=DTYPE), method=method, step_size=0.3
    )
    # Grid 0, 0.3, 0.6, 0.9 (as 3 * 0.3), then a last step shortened to land on 1.0.  Both
    # outputs fall on grid points, so no interpolation and no evaluation beyond the steps.
    assert int(sol.stats.n_steps) == 4
    assert int(sol.stats.nfe) == rec.n == 4 * s
    assert max(float(x) for x in rec.ts) <= 1.0  # never evaluated past the end
    # An output inside the second step: the same steps; Hermite interpolation needs the slope
    # f(0.6, y(0.6)) at the step's end, which then starts the third step, so the count stays
    # 4 s; the value is the grid's Hermite interpolant (as dense output of the grid solve gives
    # it).
    rec2 = Recorder()
    t = torch.tensor([0.0, 0.45, 1.0], dtype=DTYPE)
    sol2 = neuralode.solve(rec2, Y0, t, method=method, step_size=0.3)
    assert int(sol2.stats.n_steps) == 4
    assert int(sol2.stats.nfe) == rec2.n == 4 * s
    torch.testing.assert_close(sol2.ys[-1], sol.ys[-1], rtol=1e-14, atol=1e-14)
    grid = torch.cat([torch.arange(4, dtype=DTYPE) * 0.3, torch.ones(1, dtype=DTYPE)])
    on_grid = neuralode.solve(Recorder(), Y0, grid, method=method, dense=True)
    torch.testing.assert_close(on_grid.ys[-1], sol.ys[-1], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(sol2.ys[1], on_grid.evaluate(t[1]), rtol=1e-14, atol=1e-14)


def _stiffish(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fast relaxation onto a moving target: forces some rejected steps."""
    return -30.0 * (y - torch.sin(3.0 * t)) + torch.cos(t)


@pytest.mark.parametrize("method", [m for m in ADAPTIVE if m not in ESDIRK_TABLEAUS])
def test_adaptive_counts(method: str) -> None:
    solver = get_solver(method)
    if isinstance(solver, AutoSwitch):  # the problem is not stiff: auto counts as its tsit5
        solver = solver.explicit
    # A Rosenbrock attempt evaluates all its stages (the first is its Jacobian's forward pass),
    # but a retry reuses the rejected attempt's; its interpolant needs no extra stage.
    jac = isinstance(solver, (Rosenbrock, Rosenbrock23))
    fsal = getattr(solver, "fsal", False)
    s = solver.n_stages
    extras = 0 if jac else len(solver.extra_c)
    t = torch.tensor([0.0, 3.0], dtype=DTYPE)
    kw = dict(method=method, rtol=1e-6, atol=1e-8)

    def fresh(sol: neuralode.Solution) -> int:
        # An attempt knows f(t, y) from the last one (FSAL's last stage, or the first stage of
        # a rejected attempt from the same start); a non-FSAL method evaluates it again after
        # each accepted step but the last.
        if jac:  # a retry reuses the rejected attempt's Jacobian and f(t, y)
            return int(sol.stats.n_accepted)
        return 0 if fsal else int(sol.stats.n_accepted) - 1

    rec = Recorder(_stiffish)
    sol = neuralode.solve(rec, Y0, t, **kw)
    n = int(sol.stats.n_steps)
    assert int(sol.stats.n_rejected) > 0, "the problem should force rejections"
    assert n == int(sol.stats.n_accepted) + int(sol.stats.n_rejected)
    assert int(sol.stats.nfe) == rec.n == 2 + (s - 1) * n + fresh(sol)
    # One Jacobian per attempt but the retries, one LU factorisation per attempt.
    assert int(sol.stats.njev) == (int(sol.stats.n_accepted) if jac else 0)
    assert int(sol.stats.nlu) == (n if jac else 0)
    rows = neuralode.solve(
        lambda t, y: _stiffish(t.unsqueeze(-1), y), Y0.expand(2, 3), t, batched=True, **kw
    )
    assert rows.stats.njev.tolist() == [int(sol.stats.njev)] * 2
    assert rows.stats.nlu.tolist() == [int(sol.stats.nlu)] * 2

    rec = Recorder(_stiffish)
    sol = neuralode.solve(rec, Y0, t, first_step=1e-3, **kw)
    n = int(sol.stats.n_steps)
    assert int(sol.stats.nfe) == rec.n == 1 + (s - 1) * n + fresh(sol)

    rec = Recorder(_stiffish)
    sol = neuralode.solve(rec, Y0, t, dense=True, **kw)
    n, n_acc = int(sol.stats.n_steps), int(sol.stats.n_accepted)
    # Dense output computes the interpolant's extra stages on accepted steps only (a Hermite
    # interpolant's f(t + h, y1) then starts the next step of a non-FSAL method).
    assert int(sol.stats.nfe) == rec.n == 2 + (s - 1) * n + extras * n_acc + jac * n_acc


@pytest.mark.parametrize("method", sorted(ESDIRK_TABLEAUS))
@pytest.mark.parametrize("reuse", [False, True])
def test_esdirk_counts(method: str, reuse: bool) -> None:
    """An ESDIRK attempt evaluates f(t, y) unless it retries a rejected one, then once per
    Newton iteration; with gradients enabled, f(t, y) again and once per implicit stage at the
    converged stage (the implicit function theorem's).  A Jacobian per accepted step without
    reuse; with it, fewer, and each second try of a step with a fresh Jacobian (an old one
    failed) costs one more Jacobian and its evaluation."""
    tab = ESDIRK_TABLEAUS[method]
    solver = Esdirk(tab, NewtonSettings(reuse_jacobian=reuse))
    s = tab.stages
    t = torch.tensor([0.0, 3.0], dtype=DTYPE)
    for grad in (False, True):
        rec = Recorder(_stiffish)
        with torch.set_grad_enabled(grad):
            sol = neuralode.solve(rec, Y0, t, method=solver, rtol=1e-6, atol=1e-8)
        st = sol.stats
        n, n_acc = int(st.n_steps), int(st.n_accepted)
        assert int(st.n_rejected) > 0, "the problem should force rejections"
        assert int(st.n_newton) >= (s - 1) * n
        redos = int(st.nfe) - (2 + n_acc + int(st.n_newton) + grad * s * n)
        assert int(st.nfe) == rec.n
        if not reuse:
            assert int(st.njev) == n_acc and int(st.nlu) == n and redos == 0
        else:
            assert 0 <= redos < int(st.njev) < n_acc // 2 and int(st.nlu) <= n + redos


def test_newton_iterations_stop_at_the_solves_own_tolerances() -> None:
    """An adaptive implicit solve configures its Newton iteration with its own rtol, atol and
    norm: the same iterations as those tolerances given to ``NewtonSettings``, and fewer than
    the round-off tolerance (``eps ** 0.75``) a step taken outside a controlled solve uses."""
    t = torch.tensor([0.0, 3.0], dtype=DTYPE)
    tab = ESDIRK_TABLEAUS["kvaerno5"]
    eps = torch.finfo(DTYPE).eps ** 0.75

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # nonlinear: Newton iterates
        d = y - torch.sin(3.0 * t)
        return -30.0 * (d + d**3)

    def run(settings: NewtonSettings | None) -> neuralode.Solution:
        solver = Esdirk(tab, settings)
        return neuralode.solve(f, Y0, t, method=solver, rtol=1e-3, atol=1e-6)

    own, given = run(None), run(NewtonSettings(rtol=1e-3, atol=1e-6))
    tight = run(NewtonSettings(rtol=eps, atol=eps))
    assert int(own.stats.n_newton) == int(given.stats.n_newton)
    torch.testing.assert_close(own.ys, given.ys, rtol=0, atol=0)
    assert int(own.stats.n_newton) < int(tight.stats.n_newton)


@pytest.mark.parametrize("method", ["rodas5p", "rosenbrock23", "kvaerno5", "dopri5"])
def test_batched_counters_are_each_rows_own_integers(method: str) -> None:
    """A batched solve's counters (the stiff methods' Jacobians, factorisations and Newton
    iterations among them) are ``long`` tensors holding what each row's solve alone counts:
    rows of different stiffness take different steps, Jacobians and iterations."""
    scale = torch.tensor([1.0, 8.0], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scale.view(-1, 1) * _stiffish(t.view(-1, 1), y)

    y0 = Y0.expand(2, 3)
    t = torch.tensor([0.0, 3.0], dtype=DTYPE)
    kw = dict(method=method, rtol=1e-6, atol=1e-8)
    rows = neuralode.solve(f, y0, t, batched=True, **kw).stats
    for name, value in vars(rows).items():
        assert value.dtype == torch.long, name
    for i in range(2):
        alone = neuralode.solve(lambda t, y, k=float(scale[i]): k * _stiffish(t, y), Y0, t, **kw)
        for name, value in vars(alone.stats).items():
            assert int(getattr(rows, name)[i]) == int(value), (name, i)
    stiff = method != "dopri5"
    assert not stiff or (rows.njev > 0).all() and (rows.nlu > 0).all()
    assert (rows.n_newton > rows.n_steps).all() == (method == "kvaerno5")
    assert rows.n_steps[0] != rows.n_steps[1]


@pytest.mark.parametrize("method", ADAPTIVE)
def test_zero_vector_field_takes_few_steps(method: str) -> None:
    solver = get_solver(method)
    if isinstance(solver, AutoSwitch):  # a zero field is not stiff: auto counts as its tsit5
        solver = solver.explicit
    s = solver.n_stages
    # Every attempt of a Rosenbrock or ESDIRK method evaluates its first stage (its Jacobian's).
    fsal = getattr(solver, "fsal", False)
    jac = isinstance(solver, (Rosenbrock, Rosenbrock23, Esdirk))
    if jac and method in ESDIRK_TABLEAUS:
        # Each implicit stage's iteration stops after its first (zero) correction; with
        # gradients enabled, f(t, y) and each converged stage are evaluated again.
        s = 2 * s
    rec = Recorder(lambda t, y: torch.zeros_like(y))
    sol = neuralode.solve(rec, Y0, torch.tensor([0.0, 10.0], dtype=DTYPE), method=method)
    n = int(sol.stats.n_steps)
    # Initial step 1e-6 (Hairer's rule for f = 0), then x10 per step: 1e-6 * 10^7 > 10.
    assert n <= 9 and int(sol.stats.n_rejected) == 0
    # (a non-FSAL method evaluates each step's first stage but the first: f0 serves it)
    assert int(sol.stats.nfe) == rec.n == 2 + (s - 1) * n + (n if jac else 0 if fsal else n - 1)
    assert torch.equal(sol.ys[-1], Y0)
    t = torch.linspace(0.0, 10.0, 6, dtype=DTYPE)  # outputs inside steps: the interpolant too
    many = neuralode.solve(lambda t, y: torch.zeros_like(y), Y0, t, method=method, dense=True)
    # (a method that ends steps on outputs takes one more step per interior output)
    assert int(many.stats.n_steps) == n + (4 if solver.lands_on_outputs else 0)
    # (one interior output is landed on too)
    t3 = torch.tensor([0.0, 5.0, 10.0], dtype=DTYPE)
    three = neuralode.solve(lambda t, y: torch.zeros_like(y), Y0, t3, method=method)
    assert int(three.stats.n_steps) == n + (1 if solver.lands_on_outputs else 0)
    assert torch.equal(many.ys, Y0.expand(6, 3))
    assert torch.equal(many.evaluate(torch.tensor([0.3, 7.77], dtype=DTYPE)), Y0.expand(2, 3))


def _float32_case(method: str, **kw):
    seen: set[tuple[torch.dtype, torch.dtype]] = set()

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.add((t.dtype, y.dtype))
        return -0.5 * y + torch.cos(t)

    y0 = torch.tensor([1.0, -1.0], dtype=torch.float32)
    t = torch.tensor([1000.0, 1000.5, 1001.0], dtype=DTYPE)
    sol = neuralode.solve(f, y0, t, method=method, **kw)
    seen_float32 = set(seen)
    ref = neuralode.solve(f, y0.double(), t, method=method, **kw).ys
    return sol, ref, seen_float32, (f, y0, t)


@pytest.mark.parametrize(
    "method, kw",
    [("rk4", dict(step_size=0.01)), ("dopri5", dict(rtol=1e-5, atol=1e-6, first_step=0.01))],
)
def test_float32_state_with_float64_time(method: str, kw: dict) -> None:
    sol, ref, seen, (f, y0, t) = _float32_case(method, **kw)
    assert seen == {(torch.float32, torch.float32)}
    assert sol.ys.dtype == torch.float32 and sol.t_end.dtype == DTYPE
    assert float(sol.t_end) == 1001.0
    if method == "rk4":
        assert int(sol.stats.n_steps) == 100  # a float32 clock at t = 1000 could not count 0.01s
    torch.testing.assert_close(sol.ys.double(), ref, rtol=1e-4, atol=1e-4)
    # float32 times are promoted: the clock is float64 by default.
    sol32 = neuralode.solve(f, y0, t.float(), method=method, **kw)
    assert sol32.t_end.dtype == DTYPE
    torch.testing.assert_close(sol32.ys, sol.ys, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_float32_state_initial_step_sees_float32_time(method: str) -> None:
    _, _, seen, _ = _float32_case(method, rtol=1e-5, atol=1e-6)
    assert seen == {(torch.float32, torch.float32)}


def test_batched_field_sees_each_rows_time() -> None:
    rec = Recorder(lambda t, y: -y * t.unsqueeze(-1))
    t = torch.tensor([[0.0, 1.0], [2.0, 3.0], [5.0, 4.0]], dtype=DTYPE)
    y0 = torch.ones(3, 2, dtype=DTYPE)
    sol = neuralode.solve(rec, y0, t, method="rk4")
    assert all(tt.shape == (3,) for tt in rec.ts)
    assert rec.ts[0].tolist() == [0.0, 2.0, 5.0]
    assert rec.ts[-1].tolist() == [1.0, 3.0, 4.0]  # rk4's last node, c = 1
    assert sol.stats.nfe.tolist() == [4, 4, 4]


@pytest.mark.parametrize("batched", [False, True])
def test_fixed_steps_hold_states_in_proportion_to_the_outputs(batched: bool) -> None:
    """10,000 rk4 steps with 3 outputs: while the last step runs, the states the loop still
    holds are the outputs and the current step's, not every step's (the loop once kept each
    step's state and slope in lists, 70,000 objects that set off full garbage collections)."""
    alive: list[weakref.ref] = []
    peak = [0]

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alive.append(weakref.ref(y))
        if len(alive) % 1000 == 0:
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return -y

    y0 = torch.ones(2, 3, dtype=DTYPE) if batched else torch.ones(3, dtype=DTYPE)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)
    with torch.no_grad():
        sol = neuralode.solve(f, y0, t, method="rk4", step_size=1e-4, batched=batched)
    assert int(sol.stats.n_steps.reshape(-1)[0]) == 10_000
    assert len(alive) == 40_000
    assert peak[0] <= 12, peak[0]


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.parametrize("batched", [False, True])
def test_a_single_output_time_takes_no_step(method: str, batched: bool) -> None:
    rec = Recorder(lambda t, y: -y)
    y0 = torch.stack([Y0, 2 * Y0]) if batched else Y0
    t = torch.tensor([[0.7], [1.5]], dtype=DTYPE) if batched else torch.tensor([0.7], dtype=DTYPE)
    sol = neuralode.solve(rec, y0, t, method=method, batched=batched, dense=True)
    assert rec.n == 1  # f(t0, y0), evaluated once at the entry to check what f returns
    rows = (2,) if batched else ()
    assert sol.ys.shape == ((2, 1, 3) if batched else (1, 3))
    assert torch.equal(sol.ys.reshape(-1, 3), y0.reshape(-1, 3))
    assert sol.stats.nfe.shape == rows and bool((sol.stats.nfe == 1).all())
    for name in ("n_steps", "n_accepted", "n_rejected"):
        assert bool((getattr(sol.stats, name) == 0).all()), name
    assert bool((sol.status == 0).all()) and sol.success
    assert torch.equal(sol.t_end, t[..., 0])
    at = sol.evaluate(t[..., 0] if not batched else t)  # dense output at t0 is y0
    torch.testing.assert_close(at.reshape(-1, 3), y0.reshape(-1, 3))
    # Several queries (all at t0, the only time the solution has): [(batch,) M, 3].
    queries = t.expand(2, 4) if batched else t.expand(4)
    many = sol.evaluate(queries)
    assert many.shape == ((2, 4, 3) if batched else (4, 3))
    want = y0.unsqueeze(-2).expand(many.shape)
    assert torch.equal(many, want)


@pytest.mark.parametrize("method", FIXED_RK)
def test_batched_fixed_steps_evaluate_only_what_outputs_need(method: str) -> None:
    """A batch on fixed steps evaluates ``f`` exactly as often as one row would: the interpolant's
    ``f(t + h, y1)`` only for a step with an output strictly inside it (it then starts the next
    step), never for an output on a grid point, whatever the rows' grids."""
    s = neuralode.get_tableau(method).stages
    y0 = torch.ones(2, 1, dtype=DTYPE)

    def calls(t: torch.Tensor) -> tuple[int, list[int]]:
        rec = Recorder(lambda t, y: -y)
        sol = neuralode.solve(rec, y0, t, method=method, step_size=0.1, batched=True)
        return rec.n, sol.stats.nfe.tolist()

    # Outputs on grid points only, one of them the last step's start: s per step, nothing more.
    n, per_row = calls(torch.tensor([0.0, 0.9, 1.0], dtype=DTYPE))
    assert n == 10 * s and per_row == [10 * s] * 2
    # An output inside the last step: one more evaluation, f(1.0, y(1.0)), for the interpolant.
    n, per_row = calls(torch.tensor([0.0, 0.95, 1.0], dtype=DTYPE))
    assert n == 10 * s + 1 and per_row == [10 * s + 1] * 2
    # Rows of different lengths (the shorter row's grid is padded): the batch makes the longer
    # row's calls, and each row is charged its own.
    t = torch.tensor([[0.0, 0.5, 0.9], [0.0, 0.3, 0.6]], dtype=DTYPE)
    n, per_row = calls(t)
    assert per_row == [9 * s, 6 * s]
    assert n == 9 * s


@pytest.mark.parametrize("batched", [False, True])
def test_a_failed_solve_keeps_one_row_per_output_time(batched: bool) -> None:
    """The outputs a failed solve did not reach are NaN, and there are still exactly T of them."""
    t = torch.linspace(0.0, 10.0, 6, dtype=DTYPE)
    y0 = torch.stack([Y0, 2 * Y0]) if batched else Y0
    with pytest.raises(neuralode.SolverError) as info:
        neuralode.solve(lambda t, y: -y, y0, t, max_num_steps=3, batched=batched)
    sol = info.value.solution
    assert sol is not None
    ys = sol.ys if batched else sol.ys.unsqueeze(0)
    assert ys.shape == (y0.shape[0] if batched else 1, 6, 3)
    for row in ys:
        reached = ~torch.isnan(row).any(dim=-1)
        assert bool(reached[0]) and not bool(reached[-1])
        n = int(reached.sum())
        assert bool(reached[:n].all()) and not bool(reached[n:].any())  # NaN after the failure


def test_finite_rows_looks_at_the_state_and_every_error_estimate_per_row() -> None:
    from neuralode._loop import _finite_rows
    from neuralode.solvers import StepResult

    nan = torch.nan
    ok = torch.ones(3, 2)
    bad_row1 = torch.tensor([[1.0, 1.0], [1.0, nan], [1.0, 1.0]])
    bad_row2 = torch.tensor([[1.0, 1.0], [1.0, 1.0], [torch.inf, 1.0]])

    def rows(y1, err):
        return _finite_rows(StepResult(y1, err, None, None, 0), True).tolist()

    assert rows(ok, None) == [True, True, True]
    assert rows(bad_row1, None) == [True, False, True]  # the state alone
    assert rows(ok, bad_row2) == [True, True, False]  # the error estimate alone
    assert rows(bad_row1, ok) == [True, False, True]  # the state, with an estimate
    assert rows(ok, (ok, bad_row2)) == [True, True, False]  # the second of two estimates
    assert rows(ok, (bad_row1, ok)) == [True, False, True]
    # One row without a batch dimension: one verdict over every component.
    one = _finite_rows(StepResult(torch.ones(2), (torch.ones(2), torch.tensor([1.0, nan])), None,
                                  None, 0), False)  # fmt: skip
    assert one.shape == () and not bool(one)


def test_rows_that_underflow_in_one_attempt_each_get_their_own_reason() -> None:
    # Row 0 underflowed with finite numbers, row 1 with a NaN in its step, row 2 did not
    # underflow (it keeps its status), row 3 underflowed where its solver failed on its own.
    from types import SimpleNamespace

    from neuralode._loop import _Run
    from neuralode.solution import Status
    from neuralode.solvers import StepResult

    y1 = torch.tensor([[1.0], [torch.nan], [torch.nan], [1.0]])
    solver_status = torch.tensor([0, 0, 0, int(Status.MAX_STEPS_REACHED)])
    att = SimpleNamespace(
        under=torch.tensor([True, True, False, True]),
        result=StepResult(y1, torch.zeros(4, 1), None, None, 0, solver_status),
    )
    status = torch.tensor([0, 0, 0, 0])
    got = _Run._why_underflow(SimpleNamespace(batched=True), status, att)  # type: ignore[arg-type]
    want = [Status.STEP_SIZE_UNDERFLOW, Status.NONFINITE, Status.SUCCESS, Status.MAX_STEPS_REACHED]
    assert got.tolist() == [int(s) for s in want]


@pytest.mark.parametrize("batched", [False, True])
def test_a_solve_with_one_output_time_reports_integer_work_and_status(batched: bool) -> None:
    y0 = torch.ones(3, 2, dtype=torch.float64) if batched else torch.ones(2, dtype=torch.float64)
    sol = neuralode.solve(lambda t, y: -y, y0, torch.tensor([0.5]), batched=batched)
    shape = (3,) if batched else ()
    for name in ("nfe", "n_steps", "n_accepted", "n_rejected"):
        counter = getattr(sol.stats, name)
        assert counter.dtype == torch.long and counter.shape == shape, name
    assert sol.status.dtype == torch.long and sol.status.shape == shape
    assert sol.ys.shape == (3, 1, 2) if batched else sol.ys.shape == (1, 2)


@pytest.mark.parametrize("batched", [False, True])
def test_a_fixed_step_row_that_turns_nan_fails_at_its_first_nan_output(batched: bool) -> None:
    # rk4 has no error estimate: the loop finds NaN in the outputs. Row 1's field is NaN from
    # t = 1.5, so its outputs from t = 2 on are NaN: it fails there, and row 0 succeeds.
    t = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if batched:  # t: [2], one time per row
            late = (t >= 1.5) & (torch.arange(2) == 1)
            return -y * torch.where(late, torch.nan, 1.0).unsqueeze(-1)
        return -y * torch.where(t >= 1.5, torch.nan, 1.0)

    y0 = torch.ones(2, 2, dtype=torch.float64) if batched else torch.ones(2, dtype=torch.float64)
    sol = neuralode.solve(field, y0, t, method="rk4", step_size=0.25, batched=batched, throw=False)
    if batched:
        assert sol.status.tolist() == [
            int(neuralode.Status.SUCCESS),
            int(neuralode.Status.NONFINITE),
        ]
        assert sol.t_end.tolist() == [4.0, 2.0]
    else:
        assert sol.status.shape == () and int(sol.status) == neuralode.Status.NONFINITE
        assert sol.t_end.shape == () and float(sol.t_end) == 2.0


def test_a_batch_that_rejects_on_some_rows_keeps_the_interpolants_end_evaluation() -> None:
    """``adaptive_heun``'s interpolant evaluates ``f(t + h, y1)``, which starts the next step of
    each row that accepted; when another row rejects in the same step, the accepted rows keep
    it (merged per row) and the rejecting row its own state: every row's work and values are
    its solve alone's (dropping the merged evaluation cost the accepted rows one each)."""
    rates = torch.tensor([1.0, 7.0, 30.0], dtype=torch.float64)

    def field(r: torch.Tensor):  # type: ignore[no-untyped-def]
        return lambda t, y: torch.stack([-r * y[..., 1], r * y[..., 0]], -1) + 0.1 * torch.sin(y)

    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]], dtype=torch.float64)
    t = torch.linspace(0, 3, 601, dtype=torch.float64)  # outputs inside the steps
    kw = {"method": "adaptive_heun", "rtol": 1e-3, "atol": 1e-5}
    batch = neuralode.solve(field(rates), y0, t, batched=True, **kw)
    assert int(batch.stats.n_rejected.sum()) > 0
    for i in range(3):
        alone = neuralode.solve(field(rates[i]), y0[i], t, **kw)
        for name in ("nfe", "n_steps", "n_rejected"):
            assert int(getattr(batch.stats, name)[i]) == int(getattr(alone.stats, name)), name
        torch.testing.assert_close(batch.ys[i], alone.ys, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_a_step_within_one_percent_of_the_end_lands_on_it(batched: bool) -> None:
    """A step is stretched to the end when ``1.01 h`` reaches it, exactly at the boundary too:
    a first step of 1 on ``[0, 1.01]`` (``1.0 * 1.01 == 1.01`` in floating point) is one step,
    not a step and a sliver; a first step of 0.99 takes two."""
    y0 = torch.ones(2, 2, dtype=torch.float64) if batched else torch.ones(2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.01], dtype=torch.float64)
    zero = lambda t, y: torch.zeros_like(y)  # noqa: E731
    for first, steps in ((1.0, 1), (0.99, 2)):
        sol = neuralode.solve(zero, y0, t, method="dopri5", first_step=first, batched=batched)
        assert (sol.stats.n_steps == steps).all(), (first, sol.stats.n_steps)


def test_the_loop_refuses_events_on_one_row() -> None:
    """Events are found by the batched driver only; ``solve`` runs an unbatched solve with
    events as a batch of one, and the loop refuses any other way in, saying so."""
    from neuralode._loop import LoopSpec
    from neuralode.controllers import PIController, rms_norm
    from neuralode.events import EventTracker

    def never(t0: torch.Tensor, y0: torch.Tensor) -> EventTracker:
        raise AssertionError("an unbatched loop must not build the event tracker")

    controller = PIController(1e-6, 1e-8, rms_norm, (0,), 4)
    spec = LoopSpec(
        lambda t, y: -y, neuralode.get_solver("dopri5"), controller, False, events=never
    )
    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"^events are checked by the batched \(tensor\) driver only$"
    ):
        spec.run(torch.ones(3, dtype=torch.float64), None, times, first_step=0.1)


@pytest.mark.parametrize("batched", [False, True])
def test_the_loop_needs_f0_or_a_first_step(batched: bool) -> None:
    from neuralode._loop import LoopSpec
    from neuralode.controllers import PIController, rms_norm

    controller = PIController(1e-6, 1e-8, rms_norm, (1,) if batched else (0,), 4)
    spec = LoopSpec(lambda t, y: -y, neuralode.get_solver("dopri5"), controller, batched)
    y0 = torch.ones(2, 3, dtype=torch.float64) if batched else torch.ones(3, dtype=torch.float64)
    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"^the initial step needs f\(t0, y0\): pass f0 or first_step$"
    ):
        spec.run(y0, None, times)
    # With a first step and no f0, the first step's stage evaluates f itself: the work is the
    # same in both drivers, and the steps and states are the float driver's.
    got = spec.run(y0, None, times, first_step=0.1)
    one_row = LoopSpec(spec.func, spec.solver, PIController(1e-6, 1e-8, rms_norm, (0,), 4), False)
    ref = one_row.run(y0[0] if batched else y0, None, times, first_step=0.1)
    nfe = got.stats.nfe[0] if batched else got.stats.nfe
    assert int(nfe) == int(ref.stats.nfe)
    torch.testing.assert_close(got.ys[0] if batched else got.ys, ref.ys, rtol=1e-15, atol=0)


@pytest.mark.parametrize("batched", [False, True])
def test_the_next_step_is_reported_only_when_asked_for(batched: bool) -> None:
    # Both drivers keep one contract: LoopResult.h_next is the controller's next step with
    # carry_step (for a solve that continues), and None without it.
    from neuralode._loop import LoopSpec
    from neuralode.controllers import PIController, rms_norm

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cos(3 * t).unsqueeze(-1) * y.roll(1, -1) - y  # t: [] or [batch]

    controller = PIController(1e-6, 1e-8, rms_norm, (1,) if batched else (0,), 4)
    spec = LoopSpec(field, neuralode.get_solver("dopri5"), controller, batched)
    # Rows that end at different times: some land with a step that shrinks the proposal, and
    # rows that finished early sit idle while the others run on.
    n = 12
    ends = torch.linspace(0.6, 2.0, n, dtype=torch.float64)
    times = torch.stack([torch.zeros_like(ends), ends], 1)
    y0 = torch.stack([torch.tensor([1.0, 0.5, -2.0]) * (1 + i / 4) for i in range(n)]).double()
    if not batched:
        y0, times = y0[1], times[1]
    assert spec.run(y0, None, times, first_step=0.1).h_next is None
    carried = spec.run(y0, None, times, first_step=0.1, carry_step=True).h_next
    # Each row's next step is the one the float driver (a separate loop) reports for that row
    # alone: a step shortened to land on t = 1 is not held against the proposal.
    ctrl = PIController(1e-6, 1e-8, rms_norm, (0,), 4)
    one_row = LoopSpec(field, neuralode.get_solver("dopri5"), ctrl, False)
    rows = zip(y0, times) if batched else [(y0, times)]
    expected = [one_row.run(y, None, ts, first_step=0.1, carry_step=True).h_next for y, ts in rows]
    if batched:
        assert isinstance(carried, torch.Tensor) and carried.shape == (n,)
        # (the batched error norm sums in another order: ulps in the error estimate move the
        # proposal by ~1e-9 relative)
        torch.testing.assert_close(carried, torch.tensor(expected).to(carried), rtol=1e-7, atol=0)
    else:
        assert isinstance(carried, float) and carried == expected[0]
    assert all(h is not None and 0.01 < h < 2.0 for h in expected)
