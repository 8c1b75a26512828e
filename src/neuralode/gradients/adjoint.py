"""The continuous adjoint sensitivity method (Chen et al. 2018, Section 2, Algorithm 1).

The forward solve keeps no autograd graph.  The backward pass integrates the augmented system

    dy/ds = f(s, y),    da/ds = -a^T df/dy,    dg/ds = -a^T df/dtheta

backwards from the last output time, one output interval at a time; at each output time the
incoming gradient is added to the adjoint ``a`` (a jump) and the state is reset to the stored
forward output.  Memory is independent of the number of solver steps.

The step size carries across output times and across those jumps: each interval starts with the
step the controller proposed at the end of the previous one (a last step shortened to land on the
output time does not shrink it), so only the first interval pays Hairer's initial-step selection.
torchdiffeq restarts the step selection on every interval.

Time in the backward solve: with one output grid shared by every row, the backward loop runs in
the original time units (reversed), so a carried step means the same thing on every interval.
With per-sample grids (every row with its own intervals) each interval is integrated in its own
normalised time ``tau`` in ``[0, 1]``, so that the rows share one backward solve and the
parameter gradient stays one tensor per parameter: each row's vector-Jacobian product is
weighted by its own interval length.

Gradients for the times: ``dL/ds_i = <dL/dy_i, f(s_i, y_i)>`` for ``i >= 1`` and
``dL/ds_0 = -<a(s_0), f(s_0, y_0)>``.

The backward solve's default error norm is the seminorm of Kidger, Chen & Lyons (2021, "Hey,
that's not an ODE"): it leaves the parameter-gradient channels out of the step-size control,
because they do not feed back into the dynamics.  ``adjoint_options={"norm": "rms"}`` restores the
full (mixed RMS) norm, torchdiffeq's default; ``"max"`` the max norm.  The performance page
(docs/performance.md) measures both.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

from .._compiled import UNTRACEABLE, field_key, refusal
from .._inputs import CALLBACK_NAMES, Callbacks, Problem, all_finite, check_solver_options
from .._loop import LoopResult, LoopSpec
from .._rows import per_row
from ..controllers import NORMS, PIController, rms_norm
from ..solution import SolverError, Stats
from ..solvers.newton import Linearisation, jacobian, lu_factor
from ..solvers.registry import get_solver
from ..solvers.rk import ExplicitRK
from .base import GradientStrategy, Outcome, refuse_double_backward

#: The backward solve's counters, summed over the output intervals.
_STAT_NAMES = ("nfe", "n_steps", "n_accepted", "n_rejected", "njev", "nlu", "n_newton")

__all__ = ["Adjoint", "AdjointConfig", "ADJOINT_OPTIONS", "find_adjoint_params"]

#: Keys of ``adjoint_options``.
ADJOINT_OPTIONS = (
    "norm",
    "unused",
    "step_size",
    "first_step",
    "max_num_steps",
    "dtype",
    "safety",
    "beta",
    "ifactor",
    "dfactor",
    "min_step",
    "max_step",
)


@dataclass
class AdjointConfig:
    """How the backward (augmented) system is solved: method, tolerances and options, checked."""

    method: Any
    rtol: float
    atol: float
    #: ``"seminorm"``, a name in ``NORMS``, or a callable of ``(t, y, adj_y, *adj_params)``.
    norm: Any = "seminorm"
    options: dict[str, Any] = field(default_factory=dict)
    #: An ``adjoint_params`` entry that ``func`` never depends on: ``"error"`` (a ``ValueError``
    #: naming it), or ``"zero"`` (a zero gradient and a ``UserWarning``, as torchdiffeq).
    unused: str = "error"

    @classmethod
    def build(
        cls,
        method: Any,
        rtol: float | torch.Tensor,
        atol: float | torch.Tensor,
        adjoint_method: Any,
        adjoint_rtol: Any,
        adjoint_atol: Any,
        adjoint_options: dict[str, Any] | None,
        step_size: float | None = None,
    ) -> AdjointConfig:
        """Check the ``adjoint_*`` arguments (``rtol``/``atol`` are the forward ones, already
        checked) and fill in the defaults from the forward solve."""
        if adjoint_options is not None and not isinstance(adjoint_options, dict):
            raise TypeError(f"adjoint_options must be a dict, got {type(adjoint_options).__name__}")
        opts = dict(adjoint_options or {})
        if step_size is not None and "step_size" not in opts and adjoint_method in (None, method):
            opts["step_size"] = step_size  # a fixed-step backward pass steps like the forward
        unknown = sorted(set(opts) - set(ADJOINT_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown adjoint option(s) {unknown}; known adjoint options are "
                f"{list(ADJOINT_OPTIONS)}"
            )
        norm = opts.pop("norm", "seminorm")
        if not callable(norm) and norm not in (*NORMS, "seminorm"):
            raise ValueError(
                f"adjoint_options['norm'] must be one of {[*NORMS, 'seminorm']} or a callable "
                f"norm((t, y, adj_y, *adj_params)) -> 0-dim tensor, got {norm!r}"
            )
        unused = opts.pop("unused", "error")
        if unused not in ("error", "zero"):
            raise ValueError(f"adjoint_options['unused'] must be 'error' or 'zero', got {unused!r}")
        # The backward state mixes y, the adjoint and the parameter gradients, so its tolerances
        # are scalars; per-component forward tolerances give their tightest value.
        rtol_b = _scalar_tolerance("adjoint_rtol", adjoint_rtol, rtol, positive=True)
        atol_b = _scalar_tolerance("adjoint_atol", adjoint_atol, atol, positive=False)
        return cls(adjoint_method or method, rtol_b, atol_b, norm, opts, unused)


def _scalar_tolerance(
    name: str, value: object, forward: float | torch.Tensor, positive: bool
) -> float:
    if value is None:
        return forward if isinstance(forward, float) else float(forward.min())
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        value = float(value)
    need = "positive" if positive else "non-negative"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number (the backward state mixes y, the adjoint and the "
            f"parameter gradients, so it has one tolerance), got {type(value).__name__}"
        )
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite {need} number, got {value!r}")
    return value


def find_adjoint_params(
    func: Any, adjoint_params: Iterable[torch.Tensor] | None, gradient: str
) -> tuple[torch.Tensor, ...]:
    """The tensors the backward pass differentiates: ``adjoint_params`` if given (any iterable
    of tensors, such as ``module.parameters()``, as torchdiffeq takes), else the trainable
    parameters of an ``nn.Module`` func."""
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise TypeError(
                f"gradient={gradient!r} needs to know the parameters of func: func is not an "
                f"nn.Module, so pass adjoint_params=(tensors func uses), or () if it has none"
            )
        return tuple(p for p in func.parameters() if p.requires_grad)
    if isinstance(adjoint_params, (torch.Tensor, str, dict)) or not isinstance(
        adjoint_params, Iterable
    ):
        raise TypeError(
            f"adjoint_params must be a sequence or iterable of tensors (such as "
            f"module.parameters()), got {type(adjoint_params).__name__}"
        )
    params = tuple(adjoint_params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params[{i}] must be a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(
                f"adjoint_params[{i}] (shape {tuple(p.shape)}) does not require grad: its "
                f"gradient would silently be zero; set requires_grad or leave it out"
            )
    return params


class Adjoint(GradientStrategy):
    """Gradients by the continuous adjoint: memory independent of the number of steps.

    Args:
        params: the tensors to differentiate besides ``y0`` and ``t``.
        config: the backward solve's method, tolerances and options.
        user_func: ``func`` as the user gave it (to name unused parameters in errors).
    """

    name = "adjoint"

    def __init__(self, params: tuple[torch.Tensor, ...], config: AdjointConfig, user_func: Any):
        self.params, self.config, self.user_func = params, config, user_func
        self.solver = get_solver(config.method)  # an unknown adjoint_method fails here
        opts = config.options
        check_solver_options(
            self.solver,
            step_size=opts.get("step_size"),
            first_step=opts.get("first_step"),
            max_num_steps=opts.get("max_num_steps", LoopSpec.max_num_steps),
            safety=opts.get("safety", 0.9),
            beta=opts.get("beta", 0.0),
            ifactor=opts.get("ifactor", 10.0),
            dfactor=opts.get("dfactor", 0.2),
            min_step=opts.get("min_step", 0.0),
            max_step=opts.get("max_step", math.inf),
            prefix="adjoint_options",
        )
        t_dtype = opts.get("dtype")
        if t_dtype is not None and (
            not isinstance(t_dtype, torch.dtype) or not t_dtype.is_floating_point
        ):
            raise TypeError(
                f"adjoint_options['dtype'] (the time dtype) must be floating, got {t_dtype!r}"
            )
        self.options = opts

    def solve(self, prob: Problem, spec: LoopSpec) -> Outcome:
        context = _AdjointRun(self, prob, spec)
        # torch.autograd.Function.apply has no annotations (torch 2.13).
        ys: torch.Tensor = _AdjointFn.apply(  # type: ignore[no-untyped-call]
            context, prob.y0, prob.times, *self.params
        )
        assert context.result is not None
        return Outcome(ys, context.result, context.stats, True)


class _AdjointFn(torch.autograd.Function):
    """Inputs: (context, y0, s, *params) -> ys."""

    @staticmethod
    def forward(
        ctx: Any, context: _AdjointRun, y0: torch.Tensor, s: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ys = context.forward(y0, s.detach())
        ctx.context = context
        ctx.save_for_backward(ys, s, *params)
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: torch.Tensor) -> tuple[Any, ...]:
        refuse_double_backward("adjoint")
        ys, s, *params = ctx.saved_tensors
        context: _AdjointRun = ctx.context
        # ys is this Function's own output and still claims requires_grad; detach it so that a
        # field differentiating inside itself (a CNF's trace) never sees a graph-less view that
        # pretends to be differentiable.
        grad_y0, grad_s, grad_params = context.backward(
            ys.detach(), s.detach(), tuple(params), grad_ys, ctx.needs_input_grad[2]
        )
        return (None, grad_y0, grad_s, *grad_params)


@dataclass
class _AdjointRun:
    strategy: Adjoint
    prob: Problem
    spec: LoopSpec
    result: LoopResult | None = None
    stats: dict[str, Stats] = field(default_factory=dict)

    def forward(self, y0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        self.result = self.spec.run(y0, self.prob.f0.detach(), s)
        return self.result.ys

    def _out(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x[:, i] if self.prob.batched else x[i]

    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-row inner product (a scalar unbatched)."""
        p = a * b
        return p.reshape(p.shape[0], -1).sum(1) if self.prob.batched else p.sum()

    def backward(
        self,
        ys: torch.Tensor,
        s: torch.Tensor,
        params: tuple[torch.Tensor, ...],
        grad_ys: torch.Tensor,
        want_s: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        if not all_finite(ys):
            raise SolverError(
                "gradient='adjoint': the forward solve failed (see Solution.status), so there "
                "is no gradient to compute; fix the forward solve first"
            )
        func, T = self.prob.func, s.shape[-1]
        aug = _Augmented(func, params, self.prob.batched, ys, s, self.strategy.options.get("dtype"))
        spec = self._backward_spec(aug)
        a = torch.zeros_like(self._out(ys, 0))  # adjoint of the state, dL/dy(s)
        g = [torch.zeros_like(p) for p in params]
        totals = [torch.zeros((), dtype=torch.long) for _ in _STAT_NAMES]
        grad_s = torch.zeros_like(s) if want_s else None
        h: float | None = None  # the step carried from one interval to the next
        for i in range(T - 1, 0, -1):
            a = a + self._out(grad_ys, i)  # the jump at output time s_i
            if grad_s is not None:
                f_i = func(self._out(s, i).to(ys.dtype), self._out(ys, i))
                grad_s[..., i] = self._dot(self._out(grad_ys, i), f_i).to(s.dtype)
                totals[0] = totals[0] + 1
            a, g, stats, h = self._interval(aug, spec, i, a, g, h)
            for k, name in enumerate(_STAT_NAMES):
                totals[k] = totals[k] + getattr(stats, name).cpu()
        if T > 1 and not all(aug.used):
            names = _names(self.strategy.user_func, params)
            unused = [n for n, u in zip(names, aug.used) if not u]
            if self.strategy.config.unused == "error":
                raise ValueError(
                    f"gradient='adjoint': func's output did not depend on {unused} anywhere in "
                    f"the solve; their gradients would silently be zero. Remove them from "
                    f"adjoint_params (or freeze them with requires_grad_(False)), or pass "
                    f"adjoint_options={{'unused': 'zero'}}"
                )
            _warn(
                f"gradient='adjoint': func's output did not depend on {unused}: their "
                f"gradients are zero",
                UserWarning,
            )
        if grad_s is not None and T > 1:
            f_0 = func(self._out(s, 0).to(ys.dtype), self._out(ys, 0))
            grad_s[..., 0] = -self._dot(a, f_0).to(s.dtype)
            totals[0] = totals[0] + 1
        self.stats["backward"] = Stats(*totals)
        return a + self._out(grad_ys, 0), grad_s, g

    def _backward_spec(self, aug: _Augmented) -> LoopSpec:
        strategy = self.strategy
        solver, cfg, opts = strategy.solver, strategy.config, dict(strategy.options)
        controller = None
        if solver.adaptive:
            assert solver.error_order is not None
            controller = PIController(
                rtol=cfg.rtol,
                atol=cfg.atol,
                norm=aug.norm(cfg.norm),
                dims=(0,),
                error_order=solver.error_order,
                **{
                    k: opts[k]
                    for k in ("safety", "beta", "ifactor", "dfactor", "min_step", "max_step")
                    if k in opts
                },
            )
        step_size = opts.get("step_size")  # fixed steps only (a controller ignores it)
        if step_size is not None and aug.per_row:  # time units -> the intervals' tau units
            # (a step longer than an interval is cut to it, one step, by the fixed grid)
            step_size = float(step_size) / float(aug.lengths.max())
        # func's callback_*_adjoint, called around the backward solve's steps with its own
        # time and flat augmented state (torchdiffeq calls them with its augmented state)
        callbacks = Callbacks(
            *(getattr(strategy.user_func, n + "_adjoint", None) for n in CALLBACK_NAMES)
        )
        perturb = self.spec.perturb and not solver.adaptive
        # A compiled forward solve compiles the backward one too, where its method and options
        # allow (an explicit method; the Rosenbrock methods' torch.func Jacobian cannot
        # transform the augmented field, which calls torch.autograd.grad).
        compiled = self.spec.compile
        if compiled is not None and (
            not isinstance(solver, ExplicitRK)
            or refusal(solver, callbacks=callbacks.any, perturb=perturb) is not None
        ):
            compiled = None
        return LoopSpec(
            func=aug,
            solver=solver,
            controller=controller,
            batched=False,
            step_size=step_size,
            first_step=opts.get("first_step") if solver.adaptive else None,
            max_num_steps=opts.get("max_num_steps", LoopSpec.max_num_steps),
            callbacks=callbacks,
            perturb=perturb,
            compile=compiled,
        )

    def _interval(
        self,
        aug: _Augmented,
        spec: LoopSpec,
        i: int,
        a: torch.Tensor,
        g: list[torch.Tensor],
        h: float | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], Stats, float | None]:
        """Solve the augmented system over output interval ``i`` (from ``s_i`` back to
        ``s_{i-1}``), starting from the stored output and the jumped adjoint."""
        y_i = self._out(aug.ys, i)
        x0 = torch.cat([y_i.reshape(-1), a.reshape(-1), *(p.reshape(-1) for p in g)])
        aug.at_interval(i)
        span = aug.span(i)
        sigma = torch.tensor([0.0, span], dtype=aug.t_dtype, device=x0.device)
        spec = self._landing(aug, spec, i)
        # f at the interval's start: Hairer's selection needs it, and otherwise the first step
        # would evaluate it as its first stage (the loop counts it either way).
        # (Perturbed fixed steps evaluate their first stage inside the step instead.)
        f0 = None if spec.perturb else aug(sigma[0], x0)  # aug takes the clock to the state dtype
        out = self._run(spec, x0, f0, sigma, h)
        if not bool((out.status == 0).all()):
            raise SolverError(
                f"gradient='adjoint': the backward solve failed on the output interval between "
                f"output times {i - 1} and {i}: {_status_message(out.status)} (for the backward "
                f"solve, use adjoint_options={{'max_num_steps': N}}, adjoint_rtol and "
                f"adjoint_atol).  On a stiff, dissipative problem the state itself is unstable "
                f"backwards in time (its errors grow like exp(|lambda| t)): "
                f"gradient='checkpoint' recomputes forward steps instead and gives backprop's "
                f"gradient"
            )
        x1 = out.ys[-1]
        n_y, n_a = y_i.numel(), a.numel()
        a_new = x1[n_y : n_y + n_a].view_as(a)
        g_new, start = [], n_y + n_a
        for p in g:
            g_new.append(x1[start : start + p.numel()].view_as(p))
            start += p.numel()
        # The augmented state is one flat row, so the next step is a float (None: fixed steps).
        assert not isinstance(out.h_next, torch.Tensor)
        return a_new, g_new, out.stats, out.h_next

    def _run(
        self,
        spec: LoopSpec,
        x0: torch.Tensor,
        f0: torch.Tensor | None,
        sigma: torch.Tensor,
        h: float | None,
    ) -> LoopResult:
        """One interval's backward solve; compiled where ``spec`` says so (its graphs then hold
        the augmented field's ``torch.autograd.grad``, which torch.compile traces only when
        asked to).  Where torch.compile cannot trace the field (its output depends on
        ``adjoint_params`` through a graph built before the solve, ``k = log_k.exp()``), that
        kind of field's backward solves run eager from then on, with one warning."""
        kind = field_key(spec.func)
        if spec.compile is not None and kind not in UNTRACEABLE:
            try:
                with torch._dynamo.config.patch(trace_autograd_ops=True):
                    return spec.run(x0, f0, sigma, first_step=h, carry_step=True)
            except torch._dynamo.exc.Unsupported as err:
                UNTRACEABLE.add(kind)
                _warn(
                    f"gradient='adjoint' with compile: torch.compile cannot trace the backward "
                    f"solve's augmented field ({str(err).splitlines()[0]}); the backward "
                    f"solves of this field run eager",
                    RuntimeWarning,
                )
        if spec.compile is not None:
            spec = dataclasses.replace(spec, compile=None)
        return spec.run(x0, f0, sigma, first_step=h, carry_step=True)

    def _landing(self, aug: _Augmented, spec: LoopSpec, i: int) -> LoopSpec:
        """The backward spec for interval ``i`` with the forward solve's ``step_t``/``jump_t``
        inside it, in the backward clock (``sigma = s_i - s``): its steps end there too, and at
        a jump the backward solve restarts one ulp past it, so the augmented field is seen from
        each side of the jump as the forward solve saw it.  Shared times only: a per-sample
        grid's backward state is one flat row over every sample, which has one clock."""
        fwd = self.spec
        if spec.controller is None or (fwd.step_t is None and fwd.jump_t is None):
            return spec
        if aug.per_row:
            return spec
        row = aug.s[0] if aug.batched else aug.s
        lo, hi = row[i - 1], row[i]

        def inside(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            if x.ndim == 2:  # mirrored per row; the rows share one grid here
                if not bool((x == x[:1]).all()):
                    return None
                x = x[0]
            x = x.to(row.dtype)
            x = x[(x > lo) & (x < hi)]
            return (hi - x).flip(0) if x.numel() else None

        step_t, jump_t = inside(fwd.step_t), inside(fwd.jump_t)
        if step_t is None and jump_t is None:
            return spec
        return dataclasses.replace(spec, step_t=step_t, jump_t=jump_t)


class _AugmentedJacobian:
    """The augmented field's Jacobian in block form (:meth:`_Augmented.linearise`)."""

    def __init__(
        self,
        aug: _Augmented,
        Jf: torch.Tensor,
        scale: torch.Tensor | float,
        jt_w: torch.Tensor,
        w: torch.Tensor,
    ) -> None:
        self.n_y = aug.n_y
        self.Jf, self.scale, self.jt_w, self.w = Jf, scale, jt_w, w

    def product(self, v: torch.Tensor) -> torch.Tensor:
        """``J_aug v`` for a flat ``v``."""
        (jv,) = torch.autograd.grad(self.jt_w, self.w, v, retain_graph=True)
        return jv

    def inf_norm(self) -> torch.Tensor:
        """The stiffness the blocks carry: ``max(||S J||_inf, ||S J||_1)`` (the diagonal
        blocks' norms; the eigenvalues of ``J_aug`` are those of ``-S J``, ``S J^T`` and 0)."""
        A = (self.Jf * self.scale).abs()
        return torch.maximum(A.sum(-1).amax(), A.sum(-2).amax())

    def factored(self, hg: torch.Tensor | float) -> _AugmentedSolve:
        return _AugmentedSolve(self, hg)


class _AugmentedSolve:
    """``(I - hg J_aug)^-1`` by block forward substitution over ``[y, a, g]``."""

    def __init__(self, op: _AugmentedJacobian, hg: torch.Tensor | float) -> None:
        self.op, self.hg = op, hg
        Jf = op.Jf
        N = Jf.shape[-1]
        eye = torch.eye(N, dtype=Jf.dtype, device=Jf.device)
        hs = hg * op.scale
        self.lu_y = lu_factor(eye + hs * Jf)
        self.lu_a = lu_factor(eye - hs * Jf.transpose(-1, -2))
        self.cols = (Jf.shape[0], N, 1) if Jf.ndim == 3 else (N, 1)

    def _lu(self, lu: tuple[torch.Tensor, torch.Tensor], r: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = torch.linalg.lu_solve(lu[0], lu[1], r.reshape(self.cols))
        return x.reshape(-1)

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        n = self.op.n_y
        r_y, r_a, r_g = rhs[:n], rhs[n : 2 * n], rhs[2 * n :]
        u_y = self._lu(self.lu_y, r_y)
        zeros = torch.zeros_like(rhs)
        v = torch.cat([u_y, zeros[n:]])
        u_a = self._lu(self.lu_a, r_a + self.hg * self.op.product(v)[n : 2 * n])
        v = torch.cat([u_y, u_a, zeros[2 * n :]])
        u_g = r_g + self.hg * self.op.product(v)[2 * n :]
        return torch.cat([u_y, u_a, u_g])


def _status_message(status: torch.Tensor) -> str:
    from ..solution import Status

    return Status(int(status)).message  # one flat row: one status


class _Augmented:
    """The augmented vector field of the backward solve, on the flat state ``[y, a, g...]``.

    In the backward loop's internal time ``sigma`` (increasing from 0 over the interval),
    ``s = s_i - sigma * scale`` with ``scale = 1`` for a shared grid and each row's interval length
    for per-sample grids (``tau`` units), so ``dx/dsigma = (-scale f, scale a^T df/dy,
    scale a^T df/dtheta)``.
    """

    def __init__(
        self,
        func: Any,
        params: tuple[torch.Tensor, ...],
        batched: bool,
        ys: torch.Tensor,
        s: torch.Tensor,
        t_dtype: torch.dtype | None,
    ) -> None:
        self.func, self.params, self.batched, self.ys, self.s = func, params, batched, ys, s
        self.t_dtype = t_dtype or s.dtype
        self.used = [False] * len(params)
        # The upper end and length of the output interval being solved (set before each solve
        # by ``at_interval``), as tensors: a compiled backward block reads them as inputs, so a
        # new interval is not a new graph.
        self._s_hi: torch.Tensor
        self._length: torch.Tensor | None = None
        y_like = ys[:, 0] if batched else ys[0]
        self.y_shape, self.n_y = y_like.shape, y_like.numel()
        # Per-sample grids are integrated in normalised time; one shared grid in its own units.
        self.per_row = batched and s.shape[-1] > 1 and not bool((s == s[:1]).all())
        self.lengths = s.diff(dim=-1)  # [(B,) T-1]

    @property
    def wraps(self) -> Any:
        """The user's field this one is built on (compiled blocks are kept per user field)."""
        return self.func

    #: ``torch.func`` cannot transform this field (it calls ``torch.autograd.grad``): a stiff
    #: backward solve takes its Jacobian with ``torch.autograd.grad`` (neuralode.solvers.newton).
    no_torch_func = True

    #: Stiff backward solves use the block form of the Jacobian (:meth:`linearise`); off, they
    #: take it densely, as any field's (kept for the tests, which compare the two).
    structured = True

    def at_interval(self, i: int) -> None:
        """Solve output interval ``i`` (from ``s_i`` back to ``s_{i-1}``) next."""
        self._s_hi = (self.s[:, i] if self.batched else self.s[i]).contiguous()
        self._length = self.lengths[:, i - 1].contiguous() if self.per_row else None

    def span(self, i: int) -> float:
        """The length of interval ``i`` in the backward loop's time units."""
        if self.per_row:
            return 1.0
        row = self.s[0] if self.batched else self.s
        return float(row[i] - row[i - 1])

    def perturbed(
        self, sigma: torch.Tensor, x: torch.Tensor, at_start: torch.Tensor, at_end: torch.Tensor
    ) -> torch.Tensor:
        """The field with ``func``'s time one ulp inside the backward step (``perturb``): the
        step runs from larger ``s`` to smaller, so its start is nudged down and its end up, in
        the user's clock (the backward clock's own ulps near 0 would vanish in ``s_i - sigma``)."""
        return self(sigma, x, (at_start, at_end))

    def clock(
        self, sigma: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``func``'s time at the backward time ``sigma`` of the current interval, in
        ``dtype``, and the clock's scale per row (``d s / d sigma = -scale``; ``None``: 1)."""
        s_hi, length = self._s_hi, self._length
        if length is not None:
            return (s_hi - sigma.to(s_hi.dtype) * length).to(dtype), length.to(dtype)
        return (s_hi - sigma.to(s_hi.dtype)).to(dtype), None

    def __call__(
        self, sigma: torch.Tensor, x: torch.Tensor, nudge: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        n_y = self.n_y
        y = x[:n_y].view(self.y_shape)
        adj = x[n_y : 2 * n_y].view(self.y_shape)
        s_now, length = self.clock(sigma, x.dtype)
        scale = None if length is None else per_row(length, y.ndim)
        if nudge is not None:
            inf = s_now.new_tensor(math.inf)
            up = torch.where(nudge[1], torch.nextafter(s_now, inf), s_now)
            s_now = torch.where(nudge[0], torch.nextafter(s_now, -inf), up)
        # A stiff method's Jacobian of this field (newton.jacobian, by torch.autograd.grad: see
        # ``no_torch_func``) differentiates it: then the graph from x is kept (second derivatives
        # of func for the adjoint rows).
        track = x.requires_grad and torch.is_grad_enabled()
        with torch.enable_grad():
            y_ = y if track else y.detach().requires_grad_(True)
            fy = self.func(s_now, y_)
            cot = adj if scale is None else adj * scale
            vjps: Sequence[torch.Tensor | None] = (None,) * (1 + len(self.params))
            if fy.requires_grad:  # else f depends on neither y nor a parameter: zero vjps
                # retain_graph: a tensor the field computed from a parameter before the solve
                # (k = log_k.exp(), adjoint_params=(log_k,)) serves every call, as in torchdiffeq.
                vjps = torch.autograd.grad(
                    fy,
                    (y_, *self.params),
                    cot,
                    allow_unused=True,
                    create_graph=track,
                    retain_graph=True,
                )
        fy = fy if track else fy.detach()
        dy = -fy if scale is None else -fy * scale
        da = vjps[0] if vjps[0] is not None else torch.zeros_like(adj)
        parts = [dy.reshape(-1), da.reshape(-1)]
        for k, v in enumerate(vjps[1:]):
            if v is None:
                v = torch.zeros_like(self.params[k])
            elif not self.used[k]:  # (set by the eager f0 of each interval before a compiled
                self.used[k] = True  # solve traces this: a while_loop allows no side effect)
            parts.append(v.reshape(-1))
        return torch.cat(parts)

    def linearise(self, sigma: torch.Tensor, x: torch.Tensor) -> Linearisation | None:
        """The augmented field's value, derivative in ``sigma`` and Jacobian at ``(sigma, x)``
        for a stiff backward solve, with the Jacobian kept in its block form.

        In ``x = [y, a, g]`` the Jacobian is block lower-triangular,
        ``[[-S J, 0, 0], [S H_ya, S J^T, 0], [S H_yg, S F^T, 0]]`` (``J = df/dy``, ``F =
        df/dtheta``, ``H`` the second derivatives of ``a^T f``, ``S`` the clock's scale), so a
        system ``(I - hg J_aug) u = r`` is solved block by block: two LU factorisations of
        ``func``'s own ``N x N`` Jacobian (per sample) and two products with ``J_aug`` (one
        backward pass each), instead of a dense Jacobian of the ``2 N + P`` augmented
        components (``P`` the number of parameters: thousands for a network), each row a
        second-order product.  ``None`` (then the Jacobian is taken densely) when
        :attr:`structured` is off."""
        if not self.structured:
            return None
        s_now, length = self.clock(sigma, x.dtype)
        y = x[: self.n_y].view(self.y_shape)
        Jf = jacobian(self.func, s_now, y).J  # [B, N, N] batched, [N, N] unbatched
        with torch.enable_grad():
            sig = sigma.detach().requires_grad_(True)
            xx = x.detach().requires_grad_(True)
            out = self(sig, xx)  # with the graph of its vector-Jacobian products (track)
            # d out / d sigma, by the double-backward trick (one forward-mode product).
            u = torch.zeros_like(out, requires_grad=True)
            (g_sig,) = torch.autograd.grad(out, sig, u, create_graph=True, allow_unused=True)
            if g_sig is None:
                ft = torch.zeros_like(out)
            else:
                (ft,) = torch.autograd.grad(g_sig, u, torch.ones_like(g_sig), retain_graph=True)
            # J_aug^T w as a function of w: J_aug v is then one backward pass in w.
            w = torch.zeros_like(out, requires_grad=True)
            (jt_w,) = torch.autograd.grad(out, xx, w, create_graph=True)
        # The diagonal blocks' scale, shaped to multiply J ([B, N, N] per row, or a number).
        scale = 1.0 if length is None else length.view(-1, 1, 1)
        op = _AugmentedJacobian(self, Jf, scale, jt_w, w)
        return Linearisation(out.detach(), op, ft.detach())  # type: ignore[arg-type]

    def norm(self, kind: str) -> Any:
        """The backward solve's error norm over ``[y, a, g_1, g_2, ...]``.

        ``"rms"``: the largest RMS of the parts (torchdiffeq's mixed norm for tuple states);
        ``"seminorm"``: the same over ``y`` and ``a`` only, so it is never larger than the full
        norm (Kidger et al. 2021); ``"max"``: the largest absolute value over everything.
        """
        if callable(kind):
            return self._custom_norm(kind)
        if kind == "max":
            return NORMS["max"]
        bounds = [0, self.n_y, 2 * self.n_y]
        if kind == "rms":
            for p in self.params:
                bounds.append(bounds[-1] + p.numel())
        pieces = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]

        def mixed(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
            # x is one flat row (``[n]``; ``[1, n]`` in a compiled solve's layout of rows):
            # each part's RMS is a number per row, and the norm their maximum.
            parts = [rms_norm(x[..., lo:hi], dims) for lo, hi in pieces]
            return torch.stack(parts).amax(0)

        return mixed

    def _custom_norm(self, user: Any) -> Any:
        """A callable ``adjoint_options["norm"]``, called as torchdiffeq calls its own: with
        ``(t, y, adj_y, *adj_params)``, each the scaled error of that part in its own shape.
        ``t`` is a zero: torchdiffeq integrates the time gradient as a channel of the backward
        state, which here comes from the outputs' ``f`` directly (module docstring)."""
        n_y, shape = self.n_y, self.y_shape
        sizes = [p.numel() for p in self.params]

        def custom(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
            if x.ndim == 2:  # a compiled solve's layout of rows (one row)
                return custom(x[0], (0,)).unsqueeze(0)
            y, adj = x[:n_y].view(shape), x[n_y : 2 * n_y].view(shape)
            gs = torch.split(x[2 * n_y :], sizes) if sizes else ()
            grads = [g.view_as(p) for g, p in zip(gs, self.params)]
            out: torch.Tensor = user((x.new_zeros(()), y, adj, *grads))
            return out

        return custom


def _warn(message: str, category: type[Warning]) -> None:
    """Warn from the backward pass at the user's line: the first frame outside neuralode and
    torch (the ``backward()`` or ``autograd.grad`` call; autograd runs a CPU backward pass on
    the calling thread), or this module's caller where no such frame is on the stack (a
    backward pass on a device's own thread)."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        "neuralode",
        "torch",
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)


def _names(func: Any, params: Sequence[torch.Tensor]) -> list[str]:
    named = {}
    if isinstance(func, torch.nn.Module):
        named = {id(p): n for n, p in func.named_parameters()}
    return [named.get(id(p), f"adjoint_params[{i}]") for i, p in enumerate(params)]
