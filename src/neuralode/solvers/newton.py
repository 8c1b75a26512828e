"""Jacobians of the vector field, per sample, for the stiff solvers.

:func:`jacobian` returns ``f(t, y)``, ``df/dy`` and ``df/dt`` at once: one forward evaluation of
``f`` and ``N`` vector-Jacobian products (``N`` the state's size per sample), vectorised with
``torch.func.vmap`` over the rows of the identity.  A batched solve's rows are independent
problems, so one product with a basis vector repeated over the batch gives that row of every
sample's Jacobian at once: the cost does not grow with the batch.

A vector field that ``torch.func`` cannot transform (a ``.item()``, an in-place update of a
captured tensor, an ``autograd.Function`` without a vmap rule) falls back to ``N`` calls of
``torch.autograd.grad``, with the same results; the fallback is remembered for that field.  A
field that sets ``no_torch_func = True`` goes there directly (the adjoint's augmented field,
which calls ``torch.autograd.grad`` itself; taken densely, its Jacobian costs ``2 N + P``
second-order vector-Jacobian products, ``P`` the number of parameters, which is why the stiff
steps ask it for its block form instead: ``jacobian(..., structured=True)``).

The Jacobian is differentiable when gradients are enabled (backprop and checkpoint through a
Rosenbrock step differentiate the matrix ``I - h gamma J`` as well, so the gradient is the exact
one of the computed solution); under ``torch.no_grad`` it is a plain tensor.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, NamedTuple

import torch

from .base import Func

__all__ = ["Linearisation", "JacobianField", "jacobian", "inf_norm", "lu_factor"]

#: Fields that ``torch.func`` failed on (then differentiated with ``torch.autograd.grad``).
_AUTOGRAD_ONLY: weakref.WeakSet[Any] = weakref.WeakSet()
#: A batch of CPU matrices from this size is factored one matrix at a time (see lu_factor).
LU_ONE_BY_ONE = 128


class Linearisation(NamedTuple):
    """The field and its derivatives at one point.

    Attributes:
        f0: ``f(t, y)``, shaped like ``y``.
        J: ``df/dy``: ``[batch, N, N]`` batched, ``[N, N]`` unbatched (``N`` = features per
            sample, flattened; ``J[..., i, j] = d f_i / d y_j``); from
            ``jacobian(..., structured=True)`` it may instead be a field's own operator with
            ``factored(hg).solve(rhs)`` and ``inf_norm()`` (the adjoint's block form).
        ft: ``df/dt``, shaped like ``y``.
    """

    f0: torch.Tensor
    J: torch.Tensor
    ft: torch.Tensor


class JacobianField:
    """A vector field with its Jacobian given (``solve(..., jac=...)``), in the loop's terms.

    ``jac(t, y)`` returns ``df/dy`` (``[N, N]`` unbatched, ``[batch, N, N]`` batched), or a pair
    ``(df/dy, df/dt)`` with ``df/dt`` shaped like ``y``; without ``df/dt`` it is taken by one
    forward-mode product in ``t`` (``torch.func.jvp``), which gives ``f(t, y)`` as well.
    """

    def __init__(self, f: Func, jac: Any) -> None:
        self.f, self.jac = f, jac

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f(t, y)


def jacobian(f: Func, t: torch.Tensor, y: torch.Tensor, structured: bool = False) -> Linearisation:
    """``f(t, y)`` with its Jacobian in ``y`` and its derivative in ``t``, per sample.

    With ``structured`` (the Rosenbrock and ESDIRK steps, whose only use of the Jacobian is to
    solve systems ``I - h gamma J``), an unbatched field that knows the structure of
    its own Jacobian (a ``linearise(t, y)`` method returning a :class:`Linearisation` or
    ``None``: the adjoint's augmented field, whose Jacobian is block lower-triangular) gives its
    own, without gradients (under ``torch.no_grad``); its ``J`` is then an object with
    ``factored(hg)`` and ``inf_norm()`` rather than a matrix.

    Args:
        f: the vector field; batched, row ``b`` of ``f(t, y)`` may depend on row ``b`` of ``y``
            and ``t`` only (the rows are independent problems).
        t: the time in ``y``'s dtype: ``[]`` unbatched, ``[batch]`` batched (a 0-dim ``t`` with
            a batched ``y`` is not allowed: the rows' time derivatives would be summed).
        y: the state, ``[*state]`` unbatched or ``[batch, *features]`` batched (``t.ndim == 1``).

    Returns:
        The point's :class:`Linearisation`.
    """
    batched = t.ndim == 1
    if isinstance(f, JacobianField):
        return _by_user(f, t, y, batched)
    own = getattr(f, "linearise", None)
    if structured and own is not None and not batched and not torch.is_grad_enabled():
        lin = own(t, y)
        if isinstance(lin, Linearisation):
            return lin
    if f not in _AUTOGRAD_ONLY and not getattr(f, "no_torch_func", False):
        try:
            return _by_func(f, t, y, batched)
        except Exception:  # noqa: BLE001 - torch.func cannot transform this field
            try:
                _AUTOGRAD_ONLY.add(f)
            except TypeError:  # not weak-referenceable: try again next time
                pass
    return _by_autograd(f, t, y, batched)


def inf_norm(J: Any) -> torch.Tensor:
    """``||J||_inf`` per row (the largest absolute row sum), or a structured Jacobian's own
    estimate of it (see :func:`jacobian`)."""
    if isinstance(J, torch.Tensor):
        return J.abs().sum(-1).amax(-1)
    result: torch.Tensor = J.inf_norm()
    return result


def _sizes(y: torch.Tensor, batched: bool) -> tuple[int, int]:
    if batched:
        return y.shape[0], y[0].numel()
    return 1, y.numel()


def _by_func(f: Func, t: torch.Tensor, y: torch.Tensor, batched: bool) -> Linearisation:
    B, N = _sizes(y, batched)

    def flat(tt: torch.Tensor, yy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = f(tt, yy)
        summed = out.reshape(B, N).sum(0) if batched else out.reshape(N)
        return summed, out

    _, vjp, f0 = torch.func.vjp(flat, t, y, has_aux=True)  # type: ignore[misc]
    eye = torch.eye(N, dtype=y.dtype, device=y.device)
    dt, dy = torch.func.vmap(vjp)(eye)  # [N, *t.shape], [N, *y.shape]
    return _laid_out(f0, dy, dt, y, batched)


def _by_user(f: JacobianField, t: torch.Tensor, y: torch.Tensor, batched: bool) -> Linearisation:
    B, N = _sizes(y, batched)
    out = f.jac(t, y)
    J, ft = out if isinstance(out, tuple) else (out, None)
    shape = (B, N, N) if batched else (N, N)
    if not isinstance(J, torch.Tensor) or tuple(J.shape) != shape:
        got = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
        layout = "[batch, N, N]" if batched else "[N, N]"
        raise ValueError(
            f"jac(t, y) must return df/dy of shape {list(shape)} ({layout} with N = {N} state "
            f"components per sample), or a pair (df/dy, df/dt); got {got}"
        )
    if ft is None:
        f0, ft = _time_derivative(f.f, t, y)
    else:
        if not isinstance(ft, torch.Tensor) or ft.shape != y.shape:
            got = tuple(ft.shape) if isinstance(ft, torch.Tensor) else type(ft).__name__
            raise ValueError(
                f"jac(t, y)'s df/dt must have the state's shape {list(y.shape)}, got {got}"
            )
        f0 = f.f(t, y)
    return Linearisation(f0, J.to(y.dtype), ft.to(y.dtype))


def _time_derivative(
    f: Func, t: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(t, y)`` and ``df/dt`` (shaped like ``y``): one forward-mode product, or, for a field
    that ``torch.func`` cannot transform, two reverse-mode ones (the double-backward trick)."""
    if f not in _AUTOGRAD_ONLY:
        try:
            with warnings.catch_warnings():  # torch 2.13's forward mode warns about itself
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated")
                f0, ft = torch.func.jvp(  # type: ignore[misc]
                    lambda tt: f(tt, y), (t,), (torch.ones_like(t),)
                )
            return f0, ft
        except Exception:  # noqa: BLE001 - torch.func cannot transform this field
            try:
                _AUTOGRAD_ONLY.add(f)
            except TypeError:  # not weak-referenceable: try again next time
                pass
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        tt = t if t.requires_grad else t.detach().requires_grad_()
        f0 = f(tt, y)
        g = None
        if f0.requires_grad:
            u = torch.zeros_like(f0, requires_grad=True)
            (g,) = torch.autograd.grad(f0, tt, u, create_graph=True, allow_unused=True)
        if g is None:  # f does not depend on t
            ft = torch.zeros_like(f0)
        else:
            (ft,) = torch.autograd.grad(g, u, torch.ones_like(g), create_graph=create)
    return (f0, ft) if create else (f0.detach(), ft.detach())


def _by_autograd(f: Func, t: torch.Tensor, y: torch.Tensor, batched: bool) -> Linearisation:
    B, N = _sizes(y, batched)
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        tt = t if t.requires_grad else t.detach().requires_grad_()
        yy = y if y.requires_grad else y.detach().requires_grad_()
        f0 = f(tt, yy)
        summed = f0.reshape(B, N).sum(0) if batched else f0.reshape(N)
        rows_y, rows_t = [], []
        for i in range(N):
            gt, gy = torch.autograd.grad(
                summed[i], (tt, yy), retain_graph=True, create_graph=create, allow_unused=True
            )
            rows_y.append(torch.zeros_like(yy) if gy is None else gy)
            rows_t.append(torch.zeros_like(tt) if gt is None else gt)
    dy, dt = torch.stack(rows_y), torch.stack(rows_t)
    if not create:
        f0, dy, dt = f0.detach(), dy.detach(), dt.detach()
    return _laid_out(f0, dy, dt, y, batched)


def _laid_out(
    f0: torch.Tensor, dy: torch.Tensor, dt: torch.Tensor, y: torch.Tensor, batched: bool
) -> Linearisation:
    """The linearisation from the ``N`` gradients of the output's components: ``dy`` is
    ``[N, *y.shape]`` (row ``i``: the gradient of component ``i``, summed over the samples) and
    ``dt`` is ``[N, *t.shape]``."""
    B, N = _sizes(y, batched)
    if batched:
        J = dy.reshape(N, B, N).transpose(0, 1)
        ft = dt.transpose(0, 1).reshape(y.shape)
    else:
        J = dy.reshape(N, N)
        ft = dt.reshape(y.shape)
    return Linearisation(f0, J, ft)


def lu_factor(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.lu_factor_ex(M)``'s ``(LU, pivots)`` for ``M`` ``[..., N, N]``,
    differentiable, without LAPACK's error checks (a singular row shows in its solution).

    A batch of CPU matrices of :data:`LU_ONE_BY_ONE` unknowns or more, with several intra-op
    threads, is factored one matrix at a time: torch's batched CPU kernel (2.13) then runs
    ``getrf`` on several threads at once, which MKL does not survive from about 150 unknowns
    (measured here: invalid or wrong pivots, residuals of 1e10, "Parameter 6 was incorrect on
    entry to DLASWP"; pytorch/pytorch#181570).  Each matrix alone still uses every thread.
    """
    N = M.shape[-1]
    batch = M.shape[:-2]
    if (
        M.device.type == "cpu"
        and N >= LU_ONE_BY_ONE
        and batch.numel() > 1
        and torch.get_num_threads() > 1
    ):
        parts = [torch.linalg.lu_factor_ex(m)[:2] for m in M.reshape(-1, N, N).unbind(0)]
        # Stacked in LAPACK's column-major layout, as the batched kernel returns it: a
        # row-major batch is copied by every lu_solve (16 x 512: 19 ms a solve, not 2.5).
        LU = torch.stack([p[0].mT for p in parts]).mT.reshape(M.shape)
        pivots = torch.stack([p[1] for p in parts]).reshape(M.shape[:-1])
        return LU, pivots
    LU, pivots, _ = torch.linalg.lu_factor_ex(M)
    return LU, pivots
