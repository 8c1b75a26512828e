"""Dense output: the one evaluator of a step's interpolant, for every place that needs one.

The loop's outputs between step ends, :meth:`Solution.evaluate` and the checkpoint strategy's
replay all evaluate a :class:`~neuralode.solvers.base.DenseStep` here:

    y(t + theta h) = y0 + h * sum_j B_j(theta) k_j,    B_j(theta) = sum_p P[j, p] theta^(p+1).

The weights ``B_j(theta)`` are formed in float64 and cast to the state's dtype: DOP853's
coefficients reach ``|P| = 545``, and forming them in float32 cost about two digits.  A method's
own interpolant and cubic Hermite (the fixed-step methods' interpolant, a ``DenseStep`` over the
stages and ``f(t + h, y1)``) are the same computation with other coefficients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._inputs import _fmt_time
from ._rows import per_row
from .solvers.base import DenseStep

__all__ = ["weights", "evaluate", "DenseRecord", "recorded_evaluator", "make_evaluate"]


@functools.lru_cache(maxsize=32)
def _powers(degree: int, device: torch.device) -> torch.Tensor:
    return torch.arange(1, degree + 1, dtype=torch.float64, device=device)


def weights(theta: torch.Tensor, P: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``B_j(theta)`` for every ``j``: ``theta`` ``[...]`` -> ``[..., n_k]`` in ``dtype``,
    computed in float64; ``P`` is one step's ``[n_k, degree]``, or ``[..., n_k, degree]``, each
    ``theta``'s own step's."""
    th = theta.unsqueeze(-1)  # a float32 theta is promoted by the float64 powers, exactly
    powers = th.pow(_powers(P.shape[-1], P.device))
    if P.ndim == 2:
        return (powers @ P.T).to(dtype)
    return (P @ powers.unsqueeze(-1)).squeeze(-1).to(dtype)


def evaluate(step: DenseStep, theta: torch.Tensor, batched: bool) -> torch.Tensor:
    """The interpolant at fractions ``theta`` of the step.

    ``theta`` is ``[m]`` unbatched (returns ``[m, *y0.shape]``) or ``[batch, m]`` batched, one
    row per sample (returns ``[batch, m, *features]``).
    """
    y0 = step.y0
    w = weights(theta, step.P, y0.dtype)  # [(B,) m, n_k]
    h = step.h if isinstance(step.h, float) else step.h.to(y0.dtype)
    if batched:  # the tensor driver: h is a per-row tensor
        assert isinstance(h, torch.Tensor)
        B = y0.shape[0]
        K = torch.stack([k.reshape(B, -1) for k in step.ks], dim=1)  # [B, n_k, N]
        dy = (w @ K).view((B, theta.shape[1]) + y0.shape[1:])  # theta: [B, m]
        return y0.unsqueeze(1) + per_row(h, dy.ndim) * dy
    K = torch.stack([k.reshape(-1) for k in step.ks])  # [n_k, N]
    dy = (w @ K).view((theta.shape[0],) + y0.shape)  # theta: [m]
    return y0 + h * dy


class DenseRecord(NamedTuple):
    """An accepted step kept for :meth:`Solution.evaluate`: start time and step per row (step 0
    for rows that did not move), start state and the stacked vectors ``K``
    (``[(B,) n_k, *features]``)."""

    t: torch.Tensor
    h: torch.Tensor
    y0: torch.Tensor
    K: torch.Tensor
    P: torch.Tensor


def recorded_evaluator(
    records: list[DenseRecord], y0: torch.Tensor, batched: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Evaluate the recorded steps' interpolants at internal times ``sq`` (``[M]``, or
    ``[batch, M]`` batched); each time uses the step that contains it.  Without steps (a solve
    with one output time) the solution is ``y0``."""
    if not records:
        return lambda sq: (
            y0.unsqueeze(1).expand((y0.shape[0], sq.shape[1]) + y0.shape[1:])  # sq: [B, M]
            if batched
            else y0.expand((sq.shape[0],) + y0.shape)  # sq: [M]
        )
    P = records[0].P
    # A solver whose steps differ in their interpolants (method="auto": the explicit method's,
    # the stiff one's, or both side by side in a step where rows differ) gives each record its
    # own coefficients: every record is padded to the most vectors and the highest degree
    # (zero vectors, zero coefficients: the same polynomial), and each query uses its step's.
    # (Most solvers hand every step one cached tensor; otherwise one comparison, one sync.)
    shared = all(r.P is P for r in records[1:])
    if not shared and all(r.P.shape == P.shape for r in records[1:]):
        shared = bool((torch.stack([r.P for r in records]) == P).all())
    Ps: torch.Tensor | None = None
    if not shared:
        n_k = max(r.P.shape[0] for r in records)
        degree = max(r.P.shape[1] for r in records)
        pad = torch.nn.functional.pad
        records = [
            r._replace(  # K: [(B,) n_k, *features], padded along n_k
                K=pad(r.K, (0, 0) * (r.K.ndim - batched - 1) + (0, n_k - r.P.shape[0])),
                P=pad(r.P, (0, degree - r.P.shape[1], 0, n_k - r.P.shape[0])),
            )
            for r in records
        ]
        Ps = torch.stack([r.P for r in records])  # [n, n_k, degree]
    ts = torch.stack([r.t for r in records])  # [n, *rows]
    hs = torch.stack([r.h for r in records])
    ys = torch.stack([r.y0 for r in records])  # [n, *state]
    Ks = torch.stack([r.K for r in records])  # [n, (B,) n_k, *features]
    if not batched:  # one row: give every record a batch dimension of 1
        ts, hs, ys, Ks = ts[:, None], hs[:, None], ys[:, None], Ks[:, None]
    # Each row's step starts are sorted: a rejected attempt shares its start with the retry
    # recorded after it (which the search prefers), and the zero steps of a row that stopped
    # start at its last time (where a query gets the state it stopped with).
    key = ts.T.contiguous()  # [B, n]
    dtype = ys.dtype

    def core(sq: torch.Tensor) -> torch.Tensor:
        sqb = sq if batched else sq.unsqueeze(0)  # [B, M]
        # A query up to the evaluator's slack before the first step uses the first step.
        i = (torch.searchsorted(key, sqb.contiguous(), right=True) - 1).clamp(min=0)
        b = torch.arange(i.shape[0], device=i.device).unsqueeze(1)
        tt, hh, yy, KK = ts[i, b], hs[i, b], ys[i, b], Ks[i, b]  # [B, M, ...]
        theta = ((sqb - tt) / hh.clamp(min=1e-300)).clamp(0, 1)
        w = weights(theta, P if Ps is None else Ps[i], dtype)  # [B, M, n_k]
        dy = (w.unsqueeze(2) @ KK.flatten(3)).view(yy.shape)  # [B, M, 1, n_k] @ [B, M, n_k, N]
        out = yy + per_row(hh.to(dtype), yy.ndim) * dy
        # At a step's start return its state itself: a non-finite slope there (the field may
        # fail beyond this point) must not leak through its zero weight.
        out = torch.where(per_row(theta == 0, yy.ndim), yy, out)
        return out if batched else out[0]

    return core


def make_evaluate(
    core: Callable[[torch.Tensor], torch.Tensor],
    s: torch.Tensor,
    sign: torch.Tensor | float,
    batched: bool,
    unflatten: Callable[[torch.Tensor], Any],
    ends: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], Any]:
    """:meth:`Solution.evaluate` over ``core``: user times (any direction) -> internal times,
    checked against the solved interval, and outputs in the user's layout.  ``ends``: internal
    time where each row's solution stops short of the interval (a terminal event, a failure;
    ``inf`` elsewhere): the solution is NaN after it, as the outputs are."""
    t0, t1 = s[..., 0], s[..., -1]

    def evaluate_at(t_user: torch.Tensor) -> Any:
        tq = t_user.to(device=s.device, dtype=s.dtype)
        scalar = tq.ndim == 0
        if batched:
            tq = tq.reshape(-1).expand(t0.shape[0], -1) if tq.ndim <= 1 else tq
            sq = tq * (sign.unsqueeze(1) if isinstance(sign, torch.Tensor) else sign)
            lo, hi = t0.unsqueeze(1), t1.unsqueeze(1)
        else:
            sq = tq.reshape(-1) * sign
            lo, hi = t0, t1
        slack = 1e-12 * (hi - lo).abs()
        if bool(((sq < lo - slack) | (sq > hi + slack)).any()):
            raise ValueError(
                "Solution.evaluate: t lies outside the solved interval "
                f"[{_fmt_time(t0 * sign)}, {_fmt_time(t1 * sign)}]"
            )
        flat = core(sq)
        if ends is not None:
            stop = ends.unsqueeze(1) if batched else ends
            past = (
                per_row(sq > stop, flat.ndim)
                if batched
                else (sq > stop).view((-1,) + (1,) * (flat.ndim - 1))
            )
            flat = torch.where(past, math.nan, flat)
        out = unflatten(flat)
        if not scalar:
            return out
        pick: Callable[[torch.Tensor], torch.Tensor] = (
            (lambda o: o[:, 0]) if batched else (lambda o: o[0])
        )
        return tuple(pick(o) for o in out) if isinstance(out, tuple) else pick(out)

    return evaluate_at
