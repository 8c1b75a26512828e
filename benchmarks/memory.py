"""Peak memory of forward + backward as the number of solver steps grows, per gradient strategy.

    .venv/bin/python benchmarks/memory.py [--out runs/bench/memory] [--horizons 1 2 5 10]

Problem (defaults): a rotation-dominated MLP vector field ``f(t, y) = y @ A + MLP(y)`` with state
64, hidden 256 (tanh), batch 128, float32; ``A`` is skew-symmetric (32 planar rotations at angular
speeds 0.5..1.5 x 2 pi), so dopri5 at a fixed tolerance (rtol = atol = 1e-5) needs a number of
steps proportional to the horizon ``T``: integrating over ``[0, T]`` for T = 1, 2, 5, 10 grows the
step count about 10x.  The loss is ``sum(y(T)**2)``; gradients go to ``y0`` and to the MLP's
parameters.  Strategies: ``gradient="backprop"``, ``"adjoint"`` (its default backward norm, the
seminorm), ``"adjoint"`` with the full norm (``adjoint_options={"norm": "rms"}``), and
``"checkpoint"`` when ``neuralode.solve`` accepts it (a ``ValueError``/``TypeError`` for an
unknown strategy skips it with a note).

How memory is measured.  Every (strategy, T) runs in a fresh subprocess (this script re-invokes
itself with ``--worker``), so no allocator state carries over between configurations.
  * CPU (the default): peak resident set size from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
    (a kernel-kept high-water mark: exact, no sampling).  The worker imports torch, builds the
    model and runs one warm-up forward + backward of the same strategy on a tiny problem (2 rows,
    T = 0.05) so that lazily created state (autograd engine threads, tableau caches, oneDNN
    kernels) is already in the baseline; the baseline is ``ru_maxrss`` after that, and the
    reported peak is ``ru_maxrss`` after the measured forward + backward minus the baseline.  The
    warm-up's own transient is kept tiny (2 rows) so that it cannot hide the measured peak.
    RSS counts what the allocator holds from the OS, so it is an upper bound on live tensor bytes
    (fragmentation and freed-but-cached heap included); the next two columns are exact.
  * "alloc MB" (CPU; skip with ``--no-profile``): the peak of live tensor bytes in PyTorch's CPU
    allocator during a second, identical forward + backward in the same process, from
    ``torch.profiler.profile(profile_memory=True)``: every allocation and free is recorded with
    its size and time, and the running sum in time order is the live-bytes curve (the CPU
    counterpart of ``torch.cuda.max_memory_allocated``; exact, but the profiler slows the run).
  * "graph MB" (both devices): the bytes autograd keeps alive for the backward pass after the
    forward solve, counted with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages of
    the tensors saved for backward).  This is the part of memory that grows with the number of
    steps under backprop and that the adjoint avoids.  Tensors that a custom autograd Function
    keeps on its ``ctx`` without ``save_for_backward`` (the checkpoint strategy's per-step start
    states) are not seen here; the "alloc MB" column includes them.
  * CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` after the measured run minus
    ``torch.cuda.memory_allocated`` before it (after ``reset_peak_memory_stats``).
Work columns: forward steps (attempted) and NFE from ``Solution.stats``; "bwd NFE" from
``Solution.backward_stats`` (the adjoint's backward solve; ``-`` where a strategy has none);
"f calls bwd" counts the vector-field calls made during ``backward()`` (the adjoint's backward
solve, the checkpoint strategy's step replays; 0 for backprop, whose backward reuses the graph).
The worker runs single-threaded (``--threads 1``) so that per-thread allocator arenas do not add
noise.  Results: a table on stdout, ``memory.json`` and ``memory.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import neuralode

STRATEGIES: dict[str, dict[str, Any]] = {
    "backprop": {"gradient": "backprop"},
    "adjoint": {"gradient": "adjoint"},  # the default backward norm: the seminorm
    "adjoint-rms": {"gradient": "adjoint", "adjoint_options": {"norm": "rms"}},  # full norm
    "checkpoint": {"gradient": "checkpoint"},
}


class RotatingMLP(torch.nn.Module):
    """``f(t, y) = y @ A + MLP(y)``: fixed planar rotations plus a trainable tanh MLP."""

    def __init__(self, dim: int, hidden: int, omega: float) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even (planar rotations), got {dim}")
        speeds = omega * torch.linspace(0.5, 1.5, dim // 2)
        a = torch.zeros(dim, dim)
        i = torch.arange(0, dim, 2)
        a[i, i + 1] = speeds
        a[i + 1, i] = -speeds
        self.register_buffer("A", a)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim)
        )
        self.nfe = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return y @ self.A + self.net(y)


def _rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux); NaN elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return math.nan


def _maxrss_mb() -> float:
    """Peak resident set size of this process so far (MB); ru_maxrss is KiB on Linux."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10


class SavedBytes:
    """Counts the bytes of unique storages that autograd saves for backward inside the context."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        s = x.untyped_storage()
        self.storages[s.data_ptr()] = s.nbytes()
        return x

    @staticmethod
    def unpack(x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / 2**20


def _profiled_peak_mb(fn: Callable[[], Any]) -> float:
    """Peak of live CPU tensor bytes allocated during ``fn()`` (above those live before it).

    torch.profiler with ``profile_memory=True`` records every allocation and free of PyTorch's CPU
    allocator with its size and time; the running sum in time order is the live-bytes curve.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    assert prof.profiler is not None
    events = prof.profiler.kineto_results.events()
    mem = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this (fresh) process; returns the measurements."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    f = RotatingMLP(args.dim, args.hidden, args.omega * 2 * math.pi).to(device)
    y0_full = torch.randn(args.batch, args.dim, device=device)
    kwargs = dict(STRATEGIES[args.strategy])

    def run(rows: int, horizon: float, saved: SavedBytes | None = None) -> neuralode.Solution:
        y0 = y0_full[:rows].clone().requires_grad_()
        t = torch.tensor([0.0, horizon], device=device)
        if saved is not None:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                sol = neuralode.solve(
                    f, y0, t, method=args.method, rtol=args.tol, atol=args.tol, **kwargs
                )
        else:
            sol = neuralode.solve(
                f, y0, t, method=args.method, rtol=args.tol, atol=args.tol, **kwargs
            )
        sol.ys[-1].square().sum().backward()
        return sol

    try:
        run(2, 0.05)  # warm-up: lazily created state goes into the baseline
    except (ValueError, TypeError, NotImplementedError) as exc:
        return {"strategy": args.strategy, "T": args.horizon, "skipped": str(exc)}
    f.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _maxrss_mb()
    rss_at_base = _rss_mb()
    saved = SavedBytes()
    f.nfe = 0
    t0 = time.perf_counter()
    sol = run(args.batch, args.horizon, saved)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _maxrss_mb()
    ) - base
    fwd_nfe = int(sol.stats.nfe.sum())
    f_calls_bwd = f.nfe - fwd_nfe
    bwd = getattr(sol, "backward_stats", None)
    alloc_peak = None
    if args.profile and device.type == "cpu":
        f.zero_grad(set_to_none=True)
        alloc_peak = _profiled_peak_mb(lambda: run(args.batch, args.horizon))
    return {
        "strategy": args.strategy,
        "T": args.horizon,
        "fwd_steps": int(sol.stats.n_steps.sum()),
        "fwd_accepted": int(sol.stats.n_accepted.sum()),
        "fwd_nfe": fwd_nfe,
        "bwd_nfe": int(bwd.nfe.sum()) if bwd is not None else None,
        "bwd_steps": int(bwd.n_steps.sum()) if bwd is not None else None,
        "f_calls_in_backward": f_calls_bwd,
        "peak_mb": peak,
        "alloc_peak_mb": alloc_peak,
        "graph_mb": saved.mb,
        "baseline_mb": base,
        "rss_at_baseline_mb": rss_at_base,
        "wall_s": wall,
    }


def spawn(args: argparse.Namespace, strategy: str, horizon: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    cmd += ["--strategy", strategy, "--horizon", repr(horizon)]
    for k in ("dim", "hidden", "batch", "method", "tol", "omega", "threads", "device"):
        cmd += [f"--{k}", str(getattr(args, k))]
    if not args.profile:
        cmd.append("--no-profile")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"strategy": strategy, "T": horizon, "failed": err}
    return json.loads(lines[-1][len("RESULT ") :])


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'strategy':<17} {'T':>5} {'fwd steps':>9} {'fwd NFE':>8} {'bwd NFE':>8} "
        f"{'f calls bwd':>11} {'peak MB':>8} {'alloc MB':>8} {'graph MB':>9} {'time s':>7}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r or "failed" in r:
            why = r.get("skipped") or r.get("failed")
            out.append(f"{r['strategy']:<17} {r['T']:>5g}  skipped: {why}")
            continue
        out.append(
            f"{r['strategy']:<17} {r['T']:>5g} {r['fwd_steps']:>9d} {r['fwd_nfe']:>8d} "
            f"{_fmt(r['bwd_nfe'], '>8d'):>8} {r['f_calls_in_backward']:>11d} "
            f"{r['peak_mb']:>8.1f} {_fmt(r['alloc_peak_mb'], '>8.1f'):>8} "
            f"{r['graph_mb']:>9.1f} {r['wall_s']:>7.2f}"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("peak_mb", "peak RSS of forward + backward (above baseline)", "linear"),
        ("alloc_peak_mb", "peak of live tensor bytes (torch.profiler)", "log"),
        ("graph_mb", "bytes saved for backward by the forward solve", "linear"),
    ]
    done = [r for r in rows if "peak_mb" in r]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in done)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, title, yscale) in zip(axes[0], panels):
        for name in dict.fromkeys(r["strategy"] for r in done):
            rs = sorted((r for r in done if r["strategy"] == name), key=lambda r: r["fwd_steps"])
            ax.plot([r["fwd_steps"] for r in rs], [r[key] for r in rs], "o-", label=name)
        ax.set_title(title, fontsize=10)
        ax.set_yscale(yscale)
        ax.set_xlabel("forward solver steps")
        ax.set_ylabel("MB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/memory", help="output folder")
    ap.add_argument("--horizons", type=float, nargs="+", default=[1.0, 2.0, 5.0, 10.0])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--method", default="dopri5")
    ap.add_argument("--tol", type=float, default=1e-5, help="rtol = atol")
    ap.add_argument("--omega", type=float, default=1.0, help="mean rotation speed, turns per unit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="CPU: skip the second, profiled run that measures the allocator's peak",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="backprop", help=argparse.SUPPRESS)
    ap.add_argument("--horizon", type=float, default=1.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")

    rows: list[dict[str, Any]] = []
    for strategy in args.strategies:
        for horizon in args.horizons:
            r = spawn(args, strategy, horizon)
            rows.append(r)
            print(table([r]).splitlines()[-1], flush=True)
            if "skipped" in r:
                break  # the strategy is not available: one note is enough
    print()
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    measure = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "ru_maxrss"
    meta = {
        "torch": torch.__version__,
        "neuralode": neuralode.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": args.device,
        "threads": args.threads,
        "measure": f"{measure} above a per-process baseline, one fresh process per row",
        "problem": {
            "field": "y @ A + MLP(y), A skew-symmetric rotations",
            "dim": args.dim,
            "hidden": args.hidden,
            "batch": args.batch,
            "dtype": "float32",
            "method": args.method,
            "rtol": args.tol,
            "atol": args.tol,
            "omega_turns_per_unit": args.omega,
            "loss": "sum(y(T)**2)",
        },
    }
    with open(out / "memory.json", "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)
    plot(rows, out / "memory.png")
    print(f"\nwrote {out / 'memory.json'} and {out / 'memory.png'}")


if __name__ == "__main__":
    main()
