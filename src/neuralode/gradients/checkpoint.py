"""Checkpointed backpropagation: the gradient of the *discrete* solution (the same numbers as
``gradient="backprop"``, to round-off) with memory bounded by the accepted steps' start states
instead of the autograd graph of every stage.

The forward solve runs without a graph and records, for every step that moved at least one row,
its start time, per-row step (0 for rows that did not move), start state, and which outputs it
produced (interpolated inside the step, or its end state).  The backward pass replays the steps
in reverse, one at a time: it recomputes the step from its start state with autograd on, and
pulls the running adjoint of the step's end state, plus the incoming gradients of the step's
outputs, back to its start state and to the parameters.  The first stage is recomputed as
``f(t, y)`` (in the forward pass it is the previous step's last stage, the same value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..solution import Stats

__all__ = ["StepRecord", "checkpoint_apply"]


@dataclass
class StepRecord:
    """One recorded step.  Row quantities have the row shape (``[]`` or ``[batch]``).

    Attributes:
        t: start time (internal, time dtype).
        h: step per row, 0 where the row did not move.
        y: start state.
        interior: ``(nxt, n_in, m)``: outputs ``nxt .. nxt + n_in - 1`` of each row lie strictly
            inside the step (``m`` is the largest ``n_in``), or ``None``.
        end: ``(idx, has)``: output ``idx`` of the rows with ``has`` is the step's end state,
            or ``None``.
    """

    t: torch.Tensor
    h: torch.Tensor
    y: torch.Tensor
    interior: tuple[torch.Tensor, torch.Tensor, int] | None
    end: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class _Context:
    loop: Any  # the solve's _Loop: stepper, vector field, output times, layout helpers
    run_forward: Callable[[torch.Tensor], torch.Tensor]
    records: list[StepRecord] = field(default_factory=list)
    stats: dict[str, Stats] = field(default_factory=dict)
    nfe: int = 0  # vector-field evaluations of the backward pass's recomputation

    def replay(
        self, r: StepRecord, y_in: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, Any]]]:
        """Recompute one step with autograd; returns ``(y1, [(vals, idx, valid), ...])``."""
        loop = self.loop
        stepper, f = loop.stepper, loop.prob.func
        h_y = loop._row(r.h.to(loop.dtype))
        k0 = f(r.t.to(loop.dtype), y_in)
        y1, ks = stepper.step(f, stepper.stage_times(r.t, r.h), y_in, h_y, k0)
        self.nfe += 1 + stepper.evals_per_step
        outs: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
        if r.interior is not None:
            nxt, n_in, m = r.interior
            ks_all = stepper.extra_stages(f, r.t, y_in, r.h, h_y, y1, ks)
            self.nfe += stepper.evals_extra
            j = torch.arange(m, device=y_in.device)
            if loop.batched:
                idx = nxt.unsqueeze(1) + j
                valid = j < n_in.unsqueeze(1)
                ts = loop.s.gather(1, idx.clamp(max=loop.T - 1))
                theta = torch.where(
                    valid, (ts - r.t.unsqueeze(1)) / r.h.clamp(min=1e-300).unsqueeze(1), 0.0
                )
            else:
                idx, valid = nxt + j, None
                theta = (loop.s[idx] - r.t) / r.h
            vals = stepper.interpolate(y_in, h_y, ks_all, theta.to(loop.dtype), loop.batched)
            outs.append((vals, idx, valid))
        if r.end is not None:
            idx, has = r.end
            if loop.batched:
                outs.append((y1.unsqueeze(1), idx.unsqueeze(1), has.unsqueeze(1)))
            else:
                outs.append((y1.unsqueeze(0), idx.reshape(1), None))
        return y1, outs

    def grads_of(self, grad_ys: torch.Tensor, idx: torch.Tensor, valid: Any) -> torch.Tensor:
        """The incoming gradients of outputs ``idx`` (zero where not ``valid``)."""
        loop = self.loop
        if not loop.batched:
            return grad_ys[idx]
        gi = idx.clamp(max=loop.T - 1)
        g = grad_ys[torch.arange(gi.shape[0], device=gi.device).unsqueeze(1), gi]
        return g * valid.view(valid.shape + (1,) * (g.ndim - 2)).to(g.dtype)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, context: _Context, y0: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ys = context.run_forward(y0)
        ctx.context = context
        ctx.save_for_backward(*params)
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: torch.Tensor) -> tuple[Any, ...]:
        context: _Context = ctx.context
        params = ctx.saved_tensors
        loop = context.loop
        a: torch.Tensor | None = None  # adjoint of the current step's end state
        g_params: list[torch.Tensor | None] = [None] * len(params)
        for r in reversed(context.records):
            with torch.enable_grad():
                y_in = r.y.detach().requires_grad_(True)
                y1, outs = context.replay(r, y_in)
                targets, cotangents = [], []
                if a is not None:
                    targets.append(y1)
                    cotangents.append(a)
                for vals, idx, valid in outs:
                    targets.append(vals)
                    cotangents.append(context.grads_of(grad_ys, idx, valid))
                if not targets:
                    continue
                got = torch.autograd.grad(targets, (y_in, *params), cotangents, allow_unused=True)
            a = got[0] if got[0] is not None else torch.zeros_like(y_in)
            for k, gk in enumerate(got[1:]):
                prev = g_params[k]
                if gk is not None:
                    g_params[k] = gk if prev is None else prev + gk
        n = torch.tensor(len(context.records))
        context.stats["backward"] = Stats(torch.tensor(context.nfe), n, n.clone(), n * 0)
        context.nfe = 0
        first = grad_ys[:, 0] if loop.batched else grad_ys[0]
        grad_y0 = first if a is None else a + first
        return (None, grad_y0, *g_params)


def checkpoint_apply(
    loop: Any,
    y0: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    run_forward: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, Stats]]:
    """Run ``run_forward`` (which must fill ``loop.replay_records``) under the checkpointed
    autograd function; returns ``ys`` and a dict that receives the backward pass's
    :class:`Stats` (recomputed evaluations and steps) under ``"backward"``."""
    context = _Context(loop, run_forward)
    loop.replay_records = context.records
    out: torch.Tensor = _Checkpoint.apply(context, y0, *params)
    return out, context.stats
