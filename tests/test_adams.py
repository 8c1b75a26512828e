"""The Adams methods (``explicit_adams``, ``implicit_adams``/``fixed_adams``) in numbers.

What this proves:

* The variable-step weights are the exact integrals of the Lagrange basis (checked against
  rational arithmetic for every order 1..12), and on a uniform grid they are the classic
  Adams-Bashforth and Adams-Moulton coefficients.
* Adams-Bashforth and Adams-Bashforth-Moulton of order ``k`` converge at order ``k`` (measured
  slope within 0.3, for k = 1..6) on a uniform grid and on a non-uniform one (random step sizes,
  each refined by halving), the error taken over every output.
* Against scipy's DOP853 at rtol 1e-12 on Lotka-Volterra (and against torchdiffeq where it is
  installed): errors of the size the order predicts.
* Options are checked (``max_order``, ``max_iters``, the corrector's tolerances), and reach the
  solver through ``neuralode.odeint``'s ``options`` as in torchdiffeq.
* Gradients: ``gradcheck`` in float64 through the steps (backprop), the adjoint agrees with
  backprop, and the checkpoint strategy is refused with a message that says what to use.
* Batched rows equal their single solves; a row that takes ``h = 0`` keeps its state and its
  history (its later steps are those of a row that never paused).
* Evaluation counts: the Runge-Kutta start, then one evaluation per explicit step; every
  evaluation counted, interpolated outputs included.
* The corrector iterates as written out by hand (per row, a scalar state, both drivers); the
  reported ``order`` and ``dense_order`` are the measured ones; a float32 batch on float64
  times stays float32; ``merge`` picks each row's history (the solver protocol).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

import neuralode
from neuralode.solvers import AdamsBashforth, AdamsBashforthMoulton
from neuralode.solvers.adams import MAX_ORDER, AdamsState, _weights_float, _weights_tensor

F64 = torch.float64
CLASSES = {"explicit_adams": AdamsBashforth, "implicit_adams": AdamsBashforthMoulton}


# --------------------------------------------------------------------------- weights
def _exact_weights(x: list[Fraction]) -> list[Fraction]:
    """``int_0^1 L_j`` in rationals, by expanding each basis polynomial."""
    out = []
    for j, xj in enumerate(x):
        poly, den = [Fraction(1)], Fraction(1)
        for i, xi in enumerate(x):
            if i != j:
                poly = [
                    (poly[p - 1] if p else 0) - (xi * poly[p] if p < len(poly) else 0)
                    for p in range(len(poly) + 1)
                ]
                den *= xj - xi
        out.append(sum(c / (p + 1) for p, c in enumerate(poly)) / den)
    return out


@pytest.mark.parametrize("k", range(1, MAX_ORDER + 1))
def test_weights_are_exact_integrals(k: int) -> None:
    rng = np.random.default_rng(k)
    # Past nodes at random spacings (ratios 0.5..2), in step units, made exact rationals.
    gaps = [Fraction(float(g)).limit_denominator(1000) for g in rng.uniform(0.5, 2.0, k)]
    past = [-sum(gaps[:i]) for i in range(k)]  # 0, -g1, -g1-g2, ...
    for lead in ([], [Fraction(1)]):  # Bashforth: 0 and the past; Moulton: 1, 0 and the past
        x = lead + past[: k - len(lead)]
        want = _exact_weights(x)
        got = _weights_float(tuple(float(v) for v in x))
        scale = float(sum(abs(w) for w in want))
        assert max(abs(float(w) - g) for w, g in zip(want, got)) <= 1e-14 * scale
        rows = torch.tensor([[float(v)] * 2 for v in x], dtype=F64)  # two identical rows
        tensor = _weights_tensor(rows)
        torch.testing.assert_close(tensor[:, 0], torch.tensor(got, dtype=F64), rtol=0, atol=1e-13)


def test_uniform_weights_are_the_classic_coefficients() -> None:
    # Hairer, Norsett and Wanner I, III.1 (Tables 1.1 and 1.2).
    ab = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}
    ab_den = {1: 1, 2: 2, 3: 12, 4: 24}
    am = {1: [1], 2: [1, 1], 3: [5, 8, -1], 4: [9, 19, -5, 1]}
    am_den = {1: 1, 2: 2, 3: 12, 4: 24}
    for k in range(1, 5):
        got = _weights_float(tuple(-float(i) for i in range(k)))
        assert got == pytest.approx([c / ab_den[k] for c in ab[k]], abs=1e-15)
        got = _weights_float((1.0, *(-float(i) for i in range(k - 1))))
        assert got == pytest.approx([c / am_den[k] for c in am[k]], abs=1e-15)


# --------------------------------------------------------------------------- convergence
def _field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A rotation at angular speed ``1 + cos(t) / 2``: ``theta = t + sin(t) / 2``."""
    w = 1 + 0.5 * torch.cos(t)
    return torch.stack([-w * y[..., 1], w * y[..., 0]], dim=-1)


def _exact(t: torch.Tensor) -> torch.Tensor:
    th = t + 0.5 * torch.sin(t)
    return torch.stack([torch.cos(th), torch.sin(th)], dim=-1)


Y0 = torch.tensor([1.0, 0.0], dtype=F64)
T_END = 4.0


def _uniform(m: int) -> torch.Tensor:
    return torch.linspace(0.0, T_END, 10 * m + 1, dtype=F64)


def _nonuniform(m: int) -> torch.Tensor:
    """Ten random intervals (lengths in a ratio up to 3), each cut into ``m`` equal steps: the
    grid stays non-uniform as ``m`` doubles, with step ratios bounded."""
    g = torch.Generator().manual_seed(7)
    w = 0.5 + torch.rand(10, generator=g, dtype=F64)
    w = w / w.sum() * T_END
    return torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(w.repeat_interleave(m) / m, 0)])


def _slope(hs: list[float], errs: list[float]) -> float:
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


@pytest.mark.parametrize("grid", ["uniform", "nonuniform"])
# Orders 1-4 (the default's and below), and 5-6 past it (6: the dopri8 start).  Above 6 the
# errors reach round-off before the asymptotic regime on these grids.
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("method", list(CLASSES))
def test_convergence_order(method: str, k: int, grid: str) -> None:
    make = _uniform if grid == "uniform" else _nonuniform
    solver = CLASSES[method](max_order=k)
    errs, hs = [], []
    for m in (4, 8, 16, 32):
        t = make(m)
        ys = neuralode.odeint(_field, Y0, t, method=solver)
        errs.append(float((ys - _exact(t)).abs().max()))
        hs.append(float(t.diff().max()))
    slope = _slope(hs, errs)
    print(f"{method} k={k} {grid}: slope {slope:.2f}, errors {[f'{e:.1e}' for e in errs]}")
    assert solver.order == k  # the order the solver reports is the one measured
    assert abs(slope - k) <= 0.3, f"{method} order {k} on a {grid} grid: slope {slope:.2f}"


@pytest.mark.parametrize("method", list(CLASSES))
def test_dense_output_converges_at_the_reported_order(method: str) -> None:
    """The cubic Hermite interpolant (``dense_order`` 3: local error ``O(h^4)``) between steps
    of order 6: outputs halfway through each step converge at order 4 (measured 4.06 explicit,
    4.00 implicit), the limit of the interpolant, not of the steps."""
    solver = CLASSES[method](max_order=6)
    assert solver.dense_order == 3
    errs, hs = [], []
    for n in (160, 320, 640, 1280):
        h = T_END / n
        mid = (torch.arange(n, dtype=F64) + 0.5) * h
        t = torch.cat((torch.zeros(1, dtype=F64), mid))
        sol = neuralode.solve(_field, Y0, t, method=solver, step_size=h)
        errs.append(float((sol.ys[1:] - _exact(mid)).abs().max()))
        hs.append(h)
    slope = _slope(hs, errs)
    print(f"{method}: dense slope {slope:.2f}, errors {[f'{e:.1e}' for e in errs]}")
    assert abs(slope - (solver.dense_order + 1)) <= 0.3, (slope, errs)


def test_nonuniform_grid_keeps_the_order_constant_coefficients_lose() -> None:
    """The variable-step weights matter: with the uniform-step coefficients (torchdiffeq's),
    each step after a change of step size is consistent to first order only (local error
    O(h^2)), so on this grid (ten changes) the error falls at order 2 (measured 2.02) where ours
    falls at order 4 (test above)."""

    class ConstantCoefficients(AdamsBashforth):
        def step(self, f, t, h, y, state, times=None):  # type: ignore[no-untyped-def]
            # The same history, its times replaced by a uniform grid's.
            fake = tuple(t - (i + 1) * h for i in range(len(state.ts)))
            return super().step(f, t, h, y, AdamsState(state.f, state.fs, fake), times)

    errs, hs = [], []
    for m in (4, 8, 16, 32):
        t = _nonuniform(m)
        ys = neuralode.odeint(_field, Y0, t, method=ConstantCoefficients(max_order=4))
        errs.append(float((ys - _exact(t)).abs().max()))
        hs.append(float(t.diff().max()))
    assert abs(_slope(hs, errs) - 2) <= 0.3, errs


# --------------------------------------------------------------------------- references
def _lotka(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


LV_Y0 = torch.tensor([1.0, 1.0], dtype=F64)
LV_T = torch.linspace(0.0, 5.0, 11, dtype=F64)


def _scipy_reference() -> torch.Tensor:
    integrate = pytest.importorskip("scipy.integrate", reason="pip install -e '.[dev]'")

    def rhs(t: float, y: np.ndarray) -> list[float]:
        return [1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]]

    sol = integrate.solve_ivp(
        rhs, (0.0, 5.0), [1.0, 1.0], method="DOP853", t_eval=LV_T.numpy(), rtol=1e-12, atol=1e-12
    )
    return torch.tensor(sol.y.T, dtype=F64)


# Measured errors at step 0.01 (the outputs, every 0.5, are on the step grid): explicit 7.6e-6,
# implicit 6.0e-7 (torchdiffeq's: 7.4e-6 and 6.1e-7); the bounds allow three times that.
REF_BOUND = {"explicit_adams": 2.5e-5, "implicit_adams": 2e-6}


@pytest.mark.parametrize("method", list(CLASSES))
def test_agrees_with_scipy_dop853(method: str) -> None:
    want = _scipy_reference()
    ys = neuralode.odeint(_lotka, LV_Y0, LV_T, method=method, options={"step_size": 0.01})
    err = float((ys - want).abs().max())
    print(f"{method}: max error vs DOP853 {err:.1e}")
    assert err <= REF_BOUND[method]


@pytest.mark.parametrize("method", list(CLASSES))
def test_agrees_with_torchdiffeq(method: str) -> None:
    """torchdiffeq's Adams at the same grid: both near the reference, so near each other (not
    equal: torchdiffeq starts with RK4 then raises the order, and uses constant coefficients;
    its max_order 5 is our 4 for explicit_adams)."""
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="pip install torchdiffeq==0.2.5")
    want = _scipy_reference()
    theirs = torchdiffeq.odeint(
        _lotka,
        LV_Y0,
        LV_T,
        method=method,
        options={"step_size": 0.01, "max_order": 5 if method == "explicit_adams" else 4},
    )
    ours = neuralode.odeint(_lotka, LV_Y0, LV_T, method=method, options={"step_size": 0.01})
    print(
        f"{method}: torchdiffeq {float((theirs - want).abs().max()):.1e}, "
        f"from ours {float((theirs - ours).abs().max()):.1e}"
    )
    assert float((theirs - want).abs().max()) <= REF_BOUND[method]
    assert float((theirs - ours).abs().max()) <= REF_BOUND[method]


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("bad", [0, 13, 2.5, True, "4", None])
def test_max_order_is_checked(bad: object) -> None:
    for cls in CLASSES.values():
        with pytest.raises(ValueError, match=r"max_order must be an integer from 1 to 12"):
            cls(max_order=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 1.0, False])
def test_max_iters_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match=r"max_iters must be an integer >= 1"):
        AdamsBashforthMoulton(max_iters=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [1, MAX_ORDER])
def test_the_orders_at_the_ends_are_taken(k: int) -> None:
    for cls in CLASSES.values():
        assert cls(max_order=k).max_order == k


def test_corrector_tolerances_are_checked() -> None:
    for name in ("rtol", "atol"):
        for bad in (-1e-3, math.nan, math.inf, True, "1e-3", None):
            want = f"{name} must be a non-negative finite number, got {bad!r}"
            with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
                AdamsBashforthMoulton(**{name: bad})  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"^rtol and atol cannot both be 0 \(the corrector could never stop\)$"
    ):
        AdamsBashforthMoulton(rtol=0.0, atol=0.0)
    # either alone may be 0, and an int is a number
    assert AdamsBashforthMoulton(rtol=0.0, atol=1e-9).rtol == 0.0
    assert AdamsBashforthMoulton(rtol=1e-6, atol=0).atol == 0.0


def test_names_and_defaults() -> None:
    """The names a configured instance goes by in messages, and the documented defaults
    (torchdiffeq's: order 4 here, 4 iterations, ``odeint``'s rtol 1e-7 and atol 1e-9)."""
    assert repr(AdamsBashforth()) == "AdamsBashforth(max_order=4)"
    assert repr(AdamsBashforthMoulton()) == (
        "AdamsBashforthMoulton(max_order=4, max_iters=4, rtol=1e-07, atol=1e-09)"
    )
    y0 = GY0.clone().requires_grad_()
    for cls, name in (
        (AdamsBashforth, "explicit_adams"),
        (AdamsBashforthMoulton, "implicit_adams"),
    ):
        with pytest.raises(ValueError, match=f"'{name}' is a multistep method"):
            neuralode.solve(
                _param_field(W), y0, GT, method=cls(2), gradient="checkpoint", adjoint_params=()
            )


def _corrector_by_hand(
    lam: list[float], y: list[float], h: float, gap: float, rtol: float, atol: float, iters: int
) -> tuple[list[float], list[float]]:
    """Order 2 on ``y' = lam y`` (componentwise), written out: Adams-Bashforth's prediction from
    ``f`` at ``t`` and at ``t - gap`` (there ``0.9 lam y``, a made-up history), then the
    trapezoidal rule by functional iteration, stopping once every component's change is within
    ``atol + rtol |new|``.  Returns the corrected state and the ratio of each iteration."""
    x = -gap / h  # the earlier node in step units
    w0, w1 = (0.5 - x) / -x, 1 / (2 * x)  # int_0^1 of the two Lagrange polynomials
    f0 = [a * b for a, b in zip(lam, y)]
    y1 = [v + h * (w0 * a + w1 * 0.9 * a) for v, a in zip(y, f0)]
    base = [v + 0.5 * h * a for v, a in zip(y, f0)]
    ratios: list[float] = []
    for _ in range(iters):
        new = [b + 0.5 * h * a * v for b, a, v in zip(base, lam, y1)]
        ratios.append(max(abs(n - o) / (abs(n) * rtol + atol) for n, o in zip(new, y1)))
        y1 = new
        if ratios[-1] <= 1:
            break
    return y1, ratios


@pytest.mark.parametrize("max_iters", [8, 3])
def test_corrector_iterates_as_written(max_iters: int) -> None:
    """One corrector step of each driver (Python floats, 0-dim tensors, a batch), a vector and
    a scalar state, against the iteration written out by hand: the same value and count per row
    (and a row that does not converge in ``max_iters`` keeps its last iterate).  Some iteration
    ratios (with 8 iterations) fall in (1, 2], so a looser stopping rule changes the counts."""
    h, gap, rtol, atol = 0.1, 0.13, 2.3e-6, 1e-12
    solver = AdamsBashforthMoulton(max_order=2, max_iters=max_iters, rtol=rtol, atol=atol)
    cases = [  # (lam, y) per row
        [([-2.0, -0.5], [1.0, 0.5])],
        [([-2.0, -0.5], [1.0, 0.5]), ([-3.0, -3.0], [0.5, 0.5]), ([-0.7, -0.7], [0.0, -1.0])],
        [([-2.0], [1.0])],  # a scalar state
    ]
    sensitive = False
    for rows in cases:
        want = [_corrector_by_hand(lam, y, h, gap, rtol, atol, max_iters) for lam, y in rows]
        sensitive |= any(1 < r <= 2 for _, ratios in want for r in ratios)
        lam = torch.tensor([r[0] for r in rows], dtype=F64)
        y = torch.tensor([r[1] for r in rows], dtype=F64)
        drivers = []
        if len(rows) == 1:
            lam, y = lam[0], y[0]
            if y.shape == (1,):
                lam, y = lam[0], y[0]  # 0-dim
            drivers.append((0.3, h))  # the one-row driver's floats
            drivers.append((torch.tensor(0.3, dtype=F64), torch.tensor(h, dtype=F64)))
        else:
            drivers.append((torch.full((3,), 0.3, dtype=F64), torch.full((3,), h, dtype=F64)))

        def f(t: torch.Tensor, y: torch.Tensor, lam: torch.Tensor = lam) -> torch.Tensor:
            return lam * y

        for t, step in drivers:
            state = AdamsState(None, (0.9 * lam * y,), (t - gap,))
            res = solver.step(f, t, step, y, state)
            counts = torch.as_tensor(res.n_newton).reshape(-1).tolist()
            assert counts == [len(ratios) for _, ratios in want], (rows, t)
            got = res.y1.reshape(len(rows), -1)
            for i, (value, _) in enumerate(want):
                torch.testing.assert_close(
                    got[i], torch.tensor(value, dtype=F64), rtol=1e-14, atol=0
                )
    assert sensitive == (max_iters == 8)  # three iterations stop before any such ratio


def test_compat_options() -> None:
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.ones(2, dtype=F64)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y

    opts = {"step_size": 0.01, "max_order": 3}
    ys = neuralode.odeint(f, y0, t, method="implicit_adams", options=opts)
    assert float((ys[-1] - math.exp(-1)).abs().max()) < 1e-7
    # fixed_adams is torchdiffeq's other name for implicit_adams
    torch.testing.assert_close(
        neuralode.odeint(f, y0, t, method="fixed_adams", options=opts), ys, rtol=0, atol=0
    )
    # the options reach the solver: another order, another corrector count, other numbers
    ys2 = neuralode.odeint(f, y0, t, method="implicit_adams", options={**opts, "max_order": 2})
    assert not torch.equal(ys2, ys)
    # (at a tight corrector tolerance, where one iteration does not converge)
    tight = [
        neuralode.odeint(
            f, y0, t, rtol=1e-14, atol=1e-14, method="implicit_adams", options={**opts, **o}
        )
        for o in ({"max_iters": 1}, {})
    ]
    assert not torch.equal(tight[0], tight[1])
    with pytest.raises(ValueError, match="max_order must be"):
        neuralode.odeint(f, y0, t, method="explicit_adams", options={"max_order": 13})
    with pytest.warns(UserWarning, match="max_order"):
        neuralode.odeint(f, y0, t, method="rk4", options={"max_order": 3})
    with pytest.warns(UserWarning, match="max_iters"):
        neuralode.odeint(f, y0, t, method="explicit_adams", options={"max_iters": 3})
    # rtol/atol are the corrector's tolerances, as in torchdiffeq: a loose one stops it early
    loose = neuralode.solve(
        f, y0, t, method=AdamsBashforthMoulton(rtol=1e-2, atol=1e-2), step_size=0.01
    )
    tight = neuralode.solve(
        f, y0, t, method=AdamsBashforthMoulton(rtol=1e-12, atol=1e-12), step_size=0.01
    )
    assert int(loose.stats.n_newton) < int(tight.stats.n_newton)


# --------------------------------------------------------------------------- gradients
def _param_field(w: torch.Tensor):  # type: ignore[no-untyped-def]
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ w) * (1 + t)

    return f


W = torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=F64)
GY0 = torch.tensor([0.4, -0.7], dtype=F64)
GT = torch.tensor([0.0, 0.33, 0.7, 1.0], dtype=F64)
# A corrector that always runs max_iters iterations (a tolerance no change meets): gradcheck's
# finite differences then see one smooth map, not one whose iteration count may flip.
GRAD_SOLVERS = {
    "explicit_adams": AdamsBashforth(max_order=4),
    "implicit_adams": AdamsBashforthMoulton(max_order=4, max_iters=2, rtol=0.0, atol=1e-300),
}


@pytest.mark.parametrize("method", list(CLASSES))
def test_gradcheck_backprop(method: str) -> None:
    solver = GRAD_SOLVERS[method]

    def run(y0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # step 0.1: ten steps, the start and six Adams steps; outputs inside steps too
        return neuralode.solve(_param_field(w), y0, GT, method=solver, step_size=0.1).ys

    args = (GY0.clone().requires_grad_(), W.clone().requires_grad_())
    assert torch.autograd.gradcheck(run, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("method", list(CLASSES))
def test_adjoint_agrees_with_backprop(method: str, k: int) -> None:
    """Both are within O(h^k) of the exact flow's gradient; measured relative differences at
    h = 0.01 (largest over y0 and w): explicit 6.7e-5 (k = 2) and 7.5e-6 (k = 3), implicit 1.3e-5
    and 8.2e-7."""
    solver = CLASSES[method](max_order=k)
    grads = {}
    for gradient in ("backprop", "adjoint"):
        y0, w = GY0.clone().requires_grad_(), W.clone().requires_grad_()
        extra = {"adjoint_params": (w,)} if gradient == "adjoint" else {}
        sol = neuralode.solve(
            _param_field(w), y0, GT, method=solver, step_size=0.01, gradient=gradient, **extra
        )
        grads[gradient] = torch.autograd.grad(sol.ys.square().sum(), (y0, w))
    for a, b in zip(grads["adjoint"], grads["backprop"]):
        rel = float((a - b).abs().max() / b.abs().max())
        print(f"{method} k={k}: adjoint vs backprop {rel:.1e}")
        assert rel < {2: 2e-4, 3: 2e-5}[k], (method, k, rel)


@pytest.mark.parametrize("method", [*CLASSES, "fixed_adams"])
def test_checkpoint_is_refused(method: str) -> None:
    y0 = GY0.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"checkpoint.*multistep.*'backprop'.*'adjoint'"):
        neuralode.solve(
            _param_field(W), y0, GT, method=method, gradient="checkpoint", adjoint_params=()
        )


@pytest.mark.parametrize("name", ["explicit_adams", "implicit_adams", "fixed_adams"])
def test_no_tableau(name: str) -> None:
    with pytest.raises(ValueError, match="multistep .Adams. method with no Butcher tableau"):
        neuralode.get_tableau(name)


def test_model_settings_refuse_checkpoint_at_construction() -> None:
    from neuralode.nn.settings import SolveSettings

    with pytest.raises(ValueError, match=r"checkpoint.*'explicit_adams'.*'backprop'"):
        SolveSettings(method="explicit_adams", gradient="checkpoint")
    SolveSettings(method="implicit_adams", gradient="adjoint")  # fine


# --------------------------------------------------------------------------- batches
# Rows over different spans with step_size 0.05: the shorter rows end early and take zero steps
# while the others go on; row 1's output at 1.77 lies inside a step taken after the others
# ended (the interpolant is built for every row, the ended ones at h = 0).
BATCH_T = torch.tensor([[0.0, 0.5, 1.0], [0.2, 1.77, 2.0], [1.0, 1.5, 1.7]], dtype=F64)
BATCH_Y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, -1.0]], dtype=F64)


def test_batched_rows_equal_their_single_solves() -> None:
    """Values, counts and gradients (finite: a row at ``h = 0`` divides by no zero step)."""
    for solver in (AdamsBashforth(3), AdamsBashforthMoulton(4)):
        y0 = BATCH_Y0.clone().requires_grad_()
        sol = neuralode.solve(_field, y0, BATCH_T, method=solver, step_size=0.05)
        (grad,) = torch.autograd.grad(sol.ys.square().sum(), y0)
        for i in range(3):
            yi = BATCH_Y0[i].clone().requires_grad_()
            one = neuralode.solve(_field, yi, BATCH_T[i], method=solver, step_size=0.05)
            torch.testing.assert_close(sol.ys[i], one.ys, rtol=1e-12, atol=1e-12)
            assert int(sol.stats.nfe[i]) == int(one.stats.nfe)
            assert int(sol.stats.n_steps[i]) == int(one.stats.n_steps)
            assert int(sol.stats.n_newton[i]) == int(one.stats.n_newton)
            (grad_i,) = torch.autograd.grad(one.ys.square().sum(), yi)
            torch.testing.assert_close(grad[i], grad_i, rtol=1e-12, atol=1e-12)


def test_float32_state_on_float64_times() -> None:
    """The weights are computed in the time dtype and applied in the state's: a float32 batch
    on float64 times stays float32 (steps, corrector and interpolant) and matches its rows
    solved alone to float32 round-off."""
    y0 = BATCH_Y0.float()
    for solver in (AdamsBashforth(3), AdamsBashforthMoulton(4)):
        sol = neuralode.solve(_field, y0, BATCH_T, method=solver, step_size=0.05)
        assert sol.ys.dtype == torch.float32
        assert sol.stats.nfe.dtype == sol.stats.n_newton.dtype == torch.int64
        for i in range(3):
            one = neuralode.solve(_field, y0[i], BATCH_T[i], method=solver, step_size=0.05)
            torch.testing.assert_close(sol.ys[i], one.ys, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_weights_keep_the_nodes_dtype(dtype: torch.dtype) -> None:
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, -1.3], [-2.0, -2.1]], dtype=dtype)
    w = _weights_tensor(x)
    assert w.dtype == dtype
    for j in range(2):
        want = _weights_float(tuple(float(v) for v in x[:, j].tolist()))
        torch.testing.assert_close(w[:, j], torch.tensor(want, dtype=dtype))


def test_merge_picks_each_rows_history() -> None:
    """``merge`` (the solver protocol's per-row choice after a partly accepted step; the
    fixed-step loop accepts every running row, so only a caller of the protocol reaches it):
    per row, the new history where accepted, the old one elsewhere; ``f`` where both know it."""
    solver = AdamsBashforth(3)
    rows = 3
    new = AdamsState(
        torch.full((rows, 2), 1.0), (torch.full((rows, 2), 2.0), torch.full((rows, 2), 3.0)),
        (torch.full((rows,), 0.5), torch.full((rows,), 0.4)),
    )  # fmt: skip
    old = AdamsState(
        torch.full((rows, 2), -1.0), (torch.full((rows, 2), -2.0), torch.full((rows, 2), -3.0)),
        (torch.full((rows,), 0.2), torch.full((rows,), 0.1)),
    )  # fmt: skip
    accept = torch.tensor([True, False, True])
    got = solver.merge(accept, new, old)
    sign = torch.tensor([1.0, -1.0, 1.0])
    assert got.f is not None
    torch.testing.assert_close(got.f, sign[:, None] * torch.ones(rows, 2), rtol=0, atol=0)
    for j, value in enumerate((2.0, 3.0)):
        torch.testing.assert_close(got.fs[j], value * sign[:, None] * torch.ones(rows, 2))
    torch.testing.assert_close(got.ts[0], torch.tensor([0.5, 0.2, 0.5]), rtol=0, atol=0)
    torch.testing.assert_close(got.ts[1], torch.tensor([0.4, 0.1, 0.4]), rtol=0, atol=0)
    assert solver.merge(accept, new._replace(f=None), old).f is None
    assert solver.merge(accept, new, old._replace(f=None)).f is None
    # a batch of scalar states (rows only)
    scalar = solver.merge(
        accept, AdamsState(None, (torch.ones(rows),), new.ts[:1]),
        AdamsState(None, (-torch.ones(rows),), old.ts[:1]),
    )  # fmt: skip
    torch.testing.assert_close(scalar.fs[0], sign, rtol=0, atol=0)
    short = AdamsState(None, new.fs[:1], new.ts[:1])
    want = (
        "explicit_adams: rows hold histories of different lengths (1 and 2); Adams methods "
        "advance every row in lockstep (fixed steps)"
    )
    with pytest.raises(RuntimeError, match=f"^{re.escape(want)}$"):
        solver.merge(accept, short, old)


@pytest.mark.parametrize("method", list(CLASSES))
def test_zero_step_rows_keep_state_and_history(method: str) -> None:
    solver = CLASSES[method](max_order=3)
    y = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, -1.0]], dtype=F64)
    t = torch.zeros(3, dtype=F64)
    h = torch.full((3,), 0.1, dtype=F64)
    state = solver.init(_field, t, y, None)
    for _ in range(3):  # two start steps, one Adams step: the history is full
        res = solver.step(_field, t, h, y, state)
        y, state, t = res.y1, res.state, t + h
    # Row 1 pauses for one step.
    pause = torch.tensor([0.1, 0.0, 0.1], dtype=F64)
    res = solver.step(_field, t, pause, y, state)
    assert torch.equal(res.y1[1], y[1])
    for new, old in zip(res.state.fs, state.fs):
        assert torch.equal(new[1], old[1])
    for new, old in zip(res.state.ts, state.ts):
        assert torch.equal(new[1], old[1])
    assert not torch.equal(res.y1[0], y[0])
    # Its next step is the step it would have taken without the pause.
    y_p, s_p, t_p = res.y1, res.state, t + pause
    after = solver.step(_field, t_p, h, y_p, s_p).y1
    direct = solver.step(_field, t, h, y, state).y1
    torch.testing.assert_close(after[1], direct[1], rtol=0, atol=0)


def test_float_and_tensor_steps_agree() -> None:
    """The one-row driver's Python-float steps and the tensor form give the same step."""
    for solver in (AdamsBashforth(4), AdamsBashforthMoulton(4)):
        y = torch.tensor([1.0, 0.0], dtype=F64)
        sf = st = solver.init(_field, 0.0, y, None)
        yf = yt = y
        tt = torch.tensor(0.0, dtype=F64)
        for k in range(6):
            h = 0.1 + 0.01 * k  # a non-uniform grid
            rf = solver.step(_field, 0.1 * k + 0.005 * k * (k - 1), h, yf, sf)
            rt = solver.step(_field, tt, torch.tensor(h, dtype=F64), yt, st)
            yf, sf, yt, st = rf.y1, rf.state, rt.y1, rt.state
            tt = tt + h
            torch.testing.assert_close(yf, yt, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize("k", [1, 2, 4, 5, 6])
def test_evaluation_counts(k: int) -> None:
    """f0 at the entry, the start's k - 1 Runge-Kutta steps (the 3/8 rule up to order 5, four
    stages, dopri8 above, thirteen: one evaluation fewer on the first step, which takes f0),
    then one evaluation per explicit step, and one more per corrector iteration for the
    implicit one."""
    n = 20
    t = torch.linspace(0.0, 1.0, n + 1, dtype=F64)
    stages = 4 if k <= 5 else 13
    start = 0 if k == 1 else stages - 1 + stages * (k - 2)
    calls = 0

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return _field(t, y)

    def solve(solver: AdamsBashforth, times: torch.Tensor) -> neuralode.Solution:
        nonlocal calls
        calls = 0
        sol = neuralode.solve(field, Y0, times, method=solver, step_size=1 / n)
        assert int(sol.stats.nfe) == calls  # every evaluation counted, no other
        assert int(sol.stats.njev) == int(sol.stats.nlu) == 0
        return sol

    sol = solve(AdamsBashforth(k), t)
    assert int(sol.stats.nfe) == 1 + start + (n - (k - 1)) - (1 if k == 1 else 0)
    imp = solve(AdamsBashforthMoulton(k), t)
    assert int(imp.stats.n_newton) >= n - (k - 1)
    assert int(imp.stats.nfe) == int(sol.stats.nfe) + int(imp.stats.n_newton)
    # Outputs inside every step: the interpolant's f(t + h, y1) starts the next step, so the
    # same steps cost one evaluation more (the last step's, which no step uses).
    mid = torch.cat((t[:1], (t[:-1] + t[1:]) / 2, t[-1:]))
    for grid, solver in ((sol, AdamsBashforth(k)), (imp, AdamsBashforthMoulton(k))):
        inside = solve(solver, mid)
        assert int(inside.stats.nfe) == int(grid.stats.nfe) + 1
        assert int(inside.stats.n_newton) == int(grid.stats.n_newton)
