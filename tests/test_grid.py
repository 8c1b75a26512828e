"""One grid over method x gradient strategy x layout: every combination solves and differentiates.

Layouts: a tensor state on increasing times, a tuple state, per-sample grids (``t: [B, T]``, one
row decreasing), and decreasing times.  For each method and layout:

* the three strategies give the same outputs (the forward solve is the same loop);
* ``"checkpoint"`` gives backprop's gradients (to 1e-9: it differentiates the same discrete
  solution);
* ``"adjoint"`` gives the gradient of the exact flow: within a bound set by the method's
  accuracy of backprop's gradient (tight for adaptive methods at rtol 1e-9, looser for fixed
  steps, whose discrete gradient differs from the exact one by the discretisation error);
* the gradients reach ``y0``, the parameters and ``t``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_METHODS, GRADIENTS
from fields import _params, mlp

import neuralode

F64 = torch.float64
LAYOUTS = ("tensor", "tuple", "per_sample", "decreasing")
# Fixed steps of 0.02: the adjoint's (exact-flow) gradient differs from backprop's (discrete)
# gradient by the method's global error, O(h^p).
# The second-order pairs run at a looser tolerance (at 1e-9 they take ~10^4 steps a solve), with
# a bound to match (measured: adaptive_heun 1.5e-6 at 1e-5, fehlberg2 2.6e-6 at 1e-7).
ADJOINT_BOUND = {
    "euler": 5e-2,
    "midpoint": 2e-3,
    "heun": 2e-3,
    "heun3": 1e-4,
    "rk4": 1e-6,
    "rk38": 1e-6,
    "adaptive_heun": 1e-5,
    "fehlberg2": 2e-5,
    "rosenbrock23": 1e-5,  # measured 2.0e-6 and 2.5e-6 at 1e-7 (tensor, per_sample)
    # Fixed-step implicit methods, as their explicit peers of the same order (measured relative
    # gaps: implicit_euler 2.5e-3, trapezoid 5.2e-6, sdirk2 1.5e-6, trbdf2 4.3e-6 at most).
    "implicit_euler": 5e-2,
    "implicit_midpoint": 2e-3,
    "trapezoid": 2e-3,
    "sdirk2": 2e-3,
    "trbdf2": 2e-3,
    "radauIIA3": 1e-4,
}
RTOL = {"adaptive_heun": 1e-5, "fehlberg2": 1e-7, "rosenbrock23": 1e-7, "kvaerno3": 1e-7}


def _problem(layout: str):
    params = tuple(p.clone().requires_grad_(True) for p in _params(dim=2, hidden=5, seed=3))
    f = mlp(params)
    if layout == "per_sample":
        y0 = torch.tensor([[0.4, -0.3], [1.0, 0.2], [-0.5, 0.8]], dtype=F64)
        t = torch.tensor([[0.0, 0.3, 0.9], [0.5, 0.8, 1.4], [1.0, 0.6, 0.2]], dtype=F64)
    else:
        y0 = torch.tensor([0.4, -0.3], dtype=F64)
        t = torch.tensor([0.0, 0.3, 0.9], dtype=F64)
        if layout == "decreasing":
            t = t.flip(0) + 0.2
    y0 = y0.requires_grad_(True)
    t = t.requires_grad_(True)
    if layout == "tuple":

        def f_tuple(tt, y):
            out = f(tt, torch.cat(y, dim=-1))
            return out[..., :1], out[..., 1:]

        return f_tuple, (y0[:1], y0[1:]), t, params, y0
    return f, y0, t, params, y0


def _solve(method: str, layout: str, gradient: str):
    func, y_init, t, params, leaf = _problem(layout)
    adaptive = neuralode.get_solver(method).adaptive
    rtol = RTOL.get(method, 1e-9)
    kw = dict(rtol=rtol, atol=rtol / 100) if adaptive else dict(step_size=0.02)
    if gradient != "backprop":
        kw["adjoint_params"] = params
    sol = neuralode.solve(func, y_init, t, method=method, gradient=gradient, **kw)
    ys = torch.cat(sol.ys, dim=-1) if layout == "tuple" else sol.ys
    weights = torch.linspace(0.5, 1.5, ys.numel(), dtype=F64).view(ys.shape)
    loss = (ys * weights).sum() + (ys**2).sum()
    grads = torch.autograd.grad(loss, (leaf, t, *params))
    return ys.detach(), grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_strategy_on_every_layout(method: str, layout: str) -> None:
    # A multistep method refuses the checkpoint strategy (tests/test_adams.py).
    multistep = neuralode.get_solver(method).multistep
    results = {
        g: _solve(method, layout, g) for g in GRADIENTS if g != "checkpoint" or not multistep
    }
    ys_ref, g_ref = results["backprop"]
    for name, (ys, grads) in results.items():
        torch.testing.assert_close(ys, ys_ref, rtol=1e-12, atol=1e-12, msg=name)
        for g in grads:
            assert torch.isfinite(g).all()
    for a, b in zip(results["checkpoint"][1] if not multistep else (), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # Relative to the largest gradient: a small one (a bias's) can lose most of its digits to
    # a fixed step's discretisation error while the gradient as a whole keeps them.
    bound = ADJOINT_BOUND.get(method, 1e-6) * max(float(b.abs().max()) for b in g_ref)
    for a, b in zip(results["adjoint"][1], g_ref):
        assert float((a - b).abs().max()) <= bound, (method, layout)
    # The gradient reaches t (every output time moves the loss).
    assert float(g_ref[1].abs().min()) > 0
