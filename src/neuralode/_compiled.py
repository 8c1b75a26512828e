"""The compiled driver: the loop's attempts in blocks (or in one ``while_loop``) under
``torch.compile(fullgraph=True)``.

On small and medium problems a solve's time is per-operation overhead (dispatch, autograd
bookkeeping, one Python call per tensor operation), not arithmetic.  This driver runs the same
arithmetic as the tensor driver of :mod:`neuralode._loop` (the solver's ``step`` and ``dense``,
the controller's ``error_ratio`` and ``adapt``), but as a pure function of tensors over a block of
``k`` attempts that ``torch.compile`` traces whole (``fullgraph=True``: no graph breaks) and fuses:

* every decision is a mask (``torch.where``): a row that finished takes steps of zero and keeps
  its state, so a block never branches on a value;
* outputs are placed without a search: each attempt evaluates the step's interpolant at the next
  ``m`` output times of each row and keeps the ones inside the step; a step may not pass more
  than ``m`` outputs (it ends on the ``m``-th instead, as a landing step, which does not shrink
  the next one), so ``m`` is static.  Values are scattered into the outputs once, at the end;
* the host synchronises once per block (does any row run on, and how many steps remain, which
  chooses the next block's size), not once per attempt;
* tolerances enter as tensors, so a new tolerance does not recompile.

Fixed-step solves compile their rollout in blocks of steps of the grid (known before the first
step): no synchronisation at all.

A solve through which no gradient flows (under ``torch.no_grad``, or with nothing that needs
one; the adjoint's forward solve) runs whole in one compiled call instead: Hairer's first step
and then the attempts (or the grid's steps) in a ``torch.while_loop`` until no row runs, each
attempt's outputs written into the outputs as it goes.  No synchronisation at all, and one
attempt to compile rather than a block of them.  A loop's body runs without autograd and may
not change Python state, so solves that need a gradient, and the adjoint's backward solve
(whose field differentiates inside itself), take blocks; a field that fails to trace in a loop
takes blocks from then on.

What it covers: the explicit Runge-Kutta methods (every :class:`~neuralode.ButcherTableau`) and
the Rosenbrock methods (``rosenbrock23``, ``rodas4``, ``rodas5p``: each attempt takes the
Jacobian at its end with ``torch.func``, carried to the next step where the step is accepted),
batched and unbatched (one row), ``gradient="backprop"`` (autograd through the compiled blocks:
AOTAutograd compiles their backward too) and the adjoint's forward pass, and its backward solve
with an explicit method (the augmented field's ``torch.autograd.grad`` traced into the blocks).
The rest (events, dense output, step and jump times, callbacks, perturbation, a user's ``jac``,
the ESDIRK, switching and multistep solvers) needs the host-side commit of the eager loop (the
ESDIRK stages' Newton iterations stop per row on a value), and ``solve`` refuses it with
``compile=True``.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from ._rows import per_row
from .controllers import ControllerState, FixedGrid, PIController
from .solution import Stats, Status
from .solvers.base import Func, Solver, StepResult
from .solvers.newton import _AUTOGRAD_ONLY, Linearisation, _by_func, jacobian
from .solvers.rk import ExplicitRK
from .solvers.rosenbrock import Rosenbrock, Rosenbrock23, _LinearlyImplicit

__all__ = [
    "UNTRACEABLE",
    "CompileOptions",
    "drive",
    "field_key",
    "refusal",
    "reset",
    "traceable",
    "traced_fixed",
]


@dataclass(frozen=True)
class CompileOptions:
    """How a solve with ``compile=...`` compiles (``compile=True`` takes the defaults).

    Attributes:
        backend: ``torch.compile``'s backend (``"inductor"``; ``"aot_eager"`` traces and checks
            the graph without generating code, which is quick to build; or a callable backend).
        mode: ``torch.compile``'s mode (``None``, ``"reduce-overhead"`` for CUDA graphs on a
            GPU, ``"max-autotune"``).
        options: ``torch.compile``'s backend options (instead of ``mode``).  ``None`` with the
            inductor backend and no mode: ``{"cpp_wrapper": True}`` on a CPU (the generated
            code's kernels are called from C++ rather than Python: measured 1.6x faster on
            small fields, benchmarks/compiled.py), nothing elsewhere.
        block: attempts per compiled call (per host synchronisation).  ``None`` chooses per
            block: where the last solve of the same kind (method, layout, field, plan) took n
            attempts, the blocks end at n (a 3-step solve takes one block of 3, not 4 with one
            masked out), then 4 while at least 4 steps remain on some row, else 1 (up to four
            graphs to compile: blocks of 1-4);
            fixed-step solves take blocks of 8 steps (fewer if the grid has fewer).  A number
            compiles one graph of that size; more attempts per call mean fewer synchronisations
            (what pays on a GPU) but more attempts computed for rows already done.  In a
            ``loop``, a fixed-step solve takes ``block`` steps per iteration (by default 16 on
            a grid of 128 steps or more, else 8, fewer if the grid has fewer): an iteration's
            own cost is shared by its steps.
        max_outputs: output times one step may pass (each attempt evaluates its interpolant at
            that many); a step that would pass more ends on the last of them instead.
        loop: run a solve through which no gradient flows (under ``torch.no_grad``, a field
            without parameters that need one, the adjoint's forward solve) in one compiled
            call, its attempts (or its fixed grid's steps, ``block`` per iteration) in a
            ``torch.while_loop``: no host synchronisation at all, and one graph of one
            iteration to compile.  ``None`` (the default): where no ``block`` is given.
            Solves that need a gradient, and the adjoint's backward solve (its field
            differentiates inside itself), take blocks.

    Examples:
        >>> import torch, neuralode
        >>> opts = neuralode.CompileOptions(backend="aot_eager", block=4)
        >>> sol = neuralode.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]),
        ...                       compile=opts)
        >>> round(float(sol.ys[-1, 0]), 4)  # exp(-1)
        0.3679
    """

    backend: str = "inductor"
    mode: str | None = None
    block: int | None = None
    max_outputs: int = 8
    options: dict[str, Any] | None = None
    loop: bool | None = None

    @classmethod
    def build(cls, value: object) -> CompileOptions | None:
        """``compile=`` as given to ``solve``: ``False``/``None`` (eager), ``True`` (the
        defaults), a dict of the fields above, or a :class:`CompileOptions`."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, CompileOptions):
            opts = value
        elif isinstance(value, dict):
            known = {"backend", "mode", "block", "max_outputs", "options", "loop"}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(
                    f"unknown compile option(s) {unknown}; known options are {sorted(known)}"
                )
            opts = cls(**value)
        else:
            raise TypeError(
                f"compile must be True, False or a dict of options "
                f"(backend, mode, block, max_outputs, options, loop), got {value!r}"
            )
        for name in ("block", "max_outputs"):
            v = getattr(opts, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"compile option {name} must be a positive int, got {v!r}")
        if opts.max_outputs is None:
            raise ValueError("compile option max_outputs must be a positive int, got None")
        if opts.loop is not None and not isinstance(opts.loop, bool):
            raise TypeError(f"compile option loop must be True, False or None, got {opts.loop!r}")
        if opts.options is not None and not isinstance(opts.options, dict):
            raise TypeError(f"compile option options must be a dict, got {opts.options!r}")
        if opts.options is not None and opts.mode is not None:
            raise ValueError("compile options mode and options exclude each other (torch.compile)")
        return opts

    def compiler_options(self, device: torch.device) -> dict[str, Any] | None:
        """The ``options`` given to ``torch.compile`` for a solve on ``device``."""
        if self.options is not None:
            return dict(self.options)
        if self.backend == "inductor" and self.mode is None and device.type == "cpu":
            return {"cpp_wrapper": True}
        return None


def refusal(solver: Solver, **features: bool) -> str | None:
    """Why a solve cannot be compiled (``None`` when it can): ``features`` are the solve's
    options that need the eager loop's host-side commit, named as the user passes them."""
    if type(solver) not in (ExplicitRK, Rosenbrock, Rosenbrock23):
        return (
            f"compile=True runs the explicit Runge-Kutta methods (dopri5, tsit5, bosh3, dopri8, "
            f"rk4, ... or a ButcherTableau) and the Rosenbrock methods (rosenbrock23, rodas4, "
            f"rodas5p); {solver.name!r} is solved by the eager loop only"
        )
    used = [name for name, on in features.items() if on]
    if used:
        return (
            f"compile=True does not combine with {', '.join(used)}: they need the eager loop's "
            f"host-side commit; leave compile off for this solve"
        )
    return None


# -- the blocks ------------------------------------------------------------------------------------


class _Carry(NamedTuple):
    """The driver's state between attempts, every field per row (``[rows, ...]``)."""

    t: torch.Tensor
    h: torch.Tensor  # the next step to try
    y: torch.Tensor
    state: Any  # the next step's carried state: f(t, y) (explicit), its Linearisation (stiff)
    prev_ratio: torch.Tensor
    rejected: torch.Tensor
    running: torch.Tensor
    status: torch.Tensor
    nfe: torch.Tensor
    n_steps: torch.Tensor
    n_accepted: torch.Tensor
    njev: torch.Tensor
    nlu: torch.Tensor
    next_out: torch.Tensor  # index of the next output time to produce
    h_end: torch.Tensor  # the step proposed after landing on the end (a continuing solve's)


class _Plan(NamedTuple):
    """What the block's graph is specialised on (Python values)."""

    m: int  # outputs a step may pass
    interpolate: bool  # evaluate the interpolant (else every output is a step's end)
    dense_stage: bool  # compute the interpolant's extra stages in every step
    carry_k0: bool  # the next first stage is known after every step (FSAL, or f(t + h, y1))
    linear: bool  # a Rosenbrock method: the carried state is the next start's Linearisation
    resolution: float  # steps below this many times |t| make no progress
    max_steps: int


def _interpolate(
    y: torch.Tensor, h: torch.Tensor, ks: list[torch.Tensor], P: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """The step's interpolant at ``theta`` (``[rows, m]``): ``[rows, m, *features]``;
    the weights are formed in float64 as :func:`neuralode.interpolation.weights` does."""
    powers = torch.arange(1, P.shape[1] + 1, dtype=torch.float64, device=P.device)
    # (P.transpose, not P.T: an attribute of a tensor a loop's body closes over is lifted as
    # an input of its own each time it is read, and such inputs may not alias)
    w = (theta.unsqueeze(-1).to(torch.float64).pow(powers) @ P.transpose(0, 1)).to(y.dtype)
    B = y.shape[0]
    K = torch.stack([k.reshape(B, -1) for k in ks], dim=1)  # [B, n_k, N]
    dy = (w @ K).view((B, theta.shape[1]) + y.shape[1:])
    return y.unsqueeze(1) + per_row(h.to(y.dtype), dy.ndim) * dy


def _place(
    plan: _Plan,
    out: torch.Tensor,
    c: _Carry,
    accept: torch.Tensor,
    t_new: torch.Tensor,
    h: torch.Tensor,
    y1: torch.Tensor,
    ks: list[torch.Tensor] | None,
    P: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs an attempt produced: values ``[rows, m, *features]``, their indices
    ``[rows, m]`` (``T`` for none: a column dropped at the end) and each row's next output."""
    T = out.shape[1]
    idx = c.next_out.unsqueeze(1) + torch.arange(plan.m, device=out.device)
    ts = out.gather(1, idx.clamp(max=T - 1))
    valid = accept.unsqueeze(1) & (idx < T) & (ts <= t_new.unsqueeze(1))
    if plan.interpolate:
        assert ks is not None
        theta = (ts - c.t.unsqueeze(1)) / h.clamp(min=1e-300).unsqueeze(1)
        vals = _interpolate(c.y, h, ks, P, theta)
        at_end = per_row(ts == t_new.unsqueeze(1), vals.ndim)
        vals = torch.where(at_end, y1.unsqueeze(1), vals)  # a step's end is its own value
    else:
        vals = y1.unsqueeze(1)
    return vals, torch.where(valid, idx, T), c.next_out + valid.sum(1)


def _next(
    plan: _Plan,
    solver: Solver,
    f: Func,
    t: torch.Tensor,
    h: torch.Tensor,
    t_new: torch.Tensor,
    y: torch.Tensor,
    res: StepResult,
) -> tuple[list[torch.Tensor], Any, int]:
    """A step's vectors for its interpolant, the next step's carried state (used where the step
    is accepted) and the evaluations spent on it.  Explicit: the interpolant's extra stages are
    computed when the plan needs them (an ``f(t + h, y1)`` among them starts the next step).
    Rosenbrock: the Jacobian at the step's end ``t_new`` (one evaluation of ``f``, the
    Jacobian's forward pass), taken in every attempt, as a block cannot skip it on the rows
    that rejected (the eager loop reuses the start's on a retry)."""
    if plan.linear:
        lin = _by_func(f, t_new.to(y.dtype), res.y1, True)
        return list(res.dense_info), lin, 1
    if not plan.dense_stage:
        return list(res.dense_info), res.state, 0
    assert isinstance(solver, ExplicitRK)
    d, extra, next_state = solver.dense(f, t, h, y, res)
    return list(d.ks), res.state if next_state is None else next_state, extra


def _where_rows(mask: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``mask`` (per row), else ``old``: a tensor or a tuple of tensors."""
    if isinstance(new, torch.Tensor):
        return torch.where(per_row(mask, new.ndim), new, old)
    return type(new)(*(torch.where(per_row(mask, a.ndim), a, b) for a, b in zip(new, old)))


def _attempt_adaptive(
    c: _Carry,
    f: Func,
    solver: Solver,
    ctrl: PIController,
    plan: _Plan,
    out: torch.Tensor,
    t_floor: torch.Tensor,
    P: torch.Tensor,
) -> tuple[_Carry, torch.Tensor, torch.Tensor]:
    """One attempt on every row, as :meth:`neuralode._loop._Run._attempt` and its commit do,
    with every decision a mask."""
    T = out.shape[1]
    tgt = (c.next_out + (plan.m - 1)).clamp(max=T - 1)
    target = out.gather(1, tgt.unsqueeze(1)).squeeze(1)
    is_end = tgt == T - 1
    gap = target - c.t
    hit = c.h * 1.01 >= gap  # land on the target rather than leave a sliver of a step
    h = torch.where(c.running, torch.where(hit, gap, c.h), 0.0)
    res = solver.step(f, c.t, h, c.y, c.state if plan.carry_k0 else None)
    assert res.y_error is not None
    ratio = ctrl.error_ratio(c.y, res.y1, res.y_error, solver.error_norm)
    accept, h_prop, cstate = ctrl.adapt(ratio, h, ControllerState(c.prev_ratio, c.rejected))
    accept = accept & c.running
    t_new = torch.where(accept, torch.where(hit, target, c.t + h), c.t)
    landed = accept & hit
    done = landed & is_end
    # A step shortened to land on an output does not shrink the next one.
    h_prop = torch.where(landed & ~is_end, torch.maximum(h_prop, c.h), h_prop)
    n_steps = c.n_steps + c.running
    still = c.running & ~done
    # No progress: a step (or the next one) below the resolution of t, or out of steps.
    res_t = torch.maximum(c.t.abs(), t_floor) * plan.resolution
    under = still & ((h <= res_t) | ~(h_prop > res_t))
    finite = torch.isfinite(res.y1).reshape(res.y1.shape[0], -1).all(1)
    bad = torch.where(finite, int(Status.STEP_SIZE_UNDERFLOW), int(Status.NONFINITE))
    status = torch.where(under, bad, c.status)
    maxed = still & ~under & (n_steps >= plan.max_steps)
    status = torch.where(maxed, int(Status.MAX_STEPS_REACHED), status)
    still = still & ~(under | maxed)
    ks, first, extra = _next(plan, solver, f, c.t, h, t_new, c.y, res)
    nfe = c.nfe + c.running * (res.nfe + extra)
    acc = per_row(accept, c.y.ndim)
    if plan.linear:  # a rejected row retries with the linearisation it had
        state = _where_rows(accept, first, c.state)
    elif plan.carry_k0:
        state = torch.where(acc, first, res.retry_state)
    else:
        state = c.state
    vals, idx, next_out = _place(plan, out, c, accept, t_new, h, res.y1, ks, P)
    carry = _Carry(
        t=t_new,
        h=torch.where(c.running, h_prop, c.h),
        y=torch.where(acc, res.y1, c.y),
        state=state,
        prev_ratio=cstate.prev_ratio,
        rejected=cstate.rejected_last,
        running=still,
        status=status,
        nfe=nfe,
        n_steps=n_steps,
        n_accepted=c.n_accepted + accept,
        njev=c.njev + c.running * (res.njev + int(plan.linear)),
        nlu=c.nlu + c.running * res.nlu,
        next_out=next_out,
        h_end=torch.where(done, torch.maximum(h_prop, c.h), c.h_end),
    )
    return carry, vals, idx


def _adaptive_block(
    c: _Carry,
    f: Func,
    solver: Solver,
    ctrl: PIController,
    plan: _Plan,
    out: torch.Tensor,
    t_floor: torch.Tensor,
    P: torch.Tensor,
    k: int,
) -> tuple[_Carry, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` attempts (unrolled when traced); their outputs stacked ``[k, rows, m, ...]``, and
    what the host reads after the block: does a row run on, the most steps a row has left at
    its current step size, and the most attempts a row has made."""
    vals, idx = [], []
    for _ in range(k):
        c, v, i = _attempt_adaptive(c, f, solver, ctrl, plan, out, t_floor, P)
        vals.append(v)
        idx.append(i)
    steps_left = torch.where(c.running, (out[:, -1] - c.t) / c.h.clamp(min=1e-300), 0.0)
    dt = steps_left.dtype
    flags = torch.stack((c.running.any().to(dt), steps_left.amax(), c.n_steps.amax().to(dt)))
    return c, torch.stack(vals), torch.stack(idx), flags


def _start(
    t: torch.Tensor, y: torch.Tensor, state: Any, h: torch.Tensor | None, nfe: int, linear: bool
) -> _Carry:
    """The driver's state before its first attempt: the clock ``t`` (``[rows]``), the state, the
    first step's carried state and ``h`` (``None``: zero, Hairer's step to come); ``nfe``
    evaluations already spent.  Every tensor its own (a compiled block is specialised on which
    of its inputs alias)."""
    zeros = torch.zeros_like(t, dtype=torch.long)
    return _Carry(
        t=t,
        h=torch.zeros_like(t) if h is None else h,
        y=y,
        state=state,
        prev_ratio=torch.ones_like(t),
        rejected=torch.zeros_like(t, dtype=torch.bool),
        running=torch.ones_like(t, dtype=torch.bool),
        status=zeros.clone(),
        nfe=zeros + nfe,
        n_steps=zeros.clone(),
        n_accepted=zeros.clone(),
        njev=zeros + int(linear),
        nlu=zeros.clone(),
        next_out=zeros + 1,
        h_end=torch.zeros_like(t),
    )


def outcome_flags(ys: torch.Tensor, status: torch.Tensor) -> torch.Tensor:
    """What a solve's end reads on the host in one synchronisation (``[2]``): whether every
    output is finite (a sum: one that overflowed is checked again by its elements) and whether
    every row succeeded (``SUCCESS``, or ``EVENT`` for a terminal event)."""
    done = (status == int(Status.SUCCESS)) | (status == int(Status.EVENT))
    return torch.stack((torch.isfinite(ys.detach().sum()), done.all()))


def _results(
    c: _Carry, y0: torch.Tensor, ys: torch.Tensor, batched: bool
) -> tuple[torch.Tensor, ...]:
    """A loop's results in the solve's own layout (one row taken out where it is unbatched):
    ``(ys, status, t_end, nfe, n_steps, n_accepted, n_rejected, njev, nlu, n_events, h_end,
    flags)``; ``flags``: whether every output is finite (a sum: an overflow is checked again
    by its elements) and every row succeeded, read on the host together."""
    T = ys.shape[1] - 1
    ys = torch.cat([y0.unsqueeze(1), ys[:, 1:T]], dim=1)
    flags = outcome_flags(ys, c.status)
    out = (ys, c.status, c.t, c.nfe, c.n_steps, c.n_accepted, c.n_steps - c.n_accepted, c.njev,
           c.nlu, torch.zeros_like(c.nfe), c.h_end)  # fmt: skip
    return (*(out if batched else (x[0] for x in out)), flags)


def _adaptive_loop(
    out: torch.Tensor,
    y0: torch.Tensor,
    state: Any,
    h: torch.Tensor | None,
    nfe: int,
    f: Func,
    solver: Solver,
    ctrl: PIController,
    plan: _Plan,
    t_floor: torch.Tensor,
    P: torch.Tensor,
    batched: bool,
) -> tuple[torch.Tensor, ...]:
    """The whole solve in one call, from ``y0`` (``[rows, ...]``) at ``out[:, 0]``: Hairer's
    first step (``h`` None) and then attempts in a ``while_loop`` until no row runs, each
    attempt's outputs written into a buffer of ``[rows, T + 1, *features]`` (column ``T`` takes
    the values an attempt does not produce); the driver's state is built and the results
    (:func:`_results`) taken inside the graph too.  No gradient flows through a
    ``while_loop``: for solves that need none."""
    c = _start(out[:, 0].clone(), y0, state, h, nfe, plan.linear)
    if h is None:
        f0 = c.state.f0 if plan.linear else c.state
        c = c._replace(h=ctrl.initial_step(f, c.t, c.y, f0), nfe=c.nfe + 1)
    ys = y0.new_full((y0.shape[0], out.shape[1] + 1) + y0.shape[1:], math.nan)
    leaves, spec = torch.utils._pytree.tree_flatten((c, ys))
    packing = _Packed(leaves)
    rows = torch.arange(ys.shape[0], device=ys.device).unsqueeze(1).expand(-1, plan.m)

    def cond(*carried: torch.Tensor) -> torch.Tensor:
        now: _Carry = torch.utils._pytree.tree_unflatten(packing.unpack(carried), spec)[0]
        return now.running.any()

    def body(*carried: torch.Tensor) -> tuple[torch.Tensor, ...]:
        now, buf = torch.utils._pytree.tree_unflatten(packing.unpack(carried), spec)
        now, vals, idx = _attempt_adaptive(now, f, solver, ctrl, plan, out, t_floor, P)
        buf = buf.index_put((rows, idx), vals)
        return _as_carried(packing.pack(torch.utils._pytree.tree_leaves((now, buf))), carried)

    final = torch._higher_order_ops.while_loop(  # type: ignore[no-untyped-call]
        cond, body, tuple(packing.pack(leaves))
    )
    c, ys = torch.utils._pytree.tree_unflatten(packing.unpack(final), spec)
    return _results(c, y0, ys, batched)


def _initial_step(
    ctrl: PIController, f: Func, t: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor
) -> torch.Tensor:
    """Hairer's first step (one evaluation), compiled as the blocks are: eager, its dozen small
    operations cost as much as a short solve's compiled steps."""
    return ctrl.initial_step(f, t, y0, f0)


def _fixed_block(
    c: _Carry,
    f: Func,
    solver: Solver,
    plan: _Plan,
    out: torch.Tensor,
    starts: torch.Tensor,
    steps: torch.Tensor,
    ends: torch.Tensor,
    P: torch.Tensor,
    k: int,
) -> tuple[_Carry, torch.Tensor, torch.Tensor]:
    """``k`` steps of the fixed grid (``starts``/``steps``/``ends``: ``[k, rows]``; a step of
    zero pads a row that has ended)."""
    vals, idx = [], []
    for i in range(k):
        c, v, j = _fixed_step(c, f, solver, plan, out, starts[i], steps[i], ends[i], P)
        vals.append(v)
        idx.append(j)
    return c, torch.stack(vals), torch.stack(idx)


def _fixed_step(
    c: _Carry,
    f: Func,
    solver: Solver,
    plan: _Plan,
    out: torch.Tensor,
    t: torch.Tensor,
    h: torch.Tensor,
    t_new: torch.Tensor,
    P: torch.Tensor,
) -> tuple[_Carry, torch.Tensor, torch.Tensor]:
    """One step of the fixed grid, from ``t`` to ``t_new`` (``h = 0``: a row that has ended)."""
    moves = h > 0
    res = solver.step(f, t, h, c.y, c.state if plan.carry_k0 else None)
    ks, first, extra = _next(plan, solver, f, t, h, t_new, c.y, res)
    nfe = c.nfe + moves * (res.nfe + extra)
    v, j, next_out = _place(plan, out, c._replace(t=t), moves, t_new, h, res.y1, ks, P)
    c = c._replace(
        t=torch.where(moves, t_new, c.t),
        y=res.y1,  # a zero step leaves y as it is
        state=first if plan.carry_k0 else c.state,
        nfe=nfe,
        n_steps=c.n_steps + moves,
        n_accepted=c.n_accepted + moves,
        njev=c.njev + moves * (res.njev + int(plan.linear)),
        nlu=c.nlu + moves * res.nlu,
        next_out=next_out,
    )
    return c, v, j


def _as_carried(
    new: list[torch.Tensor], carried: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    """A loop body's results as a ``while_loop`` takes them: none of them one of its inputs
    itself, each with its input's strides (even along dimensions of size one)."""
    out = []
    for x, a in zip(new, carried):
        if any(x is b for b in carried) or x.stride() != a.stride():
            x = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(x)
        out.append(x)
    return tuple(out)


class _Packed:
    """A loop's carried tensors packed into few: every per-row vector (``[rows]``: the clock,
    the step, the controller's memory, the flags and counters) as a column of one floating
    (the widest of their dtypes) or one ``long`` matrix, the other tensors as they are.  Each
    tensor a ``while_loop`` carries costs its iteration a handle passed on (measured on rk4's
    trivial field: about 4.6 us per iteration with 19 carried tensors); the columns go back to
    their own dtypes exactly (a float32 or bool value survives a float64 or long column)."""

    def __init__(self, leaves: list[torch.Tensor]) -> None:
        rows = leaves[0].shape[0]

        def column(x: torch.Tensor) -> str | None:
            if x.ndim != 1 or x.shape[0] != rows or x.is_complex():
                return None
            return "f" if x.is_floating_point() else "i"

        self.kinds = [column(x) for x in leaves]
        self.dtypes = [x.dtype for x in leaves]
        floats = [d for d, k in zip(self.dtypes, self.kinds) if k == "f"]
        self.ftype = floats[0] if floats else torch.float64
        for d in floats[1:]:
            self.ftype = torch.promote_types(self.ftype, d)

    def pack(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        fs = [x.to(self.ftype) for x, k in zip(leaves, self.kinds) if k == "f"]
        ints = [x.to(torch.long) for x, k in zip(leaves, self.kinds) if k == "i"]
        rest = [x for x, k in zip(leaves, self.kinds) if k is None]
        return [torch.stack(fs, 1), torch.stack(ints, 1), *rest]

    def unpack(self, packed: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        fs, ints, *rest = packed
        out, n = [], {"f": 0, "i": 0}
        others = iter(rest)
        for k, d in zip(self.kinds, self.dtypes):
            if k is None:
                out.append(next(others))
                continue
            out.append((fs if k == "f" else ints)[:, n[k]].to(d))
            n[k] += 1
        return out


def _fixed_loop(
    out: torch.Tensor,
    y0: torch.Tensor,
    state: Any,
    nfe: int,
    f: Func,
    solver: Solver,
    plan: _Plan,
    times: torch.Tensor,
    steps: torch.Tensor,
    P: torch.Tensor,
    k: int,
    batched: bool,
) -> tuple[torch.Tensor, ...]:
    """Every step of the fixed grid (``times``/``steps``: ``[n + 1, rows]``/``[n, rows]``,
    ``n`` a multiple of ``k``: zero steps pad it) in one ``while_loop`` of ``k`` steps per
    iteration, from ``y0`` at ``out[:, 0]``, as :func:`_adaptive_loop` does.  An iteration's
    own cost (its carried tensors handed from one iteration to the next: about 4 us on a CPU)
    is shared by its ``k`` steps."""
    c = _start(out[:, 0].clone(), y0, state, None, nfe, plan.linear)
    ys = y0.new_full((y0.shape[0], out.shape[1] + 1) + y0.shape[1:], math.nan)
    n = torch.tensor(steps.shape[0] // k, device=steps.device)
    i0 = torch.zeros((), dtype=torch.long, device=steps.device)
    leaves, spec = torch.utils._pytree.tree_flatten((c, ys, i0))
    packing = _Packed(leaves)
    rows = torch.arange(ys.shape[0], device=ys.device).unsqueeze(1).expand(-1, plan.m)

    def cond(*carried: torch.Tensor) -> torch.Tensor:
        return carried[-1] < n

    def body(*carried: torch.Tensor) -> tuple[torch.Tensor, ...]:
        now, buf, i = torch.utils._pytree.tree_unflatten(packing.unpack(carried), spec)
        for s in range(k):
            at = (i * k + s).reshape(1)
            t, h = times.index_select(0, at)[0], steps.index_select(0, at)[0]
            t_new = times.index_select(0, at + 1)[0]
            now, v, j = _fixed_step(now, f, solver, plan, out, t, h, t_new, P)
            buf = buf.index_put((rows, j), v)
        new = packing.pack(torch.utils._pytree.tree_leaves((now, buf, i + 1)))
        return _as_carried(new, carried)

    final = torch._higher_order_ops.while_loop(  # type: ignore[no-untyped-call]
        cond, body, tuple(packing.pack(leaves))
    )
    c, ys, _ = torch.utils._pytree.tree_unflatten(packing.unpack(final), spec)
    return _results(c, y0, ys, batched)


# Compiled blocks, one per kind of solve.  torch.compile keeps its graphs, and its limit on
# recompilations, per code object, so each kind gets a code object of its own: the block sizes,
# methods, layouts and fields of one process do not evict each other's graphs.  A kind that
# still reaches the limit (a field whose guards fail on every call) starts a fresh code object.
_CACHE: dict[tuple[Any, ...], Callable[..., Any]] = {}


def field_key(f: Any) -> Any:
    """What a field's graphs can be shared by: its class (a module's parameters are graph
    inputs), or its code (a function)."""
    inner = f.f if isinstance(f, _OneRow) else f
    if hasattr(inner, "wraps"):  # a field built on the user's (the adjoint's augmented field)
        return (type(inner), field_key(inner.wraps))
    if isinstance(inner, torch.nn.Module):
        return type(inner)
    return getattr(inner, "__code__", type(inner))


def _call(
    base: Callable[..., Any],
    key: tuple[Any, ...],
    opts: CompileOptions,
    device: torch.device,
    *args: Any,
) -> Any:
    """``base(*args)`` compiled (fullgraph) for the kind ``key``.

    A kind whose graphs keep failing their guards (a field that changes a Python value on every
    call, such as a counter attribute) reaches torch.compile's limit on recompilations; it gets
    one fresh code object, and if that reaches the limit too, the kind runs uncompiled from then
    on, with a warning, rather than compiling on every call."""
    options = opts.compiler_options(device)
    full = (base.__name__, opts.backend, opts.mode, repr(options), *key)
    for fresh in (False, True):
        fn = None if fresh else _CACHE.get(full)
        if fn is None:
            name = f"{base.__name__}_{len(_CACHE)}"
            code = base.__code__.replace(co_name=name)
            new = types.FunctionType(code, base.__globals__, name, base.__defaults__)
            fn = _CACHE[full] = torch.compile(
                new, fullgraph=True, backend=opts.backend, mode=opts.mode, options=options
            )
        try:
            return fn(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            continue
    warnings.warn(
        "compile: the solve's graphs were compiled again on every call until torch.compile's "
        "recompilation limit (the field's guards keep failing: does it change a Python value, "
        "such as a call counter, on every call?  Solution.stats counts evaluations); this kind "
        "of solve runs uncompiled from now on",
        RuntimeWarning,
        stacklevel=4,
    )
    _CACHE[full] = base
    return base(*args)


#: Kinds of field (:func:`field_key`) whose solves torch.compile could not trace: the
#: adjoint's backward solves of these run eager without trying again (a failed trace costs
#: about as much as a compilation).
UNTRACEABLE: set[Any] = set()

#: Kinds of solve (their cache keys) that failed to trace in one ``while_loop``: they take
#: blocks from then on.
NO_LOOP: set[tuple[Any, ...]] = set()


def reset() -> None:
    """Forget every compiled block (and torch.compile's own caches)."""
    _CACHE.clear()
    _ATTEMPTS.clear()
    UNTRACEABLE.clear()
    NO_LOOP.clear()
    torch._dynamo.reset()


# -- the driver -------------------------------------------------------------------------------


class _OneRow:
    """An unbatched field as a field of one row: ``f(t[0], y[0])`` with the row put back."""

    def __init__(self, f: Func) -> None:
        self.f = f

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f(t[0], y[0]).unsqueeze(0)


def drive(
    func: Func,
    solver: Solver,
    controller: PIController | None,
    batched: bool,
    y0: torch.Tensor,
    f0: torch.Tensor | None,
    out_times: torch.Tensor,
    *,
    step_size: float | None,
    grid_steps: int | None,
    first_step: torch.Tensor | float | None,
    t_floor: torch.Tensor,
    resolution: float,
    max_num_steps: int,
    carry_step: bool,
    opts: CompileOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Stats, Any, torch.Tensor | None]:
    """Run a solve (``T >= 2`` outputs) in compiled blocks or one loop; returns what the eager
    drivers return, ``(ys, status, t_end, stats, h_next)`` in the solve's own layout, and the
    loop's ``flags`` (every output finite, every row succeeded: ``[2]``, computed in its graph;
    ``None`` after blocks).  ``grid_steps``: a fixed-step solve's number of steps, as the loop's
    grid has it."""
    linear = isinstance(solver, _LinearlyImplicit)
    assert isinstance(solver, ExplicitRK) or linear
    if batched:
        f, Y0, out = func, y0, out_times
        F0 = f0
        floor = t_floor
    else:  # one row
        f, Y0, out = _OneRow(func), y0.unsqueeze(0), out_times.unsqueeze(0)
        F0 = None if f0 is None else f0.unsqueeze(0)
        floor = t_floor.reshape(1)
    B, T = out.shape
    # The carry's tensors are fresh and contiguous, as a block returns them (a graph is
    # specialised on its inputs' strides, even along dimensions of size one).
    Y0, out = _fresh(Y0), _fresh(out)
    t = _fresh(out[:, 0])
    lin0 = None
    if linear:
        # The first step's linearisation, eagerly: it finds out whether torch.func can
        # transform the field, which the compiled blocks' Jacobians need.
        lin0 = jacobian(f, t.to(Y0.dtype), Y0)
        if f in _AUTOGRAD_ONLY:
            raise ValueError(
                "compile=True with a Rosenbrock method takes the Jacobian with torch.func "
                "(vjp and vmap), which cannot transform this vector field; leave compile off "
                "(the eager solve falls back to torch.autograd)"
            )
        lin0 = Linearisation(*(_fresh(x) for x in lin0))
    F0 = (lin0.f0 if lin0 is not None else f(t.to(Y0.dtype), Y0)) if F0 is None else _fresh(F0)
    if F0.requires_grad and not Y0.requires_grad:
        # The blocks' states will require grad (from the field's parameters): so does the
        # first block's, or its graph would be built twice (a graph is specialised on which of
        # its inputs require grad).  Y0 is the driver's own copy: nothing outside reads its
        # gradient.
        Y0.requires_grad_(True)
    # The solver's constants, built before tracing (their caches are not filled inside a graph).
    if isinstance(solver, ExplicitRK):
        P = solver._coefficients(y0.device)
        solver._nodes(t.dtype, t.device)
        carry_k0 = solver.fsal or any(solver.extra_is_f1)
        extras, extra_is_f1, fsal = bool(solver.extra_c), any(solver.extra_is_f1), solver.fsal
    else:
        assert isinstance(solver, _LinearlyImplicit)
        P = torch.tensor(solver._P, dtype=torch.float64, device=y0.device)
        carry_k0, extras, extra_is_f1, fsal = True, False, False, True
    key = (
        solver.name,
        getattr(solver, "n_stages", 0),
        batched,
        Y0.ndim,
        Y0.dtype,
        Y0.device,
        field_key(f),
    )
    ctrl = None
    if controller is not None:
        # Tolerances as tensors: a new tolerance is a new input, not a new graph.
        dims = controller.dims if batched else tuple(d + 1 for d in controller.dims)
        ctrl = replace(
            controller,
            rtol=torch.as_tensor(controller.rtol, dtype=y0.dtype, device=y0.device),
            atol=torch.as_tensor(controller.atol, dtype=y0.dtype, device=y0.device),
            dims=dims,
        )
    grid = None
    if ctrl is None:
        grid = FixedGrid(out, step_size, grid_steps)
        # (on the output grid each step ends at one output)
        m, inside = _outputs_per_step(grid, out) if step_size is not None else (1, False)
    elif T == 2 or solver.lands_on_outputs or (extras and not extra_is_f1):
        # Every output is a step's end (dopri8's interpolant costs 3 f; the Rodas methods'
        # interpolants are not accurate enough in the stiff regime).
        m, inside = 1, False
    else:
        m = min(T - 1, opts.max_outputs)
        inside = m > 1
    plan = _Plan(
        m=m,
        interpolate=inside,
        dense_stage=(inside and extras) or (not fsal and carry_k0),
        carry_k0=carry_k0,
        linear=linear,
        resolution=resolution,
        max_steps=max_num_steps,
    )
    # f0 (given, or evaluated above) and the first linearisation's forward pass
    nfe0 = 1 + int(linear and f0 is not None)
    state0 = lin0 if lin0 is not None else F0
    vals: list[torch.Tensor] = []
    idx: list[torch.Tensor] = []
    h_next: torch.Tensor | float | None = None
    h_given = None  # first_step, per row
    if ctrl is not None and first_step is not None:
        h_given = _fresh(torch.as_tensor(first_step, dtype=t.dtype, device=t.device).expand(B))
    whole = opts.loop if opts.loop is not None else opts.block is None
    if whole and _loops(f, key, Y0, F0, out, state0):
        # The whole solve in one call: the driver's state built, and the results taken, in it.
        base: Callable[..., Any]
        kind: tuple[Any, ...]
        args: tuple[Any, ...]
        if ctrl is not None:
            base, kind = _adaptive_loop, (*key, plan, h_given is None)
            args = (out, Y0, state0, h_given, nfe0, f, solver, ctrl, plan, floor, P, batched)
        else:
            assert grid is not None
            k = opts.block or _loop_block(grid.n)
            times, steps = _padded(grid, k)
            # (the grid's times may be a view of the outputs': a loop's inputs may not alias)
            base, kind = _fixed_loop, (*key, plan, k)
            args = (out, Y0, state0, nfe0, f, solver, plan, _fresh(times), _fresh(steps), P, k,
                    batched)  # fmt: skip
        try:
            *res, h_end, flags = _call(base, kind, opts, y0.device, *args)
        except torch._dynamo.exc.TorchDynamoException:
            NO_LOOP.add(key)  # (a field torch.compile cannot trace in a loop: blocks instead)
        else:
            if carry_step and ctrl is not None:
                h_next = h_end if batched else float(h_end)
            return res[0], res[1], res[2], Stats(*res[3:]), h_next, flags
    c = _start(t, Y0, state0, None, nfe0, linear)
    if ctrl is not None:
        if h_given is not None:
            h0 = h_given
        else:
            h0 = _call(_initial_step, key, opts, y0.device, ctrl, f, t, Y0, F0)
            c = c._replace(nfe=c.nfe + 1)
        c = c._replace(h=h0)
        left, done, kind = math.inf, 0, (*key, plan)
        while True:
            k = opts.block or _block_size(left, _ATTEMPTS.get(kind), done)
            adaptive_args = (c, f, solver, ctrl, plan, out, floor, P, k)
            c, v, i, flags = _call(_adaptive_block, (*kind, k), opts, y0.device, *adaptive_args)
            vals.append(v)
            idx.append(i)
            done += k
            # The block's one synchronisation: does a row run on, how many steps remain, and
            # how many attempts the busiest row has made.
            go_on, left, made = flags.tolist()
            if not go_on:
                break
        _remember(kind, int(made))
    else:
        assert grid is not None
        k = opts.block or min(8, grid.n)
        times, steps = _padded(grid, k)
        for s in range(0, steps.shape[0], k):
            fixed_args = (c, f, solver, plan, out, times[s : s + k], steps[s : s + k],
                          times[s + 1 : s + k + 1], P, k)  # fmt: skip
            c, v, i = _call(_fixed_block, (*key, k, plan), opts, y0.device, *fixed_args)
            vals.append(v)
            idx.append(i)
    ys = _assemble(Y0, T, torch.cat(vals), torch.cat(idx))
    if carry_step and ctrl is not None:
        h_next = c.h_end if batched else float(c.h_end[0])
    zeros = torch.zeros_like(c.nfe)
    counts = (c.nfe, c.n_steps, c.n_accepted, c.n_steps - c.n_accepted, c.njev, c.nlu, zeros)
    if batched:
        return ys, c.status, c.t, Stats(*counts), h_next, None
    return ys[0], c.status[0], c.t[0], Stats(*(x[0] for x in counts)), h_next, None


#: The attempts (of its busiest row) that the last solve of each kind took in blocks: the next
#: solve of that kind sizes its blocks to end where it ended.
_ATTEMPTS: dict[tuple[Any, ...], int] = {}


def _remember(kind: tuple[Any, ...], attempts: int) -> None:
    if len(_ATTEMPTS) >= 1024 and kind not in _ATTEMPTS:
        _ATTEMPTS.clear()  # (kinds come and go with fields and shapes; a hint, not a record)
    _ATTEMPTS[kind] = attempts


def _block_size(left: float, expected: int | None, done: int) -> int:
    """Attempts in the next block of an adaptive solve (1-4: four graphs at most per kind),
    after ``done`` attempts, with ``left`` the most steps a row has left at its step size.

    Where the last solve of this kind took ``expected`` attempts and more than ``done``, the
    block ends where that solve ended (a solve of 3 steps takes one block of 3, not one of 4
    whose last attempt is computed and masked out, forward and backward): solves of a training
    loop repeat their step counts.  Past it (or without one), 4 while at least 4 steps remain,
    else 1 (an estimate that ends a block early would cost a call more)."""
    if expected is not None and expected > done:
        return min(4, expected - done)
    return 4 if left >= 4 else 1


def _loop_block(n: int) -> int:
    """Steps per ``while_loop`` iteration of a fixed grid of ``n`` steps, by default: 16 on a
    grid of 128 steps or more (an iteration's own cost, about 4.6 us here, shared by more
    steps: rk4 on a trivial field at 1.36-1.43 us per step against 1.61-1.99 with 8, for a
    first call of 19-29 s against 11-21 s, benchmarks/compiled.py --rk4-blocks), else 8 (fewer
    on a shorter grid), so that the padding steps computed past the grid's end stay under an
    eighth of it."""
    return 16 if n >= 128 else min(8, n)


def _padded(grid: FixedGrid, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's times ``[n + 1, rows]`` and steps ``[n, rows]`` with ``n`` made a multiple
    of ``k`` by steps of zero from the last time (rows that have ended)."""
    times, steps = grid.times, grid.steps
    pad = -grid.n % k
    if pad:
        times = torch.cat([times, times[-1:].expand(pad, -1)])
        steps = torch.cat([steps, steps.new_zeros((pad, steps.shape[1]))])
    return times, steps


def _loops(f: Func, key: tuple[Any, ...], *xs: Any) -> bool:
    """Whether a solve may run in one ``while_loop``: no gradient flows through it from these
    tensors (or tuples of them), and its field does not differentiate inside itself (as the
    adjoint's augmented field does: a loop's body runs without autograd), nor failed to trace
    in a loop before."""
    inner = f.f if isinstance(f, _OneRow) else f
    if key in NO_LOOP or getattr(inner, "no_torch_func", False):
        return False
    if not torch.is_grad_enabled():
        return True
    leaves = torch.utils._pytree.tree_leaves(xs)
    return not any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """``x`` with contiguous strides (a differentiable copy)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def _outputs_per_step(grid: FixedGrid, out: torch.Tensor) -> tuple[int, bool]:
    """The most outputs any row has inside or at the end of one fixed step, and whether any
    lies strictly inside a step (then the steps' interpolants are evaluated)."""
    g = grid.grid  # [B, n + 1]
    lo = torch.searchsorted(out, g[:, :-1].contiguous(), right=True)
    below = torch.searchsorted(out, g[:, 1:].contiguous(), right=False)
    hi = torch.searchsorted(out, g[:, 1:].contiguous(), right=True)
    most, inside = torch.stack(((hi - lo).amax(), (below - lo).amax())).tolist()
    return max(1, most), inside > 0


def _assemble(y0: torch.Tensor, T: int, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Outputs ``[rows, T, *features]`` from the attempts' values ``[A, rows, m, *features]``
    at indices ``[A, rows, m]`` (``T`` for none); outputs no attempt reached are NaN."""
    B = y0.shape[0]
    rows = torch.arange(B, device=y0.device).view(1, B, 1).expand_as(idx)
    ys = y0.new_full((B, T + 1) + y0.shape[1:], math.nan)
    ys = ys.index_put((rows.reshape(-1), idx.reshape(-1)), vals.reshape((-1,) + y0.shape[1:]))
    return torch.cat([y0.unsqueeze(1), ys[:, 1:T]], dim=1)


# -- a solve inside the user's own torch.compile ------------------------------------------------


def traceable(
    solver: Solver, y0: object, t: object, batched: bool | None, features: dict[str, bool]
) -> bool:
    """Whether a solve met while ``torch.compile`` traces the caller can be traced whole: a
    fixed-step explicit Runge-Kutta method on its output grid (``step_size=None``), a tensor
    state and a 1-D tensor of times, none of the options that need the eager loop."""
    return (
        type(solver) is ExplicitRK
        and solver.error_order is None
        and isinstance(y0, torch.Tensor)
        and y0.is_floating_point()
        and isinstance(t, torch.Tensor)
        and t.ndim == 1
        and t.shape[0] >= 1
        and not (batched and y0.ndim == 0)
        and not any(features.values())
    )


def traced_fixed(
    func: Func, solver: ExplicitRK, y0: torch.Tensor, t: torch.Tensor, batched: bool
) -> tuple[torch.Tensor, torch.Tensor, Stats]:
    """A fixed-step solve on the output grid as plain tensor operations: no host
    synchronisation and no branch on a value, so the caller's graph holds the whole rollout.
    The steps may be negative (decreasing times): a Runge-Kutta step does not mind.  What the
    eager entry checks by value (finite state, monotonic times) is not checked here; the
    outputs' finiteness is reported in the returned status (``NONFINITE``), not raised.

    Returns:
        ``(ys, status, stats)`` in the solve's layout.
    """
    s = t.to(torch.float64) if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
    n = s.shape[0] - 1
    rows = y0.shape[:1] if batched else ()

    def at(x: torch.Tensor) -> torch.Tensor:
        return x.expand(rows) if batched else x

    ys = [y0]
    y, state = y0, solver.init(func, at(s[0]), y0, None)
    for k in range(n):
        res = solver.step(func, at(s[k]), at(s[k + 1] - s[k]), y, state)
        y, state = res.y1, res.state
        ys.append(y)
    out = torch.stack(ys, dim=1 if batched else 0)
    finite = torch.isfinite(out).flatten(1 if batched else 0).all(-1)
    status = torch.where(finite, int(Status.SUCCESS), int(Status.NONFINITE))
    per = torch.zeros(rows, dtype=torch.long, device=y0.device)
    steps = per + n
    stats = Stats(per + n * solver.n_stages, steps, steps, per, per, per, per)
    return out, status, stats
