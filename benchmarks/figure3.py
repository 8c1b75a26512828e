"""The facts of Figure 3 of Chen et al. (2018), measured on a small neural ODE.

    .venv/bin/python benchmarks/figure3.py [--out runs/bench/figure3] [--repeats 10]

Problem (defaults): a random MLP vector field ``f(t, y) = MLP(y)``, 16 -> 64 -> 64 -> 16 (tanh),
its PyTorch-default weights scaled by ``--gain 2`` so that the flow is not nearly linear, a batch
of 64 standard-normal initial states, ``t`` in ``[0, 5]``, float64, dopri5 at rtol = atol = tol
for tol in 1e-2 .. 1e-8 (half decades).  The reference solution is dopri8 at rtol = atol = 1e-12.

  (a) Error is controlled by the tolerance: max |y(T) - y_ref(T)| over the batch against tol and
      against the forward NFE (the paper plots NFE against numerical error).
  (b) Forward wall time is proportional to forward NFE: least-squares line time = a * NFE + b over
      the tolerance grid, with its R^2 (forward solve under ``torch.no_grad``, one thread, min of
      ``--repeats`` timings after a warm-up, taken round-robin over the tolerances).
  (c) Backward NFE of the continuous adjoint relative to forward NFE (the paper finds about half),
      with the full error norm (``adjoint_options={"norm": "rms"}``) and with the seminorm, the
      default (Kidger et al. 2021: parameter-gradient channels left out of the step-size norm).
      Backward NFE is ``Solution.backward_stats.nfe`` after ``backward()`` of ``sum(y(T)**2)``;
      the relative error of the adjoint gradient (w.r.t. ``y0`` and the parameters) against
      backprop through dopri8 at 1e-12 is reported beside it, so that fewer evaluations are not
      bought with a wrong gradient.
      The backward NFE depends on the size of the loss: ``atol`` is absolute, so a loss scaled
      down (``--loss-scale``, e.g. a mean over the batch instead of a sum) makes the adjoint and
      parameter-gradient channels negligible in the error norm and the backward solve follows
      the reversed ``y`` alone.

Results: a table on stdout, ``figure3.json`` and ``figure3.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import neuralode


class MLPField(torch.nn.Module):
    """``f(t, y) = MLP(y)`` with tanh hidden layers; counts its evaluations."""

    def __init__(self, dim: int, hidden: int, layers: int, gain: float) -> None:
        super().__init__()
        mods: list[torch.nn.Module] = [torch.nn.Linear(dim, hidden), torch.nn.Tanh()]
        for _ in range(layers - 1):
            mods += [torch.nn.Linear(hidden, hidden), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*mods, torch.nn.Linear(hidden, dim))
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(gain)
        self.nfe = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.net(y)


def gradient(
    f: MLPField, y0: torch.Tensor, t: torch.Tensor, scale: float, **kwargs: Any
) -> tuple[torch.Tensor, neuralode.Solution]:
    """Flat gradient of ``scale * sum(y(T)**2)`` w.r.t. ``(y0, params)`` and the solution."""
    y = y0.clone().requires_grad_()
    f.zero_grad(set_to_none=True)
    sol = neuralode.solve(f, y, t, **kwargs)
    (scale * sol.ys[-1].square().sum()).backward()
    assert y.grad is not None
    grads = [y.grad.reshape(-1)] + [
        p.grad.reshape(-1) for p in f.parameters() if p.grad is not None
    ]
    return torch.cat(grads), sol


def time_forwards(
    f: MLPField, y0: torch.Tensor, t: torch.Tensor, tols: list[float], repeats: int
) -> list[float]:
    """Min wall time (s) of a forward solve without graph at each tolerance.

    The repeats go round-robin over the tolerances, so a burst of load from another process on a
    shared machine slows one repeat of every tolerance rather than all repeats of one.
    """
    best = [float("inf")] * len(tols)
    with torch.no_grad():
        for tol in tols:  # warm-up
            neuralode.solve(f, y0, t, method="dopri5", rtol=tol, atol=tol)
        for _ in range(repeats):
            for i, tol in enumerate(tols):
                t0 = time.perf_counter()
                neuralode.solve(f, y0, t, method="dopri5", rtol=tol, atol=tol)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dt = torch.float64
    f = MLPField(args.dim, args.hidden, args.layers, args.gain).to(dt)
    y0 = torch.randn(args.batch, args.dim, dtype=dt)
    t = torch.tensor([0.0, args.horizon], dtype=dt)
    g_ref, ref = gradient(
        f, y0, t, args.loss_scale, method="dopri8", rtol=args.ref_tol, atol=args.ref_tol
    )
    y_ref = ref.ys[-1].detach()
    tols = [float(x) for x in 10.0 ** -np.arange(args.tol_min, args.tol_max + 1e-9, args.tol_step)]
    walls = time_forwards(f, y0, t, tols, args.repeats)
    rows: list[dict[str, Any]] = []
    for tol, wall in zip(tols, walls):
        with torch.no_grad():
            sol = neuralode.solve(f, y0, t, method="dopri5", rtol=tol, atol=tol)
        row: dict[str, Any] = {
            "tol": tol,
            "fwd_nfe": int(sol.stats.nfe),
            "fwd_steps": int(sol.stats.n_steps),
            "fwd_rejected": int(sol.stats.n_rejected),
            "error": float((sol.ys[-1] - y_ref).abs().max()),
            "fwd_ms": wall * 1e3,
        }
        for name, opts in (("rms", {"norm": "rms"}), ("seminorm", {"norm": "seminorm"})):
            kw = {"rtol": tol, "atol": tol, "gradient": "adjoint", "adjoint_options": opts}
            g, s = gradient(f, y0, t, args.loss_scale, method="dopri5", **kw)
            bwd = s.backward_stats
            row[f"bwd_nfe_{name}"] = int(bwd.nfe)
            row[f"bwd_steps_{name}"] = int(bwd.n_steps)
            row[f"bwd_over_fwd_{name}"] = int(bwd.nfe) / int(s.stats.nfe)
            row[f"grad_relerr_{name}"] = float((g - g_ref).norm() / g_ref.norm())
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)

    nfe = np.array([r["fwd_nfe"] for r in rows], dtype=float)
    ms = np.array([r["fwd_ms"] for r in rows])
    slope, intercept = np.polyfit(nfe, ms, 1)
    resid = ms - (slope * nfe + intercept)
    r2 = 1.0 - float(resid @ resid) / float(((ms - ms.mean()) ** 2).sum())
    err = np.array([r["error"] for r in rows])
    tol_arr = np.array(tols)
    err_slope = float(np.polyfit(np.log10(tol_arr), np.log10(err), 1)[0])
    summary = {
        "a_error_vs_tol_loglog_slope": err_slope,
        "a_error_monotone_in_tol": bool(np.all(np.diff(err) <= 0)),
        "b_ms_per_nfe": float(slope),
        "b_intercept_ms": float(intercept),
        "b_r2": r2,
        "c_median_bwd_over_fwd_rms": statistics.median(r["bwd_over_fwd_rms"] for r in rows),
        "c_median_bwd_over_fwd_seminorm": statistics.median(
            r["bwd_over_fwd_seminorm"] for r in rows
        ),
        "c_median_seminorm_over_rms_bwd_nfe": statistics.median(
            r["bwd_nfe_seminorm"] / r["bwd_nfe_rms"] for r in rows
        ),
    }
    meta = {
        "torch": torch.__version__,
        "neuralode": neuralode.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "problem": {
            "field": f"MLP {args.dim}-{'-'.join([str(args.hidden)] * args.layers)}-{args.dim} "
            f"tanh, default init x {args.gain}",
            "batch": args.batch,
            "t": [0.0, args.horizon],
            "dtype": "float64",
            "method": "dopri5",
            "reference": f"dopri8 at rtol=atol={args.ref_tol:g} (ref NFE {int(ref.stats.nfe)})",
            "loss": f"{args.loss_scale:g} * sum(y(T)**2)",
            "seed": args.seed,
        },
    }
    return {"meta": meta, "summary": summary, "results": rows}


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'tol':>7} {'fwd NFE':>7} {'error':>9} {'fwd ms':>7} | {'bwd rms':>7} {'ratio':>5} "
        f"{'grad err':>8} | {'bwd semi':>8} {'ratio':>5} {'grad err':>8}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['tol']:>7.0e} {r['fwd_nfe']:>7d} {r['error']:>9.2e} {r['fwd_ms']:>7.2f} | "
            f"{r['bwd_nfe_rms']:>7d} {r['bwd_over_fwd_rms']:>5.2f} {r['grad_relerr_rms']:>8.1e} | "
            f"{r['bwd_nfe_seminorm']:>8d} {r['bwd_over_fwd_seminorm']:>5.2f} "
            f"{r['grad_relerr_seminorm']:>8.1e}"
        )
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = res["results"], res["summary"]
    tol = np.array([r["tol"] for r in rows])
    nfe = np.array([r["fwd_nfe"] for r in rows])
    fig, ax = plt.subplots(1, 4, figsize=(17, 4))
    ax[0].loglog(tol, [r["error"] for r in rows], "o-", label="final-time error")
    ax[0].loglog(tol, tol, "k--", lw=0.8, label="error = tol")
    ax[0].set(xlabel="rtol = atol", ylabel="max |y(T) - y_ref(T)|", title="(a) error vs tolerance")
    ax[1].loglog(nfe, [r["error"] for r in rows], "o-")
    ax[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax[1].set(xlabel="forward NFE", ylabel="max |y(T) - y_ref(T)|", title="(a) error vs NFE")
    xs = np.linspace(0, nfe.max() * 1.05, 50)
    ax[2].plot(nfe, [r["fwd_ms"] for r in rows], "o", label="measured")
    ax[2].plot(
        xs,
        s["b_ms_per_nfe"] * xs + s["b_intercept_ms"],
        "k--",
        lw=0.8,
        label=f"fit: {s['b_ms_per_nfe']:.3f} ms/NFE, R$^2$={s['b_r2']:.3f}",
    )
    ax[2].set(xlabel="forward NFE", ylabel="forward time (ms)", title="(b) time vs NFE")
    ax[3].plot(nfe, [r["bwd_nfe_rms"] for r in rows], "o-", label="adjoint, rms norm")
    ax[3].plot(nfe, [r["bwd_nfe_seminorm"] for r in rows], "s-", label="adjoint, seminorm")
    ax[3].plot(xs, xs, "k--", lw=0.8, label="backward = forward")
    ax[3].plot(xs, xs / 2, "k:", lw=0.8, label="backward = forward / 2")
    ax[3].set(xlabel="forward NFE", ylabel="backward NFE", title="(c) backward vs forward NFE")
    for a in ax:
        a.grid(alpha=0.3)
    for a in (ax[0], ax[2], ax[3]):
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/figure3", help="output folder")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2, help="hidden layers")
    ap.add_argument("--gain", type=float, default=2.0, help="scale of the default-init weights")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--horizon", type=float, default=5.0, help="integrate over [0, horizon]")
    ap.add_argument("--tol-min", type=float, default=2.0, help="loosest tol is 10**-tol_min")
    ap.add_argument("--tol-max", type=float, default=8.0, help="tightest tol is 10**-tol_max")
    ap.add_argument("--tol-step", type=float, default=0.5, help="grid step in decades")
    ap.add_argument("--ref-tol", type=float, default=1e-12)
    ap.add_argument("--loss-scale", type=float, default=1.0, help="loss = scale * sum(y(T)**2)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(table([]))
    res = measure(args)
    print()
    print(table(res["results"]))
    s = res["summary"]
    print(
        f"\n(a) error vs tol: log-log slope {s['a_error_vs_tol_loglog_slope']:.2f}, "
        f"monotone: {s['a_error_monotone_in_tol']}"
        f"\n(b) forward time = {s['b_ms_per_nfe']:.4f} ms/NFE * NFE + {s['b_intercept_ms']:.2f} ms,"
        f" R^2 = {s['b_r2']:.4f}"
        f"\n(c) median backward/forward NFE: rms {s['c_median_bwd_over_fwd_rms']:.2f}, "
        f"seminorm {s['c_median_bwd_over_fwd_seminorm']:.2f}; "
        f"seminorm/rms backward NFE {s['c_median_seminorm_over_rms_bwd_nfe']:.2f}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "figure3.json", "w") as fh:
        json.dump(res, fh, indent=1)
    plot(res, out / "figure3.png")
    print(f"\nwrote {out / 'figure3.json'} and {out / 'figure3.png'}")


if __name__ == "__main__":
    main()
