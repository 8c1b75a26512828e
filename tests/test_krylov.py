"""The matrix-free path of the ESDIRK methods: GMRES on finite-difference products ``J v``.

* :func:`gmres` solves batched systems per row: to LAPACK's solution, each row stopping at its
  own tolerance (an exact solution found early, a zero right-hand side), with restarts.
* The finite-difference product agrees with the Jacobian to ``sqrt(eps)``.
* ``NewtonSettings(linear="gmres")`` solves the stiff problems to scipy ``Radau``'s reference
  within kvaerno5's bound of ``test_stiff.py`` (60 tolerance units on OREGO), with no Jacobian
  and no factorisation; a Krylov space smaller than the state (inexact Newton) still converges
  (the Brusselator, 40 components, dimension 10); batched rows keep their own steps.
* Right preconditioning: an exact one solves in one product, a Jacobi one in fewer; the
  Brusselator with its diffusion as the preconditioner needs a third of the evaluations.
* Gradients: ``gradcheck`` in float64 through the implicit function theorem with the transposed
  system solved by GMRES (restarted), backprop and checkpoint; the adjoint agrees with backprop,
  with and without a preconditioner (which only the forward system's solves call); the
  gradient's transposed solves take ``preconditioner_transposed`` (a fraction of the products on
  a stiff Brusselator, the same gradient).
* An event is located on a GMRES solve where the dense path locates it.
* ``linear="auto"`` picks GMRES from ``KRYLOV_MIN_ENTRIES`` (one system:
  ``KRYLOV_MIN_ENTRIES_ONE``) entries of the dense matrices
  (``batch * N^2``), dense below and for a field with its own Jacobian; bad settings are
  refused by name.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from stiff_problems import PROBLEMS, brusselator, brusselator_preconditioner

import neuralode
from neuralode.solvers import esdirk
from neuralode.solvers.esdirk import Esdirk, NewtonSettings
from neuralode.solvers.krylov import KrylovTransposedSolve, gmres, jvp
from neuralode.solvers.tableaus import ESDIRK_TABLEAUS

scipy_integrate = pytest.importorskip(
    "scipy.integrate", reason="needs scipy: pip install -e '.[dev]'"
)

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64


def _systems(B: int, N: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(N, dtype=DTYPE) + 0.6 * torch.randn(B, N, N, generator=g, dtype=DTYPE) / N**0.5


def _matvec(A: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda v: torch.bmm(A, v.unsqueeze(2)).squeeze(2)


# -- GMRES -----------------------------------------------------------------------------------------
def test_gmres_solves_batched_systems_per_row() -> None:
    A = _systems(4, 12)
    b = torch.randn(4, 12, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    x, products, ok = gmres(_matvec(A), b, 1e-12 * b.norm(dim=1), 12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)
    assert bool(ok.all()) and bool((products <= 12).all()) and bool((products >= 8).all())


def test_gmres_stops_each_row_at_its_own_convergence() -> None:
    """Row 0: the identity (one product); row 1: three distinct eigenvalues (the Krylov space
    stops growing after three products, an exact solution: the breakdown path); row 2: a zero
    right-hand side (no product); row 3: a general system (all twelve)."""
    N = 12
    A = _systems(4, N)
    A[0] = torch.eye(N, dtype=DTYPE)
    A[1] = torch.diag(torch.tensor([1.0, 2.0, 5.0] * 4, dtype=DTYPE))
    b = torch.randn(4, N, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    b[2] = 0
    x, products, ok = gmres(_matvec(A), b, torch.full((4,), 1e-11, dtype=DTYPE), N)
    assert products.tolist()[:3] == [1, 3, 0] and int(products[3]) >= 9
    assert bool(ok.all()) and torch.isfinite(x).all()
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)


def test_gmres_restarts() -> None:
    A = _systems(2, 40, seed=3)
    b = torch.randn(2, 40, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    tol = 1e-10 * b.norm(dim=1)
    _, _, ok = gmres(_matvec(A), b, tol, 5)
    assert not bool(ok.any())  # one cycle of 5 is not enough
    x, products, ok = gmres(_matvec(A), b, tol, 5, restarts=30)
    assert bool(ok.all()) and bool((products > 5).all())
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_gmres_keeps_its_contract(seed: int) -> None:
    """Random batches of systems, Krylov dimensions, restarts, tolerances and preconditioners:
    a row reported converged has a true residual ``||b - A x||`` at most its ``tol``; the
    products are counted per row as ``long`` and the operator is applied exactly as often as the
    busiest row's count (none after every row is done), at most ``restarts + 1`` cycles of
    ``max_dim`` plus a residual per restart; a right-hand side already within ``tol`` (zero
    with ``tol = 0`` too) takes no product and returns ``x = 0``; one cycle by default."""
    g = torch.Generator().manual_seed(seed)
    N = (6, 20, 20, 40)[seed]
    B = 5
    A = _systems(B, N, seed=seed + 10)
    b = torch.randn(B, N, dtype=DTYPE, generator=g)
    b[0] = 0
    b[1] *= 1e-9
    D = torch.diagonal(A, dim1=1, dim2=2)
    for max_dim in (1, 3, N):
        for restarts in (0, 1, 3):
            for rel in (1e-2, 1e-6, 1e-11):
                tol = rel * b.norm(dim=1).clamp_min(1.0)
                tol[0], tol[1] = 0.0, 2 * b[1].norm()
                for pre in (None, lambda v: v / D):
                    calls = {"n": 0}

                    def counted(v: torch.Tensor, calls: dict = calls) -> torch.Tensor:
                        calls["n"] += 1
                        return _matvec(A)(v)

                    x, products, ok = gmres(counted, b, tol, max_dim, restarts, precondition=pre)
                    case = (max_dim, restarts, rel, pre is not None)
                    assert products.dtype == torch.long, case
                    assert calls["n"] == int(products.max()), (case, calls, products)
                    assert bool((products <= (restarts + 1) * max_dim + restarts).all()), case
                    residual = (b - _matvec(A)(x)).norm(dim=1)
                    assert bool((residual[ok] <= tol[ok] * (1 + 1e-6) + 1e-300).all()), (
                        case,
                        residual,
                        tol,
                        ok,
                    )
                    assert bool(ok[:2].all()) and products[:2].tolist() == [0, 0], case
                    assert bool((x[:2] == 0).all()), case
                    if max_dim != 3 or rel != 1e-6:
                        continue
                    # Each row as it would be alone (its own space, stopping test, count).
                    for i in range(B):
                        xi, pi, oki = gmres(
                            _matvec(A[i : i + 1]), b[i : i + 1], tol[i : i + 1], max_dim,
                            restarts, precondition=None if pre is None else lambda v, d=D[i]: v / d,
                        )  # fmt: skip
                        assert pi.tolist() == products[i : i + 1].tolist(), (case, i)
                        assert oki.tolist() == ok[i : i + 1].tolist(), (case, i)
                        torch.testing.assert_close(xi[0], x[i], rtol=1e-10, atol=1e-13)
    # The default is one cycle: a system that needs more is reported as not converged.
    x, products, ok = gmres(_matvec(A), b, 1e-12 * b.norm(dim=1), 2)
    assert not bool(ok[2:].any()) and products[2:].tolist() == [2, 2, 2]
    # Each restart minimises the residual over the last solution plus a Krylov space: it never
    # grows from cycle to cycle, and falls while the rows are not solved.
    tight = torch.zeros(B, dtype=DTYPE)
    last = b[2:].norm(dim=1)
    for restarts in range(4):
        x, _, _ = gmres(_matvec(A), b, tight, 2, restarts)
        now = (b - _matvec(A)(x)).norm(dim=1)[2:]
        assert bool((now < last).all()), (restarts, now, last)
        last = now


def test_gmres_stops_at_the_first_product_within_tol() -> None:
    """GMRES's residual after ``k`` products is the least ``||b - A x||`` over the Krylov space
    of ``k`` vectors (computed here independently, by least squares on an orthonormal basis of
    ``[b, A b, ..., A^{k-1} b]``); a row stops at the first ``k`` where that is within ``tol``,
    so its residual estimate must be the true one (not a multiple of it)."""
    N, B = 10, 3
    A = _systems(B, N, seed=21)
    b = torch.randn(B, N, dtype=DTYPE, generator=torch.Generator().manual_seed(22))
    least = torch.zeros(B, N + 1, dtype=DTYPE)
    for i in range(B):
        K = [b[i]]
        for _ in range(N - 1):
            K.append(A[i] @ K[-1])
        for k in range(N + 1):
            if k == 0:
                least[i, 0] = b[i].norm()
                continue
            Q, _ = torch.linalg.qr(torch.stack(K[:k], 1))
            y = torch.linalg.lstsq(A[i] @ Q, b[i].unsqueeze(1)).solution
            least[i, k] = (b[i] - A[i] @ Q @ y.squeeze(1)).norm()
    for k in range(1, N - 1):
        # A tolerance a third of the way (in logarithm) from the k-th residual to the previous.
        tol = least[:, k] ** (2 / 3) * least[:, k - 1] ** (1 / 3)
        _, products, ok = gmres(_matvec(A), b, tol, N)
        assert bool(ok.all()) and products.tolist() == [k] * B, (
            k,
            products,
            least[:, k - 1 : k + 1],
        )


def test_one_cycle_of_gmres_minimises_the_residual_over_its_space() -> None:
    """After one cycle of ``k < N`` products the solution is the least-squares one over the
    Krylov space of ``k`` vectors: its true residual is the least (computed independently by
    least squares on ``[b, A b, ..., A^{k-1} b]``), not merely a smaller one."""
    N, B = 8, 3
    A = _systems(B, N, seed=31)
    b = torch.randn(B, N, dtype=DTYPE, generator=torch.Generator().manual_seed(32))
    for k in (1, 2, 4, 7):
        x, products, ok = gmres(_matvec(A), b, torch.zeros(B, dtype=DTYPE), k)
        assert products.tolist() == [k] * B and not bool(ok.any())
        for i in range(B):
            K = [b[i]]
            for _ in range(k - 1):
                K.append(A[i] @ K[-1])
            Q, _ = torch.linalg.qr(torch.stack(K, 1))
            y = torch.linalg.lstsq(A[i] @ Q, b[i].unsqueeze(1)).solution.squeeze(1)
            least = (b[i] - A[i] @ Q @ y).norm()
            torch.testing.assert_close((b[i] - A[i] @ x[i]).norm(), least, rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(x[i], Q @ y, rtol=1e-8, atol=1e-12)


def test_gmres_on_a_singular_space_stops_unconverged() -> None:
    """A Krylov space on which ``A`` is singular (``A = [[0, 1], [0, 0]]``, ``b = e1``: ``A b =
    0``, though ``x = e2`` solves it) cannot lower the residual: the row stops after the product
    that shows it, reported not converged with ``x = 0`` (residual ``||b||``), restarts or
    not, while the batch's other row converges.  It was reported converged, its residual 1."""
    A = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]]], dtype=DTYPE)
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=DTYPE)
    for restarts in (0, 3):
        x, products, ok = gmres(_matvec(A), b, torch.full((2,), 1e-10, dtype=DTYPE), 2, restarts)
        assert ok.tolist() == [False, True] and products.tolist() == [1, 2]
        assert torch.equal(x[0], torch.zeros(2, dtype=DTYPE))
        torch.testing.assert_close(x[1], torch.tensor([0.5, 1.0], dtype=DTYPE))
    # Singular on its space at the second product, exactly (A = diag(0, 0, 2, 2), b = ones:
    # the basis is exact in binary, and the second column rotates to exactly zero): the
    # least-squares solution over the first column's space, x = b / 2, residual sqrt(2).
    D = torch.diag(torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=DTYPE)).unsqueeze(0)
    b1 = torch.ones(1, 4, dtype=DTYPE)
    x, products, ok = gmres(_matvec(D), b1, torch.full((1,), 1e-10, dtype=DTYPE), 4)
    assert ok.tolist() == [False] and products.tolist() == [2]
    torch.testing.assert_close(x, b1 / 2)
    # A singular A whose Krylov space holds the solution: found, in the products it needs.
    S = torch.diag(torch.tensor([0.0, 1.0, 3.0], dtype=DTYPE)).unsqueeze(0)
    x, products, ok = gmres(_matvec(S), torch.tensor([[0.0, 1.0, 3.0]], dtype=DTYPE),
                            torch.full((1,), 1e-12, dtype=DTYPE), 3)  # fmt: skip
    assert ok.tolist() == [True] and products.tolist() == [2]
    torch.testing.assert_close(x[0], torch.tensor([0.0, 1.0, 1.0], dtype=DTYPE))


def test_right_preconditioning() -> None:
    """With ``M = A`` one product solves each row; with ``M`` = ``A``'s diagonal, fewer
    products than without, and the residual tested is ``A x - b`` itself."""
    A = _systems(3, 30, seed=6) + 4 * torch.diag(torch.linspace(0, 20, 30, dtype=DTYPE))
    b = torch.randn(3, 30, dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    tol = 1e-10 * b.norm(dim=1)
    exact = torch.linalg.solve(A, b)
    x, products, ok = gmres(_matvec(A), b, tol, 30, precondition=lambda v: torch.linalg.solve(A, v))
    assert products.tolist() == [1, 1, 1] and bool(ok.all())
    torch.testing.assert_close(x, exact)
    plain = gmres(_matvec(A), b, tol, 30)[1]
    D = torch.diagonal(A, dim1=1, dim2=2)
    x, jacobi, ok = gmres(_matvec(A), b, tol, 30, precondition=lambda v: v / D)
    assert bool(ok.all()) and bool((jacobi < plain).all()), (jacobi, plain)
    torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("batched", [False, True])
def test_finite_difference_product_is_the_jacobians(batched: bool) -> None:
    f, _, y0 = brusselator(6)
    z = torch.tensor(y0, dtype=DTYPE)
    t = torch.tensor(0.0, dtype=DTYPE)
    v = torch.randn(z.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    J = torch.autograd.functional.jacobian(lambda y: f(t, y), z)
    exact = J @ v
    if batched:
        z, v, t = z.expand(3, -1), torch.stack([v, 0 * v, 2 * v]), t.expand(3)
        got = jvp(f, t, z, f(t, z), v)
        torch.testing.assert_close(
            got, torch.stack([exact, 0 * exact, 2 * exact]), rtol=1e-6, atol=1e-6
        )
        assert bool((got[1] == 0).all())  # a zero direction: zero, not 0/0
    else:
        torch.testing.assert_close(jvp(f, t, z, f(t, z), v), exact, rtol=1e-6, atol=1e-6)


def test_finite_difference_increment_is_sundials_per_row() -> None:
    """The increment is ``delta = sqrt(eps) (1 + ||z||) / ||v||`` with root-mean-square norms of
    each row's own ``z`` and ``v``: ``f(y) = y^2`` at ``z = 0`` returns ``delta v^2`` exactly; a
    batch of rows of very different size (a state of 1e4, one of RMS norm exactly 1, a scalar
    state per row) gives each row what it gets alone, and stays accurate at ``|z| = 1e4``; a
    zero direction gives zero even for a field that is not deterministic (dropout)."""
    eps = torch.finfo(DTYPE).eps
    square = lambda t, y: y * y  # noqa: E731
    t = torch.tensor(0.0, dtype=DTYPE)
    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DTYPE)
    z = torch.zeros(4, dtype=DTYPE)
    delta = eps**0.5 * 1.0 / float(v.square().mean().sqrt())
    torch.testing.assert_close(
        jvp(square, t, z, square(t, z), v), delta * v * v, rtol=1e-12, atol=0
    )

    f, _, y0 = brusselator(3)
    g = torch.Generator().manual_seed(7)
    zs = torch.stack([torch.tensor(y0, dtype=DTYPE), 1e4 * torch.ones(6, dtype=DTYPE)])
    zs = torch.cat([zs, torch.ones(1, 6, dtype=DTYPE)])  # RMS norm exactly 1
    vs = torch.randn(3, 6, dtype=DTYPE, generator=g) * torch.tensor([[1.0], [1e-3], [50.0]])
    tb = t.expand(3)
    batch = jvp(f, tb, zs, f(tb, zs), vs)
    for i in range(3):
        alone = jvp(f, t, zs[i], f(t, zs[i]), vs[i])
        torch.testing.assert_close(batch[i], alone, rtol=1e-13, atol=0)
        J = torch.autograd.functional.jacobian(lambda y: f(t, y), zs[i])
        torch.testing.assert_close(alone, J @ vs[i], rtol=1e-6, atol=0)

    # One component per row (a state of shape [batch]): each row's own norms.
    cube = lambda t, y: y**3  # noqa: E731
    zc = torch.tensor([0.5, 1e3, -2.0], dtype=DTYPE)
    vc = torch.tensor([1.0, 1e-2, 4.0], dtype=DTYPE)
    batch = jvp(cube, tb, zc, cube(tb, zc), vc)
    for i in range(3):
        alone = jvp(cube, t, zc[i], cube(t, zc[i]), vc[i])
        torch.testing.assert_close(batch[i], alone, rtol=1e-13, atol=0)
        torch.testing.assert_close(alone, 3 * zc[i] ** 2 * vc[i], rtol=1e-6, atol=0)

    # A direction of RMS norm exactly 1 is an ordinary one.
    ones = torch.ones(4, dtype=DTYPE)
    torch.testing.assert_close(jvp(cube, t, ones, cube(t, ones), ones), 3 * ones, rtol=1e-6, atol=0)
    # A zero direction is not evaluated into the product: f(z) - f(z) of a noisy field is not 0.
    noisy = lambda t, y: y + torch.randn(y.shape, dtype=y.dtype)  # noqa: E731
    zs, vs = torch.ones(2, 4, dtype=DTYPE), torch.stack([torch.zeros(4, dtype=DTYPE), ones])
    got = jvp(noisy, tb[:2], zs, noisy(tb[:2], zs), vs)
    assert bool((got[0] == 0).all())


def test_transposed_solve_warns_when_it_does_not_converge() -> None:
    """The gradient's solve: 21 cycles of dimension 1 cannot solve a stiff 50-component system
    to round-off, and the user is told the gradient is approximate."""
    f, _, y0 = brusselator(25)
    z, t = torch.tensor(y0, dtype=DTYPE), torch.tensor(0.0, dtype=DTYPE)
    solve_t = KrylovTransposedSolve(f, t, z, 0.1, max_dim=1)
    want = (
        "the gradient's linear solve (I - h gamma J)^T u = v of an ESDIRK stage did not converge "
        "in 21 GMRES iterations; the gradient is approximate (give "
        "NewtonSettings.preconditioner_transposed, raise NewtonSettings.krylov_dim, or use "
        "linear='dense')"
    )
    with pytest.warns(RuntimeWarning, match=f"^{re.escape(want)}$") as caught:
        solve_t(torch.ones_like(z))
    assert len(caught) == 1
    exact = torch.linalg.solve(
        torch.eye(50, dtype=DTYPE)
        - 0.1 * torch.autograd.functional.jacobian(lambda y: f(t, y), z).T,
        torch.ones_like(z),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a solve that converges says nothing
        got = KrylovTransposedSolve(f, t, z, 0.1, 30)(torch.ones_like(z))
    torch.testing.assert_close(got, exact)


def test_the_transposed_solves_warning_points_at_its_caller() -> None:
    """(Apart from the test above: under the mutation runner a trampoline frame sits between
    the caller and the solve, so this one test cannot run there.)"""
    f, _, y0 = brusselator(25)
    z, t = torch.tensor(y0, dtype=DTYPE), torch.tensor(0.0, dtype=DTYPE)
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        KrylovTransposedSolve(f, t, z, 0.1, max_dim=1)(torch.ones_like(z))
    assert len(caught) == 1 and caught[0].filename == __file__


def test_transposed_solve_per_row_at_any_scale() -> None:
    """A batch whose rows' right-hand sides differ by 1e18 in size (and one row alone scaled by
    1e-12 and 1e12): each row is solved to its own relative accuracy, as alone, with no
    warning; a tolerance from the whole batch (or one block system for it) left the small rows
    unsolved."""
    g = torch.Generator().manual_seed(5)
    N, hg = 12, 0.3
    A = -torch.diag(torch.logspace(0, 3, N, dtype=DTYPE)) + 0.5 * torch.randn(
        N, N, dtype=DTYPE, generator=g
    )

    def f(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ A.T

    eye = torch.eye(N, dtype=DTYPE)
    exact = lambda v: torch.linalg.solve(eye - hg * A.T, v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    scales = torch.tensor([1.0, 1e-9, 1e9, 1e-6], dtype=DTYPE)
    v = torch.randn(4, N, dtype=DTYPE, generator=g) * scales[:, None]
    z = torch.randn(4, N, dtype=DTYPE, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = KrylovTransposedSolve(f, torch.zeros(4, dtype=DTYPE), z, hg, N)(v)
        for i in range(4):
            want = exact(v[i])
            torch.testing.assert_close(batch[i], want, rtol=1e-10, atol=0)
            for s in (1e-12, 1e12):
                alone = KrylovTransposedSolve(f, torch.tensor(0.0, dtype=DTYPE), z[i], hg, N)
                torch.testing.assert_close(alone(s * v[i]), s * want, rtol=1e-10, atol=0)


def test_transposed_solve_of_a_field_that_ignores_the_state() -> None:
    """A field that depends on a parameter only, taken through ``torch.autograd.grad`` (it says
    ``no_torch_func``): its Jacobian is zero, so ``u = v`` (autograd reports no gradient for the
    state, which is a zero, not an error)."""
    theta = torch.tensor([2.0, -1.0, 0.5], dtype=DTYPE, requires_grad=True)

    class Drift:
        no_torch_func = True

        def __call__(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return theta.expand_as(z) * torch.cos(t).reshape(*t.shape, *[1] * (z.ndim - t.ndim))

    v = torch.tensor([1.0, -2.0, 3.0], dtype=DTYPE)
    for z, t in (
        (torch.ones(3, dtype=DTYPE), torch.tensor(0.0, dtype=DTYPE)),
        (torch.ones(2, 3, dtype=DTYPE), torch.zeros(2, dtype=DTYPE)),
    ):
        got = KrylovTransposedSolve(Drift(), t, z, 0.5, 4)(v.expand_as(z))
        torch.testing.assert_close(got, v.expand_as(z), rtol=0, atol=0)


# -- ESDIRK with GMRES -----------------------------------------------------------------------------
def _solver(linear: str, krylov_dim: int = 30, method: str = "kvaerno5") -> Esdirk:
    return Esdirk(ESDIRK_TABLEAUS[method], NewtonSettings(linear=linear, krylov_dim=krylov_dim))


def _units(sol: neuralode.Solution, ref: np.ndarray, rtol: float, atol: float) -> float:
    return float((np.abs(sol.ys.numpy() - ref) / (atol + rtol * np.abs(ref))).max())


@pytest.mark.parametrize("problem", ["robertson", "vdp_mu1e3", "hires", "orego"])
def test_stiff_problems_by_gmres_as_dense(problem: str) -> None:
    """GMRES (dimension 30, at least the state's size here) with finite-difference products,
    no Jacobian or factorisation taken: within kvaerno5's bound of ``test_stiff.py`` (30
    tolerance units against scipy ``Radau`` at rtol 1e-10).  Measured at rtol 1e-6, dense /
    GMRES: robertson 3.2 / 2.3, vdp_mu1e3 2.1 / 10, hires 0.98 / 18, orego 11 / 42.  The GMRES
    path is Newton's method proper, which converges where the dense path's chord iteration
    fails and shrinks the step (HIRES's last phase: a step of 30 is 6e-4 units from its stages
    solved to round-off, where the chord iteration fails); larger steps, each within its local
    tolerance, larger global errors on the relaxation oscillator OREGO (scipy ``BDF``: 58
    units there).  With the products at the step's start instead (the chord iteration, as
    the dense path) the errors were the dense path's (hires 0.96, orego 11.5) for twice the
    products."""
    f, f_np, y0, ts, scale = PROBLEMS[problem]
    rtol = 1e-6
    atol = rtol * scale
    ref = scipy_integrate.solve_ivp(
        f_np, (ts[0], ts[-1]), y0, method="Radau", t_eval=ts, rtol=1e-10, atol=1e-10 * scale
    ).y.T
    y0_t, ts_t = torch.tensor(y0, dtype=DTYPE), torch.tensor(ts, dtype=DTYPE)
    units = {}
    for linear in ("dense", "gmres"):
        sol = neuralode.solve(f, y0_t, ts_t, method=_solver(linear), rtol=rtol, atol=atol)
        units[linear] = _units(sol, ref, rtol, atol)
        if linear == "gmres":
            assert int(sol.stats.njev) == 0 and int(sol.stats.nlu) == 0
    print(problem, units)
    assert units["gmres"] < (60 if problem == "orego" else 30), units


def _bruss(M: int, n_out: int, ref_rtol: float, ref_atol: float):  # type: ignore[no-untyped-def]
    """BRUSS on ``M`` points over [0, 10]: the field, ``y0``, ``n_out`` output times and scipy
    ``Radau``'s solution there at the given tolerances."""
    f, f_np, y0 = brusselator(M)
    ts = np.linspace(0, 10, n_out)
    ref = scipy_integrate.solve_ivp(
        f_np, (0, 10), y0, method="Radau", t_eval=ts, rtol=ref_rtol, atol=ref_atol
    ).y.T
    return f, torch.tensor(y0, dtype=DTYPE), torch.tensor(ts, dtype=DTYPE), ref


def test_inexact_newton_on_the_brusselator() -> None:
    """40 components, a Krylov space of 10: each Newton system is solved inexactly, and the
    solve still reaches Radau's solution; the products are counted in ``nfe``."""
    f, y0_t, ts_t, ref = _bruss(20, 5, 1e-11, 1e-13)
    rtol, atol = 1e-6, 1e-8
    dense = neuralode.solve(f, y0_t, ts_t, method=_solver("dense"), rtol=rtol, atol=atol)
    krylov = neuralode.solve(f, y0_t, ts_t, method=_solver("gmres", 10), rtol=rtol, atol=atol)
    units = _units(dense, ref, rtol, atol), _units(krylov, ref, rtol, atol)
    print("bruss 20: dense, gmres units", units, dense.stats.as_dict(), krylov.stats.as_dict())
    assert krylov.success and units[1] < max(1.5 * units[0], 2.0)
    # Every Newton iteration costs its evaluation and at least one product.
    assert int(krylov.stats.nfe) > int(krylov.stats.n_steps) + 2 * int(krylov.stats.n_newton)


def test_gmres_steps_count_every_evaluation_and_take_no_jacobian(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A matrix-free step takes ``f(t, y)`` alone at its start (no Jacobian: its forward pass
    and products would be wasted), and ``nfe`` is every call of the field, the
    finite-difference products included, with rejected steps."""
    import neuralode.solvers.rosenbrock as rosenbrock

    taken: list[int] = []
    real = rosenbrock.jacobian

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        taken.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rosenbrock, "jacobian", counting)
    f, _, y0 = brusselator(5)
    calls = [0]

    def counted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return f(t, y)

    ts = torch.tensor([0.0, 10.0], dtype=DTYPE)
    sol = neuralode.solve(counted, torch.tensor(y0, dtype=DTYPE), ts, method=_solver("gmres", 10),
                          rtol=1e-6, atol=1e-8)  # fmt: skip
    assert sol.success and int(sol.stats.n_rejected) > 0
    assert int(sol.stats.nfe) == calls[0]
    assert not taken and int(sol.stats.njev) == 0


def test_preconditioned_gmres_on_the_brusselator() -> None:
    """BRUSS on 50 points (100 components, stiffness 4 alpha (M + 1)^2 = 208): unpreconditioned,
    each Newton system fills its Krylov space; with the diffusion solved exactly as the
    preconditioner (``stiff_problems.brusselator_preconditioner``), a few products per
    system (measured: 5,812 evaluations against 1,711, as many steps), and Radau's solution
    within the dense path's bound."""
    M = 50
    f, y0_t, ts_t, ref = _bruss(M, 3, 1e-10, 1e-12)
    rtol, atol = 1e-4, 1e-6
    plain = neuralode.solve(f, y0_t, ts_t, method=_solver("gmres"), rtol=rtol, atol=atol)
    settings = NewtonSettings(preconditioner=brusselator_preconditioner(M))  # "auto": GMRES
    pc = neuralode.solve(
        f, y0_t, ts_t, method=Esdirk(ESDIRK_TABLEAUS["kvaerno5"], settings), rtol=rtol, atol=atol
    )
    print("bruss 50 plain / preconditioned:", plain.stats.as_dict(), pc.stats.as_dict())
    assert int(pc.stats.njev) == 0 and pc.success
    assert 3 * int(pc.stats.nfe) < int(plain.stats.nfe)
    assert _units(pc, ref, rtol, atol) < 30


def test_batched_rows_keep_their_own_steps_with_gmres() -> None:
    """Three Brusselators with different diffusion solved together give each one's own solve
    (per-row Krylov spaces, per-row counts)."""
    M, ts = 10, torch.tensor([0.0, 2.0, 5.0], dtype=DTYPE)
    alphas = (0.01, 0.02, 0.05)
    alpha = torch.tensor(alphas, dtype=DTYPE).unsqueeze(1)  # one per row, broadcast
    batch_f, _, y0_np = brusselator(M, alpha)  # type: ignore[arg-type]
    y0 = torch.tensor(y0_np, dtype=DTYPE)
    kw = {"method": _solver("gmres", 8), "rtol": 1e-6, "atol": 1e-8}
    batch = neuralode.solve(batch_f, y0.expand(3, -1), ts, batched=True, **kw)
    for i, a in enumerate(alphas):
        one = neuralode.solve(brusselator(M, a)[0], y0, ts, **kw)
        torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-7, atol=1e-9)
        assert int(batch.stats.n_steps[i]) == int(one.stats.n_steps)
        assert int(batch.stats.nfe[i]) == int(one.stats.nfe)


def test_batched_rows_with_preconditioners_get_their_own_arguments() -> None:
    """A batch's preconditioners (forward, and transposed for backprop's gradient) get each
    call's stage time per row ``[batch]``, the stage iterate and the right-hand side shaped as
    the batch's state, and hand back the batch; with the identity for
    both, each row's values, counts and gradient are its solve alone (the same preconditioners
    get a 0-dim time there)."""
    M, ts = 6, torch.tensor([0.0, 0.2, 0.4], dtype=DTYPE)
    alphas = (0.01, 0.05)
    batch_f, _, y0_np = brusselator(M, torch.tensor(alphas, dtype=DTYPE).unsqueeze(1))  # type: ignore[arg-type]
    seen: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = []

    def identity(name: str):  # type: ignore[no-untyped-def]
        def solve(t, y, hg, r):  # type: ignore[no-untyped-def]
            seen.append((name, tuple(t.shape), tuple(y.shape), tuple(r.shape)))
            assert bool(torch.isfinite(y).all())
            return r.clone()

        return solve

    settings = NewtonSettings(
        preconditioner=identity("forward"), preconditioner_transposed=identity("transposed")
    )
    method = Esdirk(ESDIRK_TABLEAUS["kvaerno3"], settings)
    kw = {"method": method, "rtol": 1e-7, "atol": 1e-9}
    y0 = torch.tensor(y0_np, dtype=DTYPE).expand(2, -1).clone().requires_grad_()
    batch = neuralode.solve(batch_f, y0, ts, batched=True, **kw)
    (grad,) = torch.autograd.grad(batch.ys.square().sum(), y0)
    assert {s[0] for s in seen} == {"forward", "transposed"}
    assert {s[1:] for s in seen} == {((2,), (2, 2 * M), (2, 2 * M))}
    for i, a in enumerate(alphas):
        seen.clear()
        yi = torch.tensor(y0_np, dtype=DTYPE, requires_grad=True)
        one = neuralode.solve(brusselator(M, a)[0], yi, ts, **kw)
        (grad_i,) = torch.autograd.grad(one.ys.square().sum(), yi)
        assert {s[1:] for s in seen} == {((), (2 * M,), (2 * M,))}
        assert one.stats.nfe.shape == ()
        torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(grad[i], grad_i, rtol=1e-7, atol=1e-9)
        assert int(batch.stats.nfe[i]) == int(one.stats.nfe)


class _Cube(torch.autograd.Function):
    """``y ** 3`` in the old style (``forward(ctx, ...)``), which ``torch.func`` refuses."""

    @staticmethod
    def forward(ctx, y):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(y)
        return y**3

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (y,) = ctx.saved_tensors
        return 3 * y * y * grad


@pytest.mark.parametrize(
    ("gradient", "traceable"), [("backprop", True), ("checkpoint", True), ("backprop", False)]
)
def test_gradcheck_through_gmres_stages(gradient: str, traceable: bool) -> None:
    """The implicit function theorem's transposed solve by GMRES with a Krylov dimension of 2
    on 4 components (restarted), stages solved to round-off; constant steps as in
    ``test_esdirk.py``.  Its products: ``torch.func.vjp``, or ``torch.autograd.grad`` for a
    field that ``torch.func`` cannot transform (an ``autograd.Function`` without
    ``setup_context``)."""
    solver = Esdirk(
        ESDIRK_TABLEAUS["kvaerno3"],
        NewtonSettings(1e-13, 1e-13, max_iters=40, linear="gmres", krylov_dim=2),
    )
    theta = torch.tensor([30.0, 1.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.25, 0.5], dtype=DTYPE)
    mix = torch.tensor(
        [[1.0, 0.5, 0, 0], [0, 1, 0.3, 0], [0, 0, 1, 0.2], [0.1, 0, 0, 1]], dtype=DTYPE
    )

    def run(y0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            cube = y**3 if traceable else _Cube.apply(y)  # type: ignore[no-untyped-call]
            return -theta[0] * (y - torch.cos(t)) @ mix.T - theta[1] * cube

        kw = {} if gradient == "backprop" else {"adjoint_params": (theta,)}
        sol = neuralode.solve(
            f, y0, ts, method=solver, first_step=0.0625, rtol=1e10, atol=1e10, ifactor=1.0,
            gradient=gradient, **kw,
        )  # fmt: skip
        assert int(sol.stats.n_rejected) == 0 and int(sol.stats.njev) == 0
        return sol.ys

    assert torch.autograd.gradcheck(run, (y0, theta), atol=1e-6, rtol=1e-5)


def test_adjoint_with_gmres_agrees_with_backprop() -> None:
    theta = torch.tensor([5.0, 1.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -theta[0] * (y - torch.sin(t)) - theta[1] * y**3

    grads = {}
    for gradient in ("backprop", "adjoint"):
        kw = {} if gradient == "backprop" else {"adjoint_params": (theta,)}
        sol = neuralode.solve(
            f, y0, ts, method=_solver("gmres"), rtol=1e-8, atol=1e-10, gradient=gradient, **kw
        )
        grads[gradient] = torch.autograd.grad(sol.ys.square().sum(), (y0, theta))
        if gradient == "adjoint":  # the backward solve is matrix-free too
            back = sol.backward_stats
            assert back is not None and int(back.njev) == 0 and int(back.n_newton) > 0
    for a, b in zip(grads["adjoint"], grads["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_events_with_gmres() -> None:
    """An event on a GMRES solve is located on the same dense output as on the dense path's
    (the same steps): ``y_0 = 1 - exp(-t)`` crosses 1/2 at ``ln 2``."""
    lam = torch.logspace(0, 3, 40, dtype=DTYPE)
    event = neuralode.Event(lambda t, y: y[..., 0] - 0.5, terminal=True)
    found = []
    for linear in ("dense", "gmres"):
        sol = neuralode.solve(
            lambda t, y: -lam * (y - 1), torch.zeros(40, dtype=DTYPE),
            torch.tensor([0.0, 5.0], dtype=DTYPE), method=_solver(linear), rtol=1e-8,
            atol=1e-10, events=event,
        )  # fmt: skip
        assert sol.event_t is not None
        found.append(float(sol.event_t))
    assert found[1] == pytest.approx(found[0], abs=1e-12)
    assert found[1] == pytest.approx(np.log(2), abs=1e-7)


@pytest.mark.parametrize("linear", ["auto", "gmres"])
def test_adjoint_with_a_preconditioner(linear: str) -> None:
    """The preconditioner knows the forward system only: the adjoint's backward solve (the
    augmented system, ``2 N`` components here; by GMRES too with ``linear="gmres"``) does not
    call it, and the gradient is backprop's."""
    M = 5
    f, _, y0_np = brusselator(M)
    pc = brusselator_preconditioner(M)
    seen: list[tuple[int, ...]] = []

    def recording(t, y, hg, r):  # type: ignore[no-untyped-def]
        seen.append(tuple(r.shape))
        return pc(t, y, hg, r)

    settings = NewtonSettings(linear=linear, preconditioner=recording)
    method = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], settings)
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)
    grads = []
    for gradient in ("backprop", "adjoint"):
        y0 = torch.tensor(y0_np, dtype=DTYPE, requires_grad=True)
        sol = neuralode.solve(
            f, y0, ts, method=method, rtol=1e-8, atol=1e-10, gradient=gradient,
            adjoint_params=() if gradient == "adjoint" else None,
        )  # fmt: skip
        (g,) = torch.autograd.grad(sol.ys.square().sum(), y0)
        grads.append(g)
    assert seen and set(seen) == {(2 * M,)}
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_transposed_solve_with_a_preconditioner() -> None:
    """The gradient's solve ``(I - hg J)^T u = v`` on a stiff Brusselator (50 points, hg = 0.1:
    ``hg`` times the diffusion's largest eigenvalue is about 21), right preconditioned by
    ``M^-T`` (the diffusion's solve, symmetric: the forward preconditioner itself), reaches the
    same solution in a fraction of the products (measured: 78 against 12)."""
    M, hg = 50, 0.1
    f, _, y0 = brusselator(M)
    z, t = torch.tensor(y0, dtype=DTYPE), torch.tensor(0.0, dtype=DTYPE)
    v = torch.randn(2 * M, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    J = torch.autograd.functional.jacobian(lambda y: f(t, y), z)
    exact = torch.linalg.solve(torch.eye(2 * M, dtype=DTYPE) - hg * J.T, v)
    pc = brusselator_preconditioner(M)
    calls: list[float] = []

    def recording(t_, y, hg_, r):  # type: ignore[no-untyped-def]
        calls.append(float(hg_))
        torch.testing.assert_close(y, z)
        return pc(t_, y, hg_, r)

    plain = KrylovTransposedSolve(f, t, z, hg, 30)
    pre = KrylovTransposedSolve(f, t, z, hg, 30, recording)
    torch.testing.assert_close(plain(v), exact, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(pre(v), exact, rtol=1e-9, atol=1e-11)
    assert plain.products is not None and pre.products is not None
    print("transposed products, plain / preconditioned:", plain.products, pre.products)
    assert calls and set(calls) == {hg}
    assert 5 * int(pre.products[0]) < int(plain.products[0])


def test_backprop_with_a_transposed_preconditioner() -> None:
    """Backprop through GMRES-solved stages calls ``preconditioner_transposed`` in the gradient's
    solves (not in the forward ones) and gets the unpreconditioned gradient; checked against
    dense Newton too."""
    M = 8
    f, _, y0_np = brusselator(M)
    pc = brusselator_preconditioner(M)
    seen = {"forward": 0, "transposed": 0}

    def counting(name: str):  # type: ignore[no-untyped-def]
        def solve(t, y, hg, r):  # type: ignore[no-untyped-def]
            seen[name] += 1
            return pc(t, y, hg, r)

        return solve

    ts = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)
    settings = {
        "dense": NewtonSettings(linear="dense"),
        "plain": NewtonSettings(linear="gmres"),
        "both": NewtonSettings(
            preconditioner=counting("forward"), preconditioner_transposed=counting("transposed")
        ),
    }
    grads = {}
    for name, s in settings.items():
        y0 = torch.tensor(y0_np, dtype=DTYPE, requires_grad=True)
        method = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], s)
        sol = neuralode.solve(f, y0, ts, method=method, rtol=1e-8, atol=1e-10)
        forward_calls = seen["forward"]
        assert seen["transposed"] == 0
        (grads[name],) = torch.autograd.grad(sol.ys.square().sum(), y0)
        assert seen["forward"] == forward_calls
    assert seen["forward"] > 0 and seen["transposed"] > 0
    torch.testing.assert_close(grads["both"], grads["plain"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads["both"], grads["dense"], rtol=1e-5, atol=1e-7)


# -- choosing ------------------------------------------------------------------------------------
def test_auto_picks_gmres_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    f, _, y0 = brusselator(5)
    y0_t, ts = torch.tensor(y0, dtype=DTYPE), torch.tensor([0.0, 1.0], dtype=DTYPE)
    # 10 components: 100 entries for one system (KRYLOV_MIN_ENTRIES_ONE), 200 for a batch of 2
    # (the smallest batch, which KRYLOV_MIN_ENTRIES governs).
    monkeypatch.setattr(esdirk, "KRYLOV_MIN_ENTRIES", 201)
    for entries, jev in ((101, True), (100, False)):
        monkeypatch.setattr(esdirk, "KRYLOV_MIN_ENTRIES_ONE", entries)
        sol = neuralode.solve(f, y0_t, ts, method="kvaerno5", rtol=1e-5, atol=1e-7)
        assert (int(sol.stats.njev) > 0) == jev, entries
    monkeypatch.setattr(esdirk, "KRYLOV_MIN_ENTRIES_ONE", 10**9)
    for entries, jev in ((201, True), (200, False)):
        monkeypatch.setattr(esdirk, "KRYLOV_MIN_ENTRIES", entries)
        batch = neuralode.solve(
            f, y0_t.expand(2, 10), ts, method="kvaerno5", rtol=1e-5, atol=1e-7, batched=True
        )
        assert (int(batch.stats.njev.sum()) > 0) == jev, entries
    # A Jacobian of the user's own, and the adjoint's augmented field (its own block
    # Jacobian): dense whatever the size.
    monkeypatch.setattr(esdirk, "KRYLOV_MIN_ENTRIES_ONE", 1)
    monkeypatch.setattr(esdirk, "KRYLOV_MIN_ENTRIES", 1)
    matrix_free: list[bool] = []
    real = esdirk.Esdirk._step_krylov

    def recording(self, f, *args):  # type: ignore[no-untyped-def]
        matrix_free.append(esdirk._structured(f))
        return real(self, f, *args)

    monkeypatch.setattr(esdirk.Esdirk, "_step_krylov", recording)
    y0_g = y0_t.clone().requires_grad_()
    sol = neuralode.solve(
        f, y0_g, ts, method="kvaerno5", rtol=1e-5, atol=1e-7, gradient="adjoint",
        adjoint_params=(),
    )  # fmt: skip
    sol.ys[-1].sum().backward()
    assert matrix_free and not any(matrix_free)  # the forward solve only, by GMRES
    J = torch.autograd.functional.jacobian(lambda y: f(ts[0], y), y0_t)
    sol = neuralode.solve(
        f, y0_t, ts, method="kvaerno5", rtol=1e-5, atol=1e-7,
        jac=lambda t, y: torch.autograd.functional.jacobian(lambda z: f(t, z), y),
    )  # fmt: skip
    assert J.shape == (10, 10) and int(sol.stats.njev) > 0
    # Either preconditioner makes "auto" GMRES (it serves no other path).
    for key in ("preconditioner", "preconditioner_transposed"):
        s = NewtonSettings(**{key: brusselator_preconditioner(5)})
        sol = neuralode.solve(
            f, y0_t, ts, method=Esdirk(ESDIRK_TABLEAUS["kvaerno5"], s), rtol=1e-5, atol=1e-7
        )
        assert sol.success and int(sol.stats.njev) == 0, key


def _pc(t, y, hg, r):  # type: ignore[no-untyped-def]
    return r


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"linear": "lu"}, ValueError,
         "linear must be one of ['auto', 'dense', 'gmres'], got 'lu'"),
        ({"krylov_dim": 0}, ValueError, "krylov_dim must be >= 1, got 0"),
        ({"krylov_dim": 2.5}, TypeError, "krylov_dim must be an int, got 2.5"),
        ({"krylov_dim": True}, TypeError, "krylov_dim must be an int, got True"),
        ({"max_iters": 0}, ValueError, "max_iters must be >= 1, got 0"),
        ({"max_iters": 2.0}, TypeError, "max_iters must be an int, got 2.0"),
        ({"max_iters": True}, TypeError, "max_iters must be an int, got True"),
        ({"reuse_jacobian": "yes"}, TypeError, "reuse_jacobian must be a bool, got 'yes'"),
        ({"preconditioner": 3}, TypeError,
         "preconditioner must be a callable (t, y, hg, r) -> M^-1 r, got int"),
        ({"preconditioner": _pc, "linear": "dense"}, ValueError,
         "preconditioner serves linear='gmres' (or 'auto'), not linear='dense'"),
        ({"preconditioner_transposed": "same"}, TypeError,
         "preconditioner_transposed must be a callable (t, y, hg, r) -> M^-T r, got str"),
        ({"preconditioner_transposed": _pc, "linear": "dense"}, ValueError,
         "preconditioner_transposed serves linear='gmres' (or 'auto'), not linear='dense'"),
    ],
)  # fmt: skip
def test_bad_settings_are_named(kwargs: dict, error: type, message: str) -> None:
    """Each refusal names the setting, what it must be, and what it got, whole."""
    import re

    with pytest.raises(error, match=f"^NewtonSettings: {re.escape(message)}$"):
        NewtonSettings(**kwargs)


def test_the_smallest_settings_are_taken() -> None:
    """One Newton iteration per stage and a Krylov space of one vector are allowed (the
    refusals above start below them), and a solve runs with them."""
    settings = NewtonSettings(max_iters=1, krylov_dim=1, linear="gmres")
    assert (settings.max_iters, settings.krylov_dim) == (1, 1)
    sol = neuralode.solve(
        lambda t, y: -y, torch.ones(2, dtype=DTYPE), torch.tensor([0.0, 1.0], dtype=DTYPE),
        method=Esdirk(ESDIRK_TABLEAUS["kvaerno3"], settings), rtol=1e-4, atol=1e-6,
    )  # fmt: skip
    assert sol.success
