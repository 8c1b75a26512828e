"""Synthetic time series for latent ODEs: 2-D spirals and 1-D periodic functions.

Two generators, both deterministic given a seed:

* :func:`make_spirals` -- the spirals of Chen et al. (2018), "Neural Ordinary Differential
  Equations", Sec. 5.1, following the recipe of ``generate_spiral2d`` in torchdiffeq's
  ``examples/latent_ode.py`` (checked against that file; the code here is our own).
* :func:`make_periodic` -- the 1-D periodic functions of Rubanova et al. (2019), "Latent ODEs for
  Irregularly-Sampled Time Series", following ``Periodic_1d`` in ``generate_timeseries.py`` and
  the ``periodic`` branch of ``lib/parse_datasets.py`` of the authors' ``latent_ode`` repository.

Irregular observations are :class:`Observations`: ``times`` (``[T]`` shared by all series or
``[B, T]`` per series), ``values`` ``[B, T, D]`` and an optional ``mask`` ``[B, T, D]`` (1 =
observed).  :func:`subsample` draws each series' own irregular times from a regular grid,
:func:`periodic_task` builds Rubanova's interpolation and extrapolation tasks with masks, and
:func:`split_indices` makes train/test splits.

Nothing is downloaded: the data are generated with :class:`numpy.random.Generator` and returned
as torch tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "WEEKS_PER_YEAR",
    "Observations",
    "PeriodicConfig",
    "PeriodicDataset",
    "SpiralConfig",
    "SpiralDataset",
    "make_periodic",
    "co2_windows",
    "load_co2",
    "make_spirals",
    "periodic_task",
    "split_indices",
    "subsample",
]

SeedLike = int | np.random.Generator | None


def _rng(seed: SeedLike) -> np.random.Generator:
    """A Generator from an int seed (or the Generator itself, advanced in place)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an int, a numpy Generator or None, got {type(seed).__name__}")


@dataclass(frozen=True)
class Observations:
    """A batch of (possibly irregularly sampled, possibly partly missing) time series.

    Attributes:
        times: ``[T]`` (one grid shared by all series) or ``[B, T]`` (each series its own grid),
            strictly increasing along the last dimension.
        values: ``[B, T, D]``.  Entries where ``mask`` is 0 hold 0 and carry no information.
        mask: ``[B, T, D]`` with 1 where the value is observed and 0 where it is missing; ``None``
            means everything is observed.
        index: ``[B, T]`` (``int64``) positions of the observations in the grid they were drawn
            from (:func:`subsample`), or ``None``.

    Floating tensors may be of any floating dtype; :meth:`to` converts them together.

    Raises:
        ValueError: ``values`` is not 3-D, ``times`` is neither ``[T]`` nor ``[B, T]``, or
            ``mask`` does not have the shape of ``values``.

    Examples:
        >>> import torch
        >>> from neuralode.data.timeseries import Observations
        >>> obs = Observations(times=torch.linspace(0.0, 1.0, 4), values=torch.zeros(2, 4, 1))
        >>> obs.batch_size, obs.per_sample_times().shape, obs.select(slice(0, 1)).values.shape
        (2, torch.Size([2, 4]), torch.Size([1, 4, 1]))
    """

    times: Tensor
    values: Tensor
    mask: Tensor | None = None
    index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.ndim != 3:
            raise ValueError(f"values must be [B, T, D], got shape {tuple(self.values.shape)}")
        b, n, _ = self.values.shape
        if self.times.shape not in ((n,), (b, n)):
            raise ValueError(
                f"times must be [T] or [B, T] = [{b}, {n}] to match values, "
                f"got shape {tuple(self.times.shape)}"
            )
        if self.mask is not None and self.mask.shape != self.values.shape:
            raise ValueError(
                f"mask must have the shape of values {tuple(self.values.shape)}, "
                f"got {tuple(self.mask.shape)}"
            )

    @property
    def batch_size(self) -> int:
        """The number of series, ``B``."""
        return int(self.values.shape[0])

    def per_sample_times(self) -> Tensor:
        """``times`` as ``[B, T]`` (a shared grid is expanded, not copied)."""
        if self.times.ndim == 2:
            return self.times
        return self.times.expand(self.batch_size, -1)

    def select(self, idx: Tensor | np.ndarray | slice) -> Observations:
        """The series ``idx`` (a slice, an index array or a boolean array over the batch)."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return Observations(
            times=self.times[idx] if self.times.ndim == 2 else self.times,
            values=self.values[idx],
            mask=None if self.mask is None else self.mask[idx],
            index=None if self.index is None else self.index[idx],
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Observations:
        """Move to ``device``; ``dtype`` converts the floating tensors (not ``index``)."""

        def conv(x: Tensor, floating: bool = True) -> Tensor:
            return x.to(device=device, dtype=dtype if floating else None)

        return Observations(
            times=conv(self.times),
            values=conv(self.values),
            mask=None if self.mask is None else conv(self.mask),
            index=None if self.index is None else conv(self.index, floating=False),
        )


# --------------------------------------------------------------------------------------------
# Spirals (Chen et al. 2018, Sec. 5.1)


@dataclass(frozen=True)
class SpiralConfig:
    """Parameters of :func:`make_spirals`; defaults are those of the paper's experiment.

    Attributes:
        n_spirals: number of series (the paper: 1000).
        n_total: points on each dense curve, evenly spaced in ``theta`` over ``[start, stop]``
            (the issue's 1000; torchdiffeq's script sets ``ntotal = 1000`` but never passes it,
            so its data use the function default of 500: set ``n_total=500`` to match that).
        n_window: consecutive points of the observation (training) window per series
            (torchdiffeq's ``nsample = 100``).
        n_extrapolate: consecutive points right after the window, the extrapolation targets
            (the paper measures predictive RMSE on 100 points beyond the training window).
        start, stop: range of the curve parameter ``theta`` (0 and 6 pi).
        a, b: spiral parameters (0 and 0.3), see ``shape``.
        noise_std: standard deviation of the i.i.d. Gaussian noise added to every coordinate of
            ``SpiralDataset.noisy``.  torchdiffeq's function default is 0.1, but its script (the
            paper's experiment) calls it with 0.3, which is the default here.
        min_start: the smallest allowed start index on the dense curve; ``None`` means
            ``n_window``, as torchdiffeq ("don't sample t0 very near the start").  Starts are
            uniform over ``[min_start, n_total - n_window - n_extrapolate]``.
        shape: ``"torchdiffeq"`` reproduces the reference curves: counter-clockwise
            ``r = a + b theta`` centred at ``(+5, 0)`` and clockwise ``r = a + 50 b / u`` with
            ``u = stop + 1 - theta`` (decreasing, so the curve turns clockwise while ``r``
            grows) centred at ``(-5, 0)``.  ``"archimedean"`` uses the mirror image of the
            counter-clockwise Archimedean spiral (``y -> -y``) centred at ``(-5, 0)`` instead.
        seed: seed of the numpy Generator (ignored when a Generator is passed to
            :func:`make_spirals`).

    Raises:
        ValueError: a count below 1 (``n_extrapolate`` below 0), a negative ``noise_std``,
            ``stop <= start``, an unknown ``shape``, or no room on the dense curve for the
            window and extrapolation points after ``min_start``.

    Examples:
        >>> from neuralode.data.timeseries import SpiralConfig
        >>> cfg = SpiralConfig(n_spirals=4, n_total=60, n_window=20, n_extrapolate=10)
        >>> cfg.start_range  # first and last start index on the dense curve
        (20, 30)
    """

    n_spirals: int = 1000
    n_total: int = 1000
    n_window: int = 100
    n_extrapolate: int = 100
    start: float = 0.0
    stop: float = 6 * math.pi
    a: float = 0.0
    b: float = 0.3
    noise_std: float = 0.3
    min_start: int | None = None
    shape: Literal["torchdiffeq", "archimedean"] = "torchdiffeq"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_spirals", "n_total", "n_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_extrapolate < 0:
            raise ValueError(f"n_extrapolate must be >= 0, got {self.n_extrapolate}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if not self.stop > self.start:
            raise ValueError(f"stop must be greater than start, got {self.start}, {self.stop}")
        if self.shape not in ("torchdiffeq", "archimedean"):
            raise ValueError(f"shape must be 'torchdiffeq' or 'archimedean', got {self.shape!r}")
        lo, hi = self.start_range
        if lo < 0 or hi < lo:
            raise ValueError(
                f"no room for a window of {self.n_window} + {self.n_extrapolate} points starting "
                f"at index >= {lo} on a curve of n_total={self.n_total} points; increase n_total "
                "or lower min_start"
            )

    @property
    def start_range(self) -> tuple[int, int]:
        """Smallest and largest start index (both inclusive)."""
        lo = self.n_window if self.min_start is None else self.min_start
        return lo, self.n_total - self.n_window - self.n_extrapolate


@dataclass(frozen=True)
class SpiralDataset:
    """Output of :func:`make_spirals`.

    Every series ``i`` is the dense curve of its direction from index ``start_index[i]`` on,
    ``n_window + n_extrapolate`` consecutive points.  Time is measured from each series' own
    start, so all series share ``times``; the latent dynamics of both classes are autonomous, so
    the shift loses nothing.

    Index ``k`` of a series is time ``times[k] = k * dt`` with ``dt = (stop - start) /
    (n_total - 1)``:

    * the **observation window** is ``k in [0, n_window)`` (:attr:`window`): training (and
      conditioning at test time) sees points of it only (see :meth:`observe`);
    * the **extrapolation window** is ``k in [n_window, n_window + n_extrapolate)``
      (:attr:`extrapolation`), all strictly later than every observation.

    Attributes:
        times: ``[n_window + n_extrapolate]``.
        clean: noise-free points, ``[n_spirals, n_window + n_extrapolate, 2]``.
        noisy: ``clean`` plus Gaussian noise of std ``config.noise_std``, same shape.
        clockwise: ``[n_spirals]`` bool; exactly ``n_spirals // 2`` are True.
        start_index: ``[n_spirals]`` int64, each series' start on the dense curve.
        curve_times: ``[n_total]`` times of the dense curves (``theta - start``).
        curve_ccw, curve_cw: ``[n_total, 2]`` the two dense curves, for plots.
        config: the configuration.

    The floating tensors have the ``dtype`` given to :func:`make_spirals`.

    Examples:
        >>> from neuralode.data.timeseries import SpiralConfig, make_spirals
        >>> cfg = SpiralConfig(n_spirals=4, n_total=60, n_window=20, n_extrapolate=10)
        >>> data = make_spirals(cfg, seed=0)
        >>> len(data), data.noisy.shape, data.window, data.extrapolation
        (4, torch.Size([4, 30, 2]), slice(0, 20, None), slice(20, 30, None))
        >>> data.observe(5, seed=0).values.shape, data.targets().values.shape
        (torch.Size([4, 5, 2]), torch.Size([4, 10, 2]))
    """

    times: Tensor
    clean: Tensor
    noisy: Tensor
    clockwise: Tensor
    start_index: Tensor
    curve_times: Tensor
    curve_ccw: Tensor
    curve_cw: Tensor
    config: SpiralConfig

    @property
    def window(self) -> slice:
        """Indices of the observation window along the time axis."""
        return slice(0, self.config.n_window)

    @property
    def extrapolation(self) -> slice:
        """Indices of the extrapolation window (strictly after the observation window)."""
        n = self.config.n_window
        return slice(n, n + self.config.n_extrapolate)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def select(self, idx: Tensor | np.ndarray | slice) -> SpiralDataset:
        """The series ``idx`` (for example one side of :func:`split_indices`)."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return replace(
            self,
            clean=self.clean[idx],
            noisy=self.noisy[idx],
            clockwise=self.clockwise[idx],
            start_index=self.start_index[idx],
        )

    def observe(self, n_obs: int, seed: SeedLike = None, *, noisy: bool = True) -> Observations:
        """Each series observed at ``n_obs`` of the window's points, its own random subset.

        The points are drawn without replacement from ``k in [0, n_window)`` and sorted, as in
        the paper's 30/50/100-of-100 settings.  Returns ``times`` ``[B, n_obs]``, ``values``
        ``[B, n_obs, 2]`` (noisy unless ``noisy=False``), ``index`` ``[B, n_obs]``, no mask.
        """
        values = self.noisy if noisy else self.clean
        return subsample(self.times, values, n_obs, seed, candidates=self.window)

    def targets(self, *, noisy: bool = False) -> Observations:
        """The extrapolation targets: ``times`` ``[n_extrapolate]`` (shared) and ``values``
        ``[B, n_extrapolate, 2]`` (noise-free by default), ``index`` the window positions."""
        sl = self.extrapolation
        values = (self.noisy if noisy else self.clean)[:, sl]
        idx = torch.arange(sl.start, sl.stop).expand(len(self), -1)
        return Observations(self.times[sl], values, index=idx)


def _spiral_curves(cfg: SpiralConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense ``theta`` grid and the counter-clockwise and clockwise curves, ``[n_total, 2]``."""
    theta = np.linspace(cfg.start, cfg.stop, cfg.n_total)
    r_cc = cfg.a + cfg.b * theta
    ccw = np.stack([r_cc * np.cos(theta) + 5.0, r_cc * np.sin(theta)], axis=1)
    if cfg.shape == "torchdiffeq":
        u = cfg.stop + 1.0 - theta
        r_cw = cfg.a + cfg.b * 50.0 / u
        cw = np.stack([r_cw * np.cos(u) - 5.0, r_cw * np.sin(u)], axis=1)
    else:
        cw = np.stack([r_cc * np.cos(theta) - 5.0, -r_cc * np.sin(theta)], axis=1)
    return theta, ccw, cw


def make_spirals(
    config: SpiralConfig | None = None,
    seed: SeedLike = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> SpiralDataset:
    """The 2-D spirals of Chen et al. (2018), Sec. 5.1.

    Half the series run clockwise and half counter-clockwise (exactly ``n_spirals // 2``
    clockwise, assigned by a random permutation; torchdiffeq flips a fair coin per series).
    Each series starts at a uniformly random index of the dense curve (``config.start_range``)
    and takes ``n_window + n_extrapolate`` consecutive points; see :class:`SpiralDataset` for the
    observation and extrapolation windows.

    Args:
        config: generator parameters (default :class:`SpiralConfig()`).
        seed: an int or a :class:`numpy.random.Generator`; default ``config.seed``.
        dtype: floating dtype of the returned tensors (the data are computed in float64).

    Returns:
        A :class:`SpiralDataset` of ``n_spirals`` series of ``n_window + n_extrapolate`` points.

    Raises:
        TypeError: ``seed`` is neither an int, a :class:`numpy.random.Generator` nor ``None``.

    Examples:
        >>> import torch
        >>> from neuralode.data.timeseries import SpiralConfig, make_spirals
        >>> data = make_spirals(SpiralConfig(n_spirals=6, n_total=300), seed=0)
        >>> data.times.shape, data.clean.shape, int(data.clockwise.sum())
        (torch.Size([200]), torch.Size([6, 200, 2]), 3)
        >>> torch.equal(data.noisy, make_spirals(SpiralConfig(n_spirals=6, n_total=300), 0).noisy)
        True
    """
    cfg = SpiralConfig() if config is None else config
    rng = _rng(cfg.seed if seed is None else seed)
    theta, ccw, cw = _spiral_curves(cfg)
    n, length = cfg.n_spirals, cfg.n_window + cfg.n_extrapolate
    clockwise = np.zeros(n, dtype=bool)
    clockwise[rng.permutation(n)[: n // 2]] = True
    lo, hi = cfg.start_range
    starts = rng.integers(lo, hi + 1, size=n)
    offsets = starts[:, None] + np.arange(length)[None, :]
    clean = np.where(clockwise[:, None, None], cw[offsets], ccw[offsets])
    noisy = clean + cfg.noise_std * rng.standard_normal(clean.shape)
    curve_times = theta - theta[0]

    def t(x: np.ndarray) -> Tensor:
        return torch.as_tensor(x, dtype=dtype)

    return SpiralDataset(
        times=t(curve_times[:length]),
        clean=t(clean),
        noisy=t(noisy),
        clockwise=torch.as_tensor(clockwise),
        start_index=torch.as_tensor(starts, dtype=torch.int64),
        curve_times=t(curve_times),
        curve_ccw=t(ccw),
        curve_cw=t(cw),
        config=cfg,
    )


def subsample(
    times: Tensor,
    values: Tensor,
    n_obs: int,
    seed: SeedLike = None,
    *,
    candidates: slice | None = None,
) -> Observations:
    """Observe each series at its own ``n_obs`` random points of a regular grid.

    For every series independently, ``n_obs`` distinct indices are drawn uniformly without
    replacement from ``candidates`` (default: the whole grid) and sorted, so each row's
    times are strictly increasing and free of duplicates.

    Args:
        times: ``[T]`` grid shared by the series (strictly increasing).
        values: ``[B, T, D]``.
        n_obs: points per series, ``1 <= n_obs <= len(candidates)``.
        seed: an int or a :class:`numpy.random.Generator` (the same seed gives the same draw).
        candidates: slice of grid indices to draw from.

    Returns:
        :class:`Observations` with per-series ``times`` ``[B, n_obs]``, ``values``
        ``[B, n_obs, D]`` (dtypes of ``times`` and ``values``), ``index`` ``[B, n_obs]``
        (``int64``) and no mask.

    Raises:
        ValueError: ``times`` is not ``[T]`` or ``values`` not ``[B, T, D]``, or ``n_obs`` is
            outside ``1..len(candidates)``.
        TypeError: ``seed`` is neither an int, a :class:`numpy.random.Generator` nor ``None``.

    Examples:
        >>> import torch
        >>> from neuralode.data.timeseries import subsample
        >>> values = torch.arange(12.0).reshape(2, 6, 1)  # 2 series on a grid of 6 times
        >>> obs = subsample(torch.linspace(0.0, 1.0, 6), values, 3, seed=0)
        >>> obs.times.shape, obs.values.shape, bool((obs.times.diff(dim=1) > 0).all())
        (torch.Size([2, 3]), torch.Size([2, 3, 1]), True)
    """
    if times.ndim != 1 or values.ndim != 3 or values.shape[1] != times.shape[0]:
        raise ValueError(
            "subsample expects times [T] and values [B, T, D], got "
            f"{tuple(times.shape)} and {tuple(values.shape)}"
        )
    pool = np.arange(times.shape[0])[candidates if candidates is not None else slice(None)]
    if not 1 <= n_obs <= len(pool):
        raise ValueError(f"n_obs must be between 1 and {len(pool)} (the candidates), got {n_obs}")
    rng = _rng(seed)
    b = values.shape[0]
    # Argsort of uniform keys: a uniformly random subset per row, drawn in one call.
    picks = np.argsort(rng.random((b, len(pool))), axis=1)[:, :n_obs]
    index = torch.as_tensor(np.sort(pool[picks], axis=1), dtype=torch.int64)
    return Observations(
        times=times[index],
        values=torch.gather(values, 1, index[..., None].expand(-1, -1, values.shape[2])),
        index=index,
    )


# --------------------------------------------------------------------------------------------
# Periodic functions (Rubanova et al. 2019)


@dataclass(frozen=True)
class PeriodicConfig:
    """Parameters of :func:`make_periodic`; defaults follow Rubanova et al.'s ``periodic`` data.

    Attributes:
        n_series: number of series (their ``-n``; the documented runs use 1000).
        n_times: points of the grid shared by all series (``--timepoints``, 100).
        max_t: the grid lies in ``[0, max_t]`` (``--max-t``, 5): time 0 plus ``n_times - 1``
            uniform draws, sorted.
        freq_range: the frequency at ``t = 0`` and at ``t = max_t`` are drawn independently and
            uniformly from this range (0.4, 0.8); it changes linearly in between.
        amplitude: amplitude of the sine (1).
        offset, offset_std: each series is ``offset + N(0, offset_std)`` plus the sine (1, 0.1).
        noise: noise scale (``--noise-weight``, 0.01 in the documented runs).
        noise_kind: ``"uniform"`` adds ``noise * U[0, 1)`` as the reference does (its
            ``np.random.sample``; biased, not zero-mean), ``"gaussian"`` adds ``N(0, noise)``.
            Noise is added to every point but the first, as in the reference.
        seed: seed of the numpy Generator.

    The phase is the exact integral of the linear frequency ramp,
    ``phi(t) = 2 pi (f0 t + (f1 - f0) t^2 / (2 max_t))``; the reference accumulates a Riemann sum
    over the irregular grid instead.

    Raises:
        ValueError: ``n_series < 1``, ``n_times < 2``, ``max_t <= 0``, a negative ``noise`` or
            an unknown ``noise_kind``.

    Examples:
        >>> from neuralode.data.timeseries import PeriodicConfig
        >>> cfg = PeriodicConfig(n_series=8, n_times=20, noise_kind="gaussian")
        >>> cfg.max_t, cfg.freq_range
        (5.0, (0.4, 0.8))
    """

    n_series: int = 1000
    n_times: int = 100
    max_t: float = 5.0
    freq_range: tuple[float, float] = (0.4, 0.8)
    amplitude: float = 1.0
    offset: float = 1.0
    offset_std: float = 0.1
    noise: float = 0.01
    noise_kind: Literal["uniform", "gaussian"] = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_series < 1:
            raise ValueError(f"n_series must be at least 1, got {self.n_series}")
        if self.n_times < 2:
            raise ValueError(f"n_times must be at least 2, got {self.n_times}")
        if not self.max_t > 0:
            raise ValueError(f"max_t must be positive, got {self.max_t}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.noise_kind not in ("uniform", "gaussian"):
            raise ValueError(f"noise_kind must be 'uniform' or 'gaussian', got {self.noise_kind!r}")


@dataclass(frozen=True)
class PeriodicDataset:
    """Output of :func:`make_periodic`.

    Attributes:
        times: ``[n_times]`` grid shared by all series, ``times[0] == 0``, strictly increasing.
        clean: ``[n_series, n_times, 1]`` noise-free values.
        values: ``[n_series, n_times, 1]`` with noise.
        freqs: ``[n_series, 2]`` frequency at ``t = 0`` and at ``t = max_t``.
        offsets: ``[n_series]``.
        config: the configuration.

    The floating tensors have the ``dtype`` given to :func:`make_periodic`.

    Examples:
        >>> from neuralode.data.timeseries import PeriodicConfig, make_periodic
        >>> data = make_periodic(PeriodicConfig(n_series=8, n_times=20), seed=0)
        >>> len(data), data.values.shape, float(data.times[0])
        (8, torch.Size([8, 20, 1]), 0.0)
        >>> len(data.select(slice(0, 3)))
        3
    """

    times: Tensor
    clean: Tensor
    values: Tensor
    freqs: Tensor
    offsets: Tensor
    config: PeriodicConfig

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def select(self, idx: Tensor | np.ndarray | slice) -> PeriodicDataset:
        """The series ``idx``."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return replace(
            self,
            clean=self.clean[idx],
            values=self.values[idx],
            freqs=self.freqs[idx],
            offsets=self.offsets[idx],
        )


def make_periodic(
    config: PeriodicConfig | None = None,
    seed: SeedLike = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> PeriodicDataset:
    """The 1-D periodic series of Rubanova et al. (2019), on one irregular grid for all series.

    Args:
        config: generator parameters (default :class:`PeriodicConfig()`).
        seed: an int or a :class:`numpy.random.Generator`; default ``config.seed``.
        dtype: floating dtype of the returned tensors.

    Returns:
        A :class:`PeriodicDataset` of ``n_series`` series on ``n_times`` shared times; use
        :func:`periodic_task` for the observed/target split.

    Raises:
        TypeError: ``seed`` is neither an int, a :class:`numpy.random.Generator` nor ``None``.

    Examples:
        >>> import torch
        >>> from neuralode.data.timeseries import PeriodicConfig, make_periodic
        >>> data = make_periodic(PeriodicConfig(n_series=8, n_times=20), seed=0)
        >>> data.times.shape, data.values.shape, data.freqs.shape
        (torch.Size([20]), torch.Size([8, 20, 1]), torch.Size([8, 2]))
        >>> bool((data.times.diff() > 0).all())
        True
    """
    cfg = PeriodicConfig() if config is None else config
    rng = _rng(cfg.seed if seed is None else seed)
    while True:
        times = np.sort(np.concatenate([[0.0], rng.uniform(0.0, cfg.max_t, cfg.n_times - 1)]))
        if np.all(np.diff(times) > 0):  # a tie has probability ~0, but the solver needs none
            break
    n = cfg.n_series
    freqs = rng.uniform(*cfg.freq_range, size=(n, 2))
    offsets = cfg.offset + cfg.offset_std * rng.standard_normal(n)
    f0, f1 = freqs[:, :1], freqs[:, 1:]
    phase = 2 * np.pi * (f0 * times + (f1 - f0) * times**2 / (2 * cfg.max_t))
    clean = offsets[:, None] + cfg.amplitude * np.sin(phase)
    if cfg.noise_kind == "uniform":
        noise = cfg.noise * rng.random(clean.shape)
    else:
        noise = cfg.noise * rng.standard_normal(clean.shape)
    noise[:, 0] = 0.0
    values = clean + noise

    def t(x: np.ndarray) -> Tensor:
        return torch.as_tensor(x, dtype=dtype)

    return PeriodicDataset(
        times=t(times),
        clean=t(clean[..., None]),
        values=t(values[..., None]),
        freqs=t(freqs),
        offsets=t(offsets),
        config=cfg,
    )


def periodic_task(
    data: PeriodicDataset,
    task: Literal["interpolation", "extrapolation"],
    n_observed: int | None = None,
    seed: SeedLike = None,
) -> tuple[Observations, Observations]:
    """Rubanova et al.'s interpolation or extrapolation task on the periodic data.

    * ``"interpolation"``: observed and target grids are the whole grid; each series keeps
      ``n_observed`` of its points (``--sample-tp``), the others are masked out.  Targets are
      every point.
    * ``"extrapolation"``: the observed grid is the first ``n_times // 2`` points, the target
      grid the rest (``split_data_extrap``: every target time is strictly after every observed
      time); each series keeps ``n_observed`` of the first half.

    Masks are per series (``[B, T, 1]``; the shared ``times`` ``[T]`` are the union of the series'
    times) and masked-out values are set to 0 (as the reference does).

    Args:
        data: from :func:`make_periodic`.
        task: ``"interpolation"`` or ``"extrapolation"``.
        n_observed: points observed per series; ``None`` keeps every point of the observed grid.
        seed: an int or a :class:`numpy.random.Generator` for the subsampling.

    Returns:
        ``(observed, target)``, both :class:`Observations` with shared ``times`` and a mask of
        the values' dtype: ``observed`` on the observed grid (``[T_obs]``, values and mask
        ``[B, T_obs, 1]``), ``target`` on the target grid with a mask of ones.

    Raises:
        ValueError: an unknown ``task``, or ``n_observed`` outside ``1..T_obs``.
        TypeError: ``seed`` is neither an int, a :class:`numpy.random.Generator` nor ``None``
            (only checked when ``n_observed`` is given).

    Examples:
        >>> from neuralode.data.timeseries import PeriodicConfig, make_periodic, periodic_task
        >>> data = make_periodic(PeriodicConfig(n_series=8, n_times=20), seed=0)
        >>> observed, target = periodic_task(data, "extrapolation", n_observed=4, seed=0)
        >>> observed.values.shape, observed.mask.sum(dim=1).flatten().tolist()
        (torch.Size([8, 10, 1]), [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0])
        >>> target.times.shape, bool(target.times.min() > observed.times.max())
        (torch.Size([10]), True)
    """
    n_times = data.times.shape[0]
    if task == "interpolation":
        obs_sl, tgt_sl = slice(0, n_times), slice(0, n_times)
    elif task == "extrapolation":
        obs_sl, tgt_sl = slice(0, n_times // 2), slice(n_times // 2, n_times)
    else:
        raise ValueError(f"task must be 'interpolation' or 'extrapolation', got {task!r}")
    obs_times, obs_values = data.times[obs_sl], data.values[:, obs_sl]
    n_grid = obs_times.shape[0]
    mask = torch.ones_like(obs_values)
    if n_observed is not None:
        if not 1 <= n_observed <= n_grid:
            raise ValueError(f"n_observed must be between 1 and {n_grid}, got {n_observed}")
        keys = _rng(seed).random((len(data), n_grid))
        dropped = np.argsort(keys, axis=1)[:, n_observed:]
        mask[np.arange(len(data))[:, None], dropped] = 0.0
    observed = Observations(obs_times, obs_values * mask, mask)
    target_values = data.values[:, tgt_sl]
    target = Observations(data.times[tgt_sl], target_values, torch.ones_like(target_values))
    return observed, target


def split_indices(
    n: int, train_fraction: float = 0.8, seed: SeedLike = None
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of ``n`` series.

    With ``seed=None`` the first ``floor(train_fraction * n)`` series are the training set and
    the rest the test set (the generators already draw series in random order; this is
    Rubanova et al.'s ``split_train_test``); with a seed, a random permutation is split.

    Args:
        n: number of series.
        train_fraction: share of the training set, strictly between 0 and 1; the training set
            has ``int(train_fraction * n)`` series.
        seed: ``None`` for the ordered split, else an int or a
            :class:`numpy.random.Generator` for a random one.

    Returns:
        ``(train, test)``, sorted ``int64`` arrays that partition ``range(n)``.

    Raises:
        ValueError: ``train_fraction`` is not in ``(0, 1)``.
        TypeError: ``seed`` is neither an int, a :class:`numpy.random.Generator` nor ``None``.

    Examples:
        >>> from neuralode.data.timeseries import split_indices
        >>> split_indices(5)
        (array([0, 1, 2, 3]), array([4]))
        >>> train, test = split_indices(10, 0.7, seed=0)
        >>> len(train), len(test), sorted(train.tolist() + test.tolist()) == list(range(10))
        (7, 3, True)
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n_train = int(train_fraction * n)
    order = np.arange(n) if seed is None else _rng(seed).permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


# --------------------------------------------------------------------------------------------
# A real irregularly sampled record: Mauna Loa's weekly CO2

WEEKS_PER_YEAR = 365.2425 / 7
"""Weeks in a year (365.2425 / 7): the CO2 windows' time unit is the year."""


def load_co2() -> tuple[np.ndarray, np.ndarray]:
    """Weekly mean atmospheric CO2 at Mauna Loa, March 1958 to December 2001.

    Keeling and Whorf's record (Scripps; public domain) in the copy that ships inside
    statsmodels (``statsmodels.datasets.co2``; nothing is downloaded): 2284 consecutive weeks,
    59 of them without data (no steady six-hour period in the week), most before 1967.

    Returns:
        ``(years, ppm)``: float64 ``[2284]`` arrays, the first day of each week as a decimal
        year and the week's mean CO2 in parts per million (NaN for a week without data).

    Raises:
        ImportError: statsmodels is not installed (``pip install statsmodels``).

    Examples:
        >>> from neuralode.data.timeseries import load_co2
        >>> years, ppm = load_co2()
        >>> len(ppm), int(np.isnan(ppm).sum()), round(float(years[0]), 2), float(ppm[0])
        (2284, 59, 1958.24, 316.1)
    """
    from statsmodels.datasets import co2

    frame = co2.load_pandas().data
    index = frame.index
    days = np.where(index.is_leap_year, 366.0, 365.0)
    years = index.year.to_numpy() + (index.day_of_year.to_numpy() - 1) / days
    return years.astype(np.float64), np.array(frame["co2"], dtype=np.float64)  # a writable copy


def co2_windows(
    ppm: np.ndarray, window: int, horizon: int, stride: int, split: int
) -> tuple[np.ndarray, np.ndarray]:
    """Start weeks of the training and test windows of a weekly record, split in time.

    A window is ``window`` weeks to observe and the ``horizon`` weeks after them to predict;
    starts are every ``stride``-th week, and a window with a week without data (NaN) anywhere
    in its ``window + horizon`` weeks is left out. Training windows end by week ``split``
    (exclusive) and test windows start at or after it, so no week is in both and the test
    years come after the training years.

    Args:
        ppm: ``[T]`` the record, NaN where a week has no data.
        window, horizon, stride: weeks (each at least 1).
        split: the first week of the test period, ``0 < split < T``.

    Returns:
        ``(train, test)``: sorted ``int64`` arrays of start weeks.

    Raises:
        ValueError: a size below 1, ``split`` outside ``(0, T)``, or a side with no window.

    Examples:
        >>> import numpy as np
        >>> from neuralode.data.timeseries import co2_windows
        >>> ppm = np.arange(20.0)
        >>> ppm[3] = np.nan
        >>> co2_windows(ppm, window=3, horizon=2, stride=2, split=12)
        (array([4, 6]), array([12, 14]))
    """
    span = window + horizon
    if min(window, horizon, stride) < 1:
        raise ValueError(
            f"window, horizon and stride must be at least 1, got {window}, {horizon}, {stride}"
        )
    if not 0 < split < len(ppm):
        raise ValueError(f"split must be in (0, {len(ppm)}), got {split}")
    starts = np.arange(0, len(ppm) - span + 1, stride)
    complete = np.array([not np.isnan(ppm[s : s + span]).any() for s in starts], dtype=bool)
    starts = starts[complete]
    train, test = starts[starts + span <= split], starts[starts >= split]
    if len(train) == 0 or len(test) == 0:
        raise ValueError(
            f"no complete {span}-week window on the {'training' if len(train) == 0 else 'test'} "
            f"side of week {split}"
        )
    return train.astype(np.int64), test.astype(np.int64)
