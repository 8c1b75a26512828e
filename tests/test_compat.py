"""torchdiffeq parity of the compatible entry points (``neuralode.odeint``/``odeint_adjoint``).

What this proves, against torchdiffeq 0.2.5's documented behaviour (and against torchdiffeq
itself where it is installed, ``pip install torchdiffeq==0.2.5``; those comparisons skip
otherwise):

* Every explicit method name torchdiffeq accepts is accepted, with its order of accuracy; the
  fixed-step ones give torchdiffeq's numbers to round-off on the same grid (our ``rk38`` is
  torchdiffeq's ``rk4``, Kutta's 3/8 rule), and ``method=None`` is ``dopri5``.
* An unknown option warns (naming it) and is ignored, as in torchdiffeq; ``solve`` still raises.
* ``options["norm"]`` is called as torchdiffeq calls it, on the state as the user gave it, and a
  tuple state's default norm is torchdiffeq's largest RMS over its tensors.
* ``method="scipy_solver"`` runs ``scipy.integrate.solve_ivp`` (LSODA by default, ``solver`` to
  choose), for tensor and tuple states, forward and backward in time; ``odeint`` gives no
  gradient through it, and ``odeint_adjoint`` solves the adjoint's backward system with scipy
  too, as torchdiffeq does.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

import neuralode
from neuralode import get_tableau

DTYPE = torch.float64
T = torch.linspace(0.0, 2.0, 9, dtype=DTYPE)


def oscillator(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A forced, damped oscillator (time-dependent, so stage times matter)."""
    return torch.stack([y[1], -y[0] - 0.1 * y[1] + torch.sin(3 * t)])


Y0 = torch.tensor([1.0, 0.0], dtype=DTYPE)

# torchdiffeq 0.2.5's explicit methods, each with its order and our name for it.
TORCHDIFFEQ_EXPLICIT = {
    "euler": ("euler", 1),
    "midpoint": ("midpoint", 2),
    "heun2": ("heun", 2),
    "heun3": ("heun3", 3),
    "rk4": ("rk38", 4),  # torchdiffeq's rk4 is Kutta's 3/8 rule
    "adaptive_heun": ("adaptive_heun", 2),
    "fehlberg2": ("fehlberg2", 2),
    "bosh3": ("bosh3", 3),
    "dopri5": ("dopri5", 5),
    "dopri8": ("dopri8", 8),
}


@pytest.mark.parametrize("name", sorted(TORCHDIFFEQ_EXPLICIT))
def test_every_explicit_torchdiffeq_name_is_a_method_of_its_order(name: str) -> None:
    ours, order = TORCHDIFFEQ_EXPLICIT[name]
    assert get_tableau(ours).order == order
    # torchdiffeq's name works here too (rk4 is ours, the classic rule, of the same order)
    assert get_tableau(name).order == order
    kind = {"first_step": 0.01} if get_tableau(name).adaptive else {"step_size": 0.01}
    ys = neuralode.odeint(oscillator, Y0, T, method=name, options=kind)
    assert ys.shape == (9, 2) and bool(torch.isfinite(ys).all())


def test_method_none_is_dopri5() -> None:
    a = neuralode.odeint(oscillator, Y0, T, method=None)
    b = neuralode.odeint(oscillator, Y0, T, method="dopri5")
    assert torch.equal(a, b)
    a = neuralode.odeint_adjoint(oscillator, Y0, T, method=None, adjoint_params=())
    assert torch.equal(a, b)


def test_rk38_is_kuttas_three_eighths_rule() -> None:
    # One step of y' = t^3 from 0 to 1 (y(1) = 1/4): a fourth-order rule integrates the cubic
    # exactly, and the 3/8 rule's weights over nodes 0, 1/3, 2/3, 1 give it directly.
    t = torch.tensor([0.0, 1.0], dtype=DTYPE)
    ys = neuralode.odeint(
        lambda t, y: t**3 * torch.ones_like(y), torch.zeros(1, dtype=DTYPE), t, method="rk38"
    )
    assert float(ys[-1]) == pytest.approx(0.25, abs=1e-15)
    # On y' = y (one step of h = 1) the 3/8 rule and the classic rule both give the degree-4
    # Taylor polynomial of e: 1 + 1 + 1/2 + 1/6 + 1/24.
    for method in ("rk38", "rk4"):
        ys = neuralode.odeint(lambda t, y: y, torch.ones(1, dtype=DTYPE), t, method=method)
        assert float(ys[-1]) == pytest.approx(1 + 1 + 1 / 2 + 1 / 6 + 1 / 24, abs=1e-15)
    # Where the rules differ: y' = cos(5 t) y over one step.
    f = lambda t, y: torch.cos(5 * t) * y  # noqa: E731
    a = neuralode.odeint(f, torch.ones(1, dtype=DTYPE), t, method="rk38")
    b = neuralode.odeint(f, torch.ones(1, dtype=DTYPE), t, method="rk4")
    assert abs(float(a[-1] - b[-1])) > 1e-3


# ------------------------------------------------------------------------ against torchdiffeq
@pytest.mark.parametrize("name", ["euler", "midpoint", "heun2", "heun3", "rk4"])
def test_fixed_step_methods_give_torchdiffeqs_numbers(name: str) -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="pip install torchdiffeq==0.2.5")
    ours = TORCHDIFFEQ_EXPLICIT[name][0]
    want = torchdiffeq.odeint(oscillator, Y0, T, method=name)
    got = neuralode.odeint(oscillator, Y0, T, method=ours)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["adaptive_heun", "fehlberg2", "bosh3", "dopri5", "dopri8"])
def test_adaptive_methods_agree_with_torchdiffeq_to_the_tolerance(name: str) -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="pip install torchdiffeq==0.2.5")
    rtol, atol = 1e-6, 1e-8
    want = torchdiffeq.odeint(oscillator, Y0, T, method=name, rtol=rtol, atol=atol)
    got = neuralode.odeint(oscillator, Y0, T, method=name, rtol=rtol, atol=atol)
    exact = neuralode.odeint(oscillator, Y0, T, method="dopri8", rtol=1e-13, atol=1e-13)
    # Both are within a few hundred tolerances of the exact solution (global error).
    for ys in (want, got):
        assert float((ys - exact).abs().max()) < 300 * (atol + rtol)


# ---------------------------------------------------------------------------------- options
def test_unknown_option_warns_and_is_ignored() -> None:
    plain = neuralode.odeint(oscillator, Y0, T)
    with pytest.warns(UserWarning, match=r"odeint: unexpected option\(s\) \['stepsize'\], ignored"):
        got = neuralode.odeint(oscillator, Y0, T, options={"stepsize": 0.1})
    assert torch.equal(got, plain)
    with pytest.warns(UserWarning, match=r"odeint_adjoint: unexpected option\(s\) \['tol'\]"):
        neuralode.odeint_adjoint(oscillator, Y0, T, options={"tol": 1}, adjoint_params=())
    # As torchdiffeq's unused options: an option for the other kind of method warns too.
    with pytest.warns(UserWarning, match=r"unexpected option\(s\) \['step_size'\]"):
        got = neuralode.odeint(oscillator, Y0, T, options={"step_size": 0.1})
    assert torch.equal(got, plain)
    with pytest.warns(UserWarning, match=r"unexpected option\(s\) \['first_step'\]"):
        got = neuralode.odeint(oscillator, Y0, T, method="rk4", options={"first_step": 0.1})
    assert torch.equal(got, neuralode.odeint(oscillator, Y0, T, method="rk4"))
    # solve() stays strict
    with pytest.raises(ValueError, match="step_size applies to fixed-step methods"):
        neuralode.solve(oscillator, Y0, T, step_size=0.1)


def test_known_options_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neuralode.odeint(oscillator, Y0, T, options={"first_step": 0.1, "dtype": torch.float64})


def test_callable_norm_gets_the_state_as_given() -> None:
    seen: list[object] = []

    def norm(y: object) -> torch.Tensor:
        seen.append(y)
        assert isinstance(y, tuple)
        return torch.stack([p.abs().max() for p in y]).max()

    def f(t: torch.Tensor, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return y[1].sum(0), -y[0].unsqueeze(0).expand(3, 2)

    y0 = (torch.ones(2, dtype=DTYPE), torch.zeros(3, 2, dtype=DTYPE))
    a = neuralode.odeint(f, y0, T, options={"norm": norm})
    assert seen and all(
        isinstance(y, tuple) and y[0].shape == (2,) and y[1].shape == (3, 2) for y in seen
    )
    # The max over the parts' max is the max norm: the same steps as norm="max".
    b = neuralode.odeint(f, y0, T, options={"norm": "max"})
    for x, z in zip(a, b):
        torch.testing.assert_close(x, z, rtol=0, atol=0)


def test_tensor_state_norm_is_called_on_the_tensor() -> None:
    shapes = set()

    def norm(y: torch.Tensor) -> torch.Tensor:
        shapes.add(tuple(y.shape))
        return y.abs().max()

    y0 = torch.ones(2, 3, dtype=DTYPE)
    a = neuralode.odeint(lambda t, y: -y, y0, T, options={"norm": norm})
    b = neuralode.odeint(lambda t, y: -y, y0, T, options={"norm": "max"})
    assert shapes == {(2, 3)} and torch.equal(a, b)


def test_tuple_state_default_norm_is_the_largest_rms() -> None:
    # A tuple whose parts differ in size: the RMS over all components and the largest RMS over
    # the parts differ, so the step counts tell the norms apart.
    def f(t: torch.Tensor, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return -3 * y[0], torch.cos(t) * torch.ones_like(y[1])

    y0 = (torch.ones(1, dtype=DTYPE), torch.zeros(50, dtype=DTYPE))
    counted = {"default": 0, "largest": 0}

    def counting(key: str):
        def g(t, y):
            counted[key] += 1
            return f(t, y)

        return g

    def largest_rms(y: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return max(p.pow(2).mean().sqrt() for p in y)  # type: ignore[return-value]

    a = neuralode.odeint(counting("default"), y0, T)
    b = neuralode.odeint(counting("largest"), y0, T, options={"norm": largest_rms})
    assert counted["default"] == counted["largest"]
    for x, z in zip(a, b):
        assert torch.equal(x, z)
    sol = neuralode.solve(f, y0, T)  # solve(): the RMS over every component
    assert int(sol.stats.nfe) != counted["default"]


# ------------------------------------------------------------------------------ scipy_solver
def test_scipy_solver_matches_the_exact_solution() -> None:
    pytest.importorskip("scipy")
    t = torch.linspace(0.0, 1.0, 5, dtype=DTYPE)
    y0 = torch.tensor([1.0, 2.0], dtype=DTYPE)
    for solver in (None, "RK45", "DOP853", "Radau", "BDF"):
        options = None if solver is None else {"solver": solver}
        ys = neuralode.odeint(
            lambda t, y: -y, y0, t, method="scipy_solver", rtol=1e-10, atol=1e-12, options=options
        )
        want = y0 * torch.exp(-t).unsqueeze(1)
        torch.testing.assert_close(ys, want, rtol=1e-7, atol=1e-9)
        assert ys.dtype == DTYPE and not ys.requires_grad


def test_scipy_solver_tuple_state_backward_in_time_and_float32() -> None:
    pytest.importorskip("scipy")
    t = torch.tensor([1.0, 0.5, 0.0])  # decreasing, float32
    y0 = (torch.ones(2, 2), torch.ones(3))

    def f(t: torch.Tensor, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        assert y[0].shape == (2, 2) and y[1].shape == (3,) and t.dtype == torch.float32
        return -y[0], 2 * y[1]

    a, b = neuralode.odeint(f, y0, t, method="scipy_solver", rtol=1e-9, atol=1e-11)
    assert a.shape == (3, 2, 2) and b.shape == (3, 3) and a.dtype == torch.float32
    torch.testing.assert_close(a[-1], torch.full((2, 2), math.e), rtol=1e-5, atol=0)
    torch.testing.assert_close(b[-1], torch.full((3,), math.exp(-2)), rtol=1e-5, atol=0)


class _TimeNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(2, 2).double()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(y)) * (1 + 0.3 * torch.sin(t))


@pytest.mark.parametrize("times", [[0.0, 0.4, 1.0], [1.0, 0.3, -0.5]])
def test_odeint_adjoint_with_scipy_solver_gives_the_adjoint_gradient(times: list[float]) -> None:
    """torchdiffeq's odeint_adjoint(method="scipy_solver") solves the backward system with
    scipy too and returns gradients; ours refused it.  Against backprop through dopri8 at 1e-12:
    the gradients of y0, of every output time (t0 included, whose output is y0 itself) and of
    the parameters, increasing and decreasing time."""
    pytest.importorskip("scipy")
    net = _TimeNet()
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    t = torch.tensor(times, dtype=DTYPE, requires_grad=True)

    def grads(ys: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = (ys**2).sum() + ys[1, 0]
        return torch.autograd.grad(loss, (y0, t, *net.parameters()))

    tight = {"rtol": 1e-10, "atol": 1e-10, "options": {"solver": "DOP853"}}
    got = grads(neuralode.odeint_adjoint(net, y0, t, method="scipy_solver", **tight))
    want = grads(neuralode.odeint(net, y0, t, method="dopri8", rtol=1e-12, atol=1e-12))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_odeint_adjoint_with_scipy_solver_tuple_state_one_time_and_refusals() -> None:
    pytest.importorskip("scipy")
    w = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)
    a0 = torch.tensor([1.0], dtype=DTYPE, requires_grad=True)
    b0 = torch.tensor([[0.5]], dtype=DTYPE, requires_grad=True)

    def f(t: torch.Tensor, y: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return -w * y[0] * y[1].reshape(1), y[0].reshape(1, 1) * w

    t = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)
    kw: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-10, "adjoint_params": (w,)}
    ya, yb = neuralode.odeint_adjoint(f, (a0, b0), t, method="scipy_solver", **kw)
    assert ya.shape == (3, 1) and yb.shape == (3, 1, 1)
    got = torch.autograd.grad(ya[-1].sum() * yb[1].sum(), (a0, b0, w))
    ya2, yb2 = neuralode.odeint(f, (a0, b0), t, method="dopri8", rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(ya2[-1].sum() * yb2[1].sum(), (a0, b0, w))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-8)
    one = neuralode.odeint_adjoint(f, (a0, b0), t[:1], method="scipy_solver", **kw)
    assert torch.autograd.grad(one[0].sum(), a0)[0].item() == 1.0
    with pytest.raises(ValueError, match="adjoint_method='dopri5' cannot serve it"):
        neuralode.odeint_adjoint(
            f, (a0, b0), t, method="scipy_solver", adjoint_method="dopri5", **kw
        )
    with pytest.raises(ValueError, match="event_fn is not supported"):
        neuralode.odeint_adjoint(
            f, (a0, b0), t, method="scipy_solver", event_fn=lambda t, y: t - 0.5, **kw
        )


def test_odeint_adjoint_with_scipy_solver_matches_torchdiffeq() -> None:
    pytest.importorskip("scipy")
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="pip install torchdiffeq==0.2.5")
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DTYPE)
    got, want = [], []
    for lib, out in ((neuralode, got), (torchdiffeq, want)):
        net = _TimeNet()
        ys = lib.odeint_adjoint(net, y0, t, method="scipy_solver", rtol=1e-10, atol=1e-10)
        out.extend(torch.autograd.grad(ys.square().sum(), tuple(net.parameters())))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_scipy_solver_warns_on_unknown_options_and_fails_clearly() -> None:
    pytest.importorskip("scipy")
    y0 = torch.ones(2, dtype=DTYPE)
    with pytest.warns(UserWarning, match=r"unexpected option\(s\) \['step_size'\]"):
        neuralode.odeint(
            lambda t, y: -y, y0, T, method="scipy_solver", options={"step_size": 0.1, "norm": "rms"}
        )
    with pytest.raises(neuralode.SolverError, match="solve_ivp failed"):
        neuralode.odeint(
            lambda t, y: y**2, y0, T, method="scipy_solver", options={"solver": "RK45"}
        )
    with pytest.raises(ValueError, match="strictly"):
        neuralode.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0, 0.5]), method="scipy_solver")


# ------------------------------------------------------------------------------ odeint_adjoint
def test_odeint_adjoint_gives_an_unused_parameter_a_zero_gradient() -> None:
    w = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)
    unused = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.ones(2, dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -w * y

    ys = neuralode.odeint_adjoint(f, y0, T, adjoint_params=(w, unused))
    with pytest.warns(UserWarning, match=r"did not depend on \['adjoint_params\[1\]'\].*zero"):
        g_w, g_u = torch.autograd.grad(ys[-1].sum(), (w, unused))
    assert torch.equal(g_u, torch.zeros(2, dtype=DTYPE))
    # d/dw of sum(exp(-w t) y0) at t = 2
    torch.testing.assert_close(g_w, -2 * 2 * torch.exp(-2 * w.detach()), rtol=1e-6, atol=0)
    # solve() keeps its error; adjoint_options={'unused': 'error'} asks for it here too
    sol = neuralode.solve(f, y0, T, gradient="adjoint", adjoint_params=(w, unused))
    with pytest.raises(ValueError, match=r"did not depend on \['adjoint_params\[1\]'\]"):
        torch.autograd.grad(sol.ys[-1].sum(), (w, unused))
    ys = neuralode.odeint_adjoint(
        f, y0, T, adjoint_params=(w, unused), adjoint_options={"unused": "error"}
    )
    with pytest.raises(ValueError, match="adjoint_options=\\{'unused': 'zero'\\}"):
        torch.autograd.grad(ys[-1].sum(), (w, unused))


def test_odeint_adjoint_warns_on_unknown_adjoint_options() -> None:
    w = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)
    y0 = torch.ones(2, dtype=DTYPE)
    with pytest.warns(UserWarning, match=r"adjoint_options: unexpected option\(s\) \['bogus'"):
        ys = neuralode.odeint_adjoint(
            lambda t, y: -w * y, y0, T, adjoint_params=(w,), adjoint_options={"bogus": 1}
        )
    (g,) = torch.autograd.grad(ys[-1].sum(), (w,))
    torch.testing.assert_close(g, -2 * 2 * torch.exp(-2 * w.detach()), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"adjoint_options\['unused'\] must be 'error' or 'zero'"):
        neuralode.solve(
            lambda t, y: -w * y,
            y0,
            T,
            gradient="adjoint",
            adjoint_params=(w,),
            adjoint_options={"unused": "ignore"},
        )


def test_evaluation_counts_against_torchdiffeq() -> None:
    """Prints the counts of docs/torchdiffeq.md (``pytest -s -k evaluation_counts``).
    torchdiffeq starts each step from the previous step's last stage even for its non-FSAL
    pairs (adaptive_heun's last stage is f at the Euler predictor, not at y1): one evaluation
    fewer per step than the published method.  Ours evaluate f(t + h, y1): every count here is
    a real call."""
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="pip install torchdiffeq==0.2.5")

    def counting() -> tuple[Any, list[int]]:
        n = [0]

        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            n[0] += 1
            return oscillator(t, y)

        return f, n

    t = torch.linspace(0.0, 5.0, 6, dtype=DTYPE)
    for name in ("adaptive_heun", "fehlberg2", "bosh3", "dopri5", "dopri8"):
        f, theirs = counting()
        torchdiffeq.odeint(f, Y0, t, method=name, rtol=1e-5, atol=1e-7)
        g, ours = counting()
        sol = neuralode.solve(g, Y0, t, method=name, rtol=1e-5, atol=1e-7)
        assert int(sol.stats.nfe) == ours[0]
        print(
            f"{name}: {ours[0]} evaluations, torchdiffeq {theirs[0]} ({ours[0] / theirs[0]:.2f}x)"
        )


def test_min_step_and_max_step_options() -> None:
    n = [0]

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n[0] += 1
        return -y

    y0, t = torch.ones(2, dtype=DTYPE), torch.tensor([0.0, 1.0], dtype=DTYPE)
    ys = neuralode.odeint(f, y0, t, options={"max_step": 0.01})
    assert n[0] == 2 + 6 * 100  # f0, the initial-step probe, 100 steps of 6 new stages
    torch.testing.assert_close(ys[-1], torch.exp(-t[-1]).expand(2), rtol=1e-12, atol=0)
    # a first step outside the bounds is clamped (torchdiffeq clamps every step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neuralode.odeint(f, y0, t, options={"first_step": 5.0, "max_step": 0.5})
    # fixed-step methods have no use for them: a warning, as torchdiffeq's unused options
    with pytest.warns(UserWarning, match=r"unexpected option\(s\) \['max_step', 'min_step'\]"):
        neuralode.odeint(f, y0, t, method="rk4", options={"min_step": 0.1, "max_step": 0.2})
