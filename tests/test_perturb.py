"""``perturb``: fixed steps see the field from inside themselves (torchdiffeq's option).

A stage at a step's start time is evaluated one ulp after it and a stage at its end one ulp
before it, so a field that jumps at grid times is seen from the side of the step being taken;
the adjoint's backward steps likewise, in the user's clock.  Ported from torchdiffeq's
``test_odeint_perturb`` (tests/odeint_tests.py), plus what it implies for values and gradients.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

import neuralode

F64 = torch.float64
FIXED = tuple(m for m in neuralode.METHODS if not neuralode.get_solver(m).adaptive)
#: Methods with no stage at a step's ends (the Gauss methods): they never see a grid time.
INTERIOR_NODES = ("implicit_midpoint", "gl4", "gl6")


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", FIXED)
def test_grid_times_are_never_evaluated_when_perturbed(
    adjoint: bool, dtype: torch.dtype, method: str
) -> None:
    for perturb in (True, False):
        x0 = torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
        t = torch.tensor([0.0, 1.0])
        ts: list[float] = []

        def f(t: torch.Tensor, x: torch.Tensor, ts: list[float] = ts) -> torch.Tensor:
            ts.append(t.item())
            return -x

        odeint: Any = (
            functools.partial(neuralode.odeint_adjoint, adjoint_params=())
            if adjoint
            else neuralode.odeint
        )
        xs = odeint(f, x0, t, method=method, options={"step_size": 0.5, "perturb": perturb})
        if perturb:
            assert 0.0 not in ts and 0.5 not in ts and 1.0 not in ts
        elif method not in INTERIOR_NODES:
            assert 0.0 in ts and 0.5 in ts
        if adjoint:
            ts.clear()
            xs.sum().backward()
            if perturb:
                assert 1.0 not in ts and 0.5 not in ts and 0.0 not in ts
            elif method not in INTERIOR_NODES:
                assert 1.0 in ts and 0.5 in ts


def _step(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """+1 before t = 0.5, -1 from it: a jump on the grid."""
    return torch.where(t < 0.5, 1.0, -1.0) * torch.ones_like(y)


@pytest.mark.parametrize("method", ["rk4", "implicit_euler", "radauIIA5", "trbdf2"])
def test_a_jump_on_the_grid_is_seen_from_each_step(method: str) -> None:
    """Up 0.5 then down 0.5: exact when each step sees its own side of the jump; without
    perturb the first step's end stage (t = 0.5: these methods have a node there) sees the
    second step's slope."""
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ys = neuralode.odeint(_step, y0, t, method=method, options={"perturb": True})
    torch.testing.assert_close(ys[:, 0], torch.tensor([0.0, 0.5, 0.0], dtype=F64))
    plain = neuralode.odeint(_step, y0, t, method=method)
    assert float((plain[1, 0] - 0.5).abs()) > 1e-3


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_outputs_inside_a_step_see_the_jump_from_inside_it(method: str) -> None:
    """The interpolant's evaluation at a step's end (``f(t + h, y1)``, its Hermite slope) is
    perturbed as the step's stages are: outputs inside the steps of 0.5 around a jump at 0.5
    are exact (the end slope from the right side of the jump put 0.375 at t = 0.25)."""
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64)
    ys = neuralode.odeint(_step, y0, t, method=method, options={"perturb": True, "step_size": 0.5})
    exact = torch.tensor([0.0, 0.25, 0.5, 0.25, 0.0], dtype=F64)
    torch.testing.assert_close(ys[:, 0], exact, rtol=0, atol=1e-15)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_gradients_of_a_perturbed_solve(gradient: str) -> None:
    """The checkpoint's replay sees the field as the recorded steps did (gradcheck), and the
    adjoint's backward steps are perturbed in the user's clock (close to backprop's)."""
    k = torch.tensor(0.8, dtype=F64, requires_grad=True)

    def fn(y0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.where(t < 0.5, 1.0, -2.0) * k * y

        return neuralode.solve(
            f,
            y0,
            torch.tensor([0.0, 1.0], dtype=F64),
            method="rk4",
            step_size=0.05,
            perturb=True,
            gradient=gradient,
            adjoint_params=None if gradient == "backprop" else (k,),
        ).ys

    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    if gradient == "adjoint":
        g_adj = torch.autograd.grad(fn(y0, k)[-1].sum(), (y0, k))
        g_bp = torch.autograd.grad(
            neuralode.solve(
                lambda t, y: torch.where(t < 0.5, 1.0, -2.0) * k * y,
                y0,
                torch.tensor([0.0, 1.0], dtype=F64),
                method="rk4",
                step_size=0.05,
                perturb=True,
            )
            .ys[-1]
            .sum(),
            (y0, k),
        )
        for a, b in zip(g_adj, g_bp):
            # the adjoint's rk4 steps against backprop's discrete map: O(h^4), measured 1.9e-6
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    else:
        assert torch.autograd.gradcheck(fn, (y0, k))


def test_perturb_is_for_unbatched_fixed_steps() -> None:
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(2, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(ValueError, match="jump_t"):
        neuralode.solve(f, y0, t, method="dopri5", perturb=True)
    with pytest.raises(ValueError, match="unbatched"):
        neuralode.solve(f, y0.view(2, 1), t, method="rk4", perturb=True, batched=True)
    with pytest.raises(TypeError, match="perturb"):
        neuralode.solve(f, y0, t, method="rk4", perturb=1)  # type: ignore[arg-type]
    # torchdiffeq's adaptive solvers do not take it either: a warning, and it is ignored
    with pytest.warns(UserWarning, match="perturb"):
        ys = neuralode.odeint(f, y0, t, method="dopri5", options={"perturb": True})
    torch.testing.assert_close(ys, neuralode.odeint(f, y0, t, method="dopri5"))


@pytest.mark.parametrize("method", ["rk4", "implicit_euler"])
@pytest.mark.parametrize("side", ["<", "<="])
def test_a_jump_at_a_grid_time_float32_cannot_hold(method: str, side: str) -> None:
    """The step's ends are compared in the time's own dtype: 0.3 is not a float32 number, and a
    jump there, whichever side owns the grid time itself, is still seen from each step's own
    side (``t < 0.3`` checks the first step's end, ``t <= 0.3`` the second step's start)."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        before = t < 0.3 if side == "<" else t <= 0.3
        return torch.where(before, 1.0, -1.0) * torch.ones_like(y)

    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.6], dtype=F64)
    ys = neuralode.odeint(f, y0, t, method=method, options={"perturb": True})
    torch.testing.assert_close(ys[:, 0], torch.tensor([0.0, 0.3, 0.0], dtype=F64))


@pytest.mark.parametrize("method", ["rk4", "midpoint", "radauIIA5"])
def test_perturb_moves_only_the_stages_at_a_steps_ends(method: str) -> None:
    """A smooth field gives the same solution perturbed or not, to round-off: only a stage at
    a step's start or end moves (by one ulp), the interior stages keep their times."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cos(3.0 * t) * y

    y0 = torch.tensor([1.0, -2.0], dtype=F64)
    t = torch.tensor([0.0, 0.7, 1.4], dtype=F64)
    kw: dict[str, Any] = {"method": method, "options": {"step_size": 0.35}}
    plain = neuralode.odeint(f, y0, t, **kw)
    kw["options"] = {**kw["options"], "perturb": True}
    moved = neuralode.odeint(f, y0, t, **kw)
    torch.testing.assert_close(moved, plain, rtol=1e-13, atol=1e-13)


def test_a_step_end_one_ulp_past_the_grid_time_is_still_its_end() -> None:
    """``1.9 + (6.8 - 1.9)`` is one ulp above 6.8: the end stage is found by a tolerance that
    scales with the times (a couple of ulps of the larger end), and seen from before the jump."""
    t0, t1 = 1.9, 6.8
    assert t0 + (t1 - t0) > t1

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(t < t1, 1.0, -1.0) * torch.ones_like(y)

    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([t0, t1], dtype=F64)
    ys = neuralode.odeint(f, y0, t, method="rk4", options={"perturb": True})
    torch.testing.assert_close(ys[-1, 0], torch.tensor(t1 - t0, dtype=F64))
    plain = neuralode.odeint(f, y0, t, method="rk4")  # its end stage sees the slope after
    assert float(plain[-1, 0]) < t1 - t0 - 1
