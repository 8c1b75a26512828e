"""Per-row layout: one helper for every place that broadcasts a row quantity against a state.

A solve's *row shape* is ``[]`` (unbatched) or ``[batch]``; times, steps, error ratios, counters and
statuses have it.  States are ``[*rows, *features]``.
"""

from __future__ import annotations

import torch

__all__ = ["per_row", "row_dims"]


def per_row(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``v`` (row shape) viewed to broadcast against a state with ``ndim`` dimensions."""
    return v if v.ndim == 0 else v.view(v.shape + (1,) * (ndim - v.ndim))


def row_dims(ndim: int, batched: bool) -> tuple[int, ...]:
    """The dimensions of a state that a per-row reduction (a norm, a dot product) reduces."""
    return tuple(range(1, ndim)) if batched else tuple(range(ndim))
