"""One generic explicit Runge-Kutta stepper for every tableau in :mod:`neuralode.tableaus`.

Stage combinations are chains of ``add_(k, alpha=a_ij)`` over the non-zero coefficients only, with
the coefficients as Python floats: no tableau tensors, no stacking, and autograd sees one node per
term.  Per-sample step sizes enter once per stage through ``addcmul``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..controllers import Norm
from ..tableaus import ButcherTableau

__all__ = ["RKStepper"]

Func = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Terms = tuple[tuple[int, float], ...]


def _terms(row: Sequence[object]) -> Terms:
    return tuple((j, float(x)) for j, x in enumerate(row) if x != 0)  # type: ignore[arg-type]


def _combine(ks: Sequence[torch.Tensor], terms: Terms) -> torch.Tensor:
    j0, a0 = terms[0]
    acc = ks[j0] * a0
    for j, a in terms[1:]:
        acc.add_(ks[j], alpha=a)
    return acc


def _stage(
    y: torch.Tensor, h: torch.Tensor | float, ks: Sequence[torch.Tensor], terms: Terms
) -> torch.Tensor:
    """``y + h * sum_j a_j k_j`` over the non-zero terms."""
    if isinstance(h, float):
        j0, a0 = terms[0]
        acc = torch.add(y, ks[j0], alpha=h * a0)
        for j, a in terms[1:]:
            acc.add_(ks[j], alpha=h * a)
        return acc
    return torch.addcmul(y, h, _combine(ks, terms))


_CACHE: dict[tuple[object, ...], RKStepper] = {}


class RKStepper:
    """Explicit Runge-Kutta steps of one tableau, for states of one dtype and device.

    Shapes: the state ``y`` has any shape; ``t`` and ``h`` have the row shape (``[]`` or
    ``[batch]``) in the time dtype; ``h_y`` is ``h`` cast to the state dtype and shaped to
    broadcast against ``y`` (``[]`` or ``[batch, 1, ...]``).
    """

    @staticmethod
    def cached(
        tableau: ButcherTableau, dtype: torch.dtype, t_dtype: torch.dtype, device: torch.device
    ) -> RKStepper:
        """A shared stepper per (tableau, dtypes, device): tableau tensors are built once.
        Keyed by the tableau's identity (hashing its Fractions on every solve costs more than
        a small solve's step)."""
        key = (id(tableau), dtype, t_dtype, device)
        hit = _CACHE.get(key)
        if hit is None or hit.tableau is not tableau:
            if len(_CACHE) >= 64:
                _CACHE.clear()
            hit = _CACHE[key] = RKStepper(tableau, dtype, t_dtype, device)
        return hit

    def __init__(
        self,
        tableau: ButcherTableau,
        dtype: torch.dtype,
        t_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.tableau = tableau
        self.dtype = dtype
        self.fsal = tableau.fsal
        self.a_terms = [_terms(row) for row in tableau.a]
        self.b_terms = _terms(tableau.b)
        self.e_terms = _terms(tableau.b_err) if tableau.b_err is not None else None
        self.e2_terms = _terms(tableau.b_err2) if tableau.b_err2 is not None else None
        self.c = torch.tensor([float(x) for x in tableau.c[1:]], dtype=t_dtype, device=device)
        self.c_list = [float(x) for x in tableau.c[1:]]
        self.device = device
        dense = tableau.dense
        assert dense is not None  # every registered tableau has one (Hermite by default)
        self.extra_c = [float(x) for x in dense.extra_c]
        self.extra_terms = [_terms(row) for row in dense.extra_a]
        # An extra stage with node 1 and a-row b is f(t + h, y1): reuse y1 itself, exactly.
        self.extra_is_f1 = [
            c == 1.0
            and tuple(row[: tableau.stages]) == tuple(tableau.b)
            and len(row) == tableau.stages
            for c, row in zip(dense.extra_c, dense.extra_a)
        ]
        self.P = torch.tensor([[float(x) for x in r] for r in dense.P], dtype=dtype, device=device)
        self.powers = torch.arange(1, dense.degree + 1, dtype=dtype, device=device)
        self.evals_per_step = tableau.stages - 1  # k0 comes from the previous step (FSAL or f1)
        self.evals_extra = len(dense.extra_c)

    def stage_times(self, t: torch.Tensor, h: torch.Tensor) -> Sequence[torch.Tensor]:
        """Times of stages 1.. of a step from ``t`` of size ``h``, in the state dtype."""
        cs = self.c.view((-1,) + (1,) * t.ndim)
        return torch.addcmul(t, cs, h).to(self.dtype).unbind(0)

    def stage_times_scalar(self, t: float, h: float) -> Sequence[torch.Tensor]:
        """Stage times for a one-row solve whose time and step are Python floats."""
        return torch.tensor(
            [t + c * h for c in self.c_list], dtype=self.dtype, device=self.device
        ).unbind(0)

    def step(
        self,
        f: Func,
        ts: Sequence[torch.Tensor],
        y: torch.Tensor,
        h_y: torch.Tensor | float,
        k0: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step from ``y`` with stage times ``ts`` (stages 1..) and size ``h_y``; returns
        ``(y1, stages)``.

        ``k0 = f(t, y)`` is passed in (the previous step's last stage or first evaluation).
        ``h_y`` is a tensor broadcastable against ``y`` (per-sample steps) or a Python float
        (one step for the whole state: each stage is then a chain of ``add(alpha=...)``).
        """
        ks = [k0]
        y1: torch.Tensor | None = None
        for i in range(1, len(self.a_terms)):
            yi = _stage(y, h_y, ks, self.a_terms[i])
            ks.append(f(ts[i - 1], yi))
            y1 = yi
        if not self.fsal:
            y1 = _stage(y, h_y, ks, self.b_terms)
        assert y1 is not None
        return y1, ks

    def error_ratio(
        self,
        y: torch.Tensor,
        y1: torch.Tensor,
        h_y: torch.Tensor | float,
        ks: list[torch.Tensor],
        rtol: float | torch.Tensor,
        atol: float | torch.Tensor,
        norm: Norm,
        dims: tuple[int, ...],
    ) -> torch.Tensor:
        """Scaled error norm per sample (``<= 1`` accepts), ``atol + rtol * max(|y|, |y1|)``."""
        assert self.e_terms is not None
        scale = torch.maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol)
        hs = h_y / scale
        err = norm(_combine(ks, self.e_terms).mul_(hs), dims)
        if self.e2_terms is None:
            return err
        # Hairer's DOP853 estimator: err5^2 / sqrt(err5^2 + 0.01 err3^2), norms as RMS.
        err3 = norm(_combine(ks, self.e2_terms).mul_(hs), dims)
        e5sq = err.square()
        den = (e5sq + 0.01 * err3.square()).sqrt()
        return torch.where(den > 0, e5sq / den.clamp(min=torch.finfo(den.dtype).tiny), den)

    def extra_stages(
        self,
        f: Func,
        t: torch.Tensor | float,
        y: torch.Tensor,
        h: torch.Tensor | float,
        h_y: torch.Tensor | float,
        y1: torch.Tensor,
        ks: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """The interpolant's extra stages, appended to a copy of ``ks`` (times and steps as
        row tensors, or as Python floats for a one-row solve)."""
        ks = list(ks)
        for c, terms, is_f1 in zip(self.extra_c, self.extra_terms, self.extra_is_f1):
            yi = y1 if is_f1 else _stage(y, h_y, ks, terms)
            ks.append(f(torch.as_tensor(t + c * h, dtype=self.dtype, device=self.device), yi))
        return ks

    def interpolate(
        self,
        y: torch.Tensor,
        h_y: torch.Tensor | float,
        ks: list[torch.Tensor],
        theta: torch.Tensor,
        batched: bool,
    ) -> torch.Tensor:
        """Dense output at fractions ``theta`` of the step.

        ``theta`` is ``[m]`` unbatched (returns ``[m, *y.shape]``) or ``[batch, m]`` batched
        (returns ``[batch, m, *features]``).
        """
        w = theta.unsqueeze(-1).pow(self.powers) @ self.P.T  # [..., m, n_k]
        if batched:
            assert isinstance(h_y, torch.Tensor)  # per-row steps
            K = torch.stack([k.reshape(k.shape[0], -1) for k in ks], dim=1)  # [B, n_k, N]
            dy = (w @ K).view((y.shape[0], theta.shape[-1]) + y.shape[1:])
            return y.unsqueeze(1) + h_y.unsqueeze(1) * dy
        K = torch.stack([k.reshape(-1) for k in ks], dim=0)  # [n_k, N]
        dy = (w @ K).view((theta.shape[-1],) + y.shape)
        return y + h_y * dy
