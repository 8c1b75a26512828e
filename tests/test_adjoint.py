"""The adjoint gradient strategy (Chen et al. 2018, Algorithm 1) gives the derivatives of the flow.

What this proves:

* ``torch.autograd.gradcheck`` (float64) passes through ``odeint_adjoint`` with respect to the
  initial state, the output times and the parameters (given as ``adjoint_params`` of a plain
  function, and through an ``nn.Module`` wrapper that sets its weights with
  ``torch.func.functional_call``), for tuple states and decreasing time too.  The adjoint is the
  gradient of the *exact* flow, not of the discrete solver, so these checks run at
  ``rtol = atol = 1e-12`` forward and backward.
* On a tanh MLP field (3 -> 16 -> 3, loss on every output time) the adjoint gradients of ``y0``,
  ``t`` and the parameters approach a reference (backprop through ``dopri8`` at 1e-13, itself
  checked against central differences) as ``rtol`` tightens: the error falls at 1e-4, 1e-6, 1e-8
  and stays within a bound proportional to ``rtol`` (the numbers are printed; ``-s`` shows them).
* Every method of :data:`neuralode.METHODS` (fixed-step ones at a small step) agrees with
  backprop; per-sample grids ``t [batch, T]`` give each row the gradient of solving it alone.
* The forward pass keeps no graph: the tensors it saves for backward do not grow with the number
  of steps (backprop's do).
* The seminorm of Kidger et al. 2021 (the default; ``adjoint_options={"norm": "rms"}`` is the
  full norm) needs fewer backward evaluations than the full norm on a neural ODE with many
  parameters and gives the same gradients within tolerance.
* ``Solution.backward_stats`` is ``None`` until backward and then counts the backward solve;
  ``adjoint_rtol``/``adjoint_atol`` default to the forward ones.
* Misuse raises ``ValueError``/``TypeError`` naming the problem: a plain callable without
  ``adjoint_params``, an ``adjoint_params`` entry that does not require grad, a parameter the
  field does not depend on (at backward, by name), unknown adjoint options, an unknown gradient
  strategy.
* Edge cases: a single output time, ``batched=True`` with a shared grid, a parameter acting on
  part of the interval only, dense output under the adjoint (a plain value without gradient),
  the message of a failed backward solve (names the adjoint options), and a seminorm that never
  costs more than the full norm.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from conftest import ADAPTIVE, FIXED
from fields import _params, mlp
from torch import nn
from torch.autograd import gradcheck
from torch.autograd.graph import saved_tensors_hooks

import neuralode

F64 = torch.float64
# neuralode's and torch's own files (a warning of the backward pass names neither)
_LIBRARIES = (os.path.dirname(neuralode.__file__), os.path.dirname(torch.__file__))
TIGHT = {"rtol": 1e-12, "atol": 1e-12, "adjoint_rtol": 1e-12, "adjoint_atol": 1e-12}
GC = {"eps": 1e-6, "atol": 1e-5, "rtol": 1e-5}


# --------------------------------------------------------------------------- helpers


class MLPField(nn.Module):
    """``f(t, y) = W2 tanh(W1 y + b1 + t) + b2`` as a module (float64)."""

    def __init__(self, dim: int, hidden: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(dim, hidden, dtype=F64)
        self.l2 = nn.Linear(hidden, dim, dtype=F64)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.unsqueeze(-1) if t.ndim else t
        return self.l2(torch.tanh(self.l1(y) + tt))


class Functional(nn.Module):
    """A module whose weights come from outside (gradcheck's inputs) via ``functional_call``.

    The wrapped module is held in a tuple so that its own parameters are not registered here."""

    def __init__(self, net: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._net = (net,)
        self.weights = weights

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self._net[0], self.weights, (t, y))


def _req(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.detach().clone().requires_grad_() for x in xs)


def _max_rel(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Largest over the tensors of ``max|a - b| / max|b|`` (each tensor's own scale)."""
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


Y0 = torch.tensor([0.3, -0.2], dtype=F64)
T_INC = torch.tensor([0.0, 0.4, 1.0], dtype=F64)


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("method", ["dopri5", "dopri8"])
def test_gradcheck_y0_and_t(method: str) -> None:
    params = _params()

    def fn(y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint_adjoint(
            mlp(params), y0, t, method=method, adjoint_params=(), **TIGHT
        )

    assert gradcheck(fn, _req(Y0, T_INC), **GC)


def test_gradcheck_params_of_plain_function() -> None:
    def fn(y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint_adjoint(
            mlp(params), y0, T_INC, method="dopri8", adjoint_params=params, **TIGHT
        )

    assert gradcheck(fn, _req(Y0, *_params()), **GC)


def test_gradcheck_params_through_module_wrapper() -> None:
    net = MLPField(2, 5, seed=1)
    names = [n for n, _ in net.named_parameters()]

    def fn(y0: torch.Tensor, t: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
        func = Functional(net, dict(zip(names, ws)))
        return neuralode.odeint_adjoint(func, y0, t, method="dopri8", adjoint_params=ws, **TIGHT)

    weights = [p.detach() for p in net.parameters()]
    assert gradcheck(fn, _req(Y0, T_INC, *weights), fast_mode=True, **GC)


def test_gradcheck_tuple_state() -> None:
    # y = (a, b) with a' = tanh(W b) * a, b' = -sum(a) + t + 0.1 b: two shapes, coupled.
    g = torch.Generator().manual_seed(1)
    w0 = 0.5 * torch.randn(2, 3, generator=g, dtype=F64)

    def fn(
        a0: torch.Tensor, b0: torch.Tensor, w: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        def f(tt: torch.Tensor, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            a, b = y
            return torch.tanh(w @ b) * a, -a.sum() + tt + 0.1 * b

        return neuralode.odeint_adjoint(
            f, (a0, b0), t, method="dopri8", adjoint_params=(w,), **TIGHT
        )

    a0 = torch.tensor([0.5, -0.4], dtype=F64)
    b0 = torch.tensor([0.1, 0.2, -0.3], dtype=F64)
    assert gradcheck(fn, _req(a0, b0, w0, T_INC), **GC)


def test_gradcheck_decreasing_time() -> None:
    t_dec = torch.tensor([1.0, 0.3, -0.5], dtype=F64)

    def fn(y0: torch.Tensor, t: torch.Tensor, *p: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint_adjoint(mlp(p), y0, t, method="dopri8", adjoint_params=p, **TIGHT)

    assert gradcheck(fn, _req(Y0, t_dec, *_params()), fast_mode=True, **GC)


# --------------------------------------------------------------------------- closed form
def test_linear_ode_loss_on_every_output_is_sum_of_transposed_exponentials() -> None:
    # d/dy0 sum_i <g_i, y(t_i)> = sum_i expm(A t_i)^T g_i: the adjoint must jump by g_i at
    # every output time on its way back, including t_0 itself.
    a = torch.tensor([[-0.5, 1.0, 0.0], [-1.0, -0.2, 0.3], [0.1, 0.0, -0.3]], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.2, 2.0], dtype=F64)
    g = torch.tensor(
        [[0.4, 0.0, -0.1], [0.3, -1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.5, -0.7]], dtype=F64
    )
    y0 = torch.tensor([1.0, -0.5, 0.25], dtype=F64, requires_grad=True)
    ys = neuralode.odeint_adjoint(
        lambda _t, y: a @ y, y0, t, rtol=1e-10, atol=1e-10, adjoint_params=()
    )
    (grad,) = torch.autograd.grad((ys * g).sum(), y0)
    expected = sum(torch.linalg.matrix_exp(a * t[i]).T @ g[i] for i in range(len(t)))
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------- vs backprop and FD
def _loss_and_inputs(
    net: nn.Module, y0: torch.Tensor, t: torch.Tensor, **kw: Any
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss ``sum_i ||y(t_i) - c_i||^2 / 2`` over every output time, and its inputs."""
    y0r, tr = _req(y0, t)
    ys = neuralode.solve(net, y0r, tr, **kw).ys
    target = torch.linspace(-1.0, 1.0, ys.numel(), dtype=F64).view_as(ys)
    return 0.5 * ((ys - target) ** 2).sum(), [y0r, tr, *net.parameters()]


def _grads(net: nn.Module, y0: torch.Tensor, t: torch.Tensor, **kw: Any) -> list[torch.Tensor]:
    loss, inputs = _loss_and_inputs(net, y0, t, **kw)
    return list(torch.autograd.grad(loss, inputs))


def _loss_value(net: nn.Module, y0: torch.Tensor, t: torch.Tensor) -> float:
    with torch.no_grad():
        ys = neuralode.solve(net, y0, t, method="dopri8", rtol=1e-13, atol=1e-13).ys
        target = torch.linspace(-1.0, 1.0, ys.numel(), dtype=F64).view_as(ys)
        return float(0.5 * ((ys - target) ** 2).sum())


def test_adjoint_approaches_backprop_and_finite_differences_as_rtol_tightens() -> None:
    net = MLPField(3, 16, seed=0)
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.9, 1.5], dtype=F64)

    # Reference: backprop through dopri8 at 1e-13, checked against central differences of the
    # loss along every coordinate of y0 and t and along three random directions in weight space.
    ref = _grads(net, y0, t, method="dopri8", rtol=1e-13, atol=1e-13)
    eps = 1e-6
    fd_err = 0.0
    for k, base in enumerate((y0, t)):
        for i in range(base.numel()):
            d = torch.zeros_like(base)
            d[i] = eps
            args = [y0, t]
            args[k] = base + d
            plus = _loss_value(net, *args)
            args[k] = base - d
            minus = _loss_value(net, *args)
            fd = (plus - minus) / (2 * eps)
            fd_err = max(fd_err, abs(fd - float(ref[k][i])) / float(ref[k].abs().max()))
    g = torch.Generator().manual_seed(0)
    params = list(net.parameters())
    for _ in range(3):
        dirs = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        auto = sum(float((r * d).sum()) for r, d in zip(ref[2:], dirs))
        vals = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, d in zip(params, dirs):
                    p.add_(sign * eps * d)
            vals.append(_loss_value(net, y0, t))
            with torch.no_grad():
                for p, d in zip(params, dirs):
                    p.sub_(sign * eps * d)
        fd = (vals[0] - vals[1]) / (2 * eps)
        fd_err = max(fd_err, abs(fd - auto) / abs(auto))
    print(f"\nreference vs central differences: max relative difference {fd_err:.1e}")
    assert fd_err < 1e-6

    errs_adj, errs_bp = [], []
    for rtol in (1e-4, 1e-6, 1e-8):
        adj = _grads(net, y0, t, rtol=rtol, atol=rtol, gradient="adjoint")
        bp = _grads(net, y0, t, rtol=rtol, atol=rtol)
        errs_adj.append(_max_rel(adj, ref))
        errs_bp.append(_max_rel(bp, ref))
        print(
            f"rtol {rtol:.0e}: adjoint vs reference {errs_adj[-1]:.1e}, "
            f"backprop vs reference {errs_bp[-1]:.1e}, adjoint vs backprop {_max_rel(adj, bp):.1e}"
        )
    assert errs_adj[0] > errs_adj[1] > errs_adj[2]
    # Measured: 7.2e-5, 2.3e-6, 1.1e-8 (backprop: 2.6e-4, 1.3e-5, 2.4e-8).
    for rtol, err in zip((1e-4, 1e-6, 1e-8), errs_adj):
        assert err < 10 * rtol


# --------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", neuralode.METHODS)
def test_every_method_matches_backprop(method: str) -> None:
    net = MLPField(3, 8, seed=2)
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    if neuralode.get_solver(method).adaptive:
        # (adaptive_heun at 1e-9 would take 10^4 steps: 1e-7 is as telling)
        rtol = {"adaptive_heun": 1e-7}.get(method, 1e-9)
        kw: dict[str, Any] = {"rtol": rtol, "atol": rtol}
        adj_kw: dict[str, Any] = {}
        tol = 1e-6
    else:
        # Backprop differentiates the discrete map, the adjoint solves the adjoint equation
        # with the same method: both are within O(h^p) of the exact gradient.
        h = {
            "euler": 1e-3,
            "midpoint": 1e-2,
            "heun": 1e-2,
            "heun3": 2e-2,
            "rk4": 5e-2,
            "rk38": 5e-2,
            "implicit_euler": 1e-2,
            "implicit_midpoint": 5e-2,
            "trapezoid": 5e-2,
            "sdirk2": 5e-2,
            "trbdf2": 5e-2,
            "radauIIA3": 0.1,
            "radauIIA5": 0.25,
            "gl4": 0.25,
            "gl6": 0.25,
            "explicit_adams": 2e-2,
            "implicit_adams": 2e-2,
        }[method]
        kw = {"step_size": h}
        adj_kw = {"adjoint_options": {"step_size": h}}
        # Measured: euler 1.3e-3, midpoint 4.7e-6, heun 4.1e-8, rk4 3.3e-9; at h = 2e-2
        # explicit_adams 2.3e-7, implicit_adams 1.9e-8.
        tol = {
            "euler": 1e-2,
            "midpoint": 5e-5,
            "heun": 5e-7,
            "heun3": 5e-7,
            "rk4": 5e-8,
            "rk38": 5e-8,
            # Measured: implicit_euler 1.3e-2, trapezoid 1.2e-4, sdirk2 3.1e-5, trbdf2 5.7e-5,
            # radauIIA3 2.2e-5, radauIIA5 4.4e-7.  The Gauss methods (implicit_midpoint, gl4,
            # gl6: 7.6e-15, 1.4e-14, 6.1e-15) are symplectic, and a symplectic method's discrete
            # adjoint is the same method applied to the adjoint equation (Sanz-Serna 2016): the
            # two gradients agree to round-off at any step.
            "implicit_euler": 5e-2,
            "implicit_midpoint": 1e-12,
            "trapezoid": 5e-4,
            "sdirk2": 2e-4,
            "trbdf2": 2e-4,
            "radauIIA3": 1e-4,
            "radauIIA5": 2e-6,
            "gl4": 1e-12,
            "gl6": 1e-12,
            "explicit_adams": 1e-6,
            "implicit_adams": 1e-7,
        }[method]
    bp = _grads(net, y0, t, method=method, **kw)
    adj = _grads(net, y0, t, method=method, gradient="adjoint", **kw, **adj_kw)
    err = _max_rel(adj, bp)
    print(f"\n{method}: adjoint vs backprop max relative difference {err:.1e}")
    assert err < tol


def test_every_method_is_covered() -> None:
    assert set(ADAPTIVE) | set(FIXED) == set(neuralode.METHODS)


def test_adjoint_method_may_differ_from_forward_method() -> None:
    net = MLPField(3, 8, seed=2)
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ref = _grads(net, y0, t, method="dopri8", rtol=1e-12, atol=1e-12)
    adj = _grads(
        net, y0, t, method="dopri5", rtol=1e-10, atol=1e-10, gradient="adjoint",
        adjoint_method="dopri8", adjoint_rtol=1e-11, adjoint_atol=1e-11,
    )  # fmt: skip
    assert _max_rel(adj, ref) < 1e-7


# --------------------------------------------------------------------------- layouts
def test_per_sample_grids_match_each_row_solved_alone() -> None:
    # Three rows with their own grids, one of them decreasing.
    y0 = torch.tensor([[0.3, -0.2], [0.0, 0.5], [-0.4, 0.1]], dtype=F64)
    t = torch.tensor([[0.0, 0.4, 1.0], [0.2, 0.5, 0.6], [1.0, 0.7, -0.2]], dtype=F64)
    w = torch.tensor([[1.0, -2.0], [0.5, 0.3], [-0.7, 1.1]], dtype=F64)
    kw: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-10}

    params = _req(*_params())
    y0r, tr = _req(y0, t)
    sol = neuralode.solve(mlp(params), y0r, tr, gradient="adjoint", adjoint_params=params, **kw)
    assert sol.ys.shape == (3, 3, 2)
    loss = (sol.ys * w).sum() + (sol.ys[:, -1] ** 2).sum()
    g_y0, g_t, *g_p = torch.autograd.grad(loss, (y0r, tr, *params))
    assert sol.backward_stats is not None

    sum_p = [torch.zeros_like(p) for p in params]
    for b in range(3):
        y0b, tb = _req(y0[b], t[b])
        ys = neuralode.solve(mlp(params), y0b, tb, **kw).ys
        loss_b = (ys * w).sum() + (ys[-1] ** 2).sum()
        gy, gt, *gp = torch.autograd.grad(loss_b, (y0b, tb, *params))
        torch.testing.assert_close(g_y0[b], gy, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(g_t[b], gt, rtol=1e-7, atol=1e-9)
        sum_p = [s + g for s, g in zip(sum_p, gp)]
    for a, b in zip(g_p, sum_p):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_tuple_state_and_decreasing_time_match_backprop() -> None:
    net = MLPField(3, 6, seed=4)

    def f(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        a, b = y  # a: [2], b: [1]
        d = net(t, torch.cat([a, b]))
        return d[:2], d[2:] * a[:1]

    t = torch.tensor([2.0, 1.1, 0.5, -0.3], dtype=F64)

    def grads(**kw: Any) -> list[torch.Tensor]:
        a0, b0, tr = _req(torch.tensor([0.2, -0.6], dtype=F64), torch.tensor([0.4], dtype=F64), t)
        ya, yb = neuralode.solve(f, (a0, b0), tr, rtol=1e-10, atol=1e-10, **kw).ys
        loss = (ya**2).sum() + (yb * torch.arange(4, dtype=F64).view(4, 1)).sum()
        return list(torch.autograd.grad(loss, (a0, b0, tr, *net.parameters())))

    bp = grads()
    adj = grads(gradient="adjoint", adjoint_params=tuple(net.parameters()))
    assert _max_rel(adj, bp) < 1e-7


def test_loss_on_a_middle_output_only() -> None:
    # The cotangent at the last output is zero: the backward solve still has to run from the
    # last output time and pick up the jump at t_1.
    net = MLPField(3, 8, seed=5)
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64)
    t = torch.tensor([0.0, 0.7, 1.3], dtype=F64)

    def grads(**kw: Any) -> list[torch.Tensor]:
        y0r, tr = _req(y0, t)
        ys = neuralode.solve(net, y0r, tr, rtol=1e-10, atol=1e-10, **kw).ys
        return list(torch.autograd.grad(ys[1].sum(), (y0r, tr, *net.parameters())))

    bp, adj = grads(), grads(gradient="adjoint")
    assert float(bp[1][2].abs()) == 0.0 and float(adj[1][2].abs()) == 0.0
    assert _max_rel(adj, bp) < 1e-7


def test_field_independent_of_state() -> None:
    # f(t, y) = w * t does not depend on y: the vector-Jacobian product for y is structurally
    # absent, and y(t) = y0 + w t^2 / 2 still has d/dy0 = I and d/dw = t^2 / 2.
    w = torch.tensor([0.5, -1.5], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    ys = neuralode.odeint_adjoint(lambda tt, _y: w * tt, y0, t, adjoint_params=(w,))
    g_y0, g_w = torch.autograd.grad(ys[-1].sum(), (y0, w))
    torch.testing.assert_close(g_y0, torch.ones(2, dtype=F64))
    torch.testing.assert_close(g_w, torch.full((2,), 2.0, dtype=F64))


def test_default_adjoint_params_are_the_module_parameters_that_require_grad() -> None:
    net = MLPField(3, 8, seed=6)
    net.l1.bias.requires_grad_(False)  # frozen: neither an error nor a gradient
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ys = neuralode.odeint_adjoint(net, y0, t, rtol=1e-10, atol=1e-10)
    ys.square().sum().backward()
    adj = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    assert net.l1.bias.grad is None
    net.zero_grad(set_to_none=True)
    neuralode.odeint(net, y0, t, rtol=1e-10, atol=1e-10).square().sum().backward()
    bp = [p.grad for p in net.parameters() if p.requires_grad]
    assert _max_rel(adj, bp) < 1e-7


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_adjoint_params_may_be_a_generator_as_in_torchdiffeq(gradient: str) -> None:
    """``adjoint_params=net.parameters()`` (a generator, as torchdiffeq users write) is read
    once and differentiated like the tuple; a tensor or a string is refused by name."""
    net = MLPField(2, 4, seed=8)
    field = lambda t, y: net(t, y)  # noqa: E731 - a plain callable: adjoint_params is required
    y0, t = torch.tensor([0.4, -0.2], dtype=F64), torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    tight = TIGHT if gradient == "adjoint" else TIGHT_FWD

    def grads(params: Any) -> list[torch.Tensor]:
        sol = neuralode.solve(field, y0, t, gradient=gradient, adjoint_params=params, **tight)
        return list(torch.autograd.grad(sol.ys.square().sum(), tuple(net.parameters())))

    assert _max_rel(grads(net.parameters()), grads(tuple(net.parameters()))) < 1e-12
    ys = neuralode.odeint_adjoint(field, y0, t, adjoint_params=net.parameters(), **TIGHT)
    assert all(g is not None for g in torch.autograd.grad(ys.sum(), tuple(net.parameters())))
    for bad in (net.l1.weight, "weights"):
        with pytest.raises(TypeError, match="adjoint_params must be a sequence or iterable"):
            neuralode.solve(field, y0, t, gradient=gradient, adjoint_params=bad)


def test_odeint_adjoint_forward_equals_odeint() -> None:
    net = MLPField(3, 8, seed=7)
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 6, dtype=F64)
    ys = neuralode.odeint_adjoint(net, y0, t, method="tsit5")
    assert ys.shape == (6, 3)
    torch.testing.assert_close(ys, neuralode.odeint(net, y0, t, method="tsit5"), rtol=0, atol=0)


# --------------------------------------------------------------------------- memory and stats
def _saved_tensors_in_forward(rtol: float, gradient: str) -> tuple[int, int]:
    net = MLPField(3, 8, seed=8)
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    count = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return x

    with saved_tensors_hooks(pack, lambda x: x):
        sol = neuralode.solve(net, y0, t, rtol=rtol, atol=rtol, gradient=gradient)
    return count, int(sol.stats.n_steps)


def test_forward_saves_no_graph_of_the_steps() -> None:
    loose, steps_loose = _saved_tensors_in_forward(1e-4, "adjoint")
    tight, steps_tight = _saved_tensors_in_forward(1e-10, "adjoint")
    assert steps_tight > 4 * steps_loose
    assert tight == loose, "adjoint forward saved more tensors when it took more steps"
    bp, _ = _saved_tensors_in_forward(1e-10, "backprop")
    print(f"\nsaved tensors: adjoint {tight} ({steps_tight} steps), backprop {bp}")
    assert bp > 10 * tight


class CountingMLP(MLPField):
    def __init__(self) -> None:
        super().__init__(3, 8, seed=9)
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(t, y)


@pytest.mark.parametrize("t_grad", [False, True])
def test_backward_stats_none_before_backward_and_counted_after(t_grad: bool) -> None:
    """The backward counters are the field calls the backward pass made, counted by the field
    (the augmented system's evaluations, plus f at the output times for the t-gradient)."""
    net = CountingMLP()
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=t_grad)
    sol = neuralode.solve(net, y0, t, gradient="adjoint")
    assert sol.backward_stats is None
    assert int(sol.stats.nfe) == net.calls  # the forward counters too (f0 included)
    before = net.calls
    sol.ys.sum().backward()
    st = sol.backward_stats
    assert isinstance(st, neuralode.Stats)
    assert int(st.nfe) == net.calls - before > 0
    assert int(st.n_accepted) > 0
    assert int(st.n_steps) == int(st.n_accepted) + int(st.n_rejected)


def test_adjoint_tolerances_default_to_forward_ones() -> None:
    net = MLPField(3, 8, seed=10)
    y0 = torch.tensor([0.5, -0.3, 0.8], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)

    def backward_nfe(**kw: Any) -> int:
        sol = neuralode.solve(net, y0, t, rtol=1e-8, atol=1e-8, gradient="adjoint", **kw)
        sol.ys.sum().backward()
        return int(sol.backward_stats.nfe)

    default = backward_nfe()
    assert default == backward_nfe(adjoint_rtol=1e-8, adjoint_atol=1e-8)
    assert backward_nfe(adjoint_rtol=1e-4, adjoint_atol=1e-4) < default


# --------------------------------------------------------------------------- seminorm
def _seminorm_case(
    seed: int, rtol: float, atol: float, norm: str | None
) -> tuple[list[torch.Tensor], int]:
    """Backward NFE and gradients of a neural ODE with many parameters for its state: state 4,
    hidden 64 (580 parameters against 2 x 64 state and adjoint channels), a batch of 16."""
    net = MLPField(4, 64, seed=seed)
    y0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    y0.requires_grad_()
    t = torch.linspace(0.0, 2.0, 3, dtype=F64)
    opts = {"norm": norm} if norm else None
    sol = neuralode.solve(
        net, y0, t, rtol=rtol, atol=atol, gradient="adjoint", adjoint_options=opts
    )
    grads = torch.autograd.grad(sol.ys.square().mean(), (y0, *net.parameters()))
    return list(grads), int(sol.backward_stats.nfe)


def test_seminorm_needs_fewer_backward_evaluations() -> None:
    # Kidger et al. 2021 report a median 40% saving; here the parameter-gradient channels only
    # drive the step when atol is well below rtol (they start at zero, so their error scale is
    # atol).  The gradients page (docs/concepts/gradients.md) has the counts this prints.
    full, nfe_full = _seminorm_case(11, 1e-6, 1e-9, "rms")
    semi, nfe_semi = _seminorm_case(11, 1e-6, 1e-9, None)  # the default
    again, _ = _seminorm_case(11, 1e-6, 1e-9, "rms")
    err = _max_rel(semi, full)
    print(
        f"\nbackward NFE: full norm {nfe_full}, seminorm {nfe_semi} "
        f"({100 * (1 - nfe_semi / nfe_full):.0f}% fewer); gradients differ by {err:.1e}"
    )
    assert nfe_semi < nfe_full
    assert err < 1e-5  # both are within tolerance of the exact gradient
    assert _max_rel(again, full) == 0.0  # deterministic: the comparison is not noise


@pytest.mark.parametrize(("seed", "rtol", "atol"), [(11, 1e-6, 1e-6), (15, 1e-7, 1e-9)])
def test_seminorm_never_costs_more_than_full_norm(seed: int, rtol: float, atol: float) -> None:
    # A seminorm leaves channels out of the norm, so it is never larger than the norm: every
    # step the full norm accepts, the seminorm accepts.  (An RMS over all channels with the
    # parameter channels merely set to zero would be a different norm, and could cost more.)
    _, nfe_full = _seminorm_case(seed, rtol, atol, "rms")
    _, nfe_semi = _seminorm_case(seed, rtol, atol, "seminorm")
    assert nfe_semi <= nfe_full, f"seminorm {nfe_semi} NFE vs full norm {nfe_full}"


# --------------------------------------------------------------------------- errors
def test_plain_callable_needs_adjoint_params() -> None:
    y0 = Y0.clone().requires_grad_()
    with pytest.raises((ValueError, TypeError), match="adjoint_params"):
        neuralode.odeint_adjoint(mlp(_params()), y0, T_INC)
    with pytest.raises((ValueError, TypeError), match="adjoint_params"):
        neuralode.solve(mlp(_params()), y0, T_INC, gradient="adjoint")


def test_adjoint_param_must_require_grad() -> None:
    params = _req(*_params())
    frozen = (params[0], params[1].detach())
    with pytest.raises((ValueError, TypeError), match="requires_grad|require grad"):
        neuralode.odeint_adjoint(mlp(params), Y0, T_INC, adjoint_params=frozen)


class WithUnused(MLPField):
    """The MLP field with a layer it never calls."""

    def __init__(self) -> None:
        super().__init__(2, 4, seed=12)
        self.unused = nn.Linear(2, 2, dtype=F64)


def test_unused_parameter_is_named_at_backward() -> None:
    net = WithUnused()
    y0 = Y0.clone().requires_grad_()
    ys = neuralode.solve(net, y0, T_INC, gradient="adjoint").ys  # the forward cannot know yet
    with pytest.raises(ValueError, match=r"did not depend on \['unused.weight', 'unused.bias'\]"):
        ys.sum().backward()


@pytest.mark.parametrize("entry", ["solve", "odeint_adjoint"])
def test_unused_parameter_with_zero_option_warns_at_the_users_line(entry: str) -> None:
    """``adjoint_options={"unused": "zero"}`` (torchdiffeq's behaviour): zero gradients for the
    parameters func never used, with one warning naming them, at the line that asked for the
    gradients (not inside the backward pass)."""
    net = WithUnused()
    y0 = Y0.clone().requires_grad_()
    opts = {"unused": "zero"}
    if entry == "solve":
        ys = neuralode.solve(net, y0, T_INC, gradient="adjoint", adjoint_options=opts).ys
    else:
        ys = neuralode.odeint_adjoint(net, y0, T_INC)  # torchdiffeq's entry: zero by default
    with pytest.warns(UserWarning, match=r"did not depend on \['unused.weight', 'unused.bias'\]: "
                      "their gradients are zero") as caught:  # fmt: skip
        grads = torch.autograd.grad(ys.sum(), (y0, *net.parameters()), allow_unused=True)
    # (the first frame outside neuralode and torch: this file's line, where the gradients
    # were asked for; under mutmut, whose trampolines stand between neuralode's own
    # frames, the first of those)
    assert len(caught) == 1 and not caught[0].filename.startswith(_LIBRARIES)
    assert caught[0].filename == __file__ or "mutmut" in sys.modules
    named = dict(zip(["y0", *(n for n, _ in net.named_parameters())], grads))
    for name in ("unused.weight", "unused.bias"):
        assert named[name] is None or not bool(named[name].any()), name
    assert bool(named["y0"].abs().sum() > 0)


def test_unused_explicit_parameter_raises_at_backward() -> None:
    params = _req(*_params())
    stray = torch.ones(3, dtype=F64, requires_grad=True)
    ys = neuralode.solve(
        mlp(params), Y0, T_INC, gradient="adjoint", adjoint_params=(*params, stray)
    ).ys
    with pytest.raises(ValueError, match=r"did not depend on \['adjoint_params\[4\]'\]"):
        ys.sum().backward()


def test_unknown_adjoint_option() -> None:
    net = MLPField(2, 4)
    with pytest.warns(UserWarning, match="stepsize"):  # torchdiffeq's entry point warns
        neuralode.odeint_adjoint(net, Y0, T_INC, adjoint_options={"stepsize": 0.1})
    with pytest.raises(ValueError, match="stepsize"):
        neuralode.solve(net, Y0, T_INC, gradient="adjoint", adjoint_options={"stepsize": 0.1})


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"first_step": -0.1}, r"adjoint_options\['first_step'\] must be a positive finite"),
        ({"first_step": 0.1, "adjoint_method": "rk4"},
         r"adjoint_options\['first_step'\] applies to adaptive methods; 'rk4' is fixed-step"),
        ({"step_size": 0.1}, r"adjoint_options\['step_size'\] applies to fixed-step methods"),
        ({"safety": 1.5}, r"adjoint_options\['safety'\] must be in \(0, 1\], got 1.5"),
        ({"beta": 0.5}, r"adjoint_options\['beta'\] \(PI coefficient\) must be in \[0, 0.2\]"),
        ({"ifactor": 0.5}, r"adjoint_options\['ifactor'\] must be a finite number >= 1"),
        ({"dfactor": 2.0}, r"adjoint_options\['dfactor'\] must be in \(0, 1\]"),
        ({"max_num_steps": 0}, r"adjoint_options\['max_num_steps'\] must be a positive integer"),
    ],
)  # fmt: skip
def test_bad_adjoint_stepping_options_are_refused_before_solving(
    options: dict[str, Any], says: str
) -> None:
    # Checked when the solve is set up, naming the dict they came from: not at the first
    # backward pass, after a forward solve that may have taken minutes (the field is called
    # once at most, the set-up's check of its output shape).
    calls = []

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return -y

    y0 = Y0.clone().requires_grad_(True)
    method = options.pop("adjoint_method", None)
    extra = {} if method is None else {"adjoint_method": method}
    with pytest.raises(ValueError, match=says):
        neuralode.solve(
            field, y0, T_INC, gradient="adjoint", adjoint_params=(), adjoint_options=options,
            **extra,
        )  # fmt: skip
    assert len(calls) <= 1


def test_unknown_adjoint_norm() -> None:
    net = MLPField(2, 4)
    with pytest.raises(ValueError, match="semi_norm"):
        ys = neuralode.odeint_adjoint(net, Y0, T_INC, adjoint_options={"norm": "semi_norm"})
        ys.sum().backward()


def test_unknown_gradient_strategy() -> None:
    with pytest.raises(ValueError, match="backprop") as err:
        neuralode.solve(MLPField(2, 4), Y0, T_INC, gradient="adjiont")
    assert "adjoint" in str(err.value) and "adjiont" in str(err.value)


# --------------------------------------------------------------------------- edge cases
def _grads_both(
    func: Any, y0: torch.Tensor, t: torch.Tensor, loss: Callable[[Any], torch.Tensor], **kw: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of ``loss(ys)`` for ``(y0, t, *func.parameters())`` by backprop and adjoint."""
    out = []
    for gradient in ("backprop", "adjoint"):
        y0r, tr = _req(y0, t)
        ys = neuralode.solve(func, y0r, tr, gradient=gradient, **kw).ys
        out.append(list(torch.autograd.grad(loss(ys), (y0r, tr, *func.parameters()))))
    return out[0], out[1]


@pytest.mark.parametrize("batched", [False, True])
def test_single_output_time(batched: bool) -> None:
    net = MLPField(2, 4, seed=13)
    t = torch.tensor([0.5], dtype=F64)
    y0 = torch.stack([Y0, 2 * Y0, -Y0]) if batched else Y0
    weights = torch.tensor([1.0, -2.0], dtype=F64)
    bp, adj = _grads_both(net, y0, t, lambda ys: (ys * weights).sum(), batched=batched)
    torch.testing.assert_close(bp[0], weights.expand_as(y0))
    for a, b in zip(adj, bp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("gradient", "t_grad"),
    [
        ("backprop", False),
        ("backprop", True),
        ("adjoint", False),
        ("adjoint", True),
    ],
)
def test_batched_with_shared_grid(gradient: str, t_grad: bool) -> None:
    # Reference: the same grid given per sample (t expanded to [batch, T]), by backprop.
    net = MLPField(2, 4, seed=14)
    y0 = torch.tensor([[0.3, -0.2], [0.0, 0.5], [-0.4, 0.1]], dtype=F64)

    def grads(shared: bool, **kw: Any) -> list[torch.Tensor]:
        y0r, tr = _req(y0, T_INC)
        tr.requires_grad_(t_grad)
        t = tr if shared else tr.expand(3, -1)
        ys = neuralode.solve(net, y0r, t, batched=True, **TIGHT_FWD, **kw).ys
        inputs = (y0r, tr, *net.parameters()) if t_grad else (y0r, *net.parameters())
        return list(torch.autograd.grad(ys.square().sum(), inputs))

    ref = grads(shared=False)
    assert _max_rel(grads(shared=True, gradient=gradient), ref) < 1e-7


TIGHT_FWD = {"rtol": 1e-10, "atol": 1e-10}


def test_parameter_used_on_part_of_the_interval_only() -> None:
    w = torch.tensor([0.7, -0.3], dtype=F64, requires_grad=True)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y + w if float(t) < 0.5 else -y

    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = neuralode.odeint_adjoint(f, Y0, t, adjoint_params=(w,), **TIGHT)
    (g_adj,) = torch.autograd.grad(ys[-1].sum(), w)
    # y(1) = e^{-1} y0 + w (e^{-0.5} - e^{-1}): each component's derivative is the same scalar.
    expected = torch.full((2,), torch.e**-0.5 - torch.e**-1, dtype=F64)
    torch.testing.assert_close(g_adj, expected, rtol=1e-6, atol=1e-6)


def test_dense_output_under_adjoint_is_differentiable_or_refused() -> None:
    """Backprop's dense output carries gradients (those of the solution at that time, checked
    against a solve that outputs there); the adjoint's and checkpoint's forward keep no graph, so
    their dense output is the same value, visibly without gradient."""
    net = MLPField(2, 4, seed=0)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = Y0.clone().requires_grad_()
    sol = neuralode.solve(net, y0, t, dense=True, **TIGHT_FWD)
    v = sol.evaluate(0.5)
    got = torch.autograd.grad(v.sum(), (y0, *net.parameters()))
    direct = neuralode.solve(net, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), **TIGHT_FWD)
    want = torch.autograd.grad(direct.ys[1].sum(), (y0, *net.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    for gradient in ("adjoint", "checkpoint"):
        other = neuralode.solve(net, y0, t, gradient=gradient, dense=True, **TIGHT_FWD)
        w = other.evaluate(0.5)
        assert not w.requires_grad
        torch.testing.assert_close(w, v.detach(), rtol=1e-12, atol=1e-12)


def test_backward_failure_names_the_adjoint_options() -> None:
    net = MLPField(2, 4, seed=0)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = neuralode.odeint_adjoint(net, Y0, t, adjoint_options={"max_num_steps": 2})
    pattern = (
        r"backward solve failed on the output interval between output times 0 and 1: The "
        r"maximum number of solver steps was reached.*adjoint_options=\{'max_num_steps': N\}"
    )
    with pytest.raises(neuralode.SolverError, match=pattern):
        ys.sum().backward()


# --------------------------------------------------------------------------- defects fixed
class TimeOnly(nn.Module):
    """``dy/dt = -0.1 exp(-0.1 t)``: no autograd path from the output to ``y`` or to any
    parameter (it has none)."""

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -0.1 * torch.exp(-0.1 * t) * torch.ones_like(y)


def test_field_without_an_autograd_path_gets_the_right_y0_gradient() -> None:
    t = torch.linspace(0.0, 2.0, 4, dtype=F64)
    grads = []
    for odeint in (neuralode.odeint, neuralode.odeint_adjoint):
        y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
        ys = odeint(TimeOnly(), y0, t)
        (ys * torch.arange(1.0, 5.0, dtype=F64).view(4, 1)).sum().backward()
        grads.append(y0.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], torch.full((2,), 10.0, dtype=F64))  # y(t) = y0 + c(t)


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_double_backward_is_refused_with_the_alternative(gradient: str) -> None:
    net = MLPField(2, 4, seed=1)
    y0 = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    sol = neuralode.solve(net, y0, T_INC, gradient=gradient)
    with pytest.raises(
        RuntimeError,
        match=rf"gradient='{gradient}' does not support double "
        r"backward.*Use gradient='backprop'",
    ):
        torch.autograd.grad(sol.ys.sum(), y0, create_graph=True)
    # backprop's graph supports it: a second derivative by double backward vs finite differences.
    sol = neuralode.solve(net, y0, T_INC, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(sol.ys[-1].square().sum(), y0, create_graph=True)
    (gg,) = torch.autograd.grad(g[0], y0)
    eps = 1e-5

    def first(y: torch.Tensor) -> float:
        y = y.detach().requires_grad_(True)
        s = neuralode.solve(net, y, T_INC, rtol=1e-10, atol=1e-10)
        return float(torch.autograd.grad(s.ys[-1].square().sum(), y)[0][0])

    e0 = torch.tensor([eps, 0.0], dtype=F64)
    fd = (first(y0 + e0) - first(y0 - e0)) / (2 * eps)
    assert float(gg[0]) == pytest.approx(fd, rel=1e-5)


def _spiral_demo_backward_nfe(n_out: int, span: float = 2.5) -> tuple[int, int]:
    """Backward NFE and steps of the adjoint on torchdiffeq's ode_demo shape: an MLP on y**3,
    batch of 20 windows, ``n_out`` output times over ``span``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 50, dtype=F64), nn.Tanh(), nn.Linear(50, 2, dtype=F64))

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.net(y**3)

    y0 = 0.5 * torch.randn(20, 1, 2, dtype=F64)
    t = torch.linspace(0.0, span, n_out, dtype=F64)
    sol = neuralode.solve(Field(), y0, t, gradient="adjoint")
    sol.ys.abs().mean().backward()
    return int(sol.backward_stats.nfe), int(sol.backward_stats.n_steps)


def test_adjoint_step_size_carries_across_output_times() -> None:
    """With many output times the backward pass takes about the steps of one interval over the
    whole span plus one landing step per output time, not a fresh start (Hairer's selection and
    a growing step) on every interval."""
    nfe_1, steps_1 = _spiral_demo_backward_nfe(2)
    nfe_10, steps_10 = _spiral_demo_backward_nfe(10)
    nfe_50, steps_50 = _spiral_demo_backward_nfe(50)
    print(
        f"\nbackward steps / NFE: 1 interval {steps_1}/{nfe_1}, 9 {steps_10}/{nfe_10}, "
        f"49 {steps_50}/{nfe_50}"
    )
    assert steps_10 <= steps_1 + 9
    assert steps_50 <= max(steps_1, 49) + 49
    # Evaluations: per step 6 (dopri5) and one fresh first stage per interval after the jump.
    assert nfe_50 <= 6 * steps_50 + 50


@pytest.mark.parametrize("layout", ["one_row", "batch", "per_row_grids"])
def test_the_backward_solve_selects_its_first_step_once_and_carries_it_on(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each output interval is a backward solve of its own, of one flat augmented state (for a
    # batch too, and for a grid per row, whose intervals all map to [0, 1]): the step it would
    # have taken next starts the next interval, so Hairer's selection runs once, in the first.
    from neuralode.controllers import PIController

    calls = []
    select = PIController.initial_step

    def counted(self: PIController, *args: Any) -> Any:
        calls.append(1)
        return select(self, *args)

    monkeypatch.setattr(PIController, "initial_step", counted)
    a = torch.tensor([0.7], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.5], [0.3, -0.2]], dtype=F64)
    t = torch.linspace(0, 2, 6, dtype=F64)
    if layout == "per_row_grids":
        t = torch.stack([t, 1.5 * t])
    sol = neuralode.solve(lambda s, y: -a * y + torch.sin(y),
                          y0[0] if layout == "one_row" else y0, t, batched=layout != "one_row",
                          gradient="adjoint", adjoint_params=(a,))  # fmt: skip
    assert len(calls) == 1  # the forward solve's
    sol.ys.sum().backward()
    assert len(calls) - 1 == 1


@pytest.mark.parametrize("grids", ["one", "per_row"])
def test_the_field_sees_time_in_the_state_dtype_in_both_passes(grids: str) -> None:
    # float32 state, float64 time: the forward loop and the backward solve call the field
    # with t in float32, so a field mixing t and y keeps the state's dtype (with one grid, and
    # with a grid per row, whose backward intervals are rescaled to [0, 1]).
    seen = set()
    a = torch.tensor(0.5, requires_grad=True)

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.add(t.dtype)
        return -a * y * torch.cos(t).unsqueeze(-1)

    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.2]])
    t = torch.tensor([0.0, 0.6, 1.5], dtype=F64)
    if grids == "per_row":
        t = torch.stack([t, 2 * t])
    t.requires_grad_(True)  # the gradient of the times calls the field at each output too
    sol = neuralode.solve(
        field, y0, t, batched=True, gradient="adjoint", adjoint_params=(a,), rtol=1e-5
    )
    sol.ys.sum().backward()
    assert seen == {torch.float32} and a.grad is not None and a.grad.dtype == torch.float32
    assert t.grad is not None and t.grad.dtype == F64
    stats = sol.backward_stats
    assert stats is not None
    assert {getattr(stats, k).dtype for k in ("nfe", "n_steps", "n_accepted", "n_rejected")} == {
        torch.long
    }


@pytest.mark.parametrize("norm", ["seminorm", "rms", "max"])
def test_a_scalar_state_has_the_exact_adjoint_under_every_norm(norm: str) -> None:
    # y' = -k y: y(T) = y0 exp(-k T), so dy(T)/dy0 = exp(-k T) and dy(T)/dk = -T y0 exp(-k T).
    # A one-element state and a zero-size parameter make empty slices of the norm's parts.
    k = torch.tensor([0.8], dtype=F64, requires_grad=True)
    empty = torch.zeros(0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.5], dtype=F64, requires_grad=True)
    T = 2.0
    sol = neuralode.solve(
        lambda s, y: -k * y + empty.sum(),
        y0,
        torch.tensor([0.0, T], dtype=F64),
        gradient="adjoint",
        adjoint_params=(k, empty),
        adjoint_options={"norm": norm},
        rtol=1e-10,
        atol=1e-12,
    )
    sol.ys[-1].sum().backward()
    decay = torch.exp(-k.detach() * T)
    torch.testing.assert_close(y0.grad, decay, rtol=1e-8, atol=0)
    torch.testing.assert_close(k.grad, -T * 1.5 * decay, rtol=1e-8, atol=0)


def test_the_backward_norms_take_each_part_of_the_augmented_state_whole() -> None:
    # [y (2), a (2), g (3)]: "rms" is the largest RMS of the three parts, "seminorm" of y and
    # a only, "max" the largest magnitude of all.
    from neuralode.gradients.adjoint import _Augmented

    aug = _Augmented(None, (torch.zeros(3),), False, torch.zeros(2, 2), torch.zeros(2), None)

    def norms(*x: float) -> list[float]:
        v = torch.tensor(x, dtype=F64)
        return [float(aug.norm(k)(v, (0,))) for k in ("rms", "seminorm", "max")]

    assert norms(4, 0, 0, 0, 0, 0, 0) == pytest.approx([8**0.5, 8**0.5, 4])  # y's first
    assert norms(0, 0, 0, 3, 0, 0, 0) == pytest.approx([4.5**0.5, 4.5**0.5, 3])
    assert norms(0, 0, 0, 0, 0, 0, 6) == pytest.approx([12**0.5, 0, 6])
    assert norms(1, 1, 2, 2, 3, 3, 3) == pytest.approx([3, 2, 3])


def test_a_callable_backward_norm_gets_torchdiffeqs_parts() -> None:
    # A callable adjoint_options["norm"] is called as torchdiffeq calls its own, with
    # (t, y, adj_y, *adj_params), each part in its own shape; in a compiled solve's layout of
    # one row too; and with no parameters, with the first three only.
    from neuralode.gradients.adjoint import _Augmented

    seen: list[list[Any]] = []

    def norm(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        seen.append([p.tolist() for p in parts])
        return torch.stack([p.abs().max() for p in parts[1:]]).max()

    params = (torch.zeros(3, dtype=F64), torch.zeros(2, 2, dtype=F64))
    y, s = torch.zeros(2, 2, dtype=F64), torch.zeros(2, dtype=F64)
    custom = _Augmented(None, params, False, y, s, None).norm(norm)
    v = torch.arange(1.0, 12.0, dtype=F64)  # [y (2), a (2), g (3 + 4)]
    parts = [0.0, [1.0, 2.0], [3.0, 4.0], [5.0, 6.0, 7.0], [[8.0, 9.0], [10.0, 11.0]]]
    assert float(custom(v, (0,))) == 11.0 and seen == [parts]
    seen.clear()
    row = custom(v.unsqueeze(0), (1,))
    assert row.shape == (1,) and float(row[0]) == 11.0 and seen == [parts]
    seen.clear()
    custom = _Augmented(None, (), False, y, s, None).norm(norm)
    assert float(custom(v[:4], (0,))) == 4.0 and seen == [parts[:3]]


def test_a_field_of_time_alone_with_an_unused_parameter_is_named() -> None:
    # f depends on neither y nor the parameter: no vector-Jacobian product at all, and the
    # parameter is named as unused (not an IndexError from the missing products).
    stray = torch.ones(2, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    ys = neuralode.solve(lambda tt, _y: torch.cos(tt).expand(2), y0, t, gradient="adjoint",
                         adjoint_params=(stray,)).ys  # fmt: skip
    with pytest.raises(ValueError, match=r"did not depend on \['adjoint_params\[0\]'\]"):
        ys.sum().backward()


def test_the_gradient_of_a_failed_forward_solve_is_refused_with_the_reason() -> None:
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    sol = neuralode.solve(
        lambda t, y: y**2, y0, torch.tensor([0.0, 2.0], dtype=F64), gradient="adjoint",
        adjoint_params=(), throw=False,
    )  # fmt: skip
    assert not sol.success
    with pytest.raises(
        neuralode.SolverError,
        match=r"^gradient='adjoint': the forward solve failed \(see Solution\.status\), so there "
        r"is no gradient to compute; fix the forward solve first$",
    ):
        sol.ys.sum().backward()


def test_the_backward_solve_keeps_time_in_the_dtype_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Forward time in float32 (options), backward time in float64 (adjoint_options): each
    # loop runs its clock in its own dtype.
    from neuralode._loop import LoopSpec

    clocks = []
    run = LoopSpec.run

    def spy(self: LoopSpec, y0: torch.Tensor, f0: Any, out_times: torch.Tensor, **kw: Any) -> Any:
        clocks.append(out_times.dtype)
        return run(self, y0, f0, out_times, **kw)

    monkeypatch.setattr(LoopSpec, "run", spy)
    a = torch.tensor(0.5, requires_grad=True)
    sol = neuralode.solve(
        lambda t, y: -a * y, torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5, 1.0]),
        gradient="adjoint", adjoint_params=(a,), t_dtype=torch.float32,
        adjoint_options={"dtype": F64},
    )  # fmt: skip
    sol.ys.sum().backward()
    assert clocks == [torch.float32, F64, F64]  # the forward solve, then two intervals


def test_an_unused_parameter_is_named_with_one_output_interval_too() -> None:
    stray = torch.ones(2, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    ys = neuralode.solve(lambda tt, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64),
                         gradient="adjoint", adjoint_params=(stray,)).ys  # fmt: skip
    with pytest.raises(ValueError, match=r"did not depend on \['adjoint_params\[0\]'\]"):
        ys.sum().backward()


def test_a_one_time_solve_costs_the_backward_pass_nothing() -> None:
    y0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.3], dtype=F64, requires_grad=True)
    sol = neuralode.solve(lambda tt, y: -y, y0, t, gradient="adjoint", adjoint_params=())
    (sol.ys * 2.0).sum().backward()
    torch.testing.assert_close(y0.grad, torch.full((2,), 2.0, dtype=F64))
    assert t.grad is not None and float(t.grad.abs().sum()) == 0.0
    stats = sol.backward_stats
    assert stats is not None and int(stats.nfe) == 0 and int(stats.n_steps) == 0


def test_adjoint_options_reach_the_backward_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuralode.controllers import PIController
    from neuralode.gradients import adjoint as adjoint_module

    built: list[PIController] = []

    def record(**kw: Any) -> PIController:
        built.append(PIController(**kw))
        return built[-1]

    monkeypatch.setattr(adjoint_module, "PIController", record)
    selected = []
    select = PIController.initial_step
    monkeypatch.setattr(
        PIController, "initial_step", lambda self, *a: selected.append(1) or select(self, *a)
    )
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    knobs = {"safety": 0.8, "beta": 0.04, "ifactor": 5.0, "dfactor": 0.3, "first_step": 1e-3}
    sol = neuralode.solve(
        lambda t, y: -a * y, torch.tensor([1.0, -0.5], dtype=F64),
        torch.tensor([0.0, 0.5, 1.0], dtype=F64), gradient="adjoint", adjoint_params=(a,),
        adjoint_options=knobs,
    )  # fmt: skip
    selected.clear()
    sol.ys.sum().backward()
    (ctrl,) = built
    assert (ctrl.safety, ctrl.beta, ctrl.ifactor, ctrl.dfactor) == (0.8, 0.04, 5.0, 0.3)
    assert not selected  # the given first step, not Hairer's selection


def test_a_fixed_step_adjoint_on_per_row_grids_takes_the_steps_asked_for() -> None:
    # Rows with intervals of length 0.5 and 2: adjoint_options' step 0.05 (time units) is
    # 1/40 of the longest interval, 40 steps per interval of the rescaled backward clock.
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)
    t = torch.stack([torch.linspace(0, 2, 5), torch.linspace(0, 8, 5)]).to(F64)
    y0 = torch.tensor([[1.0], [-0.5]], dtype=F64)
    sol = neuralode.solve(
        lambda s, y: -a * y, y0, t, method="rk4", step_size=0.05, batched=True,
        gradient="adjoint", adjoint_params=(a,), adjoint_options={"step_size": 0.05},
    )  # fmt: skip
    sol.ys.sum().backward()
    stats = sol.backward_stats
    assert stats is not None and int(stats.n_steps) == 4 * 40


def test_the_gradient_of_both_times_of_one_interval() -> None:
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    grads = []
    for gradient in ("backprop", "adjoint"):
        t = torch.tensor([0.2, 1.1], dtype=F64, requires_grad=True)
        kw = {"adjoint_params": ()} if gradient == "adjoint" else {}
        sol = neuralode.solve(lambda s, y: -y * torch.cos(s), y0, t, gradient=gradient,
                              rtol=1e-10, atol=1e-12, **kw)  # fmt: skip
        (g,) = torch.autograd.grad(sol.ys[-1].square().sum(), t)
        grads.append(g)
    assert float(grads[1][0].abs()) > 0.1
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-7, atol=1e-9)


def test_each_backward_interval_starts_from_the_step_the_last_one_ended_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The augmented state is one row: its step carries over from one output interval to the
    # next (as torchdiffeq's), so only the first interval pays for an initial-step selection.
    from neuralode._loop import LoopSpec

    starts, ends = [], []
    run = LoopSpec.run

    def spy(self: LoopSpec, y0: torch.Tensor, f0: Any, out_times: torch.Tensor, **kw: Any) -> Any:
        result = run(self, y0, f0, out_times, **kw)
        starts.append(kw.get("first_step"))
        ends.append(result.h_next)
        return result

    monkeypatch.setattr(LoopSpec, "run", spy)
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)
    sol = neuralode.solve(lambda t, y: -a * y + torch.sin(y), torch.tensor([1.0, -0.5], dtype=F64),
                          torch.linspace(0, 2, 5, dtype=F64), gradient="adjoint",
                          adjoint_params=(a,), rtol=1e-7, atol=1e-9)  # fmt: skip
    sol.ys.sum().backward()
    backward_starts, backward_ends = starts[1:], ends[1:]  # after the forward solve
    assert len(backward_starts) == 4
    assert backward_starts[0] is None  # selected by the controller
    assert all(isinstance(h, float) and h > 0 for h in backward_ends)
    assert backward_starts[1:] == backward_ends[:-1]


@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "checkpoint"])
def test_per_row_grids_of_two_times_get_each_rows_gradient(gradient: str) -> None:
    # One output interval per row, of a different length in each row: the backward pass must
    # rescale each row's interval (an exact solution to compare: y' = -k y).
    k = torch.tensor([0.5, 1.5], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [0.2, 2.2]], dtype=F64, requires_grad=True)
    params = {} if gradient == "backprop" else {"adjoint_params": (k,)}
    sol = neuralode.solve(lambda s, y: -k[:, None] * y, y0, t, batched=True, gradient=gradient,
                          rtol=1e-10, atol=1e-12, **params)  # fmt: skip
    sol.ys[:, -1].sum().backward()
    span = (t[:, 1] - t[:, 0]).detach()
    decay = torch.exp(-k.detach() * span)
    torch.testing.assert_close(y0.grad[:, 0], decay, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(k.grad, -span * y0.detach()[:, 0] * decay, rtol=1e-7, atol=1e-9)
    end_rate = -k.detach() * y0.detach()[:, 0] * decay  # d y(t1) / d t1
    torch.testing.assert_close(t.grad[:, 1], end_rate, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(t.grad[:, 0], -end_rate, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_time_gradients_keep_a_float32_state_in_float32(gradient: str) -> None:
    # float32 state, float64 times that need a gradient, one grid per row: the shift of t0 and
    # the derivative at each output must not turn the solve, or the field's t, into float64.
    seen = set()
    a = torch.tensor(0.5, requires_grad=True)

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.add(t.dtype)
        return -a * y * torch.cos(t).unsqueeze(-1)

    y0 = torch.tensor([[1.0, -0.5], [0.3, 0.2]], requires_grad=True)
    t = torch.tensor([[0.0, 0.6, 1.5], [0.1, 1.2, 3.0]], dtype=F64, requires_grad=True)
    params = {} if gradient == "backprop" else {"adjoint_params": (a,)}
    sol = neuralode.solve(field, y0, t, batched=True, gradient=gradient, **params)
    assert sol.ys.dtype == torch.float32
    sol.ys.sum().backward()
    assert seen == {torch.float32}
    assert y0.grad is not None and y0.grad.dtype == torch.float32
    assert t.grad is not None and t.grad.dtype == F64


def test_the_backward_tolerances_given_or_taken_from_the_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backward state mixes y, the adjoint and the parameter gradients, so it has one rtol
    # and one atol: adjoint_rtol/adjoint_atol (numbers or one-element tensors), else the
    # smallest of the forward's per-component tolerances.
    from neuralode.gradients import adjoint as adjoint_module

    seen: list[tuple[float, float]] = []
    build = adjoint_module.PIController

    def record(**kw: Any) -> Any:
        seen.append((kw["rtol"], kw["atol"]))
        return build(**kw)

    monkeypatch.setattr(adjoint_module, "PIController", record)
    a = torch.tensor(0.5, dtype=F64, requires_grad=True)

    def backward_tolerances(**kw: Any) -> tuple[float, float]:
        seen.clear()
        sol = neuralode.solve(lambda t, y: -a * y, torch.tensor([1.0, -0.5], dtype=F64),
                              torch.tensor([0.0, 1.0], dtype=F64), gradient="adjoint",
                              adjoint_params=(a,), **kw)  # fmt: skip
        sol.ys.sum().backward()
        (got,) = seen
        return got

    per_component = {"rtol": torch.tensor([1e-5, 1e-7], dtype=F64),
                     "atol": torch.tensor([1e-8, 1e-6], dtype=F64)}  # fmt: skip
    assert backward_tolerances(**per_component) == (1e-7, 1e-8)
    assert backward_tolerances(rtol=1e-5, atol=1e-7) == (1e-5, 1e-7)
    given = {"adjoint_rtol": torch.tensor(1e-4, dtype=F64), "adjoint_atol": torch.tensor([0.0])}
    assert backward_tolerances(**per_component, **given) == (1e-4, 0.0)  # atol 0 is allowed
    with pytest.raises(TypeError, match="adjoint_rtol must be a number"):
        backward_tolerances(adjoint_rtol=torch.tensor([1e-4, 1e-5]))
    with pytest.raises(ValueError, match="adjoint_rtol must be a finite positive number"):
        backward_tolerances(adjoint_rtol=0.0)


@pytest.mark.parametrize(
    ("options", "t1", "steps"),
    [({"max_step": 0.01}, 1.0, 100), ({"min_step": 0.5}, 2.0, 4)],
)
def test_adjoint_options_bound_the_backward_steps(options, t1, steps):
    """``adjoint_options`` ``min_step``/``max_step`` bound the backward solve's steps (and
    not the forward's): y' = -y over [0, 1] with ``max_step = 0.01`` takes exactly 100
    backward steps (8 without), and over [0, 2] at rtol = atol = 1e-12 (112 without)
    ``min_step = 0.5`` takes 4; the gradient stays exp(-t1) (to 1e-3: steps of 0.5 accepted
    whatever their error)."""
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, t1], dtype=torch.float64)
    tol = {"rtol": 1e-12, "atol": 1e-12} if "min_step" in options else {}
    sol = neuralode.solve(lambda t, y: -y, y0, t, gradient="adjoint", adjoint_params=(),
                          adjoint_options=options, **tol)  # fmt: skip
    sol.ys[-1].sum().backward()
    assert int(sol.backward_stats.n_steps) == steps
    assert int(sol.stats.n_steps) not in (steps, 100)  # the forward solve is free
    torch.testing.assert_close(y0.grad, torch.full_like(y0, math.exp(-t1)), rtol=1e-3, atol=0)
