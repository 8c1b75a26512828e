"""Fixed-step implicit Runge-Kutta methods: all implicit stages solved at once by Newton's method,
per sample (torchdiffeq's ``implicit_euler``, ``implicit_midpoint``, ``trapezoid``,
``radauIIA3``, ``radauIIA5``, ``gl4``, ``gl6``, ``sdirk2``, ``trbdf2``).

The unknowns are the implicit stages' increments ``w_i = z_i - y`` (Hairer and Wanner, Solving
ODEs II, IV.8): with ``r`` implicit stages of ``N`` components each, Newton's method solves

    G(w) = w - h (A_rr (x) I) F(y + w) - h a_r0 f(t, y) = 0

(``a_r0`` the column of an explicit first stage, when there is one) with the ``rN x rN`` matrix
``I - h (A_rr (x) J)``, LU-factored per sample.  The iteration starts simplified, with ``J`` at
the step's start for every stage (one Jacobian, one factorisation: a linear problem converges in
one iteration); when a row's observed contraction rate is poor (above 0.5) the batch takes fresh
Jacobians at each stage's current value, which is Newton's method proper, and goes on with them.
Each row stops on its own test (Hairer and Wanner's ``theta / (1 - theta) ||dw|| <= kappa``,
scaled by ``eps^0.75 (1 + |y|)`` of the state's dtype: a fixed step has no tolerance of its own,
so stages are solved to round-off).  A row that has not converged in ``max_iters`` iterations
fails its step (``Status.NEWTON_FAILED``); a fixed step cannot shrink, so the solve stops there
and says so.

The step is ``y1 = y + (b_r^T A_rr^-1 (x) I) w + h (b_0 - b_r^T A_rr^-1 a_r0) f(t, y)``: no
evaluation of ``f`` beyond the iteration's (for the stiffly accurate methods this is ``z_last``).

Gradients never go through the iterations: at convergence ``w*`` is the root of ``G``, so by the
implicit function theorem its gradient is that of ``h (A_rr (x) I) F(y + w*) + h a_r0 f(t, y)``
(``w*`` held fixed) after a solve with ``(I - h [a_ij J(z_j*)])^T``, the exact Newton matrix at
the converged stages (taken in the backward pass).  Backprop and checkpoint thus get the exact
gradient of the computed solution at the cost of ``r`` evaluations of ``f`` per step in the
forward pass (one more for an explicit first stage) and ``r`` Jacobians per step backwards.

Unlike torchdiffeq's (a Broyden iteration over the whole flattened batch that warns when it does
not converge, with gradients through its iterations), each sample here iterates to its own
convergence, a failure is a status, and the gradient does not depend on the iteration count.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .._rows import per_row, row_dims
from ..solution import Status
from .base import DenseStep, Func, Solver, StepResult, Time, constant
from .esdirk import _ImplicitStage
from .newton import jacobian, lu_factor
from .rk import _h_state, _time
from .tableaus import ImplicitTableau

__all__ = ["ImplicitRK"]

#: Observed contraction rate above which the Newton matrix is rebuilt at the current stages.
_REFRESH_RATE = 0.5
#: Contraction rate up to which a step's Jacobian is kept for the next step.
_KEEP_RATE = 0.1
# Cubic Hermite through (y0, f0) and (y1, f1) over ks = [f0, f1, (y1 - y0) / h]:
# y(th) = y0 + h [f0 (th - 2 th^2 + th^3) + f1 (th^3 - th^2) + (y1 - y0)/h (3 th^2 - 2 th^3)].
_HERMITE = [[1.0, -2.0, 1.0], [0.0, -1.0, 1.0], [0.0, 3.0, -2.0]]


class ImplicitRK(Solver):
    """A fixed-step implicit Runge-Kutta method given by its :class:`ImplicitTableau`.

    Args:
        tableau: the method.
        max_iters: Newton iterations per step before the step fails (torchdiffeq's option of
            the same name; its default, 100, is for Broyden's slower iteration).

    Raises:
        TypeError: ``tableau`` is not an :class:`ImplicitTableau`.
        ValueError: ``max_iters`` is not a positive integer.

    Per step: one Jacobian at the start (its forward pass is ``f(t, y)``), ``r`` evaluations
    of ``f`` per Newton iteration (``r`` implicit stages), and more Jacobians only when the
    simplified iteration contracts slowly.  ``Solution.stats`` counts ``njev``, ``nlu`` and
    ``n_newton``.  The interpolant between grid points is cubic Hermite (one evaluation of
    ``f(t + h, y1)``, only for steps with outputs inside them).

    Examples:
        >>> import torch, neuralode
        >>> lam = 1e4  # stiff: an explicit method with this step would blow up
        >>> f = lambda t, y: -lam * (y - torch.cos(t)) - torch.sin(t)  # y = cos t
        >>> y0 = torch.tensor([0.0], dtype=torch.float64)
        >>> t = torch.linspace(0, 1, 11, dtype=torch.float64)
        >>> ys = neuralode.odeint(f, y0, t, method="radauIIA5")
        >>> round(float(ys[-1, 0]), 4), round(float(torch.cos(t[-1])), 4)
        (0.5403, 0.5403)
    """

    uses_jacobian = True

    def __init__(self, tableau: ImplicitTableau, max_iters: int = 50) -> None:
        if not isinstance(tableau, ImplicitTableau):
            raise TypeError(f"ImplicitRK needs an ImplicitTableau, got {type(tableau).__name__}")
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
        self.tableau, self.max_iters = tableau, max_iters
        self.name, self.order = tableau.name, tableau.order
        self.dense_order = min(3, tableau.order)
        s = tableau.stages
        self.first = 1 if tableau.explicit_first else 0
        A = torch.tensor([[float(x) for x in row] for row in tableau.A], dtype=torch.float64)
        b = torch.tensor([float(x) for x in tableau.b], dtype=torch.float64)
        A_rr = A[self.first :, self.first :]
        d = torch.linalg.solve(A_rr.T, b[self.first :])  # b_r^T A_rr^-1
        self.r = s - self.first
        self.c = [float(x) for x in tableau.c]
        self.A_rr = A_rr
        self.a_r0 = A[self.first :, 0].tolist() if self.first else [0.0] * self.r
        self.d = d.tolist()
        self.e0 = float(b[0] - d @ A[self.first :, 0]) if self.first else 0.0
        self.a_col = torch.tensor(self.a_r0, dtype=torch.float64)
        self._cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def init(self, f: Func, t: Time, y: torch.Tensor, f0: torch.Tensor | None) -> Any:
        return None  # f(t, y) comes with each step's Jacobian

    def choice(self, state: Any) -> Any:
        """The stage prediction a step starts from (the last step's stages per unit step): a
        replay (the checkpoint strategy's backward pass) must start its Newton iteration
        there too, or, where the stage equations have more than one root (large steps on a
        nonlinear field), it may converge to another one than the forward pass did."""
        return state.slope if isinstance(state, _Carried) else None

    def replay_state(self, f: Func, t: Time, y: torch.Tensor, choice: Any) -> Any:
        """The recorded prediction, with a fresh Jacobian (a kept one is not recorded: a
        Jacobian per step would cost the memory the checkpoint strategy exists to save)."""
        return None if choice is None else _Carried(None, None, choice)

    def _A(self, like: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """``A_rr`` (or ``which``, another of the tableau's float64 tensors) in ``like``'s
        dtype and device, built once."""
        src = self.A_rr if which is None else which
        key = (id(src), like.dtype, like.device)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = constant(lambda: src.to(dtype=like.dtype, device=like.device))
        return out

    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        batched = not isinstance(h, float) and h.ndim == 1
        h_y = _h_state(h, y)
        ts = [_time(t + self.c[i] * h, y) for i in range(self.first, len(self.c))]
        with torch.no_grad():
            J0, f0, njev0, nfe0 = self._start(f, t, y, state)
            base = self._base(f0, h_y)
            newton = _StageNewton(self, f, ts, y, h, h_y, base, batched)
            # The prediction: the last step's stage increments per unit step, times this step
            # (O(h^2) off on a smooth solution, where starting from zero is O(h) off).
            slope = state.slope if isinstance(state, _Carried) else None
            w0 = None if slope is None else _swap_rows(slope, batched) * h_y
            w_star, ok, iters, njev, nlu, stale = newton.solve(J0, w0)
            slope = _swap_rows(w_star / _safe_h(h_y), batched)
        carried = _Carried(J0, stale | ~ok, slope)
        # f(t, y) where it was needed, r per iteration, one per refreshed Jacobian (its forward
        # pass).
        nfe: int | torch.Tensor = self.r * iters + njev + nfe0
        njev = njev + njev0
        graph = torch.is_grad_enabled()
        w = w_star
        dense_f0: torch.Tensor | None = f0
        if graph:
            k0 = f0
            dense_f0 = None  # f(t, y) with its graph, if an interpolant asks for it
            if self.first:
                k0, nfe = f(_time(t, y), y), nfe + 1
                dense_f0 = k0
            fs = [f(ts[i], y + w_star[i]) for i in range(self.r)]
            nfe = nfe + self.r
            right = self._combine(fs, h_y, self._base(k0, h_y))
            if right.requires_grad:
                solve_t = _TransposedStages(self, f, ts, y, w_star, h, batched)
                # torch.autograd.Function.apply has no annotations (torch 2.13).
                w = _ImplicitStage.apply(right, w_star, solve_t)  # type: ignore[no-untyped-call]
            f0 = k0
        y1 = y
        for i in range(self.r):
            if self.d[i] != 0:
                y1 = y1 + self.d[i] * w[i]
        if self.e0 != 0:
            assert f0 is not None  # e0 is non-zero only beside an explicit first stage
            y1 = y1 + h_y * self.e0 * f0
        status = torch.where(ok, 0, int(Status.NEWTON_FAILED))
        return StepResult(y1, None, (dense_f0, y1), carried, nfe, status, None, njev, nlu, iters)

    def _start(
        self, f: Func, t: Time, y: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any, Any]:
        """The step's Newton matrix Jacobian ``J(t, y)``, ``f(t, y)`` where the step needs it,
        and per row the Jacobians taken and the evaluations spent.  A row whose last step's
        iteration contracted fast keeps that step's Jacobian (Hairer and Wanner's RADAU5
        policy: the Jacobian is the expensive part, ``N`` vector-Jacobian products against
        ``r`` evaluations an iteration); the others take a fresh one.  After the first step only
        a method with an explicit first stage needs ``f(t, y)`` (an interpolant that asks for
        it evaluates it)."""
        if not isinstance(state, _Carried) or state.J is None or state.stale is None:
            lin = jacobian(f, _time(t, y), y)
            return lin.J, lin.f0, 1, 1
        stale = state.stale
        if bool(stale.any()):  # one host synchronisation per step
            lin = jacobian(f, _time(t, y), y)
            J = torch.where(stale.view(*stale.shape, 1, 1), lin.J, state.J)
            # the batch's f(t, y) is the Jacobian's forward pass; a row that kept its Jacobian
            # is charged the evaluation its own solve would make
            f0 = lin.f0 if self.first else None
            return J, f0, stale.long(), stale | self.first
        f0 = f(_time(t, y), y) if self.first else None
        return state.J, f0, 0, int(self.first)

    def _combine(
        self, fs: list[torch.Tensor], h_y: torch.Tensor | float, base: torch.Tensor | None
    ) -> torch.Tensor:
        """``h (A_rr (x) I) F + base`` stacked over the implicit stages: ``[r, *y]`` (one matrix
        product: the stages' combinations in one call rather than ``r^2`` scaled adds)."""
        F = torch.stack(fs)
        out = (self._A(F) @ F.reshape(self.r, -1)).view(F.shape) * h_y
        return out if base is None else out + base

    def _base(self, f0: torch.Tensor | None, h_y: torch.Tensor | float) -> torch.Tensor | None:
        """``h a_r0 f(t, y)`` over the implicit stages (an explicit first stage's share), or
        ``None`` when the first stage is implicit."""
        if not self.first:
            return None
        assert f0 is not None
        col = self._A(f0, self.a_col)
        return col.view(self.r, *([1] * f0.ndim)) * (h_y * f0)

    def dense(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, result: StepResult
    ) -> tuple[DenseStep, int, Any]:
        f0, y1 = result.dense_info
        nfe = 1
        if f0 is None:
            f0, nfe = f(_time(t, y), y), 2
        f1 = f(_time(t + h, y), y1)
        h_y = _h_state(h, y)
        if isinstance(h_y, float):
            safe: torch.Tensor | float = h_y if h_y != 0 else 1.0
        else:
            safe = torch.where(h_y == 0, 1.0, h_y)
        P = torch.tensor(_HERMITE, dtype=torch.float64, device=y.device)
        return DenseStep(y, h, [f0, f1, (y1 - y) / safe], P), nfe, None


class _Carried(NamedTuple):
    """What a step hands the next: its start's Jacobian and, per row, whether it is stale."""

    J: torch.Tensor | None  # None: take a fresh one (a replay)
    stale: torch.Tensor | None
    #: the stage increments divided by the step (rows first: ``[batch, r, ...]`` batched)
    slope: torch.Tensor


def _swap_rows(w: torch.Tensor, batched: bool) -> torch.Tensor:
    """Stage-major ``[r, batch, ...]`` as ``[batch, r, ...]`` (so that the loop's per-row merge
    sees the batch first), and back (a swap of the first two dimensions is its own inverse);
    unbatched, unchanged."""
    return w.transpose(0, 1) if batched else w


def _safe_h(h: torch.Tensor | float) -> torch.Tensor | float:
    """The step with rows that take none (``h = 0``) divided by 1 instead."""
    if isinstance(h, float):
        return h if h != 0 else 1.0
    return torch.where(h == 0, 1.0, h)


class _StageNewton:
    """The Newton iteration of one step's implicit stages, per row."""

    def __init__(
        self,
        solver: ImplicitRK,
        f: Func,
        ts: list[torch.Tensor],
        y: torch.Tensor,
        h: Time,
        h_y: torch.Tensor | float,
        base: torch.Tensor | None,
        batched: bool,
    ) -> None:
        self.s, self.f, self.ts, self.y, self.h, self.h_y = solver, f, ts, y, h, h_y
        self.base, self.batched = base, batched
        eps = torch.finfo(y.dtype).eps
        tol = eps**0.75
        self.scale = y.abs().mul(tol).add(tol)
        self.kappa = max(10 * eps / tol, min(0.03, math.sqrt(tol)))
        self.dims = tuple(d + 1 for d in row_dims(y.ndim, batched))
        self.rows = y.shape[:1] if batched else ()

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        """``G(w)``: ``r`` evaluations of ``f``, one per implicit stage."""
        fs = [self.f(self.ts[i], self.y + w[i]) for i in range(self.s.r)]
        return w - self.s._combine(fs, self.h_y, self.base)

    def matrix(self, Js: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """LU of ``I - h [a_ij J_j]`` per row (``Js``: one Jacobian per stage, or one for all)."""
        M = newton_matrix(self.s._A(self.y), Js, self.h, self.s.r, self.batched)
        return lu_factor(M)

    def solve(
        self, J0: torch.Tensor, w0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w*, converged, iterations, jacobians, factorisations, stale)`` per row: ``stale``
        where the start's Jacobian did not serve well enough to keep for the next step (a
        contraction rate above ``_KEEP_RATE``, or fresh Jacobians taken at the stages)."""
        r, y = self.s.r, self.y
        LU, piv = self.matrix([J0])
        w = torch.zeros((r, *y.shape), dtype=y.dtype, device=y.device) if w0 is None else w0
        active = torch.ones(self.rows, dtype=torch.bool, device=y.device)
        ok = torch.zeros_like(active)
        has_rate = torch.zeros_like(active)  # a row's contraction rate is known (2nd iterate on)
        its = torch.zeros(self.rows, dtype=torch.long, device=y.device)
        njev = torch.zeros_like(its)
        nlu = torch.ones_like(its)
        worst = torch.zeros(self.rows, dtype=y.dtype, device=y.device)
        prev = torch.ones(self.rows, dtype=y.dtype, device=y.device)
        eta = torch.ones_like(prev)
        for _ in range(self.s.max_iters):
            dw = lu_apply(LU, piv, -self.residual(w), r, self.batched)
            n = (dw / self.scale).square().mean(dim=(0, *self.dims)).sqrt()
            its = its + active
            w = torch.where(per_row(active, w.ndim - 1).unsqueeze(0), w + dw, w)
            theta = torch.where(has_rate, n / prev.clamp(min=1e-300), 0.0)
            eta = torch.where(active & has_rate, theta / (1 - theta).clamp(min=1e-30), eta)
            worst = torch.where(active, torch.maximum(worst, theta), worst)
            # Without a rate, a correction is trusted only at round-off size.
            small = torch.where(has_rate, eta * n <= self.kappa, n <= self.kappa * 1e-3)
            # A non-finite correction is the field's NaN or Inf: the row stops, and the loop's
            # check of the outputs reports the non-finite state.
            converged = active & (~torch.isfinite(n) | (n == 0) | small)
            ok = ok | converged
            active = active & ~converged
            slow = active & has_rate & (theta > _REFRESH_RATE)
            going, refresh = torch.stack([active.any(), slow.any()]).tolist()  # one sync
            if not going:
                break
            prev, has_rate = n, torch.ones_like(has_rate)
            if refresh:  # Newton proper for the slow rows: Jacobians at their current stages
                Js = [jacobian(self.f, self.ts[i], y + w[i]).J for i in range(r)]
                LU_new, piv_new = self.matrix(Js)
                LU = torch.where(slow.view(*slow.shape, 1, 1), LU_new, LU)
                piv = torch.where(slow.view(*slow.shape, 1), piv_new, piv)
                njev, nlu = njev + r * slow, nlu + slow
                has_rate = ~slow  # the new matrix's rate is not yet known
        stale = (worst > _KEEP_RATE) | (njev > 0)
        return w, ok, its, njev, nlu, stale


def newton_matrix(
    A: torch.Tensor, Js: list[torch.Tensor], h: Time, r: int, batched: bool
) -> torch.Tensor:
    """``I - h [a_ij J_j]`` (``[batch, rN, rN]`` or ``[rN, rN]``; stage-major unknowns), with
    one Jacobian per stage in ``Js`` or one shared by all."""
    N = Js[0].shape[-1]
    if len(Js) == 1:
        J = Js[0].unsqueeze(-3).expand(*Js[0].shape[:-2], r, N, N)
    else:
        J = torch.stack(Js, dim=-3)  # [..., r, N, N]
    # blocks[..., i, p, j, q] = a_ij J_j[p, q]
    blocks = A.view(r, 1, r, 1) * J.unsqueeze(-4).transpose(-3, -2)
    lead = J.shape[:-3]
    M = blocks.reshape(*lead, r * N, r * N)
    if isinstance(h, torch.Tensor) and batched:
        M = M * h.to(M.dtype).view(-1, 1, 1)
    else:
        M = M * (h if isinstance(h, float) else h.to(M.dtype))
    eye = torch.eye(r * N, dtype=M.dtype, device=M.device)
    return eye - M


def lu_apply(
    LU: torch.Tensor, piv: torch.Tensor, rhs: torch.Tensor, r: int, batched: bool
) -> torch.Tensor:
    """Solve with the factored matrix; ``rhs`` and the result are ``[r, *y]``."""
    shape = rhs.shape
    if batched:
        B = shape[1]
        cols = rhs.reshape(r, B, -1).transpose(0, 1).reshape(B, -1, 1)
        x: torch.Tensor = torch.linalg.lu_solve(LU, piv, cols)
        return x.reshape(B, r, -1).transpose(0, 1).reshape(shape)
    x = torch.linalg.lu_solve(LU, piv, rhs.reshape(-1, 1))
    return x.reshape(shape)


class _TransposedStages:
    """``v -> (I - h [a_ij J(z_j*)])^-T v`` per row: the implicit function theorem's solve,
    with the exact Newton matrix at the converged stages (built when the backward pass asks)."""

    def __init__(
        self,
        solver: ImplicitRK,
        f: Func,
        ts: list[torch.Tensor],
        y: torch.Tensor,
        w: torch.Tensor,
        h: Time,
        batched: bool,
    ) -> None:
        self.s, self.f, self.ts, self.batched = solver, f, ts, batched
        self.z = [(y.detach() + w[i]) for i in range(solver.r)]
        self.h = h if isinstance(h, float) else h.detach()

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            r = self.s.r
            Js = [jacobian(self.f, self.ts[i].detach(), self.z[i]).J for i in range(r)]
            M = newton_matrix(self.s._A(v), Js, self.h, r, self.batched)
            LU, piv = lu_factor(M.transpose(-1, -2))
            return lu_apply(LU, piv, v, r, self.batched)
