"""neuralode: differentiable ODE solvers as PyTorch layers.

``odeint`` is torchdiffeq-compatible; ``solve`` is the full interface (per-sample grids and
step sizes, statistics, status, dense output). ``load_run`` reads back the model of a run
folder written by the ``neuralode`` command.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._compiled import CompileOptions
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
    "CompileOptions",
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

    The model and its task are rebuilt from the run's stored config, as ``neuralode evaluate``
    rebuilds them.

    Args:
        run: the run folder (holding ``config.json`` and ``checkpoints/last.pt``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``: where the model (and its task's data) go.

    Returns:
        A :class:`neuralode.experiments.engine.TrainedRun`: ``model`` (the experiment's
        ``nn.Module`` with the last checkpoint's weights, in eval mode), ``config`` (every
        setting of the run, its experiment's config dataclass), ``step`` (the training steps
        those weights have taken), ``task`` (its data and ``evaluate(model)``) and ``ctx``.

    Raises:
        ValueError: if ``run`` is not a run folder or has no checkpoint yet.

    Examples:
        With a run trained by ``neuralode train spiral --out runs/demo`` (training one takes
        longer than an example should, hence the skipped lines):

        >>> import neuralode
        >>> run = neuralode.load_run("runs/demo")  # doctest: +SKIP
        >>> type(run.model).__name__, run.model.training, run.config.method  # doctest: +SKIP
        ('SpiralField', False, 'dopri5')
        >>> metrics = run.task.evaluate(run.model)  # the run's test metrics  # doctest: +SKIP

        A folder that holds no run is refused:

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     neuralode.load_run(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: '...' is not a run folder: '.../config.json' does not exist
    """
    from .experiments.engine import load_run as _load_run  # experiments load on demand only

    return _load_run(run, device)
