"""What a solve returns: the solution, its per-sample statistics and status."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Solution", "Stats", "Status", "SolverError"]


class Status(enum.IntEnum):
    """Per-sample outcome of a solve; each member carries a message that says what to do.

    ``Solution.status`` holds these codes as an ``int64`` tensor (``[batch]``, or ``[]``
    unbatched); ``Status(int(code))`` gives the member back.

    Attributes:
        SUCCESS: 0, the sample reached its last output time.
        MAX_STEPS_REACHED: 1, it took ``max_num_steps`` steps (accepted + rejected) first.
        STEP_SIZE_UNDERFLOW: 2, the step fell below the resolution of time.
        NONFINITE: 3, the vector field returned NaN or Inf and smaller steps did not help.
        NEWTON_FAILED: 4, an implicit method's Newton iteration did not converge.
        EVENT: 5, the sample stopped at a terminal event (a success: see :attr:`ok`).

    Examples:
        >>> import torch
        >>> from neuralode import Status, solve
        >>> sol = solve(lambda t, y: -y, torch.ones(2, 1), torch.tensor([0.0, 100.0]),
        ...             batched=True, max_num_steps=2, throw=False)
        >>> [Status(code).name for code in sol.status.tolist()]
        ['MAX_STEPS_REACHED', 'MAX_STEPS_REACHED']
        >>> Status.MAX_STEPS_REACHED.ok, Status.EVENT.ok
        (False, True)
        >>> Status.MAX_STEPS_REACHED.message.split(". ")[0]
        'The maximum number of solver steps was reached'
    """

    SUCCESS = 0
    MAX_STEPS_REACHED = 1
    STEP_SIZE_UNDERFLOW = 2
    NONFINITE = 3
    NEWTON_FAILED = 4
    EVENT = 5

    @property
    def ok(self) -> bool:
        """The sample ended as asked: at its last time, or at a terminal event."""
        return self in (Status.SUCCESS, Status.EVENT)

    @property
    def message(self) -> str:
        """What happened, and what to do about it (one or two sentences)."""
        return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESS: "The solve reached the last requested time.",
    Status.MAX_STEPS_REACHED: (
        "The maximum number of solver steps was reached. Increase it with "
        "max_num_steps=N (solve) or options={'max_num_steps': N} (odeint), loosen rtol/atol, "
        "or check the problem for stiffness (explicit methods need tiny steps on stiff "
        "problems: try method='auto' or 'rodas5p')."
    ),
    Status.STEP_SIZE_UNDERFLOW: (
        "The step size fell below the resolution of the time variable. The solution is probably "
        "blowing up or the problem is stiff; check the vector field, loosen rtol/atol, or keep "
        "time in float64 (t_dtype=torch.float64 in solve, options={'dtype': torch.float64} in "
        "odeint)."
    ),
    Status.NONFINITE: (
        "The vector field returned NaN or Inf and smaller steps did not help. Check the vector "
        "field (and its parameters) at the time named in the error."
    ),
    Status.NEWTON_FAILED: (
        "The implicit method's Newton iteration did not converge, even on smaller steps (or on a "
        "fixed step, which cannot shrink). Loosen rtol/atol, use an adaptive method, try a "
        "Rosenbrock method (method='rodas5p': no iteration that can fail), or check the vector "
        "field for discontinuities."
    ),
    Status.EVENT: (
        "The sample stopped at a terminal event (Solution.event_t); its outputs after the event "
        "are NaN."
    ),
}


class SolverError(RuntimeError):
    """Raised when a solve fails for at least one sample (see ``Solution.status`` for per-sample
    outcomes when ``throw=False``).

    Also raised by the gradient strategies when their backward pass fails (the adjoint's
    backward solve, a checkpoint's replayed step), and by :func:`neuralode.odeint_event` when no
    event occurs.

    Args:
        message: what failed: the first failed sample, the time it reached and its
            :attr:`Status.message`.
        solution: the solve's :class:`Solution` (its ``status``, ``stats``, ``t_end``, and
            outputs up to the failure, NaN after it), or ``None`` where there is none (a
            failure in a backward pass).

    Attributes:
        solution: the ``solution`` argument.

    Examples:
        >>> import torch
        >>> from neuralode import SolverError, Status, solve
        >>> try:
        ...     solve(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 100.0]), max_num_steps=2)
        ... except SolverError as err:
        ...     print(Status(int(err.solution.status)).name, err.solution.ys[-1])
        MAX_STEPS_REACHED tensor([nan])
    """

    def __init__(self, message: str, solution: Solution | None = None) -> None:
        super().__init__(message)
        self.solution = solution


@dataclass
class Stats:
    """Work counters, per sample (shape ``[batch]``; shape ``[]`` for an unbatched solve).

    Attributes:
        nfe: vector-field evaluations this sample needed (batched evaluations count once per row).
        n_steps: attempted steps (accepted + rejected).
        n_accepted: accepted steps.
        n_rejected: rejected steps.
        njev: Jacobians of the vector field taken (stiff methods: one per attempted step, but a
            retry after a rejection reuses its attempt's); zero for explicit methods; ``None``
            where not counted (the backward pass of the checkpoint strategy).
        nlu: LU factorisations (stiff methods: one per attempted step); as ``njev``.
        n_newton: Newton iterations (implicit methods, summed over the stages; each costs one
            evaluation of the vector field, counted in ``nfe`` as well); as ``njev``.

    Examples:
        >>> import torch
        >>> from neuralode import solve
        >>> sol = solve(lambda t, y: -y, torch.ones(2, 1), torch.linspace(0, 1, 3), batched=True)
        >>> stats = sol.stats
        >>> stats.nfe.shape, bool((stats.n_accepted + stats.n_rejected == stats.n_steps).all())
        (torch.Size([2]), True)
        >>> sorted(stats.as_dict())
        ['n_accepted', 'n_newton', 'n_rejected', 'n_steps', 'nfe', 'njev', 'nlu']
    """

    nfe: torch.Tensor
    n_steps: torch.Tensor
    n_accepted: torch.Tensor
    n_rejected: torch.Tensor
    njev: torch.Tensor | None = None
    nlu: torch.Tensor | None = None
    n_newton: torch.Tensor | None = None

    def as_dict(self) -> dict[str, Any]:
        """The counters as (nested) lists of ints, ready for JSON; those not counted (``None``)
        are left out."""
        return {k: v.tolist() for k, v in vars(self).items() if v is not None}


@dataclass
class Solution:
    """Result of :func:`neuralode.solve`.

    Attributes:
        ts: output times; ``[T]`` for a shared grid, ``[batch, T]`` for per-sample grids.
        ys: states at ``ts``; ``[T, *y0.shape]`` unbatched (torchdiffeq layout),
            ``[batch, T, *features]`` batched.  A tuple when ``y0`` was a tuple.
        stats: per-sample work counters.
        status: per-sample :class:`Status` codes (``int64`` tensor, ``[batch]`` or ``[]``).
        t_end: the time each sample actually reached (differs from ``ts[..., -1]`` only on
            failure, or at a terminal event).
        event_t: a solve with ``events``: the time of the terminal event that stopped each
            sample (``[batch]``, ``[]`` unbatched; user time), NaN where none did.
            Differentiable (implicit function theorem) when the solve is.  ``None`` without
            events.
        event_index: the event function that stopped each sample (``int64``; its column among
            all events' functions, in order: an event returning ``[batch, k]`` has ``k``), -1
            where none.
        event_y: the state at that event (before any reset; the layout of ``y0`` per sample),
            NaN where none; differentiable as ``event_t``.
        event_log: every occurrence, per sample (a list per sample batched, one list
            unbatched), in time order: ``(t, index, kind)`` with ``t`` a float (user time),
            ``index`` as ``event_index`` and ``kind`` ``"event"`` (recorded), ``"reset"`` (the
            state jumped) or ``"terminal"`` (the sample stopped).

    Examples:
        >>> import torch
        >>> from neuralode import solve
        >>> sol = solve(lambda t, y: -y, torch.ones(2, 1), torch.linspace(0, 1, 3),
        ...             batched=True, dense=True)
        >>> sol.ys.shape, sol.status.tolist(), sol.success
        (torch.Size([2, 3, 1]), [0, 0], True)
        >>> sol.evaluate(torch.tensor([0.25, 0.75])).shape  # dense output: [batch, M, 1]
        torch.Size([2, 2, 1])
    """

    ts: torch.Tensor
    ys: Any
    stats: Stats
    status: torch.Tensor
    t_end: torch.Tensor
    event_t: torch.Tensor | None = None
    event_index: torch.Tensor | None = None
    event_y: Any = None
    event_log: list[Any] | None = None
    _interpolator: Callable[[torch.Tensor], Any] | None = field(default=None, repr=False)
    _backward: dict[str, Stats] | None = field(default=None, repr=False)

    @property
    def backward_stats(self) -> Stats | None:
        """Work counters of the backward pass once ``backward()`` has run: the adjoint's backward
        solve (summed over the output intervals), or the checkpoint's recomputed steps and
        evaluations.  ``None`` before, and for ``gradient="backprop"``."""
        return None if self._backward is None else self._backward.get("backward")

    @property
    def success(self) -> bool:
        """True when every sample reached its last requested time or stopped at a terminal
        event."""
        ok = (self.status == Status.SUCCESS) | (self.status == Status.EVENT)
        return bool(ok.all())

    def messages(self) -> list[str]:
        """The message of each distinct status among the samples."""
        return [Status(int(s)).message for s in torch.unique(self.status.reshape(-1)).tolist()]

    def evaluate(self, t: torch.Tensor | float) -> Any:
        """Dense output: the solution at any time(s) inside the solved interval.

        Args:
            t: scalar or ``[M]`` (shared) or, for a batched solve, ``[batch, M]``.

        Returns:
            ``[*y0.shape]`` for a scalar ``t`` in an unbatched solve, ``[M, *y0.shape]`` for
            ``[M]``; batched: ``[batch, M, *features]`` (``[batch, *features]`` for a scalar).
            Uses the method's own interpolant (Hermite for methods without one) and is
            differentiable.  NaN past the time a sample stopped at (a terminal event, a
            failure), as its outputs are.  Requires ``solve(..., dense=True)``.

        Raises:
            ValueError: the solve was not asked for dense output (``dense=True``).
        """
        if self._interpolator is None:
            raise ValueError("Solution.evaluate needs dense output: call solve(..., dense=True).")
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=torch.float64)  # keep a Python float's precision
        return self._interpolator(t)
