"""The 2-D toy datasets (after FFJORD's ``lib/toy_data.py``) and their closed-form densities.

What this proves:

* Every generator returns ``float32 [n, 2]`` for any ``n`` (odd too), finite, and is fixed by
  its seed (an ``int`` or a ``numpy.random.Generator``); different seeds differ.
* Rough statistics follow the recipes: 8gaussians is centred with its 8 modes at radius
  ``4 / 1.414``; circles has half its points near radius 3 and half near 1.5; rings has four
  equal rings at 3, 2.25, 1.5, 0.75; moons is centred at ``(0, 0.3)``; checkerboard lies on its
  8 squares.
* The closed-form densities integrate to 1 on a grid, and they are the densities of the
  generators: the sample mean of ``log p`` matches ``int p log p`` (the negative entropy,
  computed on the grid) within a CLT bound.
* Unknown names raise ``ValueError`` naming the known ones; so do datasets without a
  closed-form density, and bad ``n``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import EXPERIMENTS_EXTRA, requires

from neuralode.data import toy2d

pytestmark = requires("sklearn", install=EXPERIMENTS_EXTRA)

NAMES = sorted(toy2d.DATASETS)


def _grid(lim: float, n: int) -> tuple[torch.Tensor, float]:
    """Cell centres of an ``n x n`` grid over ``[-lim, lim]^2`` and the cell area."""
    h = 2 * lim / n
    g = torch.arange(n, dtype=torch.float64) * h - lim + h / 2
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), h * h


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_determinism(name: str) -> None:
    x = toy2d.sample(name, 101, seed=3)
    assert isinstance(x, np.ndarray)
    assert x.shape == (101, 2) and x.dtype == np.float32
    assert np.isfinite(x).all()
    np.testing.assert_array_equal(x, toy2d.sample(name, 101, seed=3))
    np.testing.assert_array_equal(x, toy2d.sample(name, 101, np.random.default_rng(3)))
    assert not np.array_equal(x, toy2d.sample(name, 101, seed=4))
    assert toy2d.sample(name, 1, seed=0).shape == (1, 2)


def test_eight_gaussians_statistics() -> None:
    x = toy2d.sample("8gaussians", 20000, seed=0)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.1)  # coordinate std ~2: 5 s.e. = 0.07
    r = np.linalg.norm(x, axis=1)
    assert abs(np.median(r) - 4 / 1.414) < 0.05
    angles = np.round(np.arctan2(x[:, 1], x[:, 0]) / (np.pi / 4)) % 8
    counts = np.bincount(angles.astype(int), minlength=8)
    assert counts.min() > 20000 / 8 * 0.9  # every mode gets its share


def test_circle_and_ring_radii() -> None:
    r = np.linalg.norm(toy2d.sample("circles", 4000, seed=0), axis=1)
    outer, inner = r[r > 2.25], r[r <= 2.25]
    assert len(outer) == len(inner) == 2000
    assert abs(outer.mean() - 3.0) < 0.05 and abs(inner.mean() - 1.5) < 0.05
    r = np.linalg.norm(toy2d.sample("rings", 4000, seed=0), axis=1)
    edges = [0, 1.125, 1.875, 2.625, 10]
    for radius, lo, hi in zip([0.75, 1.5, 2.25, 3.0], edges[:-1], edges[1:]):
        ring = r[(r > lo) & (r <= hi)]
        assert len(ring) == 1000
        assert abs(ring.mean() - radius) < 0.02


def test_moons_and_checkerboard_support() -> None:
    x = toy2d.sample("moons", 20000, seed=0)
    np.testing.assert_allclose(x.mean(0), [0.0, 0.3], atol=0.05)
    x = toy2d.sample("checkerboard", 5000, seed=0)
    assert torch.isfinite(toy2d.true_log_density("checkerboard", x)).all()
    assert (np.abs(x) <= 4).all()


@pytest.mark.parametrize("name", sorted(toy2d.DENSITIES))
def test_true_density_integrates_to_one(name: str) -> None:
    pts, area = _grid(6.0, 480)
    mass = float(toy2d.true_log_density(name, pts).exp().sum() * area)
    assert abs(mass - 1) < 1e-6


@pytest.mark.parametrize("name", sorted(toy2d.DENSITIES))
def test_true_density_is_the_generators(name: str) -> None:
    """E_data[log p(x)] over samples equals int p log p on a grid (within 5 standard errors):
    a wrong centre, width or weight would shift the sample mean."""
    pts, area = _grid(6.0, 480)
    logp = toy2d.true_log_density(name, pts)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    expected = float(plogp.sum() * area)
    second = float((torch.where(p > 0, p * logp**2, torch.zeros_like(p))).sum() * area)
    n = 20000
    x = torch.from_numpy(toy2d.sample(name, n, seed=1)).double()
    got = toy2d.true_log_density(name, x)
    se = math.sqrt(max(second - expected**2, 1e-12) / n)
    assert abs(float(got.mean()) - expected) < 5 * se + 1e-3, (float(got.mean()), expected, se)


def test_eight_gaussians_density_values() -> None:
    """At a centre the density is that mode's peak, 1/8 of an isotropic Gaussian's."""
    std = 0.5 / 1.414
    centre = torch.tensor([[4 / 1.414, 0.0]], dtype=torch.float64)
    peak = float(toy2d.true_log_density("8gaussians", centre))
    assert abs(peak - (-math.log(8) - math.log(2 * math.pi * std**2))) < 1e-6


def test_potentials_are_finite_targets() -> None:
    x = torch.randn(50, 2, dtype=torch.float64, requires_grad=True)
    for name in toy2d.POTENTIALS:
        v = toy2d.unnormalised_log_density(name, x)
        assert v.shape == (50,) and torch.isfinite(v).all()
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isfinite(g).all()
    v = toy2d.unnormalised_log_density("8gaussians", x)
    assert torch.allclose(v, toy2d.true_log_density("8gaussians", x))


def test_errors() -> None:
    with pytest.raises(ValueError, match="known ones are .*8gaussians"):
        toy2d.sample("nope", 10)
    with pytest.raises(ValueError, match="positive integer"):
        toy2d.sample("moons", 0)
    with pytest.raises(ValueError, match="no closed-form density"):
        toy2d.true_log_density("moons", np.zeros((3, 2)))
    with pytest.raises(ValueError, match="known ones are"):
        toy2d.true_log_density("nope", np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        toy2d.true_log_density("rings", np.zeros((3, 3)))
    with pytest.raises(ValueError, match="known ones are"):
        toy2d.unnormalised_log_density("nope", np.zeros((3, 2)))
