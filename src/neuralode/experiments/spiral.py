"""Spiral demo: learn the dynamics of a 2-D cubic spiral from a sampled trajectory.

The system is the one of Chen et al. (2018), "Neural Ordinary Differential Equations", as written
in the public ``ode_demo.py`` of torchdiffeq::

    dy/dt = (y ** 3) @ A,    A = [[-0.1, 2.0], [-2.0, -0.1]],    y(0) = (2, 0),

sampled at 1000 evenly spaced times in [0, 25]. A small MLP vector field (``y ** 3 -> 50 tanh ->
2``) is trained on short windows of the true trajectory: each window starts on the true state and
is integrated for ``batch_time`` samples with :func:`neuralode.odeint`. Training has two phases
(one :class:`~neuralode.experiments.engine.Phases` optimizer): ``iterations`` Adam steps on
random mini-batches of windows (as in the paper's demo), then ``polish_steps`` L-BFGS steps on
the loss over all windows, which removes the residual error that Adam's sampling noise leaves and
that the long-horizon trajectory is very sensitive to. Every ``eval_every`` steps (the engine's
epoch) the learned field is integrated from ``y0`` over the whole interval and compared with the
truth (``rmse``, ``max_error``).

It runs on the training engine like the other experiments: ``neuralode train spiral --out RUN``
(or ``make demo``) writes ``config.json``, ``metrics.jsonl`` ("train" lines with the loss and
NFE, "epoch" lines with the full-trajectory errors), ``checkpoints/last.pt``, ``metrics.json``
(final results) and ``figures/spiral.png`` and ``figures/training.png``; ``neuralode resume``,
``evaluate`` and ``plot`` work on the run folder. Mini-batches are drawn from a generator keyed
by ``(seed, step)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neuralode import METHODS, odeint
from neuralode.experiments import engine
from neuralode.experiments.common import read_json, seed_everything
from neuralode.experiments.config import RunSettings, check_at_least, check_positive, run_field
from neuralode.experiments.distributed import DistContext

__all__ = [
    "CONFIG",
    "HEADLINE",
    "NAME",
    "CountingField",
    "SpiralDemoConfig",
    "SpiralField",
    "SpiralTask",
    "build",
    "figures",
    "make_data",
    "make_optimizer",
    "make_schedule",
    "summarize",
    "true_field",
]

TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))
TRUE_Y0 = (2.0, 0.0)
LOSSES = ("l1", "mse", "relative")


@dataclass(frozen=True)
class SpiralDemoConfig(RunSettings):
    """Settings of one spiral run (written to ``config.json``).

    The defaults run in under a minute on 2 CPU threads (see the demo results in
    docs/experiments/index.md). The training and evaluation tolerances apply to ``method``;
    the true trajectory is always generated with dopri5 at ``data_rtol``/``data_atol``.
    Everything is float64.
    """

    out: str = run_field("out", "runs/spiral")
    device: str = run_field(
        "device", "cpu", "device (a 2-D field in float64: the CPU is the fast choice)"
    )
    log_every: int = run_field("log_every", 10)

    iterations: int = field(default=500, metadata={"help": "Adam steps on random windows"})
    polish_steps: int = field(
        default=25, metadata={"help": "L-BFGS steps on all windows after Adam (0: none)"}
    )
    polish_max_iter: int = field(
        default=20, metadata={"help": "loss evaluations per L-BFGS step at most"}
    )
    polish_loss: str = field(
        default="mse", metadata={"help": "loss of the L-BFGS phase", "choices": LOSSES}
    )
    method: str = field(default="dopri5", metadata={"help": "solver", "choices": METHODS})
    data_size: int = field(default=1000, metadata={"help": "samples of the true trajectory"})
    t_end: float = field(default=25.0, metadata={"help": "end time of the trajectory"})
    batch_time: int = field(default=10, metadata={"help": "samples per training window"})
    batch_size: int = field(default=20, metadata={"help": "windows per Adam step"})
    hidden: int = field(default=50, metadata={"help": "width of the field's tanh layer"})
    lr: float = field(default=1e-2, metadata={"help": "Adam's initial learning rate"})
    lr_final: float = field(
        default=1e-3, metadata={"help": "Adam's learning rate after its cosine decay"}
    )
    rtol: float = field(default=1e-6, metadata={"help": "training rtol"})
    atol: float = field(default=1e-8, metadata={"help": "training atol"})
    eval_rtol: float = field(
        default=1e-7, metadata={"help": "rtol of the evaluation and the L-BFGS phase"}
    )
    eval_atol: float = field(
        default=1e-9, metadata={"help": "atol of the evaluation and the L-BFGS phase"}
    )
    data_rtol: float = field(default=1e-10, metadata={"help": "rtol of the true trajectory"})
    data_atol: float = field(default=1e-12, metadata={"help": "atol of the true trajectory"})
    loss: str = field(default="l1", metadata={"help": "loss of the Adam phase", "choices": LOSSES})
    eval_every: int = field(
        default=100, metadata={"help": "steps between full-trajectory evaluations"}
    )

    @property
    def total_steps(self) -> int:
        """Adam steps and L-BFGS steps."""
        return self.iterations + self.polish_steps

    def data_requirements(self) -> dict[str, str]:
        """Optional packages the data needs (none: the trajectory is generated)."""
        return {}

    def extension_blocker(self) -> str | None:
        """Why ``neuralode resume RUN --iterations N`` cannot extend this run exactly."""
        if self.polish_steps:
            return "its L-BFGS phase follows the Adam iterations"
        if self.lr != self.lr_final:
            return "its cosine learning-rate decay is shaped by its length"
        return None

    def validate(self) -> None:
        super().validate()  # the run settings
        check_at_least(self, 1, "iterations", "data_size", "batch_size", "hidden", "eval_every")
        check_at_least(self, 1, "polish_max_iter")
        check_at_least(self, 0, "polish_steps")
        if not 2 <= self.batch_time <= self.data_size:
            raise ValueError(
                f"batch_time must be in [2, data_size={self.data_size}]; got {self.batch_time}"
            )
        if self.batch_size > self.data_size - self.batch_time:
            raise ValueError(
                f"batch_size ({self.batch_size}) must not exceed data_size - batch_time "
                f"({self.data_size - self.batch_time}): windows are drawn without replacement"
            )
        check_positive(self, "t_end", "lr", "lr_final", "rtol", "atol", "eval_rtol", "eval_atol")
        check_positive(self, "data_rtol", "data_atol")


NAME = "spiral"
#: The experiment's config class (every field is a flag of ``neuralode train spiral``).
CONFIG = SpiralDemoConfig
#: The metrics of the line printed at the end of a run.
HEADLINE = ("rmse", "max_error", "eval_nfe")


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
        dy: Tensor = self.net(y**3)
        return dy


class CountingField(nn.Module):
    """Wraps a vector field ``f(t, y)`` and counts its evaluations (function evaluations, NFE)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        dy: Tensor = self.field(t, y)
        return dy


class _TrueField(nn.Module):
    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        return true_field(y)


def _odeint(func: nn.Module, y0: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
    """:func:`neuralode.odeint` for a tensor state (narrows its tensor-or-tuple return type)."""
    ys = odeint(func, y0, t, **kwargs)
    if not isinstance(ys, Tensor):
        raise TypeError(f"expected a tensor solution, got {type(ys).__name__}")
    return ys


def make_data(
    config: SpiralDemoConfig, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Sample the true trajectory.

    Returns:
        ``(t, y)`` in float64 on ``device``: ``t`` of shape ``[data_size]`` evenly spaced in
        ``[0, t_end]``; ``y`` of shape ``[data_size, 2]``, integrated with dopri5 at the data
        tolerances.
    """
    t = torch.linspace(0.0, config.t_end, config.data_size, dtype=torch.float64, device=device)
    y0 = torch.tensor(TRUE_Y0, dtype=torch.float64, device=device)
    with torch.no_grad():
        y = _odeint(
            _TrueField(), y0, t, rtol=config.data_rtol, atol=config.data_atol, method="dopri5"
        )
    return t, y


def _windows(
    t: Tensor, y: Tensor, starts: Tensor, batch_time: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The windows of the trajectory starting at ``starts``: ``(y0 [B, 2], t [T], y [T, B, 2])``."""
    index = starts[None, :] + torch.arange(batch_time, device=starts.device)[:, None]
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


class SpiralTask:
    """The spiral's half of training (see :class:`neuralode.experiments.engine.Task`).

    Steps ``0 .. iterations - 1`` draw ``batch_size`` windows from a generator keyed by
    ``(seed, step)`` and use ``loss`` at the training tolerances; later steps (the L-BFGS phase)
    use every window, ``polish_loss`` and the evaluation tolerances. ``evaluate`` integrates the
    learned field over the whole trajectory.
    """

    def __init__(self, config: SpiralDemoConfig, ctx: DistContext) -> None:
        self.config = config
        self.ctx = ctx
        self.t, self.y_true = make_data(config, ctx.device)
        self.train_nfe = 0  # every evaluation of the field in training, L-BFGS's line search too

    def train_step(self, model: nn.Module, step: int) -> engine.StepOutput:
        c = self.config
        if step < c.iterations:
            rng = np.random.default_rng([c.seed, step])
            starts = rng.choice(c.data_size - c.batch_time, size=c.batch_size, replace=False)
            kind, rtol, atol = c.loss, c.rtol, c.atol
        else:
            starts = np.arange(c.data_size - c.batch_time)
            kind, rtol, atol = c.polish_loss, c.eval_rtol, c.eval_atol
        y0, t, target = _windows(
            self.t, self.y_true, torch.from_numpy(starts).to(self.t.device), c.batch_time
        )
        field = CountingField(model)
        loss = _loss(_odeint(field, y0, t, rtol=rtol, atol=atol, method=c.method), target, kind)
        self.train_nfe += field.nfe
        return engine.StepOutput(
            loss=loss,
            sums={"loss": float(loss.detach())},
            count=1,
            values={"nfe_forward": float(field.nfe)},
        )

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        return {}

    def predict(self, model: nn.Module) -> tuple[Tensor, int]:
        """The learned trajectory from ``y0`` on the data times (``[data_size, 2]``) and the
        number of field evaluations it took, at the evaluation tolerances."""
        field = CountingField(model)
        with torch.no_grad():
            y = _odeint(
                field,
                self.y_true[0],
                self.t,
                rtol=self.config.eval_rtol,
                atol=self.config.eval_atol,
                method=self.config.method,
            )
        return y, field.nfe

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``rmse``: root mean square over all times and both components of the learned minus
        the true trajectory; ``max_error``: its largest Euclidean norm over the grid;
        ``eval_nfe``: the field evaluations of that solve."""
        y_pred, nfe = self.predict(model)
        err = y_pred - self.y_true
        return {
            "rmse": float(err.pow(2).mean().sqrt()),
            "max_error": float(err.norm(dim=-1).max()),
            "eval_nfe": float(nfe),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"train_nfe": self.train_nfe}  # the batches are keyed by (seed, step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_nfe = int(state["train_nfe"])


def build(config: SpiralDemoConfig, ctx: DistContext) -> tuple[SpiralField, SpiralTask]:
    """The field (float64, initialised from ``seed``) and the task (the true trajectory)."""
    if ctx.distributed:
        raise ValueError(
            "the spiral experiment runs in one process (a 2-D field); run it without torchrun"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    model = SpiralField(config.hidden).to(dtype=torch.float64, device=ctx.device)
    return model, SpiralTask(config, ctx)


def make_optimizer(
    config: SpiralDemoConfig, model: nn.Module, task: SpiralTask
) -> tuple[engine.Phases, Any]:
    """Adam for ``iterations`` steps, then L-BFGS; Adam's learning rate decays from ``lr`` to
    ``lr_final`` on a cosine (large steps find the field, small ones refine it)."""
    adam = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        adam, T_max=config.iterations, eta_min=config.lr_final
    )
    lbfgs = torch.optim.LBFGS(
        model.parameters(),
        max_iter=config.polish_max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    return engine.Phases([(adam, config.iterations), (lbfgs, config.polish_steps)]), scheduler


def make_schedule(config: SpiralDemoConfig, task: SpiralTask) -> engine.Schedule:
    return engine.schedule_for(config, config.total_steps, config.eval_every)


def summarize(trainer: engine.Trainer, config: SpiralDemoConfig, run_dir: Path) -> dict[str, Any]:
    """The final metrics: the last evaluation's errors and the training's NFE and seconds."""
    epochs = [r for r in engine.read_metrics(run_dir) if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else trainer.last_epoch
    task = trainer.task
    assert isinstance(task, SpiralTask)
    return {
        "experiment": NAME,
        "rmse": last.get("rmse"),
        "max_error": last.get("max_error"),
        "final_loss": last.get("train_loss"),
        "iterations": config.iterations,
        "polish_steps": config.polish_steps,
        "steps": trainer.step,
        "method": config.method,
        "seed": config.seed,
        "eval_nfe": int(last["eval_nfe"]) if "eval_nfe" in last else None,
        "train_nfe_total": task.train_nfe,
        "train_seconds": sum(r.get("seconds", 0.0) for r in epochs),
        "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in epochs),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


def figures(
    run_dir: Path,
    config: SpiralDemoConfig,
    model: nn.Module | None,
    task: engine.Task | None,
    step: int | None,
) -> list[Path]:
    """``figures/training.png`` (loss and full-trajectory RMSE over the steps) and, for a
    model, ``figures/spiral.png`` (see :func:`_plot`)."""
    paths = [_plot_training(run_dir)]
    if model is None or not isinstance(task, SpiralTask):
        return paths
    y_pred, _ = task.predict(model)
    rmse = float((y_pred - task.y_true).pow(2).mean().sqrt())
    path = run_dir / "figures" / "spiral.png"
    _plot(path, model, task.t.cpu(), task.y_true.cpu(), y_pred.cpu(), rmse, step or 0)
    return [*paths, path]


def _plot_training(run_dir: Path) -> Path:
    """``figures/training.png``: the training loss and the full-trajectory RMSE over steps,
    with the start of the L-BFGS phase marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from neuralode.experiments.common import atomic_write_bytes

    records = engine.read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    config = read_json(run_dir / "config.json")
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    loss_names = f"{config.get('loss', '?')} loss, then {config.get('polish_loss', '?')}"
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="logged")
    if epochs:
        axes[0].plot(
            [r["step"] for r in epochs],
            [r["train_loss"] for r in epochs],
            "o",
            label="mean between evaluations",
        )
        axes[1].plot(
            [r["step"] for r in epochs], [r["rmse"] for r in epochs], "o-", label="RMSE from y0"
        )
    axes[0].set(xlabel="step", ylabel="window loss", yscale="log", title=f"training ({loss_names})")
    axes[1].set(
        xlabel="step",
        ylabel="RMSE (state units)",
        yscale="log",
        title="full-trajectory error",
    )
    iterations = config.get("iterations")
    for ax in axes:
        if isinstance(iterations, int) and config.get("polish_steps"):
            ax.axvline(iterations, color="0.5", ls=":", lw=1, label="Adam -> L-BFGS")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    path = run_dir / "figures" / "training.png"
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _plot(
    path: Path,
    model: nn.Module,
    t: Tensor,
    y_true: Tensor,
    y_pred: Tensor,
    rmse: float,
    step: int,
) -> None:
    """Figure: x(t) and y(t), phase portrait, and true vs learned vector fields on a grid (the
    model's weights after ``step`` training steps). The system has no physical units: times and
    states are in the units of the equation."""
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
        device = next(model.parameters()).device
        f_learned = model(torch.zeros((), dtype=torch.float64), points.to(device)).cpu().numpy()
    err = np.linalg.norm(f_learned - f_true, axis=-1)
    gxn, gyn = gx.numpy(), gy.numpy()

    fig = Figure(figsize=(15, 9), layout="constrained")
    axes = fig.subplots(2, 3)
    fig.suptitle(
        f"Neural ODE on the cubic spiral after {step} steps: full-trajectory RMSE {rmse:.3g}"
    )

    for k, (ax, name) in enumerate(zip(axes[0, :2], ("x", "y"), strict=True)):
        ax.plot(tn, yt[:, k], color="tab:green", lw=2.0, label="true")
        ax.plot(tn, yp[:, k], color="tab:blue", lw=1.2, ls="--", label="learned")
        ax.set(xlabel="time t", ylabel=f"state {name}", title=f"{name}(t)")
        ax.legend(loc="upper right")

    ax = axes[0, 2]
    ax.plot(yt[:, 0], yt[:, 1], color="tab:green", lw=2.0, label="true")
    ax.plot(yp[:, 0], yp[:, 1], color="tab:blue", lw=1.2, ls="--", label="learned")
    ax.plot(*yt[0], "ko", ms=4, label="y0")
    ax.set(
        xlabel="state x",
        ylabel="state y",
        title="phase portrait",
        xlim=(-lim, lim),
        ylim=(-lim, lim),
    )
    ax.set_aspect("equal")
    ax.legend(loc="lower left")

    for ax, f, title in (
        (axes[1, 0], f_true, "true vector field"),
        (axes[1, 1], f_learned, "learned vector field"),
    ):
        speed = np.linalg.norm(f, axis=-1)
        stream = ax.streamplot(
            gxn, gyn, f[..., 0], f[..., 1], color=np.log1p(speed), cmap="viridis", density=1.2
        )
        fig.colorbar(stream.lines, ax=ax, label="log(1 + speed |dy/dt|)")
        ax.plot(yt[:, 0], yt[:, 1], color="tab:red", lw=0.8, alpha=0.6, label="true trajectory")
        ax.legend(loc="lower left", fontsize=8)
        ax.set(xlabel="state x", ylabel="state y", title=title, xlim=(-lim, lim), ylim=(-lim, lim))
        ax.set_aspect("equal")

    ax = axes[1, 2]
    mesh = ax.pcolormesh(gxn, gyn, np.log10(err + 1e-12), cmap="magma", shading="auto")
    fig.colorbar(mesh, ax=ax, label="log10 |learned - true|")
    ax.plot(yt[:, 0], yt[:, 1], color="cyan", lw=0.8, label="true trajectory")
    ax.legend(loc="lower left", fontsize=8)
    ax.set(xlabel="state x", ylabel="state y", title="vector field error")
    ax.set_aspect("equal")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
