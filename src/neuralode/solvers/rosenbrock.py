"""Rosenbrock methods: linearly implicit one-step methods for stiff problems.

A Rosenbrock step solves linear systems with the matrix ``I - h gamma J`` (``J = df/dy`` at the
step's start) instead of iterating Newton's method: one Jacobian and one LU factorisation per step,
reused by every stage, no convergence test that can fail.  Per sample: a batched solve factors a
``[batch, N, N]`` stack (``torch.linalg.lu_factor``), one matrix per row with that row's own step.

Gradients: every operation is differentiable (the LU solves included), and the Jacobian is taken
with ``create_graph`` when gradients are enabled, so backprop and the checkpoint strategy give the
exact gradient of the computed solution (``torch.autograd.gradcheck`` holds in float64).

* :class:`Rosenbrock23`: Shampine and Reichelt's order 2(3) method (MATLAB's ``ode23s``), a
  W-method: L-stable, for loose tolerances and float32 fields.
* :class:`Rosenbrock`: any :class:`RosenbrockTableau` in Hairer and Wanner's transformed form
  (``rodas4``, ``rodas5p``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .._rows import per_row
from .base import DenseStep, Func, Solver, StepResult, Time, constant
from .newton import Linearisation, jacobian, lu_factor
from .rk import Terms, _combine, _h_state, _stage, _terms, _time
from .tableaus import RosenbrockTableau

__all__ = ["Rosenbrock", "Rosenbrock23"]


#: Systems up to this size are factored by unrolled elimination inside a compiled graph.
_UNROLL_MAX = 3


class _Factored:
    """``I - h gamma J`` per row, LU-factored once per step; :meth:`solve` takes and returns
    tensors shaped like the state.

    Inside a ``torch.compile`` trace (the compiled driver) a system of at most
    :data:`_UNROLL_MAX` unknowns is factored by :func:`_lu_unrolled`, elimination written out
    in elementwise operations, which inductor fuses into the generated code (the LAPACK
    kernels run outside it, through a slow fallback, and cost most of a compiled stiff step)."""

    def __init__(self, J: torch.Tensor, hg: torch.Tensor | float, like: torch.Tensor) -> None:
        self.shape = like.shape
        N = J.shape[-1]
        batched = J.ndim == 3
        eye = torch.eye(N, dtype=J.dtype, device=J.device)
        if isinstance(hg, torch.Tensor) and batched:
            hg = hg.view(-1, 1, 1)
        self.unrolled = N <= _UNROLL_MAX and torch.compiler.is_compiling()
        if self.unrolled:
            self.LU, self.pivots = _lu_unrolled(eye - hg * J)
        else:
            self.LU, self.pivots = lu_factor(eye - hg * J)
        self.cols = (like.shape[0], N, 1) if batched else (N, 1)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        if self.unrolled:
            return _lu_solve_unrolled(self.LU, self.pivots, rhs.reshape(self.cols[:-1])).reshape(
                self.shape
            )
        x: torch.Tensor = torch.linalg.lu_solve(self.LU, self.pivots, rhs.reshape(self.cols))
        return x.reshape(self.shape)


def _lu_unrolled(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``P A = L U`` with partial pivoting (LAPACK's choice of pivot: the largest magnitude in
    the column, the first of equals), for ``A`` ``[..., N, N]`` with a small static ``N``,
    written out row by row: returns ``LU`` (``L``'s multipliers below the diagonal, ``U`` on
    and above) and the row permutation ``perm`` ``[..., N]`` (row ``i`` of ``P A`` is row
    ``perm[i]`` of ``A``)."""
    N = A.shape[-1]
    rows = [A[..., i, :] for i in range(N)]
    perm = [torch.full(A.shape[:-2], i, dtype=torch.long, device=A.device) for i in range(N)]
    for k in range(N):
        col = torch.stack([rows[i][..., k].abs() for i in range(k, N)], -1)
        pivot = col.argmax(-1) + k
        row_k, perm_k = rows[k], perm[k]
        for i in range(k + 1, N):
            swap = pivot == i
            row_i = rows[i]
            rows[i] = torch.where(swap.unsqueeze(-1), row_k, row_i)
            row_k = torch.where(swap.unsqueeze(-1), row_i, row_k)
            perm[i], perm_k = torch.where(swap, perm_k, perm[i]), torch.where(swap, perm[i], perm_k)
        rows[k], perm[k] = row_k, perm_k
        for i in range(k + 1, N):
            m = rows[i][..., k] / row_k[..., k]
            rest = rows[i][..., k + 1 :] - m.unsqueeze(-1) * row_k[..., k + 1 :]
            rows[i] = torch.cat([rows[i][..., :k], m.unsqueeze(-1), rest], -1)
    return torch.stack(rows, -2), torch.stack(perm, -1)


def _lu_solve_unrolled(LU: torch.Tensor, perm: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x`` with ``A x = b`` (``b`` ``[..., N]``) from :func:`_lu_unrolled`'s factors."""
    N = LU.shape[-1]
    pb = torch.gather(b, -1, perm)
    z: list[torch.Tensor] = []
    for i in range(N):
        v = pb[..., i]
        for j in range(i):
            v = v - LU[..., i, j] * z[j]
        z.append(v)
    x: list[torch.Tensor] = [z[0]] * N
    for i in reversed(range(N)):
        v = z[i]
        for j in range(i + 1, N):
            v = v - LU[..., i, j] * x[j]
        x[i] = v / LU[..., i, i]
    return torch.stack(x, -1)


def _factor(J: Any, hg: torch.Tensor | float, like: torch.Tensor) -> Any:
    """``I - hg J`` factored: LU per row for a matrix, the structured Jacobian's own solver
    otherwise (:func:`~neuralode.solvers.newton.jacobian`'s ``structured``)."""
    if isinstance(J, torch.Tensor):
        return _Factored(J, hg, like)
    return J.factored(hg)


class KnownLinearisation(NamedTuple):
    """A batch's carried linearisation known on some rows only (those that rejected their step
    and retry from the same start, while others accepted and moved on)."""

    lin: Linearisation
    known: torch.Tensor  # [batch] bool


def _linearise(
    f: Func, t: Time, y: torch.Tensor, state: Any, n_stages: int, jacobian_free: bool = False
) -> tuple[Linearisation, int | torch.Tensor, int | torch.Tensor]:
    """``f(t, y)`` and its Jacobians at the step's start, the step's evaluations of ``f`` and
    its Jacobians taken (per row when rows differ).  A retry of a rejected step starts where it
    did and reuses the linearisation it carried (``StepResult.retry_state``).  Where only some
    rows of a batch know theirs, the batch takes a new one in one call (its Jacobian costs what
    one row's does) and each row is charged what it would have spent solved alone.

    ``jacobian_free`` (an ESDIRK step that solves its systems by GMRES): ``f(t, y)`` only, with
    empty placeholders for the Jacobians."""
    if isinstance(state, Linearisation):
        return state, n_stages - 1, 0
    tt = _time(t, y)
    if jacobian_free:
        empty = y.new_zeros(y.shape[:1] + (0,) if tt.ndim == 1 else (0,))
        lin = Linearisation(f(tt, y), empty, empty)
    else:
        lin = jacobian(f, tt, y, structured=True)
    jev = 0 if jacobian_free else 1
    if isinstance(state, KnownLinearisation):
        known = state.known
        lin = Linearisation(
            *(torch.where(per_row(known, new.ndim), old, new) for new, old in zip(lin, state.lin))
        )
        return lin, n_stages - known.long(), (~known).long() * jev
    return lin, n_stages, jev


def _merge_linearisation(accept: torch.Tensor, new: Any, old: Any) -> Any:
    """The carried linearisation per row: rows that accepted start afresh (``new`` is
    ``None``: a Rosenbrock step carries nothing forward), rows that rejected keep theirs."""
    if isinstance(old, KnownLinearisation):
        old_lin, old_known = old.lin, old.known
    elif isinstance(old, Linearisation):
        old_lin, old_known = old, torch.ones_like(accept)
    else:
        return None
    known = old_known & ~accept
    return KnownLinearisation(old_lin, known)


class _LinearlyImplicit(Solver):
    """What the stiff methods share (the Rosenbrock ones here, the ESDIRK ones in
    :mod:`.esdirk`): a Jacobian taken afresh each step, nothing carried from one step to the
    next but a rejected step's linearisation (for its retry, per row), and an interpolant over
    the stage vectors with no extra evaluation (coefficients ``self._P``, built in float64 once
    per device)."""

    _P: list[list[float]]
    uses_jacobian = True

    def __init__(self) -> None:
        self._P_cache: dict[torch.device, torch.Tensor] = {}

    def init(self, f: Func, t: Time, y: torch.Tensor, f0: torch.Tensor | None) -> Any:
        return None  # f(t, y) comes with each step's Jacobian

    def merge(self, accept: torch.Tensor, new: Any, old: Any) -> Any:
        return _merge_linearisation(accept, new, old)

    def dense(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, result: StepResult
    ) -> tuple[DenseStep, int, Any]:
        P = self._P_cache.get(y.device)
        if P is None:
            P = self._P_cache[y.device] = constant(
                lambda: torch.tensor(self._P, dtype=torch.float64, device=y.device)
            )
        return DenseStep(y, h, list(result.dense_info), P), 0, None


class Rosenbrock(_LinearlyImplicit):
    """A Rosenbrock method given by its :class:`RosenbrockTableau` (see there for the stage
    equations).

    Each step evaluates ``f`` once per stage (the first evaluation is the Jacobian's own forward
    pass; a retry after a rejected step reuses the Jacobian and that evaluation), takes one
    Jacobian (``N`` vector-Jacobian products, batched over the samples) and one
    LU factorisation per sample, and solves one linear system per stage.

    Args:
        tableau: the method, ``rodas4``, ``rodas5p`` (``ROSENBROCK_TABLEAUS``) or one of your
            own.

    Raises:
        TypeError: ``tableau`` is not a :class:`RosenbrockTableau`.

    Examples:
        Robertson's chemical kinetics (stiff: rate constants from ``0.04`` to ``3e7``):

        >>> import torch, neuralode
        >>> k = torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64)
        >>> def robertson(t, y):
        ...     y1, y2, y3 = y.unbind(-1)
        ...     r1, r2, r3 = k[0] * y1, k[1] * y2 * y2, k[2] * y2 * y3
        ...     return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)
        >>> y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        >>> sol = neuralode.solve(robertson, y0, torch.tensor([0.0, 40.0], dtype=torch.float64),
        ...                       method="rodas5p", rtol=1e-6, atol=1e-10)
        >>> round(float(sol.ys[-1, 0]), 4), int(sol.stats.n_steps) < 100
        (0.7158, True)
    """

    # Steps end on output times: the Rodas interpolants' error is not controlled, and in the
    # stiff regime it is far above the steps' (Prothero-Robinson, y' = -1e6 (y - cos t) - sin t
    # at rtol 1e-6 with 40 outputs on [0, 10]: rodas5p 4.3e5 tolerance units interpolated in 8
    # steps, rodas4 1.2e6, where each step's end is within 1).  rosenbrock23's interpolant,
    # built for stiff problems, stays within 1 unit there and is used.
    lands_on_outputs = True

    def __init__(self, tableau: RosenbrockTableau) -> None:
        if not isinstance(tableau, RosenbrockTableau):
            raise TypeError(f"Rosenbrock needs a RosenbrockTableau, got {type(tableau).__name__}")
        self.tableau = tableau
        self.name = tableau.name
        self.order = tableau.order
        self.error_order = tableau.error_order
        self.dense_order = tableau.dense_order
        self.n_stages = tableau.stages
        g = float(tableau.gamma)
        self.gamma = g
        self.a_terms = [_terms(row) for row in tableau.a]
        # gamma C and gamma d: the right-hand side of stage i is gamma f_i + sum_j gC_ij K_j
        # + h gd_i f_t.
        self.gC_terms: list[Terms] = [
            tuple((j, g * x) for j, x in _terms(row)) for row in tableau.C
        ]
        self.gd = [g * float(x) for x in tableau.d]
        self.c_list = [float(x) for x in tableau.c]
        self.m_terms = _terms(tableau.m)
        self.e_terms = _terms(tableau.m_err)
        super().__init__()
        self._P = [[float(x) for x in row] for row in tableau.P]

    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        h_y = _h_state(h, y)
        lin, nfe, njev = _linearise(f, t, y, state, self.n_stages)
        lu = _factor(lin.J, _hg(h, self.gamma, y), y)
        ks: list[torch.Tensor] = []
        for i in range(self.n_stages):
            if i == 0:
                fi = lin.f0
            else:
                ti = _time(t + self.c_list[i] * h, y)
                fi = f(ti, _stage(y, h_y, ks, self.a_terms[i]))
            rhs = fi * self.gamma
            if self.gC_terms[i]:
                rhs = rhs + _combine(ks, self.gC_terms[i])
            if self.gd[i] != 0:
                rhs = rhs + h_y * self.gd[i] * lin.ft
            ks.append(lu.solve(rhs))
        y1 = _stage(y, h_y, ks, self.m_terms)
        with torch.no_grad():  # step-size control is not differentiated
            y_error = _combine(ks, self.e_terms).mul_(h_y)
        return StepResult(y1, y_error, ks, None, nfe, None, lin, njev, 1)


def _hg(h: Time, gamma: float, y: torch.Tensor) -> torch.Tensor | float:
    """``h gamma`` per row in the state dtype (a float for the one-row driver)."""
    if isinstance(h, float):
        return h * gamma
    return h.to(y.dtype) * gamma


class Rosenbrock23(_LinearlyImplicit):
    """Shampine and Reichelt's Rosenbrock method of order 2 with a 3rd-order error estimate
    (``ode23s`` in MATLAB; "The MATLAB ODE Suite", SIAM J. Sci. Comput. 18, 1997).

    With ``d = 1 / (2 + sqrt 2)``, ``W = I - h d J``, ``f0 = f(t, y)``:

        K1 = W^-1 (f0 + h d f_t),   F1 = f(t + h/2, y + h/2 K1),   K2 = W^-1 (F1 - K1) + K1,
        y1 = y + h K2,   F2 = f(t + h, y1),
        K3 = W^-1 (F2 - (6 + sqrt 2)(K2 - F1) - 2 (K1 - f0) + h d f_t),
        error = h / 6 (K1 - 2 K2 + K3),

    and the dense output ``y0 + h (theta (1 - theta) K1 + theta (theta - 2 d) K2) / (1 - 2 d)``.
    It is a W-method (its order 2 holds for any approximation of ``J``) and L-stable.  Three
    evaluations of ``f`` per step (the first is the Jacobian's forward pass); ``F2`` and ``K3``
    serve the error estimate only and are computed without autograd.  Registered as
    ``method="rosenbrock23"``; it takes no arguments.

    Examples:
        A stiff relaxation onto ``cos t`` (``lambda = -1e4``):

        >>> import torch, neuralode
        >>> f = lambda t, y: -1e4 * (y - torch.cos(t))
        >>> y0 = torch.zeros(1, dtype=torch.float64)
        >>> t = torch.tensor([0.0, 1.0], dtype=torch.float64)
        >>> sol = neuralode.solve(f, y0, t, method="rosenbrock23", rtol=1e-4, atol=1e-7)
        >>> round(float(sol.ys[-1, 0]), 3), sol.success  # cos(1) = 0.540
        (0.54, True)
    """

    name = "rosenbrock23"
    order = 2
    error_order = 2
    dense_order = 2

    n_stages = 3
    c_list = (0.0, 0.5, 1.0)
    d = 1 / (2 + math.sqrt(2))
    e32 = 6 + math.sqrt(2)

    def __init__(self) -> None:
        d = self.d
        super().__init__()
        self._P = [[1 / (1 - 2 * d), -1 / (1 - 2 * d)], [-2 * d / (1 - 2 * d), 1 / (1 - 2 * d)]]

    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        d = self.d
        h_y = _h_state(h, y)
        lin, nfe, njev = _linearise(f, t, y, state, 3)
        lu = _factor(lin.J, _hg(h, d, y), y)
        hdT = h_y * d * lin.ft
        k1 = lu.solve(lin.f0 + hdT)
        f1 = f(_time(t + 0.5 * h, y), _stage(y, h_y, [k1], ((0, 0.5),)))
        k2 = lu.solve(f1 - k1) + k1
        y1 = _stage(y, h_y, [k2], ((0, 1.0),))
        with torch.no_grad():  # step-size control is not differentiated
            f2 = f(_time(t + h, y), y1)
            rhs = f2 - self.e32 * (k2 - f1) - 2 * (k1 - lin.f0) + hdT
            k3 = lu.solve(rhs)
            y_error = _combine([k1, k2, k3], ((0, 1 / 6), (1, -2 / 6), (2, 1 / 6))).mul_(h_y)
        return StepResult(y1, y_error, [k1, k2], None, nfe, None, lin, njev, 1)
