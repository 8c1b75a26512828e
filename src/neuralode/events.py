"""Events: functions of ``(t, y)`` whose sign changes the loop finds, per sample.

:class:`Event` is the public description.  :class:`EventTracker` is what the loop's commit calls
on every accepted step (``_loop._Run._commit``): it compares each event function at the step's
start and end (and at optional interior points), locates the crossings on the step's dense
output by a bracketing root finder (Illinois regula falsi with a bisection safeguard), orders
them by time, counts them, and says where each row's step is cut: at a terminal event (the row
stops) or at a reset (the row restarts from the new state).

The loop finds events without a graph.  A differentiable event time comes from the implicit
function theorem (:func:`event_time`, Chen, Amos and Nickel 2021), taken at each cut where the
loop keeps a graph (``gradient="backprop"``) and by ``_event_solve`` after the adjoint's and the
checkpoint's forward passes: at a root ``t*`` of ``g(t, y(t))``,

    dt*/dtheta = -(dg/dtheta + dg/dy . dy/dtheta) / (dg/dt + dg/dy . f(t*, y*)),

and the state at the event carries the extra ``f dt*/dtheta`` (:func:`event_state`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ._rows import per_row
from .interpolation import evaluate
from .solvers.base import DenseStep

__all__ = ["Event", "EventTracker", "EventLog", "event_time", "event_state", "GrazingEventError"]

#: Root-finder iterations before a bracket is accepted as it is (a bracket halves at least every
#: third iteration, so 200 iterations resolve any float64 step).
_MAX_ITERS = 200


class GrazingEventError(ValueError):
    """An event function touched zero without crossing it transversally: ``dg/dt`` along the
    solution is (numerically) zero at the event, and its time has no derivative.

    Raised by a solve with ``events`` when it takes the event time's gradient (the implicit
    function theorem divides by that rate), which it does with every gradient strategy while
    autograd is enabled, whether or not any input requires grad (the solve cannot tell what
    ``func`` closes over).  Under ``torch.no_grad()`` the same event is located without a
    gradient and is not an error.  A ``ValueError``, so ``except ValueError`` catches it too.

    Args:
        *args: the message, which names the event, the first sample that grazed and its time.

    Examples:
        ``y = (t - 1)^3`` crosses zero at ``t = 1`` with zero slope:

        >>> import torch
        >>> from neuralode import Event, GrazingEventError, solve
        >>> y0 = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
        >>> try:
        ...     solve(lambda t, y: 3 * (t - 1) ** 2, y0, torch.tensor([0.0, 2.0]),
        ...           method="rk4", step_size=0.5, events=Event(lambda t, y: y))
        ... except GrazingEventError as err:
        ...     print(err)  # doctest: +ELLIPSIS
        event: at the event of sample 0 (t=1) ... so the event time has no derivative
    """


@dataclass(frozen=True)
class Event:
    """An event: the solve watches ``fn(t, y)`` change sign.

    Args:
        fn: ``fn(t, y) -> tensor``, called as the vector field is (user time and state layout).
            Batched, ``t`` is ``[batch]`` and ``fn`` returns ``[batch]``, or ``[batch, k]`` for
            ``k`` event functions at once; unbatched, ``t`` is a 0-dim tensor and ``fn``
            returns ``[]`` or ``[k]``.  Each row must depend on that row's ``(t, y)`` only.
        direction: ``+1`` fires on rising crossings (``fn`` going from negative to zero or
            positive along the integration), ``-1`` on falling ones, ``0`` on both.
        terminal: ``True`` stops the sample at the first occurrence; an integer ``n >= 1``
            stops it at the ``n``-th occurrence (of any of this event's functions); ``False``
            records every occurrence and goes on.
        reset: ``reset(t, y) -> y_new`` (same layout as ``y``): at each occurrence the state
            jumps to ``y_new`` and the solve goes on from there with a fresh solver state (a
            hybrid system).  Batched, it is called with every row and its result is taken on
            the rows that fired, so it must work row by row, as ``fn``.  An occurrence that
            stops the sample (``terminal``) stops it without the reset.
        name: a label for messages.
        xtol: the time resolution of the root (time units); default four ulps of the time in
            the state's dtype.
        checks: interior points per accepted step where ``fn`` is also evaluated (on the dense
            output), to catch a double crossing inside one step.  Default: 0 (start and end
            only) without a reset; 10 with one (as DifferentialEquations.jl's ``interp_points``),
            since after a jump the solution often leaves the event surface and comes back
            within one step (a bouncing ball's flight on a method that integrates it exactly).
            A crossing and recrossing between two checked points is missed: bound the step with
            ``max_step`` where that matters.

    A function that is exactly zero at the initial time (or at the state a reset left) does not
    fire there; it fires when it next changes sign.  One occurrence per function per step is
    located (the first); use ``checks`` when a function can cross twice within a step.

    Raises:
        TypeError: ``fn`` or ``reset`` is not callable.
        ValueError: ``direction`` is not -1, 0 or +1; ``terminal`` is not a bool or an integer
            ``>= 1``; ``xtol`` is not a positive finite number; ``checks`` is not an integer
            ``>= 0``.  (What ``fn`` returns is checked by the solve: a ``TypeError`` for a
            non-tensor, a ``ValueError`` for a wrong shape or NaN/Inf at the initial state.)

    Examples:
        A ball dropped from 1 m: the terminal event finds the ground at ``t = sqrt(2 / g)``.

        >>> import torch
        >>> from neuralode import Event, solve
        >>> def fall(t, y):  # y = [height, velocity]
        ...     return torch.stack([y[1], torch.full_like(y[1], -9.81)])
        >>> ground = Event(lambda t, y: y[0], direction=-1, name="ground")
        >>> sol = solve(fall, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), events=ground)
        >>> round(float(sol.event_t), 4), sol.event_log[0][2]  # sqrt(2 / 9.81) = 0.45152...
        (0.4515, 'terminal')
    """

    fn: Callable[[torch.Tensor, Any], torch.Tensor]
    direction: int = 0
    terminal: bool | int = True
    reset: Callable[[torch.Tensor, Any], Any] | None = None
    name: str | None = None
    xtol: float | None = None
    checks: int | None = None

    def __post_init__(self) -> None:
        label = self.label
        if not callable(self.fn):
            raise TypeError(f"{label}: fn must be callable as fn(t, y), got {self.fn!r}")
        d = self.direction
        if isinstance(d, bool) or not isinstance(d, int) or d not in (-1, 0, 1):
            raise ValueError(f"{label}: direction must be -1, 0 or +1, got {self.direction!r}")
        term = self.terminal
        if not isinstance(term, (bool, int)) or (not isinstance(term, bool) and term < 1):
            raise ValueError(
                f"{label}: terminal must be True, False or a count n >= 1 (stop at the n-th "
                f"occurrence), got {term!r}"
            )
        if self.reset is not None and not callable(self.reset):
            raise TypeError(f"{label}: reset must be callable as reset(t, y), got {self.reset!r}")
        if self.xtol is not None and not (
            isinstance(self.xtol, (int, float)) and 0 < self.xtol < math.inf
        ):
            raise ValueError(f"{label}: xtol must be a positive number, got {self.xtol!r}")
        c = self.checks
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ValueError(f"{label}: checks must be an integer >= 0 or None, got {c!r}")

    @property
    def label(self) -> str:
        return f"event {self.name!r}" if self.name else "event"

    @property
    def interior_checks(self) -> int:
        """The interior points checked per step (``checks``, or its default)."""
        if self.checks is not None:
            return self.checks
        return 10 if self.reset is not None else 0

    @property
    def stop_at(self) -> int:
        """The occurrence that stops a sample (0: none)."""
        if self.terminal is True:
            return 1
        if self.terminal is False:
            return 0
        return int(self.terminal)


class EventLog(NamedTuple):
    """What a loop found (internal time; ``[batch]`` rows).

    Attributes:
        t: the terminal event's time per row (NaN where none stopped the row).
        column: the event function (column over all events, in order) that stopped it, ``-1``
            where none.
        y: the state at the terminal event (before any reset), NaN where none.
        occurrences: per row, every located occurrence ``(time, column, kind)`` in order;
            ``kind`` is ``"terminal"``, ``"reset"`` or ``"event"`` (recorded, nothing cut).
        widths: how many functions each event returns.
    """

    t: torch.Tensor
    column: torch.Tensor
    y: torch.Tensor
    occurrences: list[list[tuple[float, int, str]]]
    widths: tuple[int, ...]


class Cut(NamedTuple):
    """Rows whose accepted step is cut by an event: at ``t`` (internal time), where the state
    is ``y_event`` (the solution) and the row goes on from ``y_next`` (after the reset), or
    stops (``terminal``).  ``nfe``: evaluations of the vector field the cut spent per row (the
    event gradients of a solve that keeps a graph)."""

    rows: torch.Tensor
    t: torch.Tensor
    y_event: torch.Tensor
    y_next: torch.Tensor
    terminal: torch.Tensor
    reset: torch.Tensor
    nfe: torch.Tensor | int = 0


class EventTracker:
    """The events of one solve, in the loop's terms (increasing internal time, flat state).

    Args:
        events: the events.
        call: ``call(fn, t, y) -> tensor`` evaluates a user function at internal time ``t``
            (``[rows]``) and internal state ``y`` in the user's terms.
        reset_call: as ``call`` for a reset; returns the new internal state.
        t0, y0: the rows' start (internal).
        field: the vector field (internal terms): where the solve keeps an autograd graph, the
            cuts take their implicit-function-theorem gradients with it (the event time, the
            state at the event, and a reset's new state carried back to the located time), so
            that one pass gives every gradient (``gradient="backprop"``).
    """

    def __init__(
        self,
        events: Sequence[Event],
        call: Callable[[Callable[..., Any], torch.Tensor, torch.Tensor], torch.Tensor],
        reset_call: Callable[[Callable[..., Any], torch.Tensor, torch.Tensor], torch.Tensor],
        t0: torch.Tensor,
        y0: torch.Tensor,
        field: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.events = tuple(events)
        self.call, self.reset_call, self.field = call, reset_call, field
        self.B = y0.shape[0]
        self.t_dtype, self.device = t0.dtype, t0.device
        self.widths: list[int] = []
        with torch.no_grad():
            g0 = self.values(t0, y0, check=True)
        self.K = g0.shape[1]
        owner = [e for e, w in enumerate(self.widths) for _ in range(w)]
        self.owner = torch.tensor(owner, dtype=torch.long, device=self.device)
        ev = self.events
        self.col_dir = torch.tensor([ev[e].direction for e in owner], device=self.device)
        self.col_stop = torch.tensor([ev[e].stop_at for e in owner], device=self.device)
        self.col_reset = torch.tensor([ev[e].reset is not None for e in owner], device=self.device)
        self.col_xtol = torch.tensor(
            [ev[e].xtol if ev[e].xtol is not None else 0.0 for e in owner],
            dtype=self.t_dtype,
            device=self.device,
        )
        self.checks = max(e.interior_checks for e in ev)
        self.g0 = g0
        self.counts = torch.zeros(self.B, len(ev), dtype=torch.long, device=self.device)
        nan = torch.full((self.B,), math.nan, dtype=self.t_dtype, device=self.device)
        self.t_stop = nan
        self.t_shift = torch.zeros(self.B, dtype=y0.dtype, device=self.device)  # IFT gradients
        self.index = torch.full((self.B,), -1, dtype=torch.long, device=self.device)
        self.y_stop = torch.full_like(y0.detach(), math.nan)
        self._log: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def values(self, t: torch.Tensor, y: torch.Tensor, check: bool = False) -> torch.Tensor:
        """Every event function at ``(t, y)`` (``[rows]``, internal), as ``[rows, K]``."""
        rows = y.shape[0]
        cols = []
        for i, e in enumerate(self.events):
            g = self.call(e.fn, t, y)
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"{e.label}: fn must return a tensor, got {type(g).__name__}")
            if g.ndim == 1:
                g = g.unsqueeze(1)
            if g.ndim != 2 or g.shape[0] != rows:
                raise ValueError(
                    f"{e.label}: fn must return [batch] or [batch, k] (batch = {rows}; unbatched: "
                    f"[] or [k]), got shape {tuple(g.shape)}"
                )
            if check:
                self.widths.append(g.shape[1])
                if not bool(torch.isfinite(g).all()):
                    raise ValueError(f"{e.label}: fn returned NaN or Inf at the initial state")
            elif g.shape[1] != self.widths[i]:
                raise ValueError(
                    f"{e.label}: fn returned {g.shape[1]} functions, {self.widths[i]} at the start"
                )
            cols.append(g)
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def _at(self, d: DenseStep, t: torch.Tensor, h: torch.Tensor, theta: torch.Tensor) -> Any:
        """The interpolated state and every event function at fractions ``theta`` ``[B, m]`` of
        the step: ``([B, m, ...], [B, m, K])``."""
        m = theta.shape[1]
        ys = evaluate(d, theta.to(torch.float64), batched=True)
        ts = t.unsqueeze(1) + theta * h.unsqueeze(1)
        # One call per point, each with the batch's rows (a function may hold per-row data).
        g = [self.values(ts[:, i], ys[:, i]) for i in range(m)]
        return ys, torch.stack(g, dim=1)

    def commit(
        self,
        t: torch.Tensor,
        h: torch.Tensor,
        t_new: torch.Tensor,
        y1: torch.Tensor,
        accept: torch.Tensor,
        dense: Callable[[], DenseStep],
    ) -> Cut | None:
        """Check the accepted step ``[t, t_new]`` of each row (``accept``; ``h`` the step the
        interpolant is parameterised by); returns where rows are cut, or ``None`` (one host
        synchronisation, more while locating).  Detection and location keep no graph; the
        cut's states do, where the solve does."""
        with torch.no_grad():
            found = self._detect(t, h, t_new, y1, accept, dense)
        if found is None:
            return None
        return self._cut(dense(), t, h, t_new, y1, *found)

    def _detect(
        self,
        t: torch.Tensor,
        h: torch.Tensor,
        t_new: torch.Tensor,
        y1: torch.Tensor,
        accept: torch.Tensor,
        dense: Callable[[], DenseStep],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The rows cut by an event in this step, as ``_order`` finds them, else ``None``."""
        g1 = self.values(t_new, y1)
        g0 = self.g0
        if self.checks:
            d = dense()
            n = self.checks
            inner = torch.arange(1, n + 1, dtype=self.t_dtype, device=self.device) / (n + 1)
            _, g_in = self._at(d, t, h, inner.expand(self.B, n))
            pts = torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])  # [n + 2]
            G = torch.cat([g0.unsqueeze(1), g_in, g1.unsqueeze(1)], dim=1)  # [B, n + 2, K]
        else:
            pts = torch.tensor([0.0, 1.0], dtype=self.t_dtype, device=self.device)
            G = torch.stack([g0, g1], dim=1)
        # A sub-interval crosses where the function leaves a nonzero value for zero or the other
        # sign (a zero at its start does not fire: that is where an event was, or the start).
        s_prev = torch.sign(G[:, :-1])
        dir_ok = (self.col_dir == 0) | (self.col_dir == -s_prev)
        crossed = (s_prev != 0) & (s_prev * G[:, 1:] <= 0) & dir_ok
        crossed &= accept.view(-1, 1, 1)
        fired = crossed.any(dim=1)
        if not bool(fired.any()):
            self.g0 = torch.where(accept.unsqueeze(1), g1, g0)
            return None
        d = dense()
        # Every crossed sub-interval of a function is located (the checked points may show a
        # function crossing more than once in a step): round r takes each one's r-th.
        rank = crossed.long().cumsum(dim=1)
        thetas = []
        for r in range(int(rank[:, -1].max())):
            mine = crossed & (rank == r + 1)
            j = mine.long().argmax(dim=1)  # [B, K]
            lo, hi = pts[j], pts[j + 1]
            g_lo = G.gather(1, j.unsqueeze(1)).squeeze(1)
            g_hi = G.gather(1, (j + 1).unsqueeze(1)).squeeze(1)
            found_r = mine.any(dim=1)
            thetas.append(self._locate(d, t, h, lo, hi, g_lo, g_hi, torch.sign(g_lo), found_r))
        theta = torch.cat(thetas, dim=1)  # [B, K * rounds]
        cols = torch.arange(self.K, device=self.device).repeat(len(thetas))
        found = self._order(t, h, g1, accept, theta, cols)
        if found is None:
            self.g0 = torch.where(accept.unsqueeze(1), g1, g0)
            return None
        return (*found, g1, accept)

    def _locate(
        self,
        d: DenseStep,
        t: torch.Tensor,
        h: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        g_lo: torch.Tensor,
        g_hi: torch.Tensor,
        s0: torch.Tensor,
        fired: torch.Tensor,
    ) -> torch.Tensor:
        """The crossing inside ``[lo, hi]`` (fractions of the step, ``[B, K]``) to the time
        resolution: the end of the final bracket on the crossed side, ``inf`` where none.

        Illinois regula falsi on ``F = sign(g0) g`` (``F > 0`` before the crossing, ``<= 0`` from
        it on): the end that the new point does not replace twice in a row has its ``F``
        halved; each point keeps the resolution from both ends (so that the last closes the
        bracket), and a bracket that did not halve over three iterations is bisected."""
        eps = torch.finfo(d.y0.dtype).eps
        scale = torch.maximum(t.abs(), (t + h).abs()).unsqueeze(1)
        xtol = torch.maximum(self.col_xtol.unsqueeze(0), 4 * eps * scale)
        tol = xtol / h.abs().clamp(min=1e-300).unsqueeze(1)  # in fractions of the step
        f_lo, f_hi = s0 * g_lo, s0 * g_hi
        last = torch.zeros_like(lo)  # +1: the last point replaced hi, -1: lo
        width = hi - lo
        for it in range(_MAX_ITERS):
            todo = fired & (hi - lo > tol)
            if not bool(todo.any()):
                break
            gap = f_lo - f_hi
            x = torch.where(gap > 0, lo + (hi - lo) * (f_lo / gap.clamp(min=1e-300)), lo + hi)
            x = torch.where(gap > 0, x, 0.5 * x)
            if it % 3 == 2:  # a bracket that did not halve in three iterations is bisected
                x = torch.where(hi - lo > 0.5 * width, 0.5 * (lo + hi), x)
                width = hi - lo
            # At least the resolution from either end: a point that converges from one side
            # then closes the bracket on the other.
            x = torch.minimum(torch.maximum(x, lo + tol), hi - tol)
            x = torch.where(hi - lo > 2 * tol, x, 0.5 * (lo + hi))
            x = torch.where(todo, x, hi)
            _, g = self._at(d, t, h, x)
            fx = s0 * g.diagonal(dim1=1, dim2=2)  # each column's own function at its own point
            past = todo & (fx <= 0)
            before = todo & (fx > 0)
            f_lo = torch.where(past & (last > 0), 0.5 * f_lo, f_lo)
            f_hi = torch.where(before & (last < 0), 0.5 * f_hi, f_hi)
            hi, f_hi = torch.where(past, x, hi), torch.where(past, fx, f_hi)
            lo, f_lo = torch.where(before, x, lo), torch.where(before, fx, f_lo)
            last = torch.where(past, 1.0, torch.where(before, -1.0, last))
        return torch.where(fired, hi, math.inf)

    def _order(
        self,
        t: torch.Tensor,
        h: torch.Tensor,
        g1: torch.Tensor,
        accept: torch.Tensor,
        theta: torch.Tensor,
        cols: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Take the located crossings of each row (``theta`` ``[B, M]``, of the columns
        ``cols`` ``[M]``; ``inf``: none) in time order: record each, count it, and find the
        first that stops the row or resets it: ``(rows cut, where (fraction of the step), which
        column)``.  Crossings at the same time as the cut still count, and a terminal one
        among them stops the row (whatever the events' order in the list)."""
        order = theta.argsort(dim=1)
        cut = torch.zeros(self.B, dtype=torch.bool, device=self.device)
        cut_theta = torch.ones(self.B, dtype=self.t_dtype, device=self.device)
        cut_col = torch.full((self.B,), -1, dtype=torch.long, device=self.device)
        self._terminal = torch.zeros_like(cut)
        rows = torch.arange(self.B, device=self.device)
        logged = len(self._log)
        for r in range(theta.shape[1]):
            pos = order[:, r]
            th = theta[rows, pos]
            col = cols[pos]
            valid = torch.isfinite(th) & (~cut | (th == cut_theta))
            if not bool(valid.any()):
                break
            ev = self.owner[col]
            count = self.counts[rows, ev] + valid
            self.counts[rows, ev] = count
            stop = self.col_stop[col]
            ends = valid & (stop > 0) & (count == stop)
            resets = valid & self.col_reset[col]
            cuts = ends | resets
            kind = torch.where(ends, 2, torch.where(resets, 1, 0))
            self._log.append((valid, t + th * h, col, kind))
            first = cuts & ~cut
            cut_theta = torch.where(first, th, cut_theta)
            cut_col = torch.where(first | (ends & ~self._terminal), col, cut_col)
            self._terminal = self._terminal | ends
            cut = cut | cuts
        if not bool(cut.any()):
            return None
        # A reset at the same time as a terminal event is not applied: the row stops there.
        for i in range(logged, len(self._log)):
            valid, at, col, kind = self._log[i]
            moot = self._terminal & (kind == 1) & (at == t + cut_theta * h)
            self._log[i] = (valid, at, col, torch.where(moot, 0, kind))
        return cut, cut_theta, cut_col

    def _cut(
        self,
        d: DenseStep,
        t: torch.Tensor,
        h: torch.Tensor,
        t_new: torch.Tensor,
        y1: torch.Tensor,
        cut: torch.Tensor,
        cut_theta: torch.Tensor,
        cut_col: torch.Tensor,
        g1: torch.Tensor,
        accept: torch.Tensor,
    ) -> Cut:
        """The states where rows are cut: the solution at the event (on the dense output), the
        state after a reset, and (with a graph) their event-time gradients."""
        terminal = self._terminal
        t_cut = torch.where(cut, t + cut_theta * h, t_new)
        y_event = evaluate(d, cut_theta.to(torch.float64).unsqueeze(1), batched=True).squeeze(1)
        y_event = torch.where(per_row(cut, y1.ndim), y_event, y1)
        reset = cut & ~terminal
        nfe: torch.Tensor | int = 0
        ts = t_cut.to(y_event.dtype)
        grad = self.field is not None and torch.is_grad_enabled()
        if grad:  # the event time's gradient moves the state along the solution
            assert self.field is not None
            fy = self.field(ts, y_event)
            t_ev = event_time(self.values, fy, ts, y_event, cut_col, cut, self.events[0].label)
            y_event = event_state(y_event, fy, t_ev, ts)
            nfe = cut.long()
        else:
            t_ev = ts
        y_next = y_event
        for e, ev_obj in enumerate(self.events):
            if ev_obj.reset is None:
                continue
            mine = reset & (self.owner[cut_col.clamp(min=0)] == e)
            if bool(mine.any()):
                y_new = self.reset_call(ev_obj.reset, t_ev, y_event)
                if not isinstance(y_new, torch.Tensor) or y_new.shape != y_event.shape:
                    raise ValueError(
                        f"{ev_obj.label}: reset(t, y) must return a state shaped like y "
                        f"{tuple(y_event.shape)}, got "
                        f"{tuple(y_new.shape) if isinstance(y_new, torch.Tensor) else y_new!r}"
                    )
                y_next = torch.where(per_row(mine, y_next.ndim), y_new, y_next)
        g_next = g1
        if bool(reset.any()):
            if grad:  # carried back to the located time: the saltation term of the jump
                assert self.field is not None
                f_new = self.field(ts, y_next)
                shifted = y_next - f_new * per_row((t_ev - ts).to(y_next.dtype), y_next.ndim)
                y_next = torch.where(per_row(reset, y_next.ndim), shifted, y_next)
                nfe = nfe + reset.long()
            with torch.no_grad():
                g_reset = self.values(t_cut, y_next)
                g_at = self.values(t_cut, y_event).gather(1, cut_col.clamp(min=0).unsqueeze(1))
            # The function that fired is zero at its own event: where the reset left it as
            # close to zero as the located root was, it is zero (it does not fire there
            # again); a reset that moved the state off the surface keeps its value, so that
            # the next crossing counts even early in the next step.
            fired_col = torch.nn.functional.one_hot(cut_col.clamp(min=0), self.K).bool()
            on_surface = g_reset.abs() <= 2 * g_at.abs()
            g_reset = torch.where(fired_col & on_surface, 0.0, g_reset)
            g_next = torch.where(reset.unsqueeze(1), g_reset, g1)
        self.g0 = torch.where(accept.unsqueeze(1), g_next, self.g0)
        self.t_stop = torch.where(terminal, t_cut, self.t_stop)
        self.t_shift = torch.where(terminal, (t_ev - ts).to(self.t_shift.dtype), self.t_shift)
        self.index = torch.where(terminal, cut_col, self.index)
        self.y_stop = torch.where(per_row(terminal, y_event.ndim), y_event, self.y_stop)
        return Cut(cut, t_cut, y_event, y_next, terminal, reset, nfe)

    def log(self) -> EventLog:
        """Everything found, with the occurrences brought to the host once."""
        occ: list[list[tuple[float, int, str]]] = [[] for _ in range(self.B)]
        names = ("event", "reset", "terminal")
        if self._log:
            valid = torch.stack([v for v, _, _, _ in self._log], dim=1).tolist()
            times = torch.stack([x for _, x, _, _ in self._log], dim=1).tolist()
            cols = torch.stack([c for _, _, c, _ in self._log], dim=1).tolist()
            kinds = torch.stack([k for _, _, _, k in self._log], dim=1).tolist()
            for b in range(self.B):
                occ[b] = [
                    (times[b][i], cols[b][i], names[kinds[b][i]])
                    for i in range(len(valid[b]))
                    if valid[b][i]
                ]
        t_stop = self.t_stop + self.t_shift.to(self.t_stop.dtype)  # the gradient, no value
        return EventLog(t_stop, self.index, self.y_stop, occ, tuple(self.widths))


def event_time(
    g: Callable[[torch.Tensor, Any], torch.Tensor],
    fy: Any,
    t: torch.Tensor,
    y: Any,
    col: torch.Tensor,
    rows: torch.Tensor,
    label: str = "event",
) -> torch.Tensor:
    """The event time with its implicit-function-theorem gradient (batched rows).

    On ``rows`` (``[B]``), ``t`` (``[B]``, the state's dtype, no graph) is a root of column
    ``col`` of ``g(t, y(t))``, and ``y`` is the state there (differentiable; a tuple for a tuple
    state) and ``fy`` the vector field there.  Returns ``t_event``: the value of ``t`` and, on
    ``rows``, the gradient ``-(dg/dtheta + dg/dy dy/dtheta) / (dg/dt + dg/dy f)``.

    Raises:
        GrazingEventError: the denominator is zero to round-off on a row (the solution touches
            the event surface without crossing it) and a gradient is needed (``t``, ``y`` or
            ``g(t, y)`` has a graph): the event time has no derivative there.
    """
    parts = y if isinstance(y, tuple) else (y,)
    gv = _column(g(t, y), col)
    if not (gv.requires_grad or t.requires_grad or any(p.requires_grad for p in parts)):
        return t.detach()  # nothing upstream needs a gradient: the value is all there is
    t = t.detach()
    td = t.clone().requires_grad_(True)
    yd = tuple(p.detach().requires_grad_(True) for p in parts)
    with torch.enable_grad():
        gd = _column(g(td, yd if isinstance(y, tuple) else yd[0]), col)
        grads: tuple[torch.Tensor | None, ...]
        if gd.requires_grad:
            grads = torch.autograd.grad(gd.sum(), (td, *yd), allow_unused=True)
        else:  # g depends on neither t nor y (a step function of them): its rate is zero
            grads = (None,) * (1 + len(yd))
    fparts = fy if isinstance(fy, tuple) else (fy,)
    rate = torch.zeros_like(t) if grads[0] is None else grads[0].detach()
    scale = rate.abs()
    for gy, fp in zip(grads[1:], fparts):
        if gy is not None:
            prod = (gy * fp.detach()).reshape(gy.shape[0], -1)
            rate = rate + prod.sum(1).to(rate.dtype)
            scale = scale + prod.abs().sum(1).to(rate.dtype)
    tiny = 1e3 * torch.finfo(fparts[0].dtype).eps
    grazing = rows & ((rate.abs() <= tiny * scale) | ~torch.isfinite(rate))
    if bool(grazing.any()):
        first = int(grazing.nonzero()[0, 0])
        raise GrazingEventError(
            f"{label}: at the event of sample {first} (t={float(t[first]):.6g}) the event "
            f"function's rate along the solution, dg/dt + dg/dy . f, is zero to round-off (the "
            f"solution grazes the event surface), so the event time has no derivative"
        )
    step = (gv - gv.detach()) / torch.where(rows, rate, 1.0).to(gv.dtype)
    t_event = t - torch.where(rows, step, 0.0).to(t.dtype)
    return t_event


def _column(g: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    g = g if g.ndim == 2 else g.unsqueeze(1)
    return g.gather(1, col.clamp(min=0).unsqueeze(1)).squeeze(1)


def event_state(y: Any, fy: Any, t_event: torch.Tensor, t: torch.Tensor) -> Any:
    """The state at the event: ``y + f (t_event - t)`` (the value of ``y``; the gradient of the
    event time moves it along the solution)."""
    dt = t_event - t.detach()
    if isinstance(y, tuple):
        return tuple(p + fp * per_row(dt.to(p.dtype), p.ndim) for p, fp in zip(y, fy))
    return y + fy * per_row(dt.to(y.dtype), y.ndim)
