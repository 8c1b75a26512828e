"""Synthetic time series for latent ODEs (``neuralode.data.timeseries``).

* Spirals (Chen et al. 2018, Sec. 5.1): shapes, determinism, exactly half clockwise (checked on
  the geometry: the angle around each curve's centre falls for clockwise series and rises for
  the others), every point on its dense curve, the Gaussian noise std option, start indices in
  range.
* Irregular observations: each series' own sorted, duplicate-free times inside the observation
  window; the extrapolation window lies strictly after every observation.
* Rubanova et al.'s periodic data: shapes, the shared grid, noise kinds, the interpolation and
  extrapolation tasks with masks.
* Train/test split: a deterministic partition.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
import torch

from neuralode.data.timeseries import (
    Observations,
    PeriodicConfig,
    SpiralConfig,
    make_periodic,
    make_spirals,
    periodic_task,
    split_indices,
    subsample,
)

SMALL = SpiralConfig(n_spirals=40, n_total=500, n_window=50, n_extrapolate=50)


def test_spiral_shapes_and_times() -> None:
    ds = make_spirals(SMALL, seed=1)
    n = SMALL.n_window + SMALL.n_extrapolate
    assert ds.times.shape == (n,)
    assert ds.clean.shape == ds.noisy.shape == (40, n, 2)
    assert ds.clean.dtype == torch.float32
    dt = (SMALL.stop - SMALL.start) / (SMALL.n_total - 1)
    torch.testing.assert_close(ds.times, torch.arange(n, dtype=torch.float32) * dt)
    assert ds.curve_times.shape == (SMALL.n_total,) and ds.curve_cw.shape == (SMALL.n_total, 2)
    assert ds.window == slice(0, 50) and ds.extrapolation == slice(50, 100)
    assert len(ds) == 40


def test_default_config_is_the_papers() -> None:
    cfg = SpiralConfig()
    assert (cfg.n_spirals, cfg.n_total, cfg.n_window, cfg.n_extrapolate) == (1000, 1000, 100, 100)
    assert (cfg.a, cfg.b, cfg.noise_std, cfg.start) == (0.0, 0.3, 0.3, 0.0)
    assert cfg.stop == pytest.approx(6 * math.pi)
    assert cfg.start_range == (100, 800)


def test_spirals_are_deterministic() -> None:
    a, b = make_spirals(SMALL, seed=3), make_spirals(SMALL, seed=3)
    c = make_spirals(SMALL, seed=4)
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.clockwise, b.clockwise)
    assert not torch.equal(a.noisy, c.noisy)
    # The config's seed is the default; a Generator is accepted too.
    d = make_spirals(SpiralConfig(**{**SMALL.__dict__, "seed": 3}))
    e = make_spirals(SMALL, seed=np.random.default_rng(3))
    assert torch.equal(a.noisy, d.noisy) and torch.equal(a.noisy, e.noisy)


@pytest.mark.parametrize("shape", ["torchdiffeq", "archimedean"])
def test_half_clockwise_and_the_direction_is_right(
    shape: Literal["torchdiffeq", "archimedean"],
) -> None:
    cfg = SpiralConfig(n_spirals=41, n_total=500, n_window=50, n_extrapolate=50, shape=shape)
    ds = make_spirals(cfg, seed=0, dtype=torch.float64)
    assert int(ds.clockwise.sum()) == 20
    centre = torch.where(ds.clockwise[:, None], torch.tensor([-5.0, 0.0]), torch.tensor([5.0, 0]))
    rel = ds.clean - centre[:, None].to(ds.clean.dtype)
    step = rel[:, 1:] - rel[:, :-1]
    cross = rel[:, :-1, 0] * step[..., 1] - rel[:, :-1, 1] * step[..., 0]  # d(angle) * r^2
    assert bool((cross[ds.clockwise] < 0).all())
    assert bool((cross[~ds.clockwise] > 0).all())


def test_points_lie_on_their_curves_from_their_start_index() -> None:
    ds = make_spirals(SMALL, seed=2, dtype=torch.float64)
    lo, hi = SMALL.start_range
    assert int(ds.start_index.min()) >= lo and int(ds.start_index.max()) <= hi
    n = ds.times.shape[0]
    for i in range(len(ds)):
        curve = ds.curve_cw if ds.clockwise[i] else ds.curve_ccw
        s = int(ds.start_index[i])
        assert torch.equal(ds.clean[i], curve[s : s + n])


def test_noise_std_option() -> None:
    quiet = make_spirals(SpiralConfig(**{**SMALL.__dict__, "noise_std": 0.0}), seed=0)
    assert torch.equal(quiet.clean, quiet.noisy)
    big = SpiralConfig(n_spirals=400, n_total=500, n_window=50, n_extrapolate=50, noise_std=0.7)
    ds = make_spirals(big, seed=0, dtype=torch.float64)
    noise = ds.noisy - ds.clean
    assert float(noise.std()) == pytest.approx(0.7, rel=0.02)
    assert abs(float(noise.mean())) < 0.01


@pytest.mark.parametrize(
    "bad",
    [
        {"n_spirals": 0},
        {"noise_std": -1.0},
        {"stop": 0.0},
        {"n_total": 120},  # no room for 100 + 100 points after index 100
        {"shape": "square"},
    ],
)
def test_bad_spiral_config_raises(bad: dict) -> None:
    with pytest.raises(ValueError):
        SpiralConfig(**bad)


@pytest.mark.parametrize("n_obs", [30, 50, 100])
def test_observations_are_sorted_unique_and_inside_the_window(n_obs: int) -> None:
    cfg = SpiralConfig(n_spirals=64, n_total=400, n_window=100, n_extrapolate=100, min_start=0)
    ds = make_spirals(cfg, seed=0)
    obs = ds.observe(n_obs, seed=5)
    assert obs.times.shape == (64, n_obs) and obs.values.shape == (64, n_obs, 2)
    assert obs.mask is None and obs.index is not None
    assert bool((obs.index[:, 1:] > obs.index[:, :-1]).all())  # sorted, no duplicates
    assert bool((obs.times[:, 1:] > obs.times[:, :-1]).all())
    assert int(obs.index.min()) >= 0 and int(obs.index.max()) < cfg.n_window
    expected = torch.gather(ds.noisy, 1, obs.index[..., None].expand(-1, -1, 2))
    assert torch.equal(obs.values, expected)
    torch.testing.assert_close(obs.times, ds.times[obs.index])
    if n_obs < cfg.n_window:  # each series draws its own times
        assert len({tuple(r) for r in obs.index.tolist()}) > 1
    else:
        assert torch.equal(obs.index, torch.arange(100).expand(64, -1))
    again = ds.observe(n_obs, seed=5).index
    assert again is not None and torch.equal(again, obs.index)
    clean = torch.gather(ds.clean, 1, obs.index[..., None].expand(-1, -1, 2))
    assert torch.equal(ds.observe(n_obs, seed=5, noisy=False).values, clean)


def test_extrapolation_window_is_strictly_after_the_observations() -> None:
    ds = make_spirals(SMALL, seed=0)
    obs, tgt = ds.observe(20, seed=1), ds.targets()
    assert tgt.times.shape == (SMALL.n_extrapolate,)
    assert tgt.values.shape == (40, SMALL.n_extrapolate, 2)
    assert torch.equal(tgt.values, ds.clean[:, 50:])
    assert torch.equal(ds.targets(noisy=True).values, ds.noisy[:, 50:])
    assert float(tgt.times.min()) > float(obs.times.max())
    assert float(tgt.times.min()) > float(ds.times[ds.window].max())


def test_subsample_rejects_bad_input() -> None:
    t, v = torch.linspace(0, 1, 10), torch.zeros(3, 10, 2)
    with pytest.raises(ValueError, match="n_obs"):
        subsample(t, v, 11)
    with pytest.raises(ValueError, match="n_obs"):
        subsample(t, v, 6, candidates=slice(0, 5))
    with pytest.raises(ValueError):
        subsample(t, v[:, :9], 3)


def test_observations_container() -> None:
    obs = Observations(torch.zeros(4, 3), torch.zeros(4, 3, 2))
    assert obs.per_sample_times().shape == (4, 3)
    shared = Observations(torch.arange(3.0), torch.zeros(4, 3, 2), torch.ones(4, 3, 2))
    assert shared.per_sample_times().shape == (4, 3)
    sub = shared.select(np.array([0, 2]))
    assert sub.values.shape == (2, 3, 2) and sub.times.shape == (3,) and sub.mask is not None
    assert shared.to(dtype=torch.float64).values.dtype == torch.float64
    with pytest.raises(ValueError, match="times"):
        Observations(torch.zeros(5), torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="mask"):
        Observations(torch.zeros(3), torch.zeros(4, 3, 2), torch.ones(4, 3, 1))


# --------------------------------------------------------------------------------------------
# Periodic data (Rubanova et al. 2019)


def test_periodic_shapes_grid_and_determinism() -> None:
    cfg = PeriodicConfig(n_series=50, n_times=100)
    ds = make_periodic(cfg, seed=0)
    assert ds.times.shape == (100,) and ds.values.shape == ds.clean.shape == (50, 100, 1)
    assert float(ds.times[0]) == 0.0 and float(ds.times[-1]) <= cfg.max_t
    assert bool((ds.times[1:] > ds.times[:-1]).all())
    assert bool(((ds.freqs >= 0.4) & (ds.freqs <= 0.8)).all())
    assert torch.equal(make_periodic(cfg, seed=0).values, ds.values)
    assert not torch.equal(make_periodic(cfg, seed=1).values, ds.values)
    # Noise: uniform in [0, noise) as in the reference, none on the first point.
    noise = ds.values - ds.clean
    assert bool((noise[:, 0] == 0).all())
    assert float(noise.min()) >= 0.0 and float(noise.max()) < cfg.noise + 1e-7
    # Amplitude 1 around offset ~ N(1, 0.1): the clean values stay within offset +- 1.
    assert bool(((ds.clean[..., 0] - ds.offsets[:, None]).abs() <= 1 + 1e-6).all())


def test_periodic_gaussian_noise_option() -> None:
    cfg = PeriodicConfig(n_series=200, noise=0.2, noise_kind="gaussian")
    ds = make_periodic(cfg, seed=0, dtype=torch.float64)
    noise = (ds.values - ds.clean)[:, 1:]
    assert float(noise.std()) == pytest.approx(0.2, rel=0.05)
    with pytest.raises(ValueError):
        PeriodicConfig(noise_kind="laplace")  # type: ignore[arg-type]


def test_periodic_interpolation_task() -> None:
    ds = make_periodic(PeriodicConfig(n_series=30), seed=0)
    obs, tgt = periodic_task(ds, "interpolation", n_observed=40, seed=0)
    assert obs.times.shape == (100,) and obs.values.shape == (30, 100, 1)
    assert obs.mask is not None and tgt.mask is not None
    assert bool((obs.mask.sum(dim=(1, 2)) == 40).all())
    assert bool((obs.values[obs.mask == 0] == 0).all())
    assert torch.equal(obs.values[obs.mask == 1], ds.values[obs.mask == 1])
    assert torch.equal(tgt.values, ds.values) and bool((tgt.mask == 1).all())
    again, _ = periodic_task(ds, "interpolation", n_observed=40, seed=0)
    assert again.mask is not None and torch.equal(again.mask, obs.mask)
    full, _ = periodic_task(ds, "interpolation")
    assert full.mask is not None and bool((full.mask == 1).all())


def test_periodic_extrapolation_task() -> None:
    ds = make_periodic(PeriodicConfig(n_series=30), seed=0)
    obs, tgt = periodic_task(ds, "extrapolation", n_observed=20, seed=1)
    assert obs.times.shape == (50,) and tgt.times.shape == (50,)
    assert float(tgt.times.min()) > float(obs.times.max())
    assert obs.mask is not None and bool((obs.mask.sum(dim=(1, 2)) == 20).all())
    assert torch.equal(tgt.values, ds.values[:, 50:])
    with pytest.raises(ValueError, match="n_observed"):
        periodic_task(ds, "extrapolation", n_observed=51)
    with pytest.raises(ValueError, match="task"):
        periodic_task(ds, "forecast")  # type: ignore[arg-type]


def test_split_indices() -> None:
    train, test = split_indices(10)
    assert train.tolist() == list(range(8)) and test.tolist() == [8, 9]
    a, b = split_indices(100, 0.7, seed=0)
    assert len(a) == 70 and len(b) == 30
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(100))
    a2, _ = split_indices(100, 0.7, seed=0)
    assert np.array_equal(a, a2) and not np.array_equal(a, np.arange(70))
    ds = make_spirals(SMALL, seed=0)
    part = ds.select(a[:5])
    assert part.clean.shape[0] == 5 and torch.equal(part.clean, ds.clean[a[:5]])
    with pytest.raises(ValueError, match="train_fraction"):
        split_indices(10, 1.0)
