"""The MNIST models of Chen et al. 2018: shapes, parameter counts, ODE block, gradients, NFE."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import neuralode
from neuralode.nn import odenet as on

pytestmark = pytest.mark.usefixtures("one_thread")


# Exact counts with the reference code's "conv" downsampling, and the paper's Table 1.
PARAMS = {"odenet": 208_266, "resnet": 576_778, "rknet": 208_266, "mlp": 238_510}
PARAMS_RES = {"odenet": 232_970, "resnet": 601_482, "rknet": 232_970}
PAPER = {"odenet": 0.22e6, "resnet": 0.60e6, "rknet": 0.22e6, "mlp": 0.24e6}


def _images(b: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", list(on.MODELS))
def test_output_shape_and_parameter_count(name: str) -> None:
    torch.manual_seed(0)
    model = on.build_model(name)
    assert on.count_parameters(model) == PARAMS[name]
    assert abs(PARAMS[name] - PAPER[name]) / PAPER[name] < 0.07
    with torch.no_grad():
        out = model(_images(2))
    assert out.shape == (2, 10) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", ["odenet", "resnet", "rknet"])
def test_residual_downsampling(name: str) -> None:
    model = on.build_model(name, downsampling="res", num_classes=7)
    n_extra = 7 * 64 + 7 - (10 * 64 + 10)
    assert on.count_parameters(model) == PARAMS_RES[name] + n_extra
    with torch.no_grad():
        assert model(_images(2)).shape == (2, 7)


def test_feature_shapes() -> None:
    x = _images(3)
    assert on.downsampling_layers("conv")(x).shape == (3, 64, 6, 6)
    assert on.downsampling_layers("res")(x).shape == (3, 64, 7, 7)
    assert on.head()(torch.randn(3, 64, 6, 6)).shape == (3, 10)


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'.*odenet"):
        on.build_model("vgg")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tol'\] for model 'resnet'"):
        on.build_model("resnet", tol=1e-3)
    with pytest.raises(ValueError, match="downsampling"):
        on.build_model("mlp") and on.build_model("resnet", downsampling="pool")
    with pytest.raises(ValueError, match="steps"):
        on.build_model("rknet", steps=0)
    with pytest.raises(ValueError, match="t_end"):
        on.ODEBlock(on.ODEFunc(4), t_end=0.0)


def test_concat_conv_scalar_and_per_sample_time() -> None:
    torch.manual_seed(0)
    conv = on.ConcatConv2d(3, 5)
    x = torch.randn(4, 3, 6, 6)
    t = torch.tensor(0.7)
    a = conv(t, x)
    assert a.shape == (4, 5, 6, 6)
    torch.testing.assert_close(conv(t.expand(4).clone(), x), a)
    torch.testing.assert_close(conv(0.7, x), a)
    ts = torch.tensor([0.0, 0.5, 1.0, 2.0])
    b = conv(ts, x)
    for k in range(4):
        torch.testing.assert_close(b[k : k + 1], conv(ts[k], x[k : k + 1]))
    # the time channel is the first input channel
    direct = conv.layer(torch.cat([torch.full((4, 1, 6, 6), 0.7), x], 1))
    torch.testing.assert_close(a, direct)
    with pytest.raises(ValueError, match=r"0-dim or \[batch\] = \[4\]"):
        conv(torch.zeros(3), x)


def test_odefunc_counts_calls() -> None:
    f = on.ODEFunc(8)
    h = torch.randn(2, 8, 5, 5)
    assert f(torch.tensor(0.0), h).shape == h.shape
    f(torch.tensor(0.1), h)
    assert f.nfe == 2
    model = nn.Sequential(f)
    on.reset_nfe(model)
    assert f.nfe == 0


def test_odeblock_matches_direct_odeint() -> None:
    torch.manual_seed(1)
    func = on.ODEFunc(8)
    block = on.ODEBlock(func, t_end=0.8, rtol=1e-5, atol=1e-6, gradient="backprop")
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        out = block(x)
        ref = neuralode.odeint(func, x, torch.tensor([0.0, 0.8]), rtol=1e-5, atol=1e-6)[-1]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert block.last_solution is not None
    assert block.nfe_forward == int(block.last_solution.stats.nfe)


class _Smooth(nn.Module):
    """A smooth time-dependent field (no ReLU kinks, no normalisation) for tight comparisons."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.conv = on.ConcatConv2d(dim, dim)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        scale = 1 + (t.reshape(-1, 1, 1, 1) if t.ndim else t)
        return torch.tanh(self.conv(t, h)) * scale


def _separate(func: nn.Module, x: torch.Tensor, tol: float) -> torch.Tensor:
    block = on.ODEBlock(func, rtol=tol, atol=tol, gradient="backprop")
    return torch.cat([block(x[k : k + 1]) for k in range(x.shape[0])])


@pytest.mark.parametrize("field", ["smooth", "odefunc"])
def test_batched_block_equals_per_sample_solves(field: str) -> None:
    """batched=True (each sample its own steps, t of shape [B] in the field) is the same as
    solving each sample alone."""
    torch.manual_seed(2)
    dim = 2 if field == "smooth" else 4
    func = (_Smooth(dim) if field == "smooth" else on.ODEFunc(dim)).double()
    scales = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64).reshape(3, 1, 1, 1)
    x = torch.randn(3, dim, 3, 3, dtype=torch.float64) * scales
    tol = 1e-7 if field == "smooth" else 1e-5
    block = on.ODEBlock(func, rtol=tol, atol=tol, gradient="backprop", batched=True)
    with torch.no_grad():
        out = block(x)
        ref = _separate(func, x, tol)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert block.last_solution is not None
    nfe = block.last_solution.stats.nfe
    assert nfe.shape == (3,) and block.nfe_forward == int(nfe.max())


def _grads(
    func: nn.Module, gradient: str, x0: torch.Tensor, w: torch.Tensor, tol: float, t_end: float
) -> list[torch.Tensor]:
    block = on.ODEBlock(func, t_end, rtol=tol, atol=tol, gradient=gradient)
    func.zero_grad()
    x = x0.clone().requires_grad_(True)
    (block(x) * w).sum().backward()
    grads = [x.grad] + [p.grad for p in func.parameters()]
    assert all(g is not None for g in grads)
    return [g.clone() for g in grads if g is not None]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_adjoint_and_backprop_gradients_agree_float64() -> None:
    torch.manual_seed(0)
    func = _Smooth().double()
    x0 = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    bp = _grads(func, "backprop", x0, w, 1e-10, 1.0)
    adj = _grads(func, "adjoint", x0, w, 1e-10, 1.0)
    for a, b in zip(bp, adj):
        assert _rel(a, b) < 1e-7


def test_adjoint_gradient_of_the_real_odefunc() -> None:
    """GN-ReLU fields have kinks: the adjoint's backward re-integration converges slowly with
    the tolerance (relative error 0.15 at 1e-4, 0.02 at 1e-6, 0.002 at 1e-8 here; torchdiffeq's
    odeint_adjoint behaves the same).  The conv biases are left out: GroupNorm follows them, so
    their exact gradient is zero."""
    torch.manual_seed(1)
    func = on.ODEFunc(2).double()
    x0 = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    w = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    bp = _grads(func, "backprop", x0, w, 1e-6, 0.5)
    adj = _grads(func, "adjoint", x0, w, 1e-6, 0.5)
    names = ["x"] + [n for n, _ in func.named_parameters()]
    for name, a, b in zip(names, bp, adj):
        if name.endswith("layer.bias"):  # exactly zero up to rounding
            assert float(a.abs().max()) < 1e-10
        else:
            assert _rel(a, b) < 0.03, name


@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "checkpoint"])
def test_nfe_reporting(gradient: str) -> None:
    torch.manual_seed(4)
    model = on.build_model("odenet", dim=8, gradient=gradient)
    block = model.features
    assert isinstance(block, on.ODEBlock) and isinstance(block.odefunc, on.ODEFunc)
    func = block.odefunc
    assert on.model_nfe(model) == {"forward": 0, "backward": None}
    out = model(_images(2))
    calls = func.nfe
    info = on.model_nfe(model)
    assert info["forward"] == calls > 0 and info["backward"] is None
    out.sum().backward()
    back = on.model_nfe(model)["backward"]
    assert back is not None and back > 0
    if gradient == "backprop":
        assert back == calls  # convention: one VJP per forward evaluation
    else:
        assert back == func.nfe - calls  # the backward pass's own calls
    copy.deepcopy(model)  # the kept solution does not block copying a model mid-training
    model(_images(2))
    assert on.model_nfe(model)["backward"] is None  # a new forward resets the backward count


def test_rknet_and_non_ode_models_nfe() -> None:
    model = on.build_model("rknet", dim=8, steps=3)
    model(_images(2)).sum().backward()
    assert on.model_nfe(model) == {"forward": 12, "backward": 12}
    assert on.model_nfe(on.build_model("resnet")) == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("name", ["odenet", "mlp"])
def test_sgd_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(5)
    model = on.build_model(name, dim=16) if name == "odenet" else on.build_model(name)
    x = _images(8, seed=1)
    y = torch.arange(8) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses


def test_every_model_family_keeps_its_solver_settings_in_one_type() -> None:
    """ODEBlock, CNF, LatentODE and ODERNNEncoder take the same solver keywords (one name for
    the extra ones, ``solve_options``) and keep them as ``model.solver``, checked once."""
    from neuralode.nn import CNF, ConcatSquashMLP, LatentODE, ODERNNEncoder, SolveSettings

    made = {
        "block": on.ODEBlock(on.ODEFunc(4), method="rk4", step_size=0.25, gradient="backprop",
                             solve_options={"max_num_steps": 99}),
        "cnf": CNF(ConcatSquashMLP(2, (8,)), method="rk4", step_size=0.25,
                   solve_options={"max_num_steps": 99}),
        "latent": LatentODE(2, 4, method="rk4", step_size=0.25,
                            solve_options={"max_num_steps": 99}),
        "encoder": ODERNNEncoder(2, 4, 8, method="rk4", step_size=0.25,
                                 solve_options={"max_num_steps": 99}),
    }  # fmt: skip
    for name, model in made.items():
        settings = model.solver
        assert isinstance(settings, SolveSettings), name
        assert settings.kwargs() == {
            "method": "rk4", "rtol": settings.rtol, "atol": settings.atol, "step_size": 0.25,
            "gradient": "backprop", "max_num_steps": 99,
        }, name  # fmt: skip
    for bad, says in (
        ({"method": "rk45"}, "dopri5"),
        ({"gradient": "reverse"}, "gradient must be one of"),
        ({"solve_options": {"rtol": 1e-3}}, "have their own arguments"),
    ):
        with pytest.raises(ValueError, match=says):
            on.ODEBlock(on.ODEFunc(4), **bad)
    with pytest.raises(TypeError):
        on.ODEBlock(on.ODEFunc(4), max_num_steps=99)  # one spelling: solve_options={...}
    # batched is the block's own argument (it was accepted here, then failed in forward with
    # "solve() got multiple values for keyword argument 'batched'"); the latent models decide
    # it from their data, and the ODE-RNN encoder sets its own adjoint_params.
    with pytest.raises(ValueError, match=r"\['batched'\] have their own arguments"):
        on.ODEBlock(on.ODEFunc(4), solve_options={"batched": True})
    with pytest.raises(ValueError, match="batched"):
        ODERNNEncoder(2, 3, 8, solve_options={"batched": False})
    with pytest.raises(ValueError, match="adjoint_params'\\] is set by ODERNNEncoder"):
        ODERNNEncoder(2, 3, 8, gradient="adjoint", solve_options={"adjoint_params": ()})
