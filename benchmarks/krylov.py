"""The ESDIRK methods' Newton systems solved densely or matrix-free (GMRES), by state size.

``NewtonSettings(linear="dense")`` takes ``N`` vector-Jacobian products and one LU
factorisation per sample and step; ``linear="gmres"`` takes finite-difference products
``J v`` at each Newton iterate, ``krylov_dim`` (30) at most per system, unpreconditioned
(``neuralode.solvers.krylov``).  This script times kvaerno5 both ways on the same solves (two
threads, float64, rtol 1e-4, atol 1e-6) and reports which ``linear="auto"`` picks:

    .venv/bin/python benchmarks/krylov.py [--neural 512 1024 2048 4096] [--batched 256 512]
                                          [--bruss 100 500 1000]

* neural: ``y' = -diag(lambda) y + W2 tanh(W1 y) + sin t``, ``lambda`` log-spaced over
  ``[1, 1e3]``, random ``W`` of spectral size 1, t in [0, 1]; ``N`` components, unbatched,
  and a batch of 16 (``--batched``: each row its own steps);
* bruss: the Brusselator's reaction-diffusion on ``M`` grid points (``N = 2 M``, t in
  [0, 10], ``tests/stiff_problems.py``), whose stiffness ``4 alpha (M + 1)^2`` (a diffusion's
  spread of eigenvalues) is the hard case for an unpreconditioned Krylov space; and again with
  ``NewtonSettings.preconditioner`` solving the diffusion exactly (one ``M x M`` LU per step,
  ``stiff_problems.brusselator_preconditioner``).

Columns: seconds per solve (one run each; a solve takes seconds), the ratio GMRES / dense,
steps, evaluations of ``f`` (GMRES: its products included) and Jacobians, and the largest
difference between the two solutions in tolerance units (``atol + rtol |y|``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import neuralode
from neuralode.solvers import esdirk
from neuralode.solvers.esdirk import Esdirk, NewtonSettings
from neuralode.solvers.tableaus import ESDIRK_TABLEAUS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from stiff_problems import brusselator, brusselator_preconditioner  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6
Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def neural(N: int, batch: int) -> tuple[Field, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W1 = torch.randn(N, N, generator=g, dtype=torch.float64) / N**0.5
    W2 = torch.randn(N, N, generator=g, dtype=torch.float64) / N**0.5
    lam = torch.logspace(0, 3, N, dtype=torch.float64)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -lam * y + torch.tanh(y @ W1.T) @ W2.T + torch.sin(t).unsqueeze(-1)

    shape = (batch, N) if batch else (N,)
    y0 = torch.randn(shape, generator=g, dtype=torch.float64)
    return f, y0, torch.tensor([0.0, 1.0], dtype=torch.float64)


def bruss(M: int) -> tuple[Field, torch.Tensor, torch.Tensor]:
    f, _, y0 = brusselator(M)
    return f, torch.tensor(y0), torch.tensor([0.0, 10.0], dtype=torch.float64)


def run(
    f: Field, y0: torch.Tensor, ts: torch.Tensor, settings: NewtonSettings, batched: bool
) -> Any:
    solver = Esdirk(ESDIRK_TABLEAUS["kvaerno5"], settings)
    start = time.perf_counter()
    sol = neuralode.solve(f, y0, ts, method=solver, rtol=RTOL, atol=ATOL, batched=batched)
    return time.perf_counter() - start, sol


def total(x: torch.Tensor) -> int:
    return int(x.sum())


def row(
    name: str,
    f: Field,
    y0: torch.Tensor,
    ts: torch.Tensor,
    batched: bool,
    preconditioner: Any = None,
) -> None:
    rows = y0.shape[0] if batched else 1
    N = y0[0].numel() if batched else y0.numel()
    least = esdirk.KRYLOV_MIN_ENTRIES if rows > 1 else esdirk.KRYLOV_MIN_ENTRIES_ONE
    big = rows * N * N >= least
    auto = "gmres" if big or preconditioner is not None else "dense"
    t_d, dense = run(f, y0, ts, NewtonSettings(linear="dense"), batched)
    settings = NewtonSettings(linear="gmres", preconditioner=preconditioner)
    t_g, krylov = run(f, y0, ts, settings, batched)
    units = float(((dense.ys - krylov.ys).abs() / (ATOL + RTOL * dense.ys.abs())).max())
    sd, sk = dense.stats, krylov.stats
    print(
        f"| {name} | {rows} x {N} | {auto} | {t_d:.2f} | {t_g:.2f} | {t_g / t_d:.2f} | "
        f"{total(sd.n_steps)} / {total(sk.n_steps)} | {total(sd.nfe)} / {total(sk.nfe)} | "
        f"{total(sd.njev)} | {units:.2f} |",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neural", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--batched", type=int, nargs="*", default=[256, 512])
    ap.add_argument("--bruss", type=int, nargs="*", default=[100, 500, 1000])
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(
        "| problem | batch x N | auto picks | dense s | GMRES s | GMRES / dense | steps (dense / "
        "GMRES) | nfe (dense / GMRES) | Jacobians (dense) | difference (tol. units) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for N in args.neural:
        row("neural", *neural(N, 0), batched=False)
    for N in args.batched:
        row("neural, batched", *neural(N, 16), batched=True)
    for M in args.bruss:
        row("bruss", *bruss(M), batched=False)
    for M in args.bruss:
        pc = brusselator_preconditioner(M)
        row("bruss, preconditioned", *bruss(M), batched=False, preconditioner=pc)


if __name__ == "__main__":
    main()
