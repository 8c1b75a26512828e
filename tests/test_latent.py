"""Latent ODE library (``neuralode.nn.latent``).

* ELBO terms against hand-computed values: the analytic KL, the Gaussian log-likelihood with
  masked entries left out, and a whole ELBO with a stub encoder, a zero latent field and an
  identity decoder, where ``z(t) = z0 = mean + sigma * eps`` is known exactly.
* Per-sample time grids: the batched latent solve equals solving every series alone (float64,
  to 1e-9), including batches where some series start at ``t0`` and some later.
* The ODE-RNN encoder with zero-length gaps equals the GRU encoder with the same weights,
  exactly; with real gaps it differs.
* Masks: values at masked-out positions change neither the encoders' outputs nor the loss; a
  fully missing time point is the same as no time point (GRU without time gaps).
* A short training on a few spirals lowers the loss; ``predict`` shapes; the RNN baselines;
  the adjoint gradient agrees with backprop; bad input raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import neuralode
from neuralode.data.timeseries import SpiralConfig, make_spirals
from neuralode.nn.latent import (
    ELBO,
    GRUEncoder,
    LatentDynamics,
    LatentODE,
    ODERNNEncoder,
    Prediction,
    RNNBaseline,
    gaussian_log_likelihood,
    kl_annealing,
    kl_standard_normal,
)

F64 = torch.float64


def _series(b: int = 5, n: int = 7, d: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random values ``[b, n, d]`` and per-series strictly increasing times ``[b, n]``."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(b, n, d, generator=g, dtype=F64)
    gaps = 0.05 + 0.3 * torch.rand(b, n, generator=g, dtype=F64)
    times = torch.cumsum(gaps, dim=1) - gaps[:, :1] + 0.2 * torch.rand(b, 1, generator=g)
    return values, times


# --------------------------------------------------------------------------------------------
# ELBO terms


def test_kl_hand_computed() -> None:
    mu, sigma = 0.5, 0.5
    logvar = math.log(sigma**2)
    expected = 0.5 * (mu**2 + sigma**2 - 1 - math.log(sigma**2))
    got = kl_standard_normal(torch.tensor([[mu]], dtype=F64), torch.tensor([[logvar]], dtype=F64))
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(expected, rel=1e-14)
    # Summed over the latent dimensions; zero at the prior.
    two = kl_standard_normal(
        torch.tensor([mu, 0.0], dtype=F64), torch.tensor([logvar, 0.0], dtype=F64)
    )
    assert float(two) == pytest.approx(expected, rel=1e-14)


def test_gaussian_log_likelihood_hand_computed_with_mask() -> None:
    x = torch.tensor([[[1.0], [2.0], [float("nan")]]], dtype=F64)  # [B=1, T=3, D=1]
    mean = torch.tensor([[[0.5], [2.5], [0.0]]], dtype=F64)
    mask = torch.tensor([[[1.0], [1.0], [0.0]]], dtype=F64)
    std = 0.3

    def term(xi: float, mi: float) -> float:
        return -0.5 * (math.log(2 * math.pi) + 2 * math.log(std) + (xi - mi) ** 2 / std**2)

    expected = term(1.0, 0.5) + term(2.0, 2.5)  # the NaN entry is masked out
    got = gaussian_log_likelihood(x, mean, std, mask)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(expected, rel=1e-14)
    # [K, B, T, D] means against [B, T, D] data broadcast to [K, B].
    assert gaussian_log_likelihood(x, mean.expand(4, 1, 3, 1), std, mask).shape == (4, 1)


class _FixedEncoder(nn.Module):
    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        super().__init__()
        self.mean, self.logvar = mean, logvar

    def forward(self, values: Tensor, times: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.mean, self.logvar


class _Zero(nn.Module):
    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return torch.zeros_like(z)


def test_elbo_hand_computed_on_a_tiny_model() -> None:
    # 1-D latent, 1-D data, z(t) = z0 (zero field) and x_hat = z (identity decoder).
    mu, sigma, obs_std, kl_weight = 0.7, 0.2, 0.5, 0.3
    enc = _FixedEncoder(
        torch.tensor([[mu]], dtype=F64), torch.tensor([[2 * math.log(sigma)]], dtype=F64)
    )
    model = LatentODE(1, 1, encoder=enc, dynamics=_Zero(), obs_std=obs_std).double()
    model.decoder = nn.Identity()  # type: ignore[assignment]
    x = torch.tensor([[[1.0], [0.2], [5.0]]], dtype=F64)
    t = torch.tensor([[0.0, 0.5, 1.5]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    out = model(x, t, mask, kl_weight=kl_weight, generator=torch.Generator().manual_seed(3))
    eps = float(torch.randn((1, 1, 1), generator=torch.Generator().manual_seed(3), dtype=F64))
    z0 = mu + sigma * eps
    loglik = sum(
        -0.5 * (math.log(2 * math.pi) + 2 * math.log(obs_std) + (xi - z0) ** 2 / obs_std**2)
        for xi in (1.0, 0.2)
    )
    kl = 0.5 * (mu**2 + sigma**2 - 1 - math.log(sigma**2))
    assert isinstance(out, ELBO)
    assert float(out.log_likelihood[0]) == pytest.approx(loglik, rel=1e-12)
    assert float(out.kl[0]) == pytest.approx(kl, rel=1e-12)
    assert float(out.elbo[0]) == pytest.approx(loglik - kl, rel=1e-12)
    assert float(out.loss) == pytest.approx(kl_weight * kl - loglik, rel=1e-12)
    assert float(out.mse[0]) == pytest.approx(((1.0 - z0) ** 2 + (0.2 - z0) ** 2) / 2, rel=1e-12)
    torch.testing.assert_close(out.z, torch.full((1, 1, 3, 1), z0, dtype=F64))


def test_elbo_shapes_and_consistency() -> None:
    values, times = _series(b=4, n=6)
    model = LatentODE(2, 3, rtol=1e-6, atol=1e-6).double()
    out = model(values, times, n_samples=3, kl_weight=0.5)
    assert out.mean.shape == (3, 4, 6, 2) and out.z.shape == (3, 4, 6, 3)
    assert out.elbo.shape == out.kl.shape == out.log_likelihood.shape == (4,)
    assert out.qz0_mean.shape == out.qz0_logvar.shape == (4, 3) and out.nfe.shape == (3, 4)
    # z0 lives at each series' first observation time.
    mean, logvar = model.encode(values, times)
    torch.testing.assert_close(out.qz0_mean, mean)
    loglik = gaussian_log_likelihood(values, model.decode(out.z), model.obs_std).mean(0)
    torch.testing.assert_close(out.log_likelihood, loglik)
    torch.testing.assert_close(out.loss, (0.5 * out.kl - out.log_likelihood).mean())
    assert kl_annealing(5) == 0.0 and kl_annealing(10) == 0.0
    assert kl_annealing(110) == pytest.approx(1 - 0.99**100)


def test_elbo_on_target_points() -> None:
    # Scoring the observations as explicit targets gives the default ELBO; scoring later points
    # decodes there (Rubanova et al.'s extrapolation objective).
    values, times = _series(b=4, n=6)
    model = LatentODE(2, 3, rtol=1e-8, atol=1e-8).double()
    gen = torch.Generator().manual_seed(0)
    default = model(values, times, generator=gen)
    gen = torch.Generator().manual_seed(0)
    same = model(values, times, generator=gen, target_values=values, target_times=times)
    torch.testing.assert_close(same.loss, default.loss)
    later = times[:, -1:] + torch.tensor([0.5, 1.0], dtype=times.dtype)
    out = model(values, times, target_values=values[:, :2], target_times=later)
    assert out.mean.shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match="target_values needs target_times"):
        model(values, times, target_values=values)


# --------------------------------------------------------------------------------------------
# Per-sample time grids


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_per_sample_grids_equal_solving_each_series_alone(method: str) -> None:
    torch.manual_seed(0)
    step = 0.05 if method == "rk4" else None
    model = LatentODE(2, 4, method=method, rtol=1e-10, atol=1e-10, step_size=step).double()
    values, times = _series(b=4, n=6)
    z0 = torch.randn(2, 4, 4, dtype=F64)
    # Rows 0 and 2 start at t0; rows 1 and 3 start later (t0 is prepended for those).
    t0 = times[:, 0] - torch.tensor([0.0, 0.3, 0.0, 0.1], dtype=F64)
    z, nfe = model.latent_trajectory(z0, t0, times)
    assert z.shape == (2, 4, 6, 4) and nfe.shape == (2, 4)
    for k in range(2):
        for b in range(4):
            grid = times[b] if b in (0, 2) else torch.cat([t0[b : b + 1], times[b]])
            alone = neuralode.solve(
                model.dynamics,
                z0[k, b],
                grid,
                method=method,
                rtol=1e-10,
                atol=1e-10,
                step_size=step,
            ).ys
            alone = alone if b in (0, 2) else alone[1:]
            torch.testing.assert_close(z[k, b], alone, rtol=0, atol=1e-9)
    # All rows starting at their t0: ys[:, 0] is z0 itself.
    z_all, _ = model.latent_trajectory(z0[0], times[:, 0], times)
    torch.testing.assert_close(z_all[:, 0], z0[0], rtol=0, atol=0)


def test_latent_trajectory_single_time_and_bad_times() -> None:
    model = LatentODE(2, 4).double()
    z0 = torch.randn(3, 4, dtype=F64)
    t0 = torch.tensor([0.0, 0.0, 0.5], dtype=F64)
    z, _ = model.latent_trajectory(z0, t0, torch.tensor([[0.0], [0.4], [0.5]], dtype=F64))
    assert z.shape == (3, 1, 4)
    torch.testing.assert_close(z[[0, 2], 0], z0[[0, 2]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="precede"):
        model.latent_trajectory(z0, t0, torch.tensor([[0.0], [0.4], [0.4]], dtype=F64))
    with pytest.raises(ValueError, match="strictly increasing"):
        model.latent_trajectory(z0, t0, torch.tensor([0.6, 0.6], dtype=F64))


# --------------------------------------------------------------------------------------------
# Encoders


def _twins(**kw: Any) -> tuple[GRUEncoder, ODERNNEncoder]:
    """A GRU encoder and an ODE-RNN encoder sharing the GRU cell's and the head's weights."""
    kw.setdefault("time_gaps", True)  # the classes' defaults differ; the twins must agree
    torch.manual_seed(1)
    gru = GRUEncoder(2, 3, 8, **kw).double()
    ode = ODERNNEncoder(2, 3, 8, **kw).double()
    missing, unexpected = ode.load_state_dict(gru.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("ode_func.") for k in missing)
    return gru, ode


@pytest.mark.parametrize("time_gaps", [True, False])
@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_odernn_with_zero_gaps_equals_the_gru(time_gaps: bool, method: str) -> None:
    gru, ode = _twins(time_gaps=time_gaps)
    ode.method = method
    values, times = _series(b=4, n=6)
    same = times[:, :1].expand(-1, 6)  # every gap zero
    for a, b in zip(gru(values, same), ode(values, same)):
        assert torch.equal(a, b)
    # With real gaps the ODE moves the hidden state and the outputs differ.
    assert not torch.allclose(gru(values, times)[0], ode(values, times)[0])


def test_odernn_runs_each_gap_per_series() -> None:
    # The encoder of a batch equals the encoder of each series alone (own gaps per row).
    _, ode = _twins()
    ode.method, ode.rtol, ode.atol = "dopri5", 1e-10, 1e-10
    values, times = _series(b=3, n=5)
    mean, logvar = ode(values, times)
    for b in range(3):
        m1, l1 = ode(values[b : b + 1], times[b : b + 1])
        torch.testing.assert_close(m1[0], mean[b], rtol=0, atol=1e-9)
        torch.testing.assert_close(l1[0], logvar[b], rtol=0, atol=1e-9)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("kind", ["gru", "odernn"])
def test_masked_values_do_not_affect_the_encoders(use_mask: bool, kind: str) -> None:
    gru, ode = _twins(use_mask=use_mask)
    enc = gru if kind == "gru" else ode
    values, times = _series(b=4, n=6)
    mask = torch.rand(4, 6, 2, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[:, 2] = False  # one time point fully missing
    other = torch.where(mask, values, torch.full_like(values, float("nan")))
    wild = torch.where(mask, values, 1e3 * torch.randn_like(values))
    ref = enc(values, times, mask)
    for v in (other, wild):
        for a, b in zip(ref, enc(v, times, mask)):
            assert torch.equal(a, b)
    assert not torch.equal(ref[0], enc(values, times)[0])  # the mask matters


def test_a_fully_missing_time_point_is_like_no_time_point() -> None:
    torch.manual_seed(0)
    enc = GRUEncoder(2, 3, 8, time_gaps=False).double()
    values, times = _series(b=3, n=6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 3] = False
    keep = [0, 1, 2, 4, 5]
    for a, b in zip(enc(values, times, mask), enc(values[:, keep], times[:, keep])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("encoder", ["gru", "odernn"])
def test_masked_values_do_not_change_the_loss(encoder: str) -> None:
    torch.manual_seed(0)
    enc = (GRUEncoder if encoder == "gru" else ODERNNEncoder)(2, 4, 10, use_mask=True)
    model = LatentODE(2, 4, encoder=enc, rtol=1e-6, atol=1e-6).double()
    values, times = _series(b=4, n=6)
    mask = torch.rand(4, 6, 2, generator=torch.Generator().manual_seed(4)) > 0.3
    changed = torch.where(mask, values, torch.full_like(values, float("nan")))
    a = model(values, times, mask, n_samples=2, generator=torch.Generator().manual_seed(0))
    b = model(changed, times, mask, n_samples=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.elbo, b.elbo)
    assert torch.isfinite(b.loss)
    a.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


# --------------------------------------------------------------------------------------------
# Prediction, training, baselines, gradients


def test_predict_shapes_and_extrapolation() -> None:
    torch.manual_seed(0)
    model = LatentODE(2, 4).double()
    values, times = _series(b=3, n=5)
    t_pred = times[:, -1:] + torch.linspace(0.1, 1.0, 8, dtype=F64)  # [B, 8], all later
    pred = model.predict(values, times, t_pred, n_samples=4)
    assert isinstance(pred, Prediction)
    assert pred.samples.shape == (4, 3, 8, 2) and pred.latent.shape == (4, 3, 8, 4)
    assert pred.mean.shape == pred.std.shape == (3, 8, 2) and bool((pred.std > 0).all())
    det = model.predict(values, times, torch.linspace(2.0, 3.0, 5, dtype=F64), use_mean=True)
    assert det.samples.shape == (1, 3, 5, 2) and bool((det.std == 0).all())
    # Predicting at the observed times plus later ones reproduces the reconstruction there.
    both = torch.cat([times, t_pred], dim=1)
    full = model.predict(values, times, both, use_mean=True)
    mean, _ = model.encode(values, times)
    z_obs, _ = model.latent_trajectory(mean, times[:, 0], times)
    torch.testing.assert_close(full.latent[0, :, :5], z_obs, rtol=1e-6, atol=1e-6)


def test_short_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    cfg = SpiralConfig(n_spirals=16, n_total=500, noise_std=0.1)
    obs = make_spirals(cfg, seed=0).observe(20, seed=0)
    model = LatentODE(2, rtol=1e-3, atol=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        out = model(obs.values, obs.times, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first, (first, last)  # measured: 2358 -> 325


def test_adjoint_gradient_agrees_with_backprop() -> None:
    values, times = _series(b=3, n=4)
    grads = {}
    for gradient in ("backprop", "adjoint"):
        torch.manual_seed(0)
        model = LatentODE(2, 3, rtol=1e-9, atol=1e-9, gradient=gradient).double()
        out = model(values, times, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        grads[gradient] = torch.cat(
            [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
        )
    # Both are O(tol) from the true gradient (backprop differentiates the discrete solution);
    # measured: 2e-7 relative at these tolerances.
    err = (grads["adjoint"] - grads["backprop"]).norm() / grads["backprop"].norm()
    assert float(err) < 1e-5


@pytest.mark.parametrize("use_time_gaps", [False, True])
def test_rnn_baseline(use_time_gaps: bool) -> None:
    torch.manual_seed(0)
    rnn = RNNBaseline(2, 16, use_time_gaps=use_time_gaps).double()
    values, times = _series(b=3, n=6)
    assert rnn(values, times).shape == (3, 5, 2)
    t_pred = times[:, -1:] + torch.linspace(0.1, 1.0, 7, dtype=F64)
    out = rnn.predict(values, times, t_pred)
    assert out.shape == (3, 7, 2)
    # The first rolled-out point is the one-step prediction the training loss uses.
    ext = torch.cat([values, out[:, :1]], dim=1)
    ext_t = torch.cat([times, t_pred[:, :1]], dim=1)
    torch.testing.assert_close(rnn(ext, ext_t)[:, -1], out[:, 0])
    # Time gaps matter only for the variant that sees them.
    stretched = rnn.predict(values, 2 * times, 2 * t_pred)
    assert torch.allclose(stretched, out) is not use_time_gaps
    # Masked targets do not count in the loss.
    mask = torch.ones(3, 6, 2, dtype=torch.bool)
    mask[:, 4] = False
    changed = torch.where(mask, values, torch.zeros_like(values) + 100.0)
    rnn_masked = RNNBaseline(2, 16, use_time_gaps=use_time_gaps, use_mask=True).double()
    a, b = rnn_masked.loss(values, times, mask), rnn_masked.loss(changed, times, mask)
    assert torch.equal(a, b)


def test_bad_input_raises() -> None:
    model = LatentODE(2)
    values = torch.zeros(3, 4, 2)
    with pytest.raises(ValueError, match="values"):
        model(torch.zeros(3, 4), torch.arange(4.0))
    with pytest.raises(ValueError, match="times"):
        model(values, torch.arange(5.0))
    with pytest.raises(ValueError, match="mask"):
        model(values, torch.arange(4.0), torch.ones(3, 4, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        model(values, torch.tensor([0.0, 1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        GRUEncoder(2)(values, torch.tensor([0.0, 2.0, 1.0, 3.0]))
    for bad in (0.0, float("nan"), float("inf")):  # NaN was accepted, and the loss was NaN
        with pytest.raises(ValueError, match="obs_std must be a finite positive number"):
            LatentODE(2, obs_std=bad)
    with pytest.raises(ValueError, match="activation"):
        LatentDynamics(activation="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_samples"):
        LatentODE.sample_z0(torch.zeros(2, 3), torch.zeros(2, 3), 0)
