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

    Args:
        name: a key of :data:`ACTIVATIONS`: ``"elu"``, ``"tanh"``, ``"relu"`` or ``"softplus"``.

    Returns:
        A fresh instance of the module class (elementwise: any shape in, the same shape out).

    Raises:
        ValueError: for an unknown name (listing the known ones).

    Examples:
        >>> import torch
        >>> from neuralode.nn.activations import activation
        >>> activation("tanh")
        Tanh()
        >>> activation("relu")(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()
