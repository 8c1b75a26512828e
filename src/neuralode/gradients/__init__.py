"""Gradient strategies: what autograd sees of a solve (``solve(..., gradient=name)``).

- ``"backprop"`` (:class:`Backprop`, the default): autograd through the solver's own operations.
- ``"adjoint"`` (:class:`Adjoint`): the continuous adjoint of Chen et al. (2018).
- ``"checkpoint"`` (:class:`Checkpoint`): recorded steps replayed one at a time.
"""

from .adjoint import ADJOINT_OPTIONS, Adjoint, AdjointConfig, find_adjoint_params
from .base import Backprop, GradientStrategy, Outcome
from .checkpoint import Checkpoint

#: The names ``gradient=`` accepts.
GRADIENTS = ("backprop", "adjoint", "checkpoint")

__all__ = [
    "ADJOINT_OPTIONS",
    "Adjoint",
    "AdjointConfig",
    "Backprop",
    "Checkpoint",
    "GRADIENTS",
    "GradientStrategy",
    "Outcome",
    "find_adjoint_params",
]
