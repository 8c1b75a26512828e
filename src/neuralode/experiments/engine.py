"""The training engine every experiment shares: steps, metrics, progress, checkpoints, resume, DDP.

An experiment supplies a :class:`Task` (how to draw a batch and compute its loss for a given step,
how to evaluate) plus a model, an optimizer and a per-step learning-rate scheduler; the
:class:`Trainer` owns the loop::

    for step in range(start, total_steps):
        out = task.train_step(model, step)        # forward on this process's shard
        out.loss.backward(); task.after_backward()  # backward NFE etc.
        optimizer.step(); scheduler.step()
        every log_every steps     -> a "train" line in metrics.jsonl
        every steps_per_epoch     -> evaluate, an "epoch" line, a checkpoint
        every checkpoint_every    -> a checkpoint (mid-epoch)

**Exact resume.** A task must draw everything random from state that is either a function of
``step`` (e.g. the epoch's permutation from ``seed + epoch``) or saved by its ``state_dict``
(e.g. an augmentation generator). The checkpoint holds model, optimizer, scheduler, task state,
the global RNG states, the step and the running metric sums, so ``resume`` repeats the exact
computation an uninterrupted run would have done. On resume, lines of ``metrics.jsonl`` written
after the checkpoint (by the run that died) are dropped before training continues.

**Experiments.** An experiment is a module that follows :class:`Experiment`: its config class,
how to build the model and task from a config, the optimizer and schedule, the final metrics and
the figures (drawn from a model in memory). :func:`train`, :func:`evaluate`, :func:`plot` and
:func:`load_run` do the rest the same way for all of them.

**Data parallel.** Under torchrun the model is wrapped in ``DistributedDataParallel``; a task
computes the loss on its shard of the global batch (mean over the shard; shards are equal, so
the averaged gradient is the global batch's), metric sums are all-reduced, and only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from neuralode.experiments.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from neuralode.experiments.common import append_jsonl, atomic_write_text, progress_bar, to_jsonable
from neuralode.experiments.config import flag_name
from neuralode.experiments.distributed import DistContext
from neuralode.solution import SolverError

__all__ = [
    "CHECKPOINT_NAME",
    "METRICS_NAME",
    "Phases",
    "Schedule",
    "StepOutput",
    "Task",
    "RunFinished",
    "Trainer",
    "TrainingFailed",
    "TrainingInterrupted",
    "check_new_run",
    "Experiment",
    "TrainedRun",
    "evaluate",
    "experiment_of",
    "extended",
    "load_run",
    "load_run_config",
    "plot",
    "restore",
    "train",
    "load_weights",
    "read_metrics",
    "run_experiment",
    "schedule_for",
    "start_run",
    "stored_config",
    "write_evaluation",
]

C = TypeVar("C")


class TrainingFailed(RuntimeError):
    """Training stopped on a numerical failure (a non-finite loss, a solver that failed).

    The run folder keeps its last checkpoint and its metrics, and ``failure.json`` records the
    step and the error; the message says so in one line.
    """


class RunFinished(ValueError):
    """``resume`` of a run that has trained all its steps."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training after a complete step, whose checkpoint was saved."""


class _StopRequest:
    """Turns the first SIGINT into a request that the loop honours after its current step (so
    the checkpoint holds a consistent state); a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


CHECKPOINT_NAME = "checkpoints/last.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class StepOutput:
    """What one training step of a task produced on this process.

    Attributes:
        loss: scalar tensor to differentiate (the mean over this process's samples).
        sums: per-sample sums over this process's samples (e.g. ``{"loss": loss * n,
            "correct": k}``); reported as averages over all samples of an interval.
        count: number of samples on this process.
        values: per-step values (e.g. ``{"nfe_forward": 26}``), reported as averages over steps
            (and over processes).
    """

    loss: torch.Tensor
    sums: dict[str, float]
    count: int
    values: dict[str, float] = field(default_factory=dict)


class Task(Protocol):
    """The experiment-specific half of training (see the module docstring)."""

    def train_step(self, model: nn.Module, step: int) -> StepOutput: ...

    def after_backward(self, model: nn.Module) -> dict[str, float]: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Schedule:
    """How long to train and how often to log, evaluate and checkpoint (all in steps).

    ``steps_per_epoch`` is the evaluation period: an "epoch" line (train averages, evaluation
    metrics, seconds) and a checkpoint are written at the end of each. ``checkpoint_every``
    adds mid-epoch checkpoints (0: only at epoch ends). ``fault_step`` (testing only) kills the
    process with SIGKILL right after that step, to prove that ``resume`` loses no finished work.
    """

    total_steps: int
    steps_per_epoch: int
    log_every: int = 50
    checkpoint_every: int = 0
    fault_step: int | None = None

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.steps_per_epoch < 1:
            raise ValueError("total_steps and steps_per_epoch must be at least 1")
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise ValueError("log_every must be >= 1 and checkpoint_every >= 0")


class Phases:
    """Optimizers that take turns: the first for its number of steps, then the next, and so on
    (for example Adam on mini-batches, then L-BFGS on the full batch).

    It has what the :class:`Trainer` uses of a torch optimizer: ``step(closure)``,
    ``zero_grad``, ``param_groups`` (the current phase's: the logged learning rate is that of
    the optimizer at work), and ``state_dict``/``load_state_dict`` over all phases (with the
    steps taken, so a resumed run continues in the right phase).

    Args:
        phases: ``(optimizer, steps)`` pairs in order; the last one also takes any steps past
            the sum of the others.
    """

    def __init__(self, phases: list[tuple[torch.optim.Optimizer, int]]) -> None:
        if not phases:
            raise ValueError("phases must hold at least one (optimizer, steps) pair")
        self.phases = phases
        self.steps_taken = 0

    @property
    def current(self) -> torch.optim.Optimizer:
        """The optimizer of the phase the next step belongs to."""
        left = self.steps_taken
        for optimizer, steps in self.phases[:-1]:
            if left < steps:
                return optimizer
            left -= steps
        return self.phases[-1][0]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.current.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer, _ in self.phases:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float]) -> Any:
        loss = self.current.step(closure)
        self.steps_taken += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_taken": self.steps_taken,
            "phases": [optimizer.state_dict() for optimizer, _ in self.phases],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_taken = int(state["steps_taken"])
        for (optimizer, _), saved in zip(self.phases, state["phases"], strict=True):
            optimizer.load_state_dict(saved)


def schedule_for(config: Any, total_steps: int, steps_per_epoch: int) -> Schedule:
    """The :class:`Schedule` of a run of ``total_steps`` evaluated every ``steps_per_epoch``
    steps (at most the run's length), logging and checkpointing as its
    :class:`~neuralode.experiments.config.RunSettings` say."""
    return Schedule(
        total_steps=total_steps,
        steps_per_epoch=min(steps_per_epoch, total_steps),
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        fault_step=config.fault_step,
    )


class _Meter:
    """Running sums of per-sample and per-step metrics over an interval."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.values: dict[str, float] = {}
        self.steps = 0

    def add(self, sums: dict[str, float], count: int, values: dict[str, float]) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += count
        for k, v in values.items():
            self.values[k] = self.values.get(k, 0.0) + v
        self.steps += 1

    def averages(self) -> dict[str, float]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        out.update({k: v / max(self.steps, 1) for k, v in self.values.items()})
        return out

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums, "count": self.count, "values": self.values, "steps": self.steps}

    def load(self, state: dict[str, Any]) -> None:
        self.sums = dict(state["sums"])
        self.count = int(state["count"])
        self.values = dict(state["values"])
        self.steps = int(state["steps"])


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (an incomplete last line is skipped)."""
    import json

    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a crash: nothing after it was written by that run
    return records


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only metric lines up to ``step`` (those before the checkpoint we resume from)."""
    import json

    kept = [r for r in read_metrics(run_dir) if int(r.get("step", 0)) <= step]
    text = "".join(json.dumps(to_jsonable(r), sort_keys=True) + "\n" for r in kept)
    atomic_write_text(run_dir / METRICS_NAME, text)


class Trainer:
    """Runs a :class:`Task` for a :class:`Schedule` in a run folder (see the module docstring).

    Args:
        run_dir: the run folder (``metrics.jsonl`` and ``checkpoints/`` go here).
        task: the experiment's task.
        model: the (unwrapped) model; wrapped in DDP here when the context is distributed.
        optimizer, scheduler: stepped once per training step (``scheduler`` may be ``None``);
            the optimizer through ``step(closure)``, so one that evaluates the loss several
            times per step (L-BFGS) works, and :class:`Phases` runs optimizers in turn.
        schedule: steps, evaluation period, logging and checkpoint intervals.
        ctx: the process's :class:`DistContext`.
        quiet: no progress bar; one log line per epoch instead (rank 0 only).
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        on_epoch: called on rank 0 with each "epoch" record after it is written (e.g. plots).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        task: Task,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Phases,
        scheduler: Any | None,
        schedule: Schedule,
        ctx: DistContext,
        *,
        quiet: bool = False,
        grad_clip: float | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.task = task
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.schedule = schedule
        self.ctx = ctx
        self.quiet = quiet
        self.grad_clip = grad_clip
        self.on_epoch = on_epoch
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.epoch_seconds = 0.0
        self.log_meter = _Meter()
        self.epoch_meter = _Meter()
        self.last_epoch: dict[str, Any] = {}
        #: Appended to the one-time warning of a run that will take more than an hour.
        self.long_run_hint = ""
        self._clock = time.perf_counter  # replaced by tests of the pace warning
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [ctx.device] if ctx.device.type == "cuda" else None
            self.train_model: nn.Module = DistributedDataParallel(model, device_ids=ids)
        else:
            self.train_model = model

    def close(self) -> None:
        """Let go of the ``DistributedDataParallel`` wrapper (the model stays).

        Its reducer holds a reference to the process group. Dropped after
        ``destroy_process_group``, it is the last one, and the group's destructor then runs inside
        the reducer's, holding the GIL: gloo's destructor joins its worker threads, and a worker
        still freeing the last collective's tensors waits for the GIL, so the process never
        exits (torchrun hung after training about once in ten runs on 2 busy cores). Closed
        first, the group dies in ``destroy_process_group``, whose binding releases the GIL.
        """
        self.train_model = self.model

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "task": self.task.state_dict(),
            "rng": capture_rng(),
            "log_meter": self.log_meter.state(),
            "epoch_meter": self.epoch_meter.state(),
            "epoch_seconds": self.epoch_seconds,
            "last_epoch": to_jsonable(self.last_epoch),
            "world_size": self.ctx.world_size,
        }

    def save(self) -> None:
        """Write the checkpoint (rank 0 only; all ranks hold the same state under DDP)."""
        if self.ctx.is_main:
            save_checkpoint(self.checkpoint_path, self.state_dict())
        self.saved_step = self.step
        self.ctx.barrier()

    def restore(self) -> None:
        """Load the run's checkpoint and drop metric lines written after it."""
        state = load_checkpoint(self.checkpoint_path, map_location=self.ctx.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.task.load_state_dict(state["task"])
        restore_rng(state["rng"])
        self.step = self.saved_step = int(state["step"])
        self.log_meter.load(state["log_meter"])
        self.epoch_meter.load(state["epoch_meter"])
        self.epoch_seconds = float(state["epoch_seconds"])
        self.last_epoch = dict(state["last_epoch"])
        if self.ctx.is_main:
            _truncate_metrics(self.run_dir, self.step)
        self.ctx.barrier()

    # ------------------------------------------------------------------ the loop
    def _reduce(
        self, out: StepOutput, extra: dict[str, float]
    ) -> tuple[dict[str, float], int, dict[str, float]]:
        values = {**out.values, **extra}
        if not self.ctx.distributed:
            return out.sums, out.count, values
        keys_s, keys_v = sorted(out.sums), sorted(values)
        flat = [out.sums[k] for k in keys_s] + [float(out.count)] + [values[k] for k in keys_v]
        total = self.ctx.all_reduce_sum(torch.tensor(flat, dtype=torch.float64)).tolist()
        sums = dict(zip(keys_s, total[: len(keys_s)]))
        count = int(round(total[len(keys_s)]))
        world = self.ctx.world_size
        vals = {k: v / world for k, v in zip(keys_v, total[len(keys_s) + 1 :])}
        return sums, count, vals

    def _one_step(self) -> None:
        self.train_model.train()
        evaluations: list[tuple[StepOutput, dict[str, float]]] = []

        def closure() -> float:
            # The torch convention: every optimizer's step(closure) calls this (SGD and Adam
            # once; L-BFGS once per function evaluation of its line search).
            out = self.task.train_step(self.train_model, self.step)
            if not torch.isfinite(out.loss.detach()):
                raise FloatingPointError(
                    f"training loss is {out.loss.item()} at step {self.step}; lower the "
                    "learning rate or tighten the solver tolerances"
                )
            self.optimizer.zero_grad(set_to_none=True)
            # Tensor.backward has no annotations (torch 2.13).
            out.loss.backward()  # type: ignore[no-untyped-call]
            extra = self.task.after_backward(self.model)
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            evaluations.append((out, extra))
            return float(out.loss.detach())  # synchronised already by the finiteness check

        self.optimizer.step(closure)
        if self.scheduler is not None:
            self.scheduler.step()
        out, extra = evaluations[0]  # the step's metrics: those at the weights it started from
        sums, count, values = self._reduce(out, extra)
        self.log_meter.add(sums, count, values)
        self.epoch_meter.add(sums, count, values)
        self.step += 1

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_train(self, bar: Any) -> None:
        record = {"kind": "train", "step": self.step, "epoch": self._epoch_float()}
        record["lr"] = self._lr()
        record.update(self.log_meter.averages())
        self.log_meter = _Meter()
        if self.ctx.is_main:
            append_jsonl(self.run_dir / METRICS_NAME, record)
            bar.set_postfix(_short(record), refresh=False)

    def _epoch_float(self) -> float:
        return self.step / self.schedule.steps_per_epoch

    def _end_epoch(self) -> dict[str, Any]:
        self.train_model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            evaluation = self.task.evaluate(self.model)
        eval_seconds = time.perf_counter() - start
        record: dict[str, Any] = {
            "kind": "epoch",
            "step": self.step,
            "epoch": math.ceil(self._epoch_float()),
            "lr": self._lr(),
            "seconds": self.epoch_seconds,
            "eval_seconds": eval_seconds,
        }
        record.update({f"train_{k}": v for k, v in self.epoch_meter.averages().items()})
        record.update(evaluation)
        self.epoch_meter = _Meter()
        self.epoch_seconds = 0.0
        self.last_epoch = record
        if self.ctx.is_main:
            append_jsonl(self.run_dir / METRICS_NAME, record)
            if self.quiet:
                print(_format_epoch(record), flush=True)
            if self.on_epoch is not None:
                self.on_epoch(record)
        return record

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``schedule.total_steps``.

        With ``resume``, training continues from the run's checkpoint, and the metric lines
        written after it are dropped; a run without a checkpoint starts over, its metric lines
        all dropped. Either way ``metrics.jsonl`` ends as an uninterrupted run's.

        Returns:
            The last "epoch" record (train averages and evaluation metrics).
        """
        if resume and self.checkpoint_path.exists():
            self.restore()
            if self.step >= self.schedule.total_steps:
                raise RunFinished(
                    f"run {str(self.run_dir)!r} is finished ({self.step} of "
                    f"{self.schedule.total_steps} steps)"
                )
        elif resume:
            # The run died before its first checkpoint, or its checkpoint was deleted: it starts
            # over, so every metric line it wrote goes (or the new run would repeat them).
            if self.ctx.is_main:
                _truncate_metrics(self.run_dir, 0)
            self.ctx.barrier()
        bar = progress_bar(
            quiet=self.quiet or not self.ctx.is_main,
            total=self.schedule.total_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            with _StopRequest() as stop:
                self._loop(bar, stop)
        except (FloatingPointError, SolverError) as exc:
            raise self._failed(exc) from exc
        finally:
            bar.close()
        return self.last_epoch

    def _stop_requested(self, stop: _StopRequest) -> bool:
        if not self.ctx.distributed:
            return stop.requested
        # Every process stops at the same step (torchrun passes Ctrl-C to all of them).
        flag = torch.tensor([float(stop.requested)], dtype=torch.float64)
        return bool(self.ctx.all_reduce_sum(flag).item() > 0)

    def _failed(self, exc: BaseException) -> TrainingFailed:
        """Record a numerical failure in ``failure.json`` and say in one line what is kept."""
        from neuralode.experiments.common import write_json

        checkpoint = self.saved_step
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self.ctx.is_main:
            write_json(
                self.run_dir / "failure.json",
                {"step": self.step, "error": str(exc), "type": type(exc).__name__,
                 "checkpoint_step": checkpoint},
            )  # fmt: skip
        where = (
            f"its checkpoint of step {checkpoint} and metrics are kept"
            if checkpoint is not None
            else "no checkpoint had been written"
        )
        return TrainingFailed(
            f"training failed at step {self.step} ({error}); {where}, and "
            f"{self.run_dir / 'failure.json'} records the failure"
        )

    def _loop(self, bar: Any, stop: _StopRequest) -> None:
        schedule = self.schedule
        began, first = self._clock(), self.step
        warned = False
        while self.step < schedule.total_steps:
            start = self._clock()
            self._one_step()
            self.epoch_seconds += self._clock() - start
            bar.update(1)
            done = self.step
            if not warned and (done - first >= _PACE_STEPS or self._clock() - began > 30):
                warned = True
                self._warn_if_long((self._clock() - began) / (done - first))
            if done % schedule.log_every == 0:
                self._log_train(bar)
            end_of_epoch = done % schedule.steps_per_epoch == 0 or done == schedule.total_steps
            if end_of_epoch:
                self._end_epoch()
            if end_of_epoch or (
                schedule.checkpoint_every and done % schedule.checkpoint_every == 0
            ):
                self.save()
            if schedule.fault_step is not None and done == schedule.fault_step:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # simulate a crash (tests)
            if self._stop_requested(stop):
                self.save()
                raise TrainingInterrupted(
                    f"interrupted after step {done}; its checkpoint is saved: continue "
                    f"with 'neuralode resume {self.run_dir}'"
                )

    def _warn_if_long(self, seconds_per_step: float) -> None:
        """Say once, early, how long the rest of a run will take when that is over an hour (the
        pace of its first steps, evaluations not included), so nobody waits days unawares."""
        left = (self.schedule.total_steps - self.step) * seconds_per_step
        if left < 3600 or not self.ctx.is_main:
            return
        steps = self.schedule.total_steps - self.step
        print(
            f"neuralode: {seconds_per_step:.3g} s per step: the {steps} steps left take about "
            f"{_duration(left)} at this pace (Ctrl-C saves a checkpoint; 'neuralode resume "
            f"{self.run_dir}' continues){self.long_run_hint}",
            file=sys.stderr,
            flush=True,
        )


#: Steps timed before the one-time estimate of a run's length.
_PACE_STEPS = 5


def _duration(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps the number at least 1 (``"2.1 days"``)."""
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _short(record: dict[str, Any]) -> dict[str, str]:
    keep = ("loss", "accuracy", "rmse", "nfe_forward", "nfe_backward", "lr")
    return {k: f"{record[k]:.4g}" for k in keep if isinstance(record.get(k), (int, float))}


def _format_epoch(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']} (step {record['step']})"]
    for k, v in record.items():
        if k in ("kind", "epoch", "step"):
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def check_new_run(run_dir: str | os.PathLike[str]) -> Path:
    """Check that a new run may be trained into ``run_dir`` (before anything is written).

    Raises:
        ValueError: if ``run_dir`` already holds a run (say ``neuralode resume`` instead of
            overwriting finished work), or is a file or lies under one.
    """
    from neuralode.experiments.common import check_run_folder

    path = check_run_folder(run_dir)
    if (path / CHECKPOINT_NAME).exists():
        raise ValueError(
            f"run folder {str(path)!r} already holds a run; continue it with "
            f"'neuralode resume {path}' or choose another --out"
        )
    return path


def start_run(
    run_dir: str | os.PathLike[str],
    experiment: str,
    config: dict[str, Any],
    ctx: DistContext,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Create a new run folder and write its ``config.json`` (rank 0), then sync processes.

    Raises:
        ValueError: if ``run_dir`` already holds a checkpoint (say ``neuralode resume`` instead
            of overwriting finished work).
    """
    from neuralode.experiments.common import environment_info, make_run_dir, write_json

    path = check_new_run(run_dir)
    if ctx.is_main:
        make_run_dir(path)
        (path / "checkpoints").mkdir(exist_ok=True)
        metrics = path / METRICS_NAME
        if metrics.exists():
            metrics.unlink()  # left by a run that died before its first checkpoint
        info = {"world_size": ctx.world_size, "device": str(ctx.device), **environment_info()}
        write_json(
            path / "config.json",
            {"experiment": experiment, **config, **(extra or {}), "env": info},
        )
    ctx.barrier()
    return path


def load_run_config(run_dir: str | os.PathLike[str], fields: set[str]) -> dict[str, Any]:
    """The config values (restricted to ``fields``) stored in a run folder's ``config.json``."""
    from neuralode.experiments.common import read_json

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run folder: {str(path)!r} is missing")
    stored = read_json(path)
    values = {k: v for k, v in stored.items() if k in fields}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return values


def stored_config(cls: type[C], run_dir: str | os.PathLike[str], args: Any = None) -> C:
    """The config of a run folder, for ``resume``/``evaluate``: what ``config.json`` holds, with
    ``out`` pointing at ``run_dir``, the command's ``--device``/``--quiet`` applied and any
    ``fault_step`` (a testing crash) cleared."""
    from neuralode.experiments.config import config_from_dict

    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = load_run_config(run_dir, fields)
    overrides: dict[str, Any] = {"out": str(run_dir), "fault_step": None}
    if args is not None:
        if getattr(args, "device", None):
            overrides["device"] = args.device
        if getattr(args, "quiet", None):
            overrides["quiet"] = True
    values.update({k: v for k, v in overrides.items() if k in fields})
    return config_from_dict(cls, values, source=f"{run_dir}/config.json")


def run_experiment(
    experiment: str,
    config: Any,
    make_trainer: Callable[[DistContext, Path], Trainer],
    finish: Callable[[Trainer, Path], dict[str, Any]],
    *,
    resume_run: bool = False,
    headline: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The life cycle of one run: set up the process (group), create the run folder (or find
    the one to resume), build the trainer, train, and finish (final metrics, figures), then
    print one line (rank 0, ``--quiet`` too) with the ``headline`` metrics, the seconds trained
    and where the run folder and its figures are.

    Everything is checked before the run folder is created: the optional packages the run
    needs, the folder, and every setting (building the data and the model checks those that
    only they can). A resumed run that died before its first checkpoint starts over in the same
    folder. ``config`` must be a dataclass with ``out``, ``device`` and ``quiet`` fields and a
    ``data_requirements()`` method.
    """
    from neuralode.experiments.common import require, run_requirements
    from neuralode.experiments.distributed import setup

    require(run_requirements(config.data_requirements(), quiet=config.quiet))
    run_dir = Path(config.out)
    if not resume_run:
        check_new_run(run_dir)
    length = _length_field(config)
    extending = False
    if resume_run:
        stored = load_run_config(run_dir, {length})[length]
        extending = getattr(config, length) != stored
        if extending:
            _check_extension(config, length, stored)
    ctx = setup(config.device)
    trainer: Trainer | None = None
    try:
        trainer = make_trainer(ctx, run_dir)
        trainer.long_run_hint = _shorter_recipe(experiment, config)
        if extending and ctx.is_main:
            from neuralode.experiments.common import read_json, write_json

            record = read_json(run_dir / "config.json")
            record[length] = getattr(config, length)
            write_json(run_dir / "config.json", record)
        if not resume_run:
            recorded = {
                f.name: getattr(config, f.name)
                for f in dataclasses.fields(config)
                if not f.metadata.get("hidden")  # testing-only settings stay out of the record
            }
            start_run(run_dir, experiment, recorded, ctx)
        try:
            trainer.fit(resume=resume_run)
        except RunFinished as exc:
            blocker = config.extension_blocker()
            if blocker:
                raise RunFinished(
                    f"{exc}; it cannot be trained longer exactly ({blocker}): train a new run "
                    "instead"
                ) from None
            flag = flag_name(length)
            raise RunFinished(
                f"{exc}; train it longer with 'neuralode resume {run_dir} {flag} N' "
                f"(N > {getattr(config, length)})"
            ) from None
        metrics = finish(trainer, run_dir)
        if ctx.is_main:
            print(_headline(experiment, metrics, headline, run_dir), flush=True)
        # The processes leave together: rank 0 draws the figures while the others would
        # already be tearing the process group down.
        ctx.barrier()
        return metrics
    except BaseException as exc:
        if ctx.distributed:  # the traceback's frames hold the DDP wrapper too (see Trainer.close)
            traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        if trainer is not None:
            trainer.close()  # before the process group goes: see Trainer.close
            del trainer
            gc.collect()  # a wrapper kept alive by a reference cycle dies now, not later
        ctx.shutdown()


def _headline(
    experiment: str, metrics: dict[str, Any], keys: tuple[str, ...], run_dir: Path
) -> str:
    """``EXPERIMENT: KEY VALUE, ... after S steps (T s of training); run folder RUN, figures in
    RUN/figures`` (the seconds of every epoch, evaluations included, across resumes)."""
    shown = [
        f"{key} {metrics[key]:.4g}" if isinstance(metrics[key], float) else f"{key} {metrics[key]}"
        for key in keys
        if metrics.get(key) is not None
    ]
    epochs = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]
    seconds = sum(r.get("seconds", 0.0) + r.get("eval_seconds", 0.0) for r in epochs)
    steps = epochs[-1]["step"] if epochs else 0
    figures = run_dir / "figures"
    where = f"run folder {run_dir}" + (f", figures in {figures}" if figures.is_dir() else "")
    return f"{experiment}: {', '.join(shown)} after {steps} steps ({seconds:.1f} s); {where}"


def _shorter_recipe(experiment: str, config: Any) -> str:
    """The hint of the long-run warning: the experiment's quick preset, if it has one."""
    from neuralode.experiments.config import presets

    if "quick" in presets(experiment):
        return f"; a shorter recipe: 'neuralode train {experiment} --preset quick'"
    return ""


def _length_field(config: Any) -> str:
    """The setting that says how long a run trains: ``epochs`` or ``iterations``."""
    names = {f.name for f in dataclasses.fields(config)}
    return "epochs" if "epochs" in names else "iterations"


def _check_extension(config: Any, length: str, stored: int) -> None:
    """Check that a finished or running run may be trained to the new length ``config.<length>``
    with the result of a run given that length from the start (the exactness of resume).

    Raises:
        ValueError: if the new length is not longer, or the run's learning-rate schedule is
            shaped by its length (then the steps already taken would differ).
    """
    new = getattr(config, length)
    flag = flag_name(length)
    if new < stored:
        raise ValueError(f"{flag} {new} is shorter than the run's {stored}; a run cannot shrink")
    blocker = config.extension_blocker()
    if blocker:
        raise ValueError(
            f"{flag} cannot extend this run: {blocker}, so a longer run would have taken "
            "different steps from the start; train a new run instead"
        )


def extended(config: C, args: Any) -> C:
    """``config`` with the length the ``resume`` command asked for (``--epochs N`` or
    ``--iterations N``), checked against the experiment's own length setting."""
    length = _length_field(config)
    given = {
        name: getattr(args, name) for name in ("epochs", "iterations") if getattr(args, name, None)
    }
    if not given:
        return config
    wrong = set(given) - {length}
    if wrong:
        raise ValueError(f"this experiment's length is set by --{length}, not --{wrong.pop()}")
    return dataclasses.replace(config, **{length: given[length]})  # type: ignore[type-var]


def load_weights(run_dir: str | os.PathLike[str], model: nn.Module, device: Any = "cpu") -> int:
    """Load the weights of a run's last checkpoint into ``model`` (set to eval mode); return
    the checkpoint's step.

    Raises:
        ValueError: if the run has no checkpoint yet (the message names the missing file).
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        raise ValueError(f"run folder {str(run_dir)!r} has no checkpoint yet ({path} is missing)")
    state = load_checkpoint(path, map_location=device)
    model.load_state_dict(state["model"])
    model.eval()
    return int(state["step"])


def write_evaluation(
    run_dir: str | os.PathLike[str], task: Task, model: nn.Module, step: int, ctx: DistContext
) -> dict[str, Any]:
    """``neuralode evaluate``: the task's test metrics for ``model`` (the checkpoint of
    ``step``), with its parameter count, written to ``RUN/evaluation.json`` by rank 0."""
    from neuralode.experiments.common import write_json

    with torch.no_grad():
        result: dict[str, Any] = dict(task.evaluate(model))
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.update({"step": step, "parameters": parameters})
    if ctx.is_main:
        write_json(Path(run_dir) / "evaluation.json", result)
    return result


# ------------------------------------------------------------------------------------------------
# The experiment protocol: what an experiment module supplies, and the commands built on it.


class Experiment(Protocol):
    """What an experiment module supplies (``neuralode/experiments/NAME.py``, registered in
    :data:`neuralode.experiments.EXPERIMENTS`).

    ``CONFIG`` is a frozen dataclass with at least ``out``, ``device``, ``quiet`` and
    ``epochs`` or ``iterations`` fields and the methods ``data_requirements()`` and
    ``extension_blocker()``; a ``grad_clip`` field, if present, clips gradients. ``HEADLINE``
    names the metrics of the line printed at the end of a run. ``MODEL_FIGURES = False`` says
    that ``figures`` draws from ``metrics.jsonl`` alone (``plot`` then builds no model).
    """

    NAME: str
    CONFIG: type
    HEADLINE: tuple[str, ...]

    def build(self, config: Any, ctx: DistContext) -> tuple[nn.Module, Task]:
        """The model (initialised from the config's seed, on ``ctx.device``) and its task."""
        ...

    def make_optimizer(self, config: Any, model: nn.Module, task: Task) -> tuple[Any, Any]:
        """The optimizer (a torch optimizer or :class:`Phases`) and a per-step scheduler or
        ``None``."""
        ...

    def make_schedule(self, config: Any, task: Task) -> Schedule:
        """How long to train and how often to log, evaluate and checkpoint."""
        ...

    def summarize(self, trainer: Trainer, config: Any, run_dir: Path) -> dict[str, Any]:
        """The final metrics (``metrics.json``) of a run that has trained all its steps."""
        ...

    def figures(
        self,
        run_dir: Path,
        config: Any,
        model: nn.Module | None,
        task: Task | None,
        step: int | None,
    ) -> list[Path]:
        """Draw the run's figures into ``run_dir/figures`` and return their paths: those of
        ``metrics.jsonl`` always, those of the model when one is given (the weights after
        ``step`` steps)."""
        ...


def train(experiment: Any, config: Any, *, resume_run: bool = False) -> dict[str, Any]:
    """Train a new run of ``experiment`` (or, with ``resume_run``, continue the one in
    ``config.out``) to its last step; write ``metrics.json`` and the figures from the model in
    memory; return the final metrics. See :func:`run_experiment` for what is checked first."""
    from neuralode.experiments.common import write_json

    def make_trainer(ctx: DistContext, run_dir: Path) -> Trainer:
        model, task = experiment.build(config, ctx)
        optimizer, scheduler = experiment.make_optimizer(config, model, task)
        return Trainer(
            run_dir,
            task,
            model,
            optimizer,
            scheduler,
            experiment.make_schedule(config, task),
            ctx,
            quiet=config.quiet,
            grad_clip=getattr(config, "grad_clip", None),
        )

    def finish(trainer: Trainer, run_dir: Path) -> dict[str, Any]:
        metrics: dict[str, Any] = experiment.summarize(trainer, config, run_dir)
        if trainer.ctx.is_main:
            write_json(run_dir / "metrics.json", metrics)
            experiment.figures(run_dir, config, trainer.model, trainer.task, trainer.step)
        return metrics

    return run_experiment(
        experiment.NAME,
        config,
        make_trainer,
        finish,
        resume_run=resume_run,
        headline=experiment.HEADLINE,
    )


@dataclass
class TrainedRun:
    """A run folder's trained model, read back (:func:`load_run`, :func:`restore`).

    Attributes:
        model: the experiment's model with the weights of the run's last checkpoint, in eval
            mode, on ``ctx.device``.
        config: the run's config (its experiment's ``CONFIG`` dataclass).
        step: the training steps those weights have taken.
        task: the experiment's task (its data and evaluation), built from ``config``.
        ctx: the process context the model was built in.
    """

    model: nn.Module
    config: Any
    step: int
    task: Task
    ctx: DistContext


def experiment_of(run_dir: Path) -> Any:
    """The module of the experiment that wrote ``run_dir`` (from its ``config.json``)."""
    import json

    from neuralode import experiments

    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run folder: {str(path)!r} does not exist")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{str(path)!r} is not valid JSON ({exc}); the run folder is damaged"
        ) from None
    if not isinstance(stored, dict) or "experiment" not in stored:
        raise ValueError(f"{str(path)!r} does not name its experiment")
    return experiments.load(stored["experiment"])


def restore(
    experiment: Any,
    run_dir: str | os.PathLike[str],
    args: Any = None,
    ctx: DistContext | None = None,
) -> TrainedRun:
    """Build ``experiment``'s model and task from the config stored in ``run_dir`` (with the
    command's ``--device``) and load the weights of the run's last checkpoint.

    Raises:
        ValueError: if the folder is not a run, or has no checkpoint yet.
    """
    from neuralode.experiments.distributed import setup

    config = stored_config(experiment.CONFIG, run_dir, args)
    if ctx is None:
        ctx = setup(config.device)
    model, task = experiment.build(config, ctx)
    step = load_weights(run_dir, model, ctx.device)
    return TrainedRun(model=model, config=config, step=step, task=task, ctx=ctx)


def evaluate(experiment: Any, run_dir: str | os.PathLike[str], args: Any = None) -> dict[str, Any]:
    """``neuralode evaluate RUN``: the task's test metrics of the run's last checkpoint, written
    to ``RUN/evaluation.json``."""
    run = restore(experiment, run_dir, args)
    return write_evaluation(run_dir, run.task, run.model, run.step, run.ctx)


def plot(experiment: Any, run_dir: str | os.PathLike[str]) -> list[Path]:
    """``neuralode plot RUN``: redraw the run's figures (those of the model only when the run
    has a checkpoint)."""
    run_dir = Path(run_dir)
    draws_model = getattr(experiment, "MODEL_FIGURES", True)  # else: no data and model to build
    if draws_model and (run_dir / CHECKPOINT_NAME).exists():
        run = restore(experiment, run_dir)
        with torch.no_grad():
            paths: list[Path] = experiment.figures(
                run_dir, run.config, run.model, run.task, run.step
            )
        return paths
    config = stored_config(experiment.CONFIG, run_dir)
    return list(experiment.figures(run_dir, config, None, None, None))


def load_run(run: str | os.PathLike[str], device: str = "cpu") -> TrainedRun:
    """The trained model of a run folder written by ``neuralode train``, in Python.

    Example::

        run = neuralode.load_run("runs/demo")
        run.model           # the experiment's nn.Module, eval mode, last checkpoint's weights
        run.config.method   # every setting of the run
        run.task.evaluate(run.model)   # the run's test metrics, recomputed

    Args:
        run: the run folder.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (where the model is put).

    Raises:
        ValueError: if ``run`` is not a run folder or has no checkpoint yet.
    """
    import argparse

    from neuralode.experiments.distributed import resolve_device

    run_dir = Path(run)
    experiment = experiment_of(run_dir)
    ctx = DistContext(device=resolve_device(device))
    return restore(experiment, run_dir, argparse.Namespace(device=device), ctx)
