"""torchdiffeq-compatible entry points: switch with one import change.

``from neuralode import odeint`` takes the same arguments as ``torchdiffeq.odeint`` (0.2.5) and
returns the same layout.  As in torchdiffeq, ``method=None`` is ``dopri5``, an unknown option key
is a warning (the key is ignored), ``options["norm"]`` may be a callable of the state as the user
gave it (``norm(y)``, a tuple for a tuple state), a tuple state's default norm is the largest RMS
over its tensors, and ``method="scipy_solver"`` runs ``scipy.integrate.solve_ivp``.
:func:`neuralode.solve` stays strict: there unknown options are errors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ._inputs import CALLBACK_NAMES, check_state, check_times
from .events import Event
from .gradients.adjoint import ADJOINT_OPTIONS, find_adjoint_params
from .solution import SolverError
from .solve import DEFAULT_MAX_NUM_STEPS, solve
from .solvers import AdamsBashforth, AdamsBashforthMoulton, ButcherTableau, Solver, get_solver
from .solvers.implicit import ImplicitRK
from .solvers.registry import ALIASES

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "ODE_OPTIONS", "SCIPY_OPTIONS"]

#: Option keys ``odeint`` understands (torchdiffeq's names), with their meaning.
ODE_OPTIONS = {
    "step_size": "fixed-step methods: step in time units (default: one step per output interval)",
    "first_step": "adaptive methods: initial step (default: Hairer's selection)",
    "max_num_steps": f"steps allowed before failing (default {DEFAULT_MAX_NUM_STEPS})",
    "dtype": "dtype of time inside the solver (default float64)",
    "norm": "'rms', 'max', or a callable norm(y) -> 0-dim tensor of the state as given (a tuple "
    "for a tuple state), as torchdiffeq calls it (default: RMS; a tuple state: the largest RMS "
    "over its tensors)",
    "safety": "step-size controller safety factor (default 0.9)",
    "beta": "PI stabilisation coefficient (default 0: integral control)",
    "ifactor": "largest step growth factor (default 10)",
    "dfactor": "smallest step shrink factor (default 0.2)",
    "min_step": "adaptive methods: smallest step; a step this short is accepted (default 0)",
    "max_step": "adaptive methods: largest step (default: unbounded)",
    "step_t": "adaptive methods: times where steps end (1-D)",
    "jump_t": "adaptive methods: times where func jumps: steps end there and the solver restarts",
    "grid_constructor": "fixed-step methods: grid_constructor(func, y0, t) -> the 1-D grid of "
    "step times, from t[0] to t[-1] (instead of step_size); outputs between grid points are "
    "interpolated as interp says",
    "interp": "fixed-step methods with step_size or grid_constructor: 'linear' or 'cubic' "
    "(Hermite) interpolation of outputs between grid points, as torchdiffeq (default here: "
    "the method's own interpolant, more accurate than torchdiffeq's default 'linear')",
    "perturb": "fixed-step methods: True to evaluate func one ulp inside each step at the "
    "step's ends (a field that jumps at grid times is seen from the step's side), as torchdiffeq",
    "max_order": "explicit_adams, implicit_adams (fixed_adams): the order k of the method, the "
    "number of values of func it combines, 1 to 12 (default 4; torchdiffeq's default is 12, "
    "and its explicit_adams reaches order max_order - 1)",
    "compile": "neuralode's own (torchdiffeq has none): True, or a dict of CompileOptions "
    "fields, to run an explicit Runge-Kutta method's steps in blocks compiled by torch.compile "
    "(see neuralode.solve's compile)",
    "max_iters": "implicit_adams (fixed_adams): corrector iterations per step, at least 1 "
    "(default 4; the corrector stops earlier once its change is within rtol/atol); the "
    "fixed-step implicit methods (implicit_euler, ..., trbdf2): Newton iterations per step "
    "before the solve fails (default 50)",
}
#: The methods that take ``max_order``/``max_iters`` (names after aliases), and which of the two.
_ADAMS_OPTIONS = {
    "explicit_adams": ("max_order",),
    "implicit_adams": ("max_order", "max_iters"),
}
#: Option keys of ``method="scipy_solver"`` (passed to ``scipy.integrate.solve_ivp``).
SCIPY_OPTIONS = {
    "solver": "solve_ivp's method: 'LSODA' (default, as torchdiffeq), 'RK45', 'RK23', 'DOP853', "
    "'Radau', 'BDF'",
    "min_step": "smallest step (LSODA only)",
    "max_step": "largest step (default: unbounded)",
}
_RENAMED = {"dtype": "t_dtype"}


def odeint(
    func: Callable[[torch.Tensor, Any], Any],
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | ButcherTableau | Solver | None = "dopri5",
    options: dict[str, Any] | None = None,
    event_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> Any:
    """Solve ``dy/dt = func(t, y)`` and return ``y`` at the times ``t`` (torchdiffeq's API).

    Args:
        func: ``func(t, y)`` with ``t`` a 0-dim tensor (in ``y``'s dtype) and ``y`` shaped like
            ``y0``; returns ``dy/dt`` of the same shape (a tuple for a tuple state).
        y0: initial state at ``t[0]``: a floating tensor of any shape, or a tuple of them.
        t: 1-D strictly increasing or strictly decreasing output times ``[T]``.
        rtol, atol: tolerances of adaptive methods (scalars or per-component tensors), and of
            ``implicit_adams``'s corrector iteration (as in torchdiffeq).
        method: a name in :data:`neuralode.METHODS` (``dopri5``, ``bosh3``, ``fehlberg2``,
            ``adaptive_heun``, ``euler``, ``rk4``, ``explicit_adams``, ``implicit_adams``, ...)
            or an alias (``heun2``, ``fixed_adams``), ``None``
            (``dopri5``), ``"scipy_solver"`` (no gradient here, as torchdiffeq;
            :func:`odeint_adjoint` gives one; see :data:`SCIPY_OPTIONS`), or your own
            :class:`~neuralode.ButcherTableau` or :class:`~neuralode.solvers.Solver`.  Our
            ``rk4`` is the classic rule; torchdiffeq's ``rk4`` is Kutta's 3/8 rule, ours
            ``rk38``.
        options: keys of :data:`ODE_OPTIONS` (an unknown key warns and is ignored, as in
            torchdiffeq); torchdiffeq's older ``grid_points``/``eps`` are read as ``step_t``
            (``eps=0``) or ``jump_t``, with a ``FutureWarning``.
        event_fn: ``event_fn(t, y) -> tensor`` (``[]`` or ``[k]``): integrate from ``t[0]``
            until a function of it changes sign, in the direction of ``t`` (the other times
            are ignored), as torchdiffeq; see :func:`odeint_event`.

    Returns:
        ``[T, *y0.shape]`` (a tuple of such for a tuple ``y0``); ``out[0]`` is ``y0``.  With
        ``event_fn``: ``(event_t, solution)``, ``solution`` ``[2, *y0.shape]``: ``y0`` and the
        state at the event; both differentiable (the event time by the implicit function
        theorem).

    Raises:
        ValueError, TypeError: bad input, naming the argument (a ``ValueError`` for a ``t`` that
            is not 1-D: per-sample grids ``[batch, T]`` are :func:`neuralode.solve`'s).
        SolverError: the solve failed (too many steps, step size underflow, non-finite values),
            or, with ``event_fn``, no event was found.
        ImportError: ``method="scipy_solver"`` without scipy installed.

    Examples:
        >>> import torch
        >>> from neuralode import odeint
        >>> ys = odeint(lambda t, y: -y, torch.tensor([1.0, 2.0]), torch.linspace(0, 1, 3))
        >>> ys.shape, ys[-1]  # y0 * exp(-1)
        (torch.Size([3, 2]), tensor([0.3679, 0.7358]))
    """
    method = "dopri5" if method is None else method
    _check_1d(t, "odeint")
    if isinstance(method, str) and method == "scipy_solver":
        if event_fn is not None:
            raise ValueError("event_fn is not supported with method='scipy_solver'")
        return _scipy_solve(func, y0, t, rtol, atol, options)
    if event_fn is not None:
        return _until_event(func, y0, t, event_fn, rtol, atol, method, options, "odeint", {})
    kwargs = _options(options, y0, "odeint", method)
    method = _configured(method, kwargs, rtol, atol, "odeint")
    grid, interp = _grid_options(func, y0, t, kwargs)
    if grid is not None:
        sol = solve(func, y0, grid, method=method, rtol=rtol, atol=atol, batched=False, **kwargs)
        return _interpolate(func, grid, sol.ys, t, interp)
    sol = solve(func, y0, t, method=method, rtol=rtol, atol=atol, batched=False, **kwargs)
    return sol.ys


def odeint_adjoint(
    func: Callable[[torch.Tensor, Any], Any],
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | ButcherTableau | Solver | None = "dopri5",
    options: dict[str, Any] | None = None,
    adjoint_rtol: float | torch.Tensor | None = None,
    adjoint_atol: float | torch.Tensor | None = None,
    adjoint_method: str | ButcherTableau | Solver | None = None,
    adjoint_options: dict[str, Any] | None = None,
    adjoint_params: Iterable[torch.Tensor] | None = None,
    event_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> Any:
    """:func:`odeint` with gradients by the continuous adjoint method (torchdiffeq's API).

    The forward solve keeps no autograd graph, so memory does not grow with the number of
    steps; the backward pass solves the augmented system backwards in time (Chen et al. 2018,
    Algorithm 1).  ``func`` may be an ``nn.Module`` (its trainable parameters are found) or a
    plain callable with ``adjoint_params`` given.  ``adjoint_options`` takes ``norm``
    (``"seminorm"``, the default; ``"rms"``, torchdiffeq's default; or ``"max"``), ``unused``
    (``"zero"`` here, as torchdiffeq: a parameter ``func`` never uses gets a zero gradient, with
    a warning; ``"error"`` refuses it) and the stepping keys of :data:`ODE_OPTIONS` (listed
    under ``adjoint_options`` below); an unknown key warns and is ignored; the other
    ``adjoint_*`` arguments default to the forward ones.  The backward solve carries its step
    size from one output interval to the next.
    ``event_fn`` integrates until an event, as :func:`odeint`'s.  See :func:`neuralode.solve`.

    Args:
        func: as :func:`odeint`: ``func(t, y) -> dy/dt``; an ``nn.Module`` whose trainable
            parameters get gradients, or a plain callable with ``adjoint_params``.
        y0: initial state at ``t[0]``: a floating tensor of any shape, or a tuple of them.
        t: 1-D strictly increasing or strictly decreasing output times ``[T]``.
        rtol, atol: the forward solve's tolerances, as :func:`odeint`.
        method: the forward solve's method, as :func:`odeint`.  With ``"scipy_solver"`` the
            backward solve runs the augmented system through ``scipy.integrate.solve_ivp`` too
            (``adjoint_options["solver"]``, default: the forward's), as torchdiffeq does.
        options: the forward solve's options, keys of :data:`ODE_OPTIONS` (an unknown key
            warns and is ignored).
        adjoint_rtol, adjoint_atol: the backward solve's tolerances (default: ``rtol``,
            ``atol``).
        adjoint_method: the backward solve's method (default: ``method``).
        adjoint_options: the backward solve's options: ``norm`` and ``unused`` as above, and
            ``step_size``, ``first_step``, ``max_num_steps``, ``dtype``, ``safety``, ``beta``,
            ``ifactor``, ``dfactor``, ``min_step``, ``max_step`` as in :data:`ODE_OPTIONS`.
        adjoint_params: the tensors to differentiate, e.g. ``net.parameters()`` (default: the
            parameters of an ``nn.Module`` ``func`` that require grad).
        event_fn: ``event_fn(t, y) -> tensor`` (``[]`` or ``[k]``): integrate until it changes
            sign, as :func:`odeint`.

    Returns:
        ``[T, *y0.shape]`` (a tuple of such for a tuple ``y0``); with ``event_fn``
        ``(event_t, solution)`` as :func:`odeint`.

    Raises:
        ValueError, TypeError: bad input, naming the argument.
        SolverError: the forward or the backward solve failed.
        RuntimeError: at backward, when asked for higher-order gradients (``create_graph=True``):
            the adjoint's backward pass is not differentiable; use :func:`odeint` instead.

    Examples:
        The gradient of ``y(1) = exp(a)`` for ``dy/dt = a y`` is ``exp(a)``:

        >>> import torch
        >>> from neuralode import odeint_adjoint
        >>> a = torch.tensor(-1.0, requires_grad=True)
        >>> ys = odeint_adjoint(lambda t, y: a * y, torch.tensor([1.0]), torch.tensor([0.0, 1.0]),
        ...                     adjoint_params=[a])
        >>> ys[-1].sum().backward()
        >>> ys[-1].detach(), a.grad
        (tensor([0.3679]), tensor(0.3679))
    """
    method = "dopri5" if method is None else method
    if isinstance(method, str) and method == "scipy_solver":
        if event_fn is not None:
            raise ValueError("event_fn is not supported with method='scipy_solver'")
        if adjoint_method not in (None, "scipy_solver"):
            raise ValueError(
                f"method='scipy_solver' takes its backward solve from scipy too; "
                f"adjoint_method={adjoint_method!r} cannot serve it (leave it None)"
            )
        _check_1d(t, "odeint_adjoint")
        return _scipy_adjoint(
            func,
            y0,
            t,
            (rtol, atol),
            options,
            (
                rtol if adjoint_rtol is None else adjoint_rtol,
                atol if adjoint_atol is None else adjoint_atol,
            ),
            options if adjoint_options is None else adjoint_options,
            find_adjoint_params(func, adjoint_params, "adjoint"),
        )
    _check_1d(t, "odeint_adjoint")
    adjoint: dict[str, Any] = dict(
        gradient="adjoint",
        adjoint_params=adjoint_params,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        adjoint_options=_adjoint_options(adjoint_options, adjoint_method or method, y0),
    )
    if event_fn is not None:
        return _until_event(
            func, y0, t, event_fn, rtol, atol, method, options, "odeint_adjoint", adjoint
        )
    kwargs = _options(options, y0, "odeint_adjoint", method)
    method = _configured(method, kwargs, rtol, atol, "odeint_adjoint")
    grid, interp = _grid_options(func, y0, t, kwargs)
    sol = solve(
        func,
        y0,
        t if grid is None else grid,
        method=method,
        rtol=rtol,
        atol=atol,
        batched=False,
        **adjoint,
        **kwargs,
    )
    return sol.ys if grid is None else _interpolate(func, grid, sol.ys, t, interp)


#: How far an adaptive solve until an event may go (time units, relative to ``1 + |t0|``):
#: torchdiffeq integrates without an end; a horizon this far gives the same answer for any event
#: a solve reaches within ``max_num_steps``.
_EVENT_HORIZON = 1e6
#: Fixed steps a solve until an event takes at most (torchdiffeq's own limit).
_EVENT_FIXED_STEPS = 20_000


def odeint_event(
    func: Callable[[torch.Tensor, Any], Any],
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t0: torch.Tensor,
    *,
    event_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    reverse_time: bool = False,
    odeint_interface: Callable[..., Any] = odeint,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Integrate from ``t0`` until ``event_fn(t, y)`` changes sign (torchdiffeq's API).

    A thin layer over :class:`neuralode.Event` (a terminal event of either direction; with
    ``[k]`` functions, the first of them to change sign).  Unlike torchdiffeq's, whose gradient
    comes from a rerouting function after the solve, the event time and state here carry their
    implicit-function-theorem gradients with either interface (:func:`odeint`: backprop through
    the solve to the event; :func:`odeint_adjoint`: the adjoint), and to ``t0`` as well.

    Args:
        func, y0: as :func:`odeint`.
        t0: the start time (a tensor of one element).
        event_fn: ``event_fn(t, y) -> tensor`` (``[]`` or ``[k]``).
        reverse_time: integrate towards decreasing time.
        odeint_interface: :func:`odeint` or :func:`odeint_adjoint`.
        **kwargs: the interface's other arguments (``rtol``, ``atol``, ``method``, ``options``,
            and the adjoint's).  A fixed-step method needs ``options["step_size"]``.

    Returns:
        ``(event_t, solution)``: the event time (0-dim, ``t0``'s dtype) and ``[2, *y0.shape]``
        (``y0`` and the state at the event; a tuple for a tuple ``y0``).

    Raises:
        ValueError: ``t0`` is not a tensor of one element; a fixed-step method without
            ``options["step_size"]``; and the interface's own errors for bad input.
        SolverError: no event within the horizon (``1e6 (1 + |t0|)`` time units, or 20000 fixed
            steps) or the solve failed first.

    Examples:
        A ball dropped from 1 m lands at ``sqrt(2 h / g)``; the landing time's gradient with
        respect to the height is ``1 / sqrt(2 g h)``:

        >>> import torch
        >>> from neuralode import odeint_event
        >>> def fall(t, y):  # y = [height, velocity]
        ...     return torch.stack([y[1], torch.full_like(y[1], -9.81)])
        >>> y0 = torch.tensor([1.0, 0.0], requires_grad=True)
        >>> t_hit, ys = odeint_event(fall, y0, torch.tensor(0.0), event_fn=lambda t, y: y[0])
        >>> t_hit.backward()
        >>> round(t_hit.item(), 4), ys.shape, round(y0.grad[0].item(), 4)
        (0.4515, torch.Size([2, 2]), 0.2258)
    """
    if not isinstance(t0, torch.Tensor) or t0.numel() != 1:
        raise ValueError(f"t0 must be a tensor of one element, got {t0!r}")
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    out: tuple[torch.Tensor, Any] = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
    return out


def _until_event(
    func: Callable[[torch.Tensor, Any], Any],
    y0: Any,
    t: torch.Tensor,
    event_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    rtol: Any,
    atol: Any,
    method: Any,
    options: dict[str, Any] | None,
    where: str,
    adjoint: dict[str, Any],
) -> tuple[torch.Tensor, Any]:
    """``odeint(..., event_fn=...)``: from ``t[0]`` until the event, in ``t``'s direction."""
    if not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {event_fn!r}")
    method = "dopri5" if method is None else method
    kwargs = _options(options, y0, where, method)
    method = _configured(method, kwargs, rtol, atol, where)
    if kwargs.get("grid_constructor") is not None or kwargs.get("interp") is not None:
        raise ValueError(f"{where} with event_fn: grid_constructor and interp do not apply")
    kwargs.pop("grid_constructor", None)
    kwargs.pop("interp", None)
    t = torch.as_tensor(t)
    sign = -1.0 if t.numel() > 1 and bool(t[1] < t[0]) else 1.0
    t0 = t.reshape(-1)[:1]
    if get_solver(method).adaptive:
        span = _EVENT_HORIZON * (1.0 + abs(float(t0.detach())))
    else:
        step = kwargs.get("step_size")
        if step is None:
            raise ValueError(
                f"{where} with event_fn and a fixed-step method needs options['step_size'] "
                f"(as torchdiffeq)"
            )
        span = _EVENT_FIXED_STEPS * float(step)
    times = torch.cat([t0, t0.detach() + sign * span])
    sol = solve(
        func,
        y0,
        times,
        method=method,
        rtol=rtol,
        atol=atol,
        batched=False,
        events=Event(event_fn, direction=0, terminal=True),
        throw=False,
        **adjoint,
        **kwargs,
    )
    assert sol.event_t is not None
    if bool(torch.isnan(sol.event_t)):
        why = "" if sol.success else f" (the solve stopped there: {sol.messages()[0]})"
        raise SolverError(
            f"{where}: event_fn did not change sign between t = {float(t0.detach()):.6g} and "
            f"t = {float(sol.t_end):.6g}{why}",
            sol,
        )
    y_event = sol.event_y
    if isinstance(y0, (tuple, list)):
        solution: Any = tuple(torch.stack([p, q]) for p, q in zip(y0, y_event))
    else:
        solution = torch.stack([y0, y_event])
    return sol.event_t.to(t.dtype), solution


def _grid_options(
    func: Callable[[torch.Tensor, Any], Any], y0: Any, t: Any, kwargs: dict[str, Any]
) -> tuple[torch.Tensor | None, str]:
    """torchdiffeq's fixed-grid options (removed from ``kwargs``): the grid to step on and the
    interpolation of the outputs between its points, or ``(None, "")`` to step to the outputs
    (and interpolate with the method's own interpolant) as ``solve`` does."""
    gc = kwargs.pop("grid_constructor", None)
    interp = kwargs.pop("interp", None)
    if gc is None and interp is None:
        return None, ""
    if interp is None:
        interp = "linear"  # torchdiffeq's default
    if interp not in ("linear", "cubic"):
        raise ValueError(f"options['interp'] must be 'linear' or 'cubic', got {interp!r}")
    step_size = kwargs.pop("step_size", None)
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] < 1:
        raise ValueError("t must be a 1-D tensor of output times")
    if gc is not None:
        if step_size is not None:
            raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
        if not callable(gc):
            raise TypeError(f"options['grid_constructor'] must be callable, got {gc!r}")
        try:
            grid = gc(func, y0, t)
        except TypeError as err:  # a callable of another signature (the user's own errors chain)
            raise TypeError(
                f"options['grid_constructor'] must be callable as grid_constructor(func, y0, t) "
                f"and return a 1-D tensor of times: {err}"
            ) from err
        if not isinstance(grid, torch.Tensor) or grid.ndim != 1 or grid.shape[0] < 2:
            raise ValueError("options['grid_constructor'] must return a 1-D tensor of >= 2 times")
        if bool(grid[0] != t[0]) or bool(grid[-1] != t[-1]):
            raise ValueError(
                f"options['grid_constructor'] must return a grid from t[0] = {float(t[0])} to "
                f"t[-1] = {float(t[-1])}, got {float(grid[0])} to {float(grid[-1])}"
            )
        return grid.to(t.dtype), interp
    if step_size is None:
        return t, interp
    # torchdiffeq's grid: t[0] + k * step_size, the last point moved to t[-1].
    sign = 1.0 if t.shape[0] < 2 or bool(t[-1] >= t[0]) else -1.0
    span = (t[-1] - t[0]) * sign
    n = int(torch.ceil(span / step_size + 1).item())
    grid = t[0] + sign * step_size * torch.arange(n, dtype=t.dtype, device=t.device)
    grid[-1] = t[-1]
    return grid, interp


def _interpolate(
    func: Callable[[torch.Tensor, Any], Any],
    grid: torch.Tensor,
    ys: Any,
    t: torch.Tensor,
    interp: str,
) -> Any:
    """The outputs at ``t`` from the states at ``grid`` (user time), as torchdiffeq's fixed-grid
    solvers compute them: each output from the first grid interval whose end reaches it."""
    parts = ys if isinstance(ys, tuple) else (ys,)
    sign = -1.0 if grid.shape[0] > 1 and bool(grid[-1] < grid[0]) else 1.0
    g = grid.detach() * sign
    idx = torch.searchsorted(g[1:].contiguous(), (t.detach() * sign).contiguous()).tolist()
    outs: list[list[torch.Tensor]] = [[p[0]] for p in parts]
    for j in range(1, t.shape[0]):
        i = min(idx[j], grid.shape[0] - 2)
        t0, t1, tj = grid[i], grid[i + 1], t[j].to(grid.dtype)
        y0s, y1s = [p[i] for p in parts], [p[i + 1] for p in parts]
        if interp == "linear":
            if bool(tj == t0):
                vals = y0s
            elif bool(tj == t1):
                vals = y1s
            else:
                slope = (tj - t0) / (t1 - t0)
                vals = [a + slope.to(a.dtype) * (b - a) for a, b in zip(y0s, y1s)]
        else:
            state = (lambda v: tuple(v)) if isinstance(ys, tuple) else (lambda v: v[0])
            f0 = func(t0.to(y0s[0].dtype), state(y0s))
            f1 = func(t1.to(y0s[0].dtype), state(y1s))
            f0s = f0 if isinstance(f0, tuple) else (f0,)
            f1s = f1 if isinstance(f1, tuple) else (f1,)
            h = ((tj - t0) / (t1 - t0)).to(y0s[0].dtype)
            dt = (t1 - t0).to(y0s[0].dtype)
            h00, h10 = (1 + 2 * h) * (1 - h) * (1 - h), h * (1 - h) * (1 - h)
            h01, h11 = h * h * (3 - 2 * h), h * h * (h - 1)
            vals = [
                h00 * a + h10 * dt * fa + h01 * b + h11 * dt * fb
                for a, b, fa, fb in zip(y0s, y1s, f0s, f1s)
            ]
        for out, v in zip(outs, vals):
            out.append(v)
    stacked = tuple(torch.stack(o) for o in outs)
    return stacked if isinstance(ys, tuple) else stacked[0]


def _check_1d(t: Any, name: str) -> None:
    if isinstance(t, torch.Tensor) and t.ndim != 1:
        raise ValueError(
            f"t must be 1-D [T] for {name}, got shape {tuple(t.shape)}; "
            f"neuralode.solve takes per-sample grids [batch, T]"
        )


def _warn_unknown(unknown: list[str], known: Sequence[str], where: str) -> None:
    warnings.warn(
        f"{where}: unexpected option(s) {unknown}, ignored (known options: {sorted(known)}; "
        f"step_size and perturb are for fixed-step methods; first_step, min_step and max_step "
        f"for adaptive ones; max_order for the Adams methods, max_iters for them and the "
        f"fixed-step implicit ones)",
        UserWarning,
        stacklevel=4,
    )


def _options(
    options: dict[str, Any] | None, y0: Any, where: str, method: str | ButcherTableau | Solver
) -> dict[str, Any]:
    """``solve`` keyword arguments from torchdiffeq's ``options``: unknown keys, and
    ``step_size``/``first_step`` given to a method of the other kind, warn and are dropped, as
    torchdiffeq's unused options are; a callable norm is called as torchdiffeq calls it; a tuple
    state's default norm is torchdiffeq's (the largest RMS over its tensors)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    adaptive = get_solver(method).adaptive
    options = _legacy_grid_points(options, adaptive, where)
    unused: tuple[str, ...] = (
        ("first_step", "min_step", "max_step", "step_t", "jump_t")
        if not adaptive
        else ("step_size", "grid_constructor", "interp", "perturb")
    )
    unknown = sorted(k for k in options if k not in ODE_OPTIONS or k in unused)
    if unknown:
        _warn_unknown(unknown, list(ODE_OPTIONS), where)
    options = {k: v for k, v in options.items() if k not in unknown}
    first = options.get("first_step")
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        # torchdiffeq clamps every step, the first included, to [min_step, max_step]
        lo, hi = options.get("min_step", 0.0), options.get("max_step", math.inf)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi:
            options["first_step"] = min(max(first, lo), hi)
    kwargs = {_RENAMED.get(k, k): v for k, v in options.items()}
    norm = kwargs.get("norm")
    is_tuple = isinstance(y0, tuple)
    if callable(norm):
        kwargs["norm"] = _state_norm(norm, y0)
    elif norm is None and is_tuple:
        kwargs["norm"] = _state_norm(_largest_rms, y0)
    return kwargs


def _legacy_grid_points(options: dict[str, Any], adaptive: bool, where: str) -> dict[str, Any]:
    """torchdiffeq's names before 0.2.0, ``grid_points`` (times where steps end) and ``eps`` (how
    far either side of them the field is evaluated), read as today's: ``step_t`` when ``eps`` is
    0 (its default then), else ``jump_t``, whose one-ulp perturbation is what a small ``eps`` was
    for (a larger ``eps`` skipped an interval of width ``2 eps``; that is not reproduced).  Only
    adaptive methods took them; a fixed-step method warns and ignores them, as unknown options."""
    if options.get("grid_points") is None or not adaptive:
        return options  # (grid_points and eps are then warned about as unknown options)
    options = dict(options)
    grid_points = options.pop("grid_points")
    eps = options.pop("eps", 0.0)
    if isinstance(eps, torch.Tensor) and eps.numel() == 1:
        eps = float(eps)
    key = "step_t" if isinstance(eps, (int, float)) and eps == 0 else "jump_t"
    if key in options:
        raise ValueError(f"options['grid_points'] and options[{key!r}] both given: pass {key} only")
    options[key] = grid_points
    how = (
        "steps end there"
        if key == "step_t"
        else "steps end one ulp before each time and restart one ulp after it"
    )
    warnings.warn(
        f"{where}: options 'grid_points' and 'eps' are torchdiffeq's names before 0.2.0; read as "
        f"{key} (eps={eps!r}: {how}). Pass {key} instead.",
        FutureWarning,
        stacklevel=4,
    )
    return options


def _configured(
    method: str | ButcherTableau | Solver,
    kwargs: dict[str, Any],
    rtol: float | torch.Tensor,
    atol: float | torch.Tensor,
    where: str,
) -> str | ButcherTableau | Solver:
    """The method with its own options from ``kwargs`` (removed there): ``max_order`` and
    ``max_iters`` configure the Adams methods, ``max_iters`` the fixed-step implicit ones; an
    option the method does not take warns and is ignored, as torchdiffeq's unused options are."""
    given: dict[str, Any] = {k: kwargs.pop(k) for k in ("max_order", "max_iters") if k in kwargs}
    name = ALIASES.get(method, method) if isinstance(method, str) else None
    takes: tuple[str, ...] = _ADAMS_OPTIONS.get(name, ()) if name is not None else ()
    solver = get_solver(method)
    if isinstance(solver, ImplicitRK):
        takes = ("max_iters",)
    unused: list[str] = sorted(k for k in given if k not in takes)
    if unused:
        _warn_unknown(unused, [k for k in ODE_OPTIONS if k not in unused], where)
    if isinstance(solver, ImplicitRK):
        if "max_iters" in given:
            return ImplicitRK(solver.tableau, max_iters=given["max_iters"])
        return method
    return _adams(method, given.get("max_order"), given.get("max_iters"), rtol, atol)


def _adams(
    method: str | ButcherTableau | Solver,
    order: Any,
    iters: Any,
    rtol: float | torch.Tensor,
    atol: float | torch.Tensor,
) -> str | ButcherTableau | Solver:
    """torchdiffeq's Adams options: ``max_order``/``max_iters`` and, for ``implicit_adams``,
    ``rtol``/``atol`` as the corrector's tolerances, as torchdiffeq uses them; the method then
    becomes a configured solver (``method=`` takes one)."""
    name = ALIASES.get(method, method) if isinstance(method, str) else None
    if name == "explicit_adams" and order is not None:
        return AdamsBashforth(max_order=order)
    if name == "implicit_adams":
        default = AdamsBashforthMoulton()
        r, a = _corrector_tolerances(rtol, atol, default)
        if order is None and iters is None and (r, a) == (default.rtol, default.atol):
            return method  # the registered solver is this one
        return AdamsBashforthMoulton(
            max_order=default.max_order if order is None else order,
            max_iters=default.max_iters if iters is None else iters,
            rtol=r,
            atol=a,
        )
    return method


def _corrector_tolerances(
    rtol: float | torch.Tensor, atol: float | torch.Tensor, default: AdamsBashforthMoulton
) -> tuple[float, float]:
    """``odeint``'s tolerances as one pair of numbers for the corrector (per-component ones:
    their smallest); the defaults where they are not valid tolerances, which ``solve`` then
    refuses with its own message."""
    try:
        r, a = (float(x.min()) if isinstance(x, torch.Tensor) else float(x) for x in (rtol, atol))
    except (TypeError, ValueError, RuntimeError):
        return default.rtol, default.atol
    if not (0 <= r < math.inf and 0 <= a < math.inf and r + a > 0):
        return default.rtol, default.atol
    return r, a


def _adjoint_options(
    options: dict[str, Any] | None, method: str | ButcherTableau | Solver, y0: Any
) -> dict[str, Any]:
    """torchdiffeq's ``adjoint_options``: unknown keys (and a stepping option of the other kind
    of method) warn and are dropped; a parameter ``func`` never uses gets a zero gradient; a
    callable ``norm`` gets the state parts as the user gave them (torchdiffeq's
    ``(t, *y, *adj_y, *adj_params)`` for a tuple state)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"adjoint_options must be a dict, got {type(options).__name__}")
    adaptive = get_solver(method).adaptive
    wrong_kind = ("first_step", "min_step", "max_step") if not adaptive else ("step_size",)
    unknown = sorted(k for k in options if k not in ADJOINT_OPTIONS or k in wrong_kind)
    if unknown:
        _warn_unknown(unknown, list(ADJOINT_OPTIONS), "odeint_adjoint: adjoint_options")
    kept = {k: v for k, v in options.items() if k not in unknown}
    norm = kept.get("norm")
    if callable(norm):
        kept["norm"] = _adjoint_state_norm(norm, y0)
    return {"unused": "zero", **kept}


def _adjoint_state_norm(norm: Callable[[Any], torch.Tensor], y0: Any) -> Callable[..., Any]:
    """A callable adjoint norm over the backward state as torchdiffeq lays it out: ``y`` and
    ``adj_y`` as the user's tensor (complex where ``y0`` is), or spliced in part by part for a
    tuple state."""
    parts = y0 if isinstance(y0, tuple) else (y0,)
    flags = [isinstance(p, torch.Tensor) and p.is_complex() for p in parts]
    shapes = [(*p.shape, 2) if c else tuple(p.shape) for p, c in zip(parts, flags)]
    sizes = [math.prod(sh) for sh in shapes]

    def split(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for c, sh, cplx in zip(torch.split(x.reshape(-1), sizes), shapes, flags):
            v = c.view(sh)
            out.append(torch.complex(v[..., 0], v[..., 1]) if cplx else v)
        return tuple(out)

    def adjoint_norm(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        t, y, adj, *grads = state
        if isinstance(y0, tuple):
            return norm((t, *split(y), *split(adj), *grads))
        return norm((t, split(y)[0], split(adj)[0], *grads))

    return adjoint_norm


def _largest_rms(y: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """torchdiffeq's default norm of a tuple state: the largest RMS over its tensors."""
    return torch.stack([part.abs().pow(2).mean().sqrt() for part in y]).max()


def _state_norm(norm: Callable[[Any], torch.Tensor], y0: Any) -> Callable[..., torch.Tensor]:
    """``norm(y)`` over the state as the user gave it, as ``solve``'s ``norm(x, dims)``.

    The solver's unbatched state is the user's tensor, or a tuple's tensors flattened and
    concatenated; ``x`` is a scaled error in that layout, split back here."""

    def part(x: torch.Tensor, is_complex: bool) -> torch.Tensor:
        # a complex part is solved as its real view (a last dimension of 2): give it back complex
        return torch.complex(x[..., 0], x[..., 1]) if is_complex else x  # (any storage offset)

    if not isinstance(y0, tuple):
        flag = isinstance(y0, torch.Tensor) and y0.is_complex()
        return lambda x, dims: norm(part(x, flag))
    flags = [p.is_complex() for p in y0]
    shapes = [(*p.shape, 2) if c else p.shape for p, c in zip(y0, flags)]
    sizes = [math.prod(sh) for sh in shapes]

    def split(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return norm(
            tuple(part(c.view(sh), f) for c, sh, f in zip(torch.split(x, sizes), shapes, flags))
        )

    return split


def _scipy_solve(
    func: Callable[[torch.Tensor, Any], Any],
    y0: Any,
    t: torch.Tensor,
    rtol: float | torch.Tensor,
    atol: float | torch.Tensor,
    options: dict[str, Any] | None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``method="scipy_solver"``: ``scipy.integrate.solve_ivp`` on a NumPy view of ``func``.

    As in torchdiffeq the outputs carry no gradient (``odeint_adjoint`` gives them one, by
    :func:`_scipy_adjoint`).  The state is solved as one
    float64 vector and returned in ``y0``'s dtype and device."""
    try:
        from scipy.integrate import solve_ivp
    except ImportError:
        raise ImportError(
            "method='scipy_solver' needs scipy, which is not installed: pip install scipy"
        ) from None
    parts = check_state(y0)
    t = check_times(t, allow_2d=False, t_dtype=torch.float64, device=parts[0].device)
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(SCIPY_OPTIONS) - {"norm"})  # torchdiffeq drops norm
    if unknown:
        _warn_unknown(unknown, list(SCIPY_OPTIONS), "odeint(method='scipy_solver')")
    extra = {k: options[k] for k in ("min_step", "max_step") if k in options}
    defined = {n for n in CALLBACK_NAMES if getattr(func, n, None) is not None}
    if defined:  # as torchdiffeq: scipy's steps are not ours to call back from
        warnings.warn(f"Solver 'scipy_solver' does not support callbacks {defined}", stacklevel=3)
    dtype, device = parts[0].dtype, parts[0].device
    shapes = [p.shape for p in parts]
    sizes = [math.prod(sh) for sh in shapes]

    def unpack(y: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = tuple(
            c.reshape(*y.shape[:-1], *sh) for c, sh in zip(torch.split(y, sizes, -1), shapes)
        )
        return out if isinstance(y0, tuple) else out[0]

    def f_np(s: float, y: Any) -> Any:
        with torch.no_grad():
            ty = torch.as_tensor(y, device=device).to(dtype)
            out = func(torch.tensor(s, dtype=dtype, device=device), unpack(ty))
            outs = out if isinstance(out, tuple) else (out,)
            return torch.cat([o.reshape(-1) for o in outs]).double().cpu().numpy()

    flat0 = torch.cat([p.detach().reshape(-1) for p in parts]).double().cpu().numpy()
    tt = t.detach().double().cpu().numpy()
    if tt.shape[0] == 1:
        return unpack(torch.as_tensor(flat0).to(device, dtype).unsqueeze(0))
    tol = {
        k: (v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else v)
        for k, v in (("rtol", rtol), ("atol", atol))
    }
    res = solve_ivp(
        f_np,
        (tt[0], tt[-1]),
        flat0,
        method=options.get("solver", "LSODA"),
        t_eval=tt,
        **tol,
        **extra,
    )
    if not res.success or res.y.shape[1] != tt.shape[0]:
        raise SolverError(f"odeint(method='scipy_solver'): scipy's solve_ivp failed: {res.message}")
    return unpack(torch.as_tensor(res.y.T).to(device, dtype))


def _scipy_adjoint(
    func: Callable[[torch.Tensor, Any], Any],
    y0: Any,
    t: torch.Tensor,
    tolerances: tuple[Any, Any],
    options: dict[str, Any] | None,
    adjoint_tolerances: tuple[Any, Any],
    adjoint_options: dict[str, Any] | None,
    params: tuple[torch.Tensor, ...],
) -> Any:
    """``odeint_adjoint(method="scipy_solver")``: scipy's forward solve, and the adjoint's
    augmented system ``(y, a, g)`` solved backwards over each output interval by scipy as well
    (``dy/ds = f``, ``da/ds = -a df/dy``, ``dg/ds = -a df/dp``), as torchdiffeq does."""
    ys = _scipy_solve(func, y0, t, *tolerances, options)
    parts_in = y0 if isinstance(y0, tuple) else (y0,)
    parts_out = ys if isinstance(ys, tuple) else (ys,)
    run = _ScipyAdjointRun(func, y0, t, adjoint_tolerances, adjoint_options, params)
    # torch.autograd.Function.apply has no annotations (torch 2.13).
    outs = _ScipyAdjoint.apply(run, t, len(parts_in), *parts_out, *parts_in, *params)  # type: ignore[no-untyped-call]
    return tuple(outs) if isinstance(y0, tuple) else outs[0]


class _ScipyAdjointRun:
    """What the backward pass of :func:`_scipy_adjoint` needs: the flattened field and the
    backward solve's settings."""

    def __init__(
        self,
        func: Callable[[torch.Tensor, Any], Any],
        y0: Any,
        t: torch.Tensor,
        tolerances: tuple[Any, Any],
        options: dict[str, Any] | None,
        params: tuple[torch.Tensor, ...],
    ) -> None:
        parts = y0 if isinstance(y0, tuple) else (y0,)
        self.func, self.is_tuple, self.params = func, isinstance(y0, tuple), params
        self.shapes = [p.shape for p in parts]
        self.dtypes = [p.dtype for p in parts]
        self.sizes = [math.prod(sh) for sh in self.shapes]
        self.dtype, self.device = parts[0].dtype, parts[0].device
        for name, tol in zip(("adjoint_rtol", "adjoint_atol"), tolerances):
            if isinstance(tol, torch.Tensor) and tol.numel() != 1:
                raise ValueError(
                    f"{name} must be a number with method='scipy_solver' (the backward state "
                    f"mixes y, the adjoint and the parameter gradients), got shape "
                    f"{tuple(tol.shape)}"
                )
        self.rtol, self.atol = (float(x) for x in tolerances)
        options = dict(options or {})
        unknown = sorted(set(options) - set(SCIPY_OPTIONS) - {"norm"})
        if unknown:
            _warn_unknown(unknown, list(SCIPY_OPTIONS), "odeint_adjoint(method='scipy_solver')")
        self.solver = options.get("solver", "LSODA")
        self.extra = {k: options[k] for k in ("min_step", "max_step") if k in options}

    def field(self, s: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``func`` on a flat state ``[N]`` (the state's dtype), flat ``[N]`` out."""
        chunks = torch.split(flat, self.sizes)
        ys = tuple(c.reshape(sh) for c, sh in zip(chunks, self.shapes))
        out = self.func(s, ys if self.is_tuple else ys[0])
        outs = out if isinstance(out, tuple) else (out,)
        return torch.cat([o.reshape(-1) for o in outs])

    def backward(
        self, t: torch.Tensor, ys: torch.Tensor, grads: torch.Tensor, t_grad: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """``(dL/dy0, dL/dparams, dL/dt)`` from the outputs ``ys`` ``[T, N]`` (float64) and
        their gradients ``grads`` ``[T, N]``."""
        from scipy.integrate import solve_ivp

        n = ys.shape[1]
        numels = [p.numel() for p in self.params]
        tt = t.detach().double().cpu().numpy()

        def state(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.field(s.to(self.dtype), y.to(self.dtype)).double()

        def aug(s: float, x: Any) -> Any:
            xt = torch.as_tensor(x, device=self.device)
            y, a = xt[:n], xt[n : 2 * n]
            with torch.enable_grad():
                yd = y.to(self.dtype).detach().requires_grad_(True)
                f = self.field(torch.tensor(s, dtype=self.dtype, device=self.device), yd)
                vjps = torch.autograd.grad(f, (yd, *self.params), a.to(f.dtype), allow_unused=True)
            pieces = [f.detach().double()]
            for v, like in zip(vjps, (yd, *self.params)):
                v = torch.zeros_like(like) if v is None else v
                pieces.append(-v.detach().reshape(-1).double())
            return torch.cat(pieces).cpu().numpy()

        a = grads[-1].clone()
        g = torch.zeros(sum(numels), dtype=torch.float64, device=self.device)
        t_grads = torch.zeros(len(tt), dtype=torch.float64) if t_grad else None
        flowed = torch.zeros_like(a)
        for i in range(len(tt) - 1, 0, -1):
            if t_grads is not None:  # moving an output time moves that output along f
                with torch.no_grad():
                    t_grads[i] = (grads[i] * state(t[i], ys[i])).sum()
            x0 = torch.cat([ys[i], a, g]).cpu().numpy()
            res = solve_ivp(
                aug,
                (tt[i], tt[i - 1]),
                x0,
                method=self.solver,
                rtol=self.rtol,
                atol=self.atol,
                **self.extra,
            )
            if not res.success:
                raise SolverError(
                    f"odeint_adjoint(method='scipy_solver'): the backward solve failed on the "
                    f"output interval between output times {i - 1} and {i}: {res.message}"
                )
            x1 = torch.as_tensor(res.y[:, -1], device=self.device)
            flowed = x1[n : 2 * n]  # the adjoint of the later outputs, carried to t[i - 1]
            a = flowed + grads[i - 1]
            g = x1[2 * n :]
        if t_grads is not None:  # the start: -a(t0) . f(t0, y0), without the output at t0,
            with torch.no_grad():  # which is y0 wherever t0 is
                t_grads[0] = -(flowed * state(t[0], ys[0])).sum()
        param_grads = list(torch.split(g, numels))
        return a, param_grads, t_grads


class _ScipyAdjoint(torch.autograd.Function):
    """scipy's outputs, with the adjoint's gradient to ``y0``, ``t`` and the parameters."""

    @staticmethod
    def forward(
        ctx: Any, run: _ScipyAdjointRun, t: torch.Tensor, n_parts: int, *tensors: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        outs = tensors[:n_parts]
        ctx.run, ctx.n_parts = run, n_parts
        flat = torch.cat([o.detach().reshape(o.shape[0], -1).double() for o in outs], dim=1)
        ctx.save_for_backward(t, flat)
        return tuple(o.detach().clone() for o in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        t, flat = ctx.saved_tensors
        run: _ScipyAdjointRun = ctx.run
        T = flat.shape[0]
        g_flat = torch.cat(
            [
                (
                    torch.zeros(T, n, dtype=torch.float64, device=flat.device)
                    if g is None
                    else g.reshape(T, -1).double()
                )
                for g, n in zip(grads, run.sizes)
            ],
            dim=1,
        )
        a, param_grads, t_grads = run.backward(t, flat, g_flat, ctx.needs_input_grad[1])
        y0_grads = [
            c.reshape(sh).to(dt)
            for c, sh, dt in zip(torch.split(a, run.sizes), run.shapes, run.dtypes)
        ]
        p_grads = [g.reshape(p.shape).to(p.dtype) for g, p in zip(param_grads, run.params)]
        tg = None if t_grads is None else t_grads.to(t.device, t.dtype)
        return (None, tg, None, *([None] * ctx.n_parts), *y0_grads, *p_grads)
