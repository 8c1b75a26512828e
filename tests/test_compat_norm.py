"""``odeint_adjoint(..., adjoint_options={"norm": callable})``, called as torchdiffeq calls it:
with ``(t, y, adj_y, *adj_params)`` for a tensor state and ``(t, *y, *adj_y, *adj_params)`` for a
tuple state, each part in its own shape (torchdiffeq's tests/norm_tests.py, test_adjoint_norm)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import neuralode

F64 = torch.float64


def _params() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        (0.3 * torch.randn(7, generator=g, dtype=F64)).requires_grad_(),
        torch.tensor(0.4, dtype=F64, requires_grad=True),
    )


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().sqrt()


def test_tensor_state_norm_gets_torchdiffeq_layout() -> None:
    p1, p2 = _params()
    seen: list[tuple[tuple[int, ...], ...]] = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -p2 * y + p1.sum() * torch.sin(t)

    def adjoint_norm(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        assert isinstance(state, tuple) and len(state) == 5
        seen.append(tuple(tuple(s.shape) for s in state))
        return torch.stack([x.abs().max() for x in state]).max()

    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=F64)
    t = torch.linspace(0, 1, 4, dtype=F64)
    ys = neuralode.odeint_adjoint(
        f, y0, t, adjoint_params=(p1, p2), adjoint_options={"norm": adjoint_norm}
    )
    g_adj = torch.autograd.grad(ys.sum(), (p1, p2))
    assert seen and set(seen) == {((), (2, 2), (2, 2), (7,), ())}
    ys_ref = neuralode.odeint(f, y0, t)
    g_ref = torch.autograd.grad(ys_ref.sum(), (p1, p2))
    for a, b in zip(g_adj, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tuple_state_norm_gets_each_part() -> None:
    p1, p2 = _params()
    seen: list[tuple[tuple[int, ...], ...]] = []

    def f(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        a, b = y
        return -p2 * a + b.mean(), p1[:4].view(2, 2) * a - b

    def adjoint_norm(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        seen.append(tuple(tuple(s.shape) for s in state))
        t, ya, yb, adj_ya, adj_yb, g1, g2 = state
        parts = [ya.abs(), _rms(yb), adj_ya.abs(), _rms(adj_yb), _rms(g1), g2.abs()]
        return torch.stack(parts).max()

    y0 = (torch.tensor(1.0, dtype=F64), torch.tensor([[0.5, 0.5], [0.1, 0.1]], dtype=F64))
    t = torch.linspace(0, 1, 3, dtype=F64)
    ys = neuralode.odeint_adjoint(
        f, y0, t, adjoint_params=(p1, p2), adjoint_options={"norm": adjoint_norm}
    )
    g_adj = torch.autograd.grad(ys[0].sum() + ys[1].sum(), (p1, p2))
    assert seen and set(seen) == {((), (), (2, 2), (), (2, 2), (7,), ())}
    ref = neuralode.odeint(f, y0, t)
    g_ref = torch.autograd.grad(ref[0].sum() + ref[1].sum(), (p1, p2))
    for a, b in zip(g_adj, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_larger_norm_takes_more_backward_steps() -> None:
    """The norm is the backward solve's step-size control: ten times the max norm must take
    more evaluations than the max norm itself (torchdiffeq's test_large_norm, backwards)."""
    p1, p2 = _params()
    calls = {"n": 0}

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return -p2 * y + torch.tanh(p1[:2] * y) * torch.cos(3 * t)

    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)

    def backward_calls(scale: float) -> int:
        def norm(state: tuple[Any, ...]) -> torch.Tensor:
            return scale * torch.stack([x.abs().max() for x in state]).max()

        ys = neuralode.odeint_adjoint(
            f,
            y0,
            t,
            rtol=1e-6,
            atol=1e-8,
            adjoint_params=(p1, p2),
            adjoint_options={"norm": norm},
        )
        calls["n"] = 0
        ys.sum().backward()
        return calls["n"]

    assert backward_calls(10.0) > backward_calls(1.0)


def test_a_bad_adjoint_norm_names_the_choices() -> None:
    with pytest.raises(ValueError, match="callable"):
        neuralode.solve(
            lambda t, y: -y,
            torch.ones(2, dtype=F64),
            torch.linspace(0, 1, 3, dtype=F64),
            gradient="adjoint",
            adjoint_params=(),
            adjoint_options={"norm": "l7"},
        )


# --------------------------------------------------------------------------- grid_points, eps
def _kinked(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y' = 1 before t = 1 and -1 after (tests/test_step_times.py's jump)."""
    return torch.where(t < 1.0, 1.0, -1.0) * torch.ones_like(y)


@pytest.mark.parametrize(("eps", "key"), [(0.0, "step_t"), (1e-5, "jump_t"), (None, "jump_t")])
def test_grid_points_and_eps_are_read_as_step_t_or_jump_t(eps: Any, key: str) -> None:
    """torchdiffeq before 0.2.0 named step times grid_points, with eps the perturbation either
    side of them: the same solve as today's name, and a FutureWarning that says which."""
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    opts: dict[str, Any] = {"grid_points": torch.tensor([1.0], dtype=F64)}
    if eps is not None or key == "jump_t":
        opts["eps"] = eps
    with pytest.warns(FutureWarning, match=f"read as {key}"):
        old = neuralode.odeint(_kinked, y0, t, options=opts)
    new = neuralode.odeint(_kinked, y0, t, options={key: torch.tensor([1.0], dtype=F64)})
    assert torch.equal(old, new)
    # Up 1, down 1: exact where each side of the jump is seen from its own side (jump_t); with
    # eps = 0 the step ending at 1 sees the right side at t = 1 in its last stage.
    assert abs(float(old[-1, 0])) < (1e-12 if key == "jump_t" else 1e-6)


def test_grid_points_with_a_fixed_step_method_warns_and_is_ignored() -> None:
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    with pytest.warns(UserWarning, match="grid_points"):
        ys = neuralode.odeint(
            _kinked, y0, t, method="rk4", options={"grid_points": torch.tensor([1.0])}
        )
    assert torch.equal(ys, neuralode.odeint(_kinked, y0, t, method="rk4"))


def test_grid_points_beside_its_new_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="grid_points"):
        neuralode.odeint(
            _kinked,
            torch.zeros(1, dtype=F64),
            torch.tensor([0.0, 2.0], dtype=F64),
            options={"grid_points": [1.0], "step_t": [1.0]},
        )


def test_grid_points_odds_and_ends() -> None:
    """A 0-dim tensor eps of 0 is eps = 0 (step_t); eps with a fixed-step method, or beside a
    grid_points of None, is warned about as the unknown option it then is (found in review)."""
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    gp = torch.tensor([1.0], dtype=F64)
    with pytest.warns(FutureWarning, match="read as step_t"):
        neuralode.odeint(_kinked, y0, t, options={"grid_points": gp, "eps": torch.tensor(0.0)})
    with pytest.warns(UserWarning, match="'eps'"):
        neuralode.odeint(_kinked, y0, t, method="rk4", options={"grid_points": gp, "eps": 0.1})
    with pytest.warns(UserWarning, match="'eps'"):
        neuralode.odeint(_kinked, y0, t, options={"grid_points": None, "eps": 0.1})
