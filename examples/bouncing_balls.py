"""Learn a restitution coefficient from observed bounce times, by gradient descent through events.

Sixteen balls are dropped from heights between 0.5 and 2 m under gravity 9.81 m/s^2.  Each
bounce flips the ball's velocity and scales it by the restitution ``e`` (true value 0.75).  We
observe the time of each ball's 2nd, 3rd and 4th bounce (with 2 ms of noise), and fit ``e``,
starting from 0.5, by gradient descent on the squared error of the predicted times.  The
prediction is one batched solve per observed bounce: ``neuralode.Event`` with
``terminal=n`` and a ``reset`` that uses ``e``; the bounce time's gradient with respect to ``e``
comes from the implicit function theorem at each event, through the resets.

    .venv/bin/python examples/bouncing_balls.py [--out runs/examples/bouncing_balls]

Writes ``bouncing_balls.png`` (the fitted trajectories with the observed bounce times, and the
fit's progress) and ``bouncing_balls.json`` (the recovered value).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import neuralode

G = 9.81
TRUE_E = 0.75
BOUNCES = (4,)


def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Height and velocity: y' = v, v' = -g."""
    return torch.stack([y[:, 1], torch.full_like(y[:, 0], -G)], dim=1)


def floor(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y[:, 0]


def bounce_events(e: torch.Tensor, n: int) -> neuralode.Event:
    return neuralode.Event(
        floor,
        direction=-1,
        terminal=n,
        reset=lambda t, y: torch.stack([y[:, 0], -e * y[:, 1]], dim=1),
        name="floor",
    )


def bounce_times(h0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``[balls, len(BOUNCES)]``: the time of each observed bounce, differentiable in ``e``."""
    y0 = torch.stack([h0, torch.zeros_like(h0)], dim=1)
    t = torch.tensor([0.0, 30.0], dtype=h0.dtype)
    times = []
    for n in BOUNCES:
        sol = neuralode.solve(
            field, y0, t, batched=True, events=bounce_events(e, n), rtol=1e-8, atol=1e-10
        )
        assert sol.event_t is not None
        times.append(sol.event_t)
    return torch.stack(times, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/examples/bouncing_balls"))
    parser.add_argument("--steps", type=int, default=20, help="L-BFGS iterations at most")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.float64
    h0 = torch.linspace(0.5, 2.0, 16, dtype=dtype)
    with torch.no_grad():
        observed = bounce_times(h0, torch.tensor(TRUE_E, dtype=dtype))
        observed += 0.002 * torch.randn_like(observed)

    e = torch.tensor(0.5, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([e], lr=1.0, max_iter=args.steps, line_search_fn="strong_wolfe")
    history: list[tuple[int, float, float]] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (bounce_times(h0, e) - observed).pow(2).mean()
        loss.backward()
        history.append((len(history), float(loss.detach()), float(e.detach())))
        return loss

    start = time.perf_counter()
    opt.step(closure)
    seconds = time.perf_counter() - start
    final_loss = float((bounce_times(h0, e.detach()) - observed).pow(2).mean())
    print(
        f"recovered e = {float(e.detach()):.4f} (true {TRUE_E}), loss {final_loss:.2e} s^2, "
        f"{len(history)} gradient evaluations in {seconds:.1f} s"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bouncing_balls.json").write_text(
        json.dumps(
            {
                "true_e": TRUE_E,
                "recovered_e": float(e.detach()),
                "final_loss": final_loss,
                "evaluations": len(history),
                "seconds": seconds,
                "history": history,
            },
            indent=2,
        )
    )
    _figure(h0, e.detach(), observed, history, args.out / "bouncing_balls.png")


def _figure(h0, e, observed, history, path: Path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    ts = torch.linspace(0, float(observed.max()) + 0.2, 400, dtype=h0.dtype)
    with torch.no_grad():
        sol = neuralode.solve(
            field,
            torch.stack([h0, torch.zeros_like(h0)], dim=1)[::5],
            ts,
            batched=True,
            events=bounce_events(e, 20),
        )
    for i, row in enumerate(sol.ys):
        line = ax.plot(ts, row[:, 0], lw=1)[0]
        ax.plot(observed[i * 5], torch.zeros(len(BOUNCES)), "x", color=line.get_color())
    ax.set_xlabel("t (s)")
    ax.set_ylabel("height (m)")
    ax.set_title(f"fitted balls (e = {float(e):.3f}); x: observed bounces")
    steps = [h[0] for h in history]
    bx.plot(steps, [h[2] for h in history], label="e")
    bx.axhline(TRUE_E, color="k", ls=":", label="true e")
    bx.set_xlabel("loss and gradient evaluation")
    bx.set_ylabel("e")
    bx2 = bx.twinx()
    bx2.semilogy(steps, [h[1] for h in history], color="C3", label="loss")
    bx2.set_ylabel("loss (s^2)")
    bx.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
