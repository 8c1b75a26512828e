"""Events: a batch of bouncing balls to their n-th bounce, ours against torchdiffeq's odeint_event.

Each ball is dropped from its own height under gravity 9.81 with restitution 0.8; a bounce flips
and scales its velocity.  The task is every ball's time of its ``--bounces``-th bounce (analytic:
``sqrt(2 h / g) (1 + 2 e + ... + 2 e^(n-1))``).

* **ours**: one batched solve, ``neuralode.Event(floor, direction=-1, terminal=n, reset=bounce)``:
  each ball stops at its own n-th bounce, and its step size is its own.
* **torchdiffeq, per sample**: its bouncing-ball example's loop, ball by ball: ``odeint_event``
  to the next bounce, bounce (lifting the ball by 1e-7 so that the event does not fire again at
  once, as the example does), again (``n`` solves per ball).
* **torchdiffeq, batched**: ``odeint_event`` stops the whole batch at the first event of any
  sample, so the batch is solved from event to event (``batch * n`` solves, each over every
  ball, finished balls frozen): what its whole-batch stop allows.

Every solve runs at rtol = atol = 1e-8 with dopri5, forward only (no graph), one thread, best of
``--repeats``.  NFE is summed over the balls (a batched evaluation counts once per ball).

    PYTHONPATH=<dir with torchdiffeq 0.2.5> .venv/bin/python benchmarks/events.py
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import neuralode

G, E = 9.81, 0.8
TOL = 1e-8


def exact_times(h0: torch.Tensor, n: int) -> torch.Tensor:
    return torch.sqrt(2 * h0 / G) * (1 + 2 * sum(E**k for k in range(1, n)))


def ours(h0: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[:, 1], torch.full_like(y[:, 0], -G)], dim=1)

    ev = neuralode.Event(
        lambda t, y: y[:, 0],
        direction=-1,
        terminal=n,
        reset=lambda t, y: torch.stack([y[:, 0], -E * y[:, 1]], dim=1),
    )
    y0 = torch.stack([h0, torch.zeros_like(h0)], dim=1)
    with torch.no_grad():
        sol = neuralode.solve(
            f, y0, torch.tensor([0.0, 100.0]), batched=True, events=ev, rtol=TOL, atol=TOL
        )
    assert sol.event_t is not None
    return sol.event_t, int(sol.stats.nfe.sum())


class _Counted:
    def __init__(self, f: Callable[..., torch.Tensor], rows: int) -> None:
        self.f, self.rows, self.nfe = f, rows, 0

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += self.rows
        return self.f(t, y)


def torchdiffeq_per_sample(td: Any, h0: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    f = _Counted(lambda t, y: torch.stack([y[1], torch.full_like(y[0], -G)]), 1)
    out = []
    with torch.no_grad():
        for h in h0:
            state = torch.stack([h, torch.zeros_like(h)])
            t0 = torch.tensor([0.0], dtype=h0.dtype)
            for _ in range(n):
                event_t, sol = td.odeint_event(
                    f, state, t0, event_fn=lambda t, y: y[0], rtol=TOL, atol=TOL
                )
                # As its example's state_update: lift the ball 1e-7 so that the event function
                # does not fire again at once.
                state = torch.stack([sol[-1][0] + 1e-7, -E * sol[-1][1]])
                t0 = event_t.reshape(1)
            out.append(event_t.reshape(()))
    return torch.stack(out), f.nfe


def torchdiffeq_batched(td: Any, h0: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    B = h0.shape[0]
    count = torch.zeros(B, dtype=torch.long)
    live = torch.ones(B, dtype=torch.bool)

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = torch.where(live, -G, 0.0).to(y.dtype)
        return torch.stack([torch.where(live, y[:, 1], 0.0), g], dim=1)

    f = _Counted(field, B)
    state = torch.stack([h0, torch.zeros_like(h0)], dim=1)
    t0 = torch.tensor([0.0], dtype=h0.dtype)
    stop = torch.full((B,), float("nan"), dtype=h0.dtype)
    with torch.no_grad():
        while bool(live.any()):
            # Finished balls sit at height 1 (their event function never changes sign).
            state = torch.where(live.unsqueeze(1), state, torch.ones_like(state))
            event_t, sol = td.odeint_event(
                f, state, t0, event_fn=lambda t, y: y[:, 0], rtol=TOL, atol=TOL
            )
            state = sol[-1]
            hit = live & (state[:, 0].abs() == state[:, 0].abs()[live].min()) & (state[:, 1] < 0)
            count += hit
            state = torch.where(
                hit.unsqueeze(1), torch.stack([state[:, 0] + 1e-7, -E * state[:, 1]], dim=1), state
            )
            done = hit & (count == n)
            stop = torch.where(done, event_t.reshape(()), stop)
            live &= ~done
            t0 = event_t.reshape(1)
    return stop, f.nfe


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bounces", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h0 = torch.rand(args.batch, dtype=torch.float64) * 1.5 + 0.5
    exact = exact_times(h0, args.bounces)
    rows: list[dict[str, Any]] = []
    runs: list[tuple[str, Callable[[], Any], int]] = [
        ("neuralode (batched, per-sample events)", lambda: ours(h0, args.bounces), args.repeats)
    ]
    try:
        import torchdiffeq as td
    except ImportError:
        td = None
        print("torchdiffeq is not installed: only ours is timed")
    if td is not None:
        runs += [
            (
                "torchdiffeq odeint_event, looped per sample",
                lambda: torchdiffeq_per_sample(td, h0, args.bounces),
                1,
            ),
            (
                "torchdiffeq odeint_event, batched event to event",
                lambda: torchdiffeq_batched(td, h0, args.bounces),
                1,
            ),
        ]
    for name, fn, repeats in runs:
        seconds, (times, nfe) = best_of(fn, repeats)
        err = float((times - exact).abs().max())
        rows.append({"solver": name, "seconds": seconds, "nfe": nfe, "max_error": err})
    base = rows[0]["seconds"]
    print(f"{args.batch} balls to bounce {args.bounces}, dopri5 rtol=atol={TOL:g}, one thread")
    print(f"| solver | time (s) | ours / this | NFE (all balls) | max error of t_{args.bounces} |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = base / r["seconds"]
        print(
            f"| {r['solver']} | {r['seconds']:.3f} | {ratio:.4f} | {r['nfe']} | "
            f"{r['max_error']:.1e} |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"batch": args.batch, "bounces": args.bounces, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
