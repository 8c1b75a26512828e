"""Discrete planar normalizing flows (Rezende & Mohamed 2015, Section 4.1), the baseline of
Chen et al. 2018, Figure 4.

One planar layer maps ``z -> z + u_hat h(w^T z + b)`` with ``h = tanh``;
``log|det df/dz| = log|1 + u_hat^T psi(z)|`` with ``psi(z) = h'(w^T z + b) w``.  The
invertibility constraint (Rezende & Mohamed 2015, Appendix A.1) replaces ``u`` by::

    u_hat = u + (m(w^T u) - w^T u) w / |w|^2,     m(x) = -1 + softplus(x),

so that ``w^T u_hat = m(w^T u) > -1``, which makes the layer strictly increasing along ``w``
and hence invertible.

What :class:`PlanarFlow` supports:

* ``forward(z)`` / :meth:`PlanarFlow.sample_and_log_prob`: base -> data with the exact
  log-density, differentiable (reparameterised): training by reverse KL to a known
  (unnormalised) density, as in Chen et al. 2018, Figure 4.
* :meth:`PlanarFlow.inverse` / :meth:`PlanarFlow.log_prob`: data -> base.  A planar layer has
  no closed-form inverse, but its inverse reduces to one monotone scalar equation per layer
  (``alpha + (w^T u_hat) tanh(alpha + b) = w^T y``, whose root lies within ``|w^T u_hat|`` of
  ``w^T y``), which we solve by bisection to round-off.  Gradients reach the parameters through
  one Newton step at the root (the implicit-function theorem), so maximum likelihood training
  works too, though slowly (the bisection costs ``iters`` evaluations per layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .cnf import standard_normal_log_prob

__all__ = ["PlanarLayer", "PlanarFlow"]


class PlanarLayer(nn.Module):
    """One planar layer ``f(z) = z + u_hat tanh(w^T z + b)`` on ``[B, D]``.

    Args:
        dim: data dimension ``D``.
        generator: random generator for the initialisation (``U(-1/sqrt(D), 1/sqrt(D))`` for
            ``u``, ``w`` and ``b``, in the default dtype); ``None``: the global one.

    Examples:
        >>> import torch
        >>> from neuralode.nn import PlanarLayer
        >>> layer = PlanarLayer(2, generator=torch.Generator().manual_seed(0))
        >>> z = torch.randn(3, 2)
        >>> y, log_det = layer(z)
        >>> y.shape, log_det.shape, torch.allclose(layer.inverse(y), z, atol=1e-6)
        (torch.Size([3, 2]), torch.Size([3]), True)
    """

    def __init__(self, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)

        def init(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)

        self.u = init(dim)
        self.w = init(dim)
        self.b = init(1)

    def u_hat(self) -> torch.Tensor:
        """``u`` projected so that ``w^T u_hat = -1 + softplus(w^T u) > -1`` (invertibility).

        Returns:
            ``[D]``, differentiable in ``u`` and ``w``.
        """
        wu = self.w @ self.u
        m = -1 + nn.functional.softplus(wu)
        w_sq = (self.w @ self.w).clamp_min(torch.finfo(self.w.dtype).tiny)
        return self.u + (m - wu) * self.w / w_sq

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the layer.

        Args:
            z: ``[B, D]``.

        Returns:
            ``(f(z) [B, D], log|det df/dz| [B])``.
        """
        u = self.u_hat()
        a = z @ self.w + self.b  # [B]
        h = torch.tanh(a)
        # 1 + u_hat^T psi = 1 + (w^T u_hat) h'(a) > 0 since w^T u_hat > -1 and 0 < h' <= 1.
        log_det = torch.log1p((self.w @ u) * (1 - h.pow(2)))
        return z + h.unsqueeze(1) * u, log_det

    def inverse(self, y: torch.Tensor, iters: int = 60) -> torch.Tensor:
        """``f^{-1}(y)``, exact to round-off after ``iters`` bisection steps.

        ``alpha = w^T z`` solves ``g(alpha) = alpha + c tanh(alpha + b) = w^T y`` with
        ``c = w^T u_hat > -1`` (``g`` increasing); then ``z = y - u_hat tanh(alpha + b)``.

        Args:
            y: ``[B, D]``.
            iters: bisection steps (each halves the bracket of width ``2 |c|``).

        Returns:
            ``z`` ``[B, D]`` with ``forward(z)[0] == y``; differentiable in ``y`` and the
            parameters through one Newton step at the root.
        """
        u = self.u_hat()
        c = self.w @ u
        target = y @ self.w
        with torch.no_grad():
            c_d, b_d, t_d = c.detach(), self.b.detach(), target.detach()
            r = c_d.abs() + 1e-12
            lo, hi = t_d - r, t_d + r
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                above = mid + c_d * torch.tanh(mid + b_d) > t_d
                hi = torch.where(above, mid, hi)
                lo = torch.where(above, lo, mid)
            root = 0.5 * (lo + hi)
        # One Newton step at the root: same value, and the implicit-function-theorem gradient.
        th = torch.tanh(root + self.b)
        g = root + c * th - target
        dg = 1 + c * (1 - th.pow(2))
        alpha = root - g / dg
        return y - torch.tanh(alpha + self.b).unsqueeze(1) * u


class PlanarFlow(nn.Module):
    """``K`` stacked planar layers on a standard normal base (Rezende & Mohamed 2015).

    Args:
        dim: data dimension ``D``.
        num_layers: ``K``.
        seed: seed of the initialisation (``None``: the global generator).

    Shapes: samples ``[n, D]``, log-densities ``[n]`` (nats).

    Raises:
        ValueError: if ``num_layers < 1``.

    Examples:
        >>> import torch
        >>> from neuralode.nn import PlanarFlow
        >>> flow = PlanarFlow(dim=2, num_layers=4, seed=0)
        >>> x, log_q = flow.sample_and_log_prob(5)  # base -> data, exact density
        >>> x.shape, log_q.shape
        (torch.Size([5, 2]), torch.Size([5]))
        >>> torch.allclose(flow.log_prob(x), log_q, atol=1e-4)  # data -> base, by inversion
        True
    """

    def __init__(self, dim: int = 2, num_layers: int = 8, seed: int | None = None) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        self.dim = dim
        self.layers = nn.ModuleList(PlanarLayer(dim, gen) for _ in range(num_layers))

    def _planar_layers(self) -> list[PlanarLayer]:
        return [layer for layer in self.layers if isinstance(layer, PlanarLayer)]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Base -> data through every layer.

        Args:
            z: ``[B, D]`` base samples.

        Returns:
            ``(x [B, D], sum_k log|det df_k/dz| [B])``.
        """
        total = z.new_zeros(z.shape[0])
        for layer in self.layers:
            z, log_det = layer(z)
            total = total + log_det
        return z, total

    def inverse(self, x: torch.Tensor, iters: int = 60) -> torch.Tensor:
        """Data -> base, layer by layer (see :meth:`PlanarLayer.inverse`).

        Args:
            x: ``[B, D]`` data.
            iters: bisection steps per layer.

        Returns:
            ``z [B, D]`` with ``forward(z)[0] == x`` to round-off.
        """
        for layer in reversed(self._planar_layers()):
            x = layer.inverse(x, iters)
        return x

    def sample_and_log_prob(
        self, n: int, *, generator: torch.Generator | None = None, z: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples with their log-density, differentiable in the parameters (reparameterised),
        for reverse-KL training.

        Args:
            n: number of samples (ignored when ``z`` is given).
            generator: random generator for the base samples.
            z: ``[n, D]`` base samples to push instead of a fresh draw.

        Returns:
            ``(x [n, D], log q(x) [n])`` with ``log q(x) = log N(z; 0, I) - sum_k log|det|``
            (nats); a fresh ``z`` takes the parameters' dtype and device.
        """
        if z is None:
            p = self._planar_layers()[0].u
            z = torch.randn(n, self.dim, dtype=p.dtype, device=p.device, generator=generator)
        x, log_det = self(z)
        return x, standard_normal_log_prob(z) - log_det

    def trajectory(self, z: torch.Tensor, frames: int) -> tuple[list[torch.Tensor], list[str]]:
        """Base samples carried to data, as :meth:`neuralode.nn.CNF.trajectory` for the
        continuous flow.

        Args:
            z: ``[n, D]`` base samples.
            frames: number of evenly spaced layer counts in ``0, ..., K``, at least 2.

        Returns:
            ``(states, labels)``: the states ``[n, D]`` after those numbers of layers (fewer
            than ``frames`` when ``frames > K + 1``: repeated counts appear once), and a label
            per state (``"after 8 layers"``).

        Raises:
            ValueError: if ``frames < 2``.

        Examples:
            >>> import torch
            >>> from neuralode.nn import PlanarFlow
            >>> states, labels = PlanarFlow(num_layers=4).trajectory(torch.randn(5, 2), 3)
            >>> labels
            ['after 0 layers', 'after 2 layers', 'after 4 layers']
        """
        if frames < 2:
            raise ValueError(f"frames must be at least 2, got {frames}")
        layers = list(self.layers)
        marks = {round(float(k)) for k in torch.linspace(0, len(layers), frames)}
        states, labels, x = [], [], z
        for k in range(len(layers) + 1):
            if k in marks:
                states.append(x)
                labels.append(f"after {k} layer{'' if k == 1 else 's'}")
            if k < len(layers):
                x, _ = layers[k](x)
        return states, labels

    def log_prob(self, x: torch.Tensor, iters: int = 60) -> torch.Tensor:
        """``log q(x)`` per sample by numerical inversion (see the module docstring).

        Args:
            x: ``[B, D]`` data.
            iters: bisection steps per layer.

        Returns:
            ``[B]``, nats.
        """
        z = self.inverse(x, iters)
        _, log_det = self(z)
        log_q: torch.Tensor = standard_normal_log_prob(z) - log_det
        return log_q
