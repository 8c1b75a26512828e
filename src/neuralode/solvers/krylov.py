"""Matrix-free linear solves for the implicit stages: GMRES on Jacobian-vector products.

A dense Newton matrix ``I - h gamma J`` costs ``N`` vector-Jacobian products to build and
``O(N^3)`` to factor per sample; for a large state (a discretised PDE, a wide neural field) the
ESDIRK methods can instead solve each Newton system ``(I - h gamma J) dz = r`` by GMRES (Saad and
Schultz 1986), which needs only products ``J v``: one evaluation of ``f`` each, as the finite
difference ``(f(z + delta v) - f(z)) / delta`` (SUNDIALS' choice of ``delta``; see :func:`jvp`).
``J`` is taken at the
current Newton iterate, so the iteration is Newton's method proper (inexact: each system is
solved to a tolerance), with no Jacobian stored and no factorisation.

:func:`gmres` is batched: every row of a ``[batch, N]`` right-hand side has its own Krylov space,
its own least-squares problem and its own stopping test, and a row's count of products stops at
its own convergence.  The systems are solved in the Newton test's own scaling (components
divided by ``atol + rtol |y|``, as SUNDIALS' scaled GMRES), and stop when the scaled residual's
root mean square is below ``0.05 kappa`` (``kappa`` the Newton test's tolerance: SUNDIALS'
``eplifac``).  A tolerance relative to the right-hand side (an inexact Newton step with a
forcing term of 1%) cost more than it saved: a residual says little about the error of a badly
scaled stiff system (Robertson at rtol 1e-6: 1,891 steps and 26 tolerance units instead of 99
and 2.3).  An unpreconditioned Krylov space grows with the
stiffness ``h gamma ||J||``; a system that is not solved within ``krylov_dim`` products leaves
its row's Newton iteration contracting slowly, which fails the step, and the loop retries it
smaller, where the system is better conditioned.

The gradient of a converged stage (the implicit function theorem, :mod:`.esdirk`) needs a solve
with ``(I - h gamma J(z*))^T``: GMRES again, on vector-Jacobian products (one reverse pass each,
all from one forward pass), to ``eps^0.75`` relative to the incoming gradient, with restarts,
right preconditioned by ``NewtonSettings.preconditioner_transposed`` where one is given.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from .._rows import per_row
from .base import Func
from .newton import _AUTOGRAD_ONLY

__all__ = ["gmres"]

#: Restart cycles of the transposed solve (the gradient's): it must be solved to round-off.
_TRANSPOSED_RESTARTS = 20


def gmres(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    tol: torch.Tensor,
    max_dim: int,
    restarts: int = 0,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve ``A x = b`` per row by restarted GMRES from ``x = 0``.

    Args:
        matvec: ``v -> A v`` for ``v`` ``[batch, N]`` (row ``i`` of ``A v`` depends on row ``i``
            of ``v`` only).
        b: the right-hand sides, ``[batch, N]``.
        tol: per row, ``[batch]``: stop a row when its residual's 2-norm ``||b - A x||`` is at
            most this.
        max_dim: the Krylov space's dimension per cycle (products per cycle, at most ``N``).
        restarts: further cycles, each from the last cycle's solution.
        precondition: ``v -> M^-1 v`` with ``M`` an approximation of ``A`` (per row, as
            ``matvec``), applied on the right: GMRES solves ``A M^-1 u = b`` and returns
            ``x = M^-1 u``, so the residual it tests is ``A x - b`` itself.

    Returns:
        ``(x, products, converged)``: the solution ``[batch, N]``, the products each row needed
        (``[batch]``, counted until its own convergence) and whether it met ``tol``
        (``[batch]`` bool).

    Examples:
        Two systems at once: row 0 has two distinct eigenvalues (two products), row 1 is the
        identity (one):

        >>> import torch
        >>> from neuralode.solvers.krylov import gmres
        >>> A = torch.stack([torch.diag(torch.tensor([1.0, 3.0, 3.0])), torch.eye(3)])
        >>> b = torch.ones(2, 3)
        >>> x, products, ok = gmres(lambda v: (A @ v.unsqueeze(2)).squeeze(2), b,
        ...                         torch.full((2,), 1e-6), max_dim=3)
        >>> x, products.tolist(), ok.tolist()
        (tensor([[1.0000, 0.3333, 0.3333],
                [1.0000, 1.0000, 1.0000]]), [2, 1], [True, True])
    """
    B, N = b.shape
    m = max(1, min(max_dim, N))
    x = torch.zeros_like(b)
    products = torch.zeros(B, dtype=torch.long, device=b.device)
    r = b
    done = r.norm(dim=1) <= tol
    # Rows whose Krylov space stopped growing with ``A`` singular on it (a column of the
    # Hessenberg matrix that rotates to zero): no further product, nor restart, can lower
    # their residual, which stays above ``tol``; they stop, not converged.
    stuck = torch.zeros_like(done)
    tiny = torch.finfo(b.dtype).tiny
    op = matvec  # the operator whose Krylov space is built: A, or A M^-1
    if precondition is not None:
        solve_m = precondition
        op = lambda v: matvec(solve_m(v))  # noqa: E731
    for cycle in range(restarts + 1):
        if bool((done | stuck).all()):
            break
        if cycle > 0:
            r = b - matvec(x)
            products = products + ~(done | stuck)
            done = done | (~stuck & (r.norm(dim=1) <= tol))
        beta = r.norm(dim=1)
        V = b.new_zeros(B, m + 1, N)
        V[:, 0] = r / beta.clamp_min(tiny).unsqueeze(1)
        # The Hessenberg matrix's QR by Givens rotations, kept as the accumulated orthogonal
        # factor Q (rows: the rotated basis) and R: one product per column instead of a
        # sequence of rotations, and the residual norm is beta |Q[k+1, 0]| at every step.
        Q = b.new_zeros(B, m + 1, m + 1)
        Q[:, 0, 0] = 1
        R = b.new_zeros(B, m, m)
        # The last column each row built before it converged: a row's solution uses its own
        # space only (not the columns the batch's other rows went on to build), so a batched
        # row is solved as it would be alone.
        last = torch.full((B,), -1, dtype=torch.long, device=b.device)
        k = 0
        for k in range(m):
            idle = done | stuck
            w = op(V[:, k])
            products = products + ~idle
            last = torch.where(idle, last, k)
            Vk = V[:, : k + 1]
            # Classical Gram-Schmidt, twice (as stable as the modified one, in two products).
            h = torch.bmm(Vk, w.unsqueeze(2))
            w = w - torch.bmm(Vk.transpose(1, 2), h).squeeze(2)
            h2 = torch.bmm(Vk, w.unsqueeze(2))
            w = w - torch.bmm(Vk.transpose(1, 2), h2).squeeze(2)
            norm = w.norm(dim=1)
            V[:, k + 1] = w / norm.clamp_min(tiny).unsqueeze(1)
            Q[:, k + 1, k + 1] = 1
            col = torch.cat([(h + h2).squeeze(2), norm.unsqueeze(1)], 1)
            col = torch.bmm(Q[:, : k + 2, : k + 2], col.unsqueeze(2)).squeeze(2)
            a, c_next = col[:, k], col[:, k + 1]
            rho = torch.hypot(a, c_next)
            safe = rho.clamp_min(tiny)  # (rho = 0: c = s = 0, on a row that stops here)
            c, s = (a / safe).unsqueeze(1), (c_next / safe).unsqueeze(1)
            R[:, :k, k] = col[:, :k]
            R[:, k, k] = rho
            q_k, q_next = Q[:, k, : k + 2], Q[:, k + 1, : k + 2]
            Q[:, k, : k + 2], Q[:, k + 1, : k + 2] = c * q_k + s * q_next, c * q_next - s * q_k
            # rho = 0: column k adds nothing (A V_k lies in A's image of the earlier columns),
            # and beta |Q[k + 1, 0]| is not the residual, which stays the last one: such a row
            # solves without the column (its rows k and k + 1 of Q are not read), and stops.
            singular = ~idle & (rho == 0)
            last = torch.where(singular, k - 1, last)
            stuck = stuck | singular
            done = done | (~stuck & (beta * Q[:, k + 1, 0].abs() <= tol))
            if bool((done | stuck).all()):
                break
        # Columns past a row's last (and zero ones: a space that stopped growing, its exact
        # solution found) are replaced by the identity's, with zero right-hand sides, which
        # solves them to zero.
        j = torch.arange(k + 1, device=b.device)
        own = j.unsqueeze(0) <= last.unsqueeze(1)  # [B, k + 1]
        Rk = torch.where(own.unsqueeze(1) & own.unsqueeze(2), R[:, : k + 1, : k + 1], 0.0)
        diag = Rk.diagonal(dim1=1, dim2=2)
        Rk = Rk + torch.diag_embed((diag == 0).to(Rk.dtype))
        rhs = torch.where(own, beta.unsqueeze(1) * Q[:, : k + 1, 0], 0.0).unsqueeze(2)
        y = torch.linalg.solve_triangular(Rk, rhs, upper=True)
        u = torch.bmm(V[:, : k + 1].transpose(1, 2), y).squeeze(2)
        x = x + (u if precondition is None else precondition(u))
    return x, products, done


def jvp(
    f: Func, t: torch.Tensor, z: torch.Tensor, fz: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``J(z) v`` per row (``J = df/dy`` at ``(t, z)``; ``fz = f(t, z)``, ``v`` shaped like
    ``z``, ``t`` ``[batch]`` when batched) by a one-sided finite difference, one evaluation of
    ``f``: ``(f(t, z + delta v) - fz) / delta`` with SUNDIALS' increment ``delta = sqrt(eps)
    (1 + ||z||) / ||v||`` (root-mean-square norms per row).

    Forward-mode products are exact but cost many evaluations of ``f`` each in eager PyTorch
    (measured on a 500-component Brusselator and a 500-wide MLP: ``torch.autograd.forward_ad``
    23 and 6, ``torch.func.jvp`` 32 and 11); Newton's iteration needs only an approximate product
    (its relative error, about ``sqrt(eps)``, slows the contraction by as much)."""
    dims = tuple(range(1, z.ndim)) if t.ndim == 1 else tuple(range(z.ndim))
    v_norm = v.square().mean(dim=dims).sqrt() if dims else v.abs()
    z_norm = z.square().mean(dim=dims).sqrt() if dims else z.abs()
    eps = torch.finfo(z.dtype).eps
    delta = math.sqrt(eps) * (1 + z_norm) / v_norm.clamp_min(torch.finfo(z.dtype).tiny)
    d = per_row(torch.where(v_norm == 0, 0.0, delta), z.ndim)
    with torch.no_grad():
        diff = f(t, z + d * v) - fz
    return torch.where(d == 0, 0.0, diff / d)  # 0 / 0 where v = 0, discarded


class KrylovNewton:
    """The Newton correction ``dz = (I - h gamma J(z))^-1 r`` by GMRES, in the Newton test's
    scaling (``scale = atol + rtol |y|``); ``products`` counts the ``J v`` products per row.

    Args:
        f: the vector field.
        hg: ``h gamma``, a float or per row ``[batch]``.
        scale: the Newton test's scale, shaped like the state.
        tol: the scaled residual's root-mean-square tolerance (``0.05 kappa``).
        max_dim: the Krylov space's dimension.
        rows: the row shape (``[]`` or ``[batch]``).
        preconditioner: ``(t, z, hg, r) -> M^-1 r``, ``M`` an approximation of
            ``I - hg J(t, z)`` (``NewtonSettings.preconditioner``), or ``None``.
    """

    def __init__(
        self,
        f: Func,
        hg: torch.Tensor | float,
        scale: torch.Tensor,
        tol: float,
        max_dim: int,
        rows: tuple[int, ...],
        preconditioner: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.f, self.scale, self.tol, self.max_dim = f, scale, tol, max_dim
        self.preconditioner, self.hg_rows = preconditioner, hg
        self.hg = per_row(hg, scale.ndim) if isinstance(hg, torch.Tensor) else hg
        self.rows = rows
        self.products: torch.Tensor | int = 0

    def solve(
        self,
        r: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        fz: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        """The correction for the residual ``r`` at the iterate ``z`` (``fz = f(t, z)``), for
        the rows still iterating (``active``, the row shape; the others get zero and are not
        charged)."""
        shape = z.shape
        B = self.rows[0] if self.rows else 1
        scale = self.scale

        def matvec(u: torch.Tensor) -> torch.Tensor:
            v = u.reshape(shape) * scale
            Av = v - self.hg * jvp(self.f, t, z, fz, v)
            return (Av / scale).reshape(B, -1)

        precondition = None
        if self.preconditioner is not None:
            user, hg = self.preconditioner, self.hg_rows

            def precondition(u: torch.Tensor) -> torch.Tensor:
                out = user(t, z, hg, u.reshape(shape) * scale)
                return (out / scale).reshape(B, -1)

        b = (torch.where(per_row(active, r.ndim), r, 0.0) / scale).reshape(B, -1)
        tol = torch.full((B,), self.tol * math.sqrt(b.shape[1]), dtype=b.dtype, device=b.device)
        u, products, _ = gmres(matvec, b, tol, self.max_dim, precondition=precondition)
        self.products = self.products + (products if self.rows else products[0])
        return u.reshape(shape) * scale


class KrylovTransposedSolve:
    """``v -> (I - h gamma J(z*))^-T v`` per row by GMRES on vector-Jacobian products (the
    gradient of a converged stage, :class:`~neuralode.solvers.esdirk._ImplicitStage`), right
    preconditioned by ``preconditioner(t, z*, hg, r) -> M^-T r`` where one is given
    (``NewtonSettings.preconditioner_transposed``)."""

    def __init__(
        self,
        f: Func,
        t: torch.Tensor,
        z: torch.Tensor,
        hg: torch.Tensor | float,
        max_dim: int,
        preconditioner: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.f, self.t, self.z, self.max_dim = f, t.detach(), z.detach(), max_dim
        self.preconditioner, self.hg_rows = preconditioner, hg
        self.hg = per_row(hg, z.ndim) if isinstance(hg, torch.Tensor) else hg
        #: The products the last solve took per row (``[batch]``, or ``[1]`` unbatched).
        self.products: torch.Tensor | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        shape = self.z.shape
        batched = self.t.ndim == 1
        B = shape[0] if batched else 1
        vjp = self._vjp()

        def matvec(u: torch.Tensor) -> torch.Tensor:
            w = u.reshape(shape)
            return (w - self.hg * vjp(w)).reshape(B, -1)

        precondition = None
        if self.preconditioner is not None:
            user, t, z, hg = self.preconditioner, self.t, self.z, self.hg_rows

            def precondition(u: torch.Tensor) -> torch.Tensor:
                return user(t, z, hg, u.reshape(shape)).reshape(B, -1)

        b = v.reshape(B, -1)
        eps = torch.finfo(v.dtype).eps
        tol = eps**0.75 * b.norm(dim=1)
        with torch.no_grad():
            u, products, ok = gmres(
                matvec, b, tol, self.max_dim, _TRANSPOSED_RESTARTS, precondition=precondition
            )
        self.products = products
        if not bool(ok.all()):
            warnings.warn(
                "the gradient's linear solve (I - h gamma J)^T u = v of an ESDIRK stage did not "
                f"converge in {(_TRANSPOSED_RESTARTS + 1) * self.max_dim} GMRES iterations; "
                "the gradient is approximate (give NewtonSettings.preconditioner_transposed, "
                "raise NewtonSettings.krylov_dim, or use linear='dense')",
                RuntimeWarning,
                stacklevel=2,
            )
        return u.reshape(shape)

    def _vjp(self) -> Callable[[torch.Tensor], torch.Tensor]:
        f, t, z = self.f, self.t, self.z
        if f not in _AUTOGRAD_ONLY and not getattr(f, "no_torch_func", False):
            try:
                _, fn = torch.func.vjp(lambda zz: f(t, zz), z)  # type: ignore[misc]
                return lambda w: fn(w)[0]
            except Exception:  # noqa: BLE001 - torch.func cannot transform this field
                try:
                    _AUTOGRAD_ONLY.add(f)
                except TypeError:  # not weak-referenceable: try again next time
                    pass
        with torch.enable_grad():
            zz = z.detach().requires_grad_()
            out = f(t, zz)

        def by_autograd(w: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                (g,) = torch.autograd.grad(out, zz, w, retain_graph=True, allow_unused=True)
            return torch.zeros_like(w) if g is None else g

        return by_autograd
