"""Paper experiments, one module each, driven by the ``neuralode`` command.

Every experiment module provides:

- ``add_arguments(parser)``: its options for ``neuralode train NAME``;
- ``train(args) -> dict``: run it into the run folder ``args.out`` and return the final metrics;
- optionally ``resume(run_dir, args)``, ``evaluate(run_dir, args)`` and ``plot(run_dir)`` for the
  commands of the same names. Experiments built on :mod:`neuralode.experiments.engine` get
  checkpoints, exact resume, metrics, progress bars and DDP from it.
 To add an
experiment, write ``neuralode/experiments/NAME.py`` and register it in :data:`EXPERIMENTS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "SUMMARIES", "load"]

#: Experiment name -> module path. Modules are imported only when used, so ``neuralode --help``
#: stays fast and one experiment's optional dependencies never burden another.
EXPERIMENTS: dict[str, str] = {
    "spiral": "neuralode.experiments.spiral",
    "mnist": "neuralode.experiments.mnist",
    "density": "neuralode.experiments.density",
    "latent": "neuralode.experiments.latent",
}


#: Experiment name -> what it is, in one line (``neuralode train --help``).
SUMMARIES: dict[str, str] = {
    "spiral": "fit the vector field of a 2-D spiral from its trajectory (the demo)",
    "mnist": "classify MNIST with an ODE-Net, ResNet, RK-Net or MLP (the paper's Table 1)",
    "density": "continuous normalizing flows (FFJORD, exact-trace CNF) on 2-D densities",
    "latent": "latent ODEs for irregularly sampled time series (the paper's spirals, Table 2)",
}


def load(name: str) -> ModuleType:
    """Import and return the module of experiment ``name``.

    Raises:
        ValueError: if ``name`` is not registered in :data:`EXPERIMENTS`.
    """
    try:
        module_path = EXPERIMENTS[name]
    except KeyError:
        known = ", ".join(sorted(EXPERIMENTS))
        raise ValueError(f"unknown experiment {name!r}; known experiments: {known}.") from None
    return importlib.import_module(module_path)
