"""``solve(..., jac=...)``: the user's Jacobian in place of autograd's, for the stiff methods.

* With the exact Jacobian, every stiff method takes the steps and reaches the values it does with
  autograd's (Robertson; a batch with per-sample rate constants; a tuple state; decreasing time,
  shared and per sample; ``df/dt`` given or taken by forward mode).
* Gradients flow through a ``jac`` built from the parameters (gradcheck in float64).
* Wrong shapes and methods that take no Jacobian are refused with the argument named.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from stiff_problems import K_ROBERTSON, robertson

import neuralode

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
TS = torch.tensor([0.0, 0.4, 4.0, 40.0, 400.0], dtype=DTYPE)
Y0 = torch.tensor([1.0, 0.0, 0.0], dtype=DTYPE)


def robertson_jac(k: torch.Tensor):
    """``df/dy`` of Robertson's kinetics (``k`` ``[3]`` or ``[batch, 3]``)."""

    def jac(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k1, k2, k3 = k[..., 0], k[..., 1], k[..., 2]
        y1, y2, y3 = y.unbind(-1)
        zero = torch.zeros_like(y1)
        rows = [
            [-k1 + zero, k3 * y3, k3 * y2],
            [k1 + zero, -2 * k2 * y2 - k3 * y3, -k3 * y2],
            [zero, 2 * k2 * y2, zero],
        ]
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    return jac


@pytest.mark.parametrize("method", ["rosenbrock23", "rodas5p", "kvaerno5", "auto"])
def test_exact_jacobian_gives_autograds_solve(method: str) -> None:
    k = torch.tensor(K_ROBERTSON, dtype=DTYPE)
    kw = dict(method=method, rtol=1e-6, atol=1e-10)
    want = neuralode.solve(robertson(k), Y0, TS, **kw)
    got = neuralode.solve(robertson(k), Y0, TS, jac=robertson_jac(k), **kw)
    assert int(got.stats.n_steps) == int(want.stats.n_steps)
    assert int(got.stats.njev) == int(want.stats.njev) > 0
    torch.testing.assert_close(got.ys, want.ys, rtol=1e-9, atol=1e-13)


def test_batched_jacobian_per_sample() -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.tensor(K_ROBERTSON, dtype=DTYPE) * 10 ** torch.rand(4, 3, generator=g, dtype=DTYPE)
    y0 = Y0.expand(4, 3)
    kw = dict(method="rodas5p", rtol=1e-6, atol=1e-10, batched=True)
    want = neuralode.solve(robertson(k), y0, TS, **kw)
    got = neuralode.solve(robertson(k), y0, TS, jac=robertson_jac(k), **kw)
    assert torch.equal(got.stats.n_steps, want.stats.n_steps)
    torch.testing.assert_close(got.ys, want.ys, rtol=1e-9, atol=1e-13)


def _forced():
    """A non-autonomous linear field ``y' = A y + sin(t) b`` with its Jacobian and ``df/dt``."""
    A = torch.tensor([[-50.0, 1.0], [0.5, -2.0]], dtype=DTYPE)
    b = torch.tensor([1.0, -1.0], dtype=DTYPE)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ A.T + torch.sin(t).unsqueeze(-1) * b if t.ndim else A @ y + torch.sin(t) * b

    def jac(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return A.expand(*y.shape[:-1], 2, 2)

    def jac_t(t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ft = torch.cos(t).unsqueeze(-1) * b if t.ndim else torch.cos(t) * b
        return jac(t, y), ft

    return f, jac, jac_t


@pytest.mark.parametrize("with_dt", [False, True])
@pytest.mark.parametrize("direction", ["forward", "backward", "per-sample"])
def test_time_derivative_and_reversed_time(with_dt: bool, direction: str) -> None:
    """``df/dt`` by forward mode or given; time reversal flips ``df/dy`` and keeps ``df/dt``
    (a wrong sign on either changes the steps and the values).  Forward mode must not fall
    back to reverse mode (the same values, twice the work) for a field it can transform: the
    fallback's calls are those with a time that requires gradients."""
    plain, jac, jac_t = _forced()
    fallback_calls = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fallback_calls.append(t.requires_grad)
        return plain(t, y)

    ts = torch.linspace(0.0, 3.0, 7, dtype=DTYPE)
    y0 = torch.tensor([1.0, 2.0], dtype=DTYPE)
    kw: dict = dict(method="rodas5p", rtol=1e-7, atol=1e-10)
    if direction == "backward":
        ts = ts.flip(0)
    if direction == "per-sample":
        ts = torch.stack([ts, ts.flip(0)])
        y0 = y0.expand(2, 2)
    want = neuralode.solve(plain, y0, ts, **kw)
    got = neuralode.solve(f, y0, ts, jac=jac_t if with_dt else jac, **kw)
    assert torch.equal(got.stats.n_steps, want.stats.n_steps)
    torch.testing.assert_close(got.ys, want.ys, rtol=1e-10, atol=1e-12)
    assert fallback_calls and not any(fallback_calls)


def test_time_derivative_for_a_field_torch_func_cannot_transform() -> None:
    """Without ``df/dt`` from the user and without ``torch.func``, ``df/dt`` comes from two
    reverse-mode products; the same steps and values.  (The field must defeat ``torch.func``:
    an earlier version of this test used a ``.item()`` of the detached state, which
    ``torch.func.jvp`` in ``t`` runs, and never reached the fallback.)"""
    from fields import opaque

    from neuralode.solvers.newton import _AUTOGRAD_ONLY

    f, jac, _ = _forced()
    untraceable = opaque(f)
    ts = torch.linspace(0.0, 3.0, 7, dtype=DTYPE)
    y0 = torch.tensor([1.0, 2.0], dtype=DTYPE)
    kw: dict = dict(method="rodas5p", rtol=1e-7, atol=1e-10)
    want = neuralode.solve(f, y0, ts, **kw)
    got = neuralode.solve(untraceable, y0, ts, jac=jac, **kw)
    assert untraceable in _AUTOGRAD_ONLY
    assert torch.equal(got.stats.n_steps, want.stats.n_steps)
    torch.testing.assert_close(got.ys, want.ys, rtol=1e-10, atol=1e-12)
    # an autonomous field (no graph to t at all) has df/dt = 0
    k = torch.tensor(K_ROBERTSON, dtype=DTYPE)
    rob = opaque(robertson(k))
    got = neuralode.solve(
        rob, Y0, TS, method="rodas5p", rtol=1e-6, atol=1e-10, jac=robertson_jac(k)
    )
    want = neuralode.solve(robertson(k), Y0, TS, method="rodas5p", rtol=1e-6, atol=1e-10)
    assert rob in _AUTOGRAD_ONLY
    torch.testing.assert_close(got.ys, want.ys, rtol=1e-9, atol=1e-13)


def test_tuple_state_takes_the_flattened_jacobian() -> None:
    k = torch.tensor(K_ROBERTSON, dtype=DTYPE)
    flat = robertson(k)

    def f(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = flat(t, torch.cat(y, -1))
        return out[..., :1], out[..., 1:]

    def jac(t: torch.Tensor, y: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return robertson_jac(k)(t, torch.cat(y, -1))

    y0 = (Y0[:1], Y0[1:])
    want = neuralode.solve(f, y0, TS, method="rodas5p", rtol=1e-6, atol=1e-10)
    got = neuralode.solve(f, y0, TS, method="rodas5p", rtol=1e-6, atol=1e-10, jac=jac)
    for a, b in zip(got.ys, want.ys):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("gradient", ["backprop", "checkpoint"])
def test_gradients_flow_through_the_users_jacobian(gradient: str) -> None:
    theta = torch.tensor([30.0, 2.0], dtype=DTYPE, requires_grad=True)
    y0 = torch.tensor([0.5, -0.3], dtype=DTYPE, requires_grad=True)
    ts = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)

    def run(y0: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -theta[0] * (y - torch.cos(t)) - theta[1] * y**3

        def jac(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.diag(-theta[0] - 3 * theta[1] * y**2)

        kw = {} if gradient == "backprop" else {"adjoint_params": (theta,)}
        sol = neuralode.solve(
            f, y0, ts, method="rodas5p", first_step=0.0625, rtol=1e10, atol=1e10, ifactor=1.0,
            jac=jac, gradient=gradient, **kw,
        )  # fmt: skip
        return sol.ys

    assert torch.autograd.gradcheck(run, (y0, theta), atol=1e-7, rtol=1e-6)


def test_bad_jacobians_are_refused() -> None:
    """Each message names the expected layout and what came instead (a shape, or the type of
    what is not a tensor), for an unbatched and a batched solve."""
    import re

    k = torch.tensor(K_ROBERTSON, dtype=DTYPE)
    jac_ok = robertson_jac(k)
    shape = (
        "jac(t, y) must return df/dy of shape {} ({} with N = 3 state components per "
        "sample), or a pair (df/dy, df/dt); got {}"
    )
    dt = "jac(t, y)'s df/dt must have the state's shape {}, got {}"
    cases = [
        (lambda t, y: torch.eye(2), False, shape.format("[3, 3]", "[N, N]", "(2, 2)")),
        (lambda t, y: [[0.0] * 3] * 3, False, shape.format("[3, 3]", "[N, N]", "list")),
        (lambda t, y: torch.eye(3), True, shape.format("[2, 3, 3]", "[batch, N, N]", "(3, 3)")),
        (lambda t, y: (jac_ok(t, y), torch.zeros(2)), False, dt.format("[3]", "(2,)")),
        (lambda t, y: (jac_ok(t, y), 0.0), False, dt.format("[3]", "float")),
        (lambda t, y: (jac_ok(t, y), torch.zeros(3)), True, dt.format("[2, 3]", "(3,)")),
    ]  # fmt: skip
    for jac, batched, message in cases:
        y0 = Y0.expand(2, 3) if batched else Y0
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            neuralode.solve(robertson(k), y0, TS, method="rodas5p", jac=jac, batched=batched)
    with pytest.raises(ValueError, match="'dopri5' takes no Jacobian"):
        neuralode.solve(robertson(k), Y0, TS, method="dopri5", jac=robertson_jac(k))
    with pytest.raises(TypeError, match="jac must be callable"):
        neuralode.solve(robertson(k), Y0, TS, method="rodas5p", jac=torch.eye(3))


@pytest.mark.parametrize("method", ["rodas5p", "rosenbrock23", "kvaerno5"])
def test_a_jacobian_in_another_dtype_is_used_in_the_states(method: str) -> None:
    """A ``jac`` that returns ``df/dy`` and ``df/dt`` in float32 for a float64 state: both are
    used in float64 (exactly the values it returned, cast), so the solve is the one with the
    same values given in float64, step for step."""
    f, jac, jac_t = _forced()

    def in_float32(t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        J, ft = jac_t(t, y)
        return J.float(), ft.float()

    def cast_back(t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        J, ft = in_float32(t, y)
        return J.double(), ft.double()

    ts = torch.linspace(0.0, 3.0, 7, dtype=DTYPE)
    y0 = torch.tensor([1.0, 2.0], dtype=DTYPE)
    kw: dict = dict(method=method, rtol=1e-10, atol=1e-12)
    want = neuralode.solve(f, y0, ts, jac=cast_back, **kw)
    got = neuralode.solve(f, y0, ts, jac=in_float32, **kw)
    assert got.ys.dtype == DTYPE
    assert torch.equal(got.stats.n_steps, want.stats.n_steps)
    torch.testing.assert_close(got.ys, want.ys, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("batched", [False, True])
def test_the_reverse_mode_time_derivative_is_differentiable(batched: bool) -> None:
    """For a field ``torch.func`` cannot transform, ``df/dt`` (not given by ``jac``) comes from
    two reverse-mode products; backprop through a ``rodas5p`` solve differentiates it as it
    does forward mode's: the same values and gradients, with one time per row or not, for a
    field of ``t`` and an autonomous one (whose ``df/dt`` is zero while ``y`` requires
    gradients).  ``jacobian()`` called with a time that requires gradients keeps ``df/dt``'s
    graph to it."""
    from fields import opaque

    from neuralode.solvers.newton import _AUTOGRAD_ONLY, JacobianField, jacobian

    def field(theta: torch.Tensor, autonomous: bool):
        def wave(t: torch.Tensor) -> torch.Tensor:
            s = torch.zeros_like(t) if autonomous else torch.sin(t)
            return s.unsqueeze(-1) if t.ndim else s

        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -theta[0] * (y - 0.5 * wave(t)) - theta[1] * y**3 * (1 + 0.5 * wave(t))

        def jac(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.diag_embed(-theta[0] - 3 * theta[1] * y**2 * (1 + 0.5 * wave(t)))

        return f, jac

    ts = torch.tensor([0.0, 0.25, 1.0], dtype=DTYPE)
    if batched:
        ts = torch.stack([ts, 0.5 * ts])
    for autonomous in (False, True):
        results = []
        for wrap in (lambda g: g, opaque):
            theta = torch.tensor([30.0, 2.0], dtype=DTYPE, requires_grad=True)
            y0 = torch.tensor([[0.5, -0.3], [0.2, 0.7]], dtype=DTYPE)
            y0 = (y0 if batched else y0[0]).requires_grad_()
            f, jac = field(theta, autonomous)
            g = wrap(f)
            sol = neuralode.solve(g, y0, ts, method="rodas5p", rtol=1e-8, atol=1e-10, jac=jac)
            assert (g in _AUTOGRAD_ONLY) == (wrap is opaque)
            grads = torch.autograd.grad(sol.ys.square().sum(), [y0, theta])
            t = ts[:, 1].clone() if batched else ts[1].clone()
            t.requires_grad_()
            lin = jacobian(JacobianField(g, jac), t, y0.detach())
            if autonomous:
                assert torch.equal(lin.ft, torch.zeros_like(lin.ft))
                d_t = torch.zeros_like(t)
            else:
                (d_t,) = torch.autograd.grad(lin.ft.square().sum(), t)
            results.append((sol.ys, grads, d_t))
        (want, want_grads, want_dt), (got, got_grads, got_dt) = results
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(got_dt, want_dt, rtol=1e-13, atol=1e-15)
        assert autonomous or float(want_dt.abs().min()) > 0


def test_the_time_derivative_keeps_the_fields_warnings_and_hides_torchs() -> None:
    """Forward mode in ``t`` (``jac`` without ``df/dt``) hides torch 2.13's own deprecation
    warning about it (raised by its first use in a process), and nothing else: every warning
    the field raises reaches the user, one per call."""
    f, jac, _ = _forced()
    calls = []

    def warns(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        warnings.warn("from the field", UserWarning, stacklevel=1)
        return f(t, y)

    ts = torch.linspace(0.0, 3.0, 7, dtype=DTYPE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        neuralode.solve(warns, torch.tensor([1.0, 2.0], dtype=DTYPE), ts, method="rodas5p",
                        jac=jac)  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert messages == ["from the field"] * len(calls), set(messages)
    # torch warns on its first forward-mode product in a process only: a fresh one, in which
    # any warning is an error
    import subprocess
    import sys

    script = (
        "import torch, neuralode\n"
        "A = torch.tensor([[-50.0, 1.0], [0.5, -2.0]], dtype=torch.float64)\n"
        "sol = neuralode.solve(lambda t, y: A @ y + torch.sin(t), torch.ones(2, dtype=A.dtype),\n"
        "    torch.tensor([0.0, 1.0], dtype=A.dtype), method='rodas5p', jac=lambda t, y: A)\n"
        "assert sol.success\n"
    )
    run = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
