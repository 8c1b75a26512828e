"""``step_t`` and ``jump_t`` (torchdiffeq's options): adaptive steps that end on given times, and
a carried state that restarts after a jump (a discontinuity of the field).

* Every ``step_t`` inside the interval is where a step ends, unbatched, batched with per-sample
  grids, and in decreasing time; times outside the interval are ignored.
* Across a jump of the field, ``jump_t`` keeps the solution exact with no rejected step (24
  without it): the step before ends one ulp short of the jump, the next starts one ulp past it
  and evaluates ``f`` afresh (torchdiffeq's perturbation of the time).
* ``odeint(..., options={"step_t": ..., "jump_t": ...})`` is the same solve; a fixed-step method
  refuses them in ``solve`` (and ``odeint`` warns, as torchdiffeq ignores them there); bad values
  are refused, naming the argument.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import neuralode

DTYPE = torch.float64
Y0 = torch.tensor([1.0, 0.0], dtype=DTYPE)


class Recorder:
    def __init__(self, f) -> None:  # type: ignore[no-untyped-def]
        self.f, self.times = f, []

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.times.extend(t.detach().reshape(-1).tolist())
        return self.f(t, y)


def rotation(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([-y[..., 1], y[..., 0]], -1)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "rodas5p"])
def test_steps_end_on_step_t(method: str) -> None:
    """An FSAL or Rosenbrock step starts by evaluating (or taking the Jacobian at) its start:
    each ``step_t`` is such a start.  Without ``step_t`` none of them is."""
    step_t = [0.3141, 1.2345, 2.5, 7.0]  # 7 is past the end: ignored
    t = torch.tensor([0.0, 3.0], dtype=DTYPE)
    rec = Recorder(rotation)
    sol = neuralode.solve(rec, Y0, t, method=method, rtol=1e-6, atol=1e-8, step_t=step_t)
    assert sol.success
    for s in step_t[:3]:
        assert min(abs(x - s) for x in rec.times) < 1e-15, s
    plain = Recorder(rotation)
    neuralode.solve(plain, Y0, t, method=method, rtol=1e-6, atol=1e-8)
    assert all(min(abs(x - s) for x in plain.times) > 1e-9 for s in step_t[:3])
    exact = torch.tensor([torch.cos(torch.tensor(3.0)), torch.sin(torch.tensor(3.0))], dtype=DTYPE)
    torch.testing.assert_close(sol.ys[-1], exact, rtol=1e-5, atol=1e-5)


def test_step_t_batched_per_sample_and_decreasing() -> None:
    """Per-sample grids, one row decreasing: each row ends steps on the ``step_t`` inside its own
    interval, and gives what its own unbatched solve gives."""
    grids = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.5, 0.0]], dtype=DTYPE)
    step_t = torch.tensor([0.75, 1.25], dtype=DTYPE)
    y0 = torch.stack([Y0, Y0])
    batch = neuralode.solve(
        rotation, y0, grids, method="dopri5", rtol=1e-6, atol=1e-8, step_t=step_t
    )
    for i in range(2):
        rec = Recorder(rotation)
        one = neuralode.solve(
            rec, Y0, grids[i], method="dopri5", rtol=1e-6, atol=1e-8, step_t=step_t
        )
        for s in step_t.tolist():
            assert min(abs(x - s) for x in rec.times) < 1e-15, (i, s)
        torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-12, atol=1e-12)
        assert int(batch.stats.n_steps[i]) == int(one.stats.n_steps)


def _switch(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y' = 1`` before t = 1, ``y' = -1`` from then on: y = t, then 2 - t."""
    return torch.where(t < 1.0, 1.0, -1.0).to(y.dtype) * torch.ones_like(y)


def test_jump_t_across_a_discontinuity() -> None:
    t = torch.tensor([0.0, 2.5], dtype=DTYPE)
    y0 = torch.zeros(1, dtype=DTYPE)
    exact = torch.tensor([-0.5], dtype=DTYPE)
    plain = neuralode.solve(_switch, y0, t, method="dopri5", rtol=1e-8, atol=1e-10)
    rec = Recorder(_switch)
    jump = neuralode.solve(rec, y0, t, method="dopri5", rtol=1e-8, atol=1e-10, jump_t=[1.0])
    print(
        "rejected without / with jump_t:", int(plain.stats.n_rejected), int(jump.stats.n_rejected)
    )
    assert int(jump.stats.n_rejected) == 0 < int(plain.stats.n_rejected)
    assert float((jump.ys[-1] - exact).abs()) < 1e-12
    # As torchdiffeq's perturbation: the step before the jump ends one ulp short of it (its last
    # stage sees the left side), the next starts one ulp past it (the right side); f is never
    # evaluated at the jump itself.
    before, after = math.nextafter(1.0, 0.0), math.nextafter(1.0, 2.0)
    assert before in rec.times and after in rec.times and 1.0 not in rec.times
    # Batched (the tensor driver): each row the same as its own solve.
    grids = torch.tensor([[0.0, 2.5], [0.5, 3.0]], dtype=DTYPE)
    rows = neuralode.solve(
        lambda t, y: _switch(t.unsqueeze(-1), y), y0.expand(2, 1), grids, method="dopri5",
        rtol=1e-8, atol=1e-10, jump_t=[1.0],
    )  # fmt: skip
    for i in range(2):
        one = neuralode.solve(
            _switch, y0, grids[i], method="dopri5", rtol=1e-8, atol=1e-10, jump_t=[1.0]
        )
        torch.testing.assert_close(rows.ys[i], one.ys, rtol=1e-13, atol=1e-13)
        assert int(rows.stats.nfe[i]) == int(one.stats.nfe)
    assert not rows.stats.n_rejected.any()
    # step_t lands on 1 itself, where the last stage already sees the right side: rejections.
    step = neuralode.solve(_switch, y0, t, method="dopri5", rtol=1e-8, atol=1e-10, step_t=[1.0])
    assert int(step.stats.n_rejected) > 0


@pytest.mark.parametrize("method", ["dopri5", "kvaerno3", "rodas5p"])
def test_a_step_onto_a_jump_never_evaluates_the_jump_itself(method: str) -> None:
    """From t = 0.3 the step that lands one ulp before the jump at 1 has ``h = (1 - ulp) -
    0.3``, and ``0.3 + h`` rounds up to 1.0 itself: the step's last stage (``c = 1``) saw the
    field's other side (a batched kvaerno3 solve was rejected there and took another step).
    Unbatched and batched, no stage reaches the jump, and y = t, then 2 - t, is exact."""
    before = math.nextafter(1.0, 0.0)
    assert 0.3 + (before - 0.3) == 1.0  # the rounding this test is about
    rec = Recorder(_switch)
    t = torch.tensor([0.3, 2.0], dtype=DTYPE)
    y0 = torch.tensor([0.3], dtype=DTYPE)
    kw = dict(method=method, rtol=1e-8, atol=1e-10, jump_t=[1.0], first_step=0.7)
    one = neuralode.solve(rec, y0, t, **kw)  # type: ignore[arg-type]
    after = math.nextafter(1.0, 2.0)
    assert 1.0 not in rec.times and after in rec.times  # and the restart sees the right side
    assert float((one.ys[-1] - 0.0).abs()) < 1e-12 and int(one.stats.n_rejected) == 0
    rec.times.clear()
    grids = torch.stack([t, torch.tensor([0.0, 2.0], dtype=DTYPE)])
    rows = neuralode.solve(
        lambda t, y: rec(t.unsqueeze(-1), y), torch.tensor([[0.3], [0.0]], dtype=DTYPE), grids,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    assert 1.0 not in rec.times
    torch.testing.assert_close(rows.ys[:, -1], torch.zeros(2, 1, dtype=DTYPE), atol=1e-12, rtol=0)
    assert int(rows.stats.n_rejected[0]) == 0


def test_odeint_options_match_solve() -> None:
    t = torch.tensor([0.0, 2.5], dtype=DTYPE)
    y0 = torch.zeros(1, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected option" warning
        ys = neuralode.odeint(
            _switch, y0, t, rtol=1e-8, atol=1e-10, options={"jump_t": [1.0], "step_t": [2.0]}
        )
    sol = neuralode.solve(_switch, y0, t, rtol=1e-8, atol=1e-10, jump_t=[1.0], step_t=[2.0])
    assert torch.equal(ys, sol.ys)
    with pytest.warns(UserWarning, match="step_t"):  # fixed steps: torchdiffeq ignores it
        neuralode.odeint(_switch, y0, t, method="rk4", options={"step_t": [1.0]})


def test_bad_step_times_are_refused() -> None:
    t = torch.tensor([0.0, 1.0], dtype=DTYPE)
    with pytest.raises(ValueError, match="step_t applies to adaptive methods"):
        neuralode.solve(rotation, Y0, t, method="rk4", step_t=[0.5])
    with pytest.raises(ValueError, match="jump_t must be finite"):
        neuralode.solve(rotation, Y0, t, jump_t=[0.5, float("nan")])
    with pytest.raises(ValueError, match=r"step_t must be a 1-D"):
        neuralode.solve(rotation, Y0, t, step_t=torch.ones(2, 2))


def test_the_adjoint_backward_solve_lands_on_jump_t_too() -> None:
    """y' = k y before t = 1 and -2 k y after: with jump_t the backward solve also ends a step on
    the jump and restarts past it, so it takes fewer evaluations and its gradient is closer to
    the exact one, d/dk of y0 exp(-k) (measured: 147 backward calls and errors 3e-9 against 386
    calls and 6e-7 without)."""
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    calls = {"n": 0}

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.where(t < 1.0, 1.0, -2.0) * k * y

    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    exact = -torch.exp(-k.detach())
    results = {}
    for name, opts in (("plain", {}), ("jump", {"jump_t": torch.tensor([1.0])})):
        ys = neuralode.odeint_adjoint(
            f, y0, t, rtol=1e-8, atol=1e-10, options=opts, adjoint_params=(k,)
        )
        calls["n"] = 0
        (g,) = torch.autograd.grad(ys[-1].sum(), (k,))
        results[name] = (calls["n"], abs(float(g - exact)))
    assert results["jump"][0] < 0.6 * results["plain"][0]
    assert results["jump"][1] < 1e-8 < results["plain"][1]
    # Decreasing time: the same jump seen from the other end.
    ys = neuralode.odeint_adjoint(
        f, y0, t.flip(0), rtol=1e-8, atol=1e-10, options={"jump_t": [1.0]}, adjoint_params=(k,)
    )
    (g,) = torch.autograd.grad(ys[-1].sum(), (k,))
    # y(0) from y(2) = 1 backwards: exp(+k) (the same field, integrated the other way)
    assert abs(float(g - torch.exp(k.detach()))) < 1e-7


@pytest.mark.parametrize("rows", [1, 3])
def test_a_batched_adjoint_lands_on_jump_t_with_any_number_of_rows(rows: int) -> None:
    """Batched, the backward solve reads the shared grid from the first row (a batch of one
    has no other): the gradient is the rows' d/dk of y0 exp(-k), to 1e-7 each."""
    k = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(t < 1.0, 1.0, -2.0).unsqueeze(-1) * k * y

    y0 = torch.ones(rows, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    sol = neuralode.solve(f, y0, t, batched=True, rtol=1e-8, atol=1e-10, jump_t=[1.0],
                          gradient="adjoint", adjoint_params=(k,))  # fmt: skip
    (g,) = torch.autograd.grad(sol.ys[:, -1].sum(), (k,))
    assert abs(float(g) + rows * math.exp(-0.7)) < 1e-7 * rows


def _kinked_adjoint(
    t: torch.Tensor, step_t: list[float] | None, rows: int | None = None
) -> tuple[float, torch.Tensor]:
    """y' = -k |t - 1/2| y, its rate kinked at t = 1/2, by the adjoint: d/dk of the sum of the
    last outputs, and the times the backward solve evaluated the field at."""
    k = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)
    seen: list[torch.Tensor] | None = None

    def f(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if seen is not None:
            seen.append(tt.detach().reshape(-1).clone())
        rate = torch.abs(tt - 0.5)
        return -k * (rate.unsqueeze(-1) if rows else rate) * y

    y0 = torch.ones(rows, 1, dtype=DTYPE) if rows else torch.ones(1, dtype=DTYPE)
    sol = neuralode.solve(f, y0, t, batched=rows is not None, rtol=1e-6, atol=1e-8,
                          step_t=step_t, gradient="adjoint", adjoint_params=(k,))  # fmt: skip
    seen = []
    (g,) = torch.autograd.grad(sol.ys[..., -1, :].sum(), (k,))
    return float(g), torch.cat(seen)


def _integral_of_kink(a: float, b: float) -> float:
    """The integral of |t - 1/2| from a to b."""

    def antiderivative(x: float) -> float:
        return (x - 0.5) * abs(x - 0.5) / 2

    return antiderivative(b) - antiderivative(a)


@pytest.mark.parametrize(
    ("grid", "rows"),
    [
        ([0.0, 1.0, 2.0], None),
        ([2.0, 1.0, 0.0], None),  # decreasing: mirrored step times
        # per-sample grids, identical and decreasing: the step times mirrored per row, [3, 3]
        ([[2.0, 1.0, 0.0]] * 3, 3),
    ],
)
def test_the_adjoint_backward_solve_lands_on_step_t_too(grid, rows) -> None:
    """With ``step_t`` at the kinks of the backward field, the backward solve ends a step on each
    (the field is evaluated there exactly), in each interval of the output grid (a step time on
    an output time, 1.0, changes nothing: the intervals end there anyway); it takes fewer
    evaluations, and the gradient is closer to the exact one, d/dk of exp(-k * integral)
    (measured, relative errors: increasing, 63 backward calls and 6e-8 against 105 calls and
    3e-5; decreasing, 69 and 1.3e-6 against 111 and 6e-6)."""
    t = torch.tensor(grid, dtype=DTYPE)
    t0, t1 = float(t.reshape(-1)[0]), float(t.reshape(-1)[-1])
    area = _integral_of_kink(t0, t1)
    exact = (rows or 1) * -area * math.exp(-0.7 * area)
    g_plain, seen_plain = _kinked_adjoint(t, None, rows)
    g_land, seen_land = _kinked_adjoint(t, [0.5, 1.0, 1.5], rows)
    for kink in (0.5, 1.5):
        assert bool((seen_land == kink).any()), kink
        assert not bool((seen_plain == kink).any()), kink
    assert len(seen_land) < 0.8 * len(seen_plain)
    assert abs(g_land - exact) < min(2e-6 * abs(exact), abs(g_plain - exact) / 4)


def test_an_adjoint_over_rows_of_both_directions_with_step_t_is_exact() -> None:
    """Rows integrated 0 -> 2 and 0 -> -2 share one backward clock; their mirrored step times
    differ, so the backward solve takes no landing from them, and the gradient stays right."""
    t = torch.tensor([[0.0, 1.0, 2.0], [0.0, -1.0, -2.0]], dtype=DTYPE)
    g, _ = _kinked_adjoint(t, [0.5, 1.5], rows=2)
    exact = sum(
        -a * math.exp(-0.7 * a) for a in (_integral_of_kink(0.0, 2.0), _integral_of_kink(0.0, -2.0))
    )
    assert abs(g - exact) < 1e-5 * abs(exact)


def test_a_fixed_step_backward_solve_keeps_its_grid_under_step_t() -> None:
    """An adaptive forward solve with ``step_t`` and a fixed-step backward solve (rk4, h = 0.25,
    whose grid holds the kinks): the backward steps stay on that grid, and the gradient is
    within rk4's error of the exact one (measured: 6.6e-5 relative)."""
    k = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)

    def f(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -k * torch.abs(tt - 0.5) * y

    t = torch.tensor([0.0, 1.0, 2.0], dtype=DTYPE)
    sol = neuralode.solve(f, torch.ones(1, dtype=DTYPE), t, step_t=[0.5, 1.5], rtol=1e-10,
                          atol=1e-12, gradient="adjoint", adjoint_params=(k,),
                          adjoint_method="rk4", adjoint_options={"step_size": 0.25})  # fmt: skip
    (g,) = torch.autograd.grad(sol.ys[-1].sum(), (k,))
    area = _integral_of_kink(0.0, 2.0)
    exact = -area * math.exp(-0.7 * area)
    assert sol.stats.n_steps > 0
    assert abs(float(g) - exact) < 1e-4 * abs(exact)


def test_identical_per_sample_grids_land_as_their_shared_grid() -> None:
    """Three identical decreasing rows mirror ``step_t`` per row; the backward solve lands on the
    times once each, evaluating the field where the one-row solve does (to round-off), row by
    row."""
    t = torch.tensor([2.0, 1.0, 0.0], dtype=DTYPE)
    _, seen_one = _kinked_adjoint(t, [0.5, 1.5])
    _, seen_rows = _kinked_adjoint(t.expand(3, 3), [0.5, 1.5], rows=3)
    # (the same steps: per-sample grids reach the same times through other roundings)
    assert seen_rows.shape == (3 * len(seen_one),)
    assert torch.allclose(
        seen_rows.view(-1, 3), seen_one.unsqueeze(1).expand(-1, 3), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rodas5p", "auto"])
def test_a_batch_jumps_as_each_row_alone(method: str) -> None:
    """A switched field with ``jump_t``: every row of a batch (the tensor driver) takes the steps
    a solve of that row alone takes (the unbatched driver), restarting its carried state one
    ulp past the jump (an FSAL method's last evaluation, a Rosenbrock method's Jacobian, seen
    from before the switch, would be wrong after it; ``auto``'s switching state starts
    afresh): the same values and counters.  (Not for Newton-iterated methods: a batch's rows
    share its iterations and Jacobians.)"""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rate = torch.where(t < 1.0, 1.0, torch.where(t < 1.5, -2.0, 0.5))
        return (rate.unsqueeze(-1) if y.ndim > 1 else rate) * y + torch.sin(3 * y)

    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3], [-1.0, 2.0]], dtype=DTYPE)
    t = torch.tensor([0.0, 0.5, 2.0], dtype=DTYPE)
    kw = {"method": method, "rtol": 1e-7, "atol": 1e-9, "jump_t": [1.0, 1.5]}
    batch = neuralode.solve(f, y0, t, batched=True, **kw)
    for i in range(3):
        row = neuralode.solve(f, y0[i], t, **kw)
        torch.testing.assert_close(batch.ys[i], row.ys, rtol=1e-12, atol=1e-12)
        for name in ("nfe", "n_steps", "n_accepted", "n_rejected", "njev", "nlu"):
            assert int(getattr(batch.stats, name)[i]) == int(getattr(row.stats, name)), name


def test_auto_in_a_batch_lands_on_step_t_and_on_its_stiff_rows_outputs() -> None:
    """``method="auto"`` lands on the outputs on its stiff rows only (a Rosenbrock interpolant
    is not error-controlled in the stiff regime), and on ``step_t`` on every row: the batch's
    two lists of targets, with and without the outputs.  Each row of a batch with one stiff row
    gives what it gives alone, landing where that solve lands."""
    lam = torch.tensor([1.0, 1e4], dtype=DTYPE)

    def field(rate: torch.Tensor):  # type: ignore[no-untyped-def]
        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            tt = t.unsqueeze(-1) if y.ndim > 1 and t.ndim == 1 else t
            return -rate * (y - torch.cos(tt)) + 0.1 * y

        return f

    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=DTYPE)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=DTYPE)
    step_t = [0.75, 1.3]
    kw = {"method": "auto", "rtol": 1e-6, "atol": 1e-8, "step_t": step_t}
    batch = neuralode.solve(field(lam.unsqueeze(-1)), y0, t, batched=True, **kw)
    assert batch.success
    rows = []
    for i in range(2):
        rec = Recorder(field(lam[i]))
        row = neuralode.solve(rec, y0[i], t, **kw)
        rows.append(row)
        for s in step_t:
            assert min(abs(x - s) for x in rec.times) < 1e-15, (i, s)
        # the stiff row's steps end on the outputs, the other row's do not
        on_outputs = [min(abs(x - s) for x in rec.times) < 1e-15 for s in (0.5, 1.0)]
        assert on_outputs == [i == 1, i == 1], (i, on_outputs)
        torch.testing.assert_close(batch.ys[i], row.ys, rtol=1e-12, atol=1e-12)
        for name in ("nfe", "n_steps", "n_rejected", "njev", "nlu"):
            assert int(getattr(batch.stats, name)[i]) == int(getattr(row.stats, name)), name
    assert int(batch.stats.njev[0]) == 0 < int(batch.stats.njev[1])
    # The first step too: a non-stiff start aims past the outputs (a first step of 0.6 ends
    # at 0.6, not on the output at 0.5).
    rec = Recorder(field(lam[0]))
    neuralode.solve(rec, y0[0], t, first_step=0.6, **kw)
    assert 0.6 in rec.times and min(abs(x - 0.5) for x in rec.times) > 1e-9
    # A step time at the start (or before it) is no target: the same solve.
    for i in range(2):
        more = neuralode.solve(field(lam[i]), y0[i], t, **{**kw, "step_t": [-1.0, 0.0, *step_t]})
        assert torch.equal(more.ys, rows[i].ys) and torch.equal(more.stats.nfe, rows[i].stats.nfe)


@pytest.mark.parametrize("batched", [False, True])
def test_step_t_does_not_make_the_outputs_step_times(batched: bool) -> None:
    """A solver that does not land on the outputs keeps not landing on them when ``step_t`` is
    given: ``step_t`` at (or past) the end changes no step, and an interior one adds one step's
    end, not one per output."""
    t = torch.linspace(0.0, 3.0, 61, dtype=DTYPE)
    y0 = torch.stack([Y0, 2 * Y0]) if batched else Y0
    kw = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8}
    plain = neuralode.solve(rotation, y0, t, **kw)
    for step_t in ([3.0], [7.0]):
        same = neuralode.solve(rotation, y0, t, step_t=step_t, **kw)
        torch.testing.assert_close(same.ys, plain.ys, rtol=0, atol=0)
        assert torch.equal(same.stats.n_steps, plain.stats.n_steps)
    inner = neuralode.solve(rotation, y0, t, step_t=[1.1], **kw)
    assert (inner.stats.n_steps - plain.stats.n_steps).abs().max() <= 1
    assert int(plain.stats.n_steps.max()) < 30  # fewer steps than the outputs' 60 intervals
