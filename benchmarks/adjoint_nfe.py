"""Backward evaluations of the adjoint against torchdiffeq's, with 1, 10 and 100 output intervals.

The problem is torchdiffeq's own ``examples/ode_demo.py``: the spiral ``dy/dt = (y**3) A`` sampled
at 1000 times in [0, 25], a batch of 20 windows of ``batch_time`` consecutive samples, and the MLP
field ``Linear(2, 50) -> tanh -> Linear(50, 2)`` on ``y**3`` (weights N(0, 0.1), biases 0), loss
``mean |pred - true|``.  ``batch_time`` sets the number of output times: 2 (one interval), 11
(10 intervals) and 101 (100 intervals).  Both libraries run the same weights and the same batch,
dopri5 at torchdiffeq's defaults (rtol 1e-7, atol 1e-9) and at 1e-5; the field counts its own
calls during ``backward()``.

torchdiffeq restarts its step selection on every output interval; ours carries the step across
output times (and across the jumps of the adjoint state there) and uses the seminorm by default.
We report our default, and our full norm (``adjoint_options={"norm": "rms"}``), which is the
norm torchdiffeq uses.

Run: ``.venv/bin/python benchmarks/adjoint_nfe.py`` (needs the bench extra for torchdiffeq);
writes ``runs/bench/adjoint_nfe.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import neuralode

try:
    import torchdiffeq
except ImportError:  # optional peer: pip install -e '.[bench]'
    torchdiffeq = None

A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])


class ODEFunc(torch.nn.Module):
    """The ode_demo field, counting its calls."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 2)
        )
        for m in self.net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, mean=0, std=0.1)
                torch.nn.init.constant_(m.bias, val=0)
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(y**3)


def demo_batch(batch_time: int, batch_size: int = 20, seed: int = 0) -> tuple[Any, ...]:
    """The demo's ``get_batch()``: windows of ``batch_time`` samples of the true spiral."""
    t = torch.linspace(0.0, 25.0, 1000)
    y0 = torch.tensor([[2.0, 0.0]])
    with torch.no_grad():
        true_y = neuralode.odeint(lambda t, y: (y**3) @ A, y0, t, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 1000 - batch_time, (batch_size,), generator=g)
    batch_y0 = true_y[s]  # [B, 1, 2]
    batch_t = t[:batch_time]
    batch_y = torch.stack([true_y[s + i] for i in range(batch_time)], dim=0)  # [T, B, 1, 2]
    return batch_y0, batch_t, batch_y


def backward_nfe(lib: str, batch_time: int, tol: float | None, norm: str | None) -> dict:
    func = ODEFunc()
    y0, t, y_true = demo_batch(batch_time)
    kw: dict[str, Any] = {} if tol is None else {"rtol": tol, "atol": tol}
    if lib == "torchdiffeq":
        pred = torchdiffeq.odeint_adjoint(func, y0, t, **kw)
    else:
        opts = {"norm": norm} if norm else None
        pred = neuralode.odeint_adjoint(func, y0, t, adjoint_options=opts, **kw)
    forward = func.calls
    loss = torch.mean(torch.abs(pred - y_true))
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in func.parameters()])
    return {"forward_nfe": forward, "backward_nfe": func.calls - forward, "grad": grad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench/adjoint_nfe.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for tol in (None, 1e-5):
        for n_int in (1, 10, 100):
            row: dict[str, Any] = {"tol": tol or "default (1e-7/1e-9)", "intervals": n_int}
            ours = backward_nfe("neuralode", n_int + 1, tol, None)
            full = backward_nfe("neuralode", n_int + 1, tol, "rms")
            row["ours_seminorm"] = ours["backward_nfe"]
            row["ours_full_norm"] = full["backward_nfe"]
            row["forward_nfe"] = ours["forward_nfe"]
            if torchdiffeq is not None:
                peer = backward_nfe("torchdiffeq", n_int + 1, tol, None)
                row["torchdiffeq"] = peer["backward_nfe"]
                row["torchdiffeq_forward_nfe"] = peer["forward_nfe"]
                rel = (ours["grad"] - peer["grad"]).norm() / peer["grad"].norm()
                row["grad_rel_diff"] = float(rel)
                row["ratio"] = row["ours_seminorm"] / row["torchdiffeq"]
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    head = "| tol | intervals | ours (seminorm) | ours (full norm) | torchdiffeq | ours / peer |"
    print(head)
    print("|" + " --- |" * 6)
    for r in rows:
        peer = r.get("torchdiffeq", "-")
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        print(
            f"| {r['tol']} | {r['intervals']} | {r['ours_seminorm']} | {r['ours_full_norm']} | "
            f"{peer} | {ratio} |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
