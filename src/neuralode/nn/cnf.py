"""Continuous normalizing flows (Chen et al. 2018, Section 4; FFJORD, Grathwohl et al. 2019).

A CNF moves a sample with an ODE ``dz/dt = f(t, z)`` and tracks its log-density with the
instantaneous change of variables (Chen et al. 2018, Theorem 1)::

    d log p(z(t)) / dt = -tr(df/dz(t)).

Conventions (as in FFJORD's code):

* **Direction.** Data sits at ``t = 0`` and the base distribution ``N(0, I)`` at ``t = T``.
  The forward call (``reverse=False``) integrates ``0 -> T`` (data -> base, for density
  evaluation); ``reverse=True`` integrates ``T -> 0`` (base -> data, for sampling).
* **delta_logp.** The joint state carries ``ell(t)`` with ``d ell/dt = -tr(df/dz)`` from
  ``ell = 0`` at the start, so ``delta_logp = ell(end) - ell(start) = log p(z_end) -
  log p(z_start)``: the flow's log-density at the output end minus the one at the input end.
  Hence ``log p(x) = log N(z(T); 0, I) - delta_logp`` (forward) and, for a base sample ``z``,
  ``log q(x) = log N(z; 0, I) + delta_logp`` (reverse).
* **Regularisers** (Finlay et al. 2020, "How to train your neural ODE"): kinetic energy
  ``int 0.5 |f|^2 dt`` and Jacobian Frobenius norm ``int |eps^T df/dz|^2 dt`` (Hutchinson;
  with ``trace="exact"`` the exact ``int ||df/dz||_F^2 dt``, which the full Jacobian gives for
  free), each integrated as an extra state and reported per sample.  Both are integrated
  over ``|dt|`` (positive in either direction), and neither enters the step-size control of
  the forward solve (as in FFJORD's and RNODE's code): the error norm is the RMS over ``z``
  and ``ell`` only, unless ``solve_options`` sets a ``norm`` of its own.

The divergence is either exact (``trace="exact"``: one backward pass per dimension, for low
dimension) or Hutchinson's estimator ``eps^T (df/dz) eps`` (``trace="hutchinson"``) with one
noise draw per call (per solve), held fixed during the solve and its backward pass, as FFJORD
requires for a well-defined ODE.  Inside the field the derivatives are taken under
``torch.enable_grad()`` with ``create_graph`` whenever gradients are being recorded, so that
training gradients flow through the divergence under every gradient strategy (``"backprop"``,
``"adjoint"``, ``"checkpoint"``).

Every solve goes through the public :func:`neuralode.solve` with an unbatched problem (one
step size for the whole batch, as in FFJORD and torchdiffeq).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..controllers import rms_norm
from ..solution import Solution
from ..solve import solve
from .activations import activation as make_activation
from .settings import SolveSettings

__all__ = [
    "CNF",
    "CNFOutput",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "PlanarField",
    "TRACES",
    "NOISES",
    "standard_normal_log_prob",
    "divergence_exact",
    "divergence_hutchinson",
    "draw_noise",
]

#: Divergence estimators of :class:`CNF`.
TRACES = ("exact", "hutchinson")
#: Noise distributions of the Hutchinson estimator.
NOISES = ("gaussian", "rademacher")

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: ``neuralode.solve`` arguments that :class:`CNF` sets itself.
_RESERVED = frozenset(
    {"func", "y0", "t", "batched", "method", "rtol", "atol", "step_size", "gradient"}
)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per sample.

    Args:
        z: ``[B, *shape]``, floating point.

    Returns:
        ``[B]`` (nats), in ``z``'s dtype.

    Examples:
        >>> import torch
        >>> from neuralode.nn.cnf import standard_normal_log_prob
        >>> standard_normal_log_prob(torch.zeros(2, 3))  # -1.5 log(2 pi)
        tensor([-2.7568, -2.7568])
    """
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def _grad(f: torch.Tensor, z: torch.Tensor, v: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``v^T df/dz`` per sample (``[B, *shape]``); zeros where ``f`` does not depend on ``z``."""
    if not f.requires_grad:
        return torch.zeros_like(z)
    (g,) = torch.autograd.grad(
        f, z, v, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(z) if g is None else g


def divergence_exact(
    f: torch.Tensor, z: torch.Tensor, *, create_graph: bool = True, frobenius: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact ``tr(df/dz)`` per sample, one backward pass per dimension.

    Args:
        f: ``[B, *shape]``, computed from ``z`` row by row (row ``i`` of ``f`` depends on row
            ``i`` of ``z`` only).
        z: ``[B, *shape]``, requires grad.
        create_graph: keep the graph of the result (for training gradients).
        frobenius: also return ``||df/dz||_F^2`` per sample.

    Returns:
        ``(div [B], frob [B] or None)``, in ``z``'s dtype; zeros where ``f`` does not depend
        on ``z``.

    Examples:
        >>> import torch
        >>> from neuralode.nn.cnf import divergence_exact
        >>> z = torch.randn(3, 2, requires_grad=True)
        >>> divergence_exact(2 * z, z, frobenius=True)  # df/dz = 2 I
        (tensor([4., 4., 4.]), tensor([8., 8., 8.]))
    """
    b = z.shape[0]
    f_flat = f.reshape(b, -1)
    div = torch.zeros(b, dtype=z.dtype, device=z.device)
    frob = torch.zeros_like(div) if frobenius else None
    for i in range(f_flat.shape[1]):
        e = torch.zeros_like(f_flat)
        e[:, i] = 1
        row = _grad(f, z, e.view_as(f), create_graph).reshape(b, -1)  # row i of each Jacobian
        div = div + row[:, i]
        if frob is not None:
            frob = frob + row.pow(2).sum(1)
    return div, frob


def divergence_hutchinson(
    f: torch.Tensor, z: torch.Tensor, eps: torch.Tensor, *, create_graph: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's estimator ``eps^T (df/dz) eps`` of ``tr(df/dz)`` per sample.

    Unbiased when ``E[eps eps^T] = I`` (Gaussian or Rademacher ``eps``).

    Args:
        f, z: ``[B, *shape]`` (``z`` requires grad).
        eps: ``[B, *shape]``, the noise.
        create_graph: keep the graph of the result.

    Returns:
        ``(div [B], |eps^T df/dz|^2 [B])``; the second is the unbiased estimate of
        ``||df/dz||_F^2`` used by the Jacobian regulariser.

    Examples:
        >>> import torch
        >>> from neuralode.nn.cnf import divergence_hutchinson
        >>> z = torch.randn(3, 2, requires_grad=True)
        >>> divergence_hutchinson(2 * z, z, torch.ones(3, 2))  # df/dz = 2 I
        (tensor([4., 4., 4.]), tensor([8., 8., 8.]))
    """
    b = z.shape[0]
    e_j = _grad(f, z, eps, create_graph).reshape(b, -1)
    return (e_j * eps.reshape(b, -1)).sum(1), e_j.pow(2).sum(1)


def draw_noise(
    like: torch.Tensor, kind: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hutchinson noise with the shape, dtype and device of ``like``.

    Args:
        like: the tensor whose shape, dtype and device the noise takes (e.g. ``[B, *shape]``).
        kind: ``"gaussian"`` (standard normal) or ``"rademacher"`` (``+-1`` with probability
            1/2).
        generator: random generator (on ``like``'s device); ``None``: the global one.

    Returns:
        A new tensor shaped as ``like``.

    Raises:
        ValueError: for an unknown ``kind`` (listing :data:`NOISES`).

    Examples:
        >>> import torch
        >>> from neuralode.nn.cnf import draw_noise
        >>> eps = draw_noise(torch.zeros(2, 3), "rademacher")
        >>> eps.shape, eps.abs().unique()
        (torch.Size([2, 3]), tensor([1.]))
    """
    if kind == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ValueError(f"noise must be one of {list(NOISES)}, got {kind!r}")


class _Dynamics:
    """The joint vector field ``(z, ell, [kinetic], [jacobian]) -> derivatives`` of one solve.

    A fresh instance per solve holds that solve's noise, so a later forward call cannot change
    the noise an adjoint backward pass of an earlier call sees.
    """

    def __init__(
        self, field: Field, eps: torch.Tensor | None, kinetic: bool, jacobian: bool
    ) -> None:
        self.field = field
        self.eps = eps  # None: exact trace
        self.kinetic = kinetic
        self.jacobian = jacobian
        self.calls = 0

    def __call__(
        self, t: torch.Tensor, state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        self.calls += 1
        z = state[0]
        recording = torch.is_grad_enabled()
        with torch.enable_grad():
            # Without recording, always differentiate from a fresh leaf: a view made under
            # no_grad of a tensor that requires grad (the adjoint's saved outputs) claims
            # requires_grad but is cut off from the graph, so its gradient would be missing.
            if not recording or not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f = self.field(t, z)
            if self.eps is None:  # trace="exact"
                div, frob = divergence_exact(f, z, create_graph=recording, frobenius=self.jacobian)
            else:
                div, frob = divergence_hutchinson(f, z, self.eps, create_graph=recording)
            out = [f, -div.unsqueeze(1)]
            if self.kinetic:
                out.append(0.5 * f.reshape(f.shape[0], -1).pow(2).sum(1, keepdim=True))
            if self.jacobian and frob is not None:
                out.append(frob.unsqueeze(1))
        if not recording:
            out = [o.detach() for o in out]
        return tuple(out)


@dataclass
class CNFOutput:
    """What one CNF solve returns.

    Attributes:
        z: ``[B, *shape]``, the state at the output end (base side for ``reverse=False``, data
            side for ``reverse=True``).
        delta_logp: ``[B]``, ``log p(z_end) - log p(z_start)`` along each trajectory (nats).
        kinetic: ``[B]``, ``int 0.5 |f|^2 |dt|`` per sample, or ``None`` when not requested.
        jacobian: ``[B]``, ``int |eps^T df/dz|^2 |dt|`` per sample (exact ``||df/dz||_F^2`` with
            ``trace="exact"``), or ``None`` when not requested.
        solution: the :class:`neuralode.Solution` of the joint solve (``stats``, ``status``,
            and ``backward_stats`` after ``backward()`` for the adjoint and checkpoint).
        eps: the Hutchinson noise used (``[B, *shape]``), or ``None`` for the exact trace.

    Examples:
        >>> import torch
        >>> from neuralode.nn import CNF, ConcatSquashMLP
        >>> cnf = CNF(ConcatSquashMLP(dim=2, hidden=(8,)), trace="hutchinson", kinetic_weight=0.1)
        >>> out = cnf(torch.randn(4, 2))
        >>> out.z.shape, out.delta_logp.shape, out.kinetic.shape, out.jacobian, out.nfe > 0
        (torch.Size([4, 2]), torch.Size([4]), torch.Size([4]), None, True)
    """

    z: torch.Tensor
    delta_logp: torch.Tensor
    kinetic: torch.Tensor | None
    jacobian: torch.Tensor | None
    solution: Solution
    eps: torch.Tensor | None
    _dynamics: _Dynamics

    @property
    def nfe(self) -> int:
        """Vector-field evaluations of the forward solve."""
        return int(self.solution.stats.nfe)

    @property
    def backward_nfe(self) -> int | None:
        """Vector-field evaluations of the backward pass (``gradient="adjoint"`` or
        ``"checkpoint"``, after ``backward()``); ``None`` otherwise."""
        stats = self.solution.backward_stats
        return None if stats is None else int(stats.nfe)

    @property
    def calls(self) -> int:
        """Every call of the joint vector field so far: the forward solve (including the
        solver's input check), and the adjoint backward solve once it has run."""
        return self._dynamics.calls


class _LeadingRMS:
    """The RMS error norm over the first ``n`` components of the flat state only."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return rms_norm(x[..., : self.n], dims)


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class CNF(nn.Module):
    """A continuous normalizing flow layer around a vector field ``f(t, z)``.

    Args:
        field: ``f(t, z) -> dz/dt`` with ``z`` of shape ``[B, *shape]`` and ``t`` a 0-dim
            tensor; usually an ``nn.Module`` (:class:`ConcatSquashMLP`, :class:`PlanarField`).
            Row ``i`` of the output must depend on row ``i`` of ``z`` only.
        T: integration time (default 1.0), positive.
        train_T: learn ``T`` as ``softplus(raw)`` (positive; ``raw`` initialised so that
            ``T`` starts at the given value).  Its gradient reaches it through the solve's
            output time under every gradient strategy.
        trace: ``"exact"`` or ``"hutchinson"``.
        noise: Hutchinson noise, ``"gaussian"`` or ``"rademacher"``.
        kinetic_weight, jacobian_weight: weights of the regularisers of Finlay et al. 2020;
            a regulariser is integrated only when its weight is positive.  ``CNF.penalty``
            applies them.
        method, rtol, atol, step_size, gradient: passed to :func:`neuralode.solve`
            (FFJORD's toy defaults: ``dopri5`` at ``1e-5``).
        solve_options: further keyword arguments of :func:`neuralode.solve`
            (``adjoint_options``, ``max_num_steps``, ``adjoint_params``, ...).  The settings
            are kept as ``cnf.solver`` (:class:`~neuralode.nn.SolveSettings`).  By default the
            adjoint and checkpoint differentiate the field's trainable parameters (none for a
            plain function); ``T`` gets its gradient through the time grid.

    Shapes: inputs ``x`` / ``z`` are ``[B, *shape]`` (``[B, D]`` for the 2-D toys); per-sample
    outputs are ``[B]``.  ``T`` takes the dtype of the field's first parameter (the default
    dtype for a field without parameters).

    Raises:
        TypeError: if ``field`` is not callable.
        ValueError: for an unknown ``trace`` or ``noise``, a ``T`` that is not a positive
            finite number, a negative or non-finite regulariser weight, a ``solve_options`` key
            that CNF sets itself (``batched``, ``method``, ...), or settings that
            :class:`~neuralode.nn.SolveSettings` rejects.

    Examples:
        >>> import torch
        >>> from neuralode.nn import CNF, ConcatSquashMLP
        >>> cnf = CNF(ConcatSquashMLP(dim=2, hidden=(8,)))
        >>> logp, out = cnf.log_likelihood(torch.randn(4, 2))  # data -> base, log p(x)
        >>> logp.shape, out.z.shape
        (torch.Size([4]), torch.Size([4, 2]))
        >>> x, logq = cnf.sample_and_log_prob(3)  # base -> data
        >>> x.shape, logq.shape
        (torch.Size([3, 2]), torch.Size([3]))
    """

    def __init__(
        self,
        field: Field,
        *,
        T: float = 1.0,
        train_T: bool = False,
        trace: str = "exact",
        noise: str = "gaussian",
        kinetic_weight: float = 0.0,
        jacobian_weight: float = 0.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        step_size: float | None = None,
        gradient: str = "backprop",
        solve_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not callable(field):
            raise TypeError(f"field must be callable as field(t, z), got {type(field).__name__}")
        if trace not in TRACES:
            raise ValueError(f"trace must be one of {list(TRACES)}, got {trace!r}")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {list(NOISES)}, got {noise!r}")
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T must be a positive finite number, got {T!r}")
        for name, w in (("kinetic_weight", kinetic_weight), ("jacobian_weight", jacobian_weight)):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {w!r}")
        opts = dict(solve_options or {})
        clash = sorted(set(opts) & _RESERVED)
        if clash:
            raise ValueError(
                f"solve_options {clash} are set by CNF itself; pass method/rtol/atol/step_size/"
                f"gradient as CNF arguments"
            )
        self.solver = SolveSettings(method, rtol, atol, step_size, gradient, opts)
        self.field = field  # registered as a submodule when it is an nn.Module
        self.trace = trace
        self.noise = noise
        self.kinetic_weight = float(kinetic_weight)
        self.jacobian_weight = float(jacobian_weight)
        # T takes the field's dtype (float64 fields get a float64 T; ``cnf.double()`` also works).
        ref = next(iter(field.parameters()), None) if isinstance(field, nn.Module) else None
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        raw = torch.tensor(_inverse_softplus(float(T)) if train_T else float(T), dtype=dtype)
        if train_T:
            self.raw_T = nn.Parameter(raw)
        else:
            self.register_buffer("raw_T", raw)
        self.train_T = train_T

    @property
    def T(self) -> torch.Tensor:
        """The integration time, a positive 0-dim tensor (differentiable when learned).

        Returns:
            ``softplus(raw_T)`` with ``train_T``, else the fixed value.
        """
        return nn.functional.softplus(self.raw_T) if self.train_T else self.raw_T

    def extra_repr(self) -> str:
        return (
            f"T={float(self.T):.4g}, train_T={self.train_T}, trace={self.trace!r}, "
            f"noise={self.noise!r}, {self.solver!r}, kinetic_weight={self.kinetic_weight}, "
            f"jacobian_weight={self.jacobian_weight}"
        )

    def _adjoint_params(self) -> tuple[torch.Tensor, ...]:
        if isinstance(self.field, nn.Module):
            return tuple(p for p in self.field.parameters() if p.requires_grad)
        return ()

    def forward(
        self,
        x: torch.Tensor,
        *,
        reverse: bool = False,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CNFOutput:
        """Integrate the joint state from one end of ``[0, T]`` to the other.

        Args:
            x: ``[B, *shape]``: data (``reverse=False``, integrated ``0 -> T``) or base
                samples (``reverse=True``, integrated ``T -> 0``).
            reverse: integrate base -> data.
            eps: Hutchinson noise ``[B, *shape]`` to use instead of a fresh draw.
            generator: random generator for the fresh draw.

        Returns:
            A :class:`CNFOutput`; see the module docstring for the sign of ``delta_logp``.

        Raises:
            ValueError: if ``x`` is not a floating tensor with a batch dimension, if ``eps``
                does not have ``x``'s shape, or if ``eps`` is given with ``trace="exact"``.
            TypeError: for an input :func:`neuralode.solve` rejects (e.g. an unknown key of
                ``solve_options``).
            neuralode.SolverError: if the solve fails (too many steps, step size underflow,
                non-finite values), unless ``solve_options={"throw": False}``.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
            raise ValueError(
                f"x must be a floating tensor [batch, *shape], got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if self.trace == "hutchinson":
            if eps is None:
                eps = draw_noise(x, self.noise, generator)
            elif eps.shape != x.shape:
                raise ValueError(
                    f"eps has shape {tuple(eps.shape)} but x has {tuple(x.shape)}; they must match"
                )
            eps = eps.to(dtype=x.dtype, device=x.device)
        elif eps is not None:
            raise ValueError("eps applies to trace='hutchinson' only")
        kinetic, jacobian = self.kinetic_weight > 0, self.jacobian_weight > 0
        dyn = _Dynamics(self.field, eps, kinetic, jacobian)
        b = x.shape[0]
        zero = x.new_zeros(b, 1)
        y0 = (x, zero) + (zero,) * (int(kinetic) + int(jacobian))
        T = self.T.to(x.device)
        ends = (torch.zeros_like(T), T)
        t = torch.stack(ends[::-1] if reverse else ends)
        opts = self.solver.kwargs()
        if self.solver.gradient in ("adjoint", "checkpoint") and "adjoint_params" not in opts:
            opts["adjoint_params"] = self._adjoint_params()
        if len(y0) > 2 and "norm" not in opts:
            # The regularisers' integrals do not feed back into the dynamics: like FFJORD's and
            # RNODE's code (tolerance 1e20 on them), leave them out of the step-size control,
            # so a regularised solve takes the steps an unregularised one of the same field
            # would.  The flat state holds z and ell first (tuple order).
            opts["norm"] = _LeadingRMS(x.numel() + b)
        sol = solve(dyn, y0, t, **opts)
        ends_y = [y[-1] for y in sol.ys]
        z, ell = ends_y[0], ends_y[1].squeeze(1)
        extra = ends_y[2:]
        # Integrals over |dt|: the reverse solve runs backwards in time, so flip its sign.
        sign = -1.0 if reverse else 1.0
        kin = sign * extra.pop(0).squeeze(1) if kinetic else None
        jac = sign * extra.pop(0).squeeze(1) if jacobian else None
        return CNFOutput(z, ell, kin, jac, sol, eps, dyn)

    def log_likelihood(
        self,
        x: torch.Tensor,
        *,
        eps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, CNFOutput]:
        """Per-sample ``log p(x)`` in nats under the flow with base ``N(0, I)``.

        Args:
            x: ``[B, *shape]`` data.
            eps, generator: the Hutchinson noise, as :meth:`forward`.

        Returns:
            ``(logp [B], output)``: ``logp = log N(z(T)) - delta_logp``; ``output.nfe`` is the
            solve's evaluation count (``output.backward_nfe`` after ``backward()`` under the
            adjoint or checkpoint).  With ``trace="hutchinson"`` ``logp`` is an unbiased
            estimate.

        Raises:
            ValueError: as :meth:`forward`.

        Examples:
            >>> import torch
            >>> from neuralode.nn import CNF
            >>> cnf = CNF(lambda t, z: -z)  # contracts: div f = -2 in 2-D
            >>> logp, out = cnf.log_likelihood(torch.zeros(1, 2))
            >>> round(out.delta_logp.item(), 4), round(logp.item(), 4)  # log N(0) - 2
            (2.0, -3.8379)
        """
        out = self(x, eps=eps, generator=generator)
        return standard_normal_log_prob(out.z) - out.delta_logp, out

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample, data -> base; see :meth:`log_likelihood`.

        Args:
            x: ``[B, *shape]`` data.

        Returns:
            ``[B]``, nats: exact with ``trace="exact"``; with ``trace="hutchinson"`` an unbiased
            estimate that differs from call to call (new noise each solve; score with
            :meth:`exact_view` for exact values).
        """
        return self.log_likelihood(x)[0]

    def sample_and_log_prob(
        self,
        n: int,
        *,
        shape: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        z: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples base -> data with their log-density under the flow.

        Differentiable (reparameterised), so ``mean(log q(x) - log p_target(x))`` trains the
        flow by reverse KL (Chen et al. 2018, Figure 4).  Call ``cnf(z, reverse=True)`` for the
        full :class:`CNFOutput` (NFE, regularisers).

        Args:
            n: number of samples.
            shape: event shape (default: inferred from ``z`` or the field's ``dim`` attribute).
            generator: random generator for the base samples (and the Hutchinson noise).
            z: ``[n, *shape]`` base samples to push instead of a fresh draw.

        Returns:
            ``(x [n, *shape], log q(x) [n])``; a fresh ``z`` takes ``T``'s dtype and device.

        Raises:
            ValueError: if neither ``shape`` nor ``z`` is given and the field has no integer
                ``dim`` attribute; otherwise as :meth:`forward`.
        """
        if z is None:
            event = tuple(shape) if shape is not None else (self._dim(),)
            ref = self.raw_T
            z = torch.randn((n, *event), dtype=ref.dtype, device=ref.device, generator=generator)
        out = self(z, reverse=True, generator=generator)
        return out.z, standard_normal_log_prob(z) + out.delta_logp

    def _dim(self) -> int:
        dim = getattr(self.field, "dim", None)
        if not isinstance(dim, int):
            raise ValueError("pass shape=(D,) (or z): the field has no integer 'dim' attribute")
        return dim

    def exact_view(self) -> CNF:
        """A CNF that shares this one's field and (current) ``T`` but uses the exact trace, no
        regularisers and plain backprop: the model to evaluate ``log p(x)`` with, whatever
        estimator trained it (it has no parameters of its own).

        Returns:
            A new :class:`CNF` with this one's method, tolerances, step size and
            ``solve_options``, on the device of ``T``.
        """
        return CNF(
            self.field,
            T=float(self.T.detach()),
            trace="exact",
            method=self.solver.method,
            rtol=self.solver.rtol,
            atol=self.solver.atol,
            step_size=self.solver.step_size,
            gradient="backprop",
            solve_options=self.solver.options,
        ).to(self.raw_T.device)

    def trajectory(self, z: torch.Tensor, frames: int) -> tuple[list[torch.Tensor], list[str]]:
        """Base samples ``z`` carried to data, for plotting the flow.

        One solve of the field alone (no log-density), with this CNF's solver settings, from
        ``t = T`` to ``0``.  Call under ``torch.no_grad()`` unless gradients are wanted.

        Args:
            z: ``[n, D]`` base samples.
            frames: number of evenly spaced times, at least 2.

        Returns:
            ``(states, labels)``: ``frames`` tensors ``[n, D]`` (the first is ``z``, the last
            the data-side samples) and a label per state (``"t = 0.5"``).

        Raises:
            ValueError: if ``frames < 2``.

        Examples:
            >>> import torch
            >>> from neuralode.nn import CNF
            >>> states, labels = CNF(lambda t, z: -z).trajectory(torch.randn(5, 2), frames=3)
            >>> len(states), states[-1].shape, labels
            (3, torch.Size([5, 2]), ['t = 1', 't = 0.5', 't = 0'])
        """
        if frames < 2:
            raise ValueError(f"frames must be at least 2, got {frames}")
        t = torch.linspace(float(self.T.detach()), 0.0, frames, dtype=z.dtype, device=z.device)
        settings = self.solver.kwargs()
        settings.pop("gradient")
        sol = solve(self.field, z, t, **settings)
        return list(sol.ys), [f"t = {float(s):.3g}" for s in t]

    def penalty(self, out: CNFOutput) -> torch.Tensor:
        """The regularisation term to add to the loss.

        Args:
            out: a :class:`CNFOutput` of this CNF.

        Returns:
            ``kinetic_weight * mean(kinetic) + jacobian_weight * mean(jacobian)``, 0-dim (0
            when ``out`` carries neither).
        """
        total = out.delta_logp.new_zeros(())
        if out.kinetic is not None:
            total = total + self.kinetic_weight * out.kinetic.mean()
        if out.jacobian is not None:
            total = total + self.jacobian_weight * out.jacobian.mean()
        return total


# ----------------------------------------------------------------------------- vector fields


def _time_column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (0-dim or ``[B]``) as a ``[1, 1]`` or ``[B, 1]`` column in ``like``'s dtype."""
    return t.to(like.dtype).reshape(-1, 1)


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-conditioned linear layer (Grathwohl et al. 2019, code ``diffeq_layers``)::

        y = (W x + b) * sigmoid(G t + g) + h t          (the hyper-bias ``h t`` has no bias)

    Args:
        dim_in, dim_out: feature sizes.

    Shapes: ``t`` 0-dim (or ``[B]``), ``x`` ``[B, dim_in]`` -> ``[B, dim_out]``.

    Examples:
        >>> import torch
        >>> from neuralode.nn import ConcatSquashLinear
        >>> layer = ConcatSquashLinear(2, 8)
        >>> layer(torch.tensor(0.5), torch.zeros(3, 2)).shape
        torch.Size([3, 8])
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer.

        Args:
            t: the time, a 0-dim tensor (or ``[B]``, one per row).
            x: ``[B, dim_in]``.

        Returns:
            ``[B, dim_out]``, in ``x``'s dtype.
        """
        tt = _time_column(t, x)
        out: torch.Tensor = self.layer(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)
        return out


class ConcatSquashMLP(nn.Module):
    """FFJORD's toy vector field: ConcatSquash layers ``dim -> hidden... -> dim`` with an
    activation between them (FFJORD's toy default: ``64-64-64`` with ``tanh``).

    Args:
        dim: data dimension ``D``.
        hidden: hidden sizes.
        activation: a name of :data:`neuralode.nn.activations.ACTIVATIONS` (``"tanh"``,
            ``"softplus"``, ``"elu"``, ``"relu"``).

    Shapes: ``t`` 0-dim, ``z`` ``[B, D]`` -> ``[B, D]``.

    Raises:
        ValueError: for an unknown ``activation`` (listing the known ones).

    Examples:
        >>> import torch
        >>> from neuralode.nn import ConcatSquashMLP
        >>> field = ConcatSquashMLP(dim=2, hidden=(16, 16))
        >>> field(torch.tensor(0.5), torch.zeros(3, 2)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self, dim: int = 2, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh"
    ) -> None:
        super().__init__()
        act = make_activation(activation)  # unknown names fail here, listing the known ones
        sizes = [dim, *hidden, dim]
        self.dim = dim
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = act

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``dz/dt``.

        Args:
            t: the time, a 0-dim tensor (or ``[B]``).
            z: ``[B, D]``.

        Returns:
            ``[B, D]``.
        """
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class PlanarField(nn.Module):
    """The planar CNF of Chen et al. 2018 (Section 4, Eq. 10)::

        dz/dt = sum_{m=1..M} u_m(t) tanh(w_m(t)^T z + b_m(t)),

    with ``W, B, U`` produced by a small hypernetwork of ``t`` (``1 -> hidden -> hidden ->
    3 M D + M``, tanh) and ``U`` gated by ``sigmoid(G(t))``, as in torchdiffeq's
    ``examples/cnf.py`` (which averages over ``m``; we sum, as the paper writes it: the
    difference is a factor ``M`` that the hypernetwork absorbs).

    Args:
        dim: data dimension ``D``.
        width: number of units ``M``.
        hidden: hypernetwork width.

    Shapes: ``t`` 0-dim, ``z`` ``[B, D]`` -> ``[B, D]``.

    Examples:
        >>> import torch
        >>> from neuralode.nn import CNF, PlanarField
        >>> field = PlanarField(dim=2, width=4, hidden=8)
        >>> field(torch.tensor(0.5), torch.zeros(3, 2)).shape
        torch.Size([3, 2])
        >>> CNF(field).log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, dim: int = 2, width: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.dim, self.width = dim, width
        self.hyper = nn.Sequential(
            nn.Linear(1, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, 3 * width * dim + width),
        )

    def params(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The planar units' parameters at time ``t``.

        Args:
            t: the time, 0-dim.
            dtype: the dtype of the returned tensors (the hypernetwork's input takes it).

        Returns:
            ``(W [M, D], b [M], U [M, D])``; ``U`` already gated.
        """
        p = self.hyper(t.to(dtype).reshape(1, 1)).reshape(-1)
        md = self.width * self.dim
        w = p[:md].view(self.width, self.dim)
        u = p[md : 2 * md].view(self.width, self.dim)
        gate = torch.sigmoid(p[2 * md : 3 * md].view(self.width, self.dim))
        b = p[3 * md :]
        return w, b, u * gate

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``dz/dt = tanh(z W^T + b) U``.

        Args:
            t: the time, a 0-dim tensor (one for the batch).
            z: ``[B, D]``.

        Returns:
            ``[B, D]``, in ``z``'s dtype.

        Raises:
            ValueError: if ``t`` is not 0-dim (a batched solve's per-sample times).
        """
        if t.ndim != 0:
            raise ValueError(f"PlanarField needs a 0-dim t (an unbatched solve), got {t.shape}")
        w, b, u = self.params(t, z.dtype)
        return torch.tanh(z @ w.T + b) @ u
