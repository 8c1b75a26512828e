"""``method="auto"``: tsit5 where a sample is not stiff, rodas5p where it is, per sample.

* The stiffness test's stability limits are the explicit methods' (tsit5 3.5068, dopri5 3.3066,
  the values OrdinaryDiffEq tabulates), computed from their tableaus.
* On a problem that is not stiff, auto *is* tsit5: the same numbers and the same counts.
* On stiff problems it switches and costs about what rodas5p does (Robertson, Van der Pol;
  against scipy's Radau in ``test_stiff.py`` with the other stiff methods), also at a tight
  tolerance where the stage estimate is far below the truth, and it switches back when the
  stiffness ends (``nlu`` counts the stiff steps: ``njev`` also counts the Jacobian probes).
* Per sample: rows of a batch switch on their own, and each takes the steps, evaluations and
  Jacobians of its own single solve (interpolated outputs included).
* Gradients: gradcheck through switching solves; the checkpoint strategy replays each step with
  the method the forward pass used (backprop's gradient to round-off).
"""

from __future__ import annotations

import math
import re
import types
from fractions import Fraction

import pytest
import torch

import neuralode
from neuralode import ButcherTableau
from neuralode.solvers import AutoSwitch, ExplicitRK, get_solver
from neuralode.solvers.auto import stability_limit

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64


def _relaxing(lam: torch.Tensor):
    """``y' = -lam (y - cos t) - sin t``: the solution relaxes onto ``cos t`` at rate ``lam``
    (per row when batched); stiff where ``lam h`` exceeds the explicit method's limit."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.unsqueeze(-1) if t.ndim else t
        return -lam * (y - torch.cos(tt)) - torch.sin(tt)

    return f


def test_stability_limits_are_the_methods() -> None:
    assert stability_limit(get_solver("tsit5")) == pytest.approx(3.5068, abs=1e-4)
    assert stability_limit(get_solver("dopri5")) == pytest.approx(3.3066, abs=1e-4)
    assert stability_limit(get_solver("bosh3")) == pytest.approx(2.5127, abs=1e-4)


def test_a_problem_that_is_not_stiff_is_solved_by_tsit5_exactly() -> None:
    def lotka(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = y.unbind(-1)
        return torch.stack([1.5 * a - a * b, -3.0 * b + a * b], -1)

    ts = torch.linspace(0.0, 10.0, 41, dtype=DTYPE)  # outputs inside steps: the interpolant too
    y0 = torch.tensor([1.0, 1.0], dtype=DTYPE)
    for y, batched in ((y0, False), (y0 * torch.tensor([[1.0], [2.0]], dtype=DTYPE), True)):
        got = neuralode.solve(lotka, y, ts, method="auto", rtol=1e-6, atol=1e-8, batched=batched)
        want = neuralode.solve(lotka, y, ts, method="tsit5", rtol=1e-6, atol=1e-8, batched=batched)
        assert torch.equal(got.ys, want.ys)
        for name in ("nfe", "n_steps", "n_accepted", "njev", "nlu"):
            assert torch.equal(getattr(got.stats, name), getattr(want.stats, name)), name
        assert int(got.stats.njev.sum()) == 0
    # A state of two dimensions, unbatched (the estimate's norms over the whole state), and a
    # field whose stages all agree (y' = 0: no difference to estimate a rate from, none taken,
    # at a step the explicit method's limit would not allow a rate of 1).
    y2 = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=DTYPE)
    for f, y, kw in ((lotka, y2, {}), (lambda t, y: torch.zeros_like(y), y0, {"max_step": 5.0})):
        ts_long = torch.tensor([0.0, 10.0, 200.0], dtype=DTYPE)
        got = neuralode.solve(f, y, ts_long, method="auto", rtol=1e-6, atol=1e-8, **kw)
        want = neuralode.solve(f, y, ts_long, method="tsit5", rtol=1e-6, atol=1e-8, **kw)
        assert torch.equal(got.ys, want.ys) and int(got.stats.njev) == 0
        assert int(got.stats.nfe) == int(want.stats.nfe)


@pytest.mark.parametrize("rtol", [1e-3, 1e-6])
def test_robertson_switches_and_costs_what_rodas5p_does(rtol: float) -> None:
    """Measured: 71 / 134 steps (rodas5p 44 / 117, tsit5 out of 3,000 steps before t = 1).
    With OrdinaryDiffEq's rule (11 *consecutive* stiff verdicts) auto took 3,595 steps at rtol
    1e-3: tsit5 held at its stability limit alternates verdicts (4 over, 2 under)."""
    from stiff_problems import robertson

    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)
    ts = torch.tensor([0.0, 0.4, 40.0, 4e3, 4e5], dtype=DTYPE)
    kw = dict(rtol=rtol, atol=rtol * 1e-4)
    auto = neuralode.solve(robertson(), y0, ts, method="auto", **kw)
    ref = neuralode.solve(robertson(), y0, ts, method="rodas5p", rtol=1e-10, atol=1e-14)
    rodas = neuralode.solve(robertson(), y0, ts, method="rodas5p", **kw)
    n, n_rodas = int(auto.stats.n_steps), int(rodas.stats.n_steps)
    print(
        f"robertson rtol={rtol:g}: auto {n} steps ({int(auto.stats.nlu)} stiff), rodas5p {n_rodas}"
    )
    assert 0 < int(auto.stats.nlu) < n  # (an LU factorisation per stiff step)
    assert n < 2 * n_rodas
    err = (auto.ys - ref.ys).abs() / (kw["atol"] + rtol * ref.ys.abs())
    assert float(err.max()) < 10.0
    tsit5 = neuralode.solve(
        robertson(), y0, ts, method="tsit5", max_num_steps=3000, throw=False, **kw
    )
    assert int(tsit5.status) == neuralode.Status.MAX_STEPS_REACHED


def test_a_tight_tolerance_switches_early() -> None:
    """At rtol 1e-8 on Robertson the two-stage estimate said 0.3-0.8 of tsit5's stability limit
    where ``h |lambda|`` was about 0.95 of it: the switch came after 2,639 explicit steps (t =
    3.6).  A Jacobian probe (spectral radius by power iteration) when the estimate passes 0.3
    switches at step 75 (t = 0.053): 302 steps in all.  Every evaluation is counted, the
    probes' included (933 here, 62 Jacobians for 59 factorisations)."""
    from stiff_problems import robertson

    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)
    ts = torch.tensor([0.0, 0.4, 4.0, 40.0], dtype=DTYPE)
    calls, field = [0], robertson()

    def counted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return field(t, y)

    sol = neuralode.solve(counted, y0, ts, method="auto", rtol=1e-8, atol=1e-12)
    assert int(sol.stats.nfe) == calls[0]
    rodas = neuralode.solve(robertson(), y0, ts, method="rodas5p", rtol=1e-8, atol=1e-12)
    print(f"auto {int(sol.stats.n_steps)} steps, rodas5p {int(rodas.stats.n_steps)}")
    assert int(sol.stats.n_steps) < 2 * int(rodas.stats.n_steps)
    torch.testing.assert_close(sol.ys, rodas.ys, rtol=1e-6, atol=1e-12)


def test_spectral_radius() -> None:
    from neuralode.solvers.auto import spectral_radius

    cases = [[[0.0, 1.0], [-100.0, 0.0]], [[-2000.0, 1.0], [0.0, -0.04]], [[1.0, 2.0], [3.0, 4.0]]]
    for M in cases:
        J = torch.tensor(M, dtype=DTYPE)
        want = float(torch.linalg.eigvals(J).abs().max())
        assert float(spectral_radius(J)) == pytest.approx(want, rel=1e-4)
    # random matrices, whose largest eigenvalues are often close in size: within 9% (measured)
    J = torch.randn(16, 6, 6, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    want = torch.linalg.eigvals(J).abs().amax(-1)
    got = spectral_radius(J)
    torch.testing.assert_close(got, want, rtol=0.15, atol=0)
    # the documented estimate, written out: 24 power iterations from 1 + sin(k) / 2, the
    # geometric mean of the growth over the last 16 (another start or another count moved
    # these estimates by 3-9%)
    for i in range(16):
        v, growth = 1 + torch.sin(torch.arange(6, dtype=DTYPE)) / 2, []
        for _ in range(24):
            v = J[i] @ v
            growth.append(float(v.norm()))
            v = v / v.norm()
        mean = math.exp(sum(math.log(x) for x in growth[8:]) / 16)
        assert float(got[i]) == pytest.approx(mean, rel=1e-12), i


def test_switches_back_when_the_stiffness_ends() -> None:
    """Relaxation at rate 1e4 exp(-4t) + 0.5: stiff until t ~ 2, then not.  Solving on to t = 20
    takes many more steps, all explicit (no Jacobian), once the switch back happened."""
    lam_of = lambda t: 1e4 * torch.exp(-4 * t) + 0.5  # noqa: E731

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -lam_of(t) * (y - torch.cos(t)) - torch.sin(t)

    y0 = torch.tensor([2.0], dtype=DTYPE)
    kw = dict(method="auto", rtol=1e-6, atol=1e-9)
    short = neuralode.solve(f, y0, torch.tensor([0.0, 4.0], dtype=DTYPE), **kw)
    long = neuralode.solve(f, y0, torch.tensor([0.0, 20.0], dtype=DTYPE), **kw)
    assert int(short.stats.nlu) > 0
    assert int(long.stats.n_steps) > int(short.stats.n_steps) + 20
    assert int(long.stats.nlu) == int(short.stats.nlu)
    assert float(long.ys[-1, 0]) == pytest.approx(math.cos(20.0), abs=1e-6)


def test_rows_switch_on_their_own() -> None:
    """Four rates, two stiff: each row of the batch takes its single solve's steps, evaluations
    and Jacobians, and its values (40 outputs, most interpolated inside mixed steps)."""
    lam = torch.tensor([[1.0], [1e4], [30.0], [1e5]], dtype=DTYPE)
    y0 = torch.tensor([[2.0], [2.0], [-1.0], [0.5]], dtype=DTYPE)
    ts = torch.linspace(0.0, 10.0, 40, dtype=DTYPE)
    kw = dict(method="auto", rtol=1e-6, atol=1e-9)
    batch = neuralode.solve(_relaxing(lam), y0, ts, batched=True, **kw)
    nlu = batch.stats.nlu.tolist()  # the stiff steps
    assert nlu[0] == 0 and nlu[2] == 0 and nlu[1] > 0 and nlu[3] > 0
    for i in range(4):
        one = neuralode.solve(_relaxing(lam[i]), y0[i], ts, **kw)
        for name in ("nfe", "n_steps", "n_accepted", "njev", "nlu"):
            assert int(getattr(one.stats, name)) == int(getattr(batch.stats, name)[i]), (i, name)
        # (batched and single LU factorisations round differently, and at rate 1e5 that shows:
        # rodas5p alone differs by 1e-8 between the two here)
        torch.testing.assert_close(batch.ys[i], one.ys, rtol=1e-7, atol=1e-9)
        if i in (1, 3):  # relaxed onto cos t long before the second output
            torch.testing.assert_close(one.ys[1:, 0], torch.cos(ts[1:]), rtol=0, atol=1e-4)


def _switching_run(gradient: str, batched: bool):
    theta = torch.tensor([1e5, 1.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.unsqueeze(-1) if t.ndim else t
        return -theta[0] * (y - torch.cos(tt)) - theta[1] * y**3

    y = y0.view(2, 1) * torch.tensor([[1.0], [0.5]], dtype=DTYPE) if batched else y0
    kw = {} if gradient == "backprop" else {"adjoint_params": (theta,)}
    sol = neuralode.solve(
        f, y, ts, method="auto", rtol=1e-6, atol=1e-8, batched=batched, gradient=gradient, **kw
    )
    return sol, (y0, theta)


@pytest.mark.parametrize("batched", [False, True])
def test_checkpoint_replays_the_method_each_step_used(batched: bool) -> None:
    """A replay that started each step in the explicit mode would redo the stiff steps with
    tsit5 far beyond its stability limit.  (The adjoint is not compared here: on a dissipative
    stiff problem its backward reconstruction of y blows up, as for every stiff method; see
    test_stiff.py.  On problems that are not stiff it is tsit5's, in test_adjoint.py.)"""
    grads = {}
    for gradient in ("backprop", "checkpoint"):
        sol, inputs = _switching_run(gradient, batched)
        nlu, n = sol.stats.nlu.sum(), sol.stats.n_steps.sum()
        assert 0 < int(nlu) < int(n)  # the solve did switch
        grads[gradient] = torch.autograd.grad(sol.ys.square().sum(), inputs)
    for a, b in zip(grads["checkpoint"], grads["backprop"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_gradcheck_through_a_switching_solve(gradient: str) -> None:
    theta = torch.tensor([1e5, 1.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=DTYPE)

    def run(y0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -theta[0] * (y - torch.cos(t)) - theta[1] * y**3

        kw = {} if gradient == "backprop" else {"adjoint_params": (theta,)}
        sol = neuralode.solve(
            f, y0, ts, method="auto", rtol=1e-8, atol=1e-10, gradient=gradient, **kw
        )
        assert 0 < int(sol.stats.nlu) < int(sol.stats.n_steps)
        return sol.ys

    assert torch.autograd.gradcheck(run, (y0, theta), atol=1e-6, rtol=1e-5)


def test_the_defaults_are_the_documented_ones() -> None:
    """Hairer's 15 stiff verdicts with no run of 6 calm ones, a window of 6, a probe at most
    every 10 steps above 0.3, back after more than 3 calm stiff steps, at 0.9 of the limit."""
    auto = AutoSwitch(get_solver("tsit5"), get_solver("rodas5p"))
    names = "stiff_steps calm_reset window probe_every probe_level max_nonstiff_steps tol name"
    got = {k: getattr(auto, k) for k in names.split()}
    assert got == dict(stiff_steps=15, calm_reset=6, window=6, probe_every=10, probe_level=0.3,
                       max_nonstiff_steps=3, tol=0.9, name="auto")  # fmt: skip
    registered = get_solver("auto")
    assert {k: getattr(registered, k) for k in got} == got


def test_bad_compositions_are_refused() -> None:
    tsit5, rodas5p = get_solver("tsit5"), get_solver("rodas5p")
    bounds = ("stiff_steps, calm_reset and window must be >= 1, max_nonstiff_steps >= 0 and "
              "tol > 0, got ")  # fmt: skip
    for bad, shown in (
        (dict(calm_reset=0), "15, 0, 6, 3, 0.9"),
        (dict(window=0), "15, 6, 0, 3, 0.9"),
        (dict(max_nonstiff_steps=-1), "15, 6, 6, -1, 0.9"),
        (dict(tol=0.0), "15, 6, 6, 3, 0.0"),
        (dict(tol=float("nan")), "15, 6, 6, 3, nan"),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(bounds + shown)}$"):
            AutoSwitch(tsit5, rodas5p, **bad)
    AutoSwitch(tsit5, rodas5p, stiff_steps=1, calm_reset=1, window=1, max_nonstiff_steps=0)
    # Three stages whose last two nodes are 1 (Heun's method, first-same-as-last, with Euler's
    # as its error estimate) pass the node check and fail on the error order only.
    half = Fraction(1, 2)
    heun = ExplicitRK(ButcherTableau(
        name="heun_fsal", order=2, c=(Fraction(0), Fraction(1), Fraction(1)),
        a=((), (Fraction(1),), (half, half)), b=(half, half, Fraction(0)),
        b_err=(-half, half, Fraction(0)), error_order=1,
    ))  # fmt: skip
    assert heun.fsal and heun.c_list == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="error order"):
        AutoSwitch(heun, rodas5p)
    with pytest.raises(ValueError, match="first-same-as-last"):
        AutoSwitch(get_solver("rk4"), rodas5p)
    with pytest.raises(ValueError, match="first-same-as-last"):
        AutoSwitch(get_solver("adaptive_heun"), rodas5p)
    with pytest.raises(ValueError, match="last two nodes"):  # one stage at t + h only
        AutoSwitch(get_solver("bosh3"), get_solver("rosenbrock23"))
    with pytest.raises(ValueError, match="error order"):
        AutoSwitch(tsit5, get_solver("rosenbrock23"))
    with pytest.raises(ValueError, match="stiff_steps"):
        AutoSwitch(tsit5, rodas5p, stiff_steps=0)
    # dopri5 with kvaerno5 (both of error order 4; an implicit method) is a valid pair.
    pair = AutoSwitch(get_solver("dopri5"), get_solver("kvaerno5"))
    sol = neuralode.solve(
        _relaxing(torch.tensor(1e4, dtype=DTYPE)), torch.tensor([2.0], dtype=DTYPE),
        torch.tensor([0.0, 5.0], dtype=DTYPE), method=pair, rtol=1e-4, atol=1e-7,
    )  # fmt: skip
    assert 0 < int(sol.stats.nlu) < int(sol.stats.n_steps)
    assert float(sol.ys[-1, 0]) == pytest.approx(math.cos(5.0), abs=1e-3)


# -- the switching rules, step by step -------------------------------------------------------------
class _Rules:
    """The module docstring's switching rules written out for one row, as a history of the row's
    accepted steps since its last switch (not the solver's counters).  A step's ratio is
    ``h rho / S``: on an explicit step ``rho`` is the two-stage estimate, on a stiff step and
    in a probe the field's largest rate.  A verdict is the largest ratio of the last ``window``
    steps (explicit) or this step's (stiff) against ``tol``.  A row turns stiff after
    ``stiff_steps`` stiff verdicts with no run of ``calm_reset`` non-stiff ones between them, or
    when a probe's ratio passes ``tol``; a probe is due on an explicit step when ``probe_every``
    steps passed since the last probe (or the switch) and one of the last ``window`` ratios
    passed ``probe_level``.  A row turns explicit after more than ``max_nonstiff_steps``
    consecutive non-stiff verdicts."""

    def __init__(self, p: dict) -> None:
        self.p, self.stiff, self.history, self.last_probe = p, False, [], -1

    def due(self) -> bool:
        p, hist = self.p, self.history
        since = len(hist) - self.last_probe - 1
        recent = [r for r, _ in hist[-p["window"] :]]
        return (
            not self.stiff
            and since >= p["probe_every"]
            and max(recent, default=0) > p["probe_level"]
        )

    def accept(self, stage_ratio: float, largest_ratio: float) -> None:
        p, hist = self.p, self.history
        due = self.due()
        if self.stiff:
            ratio = largest_ratio
            verdict = ratio > p["tol"]
        else:
            ratio = stage_ratio
            verdict = max(([r for r, _ in hist] + [ratio])[-p["window"] :]) > p["tol"]
        hist.append((ratio, verdict))
        if due:
            self.last_probe = len(hist) - 1
        calm_run = 0  # the current run of non-stiff verdicts
        counted = 0  # stiff verdicts since the last run of calm_reset non-stiff ones
        for _, v in hist:
            calm_run = 0 if v else calm_run + 1
            counted = 0 if calm_run >= p["calm_reset"] else counted + v
        if self.stiff:
            switch = calm_run > p["max_nonstiff_steps"]
        else:
            switch = counted >= p["stiff_steps"] or (due and largest_ratio > p["tol"])
        if switch:
            self.stiff, self.history, self.last_probe = not self.stiff, [], -1


_RULE_SETS = [
    dict(stiff_steps=15, calm_reset=6, window=6, probe_every=10, probe_level=0.3,
         max_nonstiff_steps=3, tol=0.9),
    dict(stiff_steps=3, calm_reset=2, window=2, probe_every=3, probe_level=0.6,
         max_nonstiff_steps=1, tol=0.8),
    dict(stiff_steps=4, calm_reset=3, window=1, probe_every=2, probe_level=0.45,
         max_nonstiff_steps=0, tol=0.75),
    dict(stiff_steps=1, calm_reset=1, window=3, probe_every=1, probe_level=2.0,
         max_nonstiff_steps=2, tol=0.65),
]  # fmt: skip


@pytest.mark.parametrize("rules", range(len(_RULE_SETS)))
def test_switching_follows_its_rules_step_by_step(rules: int) -> None:
    """``y' = -diag(c lam, lam) y`` from ``y = (0, 1)``: the fast component stays 0, so the
    two-stage estimate is ``lam`` and ``|J|_inf`` and the probe's spectral radius are ``c lam``
    (to round-off; power iteration to 1e-6 at ``c = 2.2``), and a step of ``h = q S / lam`` has
    the stage ratio ``q`` and the largest ratio ``c q``.  Four rows of a batch (``c`` = 1 or
    2.2, where a probe sees more than the stages) draw their ratios (kept away from the
    thresholds) in runs and their rejections at random for 80 attempts; each attempt's modes
    and Jacobians (a stiff step's and the probes') must be the rules' (:class:`_Rules`), each
    probe costs one evaluation, and every row's work is its work alone (the same attempts
    driven on the row by itself)."""
    p = _RULE_SETS[rules]
    g = torch.Generator().manual_seed(rules)
    qs = torch.tensor([0.05, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95, 1.05], dtype=DTYPE)
    lam = torch.tensor([3.0, 40.0, 500.0, 7e3], dtype=DTYPE)
    c = torch.tensor([1.0, 2.2, 1.0, 2.2], dtype=DTYPE)
    rates = torch.stack([c * lam, lam], -1)  # [row, component]
    n_rows, n_attempts = 4, 80
    q = torch.empty(n_attempts, n_rows, dtype=DTYPE)  # each row keeps a ratio 1-6 attempts
    for i in range(n_rows):
        k = 0
        while k < n_attempts:
            run = int(torch.randint(1, 7, (), generator=g))
            q[k : k + run, i] = qs[int(torch.randint(len(qs), (), generator=g))]
            k += run
    accept = torch.rand(n_attempts, n_rows, generator=g) > 0.2
    solver = AutoSwitch(get_solver("tsit5"), get_solver("rodas5p"), **p)
    # rodas5p's work on a fresh step and on a retry from a rejected step's linearisation
    rodas, one = get_solver("rodas5p"), torch.ones(1, dtype=DTYPE)
    first = rodas.step(lambda t, y: -y, 0.0, 0.1, one, rodas.init(lambda t, y: -y, 0.0, one, None))
    rodas_nfe = int(first.nfe)
    rodas_retry_nfe = int(rodas.step(lambda t, y: -y, 0.0, 0.05, one, first.retry_state).nfe)

    def drive(rate: torch.Tensor, t: torch.Tensor, rows: slice) -> list[list[list[int]]]:
        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -rate * y

        y = torch.tensor([0.0, 1.0], dtype=DTYPE).expand(*t.shape, 2)
        state = solver.init(f, t, y, None)
        seen: list[list[list[int]]] = [[], [], []]  # modes, Jacobians, evaluations per attempt
        for k in range(n_attempts):
            h = (q[k, rows] * solver.limit / lam[rows]).reshape(t.shape)
            res = solver.step(f, t, h, y, state)
            for out, v in zip(seen, (state.stiff, res.njev, res.nfe)):
                out.append(torch.as_tensor(v).expand(t.shape).reshape(-1).tolist())
            acc = accept[k, rows].reshape(t.shape)
            kept = state if res.retry_state is None else res.retry_state
            state = solver.merge(acc, res.state, kept)
            y = torch.where(acc.unsqueeze(-1), res.y1, y)
            t = torch.where(acc, t + h, t)
        return seen

    batch = drive(rates, torch.zeros(n_rows, dtype=DTYPE), slice(None))
    for i in range(n_rows):
        alone = drive(rates[i], torch.zeros((), dtype=DTYPE), slice(i, i + 1))
        rules_i, switched, retry = _Rules(p), 0, False
        for k in range(n_attempts):
            stiff, due = rules_i.stiff, rules_i.due()
            assert batch[0][k][i] == alone[0][k][0] == stiff, (i, k)
            # A stiff step takes a Jacobian but where it retries a rejected stiff step from the
            # same start (rodas5p keeps the rejected step's linearisation).
            fresh_jacobian = stiff and not retry
            assert batch[1][k][i] == alone[1][k][0] == int(fresh_jacobian or due), (i, k)
            assert batch[2][k][i] == alone[2][k][0], (i, k)
            if stiff:
                assert batch[2][k][i] == (rodas_nfe if fresh_jacobian else rodas_retry_nfe)
            else:  # tsit5: 6 evaluations, 7 where f(t, y) is not known yet; +1 for a probe
                assert batch[2][k][i] - due in (6, 7), (i, k)
            retry = stiff and not bool(accept[k, i])
            if bool(accept[k, i]):
                before = rules_i.stiff
                rules_i.accept(float(q[k, i]), float(c[i] * q[k, i]))
                switched += rules_i.stiff != before
        assert switched >= 2, (i, switched)  # each row switched both ways


def test_a_pair_reports_its_weaker_part_and_keeps_its_rules_when_configured() -> None:
    """``dopri5`` with ``kvaerno5``: order 5 (both), error order 4, dense output order 3
    (kvaerno5's interpolant, behind its steps), landing on outputs per row (its stiff steps).
    The solve configures kvaerno5's Newton iteration with its tolerances (a new pair): every
    rule and the name carry over; with fixed steps (no controller) the pair is itself."""
    rules = dict(stiff_steps=3, calm_reset=2, window=4, probe_every=5, probe_level=0.5,
                 max_nonstiff_steps=1, tol=0.7)  # fmt: skip
    pair = AutoSwitch(get_solver("dopri5"), get_solver("kvaerno5"), name="mine", **rules)
    got = (pair.order, pair.error_order, pair.dense_order, pair.lands_on_outputs)
    assert got == (5, 4, 3, True)
    assert pair.lands_per_row and pair.uses_jacobian and pair.name == "mine"
    auto = get_solver("auto")
    assert (auto.order, auto.error_order, auto.dense_order, auto.name) == (5, 4, 4, "auto")
    assert pair.configured(None) is pair
    controller = types.SimpleNamespace(rtol=1e-5, atol=1e-7, norm=None, dims=None)
    solve_pair = pair.configured(controller)
    assert isinstance(solve_pair, AutoSwitch) and solve_pair is not pair
    assert solve_pair.stiff.settings.rtol == 1e-5 and solve_pair.stiff.settings.atol == 1e-7
    assert solve_pair.explicit is pair.explicit and solve_pair.name == "mine"
    assert {k: getattr(solve_pair, k) for k in rules} == rules
    assert solve_pair.limit == pair.limit == pytest.approx(3.3066, abs=1e-4)


def test_a_mixed_step_keeps_each_method_off_the_other_methods_rows() -> None:
    """Rates 1 and 1e12 with a cubic term, one batch: once the stiff row switches, each step is
    mixed, and tsit5 on the stiff row at rodas5p's step (``h lam`` about 1e11) would overflow
    to Inf (NaN through ``y^3``); with a zero step there, nothing does, and the batch's
    gradient is each row's own (finite)."""
    lam = torch.tensor([[1.0], [1e12]], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -lam * (y - torch.cos(t.unsqueeze(-1))) - y**3

    ts = torch.tensor([0.0, 1.0, 3.0], dtype=DTYPE)
    y0 = torch.tensor([[0.5], [0.5]], dtype=DTYPE, requires_grad=True)
    kw = dict(method="auto", rtol=1e-6, atol=1e-9)
    sol = neuralode.solve(f, y0, ts, batched=True, **kw)
    assert sol.stats.nlu.tolist()[0] == 0 and sol.stats.nlu.tolist()[1] > 0
    (grad,) = torch.autograd.grad(sol.ys.square().sum(), y0)
    assert bool(torch.isfinite(grad).all())
    for i in range(2):
        yi = y0[i].detach().requires_grad_()

        def fi(t: torch.Tensor, y: torch.Tensor, i: int = i) -> torch.Tensor:
            return -lam[i] * (y - torch.cos(t)) - y**3

        one = neuralode.solve(fi, yi, ts, **kw)
        torch.testing.assert_close(sol.ys[i], one.ys, rtol=1e-6, atol=1e-9)
        (grad_i,) = torch.autograd.grad(one.ys.square().sum(), yi)
        torch.testing.assert_close(grad[i], grad_i, rtol=1e-6, atol=1e-9)


def _pair_run(lam: torch.Tensor, batched: bool) -> neuralode.Solution:
    """``dopri5`` with ``kvaerno5`` (an ESDIRK: its Newton iteration counts, can fail, and
    keeps its Jacobian across steps) on the relaxation with a cubic term."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.unsqueeze(-1) if t.ndim else t
        return -lam * (y - torch.cos(tt)) - torch.sin(tt) - 0.1 * y**3

    pair = AutoSwitch(get_solver("dopri5"), get_solver("kvaerno5"))
    y0 = torch.full((*lam.shape[:1],) if batched else (1,), 2.0, dtype=DTYPE)
    return neuralode.solve(
        f, y0.reshape(-1, 1) if batched else y0, torch.linspace(0, 5, 11, dtype=DTYPE),
        method=pair, batched=batched, rtol=1e-6, atol=1e-9, throw=False,
    )  # fmt: skip


def test_an_implicit_partner_counts_its_iterations_and_keeps_its_jacobian() -> None:
    """Rates 1 and 1e4 as a batch (mixed steps) and alone (each step in one mode): the stiff
    row's Newton iterations are counted (660 measured), each row's work is its own, and the
    stiff method's carried state (its Jacobian, kept while it serves) goes from step to step:
    3 Jacobians for 66 stiff steps measured, 37 when each step started afresh."""
    lam = torch.tensor([[1.0], [1e4]], dtype=DTYPE)
    batch = _pair_run(lam, True)
    for i in range(2):
        one = _pair_run(lam[i], False)
        for name in ("nfe", "n_steps", "n_rejected", "njev", "nlu", "n_newton"):
            assert int(getattr(batch.stats, name)[i]) == int(getattr(one.stats, name)), (i, name)
    stats = {k: getattr(batch.stats, k).tolist() for k in ("n_newton", "nlu", "njev")}
    assert stats["n_newton"][0] == 0 and stats["n_newton"][1] > stats["nlu"][1] > 0
    assert 0 < stats["njev"][1] < 10
    assert batch.stats.n_newton.dtype == batch.stats.njev.dtype == torch.int64


@pytest.mark.usefixtures("newton_never_converges")
def test_an_implicit_partners_newton_failure_rejects_the_step() -> None:
    """kvaerno5's iterations made never to converge: every stiff step reports its failure and is
    rejected, so the stiff row ends in ``NEWTON_FAILED`` (alone, and in a batch whose other row
    stays explicit and finishes), never accepting an unconverged step."""
    lam = torch.tensor([[1.0], [1e4]], dtype=DTYPE)
    failed, done = int(neuralode.Status.NEWTON_FAILED), int(neuralode.Status.SUCCESS)
    assert _pair_run(lam, True).status.tolist() == [done, failed]
    assert int(_pair_run(lam[1], False).status) == failed


def test_a_dense_solution_over_both_methods_steps() -> None:
    """``dense=True``: :meth:`Solution.evaluate` anywhere in a solve whose steps use different
    interpolants (tsit5's, rodas5p's, and both in a step where the rows' modes differ); it
    failed to stack them.  Against the exact ``cos t + (y0 - 1) exp(-lam t)``: the row that
    is not stiff within 30 tolerance units (26 measured), the stiff one as rodas5p's own
    dense solution is (943 units measured, rodas5p alone 944: a Rosenbrock interpolant's error
    is not controlled in the stiff regime, see ``test_stiff.py``); the batch's values are each
    row's alone."""
    lam = torch.tensor([[1.0], [1e4]], dtype=DTYPE)
    ts = torch.linspace(0.0, 10.0, 5, dtype=DTYPE)
    q = torch.linspace(0.05, 9.95, 34, dtype=DTYPE)
    exact = torch.cos(q) + torch.exp(-lam * q)  # y0 = 2, [row, time]
    kw = dict(method="auto", rtol=1e-6, atol=1e-9, dense=True)
    y0 = torch.full((2, 1), 2.0, dtype=DTYPE)
    batch = neuralode.solve(_relaxing(lam), y0, ts, batched=True, **kw)
    assert batch.stats.nlu.tolist()[0] == 0 and batch.stats.nlu.tolist()[1] > 0
    got = batch.evaluate(q)[..., 0]
    units = ((got - exact).abs() / (1e-9 + 1e-6 * exact.abs())).amax(1)
    rodas = neuralode.solve(_relaxing(lam[1]), y0[1], ts, **{**kw, "method": "rodas5p"})
    rodas_units = (rodas.evaluate(q)[:, 0] - exact[1]).abs() / (1e-9 + 1e-6 * exact[1].abs())
    assert float(units[0]) < 30.0 and float(units[1]) < 2 * float(rodas_units.max()), units
    for i in range(2):
        one = neuralode.solve(_relaxing(lam[i]), y0[i], ts, **kw)
        torch.testing.assert_close(one.evaluate(q)[:, 0], got[i], rtol=1e-7, atol=1e-9)
    # a float32 state: the per-step weights (formed in float64) applied in float32
    single = neuralode.solve(_relaxing(lam.float()), y0.float(), ts, batched=True, **kw)
    assert single.evaluate(q).dtype == torch.float32
    torch.testing.assert_close(single.evaluate(q)[..., 0].double(), got, rtol=1e-4, atol=1e-5)
