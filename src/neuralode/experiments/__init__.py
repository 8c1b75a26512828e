"""Paper experiments, one module each, driven by the ``neuralode`` command.

Every experiment module follows :class:`neuralode.experiments.engine.Experiment`:

- ``NAME``, ``CONFIG`` (a frozen dataclass extending
  :class:`~neuralode.experiments.config.RunSettings`: every field is a flag of
  ``neuralode train NAME``) and ``HEADLINE`` (the metrics of the line printed at the end);
- ``build(config, ctx) -> (model, task)``, ``make_optimizer(config, model, task)`` and
  ``make_schedule(config, task)``;
- ``summarize(trainer, config, run_dir) -> dict`` (``metrics.json``) and
  ``figures(run_dir, config, model, task, step) -> list[Path]``.

The engine does the rest for all of them: ``train``, ``resume``, ``evaluate``, ``plot`` and
:func:`neuralode.load_run`, with checkpoints, exact resume, metrics, progress bars and DDP. Its
recipes go in ``presets/NAME-PRESET.toml``. To add an experiment, write
``neuralode/experiments/NAME.py`` and register it in :data:`EXPERIMENTS` and :data:`SUMMARIES`.
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
