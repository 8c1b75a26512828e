"""Eager against compiled solves (``solve(..., compile=True)``), side by side in one process.

For each shape and gradient mode: the eager solve, the compiled one (inductor, the default
options), torchdiffeq where it is installed, and the floor (the same number of bare evaluations
of the field, chained, eager), on one thread as in compare.py.  Times are the best of
interleaved rounds; the compiled solve's first two calls (compilation included: the second may
compile the block size the first solve's step count chose) are timed apart, and
the break-even is the number of solves after which compiling has paid for itself.  Then rk4's
per-step time on a trivial field (10,000 steps), eager and compiled.

    python benchmarks/compiled.py --out runs/bench/compiled     # or: make bench-compiled
    python benchmarks/compiled.py --parts    # where the tiny MLP's compiled forward goes

Writes ``compiled.json`` and ``compiled.md`` (the table in docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import neuralode

try:  # a peer, where installed (the bench extra)
    import torchdiffeq
except ImportError:  # pragma: no cover - depends on the environment
    torchdiffeq = None

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (benchmarks/compare.py: its problems carry the JAX field too)
import peers  # noqa: E402


class Field(torch.nn.Module):
    """The MLP field.  Ours report their evaluations in ``Solution.stats``; torchdiffeq's are
    counted by :class:`Counted` (a counter in the field would be a Python side effect in every
    compiled graph, and a new guard value on every call)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class Counted(torch.nn.Module):
    def __init__(self, f: torch.nn.Module) -> None:
        super().__init__()
        self.f, self.nfe = f, 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.f(t, y)


#: name -> (layer sizes, activations after each linear layer, batch, t1): compare.py's shapes.
SHAPES: dict[str, tuple[list[int], list[str], int, float]] = {
    "mlp-32-128-b256": ([32, 128, 128, 32], ["tanh", "tanh", "id"], 256, 1.0),
    "diffrax-4-32-b64": ([4, 32, 4], ["softplus", "tanh"], 64, 100.0),
    "tiny-2-16-b16": ([2, 16, 2], ["tanh", "id"], 16, 1.0),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(
    runners: dict[str, Callable[[], Any]], repeats: int, device: torch.device | None = None
) -> dict[str, float]:
    """Best time (ms) of each runner over ``repeats`` interleaved rounds (a GPU's queue is
    drained before and after each)."""
    dev = device or torch.device("cpu")
    best = {k: float("inf") for k in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {k: v * 1e3 for k, v in best.items()}


def case(
    shape: str, mode: str, repeats: int, tol: float, device: str = "cpu", compile: Any = True
) -> dict[str, Any]:
    """One shape and mode: eager, compiled (``compile=`` as given), torchdiffeq, the floor."""
    sizes, acts, batch, t1 = SHAPES[shape]
    dev = torch.device(device)
    p = compare.mlp_problem(shape, sizes, acts, batch, t1)  # the weights diffrax gets too
    f = Field(p.f_torch.net).to(dev)
    y0 = p.y0.to(dev)
    t = torch.tensor([0.0, t1], device=dev)
    grad = {"forward": None, "backprop": "backprop", "adjoint": "adjoint"}[mode]

    counted = Counted(f)

    def ours(compile: Any) -> Callable[[], int]:
        def run() -> int:
            with torch.set_grad_enabled(grad is not None):
                sol = neuralode.solve(
                    f, y0, t, rtol=tol, atol=tol, gradient=grad or "backprop", compile=compile
                )
                if grad is not None:
                    sol.ys[-1].square().sum().backward()
            nb = sol.backward_stats.nfe if grad == "adjoint" else 0
            return int(sol.stats.nfe) + int(nb)

        return run

    def peer() -> int:
        assert torchdiffeq is not None
        counted.nfe = 0
        solver = torchdiffeq.odeint_adjoint if grad == "adjoint" else torchdiffeq.odeint
        with torch.set_grad_enabled(grad is not None):
            y1 = solver(counted, y0, t, rtol=tol, atol=tol, method="dopri5")[-1]
            if grad is not None:
                y1.square().sum().backward()
        return counted.nfe

    eager, compiled = ours(False), ours(compile)
    t0 = time.perf_counter()
    nfe_c = compiled()  # compiles (and fills inductor's cache)
    # The second call too: its blocks end where the first solve ended, which may take a block
    # size the first call did not compile (a 3-step solve: a block of 3 after one of 4).
    compiled()
    first = time.perf_counter() - t0
    nfe_e = eager()
    fwd_nfe = int(neuralode.solve(f, y0, t, rtol=tol, atol=tol).stats.nfe)

    def floor() -> None:
        with torch.set_grad_enabled(grad == "backprop"):
            y = y0
            for _ in range(fwd_nfe):
                y = y + 1e-3 * f(t, y)
            if grad == "backprop":
                y.square().sum().backward()

    runners: dict[str, Callable[[], Any]] = {"eager": eager, "compiled": compiled}
    if grad != "adjoint":  # the adjoint's floor would need its backward evaluations too
        runners["floor"] = floor
    nfe_p = None
    if torchdiffeq is not None:
        runners["torchdiffeq"] = peer
        nfe_p = peer()
    jax_run = peers.prepare("diffrax", p, "dopri5", tol, tol, grad) if dev.type == "cpu" else ""
    nfe_j = None
    if not isinstance(jax_run, str):
        runners["diffrax"] = jax_run
        nfe_j = jax_run().nfe  # compiles (jit)
    ms = best_of(runners, repeats, dev)
    saved = ms["eager"] - ms["compiled"]
    out = {
        "shape": shape, "mode": mode, "ms": ms, "nfe": {"eager": nfe_e, "compiled": nfe_c},
        "nfe_forward": fwd_nfe, "first_call_s": first,
        "compiled_over_eager": ms["compiled"] / ms["eager"],
        "break_even_solves": (first * 1e3 / saved) if saved > 0 else None,
    }  # fmt: skip
    if "floor" in ms:
        out["compiled_over_floor"] = ms["compiled"] / ms["floor"]
        out["eager_over_floor"] = ms["eager"] / ms["floor"]
    if "torchdiffeq" in ms:
        out["nfe"]["torchdiffeq"] = nfe_p
        out["compiled_over_torchdiffeq"] = ms["compiled"] / ms["torchdiffeq"]
    if "diffrax" in ms:
        out["nfe"]["diffrax"] = nfe_j
        out["compiled_over_diffrax"] = ms["compiled"] / ms["diffrax"]
        out["eager_over_diffrax"] = ms["eager"] / ms["diffrax"]
    print(
        f"{shape:18s} {mode:8s} eager {ms['eager']:8.2f} ms  compiled {ms['compiled']:8.2f} ms "
        f"({out['compiled_over_eager']:.2f}x)  first call {first:5.1f} s  nfe {nfe_e}/{nfe_c}",
        flush=True,
    )
    return out


def parts(shape: str = "tiny-2-16-b16", solves: int = 2000, tol: float = 1e-6) -> dict[str, float]:
    """Where a compiled forward solve's time goes (us per solve, the mean of ``solves`` after a
    warm-up): the entry's checks and first evaluation (``normalise``), the driver's set-up
    (``drive`` less its compiled call), the compiled call (``torch.compile``'s wrappers and the
    generated code) and the rest of ``solve``; each part timed by wrapping its function."""
    import sys as _sys

    sizes, acts, batch, t1 = SHAPES[shape]
    p = compare.mlp_problem(shape, sizes, acts, batch, t1)
    f, y0, t = Field(p.f_torch.net), p.y0, torch.tensor([0.0, t1])
    spent: dict[str, float] = {}
    mods = {
        "normalise": _sys.modules["neuralode.solve"],
        "drive": _sys.modules["neuralode._loop"],
        "call": _sys.modules["neuralode._compiled"],
    }
    names = {"normalise": "normalise", "drive": "drive", "call": "_call"}
    real = {k: getattr(m, names[k]) for k, m in mods.items()}

    def timed(key: str) -> Callable[..., Any]:
        def run(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real[key](*args, **kw)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0

        return run

    def solve() -> None:
        with torch.no_grad():
            neuralode.solve(f, y0, t, rtol=tol, atol=tol, compile=True)

    for key, m in mods.items():
        setattr(m, names[key], timed(key))
    try:
        for _ in range(5):
            solve()
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(solves):
            solve()
        total = time.perf_counter() - t0
    finally:
        for key, m in mods.items():
            setattr(m, names[key], real[key])
    us = {k: v * 1e6 / solves for k, v in spent.items()}
    out = {
        "total": total * 1e6 / solves,
        "entry (normalise)": us["normalise"],
        "driver set-up": us["drive"] - us["call"],
        "compiled call": us["call"],
    }
    out["rest of solve"] = out["total"] - us["normalise"] - us["drive"]
    print(f"{shape} compiled forward, us per solve: "
          + ", ".join(f"{k} {v:.0f}" for k, v in out.items()))  # fmt: skip
    return out


def rk4_steps(steps: int, repeats: int, blocks: tuple[int, ...] = ()) -> dict[str, Any]:
    """Per-step time of rk4 on a trivial field (the solver's own overhead): eager, compiled
    (the default options, and each of ``blocks`` steps per loop iteration), and diffrax's (jit,
    compare.py's overhead problem) where it is installed; one interleaved timing."""
    y0 = torch.randn(1, 8)
    t = torch.tensor([0.0, 1.0])

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y

    def run(compile: Any) -> Callable[[], None]:
        return lambda: (
            neuralode.solve(f, y0, t, method="rk4", step_size=1.0 / steps, compile=compile).ys
        )

    firsts = {}
    runners: dict[str, Callable[[], Any]] = {"eager": run(False)}
    for name, opts in [("compiled", True)] + [
        (f"compiled, block {k}", neuralode.CompileOptions(block=k, loop=True)) for k in blocks
    ]:
        t0 = time.perf_counter()
        run(opts)()
        firsts[name] = time.perf_counter() - t0
        runners[name] = run(opts)
    p = peers.Problem("decay-dim8", f, y0, 0.0, 1.0, lambda t, y, a: -y)
    jax_run = peers.prepare("diffrax", p, "rk4", gradient=None, step_size=1.0 / steps)
    if not isinstance(jax_run, str):
        jax_run()  # compiles (jit)
        runners["diffrax"] = jax_run
    ms = best_of(runners, repeats)
    us = {k: v * 1e3 / steps for k, v in ms.items()}
    print(f"rk4 {steps} steps: " + ", ".join(f"{k} {v:.2f} us/step" for k, v in us.items()))
    out = {"steps": steps, "us_per_step": us, "first_call_s": firsts["compiled"]}
    out["first_call_s_by_variant"] = firsts
    if "diffrax" in us:
        out["compiled_over_diffrax"] = us["compiled"] / us["diffrax"]
        out["over_diffrax_by_variant"] = {
            k: v / us["diffrax"] for k, v in us.items() if k.startswith("compiled")
        }
    return out


def table(res: dict[str, Any]) -> str:
    rows = [
        "| shape | mode | NFE | eager ms | compiled ms | compiled / eager | compiled / floor "
        "| compiled / torchdiffeq | eager / diffrax | compiled / diffrax | first calls s "
        "| break-even solves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(x: Any, spec: str = ".2f") -> str:
        return "n/a" if x is None else format(x, spec)

    for c in res["cases"]:
        be = c["break_even_solves"]
        rows.append(
            f"| {c['shape']} | {c['mode']} | {c['nfe']['compiled']} | {c['ms']['eager']:.2f} "
            f"| {c['ms']['compiled']:.2f} | {c['compiled_over_eager']:.2f} "
            f"| {fmt(c.get('compiled_over_floor'))} | {fmt(c.get('compiled_over_torchdiffeq'))} "
            f"| {fmt(c.get('eager_over_diffrax'))} | {fmt(c.get('compiled_over_diffrax'))} "
            f"| {c['first_call_s']:.1f} | {'never' if be is None else f'{be:.0f}'} |"
        )
    r = res["rk4"]
    rows.append("")
    us = r["us_per_step"]
    peer = ""
    if "diffrax" in us:
        ratio = r["compiled_over_diffrax"]
        peer = f", diffrax {us['diffrax']:.2f} (compiled / diffrax {ratio:.1f})"
    rows.append(
        f"rk4, trivial field, {r['steps']} steps: eager {us['eager']:.1f} us/step, "
        f"compiled {us['compiled']:.2f} us/step{peer} (first call {r['first_call_s']:.1f} s)."
    )
    for name, first in r.get("first_call_s_by_variant", {}).items():
        if name != "compiled":
            ratio = r.get("over_diffrax_by_variant", {}).get(name)
            vs = "" if ratio is None else f" (/ diffrax {ratio:.1f})"
            rows.append(f"{name}: {us[name]:.2f} us/step{vs}, first call {first:.1f} s.")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="none: rk4 only")
    ap.add_argument("--modes", nargs="+", default=["forward", "backprop", "adjoint"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--rk4-steps", type=int, default=10_000)
    ap.add_argument(
        "--rk4-blocks", type=int, nargs="*", default=[], help="also time these steps per iteration"
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/compiled"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (compare.py's: 1)")
    ap.add_argument(
        "--parts", action="store_true", help="only: where the tiny MLP's compiled forward goes"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.parts:
        parts()
        return
    res: dict[str, Any] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torchdiffeq": getattr(torchdiffeq, "__version__", None), "tol": args.tol,
        "diffrax": peers.available("diffrax"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }  # fmt: skip
    res["cases"] = [case(s, m, args.repeats, args.tol) for s in args.shapes for m in args.modes]
    res["rk4"] = rk4_steps(args.rk4_steps, max(3, args.repeats // 5), tuple(args.rk4_blocks))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compiled.json").write_text(json.dumps(res, indent=1))
    (args.out / "compiled.md").write_text(table(res) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
