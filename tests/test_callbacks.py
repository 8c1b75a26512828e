"""torchdiffeq's step callbacks: ``func.callback_step(t0, y0, dt)`` before every attempted step,
``callback_accept_step`` / ``callback_reject_step`` after it, and the ``_adjoint`` variants
around the adjoint's backward steps; called as torchdiffeq calls them (user time, the state as
the user lays it out, the step), and a method that would never call a defined one says so.
"""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode import odeint, odeint_adjoint

DTYPE = torch.float64


class Recorded(torch.nn.Module):
    """A stiffish field (rejected steps happen) that records every callback."""

    def __init__(self) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(30.0, dtype=DTYPE))
        self.calls: dict[str, list[tuple[float, object, float]]] = {}

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.k * (y - torch.sin(3.0 * t)) + torch.cos(t)

    def _record(self, name: str, t0: torch.Tensor, y0: object, dt: torch.Tensor) -> None:
        assert isinstance(t0, torch.Tensor) and isinstance(dt, torch.Tensor)
        self.calls.setdefault(name, []).append((float(t0), y0, float(dt)))

    def callback_step(self, t0, y0, dt):  # noqa: ANN001, D102
        self._record("step", t0, y0, dt)

    def callback_accept_step(self, t0, y0, dt):  # noqa: ANN001, D102
        self._record("accept", t0, y0, dt)

    def callback_reject_step(self, t0, y0, dt):  # noqa: ANN001, D102
        self._record("reject", t0, y0, dt)

    def callback_step_adjoint(self, t0, y0, dt):  # noqa: ANN001, D102
        self._record("step_adjoint", t0, y0, dt)


Y0 = torch.tensor([0.5, -0.3], dtype=DTYPE)
T = torch.tensor([0.0, 1.0, 3.0], dtype=DTYPE)


@pytest.mark.parametrize("method", ["dopri5", "rodas5p"])
def test_adaptive_callbacks_count_the_steps(method: str) -> None:
    f = Recorded()
    sol = neuralode.solve(f, Y0, T, method=method, rtol=1e-6, atol=1e-8)
    st = sol.stats
    assert int(st.n_rejected) > 0, "the problem should force rejections"
    assert len(f.calls["step"]) == int(st.n_steps)
    assert len(f.calls["accept"]) == int(st.n_accepted)
    assert len(f.calls["reject"]) == int(st.n_rejected)
    # accepted steps tile [0, 3]: each starts where the last ended
    acc = f.calls["accept"]
    assert acc[0][0] == 0.0 and abs(acc[-1][0] + acc[-1][2] - 3.0) < 1e-12
    for (t0, _, dt), (t1, _, _) in zip(acc, acc[1:]):
        assert abs(t0 + dt - t1) < 1e-12
    # the state at each accepted step's start is the state the solve had there
    t0, y0, _ = acc[0]
    assert torch.equal(y0, Y0)
    # an accepted or rejected step is reported with the state the step started from
    started = {(t, dt): y for t, y, dt in f.calls["step"]}
    for t, y, dt in f.calls["accept"] + f.calls["reject"]:
        assert isinstance(y, torch.Tensor) and torch.equal(y, started[(t, dt)])


def test_fixed_step_methods_call_callback_step_and_warn_about_the_others() -> None:
    f = Recorded()
    with pytest.warns(UserWarning, match=r"Solver 'rk4' does not support callbacks"):
        ys = odeint(f, Y0, T, method="rk4", options={"step_size": 0.25})
    assert len(f.calls["step"]) == 12 and "accept" not in f.calls
    assert [c[2] for c in f.calls["step"]] == [0.25] * 12
    # each step is reported with the state it starts from: Y0 first, the output at t = 1
    states = {t: y for t, y, _ in f.calls["step"]}
    assert torch.equal(states[0.0], Y0) and torch.equal(states[1.0], ys[1].detach())


def test_reversed_time_and_tuple_states_are_the_users() -> None:
    f = Recorded()
    odeint(f, Y0, T.flip(0), method="dopri5", rtol=1e-6, atol=1e-8)
    times = [c[0] for c in f.calls["accept"]]
    assert times[0] == 3.0 and all(a > b for a, b in zip(times, times[1:]))  # user time, falling
    assert all(c[2] > 0 for c in f.calls["accept"])  # dt as torchdiffeq passes it: positive

    class TupleField(Recorded):
        def forward(self, t, y):  # noqa: ANN001, D102
            return (-y[0] + y[1], -y[1])

    g = TupleField()
    odeint(g, (Y0[:1], Y0[1:]), T, method="dopri5")
    y0 = g.calls["step"][0][1]
    assert isinstance(y0, tuple) and [p.shape for p in y0] == [(1,), (1,)]


def test_adjoint_callbacks_run_in_the_backward_solve() -> None:
    f = Recorded()
    ys = odeint_adjoint(f, Y0, T, method="dopri5", rtol=1e-6, atol=1e-8)
    n_forward = len(f.calls["step"])
    ys.square().sum().backward()
    assert len(f.calls["step"]) == n_forward  # the forward callbacks are not called again
    assert len(f.calls["step_adjoint"]) > 0
    # The backward state carries no graph from step to step (the adjoint's memory does not
    # grow with its steps).
    assert not any(y.requires_grad for _, y, _ in f.calls["step_adjoint"])


def test_batched_solves_refuse_callbacks() -> None:
    f = Recorded()
    with pytest.raises(ValueError, match="unbatched solves only"):
        neuralode.solve(f, Y0.expand(3, 2), T, batched=True)


def test_scipy_solver_warns_that_it_calls_no_callback() -> None:
    pytest.importorskip("scipy")
    f = Recorded()
    with pytest.warns(UserWarning, match=r"Solver 'scipy_solver' does not support callbacks"):
        odeint(f, Y0, T, method="scipy_solver")
    assert not f.calls


class AdjointRecorded(torch.nn.Module):
    """The field of :class:`Recorded` with only the backward solve's callback."""

    def __init__(self) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(30.0, dtype=DTYPE))
        self.steps: list[float] = []

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.k * (y - torch.sin(3.0 * t)) + torch.cos(t)

    def callback_step_adjoint(self, t0, y0, dt):  # noqa: ANN001, D102
        self.steps.append(float(t0))


def test_adjoint_callbacks_run_when_the_forward_solve_is_compiled() -> None:
    """A compiled forward solve compiles its backward solve too, but not one that calls
    ``callback_*_adjoint`` (the compiled driver calls no callback): that one runs eager and
    calls it at each of its steps."""
    f = AdjointRecorded()
    sol = neuralode.solve(f, Y0, T, gradient="adjoint", rtol=1e-6, atol=1e-8,
                          compile={"backend": "eager"})  # fmt: skip
    sol.ys.square().sum().backward()
    assert sol.backward_stats is not None
    assert len(f.steps) == int(sol.backward_stats.n_steps) > 0
