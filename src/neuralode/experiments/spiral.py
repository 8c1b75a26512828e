"""Spiral demo: learn the dynamics of a 2-D cubic spiral from a sampled trajectory.

The system is the one of Chen et al. (2018), "Neural Ordinary Differential Equations", as written
in the public ``ode_demo.py`` of torchdiffeq::

    dy/dt = (y ** 3) @ A,    A = [[-0.1, 2.0], [-2.0, -0.1]],    y(0) = (2, 0),

sampled at 1000 evenly spaced times in [0, 25]. A small MLP vector field (``y ** 3 -> 50 tanh ->
2``) is trained on short windows of the true trajectory: each window starts on the true state and
is integrated for ``batch_time`` samples with :func:`neuralode.odeint`. Training has two phases:
Adam on random mini-batches of windows (as in the paper's demo), then L-BFGS on the mean squared
error over all windows, which removes the residual error that Adam's sampling noise leaves and
that the long-horizon trajectory is very sensitive to. The learned field is then integrated from
``y0`` over the whole interval and compared with the truth.

Run it with ``neuralode train spiral --out runs/spiral`` (or ``make demo``). The run folder gets
``config.json``, ``metrics.jsonl`` (one line per evaluation during training), ``metrics.json``
(final results) and ``spiral.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neuralode import odeint
from neuralode.experiments.common import (
    append_jsonl,
    environment_info,
    make_run_dir,
    progress_bar,
    require,
    run_requirements,
    seed_everything,
    write_json,
)

__all__ = [
    "CountingField",
    "SpiralDemoConfig",
    "SpiralField",
    "add_arguments",
    "make_data",
    "run",
    "train",
    "true_field",
]

TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))
TRUE_Y0 = (2.0, 0.0)
LOSSES = ("l1", "mse", "relative")


@dataclass(frozen=True)
class SpiralDemoConfig:
    """Resolved settings of one spiral run (written to ``config.json``).

    The defaults run in about a minute on 2 CPU threads and reach a full-trajectory RMSE of about
    0.034. The training and evaluation tolerances apply to ``method``; the true trajectory is
    always generated with dopri5 at ``data_rtol``/``data_atol``. Everything is float64.
    """

    out: str = "runs/spiral"
    iters: int = 500
    method: str = "dopri5"
    seed: int = 0
    data_size: int = 1000
    t_end: float = 25.0
    batch_time: int = 10
    batch_size: int = 20
    hidden: int = 50
    lr: float = 1e-2
    lr_final: float = 1e-3
    rtol: float = 1e-6
    atol: float = 1e-8
    eval_rtol: float = 1e-7
    eval_atol: float = 1e-9
    data_rtol: float = 1e-10
    data_atol: float = 1e-12
    loss: str = "l1"
    polish_steps: int = 25
    polish_max_iter: int = 20
    polish_loss: str = "mse"
    eval_every: int = 100
    threads: int = 2
    quiet: bool = False

    def __post_init__(self) -> None:
        positive = (
            "iters",
            "data_size",
            "batch_size",
            "hidden",
            "eval_every",
            "threads",
            "polish_max_iter",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if not 2 <= self.batch_time <= self.data_size:
            raise ValueError(
                f"`batch_time` must be in [2, data_size={self.data_size}], got {self.batch_time}."
            )
        if self.batch_size > self.data_size - self.batch_time:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must not exceed data_size - batch_time "
                f"({self.data_size - self.batch_time}): windows are drawn without replacement."
            )
        for name in ("loss", "polish_loss"):
            if getattr(self, name) not in LOSSES:
                raise ValueError(
                    f"`{name}` must be one of {list(LOSSES)}, got {getattr(self, name)!r}."
                )
        if self.polish_steps < 0:
            raise ValueError(f"`polish_steps` must be >= 0, got {self.polish_steps}.")
        for name in ("t_end", "lr", "lr_final", "rtol", "atol", "eval_rtol", "eval_atol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")


def true_field(y: Tensor) -> Tensor:
    """The true vector field ``(y ** 3) @ A``; ``y`` has shape ``[..., 2]``."""
    a = torch.tensor(TRUE_A, dtype=y.dtype, device=y.device)
    return (y**3) @ a


class SpiralField(nn.Module):
    """MLP vector field ``f(t, y) = W2 tanh(W1 y**3 + b1) + b2`` of the paper's public demo.

    Args:
        hidden: width of the tanh layer (50 in the demo).

    Input ``y`` has shape ``[..., 2]``; the output has the same shape. The field is autonomous.
    """

    def __init__(self, hidden: int = 50) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        for module in self.net.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.1)
                nn.init.zeros_(module.bias)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return self.net(y**3)


class CountingField(nn.Module):
    """Wraps a vector field ``f(t, y)`` and counts its evaluations (function evaluations, NFE)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        return self.field(t, y)


class _TrueField(nn.Module):
    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return true_field(y)


def _odeint(func: nn.Module, y0: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
    """:func:`neuralode.odeint` for a tensor state (narrows its tensor-or-tuple return type)."""
    ys = odeint(func, y0, t, **kwargs)
    if not isinstance(ys, Tensor):
        raise TypeError(f"expected a tensor solution, got {type(ys).__name__}")
    return ys


def make_data(config: SpiralDemoConfig) -> tuple[Tensor, Tensor]:
    """Sample the true trajectory.

    Returns:
        ``(t, y)`` in float64: ``t`` of shape ``[data_size]`` evenly spaced in ``[0, t_end]``;
        ``y`` of shape ``[data_size, 2]``, integrated with dopri5 at the data tolerances.
    """
    t = torch.linspace(0.0, config.t_end, config.data_size, dtype=torch.float64)
    y0 = torch.tensor(TRUE_Y0, dtype=torch.float64)
    with torch.no_grad():
        y = _odeint(
            _TrueField(), y0, t, rtol=config.data_rtol, atol=config.data_atol, method="dopri5"
        )
    return t, y


def _get_batch(
    t: Tensor, y: Tensor, batch_time: int, batch_size: int, rng: np.random.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Random windows of the trajectory: ``(y0 [B, 2], t [T], y [T, B, 2])``."""
    starts = rng.choice(len(t) - batch_time, size=batch_size, replace=False)
    index = torch.from_numpy(starts)[None, :] + torch.arange(batch_time)[:, None]
    return y[index[0]], t[:batch_time] - t[0], y[index]


def _loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Window loss on ``[T, B, 2]`` predictions.

    ``"l1"`` is the mean absolute error of the paper's demo; ``"mse"`` the mean squared error,
    smooth and so better suited to L-BFGS. ``"relative"`` divides each window's mean absolute
    error by how far the true state moves in that window, so that the slow inner turns of the
    spiral (where the field is small) weigh as much as the fast outer ones.
    """
    if kind == "mse":
        return (pred - target).pow(2).mean()
    err = (pred - target).abs().mean(dim=(0, 2))
    if kind == "l1":
        return err.mean()
    motion = (target - target[:1]).abs().mean(dim=(0, 2))
    return (err / (motion + 1e-6)).mean()


def _evaluate(
    field: CountingField, t: Tensor, y_true: Tensor, config: SpiralDemoConfig
) -> dict[str, Any]:
    """Integrate the learned field from ``y0`` over the whole grid and compare with the truth.

    ``rmse`` is the root mean square over all times and both components; ``max_error`` is the
    largest Euclidean distance between learned and true state over the grid.
    """
    before = field.nfe
    with torch.no_grad():
        y_pred = _odeint(
            field, y_true[0], t, rtol=config.eval_rtol, atol=config.eval_atol, method=config.method
        )
    err = y_pred - y_true
    return {
        "rmse": err.pow(2).mean().sqrt().item(),
        "max_error": err.norm(dim=-1).max().item(),
        "eval_nfe": field.nfe - before,
        "y_pred": y_pred,
    }


class _Recorder:
    """Evaluates the learned field on the full trajectory and appends a ``metrics.jsonl`` line."""

    def __init__(
        self, path: Path, field: CountingField, t: Tensor, y_true: Tensor, config: SpiralDemoConfig
    ) -> None:
        self.path, self.field, self.t, self.y_true, self.config = path, field, t, y_true, config
        self.start = time.perf_counter()
        self.train_nfe = 0
        self.last: dict[str, Any] = {}

    def __call__(self, phase: str, it: int, loss: float, **extra: Any) -> dict[str, Any]:
        self.last = _evaluate(self.field, self.t, self.y_true, self.config)
        record = {
            "phase": phase,
            "iter": it,
            "loss": loss,
            **extra,
            "rmse": self.last["rmse"],
            "max_error": self.last["max_error"],
            "eval_nfe": self.last["eval_nfe"],
            "train_nfe_total": self.train_nfe,
            "elapsed_s": time.perf_counter() - self.start,
        }
        append_jsonl(self.path, record)
        return self.last


def run(config: SpiralDemoConfig) -> dict[str, Any]:
    """Train and evaluate one spiral run into ``config.out``; return the final metrics.

    Two phases: ``iters`` Adam steps on ``batch_size`` random windows (the paper's demo), then
    ``polish_steps`` L-BFGS steps on the loss over *all* windows. The second phase is
    deterministic and converges where Adam's window-sampling noise stalls, which is what the
    long-horizon trajectory error needs.
    """
    require(run_requirements({}, quiet=config.quiet))
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        run_dir = make_run_dir(config.out)
        jsonl_path = run_dir / "metrics.jsonl"
        if jsonl_path.exists():
            jsonl_path.unlink()
        write_json(
            run_dir / "config.json",
            {"experiment": "spiral", **dataclasses.asdict(config), "env": environment_info()},
        )

        seed_everything(config.seed)
        rng = np.random.default_rng(config.seed)
        t, y_true = make_data(config)

        model = SpiralField(config.hidden).to(torch.float64)
        field = CountingField(model)
        record = _Recorder(jsonl_path, field, t, y_true, config)
        solver = {"rtol": config.rtol, "atol": config.atol, "method": config.method}
        bar = progress_bar(
            quiet=config.quiet, total=config.iters + config.polish_steps, desc="adam", leave=True
        )

        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        # Cosine decay from lr to lr_final: large steps find the field, small ones refine it.
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.iters, eta_min=config.lr_final
        )
        loss_value = float("nan")
        loss_avg: float | None = None
        for it in range(1, config.iters + 1):
            batch_y0, batch_t, batch_y = _get_batch(
                t, y_true, config.batch_time, config.batch_size, rng
            )
            optimizer.zero_grad(set_to_none=True)
            nfe_before = field.nfe
            loss = _loss(_odeint(field, batch_y0, batch_t, **solver), batch_y, config.loss)
            record.train_nfe += field.nfe - nfe_before
            loss.backward()
            optimizer.step()
            scheduler.step()

            loss_value = loss.item()
            loss_avg = loss_value if loss_avg is None else 0.95 * loss_avg + 0.05 * loss_value
            bar.update()
            if it % config.eval_every == 0 or it == config.iters:
                lr = optimizer.param_groups[0]["lr"]
                last = record("adam", it, loss_value, loss_avg=loss_avg, lr=lr)
                bar.set_postfix(loss=f"{loss_avg:.2e}", rmse=f"{last['rmse']:.3g}")
            else:
                bar.set_postfix(loss=f"{loss_avg:.2e}", refresh=False)

        if config.polish_steps:
            bar.set_description("lbfgs")
            n = config.data_size - config.batch_time
            index = torch.arange(n)[None, :] + torch.arange(config.batch_time)[:, None]
            all_y0, all_t, all_y = y_true[index[0]], t[: config.batch_time] - t[0], y_true[index]
            # The full-batch loss gets small (~1e-6): solve it at the evaluation tolerances.
            polish_solver = {**solver, "rtol": config.eval_rtol, "atol": config.eval_atol}
            lbfgs = torch.optim.LBFGS(
                model.parameters(),
                max_iter=config.polish_max_iter,
                history_size=20,
                line_search_fn="strong_wolfe",
            )

            def closure() -> Tensor:
                lbfgs.zero_grad(set_to_none=True)
                nfe_before = field.nfe
                ys = _odeint(field, all_y0, all_t, **polish_solver)
                loss = _loss(ys, all_y, config.polish_loss)
                record.train_nfe += field.nfe - nfe_before
                loss.backward()
                closure_losses.append(loss.item())
                return loss

            closure_losses: list[float] = []
            for step in range(1, config.polish_steps + 1):
                lbfgs.step(closure)
                loss_value = closure_losses[-1]
                last = record("lbfgs", config.iters + step, loss_value)
                bar.update()
                bar.set_postfix(loss=f"{loss_value:.2e}", rmse=f"{last['rmse']:.3g}")
        bar.close()
        if not record.last:  # no evaluation yet (iters == 0 is rejected, so only defensive)
            record("final", config.iters + config.polish_steps, loss_value)

        train_seconds = time.perf_counter() - start
        last = record.last
        _plot(run_dir / "spiral.png", model, t, y_true, last["y_pred"], last["rmse"])
        metrics = {
            "experiment": "spiral",
            "rmse": last["rmse"],
            "max_error": last["max_error"],
            "final_loss": loss_value,
            "iters": config.iters,
            "polish_steps": config.polish_steps,
            "method": config.method,
            "seed": config.seed,
            "eval_nfe": last["eval_nfe"],
            "train_nfe_total": record.train_nfe,
            "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - start,
            "torch_version": torch.__version__,
            "threads": config.threads,
        }
        write_json(run_dir / "metrics.json", metrics)
        if not config.quiet:
            print(
                f"spiral: rmse={metrics['rmse']:.4g} max_error={metrics['max_error']:.4g} "
                f"wall={metrics['wall_seconds']:.1f}s -> {run_dir}"
            )
        return metrics
    finally:
        torch.set_num_threads(previous_threads)


def _plot(
    path: Path, model: nn.Module, t: Tensor, y_true: Tensor, y_pred: Tensor, rmse: float
) -> None:
    """Figure: x(t) and y(t), phase portrait, and true vs learned vector fields on a grid."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from neuralode.experiments.common import atomic_write_bytes

    tn = t.numpy()
    yt = y_true.detach().numpy()
    yp = y_pred.detach().numpy()

    lim = 1.1 * float(np.abs(yt).max())
    grid = torch.linspace(-lim, lim, 41, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([gx, gy], dim=-1)
    with torch.no_grad():
        f_true = true_field(points).numpy()
        f_learned = model(torch.zeros((), dtype=torch.float64), points).numpy()
    err = np.linalg.norm(f_learned - f_true, axis=-1)
    gxn, gyn = gx.numpy(), gy.numpy()

    fig = Figure(figsize=(15, 9), layout="constrained")
    axes = fig.subplots(2, 3)
    fig.suptitle(f"Neural ODE on the cubic spiral: full-trajectory RMSE {rmse:.3g}")

    for k, (ax, name) in enumerate(zip(axes[0, :2], ("x", "y"), strict=True)):
        ax.plot(tn, yt[:, k], color="tab:green", lw=2.0, label="true")
        ax.plot(tn, yp[:, k], color="tab:blue", lw=1.2, ls="--", label="learned")
        ax.set(xlabel="t", ylabel=name, title=f"{name}(t)")
        ax.legend(loc="upper right")

    ax = axes[0, 2]
    ax.plot(yt[:, 0], yt[:, 1], color="tab:green", lw=2.0, label="true")
    ax.plot(yp[:, 0], yp[:, 1], color="tab:blue", lw=1.2, ls="--", label="learned")
    ax.plot(*yt[0], "ko", ms=4, label="y0")
    ax.set(xlabel="x", ylabel="y", title="phase portrait", xlim=(-lim, lim), ylim=(-lim, lim))
    ax.set_aspect("equal")
    ax.legend(loc="lower left")

    for ax, f, title in (
        (axes[1, 0], f_true, "true vector field"),
        (axes[1, 1], f_learned, "learned vector field"),
    ):
        speed = np.linalg.norm(f, axis=-1)
        ax.streamplot(
            gxn, gyn, f[..., 0], f[..., 1], color=np.log1p(speed), cmap="viridis", density=1.2
        )
        ax.plot(yt[:, 0], yt[:, 1], color="tab:red", lw=0.8, alpha=0.6)
        ax.set(xlabel="x", ylabel="y", title=title, xlim=(-lim, lim), ylim=(-lim, lim))
        ax.set_aspect("equal")

    ax = axes[1, 2]
    mesh = ax.pcolormesh(gxn, gyn, np.log10(err + 1e-12), cmap="magma", shading="auto")
    fig.colorbar(mesh, ax=ax, label="log10 |learned - true|")
    ax.plot(yt[:, 0], yt[:, 1], color="cyan", lw=0.8)
    ax.set(xlabel="x", ylabel="y", title="vector field error (true trajectory in cyan)")
    ax.set_aspect("equal")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the spiral experiment's options to ``parser`` (``neuralode train spiral ...``)."""
    d = SpiralDemoConfig()
    parser.add_argument("--out", default=d.out, help=f"run folder (default: {d.out})")
    parser.add_argument(
        "--iters", type=int, default=d.iters, help=f"Adam iterations (default: {d.iters})"
    )
    parser.add_argument("--method", default=d.method, help=f"solver (default: {d.method})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    parser.add_argument(
        "--polish-steps",
        type=int,
        default=d.polish_steps,
        help=f"L-BFGS steps on all windows after Adam; 0 skips them (default: {d.polish_steps})",
    )
    parser.add_argument(
        "--polish-max-iter",
        type=int,
        default=d.polish_max_iter,
        help=f"loss evaluations per L-BFGS step at most (default: {d.polish_max_iter})",
    )
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam lr (default: {d.lr})")
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})"
    )
    parser.add_argument(
        "--batch-time",
        type=int,
        default=d.batch_time,
        help=f"samples per training window (default: {d.batch_time})",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help=f"iterations between full-trajectory evaluations (default: {d.eval_every})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help=f"torch CPU threads during the run (default: {d.threads})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary line")


def config_from_args(args: argparse.Namespace) -> SpiralDemoConfig:
    """Build a :class:`SpiralDemoConfig` from parsed ``neuralode train spiral`` arguments."""
    names = {f.name for f in dataclasses.fields(SpiralDemoConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["out"] = os.fspath(values.get("out", SpiralDemoConfig.out))
    return SpiralDemoConfig(**values)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of ``neuralode train spiral``: run the experiment and return its metrics."""
    return run(config_from_args(args))
