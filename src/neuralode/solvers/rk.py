"""Explicit Runge-Kutta methods: one solver for every :class:`ButcherTableau`.

Stage combinations are chains of ``add_(k, alpha=a_ij)`` over the non-zero coefficients only, with
the coefficients as Python floats: no tableau tensors, no stacking, and autograd sees one node per
term.  Per-row step sizes enter once per stage through ``addcmul``; a step given as a Python float
(the one-row driver) is folded into the coefficients instead.  Stacking the stages and forming
each one with a single ``addmm`` was measured slower on CPU (``benchmarks/``,
docs/performance.md), so the chains stay.

First-same-as-last is carried state, not a loop assumption: the carried state is ``f(t, y)`` at
the step's start when it is known (the previous step's last stage for an FSAL tableau, the
interpolant's ``f(t + h, y1)`` when one was computed), else ``None`` and the step evaluates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .._rows import per_row
from .base import DenseStep, Func, Solver, StepResult, Time, constant
from .tableaus import ButcherTableau, hermite_dense_output

__all__ = ["ExplicitRK", "KnownFirstStage"]

Terms = tuple[tuple[int, float], ...]


class KnownFirstStage(NamedTuple):
    """A batch's carried first stage known on some rows only: ``k0`` is ``f(t, y)`` at the
    step's start where ``known`` (``[batch]``), and is evaluated afresh for the other rows.

    It arises when rows part ways: a non-FSAL step accepted on some rows (whose next first stage
    is unknown) and rejected on others (who keep theirs), or an interpolant's ``f(t + h, y1)``
    kept by the rows that accepted.  The fresh evaluation is one call over the batch; each row is
    charged only what it would have spent solved alone."""

    k0: torch.Tensor
    known: torch.Tensor


def _terms(row: Sequence[object]) -> Terms:
    return tuple((j, float(x)) for j, x in enumerate(row) if x != 0)  # type: ignore[arg-type]


def _combine(ks: Sequence[torch.Tensor], terms: Terms) -> torch.Tensor:
    """``sum_j a_j k_j`` over the non-zero terms (a fresh tensor)."""
    j0, a0 = terms[0]
    acc = ks[j0] * a0
    for j, a in terms[1:]:
        acc.add_(ks[j], alpha=a)
    return acc


def _stage(
    y: torch.Tensor, h: torch.Tensor | float, ks: Sequence[torch.Tensor], terms: Terms
) -> torch.Tensor:
    """``y + h * sum_j a_j k_j``; ``h`` a float, or a tensor broadcastable against ``y``."""
    if not terms:
        return y
    if isinstance(h, float):
        j0, a0 = terms[0]
        acc = torch.add(y, ks[j0], alpha=h * a0)
        for j, a in terms[1:]:
            acc.add_(ks[j], alpha=h * a)
        return acc
    return torch.addcmul(y, h, _combine(ks, terms))


def _h_state(h: Time, y: torch.Tensor) -> torch.Tensor | float:
    """The step in the state's dtype, shaped to broadcast against ``y`` (per-row steps)."""
    if isinstance(h, float):
        return h
    return per_row(h.to(y.dtype), y.ndim)


def _time(t: Time, y: torch.Tensor) -> torch.Tensor:
    """A time in the state dtype, as ``f`` receives it."""
    if isinstance(t, float):
        return torch.tensor(t, dtype=y.dtype, device=y.device)
    return t.to(y.dtype)


class ExplicitRK(Solver):
    """An explicit Runge-Kutta method given by its tableau.

    Args:
        tableau: a validated :class:`ButcherTableau` (``b_err`` makes it adaptive; ``dense``
            gives its interpolant: every registered tableau has one, and a tableau of your own
            without one gets cubic Hermite's, :func:`~neuralode.tableaus.hermite_dense_output`).

    Raises:
        TypeError: ``tableau`` is not a :class:`ButcherTableau`.

    Examples:
        >>> import torch, neuralode
        >>> from neuralode.solvers import ExplicitRK
        >>> rk4 = ExplicitRK(neuralode.get_tableau("rk4"))
        >>> ys = neuralode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]),
        ...                       method=rk4)
    """

    def __init__(self, tableau: ButcherTableau) -> None:
        if not isinstance(tableau, ButcherTableau):
            raise TypeError(f"ExplicitRK needs a ButcherTableau, got {type(tableau).__name__}")
        # A tableau of the user's without an interpolant gets cubic Hermite's (its f(t + h, y1)
        # starts the next step, so it costs an evaluation only at the last step).
        dense = tableau.dense or hermite_dense_output(tableau.b, tableau.order)
        self.tableau = tableau
        self.name = tableau.name
        self.order = tableau.order
        self.error_order = tableau.error_order
        self.dense_order = dense.order
        self.fsal = tableau.fsal
        self.n_stages = tableau.stages
        self.a_terms = [_terms(row) for row in tableau.a]
        self.b_terms = _terms(tableau.b)
        self.e_terms = _terms(tableau.b_err) if tableau.b_err is not None else None
        self.e2_terms = _terms(tableau.b_err2) if tableau.b_err2 is not None else None
        self.c_list = [float(x) for x in tableau.c]
        self.extra_c = [float(x) for x in dense.extra_c]
        self.extra_terms = [_terms(row) for row in dense.extra_a]
        # An extra stage with node 1 and a-row b is f(t + h, y1): its input is y1 itself, and its
        # value starts the next step.
        self.extra_is_f1 = [
            c == 1 and tuple(row) == tuple(tableau.b)
            for c, row in zip(dense.extra_c, dense.extra_a)
        ]
        self._P = [[float(x) for x in row] for row in dense.P]
        self._c_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._P_cache: dict[torch.device, torch.Tensor] = {}

    def _nodes(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The nodes ``c`` in the time dtype, built once per dtype and device."""
        c = self._c_cache.get((dtype, device))
        if c is None:
            c = self._c_cache[(dtype, device)] = constant(
                lambda: torch.tensor(self.c_list, dtype=dtype, device=device)
            )
        return c

    def _coefficients(self, device: torch.device) -> torch.Tensor:
        """The interpolant's ``P`` in float64, built once per device."""
        P = self._P_cache.get(device)
        if P is None:
            P = self._P_cache[device] = constant(
                lambda: torch.tensor(self._P, dtype=torch.float64, device=device)
            )
        return P

    def init(self, f: Func, t: Time, y: torch.Tensor, f0: torch.Tensor | None) -> Any:
        return f0

    def stage_times(self, t: torch.Tensor, h: torch.Tensor, dtype: torch.dtype) -> Any:
        c = self._nodes(t.dtype, t.device)
        shape = (1, -1) + (1,) * (t.ndim - 1)
        n, s = t.shape[0], c.shape[0]
        times = torch.addcmul(t.unsqueeze(1), c.view(shape), h.unsqueeze(1)).to(dtype)
        flat = iter(times.reshape((n * s,) + times.shape[2:]).unbind(0))
        return list(zip(*[flat] * s))  # n groups of s consecutive times, one unbind

    def _step_times(self, t: Time, h: Time, y: torch.Tensor) -> Sequence[torch.Tensor]:
        if isinstance(t, float) and isinstance(h, float):
            return torch.tensor(
                [t + c * h for c in self.c_list], dtype=y.dtype, device=y.device
            ).unbind(0)
        assert isinstance(t, torch.Tensor) and isinstance(h, torch.Tensor)
        c = self._nodes(t.dtype, t.device).view((-1,) + (1,) * t.ndim)
        return torch.addcmul(t, c, h).to(y.dtype).unbind(0)

    def step(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, state: Any, times: Any = None
    ) -> StepResult:
        ts = times if times is not None else self._step_times(t, h, y)
        h_y = _h_state(h, y)
        k0 = state
        nfe: int | torch.Tensor = self.n_stages - 1
        if isinstance(k0, KnownFirstStage):
            known = k0.known
            k0 = torch.where(per_row(known, y.ndim), k0.k0, f(ts[0], y))
            nfe = self.n_stages - known.long()
        elif k0 is None:
            k0 = f(ts[0], y)
            nfe += 1
        ks = [k0]
        y1 = y
        for i in range(1, self.n_stages):
            y1 = _stage(y, h_y, ks, self.a_terms[i])
            ks.append(f(ts[i], y1))
        if not self.fsal:
            y1 = _stage(y, h_y, ks, self.b_terms)
        y_error: torch.Tensor | tuple[torch.Tensor, ...] | None = None
        if self.e_terms is not None:
            with torch.no_grad():  # step-size control is not differentiated
                y_error = _combine(ks, self.e_terms).mul_(h_y)
                if self.e2_terms is not None:
                    y_error = (y_error, _combine(ks, self.e2_terms).mul_(h_y))
        return StepResult(y1, y_error, ks, ks[-1] if self.fsal else None, nfe, None, k0)

    def merge(self, accept: torch.Tensor, new: Any, old: Any) -> Any:
        """The carried first stage per row: ``new`` where ``accept``, else ``old``; where one
        side is unknown (``None``), the rows on the other side keep theirs
        (:class:`KnownFirstStage`)."""
        if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
            return torch.where(per_row(accept, new.ndim), new, old)
        if new is None and old is None:
            return None
        n_k, n_known = _known(new, accept)
        o_k, o_known = _known(old, accept)
        k = (
            o_k
            if n_k is None
            else n_k
            if o_k is None
            else torch.where(per_row(accept, n_k.ndim), n_k, o_k)
        )
        assert k is not None
        return KnownFirstStage(k, torch.where(accept, n_known, o_known))

    def error_norm(self, norms: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(norms) == 1:
            return norms[0]
        # Hairer's DOP853 estimator: err5^2 / sqrt(err5^2 + 0.01 err3^2), norms as RMS.
        e5sq = norms[0].square()
        den = (e5sq + 0.01 * norms[1].square()).sqrt()
        return e5sq / den.clamp(min=torch.finfo(den.dtype).tiny)  # 0 where den = 0 (then e5 = 0)

    def dense(
        self, f: Func, t: Time, h: Time, y: torch.Tensor, result: StepResult
    ) -> tuple[DenseStep, int, Any]:
        ks = list(result.dense_info)
        next_state = None
        if self.extra_c:
            h_y = _h_state(h, y)
            for c, terms, is_f1 in zip(self.extra_c, self.extra_terms, self.extra_is_f1):
                yi = result.y1 if is_f1 else _stage(y, h_y, ks, terms)
                tc = t + c * h
                ks.append(f(_time(tc, y), yi))
                if is_f1:
                    next_state = ks[-1]
        P = self._coefficients(y.device)
        return DenseStep(y, h, ks, P), len(self.extra_c), next_state


def _known(state: Any, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A carried first stage as ``(k0 or None, known rows)``."""
    if state is None:
        return None, torch.zeros_like(like, dtype=torch.bool)
    if isinstance(state, KnownFirstStage):
        return state.k0, state.known
    return state, torch.ones_like(like, dtype=torch.bool)
