"""The adjoint of a stiff neural field: the backward solve's Jacobian in block form or dense.

The backward (augmented) system of ``gradient="adjoint"`` has ``2 N + P`` components (``N`` the
state, ``P`` the parameters).  A stiff backward solve needs its Jacobian; taken densely it is
``2 N + P`` second-order vector-Jacobian products per step and an LU factorisation of that size,
while its block lower-triangular form needs ``func``'s own ``N x N`` Jacobian and two products
with the augmented Jacobian per linear system (``neuralode.gradients.adjoint._Augmented``).
This script times both on the same solve, with networks of growing width, and checks that they
take the same steps and give the same gradients (one thread, float64):

    .venv/bin/python benchmarks/stiff_adjoint.py [--widths 16 32 64] [--methods rodas5p kvaerno5]

Field: ``y' = A y + 0.5 tanh-MLP(y)`` with ``A``'s eigenvalues near -30, -3 and -1 (mildly
stiff), batch 2, 3 components (``N = 6`` in ``2 N + P``), t in [0, 1], rtol 1e-6, atol 1e-8.
"""

from __future__ import annotations

import argparse
import time

import torch

import neuralode
from neuralode.gradients.adjoint import _Augmented


def run(
    method: str, width: int, structured: bool
) -> tuple[float, tuple[torch.Tensor, ...], object]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 3)
    ).double()
    A = torch.tensor([[-30.0, 1.0, 0.0], [0.0, -1.0, 2.0], [0.5, 0.0, -3.0]], dtype=torch.float64)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ A.T + 0.5 * net(y)

    y0 = torch.tensor([[1.0, 0.5, -0.2], [0.3, -0.4, 0.8]], dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    params = tuple(net.parameters())
    _Augmented.structured = structured
    try:
        t0 = time.perf_counter()
        sol = neuralode.solve(f, y0, ts, method=method, rtol=1e-6, atol=1e-8, batched=True,
                              gradient="adjoint", adjoint_params=params)  # fmt: skip
        grads = torch.autograd.grad(sol.ys.square().sum(), (y0, *params))
        secs = time.perf_counter() - t0
    finally:
        _Augmented.structured = True
    return secs, grads, sol.backward_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--methods", nargs="+", default=["rodas5p", "kvaerno5"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        "| method | width | P | 2N+P | backward steps | block form s | dense s | dense / block "
        "| largest gradient difference |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for width in args.widths:
            t_b, g_b, st_b = run(method, width, True)
            t_d, g_d, st_d = run(method, width, False)
            P = 3 * width + width + width * 3 + 3
            assert st_b is not None and st_d is not None
            same = int(st_b.n_steps) == int(st_d.n_steps)  # type: ignore[attr-defined]
            diff = max(float((a - b).abs().max()) for a, b in zip(g_b, g_d))
            steps = f"{int(st_b.n_steps)}" + ("" if same else f" (dense {int(st_d.n_steps)})")  # type: ignore[attr-defined]
            print(f"| {method} | {width} | {P} | {12 + P} | {steps} | {t_b:.2f} | {t_d:.2f} | "
                  f"{t_d / t_b:.1f} | {diff:.1e} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
