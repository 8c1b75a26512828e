"""The continuous adjoint sensitivity method (Chen et al. 2018, Section 2, Algorithm 1).

The forward solve keeps no autograd graph.  The backward pass integrates the augmented system

    dy/ds = f(s, y),    da/ds = -a^T df/dy,    dg/ds = -a^T df/dtheta

backwards from the last output time, one output interval at a time; at each output time the
incoming gradient is added to the adjoint ``a`` (a jump) and the state is reset to the stored
forward output.  Memory is independent of the number of solver steps.

Each interval ``[s_{i-1}, s_i]`` is integrated in its own normalised time ``tau`` in ``[0, 1]``
(``s = s_{i-1} + tau (s_i - s_{i-1})``), so that per-sample time grids (every row with its own
interval) share one backward solve and the parameter gradient stays one tensor per parameter:
each row's vector-Jacobian product is weighted by its own interval length.

Gradients for the times: ``dL/ds_i = <dL/dy_i, f(s_i, y_i)>`` for ``i >= 1`` and
``dL/ds_0 = -<a(s_0), f(s_0, y_0)>``.

The backward solve's default error norm is the seminorm of Kidger, Chen & Lyons (2021, "Hey,
that's not an ODE"): it leaves the parameter-gradient channels out of the step-size control,
because they do not feed back into the dynamics, so their error need not control the step.  On the
diffrax benchmark's shape (MLP 4-32-4, batch 64, t in [0, 100], dopri5 at 1e-6) the full norm
costs 1448 backward evaluations and the seminorm 206 (torchdiffeq's default: 1316; torchdyn: 238).
``adjoint_options={"norm": "rms"}`` restores the full (mixed RMS) norm, torchdiffeq's default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._inputs import all_finite
from ..controllers import NORMS, rms_norm
from ..solution import Stats

__all__ = ["AdjointConfig", "ADJOINT_OPTIONS", "find_adjoint_params", "adjoint_apply"]

#: Keys of ``adjoint_options``.
ADJOINT_OPTIONS = (
    "norm",
    "step_size",
    "first_step",
    "max_num_steps",
    "dtype",
    "safety",
    "beta",
    "ifactor",
    "dfactor",
)


@dataclass
class AdjointConfig:
    """How the backward (augmented) system is solved."""

    method: str
    rtol: float | torch.Tensor
    atol: float | torch.Tensor
    norm: str = "seminorm"
    solve_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        method: str,
        rtol: Any,
        atol: Any,
        adjoint_method: str | None,
        adjoint_rtol: Any,
        adjoint_atol: Any,
        adjoint_options: dict[str, Any] | None,
        step_size: float | None = None,
    ) -> AdjointConfig:
        opts = dict(adjoint_options or {})
        if step_size is not None and "step_size" not in opts and adjoint_method in (None, method):
            opts["step_size"] = step_size  # a fixed-step backward pass steps like the forward
        unknown = sorted(set(opts) - set(ADJOINT_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown adjoint option(s) {unknown}; known adjoint options are "
                f"{list(ADJOINT_OPTIONS)}"
            )
        norm = opts.pop("norm", "seminorm")
        if norm not in (*NORMS, "seminorm"):
            raise ValueError(
                f"adjoint_options['norm'] must be one of {[*NORMS, 'seminorm']}, got {norm!r}"
            )
        if "dtype" in opts:
            opts["t_dtype"] = opts.pop("dtype")
        if not isinstance(rtol, (int, float)) and adjoint_rtol is None:
            adjoint_rtol = float(torch.as_tensor(rtol).min())  # per-component: use the tightest
        if not isinstance(atol, (int, float)) and adjoint_atol is None:
            adjoint_atol = float(torch.as_tensor(atol).min())
        return cls(
            method=adjoint_method or method,
            rtol=rtol if adjoint_rtol is None else adjoint_rtol,
            atol=atol if adjoint_atol is None else adjoint_atol,
            norm=norm,
            solve_kwargs=opts,
        )


def find_adjoint_params(
    func: Any, adjoint_params: Sequence[torch.Tensor] | None
) -> tuple[torch.Tensor, ...]:
    """The tensors the backward pass differentiates: ``adjoint_params`` if given, else the
    trainable parameters of an ``nn.Module`` func."""
    if adjoint_params is None:
        if not isinstance(func, torch.nn.Module):
            raise TypeError(
                "gradient='adjoint' needs to know the parameters of func: func is not an "
                "nn.Module, so pass adjoint_params=(tensors func uses), or () if it has none"
            )
        return tuple(p for p in func.parameters() if p.requires_grad)
    params = tuple(adjoint_params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"adjoint_params[{i}] must be a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(
                f"adjoint_params[{i}] (shape {tuple(p.shape)}) does not require grad: its "
                f"gradient would silently be zero; set requires_grad or leave it out"
            )
    return params


def _names(func: Any, params: Sequence[torch.Tensor]) -> list[str]:
    named = {}
    if isinstance(func, torch.nn.Module):
        named = {id(p): n for n, p in func.named_parameters()}
    return [named.get(id(p), f"adjoint_params[{i}]") for i, p in enumerate(params)]


class _Adjoint(torch.autograd.Function):
    """Inputs: (context, y0, s, *params) -> ys.  ``context`` carries the forward runner and the
    backward configuration (non-tensor)."""

    @staticmethod
    def forward(
        ctx: Any, context: _Context, y0: torch.Tensor, s: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ys = context.run_forward(y0, s.detach())
        ctx.context = context
        ctx.save_for_backward(ys, s, *params)
        return ys

    @staticmethod
    def backward(ctx: Any, grad_ys: torch.Tensor) -> tuple[Any, ...]:
        ys, s, *params = ctx.saved_tensors
        context: _Context = ctx.context
        with torch.no_grad():
            # ys is this Function's own output and still claims requires_grad; detach it so that a
            # field differentiating inside itself (a CNF's trace) never sees a graph-less view
            # that pretends to be differentiable.
            grad_y0, grad_s, grad_params = context.backward(
                ys.detach(), s.detach(), tuple(params), grad_ys, ctx.needs_input_grad[2]
            )
        return (None, grad_y0, grad_s, *grad_params)


@dataclass
class _Context:
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # internal vector field
    user_func: Any
    batched: bool
    config: AdjointConfig
    run_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    stats: dict[str, Stats] = field(default_factory=dict)

    def _out(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x[:, i] if self.batched else x[i]

    def _rows(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view((-1,) + (1,) * (like.ndim - 1)) if self.batched else v

    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-row inner product (a scalar unbatched)."""
        p = a * b
        return p.reshape(p.shape[0], -1).sum(1) if self.batched else p.sum()

    def backward(
        self,
        ys: torch.Tensor,
        s: torch.Tensor,
        params: tuple[torch.Tensor, ...],
        grad_ys: torch.Tensor,
        want_s: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
        from ..solution import SolverError
        from ..solve import solve  # the backward system is solved by the same public solve

        if not all_finite(ys):
            raise SolverError(
                "gradient='adjoint': the forward solve failed (see Solution.status), so there "
                "is no gradient to compute; fix the forward solve first"
            )
        cfg, func, dtype = self.config, self.func, ys.dtype
        T = s.shape[-1]
        a = torch.zeros_like(self._out(ys, 0))  # adjoint of the state, dL/dy(s)
        g = [torch.zeros_like(p) for p in params]
        names = _names(self.user_func, params)
        used = [False] * len(params)
        totals = [torch.zeros((), dtype=torch.long) for _ in range(4)]
        grad_s = torch.zeros_like(s) if want_s else None
        for i in range(T - 1, 0, -1):
            a = a + self._out(grad_ys, i)  # the jump at output time s_i
            if grad_s is not None:
                f_i = func(self._out(s, i).to(dtype), self._out(ys, i))
                grad_s[..., i] = self._dot(self._out(grad_ys, i), f_i).to(s.dtype)
                totals[0] = totals[0] + 1
            s_lo = self._out(s, i - 1)
            length = self._out(s, i) - s_lo
            len_y = self._rows(length.to(dtype), a)

            def aug(
                tau: torch.Tensor,
                state: tuple[torch.Tensor, ...],
                s_lo: torch.Tensor = s_lo,
                length: torch.Tensor = length,
                len_y: torch.Tensor = len_y,
            ) -> tuple[torch.Tensor, ...]:
                y, adj = state[0], state[1]
                s_now = (s_lo + tau.to(s_lo.dtype) * length).to(dtype)
                with torch.enable_grad():
                    y_ = y.detach().requires_grad_(True)
                    fy = func(s_now, y_)
                    vjps = torch.autograd.grad(fy, (y_, *params), -adj * len_y, allow_unused=True)
                dg = []
                for k, v in enumerate(vjps[1:]):
                    if v is None:
                        v = torch.zeros_like(params[k])
                    else:
                        used[k] = True
                    dg.append(v)
                dy = fy.detach() * len_y
                da = vjps[0] if vjps[0] is not None else torch.zeros_like(adj)
                return (dy, da, *dg)

            y_start = self._out(ys, i)
            kwargs = dict(cfg.solve_kwargs)
            if kwargs.get("step_size") is not None:  # time units -> this interval's tau units
                kwargs["step_size"] = min(1.0, float(kwargs["step_size"]) / float(length.max()))
            tau = torch.tensor([1.0, 0.0], dtype=torch.float64, device=ys.device)
            try:
                sol = solve(
                    aug,
                    (y_start, a, *g),
                    tau,
                    method=cfg.method,
                    rtol=cfg.rtol,
                    atol=cfg.atol,
                    batched=False,
                    norm=_mixed_norm(cfg.norm, y_start.numel(), a.numel(), params),
                    **kwargs,
                )
            except SolverError as err:
                raise SolverError(
                    f"gradient='adjoint': the backward solve failed on the output interval "
                    f"between output times {i - 1} and {i}: {err.args[0]} (for the backward "
                    f"solve, use adjoint_options={{'max_num_steps': N}}, adjoint_rtol and "
                    f"adjoint_atol)"
                ) from err
            out = sol.ys
            a = out[1][-1]
            g = [x[-1] for x in out[2:]]
            for k, name in enumerate(("nfe", "n_steps", "n_accepted", "n_rejected")):
                totals[k] = totals[k] + getattr(sol.stats, name).cpu()
        if T > 1 and not all(used):
            unused = [n for n, u in zip(names, used) if not u]
            raise ValueError(
                f"gradient='adjoint': func's output did not depend on {unused} anywhere in the "
                f"solve; their gradients would silently be zero. Remove them from adjoint_params "
                f"(or freeze them with requires_grad_(False))"
            )
        if grad_s is not None and T > 1:
            f_0 = func(self._out(s, 0).to(dtype), self._out(ys, 0))
            grad_s[..., 0] = -self._dot(a, f_0).to(s.dtype)
            totals[0] = totals[0] + 1
        grad_y0 = a + self._out(grad_ys, 0)
        self.stats["backward"] = Stats(*totals)
        return grad_y0, grad_s, list(g)


def _mixed_norm(kind: str, n_y: int, n_a: int, params: Sequence[torch.Tensor]) -> Any:
    """The backward solve's error norm over its flat state ``[y, a, g_1, g_2, ...]``.

    ``"rms"``: the largest RMS of the parts (torchdiffeq's mixed norm for tuple states);
    ``"seminorm"``: the same over ``y`` and ``a`` only, so it is never larger than the full norm
    (Kidger et al. 2021); ``"max"``: the largest absolute value over everything.
    """
    if kind == "max":
        return "max"
    bounds = [0, n_y, n_y + n_a]
    if kind == "rms":
        for p in params:
            bounds.append(bounds[-1] + p.numel())
    pieces = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]

    def norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([rms_norm(x[..., lo:hi], dims) for lo, hi in pieces]).amax(0)

    return norm


def adjoint_apply(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    user_func: Any,
    y0: torch.Tensor,
    s: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    batched: bool,
    config: AdjointConfig,
    run_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, Stats]]:
    """Run the forward solve through the adjoint autograd function; returns ``ys`` and a dict
    that receives the backward pass's :class:`Stats` under ``"backward"``."""
    context = _Context(func, user_func, batched, config, run_forward)
    ys = _Adjoint.apply(context, y0, s, *params)
    return ys, context.stats
