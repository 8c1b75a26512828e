"""The solver protocol, seen from outside: drivers, controllers, user methods, per-row status.

* The two drivers of the loop (the float driver of an unbatched solve and the tensor driver of a
  batched one) run the same protocol: for every registered method, and for user tableaus that are
  not FSAL, a one-row solve and the same problem as a batch give the same outputs (to 1e-12) and
  the same counts, with outputs inside steps and dense output.
* A non-FSAL tableau runs its own method in both drivers: the first stage of each step is a fresh
  ``f(t, y)``, never the previous step's last stage (which is another point for such a tableau).
* The controller's tensor and float paths make the same decisions with the same numbers.
* ``method=`` takes a name, a ``ButcherTableau`` or a ``Solver``; a user's solver that reports a
  per-row failure has that step rejected and retried smaller.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction as Fr
from typing import NamedTuple

import pytest
import torch
from conftest import ADAPTIVE, ALL_METHODS

import neuralode
from neuralode import ButcherTableau, Status
from neuralode.controllers import FloatControllerState, PIController, rms_norm
from neuralode.solvers import ExplicitRK, Solver, StepResult
from neuralode.tableaus import hermite_dense_output

F64 = torch.float64

# Heun-Euler 2(1): not FSAL (its last stage is f(t + h, y0 + h k0), not f(t + h, y1)).
_HE_B = (Fr(1, 2), Fr(1, 2))
HEUN_EULER = ButcherTableau(
    name="heun_euler",
    order=2,
    c=(Fr(0), Fr(1)),
    a=((), (Fr(1),)),
    b=_HE_B,
    b_err=(Fr(-1, 2), Fr(1, 2)),  # b - b_hat with b_hat = Euler's (1, 0)
    error_order=1,
    dense=hermite_dense_output(_HE_B, 2),
)
# Ralston's 3rd-order method with a 2nd-order embedded pair, not FSAL either.
_RA_B = (Fr(2, 9), Fr(1, 3), Fr(4, 9))
RALSTON3 = ButcherTableau(
    name="ralston3",
    order=3,
    c=(Fr(0), Fr(1, 2), Fr(3, 4)),
    a=((), (Fr(1, 2),), (Fr(0), Fr(3, 4))),
    b=_RA_B,
    b_err=tuple(x - y for x, y in zip(_RA_B, (Fr(0), Fr(1), Fr(0)))),  # vs the midpoint rule
    error_order=2,
    dense=hermite_dense_output(_RA_B, 3),
)
# Heun's third-order method, fixed-step: nodes 1/3 and 2/3 are not exact in binary, so its
# stage times show whether the nodes are taken in the time dtype.
_H3_B = (Fr(1, 4), Fr(0), Fr(3, 4))
HEUN3 = ButcherTableau(
    name="heun3_user",
    order=3,
    c=(Fr(0), Fr(1, 3), Fr(2, 3)),
    a=((), (Fr(1, 3),), (Fr(0), Fr(2, 3))),
    b=_H3_B,
    dense=hermite_dense_output(_H3_B, 3),
)
USER_TABLEAUS = (HEUN_EULER, RALSTON3, HEUN3)


def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forced Van der Pol (mu = 2) for one row (``t: []``) or a batch (``t: [B]``)."""
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v, 2.0 * (1 - x**2) * v - x + 0.5 * torch.cos(t)], dim=-1)


Y0 = torch.tensor([1.5, -0.5], dtype=F64)
T = torch.tensor([0.0, 0.37, 1.2, 2.05, 3.0], dtype=F64)  # outputs inside steps


def _kw(method: object) -> dict:
    if isinstance(method, ButcherTableau):  # low order: a looser tolerance keeps it quick
        return dict(rtol=1e-4, atol=1e-6) if method.adaptive else dict(step_size=0.09)
    adaptive = neuralode.get_solver(method).adaptive  # type: ignore[arg-type]
    return dict(rtol=1e-6, atol=1e-8) if adaptive else dict(step_size=0.09)


def _name(method: object) -> str:
    return method.name if isinstance(method, ButcherTableau) else str(method)


@pytest.mark.parametrize("method", [*ALL_METHODS, *USER_TABLEAUS], ids=_name)
@pytest.mark.parametrize("rows", [1, 3])
def test_float_and_tensor_drivers_agree(method: object, rows: int) -> None:
    one = neuralode.solve(field, Y0, T, method=method, dense=True, **_kw(method))
    many = neuralode.solve(
        field, Y0.expand(rows, 2), T, method=method, batched=True, dense=True, **_kw(method)
    )
    for r in range(rows):
        torch.testing.assert_close(many.ys[r], one.ys, rtol=1e-12, atol=1e-12)
        for name in ("nfe", "n_steps", "n_accepted", "n_rejected"):
            assert int(getattr(many.stats, name)[r]) == int(getattr(one.stats, name)), name
    tq = torch.tensor([0.05, 0.8, 2.9], dtype=F64)
    torch.testing.assert_close(many.evaluate(tq)[0], one.evaluate(tq), rtol=1e-12, atol=1e-12)


def test_drivers_agree_with_rejected_steps() -> None:
    """Rejections leave the carried state as it was in both drivers: the counts of a non-FSAL
    method agree when steps are rejected (the float driver keeps ``f(t, y)`` after a rejection,
    so must the tensor driver)."""

    def stiffish(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -30.0 * (y - torch.sin(3.0 * t).unsqueeze(-1)) + torch.cos(t).unsqueeze(-1)

    y0 = torch.tensor([0.5, -1.0], dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    for tab in (HEUN_EULER, RALSTON3):  # the adaptive ones
        one = neuralode.solve(stiffish, y0, t, method=tab, rtol=1e-4, atol=1e-6)
        batch = neuralode.solve(
            stiffish, y0.unsqueeze(0), t, method=tab, rtol=1e-4, atol=1e-6, batched=True
        )
        assert int(one.stats.n_rejected) > 0
        assert int(batch.stats.nfe[0]) == int(one.stats.nfe)
        torch.testing.assert_close(batch.ys[0], one.ys, rtol=1e-12, atol=1e-12)


class Counter:
    def __init__(self, f):
        self.f, self.points = f, []

    def __call__(self, t, y):
        self.points.append((float(t.reshape(-1)[0]), y.detach().reshape(-1).clone()))
        return self.f(t, y)


def test_non_fsal_tableau_evaluates_a_fresh_first_stage() -> None:
    """Heun-Euler: every step starts with f(t, y) at its own start; the error is that of the
    method, the same in both drivers (the float driver once reused the last stage, which for
    this tableau is another point, and ran a different method)."""
    lam = -2.0
    rec = Counter(lambda t, y: lam * y)
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = neuralode.solve(rec, y0, t, method=HEUN_EULER, rtol=1e-5, atol=1e-7)
    batch = neuralode.solve(
        lambda t, y: lam * y,
        y0.unsqueeze(0),
        t,
        method=HEUN_EULER,
        rtol=1e-5,
        atol=1e-7,
        batched=True,
    )
    n = int(sol.stats.n_steps)
    assert int(sol.stats.n_rejected) == 0
    # f0 and the initial-step probe; the first step starts from f0, every later one with a
    # fresh f(t, y) before its stage.
    assert int(sol.stats.nfe) == len(rec.points) == 1 + 2 * n
    # Each later step's first evaluation is at the previous step's last node (t + h) but on its
    # end state y1, not on the last stage's state y0 + h k0, which a reused stage would be.
    last_stages, firsts = rec.points[2::2], rec.points[3::2]
    assert len(firsts) == n - 1
    for (t_stage, y_stage), (t_first, y_first) in zip(last_stages, firsts):
        assert t_first == pytest.approx(t_stage, abs=1e-15)
        assert not torch.equal(y_first, y_stage)
    assert int(batch.stats.nfe[0]) == int(sol.stats.nfe)
    err = abs(float(sol.ys[-1, 0]) - math.exp(lam))
    assert err == pytest.approx(abs(float(batch.ys[0, -1, 0]) - math.exp(lam)), rel=1e-9)
    assert err < 1e-4


def test_controller_tensor_and_float_paths_agree() -> None:
    ratios = [0.0, 1e-12, 1e-3, 0.5, 1.0, 1.0 + 1e-9, 7.0, 1e6, math.inf, math.nan]
    for beta in (0.0, 0.04, 0.2):
        ctrl = PIController(
            rtol=1e-6,
            atol=1e-9,
            norm=rms_norm,
            dims=(0,),
            error_order=4,
            beta=beta,
            safety=0.85,
            ifactor=5.0,
            dfactor=0.3,
        )
        for prev in (1.0, 0.02, 3.0):
            for rejected in (False, True):
                for r in ratios:
                    h = 0.37
                    state = ctrl.init(torch.zeros((), dtype=F64))
                    state = state._replace(
                        prev_ratio=torch.tensor(prev, dtype=F64),
                        rejected_last=torch.tensor(rejected),
                    )
                    acc_t, h_t, st_t = ctrl.adapt(
                        torch.tensor(r, dtype=F64), torch.tensor(h, dtype=F64), state
                    )
                    acc_f, h_f, st_f = ctrl.adapt_float(r, h, FloatControllerState(prev, rejected))
                    assert bool(acc_t) == acc_f, (beta, prev, rejected, r)
                    assert float(h_t) == pytest.approx(h_f, rel=1e-14), (beta, prev, rejected, r)
                    assert float(st_t.prev_ratio) == pytest.approx(st_f.prev_ratio, rel=1e-14)
                    assert bool(st_t.rejected_last) == st_f.rejected_last


def test_controller_beta_uses_the_previous_ratio() -> None:
    """PI control: a small previous error lets the step grow less (``err_prev^beta``)."""
    ctrl = PIController(rtol=1e-6, atol=1e-9, norm=rms_norm, dims=(0,), error_order=4, beta=0.1)
    _, h_small_prev, _ = ctrl.adapt_float(0.5, 1.0, FloatControllerState(0.01, False))
    _, h_large_prev, _ = ctrl.adapt_float(0.5, 1.0, FloatControllerState(1.0, False))
    alpha = 1 / 5 - 0.75 * 0.1
    assert h_large_prev == pytest.approx(0.9 * 0.5**-alpha)
    assert h_small_prev == pytest.approx(0.9 * 0.5**-alpha * 0.01**0.1)


@pytest.mark.parametrize("method", [m for m in ADAPTIVE if m in neuralode.TABLEAUS])
def test_method_as_name_tableau_or_solver(method: str) -> None:
    tab = neuralode.get_tableau(method)
    by_name = neuralode.solve(field, Y0, T, method=method, rtol=1e-6, atol=1e-8)
    by_tab = neuralode.solve(field, Y0, T, method=tab, rtol=1e-6, atol=1e-8)
    by_solver = neuralode.solve(field, Y0, T, method=ExplicitRK(tab), rtol=1e-6, atol=1e-8)
    for other in (by_tab, by_solver):
        assert torch.equal(other.ys, by_name.ys)
        assert int(other.stats.nfe) == int(by_name.stats.nfe)
    ys = neuralode.odeint(field, Y0, T, method=tab, rtol=1e-6, atol=1e-8)
    assert torch.equal(ys, by_name.ys)


def test_explicit_rk_refuses_what_it_cannot_run() -> None:
    with pytest.raises(TypeError, match=r"^ExplicitRK needs a ButcherTableau, got str$"):
        ExplicitRK("dopri5")  # type: ignore[arg-type]


def test_a_tableau_without_dense_output_gets_cubic_hermite() -> None:
    """Ralston's second-order method as a user would write it (no interpolant): it was refused
    with a ValueError; it now runs with cubic Hermite interpolation, the same numbers and
    evaluations as the tableau given hermite_dense_output explicitly, and keeps its order."""
    from neuralode.tableaus import hermite_dense_output

    c, a, b = (Fr(0), Fr(2, 3)), ((), (Fr(2, 3),)), (Fr(1, 4), Fr(3, 4))
    bare = ButcherTableau(name="ralston", order=2, c=c, a=a, b=b)
    given = ButcherTableau(
        name="ralston_h", order=2, c=c, a=a, b=b, dense=hermite_dense_output(b, 2)
    )
    t = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    sols = [
        neuralode.solve(lambda t, y: -y + torch.sin(t), y0, t, method=m, step_size=0.1, dense=True)
        for m in (bare, given)
    ]
    assert torch.equal(sols[0].ys, sols[1].ys)
    assert int(sols[0].stats.nfe) == int(sols[1].stats.nfe)
    q = torch.tensor([0.33, 1.27], dtype=torch.float64)
    assert torch.equal(sols[0].evaluate(q), sols[1].evaluate(q))
    errs = []
    for h in (0.1, 0.05):
        ys = neuralode.odeint(lambda t, y: -y, y0, t, method=bare, options={"step_size": h})
        errs.append(float((ys[-1] - y0 * math.exp(-2.0)).abs().max()))
    assert 3.6 < errs[0] / errs[1] < 4.4  # second order


def test_solvers_and_their_constants_are_built_once() -> None:
    """One solver per name and per tableau object; its nodes per (dtype, device) and its
    interpolant's coefficients per device are built once, with the tableau's values."""
    from neuralode.solvers import get_solver

    solver = get_solver("dopri5")
    assert get_solver("dopri5") is solver and get_solver(solver) is solver
    assert repr(solver) == "ExplicitRK('dopri5')"
    assert repr(CappedStep(0.1)) == "CappedStep('capped')"
    assert get_solver("bosh3") is not solver
    tab = neuralode.get_tableau("bosh3")
    from_tab = get_solver(tab)
    assert isinstance(from_tab, ExplicitRK) and from_tab.tableau is tab
    assert get_solver(tab) is from_tab and from_tab is not get_solver("bosh3")
    assert isinstance(solver, ExplicitRK)
    cpu = torch.device("cpu")
    c64 = solver._nodes(F64, cpu)
    c32 = solver._nodes(torch.float32, cpu)
    assert solver._nodes(F64, cpu) is c64 and solver._nodes(torch.float32, cpu) is c32
    assert c64.dtype == F64 and c32.dtype == torch.float32
    want = [float(x) for x in solver.tableau.c]
    assert c64.tolist() == want and c32.tolist() == torch.tensor(want).tolist()
    P = solver._coefficients(cpu)
    assert solver._coefficients(cpu) is P and P.dtype == F64
    assert P.tolist() == [[float(x) for x in row] for row in solver.tableau.dense.P]


def test_only_f_at_the_step_end_of_y1_starts_the_next_step() -> None:
    """An extra stage at node 1 whose row is not ``b`` is evaluated at its own input, and its
    value does not replace the next step's first evaluation (3 evaluations per step here)."""
    from neuralode.tableaus import DenseOutput

    half = Fr(1, 2)
    tab = ButcherTableau(
        name="heun_extra",
        order=2,
        c=(Fr(0), Fr(1)),
        a=((), (Fr(1),)),
        b=(half, half),
        dense=DenseOutput(
            P=((half,), (half,), (Fr(0),)), extra_c=(Fr(1),), extra_a=((Fr(1), Fr(0)),)
        ),
    )
    solver = ExplicitRK(tab)
    assert solver.extra_is_f1 == [False]
    calls = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append((float(t), y.clone()))
        return torch.cos(t) * y

    t = torch.linspace(0, 1, 5, dtype=F64)
    sol = neuralode.solve(f, torch.ones(1, dtype=F64), t, method=solver, dense=True)
    plain = neuralode.solve(
        lambda t, y: torch.cos(t) * y, torch.ones(1, dtype=F64), t, method="heun"
    )
    torch.testing.assert_close(sol.ys, plain.ys, rtol=1e-14, atol=0)
    assert len(calls) == int(sol.stats.nfe) == 3 * 4
    # The extra stage's input is y0 + h k0 (an Euler step), not y1.
    t_extra, y_extra = calls[2]
    assert t_extra == 0.25 and float(y_extra) == pytest.approx(1.25, rel=1e-14)


def test_the_tableau_cache_is_bounded() -> None:
    """Solvers built from tableau objects are kept for at most 64 tableaus (a training loop that
    builds a tableau per call must not grow memory without bound)."""
    import dataclasses

    from neuralode.solvers import get_solver, registry

    registry._FROM_TABLEAU.clear()
    tabs = [dataclasses.replace(neuralode.get_tableau("rk4")) for _ in range(65)]
    for i, tab in enumerate(tabs[:64]):
        get_solver(tab)
        assert len(registry._FROM_TABLEAU) == i + 1
    get_solver(tabs[64])
    assert len(registry._FROM_TABLEAU) == 1


def test_a_name_builds_its_solver_on_first_use_and_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry builds a name's solver when it is first asked for (the suite's own
    imports asked for every name already, so the cache is emptied here), under the name an
    alias stands for, and hands that same solver out after."""
    from neuralode.solvers import registry

    monkeypatch.setattr(registry, "_SOLVERS", {})
    heun = registry.get_solver("heun2")
    assert isinstance(heun, ExplicitRK) and heun.tableau is neuralode.get_tableau("heun")
    assert registry._SOLVERS == {"heun": heun}
    assert registry.get_solver("heun") is heun and registry.get_solver("heun2") is heun
    adams = registry.get_solver("fixed_adams")
    assert type(adams).__name__ == "AdamsBashforthMoulton"
    assert registry._SOLVERS == {"heun": heun, "implicit_adams": adams}


def test_user_tableau_converges_at_its_order() -> None:
    """A tableau passed as ``method=`` is a real method: Ralston's 3rd order, measured."""
    tab = ButcherTableau(
        name="ralston3_fixed",
        order=3,
        c=RALSTON3.c,
        a=RALSTON3.a,
        b=RALSTON3.b,
        dense=RALSTON3.dense,
    )
    errs = []
    for n in (20, 40, 80):
        t = torch.linspace(0, 1, n + 1, dtype=F64)
        ys = neuralode.odeint(
            lambda t, y: torch.cos(t) * y, torch.ones(1, dtype=F64), t, method=tab
        )
        errs.append(abs(float(ys[-1, 0]) - math.exp(math.sin(1.0))))
    slope = math.log(errs[0] / errs[-1]) / math.log(4)
    assert abs(slope - 3) < 0.3, slope


def test_unknown_methods_are_named() -> None:
    with pytest.raises(
        ValueError, match=r"unknown method 'rk5'; known methods are: adaptive_heun, auto, bosh3, "
    ):
        neuralode.solve(field, Y0, T, method="rk5")
    with pytest.raises(TypeError, match=r"method must be a name in .*ButcherTableau.*Solver"):
        neuralode.solve(field, Y0, T, method=5)  # type: ignore[arg-type]
    from neuralode.solvers import get_solver

    with pytest.raises(TypeError) as info:
        get_solver(5.0)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"method must be a name in {list(neuralode.METHODS)}, a neuralode.ButcherTableau or a "
        "neuralode.solvers.Solver, got float"
    )


class CappedStep(Solver):
    """dopri5 that refuses (per row) any step longer than its row's cap: a stand-in for an
    implicit method whose Newton iteration does not converge on large steps."""

    def __init__(self, cap: torch.Tensor | float) -> None:
        self.inner = ExplicitRK(neuralode.get_tableau("dopri5"))
        self.cap = cap
        self.name, self.order, self.error_order = "capped", 5, 4
        self.dense_order = self.inner.dense_order

    def init(self, f, t, y, f0):
        return self.inner.init(f, t, y, f0)

    def step(self, f, t, h, y, state, times=None) -> StepResult:
        res = self.inner.step(f, t, h, y, state, times)
        h_t = torch.as_tensor(h, dtype=F64)
        failed = h_t > torch.as_tensor(self.cap, dtype=F64)
        return res._replace(status=torch.where(failed, int(Status.NONFINITE), 0))

    def dense(self, f, t, h, y, result):
        return self.inner.dense(f, t, h, y, result)

    # error_norm: Solver's default (the one estimate's norm), as dopri5 has one estimate.


def test_a_step_that_fails_on_its_own_is_rejected_and_retried() -> None:
    t = torch.tensor([0.0, 4.0], dtype=F64)
    free = neuralode.solve(field, Y0, t, method="dopri5", rtol=1e-4, atol=1e-6, dense=True)
    capped = neuralode.solve(
        field, Y0, t, method=CappedStep(0.05), rtol=1e-4, atol=1e-6, dense=True
    )
    assert capped.success
    assert int(capped.stats.n_accepted) >= 4.0 / 0.05
    assert int(capped.stats.n_accepted) > int(free.stats.n_accepted)
    torch.testing.assert_close(capped.ys[-1], free.ys[-1], rtol=1e-3, atol=1e-4)
    # Per row: only the row with the small cap takes small steps.
    caps = torch.tensor([0.05, 10.0], dtype=F64)
    both = neuralode.solve(
        field, Y0.expand(2, 2), t, method=CappedStep(caps), rtol=1e-4, atol=1e-6, batched=True
    )
    assert int(both.stats.n_accepted[0]) >= 80
    assert int(both.stats.n_accepted[1]) == int(free.stats.n_accepted)


class _Pair(NamedTuple):
    k: torch.Tensor
    j: torch.Tensor


def test_default_merge_keeps_rows_per_state_kind() -> None:
    """``Solver.merge``: tensors (and tuples and named tuples of them) take ``new`` on accepted
    rows and ``old`` elsewhere; a state a step cannot carry (``None``) stays ``None``."""

    class Default:  # Solver.merge itself (ExplicitRK has its own: the test below)
        def merge(self, accept, new, old):  # noqa: ANN001, ANN202
            return Solver.merge(self, accept, new, old)  # type: ignore[arg-type]

    solver = Default()
    accept = torch.tensor([True, False, True])
    new, old = torch.ones(3, 2), torch.zeros(3, 2)
    want = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    assert torch.equal(solver.merge(accept, new, old), want)
    merged = solver.merge(accept, (new, new * 2), (old, old))
    assert isinstance(merged, tuple) and torch.equal(merged[1], 2 * want)
    pair = solver.merge(accept, _Pair(new, new), _Pair(old, old + 5))
    assert isinstance(pair, _Pair) and torch.equal(pair.j, torch.where(want > 0, 1.0, 5.0))
    assert solver.merge(accept, None, old) is None
    assert solver.merge(accept, new, None) is None
    # one row, no batch dimension: a 0-dim accept flag
    assert torch.equal(
        solver.merge(torch.tensor(False), torch.ones(2), torch.zeros(2)), torch.zeros(2)
    )


def test_runge_kutta_merge_keeps_each_rows_known_first_stage() -> None:
    """``ExplicitRK.merge``: where one side has no first stage (``None``), the rows of the other
    side keep theirs, marked known; a step then evaluates ``f`` for the rest only in its count."""
    from neuralode.solvers.rk import KnownFirstStage

    solver = neuralode.get_solver("fehlberg2")
    accept = torch.tensor([True, False, True])
    new, old = torch.ones(3, 2), torch.zeros(3, 2)
    assert torch.equal(solver.merge(accept, new, old), torch.where(accept[:, None], new, old))
    assert solver.merge(accept, None, None) is None
    part = solver.merge(accept, None, old)  # accepted rows lost theirs, the rejected one kept it
    assert isinstance(part, KnownFirstStage) and part.known.tolist() == [False, True, False]
    assert torch.equal(part.k0[1], old[1])
    part = solver.merge(accept, new, None)
    assert part.known.tolist() == [True, False, True] and torch.equal(part.k0[0], new[0])
    # merging into a partly known state keeps what each row knows
    again = solver.merge(torch.tensor([False, False, True]), None, part)
    assert again.known.tolist() == [True, False, False]
    full = solver.merge(torch.tensor([False, True, False]), new * 3, part)
    assert full.known.tolist() == [True, True, True] and full.k0[:, 0].tolist() == [1, 3, 1]

    # A step from a partly known first stage evaluates f on every row (one call) and charges
    # each row what it would have spent alone; the known rows' stage is the one carried.
    calls = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return -y

    y = torch.ones(3, 2, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.float64)
    h = torch.full((3,), 0.1, dtype=torch.float64)
    marked = KnownFirstStage(torch.full((3, 2), 7.0, dtype=torch.float64), accept)
    res = solver.step(f, t, h, y, marked)
    assert res.nfe.tolist() == [2, 3, 2] and len(calls) == 3
    assert calls[0].tolist() == [0.0, 0.0, 0.0]  # the rows' f(t, y), at the step's start
    assert torch.equal(res.dense_info[0][0], marked.k0[0])  # carried, not re-evaluated
    assert torch.equal(res.dense_info[0][1], -y[1])
    assert torch.equal(res.retry_state, res.dense_info[0])  # a retry starts from f(t, y)


def test_a_fixed_step_method_gives_no_error_estimate() -> None:
    """``StepResult``'s contract for a method without an embedded pair: no error estimate
    (``None``), no carried state (rk4 is not FSAL), its four evaluations, and the RK4 update,
    which for ``y' = -y`` is the Taylor polynomial of ``exp(-h)`` to degree 4."""
    solver = neuralode.get_solver("rk4")
    y = torch.tensor([1.0, 2.0], dtype=F64)
    h = 0.1
    res = solver.step(lambda t, y: -y, 0.0, h, y, None)
    assert res.y_error is None and res.state is None and res.nfe == 4
    growth = 1 - h + h**2 / 2 - h**3 / 6 + h**4 / 24
    torch.testing.assert_close(res.y1, y * growth, rtol=1e-15, atol=0)


class StateChecker(Solver):
    """An explicit Runge-Kutta method that takes nothing on trust. ``init`` evaluates
    ``f(t, y)`` itself, from the time and state it is handed (not from ``f0``); ``step`` ignores
    the precomputed stage ``times`` and checks, row by row, that the carried state it is handed
    is ``f`` at its own ``(t, y)``; each step carries ``f(t + h, y1)`` on, as an FSAL method
    does. A loop that hands a solver the wrong time, state or carried state fails here."""

    def __init__(self, method: str) -> None:
        self.inner = ExplicitRK(neuralode.get_tableau(method))
        self.name, self.order = f"checked_{method}", self.inner.order
        self.error_order, self.dense_order = self.inner.error_order, self.inner.dense_order
        self.checked = 0

    def init(self, f, t, y, f0):
        k0 = f(torch.as_tensor(t, dtype=F64), y)
        if f0 is not None:
            torch.testing.assert_close(f0, k0, rtol=0, atol=0)
        return k0

    def step(self, f, t, h, y, state, times=None) -> StepResult:
        t, h = torch.as_tensor(t, dtype=F64), torch.as_tensor(h, dtype=F64)
        torch.testing.assert_close(state, f(t, y), rtol=1e-12, atol=1e-12)
        self.checked += 1
        res = self.inner.step(f, t, h, y, state)
        return res._replace(state=f(t + h, res.y1))

    def dense(self, f, t, h, y, result):
        d, nfe, _ = self.inner.dense(f, t, h, y, result)
        return d, nfe, None

    def stage_times(self, t, h, dtype):
        return self.inner.stage_times(t, h, dtype)


class StateCheckerWithoutTimes(StateChecker):
    """The same, with the protocol's default ``stage_times`` (no precomputed stage times)."""

    stage_times = Solver.stage_times


class StateCheckerWithoutRetry(StateChecker):
    """The same, giving no retry state (the protocol's ``None``: a rejected row keeps the
    carried state its step started from)."""

    def step(self, f, t, h, y, state, times=None) -> StepResult:
        return super().step(f, t, h, y, state, times)._replace(retry_state=None)


@pytest.mark.parametrize("rows", [0, 1, 3], ids=["one_row", "row", "batch"])
def test_a_rejected_step_without_a_retry_state_keeps_the_rows_own(rows: int) -> None:
    """A solver that gives no retry state (``None``) is handed, after a rejection, the carried
    state its rejected step started from, in the float driver, in the tensor driver when every
    row rejects and when some rows accept while others reject; the steps are dopri5's."""

    def stiffish(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = t.unsqueeze(-1) if t.ndim else t
        return -30.0 * (y - torch.sin(3.0 * t)) + torch.cos(t)

    y0 = torch.tensor([0.5, -1.0], dtype=F64)
    if rows:  # rows of different starts reject at different steps
        y0 = y0 + 0.7 * torch.arange(rows, dtype=F64).unsqueeze(1)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    kw = dict(rtol=1e-5, atol=1e-7, batched=rows > 0)
    checker = StateCheckerWithoutRetry("dopri5")
    sol = neuralode.solve(stiffish, y0, t, method=checker, **kw)
    ref = neuralode.solve(stiffish, y0, t, method="dopri5", **kw)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)
    assert torch.equal(sol.stats.n_rejected, ref.stats.n_rejected)
    assert bool((sol.stats.n_rejected > 0).all()) and checker.checked > 0
    if rows > 1:
        assert len(set(ref.stats.n_steps.tolist())) > 1


@pytest.mark.parametrize(
    ("method", "kw"),
    [("rk4", dict(step_size=0.1)), ("dopri5", dict(rtol=1e-6, atol=1e-8))],
    ids=["fixed", "adaptive"],
)
@pytest.mark.parametrize("checker_type", [StateChecker, StateCheckerWithoutTimes])
@pytest.mark.parametrize("rows", [0, 3], ids=["one_row", "batch"])
@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_every_step_is_handed_its_own_time_state_and_carried_state(
    method: str, kw: dict, rows: int, gradient: str, checker_type: type[StateChecker]
) -> None:
    # The float driver (one row) and the tensor driver (a batch), fixed and adaptive, forward
    # and in the backward pass of each strategy: the results equal the plain method's, and
    # every step saw f(t, y) as its carried state.
    y0 = (Y0 if rows == 0 else Y0 + 0.1 * torch.arange(rows, dtype=F64).unsqueeze(1)).clone()
    checker = checker_type(method)
    if gradient != "backprop":
        kw = {**kw, "adjoint_params": ()}
    sols = []
    for solver in (method, checker):
        y = y0.clone().requires_grad_()
        sol = neuralode.solve(field, y, T, method=solver, batched=rows > 0, gradient=gradient, **kw)
        (grad,) = torch.autograd.grad(sol.ys.square().sum(), y)
        sols.append((sol.ys.detach(), grad))
    torch.testing.assert_close(sols[1][0], sols[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sols[1][1], sols[0][1], rtol=1e-9, atol=1e-10)
    assert checker.checked > 0


@pytest.mark.parametrize("batched", [False, True])
def test_a_row_whose_steps_always_fail_ends_with_the_solvers_own_status(batched: bool) -> None:
    # A solver that refuses every step of a row (cap 0) with its own status: the step size
    # underflows, and the row's status is the solver's reason (here NONFINITE, though every
    # number is finite), not STEP_SIZE_UNDERFLOW. In the batch, a row the solver lets through
    # blows up (y' = y^2 from y = 1, at t = 1): its underflow is its own, STEP_SIZE_UNDERFLOW.
    t = torch.tensor([0.0, 2.0], dtype=F64)
    caps = torch.tensor([0.0, 10.0, 10.0], dtype=F64) if batched else 0.0
    y0 = torch.tensor([[-1.0], [1.0], [-1.0]], dtype=F64) if batched else torch.tensor([-1.0])
    sol = neuralode.solve(
        lambda t, y: y**2,
        y0.to(F64),
        t,
        method=CappedStep(caps),
        rtol=1e-6,
        atol=1e-8,
        batched=batched,
        throw=False,
    )
    if batched:
        want = [Status.NONFINITE, Status.STEP_SIZE_UNDERFLOW, Status.SUCCESS]
        assert sol.status.tolist() == [int(s) for s in want]
        assert float(sol.t_end[0]) == 0.0 and float(sol.t_end[2]) == 2.0
        assert float(sol.t_end[1]) == pytest.approx(1.0, abs=1e-3)
    else:
        assert sol.status.shape == () and int(sol.status) == Status.NONFINITE
        assert float(sol.t_end) == 0.0


def test_precomputed_stage_times_take_the_nodes_in_the_time_dtype() -> None:
    # Heun's third-order method on y' = cos(50 t), fixed steps of 0.1: the same sums by hand in
    # float64. Nodes 1/3 and 2/3 rounded to float32 would move each stage time by ~1e-9 and
    # the result by more than 1e-13.
    h, n = 0.1, 10
    y_ref, t_k = 0.0, 0.0
    for k in range(n):
        t_k = k * h
        k1 = math.cos(50 * t_k)
        k3 = math.cos(50 * (t_k + 2 * h / 3))
        y_ref += h * (k1 / 4 + 3 * k3 / 4)
    for batched in (False, True):
        y0 = torch.zeros(1, 1, dtype=F64) if batched else torch.zeros(1, dtype=F64)
        sol = neuralode.solve(
            lambda t, y: torch.cos(50 * t).reshape(t.shape + (1,) * (y.ndim - t.ndim)).expand_as(y),
            y0, torch.tensor([0.0, n * h], dtype=F64), method=HEUN3, step_size=h,
            batched=batched,
        )  # fmt: skip
        assert float(sol.ys[..., -1, 0]) == pytest.approx(y_ref, rel=0, abs=1e-14)


@pytest.mark.parametrize("batched", [False, True])
def test_a_solver_that_lands_per_row_lands_on_every_row_by_default(batched):
    """``Solver.landing``'s default says every row lands: a solver that sets ``lands_per_row``
    without its own ``landing`` takes the steps of one that lands on every output time (two
    more steps here than dopri5 interpolating), in both drivers."""

    def f(t, y):
        s = torch.sin(3 * t)
        return -y + (s.unsqueeze(-1) if s.ndim else s)

    lands = copy.copy(neuralode.get_solver("dopri5"))
    lands.name, lands.lands_on_outputs = "dopri5-lands", True
    per_row = copy.copy(lands)
    per_row.lands_per_row = True
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    y0 = torch.ones(3, 2, dtype=torch.float64) if batched else torch.ones(2, dtype=torch.float64)
    ref = neuralode.solve(f, y0, t, method=lands, batched=batched)
    sol = neuralode.solve(f, y0, t, method=per_row, batched=batched)
    interp = neuralode.solve(f, y0, t, method="dopri5", batched=batched)
    assert torch.equal(sol.stats.n_steps, ref.stats.n_steps)
    assert torch.equal(sol.ys, ref.ys)
    assert bool((ref.stats.n_steps == interp.stats.n_steps + 2).all())
