"""Continuous normalizing flows (Chen et al. 2018; FFJORD) and the planar NF baseline.

What this proves:

* Change of variables and its sign: for ``dz/dt = A z`` over ``[0, T]`` the layer returns
  ``z(T) = expm(T A) x`` and ``delta_logp = -T tr(A)`` (to solver tolerance) with the exact
  trace, so ``log p(x) = log N(z(T)) - delta_logp`` is the exact pushed-forward density; with
  Hutchinson's estimator (Gaussian and Rademacher) the mean over 4000 independent noise draws
  is ``-T tr(A)`` within 5 standard errors of the known estimator variance.
* The Hutchinson estimator itself is unbiased on a nonlinear field (both noises), within a CLT
  bound, and the noise is held fixed through a solve (the same ``eps`` gives the same numbers).
* Densities are normalised: ``exp(log p)`` of a random (non-trivial) ConcatSquash CNF and of a
  planar CNF integrates to 1 within 1e-2 on a grid; so does the planar NF's ``log_prob``.
* Sampling inverts density evaluation: base -> data -> base returns to the start within 1e-6
  at tight tolerance, and ``sample_and_log_prob`` agrees with ``log_prob`` at the samples.
* Regulariser states: for ``dz/dt = A z`` the kinetic energy equals ``0.5 x^T X x`` with
  ``X = int_0^T expm(t A)^T expm(t A) dt`` (from a Lyapunov equation), in both directions; the
  Jacobian Frobenius state is ``T ||A||_F^2`` (exact trace) and has that mean (Hutchinson).
* Gradients: ``"adjoint"`` and ``"checkpoint"`` agree with ``"backprop"`` on the CNF loss
  (NLL + both regularisers, Hutchinson, learnable ``T``), for the parameters, ``T`` and the
  data; ``nfe``/``backward_nfe`` are reported.
* Planar NF: the log-det formula matches ``log|det|`` of the autograd Jacobian, the
  constraint ``w^T u_hat > -1`` holds even for adversarial ``u``, and ``inverse`` inverts.
* Training lowers the held-out NLL on 8gaussians (a quick version here; the FFJORD-sized run is
  marked slow).
* Misuse raises ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from neuralode.data import toy2d
from neuralode.nn.cnf import (
    CNF,
    TRACES,
    CNFOutput,
    ConcatSquashLinear,
    ConcatSquashMLP,
    PlanarField,
    divergence_exact,
    divergence_hutchinson,
    draw_noise,
    standard_normal_log_prob,
)
from neuralode.nn.flows import PlanarFlow, PlanarLayer

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


A_MAT = torch.tensor([[0.3, -1.0], [0.6, -0.8]], dtype=F64)  # non-normal, tr = -0.5


class Linear(nn.Module):
    """``dz/dt = A z`` (``A`` a parameter, so every gradient strategy has one to find)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.a.T


def _grid(lim: float, n: int) -> tuple[torch.Tensor, float]:
    h = 2 * lim / n
    g = torch.arange(n, dtype=F64) * h - lim + h / 2
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), h * h


def _random_field(seed: int, gain: float = 3.0) -> ConcatSquashMLP:
    """A ConcatSquash field whose output layer is scaled up, so the flow is far from identity."""
    torch.manual_seed(seed)
    f = ConcatSquashMLP(2, (16, 16)).double()
    with torch.no_grad():
        _linear(f, -1).weight.mul_(gain)
    return f


def _linear(field: ConcatSquashMLP, i: int) -> nn.Linear:
    layer = field.layers[i]
    assert isinstance(layer, ConcatSquashLinear)
    return layer.layer


# ------------------------------------------------------------------ change of variables


def test_linear_field_exact_change_of_variables() -> None:
    T = 1.5
    cnf = CNF(Linear(A_MAT), T=T, rtol=1e-10, atol=1e-10)
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    logp, out = cnf.log_likelihood(x)
    expected_z = x @ torch.linalg.matrix_exp(T * A_MAT).T
    torch.testing.assert_close(out.z, expected_z, rtol=1e-8, atol=1e-8)
    delta = torch.full((6,), -T * float(A_MAT.trace()), dtype=F64)  # = +0.75: the flow contracts
    torch.testing.assert_close(out.delta_logp, delta, rtol=1e-8, atol=1e-8)
    # log p(x) = log N(expm(TA) x) + log|det expm(TA)| = log N(z(T)) + T tr(A).
    expected = standard_normal_log_prob(expected_z) + T * float(A_MAT.trace())
    torch.testing.assert_close(logp, expected, rtol=1e-8, atol=1e-8)
    assert out.nfe == int(out.solution.stats.nfe) > 0 and out.backward_nfe is None


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_linear_field_hutchinson_mean(noise: str) -> None:
    T, n = 1.5, 4000
    cnf = CNF(Linear(A_MAT), T=T, trace="hutchinson", noise=noise, rtol=1e-8, atol=1e-8)
    x = torch.ones(n, 2, dtype=F64)
    out = cnf(x, generator=torch.Generator().manual_seed(1))
    assert out.eps is not None
    # For a linear field the estimate is exact per draw: delta = -T eps^T A eps.
    per_draw = -T * torch.einsum("bi,ij,bj->b", out.eps, A_MAT, out.eps)
    torch.testing.assert_close(out.delta_logp, per_draw, rtol=1e-7, atol=1e-7)
    s = 0.5 * (A_MAT + A_MAT.T)
    off = s - torch.diag(torch.diag(s))
    var = 2 * (s**2).sum() if noise == "gaussian" else 2 * (off**2).sum()
    se = T * math.sqrt(float(var) / n)
    assert abs(float(out.delta_logp.detach().mean()) + T * float(A_MAT.trace())) < 5 * se


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_unbiased_on_nonlinear_field(noise: str) -> None:
    field = _random_field(0)
    n = 20000
    z = torch.tensor([[0.4, -0.7]], dtype=F64).expand(n, 2).clone().requires_grad_(True)
    t = torch.tensor(0.3, dtype=F64)
    f = field(t, z)
    exact, frob = divergence_exact(f, z, create_graph=False, frobenius=True)
    assert frob is not None
    eps = draw_noise(z, noise, torch.Generator().manual_seed(2))
    est, est_frob = divergence_hutchinson(f, z, eps, create_graph=False)
    for got, want in ((est, exact), (est_frob, frob)):
        se = float(got.std()) / math.sqrt(n)
        assert abs(float(got.mean()) - float(want[0])) < 5 * se + 1e-12
    assert torch.allclose(exact, exact[:1].expand(n))


def test_fixed_noise_gives_fixed_result() -> None:
    cnf = CNF(_random_field(1), trace="hutchinson", rtol=1e-7, atol=1e-7)
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    a = cnf(x, eps=eps).delta_logp
    b = cnf(x, eps=eps).delta_logp
    c = cnf(x, eps=-eps).delta_logp  # eps^T J eps is even in eps
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c)


# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("kind", ["concatsquash", "planar"])
def test_cnf_density_integrates_to_one(kind: str) -> None:
    if kind == "concatsquash":
        field: nn.Module = _random_field(3)
    else:
        torch.manual_seed(4)
        field = PlanarField(2, width=4, hidden=8).double()
    cnf = CNF(field, T=1.0, rtol=1e-6, atol=1e-8)
    pts, area = _grid(8.0, 80)
    with torch.no_grad():
        logp = cnf.log_prob(pts)
    mass = float(logp.exp().sum() * area)
    assert abs(mass - 1) < 1e-2, mass
    # Not vacuous: the flow's density differs from the base density by a lot somewhere.
    assert float((logp - standard_normal_log_prob(pts)).abs().max()) > 0.5


def test_planar_nf_density_integrates_to_one() -> None:
    flow = PlanarFlow(2, num_layers=6, seed=0).double()
    with torch.no_grad():
        for layer in flow.layers:
            assert isinstance(layer, PlanarLayer)
            layer.u.mul_(2)
            layer.w.mul_(1.5)
        pts, area = _grid(8.0, 160)
        logp = flow.log_prob(pts)
    assert abs(float(logp.exp().sum() * area) - 1) < 1e-2
    assert float((logp - standard_normal_log_prob(pts)).abs().max()) > 0.5


# ------------------------------------------------------------------ sampling


def test_sampling_inverts_density_evaluation() -> None:
    cnf = CNF(_random_field(5), train_T=True, T=0.8, rtol=1e-10, atol=1e-10)
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    x, logq = cnf.sample_and_log_prob(64, z=z)
    back = cnf(x)
    assert float((back.z - z).detach().abs().max()) < 1e-6
    # The same density either way: log q from sampling equals log p evaluated at the samples.
    torch.testing.assert_close(
        logq, standard_normal_log_prob(back.z) - back.delta_logp, rtol=1e-7, atol=1e-7
    )
    x2, _ = cnf.sample_and_log_prob(5, generator=torch.Generator().manual_seed(0))
    assert x2.shape == (5, 2) and x2.dtype == F64


def test_planar_nf_sample_and_inverse_agree() -> None:
    flow = PlanarFlow(2, num_layers=4, seed=1).double()
    z = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    x, logq = flow.sample_and_log_prob(32, z=z)
    torch.testing.assert_close(flow.inverse(x), z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flow.log_prob(x), logq, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ regularisers


def _kinetic_linear(a: torch.Tensor, x: torch.Tensor, T: float) -> torch.Tensor:
    """``int_0^T 0.5 |A expm(tA) x|^2 dt = 0.5 x^T X x`` with ``X = int_0^T expm(tA)^T Q
    expm(tA) dt``, ``Q = A^T A``, the solution of ``A^T X + X A = expm(TA)^T Q expm(TA) - Q``."""
    e = torch.linalg.matrix_exp(T * a)
    q = a.T @ a
    eye = torch.eye(2, dtype=F64)
    at = a.T.contiguous()  # (torch.kron rejects the transposed view)
    lyap = torch.kron(at, eye) + torch.kron(eye, at)  # row-major vec of A^T X + X A
    big_x = torch.linalg.solve(lyap, (e.T @ q @ e - q).reshape(-1)).reshape(2, 2)
    return 0.5 * torch.einsum("bi,ij,bj->b", x, big_x, x)


def test_regulariser_states_linear_field() -> None:
    T = 1.2
    cnf = CNF(Linear(A_MAT), T=T, kinetic_weight=1.0, jacobian_weight=1.0, rtol=1e-10, atol=1e-10)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = cnf(x)
    assert out.kinetic is not None and out.jacobian is not None
    kin = _kinetic_linear(A_MAT, x, T)
    torch.testing.assert_close(out.kinetic, kin, rtol=1e-7, atol=1e-9)
    frob = T * float((A_MAT**2).sum())
    torch.testing.assert_close(out.jacobian, torch.full((5,), frob, dtype=F64))
    # Reverse direction: the same (positive) integrals along the same path.
    back = cnf(out.z, reverse=True)
    assert back.kinetic is not None
    torch.testing.assert_close(back.kinetic, kin, rtol=1e-7, atol=1e-9)
    # penalty = weights * means.
    torch.testing.assert_close(cnf.penalty(out), kin.mean() + frob)
    # Not requested: not integrated.
    plain = CNF(Linear(A_MAT), T=T)(x)
    assert plain.kinetic is None and plain.jacobian is None
    assert len(plain.solution.ys) == 2


@pytest.mark.parametrize("trace", TRACES)
def test_regularisers_leave_the_step_size_control_alone(trace: str) -> None:
    # The regularisers' integrals do not feed back into the flow, so (as in FFJORD's and
    # RNODE's code) they stay out of the error norm: a regularised solve takes exactly the
    # steps of an unregularised one, so z and delta_logp are the same numbers and so is the
    # NFE; counting them in the norm made the two differ (7e-5 in z; 44 against 38 NFE with
    # Hutchinson's estimator) and so biased an NFE comparison of RNODE against FFJORD.
    field = _random_field(4)
    x = torch.from_numpy(toy2d.sample("8gaussians", 64, seed=1)).double()
    eps = torch.randn(64, 2, dtype=F64) if trace == "hutchinson" else None
    kw: dict[str, Any] = {"T": 1.0, "trace": trace, "rtol": 1e-6, "atol": 1e-6}
    plain = CNF(field, **kw)(x, eps=eps)
    reg = CNF(field, kinetic_weight=0.01, jacobian_weight=0.01, **kw)(x, eps=eps)
    assert reg.kinetic is not None and float(reg.kinetic.detach().mean()) > 0.1
    assert reg.nfe == plain.nfe
    torch.testing.assert_close(reg.z, plain.z, rtol=0, atol=0)
    torch.testing.assert_close(reg.delta_logp, plain.delta_logp, rtol=0, atol=0)
    # A norm of the user's own still wins: it sees every component, the integrals' too.
    sizes: list[int] = []

    def own_norm(err: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        sizes.append(err.shape[-1])
        return err.abs().amax(dim=dims)

    opts = {"norm": own_norm}
    CNF(field, kinetic_weight=0.01, solve_options=opts, **kw)(x, eps=eps)
    assert sizes and set(sizes) == {64 * 4}  # z (2), ell and the kinetic integral per sample


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_jacobian_regulariser_hutchinson_mean(noise: str) -> None:
    T, n = 1.2, 4000
    cnf = CNF(Linear(A_MAT), T=T, trace="hutchinson", noise=noise, jacobian_weight=1.0, rtol=1e-8)
    out = cnf(torch.ones(n, 2, dtype=F64), generator=torch.Generator().manual_seed(3))
    assert out.jacobian is not None
    jac = out.jacobian.detach()
    se = float(jac.std()) / math.sqrt(n)
    assert abs(float(jac.mean()) - T * float((A_MAT**2).sum())) < 5 * se


# ------------------------------------------------------------------ gradients


def _loss_grads(gradient: str) -> tuple[list[torch.Tensor], torch.Tensor, CNF, CNFOutput]:
    field = _random_field(6, gain=1.5)
    cnf = CNF(
        field,
        T=0.7,
        train_T=True,
        trace="hutchinson",
        kinetic_weight=0.1,
        jacobian_weight=0.05,
        rtol=1e-9,
        atol=1e-9,
        gradient=gradient,
    )
    x = torch.from_numpy(toy2d.sample("moons", 24, seed=0)).double().requires_grad_(True)
    eps = torch.randn(24, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    logp, out = cnf.log_likelihood(x, eps=eps)
    loss = -logp.mean() + cnf.penalty(out)
    params = list(cnf.parameters())
    grads = torch.autograd.grad(loss, [*params, x])
    return list(grads[:-1]), grads[-1], cnf, out


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_gradients_agree_with_backprop(gradient: str) -> None:
    ref, ref_x, cnf, _ = _loss_grads("backprop")
    got, got_x, _, out = _loss_grads(gradient)
    names = [n for n, _ in cnf.named_parameters()]
    assert "raw_T" in names
    for name, g, r in zip(names, got, ref):
        scale = float(r.abs().max()) + 1e-8
        assert float((g - r).abs().max()) < 1e-5 * scale + 1e-9, name
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-8)
    assert out.backward_nfe is not None and out.backward_nfe > 0


def test_gradients_match_finite_differences() -> None:
    """d(mean log p)/dT (through the solve's end time) and d(mean log p)/dW for weights of the
    first layer (whose effect on log p is mostly through the divergence, so this fails if the
    divergence is not differentiated: ``create_graph``) against central differences."""
    field = _random_field(8)
    x = torch.from_numpy(toy2d.sample("8gaussians", 16, seed=0)).double() / 2
    weight = _linear(field, 0).weight

    def mean_logp(T: float, grad: bool = False) -> tuple[float, float, torch.Tensor]:
        cnf = CNF(field, T=T, train_T=True, rtol=1e-11, atol=1e-11)
        v = cnf.log_prob(x).mean()
        if not grad:
            return float(v.detach()), 0.0, torch.zeros(())
        g_raw, g_w = torch.autograd.grad(v, (cnf.raw_T, weight))
        # d/dT = d/draw / (dT/draw) with dT/draw = sigmoid(raw) = 1 - exp(-T).
        return float(v.detach()), float(g_raw) / (1 - math.exp(-T)), g_w

    T, h = 0.9, 1e-4
    _, d_T, d_w = mean_logp(T, grad=True)
    fd = (mean_logp(T + h)[0] - mean_logp(T - h)[0]) / (2 * h)
    assert abs(d_T - fd) < 1e-6 * max(1.0, abs(fd))
    for idx in ((0, 0), (3, 1)):
        with torch.no_grad():
            weight[idx] += h
            up = mean_logp(T)[0]
            weight[idx] -= 2 * h
            down = mean_logp(T)[0]
            weight[idx] += h
        fd_w = (up - down) / (2 * h)
        assert abs(float(d_w[idx]) - fd_w) < 1e-6 * max(1.0, abs(fd_w)), idx


# ------------------------------------------------------------------ planar NF


def test_planar_log_det_matches_autograd_jacobian() -> None:
    flow = PlanarFlow(2, num_layers=3, seed=2).double()
    z = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    _, log_det = flow(z)
    for i in range(7):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.unsqueeze(0))[0][0], z[i])
        assert abs(float(torch.linalg.slogdet(jac)[1]) - float(log_det[i].detach())) < 1e-10


def test_planar_invertibility_constraint() -> None:
    layer = PlanarLayer(2).double()
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, 2.0]))
        layer.u.copy_(-0.6 * layer.w)  # w^T u = -3: not invertible without the constraint
        layer.b.fill_(0.3)
        c = float(layer.w @ layer.u_hat())
        assert c > -1 and c == pytest.approx(-1 + math.log1p(math.exp(-3.0)), abs=1e-12)
        # Strictly increasing along w, so inverse(forward(z)) == z.
        z = torch.randn(50, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
        y, log_det = layer(z)
        assert torch.isfinite(log_det).all()
        assert float((layer.inverse(y) - z).abs().max()) < 1e-10
        # The unconstrained map z + u tanh(w^T z + b) folds: its Jacobian determinant
        # 1 + (w^T u) tanh' changes sign, which the constraint rules out.
        a = torch.linspace(-3, 3, 101, dtype=F64)
        assert float((1 + (layer.w @ layer.u) * (1 - torch.tanh(a) ** 2)).min()) < 0
        assert float((1 + c * (1 - torch.tanh(a) ** 2)).min()) > 0


# ------------------------------------------------------------------ training


def _train(steps: int, batch: int, cnf: CNF, lr: float, seed: int = 0) -> tuple[float, float]:
    test = torch.from_numpy(toy2d.sample("8gaussians", 512, seed=10_000))
    with torch.no_grad():
        before = -float(cnf.log_prob(test).mean())
    opt = torch.optim.Adam(cnf.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = torch.from_numpy(toy2d.sample("8gaussians", batch, rng))
        logp, out = cnf.log_likelihood(x)
        loss = -logp.mean() + cnf.penalty(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = -float(cnf.log_prob(test).mean())
    return before, after


def test_short_training_lowers_test_nll() -> None:
    torch.manual_seed(0)
    cnf = CNF(
        ConcatSquashMLP(2, (32, 32)),
        train_T=True,
        method="rk4",
        step_size=0.25,
        kinetic_weight=0.01,
    )
    before, after = _train(40, 128, cnf, lr=1e-2)
    assert after < before - 1.0, (before, after)


@pytest.mark.slow
def test_ffjord_toy_training() -> None:
    """FFJORD's toy setting (64-64-64 ConcatSquash, tanh, dopri5 at 1e-5, learned T) for 200
    iterations of batch 256 by the adjoint: the test NLL falls well below a Gaussian fit's
    (8gaussians: ~4.6 nats for N(0, cov), ~2.84 for the true density)."""
    torch.manual_seed(0)
    cnf = CNF(ConcatSquashMLP(2), train_T=True, gradient="adjoint", rtol=1e-5, atol=1e-5)
    before, after = _train(200, 256, cnf, lr=1e-3)
    assert after < 4.0, (before, after)


# ------------------------------------------------------------------ errors


def test_errors() -> None:
    f = _random_field(0)
    with pytest.raises(ValueError, match="trace must be one of"):
        CNF(f, trace="brute")
    with pytest.raises(ValueError, match="noise must be one of"):
        CNF(f, noise="uniform")
    with pytest.raises(ValueError, match="T must be a positive"):
        CNF(f, T=0.0)
    with pytest.raises(ValueError, match="kinetic_weight"):
        CNF(f, kinetic_weight=-1.0)
    with pytest.raises(ValueError, match="gradient must be one of"):
        CNF(f, gradient="reverse")
    with pytest.raises(ValueError, match="dopri5"):
        CNF(f, method="rk45")
    with pytest.raises(ValueError, match="rtol must be >= 0"):
        CNF(f, rtol=-1.0)
    with pytest.raises(ValueError, match="set by CNF itself"):
        CNF(f, solve_options={"rtol": 1e-3})
    with pytest.raises(TypeError, match="field must be callable"):
        not_callable: Any = 3
        CNF(not_callable)
    with pytest.raises(ValueError, match="activation must be one of"):
        ConcatSquashMLP(2, activation="relu6")
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="eps applies to trace='hutchinson'"):
        CNF(f)(x, eps=x)
    with pytest.raises(ValueError, match="eps has shape"):
        CNF(f, trace="hutchinson")(x, eps=torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[batch"):
        CNF(f)(torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="pass shape"):
        CNF(lambda t, z: z).sample_and_log_prob(3)
    with pytest.raises(ValueError, match="num_layers"):
        PlanarFlow(2, num_layers=0)


def test_exact_view_and_trajectory_belong_to_the_model() -> None:
    torch.manual_seed(0)
    cnf = CNF(ConcatSquashMLP(2, (8,)), T=0.7, train_T=True, trace="hutchinson",
              kinetic_weight=0.1, method="dopri5", rtol=1e-8, atol=1e-8).double()  # fmt: skip
    view = cnf.exact_view()
    assert view.trace == "exact" and view.kinetic_weight == 0.0
    assert view.field is cnf.field and float(view.T) == pytest.approx(float(cnf.T.detach()))
    assert view.solver.gradient == "backprop" and view.solver.rtol == 1e-8
    assert not list(view.parameters()) or all(
        any(p is q for q in cnf.parameters()) for p in view.parameters()
    )
    z = torch.randn(5, 2, dtype=F64)
    with torch.no_grad():
        states, labels = cnf.trajectory(z, 4)
        x, _ = cnf.sample_and_log_prob(5, z=z)
    assert len(states) == 4 and labels[0] == "t = 0.7" and labels[-1] == "t = 0"
    torch.testing.assert_close(states[0], z)
    torch.testing.assert_close(states[-1], x, rtol=1e-6, atol=1e-6)  # base -> data
    with pytest.raises(ValueError, match="frames must be at least 2"):
        cnf.trajectory(z, 1)

    flow = PlanarFlow(2, num_layers=4, seed=0).double()
    with torch.no_grad():
        states, labels = flow.trajectory(z, 3)
        x, _ = flow(z)
    assert labels == ["after 0 layers", "after 2 layers", "after 4 layers"]
    torch.testing.assert_close(states[0], z)
    torch.testing.assert_close(states[-1], x)
