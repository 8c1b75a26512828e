"""Checkpointed backpropagation: the gradient of the *discrete* solution (the same numbers as
``gradient="backprop"``, to round-off) with memory bounded by the accepted steps' start states
instead of the autograd graph of every stage.

The forward solve runs without a graph and records, for every step that moved at least one row,
its start time, per-row step (0 for rows that did not move), start state, and which outputs it
produced (:class:`~neuralode._outputs.StepRecord`).  The backward pass replays the steps in
reverse, one at a time, through the solver's public ``init``/``step``/``dense`` and the one
interpolation evaluator: it recomputes the step from its start state with autograd on, and pulls
the running adjoint of the step's end state, plus the incoming gradients of the step's outputs,
back to its start state and to the parameters.  The first stage is recomputed as ``f(t, y)`` (in
the forward pass it may be the previous step's last stage: the same value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._inputs import Problem
from .._loop import LoopResult, LoopSpec, PerturbedField
from .._outputs import StepRecord
from .._rows import per_row
from ..interpolation import evaluate
from ..solution import SolverError, Stats
from .base import GradientStrategy, Outcome, attach_time_gradients, refuse_double_backward, t0_shift

__all__ = ["Checkpoint"]


class Checkpoint(GradientStrategy):
    """Gradients by replaying recorded steps (memory: the accepted steps' start states).

    Args:
        params: the tensors to differentiate besides ``y0`` and ``t`` (the vector field's
            parameters).
    """

    name = "checkpoint"

    def __init__(self, params: tuple[torch.Tensor, ...]) -> None:
        self.params = params

    def solve(self, prob: Problem, spec: LoopSpec) -> Outcome:
        s_det = prob.times.detach()
        y0 = prob.y0
        needs_t_grad = prob.times.requires_grad and torch.is_grad_enabled()
        if needs_t_grad:  # as for backprop
            y0 = t0_shift(prob, s_det)
        replay = _Replay(spec, prob, s_det)
        # torch.autograd.Function.apply has no annotations (torch 2.13).
        ys: torch.Tensor = _CheckpointFn.apply(replay, y0, *self.params)  # type: ignore[no-untyped-call]
        if needs_t_grad:
            ys = attach_time_gradients(prob, ys, s_det)
        assert replay.result is not None
        return Outcome(ys, replay.result, replay.stats, True)


@dataclass
class _Replay:
    spec: LoopSpec
    prob: Problem
    out_times: torch.Tensor  # internal output times, detached
    result: LoopResult | None = None
    stats: dict[str, Stats] = field(default_factory=dict)
    nfe: int = 0  # vector-field evaluations of the backward pass's recomputation

    def forward(self, y0: torch.Tensor) -> torch.Tensor:
        # f0 is a value here (this pass builds no graph; the backward pass re-evaluates f at
        # the start of every step it replays), and a start shifted by t0_shift has the value
        # of y0 (it is shifted by zero), so f(t0, y0) serves it too.
        self.result = self.spec.run(y0, self.prob.f0.detach(), self.out_times, record=True)
        return self.result.ys

    def step(
        self, r: StepRecord, y_in: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, Any, Any]]]:
        """Recompute one step with autograd; returns ``(y1, [(vals, idx, valid), ...])``."""
        solver, f, batched = self.spec.solver, self.spec.func, self.spec.batched
        if self.spec.perturb:  # the field as the recorded step saw it
            f = PerturbedField(f, r.t, r.t + r.h)
        res = solver.step(f, r.t, r.h, y_in, solver.replay_state(f, r.t, y_in, r.choice))
        if res.status is not None and bool((torch.as_tensor(res.status) != 0).any()):
            raise SolverError(
                f"gradient='checkpoint': replaying the step from t={_first(r.t)}, the implicit "
                f"method's Newton iteration failed where the forward pass converged, so the "
                f"replayed step is not the one taken; use gradient='backprop' (exact) or "
                f"'adjoint', or smaller steps"
            )
        # Replays start from no carried state; an iterative method's rows may differ (then
        # the batch's evaluations are its busiest row's).
        self.nfe += int(torch.as_tensor(res.nfe).max())
        outs: list[tuple[torch.Tensor, Any, Any]] = []
        if r.interior is not None:
            first, count, m = r.interior
            d, extra, _ = solver.dense(f, r.t, r.h, y_in, res)
            self.nfe += extra
            j = torch.arange(m, device=y_in.device)
            if batched:
                assert isinstance(first, torch.Tensor) and isinstance(count, torch.Tensor)
                assert isinstance(r.t, torch.Tensor) and isinstance(r.h, torch.Tensor)
                idx = first.unsqueeze(1) + j
                valid: Any = j < count.unsqueeze(1)
                ts = self.out_times.gather(1, idx.clamp(max=self.out_times.shape[-1] - 1))
                theta = torch.where(
                    valid, (ts - r.t.unsqueeze(1)) / r.h.clamp(min=1e-300).unsqueeze(1), 0.0
                )
            else:
                idx, valid = first + j, None
                theta = (self.out_times[idx] - r.t) / r.h
            outs.append((evaluate(d, theta, batched), idx, valid))
        if r.end is not None:
            idx_end, has = r.end
            if batched:
                assert isinstance(idx_end, torch.Tensor) and isinstance(has, torch.Tensor)
                outs.append((res.y1.unsqueeze(1), idx_end.unsqueeze(1), has.unsqueeze(1)))
            else:
                outs.append((res.y1.unsqueeze(0), idx_end, None))
        return res.y1, outs

    def grads_of(self, grad_ys: torch.Tensor, idx: Any, valid: Any) -> torch.Tensor:
        """The incoming gradients of outputs ``idx`` (zero where not ``valid``)."""
        if not self.spec.batched:
            return grad_ys[idx] if isinstance(idx, torch.Tensor) else grad_ys[idx : idx + 1]
        gi = idx.clamp(max=self.out_times.shape[-1] - 1)
        g = grad_ys[torch.arange(gi.shape[0], device=gi.device).unsqueeze(1), gi]
        return g * per_row(valid, g.ndim).to(g.dtype)


class _CheckpointFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, replay: _Replay, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ys = replay.forward(y0)
        ctx.replay = replay
        ctx.save_for_backward(*params)
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: torch.Tensor) -> tuple[Any, ...]:
        refuse_double_backward("checkpoint")
        replay: _Replay = ctx.replay
        params = ctx.saved_tensors
        assert replay.result is not None and replay.result.records is not None
        records = replay.result.records
        a: torch.Tensor | None = None  # adjoint of the current step's end state
        g_params: list[torch.Tensor | None] = [None] * len(params)
        for r in reversed(records):
            with torch.enable_grad():
                y_in = r.y.detach().requires_grad_(True)
                y1, outs = replay.step(r, y_in)
                targets, cotangents = [], []
                if a is not None:
                    targets.append(y1)
                    cotangents.append(a)
                for vals, idx, valid in outs:
                    targets.append(vals)
                    cotangents.append(replay.grads_of(grad_ys, idx, valid))
                # Never empty: the last step ends on the last output, and sets ``a``.  A
                # parameter the field does not use gets no gradient (None), as under backprop.
                # retain_graph: a field may use a tensor computed from a parameter before the
                # solve (k = log_k.exp(), adjoint_params=(log_k,)); that piece of graph serves
                # every replayed step (the step's own graph is freed with its locals).
                got = torch.autograd.grad(
                    targets, (y_in, *params), cotangents, allow_unused=True, retain_graph=True
                )
            a = got[0]  # every target (y1, the interpolants) starts from y_in
            for k, gk in enumerate(got[1:]):
                prev = g_params[k]
                if gk is not None:
                    g_params[k] = gk if prev is None else prev + gk
        n = torch.tensor(len(records))
        replay.stats["backward"] = Stats(torch.tensor(replay.nfe), n, n.clone(), n * 0)
        replay.nfe = 0
        first = grad_ys[:, 0] if replay.spec.batched else grad_ys[0]
        grad_y0 = first if a is None else a + first
        return (None, grad_y0, *g_params)


def _first(t: Any) -> float:
    """A step's start time for a message (the first row's, batched)."""
    return float(t) if isinstance(t, float) else float(torch.as_tensor(t).reshape(-1)[0])
