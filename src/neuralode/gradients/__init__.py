"""Gradient strategies: what autograd sees of a solve.

``"backprop"`` (the default) is autograd through the solver's own operations (in
:mod:`neuralode.solve`); ``"adjoint"`` is the continuous adjoint of :mod:`.adjoint`;
``"checkpoint"`` replays recorded steps one at a time (:mod:`.checkpoint`).
"""

from .adjoint import ADJOINT_OPTIONS, AdjointConfig, adjoint_apply, find_adjoint_params

GRADIENTS = ("backprop", "adjoint", "checkpoint")

__all__ = ["ADJOINT_OPTIONS", "AdjointConfig", "GRADIENTS", "adjoint_apply", "find_adjoint_params"]
