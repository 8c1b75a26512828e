"""Layers that models are built from: ODE blocks, continuous normalizing flows, latent ODEs.

Every layer here calls only the public solver API (:func:`neuralode.solve`).

- :mod:`neuralode.nn.odenet`: ``ODEBlock``, ``ConcatConv2d`` and the MNIST models of Chen et al.
  (2018), Table 1 (ODE-Net, ResNet, RK-Net, MLP).
- :mod:`neuralode.nn.cnf`: continuous normalizing flows (exact trace and FFJORD's Hutchinson
  estimator, kinetic and Jacobian regularizers), the planar CNF and ConcatSquash fields.
- :mod:`neuralode.nn.flows`: the discrete planar normalizing flow baseline.
- :mod:`neuralode.nn.latent`: latent ODEs with GRU and ODE-RNN encoders, and RNN baselines.
- :class:`SolveSettings`: how every model above solves its ODE (``model.solver``).
"""

from .cnf import CNF, CNFOutput, ConcatSquashLinear, ConcatSquashMLP, PlanarField
from .flows import PlanarFlow, PlanarLayer
from .latent import ELBO, GRUEncoder, LatentODE, ODERNNEncoder, Prediction, RNNBaseline
from .odenet import ConcatConv2d, ODEBlock, ODEFunc, build_model, count_parameters, model_nfe
from .settings import SolveSettings

__all__ = [
    "CNF",
    "CNFOutput",
    "ConcatConv2d",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "ELBO",
    "GRUEncoder",
    "LatentODE",
    "ODEBlock",
    "ODEFunc",
    "ODERNNEncoder",
    "PlanarField",
    "PlanarFlow",
    "PlanarLayer",
    "Prediction",
    "RNNBaseline",
    "SolveSettings",
    "build_model",
    "count_parameters",
    "model_nfe",
]
