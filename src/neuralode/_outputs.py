"""Where outputs go: the collector of a solve's outputs, and the records of its steps.

The loop places each output when the accepted step that reaches it is committed: an output time
strictly inside the step is interpolated, one on the step's end is ``y1`` itself.  What it keeps is
proportional to the outputs (and to the records a gradient strategy or dense output asked for),
never to the steps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ._rows import per_row
from .solvers.base import Time

__all__ = ["Outputs", "StepRecord"]


class Outputs:
    """Collects outputs as the loop produces them; assembled once at the end.

    Unbatched, outputs arrive in order and are concatenated.  Batched, each row has its own output
    indices: entries are scattered into ``[batch, T, ...]`` (invalid ones into a dropped slot).
    Outputs a failed row never reached are NaN.
    """

    def __init__(self, y0: torch.Tensor, T: int, batched: bool) -> None:
        self.T, self.batched = T, batched
        self.vals: list[torch.Tensor] = []
        self.idx: list[torch.Tensor] = []
        if batched:
            first = torch.zeros(y0.shape[0], 1, dtype=torch.long, device=y0.device)
            self.add(first, y0.unsqueeze(1), None)
        else:
            self.vals.append(y0.unsqueeze(0))

    def add(self, idx: torch.Tensor | None, vals: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Batched: ``idx`` and ``valid`` ``[batch, m]``, ``vals`` ``[batch, m, ...]``.
        Unbatched: ``vals`` ``[m, ...]``, the next ``m`` outputs in order (``idx`` unused)."""
        if self.batched:
            assert idx is not None
            if valid is not None:
                idx = torch.where(valid, idx, self.T)
            self.idx.append(idx)
        self.vals.append(vals)

    def assemble(self) -> torch.Tensor:
        if not self.batched:
            ys = torch.cat(self.vals)
            if ys.shape[0] < self.T:  # a failed solve: the unreached outputs are NaN
                pad = ys.new_full((self.T - ys.shape[0],) + ys.shape[1:], math.nan)
                ys = torch.cat([ys, pad])
            return ys
        vals = torch.cat(self.vals, dim=1)
        idx = torch.cat(self.idx, dim=1)
        idx = per_row(idx, vals.ndim).expand_as(vals)
        out = vals.new_full((vals.shape[0], self.T + 1) + vals.shape[2:], math.nan)
        return out.scatter(1, idx, vals)[:, : self.T]


class StepRecord(NamedTuple):
    """One accepted step, as the checkpoint strategy replays it.

    Attributes:
        t: start time (internal; a float in an unbatched solve, else per row).
        h: step (a float, or per row with 0 where the row did not move).
        y: start state.
        interior: ``(nxt, n_in, m)``: outputs ``nxt .. nxt + n_in - 1`` of each row lie strictly
            inside the step (``m`` is the largest ``n_in``), or ``None``.
        end: ``(idx, has)``: output ``idx`` of the rows with ``has`` is the step's end state, or
            ``None``.
        choice: the solver's :meth:`~neuralode.solvers.Solver.choice` for the step (``None``
            for most solvers).
    """

    t: Time
    h: Time
    y: torch.Tensor
    interior: tuple[torch.Tensor | int, torch.Tensor | int, int] | None
    end: tuple[torch.Tensor | int, torch.Tensor | bool] | None
    choice: Any = None
