"""The public ``solve``: arguments -> problem, solver, controller and gradient strategy -> Solution.

Everything below it is a layer of its own (``solvers/``, ``controllers``, ``interpolation``,
``_outputs``, ``_loop``, ``gradients/``); this module only checks the arguments, composes those
parts and wraps the result.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ._compiled import CompileOptions, refusal, traceable, traced_fixed
from ._event_solve import check_events, differentiate, make_tracker, unbatched_events, with_events
from ._inputs import CALLBACK_NAMES, Problem, _fmt_time, check_solver_options, normalise
from ._loop import LoopSpec
from ._rows import row_dims
from .controllers import NORMS, Norm, PIController
from .events import Event
from .gradients import (
    GRADIENTS,
    Adjoint,
    AdjointConfig,
    Backprop,
    Checkpoint,
    GradientStrategy,
    Outcome,
    find_adjoint_params,
)
from .interpolation import make_evaluate, recorded_evaluator
from .solution import Solution, SolverError, Status
from .solvers.base import Solver
from .solvers.newton import JacobianField
from .solvers.registry import METHODS, get_solver
from .solvers.rk import ExplicitRK
from .solvers.tableaus import ButcherTableau

__all__ = ["solve", "DEFAULT_MAX_NUM_STEPS"]

DEFAULT_MAX_NUM_STEPS = 100_000


def solve(
    func: Callable[[torch.Tensor, Any], Any],
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    *,
    method: str | ButcherTableau | Solver = "dopri5",
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    batched: bool | None = None,
    step_size: float | None = None,
    first_step: float | None = None,
    max_num_steps: int = DEFAULT_MAX_NUM_STEPS,
    t_dtype: torch.dtype | None = None,
    norm: str | Norm = "rms",
    safety: float = 0.9,
    beta: float = 0.0,
    ifactor: float = 10.0,
    dfactor: float = 0.2,
    min_step: float = 0.0,
    max_step: float = math.inf,
    dense: bool = False,
    step_t: torch.Tensor | Sequence[float] | None = None,
    jump_t: torch.Tensor | Sequence[float] | None = None,
    jac: Callable[[torch.Tensor, Any], Any] | None = None,
    perturb: bool = False,
    events: Event | Sequence[Event] | None = None,
    throw: bool = True,
    gradient: str = "backprop",
    adjoint_params: Iterable[torch.Tensor] | None = None,
    adjoint_rtol: float | torch.Tensor | None = None,
    adjoint_atol: float | torch.Tensor | None = None,
    adjoint_method: str | ButcherTableau | Solver | None = None,
    adjoint_options: dict[str, Any] | None = None,
    compile: bool | dict[str, Any] | CompileOptions = False,
) -> Solution:
    """Solve ``dy/dt = func(t, y)`` from ``y(t[..., 0]) = y0`` and report the solution at ``t``.

    Args:
        func: vector field ``func(t, y) -> dy/dt`` with the shape (and tuple structure) of ``y``.
            Unbatched, ``t`` is a 0-dim tensor; batched, ``t`` is ``[batch]`` (each row's own time).
            ``t`` is passed in ``y``'s dtype.
        y0: initial state, a floating tensor or tuple of tensors; batched, the first dimension of
            every tensor is the batch.
        t: output times, strictly increasing or strictly decreasing: ``[T]`` shared by all rows,
            or ``[batch, T]`` per-sample grids (implies ``batched=True``).  ``t[..., 0]`` is the
            initial time.  Gradients flow to ``t`` (through ``f`` at the output times).
        method: a name in :data:`neuralode.METHODS` (``"dopri5"``, ``"tsit5"``, ``"rk4"``, ...),
            a :class:`~neuralode.ButcherTableau` (your own explicit method), or a
            :class:`~neuralode.solvers.Solver` (a configured one for a method's own options:
            ``AdamsBashforthMoulton(max_order=3, max_iters=2)`` for ``"implicit_adams"``).
        rtol, atol: relative and absolute tolerance (adaptive methods), scalars or per-component
            tensors broadcastable to the state (a tuple of them for a tuple state).
        batched: treat the first dimension of ``y0`` as a batch of independent problems, each with
            its own step size and status.  Default: ``t.ndim == 2``.
        step_size: fixed-step methods only: the step (time units); default is one step between
            consecutive output times.  The last step is shortened to land on the final time.
        first_step: adaptive methods: the initial step (default: Hairer's selection).
        max_num_steps: steps (accepted + rejected) allowed per sample.
        t_dtype: dtype of time inside the solver (default float64 for float16/32/64 states).
        norm: error norm over each sample's components: ``"rms"``, ``"max"`` or a callable
            ``norm(x, dims) -> tensor`` reducing ``x`` over ``dims``.
        safety, ifactor, dfactor: controller's safety factor and step growth/shrink limits.
        min_step, max_step: adaptive methods: bounds on the steps the controller proposes
            (time units; a step at ``min_step`` is accepted whatever its finite error, as in
            torchdiffeq).  The step that lands on the last output time may be shorter.
        beta: PI stabilisation coefficient (Hairer's ``beta``; 0 is integral control, as in
            scipy and torchdiffeq, and the default).
        dense: keep every step's interpolant so that ``Solution.evaluate`` works anywhere.
        step_t: adaptive methods: times (1-D, time units, shared by every sample) where steps
            end, as torchdiffeq's option; those outside a sample's interval are ignored.
        jump_t: as ``step_t``, for times where ``func`` jumps: the solver also restarts there
            (an FSAL method evaluates ``func`` at the jump again instead of reusing its last
            stage, whose value belongs to the other side).
        jac: the stiff methods' Jacobian, ``jac(t, y) -> df/dy``, called as ``func`` is (``t``
            ``[]`` or ``[batch]``, ``y`` in your layout): ``[N, N]`` unbatched or
            ``[batch, N, N]`` batched, ``N`` the components of a sample's state (a tuple state's
            parts flattened and concatenated in order), entry ``[i, j] = d f_i / d y_j``.  It
            may return a pair ``(df/dy, df/dt)`` (``df/dt`` shaped like the state); without it
            ``df/dt`` costs one forward-mode product.  Default: ``N`` vector-Jacobian products of
            ``func`` by autograd.  Methods that take no Jacobian refuse it; the adjoint's
            backward solve takes its own.
        perturb: fixed-step methods, unbatched solves: each step sees ``func`` from inside
            itself, a stage at the step's start time one ulp after it and one at its end one
            ulp before it (in the state's dtype), so a field that jumps at grid times is seen
            from the side of the step being taken (torchdiffeq's ``perturb`` option; adaptive
            methods take ``jump_t`` instead).  A step's first stage is then always evaluated
            afresh, not taken from the last step's end.
        events: an :class:`~neuralode.Event` or a list of them: functions of ``(t, y)`` whose
            sign changes are located per sample on each accepted step's dense output (a
            terminal event stops its sample, a reset makes its state jump, every occurrence
            is logged).  The :class:`Solution` then has ``event_t``, ``event_index``,
            ``event_y`` and ``event_log``; the event times and states carry their
            implicit-function-theorem gradients.  ``"backprop"`` (and any solve under
            ``torch.no_grad()``) integrates once; ``"adjoint"`` and ``"checkpoint"``
            integrate twice: once without a graph to locate the events, once with the
            strategy to them.  Not with ``perturb``, func's step callbacks or complex
            states; no resets with the multistep methods.
        throw: raise :class:`SolverError` when a sample fails; with ``False`` failures are only
            reported in ``Solution.status`` and the outputs they did not reach are NaN.
        gradient: what autograd sees of the solve; gradients reach ``y0``, ``t`` and the
            parameters with each:

            - ``"backprop"`` (default): autograd through every operation of every step, the
              exact gradient of the computed solution; memory grows with the steps.
            - ``"adjoint"``: the continuous adjoint of Chen et al. (2018): the backward pass
              solves the augmented system backwards in time; memory independent of the steps,
              the gradient of the exact flow to the backward solve's tolerance.
            - ``"checkpoint"``: the forward solve records each accepted step's start; the
              backward pass recomputes the steps one at a time; the same numbers as backprop
              (to round-off), memory of the accepted steps' start states.  Not for the
              multistep methods (``explicit_adams``, ``implicit_adams``): a step's replay from
              its start state alone misses its dependence on earlier steps (a ``ValueError``).
        adjoint_params: ``"adjoint"``/``"checkpoint"``: the tensors to differentiate, a sequence
            or any iterable such as ``net.parameters()`` (default: the parameters of an
            ``nn.Module`` func that require grad; required for a plain function).
        adjoint_rtol, adjoint_atol, adjoint_method: the backward solve's tolerances (numbers) and
            method (default: the forward ones).
        adjoint_options: the backward solve's options: ``norm`` (``"seminorm"``, the default:
            Kidger et al. 2021, parameter-gradient channels left out of the error norm;
            ``"rms"``: the largest RMS over the parts, every channel counted, torchdiffeq's
            default; ``"max"``), ``unused`` (``"error"``, the default: a ``ValueError`` naming
            an ``adjoint_params`` entry that ``func`` never depends on; ``"zero"``: its gradient
            is zero, with a warning, as in torchdiffeq), ``step_size``, ``first_step``,
            ``max_num_steps``, ``dtype``, ``safety``, ``beta``, ``ifactor``, ``dfactor``,
            ``min_step``, ``max_step`` (the forward solve's are not inherited).  After
            ``backward()``,
            ``Solution.backward_stats`` holds the backward solve's work counters.
        compile: run the solver's attempts in blocks compiled by ``torch.compile`` with
            ``fullgraph=True`` (``True``, or a dict of :class:`~neuralode.CompileOptions`
            fields: ``backend``, ``mode``, ``block``, ``max_outputs``, ``options``, ``loop``).
            Every decision is a mask and the host synchronises once per block (a solve that
            needs no gradient runs whole in one ``while_loop``), so the per-operation overhead that
            dominates small solves is fused away; the first solve of each shape pays the
            compilation (seconds to a minute on a CPU).  For the explicit Runge-Kutta methods
            and the Rosenbrock methods (``rosenbrock23``, ``rodas4``, ``rodas5p``; Jacobians by
            ``torch.func``, not with ``jac``) with ``gradient="backprop"`` (compiled forward and
            backward) or ``"adjoint"`` (compiled forward solve, and a compiled backward solve
            for the explicit methods; eager where torch.compile cannot trace it); not with
            events, ``dense``,
            ``step_t``/``jump_t``, ``perturb``, func's callbacks or ``"checkpoint"``.  A step
            passes at most ``max_outputs`` output times (8), so with denser outputs it takes
            more steps than the eager solve.  See docs/performance.md for when it pays.

    Returns:
        A :class:`Solution`: ``ys`` is ``[T, *y0.shape]`` unbatched and ``[batch, T, *features]``
        batched.

    Raises:
        ValueError, TypeError: bad input, naming the argument.
        SolverError: a sample failed (``throw=True``): too many steps, step size underflow,
            non-finite values.

    Examples:
        >>> import torch
        >>> from neuralode import solve
        >>> sol = solve(lambda t, y: -y, torch.ones(3), torch.linspace(0, 1, 5))
        >>> sol.ys.shape, int(sol.stats.nfe) > 0
        (torch.Size([5, 3]), True)
    """
    kw = {k: v for k, v in locals().items() if k not in ("func", "y0", "t", "events")}
    # Inside the caller's torch.compile, or a torch.func transform (vmap, grad, jacrev):
    # no host synchronisation may happen, so a fixed-step solve is traced whole.
    transformed = torch._C._are_functorch_transforms_active()
    if torch.compiler.is_compiling() or transformed:
        traced = _traced_solve(func, y0, t, events, kw)
        if traced is not None:
            return traced
        if transformed:
            raise ValueError(
                "under torch.func transforms (vmap, grad, jacrev, ...) solve runs the "
                "fixed-step explicit methods (euler, midpoint, rk4, ...) on the output grid "
                "(step_size=None, a tensor state, 1-D t, gradient='backprop', none of events, "
                "dense, step_t, jump_t, jac, perturb, t_dtype); the adaptive solve decides its "
                "steps from values, which a transform cannot do: solve a batch with "
                "batched=True instead of vmap"
            )
        return _eager_solve(func, y0, t, events=events, **kw)
    if events is not None:
        events = check_events(events)
        _refuse_for_events(func, y0, t, kw)
        if not (batched or (batched is None and isinstance(t, torch.Tensor) and t.ndim == 2)):
            return unbatched_events(solve, func, y0, t, events, kw)
    if _complex_state(y0):  # solved as pairs of reals
        return _solve_complex(func, y0, t, kw)
    solver = get_solver(method)
    check_solver_options(
        solver,
        step_size=step_size,
        first_step=first_step,
        max_num_steps=max_num_steps,
        safety=safety,
        beta=beta,
        ifactor=ifactor,
        dfactor=dfactor,
        min_step=min_step,
        max_step=max_step,
    )
    if isinstance(norm, str) and norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known norms are {sorted(NORMS)} or a callable")
    if not isinstance(norm, str) and not callable(norm):
        raise TypeError(f"norm must be a name in {sorted(NORMS)} or a callable, got {norm!r}")
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; known strategies are {list(GRADIENTS)}")
    adjoint_args = (adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options)
    if gradient != "adjoint" and any(x is not None for x in adjoint_args):
        raise ValueError("adjoint_rtol/atol/method/options apply to gradient='adjoint' only")
    if gradient == "checkpoint" and solver.multistep:
        raise ValueError(
            f"gradient='checkpoint' replays each step from its start state alone, but "
            f"{solver.name!r} is a multistep method whose steps also use f at earlier steps, so "
            f"the replay's gradient would be inexact; use gradient='backprop' (exact) or "
            f"'adjoint' (O(1) memory)"
        )
    if gradient == "backprop" and adjoint_params is not None:
        raise ValueError("adjoint_params applies to gradient='adjoint' or 'checkpoint' only")
    params = () if gradient == "backprop" else find_adjoint_params(func, adjoint_params, gradient)
    if jac is not None and not solver.uses_jacobian:
        raise ValueError(
            f"jac is used by the methods that take Jacobians "
            f"({', '.join(m for m in METHODS if get_solver(m).uses_jacobian)}); "
            f"{solver.name!r} takes no Jacobian"
        )
    if not isinstance(perturb, bool):
        raise TypeError(f"perturb must be True or False, got {perturb!r}")
    compile_opts = CompileOptions.build(compile)
    prob = normalise(
        func,
        y0,
        t,
        rtol=rtol,
        atol=atol,
        batched=batched,
        t_dtype=t_dtype,
        jac=jac,
        perturb=perturb,
    )
    if perturb and solver.adaptive:
        raise ValueError(
            f"perturb applies to fixed-step methods; {solver.name!r} is adaptive: pass jump_t "
            f"(the times where func jumps) instead"
        )
    if perturb and prob.batched:
        raise ValueError(
            "perturb is supported for unbatched solves (odeint's); a batched solve takes each "
            "row's grid times as they are"
        )
    if prob.jac is not None:
        prob = dataclasses.replace(prob, func=JacobianField(prob.func, prob.jac))
    cb = prob.callbacks
    if compile_opts is not None:
        why = refusal(
            solver,
            events=events is not None,
            dense=dense,
            step_t=step_t is not None,
            jump_t=jump_t is not None,
            perturb=perturb,
            callbacks=cb.any,
            jac=prob.jac is not None,
            **{'gradient="checkpoint"': gradient == "checkpoint"},
        )
        if why is not None:
            raise ValueError(why)
    if not solver.adaptive and (cb.accept is not None or cb.reject is not None):
        unused = {
            n
            for n, c in (("callback_accept_step", cb.accept), ("callback_reject_step", cb.reject))
            if c
        }
        warnings.warn(f"Solver '{solver.name}' does not support callbacks {unused}", stacklevel=2)
    strategy: GradientStrategy
    if gradient == "adjoint":
        config = AdjointConfig.build(
            method,
            prob.rtol,
            prob.atol,
            adjoint_method,
            adjoint_rtol,
            adjoint_atol,
            adjoint_options,
            step_size,
        )
        strategy = Adjoint(params, config, func)
    elif gradient == "checkpoint":
        strategy = Checkpoint(params)
    else:
        strategy = Backprop()
    controller = None
    if solver.error_order is not None:
        dims = row_dims(prob.y0.ndim, prob.batched)
        norm_fn = NORMS[norm] if isinstance(norm, str) else _check_norm(norm, prob, dims)
        controller = PIController(
            rtol=prob.rtol,
            atol=prob.atol,
            norm=norm_fn,
            dims=dims,
            error_order=solver.error_order,
            beta=beta,
            safety=safety,
            ifactor=ifactor,
            dfactor=dfactor,
            min_step=float(min_step),
            max_step=float(max_step),
        )
    # (Two calls, not a generator: a closure over solve's locals would make them cells, which
    # the locals() above cannot read inside torch.compile's trace.)
    step_s = _step_times("step_t", step_t, solver, prob)
    jump_s = _step_times("jump_t", jump_t, solver, prob)
    spec = LoopSpec(
        func=prob.func,
        solver=solver,
        controller=controller,
        batched=prob.batched,
        step_size=step_size,
        first_step=first_step,
        max_num_steps=max_num_steps,
        dense=dense,
        step_t=step_s,
        jump_t=jump_s,
        callbacks=prob.callbacks,
        perturb=perturb,
        compile=compile_opts,
    )
    if events is not None:
        if solver.multistep and any(e.reset is not None for e in events):
            raise ValueError(
                f"events with a reset restart the solver on the rows that jumped, but "
                f"{solver.name!r} is a multistep method whose rows share one history of steps; "
                f"use a one-step method (rk4, dopri5, ...)"
            )
        spec = dataclasses.replace(spec, events=make_tracker(prob, events))
        if gradient == "backprop" or not torch.is_grad_enabled():
            # One pass: the loop's graph, and the events' gradients at each cut.
            outcome = Backprop().solve(prob, spec)
            assert outcome.result.events is not None
            return with_events(_finish(prob, t, outcome, dense, throw), outcome.result.events, prob)
        with torch.no_grad():  # locate, then differentiate with the strategy to the events
            res = spec.run(prob.y0, prob.f0, prob.times.detach())
        assert res.events is not None
        outcome = Outcome(res.ys, res, None, True)
        located = with_events(_finish(prob, t, outcome, dense, throw), res.events, prob)
        if prob.times.shape[-1] < 2:
            return located
        return differentiate(solve, func, y0, t, events, kw, located, res.events.widths)
    return _finish(prob, t, strategy.solve(prob, spec), dense, throw)


def _traced_solve(
    func: Callable[[torch.Tensor, Any], Any],
    y0: Any,
    t: Any,
    events: Event | Sequence[Event] | None,
    kw: dict[str, Any],
) -> Solution | None:
    """A solve met while ``torch.compile`` traces its caller.  A fixed-step explicit method on
    the output grid is traced whole (no graph break: the caller's graph holds the rollout;
    failures are reported in ``status``, not raised, and the value checks of the eager entry
    are skipped).  Anything else returns ``None``: it runs as an eager solve (or, with
    ``compile=``, its own compiled blocks) behind one graph break."""
    solver = get_solver(kw["method"])
    features = {
        "events": events is not None,
        "gradient": kw["gradient"] != "backprop",
        "callbacks": any(getattr(func, n, None) is not None for n in CALLBACK_NAMES),
        **{k: kw[k] is not None for k in ("step_size", "step_t", "jump_t", "jac", "t_dtype")},
        **{k: bool(kw[k]) for k in ("dense", "perturb")},
    }
    batched = kw["batched"]
    if not traceable(solver, y0, t, batched, features):
        return None
    assert isinstance(y0, torch.Tensor) and isinstance(t, torch.Tensor)
    assert isinstance(solver, ExplicitRK)
    ys, status, stats = traced_fixed(func, solver, y0, t, bool(batched))
    t_end = t[-1].expand(status.shape) if status.ndim else t[-1]
    return Solution(ts=t, ys=ys, stats=stats, status=status, t_end=t_end)


def _refuse_for_events(func: Any, y0: Any, t: Any, kw: dict[str, Any]) -> None:
    """What events do not combine with, named."""
    if kw.get("perturb"):
        raise ValueError("events do not combine with perturb (use jump_t for a field that jumps)")
    if _complex_state(y0):
        raise ValueError("events do not support complex states; solve their real views")
    if any(getattr(func, name, None) is not None for name in CALLBACK_NAMES):
        raise ValueError(
            "events do not combine with func's step callbacks (callback_step, ...); the event "
            "log (Solution.event_log) records each occurrence"
        )


def _step_times(name: str, x: object, solver: Solver, prob: Problem) -> torch.Tensor | None:
    """``step_t``/``jump_t`` in internal time (mirrored per sample as the outputs are)."""
    if x is None:
        return None
    if not solver.adaptive:
        raise ValueError(
            f"{name} applies to adaptive methods (its steps end there); {solver.name!r} takes "
            f"fixed steps: put the times in t, or pass step_size"
        )
    try:
        x = torch.as_tensor(x, dtype=prob.times.dtype, device=prob.times.device).detach()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a 1-D sequence of times, got {x!r}") from err
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of times, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, got {x.tolist()}")
    if isinstance(prob.sign, float):
        return x * prob.sign
    return x.unsqueeze(0) * prob.sign.to(x.dtype).unsqueeze(1)


def _check_norm(norm: Norm, prob: Problem, dims: tuple[int, ...]) -> Norm:
    """A user's norm, called once on a state-shaped tensor: it must take ``(x, dims)`` and
    return one value per row, or the first step would fail with an unrelated message."""
    rows = prob.y0.shape[:1] if prob.batched else ()
    try:
        out = norm(torch.ones_like(prob.y0), dims)
    except Exception as err:
        raise TypeError(
            f"norm must be callable as norm(x, dims) -> one value per row; calling it on a "
            f"tensor of the state's shape {tuple(prob.y0.shape)} raised {err!r}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.shape != rows:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(
            f"norm(x, dims) must return one value per row (a tensor of shape {tuple(rows)}), "
            f"got {got}"
        )
    return norm


def _finish(prob: Problem, t: Any, out: Outcome, dense: bool, throw: bool) -> Solution:
    """Wrap a strategy's outcome as a :class:`Solution`."""
    res, sign = out.result, prob.sign
    evaluate = None
    if dense:
        assert res.dense is not None
        core = recorded_evaluator(
            res.dense, prob.y0.detach() if out.detach_dense else prob.y0, prob.batched
        )
        if out.detach_dense:
            # The adjoint and checkpoint forward passes keep no graph: dense output is a plain
            # (non-differentiable) value there, computed without autograd.
            core = torch.no_grad()(core)
        stopped = res.status != Status.SUCCESS
        ends = None
        if bool(stopped.any()):  # after a terminal event or a failure the solution is NaN
            ends = torch.where(stopped, res.t_end, math.inf)
        evaluate = make_evaluate(
            core, prob.times.detach(), sign, prob.batched, prob.unflatten, ends
        )
    t_end_user = res.t_end * sign
    sol = Solution(
        ts=t if isinstance(t, torch.Tensor) else prob.times.detach() * sign,
        ys=prob.unflatten(out.ys),
        stats=res.stats,
        status=res.status,
        t_end=t_end_user,
        _interpolator=evaluate,
        _backward=out.backward,
    )
    if throw and not (sol.success if res.ok is None else res.ok):
        raise SolverError(_failure_message(res.status, t_end_user), sol)
    return sol


def _failure_message(status: torch.Tensor, t_end: torch.Tensor) -> str:
    flat = status.reshape(-1)
    bad = ((flat != Status.SUCCESS) & (flat != Status.EVENT)).nonzero().reshape(-1)
    first = int(bad[0])
    code = Status(int(flat[first]))
    where = f"sample {first} " if status.ndim else ""
    count = f" ({bad.numel()} of {flat.numel()} samples failed)" if status.ndim else ""
    return f"{where}stopped at t={_fmt_time(t_end.reshape(-1)[first])}{count}: {code.message}"


def _complex_state(y0: Any) -> bool:
    parts = y0 if isinstance(y0, (tuple, list)) else (y0,)
    return any(isinstance(p, torch.Tensor) and p.is_complex() for p in parts)


class _RealView(torch.nn.Module):
    """A field of complex states as a field of their real views (``[..., 2]``: real and
    imaginary parts); an ``nn.Module`` field's parameters stay its parameters, and its step
    callbacks see complex states."""

    def __init__(self, func: Any, complex_parts: tuple[bool, ...], is_tuple: bool) -> None:
        super().__init__()
        self.inner = func if isinstance(func, torch.nn.Module) else None
        self.fn, self.complex_parts, self.is_tuple = func, complex_parts, is_tuple
        for name in CALLBACK_NAMES:
            cb = getattr(func, name, None)
            if cb is not None:
                setattr(self, name, self._callback(cb))

    def to_complex(self, y: Any) -> Any:
        parts = y if self.is_tuple else (y,)
        out = tuple(  # (a part of a flattened tuple state may start at an odd offset)
            torch.complex(p[..., 0], p[..., 1]) if c else p
            for p, c in zip(parts, self.complex_parts)
        )
        return out if self.is_tuple else out[0]

    def to_real(self, y: Any) -> Any:
        parts = y if self.is_tuple else (y,)
        out = tuple(torch.view_as_real(p) if c else p for p, c in zip(parts, self.complex_parts))
        return out if self.is_tuple else out[0]

    def _callback(self, cb: Callable[..., Any]) -> Callable[..., Any]:
        return lambda t0, y0, dt: cb(t0, self.to_complex(y0), dt)

    def forward(self, t: torch.Tensor, y: Any) -> Any:
        out = self.fn(t, self.to_complex(y))
        parts = out if self.is_tuple else (out,)
        for p, c in zip(parts, self.complex_parts):
            if isinstance(p, torch.Tensor) and p.is_complex() != c:
                raise ValueError(
                    "func must return a complex tensor for each complex part of the state and a "
                    f"real one for each real part, got dtype {p.dtype}"
                )
        return self.to_real(out)


def _solve_complex(func: Any, y0: Any, t: Any, kw: dict[str, Any]) -> Solution:
    """A solve of complex states, as torchdiffeq supports them: each complex tensor is solved as
    its real view (real and imaginary parts as a last dimension of 2), so tolerances and the
    error norm apply to the parts, and the outputs are complex again."""
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    if kw.get("jac") is not None:
        raise ValueError("jac is not supported with complex states (they are solved as real pairs)")
    is_tuple = isinstance(y0, (tuple, list))
    parts = tuple(y0) if is_tuple else (y0,)
    flags = tuple(p.is_complex() for p in parts)
    view = _RealView(func, flags, is_tuple)
    for name in ("rtol", "atol"):
        tol = kw[name]
        if isinstance(tol, torch.Tensor) and tol.ndim > 0:
            if is_tuple:
                raise ValueError(
                    f"a per-component {name} is not supported with complex tuple states"
                )
            kw[name] = tol.unsqueeze(-1).expand(*tol.shape, 2)
    if kw.get("gradient", "backprop") != "backprop":  # the parameters are func's, not the view's
        kw["adjoint_params"] = find_adjoint_params(func, kw.get("adjoint_params"), kw["gradient"])
    sol = solve(view, view.to_real(tuple(parts) if is_tuple else y0), t, **kw)
    interpolator = sol._interpolator
    if interpolator is not None:
        inner = interpolator

        def interpolator(tt: torch.Tensor) -> Any:
            return view.to_complex(inner(tt))

    return dataclasses.replace(sol, ys=view.to_complex(sol.ys), _interpolator=interpolator)


#: :func:`solve` outside the caller's graph (one graph break).
_eager_solve: Callable[..., Solution] = torch.compiler.disable(solve)  # type: ignore[no-untyped-call]
