"""Adams methods (torchdiffeq's ``explicit_adams`` and ``implicit_adams``): fixed-step multistep.

A step of order ``k`` integrates the polynomial that interpolates the last ``k`` values of ``f``:

* Adams-Bashforth (:class:`AdamsBashforth`, ``explicit_adams``): the polynomial through
  ``f`` at ``t_n, t_{n-1}, ..., t_{n-k+1}``, integrated over ``[t_n, t_n + h]``;
* Adams-Bashforth-Moulton (:class:`AdamsBashforthMoulton`, ``implicit_adams``, alias
  ``fixed_adams``): that prediction, then the Adams-Moulton corrector (the polynomial through
  ``t_n + h, t_n, ..., t_{n-k+2}``) applied by functional iteration, at most ``max_iters`` times
  and until the change is within the corrector's tolerances (P(EC)^m; the final evaluation is the
  next step's first).

Both are of order ``k`` (Hairer, Norsett and Wanner, Solving ODEs I, III.1 and III.5).

**Variable steps.** The weights are computed at every step for the actual past step sizes
(the integral of each Lagrange basis polynomial: in the step's unit ``x = (s - t_n) / h`` the
past nodes are ``x_i <= 0``, so the basis numerators ``prod (x - x_i)`` have no cancellation),
so the method keeps its order on a non-uniform grid: one step per output interval, or a
``step_size`` grid with a shorter last step.  torchdiffeq uses the constant-step coefficients on
any grid: a step after a change of step size is then consistent to first order only (local error
``O(h^2)``), so a grid with a few changes converges at order 2 and one whose steps all differ at
order 1 (``tests/test_adams.py`` measures both kinds of weights).

**Start.** While fewer than ``k`` values of ``f`` are known, steps are taken by an explicit
Runge-Kutta method (the 3/8 rule, as torchdiffeq's start, for ``k <= 5``; ``dopri8`` above):
raising the order by one per step from Euler, as variable-order codes do under step-size
control, would on a fixed grid leave the first step's ``O(h^2)`` error in the solution and cap
the measured order at 2.  ``dopri8``'s local error ``O(h^9)`` caps orders 10 to 12 at 9 on a
fixed grid.  torchdiffeq starts with three steps of the 3/8 rule and then raises the order one
step at a time from 3, which caps its ``explicit_adams`` at order 4 (one Adams-Bashforth step of
order 3) and its ``implicit_adams`` at 5 (the start), whatever its ``max_order``.

**State.** The history (the last ``k - 1`` values of ``f`` and their times) is the carried state
(:class:`AdamsState`), never ``self``.  A row that takes ``h = 0`` keeps its state and its
history (in a batch, rows that end early take zero steps while the others go on).  The rows
share the history's length: they step in lockstep, as the fixed-step loop runs them (a row that
pauses during its first ``k - 1`` steps and then steps again gets Inf or NaN, flagged as a
non-finite state).  Because a step depends on the
values of ``f`` of earlier steps, replaying one recorded step from its start state alone does
not give its gradient: ``gradient="checkpoint"`` is refused (:attr:`Solver.multistep`); backprop
is exact and the adjoint solves the continuous adjoint backwards (with the same method).

**Dense output.** Cubic Hermite interpolation through ``(y0, f0)`` and ``(y1, f1)``, of order 3;
``f1 = f(t + h, y1)`` starts the next step, so it costs no extra evaluation along the solve.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .._rows import per_row, row_dims
from .base import DenseStep, Func, Solver, StepResult, Time
from .rk import ExplicitRK, _h_state, _time
from .tableaus import get_tableau

__all__ = ["AdamsState", "AdamsBashforth", "AdamsBashforthMoulton", "MAX_ORDER"]

#: The highest order accepted (torchdiffeq's ``_MAX_ORDER``).
MAX_ORDER = 12
#: The default order (``max_order``).
DEFAULT_ORDER = 4
#: The default number of corrector iterations per step (torchdiffeq's ``max_iters``).
DEFAULT_ITERS = 4

# Cubic Hermite through (y0, f0) and (y1, f1) with ks = (f0, f1, (y1 - y0) / h):
# y(theta) = y0 + h [theta f0 + theta^2 (3 d - 2 f0 - f1) + theta^3 (f0 + f1 - 2 d)].
_HERMITE = ((1.0, -2.0, 1.0), (0.0, -1.0, 1.0), (0.0, 3.0, -2.0))


class AdamsState(NamedTuple):
    """The carried state of an Adams method.

    Attributes:
        f: ``f(t, y)`` at the next step's start when it is known (the solve's ``f0``, or the
            dense output's ``f(t + h, y1)``), else ``None`` (the step evaluates it).
        fs: ``f`` at the earlier grid points, newest first (at most ``max_order - 1``), each
            shaped like ``y``.
        ts: their times: Python floats in the one-row driver, else row tensors (time dtype).
    """

    f: torch.Tensor | None
    fs: tuple[torch.Tensor, ...]
    ts: tuple[Time, ...]


@functools.lru_cache(maxsize=512)
def _weights_float(x: tuple[float, ...]) -> tuple[float, ...]:
    """``int_0^1 L_j(s) ds`` for the Lagrange basis on the nodes ``x`` (in step units)."""
    out = []
    for j, xj in enumerate(x):
        poly, den = [1.0], 1.0
        for i, xi in enumerate(x):
            if i == j:
                continue
            poly = [
                (poly[p - 1] if p > 0 else 0.0) - (xi * poly[p] if p < len(poly) else 0.0)
                for p in range(len(poly) + 1)
            ]
            den *= xj - xi
        out.append(sum(c / (p + 1) for p, c in enumerate(poly)) / den)
    return tuple(out)


def _weights_tensor(x: torch.Tensor) -> torch.Tensor:
    """As :func:`_weights_float` per row: ``x`` is ``[k, *rows]``, so is the result.

    The integrals by Gauss-Legendre quadrature with ``ceil(k / 2)`` nodes, exact for the basis
    polynomials (degree ``k - 1``): a fixed number of tensor operations whatever ``k``, where
    expanding the polynomials takes ``3 k`` (measured: the weights took half of a batched
    step's time that way).  The quadrature nodes lie inside ``(0, 1)``, never on a node ``x_i``
    (``<= 0``, or 1 for the corrector), so the basis is evaluated as ``prod_i (s - x_i) /
    (s - x_j)``."""
    k = x.shape[0]
    rows = (1,) * (x.ndim - 1)
    s, w, eye = _quadrature(k, x.dtype, x.device)
    d = s.view(-1, 1, *rows) - x.unsqueeze(0)  # [m, k, *rows]: s_q - x_i
    basis = d.prod(dim=1, keepdim=True) / d  # prod_{i != j} (s_q - x_i)
    den = torch.where(eye.view(k, k, *rows), 1.0, x.unsqueeze(1) - x.unsqueeze(0)).prod(dim=1)
    return (basis * w.view(-1, 1, *rows)).sum(dim=0) / den


@functools.lru_cache(maxsize=64)
def _quadrature(
    k: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on ``[0, 1]`` exact to degree ``k - 1``, and ``I_k``."""
    s, w = np.polynomial.legendre.leggauss((k + 1) // 2)
    return (
        torch.tensor((s + 1) / 2, dtype=dtype, device=device),
        torch.tensor(w / 2, dtype=dtype, device=device),
        torch.eye(k, dtype=torch.bool, device=device),
    )


def _nodes(ts: Sequence[Time], t: Time, h: Time, lead: tuple[float, ...]) -> Any:
    """The Lagrange weights for ``lead`` nodes (already in step units) then the times ``ts``."""
    if isinstance(t, float) and isinstance(h, float):
        hh = h if h != 0 else 1.0
        return _weights_float(lead + tuple((s - t) / hh for s in ts))
    assert isinstance(t, torch.Tensor) and isinstance(h, torch.Tensor)
    safe = torch.where(h == 0, 1.0, h)
    x = (torch.stack(ts) - t) / safe  # type: ignore[arg-type]
    if lead:
        head = torch.tensor(lead, dtype=x.dtype, device=x.device).view(-1, *(1,) * t.ndim)
        x = torch.cat((head.expand(len(lead), *t.shape), x))
    return _weights_tensor(x)


def _combine(
    y: torch.Tensor, h: Time, fs: Sequence[torch.Tensor], w: Any, skip: int = 0
) -> torch.Tensor:
    """``y + h sum_j w[skip + j] fs[j]``: float weights fold ``h`` into ``add``'s alpha; row
    tensors of weights broadcast per row."""
    if isinstance(w, tuple):
        assert isinstance(h, float)
        acc = y
        for wj, fj in zip(w[skip:], fs):
            acc = torch.add(acc, fj, alpha=h * wj)
        return acc
    wy = w.to(y.dtype)
    if not fs:
        return y
    acc = fs[0] * per_row(wy[skip], y.ndim)
    for j, fj in enumerate(fs[1:], start=skip + 1):
        acc = acc + fj * per_row(wy[j], y.ndim)
    return y + _h_state(h, y) * acc


class AdamsBashforth(Solver):
    """Adams-Bashforth, explicit, of order ``max_order`` on any fixed grid (``explicit_adams``).

    One evaluation of ``f`` per step once the history is full.  See the module docstring for the
    variable-step weights, the Runge-Kutta start and where this differs from torchdiffeq.

    Args:
        max_order: the order ``k`` (the number of values of ``f`` the step uses), 1 to 12;
            default 4.  (torchdiffeq's ``max_order`` counts one more: its ``explicit_adams``
            reaches Adams-Bashforth of order ``max_order - 1``; its default is 12.)

    Raises:
        ValueError: ``max_order`` is not an integer from 1 to 12.

    Examples:
        >>> import math, torch, neuralode
        >>> from neuralode.solvers import AdamsBashforth
        >>> t = torch.linspace(0, 1, 41, dtype=torch.float64)
        >>> ys = neuralode.odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64), t,
        ...                       method=AdamsBashforth(max_order=3))
        >>> f"{abs(float(ys[-1, 0]) - math.exp(-1)):.0e}"  # the error at t = 1
        '2e-06'
    """

    implicit = False
    multistep = True

    def __init__(self, max_order: int = DEFAULT_ORDER) -> None:
        self.max_order = _check_int("max_order", max_order, 1, MAX_ORDER)
        self.order = self.max_order
        self.error_order = None
        self.dense_order = 3
        self.name = "implicit_adams" if self.implicit else "explicit_adams"
        # The start (history shorter than the order): see the module docstring.
        self._start = ExplicitRK(get_tableau("rk38" if self.max_order <= 5 else "dopri8"))
        self._P: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_order={self.max_order})"

    def init(self, f: Func, t: Time, y: torch.Tensor, f0: torch.Tensor | None) -> Any:
        return AdamsState(f0, (), ())

    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        f0 = state.f
        nfe: int | torch.Tensor = 0
        if f0 is None:
            f0, nfe = f(_time(t, y), y), 1
        fs, ts = (f0, *state.fs), (t, *state.ts)
        iters: int | torch.Tensor = 0
        if len(fs) < self.max_order:
            start = self._start.step(f, t, h, y, f0)
            y1, nfe = start.y1, nfe + start.nfe
        else:
            y1 = _combine(y, h, fs, _nodes(ts[1:], t, h, (0.0,)))
            if self.implicit:
                y1, more = self._correct(f, t, h, y, y1, fs[: self.max_order - 1], ts)
                nfe, iters = nfe + more, more
        k = self.max_order - 1
        new = AdamsState(None, fs[:k], ts[:k])
        if isinstance(h, torch.Tensor):  # rows that take no step keep their state and history
            moved = h != 0
            y1 = torch.where(per_row(moved, y.ndim), y1, y)
            new = _keep(moved, new, state)
        return StepResult(y1, None, f0, new, nfe, None, None, 0, 0, iters)

    def _correct(
        self,
        f: Func,
        t: Time,
        h: Time,
        y: torch.Tensor,
        y1: torch.Tensor,
        fs: Sequence[torch.Tensor],
        ts: Sequence[Time],
    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        raise NotImplementedError  # AdamsBashforth is explicit

    def merge(self, accept: torch.Tensor, new: Any, old: Any) -> Any:
        """Per row, ``new`` where ``accept`` else ``old``; both must hold histories of one
        length (every row of a fixed-step solve steps in lockstep)."""
        if len(new.fs) != len(old.fs):
            raise RuntimeError(
                f"{self.name}: rows hold histories of different lengths ({len(new.fs)} and "
                f"{len(old.fs)}); Adams methods advance every row in lockstep (fixed steps)"
            )
        a = per_row(accept, 1)
        ts = tuple(
            torch.where(accept, x, z) if isinstance(x, torch.Tensor) else x
            for x, z in zip(new.ts, old.ts)
        )
        fs = tuple(torch.where(per_row(a, x.ndim), x, z) for x, z in zip(new.fs, old.fs))
        f0 = None
        if new.f is not None and old.f is not None:
            f0 = torch.where(per_row(a, new.f.ndim), new.f, old.f)
        return AdamsState(f0, fs, ts)

    def dense(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, result: StepResult
    ) -> tuple[DenseStep, int, Any]:
        f0, y1 = result.dense_info, result.y1
        f1 = f(_time(t + h, y), y1)
        if isinstance(h, float):
            d = (y1 - y) / (h if h != 0 else 1.0)
        else:
            d = (y1 - y) / per_row(torch.where(h == 0, 1.0, h).to(y.dtype), y.ndim)
        P = self._P.get(y.device)
        if P is None:
            P = self._P[y.device] = torch.tensor(_HERMITE, dtype=torch.float64, device=y.device)
        state = result.state
        return DenseStep(y, h, (f0, f1, d), P), 1, AdamsState(f1, state.fs, state.ts)


class AdamsBashforthMoulton(AdamsBashforth):
    """Adams-Bashforth-Moulton predictor-corrector of order ``max_order`` on any fixed grid
    (``implicit_adams``; torchdiffeq's ``fixed_adams`` is the same method).

    Each step predicts with Adams-Bashforth of order ``k`` and corrects with Adams-Moulton of
    order ``k`` by functional iteration: at most ``max_iters`` evaluations of ``f``, stopping
    once every component's change is within ``atol + rtol |y1|`` (each row on its own, so a row
    of a batch gets the numbers it gets solved alone).  One more evaluation (at the corrected
    point) starts the next step.  A row that does not converge in ``max_iters`` keeps the last
    iterate, which is still of order ``k`` (torchdiffeq warns and goes on too).
    ``Solution.stats.n_newton`` counts the corrector's iterations.

    Args:
        max_order: the order ``k``, 1 to 12; default 4 (torchdiffeq: its corrector's order,
            default 12).  ``max_order=1`` is backward Euler by functional iteration.
        max_iters: corrector iterations per step, at least 1; default 4 (torchdiffeq's).
        rtol, atol: the corrector's tolerances; default torchdiffeq's ``odeint`` defaults
            (``1e-7``, ``1e-9``); :func:`neuralode.odeint` passes its own ``rtol``/``atol``, as
            torchdiffeq does.

    Raises:
        ValueError: ``max_order`` is not an integer from 1 to 12, ``max_iters`` not an integer
            of at least 1, ``rtol`` or ``atol`` negative or not finite, or both 0.

    Examples:
        With :func:`neuralode.solve`, pass a configured instance (``method="implicit_adams"``
        is ``AdamsBashforthMoulton()``: order 4, 4 iterations):

        >>> import math, torch, neuralode
        >>> from neuralode.solvers import AdamsBashforthMoulton
        >>> t = torch.linspace(0, 1, 41, dtype=torch.float64)
        >>> sol = neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=torch.float64), t,
        ...                       method=AdamsBashforthMoulton(max_order=3, max_iters=2))
        >>> f"{abs(float(sol.ys[-1, 0]) - math.exp(-1)):.0e}"  # the error at t = 1
        '2e-07'
    """

    implicit = True

    def __init__(
        self,
        max_order: int = DEFAULT_ORDER,
        max_iters: int = DEFAULT_ITERS,
        rtol: float = 1e-7,
        atol: float = 1e-9,
    ) -> None:
        super().__init__(max_order)
        self.max_iters = _check_int("max_iters", max_iters, 1, None)
        for name, value in (("rtol", rtol), ("atol", atol)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < math.inf
            ):
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
        if rtol == 0 and atol == 0:
            raise ValueError("rtol and atol cannot both be 0 (the corrector could never stop)")
        self.rtol, self.atol = float(rtol), float(atol)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_order={self.max_order}, max_iters={self.max_iters}, "
            f"rtol={self.rtol}, atol={self.atol})"
        )

    def _correct(
        self,
        f: Func,
        t: Time,
        h: Time,
        y: torch.Tensor,
        y1: torch.Tensor,
        fs: Sequence[torch.Tensor],
        ts: Sequence[Time],
    ) -> tuple[torch.Tensor, int | torch.Tensor]:
        """The corrector's iterations from the prediction ``y1``: ``(y1, iterations)``."""
        w = _nodes(ts[: self.max_order - 1], t, h, (1.0,))
        base = _combine(y, h, fs, w, skip=1)  # the known part of the corrector
        if isinstance(w, tuple):
            w0: Any = h * w[0]
        else:
            w0 = per_row(w[0].to(y.dtype), y.ndim) * _h_state(h, y)
        batched = not isinstance(h, float) and h.ndim == 1
        dims = row_dims(y.ndim, batched)
        t1 = _time(t + h, y)
        active = torch.ones(y.shape[:1] if batched else (), dtype=torch.bool, device=y.device)
        iters = torch.zeros(active.shape, dtype=torch.long, device=y.device)
        for _ in range(self.max_iters):
            new = base + w0 * f(t1, y1)
            with torch.no_grad():
                change = (new - y1).abs() / (new.abs() * self.rtol + self.atol)
                done = change.amax(dim=dims) <= 1 if dims else change <= 1
            # A batch's converged rows keep their value (as solved alone); one row stops instead.
            y1 = torch.where(per_row(active, y.ndim), new, y1) if batched else new
            iters = iters + active
            active = active & ~done
            if not bool(active.any()):  # the step's host synchronisation
                break
        return y1, iters


def _keep(moved: torch.Tensor, new: AdamsState, old: AdamsState) -> AdamsState:
    """The new history where a row moved, else its old one (rows that took ``h = 0``)."""
    fs, ts = [], []
    for i, (fx, tx) in enumerate(zip(new.fs, new.ts)):
        if i < len(old.fs):
            fx = torch.where(per_row(moved, fx.ndim), fx, old.fs[i])
            tx = torch.where(moved, tx, old.ts[i])
        fs.append(fx)
        ts.append(tx)
    return AdamsState(None, tuple(fs), tuple(ts))


def _check_int(name: str, value: Any, lo: int, hi: int | None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        want = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value
