"""neuralode: differentiable ODE solvers as PyTorch layers.

``odeint`` is torchdiffeq-compatible; ``solve`` is the full interface (per-sample grids and
step sizes, statistics, status, dense output).
"""

from .compat import ODE_OPTIONS, odeint, odeint_adjoint
from .solution import Solution, SolverError, Stats, Status
from .solve import solve
from .solvers import METHODS, ButcherTableau, Solver, get_solver
from .tableaus import TABLEAUS, get_tableau

__all__ = [
    "odeint",
    "odeint_adjoint",
    "solve",
    "Solution",
    "SolverError",
    "Stats",
    "Status",
    "ButcherTableau",
    "Solver",
    "get_solver",
    "TABLEAUS",
    "get_tableau",
    "ODE_OPTIONS",
    "METHODS",
]

__version__ = "0.1.0"
