"""Step-size control, seen through its options: norms, PI control, the end of the interval.

* ``rms_norm`` and ``max_norm`` are what they say, per row, against numpy.
* ``norm=`` reaches the controller in a real solve: a callable norm equal to twice the RMS makes
  the same decisions as the RMS norm at half the tolerances (same steps, same outputs, in both
  drivers), and ``norm="max"`` is the max norm (it needs more steps than the RMS norm when one
  component dominates the error, and is the RMS norm on a one-component state).
* ``beta`` reaches the controller: PI control changes the step sequence of a real solve, and its
  decisions follow Hairer's formula (``test_protocol`` checks the formula on single decisions).
* The end of the interval: a last step up to 1% longer than the proposal lands on the end; a
  longer remainder is a step of its own (both drivers).
* The adjoint's seminorm covers the state and the adjoint and leaves the parameter-gradient
  channels out; the full norm covers all three; ``"max"`` is the max over everything.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import neuralode
from neuralode.controllers import FixedGrid, PIController, max_norm, rms_norm

F64 = torch.float64


@pytest.mark.parametrize("dims", [(0,), (1,), (1, 2), (0, 1, 2)])
def test_norms_against_numpy(dims: tuple[int, ...]) -> None:
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    xn = x.numpy()
    np.testing.assert_allclose(rms_norm(x, dims).numpy(), np.sqrt((xn**2).mean(axis=dims)))
    np.testing.assert_allclose(max_norm(x, dims).numpy(), np.abs(xn).max(axis=dims))
    # A 0-dim state (no dims to reduce) is its own absolute value.
    assert float(rms_norm(torch.tensor(-2.0), ())) == 2.0
    assert float(max_norm(torch.tensor(-2.0), ())) == 2.0


def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Three decoupled components with very different speeds (works batched)."""
    rates = torch.tensor([-0.2, -3.0, -0.05], dtype=F64)
    return rates * y + torch.cos(t).unsqueeze(-1) * torch.tensor([0.0, 1.0, 0.0], dtype=F64)


Y0 = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
T = torch.tensor([0.0, 1.3, 4.0], dtype=F64)


@pytest.mark.parametrize("batched", [False, True])
def test_callable_norm_is_the_norm_the_controller_uses(batched: bool) -> None:
    y0 = Y0.expand(2, 3) if batched else Y0
    calls = []

    def twice_rms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        calls.append(dims)
        return 2.0 * rms_norm(x, dims)

    kw = dict(method="dopri5", batched=batched)
    custom = neuralode.solve(field, y0, T, norm=twice_rms, rtol=1e-6, atol=1e-8, **kw)
    halved = neuralode.solve(field, y0, T, norm="rms", rtol=5e-7, atol=5e-9, **kw)
    assert calls and set(calls) == {(1,) if batched else (0,)}
    assert torch.equal(custom.stats.n_steps, halved.stats.n_steps)
    assert torch.equal(custom.stats.nfe, halved.stats.nfe)
    torch.testing.assert_close(custom.ys, halved.ys, rtol=1e-12, atol=1e-14)


def test_max_norm_in_a_real_solve() -> None:
    rms = neuralode.solve(field, Y0, T, norm="rms", rtol=1e-6, atol=1e-8)
    mx = neuralode.solve(field, Y0, T, norm="max", rtol=1e-6, atol=1e-8)
    by_callable = neuralode.solve(field, Y0, T, norm=max_norm, rtol=1e-6, atol=1e-8)
    assert int(mx.stats.n_steps) > int(rms.stats.n_steps)  # max >= rms: never larger steps
    assert torch.equal(mx.ys, by_callable.ys)
    # One component: the max and the RMS norm are the same number.
    one = [
        neuralode.solve(lambda t, y: -y + torch.sin(t), Y0[:1], T, norm=n, rtol=1e-6, atol=1e-8)
        for n in ("rms", "max")
    ]
    assert torch.equal(one[0].ys, one[1].ys)


def test_beta_changes_the_steps_of_a_real_solve() -> None:
    kw = dict(method="dopri5", rtol=1e-8, atol=1e-10)
    integral = neuralode.solve(field, Y0, T, beta=0.0, **kw)
    pi = neuralode.solve(field, Y0, T, beta=0.08, **kw)
    assert int(pi.stats.n_steps) != int(integral.stats.n_steps)
    torch.testing.assert_close(pi.ys, integral.ys, rtol=1e-6, atol=1e-8)
    # err_prev^beta with err_prev <= 1 after an accepted step: PI control grows the step less,
    # so on this smooth, slowly varying problem it never takes fewer steps.
    assert int(pi.stats.n_steps) > int(integral.stats.n_steps)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(("t_end", "steps"), [(1.001, 4), (1.0025, 4), (1.003, 5), (1.2, 5)])
def test_the_last_step_stretches_by_at_most_one_percent(
    batched: bool, t_end: float, steps: int
) -> None:
    """Constant steps of 0.25 (``ifactor=1`` and a loose tolerance keep the proposal at 0.25):
    a remainder up to 0.2525 is one step; beyond it, one more step."""
    y0 = torch.ones(2, 1, dtype=F64) if batched else torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, t_end], dtype=F64)
    sol = neuralode.solve(
        lambda t, y: -y, y0, t, first_step=0.25, ifactor=1.0, rtol=1e6, atol=1e6,
        batched=batched,
    )  # fmt: skip
    assert int(sol.stats.n_steps.reshape(-1)[0]) == steps
    assert float(sol.t_end.reshape(-1)[0]) == t_end


def test_adjoint_norms_cover_the_right_channels() -> None:
    """The backward state is ``[y, a, g]``; each norm is checked on an error in one part only."""
    from neuralode.gradients.adjoint import _Augmented

    params = (torch.zeros(4, dtype=F64, requires_grad=True),)
    ys = torch.zeros(3, 2, dtype=F64)
    aug = _Augmented(lambda t, y: y, params, False, ys, torch.arange(3.0, dtype=F64), None)
    n_y = 2

    def err(part: str) -> torch.Tensor:
        x = torch.full((2 * n_y + 4,), 1e-3, dtype=F64)
        lo, hi = {"y": (0, n_y), "a": (n_y, 2 * n_y), "g": (2 * n_y, 2 * n_y + 4)}[part]
        x[lo:hi] = 5.0
        return x

    semi, full, mx = aug.norm("seminorm"), aug.norm("rms"), aug.norm("max")
    assert float(semi(err("y"), (0,))) == pytest.approx(5.0)
    assert float(semi(err("a"), (0,))) == pytest.approx(5.0)
    assert float(semi(err("g"), (0,))) == pytest.approx(1e-3)  # left out
    for part in ("y", "a", "g"):
        assert float(full(err(part), (0,))) == pytest.approx(5.0)
        assert float(mx(err(part), (0,))) == 5.0
    mixed = err("y")
    mixed[n_y : 2 * n_y] = torch.tensor([3.0, 4.0], dtype=F64)  # RMS of the a part: 3.54
    assert float(semi(mixed, (0,))) == pytest.approx(5.0)  # the largest part's RMS


# -- the initial step against scipy's implementation of the same algorithm ---------------------
def _scipy_initial_step(
    f, y0: np.ndarray, rtol: float, atol: float, order: int, t0: float = 0.0
) -> float:
    common = pytest.importorskip("scipy.integrate._ivp.common", reason="needs scipy (dev extra)")
    f0 = f(t0, y0)
    return float(common.select_initial_step(f, t0, y0, 1e9, np.inf, f0, 1, order, rtol, atol))


INITIAL_CASES = {
    # name: (numpy field, y0): ordinary, tiny state (d0 < 1e-5), zero field (d1 = d2 = 0),
    # tiny field (d1 < 1e-5) and a fast field.
    "decay": (lambda t, y: -0.5 * y + np.sin(t), [1.0, -2.0, 0.5]),
    "tiny_state": (lambda t, y: np.cos(t) * np.ones_like(y), [1e-12, -2e-13]),
    "zero_field": (lambda t, y: 0.0 * y, [3.0, 1.0]),
    "tiny_field": (lambda t, y: 1e-9 * np.ones_like(y), [1.0, 2.0]),
    "fast": (lambda t, y: -300.0 * y + 40.0 * np.cos(50 * t), [2.0, -1.0]),
    # Nonlinear and not even in t: the probe's direction (forward) shows in d2, which dominates.
    "quadratic": (lambda t, y: y**2 + np.sin(3 * t + 0.2), [1.5, 3.0]),
    # A slow field: at rtol = atol = 1e-3, 1e-5 <= d1 < 1 (the first guess is 0.01 * d0 / d1).
    "slow": (lambda t, y: 1e-4 * (np.cos(t) - y), [1.0, 2.0]),
}


@pytest.mark.parametrize("order", [2, 4, 7])
@pytest.mark.parametrize(("rtol", "atol"), [(1e-6, 1e-8), (1e-3, 1e-3), (1e-9, 0.0)])
@pytest.mark.parametrize("case", sorted(INITIAL_CASES))
def test_initial_step_is_hairers_as_scipy_computes_it(
    case: str, rtol: float, atol: float, order: int
) -> None:
    f_np, y0 = INITIAL_CASES[case]
    y0_np = np.array(y0, dtype=np.float64)
    want = _scipy_initial_step(f_np, y0_np, rtol, atol, order)
    ctrl = PIController(rtol=rtol, atol=atol, norm=rms_norm, dims=(0,), error_order=order)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(f_np(float(t), y.numpy()), dtype=F64)

    y = torch.tensor(y0, dtype=F64)
    t0 = torch.tensor(0.0, dtype=F64)
    got = ctrl.initial_step(f, t0, y, f(t0, y))
    assert got.dtype == F64 and got.shape == ()
    assert float(got) == pytest.approx(want, rel=1e-12)
    # Per row: a batch of the same problem gives each row that step.
    ctrl_b = PIController(rtol=rtol, atol=atol, norm=rms_norm, dims=(1,), error_order=order)
    rows = ctrl_b.initial_step(
        lambda t, yb: torch.stack([f(ti, yi) for ti, yi in zip(t, yb)]),
        t0.expand(3),
        y.expand(3, -1),
        f(t0, y).expand(3, -1),
    )
    assert rows.shape == (3,)
    torch.testing.assert_close(rows, got.expand(3), rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", sorted(INITIAL_CASES))
def test_initial_step_away_from_time_zero_is_scipys(case: str) -> None:
    """From ``t0 = 2.5`` too (the step's floor of 100 ulps of ``t0``, 5.6e-14 there, is far
    below every case's step)."""
    f_np, y0 = INITIAL_CASES[case]
    want = _scipy_initial_step(f_np, np.array(y0, dtype=np.float64), 1e-6, 1e-8, 4, t0=2.5)
    ctrl = PIController(rtol=1e-6, atol=1e-8, norm=rms_norm, dims=(0,), error_order=4)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(f_np(float(t), y.numpy()), dtype=F64)

    y, t0 = torch.tensor(y0, dtype=F64), torch.tensor(2.5, dtype=F64)
    assert float(ctrl.initial_step(f, t0, y, f(t0, y))) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("t_dtype", "y_dtype"), [(torch.float32, F64), (F64, torch.float32)])
def test_initial_step_is_in_the_times_dtype(t_dtype, y_dtype) -> None:
    """The step is in ``t0``'s dtype, whatever the state's (its norms are in the state's):
    float64 times with a float32 state, and float32 times with a float64 state."""
    ctrl = PIController(rtol=1e-3, atol=1e-3, norm=rms_norm, dims=(0,), error_order=4)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(y)  # 100 h0 (1e-4) is below Hairer's second guess (0.1)

    y = torch.full((2,), 1e-4, dtype=y_dtype)
    t0 = torch.tensor(0.0, dtype=t_dtype)
    h = ctrl.initial_step(f, t0, y, f(t0, y))
    assert h.dtype == t_dtype
    assert float(h) == pytest.approx(1e-4, rel=1e-6)  # 100 h0 = 100 * 0.01 d0 / d1 = |y0|


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_initial_step_is_at_least_100_ulps_of_t0(dtype) -> None:
    """Far from ``t = 0`` a step below the clock's resolution would fail at once: Hairer's
    step (about 1e-13 for a field of rate 1e13) is raised to 100 eps |t0| exactly, 2.2e-11 at
    ``t0 = 1000`` in float64 (1.2e-2 in float32); at ``t0 = 0`` it stays as it is."""
    ctrl = PIController(rtol=1e-6, atol=1e-6, norm=rms_norm, dims=(0,), error_order=4)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -1e13 * y

    y = torch.ones(2, dtype=dtype)
    t0 = torch.tensor(1000.0, dtype=dtype)
    floor = torch.tensor(100 * torch.finfo(dtype).eps, dtype=dtype) * 1000.0
    assert float(ctrl.initial_step(f, t0, y, f(t0, y))) == float(floor)
    at_zero = float(ctrl.initial_step(f, 0 * t0, y, f(0 * t0, y)))
    assert 0 < at_zero < 1e-12


@pytest.mark.parametrize(
    "case",
    [
        # d0 = 1e-5 exactly (not "small": scipy's and Hairer's test is d0 < 1e-5)
        (lambda t, y: 1.0 + 50.0 * y + t, [1e-5]),
        # d1 = 1e-5 exactly
        (lambda t, y: 1e-5 + 0.0 * y, [1.0]),
        (lambda t, y: 1e-5 + 1e-3 * (y - 1.0) ** 2, [1.0]),
        # max(d1, d2) = 1e-15 exactly: the "no information" fallback applies (<=)
        (lambda t, y: 1e-15 + 0.0 * y, [1.0]),
    ],
)
def test_initial_step_at_the_small_norm_thresholds(case) -> None:
    """At atol = 1, rtol = 0 the norms d0 = |y0| and d1 = |f0| equal the thresholds exactly."""
    f_np, y0 = case
    want = _scipy_initial_step(f_np, np.array(y0), 0.0, 1.0, 4)
    ctrl = PIController(rtol=0.0, atol=1.0, norm=rms_norm, dims=(0,), error_order=4)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(f_np(float(t), y.numpy()), dtype=F64)

    y = torch.tensor(y0, dtype=F64)
    t0 = torch.tensor(0.0, dtype=F64)
    assert float(ctrl.initial_step(f, t0, y, f(t0, y))) == pytest.approx(want, rel=1e-12)


def test_controller_starts_with_no_history() -> None:
    """Before the first step: no previous error (err_prev = 1, so PI control starts as integral
    control) and no rejection."""
    ctrl = PIController(rtol=1e-6, atol=1e-9, norm=rms_norm, dims=(1,), error_order=4, beta=0.1)
    state = ctrl.init(torch.zeros(3, dtype=F64))
    assert torch.equal(state.prev_ratio, torch.ones(3, dtype=F64))
    assert state.rejected_last.dtype == torch.bool and not bool(state.rejected_last.any())
    assert ctrl.init_float() == (1.0, False)


def test_adapt_computes_in_the_time_dtype() -> None:
    """A float32 error ratio (a float32 state) is controlled in float64, the time dtype."""
    ctrl = PIController(rtol=1e-6, atol=1e-9, norm=rms_norm, dims=(0,), error_order=4)
    state = ctrl.init(torch.zeros((), dtype=F64))
    r = torch.tensor(0.3, dtype=torch.float32)
    _, h32, _ = ctrl.adapt(r, torch.tensor(0.1, dtype=F64), state)
    _, h64, _ = ctrl.adapt(r.double(), torch.tensor(0.1, dtype=F64), state)
    assert h32.dtype == F64 and torch.equal(h32, h64)


@pytest.mark.filterwarnings("error")  # no deprecated transpose of a 1-D grid, either
@pytest.mark.parametrize(
    ("span", "steps"),
    [(0.3 * 3, 3), (0.3 * 3.005, 3), (0.3 * 3.0099, 3), (0.3 * 3.02, 4), (0.3 * 0.5, 1)],
)
def test_fixed_grid_stretches_the_last_step_by_at_most_one_percent(span: float, steps: int) -> None:
    s = torch.tensor([[1.0, 1.0 + span], [2.0, 2.0 + 0.3 * 1.5]], dtype=F64)
    grid = FixedGrid(s, 0.3)
    assert grid.n_steps.tolist() == [steps, 2]
    assert grid.n == max(steps, 2)
    assert grid.times.shape == (max(steps, 2) + 1, 2)
    assert float(grid.times[-1, 0]) == 1.0 + span and float(grid.times[-1, 1]) == 2.45
    assert torch.equal(grid.times[0], s[:, 0])
    torch.testing.assert_close(grid.steps[: steps - 1, 0], torch.full((steps - 1,), 0.3, dtype=F64))
    assert bool((grid.steps[steps:, 0] == 0).all()) and bool((grid.steps[2:, 1] == 0).all())
    assert grid.n_steps.dtype == torch.long
    one = FixedGrid(s[0], 0.3)
    assert torch.equal(one.times, grid.times[: steps + 1, 0]) and one.n_steps.shape == ()
    per_output = FixedGrid(s, None)  # one step per output interval
    assert torch.equal(per_output.times, s.T) and per_output.n_steps.tolist() == [1, 1]
    assert per_output.n_steps.dtype == torch.long
    three = FixedGrid(torch.tensor([0.0, 0.5, 0.7, 2.0], dtype=F64), None)
    assert int(three.n_steps) == 3 and three.n == 3


def test_initial_step_of_a_float32_state_is_in_the_time_dtype() -> None:
    f_np, y0 = INITIAL_CASES["quadratic"]
    ctrl = PIController(rtol=1e-5, atol=1e-7, norm=rms_norm, dims=(0,), error_order=4)

    t0 = torch.tensor(0.0, dtype=F64)
    h = {}
    for dtype in (torch.float32, F64):

        def f(t: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = dtype) -> torch.Tensor:
            # A float32 network would fail on a float64 probe: the field sees the state's dtype.
            assert t.dtype == y.dtype == dtype, (t.dtype, y.dtype)
            return torch.as_tensor(f_np(float(t), y.double().numpy()), dtype=dtype)

        y = torch.tensor(y0, dtype=dtype)
        h[dtype] = ctrl.initial_step(f, t0, y, f(t0.to(dtype), y))
    assert h[torch.float32].dtype == F64
    assert float(h[torch.float32]) == pytest.approx(float(h[F64]), rel=1e-5)


# --------------------------------------------------------------------------- min_step, max_step
@pytest.mark.parametrize("batched", [False, True])
def test_max_step_bounds_every_step(batched: bool) -> None:
    # y' = -y over [0, 1]: unbounded, dopri5 takes a handful of steps; max_step = 0.01 makes
    # them exactly 100 (the proposal grows to the bound and stays there).
    y0 = torch.ones(3, 2, dtype=torch.float64) if batched else torch.ones(2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    free = neuralode.solve(lambda t, y: -y, y0, t, batched=batched)
    bounded = neuralode.solve(lambda t, y: -y, y0, t, batched=batched, max_step=0.01, dense=True)
    assert int(free.stats.n_steps.max()) < 20
    assert bounded.stats.n_steps.tolist() == ([100] * 3 if batched else 100)
    assert int(bounded.stats.n_rejected.sum()) == 0
    # every step of the dense record is at most max_step
    grid = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    want = torch.exp(-grid).unsqueeze(-1)
    got = bounded.evaluate(grid)
    torch.testing.assert_close(got[0] if batched else got, want.expand(1001, 2), rtol=1e-9, atol=0)
    # the first step too: Hairer's initial step is clamped
    one = neuralode.solve(lambda t, y: -y, y0, torch.tensor([0.0, 0.005], dtype=torch.float64),
                          batched=batched, max_step=0.001)  # fmt: skip
    assert one.stats.n_steps.tolist() == ([5] * 3 if batched else 5)


@pytest.mark.parametrize(
    ("min_step", "max_step"), [(0.5, float("inf")), (2.0, float("inf")), (0.0, 1e-5), (0.0, 1e3)]
)
def test_initial_step_is_clamped_to_min_and_max_step(min_step: float, max_step: float) -> None:
    """Hairer's starting step (about 3e-3 here) is clamped into ``[min_step, max_step]``
    whichever bound is set: a lower bound below 1 as well as above it."""
    kw = {"rtol": 1e-6, "atol": 1e-6, "norm": rms_norm, "dims": (0,), "error_order": 4}

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y

    y, t0 = torch.ones(2, dtype=F64), torch.tensor(0.0, dtype=F64)
    plain = float(PIController(**kw).initial_step(f, t0, y, f(t0, y)))
    assert 1e-4 < plain < 0.1
    ctrl = PIController(**kw, min_step=min_step, max_step=max_step)
    assert float(ctrl.initial_step(f, t0, y, f(t0, y))) == min(max(plain, min_step), max_step)


@pytest.mark.parametrize("batched", [False, True])
def test_min_step_accepts_a_step_whatever_its_error(batched: bool) -> None:
    # At rtol = atol = 1e-12 dopri5 wants ~100 steps over [0, 2]; min_step = 0.5 forces steps
    # of 0.5, each accepted with an error far above the tolerance (as torchdiffeq does).
    y0 = torch.ones(2, 2, dtype=torch.float64) if batched else torch.ones(2, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    kw = dict(rtol=1e-12, atol=1e-12, batched=batched)
    sol = neuralode.solve(lambda t, y: -y, y0, t, min_step=0.5, first_step=0.5, **kw)
    assert sol.stats.n_steps.tolist() == ([4] * 2 if batched else 4)
    assert int(sol.stats.n_rejected.sum()) == 0
    err = float((sol.ys[..., -1, :] - torch.exp(torch.tensor(-2.0))).abs().max())
    assert 1e-8 < err < 1e-3  # accepted far outside the tolerance, still a 5th-order answer
    # a non-finite error is still rejected, and shrinks the step below min_step until the
    # solve reports the non-finite values where they start
    f_nan = lambda t, y: torch.where(t > 0.3, torch.nan, 1.0) * y  # noqa: E731
    bad = neuralode.solve(f_nan, y0, t, min_step=0.5, first_step=0.5, throw=False, **kw)
    assert (torch.as_tensor(bad.status) == neuralode.Status.NONFINITE).all()
    assert int(bad.stats.n_steps.max()) < 1000  # measured 243: no loop to max_num_steps
    torch.testing.assert_close(torch.as_tensor(bad.t_end), torch.full_like(
        torch.as_tensor(bad.t_end), 0.3), rtol=0, atol=1e-6)  # fmt: skip


def test_min_and_max_step_are_checked() -> None:
    y0, t = torch.ones(2), torch.tensor([0.0, 1.0])
    f = lambda t, y: -y  # noqa: E731
    for kw, says in (
        ({"min_step": -1.0}, r"min_step must be finite and >= 0"),
        ({"max_step": 0.0}, r"max_step must be > 0 and >= min_step"),
        ({"min_step": 0.5, "max_step": 0.1}, r"max_step must be > 0 and >= min_step \(0.5\)"),
        ({"max_step": 0.1, "method": "rk4"}, r"min_step/max_step apply to adaptive methods"),
        ({"max_step": 0.1, "first_step": 0.5}, r"first_step \(0.5\) must lie in \[min_step"),
    ):
        with pytest.raises(ValueError, match=says):
            neuralode.solve(f, y0, t, **kw)
    with pytest.raises(TypeError, match=r"max_step must be a number of time units"):
        neuralode.solve(f, y0, t, max_step="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"adjoint_options\['max_step'\] must be > 0"):
        neuralode.solve(f, y0, t, gradient="adjoint", adjoint_params=(),
                        adjoint_options={"max_step": -1.0})  # fmt: skip


def test_max_step_reaches_the_backward_solve() -> None:
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y0, t = torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = neuralode.solve(lambda t, y: -w * y, y0, t, gradient="adjoint", adjoint_params=(w,),
                          adjoint_options={"max_step": 0.02})  # fmt: skip
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), (w,))
    # 50 steps of 0.02, and Hairer's shorter first step (clamped to 0.02 too)
    assert sol.backward_stats is not None and 50 <= int(sol.backward_stats.n_steps) <= 51
    torch.testing.assert_close(g, -2 * torch.exp(-w.detach()), rtol=1e-7, atol=0)


@pytest.mark.parametrize("batched", [False, True])
def test_a_starting_step_below_the_clocks_resolution_is_raised_to_it(batched: bool) -> None:
    """y' = 1 from t0 = 1000 with y0 = 1e-12: Hairer's selection gives 1e-12, below what the
    clock resolves there (2.2e-12); it failed with a step-size underflow at once, where scipy
    (which raises its first step to its minimum step) reaches y(1001) = 1 (found in review)."""
    y0 = torch.tensor([[1e-12]] if batched else [1e-12], dtype=F64)
    sol = neuralode.solve(
        lambda t, y: torch.ones_like(y),
        y0,
        torch.tensor([1000.0, 1001.0], dtype=F64),
        batched=batched,
    )
    assert sol.success
    assert float(sol.ys[..., -1, 0] if batched else sol.ys[-1, 0]) == pytest.approx(1.0, rel=1e-9)
