"""Fixed-step implicit methods: ours against torchdiffeq's repository head, side by side.

torchdiffeq's implicit methods are on its repository head only (not in 0.2.5 on PyPI): point
``TORCHDIFFEQ_HEAD`` at a checkout's root (the directory holding its ``torchdiffeq`` package).
Each solve takes the same fixed grid; the table gives the error against a tight reference
(``rodas5p`` at rtol 1e-12), the wall time (best of 3, one thread), and ours / torchdiffeq.

    TORCHDIFFEQ_HEAD=/path/to/torchdiffeq .venv/bin/python benchmarks/implicit_fixed.py
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable

import torch

import neuralode

F64 = torch.float64


def _torchdiffeq_head():  # type: ignore[no-untyped-def]
    root = os.environ.get("TORCHDIFFEQ_HEAD")
    if not root:
        return None
    sys.path.insert(0, root)
    try:
        mod = importlib.import_module("torchdiffeq")
    finally:
        sys.path.pop(0)
    solvers = importlib.import_module("torchdiffeq._impl.odeint").SOLVERS
    return mod if "radauIIA5" in solvers else None


def prothero_robinson(lam: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda t, y: -lam * (y - torch.cos(t)) - torch.sin(t)


def van_der_pol(mu: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda t, y: torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


PROBLEMS = {
    # name: (field, y0, t_end, steps)
    "Prothero-Robinson lam=1e4": (prothero_robinson(1e4), [1.2], 2.0, 20),
    "Van der Pol mu=10": (van_der_pol(10.0), [2.0, 0.0], 2.0, 200),
    "Van der Pol mu=100": (van_der_pol(100.0), [2.0, 0.0], 2.0, 200),
}
METHODS = ("implicit_euler", "trapezoid", "sdirk2", "trbdf2", "radauIIA3", "radauIIA5", "gl4")
#: A batch of independent samples through a small tanh MLP field (a neural ODE's shape): ours
#: solves each sample's stages with its own [r N, r N] matrix (``solve(..., batched=True)``);
#: torchdiffeq's Broyden iteration runs over the whole flattened batch.
BATCH, WIDTH = 32, 4


def _mlp_field() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(WIDTH, 16, generator=g, dtype=F64) / 2
    w2 = torch.randn(16, WIDTH, generator=g, dtype=F64) / 4
    return lambda t, y: torch.tanh(y @ w1) @ w2 - 5.0 * y


def _timed(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, int]:
    best, out, n_warn = float("inf"), None, 0
    for _ in range(3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            out = run()
            best = min(best, time.perf_counter() - t0)
        n_warn = len(caught)
    assert out is not None
    return out, best, n_warn


def main() -> None:
    torch.set_num_threads(1)
    td = _torchdiffeq_head()
    if td is None:
        print("TORCHDIFFEQ_HEAD unset or without the implicit methods: ours only")
    print(
        "| problem | method | ours: error | ours: s | torchdiffeq: error | torchdiffeq: s "
        "(warnings) | ours / torchdiffeq |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (f, y0_list, t_end, n) in PROBLEMS.items():
        y0 = torch.tensor(y0_list, dtype=F64)
        t = torch.linspace(0, t_end, n + 1, dtype=F64)
        ref = neuralode.solve(f, y0, t, method="rodas5p", rtol=1e-12, atol=1e-12).ys
        for m in METHODS:
            with torch.no_grad():
                ys, t_ours, _ = _timed(
                    lambda f=f, y0=y0, t=t, m=m: neuralode.odeint(f, y0, t, method=m)
                )
            err = float((ys - ref).abs().max())
            row = f"| {name} | {m} | {err:.1e} | {t_ours:.3f} |"
            if td is not None:
                with torch.no_grad():
                    ys_td, t_td, n_w = _timed(
                        lambda f=f, y0=y0, t=t, m=m: td.odeint(f, y0, t, method=m)
                    )
                err_td = float((ys_td - ref).abs().max())
                row += f" {err_td:.1e} | {t_td:.3f} ({n_w}) | {t_ours / t_td:.2f} |"
            else:
                row += " - | - | - |"
            print(row, flush=True)
    f = _mlp_field()
    y0 = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.linspace(0, 1, 21, dtype=F64)
    ref = neuralode.solve(f, y0, t, method="rodas5p", rtol=1e-12, atol=1e-12, batched=True).ys
    name = f"MLP batch {BATCH}x{WIDTH}"
    for m in ("trbdf2", "radauIIA5", "gl4"):
        with torch.no_grad():
            sol, t_ours, _ = _timed(
                lambda m=m: neuralode.solve(f, y0, t, method=m, batched=True).ys
            )
        err = float((sol - ref).abs().max())
        row = f"| {name} | {m} | {err:.1e} | {t_ours:.3f} |"
        if td is not None:
            with torch.no_grad():
                ys_td, t_td, n_w = _timed(lambda m=m: td.odeint(f, y0, t, method=m).movedim(0, 1))
            err_td = float((ys_td - ref).abs().max())
            row += f" {err_td:.1e} | {t_td:.3f} ({n_w}) | {t_ours / t_td:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
