"""Complex states (``torch.complex64/128``), as torchdiffeq accepts them: solved as real pairs,
returned complex, differentiable with every gradient strategy."""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode import odeint, odeint_adjoint

C128 = torch.complex128
F64 = torch.float64
T = torch.linspace(0.0, 2.0, 5, dtype=F64)


def _rotating(a: torch.Tensor, w: torch.Tensor):
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (-a + 1j * w) * y

    return f


def test_exact_solution_and_dtype() -> None:
    y0 = torch.tensor([1.0 + 0.0j, 0.5j], dtype=C128)
    a, w = torch.tensor(0.3, dtype=F64), torch.tensor(2.0, dtype=F64)
    ys = odeint(_rotating(a, w), y0, T, rtol=1e-9, atol=1e-11)
    assert ys.dtype == C128 and ys.shape == (5, 2)
    exact = torch.exp((-a + 1j * w) * T).unsqueeze(-1) * y0
    torch.testing.assert_close(ys, exact, rtol=1e-8, atol=1e-9)
    y32 = odeint(_rotating(a, w), y0.to(torch.complex64), T.float(), rtol=1e-5, atol=1e-6)
    assert y32.dtype == torch.complex64


def test_batched_dense_tuple_and_per_component_tolerances() -> None:
    a, w = torch.tensor(0.3, dtype=F64), torch.tensor(2.0, dtype=F64)
    y0 = torch.tensor([[1.0 + 0.0j], [0.5j]], dtype=C128)
    sol = neuralode.solve(_rotating(a, w), y0, T, batched=True, dense=True, rtol=1e-9, atol=1e-11)
    exact = torch.exp((-a + 1j * w) * T).view(1, -1, 1) * y0.unsqueeze(1)
    torch.testing.assert_close(sol.ys, exact, rtol=1e-8, atol=1e-9)
    mid = sol.evaluate(torch.tensor(0.7, dtype=F64))
    assert mid.dtype == C128
    torch.testing.assert_close(mid, torch.exp((-a + 1j * w) * 0.7) * y0, rtol=1e-7, atol=1e-8)

    def g(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (1j * y[0], -y[1])

    y = (torch.tensor([1.0 + 0j], dtype=C128), torch.tensor([2.0], dtype=F64))
    z, x = odeint(g, y, T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(z[:, 0], torch.exp(1j * T).to(C128), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(x[:, 0], 2 * torch.exp(-T), rtol=1e-8, atol=1e-9)
    atol = torch.tensor([1e-11, 1e-3], dtype=F64)  # per component, of the complex state
    ys = odeint(_rotating(a, w), y0[:, 0], T, rtol=1e-9, atol=atol)
    assert ys.dtype == C128


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_gradients(gradient: str) -> None:
    y0 = torch.tensor([1.0 + 0.5j, -0.5j], dtype=C128)

    def run(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        kw = {} if gradient == "backprop" else {"adjoint_params": (a, w)}
        sol = neuralode.solve(
            _rotating(a, w), y0, T, rtol=1e-10, atol=1e-12, gradient=gradient, **kw
        )
        return torch.view_as_real(sol.ys)

    a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    w = torch.tensor(2.0, dtype=F64, requires_grad=True)
    if gradient == "adjoint":  # the exact flow's gradient: against the analytic one
        (ga, gw) = torch.autograd.grad(run(a, w).sum(), (a, w))
        exact = lambda a, w: torch.view_as_real(  # noqa: E731
            torch.exp((-a + 1j * w) * T).unsqueeze(-1) * y0
        ).sum()
        (ea, ew) = torch.autograd.grad(exact(a, w), (a, w))
        torch.testing.assert_close((ga, gw), (ea, ew), rtol=1e-6, atol=1e-8)
    else:
        assert torch.autograd.gradcheck(run, (a, w), atol=1e-6, rtol=1e-5)


def test_a_complex_part_after_a_real_one() -> None:
    """A tuple (real scalar, complex scalar): the complex part of the flattened state starts at
    an odd offset, where a complex view of the storage is impossible (found by hypothesis:
    'Tensor must have a storage_offset divisible by 2')."""
    y0 = (torch.tensor(-1.0, dtype=torch.float32), torch.tensor(-1.0 + 0.0j))
    ts = torch.tensor([0.0, 0.5])
    a, b = odeint(lambda t, y: (-y[0], -y[1]), y0, ts, rtol=1e-7, atol=1e-8)
    assert b.dtype == torch.complex64
    torch.testing.assert_close(b[1], y0[1] * torch.exp(torch.tensor(-0.5)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[1], y0[0] * torch.exp(torch.tensor(-0.5)), rtol=1e-5, atol=1e-6)


def test_complex_states_need_complex_fields_and_refuse_jac() -> None:
    y0 = torch.tensor([1.0 + 0j], dtype=C128)
    with pytest.raises(ValueError, match="must return a complex tensor"):
        odeint(lambda t, y: y.real, y0, T)
    with pytest.raises(ValueError, match="jac is not supported with complex states"):
        neuralode.solve(lambda t, y: y, y0, T, method="rodas5p", jac=lambda t, y: y)
    with pytest.raises(TypeError, match="adjoint_params"):  # a plain function's parameters
        odeint_adjoint(lambda t, y: 1j * y, y0, T)


def test_against_torchdiffeq() -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq")
    a, w = torch.tensor(0.3, dtype=F64), torch.tensor(2.0, dtype=F64)
    y0 = torch.tensor([1.0 + 0.0j, 0.5j], dtype=C128)
    ours = odeint(_rotating(a, w), y0, T, method="rk4", options={"step_size": 0.1})
    theirs = torchdiffeq.odeint(_rotating(a, w), y0, T, method="euler", options={"step_size": 1e-4})
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)  # both near the exact flow
    fixed = odeint(_rotating(a, w), y0, T, method="rk38", options={"step_size": 0.1})
    want = torchdiffeq.odeint(_rotating(a, w), y0, T, method="rk4", options={"step_size": 0.1})
    torch.testing.assert_close(fixed, want, rtol=1e-12, atol=1e-13)  # the same fixed steps
