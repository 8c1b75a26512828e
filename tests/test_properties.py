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
import re
from datetime import timedelta
from typing import Any

import pytest
import torch

import neuralode

pytest.importorskip("hypothesis", reason="needs hypothesis: pip install -e '.[dev]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from neuralode import SolverError
from neuralode.solvers.registry import ALIASES
from neuralode.solvers.tableaus import IMPLICIT_TABLEAUS

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


# --------------------------------------------------------------------------- the oracle
# Each fuzz test classifies its draw with the rules the API documents (written here, apart from
# the code), and then requires: an invalid draw raises ValueError/TypeError whose message names
# one of the invalid arguments; a valid draw solves (or fails with a SolverError whose status
# says the request could not be met) and returns outputs of the documented shape and value.
NUMBER = (int, float)


def _is_number(x: Any) -> bool:
    return isinstance(x, NUMBER) and not isinstance(x, bool)


def _bad_state(y0: Any) -> bool:
    parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
    if not parts:
        return True
    for p in parts:
        if not isinstance(p, torch.Tensor) or p.numel() == 0:
            return True
        if not (p.is_floating_point() or p.is_complex()):  # complex states are solved as pairs
            return True
        if not bool(torch.isfinite(p).all()):
            return True
    return len({p.real.dtype if p.is_complex() else p.dtype for p in parts}) > 1


def _as_grid(t: Any) -> torch.Tensor | None:
    """``t`` as the float64 grid the documentation promises to read, or None if it is none."""
    if isinstance(t, torch.Tensor):
        if t.is_complex() or t.dtype == torch.bool:
            return None
        return t.to(F64)
    if isinstance(t, (list, tuple)) and all(_is_number(v) for v in t):
        return torch.tensor(t, dtype=F64) if t else torch.zeros(0, dtype=F64)
    return None  # None, strings, dtypes, callables, lone numbers (not a 1-D grid)


def _bad_grid(t: Any) -> bool:
    g = _as_grid(t)
    if g is None or g.ndim != 1 or g.numel() == 0 or not bool(torch.isfinite(g).all()):
        return True
    d = g.diff()
    return not (bool((d > 0).all()) or bool((d < 0).all()))


def _tolerance_value(tol: Any, positive: bool, n: int) -> torch.Tensor | None:
    """A tolerance for a one-tensor state of ``n`` components: a number, a tensor that
    broadcasts to ``[n]``, or a one-entry sequence of such; None if it is not one."""
    if isinstance(tol, (list, tuple)):
        return _tolerance_value(tol[0], positive, n) if len(tol) == 1 else None
    if _is_number(tol):
        v = torch.tensor(float(tol), dtype=F64)
    elif isinstance(tol, torch.Tensor) and not tol.is_complex() and tol.dtype != torch.bool:
        v = tol.to(F64)
        if v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, n)):
            return None
    else:
        return None
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        return None
    if positive and bool((v == 0).any()):
        return None
    return v


def _bad_tolerances(rtol: Any, atol: Any, n: int, dtype: torch.dtype) -> set[str]:
    r = _tolerance_value(rtol, True, n)
    a = _tolerance_value(atol, False, n)
    bad = {name for name, v in (("rtol", r), ("atol", a)) if v is None}
    if not bad and float(r.max()) < torch.finfo(dtype).eps and float(a.max()) == 0:
        bad.add("rtol")  # below the dtype's resolution with no absolute tolerance
    return bad


def _bad_options(options: Any, method: Any) -> set[str]:
    """Names of the invalid parts of ``(options, method)`` (empty if both are valid)."""
    bad = set()
    # odeint takes torchdiffeq's None (dopri5) and aliases (heun2) too
    method_ok = method is None or (
        isinstance(method, str) and (method in neuralode.METHODS or method in ALIASES)
    )
    if not method_ok:
        bad.add("method")
    if options is None:
        return bad
    if not isinstance(options, dict):
        return bad | {"options"}
    # An unknown key warns and is ignored, as torchdiffeq does (tests/test_compat.py), and so
    # do step_size for an adaptive method and first_step for a fixed-step one.
    kinds = [neuralode.get_solver(method or "dopri5").adaptive] if method_ok else [True, False]
    name = ALIASES.get(method, method) if method_ok and method is not None else None
    for key, v in options.items():
        if key in neuralode.ODE_OPTIONS and not all(_option_ok(key, v, a, name) for a in kinds):
            bad.add(key)
    return bad


def _option_ok(key: str, v: Any, adaptive: bool, method: str | None = None) -> bool:
    positive = _is_number(v) and 0 < v < math.inf
    if key in ("max_order", "max_iters"):  # Adams and implicit RK options (others warn)
        takes = {"explicit_adams": ("max_order",), "implicit_adams": ("max_order", "max_iters")}
        takes.update({m: ("max_iters",) for m in IMPLICIT_TABLEAUS})
        if v is None or key not in takes.get(method or "", ()):
            return True
        hi = 12 if key == "max_order" else math.inf
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi
    if key == "grid_constructor":  # fixed-step methods: no drawn value makes a grid
        return v is None or adaptive
    if key == "interp":
        return v is None or adaptive or v in ("linear", "cubic")
    if key == "step_size":
        return v is None or adaptive or positive
    if key == "first_step":
        return v is None or not adaptive or positive
    if key == "max_num_steps":
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if key == "dtype":
        return v is None or (isinstance(v, torch.dtype) and v.is_floating_point)
    if key == "norm":
        return v in ("rms", "max")  # the one callable drawn, len, is not a norm
    if key in ("step_t", "jump_t"):  # adaptive methods: a 1-D sequence of finite times
        if v is None or not adaptive:
            return True  # a fixed-step method's odeint warns and ignores it, as torchdiffeq
        try:
            x = torch.as_tensor(v, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            return False
        return x.ndim == 1 and bool(torch.isfinite(x).all())
    if key == "perturb":  # fixed-step methods: a bool (an adaptive method warns and ignores it)
        return adaptive or isinstance(v, bool)
    ranges = {"safety": (0, 1), "beta": (0, 0.2), "ifactor": (1, math.inf), "dfactor": (0, 1)}
    lo, hi = ranges[key]
    inside = _is_number(v) and lo <= v <= hi and v < math.inf
    return inside and not (key in ("safety", "dfactor") and v == 0)


def _names_one_of(message: str, names: set[str]) -> bool:
    return any(re.search(rf"\b{re.escape(n)}\b", message) for n in names)


def _solve(y0: Any, t: Any, method: Any = "dopri5", options: Any = None, **tols: Any) -> Any:
    """``odeint`` with ``max_num_steps`` 5000 unless given: some valid but impossible requests
    (``first_step`` 1e-300 with ``ifactor=1``) rightly take every allowed step, and 100000 of
    them would exceed the deadline without saying anything about error handling."""
    if options is None:
        options = {"max_num_steps": 5000}
    elif isinstance(options, dict) and "max_num_steps" not in options:
        options = {**options, "max_num_steps": 5000}
    return neuralode.odeint(decay, y0, t, method=method, options=options, **tols)


def _expect(bad: set[str], run: Any) -> Any:
    """Run ``run()``: invalid input (``bad`` non-empty) must raise ValueError/TypeError naming
    one of ``bad``; valid input must return, or fail with a SolverError whose status says the
    request could not be met.  Returns the outputs (or None)."""
    try:
        out = run()
    except SolverError as err:
        assert not bad, f"invalid {sorted(bad)} reached the solver: {err}"
        assert err.solution is not None and not err.solution.success
        return None
    except (ValueError, TypeError) as err:
        assert bad, f"valid input refused: {err}"
        assert _names_one_of(str(err), bad), f"{err!r} does not name any of {sorted(bad)}"
        return None
    assert not bad, f"invalid {sorted(bad)} accepted"
    return out


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
T01 = torch.tensor([0.0, 0.5], dtype=F64)


@FUZZ
@given(y0=st.one_of(tensors(), junk, st.tuples(tensors(), tensors())))
def test_random_states_fail_clearly(y0: Any) -> None:
    bad = {"y0"} if _bad_state(y0) else set()
    out = _expect(bad, lambda: _solve(y0, T01))
    if out is not None:
        for o, y in zip(
            out if isinstance(y0, tuple) else (out,), y0 if isinstance(y0, tuple) else (y0,)
        ):
            assert o.shape == (2, *y.shape) and torch.equal(o[0], y)
            torch.testing.assert_close(o[1], y * math.exp(-0.5), rtol=1e-5, atol=1e-6)


@FUZZ
@given(t=bad_grids())
def test_random_time_grids_fail_clearly(t: Any) -> None:
    y0 = torch.ones(2, dtype=F64)
    out = _expect({"t"} if _bad_grid(t) else set(), lambda: _solve(y0, t))
    if out is not None:
        g = _as_grid(t)
        assert out.shape == (g.shape[0], 2)
        exact = torch.exp(-(g - g[0])).unsqueeze(1).expand(-1, 2)
        torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-7)


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
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 0.1], dtype=F64)
    out = _expect(_bad_options(options, method), lambda: _solve(y0, t, method, options))
    if out is not None:
        assert out.shape == (2, 2) and bool(torch.isfinite(out).all())


@FUZZ
@given(
    rtol=st.one_of(odd_floats, junk, tensors(max_dims=2, dtypes=[F64, torch.int64])),
    atol=st.one_of(odd_floats, junk, tensors(max_dims=2, dtypes=[F64, torch.int64])),
)
def test_random_tolerances_fail_clearly(rtol: Any, atol: Any) -> None:
    y0, t = torch.ones(2, dtype=F64), torch.tensor([0.0, 0.1], dtype=F64)
    bad = _bad_tolerances(rtol, atol, 2, F64)
    out = _expect(bad, lambda: _solve(y0, t, rtol=rtol, atol=atol))
    if out is not None:
        assert out.shape == (2, 2) and bool(torch.isfinite(out).all())


@FUZZ
@given(
    y0=tensors(dtypes=[torch.float32, F64]),
    t=bad_grids(),
    method=st.sampled_from(neuralode.METHODS),
    rtol=odd_floats,
)
def test_random_combinations_fail_clearly(y0: Any, t: Any, method: str, rtol: float) -> None:
    bad = {"y0"} if _bad_state(y0) else set()
    bad |= {"t"} if _bad_grid(t) else set()
    if not bad and neuralode.get_solver(method).adaptive:
        n = y0.numel()
        bad |= _bad_tolerances(rtol, 1e-9, n, y0.dtype)
    elif not bad and _tolerance_value(rtol, True, y0.numel()) is None:
        bad.add("rtol")  # checked for fixed-step methods too, where it is unused
    out = _expect(bad, lambda: _solve(y0, t, method, rtol=rtol))
    if out is not None:
        assert out.shape == (_as_grid(t).shape[0], *y0.shape)


# --------------------------------------------------------------------------- valid input
# Accuracy against the exact solution: adaptive methods at rtol=atol=1e-9; fixed methods with
# h = 0.01 over spans up to ~2 (global error O(h^p)).
CHECK = {
    "euler": 5e-2,
    "midpoint": 5e-4,
    "heun": 5e-4,
    "heun3": 1e-5,
    "rk4": 1e-7,
    "rk38": 1e-7,
    "adaptive_heun": 1e-3,  # at rtol = atol = 1e-5 (RTOL below)
    "fehlberg2": 1e-4,  # at 1e-8: its error estimate is far below its error
    "bosh3": 1e-6,
    "dopri5": 1e-6,
    "tsit5": 1e-6,
    "dopri8": 1e-6,
    "rosenbrock23": 1e-4,  # at rtol = atol = 1e-6 (RTOL below): an order-2 method
    "rodas4": 1e-6,  # at 1e-8
    "rodas5p": 1e-6,  # at 1e-8
    "kvaerno3": 1e-5,  # at 1e-7
    "kvaerno5": 1e-6,  # at 1e-8
    "auto": 1e-6,  # tsit5 unless a draw is stiff
    "explicit_adams": 1e-6,  # order 4 at step 0.01
    "implicit_adams": 1e-6,
    "implicit_euler": 5e-2,
    "implicit_midpoint": 5e-4,
    "trapezoid": 5e-4,
    "sdirk2": 5e-4,
    "trbdf2": 5e-4,
    "radauIIA3": 1e-5,
    "gl4": 1e-7,
    "radauIIA5": 1e-7,
    "gl6": 1e-7,
}


# The second-order pairs at 1e-9 would take ~10^5 steps per example.
RTOL = {
    "adaptive_heun": 1e-5,
    "fehlberg2": 1e-8,
    "rosenbrock23": 1e-6,
    "rodas4": 1e-8,
    "rodas5p": 1e-8,
    "kvaerno3": 1e-7,
    "kvaerno5": 1e-8,
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
    rtol = RTOL.get(method, 1e-9)
    kwargs: dict[str, Any] = (
        {"rtol": rtol, "atol": rtol}
        if neuralode.get_solver(method).adaptive
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


@pytest.mark.parametrize("batched", [False, True])
def test_tolerance_below_resolution_fails_fast(batched: bool) -> None:
    """``rtol`` below the dtype's resolution with ``atol = 0`` is refused at the entry, naming
    rtol.  With a tiny positive ``atol`` the solve runs, and when the step size underflows it
    says so: the step's numbers are finite, only the error ratio overflowed (this was once
    reported as "the vector field returned NaN or Inf")."""
    t = torch.tensor([0.0, 0.1], dtype=F64)
    y0 = torch.ones(3, 2, dtype=F64) if batched else torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match=r"rtol=1e-300 is below the resolution of torch.float64"):
        neuralode.solve(decay, y0, t, rtol=1e-300, atol=0.0, batched=batched)
    with pytest.raises(ValueError, match=r"rtol=1e-08 is below the resolution of torch.float32"):
        neuralode.solve(decay, y0.float(), t, rtol=1e-8, atol=0.0, batched=batched)
    sol = neuralode.solve(
        decay, y0, t, rtol=1e-300, atol=1e-300, max_num_steps=2000, throw=False, batched=batched
    )
    codes = set(sol.status.reshape(-1).tolist())
    assert codes == {int(neuralode.Status.STEP_SIZE_UNDERFLOW)}, codes
    assert int(sol.stats.n_steps.reshape(-1)[0]) < 2000  # it failed fast, not by max steps


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


# -- events ---------------------------------------------------------------------------------------


@settings(VALID, max_examples=30)
@given(
    a=st.lists(st.floats(0.2, 5.0), min_size=1, max_size=6),
    c=st.floats(0.1, 3.0),
    k=st.floats(0.2, 3.0),
    reverse=st.booleans(),
    method=st.sampled_from(["dopri5", "tsit5", "bosh3", "rodas5p"]),
)
def test_event_times_of_decays_per_sample(a, c, k, reverse, method):
    """y = a exp(-k |t|) falls through c at ln(a / c) / k where a > c, per sample (the others:
    NaN, success), whichever way time runs."""
    y0 = torch.tensor(a, dtype=F64).unsqueeze(1)
    t = torch.tensor([0.0, -4.0 if reverse else 4.0], dtype=F64)
    sign = -1.0 if reverse else 1.0
    ev = neuralode.Event(lambda t, y: y[:, 0] - c, direction=-1)
    with torch.no_grad():
        sol = neuralode.solve(
            lambda t, y: -sign * k * y,
            y0,
            t,
            batched=True,
            events=ev,
            method=method,
            rtol=1e-9,
            atol=1e-12,
        )
    crossing = [math.log(x / c) / k for x in a]
    for i, (x, tc) in enumerate(zip(a, crossing)):
        if x > c and tc < 4.0 - 1e-6:
            assert sol.status[i] == neuralode.Status.EVENT
            assert float(sol.event_t[i]) == pytest.approx(sign * tc, abs=1e-6)
        elif x < c or tc > 4.0 + 1e-6:
            assert sol.status[i] == neuralode.Status.SUCCESS
            assert math.isnan(float(sol.event_t[i])) and int(sol.event_index[i]) == -1
    assert sol.success


@FUZZ
@given(
    direction=st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.booleans()),
    terminal=st.one_of(st.integers(-3, 3), st.booleans(), st.floats(-2, 2)),
    checks=st.one_of(st.none(), st.integers(-3, 12), st.floats(-1, 3)),
)
def test_event_arguments_are_accepted_or_refused_clearly(direction, terminal, checks):
    try:
        ev = neuralode.Event(
            lambda t, y: y[:, 0], direction=direction, terminal=terminal, checks=checks
        )
    except (ValueError, TypeError) as err:
        assert "event" in str(err)
        return
    assert ev.direction in (-1, 0, 1) and ev.stop_at >= 0 and ev.interior_checks >= 0
