"""gradient="checkpoint" gives the gradients of backprop through the solver, to round-off.

What this proves:

* For every method (fixed steps with and without ``step_size``), and for batched per-sample grids
  with a decreasing row, the gradients for ``y0``, ``t`` and every parameter equal those of
  ``gradient="backprop"`` to 1e-12 (float64) -- the replayed steps are the forward's steps.
* ``torch.autograd.gradcheck`` passes through the checkpointed solve for ``y0``, ``t`` and a weight.
* Tuple states work; the forward solve keeps no autograd graph of its stages (its output's only
  graph node is the checkpoint function); bad ``adjoint_params`` are refused as for the adjoint.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_METHODS

import neuralode
from neuralode import get_solver

F64 = torch.float64


class Field(torch.nn.Module):
    """A non-autonomous tanh MLP; rows of a batch are independent (time broadcast per row)."""

    def __init__(self, dim: int = 3, hidden: int = 12) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=F64) * 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=F64) * 0.5)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ self.w1) @ self.w2 * torch.cos(t).unsqueeze(-1)


def _grads(
    field: Field, y0: torch.Tensor, t: torch.Tensor, w: torch.Tensor, gradient: str, **kw: object
) -> list[torch.Tensor]:
    y0 = y0.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    field.zero_grad(set_to_none=True)
    sol = neuralode.solve(field, y0, t, gradient=gradient, **kw)  # type: ignore[arg-type]
    (sol.ys * w).sum().backward()
    return [y0.grad, t.grad] + [p.grad for p in field.parameters()]  # type: ignore[list-item]


def _kw(method: str, step_size: float | None) -> dict[str, object]:
    kw: dict[str, object] = {"method": method, "rtol": 1e-6, "atol": 1e-6}
    if not get_solver(method).adaptive:
        kw["step_size"] = step_size
    return kw


# Multistep methods (the Adams methods) refuse the checkpoint strategy: tests/test_adams.py.
REPLAYABLE = [m for m in ALL_METHODS if not get_solver(m).multistep]
CASES = [(m, 0.07) for m in REPLAYABLE] + [
    (m, None)
    for m in REPLAYABLE
    if not get_solver(m).adaptive  # one step per output interval
]


@pytest.mark.parametrize(("method", "step_size"), CASES)
def test_equals_backprop_unbatched(method: str, step_size: float | None) -> None:
    field = Field()
    y0 = torch.tensor([0.3, -0.8, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.3, 2.0], dtype=F64)
    w = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    a = _grads(field, y0, t, w, "backprop", **_kw(method, step_size))
    b = _grads(field, y0, t, w, "checkpoint", **_kw(method, step_size))
    for x, z in zip(a, b):
        torch.testing.assert_close(z, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["rk4", "bosh3", "dopri5", "dopri8"])
def test_equals_backprop_per_sample_grids(method: str) -> None:
    field = Field()
    y0 = torch.tensor([[0.3, -0.8, 0.5], [1.0, 0.2, -0.4], [-0.6, 0.1, 0.9]], dtype=F64)
    t = torch.stack([torch.linspace(0, 1, 4), torch.linspace(1, 3, 4), torch.linspace(2, 0, 4)]).to(
        F64
    )
    w = torch.randn(3, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    a = _grads(field, y0, t, w, "backprop", **_kw(method, 0.1))
    b = _grads(field, y0, t, w, "checkpoint", **_kw(method, 0.1))
    for x, z in zip(a, b):
        torch.testing.assert_close(z, x, rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    w = torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([0.4, -0.7], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, requires_grad=True)

    def run(y0: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        sol = neuralode.solve(
            lambda s, y: torch.tanh(y @ w) * (1 + s),
            y0,
            t,
            rtol=1e-12,
            atol=1e-12,
            gradient="checkpoint",
            adjoint_params=(w,),
        )
        return sol.ys

    assert torch.autograd.gradcheck(run, (y0, t, w), eps=1e-6, atol=1e-5)


def test_tuple_state() -> None:
    a0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    b0 = torch.tensor([0.0], dtype=F64, requires_grad=True)
    sol = neuralode.solve(
        lambda t, y: (y[1], -y[0]),
        (a0, b0),
        torch.tensor([0.0, 1.0], dtype=F64),
        rtol=1e-10,
        atol=1e-10,
        gradient="checkpoint",
        adjoint_params=(),
    )
    sol.ys[0][-1].sum().backward()  # y_a(1) = a0 cos 1 + b0 sin 1
    one = torch.tensor(1.0, dtype=F64)
    torch.testing.assert_close(a0.grad, torch.cos(one).reshape(1), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b0.grad, torch.sin(one).reshape(1), rtol=1e-8, atol=1e-8)


def test_forward_keeps_no_stage_graph() -> None:
    field = Field()
    y0 = torch.tensor([0.3, -0.8, 0.5], dtype=F64, requires_grad=True)
    sol = neuralode.solve(field, y0, torch.tensor([0.0, 2.0], dtype=F64), gradient="checkpoint")
    assert type(sol.ys.grad_fn).__name__ == "_CheckpointFnBackward"


def test_bad_params() -> None:
    y0 = torch.ones(2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(TypeError, match="adjoint_params"):
        neuralode.solve(lambda s, y: -y, y0, t, gradient="checkpoint")
    with pytest.raises(ValueError, match="does not require grad"):
        neuralode.solve(
            lambda s, y: -y, y0, t, gradient="checkpoint", adjoint_params=(torch.ones(2),)
        )


class Counting(Field):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(t, y)


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor([0.0, 2.0], dtype=F64),  # no interior outputs
        torch.tensor([0.0, 0.3, 0.9, 1.4, 2.0], dtype=F64),  # outputs inside steps
    ],
    ids=["ends", "interior"],
)
def test_backward_stats_count_the_replayed_steps(t: torch.Tensor) -> None:
    """The backward pass's counters are the field calls it made (counted by the field), one
    replay per accepted step."""
    field = Counting()
    y0 = torch.tensor([0.3, -0.8, 0.5], dtype=F64, requires_grad=True)
    sol = neuralode.solve(field, y0, t, gradient="checkpoint", rtol=1e-6, atol=1e-6)
    assert sol.backward_stats is None
    before = field.calls
    sol.ys.sum().backward()
    stats = sol.backward_stats
    assert stats is not None
    assert int(stats.nfe) == field.calls - before > 0
    assert int(stats.n_steps) == int(sol.stats.n_accepted)
    assert int(stats.n_accepted) == int(stats.n_steps) and int(stats.n_rejected) == 0


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(("method", "stages"), [("rk4", 4), ("dopri5", 7), ("dopri8", 13)])
def test_a_step_without_outputs_inside_replays_its_stages_only(batched, method, stages) -> None:
    """Outputs only at the steps' ends (``T = 2``): each replayed step spends its tableau's
    stages (from no carried state) and nothing for an interpolant, which rk4 (``f(t + h,
    y1)``) and dopri8 (three stages) would pay."""
    field = Counting()
    y0 = torch.tensor([0.3, -0.8, 0.5], dtype=F64)
    y0 = (y0.expand(2, 3) if batched else y0).clone().requires_grad_(True)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    kw = {"step_size": 0.25} if method == "rk4" else {"rtol": 1e-5}
    sol = neuralode.solve(field, y0, t, method=method, gradient="checkpoint", batched=batched,
                          **kw)  # fmt: skip
    before = field.calls
    sol.ys.sum().backward()
    steps = int(sol.stats.n_accepted.max())
    assert steps == 8 or method != "rk4"
    assert field.calls - before == stages * steps


def test_backward_stats_count_the_interpolants_extra_stages_and_each_pass_alone() -> None:
    # dopri8's interpolant adds stages (3 per step with outputs inside it): the replay spends
    # them again, and a second backward pass (retain_graph) counts its own work only.
    field = Counting()
    y0 = torch.tensor([0.3, -0.8, 0.5], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 2, 9, dtype=F64)
    sol = neuralode.solve(field, y0, t, method="dopri8", gradient="checkpoint", rtol=1e-5)
    counts = []
    for _ in range(2):
        before = field.calls
        sol.ys.sum().backward(retain_graph=True)
        stats = sol.backward_stats
        assert stats is not None
        assert int(stats.nfe) == field.calls - before
        counts.append(int(stats.nfe))
    assert counts[0] == counts[1] > 12 * int(sol.stats.n_accepted)


@pytest.mark.parametrize("batched", [False, True])
def test_equals_backprop_with_many_outputs_inside_each_step(batched: bool) -> None:
    # Loose tolerances, long steps, 25 outputs: several outputs fall inside each step, and the
    # batch (2 rows) is smaller than the number of outputs.
    field = Field()
    y0 = torch.tensor([[0.3, -0.8, 0.5], [1.0, 0.2, -0.4]], dtype=F64)
    t = torch.stack([torch.linspace(0, 2, 25), torch.linspace(0.5, 3, 25)]).to(F64)
    w = torch.randn(2, 25, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    if not batched:
        y0, t, w = y0[0], t[0], w[0]
    kw = dict(method="dopri5", rtol=1e-3, atol=1e-3, batched=batched)
    a = _grads(field, y0, t, w, "backprop", **kw)
    b = _grads(field, y0, t, w, "checkpoint", **kw)
    for x, z in zip(a, b):
        torch.testing.assert_close(z, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_a_solve_with_one_output_time_passes_the_gradient_through(batched: bool) -> None:
    field = Field()
    y0 = torch.randn(2, 3, dtype=F64) if batched else torch.randn(3, dtype=F64)
    y0.requires_grad_(True)
    sol = neuralode.solve(field, y0, torch.tensor([0.7], dtype=F64), gradient="checkpoint",
                          batched=batched)  # fmt: skip
    (grad,) = torch.autograd.grad((sol.ys * 3.0).sum(), y0)
    torch.testing.assert_close(grad, torch.full_like(y0, 3.0))


def test_a_parameter_the_field_does_not_use_gets_no_gradient_as_under_backprop() -> None:
    w = torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=F64)
    unused = torch.tensor([2.0], dtype=F64)
    grads = []
    for gradient in ("backprop", "checkpoint"):
        w_, unused_ = w.clone().requires_grad_(), unused.clone().requires_grad_()
        params = {"adjoint_params": (w_, unused_)} if gradient == "checkpoint" else {}
        sol = neuralode.solve(
            lambda s, y, w_=w_: torch.tanh(y @ w_),
            torch.tensor([0.4, -0.7], dtype=F64),
            torch.tensor([0.0, 0.5, 1.0], dtype=F64),
            gradient=gradient,
            **params,
        )
        sol.ys.sum().backward()
        assert unused_.grad is None
        grads.append(w_.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_the_field_sees_time_in_the_state_dtype_in_both_passes() -> None:
    seen = set()
    a = torch.tensor(0.5, requires_grad=True)

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.add(t.dtype)
        return -a * y * torch.cos(t)

    y0 = torch.tensor([1.0, -0.5])
    t = torch.tensor([0.0, 0.6, 1.5], dtype=F64, requires_grad=True)
    sol = neuralode.solve(field, y0, t, gradient="checkpoint", adjoint_params=(a,), rtol=1e-5)
    sol.ys.sum().backward()
    assert seen == {torch.float32} and a.grad is not None and a.grad.dtype == torch.float32
    assert t.grad is not None and t.grad.dtype == F64


def test_time_gradients_cost_the_forward_solve_no_extra_evaluation() -> None:
    # The start shifted for the t0 gradient has y0's value, and the forward pass builds no
    # graph, so it reuses f(t0, y0): the same NFE with and without gradients of the times.
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -a * y * torch.cos(t)

    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    nfe = []
    for needs in (False, True):
        t = torch.tensor([0.2, 0.9, 1.7], dtype=torch.float64, requires_grad=needs)
        sol = neuralode.solve(field, y0, t, gradient="checkpoint", adjoint_params=(a,))
        nfe.append(int(sol.stats.nfe))
        sol.ys.sum().backward()
        if needs:
            assert t.grad is not None and float(t.grad.abs().sum()) > 0
    assert nfe[0] == nfe[1]


@pytest.mark.parametrize(
    ("y0", "t", "start"),
    [
        # (a float start: 0.1, not its float32 rounding 0.10000000149011612)
        ([1.0, 2.0], [0.1, 0.5, 1.0], "0.1"),
        # per-sample grids: the message names the first row's start of the failed step
        ([[1.0, 2.0], [0.5, 1.0]], [[0.25, 0.5, 1.0], [0.0, 0.5, 1.0]], "0.25"),
    ],
)
def test_a_replay_whose_newton_iteration_fails_is_refused(y0, t, start) -> None:
    # The field turns stiff and nonlinear between the passes: the forward solve's Newton
    # iterations converged, the replay's cannot, and its step would not be the one taken.
    class Changing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))
            self.stiff = False

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -self.k * (1e6 * y**3 if self.stiff else y)

    field = Changing()
    y = torch.tensor(y0, dtype=F64, requires_grad=True)
    sol = neuralode.solve(
        field,
        y,
        torch.tensor(t, dtype=F64),
        method="kvaerno5",
        gradient="checkpoint",
        rtol=1e-6,
        atol=1e-6,
    )
    field.stiff = True
    with pytest.raises(
        neuralode.SolverError,
        match=rf"replaying the step from t={start}, the "
        "implicit method's Newton iteration failed where the forward pass converged",
    ):
        sol.ys.sum().backward()
