"""Step-size control: tolerances, error norms, Hairer's initial step, a PI controller, fixed grids.

The controller owns the tolerances and the norm: a solver reports its error estimate unscaled,
and :meth:`PIController.error_ratio` scales it (``atol + rtol * max(|y0|, |y1|)``, as scipy and
Hairer do) and reduces it per row.  As in diffrax's ``PIDController.adapt_step_size`` and
torchode's ``merge_states``, every quantity is per row (the solve's row shape: ``[]`` or
``[batch]``), so each row of a batch keeps its own step size, and the controller merges its own
per-row state.  Nothing in the tensor path synchronises with the host.

Each decision has two implementations with the same arithmetic: :meth:`PIController.adapt` on
row tensors (the batched driver) and :meth:`PIController.adapt_float` on Python floats (the
unbatched driver, which keeps one row's clock on the host); a test holds them equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._rows import per_row

__all__ = [
    "Norm",
    "rms_norm",
    "max_norm",
    "NORMS",
    "PIController",
    "ControllerState",
    "FloatControllerState",
    "FixedGrid",
]

Norm = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]


def rms_norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Root mean square over ``dims`` (Hairer's norm; scipy and torchdiffeq use it too)."""
    if not dims:
        return x.abs()
    n = math.prod([x.shape[d] for d in dims])  # states are never empty (checked at the entry)
    # One fused reduction (instead of square, mean, sqrt): the norm sits in every step.
    norm: torch.Tensor = torch.linalg.vector_norm(x, dim=dims)
    return norm.mul(1.0 / math.sqrt(n))


def max_norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Maximum absolute value over ``dims``."""
    if not dims:
        return x.abs()
    return x.abs().amax(dim=dims)


NORMS: dict[str, Norm] = {"rms": rms_norm, "max": max_norm}


class ControllerState(NamedTuple):
    """Per-row controller memory: the last accepted error ratio (PI control) and whether the
    last attempt was rejected (then the next step may not grow: Hairer's rule)."""

    prev_ratio: torch.Tensor
    rejected_last: torch.Tensor


class FloatControllerState(NamedTuple):
    """:class:`ControllerState` of a one-row solve, in Python values."""

    prev_ratio: float
    rejected_last: bool


@dataclass(frozen=True)
class PIController:
    """Proportional-integral step-size controller (Hairer, Norsett & Wanner, Solving ODEs I,
    IV.2; Gustafsson 1991).

    ``factor = safety * err^(-alpha) * err_prev^beta`` with ``alpha = 1/q - 0.75 beta`` and ``q``
    the error order + 1; ``beta = 0`` is the classical (integral) controller, as in scipy and
    torchdiffeq.  Factors are clipped to ``[dfactor, ifactor]``; right after a rejection the step
    may not grow.  A non-finite error rejects the step and shrinks it by ``dfactor``.

    Attributes:
        rtol, atol: tolerances, scalars or tensors broadcastable against the state.
        norm: reduces a scaled error over ``dims`` to one value per row.
        dims: the state dimensions the norm reduces (all but the batch dimension).
        error_order: order of the method's embedded solution.
        min_step, max_step: bounds on the proposed steps (time units), as torchdiffeq's: a step
            at ``min_step`` or below is accepted whatever its error (if finite).
    """

    rtol: float | torch.Tensor
    atol: float | torch.Tensor
    norm: Norm
    dims: tuple[int, ...]
    error_order: int
    beta: float = 0.0
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    min_step: float = 0.0
    max_step: float = math.inf

    @property
    def alpha(self) -> float:
        return 1.0 / (self.error_order + 1) - 0.75 * self.beta

    def error_ratio(
        self,
        y0: torch.Tensor,
        y1: torch.Tensor,
        y_error: torch.Tensor | tuple[torch.Tensor, ...],
        combine: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    ) -> torch.Tensor:
        """The scaled error per row (``<= 1`` accepts): ``norm(err / (atol + rtol max(|y0|,
        |y1|)))``, each estimate of a tuple scaled alike and combined by the solver's
        ``combine`` (its :meth:`~neuralode.solvers.Solver.error_norm`)."""
        with torch.no_grad():
            scale = torch.maximum(y0.abs(), y1.abs()).mul_(self.rtol).add_(self.atol)
            errors = (y_error,) if isinstance(y_error, torch.Tensor) else y_error
            return combine([self.norm(e / scale, self.dims) for e in errors])

    def init(self, like: torch.Tensor) -> ControllerState:
        """The state before the first step, with the row shape of ``like``."""
        return ControllerState(torch.ones_like(like), torch.zeros_like(like, dtype=torch.bool))

    def init_float(self) -> FloatControllerState:
        return FloatControllerState(1.0, False)

    def adapt(
        self, ratio: torch.Tensor, h: torch.Tensor, state: ControllerState
    ) -> tuple[torch.Tensor, torch.Tensor, ControllerState]:
        """Accept or reject each row's step and propose the next one.

        Args:
            ratio: scaled error per row (accept when ``<= 1``), any float dtype.
            h: the step just attempted, per row (time dtype, ``>= 0``).
            state: this controller's per-row state.

        Returns:
            ``(accept, h_next, state)``, the state merged per row.
        """
        ratio = torch.nan_to_num(ratio.to(h.dtype), nan=torch.inf)
        accept = ratio <= 1.0
        r = ratio.clamp(min=1e-10)
        factor = r.pow(-self.alpha).mul_(self.safety)
        if self.beta:
            factor.mul_(state.prev_ratio.pow(self.beta))
        upper = torch.where(state.rejected_last, 1.0, self.ifactor)
        # ratio has no NaN (made inf above) and prev_ratio none (an accepted ratio), so factor
        # has none either: clamping is all it needs.
        factor = torch.minimum(factor.clamp_(min=self.dfactor), upper)
        h_next = h * factor
        if self.min_step > 0 or self.max_step < math.inf:
            # A non-finite error still shrinks the step below min_step (to an underflow, if the
            # values stay non-finite), and is never accepted.
            finite = ratio < math.inf
            h_next = torch.where(finite, h_next.clamp(min=self.min_step), h_next)
            h_next = h_next.clamp(max=self.max_step)
            if self.min_step > 0:
                accept = accept | ((h <= self.min_step) & finite)
        prev = (
            torch.where(accept, r.clamp(min=1e-4), state.prev_ratio)
            if self.beta
            else state.prev_ratio
        )
        return accept, h_next, ControllerState(prev, ~accept)

    def adapt_float(
        self, ratio: float, h: float, state: FloatControllerState
    ) -> tuple[bool, float, FloatControllerState]:
        """:meth:`adapt` for one row in Python floats (float64), with the same arithmetic."""
        r = ratio if math.isfinite(ratio) else math.inf
        accept = r <= 1.0 or (h <= self.min_step and r < math.inf and self.min_step > 0)
        rc = max(r, 1e-10)
        factor = self.safety * rc ** (-self.alpha)
        prev = state.prev_ratio
        if self.beta:
            factor *= prev**self.beta
            if accept:
                prev = max(rc, 1e-4)
        factor = min(max(factor, self.dfactor), 1.0 if state.rejected_last else self.ifactor)
        h_next = min(max(h * factor, self.min_step if r < math.inf else 0.0), self.max_step)
        return accept, h_next, FloatControllerState(prev, not accept)

    def initial_step(
        self,
        f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        t0: torch.Tensor,
        y0: torch.Tensor,
        f0: torch.Tensor,
    ) -> torch.Tensor:
        """Hairer's starting step (Solving ODEs I, II.4, p. 169), per row, in ``t0``'s dtype.

        Costs one evaluation of ``f``; ``t0`` has the row shape in the time dtype.  The exponent
        uses the error order: the step is chosen so that the *error estimate* is about right.
        """
        with torch.no_grad():
            dims = self.dims
            scale = y0.abs().mul(self.rtol).add(self.atol)
            d0 = self.norm(y0 / scale, dims)
            d1 = self.norm(f0 / scale, dims)
            # d0 and d1 overflow (inf / inf) when the tolerances are far below the state's
            # size: fall back to the small step, as when either is tiny.
            guess = 0.01 * d0 / d1.clamp(min=1e-300)
            small = (d0 < 1e-5) | (d1 < 1e-5) | ~torch.isfinite(guess)
            h0 = torch.where(small, torch.full_like(d0, 1e-6), guess)
            h0 = h0.to(t0.dtype)
            y1 = y0 + per_row(h0.to(y0.dtype), y0.ndim) * f0
            f1 = f((t0 + h0).to(y0.dtype), y1)
            d2 = self.norm((f1 - f0) / scale, dims) / h0.to(d0.dtype)
            dmax = torch.maximum(d1, d2).to(t0.dtype)
            h1 = torch.where(
                dmax <= 1e-15,
                torch.clamp(h0 * 1e-3, min=1e-6),
                (0.01 / dmax.clamp(min=1e-300)).pow(1.0 / (self.error_order + 1)),
            )
            h = torch.minimum(100 * h0, h1)
            # A step the clock cannot resolve would fail at once (y0 tiny against atol far from
            # t = 0 gives 1e-12 at t0 = 1000): at least 100 ulps of t0, as scipy's minimum step.
            h = torch.maximum(h, 100 * torch.finfo(t0.dtype).eps * t0.abs())
            if self.min_step > 0 or self.max_step < math.inf:
                h = h.clamp(min=self.min_step, max=self.max_step)
            return h


class FixedGrid:
    """The steps of a fixed-step solve, known before the first one: every step is accepted.

    ``step_size=None`` steps from output time to output time.  Otherwise each row takes
    ``ceil(span / step_size)`` steps of ``step_size`` (the last one stretched by up to 1% rather
    than leaving a sliver, or shortened to land on the row's last time), and rows with fewer steps
    are padded with zero steps at their end time so that all rows share one step counter.

    Attributes:
        times: ``[n + 1, *rows]`` grid times (internal, increasing, time dtype).
        steps: ``[n, *rows]`` step sizes, 0 for the padding of rows that already ended.
        n_steps: ``[*rows]`` steps each row takes.
    """

    def __init__(self, s: torch.Tensor, step_size: float | None, n: int | None = None) -> None:
        """``s``: output times ``[*rows, T]`` (internal); ``n``: the most steps of any row
        where already known (a grid built again on the same times), which saves reading it
        on the host."""
        t0, t1 = s[..., 0], s[..., -1]
        if step_size is None:
            grid = s
            n_row = torch.full(t0.shape, s.shape[-1] - 1, device=s.device)  # int64
        else:
            n_row = torch.ceil((t1 - t0) / step_size - 0.01).long().clamp_(min=1)
            n = int(n_row.max()) if n is None else n
            ks = torch.arange(n + 1, device=s.device, dtype=s.dtype)
            grid = t0.unsqueeze(-1) + ks * step_size
            grid = torch.where(ks >= n_row.unsqueeze(-1), t1.unsqueeze(-1), grid)
        self.grid = grid.contiguous()  # [*rows, n + 1]
        self.times = grid.movedim(-1, 0)
        self.steps = self.times.diff(dim=0)
        self.n_steps = n_row
        self.n = self.steps.shape[0]
