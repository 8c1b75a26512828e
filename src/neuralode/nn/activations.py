"""The activations the models of :mod:`neuralode.nn` accept by name (one table for all)."""

from __future__ import annotations

from typing import Literal

from torch import nn

__all__ = ["ACTIVATIONS", "Activation", "activation"]

Activation = Literal["elu", "tanh", "relu", "softplus"]

#: Name -> module class, for every model that takes ``activation=NAME``.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
}


def activation(name: str) -> nn.Module:
    """A new activation module named ``name``.

    Raises:
        ValueError: for an unknown name (listing the known ones).
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()
