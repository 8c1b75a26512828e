"""The CUDA path, checked and timed: one script to run when a GPU is at hand (not a test).

1. Checks: every registered method (but ``scipy_solver``) with every gradient strategy it takes,
   on a small field in float64 on the GPU, against the same solve on the CPU: outputs and
   gradients (to ``y0`` and the parameters) must agree to 1e-6 (relative).  Then the compiled
   path (``compile=True``; on CUDA, ``mode="reduce-overhead"``: CUDA graphs) for dopri5 and rk4
   by backprop, and dopri5 by the adjoint (its backward solve compiled too).
2. Timing: the table of ``benchmarks/compiled.py`` (eager, compiled, torchdiffeq, the floor) on
   the GPU.

    python benchmarks/gpu.py --out runs/bench/gpu            # needs CUDA
    python benchmarks/gpu.py --device cpu --quick            # the same script, on the CPU

Writes ``gpu.json`` and prints a summary; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import neuralode

sys.path.insert(0, str(Path(__file__).parent))
import compiled as bench  # noqa: E402  (benchmarks/compiled.py)

GRADIENTS = ("backprop", "adjoint", "checkpoint")


class Field(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(y)) - 0.5 * y


def solve_on(
    device: str, method: str, gradient: str, compile: Any = False
) -> tuple[torch.Tensor, ...]:
    f = Field().to(device)
    y0 = torch.linspace(-1, 1, 12, dtype=torch.float64, device=device).view(4, 3)
    y0.requires_grad_()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64, device=device)
    kw: dict[str, Any] = {"rtol": 1e-8, "atol": 1e-10, "method": method, "batched": True}
    if not neuralode.get_solver(method).adaptive:
        kw["step_size"] = 0.05
    if gradient != "backprop":
        kw["gradient"] = gradient
    sol = neuralode.solve(f, y0, t, compile=compile, **kw)
    grads = torch.autograd.grad(sol.ys.square().sum(), (y0, *f.parameters()))
    return tuple(x.detach().cpu() for x in (sol.ys, *grads))


def close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """The largest relative difference over the tensors."""
    return max(float((x - y).abs().max() / y.abs().max().clamp(min=1e-12)) for x, y in zip(a, b))


def checks(device: str) -> list[dict[str, Any]]:
    rows = []
    for method in neuralode.METHODS:
        if method == "scipy_solver":
            continue
        solver = neuralode.get_solver(method)
        for gradient in GRADIENTS:
            if gradient == "checkpoint" and solver.multistep:
                continue
            row: dict[str, Any] = {"method": method, "gradient": gradient}
            try:
                row["rel_diff"] = close(
                    solve_on(device, method, gradient), solve_on("cpu", method, gradient)
                )
                row["ok"] = row["rel_diff"] < 1e-6
            except Exception as err:  # reported, not raised: the table shows every case
                row["ok"], row["error"] = False, f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            print(f"  {method:16s} {gradient:10s} {'ok' if row['ok'] else 'FAILED'}", flush=True)
    mode = {"mode": "reduce-overhead"} if device == "cuda" else True
    # (the adjoint compiles its backward solve too: the augmented field's vector-Jacobian
    # products traced into the blocks)
    for method, gradient in (("dopri5", "backprop"), ("rk4", "backprop"), ("dopri5", "adjoint")):
        row = {"method": method, "gradient": gradient, "compile": mode}
        try:
            row["rel_diff"] = close(
                solve_on(device, method, gradient, compile=mode),
                solve_on("cpu", method, gradient),
            )
            row["ok"] = row["rel_diff"] < 1e-6
        except Exception as err:
            row["ok"], row["error"] = False, f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        print(f"  {method:16s} {gradient:10s} compiled {'ok' if row['ok'] else 'FAILED'}",
              flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="checks, and one shape timed")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/gpu"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: pass --device cpu to run the script on the CPU")
    res: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    res["checks"] = checks(args.device)
    shapes = ["diffrax-4-32-b64"] if args.quick else list(bench.SHAPES)
    mode: Any = {"mode": "reduce-overhead"} if args.device == "cuda" else True
    res["cases"] = [
        bench.case(s, m, args.repeats, 1e-6, device=args.device, compile=mode)
        for s in shapes
        for m in ("forward", "backprop", "adjoint")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    failed = [r for r in res["checks"] if not r["ok"]]
    print(f"{len(res['checks']) - len(failed)} of {len(res['checks'])} checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
