"""The solve loop: step, accept or reject, write outputs, count work, per sample.

Every row of a batched solve keeps its own time, step size, accept flag, counters and status
(merged with ``torch.where``), so one hard sample does not shrink everyone's step.  An unbatched
solve is the same loop with row shape ``[]``.  The loop synchronises with the host once per step
(to learn whether any row still runs and how many outputs fell inside the step).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._inputs import Problem, _fmt_time, all_finite, normalise
from .controllers import NORMS, ControllerState, Norm, PIController, initial_step
from .gradients import GRADIENTS, AdjointConfig, adjoint_apply, find_adjoint_params
from .gradients.checkpoint import StepRecord, checkpoint_apply
from .solution import Solution, SolverError, Stats, Status
from .solvers.rk import RKStepper
from .tableaus import ButcherTableau, get_tableau

__all__ = ["solve", "DEFAULT_MAX_NUM_STEPS"]

DEFAULT_MAX_NUM_STEPS = 100_000


def solve(
    func: Callable[[torch.Tensor, Any], Any],
    y0: torch.Tensor | tuple[torch.Tensor, ...],
    t: torch.Tensor,
    *,
    method: str = "dopri5",
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
    dense: bool = False,
    throw: bool = True,
    gradient: str = "backprop",
    adjoint_params: Sequence[torch.Tensor] | None = None,
    adjoint_rtol: float | torch.Tensor | None = None,
    adjoint_atol: float | torch.Tensor | None = None,
    adjoint_method: str | None = None,
    adjoint_options: dict[str, Any] | None = None,
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
        method: one of :data:`neuralode.tableaus.TABLEAUS` (``"dopri5"``, ``"tsit5"``, ...).
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
            ``norm(x, dims) -> tensor``.
        safety, ifactor, dfactor: controller's safety factor and step growth/shrink limits.
        beta: PI stabilisation coefficient (Hairer's ``beta``; 0 is integral control, as in
            scipy and torchdiffeq).  Hairer's DOPRI5 uses 0.04; on our test problems it saved up
            to 5% of evaluations at loose tolerances and cost up to 4% at 1e-9, so the default
            is 0.
        dense: keep every step's stages so that ``Solution.evaluate`` works anywhere.
        throw: raise :class:`SolverError` when a sample fails; with ``False`` failures are only
            reported in ``Solution.status`` and the outputs they did not reach are NaN.
        gradient: ``"backprop"`` (autograd through the solver's operations: the exact gradient
            of the computed solution) or ``"adjoint"`` (the continuous adjoint of Chen et al.
            2018: memory independent of the number of steps; the backward pass solves the
            augmented system backwards in time, see :mod:`neuralode.gradients.adjoint`).
            Gradients reach ``y0``, ``t`` and the parameters either way.
        adjoint_params: ``"adjoint"``: the tensors to differentiate (default: the parameters of
            an ``nn.Module`` func that require grad; required for a plain function).
        adjoint_rtol, adjoint_atol, adjoint_method: the backward solve's tolerances and method
            (default: the forward ones).
        adjoint_options: the backward solve's options: ``norm`` (``"seminorm"``, the default:
            Kidger et al. 2021, parameter-gradient channels left out of the error norm;
            ``"rms"``: the largest RMS over the parts, every channel counted, torchdiffeq's
            default; ``"max"``), ``step_size``, ``first_step``, ``max_num_steps``, ``dtype``,
            ``safety``, ``beta``, ``ifactor``, ``dfactor``.  After ``backward()``,
            ``Solution.backward_stats`` holds the backward solve's work counters.

    Returns:
        A :class:`Solution`: ``ys`` is ``[T, *y0.shape]`` unbatched and ``[batch, T, *features]``
        batched.
    """
    tab = get_tableau(method)
    _check_options(tab, step_size, first_step, max_num_steps, norm, safety, beta, ifactor, dfactor)
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; known strategies are {list(GRADIENTS)}")
    if gradient in ("adjoint", "checkpoint"):
        params = find_adjoint_params(func, adjoint_params)
    if gradient == "adjoint":
        adj_cfg = AdjointConfig.build(
            method,
            rtol,
            atol,
            adjoint_method,
            adjoint_rtol,
            adjoint_atol,
            adjoint_options,
            step_size,
        )
        get_tableau(adj_cfg.method)
    elif any(x is not None for x in (adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options)):
        raise ValueError("adjoint_rtol/atol/method/options apply to gradient='adjoint' only")
    elif gradient == "backprop" and adjoint_params is not None:
        raise ValueError("adjoint_params applies to gradient='adjoint' or 'checkpoint' only")
    prob = normalise(func, y0, t, rtol=rtol, atol=atol, batched=batched, t_dtype=t_dtype)
    norm_fn = NORMS[norm] if isinstance(norm, str) else norm
    controller = PIController(
        error_order=tab.error_order or tab.order,
        beta=beta,
        safety=safety,
        ifactor=ifactor,
        dfactor=dfactor,
    )
    s_det = prob.s.detach()
    y0_int = prob.y0
    loop_kwargs = dict(
        step_size=step_size, first_step=first_step, max_num_steps=max_num_steps, dense=dense
    )
    if gradient == "checkpoint":
        return _solve_checkpoint(prob, tab, controller, norm_fn, loop_kwargs, params, t, throw)
    if gradient == "adjoint":
        return _solve_adjoint(
            prob, tab, controller, norm_fn, loop_kwargs, params, adj_cfg, t, func, throw
        )
    needs_t_grad = prob.s.requires_grad and torch.is_grad_enabled()
    if needs_t_grad:
        y0_int = _t0_shift(prob, s_det)
        # The first stage must see the shift too, or its derivative misses the t0 direction.
        prob.f0 = prob.func(s_det[..., 0].to(y0_int.dtype), y0_int)
    loop = _Loop(prob, tab, controller, norm_fn, s_det, y0_int, **loop_kwargs)  # type: ignore[arg-type]
    ys, *result = loop.run()
    if needs_t_grad:
        ys = _attach_time_gradients(prob, ys, s_det)
    return _finish(prob, t, loop, ys, result, dense, throw)


def _finish(
    prob: Problem,
    t: Any,
    loop: _Loop,
    ys: torch.Tensor,
    result: Sequence[Any],
    dense: bool,
    throw: bool,
    backward: dict[str, Stats] | None = None,
    detach_dense: bool = False,
) -> Solution:
    """Wrap a loop's outputs and ``(status, t_reached, stats)`` as a :class:`Solution`."""
    status, t_reached, stats = result
    sign = prob.sign
    interp = loop.interpolator(prob) if dense else None
    if interp is not None and detach_dense:
        # The adjoint and checkpoint forward passes keep no graph: dense output is a plain
        # (non-differentiable) value there, computed without autograd.
        interp = torch.no_grad()(interp)
    t_end_user = t_reached * sign
    sol = Solution(
        ts=t if isinstance(t, torch.Tensor) else prob.s.detach() * sign,
        ys=prob.unflatten(ys),
        stats=stats,
        status=status,
        t_end=t_end_user,
        _interpolator=interp,
        _backward=backward,
    )
    if throw and not sol.success:
        raise SolverError(_failure_message(status, t_end_user), sol)
    return sol


def _solve_checkpoint(
    prob: Problem,
    tab: ButcherTableau,
    controller: PIController,
    norm_fn: Norm,
    loop_kwargs: dict[str, Any],
    params: tuple[torch.Tensor, ...],
    t: Any,
    throw: bool,
) -> Solution:
    """Backprop-exact gradients by replaying recorded steps (see gradients/checkpoint.py)."""
    s_det = prob.s.detach()
    y0_int = prob.y0
    needs_t_grad = prob.s.requires_grad and torch.is_grad_enabled()
    if needs_t_grad:  # as for backprop
        y0_int = _t0_shift(prob, s_det)
    loop = _Loop(prob, tab, controller, norm_fn, s_det, y0_int, **loop_kwargs)
    result: list[Any] = []

    def run_forward(y0: torch.Tensor) -> torch.Tensor:
        loop.y0 = y0
        prob.f0 = (
            prob.f0.detach() if not needs_t_grad else prob.func(s_det[..., 0].to(y0.dtype), y0)
        )
        ys, *result[:] = loop.run()
        return ys

    ys, backward = checkpoint_apply(loop, y0_int, params, run_forward)
    if needs_t_grad:
        ys = _attach_time_gradients(prob, ys, s_det)
    return _finish(prob, t, loop, ys, result, loop_kwargs["dense"], throw, backward, True)


def _solve_adjoint(
    prob: Problem,
    tab: ButcherTableau,
    controller: PIController,
    norm_fn: Norm,
    loop_kwargs: dict[str, Any],
    params: tuple[torch.Tensor, ...],
    cfg: AdjointConfig,
    t: Any,
    func: Any,
    throw: bool,
) -> Solution:
    """The forward solve inside the adjoint's autograd function (no graph is kept)."""
    prob.f0 = prob.f0.detach()
    loops: list[_Loop] = []
    result: list[Any] = []

    def run_forward(y0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        loops.append(_Loop(prob, tab, controller, norm_fn, s, y0, **loop_kwargs))
        ys, *result[:] = loops[-1].run()
        return ys

    ys, backward = adjoint_apply(
        prob.func, func, prob.y0, prob.s, params, prob.batched, cfg, run_forward
    )
    return _finish(prob, t, loops[-1], ys, result, loop_kwargs["dense"], throw, backward, True)


def _t0_shift(prob: Problem, s_det: torch.Tensor) -> torch.Tensor:
    """``y0`` shifted by zero, with derivative ``-f(t0, y0)`` with respect to ``t0``:
    ``d y(t_i) / d t_0 = -Phi(t_i, t_0) f(t_0, y_0)`` then flows through the solve."""
    ds0 = (prob.s[..., 0] - s_det[..., 0]).to(prob.y0.dtype)
    return prob.y0 - _rows(ds0, prob.y0, prob.batched) * prob.f0


def _rows(v: torch.Tensor, like: torch.Tensor, batched: bool) -> torch.Tensor:
    """Reshape a per-row quantity to broadcast against a state-shaped tensor."""
    return v.view((-1,) + (1,) * (like.ndim - 1)) if batched else v


def _check_options(
    tab: ButcherTableau,
    step_size: float | None,
    first_step: float | None,
    max_num_steps: int,
    norm: Any,
    safety: float,
    beta: float,
    ifactor: float,
    dfactor: float,
) -> None:
    if step_size is not None:
        if tab.adaptive:
            raise ValueError(
                f"step_size applies to fixed-step methods; {tab.name!r} is adaptive (use "
                f"first_step, or a fixed-step method such as 'rk4')"
            )
        if (
            not isinstance(step_size, (int, float))
            or not step_size > 0
            or step_size == float("inf")
        ):
            raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")
    for name, value in (
        ("safety", safety),
        ("beta", beta),
        ("ifactor", ifactor),
        ("dfactor", dfactor),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if first_step is not None:
        if not tab.adaptive:
            raise ValueError(
                f"first_step applies to adaptive methods; {tab.name!r} is fixed-step "
                f"(use step_size)"
            )
        if not isinstance(first_step, (int, float)) or not 0 < first_step < math.inf:
            raise ValueError(f"first_step must be a positive finite number, got {first_step!r}")
    if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1:
        raise ValueError(f"max_num_steps must be a positive integer, got {max_num_steps!r}")
    if isinstance(norm, str) and norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known norms are {sorted(NORMS)} or a callable")
    if not isinstance(norm, str) and not callable(norm):
        raise TypeError(f"norm must be a name in {sorted(NORMS)} or a callable, got {norm!r}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety!r}")
    if not 0 <= beta <= 0.2:
        raise ValueError(f"beta (PI coefficient) must be in [0, 0.2], got {beta!r}")
    if not 1 <= ifactor < math.inf:
        raise ValueError(f"ifactor must be a finite number >= 1, got {ifactor!r}")
    if not 0 < dfactor <= 1:
        raise ValueError(f"dfactor must be in (0, 1], got {dfactor!r}")


def _failure_message(status: torch.Tensor, t_end: torch.Tensor) -> str:
    flat = status.reshape(-1)
    bad = (flat != Status.SUCCESS).nonzero().reshape(-1)
    first = int(bad[0])
    code = Status(int(flat[first]))
    where = f"sample {first} " if status.ndim else ""
    count = f" ({bad.numel()} of {flat.numel()} samples failed)" if status.ndim else ""
    return f"{where}stopped at t={_fmt_time(t_end.reshape(-1)[first])}{count}: {code.message}"


def _attach_time_gradients(prob: Problem, ys: torch.Tensor, s_det: torch.Tensor) -> torch.Tensor:
    """Give each output ``y(t_i)`` the derivative ``f(t_i, y_i)`` with respect to ``t_i``."""
    ds = (prob.s - s_det).to(ys.dtype)  # zeros that carry the graph to t
    if prob.batched:
        fs = torch.stack(
            [prob.func(s_det[:, i].to(ys.dtype), ys[:, i]) for i in range(ys.shape[1])], dim=1
        )
        return ys + ds.view(ds.shape + (1,) * (ys.ndim - 2)) * fs
    fs = torch.stack([prob.func(s_det[i].to(ys.dtype), ys[i]) for i in range(ys.shape[0])])
    return ys + ds.view((-1,) + (1,) * (ys.ndim - 1)) * fs


class _Outputs:
    """Collects outputs as the loop produces them; assembled once at the end.

    Unbatched, outputs arrive in order and are stacked.  Batched, each row has its own output
    indices: entries are scattered into ``[batch, T, ...]`` (invalid ones into a dropped slot).
    """

    def __init__(self, y0: torch.Tensor, T: int, batched: bool) -> None:
        self.T, self.batched = T, batched
        self.vals: list[torch.Tensor] = []
        self.idx: list[torch.Tensor] = []
        self.y0 = y0
        if batched:
            self.add(
                torch.zeros(y0.shape[0], 1, dtype=torch.long, device=y0.device),
                y0.unsqueeze(1),
                None,
            )
        else:
            self.vals.append(y0.unsqueeze(0))

    def add(self, idx: torch.Tensor, vals: torch.Tensor, valid: torch.Tensor | None) -> None:
        """``idx``, ``valid``: ``[batch, m]``; ``vals``: ``[batch, m, ...]`` (batched), or just
        ``vals`` ``[m, ...]`` in order (unbatched)."""
        if self.batched:
            if valid is not None:
                idx = torch.where(valid, idx, self.T)
            self.idx.append(idx)
        self.vals.append(vals)

    def assemble(self) -> torch.Tensor:
        if not self.batched:
            ys = torch.cat(self.vals)
            if ys.shape[0] < self.T:  # a failed solve: the unreached outputs are NaN
                pad = ys.new_full((self.T - ys.shape[0],) + ys.shape[1:], float("nan"))
                ys = torch.cat([ys, pad])
            return ys
        vals = torch.cat(self.vals, dim=1)
        idx = torch.cat(self.idx, dim=1)
        idx = idx.view(idx.shape + (1,) * (vals.ndim - 2)).expand_as(vals)
        B = vals.shape[0]
        out = vals.new_full((B, self.T + 1) + vals.shape[2:], float("nan"))
        return out.scatter(1, idx, vals)[:, : self.T]


class _Loop:
    """State and iteration of one solve (internal: increasing time, flat state)."""

    def __init__(
        self,
        prob: Problem,
        tab: ButcherTableau,
        controller: PIController,
        norm: Norm,
        s: torch.Tensor,
        y0: torch.Tensor,
        *,
        step_size: float | None,
        first_step: float | None,
        max_num_steps: int,
        dense: bool,
    ) -> None:
        self.prob, self.tab, self.controller, self.norm = prob, tab, controller, norm
        self.batched = prob.batched
        self.y0 = y0
        self.dtype, self.device = y0.dtype, y0.device
        self.t_dtype = s.dtype
        if self.batched and s.ndim == 1:
            s = s.unsqueeze(0).expand(y0.shape[0], -1)
        self.s = s.contiguous()
        self.T = s.shape[-1]
        self.dims = tuple(range(1, y0.ndim)) if self.batched else tuple(range(y0.ndim))
        self.bshape = ((-1,) + (1,) * (y0.ndim - 1)) if self.batched else ()
        self.stepper = RKStepper.cached(tab, self.dtype, self.t_dtype, self.device)
        self.step_size, self.first_step = step_size, first_step
        self.max_num_steps = max_num_steps
        self.dense = dense
        self.record: list[tuple[torch.Tensor, ...]] = []
        self.replay_records: list[StepRecord] | None = None  # gradient="checkpoint" fills it

    # -- helpers -----------------------------------------------------------------------------
    def _row(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(self.bshape) if self.batched else x

    def _gather_s(self, idx: torch.Tensor) -> torch.Tensor:
        """Output times at per-row indices ``idx`` (``[B, m]``, or ``[m]``/``[]`` unbatched)."""
        if self.batched:
            return self.s.gather(1, idx)
        return self.s[idx]

    def _count_le(self, tv: torch.Tensor, right: bool) -> torch.Tensor:
        if self.batched:
            return torch.searchsorted(self.s, tv.unsqueeze(1), right=right).squeeze(1)
        return torch.searchsorted(self.s, tv, right=right)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Stats]:
        if self.T > 1 and not self.tab.adaptive:
            ys, status, t, stats = self._run_fixed()
        elif self.T > 1 and not self.batched:
            ys, status, t, stats = self._run_adaptive_scalar()
        else:
            ys, status, t, stats = self._run_adaptive()
        if not all_finite(ys):
            status, t = self._flag_nonfinite(ys, status, t)
        return ys, status, t, stats

    def _run_fixed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Stats]:
        """Fixed steps: the grid is known before the first step, so the loop has no host syncs
        and no per-step control; outputs between grid points come from cubic Hermite
        interpolation on the stored grid states and slopes (computed once, at the end)."""
        stepper, f, s = self.stepper, self.prob.func, self.s
        t0, t1 = s[..., 0], s[..., -1]
        if self.step_size is None:
            grid = s  # one step per output interval
            n_row = torch.full(t0.shape, self.T - 1, dtype=torch.long, device=self.device)
        else:
            # ceil(span / step), letting the last step stretch by up to 1% rather than leaving a
            # sliver; each row's grid is padded with its end time (zero steps) to the longest.
            n_row = torch.ceil((t1 - t0) / self.step_size - 0.01).long().clamp_(min=1)
            ks = torch.arange(int(n_row.max()) + 1, device=self.device, dtype=s.dtype)
            grid = t0.unsqueeze(-1) + ks * self.step_size
            grid = torch.where(ks >= n_row.unsqueeze(-1), t1.unsqueeze(-1), grid)
        n = grid.shape[-1] - 1
        gT = grid.T if self.batched else grid  # [n + 1, *rows]
        hs = gT.diff(dim=0)
        # Every evaluation time of the solve, in the state dtype, built once: row i holds the
        # step's start and its stage times.  One unbind up front leaves the step loop with
        # no tensor work besides the stages themselves.
        c0 = torch.cat([stepper.c.new_zeros(1), stepper.c])
        all_t = torch.addcmul(
            gT[:-1].unsqueeze(1), c0.view((1, -1) + (1,) * (gT.ndim - 1)), hs.unsqueeze(1)
        ).to(self.dtype)  # [n, stages, *rows]
        n_st = all_t.shape[1]
        flat_t = all_t.reshape((n * n_st,) + all_t.shape[2:]).unbind(0)
        h_list: Sequence[Any] = (
            hs.to(self.dtype).view((n,) + self.bshape).unbind(0) if self.batched else hs.tolist()
        )
        y, k0 = self.y0, self.prob.f0
        ys, fs = [y], [k0]
        step = stepper.step
        for i in range(n):
            j = i * n_st
            if i:
                k0 = f(flat_t[j], y)
                fs.append(k0)
            y, _ = step(f, flat_t[j + 1 : j + n_st], y, h_list[i], k0)
            ys.append(y)
        stages = stepper.tableau.stages
        nfe = n_row * stages
        Y = torch.stack(ys)
        if self.step_size is None:  # the grid is the output times
            k: torch.Tensor | None = None
            on_grid = True
        else:  # do all outputs fall on grid points?  (one host sync per solve)
            k = torch.searchsorted(grid, s).clamp_(max=n)
            on_grid = bool((grid.gather(-1, k) == s).all())
        if on_grid and not self.dense:
            if k is None:
                ys_out = Y.transpose(0, 1) if self.batched else Y
            elif self.batched:
                ys_out = Y[k, torch.arange(k.shape[0], device=self.device).unsqueeze(1)]
            else:
                ys_out = Y[k]
        else:
            fs.append(f(gT[-1].to(self.dtype), y))
            nfe += 1
            self._hermite = (grid, Y, torch.stack(fs))
            ys_out = self._hermite_eval(s)
        if self.replay_records is not None:
            self._record_fixed(grid, gT, hs, ys)
        status = torch.zeros_like(n_row)
        return ys_out, status, t1.clone(), Stats(nfe, n_row, n_row.clone(), n_row * 0)

    def _record_fixed(
        self, grid: torch.Tensor, gT: torch.Tensor, hs: torch.Tensor, ys: list[torch.Tensor]
    ) -> None:
        """Describe the fixed-step solve as replayable steps (``gradient="checkpoint"``)."""
        assert self.replay_records is not None
        s = self.s
        nxt = torch.searchsorted(s, grid[..., :-1].contiguous(), right=True)
        lt = torch.searchsorted(s, grid[..., 1:].contiguous(), right=False)
        le = torch.searchsorted(s, grid[..., 1:].contiguous(), right=True)
        moved = grid.diff(dim=-1) > 0  # padding steps of rows that already ended produce nothing
        n_in = torch.where(moved, lt - nxt, 0)
        n_end = torch.where(moved, le - lt, 0)
        if self.batched:  # [B, n] -> [n, B]
            nxt, lt, n_in, n_end = nxt.T, lt.T, n_in.T, n_end.T
            m_in, any_end = n_in.amax(1).tolist(), (n_end > 0).any(1).tolist()
        else:
            m_in, any_end = n_in.tolist(), (n_end > 0).tolist()
        for k in range(hs.shape[0]):
            self.replay_records.append(
                StepRecord(
                    gT[k],
                    hs[k],
                    ys[k],
                    (nxt[k], n_in[k], m_in[k]) if m_in[k] > 0 else None,
                    (lt[k], n_end[k] > 0) if any_end[k] else None,
                )
            )

    def _hermite_eval(self, sq: torch.Tensor) -> torch.Tensor:
        """Cubic Hermite interpolation on the fixed-step grid at internal times ``sq``
        (``[M]``, or ``[B, M]`` batched).  At grid points it returns the grid state exactly."""
        grid, Y, F = self._hermite
        n = grid.shape[-1] - 1
        k = (torch.searchsorted(grid, sq.contiguous(), right=False) - 1).clamp_(0, n - 1)
        g0, g1 = grid.gather(-1, k), grid.gather(-1, k + 1)
        h = g1 - g0
        th = ((sq - g0) / h.clamp(min=torch.finfo(h.dtype).tiny)).clamp(0, 1).to(self.dtype)
        if self.batched:
            b = torch.arange(k.shape[0], device=self.device).unsqueeze(1)
            y0, y1, f0, f1 = Y[k, b], Y[k + 1, b], F[k, b], F[k + 1, b]  # [B, M, ...]
        else:
            y0, y1, f0, f1 = Y[k], Y[k + 1], F[k], F[k + 1]  # [M, ...]
        shape = th.shape + (1,) * (Y.ndim - 1 - (1 if self.batched else 0))
        th, hy = th.view(shape), h.to(self.dtype).view(shape)
        th2 = th * th
        th3 = th2 * th
        h01 = 3 * th2 - 2 * th3
        out = y0 * (1 - h01) + y1 * h01 + hy * (f0 * (th - 2 * th2 + th3) + f1 * (th3 - th2))
        # On grid points return the grid state itself: a non-finite slope there (the field may
        # fail beyond this point) must not leak through its zero weight.
        return torch.where(th == 1, y1, torch.where(th == 0, y0, out))

    def _run_adaptive_scalar(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Stats]:
        """The adaptive loop for an unbatched solve: one row, so the step's single host sync
        (the error ratio) brings the whole control decision to Python floats.  Time, step
        size, counters and output bookkeeping cost no tensor operations, and each stage is a
        chain of ``add(alpha=h * a_ij)``.  Same decisions as :meth:`_run_adaptive` with one row
        (same controller arithmetic, in float64)."""
        prob, stepper, ctrl = self.prob, self.stepper, self.controller
        f, dtype, device = prob.func, self.dtype, self.device
        s_list: list[float] = self.s.tolist()
        t, t_end = s_list[0], s_list[-1]
        y = self.y0
        k0 = prob.f0
        nfe, n_steps, n_acc = 1, 0, 0
        if self.first_step is not None:
            h = float(self.first_step)
        else:
            with torch.no_grad():
                h0 = initial_step(
                    f,
                    self.s[0],
                    y,
                    k0,
                    stepper.tableau.error_order or 1,
                    prob.rtol,
                    prob.atol,
                    self.norm,
                    self.dims,
                    self.bshape,
                )
            h, nfe = float(h0), nfe + 1
        vals: list[torch.Tensor] = [y.unsqueeze(0)]
        nxt = 1
        status = Status.SUCCESS
        prev, rejected_last = 1.0, False
        eps = torch.finfo(self.t_dtype).eps
        while True:
            gap = t_end - t
            hit = h * 1.01 >= gap
            h_eff = gap if hit else h
            y1, ks = stepper.step(f, stepper.stage_times_scalar(t, h_eff), y, h_eff, k0)
            nfe += stepper.evals_per_step
            n_steps += 1
            with torch.no_grad():
                r = float(
                    stepper.error_ratio(
                        y, y1, h_eff, ks, prob.rtol, prob.atol, self.norm, self.dims
                    )
                )
            finite = math.isfinite(r)
            accept, h_next, prev = ctrl.adapt_scalar(r, h_eff, prev, rejected_last)
            rejected_last = not accept
            if accept:
                n_acc += 1
                t_new = t_end if hit else t + h_eff
                lt = bisect.bisect_left(s_list, t_new, lo=nxt)
                le = bisect.bisect_right(s_list, t_new, lo=lt)
                ks_all = None
                if lt > nxt or self.dense:
                    ks_all = stepper.extra_stages(f, t, y, h_eff, h_eff, y1, ks)
                    nfe += stepper.evals_extra
                if lt > nxt:
                    assert ks_all is not None
                    theta = torch.tensor(
                        [(x - t) / h_eff for x in s_list[nxt:lt]], dtype=dtype, device=device
                    )
                    vals.append(stepper.interpolate(y, h_eff, ks_all, theta, batched=False))
                if le > lt:
                    vals.append(y1.unsqueeze(0))
                self._record_scalar(t, h_eff, y, ks_all, nxt, lt, le)
                y, k0, t, nxt = y1, ks[-1], t_new, le
                if hit:
                    break
            res = 10 * eps * max(abs(t), abs(t_end))
            if h_eff <= res or not h_next > res:
                status = Status.STEP_SIZE_UNDERFLOW if finite else Status.NONFINITE
                break
            if n_steps >= self.max_num_steps:
                status = Status.MAX_STEPS_REACHED
                break
            h = h_next
        outputs = _Outputs(self.y0, self.T, batched=False)
        outputs.vals = vals
        tt = functools.partial(torch.tensor, device=device)
        stats = Stats(tt(nfe), tt(n_steps), tt(n_acc), tt(n_steps - n_acc))
        return (outputs.assemble(), tt(int(status)), tt(t, dtype=self.t_dtype), stats)

    def _record_scalar(
        self,
        t: float,
        h: float,
        y: torch.Tensor,
        ks_all: list[torch.Tensor] | None,
        nxt: int,
        lt: int,
        le: int,
    ) -> None:
        """Dense-output and checkpoint records of an accepted one-row step."""
        if self.dense:
            assert ks_all is not None
            tt = functools.partial(torch.tensor, dtype=self.t_dtype, device=self.device)
            self.record.append((tt(t), tt(h), y, torch.stack(ks_all)))
        if self.replay_records is not None:
            ti = functools.partial(torch.tensor, device=self.device)
            self.replay_records.append(
                StepRecord(
                    ti(t, dtype=self.t_dtype),
                    ti(h, dtype=self.t_dtype),
                    y,
                    (ti(nxt), ti(lt - nxt), lt - nxt) if lt > nxt else None,
                    (ti(lt), ti(True)) if le > lt else None,
                )
            )

    def _run_adaptive(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Stats]:
        prob, stepper = self.prob, self.stepper
        f = prob.func
        y = self.y0
        t = self.s[..., 0].clone()
        t_end = self.s[..., -1]
        rows = t.shape
        zeros_l = torch.zeros(rows, dtype=torch.long, device=self.device)
        status = zeros_l.clone()
        n_steps, n_acc, nfe = zeros_l.clone(), zeros_l.clone(), zeros_l + 1
        outputs = _Outputs(y, self.T, self.batched)
        if self.T == 1:
            return outputs.assemble(), status, t, Stats(nfe, n_steps, n_acc, n_steps - n_acc)
        nxt = zeros_l + 1  # per row: index of the next output time to produce
        running = t < t_end
        k0: torch.Tensor | None = prob.f0
        cstate = ControllerState.initial(t)
        if self.first_step is not None:
            h = torch.full(rows, self.first_step, dtype=self.t_dtype, device=self.device)
        else:
            with torch.no_grad():
                h = initial_step(
                    f,
                    t,
                    y,
                    prob.f0,
                    stepper.tableau.error_order or 1,
                    prob.rtol,
                    prob.atol,
                    self.norm,
                    self.dims,
                    self.bshape,
                )
            nfe += 1
        eps = torch.finfo(self.t_dtype).eps
        while True:
            gap = t_end - t
            hit = h * 1.01 >= gap  # land on the end rather than leave a sliver of a step
            h_eff = torch.where(running, torch.where(hit, gap, h), 0.0)
            h_y = self._row(h_eff.to(self.dtype))
            if k0 is None:  # a method without FSAL: the step starts with a fresh evaluation
                k0 = f(t.to(self.dtype), y)
                nfe += running
            y1, ks = stepper.step(f, stepper.stage_times(t, h_eff), y, h_y, k0)
            nfe += running * stepper.evals_per_step
            n_steps += running
            with torch.no_grad():  # step-size control is not differentiated
                ratio = stepper.error_ratio(
                    y, y1, h_y, ks, prob.rtol, prob.atol, self.norm, self.dims
                )
            accept, h, cstate = self.controller.adapt(ratio, h_eff, cstate)
            accept &= running
            n_acc += accept
            t_new = torch.where(accept, torch.where(hit, t_end, t + h_eff), t)
            done = accept & hit
            # Outputs strictly inside the step are interpolated; one on its end is y1 itself.
            lt = self._count_le(t_new, right=False)
            le = self._count_le(t_new, right=True)
            n_in = torch.where(accept, lt - nxt, 0)
            n_end = torch.where(accept, le - lt, 0)
            # Failures: the step fell below the time resolution, or too many steps.
            still = running & ~done
            # An accepted step that no longer moves t, or a next step below the resolution of t
            # (or NaN), cannot make progress.
            res = 10 * eps * torch.maximum(t.abs(), t_end.abs())
            under = still & ((h_eff <= res) | ~(h > res))
            code = torch.where(
                ~torch.isfinite(ratio), int(Status.NONFINITE), int(Status.STEP_SIZE_UNDERFLOW)
            )
            status = torch.where(under, code, status)
            maxed = still & ~under & (n_steps >= self.max_num_steps)
            status = torch.where(maxed, int(Status.MAX_STEPS_REACHED), status)
            still &= ~(under | maxed)
            # The step's one host sync: does any row run on, how many outputs fell inside the
            # step or on its end, and did every running row accept (then no merge is needed,
            # and an unbatched rejected step leaves no trace in the autograd graph).
            any_running, m_in, m_end, all_acc, any_acc = torch.stack(
                (still.any(), n_in.max(), n_end.max(), (accept | ~running).all(), accept.any())
            ).tolist()
            ks_all = None
            if m_in > 0 or (self.dense and any_acc):
                # The interpolant's extra stages (if any) are charged to the rows that use them.
                ks_all = stepper.extra_stages(f, t, y, h_eff, h_y, y1, ks)
                nfe += (accept if self.dense else n_in > 0) * stepper.evals_extra
            if m_in > 0:
                assert ks_all is not None
                self._interior_outputs(outputs, y, h_eff, h_y, t, nxt, n_in, m_in, ks_all)
            if m_end > 0:
                if self.batched:
                    outputs.add(lt.unsqueeze(1), y1.unsqueeze(1), (n_end > 0).unsqueeze(1))
                else:
                    outputs.add(lt, y1.unsqueeze(0), None)
            if self.replay_records is not None and any_acc:
                self.replay_records.append(
                    StepRecord(
                        t,
                        torch.where(accept, h_eff, 0.0),
                        y,
                        (nxt, n_in, m_in) if m_in > 0 else None,
                        (lt, n_end > 0) if m_end > 0 else None,
                    )
                )
            if self.dense and any_acc:
                assert ks_all is not None
                self.record.append((t, h_eff, y, torch.stack(ks_all, dim=1 if self.batched else 0)))
            # Advance the accepted rows (rows that stopped took a zero step: y1 == y there).
            fsal = ks[-1] if stepper.fsal else None
            if all_acc:
                y, k0 = y1, fsal
            elif self.batched:
                acc_y = self._row(accept)
                y = torch.where(acc_y, y1, y)
                k0 = None if fsal is None else torch.where(acc_y, fsal, k0)
            t = t_new
            nxt = torch.where(accept, le, nxt)
            running = still
            if not any_running:
                break
        return outputs.assemble(), status, t, Stats(nfe, n_steps, n_acc, n_steps - n_acc)

    def _interior_outputs(
        self,
        outputs: _Outputs,
        y: torch.Tensor,
        h: torch.Tensor,
        h_y: torch.Tensor,
        t: torch.Tensor,
        nxt: torch.Tensor,
        n_in: torch.Tensor,
        m: int,
        ks_all: list[torch.Tensor],
    ) -> None:
        j = torch.arange(m, device=self.device)
        if self.batched:
            idx = nxt.unsqueeze(1) + j
            valid = j < n_in.unsqueeze(1)
            ts = self._gather_s(idx.clamp(max=self.T - 1))
            theta = torch.where(
                valid, (ts - t.unsqueeze(1)) / h.clamp(min=1e-300).unsqueeze(1), 0.0
            )
            vals = self.stepper.interpolate(y, h_y, ks_all, theta.to(self.dtype), batched=True)
            outputs.add(idx, vals, valid)
        else:
            theta = (self.s[nxt + j] - t) / h
            vals = self.stepper.interpolate(y, h_y, ks_all, theta.to(self.dtype), batched=False)
            outputs.add(nxt + j, vals, None)

    def _flag_nonfinite(
        self, ys: torch.Tensor, status: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples whose reached outputs hold NaN/Inf fail with NONFINITE, reported at the first
        such output time (fixed-step methods have no error estimate to catch it in the loop)."""
        bad = ~torch.isfinite(ys.detach())
        if self.batched:
            bad_t = bad.reshape(bad.shape[0], bad.shape[1], -1).any(dim=2)  # [B, T]
        else:
            bad_t = bad.reshape(1, bad.shape[0], -1).any(dim=2)
        bad_t &= (status == Status.SUCCESS).reshape(-1, 1)
        rows = bad_t.any(dim=1)
        first = bad_t.long().argmax(dim=1)
        s2 = self.s if self.batched else self.s.unsqueeze(0)
        t_bad = s2.gather(1, first.unsqueeze(1)).squeeze(1)
        if not self.batched:
            rows, t_bad = rows[0], t_bad[0]
        return (torch.where(rows, int(Status.NONFINITE), status), torch.where(rows, t_bad, t))

    def interpolator(self, prob: Problem) -> Callable[[torch.Tensor], Any]:
        """Dense output over the solved interval (see :meth:`Solution.evaluate`): the method's
        own interpolant on the recorded steps, or Hermite on the fixed-step grid."""
        core = self._recorded_eval() if self.tab.adaptive else self._hermite_eval
        t0, t1 = self.s[..., 0], self.s[..., -1]
        sign = prob.sign

        def evaluate(t_user: torch.Tensor) -> Any:
            tq = t_user.to(device=self.device, dtype=self.t_dtype)
            scalar = tq.ndim == 0
            if self.batched:
                tq = tq.reshape(1, -1).expand(t0.shape[0], -1) if tq.ndim <= 1 else tq
                sq = tq * (sign.unsqueeze(1) if isinstance(sign, torch.Tensor) else sign)
                lo, hi = t0.unsqueeze(1), t1.unsqueeze(1)
            else:
                sq = tq.reshape(-1) * sign
                lo, hi = t0, t1
            slack = 1e-12 * (hi - lo).abs()
            if bool(((sq < lo - slack) | (sq > hi + slack)).any()):
                raise ValueError(
                    "Solution.evaluate: t lies outside the solved interval "
                    f"[{_fmt_time(t0 * sign)}, {_fmt_time(t1 * sign)}]"
                )
            out = prob.unflatten(core(sq))
            if not scalar:
                return out
            pick = (lambda o: o[:, 0]) if self.batched else (lambda o: o[0])
            return tuple(pick(o) for o in out) if isinstance(out, tuple) else pick(out)

        return evaluate

    def _recorded_eval(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The method's interpolant on the steps recorded by a dense adaptive solve."""
        ts = torch.stack([r[0] for r in self.record])  # [n, *rows]
        hs = torch.stack([r[1] for r in self.record])
        ys = torch.stack([r[2] for r in self.record])  # [n, *state]
        Ks = torch.stack([r[3] for r in self.record])  # [n, (B,) n_k, *features]
        if not self.batched:  # one row: give every record a batch dimension of 1
            ts, hs, ys, Ks = ts[:, None], hs[:, None], ys[:, None], Ks[:, None]
        # Steps of a row that had stopped (h == 0) come last: +inf keeps each row's keys sorted.
        # A rejected step shares its start with the retry after it, which the search prefers.
        key = torch.where(hs > 0, ts, torch.inf).T.contiguous()  # [B, n]
        stepper = self.stepper

        def core(sq: torch.Tensor) -> torch.Tensor:
            sqb = sq if self.batched else sq.unsqueeze(0)  # [B, M]
            i = (torch.searchsorted(key, sqb.contiguous(), right=True) - 1).clamp(0, len(ts) - 1)
            b = torch.arange(i.shape[0], device=self.device).unsqueeze(1)
            tt, hh, yy, KK = ts[i, b], hs[i, b], ys[i, b], Ks[i, b]  # [B, M, ...]
            theta = ((sqb - tt) / hh.clamp(min=1e-300)).clamp(0, 1).to(self.dtype)
            w = theta.unsqueeze(-1).pow(stepper.powers) @ stepper.P.T  # [B, M, n_k]
            dy = torch.einsum("bmk,bmkn->bmn", w, KK.flatten(3)).view(yy.shape)
            out = yy + hh.to(self.dtype).view(hh.shape + (1,) * (yy.ndim - 2)) * dy
            return out if self.batched else out[0]

        return core
