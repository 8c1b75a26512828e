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
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._inputs import CALLBACK_NAMES, check_state, check_times
from .gradients.adjoint import ADJOINT_OPTIONS
from .solution import SolverError
from .solve import DEFAULT_MAX_NUM_STEPS, solve
from .solvers import ButcherTableau, Solver, get_solver

__all__ = ["odeint", "odeint_adjoint", "ODE_OPTIONS", "SCIPY_OPTIONS"]

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
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Solve ``dy/dt = func(t, y)`` and return ``y`` at the times ``t`` (torchdiffeq's API).

    Args:
        func: ``func(t, y)`` with ``t`` a 0-dim tensor (in ``y``'s dtype) and ``y`` shaped like
            ``y0``; returns ``dy/dt`` of the same shape (a tuple for a tuple state).
        y0: initial state at ``t[0]``: a floating tensor of any shape, or a tuple of them.
        t: 1-D strictly increasing or strictly decreasing output times ``[T]``.
        rtol, atol: tolerances of adaptive methods (scalars or per-component tensors).
        method: a name in :data:`neuralode.METHODS` (``dopri5``, ``bosh3``, ``fehlberg2``,
            ``adaptive_heun``, ``euler``, ``rk4``, ...) or an alias (``heun2``), ``None``
            (``dopri5``), ``"scipy_solver"`` (forward only, no gradient: see
            :data:`SCIPY_OPTIONS`), or your own :class:`~neuralode.ButcherTableau` or
            :class:`~neuralode.solvers.Solver`.  Our ``rk4`` is the classic rule; torchdiffeq's
            ``rk4`` is Kutta's 3/8 rule, ours ``rk38``.
        options: keys of :data:`ODE_OPTIONS` (an unknown key warns and is ignored, as in
            torchdiffeq).

    Returns:
        ``[T, *y0.shape]`` (a tuple of such for a tuple ``y0``); ``out[0]`` is ``y0``.

    Raises:
        ValueError, TypeError: bad input, naming the argument.
        SolverError: the solve failed (too many steps, step size underflow, non-finite values).
    """
    method = "dopri5" if method is None else method
    _check_1d(t, "odeint")
    if isinstance(method, str) and method == "scipy_solver":
        return _scipy_solve(func, y0, t, rtol, atol, options)
    kwargs = _options(options, y0, "odeint", method)
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
    adjoint_params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """:func:`odeint` with gradients by the continuous adjoint method (torchdiffeq's API).

    The forward solve keeps no autograd graph, so memory does not grow with the number of
    steps; the backward pass solves the augmented system backwards in time (Chen et al. 2018,
    Algorithm 1).  ``func`` may be an ``nn.Module`` (its trainable parameters are found) or a
    plain callable with ``adjoint_params`` given.  ``adjoint_options`` takes ``norm``
    (``"seminorm"``, the default; ``"rms"``, torchdiffeq's default; or ``"max"``), ``unused``
    (``"zero"`` here, as torchdiffeq: a parameter ``func`` never uses gets a zero gradient, with
    a warning; ``"error"`` refuses it) and the keys of :data:`ODE_OPTIONS`; an unknown key warns
    and is ignored; the other ``adjoint_*`` arguments default to the forward ones.
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
    method = "dopri5" if method is None else method
    if isinstance(method, str) and method == "scipy_solver":
        raise ValueError(
            "method='scipy_solver' has no gradient (scipy's solve is not differentiable): use "
            "odeint with it, or a neuralode method with odeint_adjoint"
        )
    kwargs = _options(options, y0, "odeint_adjoint", method)
    _check_1d(t, "odeint_adjoint")
    adjoint_options = _adjoint_options(adjoint_options, adjoint_method or method)
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


def _warn_unknown(unknown: list[str], known: Sequence[str], where: str) -> None:
    warnings.warn(
        f"{where}: unexpected option(s) {unknown}, ignored (known options: {sorted(known)}; "
        f"step_size is for fixed-step methods; first_step, min_step and max_step for adaptive "
        f"ones)",
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
    unused = (
        ("first_step", "min_step", "max_step", "step_t", "jump_t")
        if not adaptive
        else ("step_size",)
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


def _adjoint_options(
    options: dict[str, Any] | None, method: str | ButcherTableau | Solver
) -> dict[str, Any]:
    """torchdiffeq's ``adjoint_options``: unknown keys (and a stepping option of the other kind
    of method) warn and are dropped; a parameter ``func`` never uses gets a zero gradient."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"adjoint_options must be a dict, got {type(options).__name__}")
    adaptive = get_solver(method).adaptive
    wrong_kind = ("first_step", "min_step", "max_step") if not adaptive else ("step_size",)
    unknown = sorted(k for k in options if k not in ADJOINT_OPTIONS or k in wrong_kind)
    if unknown:
        _warn_unknown(unknown, list(ADJOINT_OPTIONS), "odeint_adjoint: adjoint_options")
    return {"unused": "zero", **{k: v for k, v in options.items() if k not in unknown}}


def _largest_rms(y: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """torchdiffeq's default norm of a tuple state: the largest RMS over its tensors."""
    return torch.stack([part.pow(2).mean().sqrt() for part in y]).max()


def _state_norm(norm: Callable[[Any], torch.Tensor], y0: Any) -> Callable[..., torch.Tensor]:
    """``norm(y)`` over the state as the user gave it, as ``solve``'s ``norm(x, dims)``.

    The solver's unbatched state is the user's tensor, or a tuple's tensors flattened and
    concatenated; ``x`` is a scaled error in that layout, split back here."""
    if not isinstance(y0, tuple):
        return lambda x, dims: norm(x)
    shapes = [p.shape for p in y0]
    sizes = [math.prod(sh) for sh in shapes]

    def split(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return norm(tuple(c.view(sh) for c, sh in zip(x.split(sizes), shapes)))

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

    Forward only, as in torchdiffeq: the outputs carry no gradient.  The state is solved as one
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

    def unpack(y: torch.Tensor) -> Any:
        out = tuple(c.reshape(*y.shape[:-1], *sh) for c, sh in zip(y.split(sizes, -1), shapes))
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
