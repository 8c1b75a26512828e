"""torchdiffeq-compatible entry points: switch with one import change.

``from neuralode import odeint`` takes the same arguments as ``torchdiffeq.odeint`` and returns the
same layout; unknown option keys are errors rather than warnings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .solve import DEFAULT_MAX_NUM_STEPS, solve
from .solvers import ButcherTableau, Solver

__all__ = ["odeint", "odeint_adjoint", "ODE_OPTIONS"]

#: Option keys ``odeint`` understands (torchdiffeq's names), with their meaning.
ODE_OPTIONS = {
    "step_size": "fixed-step methods: step in time units (default: one step per output interval)",
    "first_step": "adaptive methods: initial step (default: Hairer's selection)",
    "max_num_steps": f"steps allowed before failing (default {DEFAULT_MAX_NUM_STEPS})",
    "dtype": "dtype of time inside the solver (default float64)",
    "norm": "'rms', 'max' or a callable norm(x, dims)",
    "safety": "step-size controller safety factor (default 0.9)",
    "beta": "PI stabilisation coefficient (default 0: integral control)",
    "ifactor": "largest step growth factor (default 10)",
    "dfactor": "smallest step shrink factor (default 0.2)",
}
_RENAMED = {"dtype": "t_dtype"}


def odeint(
    func: Callable[[torch.Tensor, Any], Any],
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | ButcherTableau | Solver = "dopri5",
    options: dict[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Solve ``dy/dt = func(t, y)`` and return ``y`` at the times ``t`` (torchdiffeq's API).

    Args:
        func: ``func(t, y)`` with ``t`` a 0-dim tensor (in ``y``'s dtype) and ``y`` shaped like
            ``y0``; returns ``dy/dt`` of the same shape (a tuple for a tuple state).
        y0: initial state at ``t[0]``: a floating tensor of any shape, or a tuple of them.
        t: 1-D strictly increasing or strictly decreasing output times ``[T]``.
        rtol, atol: tolerances of adaptive methods (scalars or per-component tensors).
        method: ``euler``, ``midpoint``, ``heun``, ``rk4``, ``bosh3``, ``dopri5``, ``tsit5`` or
            ``dopri8`` (:data:`neuralode.METHODS`), or your own :class:`~neuralode.ButcherTableau`
            or :class:`~neuralode.solvers.Solver`.
        options: keys of :data:`ODE_OPTIONS` (unknown keys raise ``ValueError``).

    Returns:
        ``[T, *y0.shape]`` (a tuple of such for a tuple ``y0``); ``out[0]`` is ``y0``.

    Raises:
        ValueError, TypeError: bad input, naming the argument.
        SolverError: the solve failed (too many steps, step size underflow, non-finite values).
    """
    kwargs = _options(options)
    _check_1d(t, "odeint")
    sol = solve(func, y0, t, method=method, rtol=rtol, atol=atol, batched=False, **kwargs)
    return sol.ys


def odeint_adjoint(
    func: Callable[[torch.Tensor, Any], Any],
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | ButcherTableau | Solver = "dopri5",
    options: dict[str, Any] | None = None,
    adjoint_rtol: float | torch.Tensor | None = None,
    adjoint_atol: float | torch.Tensor | None = None,
    adjoint_method: str | ButcherTableau | Solver | None = None,
    adjoint_options: dict[str, Any] | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """:func:`odeint` with gradients by the continuous adjoint method (torchdiffeq's API).

    The forward solve keeps no autograd graph, so memory does not grow with the number of
    steps; the backward pass solves the augmented system backwards in time (Chen et al. 2018,
    Algorithm 1).  ``func`` may be an ``nn.Module`` (its trainable parameters are found) or a
    plain callable with ``adjoint_params`` given.  ``adjoint_options`` takes ``norm``
    (``"seminorm"``, the default; ``"rms"``, torchdiffeq's default; or ``"max"``) and the keys
    of :data:`ODE_OPTIONS`; the other ``adjoint_*`` arguments default to the forward ones.
    The backward solve carries its step size from one output interval to the next.
    See :func:`neuralode.solve`.

    Returns:
        ``[T, *y0.shape]`` (a tuple of such for a tuple ``y0``).

    Raises:
        ValueError, TypeError: bad input, naming the argument.
        SolverError: the forward or the backward solve failed.
        RuntimeError: at backward, when asked for higher-order gradients (``create_graph=True``):
            the adjoint's backward pass is not differentiable; use :func:`odeint` instead.
    """
    kwargs = _options(options)
    _check_1d(t, "odeint_adjoint")
    sol = solve(
        func,
        y0,
        t,
        method=method,
        rtol=rtol,
        atol=atol,
        batched=False,
        gradient="adjoint",
        adjoint_params=adjoint_params,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        adjoint_options=adjoint_options,
        **kwargs,
    )
    return sol.ys


def _check_1d(t: Any, name: str) -> None:
    if isinstance(t, torch.Tensor) and t.ndim != 1:
        raise ValueError(
            f"t must be 1-D [T] for {name}, got shape {tuple(t.shape)}; "
            f"neuralode.solve takes per-sample grids [batch, T]"
        )


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(ODE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options are {sorted(ODE_OPTIONS)}")
    return {_RENAMED.get(k, k): v for k, v in options.items()}
