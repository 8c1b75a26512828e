"""torchdiffeq's fixed-grid options in the compatible entry points: ``grid_constructor`` (the
step times) and ``interp`` (``"linear"`` or ``"cubic"`` outputs between grid points), with
torchdiffeq's numbers where it is installed, and exact answers where the interpolation must be
exact."""

from __future__ import annotations

import pytest
import torch

from neuralode import odeint, odeint_adjoint

DTYPE = torch.float64
T = torch.tensor([0.0, 0.1, 0.45, 0.7, 1.0], dtype=DTYPE)  # off the grid of step 0.3


def test_linear_interpolation_of_a_linear_solution_is_exact() -> None:
    ys = odeint(
        lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=DTYPE), T, method="euler",
        options={"step_size": 0.3, "interp": "linear"},
    )  # fmt: skip
    torch.testing.assert_close(ys[:, 0], T, rtol=0, atol=1e-15)


def test_cubic_interpolation_of_a_cubic_solution_is_exact_and_linear_is_not() -> None:
    """y' = 3 t^2: rk4 is exact on the grid, and the cubic Hermite interpolant through the grid
    values and slopes is t^3 itself."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 3 * t**2 * torch.ones_like(y)

    y0 = torch.zeros(1, dtype=DTYPE)
    opts = {"step_size": 0.3}
    cubic = odeint(f, y0, T, method="rk4", options={**opts, "interp": "cubic"})
    torch.testing.assert_close(cubic[:, 0], T**3, rtol=0, atol=1e-14)
    linear = odeint(f, y0, T, method="rk4", options={**opts, "interp": "linear"})
    assert float((linear[:, 0] - T**3).abs().max()) > 1e-3


def test_grid_constructor_sets_the_steps() -> None:
    seen = {}

    def grid(func, y0, t):  # noqa: ANN001, ANN202
        seen["t"] = t
        return torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y

    y0 = torch.ones(2, dtype=DTYPE)
    ys = odeint(f, y0, T, method="rk4", options={"grid_constructor": grid})
    assert torch.equal(seen["t"], T)
    on_grid = odeint(f, y0, torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=DTYPE), method="rk4")
    torch.testing.assert_close(ys[-1], on_grid[-1], rtol=0, atol=0)
    # t = 0.45 lies in [0.2, 0.5]: linear between those grid values
    w = (0.45 - 0.2) / 0.3
    torch.testing.assert_close(ys[2], on_grid[1] + w * (on_grid[2] - on_grid[1]))


def test_reversed_time_and_tuple_states() -> None:
    def f(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (torch.ones_like(y[0]), 2 * torch.ones_like(y[1]))

    y0 = (torch.zeros(1, dtype=DTYPE), torch.zeros(2, dtype=DTYPE))
    tr = T.flip(0)
    ys = odeint(f, y0, tr, method="euler", options={"step_size": 0.3, "interp": "linear"})
    torch.testing.assert_close(ys[0][:, 0], tr - 1.0, rtol=0, atol=1e-15)
    torch.testing.assert_close(ys[1][:, 1], 2 * (tr - 1.0), rtol=0, atol=1e-15)


def test_adjoint_gradients_through_the_interpolation() -> None:
    k = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -k * y

    y0 = torch.tensor([1.0, 2.0], dtype=DTYPE)
    opts = {"step_size": 0.3, "interp": "cubic"}
    (g_bp,) = torch.autograd.grad(odeint(f, y0, T, method="rk4", options=opts).sum(), k)
    ys = odeint_adjoint(
        f, y0, T, method="rk4", options=opts, adjoint_params=(k,),
        adjoint_options={"step_size": 0.01},
    )  # fmt: skip
    (g_adj,) = torch.autograd.grad(ys.sum(), k)
    # the adjoint differentiates the exact flow, backprop rk4's steps of 0.3 (their difference,
    # O(h^4), measured 9e-5 relative)
    torch.testing.assert_close(g_adj, g_bp, rtol=1e-3, atol=0)


def test_bad_grid_options_are_refused() -> None:
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(1, dtype=DTYPE)
    with pytest.raises(ValueError, match="'linear' or 'cubic'"):
        odeint(f, y0, T, method="rk4", options={"step_size": 0.3, "interp": "quadratic"})
    with pytest.raises(ValueError, match="mutually exclusive"):
        odeint(
            f, y0, T, method="rk4",
            options={"step_size": 0.3, "grid_constructor": lambda f, y, t: t},
        )  # fmt: skip
    with pytest.raises(ValueError, match="from t\\[0\\] = 0.0 to t\\[-1\\] = 1.0"):
        odeint(
            f, y0, T, method="rk4",
            options={"grid_constructor": lambda f, y, t: torch.tensor([0.0, 0.5], dtype=DTYPE)},
        )  # fmt: skip
    with pytest.warns(UserWarning, match="grid_constructor"):  # adaptive: ignored, as torchdiffeq
        odeint(f, y0, T, method="dopri5", options={"grid_constructor": lambda f, y, t: t})


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_torchdiffeqs_numbers(interp: str) -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq")
    W = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ W.T) + torch.sin(t)

    y0 = torch.tensor([1.0, -0.5], dtype=DTYPE)
    opts = {"step_size": 0.3, "interp": interp}
    for ours, theirs in (("rk38", "rk4"), ("midpoint", "midpoint"), ("euler", "euler")):
        got = odeint(f, y0, T, method=ours, options=opts)
        want = torchdiffeq.odeint(f, y0, T, method=theirs, options=opts)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        rev = odeint(f, y0, T.flip(0), method=ours, options=opts)
        want = torchdiffeq.odeint(f, y0, T.flip(0), method=theirs, options=opts)
        torch.testing.assert_close(rev, want, rtol=1e-12, atol=1e-13)
