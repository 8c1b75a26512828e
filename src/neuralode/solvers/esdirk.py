"""ESDIRK methods: implicit Runge-Kutta stages solved by Newton's method, per sample.

Each implicit stage ``z = base + h gamma f(t_i, z)`` is solved by the simplified (chord) Newton
iteration with the matrix ``I - h gamma J`` of the step's start, LU-factored once per step and
per sample (as the Rosenbrock methods do).  Every row of a batch iterates until its own
convergence test passes; a row whose iteration diverges, or would not converge within
``max_iters``, fails its step (``StepResult.status``), which the loop rejects and retries smaller,
as it does a step with a large error.

The stopping test is Hairer and Wanner's (Solving ODEs II, IV.8): with ``theta`` the observed
contraction rate, stop when ``theta / (1 - theta) ||dz|| <= kappa``, the norm scaled by the
solve's own tolerances (``atol + rtol |y|``) and ``kappa = max(10 eps / rtol, min(0.03,
sqrt(rtol)))`` as in scipy's ``Radau``.  The iteration is the one place where a step
synchronises with the host (to stop once every row has converged).

Gradients never go through the iterations: a converged stage is the root of ``z - base - h gamma
f(t_i, z)``, so by the implicit function theorem its gradient is that of
``base + h gamma f(t_i, z*)`` (``z*`` held fixed) after a solve with ``(I - h gamma J(z*))^T``
(:class:`_ImplicitStage`, the Jacobian taken at the converged stage).  Backprop and the
checkpoint strategy get the exact gradient of the computed solution this way; the cost is one
more evaluation of ``f`` per stage in the forward pass and one Jacobian per stage in the
backward pass.  The dense output is cubic Hermite interpolation through the step's end points
(the last stage's slope is ``f(t + h, y1)``: the methods are stiffly accurate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from .._rows import per_row, row_dims
from ..solution import Status
from .base import Func, Solver, StepResult, Time
from .krylov import KrylovNewton, KrylovTransposedSolve
from .newton import JacobianField, jacobian
from .rk import _combine, _h_state, _stage, _terms, _time
from .rosenbrock import _factor, _Factored, _hg, _linearise, _LinearlyImplicit
from .tableaus import EsdirkTableau

__all__ = ["Esdirk", "NewtonSettings"]

#: ``linear="auto"`` solves the Newton systems by GMRES once the dense Newton matrices of a
#: solve would hold this many entries (``batch * N^2``; 32 MiB in float64).  Measured in
#: ``benchmarks/krylov.py`` (GMRES time / dense time): a neural field 1.83 at 512 components,
#: 1.03 at 1024 and 0.59 at 2048, 0.80 for 16 samples of 256 and 0.20 of 512; the Brusselator
#: (a diffusion, unpreconditioned GMRES's hard case) 6-13 at 200-2000 components, which this
#: keeps dense (with a preconditioner: 0.26 at 2000).
KRYLOV_MIN_ENTRIES = 2**22
_LINEAR = ("auto", "dense", "gmres")


@dataclass(frozen=True)
class NewtonSettings:
    """How the stage iterations stop.

    Attributes:
        rtol, atol: the scale of a correction's norm (``atol + rtol |y|``).  ``None`` (the
            default): the solve's own tolerances under a step-size controller, and
            ``eps ** 0.75`` of the state's dtype for both without one (fixed steps, or a step
            taken directly), so that such stages are solved to round-off.
        norm: reduces a scaled correction to one value per row over ``dims`` (the controller's
            norm); ``None``: root mean square over every dimension but the batch's.
        dims: the dimensions ``norm`` reduces.
        max_iters: iterations per stage before the step fails.
        linear: how each Newton system ``(I - h gamma J) dz = r`` is solved: ``"dense"`` (the
            Jacobian, ``N`` vector-Jacobian products, and an LU factorisation per sample, once
            per step), ``"gmres"`` (matrix-free: GMRES on Jacobian-vector products at the
            current iterate, :mod:`neuralode.solvers.krylov`), or ``"auto"`` (the default):
            GMRES once the dense matrices would hold :data:`KRYLOV_MIN_ENTRIES` entries
            (``batch * N^2``), dense below and for a field with a Jacobian of its own
            (``jac=``, the adjoint's block form).  GMRES is unpreconditioned: a stiffness
            spread over many modes (a discretised diffusion) needs many products per system,
            and there ``"dense"`` may be faster whatever the size (``docs/concepts/stiff.md``).
            A ``jac=`` given to ``solve`` is not used by ``"gmres"``.
        krylov_dim: GMRES's Krylov dimension per Newton system (``J v`` products at most).
        preconditioner: for GMRES, ``preconditioner(t, y, hg, r)``: an approximate solve
            ``M^-1 r`` with ``M ~ I - hg J(t, y)`` (``t``: ``[]`` or ``[batch]``; ``y`` and
            ``r`` shaped like the state; ``hg = h gamma``, a float or ``[batch]``), applied
            on the right, so the Newton test's residuals are the true ones; a good one (the
            stiff linear part solved exactly: a diffusion's tridiagonal system) cuts the
            products per system to a few.  Given, ``"auto"`` means ``"gmres"``; with
            ``"dense"`` it is an error.  The gradient's transposed solve and the adjoint's
            backward solve (another system) do not use it.

    Examples:
        ``kvaerno3`` with at most 5 Newton iterations per stage (the solve's tolerances still
        scale the corrections, as ``rtol`` and ``atol`` are left ``None``):

        >>> import torch, neuralode
        >>> from neuralode.solvers import ESDIRK_TABLEAUS, Esdirk, NewtonSettings
        >>> solver = Esdirk(ESDIRK_TABLEAUS["kvaerno3"], NewtonSettings(max_iters=5))
        >>> f = lambda t, y: -1e4 * (y - torch.cos(t))  # stiff: relaxes onto cos t
        >>> sol = neuralode.solve(f, torch.zeros(1, dtype=torch.float64),
        ...                       torch.tensor([0.0, 1.0], dtype=torch.float64), method=solver,
        ...                       rtol=1e-4, atol=1e-7)
        >>> round(float(sol.ys[-1, 0]), 3), sol.success, int(sol.stats.n_newton) > 0
        (0.54, True, True)

        Matrix-free: the Newton systems by GMRES (no Jacobian taken; each product ``J v``
        is one evaluation of ``f``, counted in ``nfe``), on decay rates from 1 to 1000:

        >>> solver = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], NewtonSettings(linear="gmres"))
        >>> lam = torch.logspace(0, 3, 50, dtype=torch.float64)
        >>> sol = neuralode.solve(lambda t, y: -lam * y, torch.ones(50, dtype=torch.float64),
        ...                       torch.tensor([0.0, 1.0], dtype=torch.float64), method=solver,
        ...                       rtol=1e-6, atol=1e-9)
        >>> int(sol.stats.njev), float((sol.ys[-1] - torch.exp(-lam)).abs().max()) < 1e-7
        (0, True)
    """

    rtol: float | torch.Tensor | None = None
    atol: float | torch.Tensor | None = None
    norm: Any = None
    dims: tuple[int, ...] | None = None
    max_iters: int = 10
    linear: str = "auto"
    krylov_dim: int = 30
    preconditioner: Any = None

    def __post_init__(self) -> None:
        if self.linear not in _LINEAR:
            raise ValueError(
                f"NewtonSettings: linear must be one of {list(_LINEAR)}, got {self.linear!r}"
            )
        if isinstance(self.krylov_dim, bool) or not isinstance(self.krylov_dim, int):
            raise TypeError(f"NewtonSettings: krylov_dim must be an int, got {self.krylov_dim!r}")
        if self.krylov_dim < 1:
            raise ValueError(f"NewtonSettings: krylov_dim must be >= 1, got {self.krylov_dim}")
        if self.preconditioner is not None:
            if not callable(self.preconditioner):
                raise TypeError(
                    "NewtonSettings: preconditioner must be a callable (t, y, hg, r) -> M^-1 r, "
                    f"got {type(self.preconditioner).__name__}"
                )
            if self.linear == "dense":
                raise ValueError(
                    "NewtonSettings: a preconditioner serves linear='gmres' (or 'auto'), not "
                    "linear='dense'"
                )
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int):
            raise TypeError(f"NewtonSettings: max_iters must be an int, got {self.max_iters!r}")
        if self.max_iters < 1:
            raise ValueError(f"NewtonSettings: max_iters must be >= 1, got {self.max_iters}")


class Esdirk(_LinearlyImplicit):
    """A stiffly accurate ESDIRK method given by its :class:`EsdirkTableau` (``kvaerno3``,
    ``kvaerno5``).

    Per step: one Jacobian (at the start, which also gives the explicit first stage ``f(t, y)``;
    a retry after a rejection reuses both) and one LU factorisation per sample, then each implicit
    stage's Newton iterations (one evaluation of ``f`` each).  ``Solution.stats.n_newton`` counts
    the iterations.

    Args:
        tableau: the method, ``kvaerno3``, ``kvaerno5`` (``ESDIRK_TABLEAUS``) or one of your
            own.
        settings: how the stage iterations stop; default :class:`NewtonSettings` ``()``: the
            solve's own tolerances and norm, 10 iterations per stage.

    Raises:
        TypeError: ``tableau`` is not an :class:`EsdirkTableau`.

    Examples:
        Van der Pol's oscillator with ``mu = 1000`` (stiff):

        >>> import torch, neuralode
        >>> def van_der_pol(t, y, mu=1000.0):
        ...     return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])
        >>> y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
        >>> sol = neuralode.solve(van_der_pol, y0, torch.tensor([0.0, 500.0], dtype=torch.float64),
        ...                       method="kvaerno5", rtol=1e-6, atol=1e-8)
        >>> round(float(sol.ys[-1, 0]), 3), sol.success  # scipy's Radau at rtol 1e-10: 1.597
        (1.597, True)
    """

    def __init__(self, tableau: EsdirkTableau, settings: NewtonSettings | None = None) -> None:
        if not isinstance(tableau, EsdirkTableau):
            raise TypeError(f"Esdirk needs an EsdirkTableau, got {type(tableau).__name__}")
        self.tableau = tableau
        self.settings = settings or NewtonSettings()
        self.name = tableau.name
        self.order = tableau.order
        self.error_order = tableau.error_order
        self.dense_order = 3
        # The cubic Hermite interpolant is of order 3 only; outputs come from steps instead.
        self.lands_on_outputs = True
        self.n_stages = tableau.stages
        self.gamma = float(tableau.gamma)
        self.a_terms = [_terms(row) for row in tableau.a]
        self.pred_terms = [_terms(row) for row in tableau.pred]
        self.c_list = [float(x) for x in tableau.c]
        self.e_terms = _terms(tableau.b_err)
        s, b = self.n_stages, [float(x) for x in tableau.b]
        # Cubic Hermite through (y0, k_0) and (y1, k_{s-1}), in the stages' terms (y1 - y0 = h
        # sum_j b_j k_j): B_j = (3 th^2 - 2 th^3) b_j + [j = 0] (th - 2 th^2 + th^3)
        # + [j = s-1] (th^3 - th^2).
        self._P = [
            [
                float(j == 0),
                3 * b[j] - 2 * (j == 0) - (j == s - 1),
                -2 * b[j] + (j == 0) + (j == s - 1),
            ]
            for j in range(s)
        ]
        super().__init__()

    def configured(self, controller: Any) -> Solver:
        if controller is None or self.settings.rtol is not None:
            return self  # fixed steps, or tolerances of the user's own
        settings = replace(
            self.settings,
            rtol=controller.rtol,
            atol=controller.atol,
            norm=controller.norm,
            dims=controller.dims,
        )
        return Esdirk(self.tableau, settings)

    def krylov(self, f: Func, y: torch.Tensor, batched: bool) -> bool:
        """Whether this solve's Newton systems go to GMRES (``NewtonSettings.linear``)."""
        linear = self.settings.linear
        if linear != "auto":
            return linear == "gmres"
        if isinstance(f, JacobianField) or _structured(f):
            return False
        if self.settings.preconditioner is not None:
            return True
        rows, size = (y.shape[0], y[0].numel()) if batched else (1, y.numel())
        return rows * size * size >= KRYLOV_MIN_ENTRIES

    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        h_y = _h_state(h, y)
        hg = _hg(h, self.gamma, y)
        batched = not isinstance(h, float) and h.ndim == 1
        krylov = self.krylov(f, y, batched)
        with torch.no_grad():  # the iteration matrix is not differentiated
            lin, nfe, njev = _linearise(f, t, y, state, 1, jacobian_free=krylov)
            lu = None if krylov else _factor(lin.J, hg, y)
        graph = torch.is_grad_enabled()
        # The explicit first stage: f(t, y), again with its graph when gradients are wanted.
        k0 = lin.f0
        if graph:
            k0, nfe = f(_time(t, y), y), nfe + 1
        ks = [k0]
        iters: int | torch.Tensor = 0
        failed: torch.Tensor | bool = False
        hg_y = h_y * self.gamma
        safe_hg = _safe(hg_y)
        newton = _Newton(self.settings, y, hg_y, batched)
        if lu is not None:
            newton.linear = lambda r, t, z, fz, active: lu.solve(r)
        else:
            gmres = KrylovNewton(
                f, hg, newton.scale, 0.05 * newton.kappa, self.settings.krylov_dim, newton.rows,
                # The adjoint's augmented field is not the system the preconditioner knows.
                None if _structured(f) else self.settings.preconditioner,
            )  # fmt: skip
            newton.linear = gmres.solve
        z = y
        for i in range(1, self.n_stages):
            ti = _time(t + self.c_list[i] * h, y)
            base = _stage(y, h_y, ks, self.a_terms[i])
            with torch.no_grad():
                # The published predictors (OrdinaryDiffEq.jl's): measured against starting
                # from the previous stage, they took as many evaluations over the benchmark
                # problems and were more accurate on Van der Pol.
                z0 = base + hg_y * _combine(ks, self.pred_terms[i])
                z_star, ok, its = newton.solve(f, ti, base, z0)
            iters, failed = iters + its, failed | ~ok
            z = z_star
            if graph:  # z* held fixed: the right side of the implicit function theorem
                f_star = f(ti, z_star)
                nfe = nfe + 1
                if f_star.requires_grad or base.requires_grad:
                    implicit = base + hg_y * f_star
                    solve_t: Any = (
                        _TransposedSolve(f, ti, z, hg)
                        if lu is not None
                        else KrylovTransposedSolve(f, ti, z, hg, self.settings.krylov_dim)
                    )
                    # torch.autograd.Function.apply has no annotations (torch 2.13).
                    z = _ImplicitStage.apply(implicit, z_star, solve_t)  # type: ignore[no-untyped-call]
            ks.append((z - base) / safe_hg)
        with torch.no_grad():  # step-size control is not differentiated
            y_error = _combine(ks, self.e_terms).mul_(h_y)
        status = torch.where(torch.as_tensor(failed, device=y.device), int(Status.NEWTON_FAILED), 0)
        if lu is None:  # each J v product is one (finite-difference) evaluation of f
            return StepResult(
                z, y_error, ks, None, nfe + iters + gmres.products, status, lin, 0, 0, iters
            )
        return StepResult(z, y_error, ks, None, nfe + iters, status, lin, njev, 1, iters)


def _structured(f: Func) -> bool:
    """A field with its own Jacobian's structure (the adjoint's augmented field)."""
    return getattr(f, "linearise", None) is not None


def _safe(hg: torch.Tensor | float) -> torch.Tensor | float:
    """``h gamma`` with rows that take no step (``h = 0``) divided by 1 instead."""
    if isinstance(hg, float):
        return hg if hg != 0 else 1.0
    return torch.where(hg == 0, 1.0, hg)


class _Newton:
    """The iteration of one step's stages (shared scale, linear solver and rate estimate):
    the chord iteration with a factored matrix, or Newton-Krylov (``linear``: the correction
    ``(r, t, z, f(t, z), active) -> dz`` for the residual ``r`` at the iterate ``z``, on the
    rows still iterating)."""

    linear: Any

    def __init__(
        self,
        settings: NewtonSettings,
        y: torch.Tensor,
        hg: torch.Tensor | float,
        batched: bool,
    ) -> None:
        self.hg, self.max_iters = hg, settings.max_iters
        self.dims = settings.dims if settings.dims is not None else row_dims(y.ndim, batched)
        self.norm = settings.norm if settings.norm is not None else _rms
        eps = torch.finfo(y.dtype).eps
        rtol = settings.rtol if settings.rtol is not None else eps**0.75
        atol = settings.atol if settings.atol is not None else eps**0.75
        with torch.no_grad():
            self.scale = y.abs().mul(rtol).add(atol)
        r_min = float(rtol) if isinstance(rtol, float) else float(torch.as_tensor(rtol).min())
        self.kappa = max(10 * eps / r_min, min(0.03, math.sqrt(r_min)))
        self.rows = y.shape[:1] if batched else ()

    def solve(
        self, f: Func, t: torch.Tensor, base: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z*, converged, iterations)`` per row, from the prediction ``z``."""
        # No carried rate: a first correction is trusted only once it is itself below kappa.
        eta = torch.ones(self.rows, dtype=z.dtype, device=z.device)
        active = torch.ones_like(eta, dtype=torch.bool)
        ok = torch.zeros_like(active)
        its = torch.zeros(active.shape, dtype=torch.long, device=z.device)
        prev: torch.Tensor | None = None
        ratio: torch.Tensor | None = None
        for m in range(self.max_iters):
            fz = f(t, z)
            dz = self.linear(base - z + self.hg * fz, t, z, fz, active)
            n = self.norm(dz / self.scale, self.dims)
            its = its + active
            z = torch.where(per_row(active, z.ndim), z + dz, z)
            finite = torch.isfinite(n)
            diverged = ~finite
            if prev is not None:
                new_ratio = n / prev
                # The first ratio says little (the prediction's error is not yet in the chord's
                # regime); later ones are averaged with the previous (Hairer's RADAU5).
                theta = new_ratio if ratio is None else (new_ratio * ratio).sqrt()
                ratio = new_ratio
                eta = torch.where(active, theta / (1 - theta).clamp(min=1e-30), eta)
                if m >= 2:
                    left = self.max_iters - 1 - m
                    # Diverging, or too slow to converge in the iterations left.
                    slow = (theta >= 0.99) | (theta**left * eta * n > self.kappa)
                    diverged |= slow & (n > 0)
            # A non-finite correction is the field's NaN or Inf: the row stops iterating with
            # NaN in its stage, which its error ratio rejects and the loop reports as such.
            nonfinite = active & ~finite
            converged = active & ~diverged & ((eta * n <= self.kappa) | (n == 0))
            converged |= nonfinite
            ok = ok | converged
            active = active & ~converged & ~diverged
            prev = n
            if not bool(active.any()):  # the step's host synchronisation
                break
        return z, ok, its


def _rms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Root mean square over ``dims`` (a solve without a controller: fixed or direct steps)."""
    return x.square().mean(dim=dims).sqrt() if dims else x.abs()


class _TransposedSolve:
    """``v -> (I - h gamma J(z*))^-T v`` per row, with ``J`` at the converged stage."""

    def __init__(self, f: Func, t: torch.Tensor, z: torch.Tensor, hg: torch.Tensor | float) -> None:
        self.f, self.t, self.z, self.hg = f, t, z, hg

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            J = jacobian(self.f, self.t.detach(), self.z).J
            lu = _Factored(J.transpose(-1, -2), self.hg, self.z)
            return lu.solve(v)


class _ImplicitStage(torch.autograd.Function):
    """The converged stage ``z*`` with the implicit function theorem's gradient: the incoming
    gradient ``v`` becomes ``(I - h gamma J)^-T v`` and flows into ``base + h gamma f(t, z*)``
    (``z*`` fixed), which is ``z*`` at convergence."""

    @staticmethod
    def forward(
        ctx: Any, implicit: torch.Tensor, z_star: torch.Tensor, solve_t: _TransposedSolve
    ) -> torch.Tensor:
        ctx.solve_t = solve_t
        return z_star.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.solve_t(grad), None, None
