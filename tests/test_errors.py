"""Every bad input and every failed solve gives an error that names the problem and what to do.

What this proves: each user mistake in the list below raises ``ValueError``/``TypeError`` (never
an ``assert``, never a deep torch error) whose message names the argument and what was expected;
each solver failure raises :class:`neuralode.SolverError` naming the time where it happened and
carrying the :class:`Solution`, or with ``throw=False`` is reported per sample in
``Solution.status`` while the other samples of the batch are unaffected.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import ADAPTIVE, FIXED

import neuralode
from neuralode import SolverError, Status

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)
Y0 = torch.ones(2, dtype=F64)


def decay(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -y


def square(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y' = y^2``: from ``y0 = 1`` the solution ``1 / (1 - t)`` blows up at ``t = 1``."""
    return y**2


def nan_from_half(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y' = -y`` that turns NaN from ``t = 0.5`` on (a vector field that breaks mid-solve)."""
    return torch.where(t >= 0.5, torch.nan, -1.0) * y


def _time_in(message: str) -> float:
    m = re.search(r"t=([-+0-9.eE]+)", message)
    assert m, f"no time in {message!r}"
    return float(m.group(1))


# --------------------------------------------------------------------------- time grid
@pytest.mark.parametrize(
    "t",
    [[0.0, 1.0, 0.5], [1.0, 0.0, 0.5], [0.0, 1.0, 1.0]],
    ids=["non-monotonic", "direction-change", "repeated"],
)
def test_t_must_be_strictly_monotonic(t: list[float]) -> None:
    with pytest.raises(ValueError, match=r"t must be strictly increasing or strictly decreasing"):
        neuralode.odeint(decay, Y0, torch.tensor(t, dtype=F64))


def test_repeated_time_message_says_repeated() -> None:
    with pytest.raises(ValueError, match="repeated"):
        neuralode.odeint(decay, Y0, torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=F64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_t_must_be_finite(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^t contains NaN or Inf.*finite"):
        neuralode.odeint(decay, Y0, torch.tensor([0.0, 0.5, bad], dtype=F64))


def test_per_sample_grid_row_is_named() -> None:
    t = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"strictly.*\(row 1\)"):
        neuralode.solve(decay, torch.ones(2, 2, dtype=F64), t)


def test_odeint_rejects_2d_t_and_points_to_solve() -> None:
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=F64)
    with pytest.raises(
        ValueError, match=r"t must be 1-D \[T\] for odeint, got shape \(2, 2\).*solve"
    ):
        neuralode.odeint(decay, torch.ones(2, 2, dtype=F64), t)


def test_per_sample_grids_must_match_batch_size() -> None:
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"t has 2 rows .* y0 has batch size 3"):
        neuralode.solve(decay, torch.ones(3, 2, dtype=F64), t)


def test_2d_t_with_batched_false_is_an_error() -> None:
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"needs batched=True"):
        neuralode.solve(decay, torch.ones(2, 2, dtype=F64), t, batched=False)


def test_empty_t() -> None:
    with pytest.raises(ValueError, match=r"t must hold at least one time"):
        neuralode.odeint(decay, Y0, torch.tensor([], dtype=F64))


# --------------------------------------------------------------------------- initial state
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_y0_must_be_finite(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^y0 contains NaN or Inf.*must be finite"):
        neuralode.odeint(decay, torch.tensor([1.0, bad], dtype=F64), T01)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_y0_must_be_floating(dtype: torch.dtype) -> None:  # (complex states: test_complex.py)
    with pytest.raises(TypeError, match=rf"y0 must be a floating-point tensor, got dtype {dtype}"):
        neuralode.odeint(decay, torch.ones(2, dtype=dtype), T01)


@pytest.mark.parametrize("y0", [1.0, [1.0, 2.0]], ids=["float", "list-of-floats"])
def test_y0_must_be_a_tensor(y0: object) -> None:
    with pytest.raises(TypeError, match=r"y0(\[0\])? must be a torch.Tensor, got float"):
        neuralode.odeint(decay, y0, T01)  # type: ignore[arg-type]


def test_tuple_y0_must_share_dtype() -> None:
    y0 = (torch.ones(2, dtype=torch.float32), torch.ones(3, dtype=F64))
    with pytest.raises(TypeError, match=r"share one dtype.*y0\[1\] is torch.float64"):
        neuralode.odeint(lambda t, y: (-y[0], -y[1]), y0, T01)


def test_empty_y0() -> None:
    with pytest.raises(ValueError, match=r"y0 is empty"):
        neuralode.odeint(decay, torch.ones(0, dtype=F64), T01)


# --------------------------------------------------------------------------- vector field
def test_func_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"func must be callable"):
        neuralode.odeint(None, Y0, T01)  # type: ignore[arg-type]


def test_func_wrong_shape_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\) but the state has shape \(2,\)"):
        neuralode.odeint(lambda t, y: y.unsqueeze(-1), Y0, T01)


def test_func_wrong_tuple_length() -> None:
    y0 = (torch.ones(2, dtype=F64), torch.ones(1, dtype=F64))
    with pytest.raises(ValueError, match=r"tuple of 2 tensors"):
        neuralode.odeint(lambda t, y: (-y[0],), y0, T01)


def test_func_returning_non_tensor() -> None:
    with pytest.raises(TypeError, match=r"func\(t, y\) must return a tensor, got list"):
        neuralode.odeint(lambda t, y: [0.0, 0.0], Y0, T01)


def test_func_nan_at_initial_time_names_the_time() -> None:
    t = torch.tensor([0.75, 2.0], dtype=F64)
    with pytest.raises(ValueError, match=r"NaN or Inf at the initial time t=0\.75"):
        neuralode.odeint(lambda t, y: y * torch.nan, Y0, t)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_func_nan_mid_solve_adaptive(method: str) -> None:
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    with pytest.raises(SolverError, match=r"NaN or Inf") as info:
        neuralode.odeint(nan_from_half, Y0, t, method=method)
    assert _time_in(str(info.value)) == pytest.approx(0.5, abs=1e-3)
    assert info.value.solution is not None
    sol = neuralode.solve(nan_from_half, Y0, t, method=method, throw=False)
    assert int(sol.status) == Status.NONFINITE
    assert float(sol.t_end) == pytest.approx(0.5, abs=1e-3)
    torch.testing.assert_close(sol.ys[1], torch.exp(-t[1]).expand(2), rtol=1e-5, atol=1e-7)
    assert torch.isnan(sol.ys[2]).all()


def test_a_failed_solve_of_a_wide_state_keeps_every_output_row() -> None:
    """A state of more components (8) than output times (3), unbatched: the outputs after the
    failure are rows of NaN, and there are still 3 of them."""
    y0 = torch.ones(8, dtype=F64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    sol = neuralode.solve(nan_from_half, y0, t, throw=False)
    assert sol.ys.shape == (3, 8) and int(sol.status) == Status.NONFINITE
    torch.testing.assert_close(sol.ys[1], torch.exp(-t[1]).expand(8), rtol=1e-5, atol=1e-7)
    assert torch.isnan(sol.ys[2]).all()


@pytest.mark.parametrize("method", FIXED)
def test_func_nan_mid_solve_fixed(method: str) -> None:
    # Fixed-step methods have no error estimate; the NaN is caught in the outputs and reported
    # at the first output time that holds it: within one output interval after t = 0.5.
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    sol = neuralode.solve(nan_from_half, Y0, t, method=method, step_size=0.05, throw=False)
    assert int(sol.status) == Status.NONFINITE
    assert 0.5 <= float(sol.t_end) <= 0.6 + 1e-12
    assert torch.isfinite(sol.ys[:5]).all()
    with pytest.raises(SolverError, match=r"NaN or Inf") as info:
        neuralode.solve(nan_from_half, Y0, t, method=method, step_size=0.05)
    assert 0.5 <= _time_in(str(info.value)) <= 0.6 + 1e-12


def test_fixed_step_output_on_grid_point_before_nan_is_the_grid_state() -> None:
    # Euler with h = 0.05 and a field that is NaN from t = 0.5 on: the Euler state at the grid
    # point t = 0.5 uses only f(0.45, .), so it is finite and equals 0.95 ** 10.
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    sol = neuralode.solve(nan_from_half, Y0, t, method="euler", step_size=0.05, throw=False)
    torch.testing.assert_close(sol.ys[5], torch.full((2,), 0.95**10, dtype=F64))


# --------------------------------------------------------------------------- solver failures
@pytest.mark.parametrize("method", ADAPTIVE)
def test_step_size_underflow_at_blow_up(method: str) -> None:
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    # Fehlberg's 1(2) pair underestimates its error badly (its first-order solution is nearly
    # the midpoint rule's): at rtol 1e-3 it is 6% off at t = 0.5 (torchdiffeq's fehlberg2 too,
    # 1.91 for 2) and meets the pole late.
    rtol = 1e-6 if method == "fehlberg2" else 1e-3
    # An implicit method may stop on its Newton iteration instead, near the pole (kvaerno5).
    why = r"step size fell below|Newton iteration did not converge"
    with pytest.raises(SolverError, match=why) as info:
        neuralode.solve(square, y0, t, method=method, rtol=rtol, atol=1e-6)
    sol = info.value.solution
    assert sol is not None
    implicit = method in ("kvaerno3", "kvaerno5")
    assert int(sol.status) == Status.STEP_SIZE_UNDERFLOW or (
        implicit and int(sol.status) == Status.NEWTON_FAILED
    )
    assert float(sol.t_end) == pytest.approx(1.0, abs=1e-2)
    assert _time_in(str(info.value)) == pytest.approx(1.0, abs=1e-2)
    torch.testing.assert_close(sol.ys[1], torch.tensor([2.0], dtype=F64), rtol=1e-2, atol=0)
    assert torch.isnan(sol.ys[2]).all()


def test_step_size_underflow_at_blow_up_default_tolerances() -> None:
    with pytest.raises(SolverError, match=r"step size") as info:
        neuralode.odeint(square, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64))
    sol = info.value.solution
    assert sol is not None
    assert float(sol.t_end) == pytest.approx(1.0, abs=1e-6)
    assert int(sol.status) == Status.STEP_SIZE_UNDERFLOW


@pytest.mark.parametrize("shape", [(2,), (2, 1), (2, 1, 1)])
def test_step_size_underflow_of_some_rows_with_any_state_shape(shape: tuple[int, ...]) -> None:
    """A batched solve whose state is one number per row (``[rows]``, no feature dimension)
    reports a row's underflow as a status as ``[rows, 1]`` does; it raised an IndexError while
    classifying the failed row (finite or not)."""
    y0 = torch.tensor([1.0, 0.25], dtype=F64).view(shape)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    sol = neuralode.solve(square, y0, t, batched=True, throw=False)
    assert sol.status.tolist() == [Status.STEP_SIZE_UNDERFLOW, Status.SUCCESS]
    assert float(sol.t_end[0]) == pytest.approx(1.0, abs=1e-6) and float(sol.t_end[1]) == 2.0
    torch.testing.assert_close(sol.ys[1, -1].reshape(()), torch.tensor(0.5, dtype=F64))


@pytest.mark.parametrize("batched", [False, True])
def test_the_smallest_step_is_ten_ulps_of_the_clock(batched: bool) -> None:
    """A step, or the next one proposed, of 10 ulps of ``t`` or less makes no progress: a
    ``max_step`` of 9.5 ulps stops at the first step, one of 10.5 ulps goes on to the end, and
    so does a first step of 10.5 ulps, not one of 10 (the float driver and the batched one)."""
    eps = torch.finfo(F64).eps
    y0 = torch.ones(2, 2, dtype=F64) if batched else torch.ones(2, dtype=F64)
    t = torch.tensor([1.0, 1.0 + 2000 * eps], dtype=F64)
    kw = {"method": "dopri5", "throw": False, "batched": batched}
    small = neuralode.solve(decay, y0, t, max_step=9.5 * eps, **kw)
    assert (small.status == Status.STEP_SIZE_UNDERFLOW).all()
    assert (small.stats.n_steps == 1).all()
    enough = neuralode.solve(decay, y0, t, max_step=10.5 * eps, **kw)
    assert (enough.status == Status.SUCCESS).all()
    assert (enough.stats.n_steps == 200).all()  # 2000 ulps of t = 1 in steps of 10.5 of them
    # A first step of exactly 10 ulps is the limit: it stops, though the next would be larger.
    first = neuralode.solve(decay, y0, t, first_step=10 * eps, **kw)
    assert (first.status == Status.STEP_SIZE_UNDERFLOW).all()
    assert (first.stats.n_steps == 1).all()
    more = neuralode.solve(decay, y0, t, first_step=10.5 * eps, **kw)
    assert (more.status == Status.SUCCESS).all()


class _TurnsAtZero(torch.nn.Module):
    """``y' = -y`` up to ``t = 0``, then 1e40: a step across 0 fails its error test at any size
    a float64 clock can take; records the steps it rejected."""

    def __init__(self) -> None:
        super().__init__()
        self.rejected: list[float] = []

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.unsqueeze(-1) if y.ndim > 1 and t.ndim == 1 else t
        return torch.where(tt <= 0, -y, 1e40 * torch.ones_like(y))

    def callback_reject_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        self.rejected.append(float(dt))


@pytest.mark.parametrize("t1", [1.0, 1e6])
def test_a_row_that_fails_at_t_zero_stops_at_eps_squared_of_its_span(t1: float) -> None:
    """Near ``t = 0`` the smallest step is not 10 ulps of ``t`` (which is zero there) but 10 ulps
    of a floor, ``eps`` times the span ``|t1 - t0|``: a row that lands on 0 (``step_t``) where
    the field turns to 1e40 rejects its steps down to ``10 eps^2 |t1 - t0|`` and stops there,
    at ``t = 0`` (its last rejected step above that, within the controller's factor of it),
    rather than shrinking its step to 1e-48 and going on.  The batched driver takes the same
    steps.  (A floor from ``|t1 + t0|``, zero on ``[-1, 1]``, went on; one of ``eps / span``
    stopped a million times too late on the longer span.)"""
    eps = torch.finfo(F64).eps
    t = torch.tensor([-1.0, t1], dtype=F64)
    f = _TurnsAtZero()
    sol = neuralode.solve(
        f, torch.ones(2, dtype=F64), t, method="dopri5", step_t=[0.0], throw=False
    )
    assert int(sol.status) == Status.STEP_SIZE_UNDERFLOW and float(sol.t_end) == 0.0
    limit = 10 * eps * eps * (t1 + 1.0)
    assert limit < min(f.rejected) < 10 * limit
    rows = neuralode.solve(
        f.forward, torch.ones(2, 2, dtype=F64), t, method="dopri5", step_t=[0.0], throw=False,
        batched=True,
    )  # fmt: skip
    assert (rows.status == Status.STEP_SIZE_UNDERFLOW).all() and (rows.t_end == 0.0).all()
    assert rows.stats.n_steps.tolist() == [int(sol.stats.n_steps)] * 2


def test_max_num_steps_says_how_to_raise_it() -> None:
    with pytest.raises(SolverError, match=r"max_num_steps") as info:
        neuralode.odeint(
            decay, Y0, torch.tensor([0.0, 10.0], dtype=F64), options={"max_num_steps": 3}
        )
    sol = info.value.solution
    assert sol is not None and int(sol.status) == Status.MAX_STEPS_REACHED
    assert int(sol.stats.n_steps) == 3
    assert 0 < float(sol.t_end) < 10


# --------------------------------------------------------------------------- method and options
def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'rk45'") as info:
        neuralode.odeint(decay, Y0, T01, method="rk45")
    for name in neuralode.METHODS:
        assert name in str(info.value)


def test_unknown_option_lists_the_known_ones() -> None:
    # odeint warns, as torchdiffeq does (tests/test_compat.py); the message lists the known keys
    with pytest.warns(UserWarning, match=r"unexpected option\(s\) \['stepsize'\]") as info:
        neuralode.odeint(decay, Y0, T01, options={"stepsize": 0.1})
    for key in neuralode.ODE_OPTIONS:
        assert key in str(info[0].message)


def test_options_must_be_a_dict() -> None:
    with pytest.raises(TypeError, match=r"options must be a dict"):
        neuralode.odeint(decay, Y0, T01, options=[("step_size", 0.1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rtol": 0.0}, r"rtol must be a finite positive number, got 0"),
        ({"rtol": -1e-6}, r"rtol must be a finite positive number"),
        ({"rtol": math.nan}, r"rtol must be a finite positive number, got nan"),
        ({"rtol": math.inf}, r"rtol must be a finite positive number, got inf"),
        ({"atol": -1e-9}, r"atol must be a finite non-negative number"),
        ({"atol": math.nan}, r"atol must be a finite non-negative number, got nan"),
        ({"atol": torch.tensor([1e-9, math.nan])}, r"atol must be finite and non-negative"),
        ({"rtol": torch.tensor([1e-6, 0.0])}, r"rtol must be finite and positive"),
    ],
    ids=[
        "rtol-zero",
        "rtol-neg",
        "rtol-nan",
        "rtol-inf",
        "atol-neg",
        "atol-nan",
        "atol-tensor-nan",
        "rtol-tensor-zero",
    ],
)
def test_bad_tolerances(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        neuralode.odeint(decay, Y0, T01, **kwargs)


@pytest.mark.parametrize("gradient", ["backprop", "adjoint", "checkpoint"])
def test_bad_tolerance_is_named_under_every_gradient_strategy(gradient: str) -> None:
    """The tolerances are checked before any strategy uses them (the adjoint once passed a
    string tolerance to torch, which said ``new(): invalid data type 'str'``)."""
    kw = {} if gradient == "backprop" else {"adjoint_params": ()}
    with pytest.raises(TypeError, match=r"rtol must be a number or a tensor, got str"):
        neuralode.solve(decay, Y0, T01, rtol="1e-6", gradient=gradient, **kw)  # type: ignore
    with pytest.raises(ValueError, match=r"atol must be a finite non-negative number"):
        neuralode.solve(decay, Y0, T01, atol=-1.0, gradient=gradient, **kw)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"adjoint_rtol": "1e-6"}, TypeError, r"adjoint_rtol must be a number .*got str"),
        ({"adjoint_atol": -1.0}, ValueError, r"adjoint_atol must be a finite non-negative"),
        ({"adjoint_rtol": 0.0}, ValueError, r"adjoint_rtol must be a finite positive number"),
        (
            {"adjoint_options": {"max_num_steps": 0}},
            ValueError,
            r"adjoint_options\['max_num_steps'\] must be a positive integer",
        ),
        (
            {"adjoint_options": {"step_size": 0.1}},
            ValueError,
            r"adjoint_options\['step_size'\] applies to fixed-step methods",
        ),
        ({"adjoint_options": {"dtype": "float64"}}, TypeError, r"adjoint_options\['dtype'\]"),
        ({"adjoint_options": [("norm", "rms")]}, TypeError, r"adjoint_options must be a dict"),
    ],
    ids=["rtol-str", "atol-neg", "rtol-zero", "max-steps", "step-size", "dtype", "not-dict"],
)
def test_bad_adjoint_arguments_are_named(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        neuralode.solve(decay, Y0, T01, gradient="adjoint", adjoint_params=(), **kwargs)


def test_per_component_tolerance_of_wrong_shape() -> None:
    with pytest.raises(
        ValueError,
        match=r"atol of shape \(3,\) does not broadcast to the state "
        r"shape \(2,\)",
    ):
        neuralode.odeint(decay, Y0, T01, atol=torch.full((3,), 1e-9))


def test_per_component_tolerances_per_tuple_part() -> None:
    y0 = (torch.ones(2, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"rtol must be a number or one tensor per tensor of y0"):
        neuralode.odeint(lambda t, y: (-y[0], -y[1]), y0, T01, rtol=torch.full((2,), 1e-6))


def test_zero_atol_is_allowed() -> None:
    ys = neuralode.odeint(decay, Y0, T01, atol=0.0)
    torch.testing.assert_close(ys[-1], torch.exp(-T01[-1]).expand(2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_step_size_with_adaptive_method(method: str) -> None:
    with pytest.raises(ValueError, match=rf"step_size applies to fixed-step methods; '{method}'"):
        neuralode.solve(decay, Y0, T01, method=method, step_size=0.1)


@pytest.mark.parametrize("method", FIXED)
def test_first_step_with_fixed_method(method: str) -> None:
    with pytest.raises(ValueError, match=rf"first_step applies to adaptive methods; '{method}'"):
        neuralode.solve(decay, Y0, T01, method=method, first_step=0.1)


@pytest.mark.parametrize("step", [0.0, -0.1, math.nan, math.inf])
def test_non_positive_step_size(step: float) -> None:
    with pytest.raises(ValueError, match=r"step_size must be a positive finite number"):
        neuralode.odeint(decay, Y0, T01, method="rk4", options={"step_size": step})


@pytest.mark.parametrize("step", [0.0, -0.1, math.nan, math.inf])
def test_non_positive_first_step(step: float) -> None:
    with pytest.raises(ValueError, match=r"first_step must be a positive finite number"):
        neuralode.odeint(decay, Y0, T01, options={"first_step": step})


def test_bad_norm_name_lists_the_norms() -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'l2'; known norms are \['max', 'rms'\]"):
        neuralode.odeint(decay, Y0, T01, options={"norm": "l2"})


@pytest.mark.parametrize(
    ("norm", "pattern"),
    [
        (len, r"norm must be callable as norm\(x, dims\).*raised TypeError"),
        (lambda x, dims: x.abs(), r"norm\(x, dims\) must return one value per row.*got \(2,\)"),
        (lambda x, dims: 1.0, r"norm\(x, dims\) must return one value per row.*got float"),
    ],
    ids=["wrong-signature", "not-reduced", "not-a-tensor"],
)
def test_callable_norm_is_checked_at_the_entry(norm: object, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        neuralode.solve(decay, Y0, T01, norm=norm)  # type: ignore[arg-type]


def test_norm_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"norm must be a name in .* or a callable, got 2"):
        neuralode.odeint(decay, Y0, T01, options={"norm": 2})


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("max_num_steps", 0, r"max_num_steps must be a positive integer, got 0"),
        ("max_num_steps", 1.5, r"max_num_steps must be a positive integer, got 1.5"),
        ("max_num_steps", True, r"max_num_steps must be a positive integer, got True"),
        ("safety", 1.5, r"safety must be in \(0, 1\]"),
        ("safety", math.nan, r"safety must be in \(0, 1\]"),
        ("ifactor", 0.5, r"ifactor must be a finite number >= 1"),
        ("dfactor", 0.0, r"dfactor must be in \(0, 1\]"),
    ],
)
def test_bad_controller_options(key: str, value: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        neuralode.odeint(decay, Y0, T01, options={key: value})


def test_time_dtype_must_be_floating() -> None:
    with pytest.raises(TypeError, match=r"options\['dtype'\] \(the time dtype\) must be floating"):
        neuralode.odeint(decay, Y0, T01, options={"dtype": torch.int32})


def test_time_dtype_given_as_string() -> None:
    with pytest.raises(TypeError, match=r"dtype"):
        neuralode.odeint(decay, Y0, T01, options={"dtype": "float64"})


def test_non_numeric_controller_option_is_named() -> None:
    with pytest.raises(TypeError, match=r"safety"):
        neuralode.odeint(decay, Y0, T01, options={"safety": "a"})


# --------------------------------------------------------------------------- throw=False
def test_throw_false_reports_per_sample_status_in_a_batch() -> None:
    # Row 1 blows up at t = 1; rows 0 and 2 (blow-up at t = 10 and 5) are solved to t = 2.
    y0 = torch.tensor([[0.1], [1.0], [0.2]], dtype=F64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    sol = neuralode.solve(square, y0, t, batched=True, rtol=1e-6, atol=1e-9, throw=False)
    assert not sol.success
    assert sol.status.tolist() == [Status.SUCCESS, Status.STEP_SIZE_UNDERFLOW, Status.SUCCESS]
    exact = y0 / (1 - y0 * t)  # [3, 3] rows x times
    ok = [0, 2]
    torch.testing.assert_close(sol.ys[ok, :, 0], exact[ok], rtol=1e-5, atol=0)
    torch.testing.assert_close(sol.t_end[ok], t[-1].expand(2))
    torch.testing.assert_close(sol.ys[1, :2, 0], exact[1, :2], rtol=1e-5, atol=0)
    assert torch.isnan(sol.ys[1, 2]).all()
    assert float(sol.t_end[1]) == pytest.approx(1.0, abs=1e-3)
    assert sorted(sol.messages()) == sorted(
        [Status.SUCCESS.message, Status.STEP_SIZE_UNDERFLOW.message]
    )
    assert sol.stats.n_steps[0] < sol.stats.n_steps[1], "the failing row does not slow the others"

    with pytest.raises(SolverError, match=r"^sample 1 stopped at t=1.*\(1 of 3 samples failed\)"):
        neuralode.solve(square, y0, t, batched=True, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("status", [s for s in Status if not s.ok])
def test_status_messages_say_what_to_do(status: Status) -> None:
    msg = status.message
    assert msg.endswith(".")
    assert re.search(r"\b(Increase|increase|Check|check|loosen)\b", msg), msg


def test_max_steps_message_names_the_option() -> None:
    # Both spellings: solve's keywords (the messages named only odeint's options={...}, which
    # solve() refuses) and odeint's options.
    assert "max_num_steps=N (solve)" in Status.MAX_STEPS_REACHED.message
    assert "options={'max_num_steps': N} (odeint)" in Status.MAX_STEPS_REACHED.message
    assert "rtol/atol" in Status.STEP_SIZE_UNDERFLOW.message
    assert "t_dtype=torch.float64 in solve" in Status.STEP_SIZE_UNDERFLOW.message
    assert "time named in the error" in Status.NONFINITE.message


def test_solver_error_carries_the_status_message() -> None:
    with pytest.raises(SolverError) as info:
        neuralode.odeint(
            decay, Y0, torch.tensor([0.0, 10.0], dtype=F64), options={"max_num_steps": 2}
        )
    assert Status.MAX_STEPS_REACHED.message in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_each_row_of_a_batch_fails_for_its_own_reason() -> None:
    """Four rows, four outcomes, each the status the row gets when solved alone: success; a
    field that turns NaN (NONFINITE); a blow-up (STEP_SIZE_UNDERFLOW); a fast oscillation that
    runs out of steps (MAX_STEPS_REACHED)."""
    which = torch.arange(4, dtype=F64)

    def field(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor = which) -> torch.Tensor:
        w = rows.unsqueeze(-1) if rows.ndim else rows
        nan = torch.where((w == 1) & (t.unsqueeze(-1) >= 0.5), torch.nan, 1.0)
        return torch.where(
            w == 0,
            -y,
            torch.where(
                w == 1,
                -y * nan,
                torch.where(w == 2, y**2, 5000 * torch.cos(5000 * t).unsqueeze(-1)),
            ),
        )

    y0 = torch.tensor([[1.0], [1.0], [1.0], [0.0]], dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    kw = dict(rtol=1e-8, atol=1e-10, max_num_steps=1000, throw=False)
    sol = neuralode.solve(field, y0, t, batched=True, **kw)
    want = [Status.SUCCESS, Status.NONFINITE, Status.STEP_SIZE_UNDERFLOW, Status.MAX_STEPS_REACHED]
    assert sol.status.tolist() == [int(s) for s in want]
    for i in range(4):
        alone = neuralode.solve(
            lambda t, y, i=i: field(t, y, torch.tensor(float(i), dtype=F64)), y0[i], t, **kw
        )
        assert int(alone.status) == int(want[i]), i
        assert float(alone.t_end) == pytest.approx(float(sol.t_end[i]), rel=1e-9), i
    assert float(sol.t_end[0]) == 2.0 and float(sol.t_end[1]) < 0.5 + 1e-6
    assert float(sol.t_end[2]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("batched", [False, True])
def test_valid_values_at_the_edges_of_the_entry_checks_are_accepted(batched):
    """The entry checks every value in one sum (a non-finite sum runs the elementwise checks):
    a state whose sum overflows (each value finite), sums of inf and -inf, and times 1e-25
    apart in float32, increasing and decreasing, are valid inputs."""
    big = torch.full((2, 4) if batched else (4,), 1e38)  # (a sum of 4: 4e38 > 3.4e38)
    sol = neuralode.solve(lambda t, y: 0.0 * y, big, torch.tensor([0.0, 1.0]), batched=batched)
    assert torch.equal(sol.ys[..., -1, :] if batched else sol.ys[-1], big)
    # (sums of -inf and inf: NaN, cleared by the elementwise checks too)
    sol = neuralode.solve(lambda t, y: big, -big, torch.tensor([0.0, 1.0]), batched=batched)
    end = sol.ys[..., -1, :] if batched else sol.ys[-1]
    assert bool((end.abs() <= 1e-6 * big).all())  # -1e38 + 1e38, to float32's rounding
    t = torch.tensor([0.0, 1e-25, 2e-25])
    y0 = torch.ones(2, 2) if batched else torch.ones(2)
    sol = neuralode.solve(lambda t, y: -y, y0, t, batched=batched)
    assert torch.allclose(sol.ys, y0.unsqueeze(-2).expand_as(sol.ys))
    back = neuralode.solve(lambda t, y: -y, y0, t.flip(0), batched=batched)  # decreasing
    assert torch.allclose(back.ys, sol.ys)
