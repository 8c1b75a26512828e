"""Vector fields shared by the gradient tests (explicit weights, so gradcheck can vary them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

F64 = torch.float64


def _params(dim: int = 2, hidden: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w1 = 0.5 * torch.randn(hidden, dim, generator=g, dtype=F64)
    b1 = 0.1 * torch.randn(hidden, generator=g, dtype=F64)
    w2 = 0.5 * torch.randn(dim, hidden, generator=g, dtype=F64)
    b2 = 0.1 * torch.randn(dim, generator=g, dtype=F64)
    return w1, b1, w2, b2


def mlp(params: Sequence[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A non-autonomous tanh MLP ``f(t, y) = W2 tanh(W1 y + b1 + t) + b2`` with explicit weights.

    ``t`` is 0-dim (unbatched) or ``[batch]`` (batched, one time per row)."""
    w1, b1, w2, b2 = params

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.unsqueeze(-1) if t.ndim else t
        return torch.tanh(y @ w1.T + b1 + tt) @ w2.T + b2

    return f


class _OldStyleIdentity(torch.autograd.Function):
    """The identity as an old-style autograd.Function (``ctx`` in ``forward``, no
    ``setup_context``): ``torch.func`` refuses to transform it, autograd differentiates it
    (twice: its backward is the identity too)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def opaque(f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``f`` with its output passed through an old-style autograd.Function: the same values
    and derivatives, but ``torch.func`` cannot transform it, so the stiff solvers' Jacobians
    (``newton.jacobian``) and time derivatives take their ``torch.autograd.grad`` fallback.
    (A ``.item()`` on a detached tensor does not do this: ``torch.func.vjp`` runs it.)"""

    def g(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _OldStyleIdentity.apply(f(t, y))

    return g
