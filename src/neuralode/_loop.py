"""The solve loop: attempt a step, control it, commit it; per row.

Every iteration is two parts:

* the **attempt** (:meth:`_Run._attempt`): the solver's step, the controller's error ratio and
  decision, and the per-row merge of time, state, solver state and controller state.  It uses
  tensors only, with shapes fixed for the whole solve, and it may not synchronise with the host,
  branch in Python on tensor values, or touch outputs and records: it is what a compiled or
  CUDA-graph path wraps.
* the **commit** (:meth:`_Run._commit`): outputs inside or at the end of the accepted steps
  (interpolated through :mod:`neuralode.interpolation`), dense-output and replay records, and the
  decision to go on, with at most one host synchronisation (none on a fixed grid, whose plan is
  known before the first step).

Two drivers run this protocol.  The tensor driver (batched solves) keeps every row's time, step,
accept flag, counters and status in row tensors, so one hard sample does not shrink everyone's
step.  The float driver (unbatched solves: one row) keeps the clock and the decisions in Python
floats, where the step's one synchronisation (the error ratio) brings the whole decision to the
host and the bookkeeping costs no tensor operations.  Both call the same solver and controller
arithmetic; a test holds them to the same outputs and counts.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ._compiled import CompileOptions, drive, outcome_flags
from ._inputs import Callbacks, all_finite
from ._outputs import Outputs, StepRecord
from ._rows import per_row
from .controllers import FixedGrid, PIController
from .events import Cut, EventLog, EventTracker
from .interpolation import DenseRecord, evaluate
from .solution import Stats, Status
from .solvers.base import DenseStep, Func, Solver, StepResult

__all__ = ["LoopSpec", "LoopResult"]

#: Steps whose stage times a fixed-step solve builds at once: enough to amortise the building,
#: few enough that what the loop holds stays bounded (one tensor per evaluation time).
_TIMES_CHUNK = 256


class LoopResult(NamedTuple):
    """What a loop returns (internal time, flat state).

    Attributes:
        ys: outputs, ``[T, *state]`` unbatched or ``[batch, T, *features]``.
        status: per-row :class:`Status` codes.
        t_end: the time each row reached (time dtype).
        stats: per-row work counters.
        h_next: the step the controller would take next, per row (a float unbatched), for a
            solve that continues from ``t_end`` (the adjoint's next output interval); a final step
            shortened to land on ``t_end`` does not shrink it.  ``None`` for fixed steps.
        dense: the accepted steps' interpolants (``dense=True``), else ``None``.
        records: the accepted steps for replay (``record=True``), else ``None``.
        events: what the events found (a solve with events), else ``None``.
        ok: whether every row succeeded or stopped at a terminal event, read in the same host
            synchronisation as the outputs' finiteness; ``None`` when not known (then the
            status says).
    """

    ys: torch.Tensor
    status: torch.Tensor
    t_end: torch.Tensor
    stats: Stats
    h_next: torch.Tensor | float | None
    dense: list[DenseRecord] | None
    records: list[StepRecord] | None
    events: EventLog | None = None
    ok: bool | None = None


@dataclass(frozen=True)
class LoopSpec:
    """Everything a loop needs besides where it starts: a way to run the loop, handed to the
    gradient strategies (they run it forward, and replay its records with ``solver``).

    Attributes:
        func: the internal vector field (increasing time, flat state).
        solver: the method.
        controller: the step-size controller (adaptive methods), ``None`` for fixed steps.
        batched: whether rows are independent problems (the tensor driver).
        step_size: fixed steps: the step, or ``None`` for one step per output interval.
        first_step: adaptive methods: the first step, or ``None`` for Hairer's selection.
        max_num_steps: attempted steps allowed per row (adaptive methods).
        dense: keep every accepted step's interpolant for :meth:`Solution.evaluate`.
        step_t: adaptive methods: internal times (mirrored as the outputs are: ``[K]``, or
            ``[batch, K]`` per row) where steps end; ``None`` for none.
        jump_t: as ``step_t``, and the solver's carried state restarts there (the field may
            jump: an FSAL method's last stage is not reused across it).
        callbacks: called around each step by the unbatched (float) driver (torchdiffeq's
            callbacks; the entry refuses them for a batched solve).
        perturb: fixed steps of the unbatched driver: each step sees ``f`` from inside itself,
            a stage at the step's start time one ulp after it and one at its end one ulp
            before it (torchdiffeq's ``perturb``; :class:`PerturbedField`).
        events: batched solves: ``events(t0, y0) -> EventTracker``, the events the commit
            checks on every accepted step (:mod:`neuralode.events`); ``None`` for none.
        compile: run the attempts in compiled blocks (:mod:`neuralode._compiled`; explicit
            Runge-Kutta and Rosenbrock methods, no events, dense output, records, step or jump
            times, callbacks or perturbation); ``None``: the eager drivers.
    """

    func: Func
    solver: Solver
    controller: PIController | None
    batched: bool
    step_size: float | None = None
    first_step: float | None = None
    max_num_steps: int = 100_000
    dense: bool = False
    step_t: torch.Tensor | None = None
    jump_t: torch.Tensor | None = None
    callbacks: Callbacks = Callbacks()
    perturb: bool = False
    events: Callable[[torch.Tensor, torch.Tensor], EventTracker] | None = None
    compile: CompileOptions | None = None

    def __post_init__(self) -> None:
        # A Newton iteration stops at the solve's own tolerances (see Solver.configured).
        object.__setattr__(self, "solver", self.solver.configured(self.controller))

    def run(
        self,
        y0: torch.Tensor,
        f0: torch.Tensor | None,
        out_times: torch.Tensor,
        *,
        first_step: torch.Tensor | float | None = None,
        record: bool = False,
        carry_step: bool = False,
    ) -> LoopResult:
        """Solve from ``y0`` at ``out_times[..., 0]`` and return the outputs at ``out_times``.

        Args:
            y0: start state (internal layout).
            f0: ``func(out_times[..., 0], y0)`` when known (counted as one evaluation), else
                ``None``.
            out_times: strictly increasing output times, ``[T]``, or ``[batch, T]`` batched
                (time dtype).
            first_step: adaptive methods: the first step, instead of ``self.first_step``.
            record: keep the accepted steps for replay (the checkpoint strategy).
            carry_step: report ``LoopResult.h_next`` (a solve that continues from the end).
        """
        return _Run(self, y0, f0, out_times, first_step, record, carry_step).run()


class _Attempt(NamedTuple):
    """The attempt's results that the commit needs (row tensors)."""

    t: torch.Tensor  # start of the step
    h: torch.Tensor  # the step taken (0 on rows that did not run)
    h_proposed: torch.Tensor  # the step the controller proposed before landing on the end
    running: torch.Tensor  # rows that attempted this step
    y: torch.Tensor  # start state
    result: StepResult
    accept: torch.Tensor
    t_new: torch.Tensor
    still: torch.Tensor  # rows that run on after this step
    under: torch.Tensor | None  # rows whose step size underflowed (adaptive methods)


class _Carry(NamedTuple):
    """The tensor driver's state between attempts."""

    t: torch.Tensor
    y: torch.Tensor
    h: torch.Tensor
    solver_state: Any
    controller_state: Any
    running: torch.Tensor
    status: torch.Tensor
    nfe: torch.Tensor
    n_steps: torch.Tensor
    n_accepted: torch.Tensor
    njev: torch.Tensor
    nlu: torch.Tensor
    n_newton: torch.Tensor


class _Run:
    """One solve's loop (internal: increasing time, flat state)."""

    def __init__(
        self,
        spec: LoopSpec,
        y0: torch.Tensor,
        f0: torch.Tensor | None,
        out_times: torch.Tensor,
        first_step: torch.Tensor | float | None,
        record: bool,
        carry_step: bool,
    ) -> None:
        self.spec, self.f, self.solver = spec, spec.func, spec.solver
        self.controller = spec.controller
        self.batched = spec.batched
        self.y0, self.f0 = y0, f0
        self.dtype, self.device = y0.dtype, y0.device
        if self.batched and out_times.ndim == 1:
            out_times = out_times.unsqueeze(0).expand(y0.shape[0], -1)
        self.out_times = out_times.contiguous()
        self.t_dtype = out_times.dtype
        self.T = out_times.shape[-1]
        self.first_step = first_step if first_step is not None else spec.first_step
        self.grid = (
            FixedGrid(self.out_times, spec.step_size)
            if self.controller is None and self.T > 1
            else None
        )
        self.dense: list[DenseRecord] | None = [] if spec.dense else None
        self.records: list[StepRecord] | None = [] if record else None
        self.carry_step = carry_step
        self._chunk: Any = None
        # A fixed-step row whose step failed (a Newton iteration) stops; until one has, every
        # running row takes the grid's step as it is (no masking in the hot loop).
        self._row_failed = False
        self._events: EventTracker | None = None
        if spec.events is not None and not self.batched:
            raise ValueError("events are checked by the batched (tensor) driver only")
        self._t_end = self.out_times[..., -1]
        # The smallest step that moves the clock is relative to where the row is (as scipy's
        # and Hairer's codes), not to where it ends: Robertson's kinetics to t = 4e10 starts
        # with steps of 1e-6, below the end's resolution (9e-5).  The floor, eps^2 of the span,
        # keeps a row that fails at t = 0 from halving its step a thousand times.
        span = (self._t_end - self.out_times[..., 0]).abs()
        self._t_floor = span * torch.finfo(self.t_dtype).eps
        # Steps below 10 ulps of the clock cannot make progress.
        self._resolution = 10 * torch.finfo(self.t_dtype).eps
        # Times a step ends on: the outputs (for a solver whose interpolant is less accurate
        # than its steps), step_t, and one ulp before each jump_t (the step's last stage sees
        # the field's left side; the row then moves to one ulp after the jump and restarts,
        # so the next step's first stage sees the right side: torchdiffeq's perturbation).
        on_outputs = bool(getattr(self.solver, "lands_on_outputs", False)) and self.T > 2
        adaptive = self.controller is not None
        jumps = self._rowwise(spec.jump_t) if adaptive else None
        self._jumps = None if jumps is None else torch.nextafter(jumps, jumps.new_tensor(-math.inf))
        extra = [x for x in (self._rowwise(spec.step_t), self._jumps) if x is not None]
        self._land = adaptive and (on_outputs or bool(extra))
        self._target = self._t_end
        self._target_is_end: torch.Tensor | bool = True
        # A solver may land on outputs on some rows only (``Solver.landing``: auto's stiff rows);
        # the other rows then aim at the targets without the outputs.
        self._targets_free: torch.Tensor | None = None
        if self._land:
            base = [self.out_times[..., -1:]]
            base += [torch.minimum(x, self.out_times[..., -1:]) for x in extra]
            parts = [self.out_times, *base[1:]] if on_outputs else base
            self._targets = torch.cat(parts, dim=-1).sort(dim=-1).values.contiguous()
            if on_outputs and getattr(self.solver, "lands_per_row", False):
                self._targets_free = torch.cat(base, dim=-1).sort(dim=-1).values.contiguous()

    def _rowwise(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Internal step times laid out as the output times are (``[batch, K]`` batched)."""
        if x is None:
            return None
        x = x.to(self.t_dtype)
        if self.out_times.ndim == 2 and x.ndim == 1:
            x = x.unsqueeze(0).expand(self.out_times.shape[0], -1)
        return x

    def _retarget(self, t: torch.Tensor, solver_state: Any) -> None:
        """Each row's next landing time: the first target after its time (among the outputs
        too where the solver lands on them)."""

        def first_after(targets: torch.Tensor) -> torch.Tensor:
            idx = torch.searchsorted(targets, t.unsqueeze(1), right=True)
            return targets.gather(1, idx.clamp(max=targets.shape[-1] - 1)).squeeze(1)

        self._target = first_after(self._targets)
        if self._targets_free is not None:
            lands = torch.as_tensor(self.solver.landing(solver_state), device=t.device)
            self._target = torch.where(lands, self._target, first_after(self._targets_free))
        self._target_is_end = self._target >= self._t_end

    def _jumped(self, c: _Carry, att: _Attempt) -> _Carry:
        """Rows that landed one ulp before a jump move to one ulp after it and restart their
        solver's carried state there."""
        assert self._jumps is not None
        jumped = att.accept & (self._jumps == att.t_new.unsqueeze(1)).any(dim=1)
        jumped &= att.t_new < self._t_end
        if not bool(jumped.any()):
            return c
        inf = c.t.new_tensor(math.inf)
        t = torch.where(jumped, torch.nextafter(torch.nextafter(c.t, inf), inf), c.t)
        fresh = self.solver.init(self.f, t, c.y, None)
        return c._replace(t=t, solver_state=self.solver.merge(jumped, fresh, c.solver_state))

    # -- shared ---------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        flags = None  # (a compiled loop computes them in its graph)
        if self.T == 1:
            ys, status, t_end, stats, h_next = self._no_steps()
        elif self.spec.compile is not None and self.records is None:
            ys, status, t_end, stats, h_next, flags = self._compiled_driver(self.spec.compile)
        elif self.batched:
            ys, status, t_end, stats, h_next = self._tensor_driver()
        else:
            ys, status, t_end, stats, h_next = self._float_driver()
        # One host synchronisation: the outputs' finiteness and every row's success.
        if flags is None:
            flags = outcome_flags(ys, status)
        finite, ok = flags.tolist()
        if not finite and not all_finite(ys):  # (a sum that overflowed: the elements decide)
            status, t_end = self._flag_nonfinite(ys, status, t_end)
            ok = None
        log = None
        if self.spec.events is not None:
            tracker = self._events or self.spec.events(self.out_times[:, 0], self.y0)
            log = tracker.log()
        return LoopResult(ys, status, t_end, stats, h_next, self.dense, self.records, log, ok)

    def _compiled_driver(self, opts: CompileOptions) -> tuple[Any, ...]:
        spec = self.spec
        return drive(
            self.f,
            self.solver,
            self.controller,
            self.batched,
            self.y0,
            self.f0,
            self.out_times,
            step_size=spec.step_size,
            grid_steps=None if self.grid is None else self.grid.n,
            first_step=self.first_step,
            t_floor=self._t_floor,
            resolution=self._resolution,
            max_num_steps=spec.max_num_steps,
            carry_step=self.carry_step,
            opts=opts,
        )

    def _no_steps(self) -> tuple[Any, ...]:
        rows = self.out_times.shape[:-1]
        zeros = torch.zeros(rows, dtype=torch.long, device=self.device)
        ys = Outputs(self.y0, 1, self.batched).assemble()
        nfe = zeros + int(self.f0 is not None)
        return (
            ys,
            zeros.clone(),
            self.out_times[..., 0].clone(),
            Stats(nfe, zeros, zeros, zeros, zeros, zeros, zeros),  # (no Newton iteration either)
            None,
        )

    def _keep_dense(self, t: Any, h: Any, d: DenseStep) -> None:
        """Keep an accepted step's interpolant for :meth:`Solution.evaluate`."""
        assert self.dense is not None
        dim = 1 if self.batched else 0
        tt = torch.as_tensor(t, dtype=self.t_dtype, device=self.device)
        hh = torch.as_tensor(h, dtype=self.t_dtype, device=self.device)
        self.dense.append(DenseRecord(tt, hh, d.y0, torch.stack(list(d.ks), dim=dim), d.P))

    def _flag_nonfinite(
        self, ys: torch.Tensor, status: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows whose reached outputs hold NaN/Inf fail with NONFINITE, reported at the first
        such output time (fixed-step methods have no error estimate to catch it in the loop)."""
        bad = ~torch.isfinite(ys.detach())
        if self.batched:
            bad_t = bad.reshape(bad.shape[0], bad.shape[1], -1).any(dim=2)  # [B, T]
        else:
            bad_t = bad.reshape(1, bad.shape[0], -1).any(dim=2)
        bad_t &= (status == Status.SUCCESS).reshape(-1, 1)
        rows = bad_t.any(dim=1)
        first = bad_t.long().argmax(dim=1)
        times = self.out_times if self.batched else self.out_times.unsqueeze(0)
        t_bad = times.gather(1, first.unsqueeze(1)).squeeze(1)
        if not self.batched:
            rows, t_bad = rows[0], t_bad[0]
        return (torch.where(rows, int(Status.NONFINITE), status), torch.where(rows, t_bad, t))

    # -- the tensor driver ------------------------------------------------------------------------
    def _tensor_driver(self) -> tuple[Any, ...]:
        f, solver = self.f, self.solver
        t = self.out_times[:, 0].clone()
        zeros = torch.zeros(t.shape, dtype=torch.long, device=self.device)
        c = _Carry(
            t=t,
            y=self.y0,
            h=torch.zeros_like(t),
            solver_state=solver.init(f, t, self.y0, self.f0),
            controller_state=None,
            running=torch.ones_like(t, dtype=torch.bool),  # times increase strictly
            status=zeros.clone(),
            nfe=zeros + int(self.f0 is not None),
            n_steps=zeros.clone(),
            n_accepted=zeros.clone(),
            njev=zeros.clone(),
            nlu=zeros.clone(),
            n_newton=zeros.clone(),
        )
        if self.controller is not None:
            h, nfe = self._first_step_tensor(t)
            c = c._replace(h=h, controller_state=self.controller.init(t), nfe=c.nfe + nfe)
        if self.spec.events is not None:
            self._events = self.spec.events(t, self.y0)
        outputs = Outputs(self.y0, self.T, batched=True)
        next_out = zeros + 1  # per row: index of the next output time to produce
        plan = self._fixed_plan() if self.grid is not None else None
        h_next = c.h
        k = 0
        if self._land:
            self._retarget(c.t, c.solver_state)
        while True:
            c, att = self._attempt(c, k)
            c, next_out, go_on = self._commit(c, att, next_out, outputs, plan, k)
            if self._jumps is not None and go_on:
                c = self._jumped(c, att)
            if self._land:
                self._retarget(c.t, c.solver_state)
            if self.carry_step:
                # A step shortened to land on the end says nothing against the one proposed.
                landed = att.accept & ~att.still
                h_next = torch.where(landed, torch.maximum(c.h, att.h_proposed), h_next)
            k += 1
            if not go_on:
                break
        stats = Stats(
            c.nfe, c.n_steps, c.n_accepted, c.n_steps - c.n_accepted, c.njev, c.nlu, c.n_newton
        )
        return outputs.assemble(), c.status, c.t, stats, h_next if self.carry_step else None

    def _first_step_tensor(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.first_step is not None:
            h = torch.as_tensor(self.first_step, dtype=self.t_dtype, device=self.device)
            return h.expand(t.shape).clone(), 0
        assert self.controller is not None
        if self.f0 is None:
            raise ValueError("the initial step needs f(t0, y0): pass f0 or first_step")
        return self.controller.initial_step(self.f, t, self.y0, self.f0), 1

    def _attempt(self, c: _Carry, k: int) -> tuple[_Carry, _Attempt]:
        """One attempt on every row (pure: tensors only, no host synchronisation).

        The new carry has the rows' new times, proposed steps, controller states, counters and
        statuses.  The state and the solver's carried state are merged per row by the commit
        (:meth:`_advance`): its synchronisation says whether every row accepted, and then the
        two ``where`` over the whole state are skipped (a compiled attempt merges them itself).
        """
        solver, ctrl, t, y, running = self.solver, self.controller, c.t, c.y, c.running
        if self.grid is not None:  # fixed steps: the grid's step k (none for a stopped row)
            h = self.grid.steps[k]
            if self._row_failed:
                h = torch.where(running, h, 0.0)
            res = solver.step(self.f, t, h, y, c.solver_state, self._times(k))
            ratio, accept, cstate, h_prop = None, running, c.controller_state, c.h
            if res.status is not None:  # a fixed step cannot shrink: a failed row stops
                accept = accept & (res.status == 0)
            t_new = torch.where(accept, self.grid.times[k + 1], t)
            done = accept & (k + 1 == self.grid.n_steps)
        else:
            assert ctrl is not None
            t_end = self._target
            gap = t_end - t
            if self._jumps is not None:  # no stage past the ulp before a jump
                gap = torch.where(t + gap > t_end, torch.nextafter(gap, torch.zeros_like(gap)), gap)
            hit = c.h * 1.01 >= gap  # land on the end rather than leave a sliver of a step
            h = torch.where(running, torch.where(hit, gap, c.h), 0.0)
            res = solver.step(self.f, t, h, y, c.solver_state)
            assert res.y_error is not None, f"adaptive solver {solver!r} gave no error estimate"
            ratio = ctrl.error_ratio(y, res.y1, res.y_error, solver.error_norm)
            if res.status is not None:  # a step that failed on its own is rejected
                ratio = torch.where(res.status == 0, ratio, torch.inf)
            accept, h_prop, cstate = ctrl.adapt(ratio, h, c.controller_state)
            accept &= running
            t_new = torch.where(accept, torch.where(hit, t_end, t + h), t)
            done = accept & hit
            if self._land:  # a step shortened to land on a step time does not shrink the next
                landed = done & ~self._target_is_end
                done = done & self._target_is_end
                h_prop = torch.where(landed, torch.maximum(h_prop, c.h), h_prop)
        n_steps = c.n_steps + running
        still = running & ~done
        status = c.status
        if ratio is None and res.status is not None:
            failed = running & (res.status != 0)
            status = torch.where(failed, res.status, status)
            still = still & ~failed
        if ratio is not None:
            # An accepted step that no longer moves t, or a next step below the resolution of t
            # (or NaN), cannot make progress; nor can a row out of steps.
            res_t = torch.maximum(t.abs(), self._t_floor).mul_(self._resolution)
            under = still & ((h <= res_t) | ~(h_prop > res_t))
            # The commit says why (step size, non-finite values, the solver's own failure).
            status = torch.where(under, int(Status.STEP_SIZE_UNDERFLOW), status)
            maxed = still & ~under & (n_steps >= self.spec.max_num_steps)
            status = torch.where(maxed, int(Status.MAX_STEPS_REACHED), status)
            still = still & ~(under | maxed)
        carry = _Carry(
            t_new,
            y,
            h_prop,
            c.solver_state,
            cstate,
            still,
            status,
            c.nfe + running * res.nfe,
            n_steps,
            c.n_accepted + accept,
            _count(c.njev, running, res.njev),
            _count(c.nlu, running, res.nlu),
            _count(c.n_newton, running, res.n_newton),
        )
        attempt = _Attempt(
            t,
            h,
            c.h,
            running,
            y,
            res,
            accept,
            t_new,
            still,
            under if ratio is not None else None,
        )
        return carry, attempt

    def _times(self, k: int) -> Any:
        """The solver's stage times of fixed step ``k``, built a chunk of steps at a time."""
        assert self.grid is not None
        if k % _TIMES_CHUNK == 0:
            steps = self.grid.steps[k : k + _TIMES_CHUNK]
            starts = self.grid.times[k : k + steps.shape[0]]
            self._chunk = self.solver.stage_times(starts, steps, self.dtype)
        return None if self._chunk is None else self._chunk[k % _TIMES_CHUNK]

    def _fixed_plan(self) -> list[tuple[int, int]]:
        """For each fixed step, the most outputs a row has inside it and at its end (one host
        synchronisation for the whole solve)."""
        assert self.grid is not None
        grid, out = self.grid.grid, self.out_times
        next_out = torch.searchsorted(out, grid[..., :-1].contiguous(), right=True)
        below = torch.searchsorted(out, grid[..., 1:].contiguous(), right=False)
        upto = torch.searchsorted(out, grid[..., 1:].contiguous(), right=True)
        moved = grid.diff(dim=-1) > 0
        most_inside = torch.where(moved, below - next_out, 0).amax(0)
        most_at_end = torch.where(moved, upto - below, 0).amax(0)
        return list(zip(most_inside.tolist(), most_at_end.tolist()))

    def _commit(
        self,
        c: _Carry,
        att: _Attempt,
        next_out: torch.Tensor,
        outputs: Outputs,
        plan: list[tuple[int, int]] | None,
        k: int,
    ) -> tuple[_Carry, torch.Tensor, bool]:
        """Outputs, records and the decision to go on, for the accepted rows of an attempt."""
        res = att.result  # the step as taken (its interpolant's end is res.y1)
        memo: list[tuple[DenseStep, int, Any]] = []
        grad_mode = torch.is_grad_enabled()  # the events locate without a graph

        def dense() -> DenseStep:
            if not memo:
                with torch.set_grad_enabled(grad_mode):
                    memo.append(self.solver.dense(self.f, att.t, att.h, att.y, res))
            return memo[0][0]

        y_end = res.y1  # the state at each row's new time (before a reset)
        cut = None
        if self._events is not None:
            h_rows = att.h.expand_as(att.t) if att.h.ndim < att.t.ndim else att.h
            cut = self._events.commit(att.t, h_rows, att.t_new, res.y1, att.accept, dense)
            if cut is not None:
                c, att = self._cut(c, att, cut)
                c = c._replace(nfe=c.nfe + cut.nfe)
                y_end = torch.where(per_row(cut.rows, y_end.ndim), cut.y_event, y_end)
        accept = att.accept
        if plan is not None and plan[k] == (0, 0):
            # A fixed step that reaches no output: no search, nothing to place.
            below = upto = next_out
            n_inside = n_at_end = torch.zeros_like(next_out)
        else:
            out_times, t_new = self.out_times, att.t_new.unsqueeze(1)
            below = torch.searchsorted(out_times, t_new, right=False).squeeze(1)
            upto = torch.searchsorted(out_times, t_new, right=True).squeeze(1)
            n_inside = torch.where(accept, below - next_out, 0)
            n_at_end = torch.where(accept, upto - below, 0)
        if plan is not None:  # a fixed grid: everything known in advance
            go_on, all_acc, any_acc = k + 1 < len(plan), True, True
            most_inside, most_at_end = plan[k]
            if res.status is not None:  # but a row whose step failed (Newton) stops there
                all_acc, any_acc = torch.stack(
                    ((accept | ~att.running).all(), accept.any())
                ).tolist()
                self._row_failed = self._row_failed or not all_acc
            if cut is not None and bool(cut.terminal.any()):  # rows stopped by an event
                self._row_failed = True
                go_on = go_on and bool(att.still.any())
        else:
            # The step's one host sync: does any row run on, how many outputs fell inside the
            # step or on its end, did every running row accept, did a row's step underflow.
            assert att.under is not None
            go_on, most_inside, most_at_end, all_acc, any_acc, any_under = torch.stack(
                (
                    att.still.any(),
                    n_inside.max(),
                    n_at_end.max(),
                    (accept | ~att.running).all(),
                    accept.any(),
                    att.under.any(),
                )
            ).tolist()
            if any_under:
                c = c._replace(status=self._why_underflow(c.status, att))
        choice = self.solver.choice(c.solver_state) if self.records is not None else None
        c = self._advance(c, att, all_acc, any_acc)
        d = None
        if most_inside > 0 or (self.dense is not None and any_acc) or memo:
            used_by_events = bool(memo)
            d = dense()
            _, extra, next_state = memo[0]
            uses = n_inside > 0 if self.dense is None and not used_by_events else accept
            if next_state is not None:
                # The interpolant evaluated f(t + h, y1): it starts the next step of every row
                # that accepted (the others keep their own), so each is charged for it.
                if not all_acc:
                    next_state = self.solver.merge(accept, next_state, _kept_state(res, c))
                c = c._replace(solver_state=next_state)
                uses = uses | att.still
            c = c._replace(nfe=c.nfe + (accept & uses) * extra)
        if cut is not None and bool(cut.reset.any()):
            c = self._restart(c, cut.reset)
        if most_inside > 0:
            assert d is not None
            j = torch.arange(most_inside, device=self.device)
            idx = next_out.unsqueeze(1) + j
            valid = j < n_inside.unsqueeze(1)
            ts = self.out_times.gather(1, idx.clamp(max=self.T - 1))
            theta = torch.where(
                valid, (ts - att.t.unsqueeze(1)) / att.h.clamp(min=1e-300).unsqueeze(1), 0.0
            )
            outputs.add(idx, evaluate(d, theta, batched=True), valid)
        if most_at_end > 0:
            outputs.add(below.unsqueeze(1), y_end.unsqueeze(1), (n_at_end > 0).unsqueeze(1))
        if any_acc:
            h_acc = torch.where(accept, att.h, 0.0)
            if self.records is not None:
                self.records.append(
                    StepRecord(
                        att.t,
                        h_acc,
                        att.y,
                        (next_out, n_inside, most_inside) if most_inside > 0 else None,
                        (below, n_at_end > 0) if most_at_end > 0 else None,
                        choice,
                    )
                )
            if self.dense is not None:
                # A row that rejected keeps its start time as its key (its retry, recorded later
                # with the same start, is the one the search finds): the keys stay sorted.
                assert d is not None
                # (a fixed step that failed is kept as no step: the row stays where it was)
                self._keep_dense(att.t, att.h if plan is None else h_acc, d)
        next_out = torch.where(accept, upto, next_out)
        if self.grid is not None and cut is not None and bool(cut.reset.any()):
            # (a row that jumped at the grid time itself is on the grid already)
            behind = cut.reset & c.running & (c.t < self.grid.times[k + 1])
            c, next_out = self._back_on_grid(c, behind, next_out, outputs, k)
            go_on = (plan is None or k + 1 < len(plan)) and bool(c.running.any())
        return c, next_out, bool(go_on)

    def _back_on_grid(
        self, c: _Carry, rows: torch.Tensor, next_out: torch.Tensor, outputs: Outputs, k: int
    ) -> tuple[_Carry, torch.Tensor]:
        """Fixed steps: rows that jumped at an event inside step ``k`` step from the event to
        the step's grid end (a partial step, committed as any step: its outputs, its events,
        and a jump inside it again), so that every row takes the grid's next step."""
        assert self.grid is not None
        end = self.grid.times[k + 1]
        h = torch.where(rows, end - c.t, 0.0)
        res = self.solver.step(self.f, c.t, h, c.y, c.solver_state)
        accept = rows if res.status is None else rows & (res.status == 0)
        still = c.running
        status = c.status
        if res.status is not None:
            failed = rows & (res.status != 0)
            status = torch.where(failed, res.status, status)
            still = still & ~failed
            self._row_failed = True
        t_new = torch.where(accept, end, c.t)
        c2 = c._replace(
            t=t_new,
            running=still,
            status=status,
            nfe=c.nfe + rows * res.nfe,
            n_steps=c.n_steps + rows,
            n_accepted=c.n_accepted + accept,
            njev=_count(c.njev, rows, res.njev),
            nlu=_count(c.nlu, rows, res.nlu),
            n_newton=_count(c.n_newton, rows, res.n_newton),
        )
        att = _Attempt(c.t, h, c.h, rows, c.y, res, accept, t_new, still, torch.zeros_like(rows))
        c2, next_out, _ = self._commit(c2, att, next_out, outputs, None, k)
        return c2, next_out

    def _cut(self, c: _Carry, att: _Attempt, cut: Cut) -> tuple[_Carry, _Attempt]:
        """Rows whose step an event cut end it at the event: a terminal one stops there, a
        reset goes on from the new state (even if its step had reached the end)."""
        t_new = torch.where(cut.rows, cut.t, att.t_new)
        # (a reset at the row's last time ends the row: the output there is the state before it)
        goes_on = cut.reset & (c.status == 0) & (t_new < self._t_end)
        still = (att.still | goes_on) & ~cut.terminal
        status = torch.where(cut.terminal, int(Status.EVENT), c.status)
        rows = per_row(cut.rows, cut.y_next.ndim)
        res = att.result._replace(y1=torch.where(rows, cut.y_next, att.result.y1))
        c = c._replace(t=t_new, running=still, status=status)
        return c, att._replace(t_new=t_new, still=still, result=res)

    def _restart(self, c: _Carry, rows: torch.Tensor) -> _Carry:
        """Rows whose state jumped (an event's reset) start afresh from it: the solver's
        carried state, and (adaptive methods) the step, Hairer's starting step from the new
        state where it is smaller than the proposed one: the solution after a jump may turn
        back to the event surface sooner than the last step's size."""
        f_new = self.f(c.t.to(self.dtype), c.y)
        fresh = self.solver.init(self.f, c.t, c.y, f_new)
        state = self.solver.merge(rows, fresh, c.solver_state)
        nfe = c.nfe + rows
        h = c.h
        if self.controller is not None:
            h0 = self.controller.initial_step(self.f, c.t, c.y, f_new)
            h = torch.where(rows, torch.minimum(h0, c.h), c.h)
            nfe = nfe + rows
        return c._replace(solver_state=state, h=h, nfe=nfe)

    def _why_underflow(self, status: torch.Tensor, att: _Attempt) -> torch.Tensor:
        """The status of rows whose step size underflowed: their solver's own failure, else
        non-finite values in the step, else the step size (a tolerance the dtype cannot
        resolve makes the error ratio overflow while the step's numbers are finite)."""
        assert att.under is not None
        res = att.result
        code = torch.where(
            _finite_rows(res, self.batched),
            int(Status.STEP_SIZE_UNDERFLOW),
            int(Status.NONFINITE),
        )
        if res.status is not None:
            code = torch.where(res.status == 0, code, res.status)
        return torch.where(att.under, code, status)

    def _advance(self, c: _Carry, att: _Attempt, all_acc: bool, any_acc: bool) -> _Carry:
        """The accepted rows take the step's state and carried state (rows that stopped took a
        zero step: y1 == y there); the others keep their state and the carried state for a retry
        (the step's own, else what they had), as in the float driver."""
        res = att.result
        if all_acc:
            return c._replace(y=res.y1, solver_state=res.state)
        kept = _kept_state(res, c)
        if not any_acc:
            return c._replace(solver_state=kept)
        y = torch.where(per_row(att.accept, att.y.ndim), res.y1, att.y)
        return c._replace(y=y, solver_state=self.solver.merge(att.accept, res.state, kept))

    # -- the float driver -------------------------------------------------------------------------
    def _t(self, x: float) -> torch.Tensor:
        """A host time as the callbacks receive it (a tensor in the time dtype)."""
        return torch.tensor(x, dtype=self.t_dtype, device=self.device)

    def _float_driver(self) -> tuple[Any, ...]:
        if self.grid is not None:
            return self._float_fixed()
        return self._float_adaptive()

    def _float_fixed(self) -> tuple[Any, ...]:
        """Fixed steps of one row: the grid is known, so there is no host synchronisation."""
        assert self.grid is not None
        solver, f = self.solver, self.f
        times: list[float] = self.grid.times.tolist()
        steps: list[float] = self.grid.steps.tolist()
        commit = _FloatCommit(self)
        perturb = self.spec.perturb
        # Perturbed, no step starts from a stage evaluated at a grid time itself.
        y, state = self.y0, solver.init(f, times[0], self.y0, None if perturb else self.f0)
        nfe = int(self.f0 is not None)
        njev = nlu = n_newton = 0
        status, t_reached = Status.SUCCESS, times[-1]
        cb = self.spec.callbacks
        for k in range(self.grid.n):
            if cb.step is not None:
                cb.step(self._t(times[k]), y, self._t(steps[k]))
            fk = PerturbedField(f, times[k], times[k + 1]) if perturb else f
            res = solver.step(fk, times[k], steps[k], y, state, self._times(k))
            nfe += int(res.nfe)  # one row: the solver never sees a partly known state
            njev, nlu = njev + int(res.njev), nlu + int(res.nlu)
            n_newton += int(res.n_newton)
            if res.status is not None and int(res.status):  # a fixed step cannot shrink: stop
                status, t_reached = Status(int(res.status)), times[k]
                break
            choice = solver.choice(state) if self.records is not None else None
            extra, next_state = commit.accepted(
                times[k], steps[k], times[k + 1], y, res, choice, field=fk
            )
            nfe += extra
            if perturb:  # the interpolant's f(t + h, y1) is the step's end, not the next start
                next_state = None
            y, state = res.y1, (res.state if next_state is None else next_state)
        tt = torch.tensor
        d = self.device
        n_acc = self.grid.n if status == Status.SUCCESS else k
        n = tt(n_acc + int(status != Status.SUCCESS), device=d)
        counts = (tt(x, device=d) for x in (njev, nlu, n_newton))
        stats = Stats(tt(nfe, device=d), n, tt(n_acc, device=d), n - n_acc, *counts)
        t_end = tt(t_reached, dtype=self.t_dtype, device=d)
        return commit.assemble(), tt(int(status), device=d), t_end, stats, None

    def _float_adaptive(self) -> tuple[Any, ...]:
        """Adaptive steps of one row: the error ratio is the step's one host synchronisation,
        and brings the whole control decision to Python floats."""
        solver, f = self.solver, self.f
        ctrl = self.controller
        assert ctrl is not None
        out_list: list[float] = self.out_times.tolist()
        t, t_last = out_list[0], out_list[-1]
        # The times a step may land on, in order (the end last).
        targets = [t_last]
        if self._land:
            targets = sorted({x for x in self._targets.tolist() if t < x <= t_last})
        free = None  # the targets without the outputs, for steps that need not land on them
        if self._targets_free is not None:
            free = sorted({x for x in self._targets_free.tolist() if t < x <= t_last})
        jumps = set(self._jumps.tolist()) if self._jumps is not None else set()  # one ulp before
        target = 0
        t_end = targets[0]
        y = self.y0
        state = solver.init(f, t, y, self.f0)
        if free is not None and not bool(solver.landing(state)):
            t_end = free[0]
        nfe = int(self.f0 is not None)
        if self.first_step is not None:
            h = float(self.first_step)
        else:
            if self.f0 is None:
                raise ValueError("the initial step needs f(t0, y0): pass f0 or first_step")
            h = float(ctrl.initial_step(f, self.out_times[0], y, self.f0))
            nfe += 1
        cstate = ctrl.init_float()
        commit = _FloatCommit(self)
        n_steps = n_acc = njev = nlu = n_newton = 0
        status = Status.SUCCESS
        h_next = h
        eps = torch.finfo(self.t_dtype).eps
        step_status = 0
        cb = self.spec.callbacks
        while True:
            hit = h * 1.01 >= t_end - t  # land on the end rather than leave a sliver of a step
            h_eff = t_end - t if hit else h
            if hit and jumps and t + h_eff > t_end:
                # t + (t_end - t) can round up to the jump itself, where the step's last stage
                # would see the field's other side: one ulp less.
                h_eff = math.nextafter(h_eff, 0.0)
            if cb.step is not None:
                cb.step(self._t(t), y, self._t(h_eff))
            res = solver.step(f, t, h_eff, y, state)
            nfe += int(res.nfe)
            njev, nlu = njev + int(res.njev), nlu + int(res.nlu)
            n_newton += int(res.n_newton)
            n_steps += 1
            assert res.y_error is not None, f"adaptive solver {solver!r} gave no error estimate"
            ratio = ctrl.error_ratio(y, res.y1, res.y_error, solver.error_norm)
            if res.status is not None:
                ratio = torch.where(res.status == 0, ratio, torch.inf)
                step_status = int(res.status)
            r = float(ratio)
            accept, h_next, cstate = ctrl.adapt_float(r, h_eff, cstate)
            if cb.accept is not None and accept:
                cb.accept(self._t(t), y, self._t(h_eff))
            if cb.reject is not None and not accept:
                cb.reject(self._t(t), y, self._t(h_eff))
            if accept:
                n_acc += 1
                t_new = t_end if hit else t + h_eff
                extra, next_state = commit.accepted(
                    t,
                    h_eff,
                    t_new,
                    y,
                    res,
                    solver.choice(state) if self.records is not None else None,
                )
                nfe += extra
                y, state, t = res.y1, (res.state if next_state is None else next_state), t_new
                if hit:
                    h_next = max(h_next, h)  # landing on the end does not shrink the next step
                    if t_end == t_last:
                        break
                    if t_end in jumps:  # the field jumps one ulp on: restart past it
                        t = math.nextafter(math.nextafter(t, math.inf), math.inf)
                        state = solver.init(f, t, y, None)
                    target += 1
                    t_end = targets[target]
                if free is not None:  # the next target, as the row's mode asks
                    lst = targets if bool(solver.landing(state)) else free
                    t_end = lst[bisect.bisect_right(lst, t)]
            elif res.retry_state is not None:  # the retry starts where this attempt did
                state = res.retry_state
            res_t = 10 * eps * max(abs(t), eps * abs(t_last - out_list[0]))
            if h_eff <= res_t or not h_next > res_t:
                finite = bool(_finite_rows(res, False))
                status = Status.STEP_SIZE_UNDERFLOW if finite else Status.NONFINITE
                if step_status:  # a step that kept failing says why
                    status = Status(step_status)
                break
            if n_steps >= self.spec.max_num_steps:
                status = Status.MAX_STEPS_REACHED
                break
            h = h_next
        tt = torch.tensor
        d = self.device
        stats = Stats(
            tt(nfe, device=d),
            tt(n_steps, device=d),
            tt(n_acc, device=d),
            tt(n_steps - n_acc, device=d),
            tt(njev, device=d),
            tt(nlu, device=d),
            tt(n_newton, device=d),
        )
        t_reached = tt(t, dtype=self.t_dtype, device=d)
        return (
            commit.assemble(),
            tt(int(status), device=d),
            t_reached,
            stats,
            h_next if self.carry_step else None,
        )


def _count(total: torch.Tensor, running: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """A per-row counter after a step that spent ``n`` on each running row; no tensor operation
    when ``n`` is a Python 0 (an explicit method's Jacobians and factorisations, every step)."""
    if isinstance(n, int) and n == 0:
        return total
    return total + running * n


def _kept_state(res: StepResult, c: _Carry) -> Any:
    """The carried state of rows that rejected ``res``: its retry state, else what they had."""
    return c.solver_state if res.retry_state is None else res.retry_state


def _finite_rows(res: StepResult, batched: bool) -> torch.Tensor:
    """Per row: are the step's state and error estimate finite?"""
    parts = [res.y1]
    if isinstance(res.y_error, torch.Tensor):
        parts.append(res.y_error)
    elif res.y_error is not None:
        parts.extend(res.y_error)
    # (per row: [rows, -1], as a state of one number per row, [rows], has no dimension 1)
    ok = [torch.isfinite(p).reshape((p.shape[0], -1) if batched else (-1,)).all(-1) for p in parts]
    out = ok[0]
    for x in ok[1:]:
        out = out & x
    return out


class PerturbedField:
    """``f`` seen from inside one step ``[t0, t1]`` (torchdiffeq's ``perturb``): a stage at the
    step's start time (to two ulps) is evaluated one ulp after it and a stage at its end one ulp
    before it, in the state's dtype, so a field that jumps at grid times is seen from the side of
    the step being taken.  A field with a ``perturbed(t, y, at_start, at_end)`` method (the
    adjoint's augmented field, whose clock runs against the user's) applies the nudge itself."""

    def __init__(self, f: Func, t0: Any, t1: Any) -> None:
        self.f, self.t0, self.t1 = f, t0, t1

    @property
    def no_torch_func(self) -> bool:
        return bool(getattr(self.f, "no_torch_func", False))

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lo = torch.as_tensor(self.t0, dtype=t.dtype, device=t.device)
        hi = torch.as_tensor(self.t1, dtype=t.dtype, device=t.device)
        tol = 2 * torch.finfo(t.dtype).eps * torch.maximum(lo.abs(), hi.abs())
        at_start = (t - lo).abs() <= tol
        at_end = ~at_start & ((t - hi).abs() <= tol)
        nudge = getattr(self.f, "perturbed", None)
        if nudge is not None:
            nudged: torch.Tensor = nudge(t, y, at_start, at_end)
            return nudged
        inf = t.new_tensor(math.inf)
        inside = torch.where(at_end, torch.nextafter(hi, -inf), t)
        return self.f(torch.where(at_start, torch.nextafter(lo, inf), inside), y)


class _FloatCommit:
    """The commit of the float driver: outputs of one row, found by bisection on the host."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.out_list: list[float] = run.out_times.tolist()
        self.next_out = 1
        self.vals: list[torch.Tensor] = [run.y0.unsqueeze(0)]

    def accepted(
        self,
        t: float,
        h: float,
        t_new: float,
        y: torch.Tensor,
        res: StepResult,
        choice: Any = None,
        field: Any = None,
    ) -> tuple[int, Any]:
        """Place the outputs of an accepted step (``choice``: the solver's choice for it, kept
        in its record; ``field``: the vector field as the step saw it, when not the run's own);
        returns the interpolant's evaluations and the carried state it computed (or ``None``)."""
        run, next_out = self.run, self.next_out
        below = bisect.bisect_left(self.out_list, t_new, lo=next_out)
        upto = bisect.bisect_right(self.out_list, t_new, lo=below)
        extra, next_state, d = 0, None, None
        if below > next_out or run.dense is not None:
            d, extra, next_state = run.solver.dense(field or run.f, t, h, y, res)
        if below > next_out:
            assert d is not None
            theta = torch.tensor(
                [(x - t) / h for x in self.out_list[next_out:below]],
                dtype=torch.float64,
                device=y.device,
            )
            self.vals.append(evaluate(d, theta, batched=False))
        if upto > below:
            self.vals.append(res.y1.unsqueeze(0))
        if run.records is not None:
            run.records.append(
                StepRecord(
                    t,
                    h,
                    y,
                    (next_out, below - next_out, below - next_out) if below > next_out else None,
                    (below, True) if upto > below else None,
                    choice,
                )
            )
        if run.dense is not None:
            assert d is not None
            run._keep_dense(t, h, d)
        self.next_out = upto
        return extra, next_state

    def assemble(self) -> torch.Tensor:
        outputs = Outputs(self.run.y0, self.run.T, batched=False)
        outputs.vals = self.vals
        return outputs.assemble()
