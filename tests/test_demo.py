"""The spiral demo runs end to end through the ``neuralode`` command and is reproducible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import EXPERIMENTS_EXTRA, requires

from neuralode.cli import main

pytestmark = requires("matplotlib", "tqdm", install=EXPERIMENTS_EXTRA)

# Volatile fields (timings) differ between otherwise identical runs.
TIMING_KEYS = {"wall_seconds", "train_seconds", "elapsed_s"}


def _train(out: Path, seed: int = 0) -> int:
    return main(
        [
            "train",
            "spiral",
            "--out",
            str(out),
            "--iters",
            "40",
            "--eval-every",
            "20",
            "--polish-steps",
            "1",
            "--polish-max-iter",
            "10",
            "--seed",
            str(seed),
            "--quiet",
        ]
    )


def _strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_spiral_writes_run_folder_and_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert _train(first) == 0

    for name in ("config.json", "metrics.json", "metrics.jsonl", "spiral.png"):
        assert (first / name).is_file(), f"missing {name}"
    assert (first / "spiral.png").stat().st_size > 0

    config = json.loads((first / "config.json").read_text())
    assert config["iters"] == 40 and config["seed"] == 0 and config["out"] == str(first)

    metrics = json.loads((first / "metrics.json").read_text())
    assert math.isfinite(metrics["rmse"]) and metrics["rmse"] >= 0
    assert math.isfinite(metrics["max_error"]) and metrics["max_error"] >= metrics["rmse"]
    assert metrics["iters"] == 40 and metrics["polish_steps"] == 1 and metrics["seed"] == 0

    lines = _read_jsonl(first / "metrics.jsonl")
    assert [(line["phase"], line["iter"]) for line in lines] == [
        ("adam", 20),
        ("adam", 40),
        ("lbfgs", 41),
    ]
    assert lines[-1]["rmse"] == metrics["rmse"]
    # It learns: the L-BFGS polish brings the full-trajectory error well below where Adam's
    # first evaluation left it (measured: 0.87 -> 0.27).
    assert metrics["rmse"] < 0.5 * lines[0]["rmse"], (lines[0]["rmse"], metrics["rmse"])

    assert _train(second) == 0
    metrics2 = json.loads((second / "metrics.json").read_text())
    assert _strip_timing(metrics2) == _strip_timing(metrics)
    lines2 = _read_jsonl(second / "metrics.jsonl")
    assert [_strip_timing(r) for r in lines2] == [_strip_timing(r) for r in lines]


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["train", "spiral", "--iters", "0"], 2),  # invalid setting -> clear error, exit 2
        (["train", "no-such-experiment"], 2),  # argparse usage error
        (["--help"], 0),
    ],
)
def test_cli_exit_codes(argv: list[str], code: int, tmp_path: Path) -> None:
    assert main([*argv, *(["--out", str(tmp_path)] if "spiral" in argv else [])]) == code
