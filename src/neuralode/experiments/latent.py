"""Latent ODEs for irregularly sampled time series (Chen et al. 2018, Sec. 5.1 and Table 2).

``neuralode train latent --observations 30`` trains the paper's latent ODE on its spirals: 1000
noisy 2-D spirals (half clockwise), each observed at ``n`` random points of a 100-point window
(:mod:`neuralode.data.timeseries`); a recognition GRU with 25 hidden units reads the points
backwards and returns ``q(z0 | x)`` in a 4-dimensional latent space, ``dz/dt = f(z)`` (20 ELU
units; two hidden layers as torchdiffeq's ``LatentODEfunc``, where the paper's text says one)
is solved with dopri5 through each series' own times, and a decoder with 20 hidden units maps
``z(t)`` to the mean of a Gaussian with std 0.3 (the data's noise, torchdiffeq's
``noise_std``).  The model and the baselines are in :mod:`neuralode.nn.latent`.

The **metric** is the paper's Table 2: predictive RMSE on the 100 time points that follow each
series' observation window, against the noise-free spiral, for the held-out test series
(``train_fraction`` = 0.8 of the 1000 series train, the rest test), conditioning on the ``n``
observed points.  The prediction is decoded from the posterior mean of ``z0`` (``eval_samples =
0``) or averaged over ``eval_samples`` posterior samples.  Also reported: the interpolation RMSE
over the window (grid points from the first observation on, noise-free), the reconstruction
RMSE at the observed times (noise-free), the test ELBO and its pieces, and the latent solve's
NFE per series.

``--model rnn`` and ``--model rnn-gaps`` are the paper's baselines: a GRU with 25 hidden units
trained to predict the next observation (Gaussian likelihood with fixed std, i.e. mean squared
error), the second with the time gap to the next observation appended to its inputs.  They
extrapolate by feeding back their own predictions and are scored with the same RMSE.

``--data periodic`` runs the 1-D periodic series of Rubanova et al. (2019) with their
``--periodic-task`` ``interpolation`` (each series keeps ``n`` of its 100 points, the model
reconstructs all 100) or ``extrapolation`` (``n`` of the first 50 points observed, the last 50
predicted).  As in their code the latent ODE's likelihood is then on the task's targets, the
observation std is 0.01 and the reported MSE is against the (slightly noisy) data.  (So in the
extrapolation task the latent ODE is fitted to the second half only: its interpolation RMSE on
the observed half is reported but was never trained for.)

``--data co2`` runs a real record instead of generated series: Mauna Loa's weekly mean CO2,
March 1958 to December 2001 (Keeling and Whorf; the copy that ships inside statsmodels),
cut into windows of a year (52 weeks) observed at ``n`` random weeks each, and scored on the 26
weeks after each window. Windows start every 4 weeks; one that contains a week without data is
left out. The training windows lie in the first ``train_fraction`` of the record (to March
1993 by default: 290 windows), the test windows after it (95), so the test years were never
seen. Each window is centred on the mean of its observations; RMSEs are in ppm and the
likelihood's std is 0.35 ppm (the week-to-week noise).

Training runs on the experiment engine (:mod:`neuralode.experiments.engine`): Adam at lr 1e-2 as
torchdiffeq's ``examples/latent_ode.py``, mini-batches of ``batch_size`` training series drawn
without replacement (each pass over the training series a permutation keyed by ``(seed,
pass)``), ``z0`` noise from a generator keyed by ``(seed, step)``, so ``neuralode resume`` repeats
an uninterrupted run exactly.  Every ``eval_every`` iterations the test metrics are computed and
a checkpoint is written.  One process only (the model is small: use one CPU thread per run).

Recipes (``--preset NAME``, files in ``neuralode/experiments/presets/``):

- ``paper``: the paper's sizes and data; 20,000 iterations of 100 series, the
  learning rate decayed from 1e-2 to 1e-4 (cosine), dopri5 at rtol = atol = 1e-3 (on a trained
  model, measured: the test RMSE of 1e-5 to 3 digits at half the time per iteration);
- ``quick``: the same for 1200 iterations, a few minutes on one thread.

Mini-batches of 100 train about as well per CPU second as the full batch of 800 (measured, n =
30, one thread: test extrapolation RMSE 0.674 after 2000 steps of 100 series in 276 s, 0.640
after 700 full-batch steps in 238 s), and keep the time per iteration low enough for n = 100.

The run folder holds ``config.json``, ``metrics.jsonl`` ("train" lines with loss, ELBO pieces,
NFE; "epoch" lines with the test metrics and seconds), ``checkpoints/last.pt``, ``metrics.json``
(final results beside the paper's) and ``figures/`` (``predictions.png`` in the style of the
paper's Figure 8, ``latent.png``, ``training.png``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import Tensor, nn

from neuralode import METHODS
from neuralode.experiments import engine
from neuralode.experiments.common import explain_empty, read_json, seed_everything
from neuralode.experiments.config import RunSettings, check_at_least, check_positive, run_field
from neuralode.experiments.distributed import DistContext
from neuralode.nn.latent import ELBO, GRUEncoder, LatentODE, ODERNNEncoder, RNNBaseline
from neuralode.nn.odenet import count_parameters

__all__ = [
    "CONFIG",
    "HEADLINE",
    "NAME",
    "PAPER_TABLE2",
    "LatentConfig",
    "LatentTask",
    "SeriesSet",
    "build",
    "build_model",
    "extrapolation_seen",
    "figures",
    "load_series",
    "make_optimizer",
    "make_schedule",
    "masked_rmse",
    "summarize",
]

MODELS = ("latent-ode", "rnn", "rnn-gaps")
DATASETS = ("spirals", "periodic", "co2")
#: ``--data co2``: weeks observed per window, weeks predicted after it, weeks between starts.
CO2_WINDOW, CO2_HORIZON, CO2_STRIDE = 52, 26, 4
ENCODERS = ("gru", "odernn")
TASKS = ("interpolation", "extrapolation")

#: Chen et al. (2018), Table 2: predictive RMSE on the test set by observed points per series.
PAPER_TABLE2: dict[str, dict[int, float]] = {
    "rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813},
    "latent-ode": {30: 0.1642, 50: 0.1502, 100: 0.1346},
}

# Keys of derive_generator: which random stream a generator serves.
_STREAM_OBSERVE, _STREAM_PERM, _STREAM_Z0, _STREAM_EVAL, _STREAM_PLOT = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class LatentConfig(RunSettings):
    """Settings of one latent-ODE or RNN run (written to ``config.json``).

    Defaults: the paper's spiral experiment (sizes of Sec. 5.1 and torchdiffeq's
    ``examples/latent_ode.py``: latent 4, recognition RNN 25, dynamics 20, decoder 20, noise and
    observation std 0.3, Adam at lr 1e-2), with mini-batches of 100 of the 800 training series.
    """

    out: str = run_field("out", "runs/latent")
    device: str = run_field(
        "device", "cpu", "device (a small sequential model: the CPU is the fast choice)"
    )
    log_every: int = run_field("log_every", 20)

    data: str = field(default="spirals", metadata={"help": "data set", "choices": DATASETS})
    model: str = field(default="latent-ode", metadata={"help": "model", "choices": MODELS})
    encoder: str = field(
        default="gru",
        metadata={
            "help": "latent ODE recognition network: 'gru' (GRU reading backwards, with time "
            "gaps) or 'odernn' (ODE-RNN, Rubanova et al. 2019)",
            "choices": ENCODERS,
        },
    )
    observations: int = field(
        default=30,
        metadata={"help": "points observed per series (the paper: 30, 50 or 100 of 100)"},
    )
    periodic_task: str = field(
        default="extrapolation",
        metadata={"help": "periodic data: Rubanova et al.'s task", "choices": TASKS},
    )
    n_series: int = field(default=1000, metadata={"help": "series generated (train + test)"})
    train_fraction: float = field(
        default=0.8, metadata={"help": "fraction of the series used for training"}
    )
    noise_std: float = field(
        default=0.3, metadata={"help": "spirals: std of the observation noise (the paper's 0.3)"}
    )
    curve_points: int = field(
        default=1000,
        metadata={
            "help": "spirals: points on each dense curve over [0, 6 pi] (the issue's 1000; "
            "torchdiffeq's script, never passing its ntotal, uses 500)"
        },
    )
    data_seed: int = field(default=0, metadata={"help": "seed of the data and observation times"})
    latent_dim: int = field(default=4, metadata={"help": "latent dimension"})
    rec_hidden: int = field(default=25, metadata={"help": "recognition RNN hidden units"})
    dynamics_hidden: int = field(default=20, metadata={"help": "latent dynamics hidden units"})
    dynamics_layers: int = field(
        default=2,
        metadata={"help": "latent dynamics hidden layers (torchdiffeq's LatentODEfunc: 2)"},
    )
    decoder_hidden: int = field(default=20, metadata={"help": "decoder hidden units"})
    rnn_hidden: int = field(default=25, metadata={"help": "RNN baseline hidden units"})
    obs_std: float | None = field(
        default=None,
        metadata={"help": "std of the Gaussian likelihood (default: 0.3 spirals, 0.01 periodic)"},
    )
    method: str = field(
        default="dopri5", metadata={"help": "latent ODE solver", "choices": METHODS}
    )
    rtol: float = field(default=1e-5, metadata={"help": "latent ODE relative tolerance"})
    atol: float = field(default=1e-5, metadata={"help": "latent ODE absolute tolerance"})
    gradient: str = field(
        default="backprop",
        metadata={"help": "latent ODE gradient", "choices": ("backprop", "adjoint", "checkpoint")},
    )
    iterations: int = field(default=2000, metadata={"help": "training iterations"})
    batch_size: int = field(
        default=100, metadata={"help": "training series per iteration (0: all, full batch)"}
    )
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate"})
    schedule: str = field(
        default="constant",
        metadata={"help": "learning-rate schedule", "choices": ("constant", "cosine")},
    )
    lr_final: float = field(
        default=1e-3, metadata={"help": "'cosine': learning rate at the last iteration"}
    )
    grad_clip: float | None = field(
        default=None, metadata={"help": "clip the gradient norm to this value (none: no clipping)"}
    )
    n_samples: int = field(default=1, metadata={"help": "z0 samples per series in training"})
    kl_anneal: bool = field(
        default=False,
        metadata={"help": "KL weight 0 for kl_wait steps, then 1 - kl_rate^(step - kl_wait)"},
    )
    kl_wait: int = field(default=10, metadata={"help": "KL annealing: steps at weight 0"})
    kl_rate: float = field(default=0.99, metadata={"help": "KL annealing rate"})
    eval_every: int = field(
        default=100, metadata={"help": "iterations between test evaluations and checkpoints"}
    )
    eval_samples: int = field(
        default=0,
        metadata={
            "help": "test predictions: 0 decodes the posterior mean of z0, K averages K "
            "posterior samples"
        },
    )

    def data_requirements(self) -> dict[str, str]:
        """Optional packages the data needs (import name -> what for)."""
        if self.data == "co2":
            return {"statsmodels": "the Mauna Loa CO2 record it ships (pip install statsmodels)"}
        return {}  # generated in torch

    def extension_blocker(self) -> str | None:
        """Why ``neuralode resume RUN --LENGTH N`` cannot extend this run exactly (None: it can;
        the weights and metric lines then equal a run given that length from the start, plus the
        evaluation that ended the shorter run where that was not an evaluation step)."""
        if self.schedule == "cosine":
            return "its 'cosine' learning-rate schedule is shaped by its length"
        return None

    def validate(self) -> None:
        super().validate()  # the run settings
        choices = (
            ("data", DATASETS),
            ("model", MODELS),
            ("encoder", ENCODERS),
            ("periodic_task", TASKS),
        )
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        check_at_least(self, 2, "observations", "n_series")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1); got {self.train_fraction}")
        check_at_least(
            self, 1, "latent_dim", "rec_hidden", "dynamics_hidden", "decoder_hidden",
            "iterations", "eval_every", "n_samples",
        )  # fmt: skip
        check_at_least(self, 0, "batch_size", "eval_samples")
        check_positive(self, "lr", "rtol", "atol")
        if self.obs_std is not None:
            check_positive(self, "obs_std")

    @property
    def likelihood_std(self) -> float:
        """The observation std of the likelihood (0.3: the spirals' noise; 0.01: Rubanova's;
        0.35 ppm for CO2: the week-to-week difference's std over sqrt 2)."""
        if self.obs_std is not None:
            return self.obs_std
        return {"spirals": 0.3, "co2": 0.35}.get(self.data, 0.01)


NAME = "latent"
#: The experiment's config class (its ``--preset`` files and ``--config`` files fill it).
CONFIG = LatentConfig
#: The metrics of the line printed at the end of a run.
HEADLINE = ("test_extrap_rmse", "test_extrap_rmse_seen", "test_interp_rmse")


# --------------------------------------------------------------------------------------------
# Data: one layout for both data sets


@dataclass(frozen=True)
class SeriesSet:
    """Observed series and their evaluation targets (one side of the train/test split).

    Attributes:
        values: ``[B, n, D]`` observed values (noisy; 0 where masked out).
        times: ``[B, n]`` observation times, strictly increasing per series.
        mask: ``[B, n, D]`` (1 = observed) or ``None`` (all observed).
        clean: ``[B, n, D]`` noise-free values at the observation times.
        grid: ``[G]`` shared target grid: its first ``n_interp`` points are the observation
            window (interpolation targets), the rest lie after it (extrapolation targets).
        grid_values: ``[B, G, D]`` targets on the grid (spirals: noise-free, as the paper's
            RMSE; periodic: the data, as Rubanova et al.'s MSE).
        n_interp: points of the grid in the observation window.
        fit: the grid points the latent ODE's likelihood is on (periodic, Rubanova et al.), or
            ``None``: the observed points themselves (spirals, Chen et al.).
        labels: ``[B]`` a class per series for plots (spirals: clockwise) or ``None``.
        seen: ``[B]`` bool, spirals only (else ``None``): the series' extrapolation targets lie
            on points of its curve that some training series observes in its window. A test
            series whose window starts late on the curve extrapolates past the last point any
            training window reaches; :func:`extrapolation_seen` says which.
    """

    values: Tensor
    times: Tensor
    mask: Tensor | None
    clean: Tensor
    grid: Tensor
    grid_values: Tensor
    n_interp: int
    fit: slice | None = None
    labels: Tensor | None = None
    seen: Tensor | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def select(self, idx: Tensor | np.ndarray | slice) -> SeriesSet:
        """The series ``idx``."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return dataclasses.replace(
            self,
            values=self.values[idx],
            times=self.times[idx],
            mask=None if self.mask is None else self.mask[idx],
            clean=self.clean[idx],
            grid_values=self.grid_values[idx],
            labels=None if self.labels is None else self.labels[idx],
            seen=None if self.seen is None else self.seen[idx],
        )

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> SeriesSet:
        """Move to ``device``; ``dtype`` converts the floating tensors."""

        def move(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

        return dataclasses.replace(
            self,
            values=cast(Tensor, move(self.values)),
            times=cast(Tensor, move(self.times)),
            mask=move(self.mask),
            clean=cast(Tensor, move(self.clean)),
            grid=cast(Tensor, move(self.grid)),
            grid_values=cast(Tensor, move(self.grid_values)),
            labels=move(self.labels),
            seen=move(self.seen),
        )

    @property
    def has_extrapolation(self) -> bool:
        return int(self.grid.shape[0]) > self.n_interp


def extrapolation_seen(
    starts: Tensor, clockwise: Tensor, train: Tensor, n_window: int, n_extrapolate: int
) -> Tensor:
    """Which spirals extrapolate only onto points that the training series observe.

    Series ``b`` covers the points ``[starts[b], starts[b] + n_window)`` of its curve (clockwise
    or counter-clockwise) with its observation window and is scored on the ``n_extrapolate``
    points after it. With starts uniform up to ``n_total - n_window - n_extrapolate`` (the
    paper's setting), a series that starts late is scored on points that no training window
    contains: nothing in training shows the model that part of the curve.

    Args:
        starts: ``[B]`` start index of each series on its dense curve.
        clockwise: ``[B]`` bool, which of the two curves.
        train: indices (or a ``[B]`` bool mask) of the training series.
        n_window, n_extrapolate: points in the observation and extrapolation windows.

    Returns:
        ``[B]`` bool: True where every extrapolation target of the series lies inside some
        training series' observation window on the same curve.
    """
    top = int(starts.max()) + n_window + n_extrapolate
    covered = torch.zeros(2, top, dtype=torch.bool)
    offsets = torch.arange(n_window)
    rows = clockwise[train].long()
    covered[rows[:, None], starts[train][:, None] + offsets] = True
    targets = starts[:, None] + n_window + torch.arange(n_extrapolate)
    return covered[clockwise.long()[:, None], targets].all(dim=1)


def load_series(config: LatentConfig) -> tuple[SeriesSet, SeriesSet]:
    """The ``(train, test)`` series of ``config``'s data set (deterministic in ``data_seed``).

    Spirals: :func:`~neuralode.data.timeseries.make_spirals` with the paper's settings, each
    series observed at ``observations`` random points of its 100-point window (one draw, fixed
    for the run); the grid is the window and the 100 points after it.  Periodic:
    :func:`~neuralode.data.timeseries.periodic_task`.  The split takes the first
    ``train_fraction`` of the series for training (the generators draw series in random order).
    """
    from neuralode.data import timeseries as ts

    observe_rng = np.random.default_rng([config.data_seed, _STREAM_OBSERVE])
    if config.data == "spirals":
        spiral_config = ts.SpiralConfig(
            n_spirals=config.n_series,
            n_total=config.curve_points,
            noise_std=config.noise_std,
            seed=config.data_seed,
        )
        if config.observations > spiral_config.n_window:
            raise ValueError(
                f"observations must be at most the window's {spiral_config.n_window} points, "
                f"got {config.observations}"
            )
        data = ts.make_spirals(spiral_config)
        obs = data.observe(config.observations, observe_rng)
        assert obs.index is not None
        clean = torch.gather(data.clean, 1, obs.index[..., None].expand(-1, -1, 2))
        full = SeriesSet(
            values=obs.values,
            times=obs.per_sample_times(),
            mask=None,
            clean=clean,
            grid=data.times,
            grid_values=data.clean,
            n_interp=spiral_config.n_window,
            labels=data.clockwise,
        )
    elif config.data == "co2":
        return _co2_series(config, observe_rng)
    else:
        pdata = ts.make_periodic(ts.PeriodicConfig(n_series=config.n_series, seed=config.data_seed))
        task = cast(Literal["interpolation", "extrapolation"], config.periodic_task)
        observed, _ = ts.periodic_task(pdata, task, config.observations, observe_rng)
        n_grid = int(observed.times.shape[0])
        assert observed.mask is not None
        n_all = int(pdata.times.shape[0])
        full = SeriesSet(
            values=observed.values,
            times=observed.per_sample_times(),
            mask=observed.mask,
            clean=pdata.clean[:, :n_grid] * observed.mask,
            grid=pdata.times,
            grid_values=pdata.values,
            n_interp=n_grid,
            fit=slice(0, n_all)
            if config.periodic_task == "interpolation"
            else slice(n_grid, n_all),
        )
    train_idx, test_idx = ts.split_indices(len(full), config.train_fraction)
    if len(train_idx) < 1 or len(test_idx) < 1:
        raise ValueError("the split leaves no training or no test series; change n_series")
    if config.data == "spirals":
        seen = extrapolation_seen(
            data.start_index,
            data.clockwise,
            torch.from_numpy(train_idx),
            spiral_config.n_window,
            spiral_config.n_extrapolate,
        )
        full = dataclasses.replace(full, seen=seen)
    return full.select(train_idx), full.select(test_idx)


def _co2_series(
    config: LatentConfig, observe_rng: np.random.Generator
) -> tuple[SeriesSet, SeriesSet]:
    """Mauna Loa's weekly CO2 as windows: each a year (``CO2_WINDOW`` weeks) observed at
    ``observations`` of its weeks, and the ``CO2_HORIZON`` weeks after it to predict.

    Windows start every ``CO2_STRIDE`` weeks; one with a week without data is left out
    (:func:`~neuralode.data.timeseries.co2_windows`). The first ``train_fraction`` of the
    record's weeks hold the training windows, the test windows start after them. Each window is
    centred on the mean of the values it observes (its level, from its observations alone) and
    its times are years from its first week; RMSEs are in ppm. ``n_series`` is not used.
    """
    from neuralode.data import timeseries as ts

    if config.observations > CO2_WINDOW:
        raise ValueError(
            f"observations must be at most the window's {CO2_WINDOW} weeks, got "
            f"{config.observations}"
        )
    _, ppm = ts.load_co2()
    split = int(config.train_fraction * len(ppm))
    span = CO2_WINDOW + CO2_HORIZON
    grid = torch.arange(span, dtype=torch.float64) / ts.WEEKS_PER_YEAR

    def windows(starts: np.ndarray) -> SeriesSet:
        values = torch.from_numpy(ppm[starts[:, None] + np.arange(span)])[..., None]  # [B, G, 1]
        obs = ts.subsample(grid, values, config.observations, observe_rng,
                           candidates=slice(0, CO2_WINDOW))  # fmt: skip
        level = obs.values.mean(dim=1, keepdim=True)
        observed = (obs.values - level).float()
        return SeriesSet(
            values=observed,
            times=obs.per_sample_times().float(),
            mask=None,
            clean=observed,  # a record: no noise-free truth, the observations are the targets
            grid=grid.float(),
            grid_values=(values - level).float(),
            n_interp=CO2_WINDOW,
        )

    train, test = ts.co2_windows(ppm, CO2_WINDOW, CO2_HORIZON, CO2_STRIDE, split)
    return windows(train), windows(test)


# --------------------------------------------------------------------------------------------
# Models, objectives and metrics


def build_model(config: LatentConfig, obs_dim: int) -> nn.Module:
    """The latent ODE or RNN baseline of ``config`` for ``obs_dim`` features."""
    use_mask = config.data == "periodic"
    if config.model != "latent-ode":
        return RNNBaseline(
            obs_dim,
            config.rnn_hidden,
            use_time_gaps=config.model == "rnn-gaps",
            use_mask=use_mask,
        )
    encoder: nn.Module
    if config.encoder == "gru":
        encoder = GRUEncoder(obs_dim, config.latent_dim, config.rec_hidden, use_mask=use_mask)
    else:
        encoder = ODERNNEncoder(obs_dim, config.latent_dim, config.rec_hidden, use_mask=use_mask)
    return LatentODE(
        obs_dim,
        config.latent_dim,
        encoder=encoder,
        dynamics_hidden=config.dynamics_hidden,
        dynamics_layers=config.dynamics_layers,
        decoder_hidden=config.decoder_hidden,
        obs_std=config.likelihood_std,
        method=config.method,
        rtol=config.rtol,
        atol=config.atol,
        gradient=config.gradient,
    )


def masked_rmse(prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> float:
    """Root mean squared error pooled over every (series, time, feature) entry:
    ``sqrt(sum m (p - y)^2 / sum m)`` (``mask`` ``m`` broadcastable; ``None``: every entry).

    This is the paper's "predictive RMSE" when ``prediction`` and ``target`` are the test
    series on the 100 points after their observation windows.
    """
    sq = (prediction - target) ** 2
    if mask is None:
        return float(sq.mean().sqrt())
    m = mask.to(sq.dtype).expand_as(sq)
    return float(((sq * m).sum() / m.sum().clamp(min=1)).sqrt())


def _elbo(
    model: LatentODE,
    batch: SeriesSet,
    *,
    n_samples: int,
    kl_weight: float,
    generator: torch.Generator | None,
) -> ELBO:
    """The latent ODE's ELBO on ``batch``: of its observed points (``batch.fit is None``, Chen
    et al.) or of ``grid_values[:, fit]`` given the observed points (Rubanova et al.)."""
    targets: dict[str, Any] = {}
    if batch.fit is not None:
        targets = {
            "target_values": batch.grid_values[:, batch.fit],
            "target_times": batch.grid[batch.fit],
        }
    out: ELBO = model(
        batch.values,
        batch.times,
        batch.mask,
        n_samples=n_samples,
        kl_weight=kl_weight,
        generator=generator,
        **targets,
    )
    return out


def _rnn_loss(model: RNNBaseline, batch: SeriesSet) -> tuple[Tensor, Tensor]:
    """One-step-ahead mean squared error of the RNN over the observed targets, and the
    predictions ``[B, n - 1, D]`` (computed through ``forward``, so hooks see the call)."""
    pred = model(batch.values, batch.times, batch.mask)
    sq = (pred - batch.values[:, 1:]) ** 2
    if batch.mask is None:
        return sq.mean(), pred
    m = batch.mask[:, 1:]
    return (sq * m).sum() / m.sum().clamp(min=1), pred


def _on_grid(
    model: LatentODE,
    series: SeriesSet,
    *,
    n_samples: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:meth:`LatentODE.predict_on_grid` on a series set's observations and grid."""
    return model.predict_on_grid(
        series.values,
        series.times,
        series.grid,
        series.mask,
        n_samples=n_samples,
        generator=generator,
    )


def _latent_metrics(
    model: LatentODE, series: SeriesSet, config: LatentConfig, generator: torch.Generator
) -> dict[str, float]:
    samples, _, valid, nfe = _on_grid(
        model, series, n_samples=config.eval_samples, generator=generator
    )
    pred = samples.mean(dim=0)
    n = series.n_interp
    out: dict[str, float] = {"nfe": float(nfe.float().mean())}
    out["interp_rmse"] = masked_rmse(pred[:, :n], series.grid_values[:, :n], valid[:, :n, None])
    if series.has_extrapolation:
        out["extrap_rmse"] = masked_rmse(pred[:, n:], series.grid_values[:, n:], valid[:, n:, None])
        out.update(_seen_rmse(pred[:, n:], series, valid[:, n:, None]))
    recon = model.predict(
        series.values, series.times, series.times, series.mask, use_mean=True
    ).samples[0]
    out["recon_rmse"] = masked_rmse(recon, series.clean, series.mask)
    elbo = _elbo(model, series, n_samples=1, kl_weight=1.0, generator=generator)
    out.update(
        {
            "loss": float(elbo.loss),
            "elbo": float(elbo.elbo.mean()),
            "log_likelihood": float(elbo.log_likelihood.mean()),
            "kl": float(elbo.kl.mean()),
            "mse": float(elbo.mse.mean()),
        }
    )
    return out


def _rnn_metrics(model: RNNBaseline, series: SeriesSet) -> dict[str, float]:
    loss, one_step = _rnn_loss(model, series)
    mask = None if series.mask is None else series.mask[:, 1:]
    out = {"loss": float(loss), "recon_rmse": masked_rmse(one_step, series.clean[:, 1:], mask)}
    n = series.n_interp
    if series.mask is not None:  # the observations are the window's grid, masked
        out["interp_rmse"] = masked_rmse(one_step, series.grid_values[:, 1:n])
    if series.has_extrapolation:
        pred = model.predict(series.values, series.times, series.grid[n:], series.mask)
        out["extrap_rmse"] = masked_rmse(pred, series.grid_values[:, n:])
        out.update(_seen_rmse(pred, series))
    return out


def _seen_rmse(pred: Tensor, series: SeriesSet, valid: Tensor | None = None) -> dict[str, float]:
    """``extrap_rmse_seen``: the extrapolation RMSE of the series whose targets the training
    windows cover (:func:`extrapolation_seen`); nothing for data without that notion."""
    if series.seen is None or not bool(series.seen.any()):
        return {}
    rows = series.seen
    target = series.grid_values[:, series.n_interp :]
    return {
        "extrap_rmse_seen": masked_rmse(
            pred[rows], target[rows], None if valid is None else valid[rows]
        )
    }


def _with_mse(metrics: dict[str, float]) -> dict[str, float]:
    for key in ("interp", "extrap"):
        if f"{key}_rmse" in metrics:
            metrics[f"{key}_mse"] = metrics[f"{key}_rmse"] ** 2
    return metrics


# --------------------------------------------------------------------------------------------
# The task


class LatentTask:
    """Batches, loss and evaluation of the latent-ODE experiment (see :class:`engine.Task`).

    Pass ``p`` over the training series is a permutation from a generator keyed by ``(seed,
    p)``, cut into batches of ``batch_size`` (the remainder dropped); step ``s`` draws its ``z0``
    noise from a generator keyed by ``(seed, s)``, and evaluation from one fixed generator. So
    nothing random depends on earlier steps and resuming at any step is exact.
    """

    def __init__(
        self, config: LatentConfig, train: SeriesSet, test: SeriesSet, ctx: DistContext
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.train = train.to(ctx.device)
        self.test = test.to(ctx.device)
        n_train = len(self.train)
        self.batch_size = min(config.batch_size, n_train) if config.batch_size else n_train
        self.batches_per_pass = n_train // self.batch_size
        self._perm_pass = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @property
    def latent(self) -> bool:
        return self.config.model == "latent-ode"

    def _generator(self, *keys: int) -> torch.Generator:
        from neuralode.data.mnist import derive_generator

        return derive_generator(self.config.seed, *keys, device=self.ctx.device)

    def batch_indices(self, step: int) -> Tensor | None:
        """The training series of ``step`` (``None``: all of them)."""
        if self.batch_size == len(self.train):
            return None
        p, i = divmod(step, self.batches_per_pass)
        if p != self._perm_pass:
            from neuralode.data.mnist import derive_generator

            gen = derive_generator(self.config.seed, _STREAM_PERM, p)
            self._perm = torch.randperm(len(self.train), generator=gen)
            self._perm_pass = p
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size].to(self.ctx.device)

    def kl_weight(self, step: int) -> float:
        from neuralode.nn.latent import kl_annealing

        if not self.config.kl_anneal:
            return 1.0
        return kl_annealing(step, wait=self.config.kl_wait, rate=self.config.kl_rate)

    def train_step(self, model: nn.Module, step: int) -> engine.StepOutput:
        idx = self.batch_indices(step)
        batch = self.train if idx is None else self.train.select(idx)
        n = len(batch)
        if not self.latent:
            loss, _ = _rnn_loss(cast(RNNBaseline, model), batch)
            mse = loss.item()
            return engine.StepOutput(loss=loss, sums={"loss": mse * n, "mse": mse * n}, count=n)
        weight = self.kl_weight(step)
        out = _elbo(
            cast(LatentODE, model),
            batch,
            n_samples=self.config.n_samples,
            kl_weight=weight,
            generator=self._generator(_STREAM_Z0, step),
        )
        return engine.StepOutput(
            loss=out.loss,
            sums={
                "loss": out.loss.item() * n,
                "elbo": out.elbo.sum().item(),
                "log_likelihood": out.log_likelihood.sum().item(),
                "kl": out.kl.sum().item(),
                "mse": out.mse.sum().item(),
            },
            count=n,
            values={"nfe_forward": float(out.nfe.float().mean()), "kl_weight": weight},
        )

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        return {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test metrics (``test_`` prefix): extrapolation, interpolation and reconstruction
        RMSE (and MSE), the ELBO pieces and the NFE per series of the latent ODE."""
        model.eval()
        if self.latent:
            gen = self._generator(_STREAM_EVAL)
            metrics = _latent_metrics(cast(LatentODE, model), self.test, self.config, gen)
        else:
            metrics = _rnn_metrics(cast(RNNBaseline, model), self.test)
        return {f"test_{k}": v for k, v in sorted(_with_mse(metrics).items())}

    def state_dict(self) -> dict[str, Any]:
        return {}  # every random draw is keyed by (seed, pass) or (seed, step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Runs


def build(config: LatentConfig, ctx: DistContext) -> tuple[nn.Module, LatentTask]:
    """The run's model (initialised from ``seed``) and task (``evaluate`` and ``plot`` need no
    optimizer: creating one imports ``torch._dynamo``, seconds per command)."""
    if ctx.distributed:
        raise ValueError(
            "the latent experiment runs in one process (a small sequential model); run it "
            "without torchrun"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    train, test = load_series(config)
    model = build_model(config, int(train.values.shape[-1])).to(ctx.device)
    return model, LatentTask(config, train, test, ctx)


def make_optimizer(
    config: LatentConfig, model: nn.Module, task: LatentTask
) -> tuple[torch.optim.Optimizer, Any]:
    """Adam, with a cosine decay from ``lr`` to ``lr_final`` when ``schedule`` says so."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler: Any = None
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.iterations, eta_min=config.lr_final
        )
    return optimizer, scheduler


def make_schedule(config: LatentConfig, task: LatentTask) -> engine.Schedule:
    return engine.schedule_for(config, config.iterations, config.eval_every)


def summarize(trainer: engine.Trainer, config: LatentConfig, run_dir: Path) -> dict[str, Any]:
    """The final metrics: the last evaluation's test RMSEs (and the paper's), NFE, seconds."""
    epochs = [r for r in engine.read_metrics(run_dir) if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else trainer.last_epoch
    task = trainer.task
    assert isinstance(task, LatentTask)
    seconds = sum(r.get("seconds", 0.0) for r in epochs)
    metrics: dict[str, Any] = {
        "experiment": NAME,
        "data": config.data,
        "model": config.model,
        "encoder": config.encoder if config.model == "latent-ode" else None,
        "observations": config.observations,
        "parameters": count_parameters(trainer.model),
        "steps": trainer.step,
        "train_size": len(task.train),
        "test_size": len(task.test),
        "batch_size": task.batch_size,
        "train_seconds": seconds,
        "seconds_per_iteration": seconds / max(trainer.step, 1),
        "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in epochs),
        "threads": torch.get_num_threads(),
        "nfe_forward_last_epoch": last.get("train_nfe_forward"),
        "settings": dataclasses.asdict(config),
    }
    metrics.update({k: v for k, v in last.items() if k.startswith("test_")})
    paper = PAPER_TABLE2.get("rnn" if config.model != "latent-ode" else "latent-ode", {})
    if config.data == "spirals" and config.observations in paper:
        metrics["paper_test_extrap_rmse"] = paper[config.observations]
    return metrics


# --------------------------------------------------------------------------------------------
# Figures


def figures(
    run_dir: Path,
    config: LatentConfig,
    model: nn.Module | None = None,
    task: engine.Task | None = None,
    step: int | None = None,
) -> list[Path]:
    """Draw the run's figures into ``RUN/figures``: ``training.png`` (loss, test RMSE and NFE
    over iterations) and, for a model, ``predictions.png`` (the paper's Figure 8: test series,
    their observations, reconstruction and extrapolation, for the latent ODE with mean +- 2 std
    bands over 20 posterior samples of ``z0``) and ``latent.png`` (latent trajectories of test
    series, first two principal components)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = run_dir / "figures"
    out.mkdir(exist_ok=True)
    paths = [_plot_training(run_dir, out, plt)]
    if model is not None and isinstance(task, LatentTask):
        with torch.no_grad():
            paths.append(_plot_predictions(model, task, step or 0, out, plt))
            if isinstance(model, LatentODE):
                paths.append(_plot_latent(model, task, out, plt))
    return paths


def _plot_training(run_dir: Path, out: Path, plt: Any) -> Path:
    records = engine.read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    config = read_json(run_dir / "config.json")
    name = f"{config.get('model', '?')}, {config.get('data', '?')}, n={config.get('observations')}"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if epochs and "test_loss" in epochs[0]:
        axes[0].plot([r["step"] for r in epochs], [r["test_loss"] for r in epochs], "o-",
                     label="test")  # fmt: skip
    axes[0].set(xlabel="iteration", ylabel="loss (-ELBO or MSE)", title=f"{name}: loss")
    if train and min(r["loss"] for r in train) > 0:
        axes[0].set_yscale("log")
    for key, label in (
        ("test_extrap_rmse", "extrapolation"),
        ("test_extrap_rmse_seen", "extrapolation onto seen points"),
        ("test_interp_rmse", "interpolation"),
        ("test_recon_rmse", "reconstruction"),
    ):
        if epochs and key in epochs[0]:
            axes[1].plot([r["step"] for r in epochs], [r[key] for r in epochs], "o-", label=label)
    axes[1].set(xlabel="iteration", ylabel="test RMSE", title="test RMSE")
    if train and "nfe_forward" in train[0]:
        axes[2].plot([r["step"] for r in train], [r["nfe_forward"] for r in train],
                     label="train, per series")  # fmt: skip
    if epochs and "test_nfe" in epochs[0]:
        axes[2].plot([r["step"] for r in epochs], [r["test_nfe"] for r in epochs], "o-",
                     label="test prediction, per series")  # fmt: skip
    axes[2].set(xlabel="iteration", ylabel="NFE", title="forward NFE of the latent solve")
    axes[1].set_ylabel("test RMSE (data units)")
    explain_empty(axes[0], "no metric lines yet")
    explain_empty(axes[1], "no evaluation yet")
    explain_empty(
        axes[2],
        "an RNN baseline: no ODE, no function evaluations"
        if config.get("model") != "latent-ode"
        else "no metric lines yet",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_predictions(model: nn.Module, task: LatentTask, step: int, out: Path, plt: Any) -> Path:
    test = task.test.select(slice(0, 4))
    n = test.n_interp
    grid = test.grid.cpu()
    one_step: tuple[Tensor, Tensor] | None = None
    if isinstance(model, LatentODE):
        gen = task._generator(_STREAM_PLOT)
        samples, _, valid, _ = _on_grid(model, test, n_samples=20, generator=gen)
        samples, valid = samples.cpu(), valid.cpu()
        mean, std = samples.mean(dim=0), samples.std(dim=0, correction=0)
    else:  # the RNN: one-step-ahead predictions at the observation times, then its roll-out
        rnn = cast(RNNBaseline, model)
        mean = torch.zeros_like(test.grid_values).cpu()
        valid = torch.zeros(mean.shape[:2], dtype=torch.bool)
        if test.has_extrapolation:
            mean[:, n:] = rnn.predict(test.values, test.times, test.grid[n:], test.mask).cpu()
            valid[:, n:] = True
        std = torch.zeros_like(mean)
        one_step = (test.times[:, 1:].cpu(), rnn(test.values, test.times, test.mask).cpu())
    truth = test.grid_values.cpu()
    obs_v, obs_t = test.values.cpu(), test.times.cpu()
    obs_m = None if test.mask is None else test.mask.cpu()
    dims = truth.shape[-1]
    spiral = dims == 2
    rows = 2 if spiral else 1
    fig, axes = plt.subplots(rows, len(test), figsize=(4.2 * len(test), 3.8 * rows), squeeze=False)
    for b in range(len(test)):
        seen = slice(None) if obs_m is None else obs_m[b, :, 0] > 0
        v = valid[b]
        if spiral:
            ax = axes[0, b]
            ax.plot(truth[b, :, 0], truth[b, :, 1], color="0.6", lw=1, label="true")
            ax.plot(mean[b, v, 0], mean[b, v, 1], color="C0", label="prediction")
            ext = v.clone()
            ext[:n] = False
            ax.plot(mean[b, ext, 0], mean[b, ext, 1], color="C3", label="extrapolation")
            ax.scatter(obs_v[b, seen, 0], obs_v[b, seen, 1], s=8, color="k", label="observed")
            if one_step is not None:
                ax.plot(one_step[1][b, :, 0], one_step[1][b, :, 1], "C0.-", ms=3, lw=0.5,
                        label="one step ahead")  # fmt: skip
            ax.set(title=f"test series {b}", aspect="equal", xlabel="x0", ylabel="x1")
        for d in range(dims):
            ax = axes[rows - 1, b]
            color = f"C{d}"
            ax.plot(grid, truth[b, :, d], color="0.6", lw=1)
            ax.plot(grid[v], mean[b, v, d], color=color, label=f"x{d} mean")
            ax.fill_between(grid[v], (mean - 2 * std)[b, v, d], (mean + 2 * std)[b, v, d],
                            color=color, alpha=0.25, lw=0)  # fmt: skip
            ax.scatter(obs_t[b, seen], obs_v[b, seen, d], s=6, color=color, edgecolor="k", lw=0.3)
            if one_step is not None:
                ax.plot(one_step[0][b], one_step[1][b, :, d], ".-", color=color, ms=3, lw=0.5)
        axes[rows - 1, b].axvline(float(grid[n - 1]), color="k", ls=":", lw=1)
        axes[rows - 1, b].set(
            xlabel="time t", ylabel="value", title="mean +- 2 std; dotted: end of window"
        )
    axes[0, 0].legend(fontsize=7)
    if rows == 2:  # the feature colours of the time panels
        axes[1, 0].legend(fontsize=7, loc="best")
    fig.suptitle(f"{task.config.model}, n = {task.config.observations}, step {step}")
    fig.tight_layout()
    path = out / "predictions.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_latent(model: LatentODE, task: LatentTask, out: Path, plt: Any) -> Path:
    test = task.test.select(slice(0, min(40, len(task.test))))
    _, z, valid, _ = _on_grid(model, test)
    z, valid = z[0].cpu(), valid.cpu()
    points = z[valid]
    centre = points.mean(dim=0)
    if z.shape[-1] > 2:
        _, _, v = torch.linalg.svd(points - centre, full_matrices=False)
        basis, label = v[:2].T, "principal component"
    else:
        basis, label = torch.eye(z.shape[-1])[:, :2], "latent dimension"
    proj = (z - centre) @ basis
    fig, ax = plt.subplots(figsize=(5.5, 5))
    labels = None if test.labels is None else test.labels.cpu()
    for b in range(len(test)):
        color = "C0" if labels is None or not bool(labels[b]) else "C3"
        ax.plot(proj[b, valid[b], 0], proj[b, valid[b], 1], color=color, lw=0.8, alpha=0.7)
        ax.scatter(proj[b, valid[b], 0][:1], proj[b, valid[b], 1][:1], s=8, color=color)
    title = "latent trajectories (dots: z0)"
    if labels is not None:
        title += "; red: clockwise"
    ax.set(xlabel=f"{label} 1", ylabel=f"{label} 2", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "latent.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
