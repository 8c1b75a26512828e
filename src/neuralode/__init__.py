"""neuralode: differentiable ODE solvers as PyTorch layers.

``odeint`` is torchdiffeq-compatible; ``solve`` is the full interface (per-sample grids and
step sizes, statistics, status, dense output). ``load_run`` reads back the model of a run
folder written by the ``neuralode`` command.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .compat import ODE_OPTIONS, odeint, odeint_adjoint, odeint_event
from .events import Event, GrazingEventError
from .solution import Solution, SolverError, Stats, Status
from .solve import solve
from .solvers import METHODS, ButcherTableau, Solver, get_solver
from .tableaus import TABLEAUS, get_tableau

__all__ = [
    "Event",
    "GrazingEventError",
    "odeint",
    "odeint_adjoint",
    "odeint_event",
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
    "load_run",
]

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .experiments.engine import TrainedRun


def load_run(run: str | os.PathLike[str], device: str = "cpu") -> TrainedRun:
    """The trained model of a run folder written by ``neuralode train`` (any experiment).

    Example::

        import neuralode

        run = neuralode.load_run("runs/demo")
        run.model                       # the nn.Module, eval mode, last checkpoint's weights
        run.config.method               # every setting of the run (its config dataclass)
        run.step                        # training steps those weights have taken
        run.task.evaluate(run.model)    # the run's test metrics, recomputed

    Args:
        run: the run folder.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``: where the model (and its task's data) go.

    Returns:
        A :class:`neuralode.experiments.engine.TrainedRun` (``model``, ``config``, ``step``,
        ``task``, ``ctx``).

    Raises:
        ValueError: if ``run`` is not a run folder or has no checkpoint yet.
    """
    from .experiments.engine import load_run as _load_run  # experiments load on demand only

    return _load_run(run, device)
