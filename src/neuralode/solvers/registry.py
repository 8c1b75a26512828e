"""Method names: ``method=`` takes one of :data:`METHODS` (or an alias in :data:`ALIASES`), a
:class:`ButcherTableau` or a :class:`~neuralode.solvers.base.Solver`.

The registry is data (a name -> factory table built once); an unknown name is a ``ValueError``
that lists the known ones, never a bare ``KeyError``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .adams import AdamsBashforth, AdamsBashforthMoulton
from .auto import AutoSwitch
from .base import Solver
from .esdirk import Esdirk
from .implicit import ImplicitRK
from .rk import ExplicitRK
from .rosenbrock import Rosenbrock, Rosenbrock23
from .tableaus import ALIASES as _TABLEAU_ALIASES
from .tableaus import (
    ESDIRK_TABLEAUS,
    IMPLICIT_TABLEAUS,
    ROSENBROCK_TABLEAUS,
    TABLEAUS,
    ButcherTableau,
)

__all__ = ["ALIASES", "METHODS", "get_solver"]

_FACTORIES: dict[str, Callable[[], Solver]] = {
    **{name: functools.partial(ExplicitRK, tab) for name, tab in TABLEAUS.items()},
    # Stiff methods (linearly implicit: one Jacobian and LU factorisation per step).
    "rosenbrock23": Rosenbrock23,
    **{name: functools.partial(Rosenbrock, tab) for name, tab in ROSENBROCK_TABLEAUS.items()},
    # Implicit (ESDIRK: a Newton iteration per stage).
    **{name: functools.partial(Esdirk, tab) for name, tab in ESDIRK_TABLEAUS.items()},
    # Fixed-step implicit Runge-Kutta (torchdiffeq's names: all stages by one Newton iteration).
    **{name: functools.partial(ImplicitRK, tab) for name, tab in IMPLICIT_TABLEAUS.items()},
    # tsit5 where a sample is not stiff, rodas5p where it is (switched per sample).
    "auto": lambda: AutoSwitch(get_solver("tsit5"), get_solver("rodas5p")),
    # Fixed-step multistep methods (torchdiffeq's), of order 4 (a configured instance for others).
    "explicit_adams": AdamsBashforth,
    "implicit_adams": AdamsBashforthMoulton,
}

#: Other names of registered methods (torchdiffeq's spellings).
ALIASES: dict[str, str] = {**_TABLEAU_ALIASES, "fixed_adams": "implicit_adams"}

#: The registered method names, in the order the docs list them (docs/concepts/solvers.md).
METHODS: tuple[str, ...] = tuple(_FACTORIES)

_SOLVERS: dict[str, Solver] = {}
_FROM_TABLEAU: dict[int, tuple[ButcherTableau, Solver]] = {}


def get_solver(method: str | ButcherTableau | Solver) -> Solver:
    """The solver for ``method``: a registered name, a tableau, or a solver (returned as is).

    One solver instance serves every solve of a name or tableau (its constant tensors are built
    once per dtype and device); a tableau is keyed by identity, as hashing its fractions on every
    solve would cost more than a small solve's step.

    Args:
        method: a name in :data:`METHODS` or an alias (``"heun2"``, ``"fixed_adams"``); a
            :class:`ButcherTableau` (run by :class:`ExplicitRK`); or a :class:`Solver`.

    Returns:
        The solver, a :class:`Solver`: the same instance for every call with one name (or
            one tableau object), ``method`` itself for a solver.

    Raises:
        ValueError: an unknown name (the message lists :data:`METHODS`), or a tableau with no
            dense output (:class:`ExplicitRK`).
        TypeError: anything else.

    Examples:
        A registered stiff method, used in a solve (the same as ``method="rodas5p"``):

        >>> import torch, neuralode
        >>> solver = neuralode.get_solver("rodas5p")
        >>> solver, solver.order, solver.uses_jacobian, neuralode.get_solver("rodas5p") is solver
        (Rosenbrock('rodas5p'), 5, True, True)
        >>> f = lambda t, y: -1e4 * (y - torch.cos(t))  # stiff: relaxes onto cos t
        >>> sol = neuralode.solve(f, torch.zeros(1, dtype=torch.float64),
        ...                       torch.tensor([0.0, 1.0], dtype=torch.float64), method=solver)
        >>> round(float(sol.ys[-1, 0]), 3), sol.success
        (0.54, True)
    """
    if isinstance(method, str):
        method = ALIASES.get(method, method)
        solver = _SOLVERS.get(method)
        if solver is None:
            factory = _FACTORIES.get(method)
            if factory is None:
                known = ", ".join(sorted([*METHODS, *ALIASES]))
                raise ValueError(
                    f"unknown method {method!r}; known methods are: {known} "
                    f"(or pass a neuralode.ButcherTableau or a neuralode.solvers.Solver)"
                )
            solver = _SOLVERS[method] = factory()
        return solver
    if isinstance(method, Solver):
        return method
    if isinstance(method, ButcherTableau):
        hit = _FROM_TABLEAU.get(id(method))
        if hit is None or hit[0] is not method:
            if len(_FROM_TABLEAU) >= 64:
                _FROM_TABLEAU.clear()
            hit = _FROM_TABLEAU[id(method)] = (method, ExplicitRK(method))
        return hit[1]
    raise TypeError(
        f"method must be a name in {list(METHODS)}, a neuralode.ButcherTableau or a "
        f"neuralode.solvers.Solver, got {type(method).__name__}"
    )
