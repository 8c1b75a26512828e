"""Side-by-side benchmark of neuralode against torchdiffeq, torchode, torchdyn, scipy and diffrax.

    .venv/bin/python benchmarks/compare.py [--problems neural wp overhead hetero memory]
        [--repeats 5] [--wp-tols 3 4 5 6 7 8 9 10] [--out runs/bench/compare]

Run on a quiet machine: a second busy process slows small PyTorch workloads many times over.
Every peer runs single-threaded (torch.set_num_threads(--threads); XLA's CPU client with one
intra-op thread), in this one process, on the same problem, weights, tolerances and dtype.

Problems (issue 4):
  neural    small neural ODE: MLP 32 -> 128 -> 128 -> 32 (tanh), batch 256, float32, t in [0, 1],
            dopri5 and tsit5 at rtol = atol = 1e-6, forward and forward+backward (backprop and
            adjoint); plus diffrax's benchmark shape (MLP 4 -> 32 -> 4, softplus, tanh output,
            batch 64, t in [0, 100]) and the overhead-bound tiny MLP 2 -> 16 -> 2 (batch 16).
            The same weights everywhere (the torch weights are copied into the JAX MLP).
  wp        work-precision: Lotka-Volterra, Van der Pol (mu = 1), a 2-body orbit (e = 0.5),
            float64, error at t1 (max abs) against scipy DOP853 at rtol = atol = 1e-13, vs NFE and
            vs wall time, for each adaptive method a peer shares with us.
  overhead  dy/dt = -y, dim 8, batch 1, float32, 10,000 fixed rk4 steps: time per step above the
            floor of calling the vector field alone 4 x 10,000 times.
  hetero    Van der Pol with mu geometrically spread over [0.5, 10], batch 16, t in [0, 10],
            dopri5 at 1e-6, float64: per-sample step sizes against one shared step size.
  memory    runs benchmarks/memory.py (fresh process per configuration) into --out/memory.

For each timing: min/median/max over --repeats (after one warm-up; JAX jitted and warmed up, timed
after block_until_ready), NFE, and the floor: the same number of vector-field evaluations without
a solver (forward: chained under no_grad; forward+backward: chained under autograd, then backward;
adjoint: forward NFE bare + backward NFE with a vector-Jacobian product each), through the same
counting wrapper the solvers call.  The peers and the floor of a case are timed in interleaved
rounds (one call of each per round), so a slow spell of the machine hits all of them alike; the
floor is timed for our NFE and scaled to each peer's.  Ratios ours / peer use min times.
Writes compare.json, table.md and PNG figures to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

jax, jnp = peers.jax, peers.jnp


# --------------------------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    out = fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return ts, out


def timed_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int
) -> dict[str, tuple[list[float], Any] | Exception]:
    """Time several runners in rounds (one call of each per round, after one warm-up each), so
    that a slow spell of a shared machine hits every peer alike rather than one of them.
    A runner that raises is reported as its exception and left out of later rounds."""
    out: dict[str, Any] = {}
    ts: dict[str, list[float]] = {}
    for name, fn in fns.items():
        try:
            out[name] = fn()
            ts[name] = []
        except Exception as e:  # a peer failing must not stop the others
            out[name] = e
    for _ in range(repeats):
        for name, fn in fns.items():
            if name not in ts:
                continue
            t0 = time.perf_counter()
            out[name] = fn()
            ts[name].append(time.perf_counter() - t0)
    return {k: (ts[k], v) if k in ts else v for k, v in out.items()}


def summary(ts: list[float]) -> dict[str, float]:
    return {
        "min_ms": min(ts) * 1e3,
        "median_ms": statistics.median(ts) * 1e3,
        "max_ms": max(ts) * 1e3,
    }


# --------------------------------------------------------------------------------------------
# problem 1: small neural ODEs


class Field(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


ACTS = {
    "tanh": (torch.nn.Tanh, lambda x: jnp.tanh(x)),
    "softplus": (torch.nn.Softplus, lambda x: jax.nn.softplus(x)),
    "id": (torch.nn.Identity, lambda x: x),
}


def mlp_problem(
    name: str, sizes: list[int], acts: list[str], batch: int, t1: float, seed: int = 0
) -> peers.Problem:
    """MLP field ``sizes[0] -> ... -> sizes[-1]``; ``acts[i]`` follows linear layer ``i``."""
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for i, act in enumerate(acts):
        mods += [torch.nn.Linear(sizes[i], sizes[i + 1]), ACTS[act][0]()]
    net = torch.nn.Sequential(*mods)
    y0 = torch.randn(batch, sizes[0])
    f_jax = jax_args = None
    if jax is not None:
        lins = [m for m in net if isinstance(m, torch.nn.Linear)]
        jax_args = [
            (
                jnp.asarray(m.weight.detach().numpy().T, dtype=jnp.float32),
                jnp.asarray(m.bias.detach().numpy(), dtype=jnp.float32),
            )
            for m in lins
        ]
        jacts = [ACTS[a][1] for a in acts]

        def f_jax(t: Any, y: Any, args: Any) -> Any:
            for (w, b), act in zip(args, jacts):
                y = act(y @ w + b)
            return y

    return peers.Problem(name, Field(net), y0, 0.0, t1, f_jax, jax_args, {"sizes": sizes})


def torch_floor(
    p: peers.Problem, mode: str, n: int, n_bwd: int = 0
) -> dict[str, Callable[[], None]]:
    """Runners for the floor of ``mode``: the solve's evaluations without a solver.

    ``forward``: ``n`` evaluations chained under ``no_grad``; ``backprop``: the same chain under
    autograd, then backward; ``adjoint``: ``n`` bare evaluations (``floor``) and, timed apart,
    ``n_bwd`` evaluations each with its vector-Jacobian product (``floor_vjp``).  The field is
    called through the same :class:`peers.Counted` wrapper the solvers get, so the floor holds
    exactly what every solver must pay per evaluation."""
    f, y0, t = peers.Counted(p.f_torch), p.y0, torch.tensor(p.t0)
    params = tuple(f.parameters())

    def fwd() -> None:
        with torch.no_grad():
            y = y0
            for _ in range(n):
                y = y + 1e-3 * f(t, y)

    def fwd_bwd() -> None:
        with torch.enable_grad():
            y = y0
            for _ in range(n):
                y = y + 1e-3 * f(t, y)
            y.square().sum().backward()

    def vjps() -> None:
        with torch.enable_grad():
            for _ in range(n_bwd):
                y = y0.detach().requires_grad_()
                out = f(t, y)
                torch.autograd.grad(out, (y, *params), torch.ones_like(out))

    if mode == "adjoint":  # the two parts are timed apart, to scale each by a peer's NFE
        return {"floor": fwd, "floor_vjp": vjps}
    return {"floor": {"forward": fwd, "backprop": fwd_bwd}[mode]}


def jax_floor(p: peers.Problem, n: int, repeats: int) -> float | None:
    if jax is None or p.f_jax is None:
        return None
    y0 = jnp.asarray(p.y0.numpy())

    @jax.jit
    def loop(y: Any, args: Any) -> Any:
        return jax.lax.fori_loop(0, n, lambda i, y: y + 1e-3 * p.f_jax(0.0, y, args), y)

    def run() -> None:
        jax.block_until_ready(loop(y0, p.jax_args))

    return min(timed(run, repeats)[0]) * 1e3 / n


def neural(args: argparse.Namespace) -> dict[str, Any]:
    problems = [
        mlp_problem("mlp-32-128-b256", [32, 128, 128, 32], ["tanh", "tanh", "id"], 256, 1.0),
        mlp_problem("diffrax-4-32-b64", [4, 32, 4], ["softplus", "tanh"], 64, 100.0),
        mlp_problem("tiny-2-16-b16", [2, 16, 2], ["tanh", "id"], 16, 1.0),
    ]
    out: dict[str, Any] = {"cases": []}
    for p in problems:
        methods = ["dopri5", "tsit5"] if p.name.startswith("mlp") else ["dopri5"]
        for method in methods:
            for mode in (None, "backprop", "adjoint"):
                case = {"problem": p.name, "method": method, "mode": mode or "forward"}
                case["peers"] = {}
                runners = {}
                for peer in peers.PEERS:
                    if mode and peer == "scipy":
                        continue
                    runner = peers.prepare(peer, p, method, 1e-6, 1e-6, mode)
                    if isinstance(runner, str):
                        case["peers"][peer] = {"skipped": runner}
                    else:
                        runners[peer] = runner
                # The floor joins the same rounds, sized by our own NFE (one untimed run).
                if "neuralode" in runners:
                    r0 = runners["neuralode"]()
                    runners.update(torch_floor(p, case["mode"], r0.nfe, r0.nfe_backward))
                    case["floor"] = {"nfe": r0.nfe, "nfe_bwd": r0.nfe_backward}
                results = timed_interleaved(runners, args.repeats)
                for part in ("floor", "floor_vjp"):
                    res_f = results.pop(part, None)
                    if res_f is not None and not isinstance(res_f, Exception):
                        case["floor"][part + "_ms"] = summary(res_f[0])["min_ms"]
                for peer, res in results.items():
                    if isinstance(res, Exception):
                        case["peers"][peer] = {"skipped": f"{type(res).__name__}: {res}"[:300]}
                        continue
                    ts, r = res
                    case["peers"][peer] = {**summary(ts), "nfe": r.nfe, "nfe_bwd": r.nfe_backward}
                    msg = f"{min(ts) * 1e3:9.2f} ms  nfe {r.nfe}+{r.nfe_backward}"
                    print(f"  {p.name} {method} {case['mode']:9s} {peer:12s} {msg}", flush=True)
                out["cases"].append(case)
        ours = [c for c in out["cases"] if c["problem"] == p.name]
        nfe = max(c["peers"]["neuralode"].get("nfe", 1) for c in ours)
        jfl = jax_floor(p, nfe, args.repeats)
        out.setdefault("floor_ms_per_eval", {})[p.name] = {"jax_forward": jfl}
        for c in ours:
            add_floor_and_ratios(c, jfl)
    return out


def add_floor_and_ratios(c: dict[str, Any], jfl: float | None) -> None:
    """Each peer's floor: the case's floor (timed beside the peers, for our NFE) scaled to the
    peer's NFE; for the adjoint the forward and the vjp parts are scaled separately."""
    fl = c.get("floor")
    for peer, r in c["peers"].items():
        if "min_ms" not in r:
            continue
        floor = None
        if peer == "diffrax":
            floor = jfl * r["nfe"] if (jfl and c["mode"] == "forward") else None
        elif fl is not None and "floor_ms" in fl:
            floor = fl["floor_ms"] * r["nfe"] / fl["nfe"]
            if fl["nfe_bwd"]:
                floor += fl.get("floor_vjp_ms", math.nan) * r["nfe_bwd"] / fl["nfe_bwd"]
        r["floor_ms"] = floor
        r["over_floor"] = r["min_ms"] / floor if floor else None
    ours = c["peers"].get("neuralode", {})
    if "min_ms" in ours:
        c["ours_over_peer"] = {
            peer: ours["min_ms"] / r["min_ms"]
            for peer, r in c["peers"].items()
            if peer != "neuralode" and "min_ms" in r
        }


# --------------------------------------------------------------------------------------------
# problem 2: work-precision


def lotka_volterra(y: Any, xp: Any) -> Any:
    x, z = y[..., 0], y[..., 1]
    return xp.stack([1.5 * x - x * z, -3.0 * z + x * z], -1)


def van_der_pol(y: Any, xp: Any, mu: Any = 1.0) -> Any:
    x, v = y[..., 0], y[..., 1]
    return xp.stack([v, mu * (1 - x * x) * v - x], -1)


def two_body(y: Any, xp: Any) -> Any:
    x, z, u, v = y[..., 0], y[..., 1], y[..., 2], y[..., 3]
    r3 = (x * x + z * z) ** 1.5
    return xp.stack([u, v, -x / r3, -z / r3], -1)


def classic(name: str, rhs: Callable[..., Any], y0: list[float], t1: float) -> peers.Problem:
    def f_torch(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return rhs(y, torch)

    def f_jax(t: Any, y: Any, args: Any) -> Any:
        return rhs(y, jnp)

    y = torch.tensor([y0], dtype=torch.float64)
    return peers.Problem(name, f_torch, y, 0.0, t1, f_jax if jax else None, None)


def reference(p: peers.Problem) -> np.ndarray:
    import scipy.integrate

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        return p.f_torch(None, torch.from_numpy(y)[None]).numpy()[0]

    sol = scipy.integrate.solve_ivp(
        rhs, (p.t0, p.t1), p.y0[0].numpy(), method="DOP853", rtol=1e-13, atol=1e-13
    )
    return sol.y[:, -1]


def work_precision(args: argparse.Namespace) -> dict[str, Any]:
    e = 0.5
    problems = [
        classic("lotka-volterra", lotka_volterra, [1.0, 1.0], 10.0),
        classic("van-der-pol-mu1", van_der_pol, [2.0, 0.0], 10.0),
        classic(
            "two-body-e0.5", two_body, [1 - e, 0, 0, math.sqrt((1 + e) / (1 - e))], 4 * math.pi
        ),
    ]
    if not peers.available("scipy"):
        return {"skipped": f"the scipy reference is needed: {peers.UNAVAILABLE['scipy']}"}
    tols = [10.0 ** (-k) for k in args.wp_tols]
    out: dict[str, Any] = {"tolerances": tols, "points": [], "skipped": {}}
    for p in problems:
        ref = reference(p)
        for method in ("bosh3", "dopri5", "tsit5", "dopri8"):
            for peer in peers.PEERS:
                for tol in tols:
                    runner = peers.prepare(peer, p, method, tol, tol, None)
                    if isinstance(runner, str):
                        out["skipped"][f"{peer}/{method}"] = runner
                        break
                    try:
                        ts, r = timed(runner, args.wp_repeats)
                    except Exception as ex:
                        out["skipped"][f"{p.name}/{peer}/{method}/{tol:g}"] = f"{ex}"[:300]
                        continue
                    err = float(np.max(np.abs(np.asarray(r.y1).reshape(-1) - ref)))
                    out["points"].append({
                        "problem": p.name, "method": method, "peer": peer, "tol": tol,
                        "error": err, "nfe": r.nfe, **summary(ts),
                    })  # fmt: skip
            print(f"  {p.name} {method} done", flush=True)
    out["checks"] = wp_checks(out["points"])
    return out


def wp_checks(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue-4 targets: NFE <= torchdiffeq's, error <= scipy's (same tableau, same tolerance)."""
    idx = {(q["problem"], q["method"], q["peer"], q["tol"]): q for q in points}
    nfe_vs_tdq, err_vs_scipy = [], []
    for (prob, method, peer, tol), q in idx.items():
        if peer != "neuralode":
            continue
        tdq = idx.get((prob, method, "torchdiffeq", tol))
        if tdq:  # (problem, method, tol, our error / theirs, our NFE, theirs)
            e = q["error"] / tdq["error"] if tdq["error"] else None
            nfe_vs_tdq.append((prob, method, tol, e, q["nfe"], tdq["nfe"]))
        sp = idx.get((prob, method, "scipy", tol))
        if sp:
            err_vs_scipy.append((prob, method, tol, q["error"], sp["error"]))
    # Same tableau and the same steps give the same error up to round-off: allow 1% slack.
    slack = 1.01
    matched = _nfe_at_equal_error(points, "torchdiffeq")
    return {
        "nfe_at_torchdiffeq_error": matched,
        "nfe_at_equal_error_le_torchdiffeq": all(r <= 1.0 for *_, r in matched),
        "nfe_at_equal_error_over_torchdiffeq_max": max((r for *_, r in matched), default=None),
        "nfe_le_torchdiffeq": all(a <= b for *_, a, b in nfe_vs_tdq),
        "nfe_violations": [x for x in nfe_vs_tdq if x[4] > x[5]],
        "nfe_over_torchdiffeq_max": max((a / b for *_, a, b in nfe_vs_tdq), default=None),
        "error_le_scipy": all(a <= b * slack for *_, a, b in err_vs_scipy),
        "error_violations": [x for x in err_vs_scipy if x[3] > x[4] * slack],
        "error_over_scipy_max": max((a / b for *_, a, b in err_vs_scipy if b), default=None),
        "n_compared": [len(nfe_vs_tdq), len(err_vs_scipy)],
    }


def _nfe_at_equal_error(points: list[dict[str, Any]], peer: str) -> list[tuple[Any, ...]]:
    """Our NFE at the peer's error, per (problem, method, tolerance): log-log interpolation along
    our work-precision curve (our points at every tolerance, sorted by error), divided by the
    peer's NFE.  Solvers that read the same tolerance differently (torchdiffeq's dopri5 estimates
    the error with Shampine's embedded pair, 2/3 of Hairer's and scipy's estimate, so it takes
    larger steps and makes larger errors at the same ``rtol``) compare fairly only at equal
    error.  Peer points whose error lies outside our curve's range are left out."""
    out = []
    keys = {(q["problem"], q["method"]) for q in points if q["peer"] == peer}
    for prob, method in sorted(keys):
        ours = sorted(
            (q for q in points if (q["problem"], q["method"], q["peer"]) == (prob, method,
             "neuralode") and q["error"] > 0), key=lambda q: q["error"],
        )  # fmt: skip
        if len(ours) < 2:
            continue
        le = np.log([q["error"] for q in ours])
        ln = np.log([q["nfe"] for q in ours])
        for q in points:
            if (q["problem"], q["method"], q["peer"]) != (prob, method, peer) or q["error"] <= 0:
                continue
            x = math.log(q["error"])
            if not le[0] <= x <= le[-1]:
                continue
            nfe = float(np.exp(np.interp(x, le, ln)))
            ratio = nfe / q["nfe"]
            out.append((prob, method, q["tol"], q["error"], round(nfe, 1), q["nfe"], ratio))
    return out


# --------------------------------------------------------------------------------------------
# problem 3: per-step overhead


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    steps = args.overhead_steps
    torch.manual_seed(0)

    def f_torch(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y

    p = peers.Problem(
        "decay-dim8", f_torch, torch.randn(1, 8), 0.0, 1.0, (lambda t, y, a: -y) if jax else None
    )
    t = torch.tensor(0.0)
    reps = args.overhead_repeats
    counted = peers.Counted(f_torch)  # the callable every solver gets
    runners: dict[str, Callable[[], Any]] = {
        "floor": lambda: [counted(t, p.y0) for _ in range(4 * steps)]
    }
    skipped: dict[str, str] = {}
    for peer in peers.PEERS:
        runner = peers.prepare(peer, p, "rk4", gradient=None, step_size=1.0 / steps)
        if isinstance(runner, str):
            skipped[peer] = runner
        else:
            runners[peer] = runner
    res = timed_interleaved(runners, reps)
    floor = min(res["floor"][0])  # type: ignore[index]
    out: dict[str, Any] = {"steps": steps, "torch_floor_us_per_step": floor / steps * 1e6}
    jfl = jax_floor(p, 4 * steps, reps)
    if jfl is not None:
        out["jax_floor_us_per_step"] = jfl * 4 * steps / steps * 1e3
    out["peers"] = {}
    for peer in peers.PEERS:
        if peer in skipped:
            out["peers"][peer] = {"skipped": skipped[peer]}
            continue
        if isinstance(res[peer], Exception):
            out["peers"][peer] = {"skipped": f"{res[peer]}"[:300]}
            continue
        ts, r = res[peer]  # type: ignore[misc]
        fl = out["jax_floor_us_per_step"] if peer == "diffrax" else out["torch_floor_us_per_step"]
        per_step = min(ts) / steps * 1e6
        out["peers"][peer] = {
            **summary(ts), "nfe": r.nfe, "us_per_step": per_step,
            "overhead_us_per_step": per_step - fl,
        }  # fmt: skip
        print(f"  rk4 {peer:12s} {per_step:8.2f} us/step (floor {fl:.2f})", flush=True)
    ours = out["peers"]["neuralode"]["overhead_us_per_step"]
    out["ours_overhead_over_peer"] = {
        k: ours / v["overhead_us_per_step"]
        for k, v in out["peers"].items()
        if k != "neuralode" and "overhead_us_per_step" in v
    }
    return out


# --------------------------------------------------------------------------------------------
# problem 4: heterogeneous batch


def hetero(args: argparse.Namespace) -> dict[str, Any]:
    batch = 16
    mu = torch.logspace(math.log10(0.5), 1.0, batch, dtype=torch.float64)

    def f_torch(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return van_der_pol(y, torch, mu)

    def f_jax(t: Any, y: Any, args: Any) -> Any:
        return van_der_pol(y, jnp, args)

    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64).expand(batch, 2).contiguous()
    jargs = jnp.asarray(mu.numpy()) if jax else None
    p = peers.Problem("vdp-hetero", f_torch, y0, 0.0, 10.0, f_jax if jax else None, jargs)
    configs = [
        ("neuralode per-sample", "neuralode", {"batched": True}),
        ("neuralode shared", "neuralode", {"batched": False}),
        ("torchdiffeq shared", "torchdiffeq", {}),
        ("torchode per-sample", "torchode", {}),
        ("diffrax per-sample (vmap)", "diffrax", {"batched": True, "batched_args": True}),
        ("diffrax shared", "diffrax", {}),
    ]
    out: dict[str, Any] = {"batch": batch, "mu": mu.tolist(), "configs": {}}
    for label, peer, kw in configs:
        runner = peers.prepare(peer, p, "dopri5", 1e-6, 1e-6, None, **kw)
        if isinstance(runner, str):
            out["configs"][label] = {"skipped": runner}
            continue
        ts, r = timed(runner, args.repeats)
        if r.nfe_per_sample is not None:
            total = int(np.sum(r.nfe_per_sample))
        else:
            total = r.nfe * batch
        out["configs"][label] = {
            **summary(ts), "batched_calls": r.nfe, "sample_evaluations": total,
            "per_sample_nfe": None if r.nfe_per_sample is None else r.nfe_per_sample.tolist(),
        }  # fmt: skip
        print(f"  {label:28s} {min(ts) * 1e3:9.2f} ms  calls {r.nfe}  sample-evals {total}")
    c = out["configs"]
    if "sample_evaluations" in c.get("neuralode per-sample", {}):
        a = c["neuralode per-sample"]["sample_evaluations"]
        b = c["neuralode shared"]["sample_evaluations"]
        out["per_sample_over_shared_nfe"] = a / b
        out["per_sample_over_shared_time"] = (
            c["neuralode per-sample"]["min_ms"] / c["neuralode shared"]["min_ms"]
        )
    return out


# --------------------------------------------------------------------------------------------
# problem 5: memory (delegated)


def memory(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.out) / "memory"
    cmd = [sys.executable, str(Path(__file__).with_name("memory.py")), "--out", str(folder)]
    cmd += ["--horizons", *map(str, args.memory_horizons), "--threads", str(args.threads)]
    print("  " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return {"command": cmd, "results": json.loads((folder / "memory.json").read_text())}


# --------------------------------------------------------------------------------------------
# figures and table


def figures(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if "neural" in results:
        cases = [c for c in results["neural"]["cases"] if "ours_over_peer" in c]
        peer_names = [q for q in peers.PEERS if q != "neuralode"]
        fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 4.5))
        width = 0.8 / len(peer_names)
        for j, q in enumerate(peer_names):
            vals = [c["ours_over_peer"].get(q, np.nan) for c in cases]
            ax.bar(np.arange(len(cases)) + j * width, vals, width, label=q)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(cases)) + 0.4)
        ax.set_xticklabels(
            [f"{c['problem']}\n{c['method']} {c['mode']}" for c in cases], rotation=60, fontsize=7
        )
        ax.set_ylabel("time ours / peer (min)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "neural_ratios.png", dpi=120)
        plt.close(fig)
        written.append("neural_ratios.png")
    if "wp" in results:
        pts = results["wp"]["points"]
        probs = sorted({q["problem"] for q in pts})
        methods = ["bosh3", "dopri5", "tsit5", "dopri8"]
        fig, axes = plt.subplots(len(probs), 2, figsize=(11, 3.6 * len(probs)), squeeze=False)
        colors = dict(zip(peers.PEERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
        marks = dict(zip(methods, "osD^"))
        for i, prob in enumerate(probs):
            for peer in peers.PEERS:
                for m in methods:
                    s = sorted(
                        (q for q in pts if q["problem"] == prob and q["peer"] == peer
                         and q["method"] == m), key=lambda q: q["tol"],
                    )  # fmt: skip
                    if not s:
                        continue
                    err = [max(q["error"], 1e-17) for q in s]
                    kw = {"color": colors[peer], "marker": marks[m], "ms": 4, "lw": 1}
                    axes[i, 0].loglog([q["nfe"] for q in s], err, label=f"{peer} {m}", **kw)
                    axes[i, 1].loglog([q["min_ms"] for q in s], err, **kw)
            axes[i, 0].set_title(prob)
            axes[i, 0].set_xlabel("NFE")
            axes[i, 1].set_xlabel("wall time (ms, min)")
            axes[i, 0].set_ylabel("max abs error at t1")
        axes[0, 0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "work_precision.png", dpi=120)
        plt.close(fig)
        written.append("work_precision.png")
    if "overhead" in results:
        ov = {k: v for k, v in results["overhead"]["peers"].items() if "overhead_us_per_step" in v}
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(ov), [v["overhead_us_per_step"] for v in ov.values()])
        ax.set_ylabel("overhead above floor (us / rk4 step)")
        fig.tight_layout()
        fig.savefig(out / "overhead.png", dpi=120)
        plt.close(fig)
        written.append("overhead.png")
    if "hetero" in results:
        cf = {k: v for k, v in results["hetero"]["configs"].items() if "min_ms" in v}
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        axes[0].barh(list(cf), [v["sample_evaluations"] for v in cf.values()])
        axes[0].set_xlabel("total evaluations (sum over samples)")
        axes[1].barh(list(cf), [v["min_ms"] for v in cf.values()])
        axes[1].set_xlabel("time (ms, min)")
        axes[1].set_yticklabels([])
        fig.tight_layout()
        fig.savefig(out / "hetero.png", dpi=120)
        plt.close(fig)
        written.append("hetero.png")
    return written


def table(results: dict[str, Any]) -> str:
    lines = []
    if "neural" in results:
        lines.append(
            "| problem | method | mode | peer | min ms | med ms | NFE (+bwd) | /floor | ours/peer |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for c in results["neural"]["cases"]:
            for peer, r in c["peers"].items():
                if "min_ms" not in r:
                    continue
                of = f"{r['over_floor']:.2f}" if r.get("over_floor") else "-"
                ratio = c.get("ours_over_peer", {}).get(peer)
                rs = f"{ratio:.2f}" if ratio else "-"
                lines.append(
                    f"| {c['problem']} | {c['method']} | {c['mode']} | {peer} | {r['min_ms']:.2f} "
                    f"| {r['median_ms']:.2f} | {r['nfe']}+{r['nfe_bwd']} | {of} | {rs} |"
                )
    return "\n".join(lines)


TORCH_PEERS = ("torchdiffeq", "torchode", "torchdyn")


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 4's targets, each as ``(target, measured, met)`` (``met`` is None when a peer or a
    problem was not run)."""
    out: list[tuple[str, str, bool | None]] = []
    cases = {(c["problem"], c["method"], c["mode"]): c for c in results.get("neural", {}).get(
        "cases", [])}  # fmt: skip

    def peer(c: dict[str, Any] | None, name: str) -> dict[str, Any]:
        return (c or {}).get("peers", {}).get(name, {})

    for method in ("dopri5", "tsit5"):
        key = "mlp-32-128-b256"
        for mode in ("forward", "backprop"):
            r = peer(cases.get((key, method, mode)), "neuralode")
            of = r.get("over_floor")
            out.append(
                (f"{key} {method} {mode} <= 1.25x floor",
                 f"{of:.2f}x" if of else "-", None if of is None else of <= 1.25)
            )  # fmt: skip
        for mode in ("backprop", "adjoint"):
            c = cases.get((key, method, mode))
            ratios = {q: v for q, v in (c or {}).get("ours_over_peer", {}).items()
                      if q in TORCH_PEERS}  # fmt: skip
            txt = ", ".join(f"{q} {v:.2f}" for q, v in ratios.items())
            out.append(
                (f"{key} {method} {mode} faster than every PyTorch peer (ours/peer)", txt,
                 None if not ratios else all(v < 1 for v in ratios.values()))
            )  # fmt: skip
            if mode == "adjoint" and c is not None:
                ours = peer(c, "neuralode")
                tot = ours.get("nfe", 0) + ours.get("nfe_bwd", 0)
                others = {q: peer(c, q).get("nfe", 0) + peer(c, q).get("nfe_bwd", 0)
                          for q in TORCH_PEERS if "nfe" in peer(c, q)}  # fmt: skip
                txt = f"ours {tot} vs " + ", ".join(f"{q} {v}" for q, v in others.items())
                out.append(
                    (f"{key} {method} adjoint NFE (fwd + bwd) <= every PyTorch peer's", txt,
                     None if not others else all(tot <= v for v in others.values()))
                )  # fmt: skip
    for key, mode in (
        ("mlp-32-128-b256", "adjoint"), ("tiny-2-16-b16", "backprop"),
        ("tiny-2-16-b16", "adjoint"), ("diffrax-4-32-b64", "adjoint"),
    ):  # fmt: skip
        c = cases.get((key, "dopri5", mode))
        v = (c or {}).get("ours_over_peer", {}).get("torchdiffeq")
        limit = 0.5
        out.append(
            (f"{key} dopri5 {mode} <= {limit}x torchdiffeq", f"{v:.2f}x" if v else "-",
             None if v is None else v <= limit)
        )  # fmt: skip
    ov = results.get("overhead", {}).get("ours_overhead_over_peer", {}).get("torchdiffeq")
    out.append(
        ("rk4 overhead above the floor <= 1/3 of torchdiffeq's", f"{ov:.2f}" if ov else "-",
         None if ov is None else ov <= 1 / 3)
    )  # fmt: skip
    ch = results.get("wp", {}).get("checks")
    if ch:
        n = ch["n_compared"]
        out.append(
            ("work-precision: NFE <= torchdiffeq's at the same tolerance",
             f"{n[0] - len(ch['nfe_violations'])}/{n[0]} points, max "
             f"{ch['nfe_over_torchdiffeq_max']:.3f}x", ch["nfe_le_torchdiffeq"])
        )  # fmt: skip
        m = ch["nfe_at_torchdiffeq_error"]
        out.append(
            ("work-precision: NFE <= torchdiffeq's at torchdiffeq's error (interpolated)",
             f"{sum(r[-1] <= 1 for r in m)}/{len(m)} points, median "
             f"{statistics.median(r[-1] for r in m):.2f}x, max "
             f"{ch['nfe_at_equal_error_over_torchdiffeq_max']:.2f}x" if m else "-",
             ch["nfe_at_equal_error_le_torchdiffeq"] if m else None)
        )  # fmt: skip
        out.append(
            ("work-precision: error <= scipy's (same tableau, 1% slack)",
             f"{n[1] - len(ch['error_violations'])}/{n[1]} points, max "
             f"{ch['error_over_scipy_max']:.3f}x", ch["error_le_scipy"])
        )  # fmt: skip
    h = results.get("hetero", {}).get("per_sample_over_shared_nfe")
    out.append(
        ("per-sample stepping: fewer total NFE than one shared step",
         f"{h:.2f}x" if h else "-", None if h is None else h < 1)
    )  # fmt: skip
    return out


def targets_table(rows: list[tuple[str, str, bool | None]]) -> str:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    for name, txt, met in rows:
        lines.append(f"| {name} | {txt} | {'-' if met is None else ('yes' if met else 'NO')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--problems", nargs="+", default=["neural", "wp", "overhead", "hetero"],
        choices=["neural", "wp", "overhead", "hetero", "memory"],
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wp-repeats", type=int, default=1, help="repeats per work-precision point")
    ap.add_argument(
        "--wp-tols", type=float, nargs="+", default=[3, 5, 7, 9],
        help="work-precision tolerances as exponents: rtol = atol = 10**-k",
    )  # fmt: skip
    ap.add_argument("--overhead-steps", type=int, default=10_000)
    ap.add_argument("--overhead-repeats", type=int, default=3)
    ap.add_argument("--memory-horizons", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/compare")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "versions": peers.versions(),
        "unavailable": peers.UNAVAILABLE,
        "threads": {
            "torch peers": torch.get_num_threads(),
            "jax": "1 (XLA_FLAGS intra_op_parallelism_threads=1)",
            "scipy": "1 (calls the torch field)",
        },
        "platform": platform.platform(),
        "args": vars(args),
    }
    print("threads:", json.dumps(meta["threads"]), flush=True)
    results: dict[str, Any] = {}
    runners = {
        "neural": neural, "wp": work_precision, "overhead": overhead, "hetero": hetero,
        "memory": memory,
    }  # fmt: skip
    for name in args.problems:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        results[name] = runners[name](args)
        results[name]["seconds"] = time.perf_counter() - t0
        (out / "compare.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    meta["figures"] = figures(results, out)
    rows = targets(results)
    results["targets"] = [{"target": a, "measured": b, "met": c} for a, b, c in rows]
    (out / "compare.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = f"{targets_table(rows)}\n\n{table(results)}\n"
    (out / "table.md").write_text(md)
    print(md)
    for k in ("wp", "overhead", "hetero"):
        if k in results:
            keep = {"checks", "ours_overhead_over_peer", "per_sample_over_shared_nfe"}
            print(k, json.dumps({a: b for a, b in results[k].items() if a in keep}))
    print(f"wrote {out / 'compare.json'} and {meta['figures']}")


if __name__ == "__main__":
    main()
