"""Step-size control: error norms, Hairer's initial step, and a PI controller.

Every quantity here is per sample: tensors of the solve's row shape (``[]`` unbatched, ``[batch]``
batched), so each row of a batch keeps its own step size.  Nothing here synchronises with the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["PIController", "ControllerState", "rms_norm", "max_norm", "NORMS", "initial_step"]

Norm = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]


def rms_norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Root mean square over ``dims`` (Hairer's norm; scipy and torchdiffeq use it too)."""
    if not dims:
        return x.abs()
    n = math.prod(x.shape[d] for d in dims)  # states are never empty (checked at the entry)
    # One fused reduction (instead of square, mean, sqrt): the norm sits in every step.
    return torch.linalg.vector_norm(x, dim=dims).mul(1.0 / math.sqrt(n))


def max_norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Maximum absolute value over ``dims``."""
    if not dims:
        return x.abs()
    return x.abs().amax(dim=dims)


NORMS: dict[str, Norm] = {"rms": rms_norm, "max": max_norm}


@dataclass(frozen=True)
class PIController:
    """Proportional-integral step-size controller (Hairer, Norsett & Wanner, Solving ODEs I, IV.2;
    Gustafsson 1991).

    ``factor = safety * err^(-alpha) * err_prev^beta`` with ``alpha = 1/q - 0.75 beta`` and
    ``q`` the error order + 1; ``beta = 0`` is the classical (integral) controller.  Factors
    are clipped to ``[dfactor, ifactor]``; right after a rejection the step may not grow
    (Hairer's rule).  Non-finite errors reject the step and shrink it by ``dfactor``.
    """

    error_order: int
    beta: float = 0.0
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2

    @property
    def alpha(self) -> float:
        return 1.0 / (self.error_order + 1) - 0.75 * self.beta

    def adapt_scalar(
        self, ratio: float, h: float, prev_ratio: float, rejected_last: bool
    ) -> tuple[bool, float, float]:
        """:meth:`adapt` for one sample in Python floats (the unbatched loop's host-side path):
        returns ``(accept, h_next, prev_ratio)``; the same arithmetic, in float64."""
        r = ratio if math.isfinite(ratio) else math.inf
        accept = r <= 1.0
        rc = max(r, 1e-10)
        factor = self.safety * rc ** (-self.alpha)
        if self.beta:
            factor *= prev_ratio**self.beta
            if accept:
                prev_ratio = max(rc, 1e-4)
        factor = min(max(factor, self.dfactor), 1.0 if rejected_last else self.ifactor)
        return accept, h * factor, prev_ratio

    def adapt(
        self, ratio: torch.Tensor, h: torch.Tensor, state: ControllerState
    ) -> tuple[torch.Tensor, torch.Tensor, ControllerState]:
        """Decide acceptance and the next step.

        Args:
            ratio: scaled error norm per sample (accept when ``<= 1``), any float dtype.
            h: the step just attempted, per sample (time dtype, ``>= 0``).
            state: previous error ratio and whether the last step was rejected.

        Returns:
            ``(accept, h_next, new_state)``.
        """
        ratio = torch.nan_to_num(ratio.to(h.dtype), nan=torch.inf)
        accept = ratio <= 1.0
        r = ratio.clamp(min=1e-10)
        factor = r.pow(-self.alpha).mul_(self.safety)
        if self.beta:
            factor.mul_(state.prev_ratio.pow(self.beta))
        upper = torch.where(state.rejected_last, 1.0, self.ifactor)
        factor = torch.minimum(factor.nan_to_num_(nan=self.dfactor).clamp_(min=self.dfactor), upper)
        h_next = h * factor
        prev = (
            torch.where(accept, r.clamp(min=1e-4), state.prev_ratio)
            if self.beta
            else state.prev_ratio
        )
        return accept, h_next, ControllerState(prev, ~accept)


@dataclass
class ControllerState:
    prev_ratio: torch.Tensor
    rejected_last: torch.Tensor

    @classmethod
    def initial(cls, like: torch.Tensor) -> ControllerState:
        return cls(torch.ones_like(like), torch.zeros_like(like, dtype=torch.bool))


def initial_step(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t0: torch.Tensor,
    y0: torch.Tensor,
    f0: torch.Tensor,
    order: int,
    rtol: float | torch.Tensor,
    atol: float | torch.Tensor,
    norm: Norm,
    dims: tuple[int, ...],
    bshape: tuple[int, ...],
) -> torch.Tensor:
    """Hairer's starting step size (Solving ODEs I, II.4, algorithm of p. 169), per sample.

    Costs one extra evaluation of ``f``.  ``t0`` has the row shape in the time dtype; the result
    does too.  ``bshape`` broadcasts a row quantity against the state.
    """
    scale = y0.abs().mul(rtol).add(atol)
    d0 = norm(y0 / scale, dims)
    d1 = norm(f0 / scale, dims)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp(min=1e-300))
    h0 = h0.to(t0.dtype)
    y1 = y0 + h0.to(y0.dtype).view(bshape) * f0
    f1 = f((t0 + h0).to(y0.dtype), y1)
    d2 = (norm((f1 - f0) / scale, dims) / h0.to(d0.dtype)).to(t0.dtype)
    dmax = torch.maximum(d1.to(t0.dtype), d2)
    h1 = torch.where(
        dmax <= 1e-15,
        torch.clamp(h0 * 1e-3, min=1e-6),
        (0.01 / dmax.clamp(min=1e-300)).pow(1.0 / (order + 1)),
    )
    return torch.minimum(100 * h0, h1)
