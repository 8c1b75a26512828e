"""Gradients through the solver are the derivatives of the solution, checked in float64.

What this proves:

* ``torch.autograd.gradcheck`` (finite differences vs autograd) passes through ``odeint`` with
  respect to the initial state, the parameters of a tanh MLP vector field and the output times,
  for every adaptive method; and with respect to ``y0`` and the parameters for every fixed-step
  method (there autograd differentiates the discrete map exactly, so the check is tight).
* The time gradient of a fixed-step method is the *exact flow's* (``f`` at the output time, and
  ``-Phi f(t0, y0)`` for ``t0``) while finite differences see the discrete map; the two differ by
  ``O(h^p)``.  ``rk4`` with a fine step agrees within a tolerance sized to that gap.
* The same holds for tuple states, decreasing time, per-sample grids ``t [batch, T]`` through
  ``solve``, and a float32 state with float64 time (checked against the float64 gradients).
* For ``y' = A y`` the gradient with respect to ``y0`` of ``<g, y(t)>`` is ``expm(A t)^T g``.
* Backprop through ``odeint`` agrees with hand-rolled central differences of a scalar loss.

The adaptive checks use tight tolerances (the analytic time gradient is the exact flow's, so the
discrete solution must be close to it) and ``eps=1e-5`` (small enough for the derivative, large
enough that step-size changes under perturbation stay below the check's tolerance).  Parameter
checks use gradcheck's ``fast_mode`` (random projections) to keep the run short; ``y0`` and ``t``
are checked column by column.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from conftest import ADAPTIVE, FIXED
from fields import _params, mlp
from torch.autograd import gradcheck

import neuralode

F64 = torch.float64
# Tolerance per adaptive method: tight enough that the discrete flow matches the exact one to
# well under gradcheck's atol, loose enough for the low-order bosh3 to stay quick.
# Tolerances per adaptive method: tight enough for gradcheck's finite differences (the solve's
# error must sit well below eps * gradient); the second-order pairs need many steps per decade.
TOL = {
    "adaptive_heun": 1e-6,
    "fehlberg2": 1e-8,
    "bosh3": 1e-8,
    "dopri5": 1e-10,
    "tsit5": 1e-10,
    "dopri8": 1e-11,
    "rosenbrock23": 1e-9,
    "rodas4": 1e-9,
    "rodas5p": 1e-10,
    "kvaerno3": 1e-7,
    "kvaerno5": 1e-10,
    "auto": 1e-10,  # tsit5 on these problems (they are not stiff)
}
GC = {"eps": 1e-5, "atol": 1e-6, "rtol": 1e-5}


def test_every_method_is_covered() -> None:
    assert set(ADAPTIVE) | set(FIXED) == set(neuralode.METHODS)
    assert set(ADAPTIVE) == set(TOL), "add a tolerance for the new adaptive method"


def _req(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.detach().clone().requires_grad_() for x in xs)


Y0 = torch.tensor([0.3, -0.2], dtype=F64)
T_INC = torch.tensor([0.0, 0.4, 1.0], dtype=F64)


# --------------------------------------------------------------------------- adaptive methods
@pytest.mark.parametrize("method", ADAPTIVE)
def test_gradcheck_adaptive_y0_and_t(method: str) -> None:
    params = _params()
    tol = TOL[method]

    def fn(y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(params), y0, t, method=method, rtol=tol, atol=tol)

    assert gradcheck(fn, _req(Y0, T_INC), **GC)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_gradcheck_adaptive_params(method: str) -> None:
    tol = TOL[method]

    def fn(*params: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(params), Y0, T_INC, method=method, rtol=tol, atol=tol)

    assert gradcheck(fn, _req(*_params()), fast_mode=True, **GC)


# --------------------------------------------------------------------------- fixed-step methods
@pytest.mark.parametrize("method", FIXED)
def test_gradcheck_fixed_y0_and_params(method: str) -> None:
    # The step sequence does not depend on y0 or the parameters, so autograd differentiates the
    # very map finite differences see: a tight check at any step size.
    def fn(y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(params), y0, T_INC, method=method, options={"step_size": 0.1})

    assert gradcheck(fn, _req(Y0, *_params()), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_fixed_grid_mode_y0() -> None:
    # Without step_size the fixed-step methods take one step per output interval.
    params = _params()

    def fn(y0: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(params), y0, T_INC, method="rk4")

    assert gradcheck(fn, _req(Y0), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_rk4_time_matches_exact_flow_within_discretisation_error() -> None:
    # The t-gradient is analytic: f(t_i, y_i) for an output time and -Phi(t_i, t_0) f(t_0, y_0)
    # for t_0, the derivative of the *exact* flow.  Finite differences see the discrete map of
    # rk4, whose derivative in t differs by O(h^4) (and by the Hermite interpolant's O(h^3) for
    # outputs inside a step).  Measured on this field: 1.3e-5 at h = 0.1, 9e-7 at h = 0.05,
    # 1.4e-10 at h = 0.01; so at h = 0.01 atol=1e-7 tests the formula while allowing for the
    # gap, and a wrong time gradient would be off by O(1).
    params = _params()

    def fn(t: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(params), Y0, t, method="rk4", options={"step_size": 0.01})

    assert gradcheck(fn, _req(torch.tensor([0.0, 0.37, 1.0], dtype=F64)), eps=1e-5, atol=1e-7)

    # ... and a coarse step exposes the gap, so the check above is not vacuous.
    def coarse(t: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(params), Y0, t, method="euler", options={"step_size": 0.25})

    assert not gradcheck(
        coarse,
        _req(torch.tensor([0.0, 0.37, 1.0], dtype=F64)),
        eps=1e-5,
        atol=1e-5,
        raise_exception=False,
    )


# Per fixed-step method: a step fine enough that the discrete map's t-derivative is within the
# check's tolerance of the exact flow's (gap O(h^p)), and that tolerance.
# Measured gaps: euler 3.8e-4 at h = 1e-3, midpoint 9.6e-6 and heun ~3e-5 at h = 1e-2, against
# derivatives of size 0.8 (a wrong formula is off by O(1)).
FIXED_T_CHECK = {
    "euler": (1e-3, 1e-3),
    "midpoint": (1e-2, 5e-5),
    "heun": (1e-2, 1e-4),
    "heun3": (1e-2, 1e-5),
    "rk38": (1e-2, 1e-6),
    # The implicit methods at coarser steps (each step is a Newton solve; gaps measured:
    # implicit_euler 7.8e-3 at h = 1e-2; implicit_midpoint 2.6e-4, trapezoid 4.4e-4, sdirk2
    # 5.6e-5, trbdf2 2.2e-4, radauIIA3 3.0e-6 at 5e-2; radauIIA5, gl4, gl6 1.3e-5 at 0.1).
    "implicit_euler": (1e-2, 3e-2),
    "implicit_midpoint": (5e-2, 2e-3),
    "trapezoid": (5e-2, 2e-3),
    "sdirk2": (5e-2, 5e-4),
    "trbdf2": (5e-2, 2e-3),
    "radauIIA3": (5e-2, 3e-5),
    "radauIIA5": (1e-1, 1e-4),
    "gl4": (1e-1, 1e-4),
    "gl6": (1e-1, 1e-4),
    # Measured gaps 2e-8 (explicit) and 2e-9 (implicit) at h = 1e-2.
    "explicit_adams": (1e-2, 1e-6),
    "implicit_adams": (1e-2, 1e-6),
}


@pytest.mark.parametrize("method", [m for m in FIXED if m != "rk4"])  # rk4: the test above
def test_gradcheck_fixed_time_matches_exact_flow(method: str) -> None:
    """Every fixed-step method's time gradient (an output inside a step, one on the end, t0).
    The last time, 1.00005, keeps the number of steps the same under gradcheck's perturbation
    (a step more or less would put a jump in the discrete map)."""
    h, atol = FIXED_T_CHECK[method]
    params = _params()

    def fn(t: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(params), Y0, t, method=method, options={"step_size": h})

    t = _req(torch.tensor([0.0, 0.37, 1.00005], dtype=F64))
    assert gradcheck(fn, t, eps=1e-5, atol=atol)


# --------------------------------------------------------------------------- state layouts
def test_gradcheck_tuple_state() -> None:
    # y = (a, b) with a' = tanh(W b) * a, b' = -a + t: a coupled tuple state of two shapes.
    g = torch.Generator().manual_seed(1)
    w = 0.5 * torch.randn(2, 3, generator=g, dtype=F64)

    def fn(
        a0: torch.Tensor, b0: torch.Tensor, w: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        def f(tt: torch.Tensor, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            a, b = y
            return torch.tanh(w @ b) * a, -a.sum() + tt + 0.1 * b

        return neuralode.odeint(f, (a0, b0), t, rtol=1e-10, atol=1e-10)

    a0 = torch.tensor([0.5, -0.4], dtype=F64)
    b0 = torch.tensor([0.1, 0.2, -0.3], dtype=F64)
    assert gradcheck(fn, _req(a0, b0, w, T_INC), **GC)


def test_gradcheck_decreasing_time() -> None:
    t_dec = torch.tensor([1.0, 0.3, -0.5], dtype=F64)
    params = _params()

    def fn(y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(params), y0, t, rtol=1e-10, atol=1e-10)

    assert gradcheck(fn, _req(Y0, t_dec), **GC)

    def fn_p(*p: torch.Tensor) -> torch.Tensor:
        return neuralode.odeint(mlp(p), Y0, t_dec, rtol=1e-10, atol=1e-10)

    assert gradcheck(fn_p, _req(*params), fast_mode=True, **GC)


def test_gradcheck_per_sample_grids() -> None:
    # Three rows with their own grids, one of them decreasing: gradients reach each row's y0
    # and times without leaking into the other rows (gradcheck checks the full Jacobian).
    y0 = torch.tensor([[0.3, -0.2], [0.0, 0.5], [-0.4, 0.1]], dtype=F64)
    t = torch.tensor([[0.0, 0.4, 1.0], [0.2, 0.5, 0.6], [1.0, 0.7, -0.2]], dtype=F64)
    params = _params()

    def fn(y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return neuralode.solve(mlp(params), y0, t, rtol=1e-10, atol=1e-10).ys

    assert gradcheck(fn, _req(y0, t), **GC)

    def fn_p(*p: torch.Tensor) -> torch.Tensor:
        return neuralode.solve(mlp(p), y0, t, rtol=1e-10, atol=1e-10).ys

    assert gradcheck(fn_p, _req(*_params()), fast_mode=True, **GC)


def test_float32_state_float64_time_gradients_match_float64() -> None:
    def grads(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        params = tuple(p.to(dtype).requires_grad_() for p in _params())
        y0 = Y0.to(dtype).requires_grad_()
        t = T_INC.clone().requires_grad_()  # float64 time in both cases
        ys = neuralode.odeint(mlp(params), y0, t, rtol=1e-6, atol=1e-6)
        assert ys.dtype == dtype
        loss = (ys**2).sum() + ys[-1, 0]
        out = torch.autograd.grad(loss, (y0, t, *params))
        return out

    g32, g64 = grads(torch.float32), grads(F64)
    assert g32[1].dtype == F64, "the time gradient keeps the time's dtype"
    for a, b in zip(g32, g64):
        assert a.dtype in (torch.float32, F64)
        torch.testing.assert_close(a.to(F64), b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("method", ADAPTIVE)
def test_linear_ode_y0_gradient_is_transposed_matrix_exponential(method: str) -> None:
    a = torch.tensor([[-0.5, 1.0, 0.0], [-1.0, -0.2, 0.3], [0.1, 0.0, -0.3]], dtype=F64)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    y0 = torch.tensor([1.0, -0.5, 0.25], dtype=F64, requires_grad=True)
    g = torch.tensor([[0.0, 0.0, 0.0], [0.3, -1.0, 2.0], [1.0, 0.5, -0.7]], dtype=F64)
    tol = TOL[method]
    ys = neuralode.odeint(lambda _t, y: a @ y, y0, t, method=method, rtol=tol, atol=tol)
    (grad,) = torch.autograd.grad((ys * g).sum(), y0)
    expected = sum(torch.linalg.matrix_exp(a * t[i]).T @ g[i] for i in range(len(t)))
    # rosenbrock23's global error is ~450 tolerance units here (an order-2 method over ~10^3
    # steps; tests/test_reference.py), the others' under 300.
    units = 1000 if method == "rosenbrock23" else 300
    torch.testing.assert_close(grad, expected, rtol=units * tol, atol=units * tol)


def test_backprop_matches_central_differences_for_scalar_loss() -> None:
    params = list(_params(hidden=3, seed=3))
    y0 = torch.tensor([0.7, -0.1], dtype=F64)
    t = torch.linspace(0.0, 1.5, 5, dtype=F64)
    target = torch.tensor([0.2, 0.4], dtype=F64)

    def loss(ps: Sequence[torch.Tensor]) -> torch.Tensor:
        ys = neuralode.odeint(mlp(ps), y0, t, method="dopri8", rtol=1e-12, atol=1e-12)
        return ((ys - target) ** 2).mean()

    ps = [p.clone().requires_grad_() for p in params]
    auto = torch.autograd.grad(loss(ps), ps)
    eps = 1e-6
    for k, p in enumerate(params):
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            plus = [q.clone() for q in params]
            minus = [q.clone() for q in params]
            plus[k].view(-1)[i] += eps
            minus[k].view(-1)[i] -= eps
            with torch.no_grad():
                fd.view(-1)[i] = (loss(plus) - loss(minus)) / (2 * eps)
        torch.testing.assert_close(auto[k], fd, rtol=1e-6, atol=1e-9)


def test_a_strategy_without_settings_shows_its_name() -> None:
    from neuralode.gradients import Backprop

    assert repr(Backprop()) == "Backprop()"


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_parameter_used_through_a_tensor_computed_before_the_solve(gradient: str) -> None:
    """``k = log_k.exp()`` computed once, the field using ``k``, ``adjoint_params=(log_k,)``: the
    piece of graph from ``log_k`` to ``k`` serves every backward step (it raised "Trying to
    backward through the graph a second time" at the second step before)."""
    log_k = torch.tensor([0.1, -0.3], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    grads = {}
    for name in ("backprop", gradient):
        k = log_k.exp()
        kw = {} if name == "backprop" else {"adjoint_params": (log_k,)}
        sol = neuralode.solve(
            lambda _t, y, k=k: -k * y**2, y0, t, rtol=1e-10, atol=1e-10, gradient=name, **kw
        )
        assert int(sol.stats.n_accepted) > 2
        (grads[name],) = torch.autograd.grad(sol.ys.sum(), log_k)
    torch.testing.assert_close(grads[gradient], grads["backprop"], rtol=1e-7, atol=1e-9)
