"""ESDIRK methods: implicit Runge-Kutta stages solved by Newton's method, per sample.

Each implicit stage ``z = base + h gamma f(t_i, z)`` is solved by the simplified (chord) Newton
iteration with the matrix ``I - h gamma J``, LU-factored per sample when ``h`` or ``J``
changes.  ``J`` is kept from step to step while the iterations converge fast, with scipy's
``Radau`` policy (``NewtonSettings.reuse_jacobian``): after a step whose iterations were slow
the next takes a new one at its start; a row whose iteration fails with a previous step's
Jacobian runs the step again with a fresh one (inside the step, that row only); and a rejected
step's retry keeps it.  Every row of a batch iterates until its own convergence test passes; a
row whose iteration diverges, or would not converge within ``max_iters``, with its step's own
Jacobian, fails its step (``StepResult.status``), which the loop rejects and retries smaller, as
it does a step with a large error.

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
from typing import Any, NamedTuple

import torch

from .._rows import per_row, row_dims
from ..solution import Status
from .base import Func, Solver, StepResult, Time
from .krylov import KrylovNewton, KrylovTransposedSolve
from .newton import JacobianField, Linearisation, jacobian
from .rk import _combine, _h_state, _stage, _terms, _time
from .rosenbrock import (
    _factor,
    _Factored,
    _hg,
    _linearise,
    _LinearlyImplicit,
    _merge_linearisation,
)
from .tableaus import EsdirkTableau

__all__ = ["Esdirk", "NewtonSettings"]

#: ``linear="auto"`` solves a batch's Newton systems by GMRES once its dense Newton matrices
#: would hold this many entries (``batch * N^2``; 32 MiB in float64), and a single system's
#: from :data:`KRYLOV_MIN_ENTRIES_ONE`.  Measured in ``benchmarks/krylov.py`` (kvaerno5, rtol
#: 1e-4, Jacobians reused; GMRES time / dense time, one run): a neural field 3.36 at 512
#: components, 1.99 at 1024, 1.39 at 2048 and 0.85 at 4096; 16 samples 1.82 at 256 and 0.59
#: at 512 (a batch's products are matrix-matrix products, one system's memory-bound
#: matrix-vector ones); the Brusselator (a diffusion, unpreconditioned GMRES's hard case)
#: 7-13 at 200-2000 components, which this keeps dense (with a preconditioner: 0.27 at 2000).
KRYLOV_MIN_ENTRIES = 2**22
KRYLOV_MIN_ENTRIES_ONE = 2**24
_LINEAR = ("auto", "dense", "gmres")
#: With a previous step's Jacobian, a stage's iteration stops after two corrections only if the
#: second is below this fraction of the first.  The usual test (the rate estimated from those
#: two) let iterates through 2e4 tolerance units off the root on Van der Pol (mu = 1e3,
#: kvaerno3, rtol 1e-3: 1053 units at the outputs against 0.47 with a Jacobian per step);
#: measured worst stage errors (units): 0.2 -> 7e3, 0.05 -> 0.19, 0.01 -> 0.13, and never
#: after two -> 1.5 (``fresh`` Jacobians: 0.028, below kappa = 0.03).  0.01 costs no
#: iterations over fresh Jacobians on the neural field (645 against 639 evaluations).
_STALE_RATE = 0.01


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
            Jacobian, ``N`` vector-Jacobian products, and an LU factorisation per sample,
            reused as ``reuse_jacobian`` says), ``"gmres"`` (matrix-free: GMRES on
            Jacobian-vector products at the current iterate, :mod:`neuralode.solvers.krylov`),
            or ``"auto"`` (the default): GMRES once the dense matrices would hold
            :data:`KRYLOV_MIN_ENTRIES` entries (``batch * N^2``; a single system
            :data:`KRYLOV_MIN_ENTRIES_ONE`), dense below and for a field with a Jacobian of its own
            (``jac=``, the adjoint's block form).  GMRES is unpreconditioned: a stiffness
            spread over many modes (a discretised diffusion) needs many products per system,
            and there ``"dense"`` may be faster whatever the size (``docs/concepts/stiff.md``).
            A ``jac=`` given to ``solve`` is not used by ``"gmres"``.
        krylov_dim: GMRES's Krylov dimension per Newton system (``J v`` products at most).
        reuse_jacobian: keep the iteration Jacobian from step to step while the iterations
            converge fast (``"dense"`` systems; the default), with scipy's ``Radau`` policy: a
            step whose iterations were slow (more than two, the last contracting by more than
            1e-3) has the next step take a new one; a row whose iteration fails with a
            previous step's Jacobian tries the same step again with a fresh one before the
            step is rejected; a rejected step's retry keeps it.  The matrix ``I - h gamma J``
            is factored again whenever ``h`` changes.  ``False``: a Jacobian per step.
        preconditioner: for GMRES, ``preconditioner(t, y, hg, r)``: an approximate solve
            ``M^-1 r`` with ``M ~ I - hg J(t, y)`` (``t``: ``[]`` or ``[batch]``; ``y`` and
            ``r`` shaped like the state; ``hg = h gamma``, a float or ``[batch]``), applied
            on the right, so the Newton test's residuals are the true ones; a good one (the
            stiff linear part solved exactly: a diffusion's tridiagonal system) cuts the
            products per system to a few.  Given, ``"auto"`` means ``"gmres"``; with
            ``"dense"`` it is an error.  The adjoint's backward solve (another system) does
            not use it.
        preconditioner_transposed: for the gradient of GMRES-solved stages (backprop and
            checkpoint; the implicit function theorem solves ``(I - hg J)^T u = v`` at each
            converged stage, to round-off): ``preconditioner_transposed(t, y, hg, r) ->
            M^-T r``, the same signature.  For a symmetric ``M`` (a diffusion's) pass the
            same function as ``preconditioner``.  ``None``: that solve is unpreconditioned
            (GMRES with restarts, which a stiff diffusion can take hundreds of products per
            stage to finish).

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
    reuse_jacobian: bool = True
    preconditioner_transposed: Any = None

    def __post_init__(self) -> None:
        if self.linear not in _LINEAR:
            raise ValueError(
                f"NewtonSettings: linear must be one of {list(_LINEAR)}, got {self.linear!r}"
            )
        if isinstance(self.krylov_dim, bool) or not isinstance(self.krylov_dim, int):
            raise TypeError(f"NewtonSettings: krylov_dim must be an int, got {self.krylov_dim!r}")
        if self.krylov_dim < 1:
            raise ValueError(f"NewtonSettings: krylov_dim must be >= 1, got {self.krylov_dim}")
        for name, solves in (("preconditioner", "M^-1 r"), ("preconditioner_transposed", "M^-T r")):
            given = getattr(self, name)
            if given is None:
                continue
            if not callable(given):
                raise TypeError(
                    f"NewtonSettings: {name} must be a callable (t, y, hg, r) -> {solves}, "
                    f"got {type(given).__name__}"
                )
            if self.linear == "dense":
                raise ValueError(
                    f"NewtonSettings: {name} serves linear='gmres' (or 'auto'), not linear='dense'"
                )
        if not isinstance(self.reuse_jacobian, bool):
            raise TypeError(
                f"NewtonSettings: reuse_jacobian must be a bool, got {self.reuse_jacobian!r}"
            )
        if isinstance(self.max_iters, bool) or not isinstance(self.max_iters, int):
            raise TypeError(f"NewtonSettings: max_iters must be an int, got {self.max_iters!r}")
        if self.max_iters < 1:
            raise ValueError(f"NewtonSettings: max_iters must be >= 1, got {self.max_iters}")


class Esdirk(_LinearlyImplicit):
    """A stiffly accurate ESDIRK method given by its :class:`EsdirkTableau` (``kvaerno3``,
    ``kvaerno5``).

    Per step: ``f(t, y)`` (the explicit first stage; a retry after a rejection reuses it), the
    iteration Jacobian where the last one is not kept (see :class:`NewtonSettings`
    ``reuse_jacobian``), an LU factorisation per sample where ``h`` or the Jacobian changed, then
    each implicit stage's Newton iterations (one evaluation of ``f`` each).
    ``Solution.stats`` counts the Jacobians (``njev``), factorisations (``nlu``) and iterations
    (``n_newton``).

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
        if self.settings.preconditioner_transposed is not None:
            return True
        rows, size = (y.shape[0], y[0].numel()) if batched else (1, y.numel())
        least = KRYLOV_MIN_ENTRIES if rows > 1 else KRYLOV_MIN_ENTRIES_ONE
        return rows * size * size >= least

    def choice(self, state: Any) -> Any:
        """The Jacobian a step will iterate with where it is carried (a previous step's, or a
        retry's), so that the checkpoint strategy's replay of the step does the same
        arithmetic (a fresh Jacobian would converge to other iterates, within the Newton
        tolerance); ``None`` where every row takes its own."""
        if isinstance(state, _Carried) and bool(state.j_known.any()):
            return state.lin.J, state.j_known, state.j_current
        return None

    def replay_state(self, f: Func, t: Time, y: torch.Tensor, choice: Any) -> Any:
        if choice is None:
            return self.init(f, t, y, None)
        J, known, current = choice
        return _Carried(Linearisation(y, J, y), torch.zeros_like(known), known, current, math.nan)

    def merge(self, accept: torch.Tensor, new: Any, old: Any) -> Any:
        if isinstance(new, _Carried) or isinstance(old, _Carried):
            return _merge_carried(accept, new, old)
        return _merge_linearisation(accept, new, old)  # GMRES: the retry's f(t, y) only

    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        h_y = _h_state(h, y)
        hg = _hg(h, self.gamma, y)
        batched = not isinstance(h, float) and h.ndim == 1
        if self.krylov(f, y, batched):
            return self._step_krylov(f, t, h, y, state, h_y, hg, batched)
        tt = _time(t, y)
        with torch.no_grad():  # the iteration matrix is not differentiated
            lin, current, stale, taken, nfe, njev = _start(f, tt, y, state)
            lu, nlu = _refactor(state, lin, taken, hg, y)
        newton = _Newton(self.settings, y, h_y * self.gamma, batched)
        newton.linear = lambda r, t, z, fz, active: lu.solve(r)
        newton.stale = stale
        with torch.no_grad():
            zs, ks, iters, failed, slow = self._iterate(f, t, h, y, h_y, lin.f0, newton)
            # A row whose iteration failed with a previous step's Jacobian tries the same step
            # again with a fresh one (scipy's Radau) before its step is rejected.
            redo = failed & ~current
            if stale is not None and bool(redo.any()):
                fresh = jacobian(f, tt, y, structured=True)
                lin = lin._replace(J=_pick(redo, fresh.J, lin.J))
                lu = _factor(lin.J, hg, y)
                newton.stale, newton.rows_only = None, redo
                zs2, ks2, iters2, failed2, slow2 = self._iterate(f, t, h, y, h_y, lin.f0, newton)
                rows = per_row(redo, y.ndim)
                zs = [torch.where(rows, b, a) for a, b in zip(zs, zs2)]
                ks = [torch.where(rows, b, a) for a, b in zip(ks, ks2)]
                iters = iters + iters2  # iters2 is 0 on the other rows
                failed = torch.where(redo, failed2, failed)
                slow = torch.where(redo, slow2, slow)
                current = current | redo
                nfe, njev, nlu = nfe + redo, njev + redo, nlu + redo
        transposed = lambda ti, zi: _TransposedSolve(f, ti, zi, hg)  # noqa: E731
        z, ks, y_error, status, extra = self._finish(f, t, h, y, h_y, zs, ks, failed, transposed)
        nfe = nfe + extra
        # The next step (rows that accept) keeps this Jacobian unless the iterations were slow
        # (scipy's Radau: more than two iterations, the last at a rate above 1e-3), and this
        # factorisation where h is unchanged; a retry (rows that reject) keeps the Jacobian
        # and f(t, y), and factors again (its h is smaller).
        keep = ~slow & ~failed if self.settings.reuse_jacobian else torch.zeros_like(slow)
        no = torch.zeros_like(current)
        after = _Carried(lin, no, keep, no, hg, lu)
        retry = _Carried(lin, ~no, ~no, current, math.nan)
        return StepResult(
            z, y_error, ks, after, nfe + iters, status, retry, njev=njev, nlu=nlu, n_newton=iters
        )

    def _iterate(
        self,
        f: Func,
        t: Time,
        h: Time,
        y: torch.Tensor,
        h_y: torch.Tensor | float,
        k0: torch.Tensor,
        newton: _Newton,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The implicit stages by Newton's method, without gradients: the converged stages,
        all stages' slopes, and per row the iterations, whether any stage failed, and whether
        any converged slowly."""
        ks, zs = [k0], []
        hg_y = h_y * self.gamma
        safe_hg = _safe(hg_y)
        iters: Any = 0
        failed: Any = torch.zeros(newton.rows, dtype=torch.bool, device=y.device)
        slow: Any = torch.zeros_like(failed)
        for i in range(1, self.n_stages):
            ti = _time(t + self.c_list[i] * h, y)
            base = _stage(y, h_y, ks, self.a_terms[i])
            # The published predictors (OrdinaryDiffEq.jl's): measured against starting from
            # the previous stage, they took as many evaluations over the benchmark problems
            # and were more accurate on Van der Pol.
            z0 = base + hg_y * _combine(ks, self.pred_terms[i])
            z, ok, its, slow_i = newton.solve(f, ti, base, z0)
            iters, failed, slow = iters + its, failed | ~ok, slow | slow_i
            zs.append(z)
            ks.append((z - base) / safe_hg)
        return zs, ks, iters, failed, slow

    def _finish(
        self,
        f: Func,
        t: Time,
        h: Time,
        y: torch.Tensor,
        h_y: torch.Tensor | float,
        zs: list[torch.Tensor],
        ks: list[torch.Tensor],
        failed: torch.Tensor,
        transposed: Any,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, int]:
        """A step's end from its converged stages: ``y1``, the slopes (with gradients when
        they are enabled: :meth:`_differentiable`), the error estimate, the per-row status and
        the evaluations of ``f`` spent on the gradients' stages."""
        z, extra = (zs[-1] if zs else y), 0
        if torch.is_grad_enabled():
            ks, z, extra = self._differentiable(f, t, h, y, h_y, zs, transposed)
        with torch.no_grad():  # step-size control is not differentiated
            y_error = _combine(ks, self.e_terms).mul_(h_y)
        return z, ks, y_error, torch.where(failed, int(Status.NEWTON_FAILED), 0), extra

    def _differentiable(
        self,
        f: Func,
        t: Time,
        h: Time,
        y: torch.Tensor,
        h_y: torch.Tensor | float,
        zs: list[torch.Tensor],
        transposed: Any,
    ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        """The stages again with gradients, from the converged ``zs``: each is the root of its
        stage equation, its gradient by the implicit function theorem (``transposed(t_i, z_i)``
        solves with ``(I - h gamma J(z_i))^T``); the values are the iteration's.  Returns the
        slopes, the step's end and the evaluations of ``f`` spent (one per stage)."""
        hg_y = h_y * self.gamma
        safe_hg = _safe(hg_y)
        ks = [f(_time(t, y), y)]  # the explicit first stage, with its graph
        z, nfe = y, 1
        for i in range(1, self.n_stages):
            ti = _time(t + self.c_list[i] * h, y)
            base = _stage(y, h_y, ks, self.a_terms[i])
            z_star = zs[i - 1]
            f_star = f(ti, z_star)  # z* held fixed: the implicit function theorem's right side
            nfe += 1
            z = z_star
            if f_star.requires_grad or base.requires_grad:
                # torch.autograd.Function.apply has no annotations (torch 2.13).
                z = _ImplicitStage.apply(base + hg_y * f_star, z_star, transposed(ti, z_star))  # type: ignore[no-untyped-call]
            ks.append((z - base) / safe_hg)
        return ks, z, nfe

    def _step_krylov(
        self,
        f: Func,
        t: Time,
        h: Time,
        y: torch.Tensor,
        state: Any,
        h_y: torch.Tensor | float,
        hg: torch.Tensor | float,
        batched: bool,
    ) -> StepResult:
        """A step whose Newton systems are solved by GMRES (no Jacobian, nothing reused)."""
        with torch.no_grad():
            lin, nfe, _ = _linearise(f, t, y, state, 1, jacobian_free=True)
        newton = _Newton(self.settings, y, h_y * self.gamma, batched)
        gmres = KrylovNewton(
            f, hg, newton.scale, 0.05 * newton.kappa, self.settings.krylov_dim, newton.rows,
            # The adjoint's augmented field is not the system the preconditioner knows.
            None if _structured(f) else self.settings.preconditioner,
        )  # fmt: skip
        newton.linear = gmres.solve
        with torch.no_grad():
            zs, ks, iters, failed, _ = self._iterate(f, t, h, y, h_y, lin.f0, newton)
        dim = self.settings.krylov_dim
        pt = None if _structured(f) else self.settings.preconditioner_transposed
        transposed = lambda ti, zi: KrylovTransposedSolve(f, ti, zi, hg, dim, pt)  # noqa: E731
        z, ks, y_error, status, extra = self._finish(f, t, h, y, h_y, zs, ks, failed, transposed)
        nfe = nfe + extra
        # Each J v product is one (finite-difference) evaluation of f.
        return StepResult(
            z, y_error, ks, None, nfe + iters + gmres.products, status, lin, 0, 0, iters
        )


def _structured(f: Func) -> bool:
    """A field with its own Jacobian's structure (the adjoint's augmented field)."""
    return getattr(f, "linearise", None) is not None


def _safe(hg: torch.Tensor | float) -> torch.Tensor | float:
    """``h gamma`` with rows that take no step (``h = 0``) divided by 1 instead."""
    if isinstance(hg, float):
        return hg if hg != 0 else 1.0
    return torch.where(hg == 0, 1.0, hg)


class _Carried(NamedTuple):
    """What an ESDIRK step (dense linear algebra) hands to the next attempt, per row (flags
    ``[batch]``, or ``[]`` unbatched): the next step's state, or a rejected step's retry's."""

    lin: Linearisation  # f(t, y) where f0_known, the Jacobian to reuse where j_known
    f0_known: torch.Tensor  # f0 is the value at the row's start (a retry)
    j_known: torch.Tensor  # J may serve the row's next attempt
    j_current: torch.Tensor  # J was taken at the row's start (a retry's)
    hg_lu: torch.Tensor | float  # the h gamma ``lu`` was factored with, per row (NaN: none)
    lu: Any = None  # I - h gamma J factored (dropped where rows part: merge)


def _pick(mask: torch.Tensor, new: Any, old: Any) -> Any:
    """Per row ``new`` where ``mask``, else ``old``: tensors row by row, a structured Jacobian
    (one row: the adjoint's augmented field) whole."""
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
        return torch.where(per_row(mask, new.ndim), new, old)
    return new if bool(mask.all()) else old


def _start(
    f: Func, t: torch.Tensor, y: torch.Tensor, state: _Carried | None
) -> tuple[Linearisation, torch.Tensor, torch.Tensor | None, torch.Tensor, Any, Any]:
    """The step's ``f(t, y)`` and iteration Jacobian; per row, whether that Jacobian is the
    start's own (``current``), the rows that iterate with an older one (``None``: none) and
    those whose Jacobian was taken now; and the evaluations and Jacobians spent (per row).  The
    carried state may hold ``f(t, y)`` (a retry) and a Jacobian to reuse (a retry's, or a
    previous step's); the rows that need a Jacobian get one in one batched call, each charged
    what it would have spent alone."""
    if state is None:  # a solve's first step, or a restart after a jump of the state
        lin = jacobian(f, t, y, structured=True)
        yes = torch.ones(y.shape[:1] if t.ndim == 1 else (), dtype=torch.bool, device=y.device)
        return lin, yes, None, yes, 1, 1
    need_j, need_f = ~state.j_known, ~state.f0_known
    current = state.j_current | need_j
    # One synchronisation for the three questions.
    any_j, any_f, all_current = torch.stack([need_j.any(), need_f.any(), current.all()]).tolist()
    stale = None if all_current else ~current
    lin = state.lin
    if any_j:
        new = jacobian(f, t, y, structured=True)
        lin = Linearisation(
            _pick(need_f, new.f0, lin.f0),
            _pick(need_j, new.J, lin.J),
            _pick(need_f, new.ft, lin.ft),
        )
    elif any_f:
        lin = lin._replace(f0=_pick(need_f, f(t, y), lin.f0))
    nfe = need_f.long() if any_f else 0
    return lin, current, stale, need_j, nfe, need_j.long() if any_j else 0


def _refactor(
    state: Any, lin: Linearisation, taken: torch.Tensor, hg: Any, y: torch.Tensor
) -> tuple[Any, Any]:
    """``I - h gamma J`` factored, and the factorisations charged per row: none to a row whose
    Jacobian and ``h gamma`` are those of the carried factorisation (a fixed step, or an
    unchanged one), which is reused when every row's is (else the batch is factored in one
    call)."""
    if state is None:
        return _factor(lin.J, hg, y), 1
    same = ~taken & (torch.as_tensor(hg, device=y.device) == state.hg_lu)
    if state.lu is not None and bool(same.all()):
        return state.lu, 0
    return _factor(lin.J, hg, y), (~same).long()


def _merge_carried(accept: torch.Tensor, new: Any, old: Any) -> Any:
    """Per row: ``new`` where ``accept`` (the next step's state; ``None`` after a jump of the
    state: nothing known), else ``old`` (the retry's).  The factorisation itself is dropped
    (the rows' differ); each row's ``h gamma`` stays, for the count."""

    a, b = new, old
    if a is None and b is None:
        return None
    if a is None or b is None:
        kept, mask = (b, ~accept) if a is None else (a, accept)
        assert kept is not None
        return _Carried(
            kept.lin,
            kept.f0_known & mask,
            kept.j_known & mask,
            kept.j_current & mask,
            torch.where(mask, _rows(kept.hg_lu, mask), math.nan),
        )
    return _Carried(
        Linearisation(*(_pick(accept, x, y) for x, y in zip(a.lin, b.lin))),
        torch.where(accept, a.f0_known, b.f0_known),
        torch.where(accept, a.j_known, b.j_known),
        torch.where(accept, a.j_current, b.j_current),
        torch.where(accept, _rows(a.hg_lu, accept), b.hg_lu),
    )


def _rows(hg: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A carried ``h gamma`` as a per-row tensor (a retry's is a float NaN)."""
    return torch.as_tensor(hg, dtype=torch.float64, device=like.device).expand(like.shape)


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
        #: Rows iterating with a previous step's Jacobian (``None``: none).
        self.stale: torch.Tensor | None = None
        #: The only rows to iterate (``None``: all); the others keep their prediction.
        self.rows_only: torch.Tensor | None = None

    def solve(
        self, f: Func, t: torch.Tensor, base: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z*, converged, iterations, slow)`` per row, from the prediction ``z``; ``slow``:
        more than two iterations, the last at a contraction rate above 1e-3 (scipy's ``Radau``
        takes a new Jacobian after such a step)."""
        # No carried rate: a first correction is trusted only once it is itself below kappa.
        eta = torch.ones(self.rows, dtype=z.dtype, device=z.device)
        active = torch.ones_like(eta, dtype=torch.bool)
        if self.rows_only is not None:
            active = active & self.rows_only
        ok = torch.zeros_like(active)
        its = torch.zeros(active.shape, dtype=torch.long, device=z.device)
        prev: torch.Tensor | None = None
        ratio: torch.Tensor | None = None
        rate = torch.zeros_like(eta)
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
                rate = torch.where(active, new_ratio, rate)
                if m >= 2:
                    left = self.max_iters - 1 - m
                    # Diverging, or too slow to converge in the iterations left.
                    slow = (theta >= 0.99) | (theta**left * eta * n > self.kappa)
                    diverged |= slow & (n > 0)
            # A non-finite correction is the field's NaN or Inf: the row stops iterating with
            # NaN in its stage, which its error ratio rejects and the loop reports as such.
            nonfinite = active & ~finite
            small = (eta * n <= self.kappa) | (n == 0)
            if m < 2 and self.stale is not None:
                # A previous step's Jacobian: two corrections can hide a slowly converging
                # mode (their ratio small by chance), so these rows stop after two only at a
                # ratio below _STALE_RATE, else after three (see _STALE_RATE).
                fast = ratio < _STALE_RATE if ratio is not None and m == 1 else False
                small = (small & (~self.stale | fast)) | (n == 0)  # a zero correction: a root
            converged = active & ~diverged & small
            converged |= nonfinite
            ok = ok | converged
            active = active & ~converged & ~diverged
            prev = n
            if not bool(active.any()):  # the step's host synchronisation
                break
        return z, ok, its, (its > 2) & (rate > 1e-3)


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
