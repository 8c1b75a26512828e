"""Events: located per sample, terminal/counted/recorded, resets, and their gradients.

Analytic references: the bouncing ball (bounce times of a ball dropped from height h0 under
gravity g with restitution e: t_1 = sqrt(2 h0 / g), each next flight e times the last, of length
2 e^k v_1 / g), and a linear decay y = a exp(-k t) crossing a threshold c at t* = ln(a / c) / k.
"""

from __future__ import annotations

import math

import pytest
import torch

from neuralode import METHODS, Event, GrazingEventError, SolverError, Status, get_solver, solve
from neuralode.compat import odeint

E = 0.8  # restitution


def bsolve(*args, **kwargs):
    return solve(*args, batched=True, **kwargs)


def ball_field(g: torch.Tensor | float):
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[..., 1], -g * torch.ones_like(y[..., 0])], dim=-1)

    return f


def bounce(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([y[..., 0], -E * y[..., 1]], dim=-1)


def ball_times(h0: torch.Tensor, g: torch.Tensor | float, n: int) -> torch.Tensor:
    """Time of the n-th bounce."""
    t1 = torch.sqrt(2 * h0 / g)
    return t1 * (1 + 2 * sum(E**k for k in range(1, n)))


def floor(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y[..., 0]


def drop(h0: torch.Tensor) -> torch.Tensor:
    return torch.stack([h0, torch.zeros_like(h0)], dim=-1)


H0 = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
TOL = dict(rtol=1e-10, atol=1e-12)


def test_terminal_event_per_sample_time_state_and_outputs():
    t = torch.linspace(0, 3, 31, dtype=torch.float64)
    with torch.no_grad():
        sol = bsolve(ball_field(9.81), drop(H0), t, events=Event(floor, direction=-1), **TOL)
    t1 = ball_times(H0, 9.81, 1)
    torch.testing.assert_close(sol.event_t, t1, rtol=0, atol=1e-12)
    assert sol.status.tolist() == [Status.EVENT] * 3 and sol.success
    assert sol.event_index.tolist() == [0, 0, 0]
    torch.testing.assert_close(
        sol.event_y[:, 0], torch.zeros(3, dtype=torch.float64), atol=1e-11, rtol=0
    )
    torch.testing.assert_close(sol.event_y[:, 1], -9.81 * t1, rtol=1e-10, atol=0)
    torch.testing.assert_close(sol.t_end, t1, rtol=0, atol=1e-12)
    # Outputs before the event are the free fall; after it NaN.
    before = t.unsqueeze(0) <= t1.unsqueeze(1)
    fall = H0.unsqueeze(1) - 0.5 * 9.81 * t.unsqueeze(0) ** 2
    torch.testing.assert_close(sol.ys[..., 0][before], fall[before], rtol=1e-9, atol=1e-9)
    assert torch.isnan(sol.ys[..., 0][~before]).all()
    assert [len(x) for x in sol.event_log] == [1, 1, 1]
    assert sol.event_log[1][0][1:] == (0, "terminal")


def test_each_row_equals_that_row_solved_alone():
    t = torch.linspace(0, 5, 11, dtype=torch.float64)
    ev = Event(floor, direction=-1, terminal=3, reset=bounce)
    with torch.no_grad():
        batch = bsolve(ball_field(9.81), drop(H0), t, events=ev, **TOL)
        for i in range(3):
            ev1 = Event(
                lambda t, y: y[0], direction=-1, terminal=3, reset=lambda t, y: bounce(t, y)
            )
            alone = solve(ball_field(9.81), drop(H0)[i], t, events=ev1, **TOL)
            torch.testing.assert_close(alone.event_t, batch.event_t[i], rtol=0, atol=1e-12)
            torch.testing.assert_close(alone.ys, batch.ys[i], rtol=1e-9, atol=1e-9, equal_nan=True)
            assert [x[2] for x in alone.event_log] == [x[2] for x in batch.event_log[i]]
            assert int(alone.status) == int(batch.status[i])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_nth_bounce_with_restitution(n):
    ev = Event(floor, direction=-1, terminal=n, reset=bounce)
    with torch.no_grad():
        sol = bsolve(ball_field(9.81), drop(H0), torch.tensor([0.0, 20.0]), events=ev, **TOL)
    torch.testing.assert_close(sol.event_t, ball_times(H0, 9.81, n), rtol=0, atol=1e-10)
    kinds = [[k for _, _, k in row] for row in sol.event_log]
    assert kinds == [["reset"] * (n - 1) + ["terminal"]] * 3
    for row, h in zip(sol.event_log, H0):
        times = torch.tensor([x for x, _, _ in row], dtype=torch.float64)
        expected = torch.stack([ball_times(h, 9.81, k) for k in range(1, n + 1)])
        torch.testing.assert_close(times, expected, rtol=0, atol=1e-10)


def test_direction_rising_falling_either():
    # y = sin t (y' = cos t): falling crossings at pi, 3pi; rising at 2pi.
    f = lambda t, y: torch.cos(t).unsqueeze(-1).expand_as(y)  # noqa: E731
    y0 = torch.zeros(1, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 10.0], dtype=torch.float64)
    found = {}
    for d in (1, -1, 0):
        ev = Event(lambda t, y: y[:, 0], direction=d, terminal=False)
        with torch.no_grad():
            sol = bsolve(f, y0, t, events=ev, **TOL)
        found[d] = [x for x, _, _ in sol.event_log[0]]
        assert sol.status.tolist() == [Status.SUCCESS]
        assert torch.isnan(sol.event_t).all() and sol.event_index.tolist() == [-1]
    pi = math.pi
    assert found[1] == pytest.approx([2 * pi], abs=1e-9)
    assert found[-1] == pytest.approx([pi, 3 * pi], abs=1e-9)
    assert found[0] == pytest.approx([pi, 2 * pi, 3 * pi], abs=1e-9)


def test_zero_at_start_does_not_fire_there():
    f = lambda t, y: torch.ones_like(y)  # noqa: E731  y = t
    ev = Event(lambda t, y: y[:, 0] * (y[:, 0] - 0.5), terminal=True)
    with torch.no_grad():
        sol = bsolve(f, torch.zeros(1, 1), torch.tensor([0.0, 1.0]), events=ev)
    # g is zero at t = 0 (no event), negative until 0.5, where it fires.
    assert sol.event_t.tolist() == pytest.approx([0.5], abs=1e-6)


def test_earliest_of_two_in_one_step_wins_and_counted_terminal():
    f = lambda t, y: torch.ones_like(y)  # noqa: E731  y = t, one exact step
    ev = Event(lambda t, y: torch.stack([y[:, 0] - 0.7, y[:, 0] - 0.3], dim=1))
    with torch.no_grad():
        sol = bsolve(
            f,
            torch.zeros(2, 1, dtype=torch.float64),
            torch.tensor([0.0, 1.0]),
            events=ev,
            first_step=1.0,
        )
    assert sol.stats.n_accepted.tolist() == [1, 1]
    assert sol.event_index.tolist() == [1, 1]
    assert sol.event_t.tolist() == pytest.approx([0.3, 0.3], abs=1e-12)
    # The first event of the list is recorded, the second (a count of 2) stops the row.
    evs = [
        Event(lambda t, y: y[:, 0] - 0.2, terminal=False, name="a"),
        Event(lambda t, y: torch.stack([y[:, 0] - 0.9, y[:, 0] - 0.4], 1), terminal=2),
    ]
    with torch.no_grad():
        sol = bsolve(
            f,
            torch.zeros(1, 1, dtype=torch.float64),
            torch.tensor([0.0, 1.0]),
            events=evs,
            first_step=1.0,
        )
    assert [(round(x, 9), i, k) for x, i, k in sol.event_log[0]] == [
        (0.2, 0, "event"),
        (0.4, 2, "event"),
        (0.9, 1, "terminal"),
    ]
    assert sol.event_index.tolist() == [1]


def test_interior_checks_catch_a_double_crossing():
    # y = t (1 - t): above 0.1 on (0.1127, 0.8873); one exact step of 1 has g < 0 at both ends.
    f = lambda t, y: (1 - 2 * t).unsqueeze(-1).expand_as(y)  # noqa: E731
    y0 = torch.zeros(1, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    g = lambda t, y: y[:, 0] - 0.1  # noqa: E731
    with torch.no_grad():
        missed = bsolve(f, y0, t, events=Event(g, checks=0), first_step=1.0)
        caught = bsolve(f, y0, t, events=Event(g, checks=3), first_step=1.0)
    assert missed.status.tolist() == [Status.SUCCESS]
    root = (1 - math.sqrt(1 - 0.4)) / 2
    assert caught.event_t.tolist() == pytest.approx([root], abs=1e-12)


def test_reversed_time_and_per_sample_grids():
    # y' = -1 from y(2) = 1 backwards: y(t) = 1 - (t - 2) = 3 - t rises as t falls; y = 2 at t = 1.
    f = lambda t, y: -torch.ones_like(y)  # noqa: E731
    ev = Event(lambda t, y: y[:, 0] - 2.0, direction=1)
    t = torch.tensor([[2.0, 1.5, 0.0], [0.0, 0.5, 2.0]], dtype=torch.float64)
    y0 = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    with torch.no_grad():
        sol = bsolve(f, y0, t, events=ev)
    # Row 0 runs backwards and reaches y = 2 at t = 1; row 1 runs forwards, y falls: none.
    assert sol.event_t[0].item() == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(sol.event_t[1].item())
    assert sol.status.tolist() == [Status.EVENT, Status.SUCCESS]
    assert torch.isnan(sol.ys[0, 2]).all() and sol.ys[0, 1, 0].item() == pytest.approx(1.5)


def test_no_event_matches_the_plain_solve():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    ev = Event(lambda t, y: y[:, 0] + 1.0)  # y stays positive
    plain = bsolve(f, y0, t)
    sol = bsolve(f, y0, t, events=ev)
    torch.testing.assert_close(sol.ys, plain.ys)
    assert torch.isnan(sol.event_t).all() and sol.event_log == [[], []]
    assert sol.status.tolist() == [0, 0]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_finds_the_threshold(method):
    # y = a exp(-k t) reaches c at ln(a / c) / k; fixed steps of 0.01, adaptive at rtol 1e-7.
    a = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    ev = Event(lambda t, y: y[:, 0] - 0.5)
    kw = {} if get_solver(method).adaptive else {"step_size": 0.01}
    with torch.no_grad():
        sol = bsolve(lambda t, y: -y, a, torch.tensor([0.0, 5.0]), events=ev, method=method, **kw)
    exact = torch.log(a[:, 0] / 0.5)
    first_order = method in ("euler", "implicit_euler")
    torch.testing.assert_close(sol.event_t, exact, rtol=0, atol=2e-2 if first_order else 5e-5)
    assert sol.status.tolist() == [Status.EVENT] * 2


def test_fixed_step_terminal_stops_rows_and_outputs():
    ev = Event(lambda t, y: y[:, 0] - 0.5)
    a = torch.tensor([[1.0], [0.9]], dtype=torch.float64)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    with torch.no_grad():
        sol = bsolve(lambda t, y: -y, a, t, events=ev, method="rk4")
    exact = torch.log(a[:, 0] / 0.5)
    torch.testing.assert_close(sol.event_t, exact, rtol=0, atol=1e-4)
    for i in range(2):
        after = t > sol.event_t[i]
        assert torch.isnan(sol.ys[i, after]).all() and not torch.isnan(sol.ys[i, ~after]).any()


@pytest.mark.parametrize("batched", [False, True])
def test_a_one_time_solve_with_events_finds_none(batched):
    """A solve of one time takes no step: it returns ``y0``, and its events (even one whose
    function is zero at the start) an empty log and NaN times, in the solve's own layout."""
    ev = Event(lambda t, y: y[..., 0] - 1.0)  # zero at the start of the first row
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    y0 = y0 if batched else y0[0]
    sol = solve(lambda t, y: -y, y0, torch.tensor([0.0], dtype=torch.float64), events=ev,
                batched=batched)  # fmt: skip
    assert torch.equal(sol.ys, y0.unsqueeze(-2))
    assert sol.event_log == ([[], []] if batched else [])
    assert sol.event_t.shape == ((2,) if batched else ()) and torch.isnan(sol.event_t).all()
    assert (sol.status == Status.SUCCESS).all()


def test_fixed_step_resets_on_a_grid_time_take_no_partial_step():
    """A sawtooth (``y' = -1``, ``y -> y + 1`` at ``y = 0.5``) on a grid of 0.25, which rk4
    solves exactly: a row that resets on a grid time is on the grid already (its 8 steps are
    the grid's), a row that resets inside a step takes a partial step back to the grid (two
    more), and a row whose reset falls on its last time ends there with the state before it
    (no step after it)."""
    ev = Event(lambda t, y: y[:, 0] - 0.5, terminal=False, reset=lambda t, y: y + 1.0, direction=-1)
    y0 = torch.tensor([[1.0], [1.2], [1.5]], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        sol = bsolve(
            lambda t, y: -torch.ones_like(y), y0, t, events=ev, method="rk4", step_size=0.25
        )
    assert sol.status.tolist() == [Status.SUCCESS] * 3
    times = [e[0] for log in sol.event_log for e in log]
    assert times == pytest.approx([0.5, 1.5, 0.7, 1.7, 1.0, 2.0], abs=1e-12)
    assert sol.stats.n_steps.tolist() == [8, 10, 8]
    assert sol.stats.n_accepted.tolist() == [8, 10, 8]
    torch.testing.assert_close(sol.ys[:, -1, 0], torch.tensor([1.0, 1.2, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("method", ["radauIIA5", "explicit_adams"])
def test_a_fixed_step_row_stopped_by_an_event_is_handed_no_more_steps(method):
    """After a terminal event stops one row of a fixed-step batch, the loop hands that row
    steps of zero (the protocol's masked row): a method that takes its stage times from the
    step (not a Runge-Kutta grid's precomputed ones) evaluates that row's field at its stop
    time from then on, never past the step that crossed the event, while the other row runs
    on to the end."""
    ev = Event(lambda t, y: y[:, 0] - 0.5)
    a = torch.tensor([[1.0], [0.4]], dtype=torch.float64)  # the second row never crosses
    t = torch.linspace(0, 2, 11, dtype=torch.float64)
    seen = []

    def f(t, y):
        seen.append(t.detach().clone())
        return -y

    with torch.no_grad():
        sol = bsolve(f, a, t, events=ev, method=method, throw=False)
    assert sol.status.tolist() == [Status.EVENT, Status.SUCCESS]
    stop = float(sol.event_t[0])
    assert stop == pytest.approx(math.log(2.0), abs=1e-4)
    rows = torch.stack([s for s in seen if s.shape == (2,)])  # the steps' stages, per row
    # (the step that crossed the event, from 0.6 to 0.8, evaluated up to its end; none after)
    assert float(rows[:, 0].max()) == pytest.approx(0.8, abs=1e-12)
    assert float(rows[:, 1].max()) >= 1.8 - 1e-12  # (Adams evaluates its steps' starts)


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
def test_fixed_step_resets_step_back_onto_the_grid(gradient):
    # rk4 and its cubic Hermite interpolant are exact on the ball's parabolas: after each bounce
    # the ball takes a partial step to the grid, and the bounce times are exact.
    h0 = H0.clone().requires_grad_(True)
    t = torch.linspace(0, 10, 11, dtype=torch.float64)
    ev = Event(floor, direction=-1, terminal=5, reset=bounce)
    kw = {} if gradient == "backprop" else {"adjoint_params": ()}
    sol = bsolve(
        ball_field(9.81),
        drop(h0),
        t,
        events=ev,
        method="rk4",
        step_size=0.05,
        gradient=gradient,
        **kw,
    )
    exact = ball_times(h0, 9.81, 5)
    torch.testing.assert_close(sol.event_t, exact.detach(), rtol=0, atol=1e-12)
    (got,) = torch.autograd.grad(sol.event_t.sum(), h0)
    (want,) = torch.autograd.grad(exact.sum(), h0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # 0.05 steps to each ball's end, and one partial step after each of its four resets.
    assert sol.status.tolist() == [Status.EVENT] * 3
    with torch.no_grad():
        fast = bsolve(ball_field(9.81), drop(H0), t, events=ev, method="rk4", step_size=0.05)
    whole = torch.ceil(exact.detach() / 0.05)
    assert fast.stats.n_steps.tolist() == (whole + 4).long().tolist()


def test_tuple_state_and_dense_output():
    def f(t, y):
        return (y[1], -torch.ones_like(y[0]))

    y0 = (torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.0]], dtype=torch.float64))
    ev = Event(lambda t, y: y[0][:, 0], direction=-1)
    with torch.no_grad():
        sol = bsolve(f, y0, torch.tensor([0.0, 5.0]), events=ev, dense=True, **TOL)
    assert sol.event_t.tolist() == pytest.approx([math.sqrt(2)], abs=1e-10)
    assert isinstance(sol.event_y, tuple) and sol.event_y[1].item() == pytest.approx(-math.sqrt(2))
    mid = sol.evaluate(torch.tensor([1.0], dtype=torch.float64))
    assert mid[0].item() == pytest.approx(0.5, abs=1e-9)


# -- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_bounce_time_gradients_match_the_analytic_ones(gradient, n):
    h0 = H0.clone().requires_grad_(True)
    g = torch.tensor(9.81, dtype=torch.float64, requires_grad=True)
    ev = Event(floor, direction=-1, terminal=n, reset=bounce)
    kw = {} if gradient == "backprop" else {"adjoint_params": [g]}
    sol = bsolve(
        ball_field(g),
        drop(h0),
        torch.tensor([0.0, 20.0]),
        events=ev,
        gradient=gradient,
        **TOL,
        **kw,
    )
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    got = torch.autograd.grad((sol.event_t * w).sum(), (h0, g))
    exact = ball_times(h0, g, n)
    want = torch.autograd.grad((exact * w).sum(), (h0, g))
    torch.testing.assert_close(sol.event_t, exact.detach(), rtol=0, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_threshold_crossing_time_and_state_gradients(gradient):
    a = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    f = lambda t, y: -k * y  # noqa: E731
    ev = Event(lambda t, y: y[:, 0] - c * (1 + 0.1 * t))  # a moving threshold (dg/dt != 0)
    kw = {} if gradient == "backprop" else {"adjoint_params": [k]}
    t = torch.tensor([0.0, 1.0, 10.0], dtype=torch.float64)
    sol = bsolve(f, a.unsqueeze(1), t, events=ev, gradient=gradient, **TOL, **kw)

    def root(a, k, c):  # Newton on a exp(-k t) = c (1 + 0.1 t), differentiable by autograd
        x = torch.log(a / c) / k
        for _ in range(60):
            r = a * torch.exp(-k * x) - c * (1 + 0.1 * x)
            x = x - r / (-k * a * torch.exp(-k * x) - 0.1 * c)
        return x

    want_t = root(a, k, c)
    want_y = a * torch.exp(-k * want_t)
    loss = (sol.event_t * torch.tensor([1.0, 2.0])).sum() + 3 * sol.event_y[:, 0].sum()
    loss += sol.ys[:, 1, 0].sum()
    ref = (want_t * torch.tensor([1.0, 2.0])).sum() + 3 * want_y.sum() + (a * torch.exp(-k)).sum()
    got = torch.autograd.grad(loss, (a, k, c))
    want = torch.autograd.grad(ref, (a, k, c))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_event_time_state_and_outputs_gradcheck(gradient):
    # Through a reset: y' = -k y, kicked up by d at each fall through 0.5, stopped at the 2nd.
    def run(a, k, d):
        ev = Event(lambda t, y: y[:, 0] - 0.5, direction=-1, terminal=2, reset=lambda t, y: y + d)
        sol = bsolve(
            lambda t, y: -k * y,
            a.unsqueeze(1),
            torch.tensor([0.0, 1.0, 10.0]),
            events=ev,
            gradient=gradient,
            rtol=1e-12,
            atol=1e-14,
            adjoint_params=None if gradient == "backprop" else (k,),
        )
        return sol.event_t, sol.event_y, sol.ys[:, 1]

    a = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    d = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (a, k, d), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
def test_time_gradients_with_events(gradient):
    # y' = -k y from (t0, a): the crossing of c is at t0 + ln(a / c) / k, an output at t_1 is
    # a exp(-k (t_1 - t0)).
    k = 0.7
    a = torch.tensor([2.0, 3.0], dtype=torch.float64)
    t = torch.tensor([0.2, 0.9, 10.0], dtype=torch.float64, requires_grad=True)
    ev = Event(lambda t, y: y[:, 0] - 0.5)
    kw = {} if gradient == "backprop" else {"adjoint_params": ()}
    sol = bsolve(lambda t, y: -k * y, a.unsqueeze(1), t, events=ev, gradient=gradient, **TOL, **kw)
    loss = sol.event_t.sum() + sol.ys[:, 1, 0].sum()
    (got,) = torch.autograd.grad(loss, t)
    t0, t1 = t[0], t[1]
    ref = (t0 + torch.log(a / 0.5) / k).sum() + (a * torch.exp(-k * (t1 - t0))).sum()
    (want,) = torch.autograd.grad(ref, t)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
def test_grad_and_no_grad_paths_agree(gradient):
    t = torch.linspace(0, 4, 9, dtype=torch.float64)
    ev = Event(floor, direction=-1, terminal=3, reset=bounce)
    h0 = H0.clone().requires_grad_(True)
    with torch.no_grad():
        fast = bsolve(ball_field(9.81), drop(h0), t, events=ev, **TOL)
    kw = {} if gradient == "backprop" else {"adjoint_params": ()}
    slow = bsolve(ball_field(9.81), drop(h0), t, events=ev, gradient=gradient, **TOL, **kw)
    torch.testing.assert_close(slow.ys.detach(), fast.ys, rtol=1e-8, atol=1e-8, equal_nan=True)
    torch.testing.assert_close(slow.event_t.detach(), fast.event_t)
    assert slow.ys.requires_grad and slow.event_t.requires_grad
    if gradient == "backprop":
        # One pass: f at each of the three events and after each of the two resets, no more.
        assert (slow.stats.nfe - fast.stats.nfe).tolist() == [5, 5, 5]
    else:
        # Two passes: locate without a graph, then the adjoint's forward to the events.
        assert (slow.stats.nfe > 1.5 * fast.stats.nfe).all()


def test_grazing_event_time_has_no_derivative():
    step = lambda t, y: torch.where(t >= 0.5, 1.0, -1.0).to(y.dtype)  # noqa: E731  rate 0
    y0 = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GrazingEventError, match="grazes"):
        bsolve(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), events=Event(step))


@pytest.mark.parametrize("gradient", ["backprop", "adjoint", "checkpoint"])
def test_a_grazing_event_without_gradients_is_located(gradient):
    """y' = 3 (t - 1)^2 from -1 touches y = 0 at t = 1 without crossing sign of its rate.  With
    nothing that requires grad, the event time needs no derivative: it is located (it raised
    GrazingEventError whenever autograd was on).  With y0 requiring grad it still raises."""
    f = lambda t, y: 3 * (t - 1) ** 2  # noqa: E731
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    kw = dict(method="rk4", step_size=0.5, events=Event(lambda t, y: y))
    if gradient != "backprop":
        kw["adjoint_params"] = ()
    y0 = torch.tensor(-1.0, dtype=torch.float64)
    sol = solve(f, y0, t, gradient=gradient, **kw)
    assert abs(float(sol.event_t) - 1.0) < 1e-6
    with pytest.raises(GrazingEventError, match="grazes"):
        solve(f, y0.clone().requires_grad_(), t, gradient=gradient, **kw)


# -- input handling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(direction=2), "direction"),
        (dict(terminal=0), "terminal"),
        (dict(terminal=1.5), "terminal"),
        (dict(reset=3), "reset"),
        (dict(xtol=-1.0), "xtol"),
        (dict(checks=-1), "checks"),
    ],
)
def test_bad_event_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Event(floor, **kwargs)


def test_bad_event_uses_are_named():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(2, 1)
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(TypeError, match="events"):
        bsolve(f, y0, t, events=[floor])
    with pytest.raises(ValueError, match=r"\[batch\]"):
        bsolve(f, y0, t, events=Event(lambda t, y: y.sum()))
    with pytest.raises(ValueError, match="reset"):
        bsolve(
            f,
            y0,
            t,
            events=Event(lambda t, y: y[:, 0] - 0.5, terminal=False, reset=lambda t, y: y[:, 0]),
        )
    with pytest.raises(ValueError, match="multistep"):
        bsolve(f, y0, t, method="explicit_adams", step_size=0.1, events=Event(floor, reset=bounce))
    with pytest.raises(ValueError, match="complex"):
        solve(f, torch.ones(2, 1, dtype=torch.complex64), t, events=Event(floor))
    with pytest.raises(ValueError, match="NaN"):
        bsolve(f, y0, t, events=Event(lambda t, y: y[:, 0] * math.nan))


def test_failed_rows_still_raise_and_events_count_as_success():
    ev = Event(lambda t, y: y[:, 0] - 10.0)
    with pytest.raises(SolverError, match="maximum number of solver steps"):
        bsolve(
            lambda t, y: y, torch.ones(2, 1), torch.tensor([0.0, 5.0]), events=ev, max_num_steps=3
        )
    sol = bsolve(
        lambda t, y: y, torch.ones(2, 1, dtype=torch.float64), torch.tensor([0.0, 5.0]), events=ev
    )
    assert sol.success and sol.status.tolist() == [Status.EVENT] * 2
    assert sol.messages() == [Status.EVENT.message]


def test_odeint_path_unaffected():
    # The torchdiffeq entry point without events returns plain outputs.
    ys = odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))
    assert ys.shape == (2, 2)


# -- torchdiffeq's odeint_event -------------------------------------------------------------------


class Ball(torch.nn.Module):
    def __init__(self, g: float) -> None:
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=torch.float64))

    def forward(self, t, y):
        return torch.stack([y[1], -self.g * torch.ones_like(y[0])])


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_odeint_event_chained_bounces_as_torchdiffeq_example(interface):
    # torchdiffeq's examples/bouncing_ball.py: each bounce's solve starts at the last event time
    # (which carries its gradient) from the bounced state, lifted by 1e-7 so that the event does
    # not fire again at once (the state at an event is on the crossed side, as torchdiffeq's).
    from neuralode import odeint_adjoint, odeint_event

    lift = 1e-7
    ball = Ball(9.81)
    h0 = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    state = torch.stack([h0, torch.zeros((), dtype=torch.float64)])
    t0 = torch.tensor([0.0], dtype=torch.float64)
    odeint_fn = odeint if interface == "odeint" else odeint_adjoint
    times = []
    for _ in range(3):
        event_t, sol = odeint_event(
            ball,
            state,
            t0,
            event_fn=lambda t, y: y[0],
            odeint_interface=odeint_fn,
            rtol=1e-10,
            atol=1e-12,
        )
        times.append(event_t)
        state = torch.stack([sol[-1][0] + lift, -E * sol[-1][1]])
        t0 = event_t.reshape(1)
    assert sol.shape == (2, 2)
    got = torch.autograd.grad(times[-1], (h0, ball.g))
    # Analytic, with the lifts: from height lift at speed v up, the flight lasts
    # (v + sqrt(v^2 + 2 g lift)) / g and lands at sqrt(v^2 + 2 g lift).
    g = ball.g
    t_hit = torch.sqrt(2 * h0 / g)
    v = E * g * t_hit
    for _ in range(2):
        land = torch.sqrt(v**2 + 2 * g * lift)
        t_hit = t_hit + (v + land) / g
        v = E * land
    torch.testing.assert_close(times[-1].detach(), t_hit.detach(), rtol=0, atol=1e-9)
    want = torch.autograd.grad(t_hit, (h0, g))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_odeint_event_reverse_time_several_functions_and_no_event():
    from neuralode import odeint_event

    f = lambda t, y: torch.ones_like(y)  # noqa: E731  y = y0 + (t - t0)
    y0 = torch.tensor([0.0], dtype=torch.float64)
    t0 = torch.tensor(1.0, dtype=torch.float64)
    # Backwards from t = 1: y = t - 1 reaches -0.25 at t = 0.75 before -0.5 at t = 0.5.
    ev = lambda t, y: torch.stack([y[0] + 0.5, y[0] + 0.25])  # noqa: E731
    event_t, sol = odeint_event(f, y0, t0, event_fn=ev, reverse_time=True)
    assert float(event_t) == pytest.approx(0.75, abs=1e-9)
    assert sol[1].tolist() == pytest.approx([-0.25], abs=1e-9)
    ys = odeint(
        f,
        y0,
        torch.tensor([0.0, 1.0]),
        event_fn=lambda t, y: y[0] - 2.0,
        method="rk4",
        options={"step_size": 0.1},
    )
    assert float(ys[0]) == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(SolverError, match="did not change sign"):
        odeint_event(
            lambda t, y: -y,
            torch.ones(1),
            torch.tensor(0.0),
            event_fn=lambda t, y: y[0] + 1.0,
            options={"max_num_steps": 50},
        )
    with pytest.raises(ValueError, match="step_size"):
        odeint(f, y0, torch.tensor([0.0, 1.0]), event_fn=ev, method="rk4")


def test_bouncing_balls_example_recovers_the_restitution(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "bouncing_balls.py"
    spec = importlib.util.spec_from_file_location("bouncing_balls_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["bouncing_balls.py", "--out", str(tmp_path)])
    module.main()
    result = json.loads((tmp_path / "bouncing_balls.json").read_text())
    assert abs(result["recovered_e"] - module.TRUE_E) < 0.005
    assert (tmp_path / "bouncing_balls.png").stat().st_size > 10_000


def ball_height(t: torch.Tensor, h0: torch.Tensor, g, n_max: int = 12) -> torch.Tensor:
    """The bouncing ball's height at times ``t`` (``[batch, T]``), analytic and differentiable."""
    t1 = torch.sqrt(2 * h0 / g).unsqueeze(1)
    v1 = g * t1
    y = h0.unsqueeze(1) - 0.5 * g * t**2  # the first fall
    start = t1
    for k in range(1, n_max):
        v = E**k * v1
        end = start + 2 * v / g
        tau = t - start
        inside = (t >= start) & (t < end)
        y = torch.where(inside, v * tau - 0.5 * g * tau**2, y)
        start = end
    return y


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_outputs_between_bounces_per_sample_grids_and_their_gradients(gradient):
    h0 = torch.tensor([1.0, 1.7], dtype=torch.float64, requires_grad=True)
    g = torch.tensor(9.81, dtype=torch.float64, requires_grad=True)
    # Each ball its own grid (one reversed would need a reversed ball: both forwards here).
    t = torch.stack(
        [torch.linspace(0, 2.5, 9, dtype=torch.float64), torch.linspace(0.1, 3.1, 9)]
    ).double()
    ev = Event(floor, direction=-1, terminal=False, reset=bounce)
    kw = {} if gradient == "backprop" else {"adjoint_params": [g]}
    sol = bsolve(ball_field(g), drop(h0), t, events=ev, gradient=gradient, **TOL, **kw)
    assert sol.status.tolist() == [0, 0] and torch.isnan(sol.event_t).all()
    want = ball_height(t - t[:, :1], h0, g)  # row 1 is dropped at t = 0.1
    torch.testing.assert_close(sol.ys[..., 0], want, rtol=0, atol=1e-8)
    w = torch.linspace(-1, 1, 9, dtype=torch.float64)
    got = torch.autograd.grad((sol.ys[..., 0] * w).sum(), (h0, g))
    ref = torch.autograd.grad((want * w).sum(), (h0, g))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for i, row in enumerate(sol.event_log):
        times = [ball_times(h0[i].detach(), 9.81, k) for k in range(1, 13)]
        span = float(t[i, -1] - t[i, 0])
        assert len(row) == sum(float(x) <= span for x in times) >= 3
        assert all(kind == "reset" for _, _, kind in row)


# -- found by review, tried as a new user would (each failed before its fix) ----------------------


@pytest.mark.parametrize("gradient", ["checkpoint", "adjoint"])
def test_a_reset_at_the_last_output_time(gradient):
    f = lambda t, y: torch.ones_like(y)  # noqa: E731
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    ev = Event(lambda t, y: y[:, 0] - 0.5, reset=lambda t, y: y - 0.25, terminal=False)
    y0 = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    ref = bsolve(f, y0, t, events=ev)
    sol = bsolve(f, y0, t, events=ev, gradient=gradient, adjoint_params=())
    torch.testing.assert_close(sol.ys, ref.ys)
    assert [k for _, _, k in sol.event_log[0]] == ["reset"] * 3


def test_dense_output_after_a_terminal_event_is_nan():
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    sol = bsolve(ball_field(9.81), drop(H0[:2]), t, events=Event(floor, direction=-1), dense=True)
    late = sol.evaluate(torch.tensor([0.4, 0.5, 0.9], dtype=torch.float64))[..., 0]
    # Ball 0 stops at 0.4515, ball 1 at 0.6386.
    assert not torch.isnan(late[:, 0]).any()
    assert (
        torch.isnan(late[0, 1:]).all() and not torch.isnan(late[1, 1]) and torch.isnan(late[1, 2])
    )


def test_every_crossing_the_checked_points_show_is_located():
    # With the floor's reset, dopri5 integrates each parabola in one step; the height-0.5
    # function crosses twice inside a flight: both crossings count.
    half = Event(lambda t, y: y[:, 0] - 0.5, direction=0, terminal=3)
    floor_ = Event(floor, direction=-1, reset=bounce, terminal=False)
    with torch.no_grad():
        sol = bsolve(
            ball_field(9.81),
            drop(torch.tensor([1.0], dtype=torch.float64)),
            torch.tensor([0.0, 5.0]),
            events=[floor_, half],
            **TOL,
        )
    t1 = math.sqrt(2 / 9.81)
    apex, rise = t1 + E * t1, math.sqrt(2 * (E**2 - 0.5) / 9.81)
    halves = [x for x, i, _ in sol.event_log[0] if i == 1]
    assert halves == pytest.approx([math.sqrt(0.5) * t1, apex - rise, apex + rise], abs=1e-9)
    assert sol.event_t.item() == pytest.approx(apex + rise, abs=1e-9)


@pytest.mark.parametrize("method, kick", [("dopri5", 1e-4), ("rk4", 1e-3)])
def test_a_reset_that_leaves_the_surface_can_fire_again_at_once(method, kick):
    # y' = -y, kicked up by `kick` each time it falls to 0.5: it never stays below 0.5.
    ev = Event(
        lambda t, y: y[:, 0] - 0.5, direction=-1, terminal=False, reset=lambda t, y: y + kick
    )
    kw = {"step_size": 0.1} if method == "rk4" else {}
    with torch.no_grad():
        sol = bsolve(
            lambda t, y: -y,
            torch.ones(1, 1, dtype=torch.float64),
            torch.tensor([0.0, 1.5], dtype=torch.float64),
            events=ev,
            method=method,
            **kw,
        )
    period = math.log((0.5 + kick) / 0.5)
    assert len(sol.event_log[0]) == 1 + int((1.5 - math.log(2)) / period)
    assert sol.ys[0, -1, 0].item() >= 0.5 - 1e-9


def test_event_functions_see_the_batch_rows_only():
    # A per-sample parameter (a dose time per row) in the event function, with a reset.
    tau = torch.tensor([1.5, 2.5], dtype=torch.float64)
    ev = Event(lambda t, y: t - tau, direction=1, terminal=False, reset=lambda t, y: y + 1.0)
    with torch.no_grad():
        sol = bsolve(
            lambda t, y: -y,
            torch.ones(2, 1, dtype=torch.float64),
            torch.tensor([0.0, 3.0], dtype=torch.float64),
            events=ev,
        )
    assert [round(row[0][0], 9) for row in sol.event_log] == [1.5, 2.5]


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint", "adjoint"])
def test_gradients_of_parameters_only_the_events_use(gradient):
    # A dose D at time tau into y' = -k y: y(T) = (exp(-k tau) + D) exp(-k (T - tau)), so
    # dy(T)/dtau = k D exp(-k (T - tau)); y0 does not require grad.
    k, D, T = 0.5, 1.0, 4.0
    tau = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    ev = Event(lambda t, y: t - tau, direction=1, terminal=False, reset=lambda t, y: y + D)
    sol = bsolve(
        lambda t, y: -k * y,
        torch.ones(1, 1, dtype=torch.float64),
        torch.tensor([0.0, T], dtype=torch.float64),
        events=ev,
        gradient=gradient,
        adjoint_params=None if gradient == "backprop" else (),
        **TOL,
    )
    (got,) = torch.autograd.grad(sol.ys[0, -1, 0], tau)
    assert got.item() == pytest.approx(k * D * math.exp(-k * (T - 2.0)), rel=1e-7)
    stop = Event(lambda t, y: t - tau)
    sol = bsolve(
        lambda t, y: -k * y,
        torch.ones(1, 1, dtype=torch.float64),
        torch.tensor([0.0, T], dtype=torch.float64),
        events=stop,
        gradient=gradient,
        adjoint_params=None if gradient == "backprop" else (),
    )
    (got,) = torch.autograd.grad(sol.event_t.sum(), tau)
    assert got.item() == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("gradient", ["checkpoint", "adjoint"])
def test_a_failed_rows_reached_outputs_keep_their_gradients(gradient):
    # y' = y^2 from 0.6 blows up at t = 1/0.6; y(0.5) = y0 / (1 - 0.5 y0).
    ev = Event(lambda t, y: y[:, 0] - 10.0, direction=1, terminal=False)
    y0 = torch.tensor([[0.6], [0.1]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    sol = bsolve(
        lambda t, y: y**2, y0, t, events=ev, throw=False, gradient=gradient, adjoint_params=()
    )
    assert sol.status.tolist() == [Status.STEP_SIZE_UNDERFLOW, Status.SUCCESS]
    (got,) = torch.autograd.grad(sol.ys[:, 1].sum(), y0)
    want = 1 / (1 - 0.5 * y0.detach()) ** 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_tuple_states_and_custom_norms_without_a_batch():
    from neuralode import odeint_event

    f = lambda t, y: (y[1], -9.81 * torch.ones_like(y[0]))  # noqa: E731
    y0 = (torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    event_t, sol = odeint_event(
        f, y0, torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, y: y[0]
    )
    assert event_t.item() == pytest.approx(math.sqrt(2 / 9.81), abs=1e-7)
    assert isinstance(sol, tuple) and sol[0].shape == (2,)
    norm = lambda x, dims: x.abs().max()  # noqa: E731  one state's norm, unbatched
    got = solve(
        lambda t, y: -y,
        torch.ones(3, dtype=torch.float64),
        torch.linspace(0, 2, 3, dtype=torch.float64),
        norm=norm,
        events=Event(lambda t, y: y[0] - 0.5),
    )
    assert got.event_t.item() == pytest.approx(math.log(2), abs=1e-6)


def test_simultaneous_events_do_not_depend_on_the_list_order():
    kick = Event(
        lambda t, y: y[:, 0] - 0.5, direction=-1, terminal=False, reset=lambda t, y: y + 0.3
    )
    stop = Event(lambda t, y: y[:, 0] - 0.5, direction=-1, terminal=2)
    times = []
    for evs in ([kick, stop], [stop, kick]):
        with torch.no_grad():
            sol = bsolve(
                lambda t, y: -y,
                torch.ones(1, 1, dtype=torch.float64),
                torch.tensor([0.0, 3.0], dtype=torch.float64),
                events=evs,
            )
        times.append(sol.event_t.item())
        # the second time both fire, the row stops there: that kick is not applied
        assert [k for _, _, k in sol.event_log[0]].count("reset") == 1
    assert times[0] == times[1] == pytest.approx(math.log(2) + math.log(0.8 / 0.5), abs=1e-7)


def test_a_tensor_direction_is_refused_by_name():
    with pytest.raises(ValueError, match="direction"):
        Event(floor, direction=torch.tensor([1, -1]))


_COUNTERS = ("nfe", "n_steps", "n_accepted", "n_rejected", "njev", "nlu", "n_newton")


@pytest.mark.parametrize("method", ["rk4", "implicit_euler", "sdirk2"])
def test_fixed_step_resets_count_each_rows_work_as_its_own_solve(method, monkeypatch):
    # Three balls bounce at different times: after each reset a row takes a partial step back
    # onto the grid, alone.  Each row's counters, status and bounce times are those of a solve
    # of that row by itself, whose evaluations are the field's calls, for an explicit method
    # and for implicit ones (whose Jacobian is evaluated afresh after each reset: njev 4).
    # A row alone: its evaluations are the field's calls, and its Newton iterations the
    # linear solves (one each), counted here.
    t = torch.linspace(0, 4, 5, dtype=torch.float64)
    ev = Event(floor, direction=-1, terminal=4, reset=bounce)
    calls, solves = [0], [0]
    ball = ball_field(9.81)
    lu_solve = torch.linalg.lu_solve

    def counted(tt, y):
        calls[0] += 1
        return ball(tt, y)

    def counted_solve(*args, **kwargs):
        solves[0] += 1
        return lu_solve(*args, **kwargs)

    with torch.no_grad():
        batch = bsolve(ball, drop(H0), t, events=ev, method=method, step_size=0.05)
        rows = []
        monkeypatch.setattr(torch.linalg, "lu_solve", counted_solve)
        for i in range(3):
            calls[0] = solves[0] = 0
            rows.append(solve(counted, drop(H0[i]), t, events=ev, method=method, step_size=0.05))
            assert int(rows[-1].stats.nfe) == calls[0]
            assert int(rows[-1].stats.n_newton) == solves[0]
    for name in _COUNTERS:
        assert getattr(batch.stats, name).tolist() == [int(getattr(r.stats, name)) for r in rows], (
            name
        )
    assert batch.status.tolist() == [Status.EVENT] * 3 == [int(r.status) for r in rows]
    torch.testing.assert_close(batch.event_t, torch.stack([r.event_t for r in rows]))
    # fixed steps: every step accepted; an implicit one factors its matrix once
    assert batch.stats.n_accepted.tolist() == batch.stats.n_steps.tolist()
    if method != "rk4":
        assert batch.stats.njev.tolist() == [4, 4, 4]
        assert batch.stats.nlu.tolist() == batch.stats.n_steps.tolist()


@pytest.mark.parametrize("method", ["implicit_euler", "sdirk2"])
def test_a_fixed_step_whose_newton_iteration_fails_after_a_reset_stops_its_row_only(method):
    # y0 decays at a row's own rate until it falls to 0.5; the reset then switches the field
    # to y0' = 1e4 y0^2, for which the implicit step from 0.5 has no solution: the partial
    # step back onto the grid fails, that row stops with the solver's failure status, and
    # the row that never falls to 0.5 goes on.  Each row's counters (but njev: a batch's
    # Jacobian, taken for every row at once, is counted for each) are those of its own solve.
    rate = torch.tensor([1.0, 1.3, 0.2], dtype=torch.float64)

    def f(t, y):
        switched = y[..., 1]
        k = rate if y.ndim > 1 else rate[which]
        grow = switched * 1e4 * y[..., 0] ** 2 - (1 - switched) * k * y[..., 0]
        return torch.stack([grow, torch.zeros_like(grow)], dim=-1)

    def switch(t, y):
        return torch.stack([y[..., 0], torch.ones_like(y[..., 1])], dim=-1)

    ev = Event(lambda t, y: y[..., 0] - 0.5, direction=-1, terminal=False, reset=switch)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    kw = {"events": ev, "method": method, "step_size": 0.1, "throw": False}
    with torch.no_grad():
        batch = bsolve(f, y0, t, **kw)
        rows = []
        for which in range(3):
            rows.append(solve(f, y0[which], t, **kw))
    assert batch.status.tolist() == [int(r.status) for r in rows]
    assert batch.status.tolist() == [Status.NEWTON_FAILED] * 2 + [Status.SUCCESS]
    # (the failed rows end where their field switched, before the grid's next time)
    assert (batch.t_end[:2] < 1.0).all() and float(batch.t_end[2]) == 2.0
    for name in _COUNTERS:
        if name != "njev":
            assert getattr(batch.stats, name).tolist() == [
                int(getattr(r.stats, name)) for r in rows
            ], name
    assert torch.isfinite(batch.ys[2]).all()
    # the failed step is counted, not accepted; the failed rows have no last output
    steps = batch.stats.n_steps.tolist()
    assert batch.stats.n_accepted.tolist() == [steps[0] - 1, steps[1] - 1, steps[2]]
    assert torch.isnan(batch.ys[:2, -1]).all()


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk4"])
def test_resets_count_their_evaluations_and_show_time_in_the_states_dtype(method):
    # A float32 ball with float64 times bounces four times: the restart after each reset
    # evaluates the field afresh there, once (an FSAL method's carried evaluation from before
    # the jump is stale; the next step's first stage is this one), and the counter holds
    # every call; every call sees float32 time.
    calls, dtypes, points = [0], set(), []
    ball = ball_field(9.81)

    def counted(tt, y):
        calls[0] += 1
        dtypes.add(tt.dtype)
        points.append((float(tt), *y.tolist()))
        return ball(tt, y)

    t = torch.linspace(0, 4, 5, dtype=torch.float64)
    ev = Event(floor, direction=-1, terminal=4, reset=bounce)
    kw = {"step_size": 0.05} if method == "rk4" else {"rtol": 1e-6, "atol": 1e-8}
    with torch.no_grad():
        sol = solve(counted, drop(H0[1]).float(), t, events=ev, method=method, **kw)
    assert sol.status == Status.EVENT and len(sol.event_log) == 4
    assert int(sol.stats.nfe) == calls[0]
    assert dtypes == {torch.float32}
    # no point evaluated twice (the restart's evaluation is the next step's first stage;
    # rk4, exact on the parabolas, meets its own last stage again at the next step's first)
    if method != "rk4":
        assert len(set(points)) == len(points)


def test_a_solve_with_one_output_time_counts_its_one_evaluation_and_no_step():
    # (the entry's evaluation of func at y0, which checks its output)
    for batched in (False, True):
        y0 = drop(H0) if batched else drop(H0[0])
        sol = solve(ball_field(9.81), y0, torch.tensor([0.5]), batched=batched)
        for name in _COUNTERS:
            value = getattr(sol.stats, name)
            assert isinstance(value, torch.Tensor), name
            assert (
                value.tolist() == ([1] * 3 if batched else 1) if name == "nfe" else not value.any()
            )
