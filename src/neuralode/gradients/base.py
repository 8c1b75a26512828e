"""Gradient strategies: what autograd sees of a solve.

A strategy is handed the normalised problem and a :class:`~neuralode._loop.LoopSpec` (a way to
run the loop, and the solver to replay its steps with); it runs the forward solve and decides
what the backward pass does.  No strategy imports the public ``solve``: the adjoint builds its
backward loop from the same lower layers.

- :class:`Backprop` (``"backprop"``): autograd through every operation of every step.
- :class:`~neuralode.gradients.adjoint.Adjoint` (``"adjoint"``): the continuous adjoint.
- :class:`~neuralode.gradients.checkpoint.Checkpoint` (``"checkpoint"``): recorded steps replayed.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch

from .._inputs import Problem
from .._loop import LoopResult, LoopSpec
from .._rows import per_row
from ..solution import Stats

__all__ = [
    "GradientStrategy",
    "Outcome",
    "Backprop",
    "t0_shift",
    "attach_time_gradients",
    "refuse_double_backward",
]


class Outcome(NamedTuple):
    """A strategy's forward solve.

    Attributes:
        ys: the outputs (internal layout), carrying the strategy's graph.
        result: the loop's result (status, stats, dense records).
        backward: receives the backward pass's :class:`Stats` under ``"backward"`` once it has
            run, or ``None`` for a strategy without its own backward pass.
        detach_dense: dense output is computed without a graph (the forward kept none).
    """

    ys: torch.Tensor
    result: LoopResult
    backward: dict[str, Stats] | None
    detach_dense: bool


class GradientStrategy(abc.ABC):
    """How gradients of a solve are computed; ``solve(..., gradient=name)`` picks one."""

    name: str

    @abc.abstractmethod
    def solve(self, prob: Problem, spec: LoopSpec) -> Outcome:
        """Run the forward solve of ``prob`` with ``spec`` and attach this strategy's gradient."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Backprop(GradientStrategy):
    """Autograd through the solver's own operations: the exact gradient of the computed
    (discrete) solution; memory grows with the number of steps."""

    name = "backprop"

    def solve(self, prob: Problem, spec: LoopSpec) -> Outcome:
        s_det = prob.times.detach()
        y0, f0 = prob.y0, prob.f0
        needs_t_grad = prob.times.requires_grad and torch.is_grad_enabled()
        if needs_t_grad:
            y0 = t0_shift(prob, s_det)
            # The first stage must see the shift too, or its derivative misses the t0 direction.
            f0 = prob.func(s_det[..., 0].to(y0.dtype), y0)
        result = spec.run(y0, f0, s_det)
        ys = attach_time_gradients(prob, result.ys, s_det) if needs_t_grad else result.ys
        return Outcome(ys, result, None, False)


def t0_shift(prob: Problem, s_det: torch.Tensor) -> torch.Tensor:
    """``y0`` shifted by zero, with derivative ``-f(t0, y0)`` with respect to ``t0``:
    ``d y(t_i) / d t_0 = -Phi(t_i, t_0) f(t_0, y_0)`` then flows through the solve."""
    ds0 = (prob.times[..., 0] - s_det[..., 0]).to(prob.y0.dtype)
    return prob.y0 - per_row(ds0, prob.y0.ndim) * prob.f0


def attach_time_gradients(prob: Problem, ys: torch.Tensor, s_det: torch.Tensor) -> torch.Tensor:
    """Give each output ``y(t_i)`` the derivative ``f(t_i, y_i)`` with respect to ``t_i``."""
    ds = (prob.times - s_det).to(ys.dtype)  # zeros that carry the graph to t
    if prob.batched:
        fs = torch.stack(
            [prob.func(s_det[:, i].to(ys.dtype), ys[:, i]) for i in range(ys.shape[1])], dim=1
        )
    else:
        fs = torch.stack([prob.func(s_det[i].to(ys.dtype), ys[i]) for i in range(ys.shape[0])])
    # (an output an event left NaN has no time derivative: zero, not NaN, in t's gradient)
    fs = torch.where(torch.isnan(ys), 0.0, fs)
    return ys + per_row(ds, ys.ndim) * fs


def refuse_double_backward(name: str) -> None:
    """Raise when a backward pass is asked to build a graph (``create_graph=True``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"gradient={name!r} does not support double backward (create_graph=True, "
            f"higher-order gradients): its backward pass is not itself differentiable. Use "
            f"gradient='backprop', whose graph autograd can differentiate again."
        )
