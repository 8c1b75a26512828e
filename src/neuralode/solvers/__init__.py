"""Solvers: the protocol the loop drives, and the methods that implement it.

- :mod:`.base`: :class:`Solver` (``init``, ``step``, ``dense``, ``merge``, ``error_norm``) and
  :class:`StepResult`.
- :mod:`.tableaus`: Butcher tableaus as validated exact data.
- :mod:`.rk`: :class:`ExplicitRK`, one solver for every explicit tableau.
- :mod:`.rosenbrock`: :class:`Rosenbrock` (any :class:`RosenbrockTableau`) and
  :class:`Rosenbrock23`, the linearly implicit stiff methods; :mod:`.esdirk`: :class:`Esdirk`
  (any :class:`EsdirkTableau`), the implicit ones; :mod:`.implicit`: :class:`ImplicitRK` (any
  :class:`ImplicitTableau`), the fixed-step implicit ones; :mod:`.newton`: their per-sample
  Jacobians.
- :mod:`.adams`: :class:`AdamsBashforth` and :class:`AdamsBashforthMoulton`, torchdiffeq's
  fixed-step multistep methods (``explicit_adams``, ``implicit_adams``).
- :mod:`.auto`: :class:`AutoSwitch`, an explicit and a stiff method switched per sample on a
  stiffness test (``method="auto"``).
- :mod:`.registry`: :data:`METHODS` and :func:`get_solver` (a name, a tableau or a solver).
"""

from .adams import AdamsBashforth, AdamsBashforthMoulton
from .auto import AutoSwitch
from .base import DenseStep, Solver, StepResult
from .esdirk import Esdirk, NewtonSettings
from .implicit import ImplicitRK
from .registry import METHODS, get_solver
from .rk import ExplicitRK
from .rosenbrock import Rosenbrock, Rosenbrock23
from .tableaus import (
    ESDIRK_TABLEAUS,
    IMPLICIT_TABLEAUS,
    ROSENBROCK_TABLEAUS,
    TABLEAUS,
    ButcherTableau,
    DenseOutput,
    EsdirkTableau,
    ImplicitTableau,
    RosenbrockTableau,
    get_tableau,
)

__all__ = [
    "Solver",
    "StepResult",
    "DenseStep",
    "ExplicitRK",
    "Rosenbrock",
    "Rosenbrock23",
    "RosenbrockTableau",
    "ROSENBROCK_TABLEAUS",
    "Esdirk",
    "EsdirkTableau",
    "ESDIRK_TABLEAUS",
    "NewtonSettings",
    "ImplicitRK",
    "ImplicitTableau",
    "IMPLICIT_TABLEAUS",
    "AutoSwitch",
    "AdamsBashforth",
    "AdamsBashforthMoulton",
    "METHODS",
    "get_solver",
    "ButcherTableau",
    "DenseOutput",
    "TABLEAUS",
    "get_tableau",
]
