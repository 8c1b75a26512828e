"""Density estimation on 2-D toy data with continuous normalizing flows (Chen et al. 2018,
Sec. 4.1; FFJORD, Grathwohl et al. 2019; regularisers of Finlay et al. 2020).

``neuralode train density --data moons --model ffjord`` fits a flow to samples of a toy
distribution (:mod:`neuralode.data.toy2d`) by maximum likelihood. Models (``--model``):

- ``ffjord``: a CNF (:class:`neuralode.nn.cnf.CNF`) with FFJORD's toy vector field, ConcatSquash
  layers ``2-64-64-64-2`` with tanh, Hutchinson's trace estimator during training, dopri5 at
  ``rtol = atol = 1e-5`` and a learned integration time starting at ``T = 0.5`` (FFJORD's
  ``train_toy.py``: batch 100, Adam lr 1e-3 with weight decay 1e-5, 10000 iterations; its
  script trains the toys with the exact trace, and so does ``--preset ffjord``: on rings it
  leaves the near-Gaussian start about 2000 iterations sooner; the estimator is FFJORD's point,
  for many dimensions);
- ``cnf``: the paper's planar CNF (Eq. 10, :class:`neuralode.nn.cnf.PlanarField`), ``width`` M
  units whose parameters a hypernetwork of ``t`` gives, with the exact trace (torchdiffeq's
  ``examples/cnf.py``: M = 64, hypernetwork width 32, batch 512, Adam lr 1e-3, dopri5 at 1e-5);
- ``planar-nf``: ``num_layers`` K stacked planar layers (Rezende & Mohamed 2015), the paper's
  discrete baseline. A planar layer has no closed-form inverse, so ``log p(x)`` of data needs
  one monotone scalar root per layer: :meth:`neuralode.nn.flows.PlanarFlow.log_prob` bisects it
  (``nf_inverse_iters`` steps, then one Newton step that carries the exact implicit-function
  gradient). That makes maximum likelihood affordable (measured on one CPU thread, K = 64,
  batch 512: 0.5 s per iteration, less than the planar CNF's 0.7 s once its NFE has grown), so
  the NF is trained by maximum likelihood exactly like the CNFs. ``nf_init = "identity"``
  starts every layer at the identity (:func:`identity_init`); the library's random
  initialisation starts 64 layers at about 380 nats on moons and circles.

Training draws a fresh batch every iteration from a generator keyed by ``(seed, step)`` (and the
Hutchinson noise from another keyed the same way), so ``neuralode resume`` repeats an
uninterrupted run exactly; the test set is ``test_size`` points from its own key. Every
``eval_every`` iterations (the engine's epoch) the test NLL is computed in nats with the
**exact** trace (also for ``ffjord``: a CNF sharing the trained field and ``T``), at the training
solver and tolerances, with the test NFE; where :func:`neuralode.data.toy2d.true_log_density`
exists (8gaussians, checkerboard, rings, circles) the true NLL of the same test points is logged
beside it, so the gap is visible. ``kinetic_weight`` and ``jacobian_weight`` add Finlay et al.'s
penalties (kinetic energy and Jacobian Frobenius norm, integrated along the trajectories).

The run folder holds ``config.json``, ``metrics.jsonl`` ("train" lines with loss, NLL, forward
and backward NFE; "epoch" lines with the test NLL, true NLL, test NFE and seconds),
``checkpoints/last.pt``, ``metrics.json`` (final results and settings) and ``figures/``:
``density.png`` (true samples | model samples | model density), ``trajectory.png`` (base
samples carried to data at t = T ... 0, the paper's Figure 5; layer by layer for the NF) and
``training.png`` (test NLL and NFE over iterations). One process only (the models are small:
use one CPU thread per run).

Recipes (``--preset NAME``, files in ``neuralode/experiments/presets/``): ``ffjord``, ``rnode``
(FFJORD's field with T fixed at 1 and both penalties at 0.01, Finlay et al.'s recipe), ``cnf``,
``planar-nf`` and ``quick`` (a tiny run for tests).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neuralode import METHODS
from neuralode.data import toy2d
from neuralode.data.mnist import derive_generator
from neuralode.experiments import engine
from neuralode.experiments.common import explain_empty, read_json, seed_everything
from neuralode.experiments.config import RunSettings, run_field
from neuralode.experiments.distributed import DistContext
from neuralode.nn.cnf import CNF, ConcatSquashMLP, PlanarField
from neuralode.nn.flows import PlanarFlow, PlanarLayer
from neuralode.nn.odenet import count_parameters

__all__ = [
    "CONFIG",
    "HEADLINE",
    "NAME",
    "DensityConfig",
    "DensityTask",
    "build",
    "build_model",
    "figures",
    "make_optimizer",
    "make_schedule",
    "summarize",
]

MODELS = ("ffjord", "cnf", "planar-nf")
TRACE_CHOICES = ("auto", "exact", "hutchinson")
_DATASETS = tuple(toy2d.DATASETS)

_LOG_E_MINUS_1 = math.log(math.expm1(1.0))  # softplus(x) = 1

# Keys of the random streams (with the seed): each stream is a function of its key alone.
_STREAM_DATA, _STREAM_NOISE, _STREAM_TEST, _STREAM_PLOT = 1, 2, 3, 4


@dataclass(frozen=True)
class DensityConfig(RunSettings):
    """Settings of one density-estimation run (written to ``config.json``). Defaults: FFJORD's
    toy recipe (``train_toy.py``)."""

    out: str = run_field("out", "runs/density")
    log_every: int = run_field("log_every", 10)

    data: str = field(default="8gaussians", metadata={"help": "toy dataset", "choices": _DATASETS})
    model: str = field(default="ffjord", metadata={"help": "flow", "choices": MODELS})
    iterations: int = field(default=10000, metadata={"help": "training iterations"})
    batch_size: int = field(default=100, metadata={"help": "fresh samples per iteration"})
    test_size: int = field(default=5000, metadata={"help": "fixed test points"})
    test_batch_size: int = field(default=1000, metadata={"help": "evaluation batch size"})
    eval_every: int = field(
        default=100, metadata={"help": "iterations between test evaluations (and checkpoints)"}
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=1e-5, metadata={"help": "Adam (L2) weight decay"})
    hidden: tuple[int, ...] = field(
        default=(64, 64, 64), metadata={"help": "ffjord: ConcatSquash hidden sizes"}
    )
    activation: str = field(
        default="tanh",
        metadata={"help": "ffjord: activation", "choices": ("tanh", "softplus", "elu")},
    )
    width: int = field(default=64, metadata={"help": "cnf: planar units M"})
    hyper_hidden: int = field(default=32, metadata={"help": "cnf: hypernetwork width"})
    num_layers: int = field(default=64, metadata={"help": "planar-nf: planar layers K"})
    nf_init: str = field(
        default="uniform",
        metadata={
            "help": "planar-nf: 'uniform' (the library's U(-1/sqrt(D), 1/sqrt(D))) or "
            "'identity' (u set so that every layer starts as the identity)",
            "choices": ("uniform", "identity"),
        },
    )
    nf_inverse_iters: int = field(
        default=40, metadata={"help": "planar-nf: bisection steps per layer inverse"}
    )
    T: float = field(default=0.5, metadata={"help": "CNF integration time (initial if learned)"})
    train_T: bool = field(default=True, metadata={"help": "learn the integration time"})
    trace: str = field(
        default="auto",
        metadata={
            "help": "training divergence: 'auto' (hutchinson for ffjord, exact for cnf)",
            "choices": TRACE_CHOICES,
        },
    )
    noise: str = field(
        default="gaussian",
        metadata={"help": "Hutchinson noise", "choices": ("gaussian", "rademacher")},
    )
    method: str = field(default="dopri5", metadata={"help": "ODE solver", "choices": METHODS})
    rtol: float = field(default=1e-5, metadata={"help": "solver relative tolerance"})
    atol: float = field(default=1e-5, metadata={"help": "solver absolute tolerance"})
    step_size: float | None = field(
        default=None,
        metadata={"help": "fixed-step solvers: the step (default: one step over [0, T])"},
    )
    gradient: str = field(
        default="adjoint",
        metadata={"help": "CNF gradient", "choices": ("adjoint", "backprop", "checkpoint")},
    )
    kinetic_weight: float = field(
        default=0.0, metadata={"help": "weight of the kinetic-energy penalty (Finlay et al.)"}
    )
    jacobian_weight: float = field(
        default=0.0, metadata={"help": "weight of the Jacobian Frobenius penalty (Finlay et al.)"}
    )
    plot_samples: int = field(default=2000, metadata={"help": "model samples drawn for figures"})
    grid_size: int = field(default=80, metadata={"help": "density grid points per axis"})

    def data_requirements(self) -> dict[str, str]:
        """Optional packages the data needs (import name -> what for)."""
        if self.data in ("swissroll", "moons", "circles"):
            return {"sklearn": f"the {self.data!r} data set"}
        return {}

    def extension_blocker(self) -> str | None:
        """Why ``neuralode resume RUN --LENGTH N`` cannot extend this run exactly (None: it can;
        the weights and metric lines then equal a run given that length from the start, plus the
        evaluation that ended the shorter run where that was not an evaluation step)."""
        return None  # a constant learning rate; every random draw is keyed by its step

    def validate(self) -> None:
        super().validate()  # the run settings
        if self.data not in _DATASETS:
            raise ValueError(f"data must be one of {', '.join(_DATASETS)}; got {self.data!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}; got {self.model!r}")
        if self.trace not in TRACE_CHOICES:
            raise ValueError(f"trace must be one of {', '.join(TRACE_CHOICES)}; got {self.trace!r}")
        positive = (
            "iterations",
            "batch_size",
            "test_size",
            "test_batch_size",
            "eval_every",
            "width",
            "hyper_hidden",
            "num_layers",
            "nf_inverse_iters",
            "plot_samples",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(
                f"hidden must be a non-empty list of positive sizes; got {self.hidden}"
            )
        if self.grid_size < 2:
            raise ValueError(f"grid_size must be at least 2; got {self.grid_size}")
        for name in ("lr", "T", "rtol", "atol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("weight_decay", "kinetic_weight", "jacobian_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative; got {getattr(self, name)}")
        if self.model == "planar-nf" and (self.kinetic_weight or self.jacobian_weight):
            raise ValueError(
                "kinetic_weight and jacobian_weight apply to the CNFs (ffjord, cnf) only; "
                "set them to 0 for planar-nf"
            )

    @property
    def resolved_trace(self) -> str:
        """The training divergence: ``trace``, with ``auto`` resolved per model."""
        if self.trace != "auto":
            return self.trace
        return "hutchinson" if self.model == "ffjord" else "exact"


NAME = "density"
#: The experiment's config class (its ``--preset`` files and ``--config`` files fill it).
CONFIG = DensityConfig
#: The metrics of the line printed at the end of a run.
HEADLINE = ("test_nll", "true_nll", "test_nfe")


# --------------------------------------------------------------------------------------------
# Models


def build_model(config: DensityConfig) -> nn.Module:
    """The flow of ``config.model``: a :class:`~neuralode.nn.cnf.CNF` or a
    :class:`~neuralode.nn.flows.PlanarFlow` (initialised from ``config.seed``)."""
    if config.model == "planar-nf":
        flow = PlanarFlow(2, config.num_layers, seed=config.seed)
        if config.nf_init == "identity":
            identity_init(flow)
        return flow
    field_: nn.Module
    if config.model == "ffjord":
        field_ = ConcatSquashMLP(2, config.hidden, config.activation)
    else:
        field_ = PlanarField(2, config.width, config.hyper_hidden)
    return CNF(
        field_,
        T=config.T,
        train_T=config.train_T,
        trace=config.resolved_trace,
        noise=config.noise,
        kinetic_weight=config.kinetic_weight,
        jacobian_weight=config.jacobian_weight,
        method=config.method,
        rtol=config.rtol,
        atol=config.atol,
        step_size=config.step_size,
        gradient=config.gradient,
    )


def identity_init(flow: PlanarFlow) -> None:
    """Set every layer's ``u`` to ``log(e - 1) w / |w|^2``: then ``w^T u = log(e - 1)``, the
    constraint's ``m(w^T u) = -1 + softplus(w^T u) = 0`` and ``u_hat = 0``, so each layer starts
    as the identity (``w`` and ``b`` keep their random values and break the symmetry).

    With the default initialisation a layer is not near the identity even for small ``u``
    (``m(0) = -0.31`` contracts it along ``w``), and K = 64 such layers compound: at seed 0
    the initial test NLL of moons and circles is about 380 nats (3.9 and 4.7 from this one).
    """
    with torch.no_grad():
        for layer in flow.modules():
            if isinstance(layer, PlanarLayer):
                layer.u.copy_(_LOG_E_MINUS_1 * layer.w / layer.w.pow(2).sum())


def _flow(model: nn.Module) -> CNF | PlanarFlow:
    if not isinstance(model, (CNF, PlanarFlow)):
        raise TypeError(f"expected a CNF or a PlanarFlow, got {type(model).__name__}")
    return model


def log_density(
    model: nn.Module, x: torch.Tensor, batch_size: int, nf_iters: int
) -> tuple[torch.Tensor, float]:
    """Exact ``log p(x)`` (``[N]``, nats) of points ``x`` (``[N, 2]``) in batches, and the mean
    forward NFE per batch (0 for the NF). Call under ``torch.no_grad()``."""
    flow = _flow(model)
    evaluator = flow.exact_view() if isinstance(flow, CNF) else flow
    parts, nfe = [], []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if isinstance(evaluator, CNF):
            logp, out = evaluator.log_likelihood(chunk)
            nfe.append(out.nfe)
        else:
            logp = evaluator.log_prob(chunk, iters=nf_iters)
        parts.append(logp)
    return torch.cat(parts), float(np.mean(nfe)) if nfe else 0.0


# --------------------------------------------------------------------------------------------
# The task


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _points(name: str, n: int, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(toy2d.sample(name, n, rng)).to(device)


class DensityTask:
    """Batches, loss and evaluation of density estimation (see :class:`engine.Task`).

    Step ``s`` trains on ``batch_size`` fresh points from a generator keyed by ``(seed, s)``
    (and, for Hutchinson's estimator, noise keyed the same way); the test set is fixed. The
    loss is the mean negative log-likelihood (the Hutchinson estimate for ``ffjord``) plus the
    regularisers' penalty.
    """

    def __init__(self, config: DensityConfig, model: nn.Module, ctx: DistContext) -> None:
        self.config = config
        self.ctx = ctx
        self.model = model
        self.test = _points(
            config.data, config.test_size, _rng(config.seed, _STREAM_TEST), ctx.device
        )
        self.true_nll: float | None = None
        if config.data in toy2d.DENSITIES:
            self.true_nll = -float(toy2d.true_log_density(config.data, self.test.cpu()).mean())
        self._last: Any = None

    def batch(self, step: int) -> torch.Tensor:
        """The training points of ``step`` (``[batch_size, 2]``)."""
        rng = _rng(self.config.seed, _STREAM_DATA, step)
        return _points(self.config.data, self.config.batch_size, rng, self.ctx.device)

    def train_step(self, model: nn.Module, step: int) -> engine.StepOutput:
        x = self.batch(step)
        n = len(x)
        values: dict[str, float] = {}
        sums: dict[str, float] = {}
        flow = _flow(model)
        if isinstance(flow, CNF):
            gen = derive_generator(self.config.seed, _STREAM_NOISE, step, device=x.device)
            logp, out = flow.log_likelihood(x, generator=gen)
            nll = -logp.mean()
            loss = nll + flow.penalty(out)
            self._last = out
            values["nfe_forward"] = float(out.nfe)
            values["T"] = float(flow.T.detach())
            if out.kinetic is not None:
                sums["kinetic"] = out.kinetic.sum().item()
            if out.jacobian is not None:
                sums["jacobian"] = out.jacobian.sum().item()
        else:
            nll = -flow.log_prob(x, iters=self.config.nf_inverse_iters).mean()
            loss = nll
        sums.update({"loss": loss.item() * n, "nll": nll.item() * n})
        return engine.StepOutput(loss=loss, sums=sums, count=n, values=values)

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        out, self._last = self._last, None
        if out is None or out.backward_nfe is None:
            return {}  # the NF, or backprop through the solver (no backward solve to count)
        return {"nfe_backward": float(out.backward_nfe)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``test_nll`` (exact, nats), ``test_nfe`` (mean forward NFE per test batch) and,
        where the dataset has a closed-form density, ``true_nll`` and ``nll_gap``."""
        model.eval()
        logp, nfe = log_density(
            model, self.test, self.config.test_batch_size, self.config.nf_inverse_iters
        )
        result = {"test_nll": -float(logp.mean())}
        if isinstance(model, CNF):
            result.update({"test_nfe": nfe, "T": float(model.T.detach())})
        if self.true_nll is not None:
            result.update(
                {"true_nll": self.true_nll, "nll_gap": result["test_nll"] - self.true_nll}
            )
        return result

    def state_dict(self) -> dict[str, Any]:
        return {}  # every random draw is keyed by (seed, step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Runs


def build(config: DensityConfig, ctx: DistContext) -> tuple[nn.Module, DensityTask]:
    """The flow (initialised from ``seed``, on ``ctx.device``) and the task (data streams)."""
    if ctx.distributed:
        raise ValueError(
            "the density experiment runs in one process (a small 2-D model); run it without "
            "torchrun"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    model = build_model(config).to(ctx.device)
    return model, DensityTask(config, model, ctx)


def make_optimizer(
    config: DensityConfig, model: nn.Module, task: DensityTask
) -> tuple[torch.optim.Optimizer, None]:
    """Adam with weight decay, no schedule (FFJORD's toy recipe)."""
    return (
        torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay),
        None,
    )


def make_schedule(config: DensityConfig, task: DensityTask) -> engine.Schedule:
    return engine.schedule_for(config, config.iterations, config.eval_every)


def summarize(trainer: engine.Trainer, config: DensityConfig, run_dir: Path) -> dict[str, Any]:
    """The final metrics: the last exact-trace test NLL, the true NLL, NFE, seconds."""
    epochs = [r for r in engine.read_metrics(run_dir) if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else trainer.last_epoch
    seconds = sum(r.get("seconds", 0.0) for r in epochs)
    return {
        "experiment": NAME,
        "data": config.data,
        "model": config.model,
        "trace_train": config.resolved_trace if config.model != "planar-nf" else None,
        "parameters": count_parameters(trainer.model),
        "iterations": trainer.step,
        "test_nll": last.get("test_nll"),
        "best_test_nll": min((r["test_nll"] for r in epochs), default=None),
        "true_nll": last.get("true_nll"),
        "nll_gap": last.get("nll_gap"),
        "test_nfe": last.get("test_nfe"),
        "T": last.get("T"),
        "nfe_forward_last_eval": last.get("train_nfe_forward"),
        "nfe_backward_last_eval": last.get("train_nfe_backward"),
        "nfe_forward_mean": _mean(r.get("train_nfe_forward") for r in epochs),
        "nfe_backward_mean": _mean(r.get("train_nfe_backward") for r in epochs),
        "kinetic_last_eval": last.get("train_kinetic"),
        "jacobian_last_eval": last.get("train_jacobian"),
        "train_seconds": seconds,
        "seconds_per_iteration": seconds / max(trainer.step, 1),
        "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in epochs),
        "threads": torch.get_num_threads(),
        "settings": dataclasses.asdict(config),
    }


def _mean(values: Any) -> float | None:
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


# --------------------------------------------------------------------------------------------
# Figures


def figures(
    run_dir: Path,
    config: DensityConfig,
    model: nn.Module | None = None,
    task: engine.Task | None = None,
    step: int | None = None,
) -> list[Path]:
    """Draw the run's figures into ``RUN/figures``: ``training.png`` and, for a model,
    ``density.png`` and ``trajectory.png`` (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = run_dir / "figures"
    out.mkdir(exist_ok=True)
    paths = [_plot_training(run_dir, out, plt)]
    if model is not None and isinstance(task, DensityTask):
        with torch.no_grad():
            paths.extend(_plot_model(model, task, config, step or 0, out, plt))
    return paths


def _plot_training(run_dir: Path, out: Path, plt: Any) -> Path:
    records = engine.read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    config = read_json(run_dir / "config.json")
    name = f"{config.get('model', '?')} on {config.get('data', '?')}"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["nll"] for r in train], lw=0.8, label="train")
    if epochs:
        steps = [r["step"] for r in epochs]
        axes[0].plot(steps, [r["test_nll"] for r in epochs], "o-", label="test (exact trace)")
        if epochs[-1].get("true_nll") is not None:
            axes[0].axhline(epochs[-1]["true_nll"], color="k", ls="--", lw=1, label="true density")
        prev = [0, *steps[:-1]]
        per_it = [r["seconds"] / max(s - p, 1) for r, s, p in zip(epochs, steps, prev)]
        axes[2].plot(steps, per_it, "o-")
    axes[0].set(xlabel="iteration", ylabel="NLL (nats)", title=f"{name}: negative log-likelihood")
    for key, label in (("nfe_forward", "forward"), ("nfe_backward", "backward")):
        if any(key in r for r in train):
            pts = [(r["step"], r[key]) for r in train if key in r]
            axes[1].plot(*zip(*pts), label=label)
    if any("test_nfe" in r for r in epochs):
        pts = [(r["step"], r["test_nfe"]) for r in epochs if "test_nfe" in r]
        axes[1].plot(*zip(*pts), "o", label="test (exact trace)")
    axes[1].set(xlabel="iteration", ylabel="NFE per iteration", title="function evaluations")
    axes[2].set(xlabel="iteration", ylabel="seconds", title="seconds per training iteration")
    explain_empty(axes[0], "no metric lines yet")
    explain_empty(
        axes[1],
        "a discrete flow: no ODE, no function evaluations"
        if config.get("model") == "planar-nf"
        else "no metric lines yet",
    )
    explain_empty(axes[2], "no evaluation yet")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_model(
    model: nn.Module, task: DensityTask, config: DensityConfig, step: int, out: Path, plt: Any
) -> list[Path]:
    device = task.test.device
    n = config.plot_samples
    truth = _points(config.data, n, _rng(config.seed, _STREAM_PLOT), device).cpu().numpy()
    lim = 1.1 * float(np.quantile(np.abs(truth), 0.999))
    box = [[-lim, lim], [-lim, lim]]
    gen = derive_generator(config.seed, _STREAM_PLOT)
    z = torch.randn(n, 2, generator=gen).to(device)
    states, labels = _flow(model).trajectory(z, 6)
    samples = states[-1].cpu().numpy()

    g = np.linspace(-lim, lim, config.grid_size, dtype=np.float32)
    xx, yy = np.meshgrid(g, g)
    grid = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], 1)).to(device)
    logp, _ = log_density(model, grid, config.test_batch_size, config.nf_inverse_iters)
    density = logp.exp().reshape(xx.shape).cpu().numpy()

    title = f"{config.model} on {config.data}, iteration {step}"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, points, name in ((axes[0], truth, "true samples"), (axes[1], samples, "model samples")):
        *_, image = ax.hist2d(*points.T, bins=100, range=box, cmap="viridis")
        fig.colorbar(image, ax=ax, label=f"samples per bin (of {n})")
        ax.set_title(name)
    mesh = axes[2].pcolormesh(xx, yy, density, cmap="viridis", shading="auto")
    fig.colorbar(mesh, ax=axes[2], label="model density p(x)")
    axes[2].set_title("model density (exact trace)" if isinstance(model, CNF) else "model density")
    for ax in axes:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="x1", ylabel="x2")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    density_path = out / "density.png"
    fig.savefig(density_path, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(states), figsize=(2.8 * len(states) + 1.0, 3.1))
    colour = z[:, 0].cpu().numpy()
    dots = None
    for ax, state, label in zip(np.atleast_1d(axes), states, labels):
        pts = state.cpu().numpy()
        dots = ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, c=colour, cmap="coolwarm")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="x1")
        ax.set_title(label, fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("x2")
    if dots is not None:
        fig.colorbar(dots, ax=list(np.atleast_1d(axes)), label="z1 of the base sample", shrink=0.8)
    fig.suptitle(f"{title}: base (left) to data (right)", fontsize=10)
    traj_path = out / "trajectory.png"
    fig.savefig(traj_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [density_path, traj_path]
