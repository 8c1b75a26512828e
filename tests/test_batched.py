"""Batched solves are independent per-sample solves, and that saves work on mixed batches.

* Per-sample grids ``t: [B, T]`` -- rows over different intervals, one of them decreasing -- give
  every row the same outputs as solving that row alone (to 1e-12 in float64), with the same
  per-row ``nfe``, ``n_steps`` and ``n_accepted``, for every method.
* A heterogeneous batch (Van der Pol, mu from 0.5 to 5) costs fewer evaluations in total with
  per-sample step sizes (``batched=True``, ``sum(stats.nfe)``) than with one step size shared by
  the whole batch (the same tensor solved unbatched, where the error norm covers every row, so
  each of the ``B`` rows pays the shared ``nfe``).
* Tuple states work batched (the same answer as the concatenated tensor state).
* Shapes: ``stats``/``status``/``t_end`` are ``[]`` unbatched and ``[B]`` batched; ``ys`` is
  ``[B, T, ...]`` batched.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import ADAPTIVE, ALL_METHODS, tol_for

import neuralode
from neuralode import Status, get_solver

DTYPE = torch.float64


def forced_vdp(t: torch.Tensor, y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Forced Van der Pol; works for one row (``t: []``, ``y: [2]``) or a batch
    (``t: [B]``, ``y: [B, 2]``, ``mu: [B]``)."""
    x, v = y[..., 0], y[..., 1]
    return torch.stack([v, mu * (1 - x**2) * v - x + 0.5 * torch.cos(t)], dim=-1)


# Four rows over different intervals; row 2 runs backward in time.
GRIDS = torch.tensor(
    [
        [0.0, 0.5, 1.0, 2.0, 3.0],
        [1.0, 1.5, 2.5, 3.0, 5.0],
        [2.0, 1.0, 0.0, -0.5, -2.0],
        [-3.0, -2.9, -2.0, -1.0, 0.5],
    ],
    dtype=DTYPE,
)
MUS = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=DTYPE)
Y0S = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.5, 0.5], [-1.0, 2.0]], dtype=DTYPE)


def _kw(method: str) -> dict:
    # Fixed-step methods step at 0.05 (outputs then fall inside steps: the interpolation path);
    # explicit_adams at 0.02: its real stability interval (about [-0.3, 0] for order 4) does not
    # hold h * lambda = -0.45 of the mu = 3 row at 0.05, which then blows up.
    if get_solver(method).adaptive:
        return dict(rtol=tol_for(method, 1e-6), atol=tol_for(method, 1e-8))
    return dict(step_size=0.02 if method == "explicit_adams" else 0.05)


@functools.cache
def _grid_solves(method: str) -> tuple[neuralode.Solution, list[neuralode.Solution], set]:
    """The batched solve over ``GRIDS`` and each row solved alone (shared by two tests)."""
    calls: set[tuple[int, ...]] = set()

    def f_batch(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.add(tuple(t.shape))
        return forced_vdp(t, y, MUS)

    sol = neuralode.solve(f_batch, Y0S, GRIDS, method=method, **_kw(method))
    rows = [
        neuralode.solve(
            lambda t, y, mu=MUS[i]: forced_vdp(t, y, mu),
            Y0S[i],
            GRIDS[i],
            method=method,
            **_kw(method),
        )
        for i in range(GRIDS.shape[0])
    ]
    return sol, rows, calls


@pytest.mark.parametrize("method", ALL_METHODS)
def test_per_sample_grids_match_single_row_solves(method: str) -> None:
    sol, rows, calls = _grid_solves(method)
    assert sol.success
    assert calls == {(4,)}  # func sees every row's own time
    assert sol.ys.shape == (4, 5, 2) and torch.equal(sol.ts, GRIDS)
    for i, one in enumerate(rows):
        torch.testing.assert_close(sol.ys[i], one.ys, rtol=1e-12, atol=1e-12)
        for k in ("n_steps", "n_accepted", "n_rejected"):
            assert int(getattr(sol.stats, k)[i]) == int(getattr(one.stats, k)), (i, k)
        assert float(sol.t_end[i]) == float(GRIDS[i, -1])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_per_sample_grids_same_per_row_nfe(method: str) -> None:
    sol, rows, _ = _grid_solves(method)
    got = sol.stats.nfe.tolist()
    want = [int(one.stats.nfe) for one in rows]
    assert got == want, f"batched per-row nfe {got}, rows alone {want}"


@pytest.mark.parametrize("method", ADAPTIVE)
def test_per_sample_step_sizes_save_work_on_a_heterogeneous_batch(method: str) -> None:
    mus = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=DTYPE)
    y0 = torch.tensor([[2.0, 0.0]] * 4, dtype=DTYPE)
    t = torch.linspace(0.0, 10.0, 11, dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mus * (1 - x**2) * v - x], dim=-1)

    tol = tol_for(method, 1e-6)
    per_sample = neuralode.solve(f, y0, t, method=method, rtol=tol, atol=tol, batched=True)
    shared = neuralode.solve(f, y0, t, method=method, rtol=tol, atol=tol, batched=False)
    total_per_sample = int(per_sample.stats.nfe.sum())
    total_shared = int(shared.stats.nfe) * y0.shape[0]
    print(
        f"{method}: per-sample nfe {per_sample.stats.nfe.tolist()} (total {total_per_sample}); "
        f"shared step nfe {int(shared.stats.nfe)} x 4 rows = {total_shared}; "
        f"ratio {total_per_sample / total_shared:.2f}"
    )
    assert per_sample.stats.nfe.shape == (4,) and shared.stats.nfe.shape == ()
    assert total_per_sample < 0.85 * total_shared
    # Each row alone is cheaper than the shared step; the hardest row costs about the shared nfe.
    assert int(per_sample.stats.nfe.max()) <= 1.1 * int(shared.stats.nfe)
    # Same problem, both within tolerance of each other.
    torch.testing.assert_close(per_sample.ys, shared.ys.transpose(0, 1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_tuple_state_batched(method: str) -> None:
    omega = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)
    pos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=DTYPE)
    vel = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-0.5, 0.0]], dtype=DTYPE)
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 2.0], [1.0, 0.5, 0.0]], dtype=DTYPE)
    w2 = omega.square().unsqueeze(-1)

    def f_tuple(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]):
        assert t.shape == (3,)
        p, v = y
        assert p.shape == (3, 2) and v.shape == (3, 2)
        return v, -w2 * p

    def f_flat(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y[:, 2:], -w2 * y[:, :2]], dim=1)

    kw = _kw(method) if method != "rk4" else dict(step_size=0.01)
    sol = neuralode.solve(f_tuple, (pos, vel), t, method=method, **kw)
    flat = neuralode.solve(f_flat, torch.cat([pos, vel], dim=1), t, method=method, **kw)
    assert isinstance(sol.ys, tuple) and len(sol.ys) == 2
    assert sol.ys[0].shape == (3, 3, 2) and sol.ys[1].shape == (3, 3, 2)
    torch.testing.assert_close(torch.cat(sol.ys, dim=-1), flat.ys, rtol=1e-12, atol=1e-12)
    assert torch.equal(sol.stats.nfe, flat.stats.nfe)
    # Exact solution of the oscillator p'' = -w^2 p (to the method's accuracy).
    dt = (t - t[:, :1]).unsqueeze(-1)
    w = omega.view(3, 1, 1)
    exact = pos.unsqueeze(1) * torch.cos(w * dt) + vel.unsqueeze(1) / w * torch.sin(w * dt)
    torch.testing.assert_close(sol.ys[0], exact, rtol=0, atol=1e-6)


def test_stats_and_status_shapes() -> None:
    f = lambda t, y: -y  # noqa: E731
    t = torch.linspace(0.0, 1.0, 4, dtype=DTYPE)
    one = neuralode.solve(f, torch.ones(3, dtype=DTYPE), t)
    assert one.ys.shape == (4, 3)
    for v in (one.stats.nfe, one.stats.n_steps, one.stats.n_accepted, one.stats.n_rejected):
        assert v.shape == () and v.dtype == torch.int64
    assert one.status.shape == () and one.t_end.shape == ()
    assert int(one.status) == Status.SUCCESS
    assert one.stats.n_steps == one.stats.n_accepted + one.stats.n_rejected

    many = neuralode.solve(f, torch.ones(5, 3, dtype=DTYPE), t, batched=True)
    assert many.ys.shape == (5, 4, 3) and many.ts.shape == (4,)
    for v in vars(many.stats).values():
        assert v.shape == (5,) and v.dtype == torch.int64
    assert many.status.shape == (5,) and many.t_end.shape == (5,)
    assert torch.equal(many.stats.n_steps, many.stats.n_accepted + many.stats.n_rejected)
    counters = {"nfe", "n_steps", "n_accepted", "n_rejected", "njev", "nlu", "n_newton"}
    assert set(many.stats.as_dict()) == counters
    assert not (many.stats.njev.any() or many.stats.nlu.any() or many.stats.n_newton.any())
    # Identical rows: identical work, and the same as the unbatched solve of one row.
    assert torch.equal(many.stats.nfe, one.stats.nfe.expand(5))
    torch.testing.assert_close(many.ys, one.ys.expand(5, 4, 3), rtol=1e-14, atol=1e-14)
