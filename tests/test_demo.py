"""The spiral demo is an engine experiment like the others: run folder, exact resume (across
its switch from Adam to L-BFGS), evaluate, plot, refusal of an existing run, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from clitools import neuralode, records
from conftest import EXPERIMENTS_EXTRA, requires

from neuralode.cli import main

pytestmark = requires("matplotlib", "tqdm", install=EXPERIMENTS_EXTRA)

SHORT = [
    "--iterations", "40", "--eval-every", "20", "--polish-steps", "2", "--polish-max-iter", "10",
    "--threads", "1", "--quiet",
]  # fmt: skip


# Volatile fields (timings) differ between otherwise identical runs.
def _strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if "seconds" not in k}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("spiral") / "run"
    assert main(["train", "spiral", *SHORT, "--out", str(run)]) == 0
    return run


def test_spiral_writes_run_folder_and_is_deterministic(finished: Path, tmp_path: Path) -> None:
    for name in (
        "config.json",
        "metrics.json",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "figures/spiral.png",
        "figures/training.png",
    ):
        assert (finished / name).is_file(), f"missing {name}"

    config = json.loads((finished / "config.json").read_text())
    assert config["iterations"] == 40 and config["seed"] == 0 and config["out"] == str(finished)
    assert "fault_step" not in config  # testing-only settings stay out of the record

    metrics = json.loads((finished / "metrics.json").read_text())
    assert math.isfinite(metrics["rmse"]) and metrics["rmse"] >= 0
    assert math.isfinite(metrics["max_error"]) and metrics["max_error"] >= metrics["rmse"]
    assert metrics["iterations"] == 40 and metrics["polish_steps"] == 2 and metrics["steps"] == 42

    epochs = [r for r in records(finished) if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [20, 40, 42]
    assert epochs[-1]["rmse"] == metrics["rmse"]
    # It learns: the L-BFGS polish brings the full-trajectory error well below where Adam's
    # first evaluation left it (measured: 0.82 -> 0.26).
    assert metrics["rmse"] < 0.5 * epochs[0]["rmse"], (epochs[0]["rmse"], metrics["rmse"])
    # NFE is counted honestly: L-BFGS evaluates the loss several times per step.
    assert metrics["train_nfe_total"] > sum(
        r["nfe_forward"] for r in records(finished) if r["kind"] == "train"
    )

    second = tmp_path / "b"
    assert main(["train", "spiral", *SHORT, "--out", str(second)]) == 0
    metrics2 = json.loads((second / "metrics.json").read_text())
    assert _strip_timing(metrics2) == _strip_timing(metrics)
    assert records(second) == records(finished)


def test_spiral_killed_in_its_lbfgs_phase_resumes_exactly(finished: Path, tmp_path: Path) -> None:
    # Checkpoints after every step; killed after step 41, the first L-BFGS step, so the resumed
    # run needs the L-BFGS history and the phase it was in from the checkpoint.
    run = tmp_path / "run"
    args = ["train", "spiral", *SHORT, "--out", str(run), "--checkpoint-every", "1"]
    killed = neuralode(*args, "--fault-step", "41", check=False)
    assert killed.returncode != 0
    assert [r["step"] for r in records(run) if r["kind"] == "epoch"] == [20, 40]
    resumed = neuralode("resume", str(run))
    assert "spiral: rmse" in resumed.stdout and str(run) in resumed.stdout
    assert records(run) == records(finished)
    ours = json.loads((run / "metrics.json").read_text())
    theirs = json.loads((finished / "metrics.json").read_text())
    assert _strip_timing(ours) == _strip_timing(theirs)


def test_spiral_evaluate_plot_and_an_existing_run(finished: Path, capsys) -> None:
    assert main(["evaluate", str(finished)]) == 0
    evaluation = json.loads((finished / "evaluation.json").read_text())
    metrics = json.loads((finished / "metrics.json").read_text())
    assert evaluation["rmse"] == pytest.approx(metrics["rmse"], rel=1e-12)
    assert evaluation["step"] == 42 and evaluation["parameters"] == 2 * 50 + 50 + 50 * 2 + 2

    figure = finished / "figures" / "spiral.png"
    figure.unlink()
    assert main(["plot", str(finished)]) == 0
    assert figure.stat().st_size > 0

    capsys.readouterr()
    assert main(["train", "spiral", *SHORT, "--out", str(finished)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["resume", str(finished)]) == 2
    err = capsys.readouterr().err
    assert "is finished (42 of 42 steps); it cannot be trained longer exactly (its L-BFGS " in err
    assert main(["resume", str(finished), "--iterations", "80"]) == 2
    assert "--iterations cannot extend this run: its L-BFGS phase" in capsys.readouterr().err


def test_load_run_gives_the_trained_model_in_python(finished: Path, tmp_path: Path) -> None:
    import neuralode
    from neuralode.experiments.spiral import SpiralField

    run = neuralode.load_run(finished)
    assert isinstance(run.model, SpiralField) and not run.model.training
    assert run.step == 42 and run.config.iterations == 40 and run.config.out == str(finished)
    metrics = json.loads((finished / "metrics.json").read_text())
    assert run.task.evaluate(run.model)["rmse"] == pytest.approx(metrics["rmse"], rel=1e-12)

    with pytest.raises(ValueError, match="is not a run folder"):
        neuralode.load_run(tmp_path)
    early = tmp_path / "early"
    assert main(["train", "spiral", *SHORT, "--out", str(early), "--iterations", "1"]) == 0
    (early / "checkpoints" / "last.pt").unlink()
    with pytest.raises(ValueError, match="has no checkpoint yet"):
        neuralode.load_run(early)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--iterations", "0"], "--iterations must be at least 1; got 0"),
        (["--batch-time", "1"], "--batch-time must be in [2, --data-size=1000]; got 1"),
        (["--method", "nope"], "invalid choice: 'nope'"),
        (["--iters", "5"], "unrecognized arguments: --iters 5"),
    ],
)
def test_spiral_bad_settings_are_one_line_and_write_nothing(
    argv: list[str], says: str, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert main(["train", "spiral", *argv, "--out", str(run)]) == 2
    assert says in capsys.readouterr().err
    assert not run.exists()


@pytest.mark.parametrize(("argv", "code"), [(["train", "no-such-experiment"], 2), (["--help"], 0)])
def test_cli_exit_codes(argv: list[str], code: int) -> None:
    assert main(argv) == code
