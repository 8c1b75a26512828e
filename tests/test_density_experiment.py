"""The density experiment end to end on tiny configs: CLI, run folder, SIGKILL + resume, models.

Training runs the real command in a subprocess (as a user would) with ``--preset quick``
(a small FFJORD field, rk4 with 4 steps, 8 iterations of 32 points); the other commands and the
other models run in-process through :func:`neuralode.cli.main` to keep the file well under a
minute on one thread.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from clitools import neuralode, records, table_script
from conftest import EXPERIMENTS_EXTRA, requires

from neuralode import cli
from neuralode.experiments import density, engine
from neuralode.experiments.distributed import DistContext
from neuralode.nn.cnf import CNF, standard_normal_log_prob
from neuralode.nn.flows import PlanarFlow

pytestmark = requires("matplotlib", "tqdm", "sklearn", install=EXPERIMENTS_EXTRA)

QUICK = ["--preset", "quick", "--quiet", "--device", "cpu", "--threads", "1"]
# 8 iterations, evaluation every 4, checkpoints also every 3 (at 3, 4, 6, 8).
FFJORD = [*QUICK, "--model", "ffjord", "--data", "8gaussians", "--checkpoint-every", "3"]


def _epochs(run: Path) -> list[dict[str, Any]]:
    return [r for r in engine.read_metrics(run) if r["kind"] == "epoch"]


@pytest.fixture(scope="module")
def ffjord_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("density") / "ffjord"
    neuralode("train", "density", *FFJORD, "--out", str(run))
    return run


def test_train_writes_the_run_folder_and_evaluate_plot_work(
    ffjord_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ffjord_run
    config = json.loads((run / "config.json").read_text())
    assert config["experiment"] == "density" and config["model"] == "ffjord"
    assert config["trace"] == "auto" and config["method"] == "rk4"  # auto: hutchinson (below)
    records = engine.read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert all(r["nfe_forward"] == 16 and r["nfe_backward"] > 0 for r in train)  # rk4: 4 x 4
    epochs = _epochs(run)
    assert [r["step"] for r in epochs] == [4, 8]
    for r in epochs:
        assert math.isfinite(r["test_nll"]) and r["test_nfe"] == 16
        # 8gaussians has a closed form: its NLL on the test set is the floor (about 2.84 nats).
        assert r["true_nll"] == pytest.approx(2.84, abs=0.05)
        assert r["nll_gap"] == pytest.approx(r["test_nll"] - r["true_nll"])
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["iterations"] == 8 and summary["test_nll"] == epochs[-1]["test_nll"]
    assert summary["trace_train"] == "hutchinson" and summary["seconds_per_iteration"] > 0
    assert summary["parameters"] == sum(
        p.numel() for p in density.build_model(density.CONFIG(hidden=(16, 16))).parameters()
    )
    figures = {p.name: p.stat().st_size for p in (run / "figures").iterdir()}
    assert set(figures) == {"training.png", "density.png", "trajectory.png"}
    assert min(figures.values()) > 10_000

    assert cli.main(["evaluate", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_nll"] == pytest.approx(epochs[-1]["test_nll"], rel=1e-5)
    assert result["step"] == 8 and (run / "evaluation.json").exists()
    assert cli.main(["plot", str(run)]) == 0
    assert "trajectory.png" in capsys.readouterr().out
    assert cli.main(["train", "density", *FFJORD, "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(
    ffjord_run: Path, tmp_path: Path
) -> None:
    # Killed after step 7; the last checkpoint is at step 6 (mid-epoch): resume redraws
    # steps 7 and 8 from their (seed, step) keys and must log exactly the same numbers.
    part = tmp_path / "part"
    killed = neuralode(
        "train", "density", *FFJORD, "--out", str(part), "--fault-step", "7", check=False
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (part / "metrics.json").exists()
    assert max(r["step"] for r in engine.read_metrics(part)) == 6
    neuralode("resume", str(part))
    expected = records(ffjord_run)
    assert records(part) == expected
    assert json.loads((part / "metrics.json").read_text())["iterations"] == 8


def test_planar_cnf_with_regularisers_and_planar_nf_run(tmp_path: Path) -> None:
    cnf_run, nf_run = tmp_path / "cnf", tmp_path / "nf"
    regularised = ["--kinetic-weight", "0.01", "--jacobian-weight", "0.01"]
    cnf_args = [*QUICK, "--model", "cnf", "--data", "moons", *regularised, "--out", str(cnf_run)]
    assert cli.main(["train", "density", *cnf_args]) == 0
    epochs = _epochs(cnf_run)
    assert json.loads((cnf_run / "config.json").read_text())["trace"] == "auto"  # -> exact
    for r in epochs:
        assert r["train_kinetic"] > 0 and r["train_jacobian"] > 0
        assert r["train_loss"] > r["train_nll"]  # the penalty is in the loss
        assert "true_nll" not in r  # moons has no closed-form density
    summary = json.loads((cnf_run / "metrics.json").read_text())
    assert summary["trace_train"] == "exact" and summary["kinetic_last_eval"] > 0

    nf_args = [*QUICK, "--model", "planar-nf", "--data", "circles", "--out", str(nf_run)]
    assert cli.main(["train", "density", *nf_args]) == 0
    epochs = _epochs(nf_run)
    assert all(math.isfinite(r["test_nll"]) and "test_nfe" not in r for r in epochs)
    assert epochs[-1]["true_nll"] == pytest.approx(3.27, abs=0.05)  # about log 2 + log(2 pi 2.25)
    summary = json.loads((nf_run / "metrics.json").read_text())
    assert summary["parameters"] == 4 * 5  # K = 4 layers of u, w (2 each) and b
    assert (nf_run / "figures" / "trajectory.png").exists()

    bad = [*QUICK, "--model", "planar-nf", "--kinetic-weight", "0.1", "--out", str(tmp_path / "x")]
    assert cli.main(["train", "density", *bad]) == 2


def test_evaluation_uses_the_exact_trace_and_batches_are_keyed_by_step() -> None:
    torch.manual_seed(0)
    config = density.CONFIG(hidden=(16, 16), method="rk4", step_size=0.125, test_size=64)
    model = density.build_model(config)
    assert isinstance(model, CNF) and model.trace == "hutchinson"
    task = density.DensityTask(config, model, DistContext())
    x = task.test
    with torch.no_grad():
        logp, nfe = density.log_density(model, x, 32, config.nf_inverse_iters)
        exact = CNF(
            model.field, T=float(model.T.detach()), trace="exact", method="rk4", step_size=0.125
        )
        estimate, _ = model.log_likelihood(x, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logp, exact.log_prob(x), atol=1e-5) and nfe == 16
    assert not torch.allclose(logp, estimate, atol=1e-3)  # Hutchinson's is only an estimate
    assert torch.equal(task.batch(5), task.batch(5))
    assert not torch.equal(task.batch(5), task.batch(6))
    assert task.batch(5).shape == (config.batch_size, 2)


def test_identity_init_makes_every_planar_layer_the_identity() -> None:
    flow = density.build_model(density.CONFIG(model="planar-nf", num_layers=8, nf_init="identity"))
    assert isinstance(flow, PlanarFlow)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, log_det = flow(x)
        assert torch.allclose(y, x, atol=1e-6) and torch.allclose(log_det, torch.zeros(16))
        assert torch.allclose(flow.log_prob(x), standard_normal_log_prob(x), atol=1e-5)
    loss = -flow.log_prob(x + 1).mean()
    loss.backward()
    # u and w get gradients through u_hat (b only once u_hat moves off 0): training starts.
    grads = {n: p.grad for n, p in flow.named_parameters() if not n.endswith(".b")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_the_table_script_reads_a_run_and_draws_its_curves(
    ffjord_run: Path, tmp_path: Path
) -> None:
    # benchmarks/density_table.py prints the README's table from run folders.
    script = table_script("density_table")
    epochs = _epochs(ffjord_run)
    lines = script.table([ffjord_run, tmp_path]).splitlines()  # tmp_path: no run, skipped
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:3] == ["8gaussians", "FFJORD (T = 0.5 learned, Hutchinson)", "8"]
    last, best = epochs[-1]["test_nll"], min(r["test_nll"] for r in epochs)
    assert cells[3] == f"{last:.3f} ({best:.3f})"
    assert cells[4] == f"{epochs[-1]['true_nll']:.3f}"
    # rk4 with 4 steps: 16 evaluations forward in every logged iteration.
    assert cells[6].startswith("16.0 / ")
    # The best Gaussian of 8gaussians, by hand: each coordinate has variance
    # (16 * 0.5 + 0.25) / 1.414^2 (centres on the axes and diagonals at radius 4, noise 0.5).
    var = (16 * 0.5 + 0.25) / 1.414**2
    assert float(cells[5]) == pytest.approx(math.log(2 * math.pi * math.e * var), abs=0.01)
    # A finished run being trained on (`neuralode resume --iterations 16`) still holds its
    # metrics.json: the table counts it unfinished until the iterations are done.
    extended = tmp_path / "extended"
    shutil.copytree(ffjord_run, extended)
    config = json.loads((extended / "config.json").read_text())
    (extended / "config.json").write_text(json.dumps({**config, "iterations": 16}))
    assert (extended / "metrics.json").is_file()
    again = script.table([extended]).splitlines()[2]
    assert [c.strip() for c in again.strip("|").split("|")][2] == "8 (unfinished)"
    out = tmp_path / "curves.png"
    script.figure(out, [("quick", ffjord_run)], "title")
    assert out.stat().st_size > 10_000


def test_the_best_gaussian_of_rings_is_its_covariance() -> None:
    # Rings: radii 3, 2.25, 1.5, 0.75 with uniform angles (variance r^2 / 2 per coordinate)
    # plus N(0, 0.08^2) noise.
    var = sum(r * r for r in (3, 2.25, 1.5, 0.75)) / 4 / 2 + 0.08**2
    expected = math.log(2 * math.pi * math.e * var)
    assert table_script("density_table").gaussian_nll("rings") == pytest.approx(expected, abs=0.005)
