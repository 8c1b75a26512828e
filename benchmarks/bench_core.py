"""Side-by-side timing of the solver core against torchdiffeq, in one process.

Run on a quiet machine (a second busy process slows small PyTorch workloads many times over):

    .venv/bin/python benchmarks/bench_core.py [--repeats 7] [--out results.json]

Cases (float32, dopri5 at rtol = atol = 1e-6 unless noted):
  * mlp-256: MLP 32 -> 128 -> 128 -> 32 (tanh), batch 256, t in [0, 1] (issue 4, problem 1);
  * mlp-tiny: MLP 2 -> 16 -> 2 (tanh), batch 16 (overhead-bound, the paper's spiral demo size);
  * rk4-overhead: dy/dt = -y, dim 8, batch 1, 2000 fixed rk4 steps: per-step time above the floor
    of calling the vector field alone as often.
For each, forward and forward+backward (backprop through the solver), min/median/max over
repeats, NFE, and the ratio ours / torchdiffeq.  The floor is the same number of vector-field
evaluations without a solver (chained in a plain loop, under autograd for the backward case).
The benchmark issue extends this to more peers and problems.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import neuralode

try:
    import torchdiffeq
except ImportError:  # the peer is optional: pip install -e '.[bench]'
    torchdiffeq = None


class Counted(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.nfe = net, 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.net(y)


def mlp(d: int, h: int, layers: int) -> torch.nn.Module:
    mods: list[torch.nn.Module] = [torch.nn.Linear(d, h), torch.nn.Tanh()]
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(h, h), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(h, d))


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(ts: list[float]) -> dict[str, float]:
    return {
        "min_ms": min(ts) * 1e3,
        "median_ms": statistics.median(ts) * 1e3,
        "max_ms": max(ts) * 1e3,
    }


def neural_case(name: str, d: int, h: int, layers: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    f = Counted(mlp(d, h, layers))
    y0 = torch.randn(batch, d)
    t = torch.tensor([0.0, 1.0])
    libs: dict[str, Callable[..., Any]] = {"neuralode": neuralode.odeint}
    if torchdiffeq is not None:
        libs["torchdiffeq"] = torchdiffeq.odeint
    result: dict[str, Any] = {"case": name}
    for backward in (False, True):
        mode = "forward+backward" if backward else "forward"
        for lib, odeint in libs.items():

            def run(odeint: Callable[..., Any] = odeint, backward: bool = backward) -> None:
                f.nfe = 0
                with torch.set_grad_enabled(backward):
                    ys = odeint(f, y0, t, rtol=1e-6, atol=1e-6, method="dopri5")
                    if backward:
                        ys[-1].square().sum().backward()

            ts = timed(run, repeats)
            result[f"{mode}/{lib}"] = {**summary(ts), "nfe": f.nfe}
        nfe = result[f"{mode}/neuralode"]["nfe"]

        def floor(nfe: int = nfe, backward: bool = backward) -> None:
            with torch.set_grad_enabled(backward):
                y = y0
                for _ in range(nfe):
                    y = y + 1e-3 * f(t[0], y)
                if backward:
                    y.square().sum().backward()

        result[f"{mode}/floor"] = summary(timed(floor, repeats))
        ours = result[f"{mode}/neuralode"]["min_ms"]
        result[f"{mode}/ours_over_floor"] = ours / result[f"{mode}/floor"]["min_ms"]
        if torchdiffeq is not None:
            result[f"{mode}/ours_over_torchdiffeq"] = ours / result[f"{mode}/torchdiffeq"]["min_ms"]
    return result


def rk4_overhead(repeats: int, steps: int = 2000) -> dict:
    y0 = torch.randn(1, 8)
    t = torch.tensor([0.0, 1.0])

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y

    opts = {"step_size": 1.0 / steps}
    floor = min(timed(lambda: [f(t[0], y0) for _ in range(4 * steps)], repeats))
    res: dict[str, Any] = {
        "case": "rk4-overhead",
        "steps": steps,
        "floor_us_per_step": floor / steps * 1e6,
    }
    ours = min(timed(lambda: neuralode.odeint(f, y0, t, method="rk4", options=opts), repeats))
    res["neuralode_overhead_us_per_step"] = (ours - floor) / steps * 1e6
    if torchdiffeq is not None:
        peer = min(timed(lambda: torchdiffeq.odeint(f, y0, t, method="rk4", options=opts), repeats))
        res["torchdiffeq_overhead_us_per_step"] = (peer - floor) / steps * 1e6
        res["overhead_ratio"] = (ours - floor) / (peer - floor)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [
        neural_case("mlp-256", 32, 128, 2, 256, args.repeats),
        neural_case("mlp-tiny", 2, 16, 1, 16, args.repeats),
        rk4_overhead(args.repeats),
    ]
    meta = {"torch": torch.__version__, "threads": args.threads}
    if torchdiffeq is not None:
        meta["torchdiffeq"] = getattr(torchdiffeq, "__version__", "?")
    print(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
