"""``Solution.evaluate`` (dense output) is the solution between steps, for every adaptive method.

* Against solving directly: adaptive steps do not depend on the output times, so a solve with the
  query times as outputs takes the same steps and must agree with ``evaluate`` to round-off
  (1e-12); both are within tolerance of the exact solution (``ERR_BOUND`` tolerance units, the
  bound of ``test_reference``).
* Shapes: scalar and ``[M]`` queries unbatched; ``[M]`` shared, ``[B, M]`` per-row and scalar
  queries batched (per-sample grids, one row decreasing).
* Step boundaries (constant steps, so they are known): the interpolant at a step start is the
  step's state exactly; at the interval ends it is ``y0`` and the last output.
* Errors: a time outside the solved interval, or ``evaluate`` without ``dense=True``, raise
  ``ValueError``.
* Gradients: ``evaluate`` is differentiable; its gradient w.r.t. ``y0`` is finite and equals the
  one from ``odeint`` to the query times.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTIVE, INTERPOLATING, tol_for

import neuralode

DTYPE = torch.float64
RTOL, ATOL = 1e-6, 1e-6
ERR_BOUND = 100.0
DECAY = 0.1


def spiral(omega: torch.Tensor | float):
    """Decaying rotation with a time-dependent speed ``omega (1 + cos t)`` (works batched)."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = omega * (1 + torch.cos(t))
        x, v = y[..., 0], y[..., 1]
        return torch.stack([-DECAY * x - w * v, w * x - DECAY * v], dim=-1)

    return f


def spiral_exact(t: torch.Tensor, t0: torch.Tensor, y0: torch.Tensor, omega) -> torch.Tensor:
    """``y(t)`` from ``y(t0) = y0``; ``t`` is ``[..., M]``, ``y0`` is ``[..., 2]``."""
    th = omega * ((t - t0) + torch.sin(t) - torch.sin(t0))
    r = torch.exp(-DECAY * (t - t0))
    c, s = torch.cos(th) * r, torch.sin(th) * r
    x0, v0 = y0[..., :1], y0[..., 1:]
    return torch.stack([c * x0 - s * v0, s * x0 + c * v0], dim=-1)


def _tol_units(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((y - ref).abs() / (ATOL + RTOL * ref.abs())).max())


Y0 = torch.tensor([1.0, 0.5], dtype=DTYPE)
T_END = 5.0
QUERIES = torch.tensor([0.013, 0.5, 1.2345, 2.0, 3.3, 4.99], dtype=DTYPE)


@pytest.mark.parametrize("method", INTERPOLATING)
def test_evaluate_matches_direct_solve_unbatched(method: str) -> None:
    f = spiral(1.5)
    sol = neuralode.solve(
        f,
        Y0,
        torch.tensor([0.0, T_END], dtype=DTYPE),
        method=method,
        rtol=tol_for(method, RTOL),
        atol=tol_for(method, ATOL),
        dense=True,
    )
    grid = torch.cat([QUERIES.new_zeros(1), QUERIES, QUERIES.new_full((1,), T_END)])
    direct = neuralode.solve(
        f, Y0, grid, method=method, rtol=tol_for(method, RTOL), atol=tol_for(method, ATOL)
    )
    assert int(direct.stats.n_steps) == int(sol.stats.n_steps)

    vec = sol.evaluate(QUERIES)
    assert vec.shape == (len(QUERIES), 2)
    torch.testing.assert_close(vec, direct.ys[1:-1], rtol=1e-12, atol=1e-12)
    exact = spiral_exact(QUERIES, torch.tensor(0.0, dtype=DTYPE), Y0, 1.5)
    err = _tol_units(vec, exact)
    print(f"{method}: dense error {err:.2f} tolerance units")
    assert err <= ERR_BOUND

    for i in (0, 2, 5):  # scalar queries: 0-dim tensors (Python floats: tested below)
        one = sol.evaluate(QUERIES[i])
        assert one.shape == (2,)
        torch.testing.assert_close(one, vec[i], rtol=1e-13, atol=1e-13)

    assert torch.equal(sol.evaluate(0.0), Y0)
    torch.testing.assert_close(sol.evaluate(T_END), sol.ys[-1], rtol=1e-13, atol=1e-13)


def test_evaluate_python_float_keeps_time_precision() -> None:
    assert torch.get_default_dtype() == torch.float32
    sol = neuralode.solve(
        spiral(1.5), Y0, torch.tensor([0.0, T_END], dtype=DTYPE), rtol=RTOL, atol=ATOL, dense=True
    )
    want = sol.evaluate(torch.tensor(0.013, dtype=DTYPE))
    torch.testing.assert_close(sol.evaluate(0.013), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_evaluate_at_step_boundaries(method: str) -> None:
    """Constant steps of 0.25 (``first_step``, ``ifactor=1``, loose tolerance) put the step
    boundaries on a known grid; the direct solve's outputs there are the steps' own states."""
    f = spiral(1.5)
    h = 0.25
    grid = torch.arange(0, 21, dtype=DTYPE) * h  # [0, 5]
    kw = dict(method=method, rtol=1e10, atol=1e10, first_step=h, ifactor=1.0)
    sol = neuralode.solve(f, Y0, grid[[0, -1]], dense=True, **kw)
    direct = neuralode.solve(f, Y0, grid, **kw)
    assert int(sol.stats.n_accepted) == 20 and int(sol.stats.n_rejected) == 0
    at = sol.evaluate(grid)
    assert torch.equal(at[:-1], direct.ys[:-1])  # theta = 0 of the step starting there
    torch.testing.assert_close(at[-1], direct.ys[-1], rtol=1e-13, atol=1e-13)  # theta = 1
    # Just inside either side of a boundary, the two steps' interpolants meet (continuity).
    b = grid[8]
    eps = 1e-9
    left, right = sol.evaluate(torch.stack([b - eps, b + eps]))
    torch.testing.assert_close(left, right, rtol=0, atol=1e-7)


GRIDS = torch.tensor(
    [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0], [4.0, 2.5, 0.5]], dtype=DTYPE
)  # row 2 decreasing; every row covers [1, 4]
OMEGAS = torch.tensor([0.5, 1.5, 3.0], dtype=DTYPE)
Y0S = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, -1.0]], dtype=DTYPE)


@pytest.mark.parametrize("method", INTERPOLATING)
def test_evaluate_batched(method: str) -> None:
    f = spiral(OMEGAS)
    sol = neuralode.solve(
        f,
        Y0S,
        GRIDS[:, [0, -1]],
        method=method,
        rtol=tol_for(method, RTOL),
        atol=tol_for(method, ATOL),
        dense=True,
    )
    t0 = GRIDS[:, :1]

    # Shared [M] queries inside every row's interval.
    shared = torch.tensor([1.0, 1.7, 2.5, 3.9, 4.0], dtype=DTYPE)
    out = sol.evaluate(shared)
    assert out.shape == (3, 5, 2)
    exact = spiral_exact(shared.expand(3, -1), t0, Y0S, OMEGAS.unsqueeze(1))
    assert _tol_units(out, exact) <= ERR_BOUND

    # Per-row [B, M] queries (row 2 in its own decreasing interval), against a direct solve with
    # the same end points (same steps).
    per_row = torch.tensor([[0.3, 1.1, 3.7], [1.2, 4.4, 4.9], [3.6, 2.0, 0.6]], dtype=DTYPE)
    out = sol.evaluate(per_row)
    assert out.shape == (3, 3, 2)
    grid = torch.cat([GRIDS[:, :1], per_row, GRIDS[:, -1:]], dim=1)
    direct = neuralode.solve(
        f, Y0S, grid, method=method, rtol=tol_for(method, RTOL), atol=tol_for(method, ATOL)
    )
    assert torch.equal(direct.stats.n_steps, sol.stats.n_steps)
    torch.testing.assert_close(out, direct.ys[:, 1:-1], rtol=1e-12, atol=1e-12)
    exact = spiral_exact(per_row, t0, Y0S, OMEGAS.unsqueeze(1))
    err = _tol_units(out, exact)
    print(f"{method}: batched dense error {err:.2f} tolerance units")
    assert err <= ERR_BOUND

    # A scalar query gives [B, features]; the interval ends give y0 and the last outputs.
    one = sol.evaluate(2.5)
    assert one.shape == (3, 2)
    torch.testing.assert_close(one, sol.evaluate(shared)[:, 2], rtol=1e-12, atol=1e-13)
    assert torch.equal(sol.evaluate(GRIDS[:, :1])[:, 0], Y0S)
    torch.testing.assert_close(
        sol.evaluate(GRIDS[:, -1:])[:, 0], sol.ys[:, -1], rtol=1e-13, atol=1e-13
    )


@pytest.mark.parametrize("method", ADAPTIVE)
def test_evaluate_outside_interval_raises(method: str) -> None:
    f = spiral(1.0)
    t = torch.tensor([0.0, 2.0], dtype=DTYPE)
    kw = dict(method=method, rtol=1e-4, atol=1e-6, dense=True)
    sol = neuralode.solve(f, Y0, t, **kw)
    for bad in (-0.1, 2.1, torch.tensor([0.5, 3.0], dtype=DTYPE)):
        with pytest.raises(ValueError, match="outside"):
            sol.evaluate(bad)
    back = neuralode.solve(f, Y0, t.flip(0), **kw)
    back.evaluate(1.0)
    with pytest.raises(ValueError, match="outside"):
        back.evaluate(2.5)
    batched = neuralode.solve(spiral(OMEGAS), Y0S, GRIDS, **kw)
    with pytest.raises(ValueError, match="outside"):
        batched.evaluate(0.25)  # inside row 0's and row 2's intervals, not row 1's


def test_evaluate_without_dense_raises() -> None:
    sol = neuralode.solve(spiral(1.0), Y0, torch.tensor([0.0, 1.0], dtype=DTYPE))
    with pytest.raises(ValueError, match="dense=True"):
        sol.evaluate(0.5)


@pytest.mark.parametrize("method", INTERPOLATING)
def test_evaluate_is_differentiable(method: str) -> None:
    f = spiral(1.5)
    y0 = Y0.clone().requires_grad_(True)
    sol = neuralode.solve(
        f,
        y0,
        torch.tensor([0.0, T_END], dtype=DTYPE),
        method=method,
        rtol=tol_for(method, RTOL),
        atol=tol_for(method, ATOL),
        dense=True,
    )
    weights = torch.linspace(1.0, 2.0, 2 * len(QUERIES), dtype=DTYPE).view(-1, 2)
    (g_dense,) = torch.autograd.grad((sol.evaluate(QUERIES) * weights).sum(), y0)
    grid = torch.cat([QUERIES.new_zeros(1), QUERIES, QUERIES.new_full((1,), T_END)])
    ys = neuralode.odeint(
        f, y0, grid, method=method, rtol=tol_for(method, RTOL), atol=tol_for(method, ATOL)
    )
    (g_direct,) = torch.autograd.grad((ys[1:-1] * weights).sum(), y0)
    assert torch.isfinite(g_dense).all()
    torch.testing.assert_close(g_dense, g_direct, rtol=1e-10, atol=1e-12)
    # The flow is linear in y0: the exact gradient is sum_i w_i^T Phi(t_i).
    eye = torch.eye(2, dtype=DTYPE)
    phi = torch.stack([spiral_exact(QUERIES, torch.tensor(0.0, dtype=DTYPE), e, 1.5) for e in eye])
    exact = (phi * weights).sum(dim=(1, 2))
    torch.testing.assert_close(g_dense, exact, rtol=1e-4, atol=1e-4)


def test_dopri8_dense_output_in_float32_keeps_its_digits() -> None:
    """DOP853's interpolation coefficients reach |P| = 545: the weights are formed in float64
    and cast, so dense output in float32 is as accurate as the step ends (it once lost about two
    digits: 5.6e-5 relative error between steps here, now 3.9e-6)."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(10, 10, generator=g, dtype=DTYPE)
    A = (B - B.T) / 2  # skew-symmetric: a rotation, |y| constant
    y0 = torch.randn(10, generator=g, dtype=DTYPE)
    t = torch.linspace(0, 10, 201, dtype=DTYPE)
    exact = torch.stack([torch.linalg.matrix_exp(A * ti) @ y0 for ti in t])
    A32 = A.T.float()
    sol = neuralode.solve(
        lambda t, y: y @ A32, y0.float(), t, method="dopri8", rtol=1e-7, atol=1e-7, dense=True
    )
    assert int(sol.stats.n_steps) < 100  # most of the 200 outputs lie between steps
    err = (sol.ys.double() - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(err.max()) < 1e-5
    mid = sol.evaluate(torch.tensor([2.345, 7.891], dtype=DTYPE)).double()
    want = torch.stack([torch.linalg.matrix_exp(A * x) @ y0 for x in (2.345, 7.891)])
    assert float(((mid - want).norm(dim=1) / want.norm(dim=1)).max()) < 1e-5


def test_evaluate_at_the_ends_within_round_off_and_not_beyond() -> None:
    """The interval's ends are accepted up to 1e-12 of its length (a time computed in floating
    point may miss an end by an ulp); beyond that, a clear error naming the interval."""
    t = torch.tensor([1.0, 3.0], dtype=DTYPE)
    sol = neuralode.solve(spiral(1.0), Y0, t, rtol=1e-8, atol=1e-10, dense=True)
    span = 2.0
    # Within the slack the ends are held: the state at t0, and the last step's end.
    assert torch.equal(sol.evaluate(torch.tensor(1.0 - 0.5e-12 * span, dtype=DTYPE)), Y0)
    end = sol.evaluate(torch.tensor(3.0, dtype=DTYPE))
    assert torch.equal(sol.evaluate(torch.tensor(3.0 + 0.5e-12 * span, dtype=DTYPE)), end)
    torch.testing.assert_close(end, sol.ys[-1], rtol=1e-12, atol=1e-12)
    for outside in (1.0 - 1.5e-12 * span, 3.0 + 1.5e-12 * span, 3.0 + 5e-12 * span):
        with pytest.raises(
            ValueError, match=r"^Solution.evaluate: t lies outside the solved interval \[1, 3\]$"
        ):
            sol.evaluate(torch.tensor(outside, dtype=DTYPE))
    back = neuralode.solve(spiral(1.0), Y0, t.flip(0), rtol=1e-8, atol=1e-10, dense=True)
    with pytest.raises(ValueError, match=r"outside the solved interval \[3, 1\]$"):
        back.evaluate(0.5)
    # A query in another float dtype is read in the solver's time dtype.
    torch.testing.assert_close(
        sol.evaluate(torch.tensor([1.5, 2.5])), sol.evaluate(torch.tensor([1.5, 2.5], dtype=DTYPE))
    )


def test_dense_output_of_a_single_step() -> None:
    sol = neuralode.solve(
        spiral(1.0), Y0, torch.tensor([0.0, 0.5], dtype=DTYPE), method="rk4", dense=True
    )
    assert int(sol.stats.n_steps) == 1
    mid = sol.evaluate(0.25)
    exact = spiral_exact(torch.tensor([0.25], dtype=DTYPE), torch.tensor(0.0, dtype=DTYPE), Y0, 1.0)
    torch.testing.assert_close(mid, exact[0], rtol=2e-2, atol=2e-2)  # Hermite over h = 0.5


@pytest.mark.parametrize("batched", [False, True])
def test_float32_outputs_stay_float32(batched: bool) -> None:
    """Outputs inside steps, dense output and the error control keep a float32 state in float32
    (time stays float64 inside)."""
    y0 = (Y0S if batched else Y0).float()
    f = spiral(OMEGAS.float() if batched else 1.0)
    t = torch.tensor([0.0, 0.37, 1.2, 2.0], dtype=DTYPE)
    for method, kw in (("dopri5", {}), ("rk4", {"step_size": 0.1})):
        sol = neuralode.solve(f, y0, t, method=method, batched=batched, dense=True, **kw)
        assert sol.ys.dtype == torch.float32, method
        assert sol.evaluate(torch.tensor([0.5, 1.9], dtype=DTYPE)).dtype == torch.float32
        assert sol.t_end.dtype == DTYPE


def test_evaluate_shapes_and_tuple_states() -> None:
    """A scalar time gives one state, ``[M]`` times give ``[M, ...]``; batched ``[B, ...]`` and
    ``[B, M, ...]``; tuple states come back as tuples of those (each with its own features)."""
    f = spiral(1.0)

    def f_tuple(t: torch.Tensor, y: tuple) -> tuple:
        out = f(t, torch.cat(y, dim=-1))
        return out[..., :1], out[..., 1:]

    t = torch.tensor([0.0, 2.0], dtype=DTYPE)
    plain = neuralode.solve(f, Y0, t, dense=True)
    tup = neuralode.solve(f_tuple, (Y0[:1], Y0[1:]), t, dense=True)
    q = torch.tensor([0.3, 1.7], dtype=DTYPE)
    assert plain.evaluate(0.3).shape == (2,) and plain.evaluate(q).shape == (2, 2)
    one, two = tup.evaluate(0.3)
    assert one.shape == (1,) and two.shape == (1,)
    torch.testing.assert_close(torch.cat([one, two]), plain.evaluate(0.3), rtol=1e-12, atol=0)
    many = tup.evaluate(q)
    assert many[0].shape == (2, 1)
    torch.testing.assert_close(torch.cat(many, dim=-1), plain.evaluate(q), rtol=1e-12, atol=0)
    batched = neuralode.solve(spiral(OMEGAS), Y0S, GRIDS[:, [0, -1]], dense=True)
    assert batched.evaluate(2.0).shape == (3, 2)
    assert batched.evaluate(torch.tensor([1.5, 2.5], dtype=DTYPE)).shape == (3, 2, 2)
    per_row = torch.tensor([[0.3], [1.2], [3.6]], dtype=DTYPE)
    assert batched.evaluate(per_row).shape == (3, 1, 2)


@pytest.mark.parametrize("batched", [False, True])
def test_evaluate_takes_query_times_in_any_dtype(batched: bool) -> None:
    """Query times are converted to the solve's time dtype: float32, float64 and Python floats
    that are the same numbers give the same states (the query times here are exact in float16)."""
    if batched:
        f, y0, t = spiral(OMEGAS), Y0S, GRIDS[:, [0, -1]]
        q = [1.25, 2.5, 3.75]
    else:
        f, y0, t = spiral(1.5), Y0, torch.tensor([0.0, T_END], dtype=DTYPE)
        q = [0.25, 2.5, 4.75]
    sol = neuralode.solve(f, y0, t, rtol=RTOL, atol=ATOL, dense=True, batched=batched)
    want = sol.evaluate(torch.tensor(q, dtype=torch.float64))
    assert want.dtype == DTYPE
    for dtype in (torch.float32, torch.float16):
        got = sol.evaluate(torch.tensor(q, dtype=dtype))
        assert got.dtype == DTYPE and torch.equal(got, want), dtype
    one = sol.evaluate(q[1])
    assert torch.equal(one, want[:, 1] if batched else want[1])


@pytest.mark.parametrize("batched", [False, True])
def test_dense_output_past_a_failure_is_nan(batched):
    """A solve that stops short (too many steps, ``throw=False``) has no solution past where
    it stopped: ``evaluate`` there is NaN, as its outputs are, and before it the interpolant
    of the steps it took (the same as an unhindered solve's, whose first steps are these)."""
    f = lambda t, y: -y * torch.cos(10 * (t.unsqueeze(-1) if t.ndim else t))  # noqa: E731
    y0 = torch.ones(1, 2, dtype=torch.float64) if batched else torch.ones(2, dtype=torch.float64)
    t = torch.tensor([0.0, 5.0], dtype=torch.float64)
    sol = neuralode.solve(f, y0, t, batched=batched, dense=True, throw=False, max_num_steps=5)
    full = neuralode.solve(f, y0, t, batched=batched, dense=True)
    end = float(sol.t_end.reshape(-1)[0])
    assert not sol.success and 0.0 < end < 1.0
    tq = torch.tensor([0.5 * end, end, 4.0], dtype=torch.float64)
    got, ref = sol.evaluate(tq), full.evaluate(tq)
    if batched:
        got, ref = got[0], ref[0]
    torch.testing.assert_close(got[:2], ref[:2], rtol=1e-12, atol=1e-14)
    assert torch.isnan(got[2]).all()


class _SwitchingInterpolant(neuralode.solvers.Solver):
    """Explicit Euler on a fixed grid whose steps write their (linear) interpolant in one of
    two layouts, as a solver that switches methods (``method="auto"``) writes its steps'
    interpolants: ``ks = [k, 0]`` with ``P = [[1], [0]]``, or on the steps in ``other`` a
    second layout, ``[0, k]`` with ``[[0], [1]]`` (``"reordered"``: the same shape, other
    coefficients) or ``[k, 0, 0]`` with ``[[1], [0], [0]]`` (``"wider"``).  Each layout's
    coefficients are one tensor, kept as a solver keeps its constants."""

    name, order, dense_order = "switching_euler", 1, 1
    _P = torch.tensor([[1.0], [0.0]], dtype=DTYPE)
    _OTHER = {
        "reordered": torch.tensor([[0.0], [1.0]], dtype=DTYPE),
        "wider": torch.tensor([[1.0], [0.0], [0.0]], dtype=DTYPE),
    }

    def __init__(self, layout: str, other: tuple[int, ...]) -> None:
        self.layout, self.other = layout, other

    def init(self, f, t, y, f0):  # type: ignore[no-untyped-def]
        return 0

    def step(self, f, t, h, y, state, times=None):  # type: ignore[no-untyped-def]
        k = f(torch.as_tensor(t, dtype=y.dtype), y)
        return neuralode.solvers.StepResult(y + h * k, None, (k, state), state + 1, 1)

    def dense(self, f, t, h, y, result):  # type: ignore[no-untyped-def]
        k, index = result.dense_info
        zero = torch.zeros_like(k)
        if index not in self.other:
            ks, P = [k, zero], self._P
        elif self.layout == "reordered":
            ks, P = [zero, k], self._OTHER["reordered"]
        else:
            ks, P = [k, zero, zero], self._OTHER["wider"]
        return neuralode.solvers.DenseStep(y, h, ks, P), 0, None


@pytest.mark.parametrize("layout", ["reordered", "wider"])
@pytest.mark.parametrize("other", [(1,), (0,), (1, 3)])
def test_each_step_is_evaluated_with_its_own_coefficients(
    layout: str, other: tuple[int, ...]
) -> None:
    """Steps whose interpolants differ (in their coefficients, or in their number of vectors),
    the other layout on the second step only, the first only, or two: each query uses its own
    step's (Euler's steps are straight lines between the grid's states)."""
    ts = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=DTYPE)
    f = lambda t, y: -2.0 * y + t  # noqa: E731
    sol = neuralode.solve(
        f, torch.tensor([1.0], dtype=DTYPE), ts, method=_SwitchingInterpolant(layout, other),
        step_size=0.25, dense=True,
    )  # fmt: skip
    q = torch.tensor([0.1, 0.3, 0.4, 0.6, 0.9], dtype=DTYPE)
    i = (q / 0.25).floor().long()
    theta = (q - ts[i]) / 0.25
    want = sol.ys[i, 0] + theta * (sol.ys[i + 1, 0] - sol.ys[i, 0])
    torch.testing.assert_close(sol.evaluate(q)[:, 0], want, rtol=1e-14, atol=1e-14)
