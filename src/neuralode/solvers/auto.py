"""Automatic stiffness switching: an explicit method where the problem is not stiff, a stiff one
where it is, chosen per sample and step by step (``method="auto"``: ``tsit5`` and ``rodas5p``).

The test is the one of Hairer's DOPRI5 and of OrdinaryDiffEq's ``AutoSwitch``: a step of size
``h`` is *stiff* when ``h rho > 0.9 S``, where ``S`` is the explicit method's stability limit on
the negative real axis (computed from its tableau: 3.5068 for ``tsit5``) and ``rho`` estimates
the field's largest eigenvalue magnitude:

* on an explicit step, from two evaluations at the step's end (an FSAL tableau's last two
  stages, both at ``t + h``): ``rho = |f(t+h, y1) - f(t+h, g)| / |y1 - g|`` (Euclidean norms per
  sample, ``g`` the penultimate stage's input), at no extra evaluation;
* on a stiff step, ``|J|_inf`` of the Jacobian the step took (an upper bound of ``rho``).

A sample switches to the stiff method after 15 stiff verdicts of its explicit steps with no run
of 6 non-stiff ones between them (Hairer's DOPRI5 rule: a method held at its stability limit
alternates a few steps over it with one or two under it, so a count of *consecutive* verdicts,
OrdinaryDiffEq's, took 3,559 tsit5 steps to notice Robertson's stiffness at rtol 1e-3), and back
after more than 3 consecutive non-stiff verdicts of its stiff steps (OrdinaryDiffEq's default).
Only accepted steps give verdicts.  An explicit verdict takes the largest ratio of the row's last
6 steps, and the two-stage estimate, a lower bound, is checked against the Jacobian: a row whose
recent ratios pass 0.3 takes one (at most every 10 explicit steps), and switches at once if
``h rho(J)`` passes the threshold (``rho`` by power iteration).  On Robertson at rtol 1e-8 the
stage estimate said 0.3-0.8 of the limit at a constant step where ``h |lambda|`` was about 0.95
of it: the switch came after 2,639 explicit steps without the probe, after 75 with it.

Per sample: each row carries its own mode.  A step where every row is in one mode runs that
method only; a step where rows differ runs both over the batch, each with a zero step on the
other method's rows (so no row sees the other method's step and nothing overflows), and takes
each row's result from its own method.  Each row is charged the evaluations, Jacobians and
factorisations of its own method, as if solved alone.  Deciding which methods to run is one host
synchronisation per step (the loop's own decision is another).

Gradients: the choice is a discrete decision (not differentiated); each step is differentiable
as its method is.  The checkpoint strategy records each step's per-row modes
(:meth:`Solver.choice`) and replays the same method.  A jump in the field (``jump_t``) restarts a
row in the explicit mode.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .._rows import per_row
from .base import DenseStep, Func, Solver, StepResult, Time
from .newton import Linearisation, inf_norm, jacobian
from .rk import ExplicitRK, _stage, _time

__all__ = ["AutoSwitch", "AutoState", "spectral_radius", "stability_limit"]


class AutoState(NamedTuple):
    """The carried state of :class:`AutoSwitch`, per row.

    Attributes:
        stiff: row-shaped bool: the row's next step uses the stiff method.
        n_stiff: row-shaped int64: the stiff verdicts of the row's explicit steps since its last
            run of non-stiff ones (0 in the stiff mode).
        n_calm: row-shaped int64: the row's consecutive non-stiff verdicts.
        recent: ``[*rows, window]``: the row's last ``h rho / S`` of its accepted steps.
        since_probe: row-shaped int64: the row's explicit steps since its last Jacobian probe.
        explicit: the explicit method's carried state (``f(t, y)`` where known).
        implicit: the stiff method's carried state (a rejected step's linearisation).
    """

    stiff: torch.Tensor
    n_stiff: torch.Tensor
    n_calm: torch.Tensor
    recent: torch.Tensor
    since_probe: torch.Tensor
    explicit: Any
    implicit: Any


class _Parts(NamedTuple):
    """What :meth:`AutoSwitch.dense` needs: the step's modes and each method's own result."""

    stiff: torch.Tensor
    explicit: StepResult | None
    implicit: StepResult | None


def stability_limit(solver: ExplicitRK) -> float:
    """Where an explicit Runge-Kutta method's stability region meets the negative real axis:
    the largest ``x`` with ``|R(-s)| <= 1`` for every ``s`` in ``[0, x]``, ``R`` the stability
    polynomial ``1 + sum_k z^k b^T A^(k-1) 1`` (``tsit5``: 3.5068, ``dopri5``: 3.3066)."""
    tab = solver.tableau
    s = tab.stages
    A = torch.tensor(
        [[float(x) for x in row] + [0.0] * (s - len(row)) for row in tab.a], dtype=torch.float64
    )
    b = torch.tensor([float(x) for x in tab.b], dtype=torch.float64)
    coef, v = [1.0], torch.ones(s, dtype=torch.float64)
    for _ in range(s):
        coef.append(float(b @ v))
        v = A @ v

    def unstable(x: float) -> bool:
        return abs(sum(c * (-x) ** k for k, c in enumerate(coef))) > 1.0

    grid = torch.linspace(1e-3, 20.0, 20000, dtype=torch.float64)
    z = -grid
    R = torch.zeros_like(z)
    for k, c in enumerate(coef):
        R = R + c * z**k
    bad = (R.abs() > 1.0).nonzero()
    if bad.numel() == 0:
        return float(grid[-1])
    hi = float(grid[int(bad[0])])
    lo = float(grid[int(bad[0]) - 1]) if int(bad[0]) > 0 else 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if unstable(mid) else (mid, hi)
    return lo


def spectral_radius(J: torch.Tensor, iters: int = 24) -> torch.Tensor:
    """The largest eigenvalue magnitude of each ``[..., N, N]`` matrix, by power iteration from
    ``v_k = 1 + sin(k) / 2`` (not symmetric: a constant start is orthogonal to every
    antisymmetric eigenvector, as a discretised field's often are): the geometric mean of the
    iterates' growth over the last two thirds of ``iters`` (a complex pair's iterates rotate,
    and their growth per step swings; its mean does not).  Unlike
    ``|J|_inf`` it does not grow with a badly scaled state: ``[[0, 1], [-100, 0]]`` has
    ``|J|_inf = 100`` and spectral radius 10."""
    N = J.shape[-1]
    k = torch.arange(N, dtype=J.dtype, device=J.device)
    v = (1.0 + 0.5 * torch.sin(k)).expand(J.shape[:-1]).unsqueeze(-1)  # no symmetry to miss
    tiny = torch.finfo(J.dtype).tiny
    total = torch.zeros(J.shape[:-2], dtype=J.dtype, device=J.device)
    skip = iters // 3
    for i in range(iters):
        v = J @ v
        n = torch.linalg.vector_norm(v, dim=(-2, -1)).clamp(min=tiny)
        v = v / n[..., None, None]
        if i >= skip:
            total = total + n.log()
    return (total / (iters - skip)).exp()


class AutoSwitch(Solver):
    """An explicit and a stiff method, switched per sample on a stiffness test (see the module
    docstring).

    Args:
        explicit: an adaptive explicit method with first-same-as-last stages whose last two
            nodes are 1 (``tsit5``, ``dopri5``, ``dopri8``): its last two stages give the
            stiffness estimate for free.
        stiff: an adaptive stiff method with the same error order (a Rosenbrock or ESDIRK
            method: the Jacobian its step took gives the estimate in the stiff mode).
        stiff_steps: the stiff verdicts after which a row switches to ``stiff``.
        calm_reset: consecutive non-stiff verdicts that clear a row's stiff verdicts.
        window: an explicit step's verdict takes the largest ratio of the row's last ``window``
            accepted steps.
        probe_every, probe_level: a row whose largest recent ratio exceeds ``probe_level``
            takes a Jacobian at most every ``probe_every`` explicit steps, and switches at once
            if ``h rho(J) / S`` exceeds ``tol`` (:func:`spectral_radius`; the stage estimate is
            a lower bound).
        max_nonstiff_steps: consecutive non-stiff verdicts of ``stiff`` steps after which a row
            switches back (on the next one).
        tol: the verdict's threshold, as a fraction of the stability limit.
        name: the solver's name (``"auto"``: the registered ``tsit5``/``rodas5p`` pair).

    Raises:
        ValueError: ``explicit`` is not an adaptive first-same-as-last :class:`ExplicitRK`
            whose last two nodes are 1; ``stiff`` is not adaptive or has another error order;
            or a count is out of range (``stiff_steps``, ``calm_reset``, ``window`` below 1,
            ``max_nonstiff_steps`` below 0, ``tol`` not positive).

    Examples:
        >>> import torch, neuralode
        >>> lam = torch.tensor([[1.0], [1e4]], dtype=torch.float64)  # the second row is stiff
        >>> f = lambda t, y: -lam * (y - torch.cos(t).unsqueeze(-1))
        >>> sol = neuralode.solve(f, torch.zeros(2, 1, dtype=torch.float64),
        ...                       torch.linspace(0, 10, 5, dtype=torch.float64), method="auto",
        ...                       batched=True)
        >>> sol.stats.njev.tolist()[0], sol.stats.njev.tolist()[1] > 0  # Jacobians per sample
        (0, True)
    """

    def __init__(
        self,
        explicit: Solver,
        stiff: Solver,
        *,
        stiff_steps: int = 15,
        calm_reset: int = 6,
        window: int = 6,
        probe_every: int = 10,
        probe_level: float = 0.3,
        max_nonstiff_steps: int = 3,
        tol: float = 0.9,
        name: str = "auto",
    ) -> None:
        if not isinstance(explicit, ExplicitRK) or not explicit.fsal or not explicit.adaptive:
            raise ValueError(
                f"explicit must be an adaptive first-same-as-last ExplicitRK (tsit5, dopri5, "
                f"dopri8), got {explicit!r}"
            )
        c = explicit.c_list
        if len(c) < 3 or c[-1] != 1.0 or c[-2] != 1.0:
            raise ValueError(
                f"explicit's last two nodes must be 1 (for the stiffness estimate), got {c}"
            )
        if not stiff.adaptive or stiff.error_order != explicit.error_order:
            raise ValueError(
                f"stiff must be adaptive with the explicit method's error order "
                f"({explicit.error_order}), got {stiff!r} (error order {stiff.error_order})"
            )
        if min(stiff_steps, calm_reset, window) < 1 or max_nonstiff_steps < 0 or not tol > 0:
            raise ValueError(
                f"stiff_steps, calm_reset and window must be >= 1, max_nonstiff_steps >= 0 and "
                f"tol > 0, got {stiff_steps}, {calm_reset}, {window}, {max_nonstiff_steps}, {tol}"
            )
        self.explicit, self.stiff = explicit, stiff
        self.name = name
        self.order = min(explicit.order, stiff.order)
        self.error_order = explicit.error_order
        self.dense_order = min(explicit.dense_order, stiff.dense_order)
        self.stiff_steps = stiff_steps
        self.calm_reset = calm_reset
        self.window = window
        self.probe_every, self.probe_level = probe_every, probe_level
        self.max_nonstiff_steps = max_nonstiff_steps
        self.tol = tol
        self.limit = stability_limit(explicit)
        # Stiff steps end on outputs when the stiff method's do (its interpolant is not
        # error-controlled in the stiff regime); explicit steps interpolate.
        self.lands_on_outputs = stiff.lands_on_outputs or explicit.lands_on_outputs
        self.lands_per_row = stiff.lands_on_outputs and not explicit.lands_on_outputs
        self.uses_jacobian = stiff.uses_jacobian
        # The stage before the last: its input g and value f(t + h, g) against f(t + h, y1).
        self._g_terms = explicit.a_terms[-2]

    def configured(self, controller: Any) -> Solver:
        explicit = self.explicit.configured(controller)
        stiff = self.stiff.configured(controller)
        if explicit is self.explicit and stiff is self.stiff:
            return self
        return AutoSwitch(
            explicit,
            stiff,
            stiff_steps=self.stiff_steps,
            calm_reset=self.calm_reset,
            window=self.window,
            probe_every=self.probe_every,
            probe_level=self.probe_level,
            max_nonstiff_steps=self.max_nonstiff_steps,
            tol=self.tol,
            name=self.name,
        )

    def init(self, f: Func, t: Time, y: torch.Tensor, f0: torch.Tensor | None) -> Any:
        rows = t.shape if isinstance(t, torch.Tensor) else ()
        stiff = torch.zeros(rows, dtype=torch.bool, device=y.device)
        zero = torch.zeros(rows, dtype=torch.int64, device=y.device)
        return AutoState(
            stiff,
            zero,
            zero,
            torch.zeros((*rows, self.window), dtype=y.dtype, device=y.device),
            zero,
            self.explicit.init(f, t, y, f0),
            self.stiff.init(f, t, y, None),
        )

    def landing(self, state: Any) -> torch.Tensor | bool:
        return state.stiff if self.stiff.lands_on_outputs else False

    def choice(self, state: Any) -> Any:
        return state.stiff

    def replay_state(self, f: Func, t: Time, y: torch.Tensor, choice: Any) -> Any:
        fresh = self.init(f, t, y, None)
        return fresh._replace(stiff=choice)

    def merge(self, accept: torch.Tensor, new: Any, old: Any) -> Any:
        return AutoState(
            torch.where(accept, new.stiff, old.stiff),
            torch.where(accept, new.n_stiff, old.n_stiff),
            torch.where(accept, new.n_calm, old.n_calm),
            torch.where(accept.unsqueeze(-1), new.recent, old.recent),
            torch.where(accept, new.since_probe, old.since_probe),
            self.explicit.merge(accept, new.explicit, old.explicit),
            self.stiff.merge(accept, new.implicit, old.implicit),
        )

    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        stiff: torch.Tensor = state.stiff
        due = (
            ~stiff
            & (state.since_probe >= self.probe_every)
            & (state.recent.amax(-1) > self.probe_level)
        )
        any_stiff, all_stiff, any_due = torch.stack((stiff.any(), stiff.all(), due.any())).tolist()
        mixed = any_stiff and not all_stiff
        habs = h.abs().to(y.dtype) if isinstance(h, torch.Tensor) else abs(h)
        probe = None
        if any_due:  # rho(J) where the stage estimate is high enough to be worth checking
            with torch.no_grad():
                J = jacobian(f, _time(t, y), y).J
            probe = torch.where(due, spectral_radius(J) * habs / self.limit, 0.0)
        probed = due.long()  # each probe: f(t, y) and a Jacobian, charged to its row
        r_e = r_s = None
        if not all_stiff:
            h_e = torch.where(stiff, 0.0, h) if mixed else h
            r_e = self.explicit.step(f, t, h_e, y, state.explicit, times)
        if any_stiff:
            h_s = torch.where(stiff, h, 0.0) if mixed else h
            r_s = self.stiff.step(f, t, h_s, y, state.implicit)
        with torch.no_grad():
            rho = self._rho(y, h, r_e, r_s, stiff)
            # Explicit rows judge by the largest ratio of their last few steps: the estimate
            # from two stages is a lower bound that swings with the direction of y1 - g (on
            # Robertson at rtol 1e-8, between 0.2 and 1.0 of the limit from step to step at a
            # nearly constant h); stiff rows by this step's |J|_inf, an upper bound.
            ratio = rho * habs / self.limit
            recent = torch.cat([state.recent[..., 1:], ratio.unsqueeze(-1)], dim=-1)
            verdict = torch.where(stiff, ratio, recent.amax(-1)) > self.tol
            forced = due & (probe > self.tol) if probe is not None else torch.zeros_like(due)
            n_calm = torch.where(verdict, 0, state.n_calm + 1)
            n_stiff = torch.where(verdict, state.n_stiff + 1, state.n_stiff)
            n_stiff = torch.where(n_calm >= self.calm_reset, 0, n_stiff)
            to_stiff = ~stiff & ((n_stiff >= self.stiff_steps) | forced)
            to_explicit = stiff & (n_calm > self.max_nonstiff_steps)
            new_stiff = (stiff | to_stiff) & ~to_explicit
            switched = to_stiff | to_explicit
            n_stiff = torch.where(switched | stiff, 0, n_stiff)
            n_calm = torch.where(switched, 0, n_calm)
            recent = torch.where(switched.unsqueeze(-1), 0.0, recent)
            since = torch.where(due | switched | stiff, 0, state.since_probe + 1)
        if r_s is None:  # every row explicit
            assert r_e is not None
            new = AutoState(new_stiff, n_stiff, n_calm, recent, since, r_e.state, None)
            retry = state._replace(explicit=r_e.retry_state)
            return StepResult(
                r_e.y1,
                r_e.y_error,
                _Parts(stiff, r_e, None),
                new,
                r_e.nfe if probe is None else r_e.nfe + probed,
                r_e.status,
                retry,
                0 if probe is None else probed,
            )
        if r_e is None:  # every row stiff
            retry_s = state.implicit if r_s.retry_state is None else r_s.retry_state
            new = AutoState(new_stiff, n_stiff, n_calm, recent, since, None, r_s.state)
            retry = state._replace(implicit=retry_s)
            return StepResult(
                r_s.y1,
                r_s.y_error,
                _Parts(stiff, None, r_s),
                new,
                r_s.nfe,
                r_s.status,
                retry,
                r_s.njev,
                r_s.nlu,
                r_s.n_newton,
            )
        # Rows in both modes: each takes its own method's results.
        s_y = per_row(stiff, y.ndim)
        y1 = torch.where(s_y, r_s.y1, r_e.y1)
        assert isinstance(r_e.y_error, torch.Tensor) and isinstance(r_s.y_error, torch.Tensor)
        y_error = torch.where(s_y, r_s.y_error, r_e.y_error)
        zero = torch.zeros((), dtype=torch.int64, device=y.device)

        def pick(a: int | torch.Tensor, b: int | torch.Tensor) -> torch.Tensor:
            return torch.where(stiff, torch.as_tensor(b, device=y.device), a)

        status = None
        if r_e.status is not None or r_s.status is not None:
            status = pick(
                zero if r_e.status is None else r_e.status,
                zero if r_s.status is None else r_s.status,
            )
        retry_s = state.implicit if r_s.retry_state is None else r_s.retry_state
        new = AutoState(
            new_stiff,
            n_stiff,
            n_calm,
            recent,
            since,
            self.explicit.merge(~stiff, r_e.state, None),  # f(t + h, y1) of the explicit rows
            r_s.state,
        )
        retry = state._replace(explicit=r_e.retry_state, implicit=retry_s)
        return StepResult(
            y1,
            y_error,
            _Parts(stiff, r_e, r_s),
            new,
            pick(r_e.nfe if probe is None else r_e.nfe + probed, r_s.nfe),
            status,
            retry,
            pick(zero if probe is None else probed, r_s.njev),
            pick(zero, r_s.nlu),
            pick(zero, r_s.n_newton),
        )

    def _rho(
        self,
        y: torch.Tensor,
        h: Time,
        r_e: StepResult | None,
        r_s: StepResult | None,
        stiff: torch.Tensor,
    ) -> torch.Tensor:
        """The estimate of the field's largest eigenvalue magnitude per row (see the module)."""
        dims = tuple(range(1, y.ndim)) if stiff.ndim else tuple(range(y.ndim))
        rho_e = rho_s = None
        if r_e is not None:
            ks = r_e.dense_info
            h_y = h if isinstance(h, float) else per_row(h.to(y.dtype), y.ndim)
            g = _stage(y, h_y, ks, self._g_terms)
            num = torch.linalg.vector_norm(ks[-1] - ks[-2], dim=dims)
            den = torch.linalg.vector_norm(r_e.y1 - g, dim=dims)
            rho_e = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), 0.0)
        if r_s is not None:
            lin = r_s.retry_state
            if isinstance(lin, Linearisation):
                rho_s = inf_norm(lin.J)
            else:  # a stiff method that keeps no Jacobian: no verdict against it
                rho_s = torch.full(stiff.shape, torch.inf, dtype=y.dtype, device=y.device)
        if rho_e is None:
            assert rho_s is not None
            return rho_s
        if rho_s is None:
            return rho_e
        return torch.where(stiff, rho_s, rho_e)

    def dense(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, result: StepResult
    ) -> tuple[DenseStep, int, Any]:
        parts: _Parts = result.dense_info
        if parts.implicit is None:
            assert parts.explicit is not None
            d, extra, nxt = self.explicit.dense(f, t, h, y, parts.explicit)
            return d, extra, None if nxt is None else result.state._replace(explicit=nxt)
        if parts.explicit is None:
            return self.stiff.dense(f, t, h, y, parts.implicit)
        d_e, extra, _ = self.explicit.dense(f, t, h, y, parts.explicit)
        d_s, _, _ = self.stiff.dense(f, t, h, y, parts.implicit)
        s_y = per_row(parts.stiff, y.ndim)
        zero = y.new_zeros(())
        ks = [torch.where(s_y, zero, k) for k in d_e.ks] + [
            torch.where(s_y, k, zero) for k in d_s.ks
        ]
        deg = max(d_e.P.shape[1], d_s.P.shape[1])
        P = torch.cat(
            [torch.nn.functional.pad(p, (0, deg - p.shape[1])) for p in (d_e.P, d_s.P)], dim=0
        )
        return DenseStep(y, h, ks, P), extra, None
