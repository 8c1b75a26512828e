"""Stiff problems: neuralode's stiff methods against scipy's stiff solvers, in one run.

Run on a quiet machine (a second busy process slows small PyTorch workloads many times over):

    .venv/bin/python benchmarks/stiff.py [--tols 3 4 5 6 7 8] [--batch 1024] \
        [--out runs/bench/stiff]

Work-precision, one problem at a time (float64, one thread):

* Robertson's chemical kinetics, t in [0, 4e5] (outputs at 0.4 * 10^k), atol = 1e-4 rtol;
* Van der Pol with mu = 1e3, t in [0, 3000], atol = rtol;
* HIRES (Hairer and Wanner II, IV.10), t in [0, 321.8122], atol = 1e-4 rtol.

Ours: ``rosenbrock23``, ``rodas4``, ``rodas5p``, the ESDIRK ``kvaerno5`` (``kvaerno3``, an
order-3 method for loose tolerances, would take ~10^4 steps at rtol 1e-8: left out) and ``auto``
(tsit5 switching to rodas5p) on the torch field (Jacobians by autograd), and ``--compiled``
methods with ``compile=True`` (the compiled driver; timed after the first call, which compiles
and is reported apart, as diffrax's is; ``--block`` sets its attempts per compiled call);
scipy's ``Radau``, ``BDF`` and ``LSODA`` on a NumPy copy of the field with their default
finite-difference Jacobians, as a scipy user would run them; diffrax's ``Kvaerno5`` (JAX,
jit-compiled, one CPU thread, Jacobians by JAX's autodiff; timed after its compilation, which is
reported apart) on a JAX copy, when the bench extra is installed.  Errors are measured against Radau
at rtol 1e-12, as the largest ``|y - y_ref| / (atol + rtol |y_ref|)`` over the outputs (tolerance
units).  Times are the median of ``--repeats`` runs.

Batched: ``--batch`` Robertson problems with rate constants spread over an order of magnitude
(each ``k_i`` times 10^U(0, 1)), rtol 1e-6: one batched ``solve`` (each sample with its own
steps; rodas5p and kvaerno5) against scipy solving them one after another.

Writes ``<out>.json`` and ``<out>.md`` (the tables of docs/concepts/stiff.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp

import neuralode

OURS = ("rosenbrock23", "rodas4", "rodas5p", "kvaerno5", "auto")
SCIPY = ("Radau", "BDF", "LSODA")

# JAX: one CPU thread like the others, float64.  Optional (pip install -e '.[bench]').
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
try:
    import diffrax
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - the bench extra is not installed
    diffrax = jax = jnp = None


# The problems are the tests' (tests/stiff_problems.py): a torch field and a NumPy copy each.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from stiff_problems import K_ROBERTSON, hires_terms, robertson, robertson_np  # noqa: E402
from stiff_problems import PROBLEMS as _PROBLEMS  # noqa: E402

#: The work-precision problems (OREGO is in the tests only).
PROBLEMS: dict[str, dict[str, Any]] = {
    name: dict(f_t=f_t, f_np=f_np, y0=y0, ts=ts, atol_scale=scale)
    for name, (f_t, f_np, y0, ts, scale) in _PROBLEMS.items()
    if name != "orego"
}


def _jax_fields() -> dict[str, Callable[[Any, Any], Any]]:
    """JAX copies of the work-precision fields (tests/stiff_problems.py)."""
    k1, k2, k3 = K_ROBERTSON

    def rob(t: Any, y: Any) -> Any:
        r1, r2, r3 = k1 * y[0], k2 * y[1] ** 2, k3 * y[1] * y[2]
        return jnp.stack([-r1 + r3, r1 - r2 - r3, r2])

    def vdp(t: Any, y: Any) -> Any:
        return jnp.stack([y[1], 1e3 * (1 - y[0] ** 2) * y[1] - y[0]])

    def hires(t: Any, y: Any) -> Any:
        return jnp.stack(hires_terms(y))

    return {"robertson": rob, "vdp_mu1e3": vdp, "hires": hires}


def diffrax_kvaerno5(name: str, p: dict[str, Any], rtol: float, atol: float) -> tuple[Any, float]:
    """A compiled diffrax Kvaerno5 solve of problem ``name`` and its compilation time."""
    f = _jax_fields()[name]
    term = diffrax.ODETerm(lambda t, y, args: f(t, y))
    ts = jnp.asarray(p["ts"])
    y0 = jnp.asarray(p["y0"], dtype=jnp.float64)

    @jax.jit
    def solve(y0: Any) -> Any:
        return diffrax.diffeqsolve(
            term, diffrax.Kvaerno5(), ts[0], ts[-1], None, y0,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=200_000, throw=False,
        )  # fmt: skip

    def run() -> Any:
        sol = solve(y0)
        jax.block_until_ready(sol.ys)
        return sol

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def reference(p: dict[str, Any]) -> np.ndarray:
    sol = solve_ivp(
        p["f_np"], (p["ts"][0], p["ts"][-1]), p["y0"], method="Radau", t_eval=p["ts"],
        rtol=1e-12, atol=1e-14,
    )  # fmt: skip
    assert sol.success, sol.message
    return sol.y.T


def units(ys: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> float:
    return float(np.max(np.abs(ys - ref) / (atol + rtol * np.abs(ref))))


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def work_precision(
    tols: list[int],
    repeats: int,
    ours: tuple[str, ...] = OURS,
    compiled: tuple[str, ...] = ("rodas5p",),
    problems: tuple[str, ...] = tuple(PROBLEMS),
    block: int | None = None,
) -> list[dict[str, Any]]:
    rows = []
    compiled_as = f" compiled (block {block})" if block else " compiled"
    for name in problems:
        p = PROBLEMS[name]
        ref = reference(p)
        ts_t = torch.tensor(p["ts"], dtype=torch.float64)
        y0_t = torch.tensor(p["y0"], dtype=torch.float64)
        for e in tols:
            rtol = 10.0**-e
            atol = rtol * p["atol_scale"]
            for m, comp in [(m, False) for m in ours] + [(m, True) for m in compiled]:
                run = functools.partial(
                    neuralode.solve, p["f_t"], y0_t, ts_t, method=m, rtol=rtol, atol=atol,
                    throw=False, compile={"block": block} if comp else False,
                )  # fmt: skip
                t0 = time.perf_counter()
                run()
                first = time.perf_counter() - t0
                secs, sol = median_time(run, repeats)
                ok = bool(sol.success)
                row = dict(
                    problem=name, rtol=rtol, solver=m + compiled_as if comp else m,
                    seconds=secs, ok=ok,
                    error=units(sol.ys.numpy(), ref, rtol, atol) if ok else None,
                    steps=int(sol.stats.n_steps), nfe=int(sol.stats.nfe),
                    njev=int(sol.stats.njev),
                )  # fmt: skip
                if comp:
                    row["first_call_seconds"] = first
                rows.append(row)
            for m in SCIPY:
                theirs = functools.partial(
                    solve_ivp, p["f_np"], (p["ts"][0], p["ts"][-1]), p["y0"], method=m,
                    t_eval=p["ts"], rtol=rtol, atol=atol,
                )  # fmt: skip
                secs, sol = median_time(theirs, repeats)
                n = len(p["y0"])
                # Its accepted steps (untimed): without t_eval, sol.t holds every step's end.
                steps = len(solve_ivp(
                    p["f_np"], (p["ts"][0], p["ts"][-1]), p["y0"], method=m, rtol=rtol, atol=atol
                ).t) - 1  # fmt: skip
                rows.append(
                    dict(
                        problem=name, rtol=rtol, solver=f"scipy {m}", seconds=secs,
                        ok=bool(sol.success),
                        error=units(sol.y.T, ref, rtol, atol) if sol.success else None,
                        steps=steps, nfe=int(sol.nfev) + n * int(sol.njev), njev=int(sol.njev),
                    )
                )  # fmt: skip
            if diffrax is not None:
                run, compile_secs = diffrax_kvaerno5(name, p, rtol, atol)
                secs, sol = median_time(run, repeats)
                ok = bool(sol.result == diffrax.RESULTS.successful)
                rows.append(
                    dict(
                        problem=name, rtol=rtol, solver="diffrax Kvaerno5", seconds=secs, ok=ok,
                        error=units(np.asarray(sol.ys), ref, rtol, atol) if ok else None,
                        steps=int(sol.stats["num_steps"]), nfe=None, njev=None,
                        compile_seconds=compile_secs,
                    )
                )  # fmt: skip
            done = [r for r in rows if r["problem"] == name and r["rtol"] == rtol]
            print(
                name,
                f"rtol=1e-{e}",
                " ".join(f"{r['solver']}:{r['seconds'] * 1e3:.0f}ms/{r['error']}" for r in done),
                flush=True,
            )
    return rows


def batched(batch: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    k = torch.tensor(K_ROBERTSON, dtype=torch.float64) * 10 ** torch.rand(batch, 3, generator=g)
    ts = np.array([0.0, 0.4, 4.0, 40.0, 400.0, 4e3, 4e4])
    rtol, atol = 1e-6, 1e-10
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(batch, 3)
    t0 = time.perf_counter()
    sol = neuralode.solve(
        robertson(k), y0, torch.tensor(ts), batched=True, method="rodas5p", rtol=rtol, atol=atol
    )
    ours = time.perf_counter() - t0
    out: dict[str, Any] = dict(
        batch=batch, rtol=rtol, atol=atol, ours_seconds=ours,
        ours_steps_min=int(sol.stats.n_steps.min()), ours_steps_max=int(sol.stats.n_steps.max()),
    )  # fmt: skip
    t0 = time.perf_counter()
    kv = neuralode.solve(
        robertson(k), y0, torch.tensor(ts), batched=True, method="kvaerno5", rtol=rtol, atol=atol
    )
    out["kvaerno5_seconds"] = time.perf_counter() - t0
    out["kvaerno5_steps_max"] = int(kv.stats.n_steps.max())
    out["kvaerno5_max_abs_difference_to_rodas5p"] = float((kv.ys - sol.ys).abs().max())
    comp = functools.partial(
        neuralode.solve, robertson(k), y0, torch.tensor(ts), batched=True, method="rodas5p",
        rtol=rtol, atol=atol, compile=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    comp()
    out["compiled_first_call_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    csol = comp()
    out["compiled_seconds"] = time.perf_counter() - t0
    out["compiled_max_abs_difference_to_eager"] = float((csol.ys - sol.ys).abs().max())
    errs = []
    for m in SCIPY:
        t0 = time.perf_counter()
        ys = []
        for i in range(batch):
            s = solve_ivp(
                robertson_np(k[i].tolist()), (ts[0], ts[-1]), [1.0, 0.0, 0.0], method=m,
                t_eval=ts, rtol=rtol, atol=atol,
            )  # fmt: skip
            ys.append(s.y.T)
        out[f"scipy_{m}_seconds"] = time.perf_counter() - t0
        errs.append(float(np.abs(np.stack(ys) - sol.ys.numpy()).max()))
        print(f"batch {batch}: ours {ours:.2f}s, scipy {m} {out[f'scipy_{m}_seconds']:.2f}s")
    out["max_abs_difference_to_scipy"] = max(errs)
    return out


def markdown(rows: list[dict[str, Any]], batch: dict[str, Any] | None) -> str:
    lines = []
    for name in dict.fromkeys(r["problem"] for r in rows):
        solvers = list(dict.fromkeys(r["solver"] for r in rows if r["problem"] == name))
        lines += [
            f"**{name}** (time in ms / error in tolerance units / steps, f evaluations, "
            f"Jacobians; diffrax: steps)",
            "",
            "| rtol | " + " | ".join(solvers) + " |",
            "|---" * (1 + len(solvers)) + "|",
        ]
        for rtol in sorted({r["rtol"] for r in rows if r["problem"] == name}, reverse=True):
            cells = []
            for r in rows:
                if r["problem"] == name and r["rtol"] == rtol:
                    err = "fail" if r["error"] is None else f"{r['error']:.2g}"
                    work = f"{r['steps']} steps"
                    if r["nfe"] is not None:
                        work += f", {r['nfe']}, {r['njev']}"
                    cells.append(f"{r['seconds'] * 1e3:.0f} / {err} / {work}")
            lines.append(f"| {rtol:.0e} | " + " | ".join(cells) + " |")
        lines.append("")
    compiled = [r["compile_seconds"] for r in rows if "compile_seconds" in r]
    if compiled:
        lines += [
            f"diffrax compiles each (problem, tolerance) once before it is timed: "
            f"{min(compiled):.1f}-{max(compiled):.1f} s here, not in the times above.",
            "",
        ]
    # Only a (problem, method)'s first tolerance compiles: the tolerances are graph inputs, and
    # the later first calls (milliseconds) would only blur the range.
    first_of: dict[tuple[str, str], float] = {}
    for r in rows:
        if "first_call_seconds" in r:
            first_of.setdefault((r["problem"], r["solver"]), r["first_call_seconds"])
    ours_first = list(first_of.values())
    if ours_first:
        lines += [
            f"Our compiled solves' first calls (compiling once per problem and method: the "
            f"tolerances are graph inputs) took {min(ours_first):.1f}-{max(ours_first):.1f} s, "
            f"not in the times above.",
            "",
        ]
    if batch:
        best = min(batch[f"scipy_{m}_seconds"] for m in SCIPY)
        lines.append(
            f"Batched: {batch['batch']} Robertson problems (rates x 10^U(0,1)), rtol 1e-6: "
            f"rodas5p batched {batch['ours_seconds']:.2f} s "
            f"({batch['ours_steps_min']}-{batch['ours_steps_max']} steps per sample), kvaerno5 "
            f"batched {batch['kvaerno5_seconds']:.2f} s, rodas5p compiled "
            f"{batch['compiled_seconds']:.2f} s (first call "
            f"{batch['compiled_first_call_seconds']:.0f} s); scipy "
            + ", ".join(f"{m} {batch[f'scipy_{m}_seconds']:.1f} s" for m in SCIPY)
            + f" one by one; ours / best scipy = {batch['ours_seconds'] / best:.3f}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tols", type=int, nargs="+", default=[3, 4, 5, 6, 7, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024, help="0 skips the batched comparison")
    ap.add_argument("--out", default="runs/bench/stiff")
    ap.add_argument("--ours", nargs="*", default=list(OURS), help="eager methods")
    ap.add_argument("--compiled", nargs="*", default=["rodas5p"], help="compiled methods")
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument(
        "--block", type=int, default=None, help="attempts per compiled call (CompileOptions.block)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = work_precision(
        args.tols, args.repeats, tuple(args.ours), tuple(args.compiled), tuple(args.problems),
        args.block,
    )  # fmt: skip
    batch = batched(args.batch) if args.batch else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(rows=rows, batched=batch), indent=1))
    md = markdown(rows, batch)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
