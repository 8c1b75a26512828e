"""Stiff test problems, each as a torch field and a NumPy copy (the NumPy one for scipy's
reference solutions and for the benchmark's scipy runs): shared by ``tests/test_stiff.py`` and
``benchmarks/stiff.py``.

* Robertson's chemical kinetics (Hairer and Wanner II, IV.1), rate constants ``k``;
* Van der Pol with stiffness ``mu``;
* HIRES (II, IV.10), 8 components, t in [0, 321.8122];
* OREGO, the Oregonator (II, IV.1), 3 components, t in [0, 360];
* BRUSS, the Brusselator's reaction-diffusion on a grid of ``M`` points (II, IV.10), ``2 M``
  components, t in [0, 10]: its stiffness (diffusion, ``4 alpha (M + 1)^2``) grows with the grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

TorchField = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NumpyField = Callable[[float, np.ndarray], np.ndarray]

#: Robertson's rate constants.
K_ROBERTSON = (0.04, 3e7, 1e4)


def robertson(k: Any = K_ROBERTSON) -> TorchField:
    """``k`` a tuple, or a ``[batch, 3]`` tensor (one set per sample)."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y1, y2, y3 = y.unbind(-1)
        k1, k2, k3 = (k[..., 0], k[..., 1], k[..., 2]) if isinstance(k, torch.Tensor) else k
        r1, r2, r3 = k1 * y1, k2 * y2 * y2, k3 * y2 * y3
        return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)

    return f


def robertson_np(k: Any = K_ROBERTSON) -> NumpyField:
    def f(t: float, y: np.ndarray) -> np.ndarray:
        r1, r2, r3 = k[0] * y[0], k[1] * y[1] ** 2, k[2] * y[1] * y[2]
        return np.array([-r1 + r3, r1 - r2 - r3, r2])

    return f


def van_der_pol(mu: float) -> TorchField:
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, v = y.unbind(-1)
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)

    return f


def van_der_pol_np(mu: float) -> NumpyField:
    def f(t: float, y: np.ndarray) -> np.ndarray:
        return np.array([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    return f


def hires(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y1, y2, y3, y4, y5, y6, y7, y8 = y.unbind(-1)
    r = 280.0 * y6 * y8
    return torch.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            r - 1.81 * y7,
            -r + 1.81 * y7,
        ],
        -1,
    )


def hires_terms(y: Any) -> list[Any]:
    """HIRES's right-hand side, component by component, for any array ``y`` that indexes like
    a vector (NumPy here, JAX in the benchmark)."""
    r = 280.0 * y[5] * y[7]
    return [
        -1.71 * y[0] + 0.43 * y[1] + 8.32 * y[2] + 0.0007,
        1.71 * y[0] - 8.75 * y[1],
        -10.03 * y[2] + 0.43 * y[3] + 0.035 * y[4],
        8.32 * y[1] + 1.71 * y[2] - 1.12 * y[3],
        -1.745 * y[4] + 0.43 * y[5] + 0.43 * y[6],
        -r + 0.69 * y[3] + 1.71 * y[4] - 0.43 * y[5] + 0.69 * y[6],
        r - 1.81 * y[6],
        -r + 1.81 * y[6],
    ]


def hires_np(t: float, y: np.ndarray) -> np.ndarray:
    return np.array(hires_terms(y))


def orego(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y1, y2, y3 = y.unbind(-1)
    return torch.stack(
        [
            77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
            (y3 - (1 + y1) * y2) / 77.27,
            0.161 * (y1 - y3),
        ],
        -1,
    )


def orego_np(t: float, y: np.ndarray) -> np.ndarray:
    return np.array(
        [
            77.27 * (y[1] + y[0] * (1 - 8.375e-6 * y[0] - y[1])),
            (y[2] - (1 + y[0]) * y[1]) / 77.27,
            0.161 * (y[0] - y[2]),
        ]
    )


#: name -> torch field, NumPy field, y0, output times, atol / rtol.
PROBLEMS: dict[str, tuple[TorchField, NumpyField, list[float], np.ndarray, float]] = {
    "robertson": (
        robertson(),
        robertson_np(),
        [1.0, 0.0, 0.0],
        np.array([0.0] + [0.4 * 10**k for k in range(7)]),
        1e-4,
    ),
    "vdp_mu1e3": (van_der_pol(1e3), van_der_pol_np(1e3), [2.0, 0.0], np.linspace(0, 3000, 7), 1.0),
    "hires": (hires, hires_np, [1.0, 0, 0, 0, 0, 0, 0, 0.0057], np.linspace(0, 321.8122, 5), 1e-4),
    "orego": (orego, orego_np, [1.0, 2.0, 3.0], np.linspace(0, 360, 7), 1.0),
}


def brusselator(M: int, alpha: Any = 0.02) -> tuple[TorchField, NumpyField, np.ndarray]:
    """BRUSS on ``M`` interior points (boundary values ``u = 1``, ``v = 3``), the state laid out
    as ``[u_1..u_M, v_1..v_M]`` (batched: ``[batch, 2 M]``): the torch field, its NumPy copy and
    ``y0`` (``u = 1 + sin(2 pi x)``, ``v = 3``)."""
    c = alpha * (M + 1) ** 2

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u, v = y[..., :M], y[..., M:]
        one = torch.ones_like(u[..., :1])
        up, vp = torch.cat([one, u, one], -1), torch.cat([3 * one, v, 3 * one], -1)
        uuv = u * u * v
        du = 1 + uuv - 4 * u + c * (up[..., 2:] - 2 * u + up[..., :-2])
        dv = 3 * u - uuv + c * (vp[..., 2:] - 2 * v + vp[..., :-2])
        return torch.cat([du, dv], -1)

    def f_np(t: float, y: np.ndarray) -> np.ndarray:
        u, v = y[:M], y[M:]
        up, vp = np.concatenate([[1.0], u, [1.0]]), np.concatenate([[3.0], v, [3.0]])
        uuv = u * u * v
        du = 1 + uuv - 4 * u + c * (up[2:] - 2 * u + up[:-2])
        dv = 3 * u - uuv + c * (vp[2:] - 2 * v + vp[:-2])
        return np.concatenate([du, dv])

    x = np.arange(1, M + 1) / (M + 1)
    return f, f_np, np.concatenate([1 + np.sin(2 * np.pi * x), np.full(M, 3.0)])


def brusselator_preconditioner(M: int, alpha: float = 0.02) -> Callable[..., torch.Tensor]:
    """A preconditioner for BRUSS's Newton systems (``NewtonSettings.preconditioner``):
    ``(I - hg c T)^-1 r`` on the ``u`` and ``v`` halves, ``T`` the grid's second difference, ``c
    = alpha (M + 1)^2``: the diffusion, BRUSS's stiff part, solved exactly, the reaction left
    out.  One LU per ``hg`` (one per step), kept for the step's systems."""
    c = alpha * (M + 1) ** 2
    cache: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def solve(t: torch.Tensor, y: torch.Tensor, hg: Any, r: torch.Tensor) -> torch.Tensor:
        key = float(hg)
        if key not in cache:
            cache.clear()
            T = (
                torch.diag(torch.full((M - 1,), 1.0, dtype=r.dtype), 1)
                + torch.diag(torch.full((M - 1,), 1.0, dtype=r.dtype), -1)
                - 2 * torch.eye(M, dtype=r.dtype)
            )
            cache[key] = torch.linalg.lu_factor(torch.eye(M, dtype=r.dtype) - key * c * T)
        LU, piv = cache[key]
        halves = r.reshape(2, M).T  # [M, 2]: the u and v columns
        return torch.linalg.lu_solve(LU, piv, halves).T.reshape(r.shape)

    return solve
