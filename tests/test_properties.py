"""Property tests (hypothesis): bad input always fails clearly, valid input always solves right.

What this proves:

* Random bad inputs (shapes, dtypes including int/bool/complex, NaN/Inf at random positions,
  unsorted or repeated grids, option dicts with random keys and values, tolerances including
  negative/zero/NaN/Inf, random method names) raise ``ValueError``, ``TypeError`` or
  ``SolverError`` and nothing else, each within the hypothesis deadline (no hang).
* Random valid linear problems ``y' = A y`` (random size, grids of random direction, batch size
  and per-sample grids, every method) return finite outputs of the documented shape whose first
  output is ``y0`` bit for bit, and which match ``expm(A (t - t0)) y0`` within a tolerance set
  by the method's accuracy.
* The solve ends exactly at the last requested time, and a tolerance below the dtype's
  resolution fails fast.
* The fast finiteness check (a sum first, the elementwise check only when the sum is not finite)
  agrees with ``isfinite(x).all()`` on random values with overflowing sums, NaN and Inf.

Examples are derandomized so that a run is reproducible; ``max_examples`` keeps the file short.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neuralode
from neuralode import SolverError

F64 = torch.float64
CLEAR = (ValueError, TypeError, SolverError)
FUZZ = settings(
    max_examples=100,
    deadline=timedelta(seconds=5),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
VALID = settings(
    max_examples=80,
    deadline=timedelta(seconds=5),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

DTYPES = [torch.float32, F64, torch.int32, torch.int64, torch.bool, torch.complex64]
SPECIAL = [math.nan, math.inf, -math.inf]
odd_floats = st.one_of(
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
)
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    odd_floats,
    st.text(max_size=5),
    st.lists(st.floats(-2, 2), max_size=3),
    st.builds(torch.tensor, st.lists(st.floats(-2, 2), max_size=3)),
    st.sampled_from([torch.float32, torch.int32, "rms", "max", "float64", len]),
)


def decay(t: torch.Tensor, y: Any) -> Any:
    return tuple(-p for p in y) if isinstance(y, tuple) else -y


def _call(y0: Any, t: Any, method: Any = "dopri5", options: Any = None, **tols: Any) -> None:
    """Run a solve that must end in a result or in one of the clear errors.

    ``max_num_steps`` defaults to 5000 here: some valid but impossible requests (``first_step``
    of 1e-300 with ``ifactor=1``) rightly take every allowed step, and 100000 of them would
    exceed the deadline without saying anything about error handling."""
    if options is None:
        options = {"max_num_steps": 5000}
    elif isinstance(options, dict) and "max_num_steps" not in options:
        options = {**options, "max_num_steps": 5000}
    try:
        out = neuralode.odeint(decay, y0, t, method=method, options=options, **tols)
    except CLEAR as err:
        assert str(err), "an error without a message"
        return
    parts = out if isinstance(out, tuple) else (out,)
    for p in parts:
        assert isinstance(p, torch.Tensor)


@st.composite
def tensors(draw: st.DrawFn, *, max_dims: int = 3, dtypes: list[torch.dtype] = DTYPES) -> Any:
    shape = draw(st.lists(st.integers(0, 3), max_size=max_dims))
    dtype = draw(st.sampled_from(dtypes))
    x = torch.linspace(-1.0, 1.0, max(math.prod(shape), 1))[: math.prod(shape)].reshape(shape)
    if dtype.is_floating_point and x.numel() and draw(st.booleans()):
        pos = draw(st.integers(0, x.numel() - 1))
        x.view(-1)[pos] = draw(st.sampled_from(SPECIAL))
    return x.to(dtype)


@st.composite
def bad_grids(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["tensor", "list", "scalar", "junk"]))
    vals = draw(
        st.lists(st.one_of(st.floats(-3, 3), st.sampled_from(SPECIAL + [0.0, 1.0])), max_size=5)
    )
    if kind == "list":
        return vals
    if kind == "scalar":
        return torch.tensor(vals[0] if vals else 0.0)
    if kind == "junk":
        return draw(junk)
    dtype = draw(st.sampled_from([torch.float32, F64, torch.int64, torch.bool, torch.complex64]))
    t = torch.tensor(vals, dtype=F64)
    if draw(st.booleans()) and t.numel() >= 2:
        t = t.reshape(1, -1).expand(draw(st.integers(1, 2)), -1)
    return t.to(dtype)


# --------------------------------------------------------------------------- bad input
@FUZZ
@given(y0=st.one_of(tensors(), junk, st.tuples(tensors(), tensors())))
def test_random_states_fail_clearly(y0: Any) -> None:
    _call(y0, torch.tensor([0.0, 0.5], dtype=F64))


@FUZZ
@given(t=bad_grids())
def test_random_time_grids_fail_clearly(t: Any) -> None:
    _call(torch.ones(2, dtype=F64), t)


@FUZZ
@given(
    options=st.one_of(
        junk,
        st.dictionaries(
            st.one_of(st.sampled_from(sorted(neuralode.ODE_OPTIONS)), st.text(max_size=6)),
            junk,
            max_size=3,
        ),
    ),
    method=st.one_of(st.sampled_from(neuralode.METHODS), st.text(max_size=6), junk),
)
def test_random_options_and_methods_fail_clearly(options: Any, method: Any) -> None:
    # A short, easy solve: whatever the options, it ends quickly or is refused.
    _call(torch.ones(2, dtype=F64), torch.tensor([0.0, 0.1], dtype=F64), method, options)


@FUZZ
@given(
    rtol=st.one_of(odd_floats, junk, tensors(max_dims=2, dtypes=[F64, torch.int64])),
    atol=st.one_of(odd_floats, junk, tensors(max_dims=2, dtypes=[F64, torch.int64])),
)
def test_random_tolerances_fail_clearly(rtol: Any, atol: Any) -> None:
    _call(torch.ones(2, dtype=F64), torch.tensor([0.0, 0.1], dtype=F64), rtol=rtol, atol=atol)


@FUZZ
@given(
    y0=tensors(dtypes=[torch.float32, F64]),
    t=bad_grids(),
    method=st.sampled_from(neuralode.METHODS),
    rtol=odd_floats,
)
def test_random_combinations_fail_clearly(y0: Any, t: Any, method: str, rtol: float) -> None:
    _call(y0, t, method, rtol=rtol)


# --------------------------------------------------------------------------- valid input
# Accuracy against the exact solution: adaptive methods at rtol=atol=1e-9; fixed methods with
# h = 0.01 over spans up to ~2 (global error O(h^p)).
CHECK = {
    "euler": 5e-2,
    "midpoint": 5e-4,
    "heun": 5e-4,
    "rk4": 1e-7,
    "bosh3": 1e-6,
    "dopri5": 1e-6,
    "tsit5": 1e-6,
    "dopri8": 1e-6,
}


@st.composite
def grid(draw: st.DrawFn, T: int) -> torch.Tensor:
    start = draw(st.floats(-1, 1))
    steps = draw(st.lists(st.floats(0.05, 0.5), min_size=T - 1, max_size=T - 1))
    sign = draw(st.sampled_from([1.0, -1.0]))
    return torch.tensor([start] + steps, dtype=F64).cumsum(0) * sign


@st.composite
def linear_problems(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    a = 0.7 * torch.randn(n, n, generator=g, dtype=F64)
    batch = draw(st.sampled_from([None, 1, 2, 3]))
    T = draw(st.integers(1, 5))
    per_sample = batch is not None and draw(st.booleans())
    if per_sample:
        t = torch.stack([draw(grid(T)) for _ in range(batch)])
    else:
        t = draw(grid(T))
    y0 = torch.randn(((batch,) if batch else ()) + (n,), generator=g, dtype=F64)
    return {"a": a, "y0": y0, "t": t, "batched": batch is not None}


@VALID
@given(prob=linear_problems(), method=st.sampled_from(neuralode.METHODS))
def test_random_linear_systems_match_matrix_exponential(prob: dict, method: str) -> None:
    a, y0, t, batched = prob["a"], prob["y0"], prob["t"], prob["batched"]
    kwargs: dict[str, Any] = (
        {"rtol": 1e-9, "atol": 1e-9}
        if neuralode.get_tableau(method).adaptive
        else {"step_size": 0.01}
    )
    sol = neuralode.solve(lambda _t, y: y @ a.T, y0, t, method=method, batched=batched, **kwargs)
    T = t.shape[-1]
    n = a.shape[0]
    if batched:
        B = y0.shape[0]
        assert sol.ys.shape == (B, T, n)
        assert torch.equal(sol.ys[:, 0], y0)
        tt = t if t.ndim == 2 else t.expand(B, -1)
        exact = torch.stack(
            [
                torch.stack([torch.linalg.matrix_exp(a * (s - r[0])) @ y for s in r])
                for r, y in zip(tt, y0)
            ]
        )
        assert sol.status.shape == (B,)
    else:
        assert sol.ys.shape == (T, n)
        assert torch.equal(sol.ys[0], y0)
        exact = torch.stack([torch.linalg.matrix_exp(a * (s - t[0])) @ y0 for s in t])
    assert sol.success
    assert torch.isfinite(sol.ys).all()
    tol = CHECK[method] * max(1.0, float(exact.abs().max()))
    torch.testing.assert_close(sol.ys, exact, rtol=0, atol=tol)


@VALID
@given(prob=linear_problems())
def test_odeint_layout_matches_solve(prob: dict) -> None:
    # odeint is solve with batched=False: [T, *y0.shape], outputs identical to solve's.
    if prob["t"].ndim == 2:
        return
    a, y0, t = prob["a"], prob["y0"], prob["t"]
    ys = neuralode.odeint(lambda _t, y: y @ a.T, y0, t)
    assert ys.shape == (t.shape[0],) + y0.shape
    assert torch.equal(ys[0], y0)
    sol = neuralode.solve(lambda _t, y: y @ a.T, y0, t, batched=False)
    assert torch.equal(ys, sol.ys)


@pytest.mark.parametrize("batched", [False, True])
def test_last_step_lands_on_the_final_time(batched: bool) -> None:
    y0 = torch.zeros((2, 1) if batched else (1,), dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    sol = neuralode.solve(
        lambda _t, y: torch.ones_like(y), y0, t, first_step=0.995, batched=batched
    )
    assert sol.success
    torch.testing.assert_close(sol.ys[..., -1, :], torch.ones_like(y0), rtol=0, atol=1e-12)


def test_tolerance_below_resolution_fails_fast() -> None:
    t = torch.tensor([0.0, 0.1], dtype=F64)
    try:
        sol = neuralode.solve(
            decay,
            torch.ones(2, dtype=F64),
            t,
            rtol=1e-300,
            atol=0.0,
            max_num_steps=300,
            throw=False,
        )
    except ValueError:
        return  # refusing a tolerance below the dtype's resolution is a fine answer too
    stuck = int(sol.status) == neuralode.Status.MAX_STEPS_REACHED and float(sol.t_end) == 0.0
    assert not stuck, f"no progress in {int(sol.stats.n_steps)} steps, reported as max steps"


def test_dopri5_final_value_within_tolerance() -> None:
    a = torch.tensor([[-0.5, 1.0, 0.0], [-1.0, -0.2, 0.3], [0.1, 0.0, -0.3]], dtype=F64)
    y0 = torch.tensor([1.0, -0.5, 0.25], dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    ys = neuralode.odeint(lambda _t, y: a @ y, y0, t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ys[-1], torch.linalg.matrix_exp(2 * a) @ y0, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- the finite check
@FUZZ
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.sampled_from([3e38, -3e38, 6e4, float("inf"), -float("inf"), float("nan")]),
        ),
        min_size=1,
        max_size=40,
    ),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
)
def test_all_finite_agrees_with_the_elementwise_check(values: list[float], dtype: Any) -> None:
    # The fast path sums first: a sum that overflows (3e38 + 3e38 in float32, 6e4 + 6e4 in
    # float16) must not be mistaken for a non-finite element, and inf - inf must not hide one.
    from neuralode._inputs import all_finite

    x = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert all_finite(x) == bool(torch.isfinite(x).all())
