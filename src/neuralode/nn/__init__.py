"""Layers that models are built from: ODE blocks, continuous normalizing flows, latent ODEs.

Every layer here calls only the public solver API (:func:`neuralode.solve`).
"""
