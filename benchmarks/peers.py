"""Uniform adapters that run one ODE problem in neuralode and in each peer library.

Used by ``benchmarks/compare.py``.  Every adapter turns (problem, method, tolerances, gradient mode)
into a zero-argument callable that runs one solve (and, for a gradient mode, one backward pass of
``sum(y(t1)**2)`` into the vector field's parameters) and returns a :class:`Run` with the final
state and the number of vector-field evaluations (NFE).  The callable is what gets timed; setup
(building solver objects, JIT compilation and warm-up for JAX) happens before it is returned.

Peers are optional: a peer whose import fails is listed in :data:`UNAVAILABLE` with the reason and
skipped by the harness.

How NFE is counted (the peers count differently, so we count ourselves where we can):
  * PyTorch peers: the vector field is wrapped in :class:`Counted`, which counts calls of the
    field on the whole batch (forward calls, and separately calls made during ``backward()``, such
    as an adjoint's backward solve).  torchode also reports per-sample ``n_f_evals``; torchdyn keeps
    its own ``nfe`` on its wrapper; both agree with the wrapper for a single batch.
  * scipy: ``sol.nfev`` (includes the 2 evaluations of its initial step selection).
  * diffrax: counting inside a jitted function is not possible without a host callback that would
    distort the timing, so NFE is estimated as ``num_steps * new_stages + init``: new stages per
    attempted step are the tableau's stages minus one for FSAL methods; ``init`` is 1 (the FSAL
    first evaluation) plus 2 for the PID controller's initial step selection (none with a fixed
    step).  ``num_steps`` counts attempted (accepted + rejected) steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import neuralode

UNAVAILABLE: dict[str, str] = {}

try:
    import torchdiffeq
except ImportError as e:  # optional peer: pip install -e '.[bench]'
    torchdiffeq = None
    UNAVAILABLE["torchdiffeq"] = f"not importable: {e}"
try:
    import torchode
except ImportError as e:
    torchode = None
    UNAVAILABLE["torchode"] = f"not importable: {e}"
try:
    from torchdyn.core import NeuralODE as TorchdynNeuralODE
except ImportError as e:
    TorchdynNeuralODE = None
    UNAVAILABLE["torchdyn"] = f"not importable: {e}"
try:
    import scipy.integrate as scipy_integrate
except ImportError as e:
    scipy_integrate = None
    UNAVAILABLE["scipy"] = f"not importable: {e}"

# JAX: one CPU thread like the PyTorch peers, float64 enabled for the work-precision problems.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
try:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import diffrax
except ImportError as e:
    jax = jnp = diffrax = None
    UNAVAILABLE["diffrax"] = f"not importable: {e}"

PEERS = ("neuralode", "torchdiffeq", "torchode", "torchdyn", "scipy", "diffrax")

# Our method name -> each peer's name for the same tableau (absent: the peer lacks it).
METHOD_NAMES: dict[str, dict[str, str]] = {
    "neuralode": {m: m for m in ("bosh3", "dopri5", "tsit5", "dopri8", "rk4")},
    "torchdiffeq": {"bosh3": "bosh3", "dopri5": "dopri5", "dopri8": "dopri8", "rk4": "rk4"},
    "torchode": {"dopri5": "dopri5", "tsit5": "tsit5"},
    "torchdyn": {"dopri5": "dopri5", "tsit5": "tsit5", "rk4": "rk4"},
    "scipy": {"bosh3": "RK23", "dopri5": "RK45", "dopri8": "DOP853"},
    "diffrax": {
        "bosh3": "Bosh3",
        "dopri5": "Dopri5",
        "tsit5": "Tsit5",
        "dopri8": "Dopri8",
        "rk4": "RK4",
    },
}
# Which gradient modes each peer offers ("backprop" through the solver, "adjoint" backsolve).
GRADIENTS: dict[str, tuple[str, ...]] = {
    "neuralode": ("backprop", "adjoint"),
    "torchdiffeq": ("backprop", "adjoint"),
    "torchode": ("backprop", "adjoint"),
    "torchdyn": ("backprop", "adjoint"),
    "scipy": (),
    "diffrax": ("backprop", "adjoint"),
}


def available(peer: str) -> bool:
    return peer not in UNAVAILABLE


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchdiffeq", "torchode", "torchdyn", "scipy", "jax", "diffrax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


@dataclass
class Problem:
    """One initial value problem, in PyTorch and (optionally) JAX form.

    ``f_torch(t, y)`` maps ``y`` of shape ``[batch, dim]`` to the same shape (an ``nn.Module`` when
    gradients are wanted: its parameters receive them).  ``f_jax(t, y, args)`` is the same field in
    JAX with ``args`` its parameters (a pytree); ``None`` skips diffrax.
    """

    name: str
    f_torch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    y0: torch.Tensor
    t0: float
    t1: float
    f_jax: Callable[[Any, Any, Any], Any] | None = None
    jax_args: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    y1: np.ndarray  # final state, [batch, dim]
    nfe: int  # batched vector-field calls in the forward solve
    nfe_backward: int = 0  # calls made during backward() (adjoint backward solve)
    nfe_per_sample: np.ndarray | None = None  # per-sample NFE where the peer steps per sample


class Counted(torch.nn.Module):
    """Counts calls of a vector field ``f(t, y)``; ``nfe`` is reset by the adapters."""

    def __init__(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f
        self.nfe = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor, args: Any = None) -> torch.Tensor:
        self.nfe += 1
        return self.f(t, y)


def _loss_backward(y1: torch.Tensor, counted: Counted) -> int:
    before = counted.nfe
    y1.square().sum().backward()
    return counted.nfe - before


def _grad_ctx(gradient: str | None) -> Any:
    return torch.enable_grad() if gradient else torch.no_grad()


# --------------------------------------------------------------------------------------------
# PyTorch peers


def _neuralode(
    p: Problem, method: str, rtol: float, atol: float, gradient: str | None, **kw: Any
) -> Callable[[], Run]:
    f = Counted(p.f_torch)
    t = torch.tensor([p.t0, p.t1], dtype=p.y0.dtype)
    extra: dict[str, Any] = {}
    if kw.get("step_size") is not None:
        extra["step_size"] = kw["step_size"]
    if gradient == "adjoint":
        extra["gradient"] = "adjoint"
    batched = kw.get("batched", False)

    def run() -> Run:
        f.nfe = 0
        with _grad_ctx(gradient):
            sol = neuralode.solve(
                f, p.y0, t, method=method, rtol=rtol, atol=atol, batched=batched, **extra
            )
            y1 = sol.ys[:, -1] if batched else sol.ys[-1]
            nfe = f.nfe
            nb = _loss_backward(y1, f) if gradient else 0
        per = sol.stats.nfe.detach().cpu().numpy() if batched else None
        return Run(y1.detach().cpu().numpy(), nfe, nb, per)

    return run


def _torchdiffeq(
    p: Problem, method: str, rtol: float, atol: float, gradient: str | None, **kw: Any
) -> Callable[[], Run]:
    f = Counted(p.f_torch)
    t = torch.tensor([p.t0, p.t1], dtype=p.y0.dtype)
    odeint = torchdiffeq.odeint_adjoint if gradient == "adjoint" else torchdiffeq.odeint
    opts = {"step_size": kw["step_size"]} if kw.get("step_size") is not None else None

    def run() -> Run:
        f.nfe = 0
        with _grad_ctx(gradient):
            y1 = odeint(f, p.y0, t, rtol=rtol, atol=atol, method=method, options=opts)[-1]
            nfe = f.nfe
            nb = _loss_backward(y1, f) if gradient else 0
        return Run(y1.detach().cpu().numpy(), nfe, nb)

    return run


def _torchode(
    p: Problem, method: str, rtol: float, atol: float, gradient: str | None, **kw: Any
) -> Callable[[], Run]:
    f = Counted(p.f_torch)
    term = torchode.ODETerm(f)
    step = {"dopri5": torchode.Dopri5, "tsit5": torchode.Tsit5}[method](term=term)
    ctrl = torchode.IntegralController(atol=atol, rtol=rtol, term=term)
    if gradient == "adjoint":
        solver = torchode.BacksolveAdjoint(term, step, ctrl)
    else:
        solver = torchode.AutoDiffAdjoint(step, ctrl)
    batch = p.y0.shape[0]
    t_eval = torch.tensor([p.t0, p.t1], dtype=p.y0.dtype).expand(batch, 2)
    problem = torchode.InitialValueProblem(y0=p.y0, t_eval=t_eval)

    def run() -> Run:
        f.nfe = 0
        with _grad_ctx(gradient):
            sol = solver.solve(problem)
            y1 = sol.ys[:, -1]
            nfe = f.nfe
            nb = _loss_backward(y1, f) if gradient else 0
        per = sol.stats["n_f_evals"].detach().cpu().numpy()
        return Run(y1.detach().cpu().numpy(), nfe, nb, per)

    return run


def _torchdyn(
    p: Problem, method: str, rtol: float, atol: float, gradient: str | None, **kw: Any
) -> Callable[[], Run]:
    f = Counted(p.f_torch)
    sens = "adjoint" if gradient == "adjoint" else "autograd"
    # torchdyn's adjoint tolerances default to 1e-4 whatever the forward's: set them equal.
    model = TorchdynNeuralODE(
        f, solver=method, sensitivity=sens, atol=atol, rtol=rtol, atol_adjoint=atol,
        rtol_adjoint=rtol, return_t_eval=False,
    )  # fmt: skip
    if kw.get("step_size") is not None:  # fixed-step solvers step on the t_span grid
        n = round((p.t1 - p.t0) / kw["step_size"])
        t_span = torch.linspace(p.t0, p.t1, n + 1, dtype=p.y0.dtype)
    else:
        t_span = torch.tensor([p.t0, p.t1], dtype=p.y0.dtype)

    def run() -> Run:
        f.nfe = 0
        with _grad_ctx(gradient):
            y1 = model(p.y0, t_span)[-1]
            nfe = f.nfe
            nb = _loss_backward(y1, f) if gradient else 0
        return Run(y1.detach().cpu().numpy(), nfe, nb)

    return run


def _scipy(
    p: Problem, method: str, rtol: float, atol: float, gradient: str | None, **kw: Any
) -> Callable[[], Run]:
    if gradient:
        raise NotImplementedError("scipy has no gradients")
    shape = tuple(p.y0.shape)
    y0 = p.y0.detach().double().reshape(-1).numpy()
    dtype = p.y0.dtype

    @torch.no_grad()
    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        yt = torch.from_numpy(y).reshape(shape).to(dtype)
        return p.f_torch(torch.tensor(t, dtype=dtype), yt).double().reshape(-1).numpy()

    def run() -> Run:
        sol = scipy_integrate.solve_ivp(
            rhs, (p.t0, p.t1), y0, method=method, rtol=rtol, atol=atol, t_eval=[p.t1]
        )
        if not sol.success:
            raise RuntimeError(f"scipy {method}: {sol.message}")
        return Run(sol.y[:, -1].reshape(shape), int(sol.nfev))

    return run


# --------------------------------------------------------------------------------------------
# diffrax (JAX)

if diffrax is not None:

    class RK4(diffrax.AbstractERK):
        """Classical RK4 (diffrax ships no RK4; a new ERK is one tableau)."""

        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]),
            b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms: Any) -> int:
            return 4

    DIFFRAX_SOLVERS = {
        "Bosh3": diffrax.Bosh3,
        "Dopri5": diffrax.Dopri5,
        "Tsit5": diffrax.Tsit5,
        "Dopri8": diffrax.Dopri8,
        "RK4": RK4,
    }


_JIT_CACHE: dict[tuple[Any, ...], Any] = {}


def diffrax_new_stages(solver: Any) -> int:
    tab = solver.tableau
    return len(tab.c) + 1 - (1 if tab.fsal else 0)


def _diffrax(
    p: Problem,
    method: str,
    rtol: float,
    atol: float,
    gradient: str | None,
    **kw: Any,
) -> Callable[[], Run]:
    if p.f_jax is None:
        raise NotImplementedError("problem has no JAX vector field")
    solver = DIFFRAX_SOLVERS[method]()
    step_size = kw.get("step_size")
    per_sample = kw.get("batched", False)
    jdtype = jnp.float64 if p.y0.dtype == torch.float64 else jnp.float32
    y0 = jnp.asarray(p.y0.detach().cpu().numpy(), dtype=jdtype)
    term = diffrax.ODETerm(p.f_jax)
    t0, t1 = p.t0, p.t1
    max_steps = kw.get("max_steps", 100_000)

    def solve(y0: Any, args: Any, rtol: Any, atol: Any) -> tuple[Any, Any]:
        if step_size is not None:
            ctrl, dt0 = diffrax.ConstantStepSize(), step_size
        else:
            ctrl, dt0 = diffrax.PIDController(rtol=rtol, atol=atol), None
        adjoint = (
            diffrax.BacksolveAdjoint(solver=solver, stepsize_controller=ctrl)
            if gradient == "adjoint"
            else diffrax.RecursiveCheckpointAdjoint()
        )
        sol = diffrax.diffeqsolve(
            term, solver, t0, t1, dt0, y0, args=args, stepsize_controller=ctrl,
            saveat=diffrax.SaveAt(t1=True), adjoint=adjoint, max_steps=max_steps,
        )  # fmt: skip
        return sol.ys[-1], sol.stats["num_steps"]

    key = (id(p), method, gradient, step_size, per_sample)
    fn = _JIT_CACHE.get(key)
    if fn is None:
        if per_sample:  # vmap over rows: each row has its own step size (batched while loop)
            args_axis = 0 if kw.get("batched_args") else None
            solve = jax.vmap(solve, in_axes=(0, args_axis, None, None))
        if gradient:

            def loss(args: Any, y0: Any, rtol: Any, atol: Any) -> tuple[Any, Any]:
                y1, steps = solve(y0, args, rtol, atol)
                return jnp.sum(y1**2), (y1, steps)

            fn = jax.jit(jax.grad(loss, has_aux=True))
        else:
            fn = jax.jit(lambda args, y0, rtol, atol: solve(y0, args, rtol, atol))
        _JIT_CACHE[key] = fn
    # rtol and atol are traced arguments: one compilation serves every tolerance.
    jr, ja = jnp.asarray(rtol, dtype=jdtype), jnp.asarray(atol, dtype=jdtype)

    def call() -> tuple[Any, Any]:
        out = fn(p.jax_args, y0, jr, ja)
        jax.block_until_ready(out)
        return out[1] if gradient else out

    call()  # compile and warm up
    stages = diffrax_new_stages(solver)
    init = 1 + (0 if step_size is not None else 2)

    def run() -> Run:
        y1, steps = call()
        steps = np.asarray(steps)
        nfe_samples = steps * stages + init
        return Run(
            np.asarray(y1),
            int(nfe_samples.max()),
            0,  # the backward pass's evaluations are not observable from outside the jit
            nfe_samples if per_sample else None,
        )

    return run


ADAPTERS: dict[str, Callable[..., Callable[[], Run]]] = {
    "neuralode": _neuralode,
    "torchdiffeq": _torchdiffeq,
    "torchode": _torchode,
    "torchdyn": _torchdyn,
    "scipy": _scipy,
    "diffrax": _diffrax,
}


def prepare(
    peer: str,
    problem: Problem,
    method: str,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    gradient: str | None = None,
    **kw: Any,
) -> Callable[[], Run] | str:
    """A zero-argument runner for ``problem`` in ``peer``, or a string saying why it is skipped.

    ``method`` is our name (``dopri5``, ...); ``gradient`` is ``None`` (forward only),
    ``"backprop"`` or ``"adjoint"``; keywords: ``step_size`` (fixed step), ``batched``
    (per-sample step sizes: neuralode ``batched=True``, diffrax ``vmap``).
    """
    if not available(peer):
        return UNAVAILABLE[peer]
    name = METHOD_NAMES[peer].get(method)
    if name is None:
        return f"{peer} has no {method}"
    if gradient and gradient not in GRADIENTS[peer]:
        return f"{peer} has no {gradient} gradient"
    return ADAPTERS[peer](problem, name, rtol, atol, gradient, **kw)
