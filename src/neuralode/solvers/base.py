"""The solver protocol: what the loop asks of a method, and nothing more.

A solver advances a state by one step and says how good the step was; the loop (``_loop.py``)
decides with a controller whether to keep it, where the next step goes and what to write out.
The loop never asks which family a solver belongs to: an explicit Runge-Kutta method, a
Rosenbrock method or an implicit one all answer the same calls.

Time and step come in one of two forms, and a solver must take both:

* tensors of the solve's *row shape* (``[]`` for an unbatched solve, ``[batch]`` when every row
  has its own time and step), in the time dtype (float64 by default);
* Python floats, from the unbatched driver, which keeps one row's clock on the host.  A solver may
  then build each stage as a chain of ``add(alpha=h * a_ij)`` with no tensor for ``h`` at all.

The state ``y`` is one flat-or-shaped tensor in the state dtype (tuple states were flattened at
the entry); batched, its first dimension is the batch.  ``f(t, y)`` takes ``t`` in the state dtype
with the row shape.

Modelled on diffrax's ``AbstractSolver`` (``init``/``step`` returning ``y1, y_error, dense_info,
state, result``) and torchode's per-row step results; unlike diffrax the dense output is computed
lazily (``dense``), only for steps that have outputs inside them, because an interpolant's extra
stages cost evaluations (DOP853's: three per step).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .._rows import per_row

__all__ = ["Func", "Time", "StepResult", "DenseStep", "Solver"]

Func = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: A time or step: a row tensor in the time dtype, or a Python float (one-row driver).
Time = torch.Tensor | float


class StepResult(NamedTuple):
    """What one attempted step produced (rows that the loop masked out took ``h = 0``).

    Attributes:
        y1: the state at ``t + h``, shaped like ``y``.
        y_error: the local error estimate, *unscaled* (``y1`` minus the embedded solution), shaped
            like ``y``; a tuple of such when the method combines several estimates (see
            :meth:`Solver.error_norm`); ``None`` for fixed-step methods.
        dense_info: whatever :meth:`Solver.dense` needs to build the interpolant of this step
            (the stages, for a Runge-Kutta method).  Opaque to the loop.
        state: the solver's carried state after this step, used if the step is accepted (for an
            FSAL method, the last stage, which is ``f(t + h, y1)``).
        nfe: evaluations of ``f`` this step spent on every row it advanced (per row, ``[batch]``,
            when rows spent different numbers).
        status: per-row :class:`~neuralode.Status` codes of a step that failed on its own (a
            Newton iteration that did not converge), or ``None`` when no row failed.  A failed
            row's step is rejected and retried smaller, as a step with a large error would be.
        retry_state: the carried state for a retry from the same start if the step is rejected
            (a Runge-Kutta method's first stage ``f(t, y)``, which the retry need not evaluate
            again), or ``None`` to keep the state the step started from.
        njev: Jacobians of ``f`` the step took (per row, as ``nfe``); 0 for explicit methods.
        nlu: LU factorisations the step made (per row); 0 for explicit methods.
        n_newton: Newton iterations the step made (per row, summed over its stages); 0 for
            methods that do not iterate.

    Examples:
        One step of ``rk4`` (fixed-step: no error estimate) taken by hand, as the loop takes it:

        >>> import torch, neuralode
        >>> rk4, f, y = neuralode.get_solver("rk4"), (lambda t, y: -y), torch.ones(2)
        >>> result = rk4.step(f, 0.0, 0.1, y, rk4.init(f, 0.0, y, None))
        >>> result.y1, result.nfe, result.y_error  # y1 ~ exp(-0.1) = 0.904837
        (tensor([0.9048, 0.9048]), 4, None)
    """

    y1: torch.Tensor
    y_error: torch.Tensor | tuple[torch.Tensor, ...] | None
    dense_info: Any
    state: Any
    nfe: int | torch.Tensor
    status: torch.Tensor | None = None
    retry_state: Any = None
    njev: int | torch.Tensor = 0
    nlu: int | torch.Tensor = 0
    n_newton: int | torch.Tensor = 0


class DenseStep(NamedTuple):
    """A step's continuous extension in polynomial form (evaluated by
    :mod:`neuralode.interpolation`):

    ``y(t + theta h) = y0 + h sum_j B_j(theta) k_j``, ``B_j(theta) = sum_p P[j, p] theta^(p+1)``.

    Attributes:
        y0: the step's start state.
        h: the step, as the solver received it (row tensor in the time dtype, or a float).
        ks: the vectors ``k_j`` (stages and extra stages), each shaped like ``y0``.
        P: ``[len(ks), degree]`` coefficients in float64: forming the weights in the state dtype
            loses digits when ``|P|`` is large (DOP853's reach 545).

    Examples:
        ``rk4``'s interpolant (cubic Hermite: one extra stage, ``f(t + h, y1)``) at the step's
        middle, by the formula above:

        >>> import math, torch, neuralode
        >>> rk4, f, y = neuralode.get_solver("rk4"), (lambda t, y: -y), torch.ones(2)
        >>> result = rk4.step(f, 0.0, 0.1, y, None)
        >>> dense, extra_nfe, _ = rk4.dense(f, 0.0, 0.1, y, result)
        >>> len(dense.ks), tuple(dense.P.shape), extra_nfe
        (5, (5, 3), 1)
        >>> B = (dense.P * 0.5 ** torch.arange(1, 4)).sum(1)  # B_j(1/2)
        >>> y_mid = dense.y0 + dense.h * sum(float(b) * k for b, k in zip(B, dense.ks))
        >>> round(float(y_mid[0]), 5), round(math.exp(-0.05), 5)
        (0.95123, 0.95123)
    """

    y0: torch.Tensor
    h: Time
    ks: Sequence[torch.Tensor]
    P: torch.Tensor


class Solver(abc.ABC):
    """A method for one step of ``dy/dt = f(t, y)``.

    Subclasses set ``name``, ``order`` (of the propagated solution), ``error_order`` (of the
    embedded solution that the error estimate compares against; ``None`` for a fixed-step method)
    and ``dense_order`` (of the interpolant), and implement :meth:`init`, :meth:`step` and
    :meth:`dense`.  They must not keep per-solve mutable state on ``self``: one instance serves
    every solve, and all that changes between steps goes through ``state``.  An instance is a
    ``method=`` of :func:`neuralode.solve` and :func:`neuralode.odeint` (as is any registered
    name: :func:`~neuralode.solvers.get_solver`).

    Attributes:
        name: the method's name (in ``repr`` and error messages).
        order: order of the propagated solution (global error ``O(h^order)``).
        error_order: order of the embedded solution that the error estimate compares against
            (the step-size controller's exponent is ``1 / (error_order + 1)``), or ``None``
            for a fixed-step method (then :attr:`adaptive` is ``False``).
        dense_order: order of the interpolant that :meth:`dense` builds.
        lands_on_outputs: whether an adaptive solve ends a step on every output time instead
            of interpolating (for a method whose interpolant is much less accurate than its
            steps).
        lands_per_row: whether that holds on some rows only, as :meth:`landing` says.
        uses_jacobian: whether the method takes Jacobians of ``f`` (then a user's ``jac``
            serves it).
        multistep: whether a step uses values of earlier steps (then
            ``gradient="checkpoint"`` is refused).

    Examples:
        A minimal solver, explicit Euler with linear interpolation (``P = [[1]]``:
        ``B_0(theta) = theta``), used as any other method:

        >>> import torch, neuralode
        >>> from neuralode.solvers import DenseStep, Solver, StepResult
        >>> class Euler(Solver):
        ...     name, order, dense_order = "my_euler", 1, 1
        ...     def init(self, f, t, y, f0):
        ...         return None  # nothing carried from step to step
        ...     def step(self, f, t, h, y, state, times=None):
        ...         k = f(torch.as_tensor(t, dtype=y.dtype), y)
        ...         h = torch.as_tensor(h, dtype=y.dtype).reshape(-1, *[1] * (y.ndim - 1))
        ...         return StepResult(y + h * k, None, [k], None, 1)  # h per row, broadcast
        ...     def dense(self, f, t, h, y, result):
        ...         P = torch.ones(1, 1, dtype=torch.float64)
        ...         return DenseStep(y, h, result.dense_info, P), 0, None
        >>> sol = neuralode.solve(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 0.3, 1.0]),
        ...                       method=Euler(), step_size=0.25)
        >>> sol.ys[:, 0]  # 0.75 ** 4 = 0.3164 at t = 1; t = 0.3 interpolated
        tensor([1.0000, 0.7125, 0.3164])
    """

    name: str = "solver"
    order: int = 1
    error_order: int | None = None
    dense_order: int = 1
    #: Whether an adaptive solve ends a step on every output time instead of interpolating
    #: (for a method whose interpolant is much less accurate than its steps).
    lands_on_outputs: bool = False
    #: Whether that holds on some rows only, as :meth:`landing` says after each step.
    lands_per_row: bool = False
    #: Whether the method takes Jacobians of ``f`` (then a user's ``jac`` serves it).
    uses_jacobian: bool = False
    #: Whether a step uses values of earlier steps (a multistep method's history), so that its
    #: gradient is not that of its start state alone: the checkpoint strategy's per-step replay
    #: cannot serve it.
    multistep: bool = False

    @property
    def adaptive(self) -> bool:
        """Whether the method estimates its error (and so can run under a step-size controller)."""
        return self.error_order is not None

    @abc.abstractmethod
    def init(self, f: Func, t: Time, y: torch.Tensor, f0: torch.Tensor | None) -> Any:
        """The carried state at the start of a solve, or after a jump of the state.

        Args:
            f: the vector field, ``f(t, y)`` with ``t`` in ``y``'s dtype and the row shape.
            t: the start time (row tensor in the time dtype, or a float).
            y: the start state.
            f0: ``f(t, y)`` when the caller already has it (the entry evaluates it to check
                what ``f`` returns), else ``None``; a solver that needs it evaluates it in its
                first step.

        Returns:
            The state that the first :meth:`step` receives (anything :meth:`merge` can
                merge; ``None`` when the solver carries nothing).
        """

    @abc.abstractmethod
    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        """Attempt one step of size ``h`` (``>= 0``) from ``(t, y)``.

        Must be a pure function of its arguments (no host synchronisation, no Python branching on
        tensor values): a compiled loop wraps it.

        Args:
            f: the vector field.
            t: the step's start (row tensor in the time dtype, or a float).
            h: the step (same form as ``t``; ``0`` on rows the loop masked out).
            y: the start state.
            state: the carried state (from :meth:`init`, the last accepted step, or the
                rejected step's ``retry_state``).
            times: this solver's own :meth:`stage_times` for the step when the loop
                precomputed them for a known grid, else ``None``.

        Returns:
            The step's :class:`StepResult` (the new state, the error estimate and the
                work done).
        """

    @abc.abstractmethod
    def dense(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, result: StepResult
    ) -> tuple[DenseStep, int, Any]:
        """The interpolant of an accepted step.

        Args:
            f: the vector field (for an interpolant's extra stages).
            t, h, y: the step's start, size and start state, as :meth:`step` received them.
            result: what :meth:`step` returned for it.

        Returns:
            dense_step: the step's :class:`DenseStep`.
            nfe: the evaluations of ``f`` the interpolant added (its extra stages).
            state: a carried state to use instead of ``result.state`` when those evaluations
                include ``f(t + h, y1)`` (which then starts the next step), else ``None``.
        """

    def configured(self, controller: Any) -> Solver:
        """The solver as one solve uses it, under ``controller`` (its tolerances, norm and
        dimensions; ``None`` for fixed steps).  A solver whose steps depend on them (a Newton
        iteration's stopping test) returns a copy that knows them; the default is ``self``.
        Called once per solve when the loop is specified, never per step."""
        return self

    def landing(self, state: Any) -> torch.Tensor | bool:
        """Per row (row shape), whether the next step must end on the next output time, for a
        solver that sets :attr:`lands_on_outputs` and :attr:`lands_per_row` (asked after each
        step with the carried state); the default, ``True``, is every row alike."""
        return True

    def choice(self, state: Any) -> Any:
        """What of the carried ``state`` decides which arithmetic a step does (a per-row choice
        of method, for a switching solver), so that a replay of the step (the checkpoint
        strategy's backward pass) does the same; ``None`` (the default) when a step's arithmetic
        depends on its time, step and start state only."""
        return None

    def replay_state(self, f: Func, t: Time, y: torch.Tensor, choice: Any) -> Any:
        """The carried state a replay of a recorded step starts from, given the step's
        :meth:`choice`; the default is a fresh :meth:`init` (the first stage is evaluated
        again: the same value the step had)."""
        return self.init(f, t, y, None)

    def merge(self, accept: torch.Tensor, new: Any, old: Any) -> Any:
        """The carried state per row: ``new`` where ``accept`` (``[batch]``), else ``old``.

        The default suits states that are ``None``, a tensor of the state's shape, or a tuple of
        such; a solver with other state overrides it.
        """
        return _merge_tree(accept, new, old)

    def error_norm(self, norms: Sequence[torch.Tensor]) -> torch.Tensor:
        """Combine the norms of the scaled error estimates into one error ratio per row.

        Called with one norm per estimate in ``StepResult.y_error`` (one, for most methods)."""
        return norms[0]

    def stage_times(self, t: torch.Tensor, h: torch.Tensor, dtype: torch.dtype) -> Any:
        """Evaluation times of many steps at once, for a loop that knows its grid in advance
        (fixed steps): ``t`` and ``h`` are ``[n, *rows]`` in the time dtype, ``dtype`` is the
        state's; returns a sequence whose ``i``-th item the loop passes back as ``times`` to
        step ``i``, or ``None`` if the solver has no use for it."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def constant(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, a constant a solver keeps for later solves, built as a plain tensor even
    inside a ``torch.func`` transform (there a new tensor is the transform's wrapper, which
    would outlive it in the cache: a later compiled solve's ``while_loop`` cannot take it)."""
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is None:
        return make()
    with torch._C._DisableFuncTorch():
        return make()


def _merge_tree(accept: torch.Tensor, new: Any, old: Any) -> Any:
    if new is None or old is None:
        return None
    if isinstance(new, torch.Tensor):
        return torch.where(per_row(accept, new.ndim), new, old)
    merged = [_merge_tree(accept, a, b) for a, b in zip(new, old)]
    return type(new)(*merged) if hasattr(new, "_fields") else type(new)(merged)
