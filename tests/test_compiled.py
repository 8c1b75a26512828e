"""The compiled driver (``solve(..., compile=...)``): the same solves as the eager loop.

Most tests compile with the ``"eager"`` backend (dynamo traces the block whole, with
``fullgraph=True``, and runs the captured graph as it is) or ``"aot_eager"`` (the graph and its
backward through AOTAutograd): both check that a block has no graph break, and both build in a
second.  One test compiles with inductor, as users do.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import pytest
import torch

import neuralode
from neuralode import CompileOptions, Event, SolverError, Status, _compiled, odeint, solve
from neuralode._compiled import _CACHE, NO_LOOP, _block_size, reset

# One block size (one graph per kind of solve) keeps the tracing short.
TRACE = {"backend": "eager", "block": 2}
# neuralode's and torch's own files (a warning of the backward pass names neither)
_LIBRARIES = (os.path.dirname(neuralode.__file__), os.path.dirname(torch.__file__))
AOT = {"backend": "aot_eager", "block": 2}
# The whole solve in one while_loop (solves through which no gradient flows).
LOOP = {"backend": "eager", "loop": True}
DRIVERS = pytest.mark.parametrize("drv", [TRACE, LOOP], ids=["blocks", "loop"])


def csolve(*args, compile, **kw):
    """``solve`` compiled as ``compile`` says, without autograd for the loop (which a solve
    that needs a gradient does not take)."""
    with torch.set_grad_enabled(compile is not LOOP):
        sol = solve(*args, compile=compile, **kw)
    used = {key[0] for key in _CACHE}
    if compile is LOOP:  # the solve ran in one loop, not in blocks after a failed trace
        assert not NO_LOOP and used & {"_adaptive_loop", "_fixed_loop"}, used
        assert not used & {"_adaptive_block", "_fixed_block", "_initial_step"}, used
    return sol


@pytest.fixture(autouse=True)
def _fresh_graphs():
    # Before each test too: another file's test in the same worker (the docs' examples run
    # `compile=` solves) may have left blocks in the cache that these tests count.
    reset()
    yield
    reset()


class MLP(torch.nn.Module):
    def __init__(self, d: int = 3, h: int = 16, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, d)
        ).to(dtype)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y) * torch.cos(t).unsqueeze(-1) if t.ndim else self.net(y) * torch.cos(t)


def _pair(method, y0, t, batched, comp=TRACE, **kw):
    f = MLP(y0.shape[-1], dtype=y0.dtype)
    eager = solve(f, y0, t, method=method, batched=batched, **kw)
    return eager, csolve(f, y0, t, method=method, batched=batched, compile=comp, **kw)


def comp_fsal(method: str) -> bool:
    return bool(neuralode.get_solver(method).fsal)


ADAPTIVE = ["dopri5", "tsit5", "bosh3", "fehlberg2", "dopri8"]


@pytest.mark.parametrize(
    ("method", "batched"),
    [(m, b) for m in ADAPTIVE for b in (False, True) if b or m in ("dopri5", "fehlberg2")],
)
@DRIVERS
def test_adaptive_matches_the_eager_loop(method, batched, drv):
    """Same steps, same counters, same outputs: at the end only, and at outputs inside steps
    (interpolated; dopri8, whose interpolant costs three more evaluations, lands on each)."""
    y0 = torch.randn(5, 3, dtype=torch.float64)
    kw = {"rtol": 1e-7, "atol": 1e-9}
    t2 = torch.tensor([0.0, 3.0], dtype=torch.float64)
    eager, comp = _pair(method, y0, t2, batched, drv, **kw)
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-10)
    for name in ("n_steps", "n_accepted", "n_rejected"):
        assert torch.equal(getattr(comp.stats, name), getattr(eager.stats, name)), name
    # A method without first-same-as-last (fehlberg2) computes its interpolant's f(t + h, y1),
    # the next step's first stage, in every attempt: one more at the last step and at each
    # rejected one.
    extra = comp.stats.nfe - eager.stats.nfe
    expected = 0 if comp_fsal(method) else 1 + eager.stats.n_rejected
    assert torch.equal(extra, torch.zeros_like(extra) + expected)
    assert torch.equal(comp.status, eager.status)
    torch.testing.assert_close(comp.t_end, eager.t_end)
    t6 = torch.linspace(0.0, 3.0, 6, dtype=torch.float64)
    eager, comp = _pair(method, y0, t6, batched, drv, **kw)
    if method == "dopri8":  # lands on every output: other steps, the same solution
        torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-10)
        assert torch.equal(comp.stats.n_steps, eager.stats.n_steps)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "rk38"])
@DRIVERS
def test_fixed_matches_the_eager_loop(method, batched, drv):
    """Fixed grids, with outputs on the grid (``step_size=None``) and between its points (the
    method's interpolant); a grid of 7 steps is not a multiple of the block (8 -> one block of
    7) and one of 23 is (blocks of 8, padded with zero steps)."""
    y0 = torch.randn(4, 3, dtype=torch.float64)
    for t, step in (
        (torch.linspace(0, 2, 8, dtype=torch.float64), None),
        (torch.linspace(0, 2, 5, dtype=torch.float64), 0.09),
    ):
        eager, comp = _pair(method, y0, t, batched, drv, step_size=step)
        torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-12, atol=1e-12)
        assert torch.equal(comp.stats.n_steps, eager.stats.n_steps)
        # The interpolant's f(t + h, y1) starts the next step; the last step's is one more.
        assert bool((comp.stats.nfe - eager.stats.nfe <= 1).all())


def test_converges_at_the_method_order():
    """rk4 through the compiled rollout: error ratio 16 per halving of the step."""
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)

    def f(t, y):
        return torch.stack([y[1], -y[0]])

    exact = torch.tensor([math.cos(2.0), -math.sin(2.0)], dtype=torch.float64)
    errs = [
        float((solve(f, y0, t, method="rk4", step_size=h, compile=TRACE).ys[-1] - exact).norm())
        for h in (0.1, 0.05)
    ]
    assert 14 < errs[0] / errs[1] < 18


def test_many_outputs_pass_at_most_max_outputs_per_step():
    """Fifty outputs over a few steps: a step passes at most ``max_outputs`` of them, and every
    output still agrees with the eager solve to the tolerance."""
    y0 = torch.randn(3, dtype=torch.float64)
    t = torch.linspace(0, 5, 50, dtype=torch.float64)
    f = MLP(3, dtype=torch.float64)
    eager = solve(f, y0, t, rtol=1e-8, atol=1e-10)
    comp = solve(f, y0, t, rtol=1e-8, atol=1e-10, compile={**TRACE, "max_outputs": 4})
    assert int(comp.stats.n_accepted) >= 49 // 4
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-6, atol=1e-6)
    assert not bool(torch.isnan(comp.ys).any())


@DRIVERS
def test_per_row_steps_and_decreasing_time_and_tuple_state(drv):
    """Rows keep their own steps (a stiff-ish row does not shrink the others); time may run
    backwards; a tuple state is flattened as in the eager solve."""
    rates = torch.tensor([0.1, 1.0, 30.0], dtype=torch.float64)

    def f(t, y):
        a, b = y
        return (-rates.unsqueeze(1) * a, a.sum(-1, keepdim=True) - b)

    y0 = (torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))
    t = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    eager = solve(f, y0, t, batched=True, rtol=1e-6, atol=1e-8)
    comp = csolve(f, y0, t, batched=True, rtol=1e-6, atol=1e-8, compile=drv)
    for a, b in zip(comp.ys, eager.ys):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(comp.stats.nfe, eager.stats.nfe)
    assert len(set(comp.stats.nfe.tolist())) == 3


def test_backprop_gradients_match_the_eager_loop():
    f = MLP(3, dtype=torch.float64)
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 1.5], dtype=torch.float64, requires_grad=True)
    grads = []
    for comp in (False, AOT):
        sol = solve(f, y0, t, rtol=1e-8, atol=1e-10, batched=True, compile=comp)
        loss = sol.ys.square().sum()
        grads.append(torch.autograd.grad(loss, (y0, t, *f.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_gradcheck_through_compiled_blocks():
    """Gradients of the compiled solve against finite differences (float64)."""
    w = torch.tensor([[-0.5, 1.0], [-1.0, -0.2]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)

    def run(y0, w):
        return solve(lambda t, y: y @ w.T, y0, t, rtol=1e-10, atol=1e-12, compile=AOT).ys

    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (y0, w))


def test_adjoint_forward_is_compiled():
    f = MLP(3, dtype=torch.float64)
    y0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    grads = []
    for comp in (False, AOT):
        sol = solve(f, y0, t, rtol=1e-9, atol=1e-11, gradient="adjoint", compile=comp)
        grads.append(torch.autograd.grad(sol.ys[-1].sum(), (y0, *f.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


class _Counting:
    """A torch.compile backend that keeps each graph it is given and counts their calls."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        self.graphs.append(gm)

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


def _grads_and_work(f, y0, t, comp, **kw):
    y0 = y0.detach().requires_grad_(True)
    sol = solve(f, y0, t, rtol=1e-7, atol=1e-9, gradient="adjoint", compile=comp, **kw)
    grads = torch.autograd.grad(sol.ys.square().sum(), (y0, *f.parameters()))
    return grads, sol.backward_stats


@pytest.mark.parametrize(
    ("batched", "grid", "norm"),
    [
        (False, "shared", "seminorm"),
        (True, "shared", "rms"),
        (True, "per-row", "seminorm"),
        (True, "shared", "max"),
        (False, "shared", "callable"),
    ],
)
def test_adjoint_backward_is_compiled(batched, grid, norm):
    """With ``compile=``, the adjoint's backward solve runs in compiled blocks too: every
    interval's, on graphs built once (not per output interval), with the eager backward solve's
    steps, counters and gradients, for each norm of the augmented state and per-row grids."""
    f = MLP(3, dtype=torch.float64)
    y0 = torch.randn(4, 3, dtype=torch.float64) if batched else torch.randn(3, dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)
    if grid == "per-row":
        t = t * torch.tensor([[1.0], [0.5], [1.5], [0.8]], dtype=torch.float64)

    def mixed(parts):  # torchdiffeq's signature: (t, y, adj_y, *adj_params)
        return 3.0 * torch.stack([p.abs().max() for p in parts[1:3]]).max()

    kw = {"batched": batched, "adjoint_options": {"norm": mixed if norm == "callable" else norm}}
    g_eager, work_eager = _grads_and_work(f, y0, t, False, **kw)
    backend = _Counting()
    comp = {"backend": backend, "block": 2}
    y0 = y0.detach().requires_grad_(True)
    sol = solve(f, y0, t, rtol=1e-7, atol=1e-9, gradient="adjoint", compile=comp, **kw)
    forward_graphs = len(backend.graphs)
    backend.calls = 0
    g_comp = torch.autograd.grad(sol.ys.square().sum(), (y0, *f.parameters()))
    backward_graphs = len(backend.graphs) - forward_graphs
    # Hairer's first step (the first interval only) and the block: built once for 5 intervals.
    assert backward_graphs == 2, backward_graphs
    assert backend.calls >= int(work_eager.n_steps) // 2  # every step in a compiled block
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name in ("nfe", "n_steps", "n_accepted", "n_rejected"):
        assert torch.equal(getattr(sol.backward_stats, name), getattr(work_eager, name)), name
    assert int(work_eager.n_steps) > 5  # more than one step per interval
    if norm == "callable":  # the callable, not a default norm, chose the steps
        _, work_default = _grads_and_work(f, y0, t, False, batched=batched)
        assert int(work_default.n_steps) < int(work_eager.n_steps)
    # A second solve with new values reuses every graph.
    before = len(backend.graphs)
    _grads_and_work(f, y0 * 0.5, t, comp, **kw)
    assert len(backend.graphs) == before


@pytest.mark.parametrize("first_step", [None, 0.01])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_each_block_is_compiled_once(first_step, grad, batched):
    """The first block's inputs have the strides and ``requires_grad`` the later blocks' have (a
    graph is specialised on both: a broadcast ``first_step``, and a ``y0`` without grad for a
    field with parameters, compiled the block a second time): one graph for the block, and one
    for Hairer's first step where it is taken."""
    backend = _Counting()
    y0 = torch.randn(4, 3, dtype=torch.float64) if batched else torch.randn(3, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    f = MLP(3, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        sol = solve(f, y0, t, first_step=first_step, batched=batched,
                    compile={"backend": backend, "block": 2})  # fmt: skip
    assert sol.ys.requires_grad == grad
    assert int(sol.stats.n_steps.max()) > 4  # more than two blocks
    assert len(backend.graphs) == 1 + (first_step is None)


@pytest.mark.parametrize("fixed", [False, True])
def test_a_solve_without_gradient_is_one_loop_call(fixed):
    """A solve through which no gradient flows runs whole in one compiled call (a while_loop:
    no host synchronisation), on one graph that new values and tolerances reuse; one that
    needs a gradient takes blocks."""
    backend = _Counting()
    f = MLP(3, dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    kw = {"method": "rk4", "step_size": 0.1} if fixed else {"rtol": 1e-7, "atol": 1e-9}
    opts = {"backend": backend}  # loop=None: the loop where no block size is given
    with torch.no_grad():
        for k in range(3):
            y0 = torch.randn(4, 3, dtype=torch.float64)
            sol = solve(f, y0, t, batched=True, compile=opts, **kw)
            ref = solve(f, y0, t, batched=True, **kw)
            torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-10, atol=1e-12)
            assert torch.equal(sol.stats.n_steps, ref.stats.n_steps)
            assert len(backend.graphs) == 1 and backend.calls == k + 1
            # more steps than a block of the default size
            assert k > 0 or int(sol.stats.n_steps.max()) > 8
            if not fixed:
                kw["rtol"] *= 10  # a new tolerance: a new input, not a new graph
    sol = solve(f, y0, t, batched=True, compile=opts, **kw)  # with autograd: blocks
    assert sol.ys.requires_grad
    assert len(backend.graphs) > 1
    assert ("_fixed_block" if fixed else "_adaptive_block") in {k[0] for k in _CACHE}


class _Syncs:
    """Counts the host synchronisations a solve makes outside its compiled calls: reading a
    tensor's value on the host (``bool``, ``int``, ``float``, ``item``, ``tolist``), which on a
    GPU waits for its queue.  (Inside a compiled call the test backend, ``"eager"``, runs a
    ``while_loop``'s condition in Python, reading it each iteration; inductor's C++ loop does
    not.)"""

    NAMES = ("__bool__", "__int__", "__float__", "item", "tolist")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, self.inside = 0, False
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        call = neuralode._compiled._call

        def uncounted(*args, **kw):
            self.inside = True
            try:
                return call(*args, **kw)
            finally:
                self.inside = False

        monkeypatch.setattr(neuralode._compiled, "_call", uncounted)

    def _counted(self, read):
        def counted(x, *args):
            self.count += not self.inside
            return read(x, *args)

        return counted


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("fixed", [None, 0.1])
def test_a_solve_without_gradient_synchronises_twice(batched, fixed, monkeypatch):
    """A compiled solve that needs no gradient reads values on the host twice: once for its
    inputs' checks (finite state, times and first evaluation, monotonic times, which rows run
    backwards), once for its outputs (finite, every row done); one more per block with a
    gradient, and on a grid of ``step_size`` two more: its number of steps and the most outputs
    in one step, which the graph is built on.  (Each check read its own value before: seven
    reads, and the grid's steps were counted twice.)"""
    f = MLP(3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.7, 2.0], dtype=torch.float64)
    y0 = torch.randn(4, 3, dtype=torch.float64) if batched else torch.randn(3, dtype=torch.float64)
    kw = {"method": "rk4", "step_size": fixed} if fixed else {"rtol": 1e-7, "atol": 1e-9}
    reads = 2 + (2 if fixed else 0)
    with torch.no_grad():
        ref = solve(f, y0, t, batched=batched, compile=LOOP, **kw)  # traced before counting
        syncs = _Syncs(monkeypatch)
        sol = solve(f, y0, t, batched=batched, compile=LOOP, **kw)
    assert syncs.count == reads
    assert torch.equal(sol.ys, ref.ys)
    solve(f, y0, t, batched=batched, compile=TRACE, **kw)  # blocks of 2 attempts, traced
    syncs.count = 0
    sol = solve(f, y0, t, batched=batched, compile=TRACE, **kw)
    count, steps = syncs.count, int(sol.stats.n_steps.max())
    assert sol.ys.requires_grad
    assert steps > 2 and count == reads + (0 if fixed else math.ceil(steps / 2))
    syncs.count = 0
    with torch.no_grad():  # the fixed grid of the output times: nothing to read
        sol = solve(f, y0, t, batched=batched, method="rk4", compile=LOOP)
    assert syncs.count == 2 and int(sol.stats.n_steps.max()) == 2


@pytest.mark.parametrize(
    ("y0", "t", "match"),
    [
        ([math.nan, 1.0], [0.0, 1.0, 0.5], r"^y0 contains NaN"),  # the state first
        ([1.0, 1.0], [0.0, math.inf, 0.5], r"^t contains NaN or Inf"),
        ([1.0, 1.0], [0.0, 1.0, 0.5], r"^t must be strictly increasing or strictly decreasing;"),
        ([1e38, 1e38], [0.0, 1.0], r"^func returned NaN or Inf at the initial time t=0 "),
    ],
)
def test_the_inputs_values_are_checked_in_order_in_one_read(y0, t, match):
    """The value checks read their flags together, then report the first failure in the order
    the checks had one by one; a float32 sum that overflows (1e38 + 1e38) is not taken for an
    infinite state (the state is finite: only func's ``y * 1e10`` is not)."""
    with pytest.raises(ValueError, match=match):
        solve(lambda t, y: y * 1e10, torch.tensor(y0), torch.tensor(t), compile=LOOP)


@pytest.mark.parametrize("n_steps", [9, 10, 2])
def test_a_fixed_loop_takes_block_steps_per_iteration(n_steps):
    """With ``loop`` and a ``block`` of 3, a fixed grid's loop runs 3 steps per iteration (a
    grid of 9 exactly, one of 10 padded with two steps of zero, one of 2 with one): the same
    outputs and counters as the eager loop, from one graph; the outputs inside steps (the
    interpolant) are placed from every step of an iteration."""
    backend = _Counting()
    f = MLP(3, dtype=torch.float64)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    h = 2.0 / n_steps
    t = torch.tensor(sorted({0.0, 0.3 * h, 1.5 * h, 2.0 - 0.5 * h, 2.0}), dtype=torch.float64)
    opts = {"backend": backend, "loop": True, "block": 3}
    with torch.no_grad():
        ref = solve(f, y0, t, batched=True, method="rk4", step_size=h)
        sol = solve(f, y0, t, batched=True, method="rk4", step_size=h, compile=opts)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)
    assert torch.equal(sol.stats.n_steps, ref.stats.n_steps)
    assert torch.equal(sol.stats.n_steps, torch.full((4,), n_steps))
    assert len(backend.graphs) == 1 and {k[0] for k in _CACHE} == {"_fixed_loop"}
    assert {k[-1] for k in _CACHE} == {3}


@pytest.mark.parametrize(("n_steps", "block"), [(130, 16), (127, 8), (5, 5)])
def test_a_fixed_loop_takes_16_steps_per_iteration_on_a_long_grid(n_steps, block):
    """Without a ``block``, a fixed grid's loop takes 16 steps per iteration from 128 steps on
    (130: padded with 14 steps of zero), 8 below, the grid's own count below 8: the outputs
    and counters are the eager loop's."""
    backend = _Counting()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    with torch.no_grad():
        kw = dict(batched=True, method="rk4", step_size=1.0 / n_steps)
        ref = solve(lambda t, y: torch.sin(y) - y, y0, t, **kw)
        sol = solve(lambda t, y: torch.sin(y) - y, y0, t, compile={"backend": backend}, **kw)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-12)
    assert torch.equal(sol.stats.n_steps, ref.stats.n_steps)
    assert {k[0] for k in _CACHE} == {"_fixed_loop"} and {k[-1] for k in _CACHE} == {block}


def test_a_loop_carries_each_value_exactly():
    """The loop packs its per-row vectors into one floating and one integer matrix and
    unpacks them into their own dtypes, exactly (float32 and float64 vectors share a float64
    matrix, bools and counters a long one); a float32 state of one number per row, itself
    such a vector, comes out of an adaptive and a fixed-step loop as out of the eager loop."""
    from neuralode._compiled import _Packed

    leaves = [
        torch.tensor([0.1, -2.5], dtype=torch.float32),
        torch.tensor([1e-300, 3.0], dtype=torch.float64),
        torch.tensor([True, False]),
        torch.tensor([2**40, -1]),
        torch.randn(2, 3),
        torch.tensor(7),
        torch.randn(2, dtype=torch.complex64),  # a complex vector stays as it is
    ]
    packing = _Packed(leaves)
    packed = packing.pack(leaves)
    assert len(packed) == 2 + 3  # four vectors in two matrices, three tensors as they are
    assert packed[0].dtype == torch.float64 and packed[1].dtype == torch.long
    back = packing.unpack(tuple(packed))
    for a, b in zip(back, leaves):
        assert a.dtype == b.dtype and torch.equal(a, b)

    def f(t, y):
        return -y * (1 + 0.5 * torch.sin(t))

    y0 = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float32)  # [rows]: one number per row
    t = torch.linspace(0.0, 2.0, 4)
    cases = [(kw, drv) for kw in ({"rtol": 1e-5, "atol": 1e-7}, {"method": "rk4", "step_size": 0.1})
             for drv in (LOOP, TRACE)]  # fmt: skip
    for kw, drv in cases:  # (blocks too: a state of one number per row failed in both before)
        ref = solve(f, y0, t, batched=True, **kw)
        sol = csolve(f, y0, t, batched=True, compile=drv, **kw)
        assert sol.ys.dtype == torch.float32
        torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-6, atol=1e-7)
        for name in ("n_steps", "n_accepted", "n_rejected"):
            assert torch.equal(getattr(sol.stats, name), getattr(ref.stats, name)), name
        # (rk4's interpolant evaluates f(t + h, y1), the next step's first stage, in the
        # compiled steps: one more evaluation at the last)
        extra = 0 if "rtol" in kw else 1
        assert torch.equal(sol.stats.nfe, ref.stats.nfe + extra)
        assert torch.equal(sol.status, ref.status)
        reset()


def test_a_field_that_cannot_run_in_a_loop_takes_blocks():
    """A loop's body may not change Python state: a field that does (a call counter) is
    solved in blocks instead, with the same numbers."""
    calls = []

    def f(t, y):
        calls.append(1)
        return -y

    y0, t = torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = solve(f, y0, t, rtol=1e-8, atol=1e-10, compile={"backend": "eager"})
    torch.testing.assert_close(sol.ys[-1], torch.full_like(y0, math.exp(-1.0)))
    assert len(NO_LOOP) == 1 and {k[0] for k in _CACHE} >= {"_adaptive_block"}
    assert calls


def test_adjoint_backward_runs_eager_where_it_cannot_be_traced():
    """A field whose output depends on ``adjoint_params`` through a graph built before the solve
    (``k = log_k.exp()``) cannot be traced inside a compiled graph: its backward solve runs
    eager, with one warning for that field, and the gradients are the eager solve's."""
    log_k = torch.tensor([0.1, -0.3], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, 2.0], [0.5, 0.1]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def run(comp):
        k = log_k.exp()

        def f(t, y):
            return -k * y + torch.sin(t)

        sol = solve(f, y0, t, batched=True, gradient="adjoint", adjoint_params=(log_k,),
                    compile=comp, rtol=1e-8, atol=1e-8)  # fmt: skip
        return torch.autograd.grad(sol.ys.square().sum(), (y0, log_k)), sol.backward_stats

    g_eager, work_eager = run(False)
    # (torch.compile's reason, its first line, in the message; the warning at the line that
    # asked for the gradients, not inside the backward pass)
    with pytest.warns(RuntimeWarning, match=r"cannot trace the backward solve's augmented field "
                      r"\([^)\n]*grad_fn\); the backward solves") as caught:  # fmt: skip
        g_comp, work_comp = run(TRACE)
    # (the first frame outside neuralode and torch: this file's line, where the gradients
    # were asked for; under mutmut, whose trampolines stand between neuralode's own
    # frames, the first of those)
    assert len(caught) == 1 and not caught[0].filename.startswith(_LIBRARIES)
    assert caught[0].filename == __file__ or "mutmut" in sys.modules
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.equal(work_comp.nfe, work_eager.nfe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt to trace
        g_again, _ = run(TRACE)
    for a, b in zip(g_again, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # Only that kind of field runs eager: another field's backward solve is still compiled.
    backend = _Counting()
    sol = solve(MLP(2, dtype=torch.float64), y0, t, batched=True, gradient="adjoint",
                compile={"backend": backend, "block": 2}, rtol=1e-8, atol=1e-8)  # fmt: skip
    forward_graphs = len(backend.graphs)
    torch.autograd.grad(sol.ys.square().sum(), (y0,))
    assert len(backend.graphs) > forward_graphs


def test_new_tolerances_and_values_reuse_the_graph():
    """Tolerances are tensors in the graph, and a new ``y0`` of the same shape is a new input:
    neither compiles again."""
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward

    f = MLP()
    t = torch.tensor([0.0, 1.0])
    for rtol, seed in ((1e-5, 0), (1e-6, 1), (1e-4, 2)):
        torch.manual_seed(seed)
        solve(f, torch.randn(8, 3), t, rtol=rtol, atol=1e-6, compile={"backend": counting})
    # A graph per kind of call (Hairer's first step, each block size: those of 1-4 attempts
    # that the solves' step counts chose), once each: not a graph per solve.
    assert len(graphs) == len(_CACHE) <= 5
    assert {key[-1] for key in _CACHE if key[0] == "_adaptive_block"} <= {1, 2, 3, 4}


@DRIVERS
def test_failures_are_reported_as_in_the_eager_loop(drv):
    def f(t, y):
        return -y

    y0 = torch.ones(2, 1)
    t = torch.tensor([0.0, 100.0])
    sol = csolve(f, y0, t, batched=True, max_num_steps=3, throw=False, compile=drv)
    assert sol.status.tolist() == [Status.MAX_STEPS_REACHED] * 2
    assert bool(torch.isnan(sol.ys[:, -1]).all())
    with pytest.raises(SolverError, match="maximum number of steps|max_num_steps"):
        csolve(f, y0[0], t, max_num_steps=3, compile=drv)

    def blows_up(t, y):
        return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)

    sol = csolve(blows_up, torch.ones(3), torch.tensor([0.0, 1.0]), throw=False, compile=drv)
    assert int(sol.status) == Status.NONFINITE
    eager = solve(blows_up, torch.ones(3), torch.tensor([0.0, 1.0]), throw=False)
    assert int(eager.status) == int(sol.status)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"method": "kvaerno5"}, "explicit Runge-Kutta"),
        ({"method": "explicit_adams", "step_size": 0.1}, "explicit Runge-Kutta"),
        ({"dense": True}, "dense"),
        ({"step_t": [0.5]}, "step_t"),
        ({"gradient": "checkpoint", "adjoint_params": ()}, "checkpoint"),
        ({"events": Event(lambda t, y: y[..., 0] - 0.5)}, "events"),
    ],
)
def test_what_it_does_not_cover_is_refused(kw, match):
    y0 = torch.ones(2, 1)
    with pytest.raises(ValueError, match=match):
        solve(lambda t, y: -y, y0, torch.tensor([0.0, 1.0]), batched=True, compile=True, **kw)


@pytest.mark.parametrize(
    ("value", "err"),
    [
        ("yes", TypeError),
        ({"blocks": 4}, ValueError),
        ({"block": 0}, ValueError),
        ({"loop": "yes"}, TypeError),
        ({"max_outputs": 2.5}, ValueError),
        ({"options": "fast"}, TypeError),
        ({"options": {}, "mode": "max-autotune"}, ValueError),
    ],
)
def test_bad_compile_options_are_named(value, err):
    with pytest.raises(err, match="compile"):
        solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), compile=value)


def test_odeint_takes_compile_as_an_option():
    f = MLP()
    y0 = torch.randn(3)
    t = torch.linspace(0, 1, 4)
    torch.testing.assert_close(odeint(f, y0, t, options={"compile": TRACE}), odeint(f, y0, t))


@pytest.mark.parametrize(
    ("left", "expected", "done", "k"),
    [
        (math.inf, None, 0, 4),  # a first solve of its kind: blocks of 4
        (2.5, None, 8, 1),  # then 1 once fewer than 4 steps remain
        (math.inf, 3, 0, 3),  # the last solve took 3 attempts: one block of 3
        (math.inf, 9, 4, 4),
        (math.inf, 9, 8, 1),
        (10.0, 3, 3, 4),  # past the last solve's end: as without it
        (0.5, 3, 4, 1),
    ],
)
def test_the_block_size_rule(left, expected, done, k):
    assert _block_size(left, expected, done) == k


def test_blocks_end_where_the_last_solve_of_the_kind_ended(monkeypatch):
    """Without a ``block``, a solve's blocks end where the last solve of its kind ended: a
    second solve of 3 attempts takes one block of 3 (the first took one of 4, its fourth
    attempt computed and masked out); a longer one goes on past it in blocks of 4 and 1, a
    shorter one masks the attempts it does not need; every one with the eager loop's
    numbers."""
    sizes: list[int] = []
    real = _compiled._call

    def spy(base, key, *args):
        if base is _compiled._adaptive_block:
            sizes.append(key[-1])
        return real(base, key, *args)

    monkeypatch.setattr(_compiled, "_call", spy)
    f = MLP(3, dtype=torch.float64)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    tol = {"rtol": 1e-5, "atol": 1e-7}
    seen = []
    for t1 in (0.6, 0.6, 4.0, 0.6):
        t = torch.tensor([0.0, t1], dtype=torch.float64)
        sizes.clear()
        sol = solve(f, y0, t, batched=True, compile={"backend": "eager"}, **tol)
        ref = solve(f, y0, t, batched=True, **tol)
        torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-10, atol=1e-12)
        assert torch.equal(sol.stats.n_steps, ref.stats.n_steps)
        seen.append((list(sizes), int(ref.stats.n_steps.max())))
    (first, n), (second, n2), (longer, n_long), (shorter, _) = seen
    assert n == n2 == 3 and first == [4] and second == [3]
    assert n_long > 8 and longer[0] == 3 and longer[1] == 4 and sum(longer) >= n_long
    assert shorter == [4]  # (the last solve went on past it)


def test_blocks_of_one_size_and_the_cache():
    f = MLP()
    y0 = torch.randn(2, 3)
    t = torch.tensor([0.0, 2.0])
    sol = solve(f, y0, t, compile={**TRACE, "block": 3})
    ref = solve(f, y0, t)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-5, atol=1e-6)
    # One block size: one compiled block (and Hairer's first step, compiled apart).
    assert sorted(key[0] for key in _CACHE) == ["_adaptive_block", "_initial_step"]


def test_inductor_forward_and_backward():
    """The default backend, as users run it: generated code, forward and backward."""
    f = MLP()
    y0 = torch.randn(6, 3, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0])
    opts = CompileOptions(block=2)
    out = []
    for comp in (False, opts):
        sol = solve(f, y0, t, method="tsit5", rtol=1e-5, atol=1e-6, batched=True, compile=comp)
        out.append((sol.ys, *torch.autograd.grad(sol.ys.sum(), (y0, *f.parameters()))))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Without a gradient: the whole solve in one loop, as inductor generates it.
    with torch.no_grad():
        ref = solve(f, y0, t, method="tsit5", rtol=1e-5, atol=1e-6, batched=True)
        sol = solve(f, y0, t, method="tsit5", rtol=1e-5, atol=1e-6, batched=True, compile=True)
    assert {key[0] for key in _CACHE} >= {"_adaptive_loop"} and not NO_LOOP
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-4, atol=1e-5)
    assert torch.equal(sol.stats.n_steps, ref.stats.n_steps)
    assert neuralode.CompileOptions.build(True) == CompileOptions()
    # On a CPU inductor's generated kernels are called from C++ (its cpp_wrapper).
    assert opts.compiler_options(torch.device("cpu")) == {"cpp_wrapper": True}
    assert CompileOptions(mode="max-autotune").compiler_options(torch.device("cpu")) is None


def test_a_field_that_recompiles_every_call_stays_correct():
    """A counter attribute changes a guarded value on every call: past torch.compile's
    recompilation limit the solves go on (uncompiled, with a warning) with the right numbers."""

    class Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, t, y):
            self.calls += 1
            return -y

    f = Counting()
    t = torch.tensor([0.0, 0.1])
    for _ in range(12):
        sol = solve(f, torch.ones(2), t, rtol=1e-6, atol=1e-8, compile={**TRACE, "block": 1})
    torch.testing.assert_close(sol.ys[-1], torch.full((2,), math.exp(-0.1)), rtol=1e-6, atol=0)
    assert f.calls >= 12 * int(sol.stats.nfe)  # each solve's evaluations ran


class _Block(torch.nn.Module):
    """A model with an ODE block, as users write it."""

    def __init__(self, method: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 3)
        self.method = method
        self.register_buffer("t", torch.linspace(0, 1, 4))

    def field(self, t, y):
        return torch.tanh(self.lin(y)) * torch.cos(t)

    def forward(self, y):
        return odeint(self.field, y, self.t, method=self.method)[-1].square().sum()


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_a_model_with_a_fixed_step_solve_compiles_whole(method):
    """torch.compile of a model that calls odeint with a fixed-step method on its output grid:
    one graph (``fullgraph=True`` would fail on a break), the eager values and gradients."""
    model = _Block(method)
    y = torch.randn(5, 3)
    explained = torch._dynamo.explain(model)(y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(y)
    (g_got,) = torch.autograd.grad(got, model.lin.weight)
    want = model(y)
    (g_want,) = torch.autograd.grad(want, model.lin.weight)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_a_model_with_an_adaptive_solve_compiles_around_it():
    """An adaptive solve runs eagerly behind a graph break (its steps depend on values)."""
    model = _Block("dopri5")
    y = torch.randn(5, 3)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(y), model(y))


def test_failures_inside_a_trace_are_a_status():
    def run(y0):
        return solve(lambda t, y: y / (1.0 - t), y0, torch.tensor([0.0, 0.5, 1.0]), method="rk4")

    sol = torch.compile(run, fullgraph=True, backend="eager")(torch.ones(2))
    assert int(sol.status) == Status.NONFINITE
    assert int(sol.stats.nfe) == 8


def test_vmap_and_grad_over_fixed_step_solves():
    lin = torch.nn.Linear(3, 3)

    def f(t, y):
        return torch.tanh(lin(y))

    t = torch.linspace(0, 1, 5)
    ys = torch.randn(6, 3)
    mapped = torch.func.vmap(lambda y: odeint(f, y, t, method="rk4"))(ys)
    looped = torch.stack([odeint(f, y, t, method="rk4") for y in ys])
    torch.testing.assert_close(mapped, looped)
    g = torch.func.grad(lambda y: odeint(f, y, t, method="midpoint")[-1].sum())(ys[0])
    y = ys[0].clone().requires_grad_()
    odeint(f, y, t, method="midpoint")[-1].sum().backward()
    torch.testing.assert_close(g, y.grad)
    with pytest.raises(ValueError, match="batched=True instead of vmap"):
        torch.func.vmap(lambda y: odeint(f, y, t))(ys)


def test_constants_cached_inside_a_transform_are_plain_tensors():
    """A solver's cached constants (its nodes, its interpolant's coefficients) first built
    inside ``torch.func.grad`` are plain tensors, not the transform's wrappers: a later loop
    solve of the same method (a ``while_loop`` cannot take a wrapper) runs."""
    solver = neuralode.get_solver("midpoint")
    solver._c_cache.clear()
    solver._P_cache.clear()
    lin = torch.nn.Linear(3, 3)

    def f(t, y):
        return torch.tanh(lin(y))

    t = torch.linspace(0, 1, 5)  # float32 times: the nodes in float64
    torch.func.grad(lambda y: odeint(f, y, t, method="midpoint")[-1].sum())(torch.ones(3))
    for c in (*solver._c_cache.values(), *solver._P_cache.values()):
        assert not torch._C._functorch.is_functorch_wrapped_tensor(c)
    y0 = torch.ones(2, 3, dtype=torch.float64)
    t64 = t.to(torch.float64)
    sol = csolve(lambda t, y: -y, y0, t64, method="midpoint", batched=True, compile=LOOP)
    ref = solve(lambda t, y: -y, y0, t64, method="midpoint", batched=True)
    torch.testing.assert_close(sol.ys, ref.ys, rtol=1e-12, atol=1e-14)


# -- Rosenbrock methods ------------------------------------------------------------------------

STIFF_T = torch.tensor([0.0, 0.4, 4.0, 40.0], dtype=torch.float64)


def _robertson(k: torch.Tensor):
    def f(t, y):
        y1, y2, y3 = y.unbind(-1)
        r1, r2, r3 = k[..., 0] * y1, k[..., 1] * y2 * y2, k[..., 2] * y2 * y3
        return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)

    return f


K_ROB = torch.tensor([0.04, 3e7, 1e4], dtype=torch.float64)


@pytest.mark.parametrize(
    ("method", "batched"),
    [("rodas5p", False), ("rodas5p", True), ("rodas4", True), ("rosenbrock23", False),
     ("rosenbrock23", True)],
)  # fmt: skip
@DRIVERS
def test_rosenbrock_matches_the_eager_loop(method, batched, drv):
    """Robertson's problem (stiff): the same steps and values as the eager loop, each row of a
    batch with rates of its own taking its own steps.  A block takes the Jacobian at each
    attempt's end (it cannot skip it where the step is rejected): one more Jacobian and its
    evaluation than the eager loop at each rejection and at the last step; the LU
    factorisations are the same."""
    if batched:
        k = K_ROB * torch.tensor([[1.0], [3.0], [0.3]], dtype=torch.float64)
        y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(3, 3)
    else:
        k, y0 = K_ROB, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    f = _robertson(k)
    kw = dict(method=method, rtol=1e-5, atol=1e-9, batched=batched)
    eager = solve(f, y0, STIFF_T, **kw)
    comp = csolve(f, y0, STIFF_T, compile=drv, **kw)
    assert bool(torch.all(eager.status == 0)) and torch.equal(comp.status, eager.status)
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-14)
    s, e = comp.stats, eager.stats
    for name in ("n_steps", "n_accepted", "n_rejected", "nlu"):
        assert torch.equal(getattr(s, name), getattr(e, name)), name
    assert torch.equal(s.nfe - e.nfe, 1 + e.n_rejected)
    assert torch.equal(s.njev - e.njev, 1 + e.n_rejected)
    assert int(e.n_rejected.sum()) > 0  # the retries are exercised
    if batched:
        assert len(set(s.n_steps.tolist())) > 1  # rows take steps of their own


@DRIVERS
def test_rosenbrock23_interpolates_outputs_inside_steps(drv):
    """``rosenbrock23`` interpolates outputs inside its steps (the Rodas methods land on them,
    above), passing up to ``max_outputs`` of them per step."""

    def f(t, y):
        return torch.stack([y[1], -y[0]]) * (1 + 0.1 * torch.cos(t))

    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 41, dtype=torch.float64)
    kw = dict(method="rosenbrock23", rtol=1e-3, atol=1e-6)
    eager, comp = solve(f, y0, t, **kw), csolve(f, y0, t, compile=drv, **kw)
    assert int(eager.stats.n_accepted) < 20  # the outputs lie inside steps
    torch.testing.assert_close(comp.ys, eager.ys, rtol=1e-10, atol=1e-14)
    assert torch.equal(comp.stats.n_steps, eager.stats.n_steps)


def test_rosenbrock_gradients_match_the_eager_loop():
    """Backprop through compiled Rosenbrock blocks (their Jacobians differentiated too), on a
    stiff problem, and the adjoint with a compiled forward, on a mildly stiff one (a stiff,
    dissipative problem is unstable backwards), give the eager solve's gradients."""
    y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    cases = ((-50.0, "rodas5p", "backprop"), (-5.0, "rosenbrock23", "adjoint"))
    for rate, method, gradient in cases:
        a = torch.tensor([[rate, 1.0], [2.0, -0.5]], dtype=torch.float64, requires_grad=True)

        def f(t, y, a=a):
            return y @ a.T + torch.sin(y) * torch.cos(t).unsqueeze(-1)

        extra = {"adjoint_params": (a,)} if gradient == "adjoint" else {}
        grads = []
        for comp in (False, AOT):
            sol = solve(f, y0, t, method=method, rtol=1e-7, atol=1e-9, batched=True,
                        gradient=gradient, compile=comp, **extra)  # fmt: skip
            grads.append(torch.autograd.grad(sol.ys.square().sum(), (y0, a)))
        for g_eager, g_comp in zip(*grads):
            torch.testing.assert_close(g_comp, g_eager, rtol=1e-6, atol=1e-8)


def test_rosenbrock_compile_refuses_what_it_cannot_do():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    f = _robertson(K_ROB)
    for method in ("kvaerno5", "auto"):
        with pytest.raises(ValueError, match="Rosenbrock methods"):
            solve(f, y0, STIFF_T, method=method, compile=True)
    with pytest.raises(ValueError, match="jac"):
        solve(f, y0, STIFF_T, method="rodas5p", jac=lambda t, y: torch.eye(3), compile=True)

    class Neg(torch.autograd.Function):  # no setup_context: torch.func cannot transform it
        @staticmethod
        def forward(ctx, x):
            return -x

        @staticmethod
        def backward(ctx, g):
            return -g

    def opaque(t, y):
        return Neg.apply(y)

    with pytest.raises(ValueError, match="torch.func"):
        solve(opaque, torch.ones(2, dtype=torch.float64), STIFF_T, method="rodas5p",
              compile=TRACE)  # fmt: skip
