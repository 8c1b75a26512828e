"""Latent ODEs for (irregularly sampled) time series, and the RNN baselines they are compared with.

The model of Chen et al. (2018), "Neural Ordinary Differential Equations", Sec. 5, with the
ODE-RNN recognition network of Rubanova et al. (2019), "Latent ODEs for Irregularly-Sampled Time
Series":

1. an encoder reads the observations backwards in time and returns ``q(z0 | x) = N(mean,
   exp(logvar))`` (:class:`GRUEncoder`, :class:`ODERNNEncoder`);
2. ``z0 = mean + exp(logvar / 2) * eps`` (the reparameterisation trick, ``K`` samples);
3. the latent state follows ``dz/dt = f(z)`` (:class:`LatentDynamics`), solved with
   :func:`neuralode.solve` on **per-sample time grids**: row ``b`` of ``t: [B, T]`` is series
   ``b``'s own observation times, and each row gets its own adaptive step size;
4. a decoder maps ``z(t)`` to the mean of a Gaussian with fixed std ``obs_std``.

The loss is the negative ELBO: ``-(sum over observed entries of log N(x | decoded, obs_std^2))
+ KL(q(z0 | x) || N(0, I))``.

**Time convention.** ``z0`` is the latent state at ``times[:, 0]``, the first time of each
series' grid (its first observation for :func:`~neuralode.data.timeseries.subsample` data; the
first time of the shared grid, observed or not, for masked data).  The encoders run backwards
from the last time to ``times[:, 0]``, so their final hidden state belongs to that same time.
:meth:`LatentODE.predict` solves forward from each series' ``times[:, 0]`` to any later times
(interpolation and extrapolation alike); earlier times are not supported.

**Masks** are ``[B, T, D]`` (or ``[B, T]``) with 1 = observed.  A masked-out value never
reaches the networks (the encoders see ``where(mask, x, 0)``), a time point with no observed
entry leaves the encoder's hidden state unchanged (``h = h_new`` only where some entry is
observed), and masked entries do not count in the likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neuralode.solve import solve

from .activations import Activation
from .activations import activation as make_activation
from .settings import SolveSettings

__all__ = [
    "ELBO",
    "GRUEncoder",
    "LatentDynamics",
    "LatentODE",
    "ODERNNEncoder",
    "Prediction",
    "RNNBaseline",
    "gaussian_log_likelihood",
    "kl_annealing",
    "kl_standard_normal",
]

_LOG_2PI = math.log(2 * math.pi)


def _mlp(n_in: int, n_hidden: int, n_out: int, n_layers: int, activation: str) -> nn.Sequential:
    """``n_layers`` hidden layers of ``n_hidden`` units."""
    make_activation(activation)  # unknown names fail here, listing the known ones
    if n_layers < 1:
        raise ValueError(f"the number of hidden layers must be at least 1, got {n_layers}")
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, n_hidden), make_activation(activation)]
        width = n_hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# Input normalisation: done once at every public entry


def _series(
    values: Tensor, times: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check and broadcast ``(values [B, T, D], times [T] | [B, T], mask)``.

    Returns ``times`` as ``[B, T]`` in ``values``' dtype and ``mask`` as a ``[B, T, D]`` bool
    tensor (or ``None``).
    """
    if not isinstance(values, Tensor) or values.ndim != 3:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must be a [batch, time, features] tensor, got {shape}")
    b, n, d = values.shape
    if n < 1:
        raise ValueError("values must hold at least one time point")
    if not isinstance(times, Tensor) or times.shape not in ((n,), (b, n)):
        shape = tuple(times.shape) if isinstance(times, Tensor) else type(times).__name__
        raise ValueError(f"times must be [T] or [B, T] = [{b}, {n}] to match values, got {shape}")
    times = times.to(device=values.device, dtype=values.dtype).expand(b, n)
    if mask is not None:
        if mask.shape == (b, n):
            mask = mask[..., None]
        if mask.shape not in ((b, n, d), (b, n, 1)):
            raise ValueError(
                f"mask must be [B, T, D] = [{b}, {n}, {d}] or [B, T], got {tuple(mask.shape)}"
            )
        mask = (mask != 0).expand(b, n, d)
    return values, times, mask


def _check_increasing(times: Tensor, name: str, strict: bool) -> None:
    gaps = times[:, 1:] - times[:, :-1]
    bad = (gaps <= 0) if strict else (gaps < 0)
    if bool(bad.any()):
        kind = "strictly increasing" if strict else "non-decreasing"
        raise ValueError(f"{name} must be {kind} along the time axis (per series)")


# --------------------------------------------------------------------------------------------
# Likelihood and KL


def gaussian_log_likelihood(
    x: Tensor, mean: Tensor, std: float | Tensor, mask: Tensor | None = None
) -> Tensor:
    """``sum log N(x | mean, std^2)`` over the observed entries of each series.

    Args:
        x: observations ``[..., T, D]``.
        mean: predicted means, broadcastable to ``x`` (e.g. ``[K, B, T, D]`` against ``x``
            ``[B, T, D]``).
        std: the observation noise std (a float or a tensor broadcastable to ``x``).
        mask: ``[..., T, D]`` (1 or True = observed), broadcastable; ``None``: all observed.
            Masked-out entries contribute exactly 0 whatever ``x`` holds there (even NaN).

    Returns:
        ``[...]``: the sum over the last two dimensions (nats), in ``mean``'s dtype.

    Examples:
        >>> import torch
        >>> from neuralode.nn.latent import gaussian_log_likelihood
        >>> x = torch.zeros(2, 3, 1)  # 2 series, 3 times, 1 feature
        >>> mask = torch.ones(2, 3, 1); mask[1] = 0  # the second series is unobserved
        >>> gaussian_log_likelihood(x, torch.zeros(2, 3, 1), 1.0, mask)  # -1.5 log(2 pi), 0
        tensor([-2.7568,  0.0000])
    """
    std_t = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    term = -0.5 * (_LOG_2PI + 2 * torch.log(std_t) + ((x - mean) / std_t) ** 2)
    if mask is not None:
        term = torch.where(mask != 0, term, term.new_zeros(()))
    return term.sum(dim=(-2, -1))


def kl_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mean, exp(logvar)) || N(0, I))``, analytic, summed over the last dimension.

    Args:
        mean, logvar: ``[..., L]``, the diagonal Gaussian's mean and log-variance.

    Returns:
        ``[...]``: ``0.5 * sum(mean^2 + exp(logvar) - 1 - logvar)`` (nats).

    Examples:
        >>> import torch
        >>> from neuralode.nn.latent import kl_standard_normal
        >>> kl_standard_normal(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.zeros(2, 2))
        tensor([0., 1.])
    """
    return 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def kl_annealing(iteration: int, *, wait: int = 10, rate: float = 0.99) -> float:
    """KL weight schedule of Rubanova et al.'s ``run_models.py``.

    Args:
        iteration: the training iteration (from 0).
        wait: iterations with weight 0.
        rate: the decay of ``1 - weight`` per iteration after ``wait``.

    Returns:
        0 for the first ``wait`` iterations, then ``1 - rate ** (iteration - wait)``, rising
        towards 1 (the ``kl_weight`` of :meth:`LatentODE.forward`).

    Examples:
        >>> from neuralode.nn.latent import kl_annealing
        >>> kl_annealing(5), round(kl_annealing(110), 4)
        (0.0, 0.634)
    """
    if iteration < wait:
        return 0.0
    return 1.0 - rate ** (iteration - wait)


# --------------------------------------------------------------------------------------------
# Encoders


class GRUEncoder(nn.Module):
    """Recognition RNN: a GRU cell that reads the series backwards in time, then ``q(z0 | x)``.

    At step ``i`` (from ``T - 1`` down to 0) the input is ``[where(mask, x_i, 0), mask_i
    (if use_mask), dt_i (if time_gaps)]`` with ``dt_i = t_{i+1} - t_i`` (0 for the last point),
    and ``h <- GRUCell(input, h)`` wherever the time point has an observed entry.  The final
    hidden state (at ``times[:, 0]``) is mapped linearly to ``(mean, logvar)``.

    Chen et al. (2018) used a plain tanh RNN; Rubanova et al. (2019) a GRU with ``dt`` inputs
    (their RNN-VAE encoder).

    Args:
        obs_dim: ``D``.
        latent_dim: ``L`` (default 4, the spiral experiment's).
        hidden_dim: GRU state size (default 25).
        use_mask: append the mask to the input (Rubanova's layout, for per-dimension masks).
        time_gaps: append ``dt_i`` to the input.

    Attributes:
        cell: the :class:`torch.nn.GRUCell`.
        head: the ``Linear(hidden_dim, 2 latent_dim)`` to ``(mean, logvar)``.

    Examples:
        >>> import torch
        >>> from neuralode.nn import GRUEncoder
        >>> encoder = GRUEncoder(obs_dim=2, latent_dim=3, hidden_dim=8)
        >>> values, times = torch.randn(4, 5, 2), torch.linspace(0.0, 1.0, 5)
        >>> mean, logvar = encoder(values, times, mask=torch.ones(4, 5))
        >>> mean.shape, logvar.shape
        (torch.Size([4, 3]), torch.Size([4, 3]))
    """

    def __init__(
        self,
        obs_dim: int,
        latent_dim: int = 4,
        hidden_dim: int = 25,
        *,
        use_mask: bool = False,
        time_gaps: bool = True,
    ) -> None:
        super().__init__()
        self.obs_dim, self.latent_dim, self.hidden_dim = obs_dim, latent_dim, hidden_dim
        self.use_mask, self.time_gaps = use_mask, time_gaps
        n_in = obs_dim * (2 if use_mask else 1) + (1 if time_gaps else 0)
        self.cell = nn.GRUCell(n_in, hidden_dim)
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(
        self, values: Tensor, times: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Encode a batch of series.

        Args:
            values: ``[B, T, D]``, floating point.
            times: ``[T]`` or ``[B, T]``, non-decreasing (zero gaps allowed).
            mask: ``[B, T, D]`` or ``[B, T]`` (1 = observed), or ``None``.

        Returns:
            ``(mean, logvar)`` of ``q(z0 | x)``, each ``[B, latent_dim]``.

        Raises:
            ValueError: for shapes that do not match (naming the argument) or times that
                decrease.
        """
        mean, logvar = self.head(self.hidden(values, times, mask)).chunk(2, dim=-1)
        return mean, logvar

    def hidden(self, values: Tensor, times: Tensor, mask: Tensor | None = None) -> Tensor:
        """The final hidden state, after reading the series backwards.

        Args:
            values, times, mask: as :meth:`forward`.

        Returns:
            ``[B, hidden_dim]``, the hidden state at ``times[:, 0]``.

        Raises:
            ValueError: as :meth:`forward`.
        """
        values, times, mask = _series(values, times, mask)
        _check_increasing(times, "times", strict=False)
        b, n, _ = values.shape
        gaps = torch.cat([times[:, 1:] - times[:, :-1], times.new_zeros(b, 1)], dim=1)
        if mask is not None:
            values = torch.where(mask, values, values.new_zeros(()))
            seen = mask.any(dim=-1, keepdim=True)  # [B, T, 1]
        h = values.new_zeros(b, self.hidden_dim)
        for i in reversed(range(n)):
            h = self._evolve(h, gaps[:, i])
            parts = [values[:, i]]
            if self.use_mask:
                ones = torch.ones_like(values[:, i])
                parts.append(ones if mask is None else mask[:, i].to(values.dtype))
            if self.time_gaps:
                parts.append(gaps[:, i, None])
            h_new = self.cell(torch.cat(parts, dim=-1), h)
            h = h_new if mask is None else torch.where(seen[:, i], h_new, h)
        return h

    def _evolve(self, h: Tensor, gap: Tensor) -> Tensor:
        """Carry ``h`` from ``t_{i+1}`` back to ``t_i`` (``gap = t_{i+1} - t_i``, ``[B]``).
        The plain GRU holds it constant."""
        return h


class ODERNNEncoder(GRUEncoder):
    """ODE-RNN recognition network (Rubanova et al. 2019), run backwards in time.

    Between observations the hidden state follows ``dh/dt = g(h)`` (an MLP, ``tanh``); at an
    observation the GRU cell updates it, exactly as :class:`GRUEncoder` (which this class
    extends: with every gap zero the two give identical outputs for identical weights).

    Each gap is solved for every series at once: the gap ``[t_i, t_{i+1}]`` of series ``b`` is
    mapped to ``s in [0, 1]`` with ``t = t_{i+1} - s dt_b``, so ``dh/ds = -dt_b g(h)``, one shared
    grid ``[0, 1]`` with a per-series scale; a zero-length gap gives a zero field and leaves
    ``h`` unchanged exactly.

    Args:
        obs_dim, latent_dim, hidden_dim, use_mask: as :class:`GRUEncoder`.
        time_gaps: also feed ``dt_i`` to the GRU (default False: the ODE accounts for time).
        ode_hidden: width of ``g``'s hidden layer (default: ``hidden_dim``).
        method: solver for the gaps (default ``"euler"``, as Rubanova et al.'s encoder).  With
            a fixed-step method the default is one step per gap; pass
            ``step_size=1 / n`` for ``n`` steps.
        rtol, atol: tolerances for adaptive methods.
        step_size: the step of a fixed-step method, in units of the gap (``None``: one step).
        gradient: the gradient strategy of :func:`neuralode.solve`.
        solve_options: further keyword arguments for :func:`neuralode.solve`. The settings
            are kept as ``encoder.solver`` (:class:`~neuralode.nn.SolveSettings`).

    Raises:
        ValueError: for settings that :class:`~neuralode.nn.SolveSettings` rejects, or
            ``adjoint_params`` in ``solve_options`` (the encoder sets them).

    Examples:
        >>> import torch
        >>> from neuralode.nn import ODERNNEncoder
        >>> encoder = ODERNNEncoder(obs_dim=2, latent_dim=3, hidden_dim=8)
        >>> mean, logvar = encoder(torch.randn(4, 5, 2), torch.linspace(0.0, 1.0, 5))
        >>> mean.shape, encoder.solver
        (torch.Size([4, 3]), method='euler', rtol=0.001, atol=0.0001, gradient='backprop')
    """

    def __init__(
        self,
        obs_dim: int,
        latent_dim: int = 4,
        hidden_dim: int = 25,
        *,
        use_mask: bool = False,
        time_gaps: bool = False,
        ode_hidden: int | None = None,
        method: str = "euler",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        step_size: float | None = None,
        gradient: str = "backprop",
        solve_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(obs_dim, latent_dim, hidden_dim, use_mask=use_mask, time_gaps=time_gaps)
        self.ode_func = _mlp(hidden_dim, ode_hidden or hidden_dim, hidden_dim, 1, "tanh")
        self.solver = SolveSettings(method, rtol, atol, step_size, gradient, solve_options or {})
        if "adjoint_params" in self.solver.options:
            raise ValueError(
                "solve_options['adjoint_params'] is set by ODERNNEncoder itself (its field is a "
                "closure over ode_func's parameters and the time gaps)"
            )

    def _evolve(self, h: Tensor, gap: Tensor) -> Tensor:
        if not bool((gap != 0).any()):
            return h
        scale = gap[:, None]

        def field(s: Tensor, y: Tensor) -> Tensor:
            dy: Tensor = -scale * self.ode_func(y)
            return dy

        opts = self.solver.kwargs()
        if self.solver.gradient != "backprop":
            params = list(self.ode_func.parameters())
            opts["adjoint_params"] = params + ([scale] if scale.requires_grad else [])
        unit = torch.tensor([0.0, 1.0], dtype=h.dtype, device=h.device)
        sol = solve(field, h, unit, batched=True, **opts)
        out: Tensor = sol.ys[:, -1]
        return out


# --------------------------------------------------------------------------------------------
# Latent ODE


class LatentDynamics(nn.Module):
    """Autonomous latent vector field ``dz/dt = f(z)``: an MLP ``L -> hidden (x n_layers) -> L``.

    Defaults follow torchdiffeq's ``examples/latent_ode.py`` (``LatentODEfunc``: two hidden
    layers of 20 ELU units).  ``forward(t, z)`` ignores ``t``; ``z`` is ``[..., L]``.

    Args:
        latent_dim: ``L``.
        hidden_dim: units per hidden layer.
        n_layers: number of hidden layers, at least 1.
        activation: ``"elu"``, ``"tanh"``, ``"relu"`` or ``"softplus"``.

    Raises:
        ValueError: for an unknown activation or ``n_layers < 1``.

    Examples:
        >>> import torch
        >>> from neuralode.nn.latent import LatentDynamics
        >>> f = LatentDynamics(latent_dim=3, hidden_dim=8)
        >>> f(torch.tensor(0.0), torch.zeros(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        latent_dim: int = 4,
        hidden_dim: int = 20,
        n_layers: int = 2,
        activation: Activation = "elu",
    ) -> None:
        super().__init__()
        self.net = _mlp(latent_dim, hidden_dim, latent_dim, n_layers, activation)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        """``dz/dt = f(z)``.

        Args:
            t: the time (ignored: the field is autonomous).
            z: ``[..., L]``.

        Returns:
            ``[..., L]``.
        """
        dz: Tensor = self.net(z)
        return dz


@dataclass
class ELBO:
    """What :meth:`LatentODE.forward` returns.  ``K`` is ``n_samples``.

    Attributes:
        loss: scalar to minimise, ``mean_b(kl_weight * kl - log_likelihood)``.
        elbo: ``[B]``, ``log_likelihood - kl`` (the unweighted bound).
        log_likelihood: ``[B]``, Monte-Carlo estimate (mean over the ``K`` samples of ``z0``)
            of ``E_q[log p(x | z0)]``, summed over the observed entries.
        kl: ``[B]``, analytic ``KL(q(z0 | x) || N(0, I))``.
        mse: ``[B]``, mean squared error of the decoded means over the observed entries
            (averaged over the samples), for monitoring.
        mean: ``[K, B, T, D]`` decoded means at the observation times.
        z: ``[K, B, T, L]`` latent trajectories at the observation times.
        qz0_mean, qz0_logvar: ``[B, L]``, the posterior parameters.
        nfe: ``[K, B]`` vector-field evaluations of the latent solve, per sample and series.

    With target points (``target_values=...``), ``T`` is their number ``T'`` and the entries
    above refer to them.

    Examples:
        >>> import torch
        >>> from neuralode.nn import LatentODE
        >>> model = LatentODE(obs_dim=2, latent_dim=3, rec_hidden=8, dynamics_hidden=8)
        >>> out = model(torch.randn(4, 5, 2), torch.linspace(0.0, 1.0, 5), n_samples=2)
        >>> out.loss.shape, out.elbo.shape, out.nfe.shape
        (torch.Size([]), torch.Size([4]), torch.Size([2, 4]))
        >>> out.mean.shape, out.z.shape  # [K, B, T, D], [K, B, T, L]
        (torch.Size([2, 4, 5, 2]), torch.Size([2, 4, 5, 3]))
    """

    loss: Tensor
    elbo: Tensor
    log_likelihood: Tensor
    kl: Tensor
    mse: Tensor
    mean: Tensor
    z: Tensor
    qz0_mean: Tensor
    qz0_logvar: Tensor
    nfe: Tensor


@dataclass
class Prediction:
    """What :meth:`LatentODE.predict` returns.

    Attributes:
        samples: ``[K, B, T', D]`` decoded means, one per sample of ``z0``.
        latent: ``[K, B, T', L]`` latent trajectories.
        times: ``[B, T']`` the prediction times.

    Examples:
        >>> import torch
        >>> from neuralode.nn import LatentODE
        >>> model = LatentODE(obs_dim=2, latent_dim=3, rec_hidden=8, dynamics_hidden=8)
        >>> values, times = torch.randn(4, 5, 2), torch.linspace(0.0, 1.0, 5)
        >>> pred = model.predict(values, times, torch.linspace(0.0, 2.0, 7), n_samples=3)
        >>> pred.samples.shape, pred.latent.shape  # [K, B, T', D], [K, B, T', L]
        (torch.Size([3, 4, 7, 2]), torch.Size([3, 4, 7, 3]))
        >>> pred.times.shape, pred.mean.shape, pred.std.shape
        (torch.Size([4, 7]), torch.Size([4, 7, 2]), torch.Size([4, 7, 2]))
    """

    samples: Tensor
    latent: Tensor
    times: Tensor

    @property
    def mean(self) -> Tensor:
        """The average over the samples.

        Returns:
            ``[B, T', D]``.
        """
        return self.samples.mean(dim=0)

    @property
    def std(self) -> Tensor:
        """The spread over the samples (0 for one sample); a band is ``mean +- 2 std`` (add
        ``obs_std`` in quadrature for the predictive band of data).

        Returns:
            ``[B, T', D]``, the population standard deviation over the ``K`` samples.
        """
        return self.samples.std(dim=0, correction=0)


class LatentODE(nn.Module):
    """Latent ODE VAE of Chen et al. (2018), Sec. 5 (see the module docstring for conventions).

    Args:
        obs_dim: ``D``, features per observation.
        latent_dim: ``L`` (default 4).
        encoder: a module ``encoder(values, times, mask) -> (mean, logvar)`` with ``[B, L]``
            outputs; default ``GRUEncoder(obs_dim, latent_dim, rec_hidden)``.
        rec_hidden: hidden size of the default encoder (25).
        dynamics: the latent field ``f(t, z)``; default ``LatentDynamics(latent_dim,
            dynamics_hidden, dynamics_layers, activation)``.
        dynamics_hidden, dynamics_layers, activation: of the default dynamics (20, 2, ``"elu"``).
        decoder_hidden: the decoder is ``L -> decoder_hidden (ReLU) -> D`` (20), as torchdiffeq's.
        obs_std: std of the Gaussian observation model (0.3, the spirals' noise).
        method, rtol, atol, step_size, gradient: the latent solve's :func:`neuralode.solve`
            options (default ``"dopri5"``, ``1e-5``, ``1e-5``, ``None``, ``"backprop"``).
        solve_options: further keyword arguments for :func:`neuralode.solve`
            (``max_num_steps``, ``adjoint_options``, ...). The settings are kept as
            ``model.solver`` (:class:`~neuralode.nn.SolveSettings`).

    Raises:
        ValueError: if ``obs_std`` is not a finite positive number, for an unknown ``activation`` or
            ``dynamics_layers < 1`` (default dynamics), or for settings that
            :class:`~neuralode.nn.SolveSettings` rejects.

    Examples:
        >>> import torch
        >>> from neuralode.nn import LatentODE
        >>> model = LatentODE(obs_dim=2, latent_dim=3, rec_hidden=8, dynamics_hidden=8)
        >>> values, times = torch.randn(4, 5, 2), torch.linspace(0.0, 1.0, 5)  # [B, T, D], [T]
        >>> model(values, times).loss.backward()  # the negative ELBO
        >>> model.predict(values, times, torch.linspace(0.0, 2.0, 7)).samples.shape
        torch.Size([1, 4, 7, 2])
    """

    def __init__(
        self,
        obs_dim: int,
        latent_dim: int = 4,
        *,
        encoder: nn.Module | None = None,
        rec_hidden: int = 25,
        dynamics: nn.Module | None = None,
        dynamics_hidden: int = 20,
        dynamics_layers: int = 2,
        activation: Activation = "elu",
        decoder_hidden: int = 20,
        obs_std: float = 0.3,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        step_size: float | None = None,
        gradient: str = "backprop",
        solve_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(obs_std) and obs_std > 0):
            raise ValueError(f"obs_std must be a finite positive number, got {obs_std}")
        self.obs_dim, self.latent_dim, self.obs_std = obs_dim, latent_dim, obs_std
        self.encoder = (
            encoder if encoder is not None else GRUEncoder(obs_dim, latent_dim, rec_hidden)
        )
        self.dynamics = (
            dynamics
            if dynamics is not None
            else LatentDynamics(latent_dim, dynamics_hidden, dynamics_layers, activation)
        )
        self.decoder = _mlp(latent_dim, decoder_hidden, obs_dim, 1, "relu")
        self.solver = SolveSettings(method, rtol, atol, step_size, gradient, solve_options or {})

    # -- the pieces ------------------------------------------------------------------------

    def encode(
        self, values: Tensor, times: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The posterior of the initial latent state.

        Args:
            values, times, mask: as :meth:`forward`.

        Returns:
            ``(mean, logvar)`` of ``q(z0 | x)``, each ``[B, L]``.
        """
        mean, logvar = self.encoder(values, times, mask)
        return mean, logvar

    @staticmethod
    def sample_z0(
        mean: Tensor,
        logvar: Tensor,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Reparameterised samples ``z0 = mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)``.

        Args:
            mean, logvar: ``[B, L]``.
            n_samples: ``K``, at least 1.
            generator: random generator for ``eps``.

        Returns:
            ``[K, B, L]``, differentiable in ``mean`` and ``logvar``.

        Raises:
            ValueError: if ``n_samples < 1``.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}")
        eps = torch.randn(
            (n_samples, *mean.shape), dtype=mean.dtype, device=mean.device, generator=generator
        )
        return mean + (0.5 * logvar).exp() * eps

    def latent_trajectory(self, z0: Tensor, t0: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
        """Solve the latent ODE from ``z0`` at ``t0`` to ``times``, every series on its own grid.

        Args:
            z0: ``[K, B, L]`` (or ``[B, L]``).
            t0: ``[B]``, the time of ``z0`` per series (a float or ``[]`` tensor is shared).
            times: ``[B, T']`` (or shared ``[T']``), strictly increasing, ``times[:, 0] >= t0``.

        Returns:
            ``(z, nfe)``: ``z`` is ``[K, B, T', L]`` (``[B, T', L]`` for a ``[B, L]`` input) and
            ``nfe`` ``[K, B]`` (``[B]``) the latent field's evaluations per series (int64).

        Raises:
            ValueError: for shapes that do not match, ``times`` not strictly increasing, or
                times before ``t0``.
        """
        squeeze = z0.ndim == 2
        z0 = z0[None] if squeeze else z0
        if z0.ndim != 3:
            raise ValueError(f"z0 must be [K, B, L] or [B, L], got {tuple(z0.shape)}")
        k, b, dim = z0.shape
        times = torch.as_tensor(times, dtype=z0.dtype, device=z0.device)
        if times.ndim == 1:
            times = times.expand(b, -1)
        if times.ndim != 2 or times.shape[0] != b or times.shape[1] < 1:
            raise ValueError(
                f"times must be [T'] or [B, T'] with B = {b}, got {tuple(times.shape)}"
            )
        t0 = torch.as_tensor(t0, dtype=z0.dtype, device=z0.device).expand(b)
        _check_increasing(times, "times", strict=True)
        if bool((times[:, 0] < t0).any()):
            raise ValueError(
                "prediction times must not precede each series' t0 (its first time); the latent "
                "ODE is solved forward from z0"
            )
        grid, take = _grid_from(t0, times)
        flat_z0 = z0.reshape(k * b, dim)
        if grid.shape[1] == 1:
            zs = flat_z0[:, None]
            nfe = torch.zeros(k * b, dtype=torch.int64, device=z0.device)
        else:
            sol = solve(self.dynamics, flat_z0, grid.repeat(k, 1), **self.solver.kwargs())
            zs, nfe = sol.ys, sol.stats.nfe
        if take is not None:
            zs = torch.gather(zs, 1, take.repeat(k, 1)[..., None].expand(-1, -1, dim))
        z = zs.reshape(k, b, times.shape[1], dim)
        nfe = nfe.reshape(k, b)
        return (z[0], nfe[0]) if squeeze else (z, nfe)

    def decode(self, z: Tensor) -> Tensor:
        """Observation means from latent states.

        Args:
            z: ``[..., L]``.

        Returns:
            ``[..., D]``.
        """
        out: Tensor = self.decoder(z)
        return out

    # -- training and prediction ---------------------------------------------------------

    def forward(
        self,
        values: Tensor,
        times: Tensor,
        mask: Tensor | None = None,
        *,
        n_samples: int = 1,
        kl_weight: float = 1.0,
        generator: torch.Generator | None = None,
        target_values: Tensor | None = None,
        target_times: Tensor | None = None,
        target_mask: Tensor | None = None,
    ) -> ELBO:
        """The ELBO of a batch of series, reconstructed at their own observation times (Chen et
        al.), or at other target points given the observed ones (Rubanova et al.'s
        interpolation and extrapolation objectives).

        Args:
            values: ``[B, T, D]``.
            times: ``[B, T]`` per-series observation times (or a shared ``[T]``), strictly
                increasing per series; ``z0`` lives at ``times[:, 0]``.
            mask: ``[B, T, D]`` or ``[B, T]``, 1 = observed; ``None``: all observed.
            n_samples: ``K`` samples of ``z0`` per series.
            kl_weight: weight of the KL term in ``loss`` (annealing, e.g. :func:`kl_annealing`);
                ``elbo`` is always unweighted.
            generator: random generator for ``eps``.
            target_values, target_times, target_mask: score the reconstruction at these points
                (``[B, T', D]``, ``[T']`` or ``[B, T']`` after each series' first observation,
                and an optional mask) instead of at the observations.

        Returns:
            An :class:`ELBO`.

        Raises:
            ValueError: for shapes that do not match (naming the argument), ``times`` (or
                ``target_times``) not strictly increasing, target times before a series'
                first time, ``n_samples < 1``, or ``target_times``/``target_mask`` without
                ``target_values`` (or the reverse).
            neuralode.SolverError: if the latent solve fails.
        """
        values, times, mask = _series(values, times, mask)
        qz0_mean, qz0_logvar = self.encode(values, times, mask)
        z0 = self.sample_z0(qz0_mean, qz0_logvar, n_samples, generator)
        if target_values is None:
            if target_times is not None or target_mask is not None:
                raise ValueError("target_times and target_mask need target_values")
            target_values, target_times, target_mask = values, times, mask
        elif target_times is None:
            raise ValueError("target_values needs target_times")
        else:
            target_values, target_times, target_mask = _series(
                target_values, target_times, target_mask
            )
        z, nfe = self.latent_trajectory(z0, times[:, 0], target_times)
        mean = self.decode(z)
        log_lik = gaussian_log_likelihood(target_values, mean, self.obs_std, target_mask)
        log_lik = log_lik.mean(dim=0)
        kl = kl_standard_normal(qz0_mean, qz0_logvar)
        sq = (target_values - mean) ** 2
        count: Tensor | int = target_values.shape[1] * target_values.shape[2]
        if target_mask is not None:
            sq = torch.where(target_mask, sq, sq.new_zeros(()))
            count = target_mask.sum(dim=(-2, -1)).clamp(min=1)
        mse = (sq.sum(dim=(-2, -1)) / count).mean(dim=0)
        return ELBO(
            loss=(kl_weight * kl - log_lik).mean(),
            elbo=log_lik - kl,
            log_likelihood=log_lik,
            kl=kl,
            mse=mse,
            mean=mean,
            z=z,
            qz0_mean=qz0_mean,
            qz0_logvar=qz0_logvar,
            nfe=nfe,
        )

    def predict(
        self,
        values: Tensor,
        times: Tensor,
        t_pred: Tensor,
        mask: Tensor | None = None,
        *,
        n_samples: int = 1,
        use_mean: bool = False,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Condition on observed series and predict them at ``t_pred`` (later times included).

        Args:
            values, times, mask: the observed window, as :meth:`forward`.
            t_pred: ``[B, T']`` or shared ``[T']``, strictly increasing and not before each
                series' ``times[:, 0]``: the observed window (interpolation), later times
                (extrapolation), or both.
            n_samples: ``K`` posterior samples of ``z0``.
            use_mean: use ``z0 = mean`` of ``q(z0 | x)`` (then ``K = 1``) instead of sampling.
            generator: random generator for ``eps``.

        Returns:
            A :class:`Prediction` with ``samples`` ``[K, B, T', D]``.

        Raises:
            ValueError: as :meth:`forward`, and for ``t_pred`` not strictly increasing or
                before a series' ``times[:, 0]``.
        """
        values, times, mask = _series(values, times, mask)
        qz0_mean, qz0_logvar = self.encode(values, times, mask)
        if use_mean:
            z0 = qz0_mean[None]
        else:
            z0 = self.sample_z0(qz0_mean, qz0_logvar, n_samples, generator)
        t_pred = torch.as_tensor(t_pred, dtype=values.dtype, device=values.device)
        t_pred = t_pred.expand(values.shape[0], -1) if t_pred.ndim == 1 else t_pred
        z, _ = self.latent_trajectory(z0, times[:, 0], t_pred)
        return Prediction(samples=self.decode(z), latent=z, times=t_pred)

    def predict_on_grid(
        self,
        values: Tensor,
        times: Tensor,
        grid: Tensor,
        mask: Tensor | None = None,
        *,
        n_samples: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Predictions on one shared time ``grid`` (``[G]``, increasing), conditioned on the
        observed series, for series whose observations start at different times.

        ``z0`` lives at each series' first observation time ``t0`` and the ODE runs forward
        only, so grid points before ``t0`` get no prediction.  Each series is solved on its own
        grid ``grid[i0 + j]`` (``i0``: its first grid point at or after ``t0``), extended past
        the end by the last grid gap so every row has ``G`` points, and the results are put
        back in place.

        Args:
            values, times, mask: the observed window, as :meth:`forward`.
            grid: ``[G]`` prediction times shared by all series.
            n_samples: 0 decodes the posterior mean of ``z0``; ``K`` decodes ``K`` samples.
            generator: random generator for the samples.

        Returns:
            ``(samples [K, B, G, D], latent [K, B, G, L], valid [B, G] bool, nfe [K, B])``
            (``K = 1`` for ``n_samples=0``); entries where ``valid`` is False hold 0.

        Raises:
            ValueError: as :meth:`forward`.

        Examples:
            >>> import torch
            >>> from neuralode.nn import LatentODE
            >>> model = LatentODE(obs_dim=2, latent_dim=3, rec_hidden=8, dynamics_hidden=8)
            >>> times = torch.stack([torch.linspace(0, 1, 5), torch.linspace(0.5, 1.5, 5)])
            >>> samples, latent, valid, nfe = model.predict_on_grid(
            ...     torch.randn(2, 5, 2), times, torch.linspace(0, 2, 9)
            ... )
            >>> samples.shape, valid.sum(dim=1)  # the second series starts at t = 0.5
            (torch.Size([1, 2, 9, 2]), tensor([9, 7]))
        """
        values, times, mask = _series(values, times, mask)
        mean, logvar = self.encode(values, times, mask)
        z0 = mean[None] if n_samples == 0 else self.sample_z0(mean, logvar, n_samples, generator)
        t0 = times[:, 0]
        g = int(grid.shape[0])
        i0 = torch.searchsorted(grid, t0.contiguous())
        extra = int(i0.max())
        if extra:
            step = grid[-1] - grid[-2] if g > 1 else grid.new_tensor(1.0)
            tail = grid[-1] + step * torch.arange(
                1, extra + 1, dtype=grid.dtype, device=grid.device
            )
            grid = torch.cat([grid, tail])
        cols = torch.arange(g, device=grid.device)
        shifted = grid[i0[:, None] + cols]  # [B, G]
        z, nfe = self.latent_trajectory(z0, t0, shifted)
        decoded = self.decode(z)
        back = (cols[None, :] - i0[:, None]).clamp(min=0)  # grid index k -> column k - i0
        valid = cols[None, :] >= i0[:, None]

        def place(x: Tensor) -> Tensor:
            idx = back[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1])
            return torch.where(valid[None, :, :, None], torch.gather(x, 2, idx), x.new_zeros(()))

        return place(decoded), place(z), valid, nfe


def _grid_from(t0: Tensor, times: Tensor) -> tuple[Tensor, Tensor | None]:
    """A solver grid per row that starts at ``t0`` and contains ``times`` (``[B, T']``).

    Returns ``(grid, take)``: the outputs at ``times`` are ``ys.gather(1, take)``, or ``ys``
    itself when ``take`` is None (every row starts at its ``t0``).  Rows that start later get
    ``t0`` prepended; in a mixed batch the rows that start at ``t0`` get an extra point
    inserted before their second time instead, so every row keeps the same length and a
    strictly increasing grid.
    """
    starts = times[:, 0] == t0
    if bool(starts.all()):
        return times, None
    b, n = times.shape
    prepended = torch.cat([t0[:, None], times], dim=1)
    if n > 1:
        inserted = torch.cat([times[:, :1], 0.5 * (times[:, :1] + times[:, 1:2]), times[:, 1:]], 1)
    else:  # one output time: any later point will do; use the batch's largest lead
        lead = (times[:, 0] - t0).max()
        inserted = torch.cat([times, times + lead], dim=1)
    grid = torch.where(starts[:, None], inserted, prepended)
    ar = torch.arange(n, device=times.device)
    take_inserted = torch.where(ar > 0, ar + 1, ar)
    take = torch.where(starts[:, None], take_inserted, ar + 1)
    return grid, take


# --------------------------------------------------------------------------------------------
# Baselines


class RNNBaseline(nn.Module):
    """Autoregressive GRU baseline (the "RNN" of Chen et al. 2018, Table 2).

    Step ``i`` reads ``x_i`` (and, with ``use_time_gaps``, the gap ``t_{i+1} - t_i`` to the point
    it must predict) and outputs the prediction of ``x_{i+1}``: ``h_i = GRUCell(input_i,
    h_{i-1})``, ``x_hat_{i+1} = Linear(h_i)``.  Without time gaps the model sees only the order
    of the observations, as an RNN for regularly sampled data would.

    Args:
        obs_dim: ``D``.
        hidden_dim: GRU state size (default 25).
        use_time_gaps: append the gap to the next time to every input.
        use_mask: append the mask to every input (masked values are always fed as 0).

    Examples:
        >>> import torch
        >>> from neuralode.nn import RNNBaseline
        >>> rnn = RNNBaseline(obs_dim=2, hidden_dim=8, use_time_gaps=True)
        >>> values, times = torch.randn(4, 5, 2), torch.linspace(0.0, 1.0, 5)
        >>> rnn(values, times).shape, rnn.loss(values, times).shape
        (torch.Size([4, 4, 2]), torch.Size([]))
        >>> rnn.predict(values, times, torch.tensor([1.5, 2.0])).shape
        torch.Size([4, 2, 2])
    """

    def __init__(
        self,
        obs_dim: int,
        hidden_dim: int = 25,
        *,
        use_time_gaps: bool = False,
        use_mask: bool = False,
    ) -> None:
        super().__init__()
        self.obs_dim, self.hidden_dim = obs_dim, hidden_dim
        self.use_time_gaps, self.use_mask = use_time_gaps, use_mask
        n_in = obs_dim * (2 if use_mask else 1) + (1 if use_time_gaps else 0)
        self.cell = nn.GRUCell(n_in, hidden_dim)
        self.head = nn.Linear(hidden_dim, obs_dim)

    def _step(self, x: Tensor, m: Tensor | None, gap: Tensor, h: Tensor) -> Tensor:
        parts = [x if m is None else torch.where(m, x, x.new_zeros(()))]
        if self.use_mask:
            parts.append(torch.ones_like(x) if m is None else m.to(x.dtype))
        if self.use_time_gaps:
            parts.append(gap[:, None])
        h_next: Tensor = self.cell(torch.cat(parts, dim=-1), h)
        return h_next

    def forward(self, values: Tensor, times: Tensor, mask: Tensor | None = None) -> Tensor:
        """One-step-ahead predictions of ``x_1 .. x_{T-1}``.

        Args:
            values: ``[B, T, D]``.
            times: ``[T]`` or ``[B, T]``.
            mask: ``[B, T, D]`` or ``[B, T]`` (1 = observed), or ``None``.

        Returns:
            ``[B, T - 1, D]``.

        Raises:
            ValueError: for shapes that do not match (naming the argument).
        """
        values, times, mask = _series(values, times, mask)
        b, n, _ = values.shape
        h = values.new_zeros(b, self.hidden_dim)
        preds = []
        for i in range(n - 1):
            m = None if mask is None else mask[:, i]
            h = self._step(values[:, i], m, times[:, i + 1] - times[:, i], h)
            preds.append(self.head(h))
        if not preds:
            return values.new_zeros(b, 0, values.shape[2])
        return torch.stack(preds, dim=1)

    def loss(self, values: Tensor, times: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean squared one-step-ahead error over the observed targets ``x_1 .. x_{T-1}``.

        Args:
            values, times, mask: as :meth:`forward`.

        Returns:
            A 0-dim tensor (0 when no target is observed; NaN for a single time point and no
            mask, as the mean of nothing).

        Raises:
            ValueError: as :meth:`forward`.
        """
        values, times, mask = _series(values, times, mask)
        pred: Tensor = self(values, times, mask)
        sq = (pred - values[:, 1:]) ** 2
        if mask is None:
            return sq.mean()
        m = mask[:, 1:]
        return torch.where(m, sq, sq.new_zeros(())).sum() / m.sum().clamp(min=1)

    def predict(
        self, values: Tensor, times: Tensor, t_pred: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """Read the observed series, then roll forward on its own predictions to ``t_pred``.

        Args:
            values, times, mask: the observed window, as :meth:`forward`.
            t_pred: ``[B, T']`` or shared ``[T']``, increasing and after ``times[:, -1]``.

        Returns:
            ``[B, T', D]`` predictions.

        Raises:
            ValueError: as :meth:`forward`, and for an empty ``t_pred``.
        """
        values, times, mask = _series(values, times, mask)
        b, n, _ = values.shape
        t_pred = torch.as_tensor(t_pred, dtype=values.dtype, device=values.device)
        t_pred = t_pred.expand(b, -1) if t_pred.ndim == 1 else t_pred
        if t_pred.shape[-1] == 0:
            raise ValueError("t_pred must hold at least one prediction time, got none")
        h = values.new_zeros(b, self.hidden_dim)
        for i in range(n - 1):
            m = None if mask is None else mask[:, i]
            h = self._step(values[:, i], m, times[:, i + 1] - times[:, i], h)
        x, m_last = values[:, -1], None if mask is None else mask[:, -1]
        t_prev = times[:, -1]
        out = []
        for j in range(t_pred.shape[1]):
            h = self._step(x, m_last, t_pred[:, j] - t_prev, h)
            x, m_last, t_prev = self.head(h), None, t_pred[:, j]
            out.append(x)
        return torch.stack(out, dim=1)
