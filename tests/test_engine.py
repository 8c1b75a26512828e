"""The experiment machinery: configs, checkpoints (atomic, safe), exact resume, metrics, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from neuralode import cli
from neuralode.experiments import engine
from neuralode.experiments.checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from neuralode.experiments.config import (
    add_config_arguments,
    config_from_dict,
    resolve_config,
)
from neuralode.experiments.distributed import DistContext, resolve_device


@dataclass(frozen=True)
class ToyConfig:
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    batch_size: int = 8
    name: str = "toy"
    milestones: tuple[int, ...] = (2, 4)
    augment: bool = True
    limit: int | None = None


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig)
    return parser.parse_args(argv)


def test_config_precedence_defaults_file_flags(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[config]\nlr = 0.5\nbatch_size = 16\nmilestones = [3]\n")
    config = resolve_config(ToyConfig, _parse(["--config", str(file), "--batch-size", "32"]))
    assert config == ToyConfig(lr=0.5, batch_size=32, milestones=(3,))
    assert resolve_config(ToyConfig, _parse([])) == ToyConfig()
    flags = _parse(["--no-augment", "--limit", "none", "--milestones", "1", "2", "3"])
    assert resolve_config(ToyConfig, flags) == ToyConfig(
        augment=False, limit=None, milestones=(1, 2, 3)
    )


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown setting\(s\) lrr.*known settings: .*lr"):
        config_from_dict(ToyConfig, {"lrr": 1.0})
    with pytest.raises(ValueError, match="'batch_size' expects an integer"):
        config_from_dict(ToyConfig, {"batch_size": 1.5})
    with pytest.raises(ValueError, match="'augment' expects true or false"):
        config_from_dict(ToyConfig, {"augment": "yes"})
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        resolve_config(ToyConfig, _parse(["--config", str(bad)]))
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        resolve_config(ToyConfig, _parse(["--config", str(tmp_path / "missing.toml")]))


def test_checkpoint_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    path = tmp_path / "ck" / "last.pt"
    state = {"step": 3, "model": {"w": torch.arange(4.0)}, "meta": {"a": [1, 2.5, "x", None]}}
    save_checkpoint(path, state)
    save_checkpoint(path, {**state, "step": 4})
    loaded = load_checkpoint(path)
    assert loaded["step"] == 4 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert loaded["meta"] == {"a": [1, 2.5, "x", None]}
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left


def test_corrupt_truncated_and_missing_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.pt")
    torch.save({"format": 999}, path)
    with pytest.raises(CheckpointError, match="not a neuralode checkpoint of format 1"):
        load_checkpoint(path)


class _Exploit:
    """Unpickling this would run ``os.system``: the safe loader must refuse it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": _Exploit()}, path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="refused by the safe loader.*posix.system"):
            load_checkpoint(path)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    with open(tmp_path / "raw.pkl", "wb") as handle:  # a bare pickle, not a torch zip
        pickle.dump(_Exploit(), handle)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "raw.pkl")
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_rng_capture_restore_survives_a_checkpoint(tmp_path: Path) -> None:
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    random.random(), np.random.rand(), torch.rand(5)  # noqa: NPY002 - move every generator on
    restore_rng(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert expected[0] == again[0] and expected[1] == again[1]
    assert torch.equal(expected[2], again[2])


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda.*is_available"):
            resolve_device("cuda")


def test_collective_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """NEURALODE_DIST_TIMEOUT bounds how long a collective waits for a process that is gone
    (torch's default, 30 minutes, when unset); a bad value is refused by name."""
    import datetime

    from neuralode.experiments import distributed

    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed._timeout() is None
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed._timeout() == datetime.timedelta(seconds=90)
    for bad in ("0", "-5", "soon", "nan"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="NEURALODE_DIST_TIMEOUT must be a positive"):
            distributed._timeout()


class _ToyTask:
    """Noisy linear regression: batches from a saved generator, dropout from the global RNG."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gen = torch.Generator().manual_seed(7)
        self.w_true = torch.tensor([[1.0, -2.0, 0.5]])
        self.crash_at: int | None = None

    def train_step(self, model: nn.Module, step: int) -> engine.StepOutput:
        if step == self.crash_at:
            raise RuntimeError("simulated crash")
        x = torch.randn(16, 3, generator=self.gen)
        y = x @ self.w_true.T + 0.1 * torch.randn(16, 1, generator=self.gen)
        pred = model(x)
        loss = ((pred - y) ** 2).mean()
        return engine.StepOutput(loss, {"loss": loss.item() * 16}, 16, {"nfe_forward": 1.0})

    def after_backward(self, model: nn.Module) -> dict[str, float]:
        return {"nfe_backward": 2.0}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x = torch.linspace(-1, 1, 30).reshape(10, 3)
        return {"test_loss": float(((model(x) - x @ self.w_true.T) ** 2).mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


def _toy_trainer(run_dir: Path, fault: int | None = None) -> engine.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    schedule = engine.Schedule(
        total_steps=30, steps_per_epoch=10, log_every=3, checkpoint_every=4, fault_step=fault
    )
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return engine.Trainer(
        run_dir, _ToyTask(model), model, optimizer, scheduler, schedule, DistContext(), quiet=True
    )


@dataclass(frozen=True)
class _RunConfig:
    out: str
    device: str = "cpu"
    quiet: bool = True
    epochs: int = 3

    def data_requirements(self) -> dict[str, str]:
        return {}


def test_the_ddp_wrapper_is_gone_before_the_process_group_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DDP's reducer holds the process group; if it outlives ``destroy_process_group``, the
    group's destructor runs inside the reducer's, holding the GIL, and can wait forever on a
    gloo worker that needs it (torchrun hung at exit once in ~10 runs on 2 busy cores). A real
    DDP run (a one-process gloo group behind a two-process context) checks that no wrapper is
    alive when the group is destroyed, on a finished run and on a crashed one."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from neuralode.experiments import distributed

    alive: list[int] = []
    real_destroy = dist.destroy_process_group

    def destroy(*args: Any, **kwargs: Any) -> None:
        alive.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        real_destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    monkeypatch.setattr(distributed, "setup", lambda device: DistContext(world_size=2))

    def make_trainer(ctx: DistContext, run_dir: Path, *, crash: int | None) -> engine.Trainer:
        assert ctx.distributed
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7)
        schedule = engine.Schedule(total_steps=6, steps_per_epoch=2, log_every=2,
                                   checkpoint_every=2)  # fmt: skip
        task = _ToyTask(model)
        task.crash_at = crash
        trainer = engine.Trainer(run_dir, task, model, optimizer, scheduler, schedule, ctx,
                                 quiet=True)  # fmt: skip
        assert isinstance(trainer.train_model, DistributedDataParallel)
        return trainer

    def finish(trainer: engine.Trainer, run_dir: Path) -> dict[str, Any]:
        return {"test_loss": trainer.last_epoch.get("test_loss")}

    for crash in (None, 3):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        config = _RunConfig(out=str(tmp_path / f"run{crash}"))
        try:
            metrics = engine.run_experiment(
                "toy", config, functools.partial(make_trainer, crash=crash), finish
            )
        except RuntimeError as exc:
            assert crash is not None and "simulated crash" in str(exc)
        else:
            assert crash is None and metrics["test_loss"] > 0
        assert not dist.is_initialized()
    assert alive == [0, 0]


def _without_times(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


def test_trainer_resume_mid_epoch_equals_uninterrupted_run(tmp_path: Path) -> None:
    full = _toy_trainer(tmp_path / "full")
    final = full.fit()
    assert final["epoch"] == 3 and final["test_loss"] < 0.5
    records = engine.read_metrics(tmp_path / "full")
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [10, 20, 30]
    assert records[0]["kind"] == "train" and records[0]["nfe_backward"] == 2.0

    # A run that crashes in step 19: its last checkpoint is step 16, and it has already written
    # the "train" line of step 18, which the resumed run must drop and write again.
    crashed = _toy_trainer(tmp_path / "part")
    crashed.task.crash_at = 19  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    assert load_checkpoint(tmp_path / "part" / engine.CHECKPOINT_NAME)["step"] == 16
    assert engine.read_metrics(tmp_path / "part")[-1]["step"] == 18  # written after step 16
    torch.manual_seed(123)  # a different global RNG state: resume must restore the saved one
    resumed = _toy_trainer(tmp_path / "part")
    resumed.fit(resume=True)
    assert _without_times(engine.read_metrics(tmp_path / "part")) == _without_times(records)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_a_run_of_more_than_an_hour_says_so_early(tmp_path: Path, capsys: Any) -> None:
    # A clock that advances 200 s per reading: the first step takes over 30 s, so its pace
    # (800 s from the start to the estimate) gives the estimate, printed once, at step 1.
    now = iter(range(0, 10**6, 200))
    trainer = _toy_trainer(tmp_path)
    trainer._clock = lambda: float(next(now))
    trainer.long_run_hint = "; a shorter recipe: --preset quick"
    trainer.fit()
    err = capsys.readouterr().err.splitlines()
    warnings = [line for line in err if "steps left take about" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("neuralode: 800 s per step: the 29 steps left take about 6.4 ")
    assert warnings[0].endswith(
        "hours at this pace (Ctrl-C saves a checkpoint; 'neuralode "
        f"resume {tmp_path}' continues); a shorter recipe: --preset quick"
    )
    # A fast run says nothing.
    quick = _toy_trainer(tmp_path / "quick")
    quick.fit()
    assert "steps left" not in capsys.readouterr().err


def test_metrics_reader_skips_a_torn_last_line(tmp_path: Path) -> None:
    (tmp_path / engine.METRICS_NAME).write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert engine.read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]


def test_non_finite_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    trainer = _toy_trainer(tmp_path)
    with torch.no_grad():
        trainer.model[0].weight.fill_(float("nan"))
    with pytest.raises(engine.TrainingFailed, match="training loss is nan at step 0") as info:
        trainer.fit()
    assert isinstance(info.value.__cause__, FloatingPointError)
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert failure["step"] == 0 and failure["checkpoint_step"] is None
    assert failure["type"] == "FloatingPointError"


def test_start_run_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    run = engine.start_run(tmp_path / "r", "toy", {"lr": 0.1}, DistContext())
    assert json.loads((run / "config.json").read_text())["experiment"] == "toy"
    save_checkpoint(run / engine.CHECKPOINT_NAME, {"step": 1})
    with pytest.raises(ValueError, match="already holds a run.*neuralode resume"):
        engine.start_run(run, "toy", {}, DistContext())


def test_cli_run_commands_explain_bad_run_folders(tmp_path: Path, capsys: Any) -> None:
    assert cli.main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"experiment": "nope"}')
    assert cli.main(["resume", str(tmp_path)]) == 2
    assert "unknown experiment 'nope'; known experiments: density" in capsys.readouterr().err


SHIPPED = {
    "mnist": ["long", "paper", "quick"],
    "density": ["cnf", "ffjord", "planar-nf", "quick", "rnode"],
    "latent": ["paper", "quick"],
    "spiral": [],
}


@pytest.mark.parametrize("experiment", sorted(SHIPPED))
def test_shipped_presets_are_valid(experiment: str) -> None:
    """Every preset of every experiment (read through importlib.resources, as an installed
    package reads it) fills the experiment's config class without error."""
    from neuralode import experiments
    from neuralode.experiments.config import load_preset, presets

    assert sorted(presets(experiment)) == SHIPPED[experiment]
    module = experiments.load(experiment)
    for name in SHIPPED[experiment]:
        settings = load_preset(experiment, name)
        assert settings, name
        config = config_from_dict(module.CONFIG, settings, source=name)
        assert all(getattr(config, k) == (tuple(v) if isinstance(v, list) else v)
                   for k, v in settings.items())  # fmt: skip


def test_a_preset_is_overridden_by_the_config_file_and_then_by_flags(tmp_path: Path) -> None:
    from neuralode.experiments import mnist
    from neuralode.experiments.config import add_config_arguments

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, mnist.CONFIG, "mnist")
    file = tmp_path / "c.toml"
    file.write_text("lr = 0.5\nepochs = 3\n")
    quick = resolve_config(mnist.CONFIG, parser.parse_args(["--preset", "quick"]), "mnist")
    assert (quick.epochs, quick.optimizer, quick.lr) == (1, "adam", 0.002)
    both = parser.parse_args(["--preset", "quick", "--config", str(file), "--epochs", "2"])
    config = resolve_config(mnist.CONFIG, both, "mnist")
    assert (config.epochs, config.optimizer, config.lr) == (2, "adam", 0.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "nope"])
    with pytest.raises(ValueError, match="presets: long, paper, quick"):
        from neuralode.experiments.config import load_preset

        load_preset("mnist", "nope")


def test_every_experiment_shares_the_run_settings_and_checks_them() -> None:
    from neuralode import experiments
    from neuralode.experiments.config import RunSettings

    shared = [f.name for f in dataclasses.fields(RunSettings)]
    for name in experiments.EXPERIMENTS:
        cls = experiments.load(name).CONFIG
        assert issubclass(cls, RunSettings), name
        assert config_from_dict(cls, {}).out == f"runs/{name}"
        for bad, says in (
            ({"log_every": 0}, "log_every must be at least 1; got 0"),
            ({"threads": 0}, "threads must be at least 1; got 0"),
            ({"checkpoint_every": -1}, "checkpoint_every must be at least 0; got -1"),
        ):
            with pytest.raises(ValueError, match=says):
                config_from_dict(cls, bad)
        # --help lists the experiment's own settings first, then the shared ones in one order.
        parser = argparse.ArgumentParser()
        from neuralode.experiments.config import add_config_arguments

        add_config_arguments(parser, cls, name)
        dests = [a.dest for a in parser._actions if a.dest not in ("help", "preset", "config")]
        assert dests[-len(shared) :] == shared, name


def test_an_empty_figure_panel_says_why() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from neuralode.experiments.common import explain_empty

    empty, drawn = Figure().subplots(1, 2)
    drawn.plot([0, 1], [1, 2])
    explain_empty(empty, "the mlp has no adaptive ODE block, so no function evaluations")
    explain_empty(drawn, "never shown")
    assert [t.get_text() for t in empty.texts] == [
        "the mlp has no adaptive ODE block,\nso no function evaluations"
    ]
    assert len(drawn.texts) == 0
