"""A solve with events: the loop locates them, the public solve differentiates to them.

With ``gradient="backprop"`` (or under ``torch.no_grad()``) the loop's one pass is the answer:
its graph runs through the steps, and the tracker gives each cut its gradient.  The adjoint and
checkpoint strategies keep no graph in the loop, so they take two passes:

1. **locate**: the loop runs with an :class:`~neuralode.events.EventTracker` and no graph; each
   row stops at its terminal event and jumps at its resets (``_loop``, the commit).
2. **differentiate**: each row's trajectory is cut into segments at its resets and its terminal
   event; segment ``j`` of every row is one batched solve (per-sample grids, with the solve's
   gradient strategy) from the segment's start to its end, through the user's output times that
   fall inside.  At each segment end the event time gets its implicit-function-theorem gradient
   (:func:`~neuralode.events.event_time`), the state at the event moves with it, and a reset's
   new state is carried to the next segment's fixed start time with the first-order shift
   ``- f dt*``, which gives the saltation term of the adjoint through a jump.

torchdiffeq's adjoint with events integrates twice in the same way.  Rows with fewer segments
than the most ride along on a few padding times of negligible length, whose outputs are dropped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._inputs import Problem
from ._rows import per_row
from .events import Event, EventLog, EventTracker, event_state, event_time
from .gradients import find_adjoint_params
from .solution import Solution, Stats, Status

__all__ = ["check_events", "make_tracker", "with_events", "differentiate", "unbatched_events"]


def check_events(events: Any) -> tuple[Event, ...]:
    """``events`` as a non-empty tuple of :class:`Event` (a single one is accepted)."""
    if isinstance(events, Event):
        return (events,)
    if not isinstance(events, (list, tuple)) or not events:
        raise TypeError(
            f"events must be a neuralode.Event or a non-empty list of them, got {events!r}"
        )
    for i, e in enumerate(events):
        if not isinstance(e, Event):
            raise TypeError(
                f"events[{i}] must be a neuralode.Event(fn, direction=..., terminal=..., "
                f"reset=...), got {type(e).__name__}"
            )
    return tuple(events)


def _pack(
    y: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor], rows: int
) -> torch.Tensor:
    if isinstance(y, (tuple, list)):
        return torch.cat([p.reshape(rows, -1) for p in y], dim=-1)
    return y


def make_tracker(
    prob: Problem, events: tuple[Event, ...]
) -> Callable[[torch.Tensor, torch.Tensor], EventTracker]:
    """The loop's tracker factory: the user's functions called in the user's time and layout
    from the loop's internal (mirrored) time and flat state."""
    dtype, sign = prob.y0.dtype, prob.sign

    def user_time(s: torch.Tensor) -> torch.Tensor:
        return s * (sign.to(s.dtype) if isinstance(sign, torch.Tensor) else sign)

    def call(fn: Callable[..., Any], s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = fn(user_time(s).to(dtype), prob.unflatten(y))
        return out

    def reset_call(fn: Callable[..., Any], s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _pack(fn(user_time(s).to(dtype), prob.unflatten(y)), y.shape[0])

    return lambda t0, y0: EventTracker(events, call, reset_call, t0, y0, prob.func)


def with_events(sol: Solution, log: EventLog, prob: Problem) -> Solution:
    """The located events in the user's terms, on a batched :class:`Solution`."""
    sign = prob.sign
    signs = sign.tolist() if isinstance(sign, torch.Tensor) else [sign] * len(log.occurrences)
    occ = [[(t * sg, i, kind) for t, i, kind in row] for row, sg in zip(log.occurrences, signs)]
    return dataclasses.replace(
        sol,
        event_t=log.t * sign,
        event_index=log.column,
        event_y=prob.unflatten(log.y),
        event_log=occ,
    )


def unbatched_events(
    solve: Callable[..., Solution],
    func: Callable[..., Any],
    y0: Any,
    t: torch.Tensor,
    events: tuple[Event, ...],
    kw: dict[str, Any],
) -> Solution:
    """An unbatched solve with events, as a batch of one (the batched loop finds events)."""
    is_tuple = isinstance(y0, (tuple, list))

    def up(x: Any) -> Any:
        return tuple(p.unsqueeze(0) for p in x) if isinstance(x, (tuple, list)) else x.unsqueeze(0)

    def down(x: Any, i: int = 0) -> Any:
        return tuple(p[i] for p in x) if isinstance(x, (tuple, list)) else x[i]

    def rowwise(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(tt: torch.Tensor, y: Any) -> Any:
            rows = (y[0] if isinstance(y, (tuple, list)) else y).shape[0]
            tt = tt.expand(rows) if tt.ndim == 0 else tt
            outs = [fn(tt[i], down(y, i)) for i in range(rows)]
            if isinstance(outs[0], (tuple, list)):
                return tuple(torch.stack(parts) for parts in zip(*outs))
            return torch.stack(outs)

        return call

    batched_events = tuple(
        dataclasses.replace(
            e, fn=rowwise(e.fn), reset=None if e.reset is None else rowwise(e.reset)
        )
        for e in events
    )
    kw = dict(kw, batched=True)
    jac = kw.get("jac")
    if jac is not None:

        def jac_b(tt: torch.Tensor, y: Any) -> Any:
            out = jac(tt[0], down(y))
            if isinstance(out, tuple):
                return out[0].unsqueeze(0), up(out[1])
            return out.unsqueeze(0)

        kw["jac"] = jac_b
    if kw.get("gradient", "backprop") != "backprop":  # the parameters are func's, not the wrapper's
        kw["adjoint_params"] = find_adjoint_params(func, kw.get("adjoint_params"), kw["gradient"])
    norm = kw.get("norm")
    if callable(norm):  # the user's norm of one (unbatched) state, called on each row
        kw["norm"] = _row_norm(norm)
    for name in ("rtol", "atol"):
        tol = kw.get(name)
        if isinstance(tol, torch.Tensor) and tol.ndim > 0:
            kw[name] = tol.unsqueeze(0)
        elif isinstance(tol, (tuple, list)):
            kw[name] = tuple(x.unsqueeze(0) if isinstance(x, torch.Tensor) else x for x in tol)
    sol = solve(rowwise(func), up(y0), t, events=batched_events, **kw)
    interp = sol._interpolator
    return dataclasses.replace(
        sol,
        ys=down(sol.ys) if is_tuple else sol.ys[0],
        stats=_first_row(sol.stats),
        status=sol.status[0],
        t_end=sol.t_end[0],
        event_t=None if sol.event_t is None else sol.event_t[0],
        event_index=None if sol.event_index is None else sol.event_index[0],
        event_y=None if sol.event_y is None else down(sol.event_y),
        event_log=None if sol.event_log is None else sol.event_log[0],
        _interpolator=None if interp is None else (lambda tt: down(interp(tt))),
    )


def _first_row(stats: Stats) -> Stats:
    row: dict[str, Any] = {k: None if v is None else v[0] for k, v in vars(stats).items()}
    return Stats(**row)


def _row_norm(norm: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An unbatched solve's ``norm(x, dims)`` for its batch of one: each row's state, reduced
    over its own dimensions, one value per row."""

    def batched(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        inner = tuple(d - 1 for d in dims if d > 0)
        return torch.stack([norm(x[i], inner).reshape(()) for i in range(x.shape[0])])

    return batched


class _SummedBackward(dict[str, Stats]):
    """The backward work of several solves (the segments), summed when asked."""

    def __init__(self, parts: Sequence[dict[str, Stats] | None]) -> None:
        super().__init__()
        self.parts = [p for p in parts if p is not None]

    def get(self, key: str, default: Any = None) -> Any:
        found = [x for x in (p.get(key) for p in self.parts) if x is not None]
        if not found:
            return default
        return _sum_stats(found)


def _sum_stats(stats: Sequence[Stats]) -> Stats:
    fields = [dataclasses.astuple(s) for s in stats]
    out: list[Any] = []
    for vals in zip(*fields):
        out.append(None if any(v is None for v in vals) else sum(vals[1:], vals[0]))
    return Stats(*out)


def _where(mask: torch.Tensor, a: Any, b: Any) -> Any:
    if isinstance(a, tuple):
        return tuple(_where(mask, x, y) for x, y in zip(a, b))
    return torch.where(per_row(mask, a.ndim), a, b)


def _rows_at(ys: Any, pos: torch.Tensor) -> Any:
    """``ys[r, pos[r]]`` for every row (a tuple state part by part)."""
    if isinstance(ys, tuple):
        return tuple(_rows_at(p, pos) for p in ys)
    idx = pos.view((-1, 1) + (1,) * (ys.ndim - 2)).expand((ys.shape[0], 1) + ys.shape[2:])
    return ys.gather(1, idx).squeeze(1)


def _axpy(y: Any, f: Any, dt: torch.Tensor, sign: float) -> Any:
    if isinstance(y, tuple):
        return tuple(_axpy(p, q, dt, sign) for p, q in zip(y, f))
    return y + sign * f * per_row(dt.to(y.dtype), y.ndim)


#: A row's segment: its start and end (user time) and the event at its end, ``(column, kind)``,
#: or ``None`` where it ends at the row's last output time.
_Segment = tuple[float, float, "tuple[int, str] | None"]


def differentiate(
    solve: Callable[..., Solution],
    func: Callable[..., Any],
    y0: Any,
    t: torch.Tensor,
    events: tuple[Event, ...],
    kw: dict[str, Any],
    located: Solution,
    widths: Sequence[int],
) -> Solution:
    """The differentiable solution to the located events (batched; see the module notes).

    ``widths``: how many functions each event returns (its columns among all events')."""
    is_tuple = isinstance(y0, (tuple, list))
    y0 = tuple(y0) if is_tuple else y0
    first = y0[0] if is_tuple else y0
    B, dtype, device = first.shape[0], first.dtype, first.device
    times = t if t.ndim == 2 else t.unsqueeze(0).expand(B, -1)
    grid_t: list[list[float]] = times.detach().to(torch.float64).tolist()
    T = times.shape[1]
    ok = _ok(located.status)
    segments = _segments(located, grid_t, ok.tolist())
    n_seg = max((len(s) for s in segments), default=0)
    if n_seg == 0:  # every row failed to locate: nothing to differentiate
        return located
    jumps = _Jumps(func, events, widths, dtype, device)
    kw = dict(kw, batched=True, dense=False, throw=False)
    pad_eps = torch.finfo(kw.get("t_dtype") or torch.float64).eps
    state = y0
    if times.requires_grad:  # the start time's gradient, as the solve gives it: -f(t0, y0)
        t0 = times[:, 0]
        f0 = func(t0.detach().to(dtype), y0)
        state = _axpy(y0, f0, t0 - t0.detach(), -1.0)
    where_now = [g[0] for g in grid_t]  # each row's current time (user)
    collected: list[tuple[torch.Tensor, Any]] = []
    stats: list[Stats] = [located.stats]
    backward: list[dict[str, Stats] | None] = []
    status = located.status.clone()
    assert located.event_t is not None
    event_t, event_y = located.event_t.clone(), located.event_y
    for j in range(n_seg):
        grid, idx, end_pos, ends_at = _segment_grid(segments, j, grid_t, where_now, pad_eps)
        grid, idx = grid.to(device), idx.to(device)
        live = torch.tensor([e is not False for e in ends_at], device=device)
        sol = solve(func, state, grid, **kw)
        stats.append(sol.stats)
        backward.append(sol._backward)
        status = torch.where(live & ~_ok(sol.status), sol.status, status)
        collected.append((idx, sol.ys))
        pos = torch.tensor(end_pos, dtype=torch.long, device=device)
        y_b = _rows_at(sol.ys, pos)
        t_b = grid.gather(1, pos.unsqueeze(1)).squeeze(1)
        state = _where(live, y_b, state)
        ends = [e if isinstance(e, tuple) else None for e in ends_at]
        if any(e is not None for e in ends):
            t_ev, y_ev, y_start, term = jumps.at(t_b, y_b, ends)
            event_t = torch.where(term, event_t + (t_ev - t_b.to(dtype)).to(event_t.dtype), event_t)
            event_y = _where(term, y_ev, event_y)
            if y_start is not None:  # rows that jumped go on from their new state
                state = _where(jumps.reset, y_start, state)
        where_now = [float(x) for x in t_b.tolist()]
    ys = _assemble(collected, T, is_tuple)
    if times.requires_grad:  # each output's own time: dy(t_i)/dt_i = f(t_i, y_i)
        ys = _attach_output_times(func, ys, times)
    total = _sum_stats(stats)
    total = dataclasses.replace(total, nfe=total.nfe + jumps.nfe)
    return dataclasses.replace(
        located,
        ys=ys,
        stats=total,
        status=status,
        event_t=event_t,
        event_y=event_y,
        _backward=_SummedBackward(backward),
    )


def _segments(
    located: Solution, grid_t: list[list[float]], active: list[bool]
) -> list[list[_Segment]]:
    """Each row's segments between its resets, the last ending at its terminal event or at its
    last output time; a row that failed (``active`` False) ends at the last output it reached,
    so that those outputs are differentiable too."""
    assert located.event_log is not None
    t_end: list[float] = located.t_end.detach().to(torch.float64).reshape(-1).tolist()
    segments: list[list[_Segment]] = []
    for r, row in enumerate(located.event_log):
        u = grid_t[r]
        s = 1.0 if u[-1] >= u[0] else -1.0
        last = u[-1]
        if not active[r]:  # the last output at or before where the row failed
            last = max((x for x in u if s * (x - t_end[r]) <= 0), key=lambda x: s * x)
        cuts = [(x, i, k) for x, i, k in row if k != "event" and s * (x - last) <= 0]
        starts = [u[0]] + [x for x, _, k in cuts if k == "reset"]
        ends: list[tuple[float, tuple[int, str] | None]] = [(x, (i, k)) for x, i, k in cuts]
        if not cuts or cuts[-1][2] != "terminal":
            ends.append((last, None))
        # (a reset at the last time leaves nothing after it to solve)
        segments.append([(a, b, e) for a, (b, e) in zip(starts, ends) if a != b or e is not None])
    return segments


def _segment_grid(
    segments: list[list[_Segment]],
    j: int,
    grid_t: list[list[float]],
    where_now: list[float],
    pad_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[Any]]:
    """Segment ``j`` of every row as one per-sample grid: ``(times [B, L], output index [B, L]
    (T: not an output), the end's position per row, the event at each row's end)``; the event
    is ``False`` for a row without a segment ``j`` (it rides along on padding times).  Rows are
    padded with times past their end, ``1e3`` ulps apart, whose outputs are dropped."""
    T = len(grid_t[0])
    rows, end_pos = [], []
    ends_at: list[Any] = []
    for r, u in enumerate(grid_t):
        s = 1.0 if u[-1] >= u[0] else -1.0
        if j < len(segments[r]):
            a, b, ev_end = segments[r][j]
            inside = [i for i in range(T) if s * (u[i] - a) > 0 and s * (u[i] - b) < 0]
            at_b = [i for i in range(T) if u[i] == b]
            g = [a] + [u[i] for i in inside] + [b]
            m = [0 if j == 0 else T] + inside + [at_b[0] if at_b else T]
            ends_at.append(ev_end)
        else:
            g, m = [where_now[r]], [T]
            ends_at.append(False)
        end_pos.append(len(g) - 1)
        rows.append((g, m, s, abs(u[-1] - u[0])))
    L = max(len(g) for g, _, _, _ in rows) + 1
    times, index = [], []
    for g, m, s, span in rows:
        delta = 1e3 * pad_eps * max(abs(g[-1]), span, 1e-300)
        pad = [g[-1] + s * delta * (k + 1) for k in range(L - len(g))]
        times.append(g + pad)
        index.append(m + [T] * len(pad))
    grid = torch.tensor(times, dtype=torch.float64)
    return grid, torch.tensor(index, dtype=torch.long), end_pos, ends_at


class _Jumps:
    """What happens at the segment ends that are events: the event time with its gradient, the
    state there, and a reset's new state carried back to the (fixed) located time."""

    def __init__(
        self,
        func: Callable[..., Any],
        events: tuple[Event, ...],
        widths: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.func, self.events, self.dtype, self.device = func, events, dtype, device
        self.owner = [e for e, w in enumerate(widths) for _ in range(w)]
        self.offsets = [self.owner.index(e) for e in range(len(events))]
        self.nfe: torch.Tensor | int = 0
        self.reset = torch.zeros(0, dtype=torch.bool, device=device)

    def at(
        self, t_b: torch.Tensor, y_b: Any, ends: list[tuple[int, str] | None]
    ) -> tuple[torch.Tensor, Any, Any, torch.Tensor]:
        """Rows ending at an event (``ends``): ``(t_event, y_event, next start state or None,
        terminal rows)``; ``self.reset`` is set to the rows that jumped."""
        dev = self.device
        evented = torch.tensor([e is not None for e in ends], device=dev)
        col = torch.tensor([-1 if e is None else e[0] for e in ends], device=dev)
        term = torch.tensor([e is not None and e[1] == "terminal" for e in ends], device=dev)
        self.reset = evented & ~term
        ev_of = torch.tensor([self.owner[c] if c >= 0 else -1 for c in col.tolist()], device=dev)
        tb = t_b.to(self.dtype)
        fy = self.func(tb, y_b)
        t_ev = tb
        for e, ev in enumerate(self.events):
            mine = evented & (ev_of == e)
            if bool(mine.any()):
                t_e = event_time(ev.fn, fy, tb, y_b, col - self.offsets[e], mine, ev.label)
                t_ev = torch.where(mine, t_e, t_ev)
        y_ev = event_state(y_b, fy, t_ev, tb)
        self.nfe = self.nfe + evented.long()
        if not bool(self.reset.any()):
            return t_ev, y_ev, None, term
        y_new = y_ev
        for e, ev in enumerate(self.events):
            mine = self.reset & (ev_of == e)
            if ev.reset is not None and bool(mine.any()):
                y_new = _where(mine, ev.reset(t_ev, y_ev), y_new)
        # The next segment starts at the located time t_b (fixed): shift the new state back
        # along the flow by dt* = t_ev - t_b (zero, with its gradient: the saltation term).
        f_new = self.func(tb, y_new)
        self.nfe = self.nfe + self.reset.long()
        return t_ev, y_ev, _axpy(y_new, f_new, t_ev - tb, -1.0), term


def _attach_output_times(func: Callable[..., Any], ys: Any, times: torch.Tensor) -> Any:
    """``y_i + f(t_i, y_i) (t_i - t_i)``: the outputs' derivatives with respect to their times
    (zero at outputs an event left NaN)."""
    parts = ys if isinstance(ys, tuple) else (ys,)
    T = times.shape[1]
    out = []
    for i in range(T):
        yi = tuple(p[:, i] for p in parts)
        fi = func(times[:, i].detach().to(parts[0].dtype), yi if isinstance(ys, tuple) else yi[0])
        fparts = fi if isinstance(fi, tuple) else (fi,)
        dt = times[:, i] - times[:, i].detach()
        out.append(
            tuple(
                p + torch.where(torch.isnan(p), 0.0, q) * per_row(dt.to(p.dtype), p.ndim)
                for p, q in zip(yi, fparts)
            )
        )
    stacked = tuple(torch.stack(x, dim=1) for x in zip(*out))
    return stacked if isinstance(ys, tuple) else stacked[0]


def _ok(status: torch.Tensor) -> torch.Tensor:
    return (status == Status.SUCCESS) | (status == Status.EVENT)


def _assemble(collected: list[tuple[torch.Tensor, Any]], T: int, is_tuple: bool) -> Any:
    """Scatter the segments' outputs into ``[batch, T, ...]`` (NaN where none landed)."""
    idx = torch.cat([i for i, _ in collected], dim=1)

    def one(vals: torch.Tensor) -> torch.Tensor:
        full = vals.new_full((vals.shape[0], T + 1) + vals.shape[2:], math.nan)
        ix = per_row(idx, vals.ndim).expand_as(vals)
        return full.scatter(1, ix, vals)[:, :T]

    if is_tuple:
        parts = list(zip(*[v for _, v in collected]))
        return tuple(one(torch.cat(p, dim=1)) for p in parts)
    return one(torch.cat([v for _, v in collected], dim=1))
