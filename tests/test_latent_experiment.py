"""The latent-ODE experiment (Chen et al. 2018, Table 2) end to end on tiny configs.

* The CLI as a user runs it: ``train`` (in a subprocess) writes the run folder (config, metric
  lines with the test RMSE, final metrics, figures) and the loss falls; ``evaluate`` and
  ``plot`` work; a SIGKILL mid-run (a subprocess killing itself) followed by ``neuralode
  resume`` gives the metric lines of an uninterrupted run.
* The RNN baselines and the periodic data run (in-process, to save interpreter start-ups).
* The metric is the paper's: the targets are the 100 noise-free points right after each test
  series' observation window, RMSE is pooled over entries, and the latent predictions land on
  the right grid points when series start at different times.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import neuralode, records, table_script
from conftest import EXPERIMENTS_EXTRA, requires

from neuralode import cli
from neuralode.data.timeseries import (
    SpiralConfig,
    co2_windows,
    load_co2,
    make_spirals,
    split_indices,
)
from neuralode.experiments import engine
from neuralode.experiments import latent as lat
from neuralode.experiments.config import config_from_dict, load_preset
from neuralode.nn.latent import LatentODE

pytestmark = requires("matplotlib", "tqdm", install=EXPERIMENTS_EXTRA)

TINY = [
    "--n-series", "40", "--iterations", "20", "--batch-size", "16", "--eval-every", "10",
    "--log-every", "4", "--checkpoint-every", "6", "--rtol", "1e-3", "--atol", "1e-3",
    "--quiet", "--device", "cpu", "--threads", "1",
]  # fmt: skip
# Chen et al. (2018), Table 2: predictive RMSE on the spirals at n observed points.
TABLE2 = {
    ("rnn", 30): 0.3937, ("rnn", 50): 0.3202, ("rnn", 100): 0.1813,
    ("latent-ode", 30): 0.1642, ("latent-ode", 50): 0.1502, ("latent-ode", 100): 0.1346,
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("latent") / "full"
    neuralode("train", "latent", *TINY, "--out", str(run))
    return run


def test_train_writes_the_run_folder_and_evaluate_and_plot_work(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((trained / "config.json").read_text())
    assert config["experiment"] == "latent" and config["model"] == "latent-ode"
    assert config["threads"] == 1 and config["observations"] == 30
    epochs = [r for r in engine.read_metrics(trained) if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [10, 20]
    for key in ("test_extrap_rmse", "test_interp_rmse", "test_recon_rmse", "test_elbo",
                "test_kl", "test_nfe", "train_nfe_forward", "train_elbo"):  # fmt: skip
        assert all(isinstance(r[key], float) for r in epochs), key
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert epochs[-1]["test_extrap_rmse"] < epochs[0]["test_extrap_rmse"]
    summary = json.loads((trained / "metrics.json").read_text())
    assert summary["steps"] == 20 and summary["train_size"] == 32 and summary["test_size"] == 8
    # The reported size is that of the weights the run saved (counted from the checkpoint, not
    # by building the model again).
    saved = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert summary["parameters"] == sum(v.numel() for v in saved.values()) > 0
    assert summary["test_extrap_rmse"] == epochs[-1]["test_extrap_rmse"]
    assert summary["seconds_per_iteration"] > 0
    # The paper's number beside ours is Table 2's for this model and n (typed from the paper).
    assert summary["paper_test_extrap_rmse"] == TABLE2[("latent-ode", config["observations"])]
    for name in ("training.png", "predictions.png", "latent.png"):
        assert (trained / "figures" / name).stat().st_size > 10_000, name

    # evaluate and plot in-process (the same commands; saves two interpreter start-ups)
    capsys.readouterr()
    assert cli.main(["evaluate", str(trained)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 20
    assert result["test_extrap_rmse"] == pytest.approx(epochs[-1]["test_extrap_rmse"], rel=1e-6)
    assert (trained / "evaluation.json").exists()
    assert cli.main(["plot", str(trained)]) == 0
    assert "predictions.png" in capsys.readouterr().out


def test_sigkill_then_resume_matches_an_uninterrupted_run(trained: Path, tmp_path: Path) -> None:
    # Checkpoints at steps 6, 10 and 12 (every 6 steps and at each evaluation), a metric line
    # at step 16: killed after step 17, resumed from step 12.
    part = tmp_path / "part"
    killed = neuralode("train", "latent", *TINY, "--out", str(part), "--fault-step", "17",
                        check=False)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (part / "metrics.json").exists()
    assert max(r["step"] for r in engine.read_metrics(part)) == 16
    assert cli.main(["resume", str(part), "--quiet"]) == 0
    expected = records(trained)
    assert records(part) == expected
    assert json.loads((part / "metrics.json").read_text())["steps"] == 20


@pytest.mark.parametrize(
    ("model", "data", "task"),
    [
        ("rnn-gaps", "spirals", "extrapolation"),
        ("rnn", "periodic", "interpolation"),
        ("latent-ode", "periodic", "extrapolation"),
    ],
)
def test_baselines_and_periodic_data_run(model: str, data: str, task: str, tmp_path: Path) -> None:
    values = {
        "model": model, "data": data, "periodic_task": task, "n_series": 40,
        "iterations": 20, "batch_size": 16, "eval_every": 10, "log_every": 5,
        "rtol": 1e-3, "atol": 1e-3, "quiet": True, "out": str(tmp_path / "run"),
    }  # fmt: skip
    metrics = engine.train(lat, config_from_dict(lat.LatentConfig, values))
    epochs = [r for r in engine.read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert metrics["model"] == model and metrics["steps"] == 20
    if task == "extrapolation":
        assert metrics["test_extrap_rmse"] > 0
        assert metrics["test_extrap_mse"] == pytest.approx(metrics["test_extrap_rmse"] ** 2)
    if data == "periodic":
        assert metrics["test_interp_rmse"] > 0 and "paper_test_extrap_rmse" not in metrics
    else:
        assert metrics["paper_test_extrap_rmse"] == TABLE2[("rnn", 30)]
        assert 0 < metrics["test_extrap_rmse_seen"] != metrics["test_extrap_rmse"]
    assert (tmp_path / "run" / "figures" / "predictions.png").exists()


def test_masked_rmse_by_hand() -> None:
    target = torch.zeros(2, 3, 2)
    pred = target.clone()
    pred[0, 0, 0], pred[1, 2, 1] = 3.0, 4.0  # squared errors 9 and 16 among 12 entries
    assert lat.masked_rmse(pred, target) == pytest.approx((25 / 12) ** 0.5)
    assert lat.masked_rmse(target + 0.1, target) == pytest.approx(0.1)
    mask = torch.zeros(2, 3, 1)
    mask[0, 0], mask[1, 1] = 1, 1  # keeps the 9 and three zeros
    assert lat.masked_rmse(pred, target, mask) == pytest.approx((9 / 4) ** 0.5)


def test_the_targets_are_the_papers() -> None:
    # Test series observed at n points of their 100-point window; the extrapolation targets are
    # the 100 noise-free points right after it (Table 2: "100 time points extending beyond
    # those used for training"); train and test series are disjoint.
    config = lat.LatentConfig(n_series=20, observations=30)
    train, test = lat.load_series(config)
    data = make_spirals(SpiralConfig(n_spirals=20, noise_std=0.3, seed=0))
    train_idx, test_idx = split_indices(20, 0.8)
    assert (len(train), len(test)) == (16, 4) and set(train_idx).isdisjoint(test_idx)
    assert test.grid.shape == (200,) and test.n_interp == 100
    assert test.values.shape == (4, 30, 2) and bool((test.times < test.grid[100]).all())
    expected = data.select(test_idx).targets().values
    torch.testing.assert_close(test.grid_values[:, 100:], expected, rtol=0, atol=0)
    torch.testing.assert_close(test.grid_values, data.clean[test_idx], rtol=0, atol=0)
    # The observed values are the noisy ones; clean holds the truth at the same times.
    assert float((test.values - test.clean).std()) == pytest.approx(0.3, rel=0.25)


def test_extrapolation_seen_by_hand() -> None:
    # Windows of 3 points, 2 extrapolation targets; training series 0 (curve 0, points 2-4)
    # and 1 (curve 1, points 0-2).  Series 2 (curve 0, start 0) is scored on points 3-4:
    # seen; series 3 (curve 0, start 1) on 4-5: 5 is not; series 4 (curve 1, start 0) on 3-4:
    # not (curve 1 is covered to 2 only, curve 0's cover does not count).
    starts = torch.tensor([2, 0, 0, 1, 0])
    clockwise = torch.tensor([False, True, False, False, True])
    seen = lat.extrapolation_seen(starts, clockwise, torch.tensor([0, 1]), 3, 2)
    assert seen.tolist() == [False, False, True, False, False]
    mask = torch.tensor([True, True, False, False, False])
    assert torch.equal(lat.extrapolation_seen(starts, clockwise, mask, 3, 2), seen)


def test_the_seen_rmse_is_over_the_series_the_training_windows_cover() -> None:
    # The paper's spirals: starts uniform in [100, 800] of the 1000-point curves; a test series
    # starting after the latest training window (per direction) extrapolates onto unseen points.
    config = lat.LatentConfig(n_series=1000, observations=30)
    train, test = lat.load_series(config)
    data = make_spirals(SpiralConfig(n_spirals=1000, noise_std=0.3, seed=0))
    train_idx, test_idx = split_indices(1000, 0.8)
    start, cw = data.start_index, data.clockwise
    for d in (False, True):
        last = int(start[train_idx][cw[train_idx] == d].max())  # windows reach last + 99
        rows = test_idx[(cw[test_idx] == d).numpy()]
        expected = (start[rows] + 199 <= last + 99).tolist()
        assert test.seen is not None and test.seen[cw[test_idx] == d].tolist() == expected
    assert 0 < int(test.seen.sum()) < len(test)
    assert train.seen is not None and train.seen.shape == (800,)
    # Off by 1 on the seen series, by 5 on the others: the seen RMSE is 1.
    pred = test.grid_values[:, 100:] + torch.where(test.seen, 1.0, 5.0)[:, None, None]
    assert lat._seen_rmse(pred, test)["extrap_rmse_seen"] == pytest.approx(1.0)
    k = int(test.seen.sum())
    overall = lat.masked_rmse(pred, test.grid_values[:, 100:])
    assert overall == pytest.approx(((k + 25 * (200 - k)) / 200) ** 0.5)


def test_grid_predictions_land_on_the_right_points() -> None:
    # Series that start at different grid points: the value placed at grid index k is the
    # model's prediction at grid[k], and points before each series' first observation are
    # left out.
    torch.manual_seed(0)
    config = lat.LatentConfig(n_series=10, observations=5, rtol=1e-9, atol=1e-9)
    _, test = lat.load_series(config)
    series = test.to(torch.device("cpu"), torch.float64)
    model = lat.build_model(config, 2).double()
    assert isinstance(model, LatentODE)
    with torch.no_grad():
        samples, _, valid, nfe = model.predict_on_grid(
            series.values, series.times, series.grid, series.mask
        )
        i0 = torch.searchsorted(series.grid, series.times[:, 0].contiguous())
        assert bool((i0 > 0).any()) and bool((valid.sum(1) == 200 - i0).all())
        for b in range(len(series)):
            one = series.select(slice(b, b + 1))
            t_pred = series.grid[int(i0[b]) :: 17]
            direct = model.predict(one.values, one.times, t_pred, use_mean=True).samples[0, 0]
            torch.testing.assert_close(
                samples[0, b, int(i0[b]) :: 17], direct, rtol=1e-6, atol=1e-6
            )
            assert float(samples[0, b, : int(i0[b])].abs().sum()) == 0.0
    assert nfe.shape == (1, len(series))


def test_co2_windows_leave_out_gaps_and_split_in_time() -> None:
    ppm = np.arange(40.0)
    ppm[[3, 25]] = np.nan
    train, test = co2_windows(ppm, window=4, horizon=2, stride=3, split=21)
    span = 6
    starts = np.arange(0, 35, 3)  # every third week while a whole window fits
    complete = [s for s in starts if not np.isnan(ppm[s : s + span]).any()]
    assert train.tolist() == [s for s in complete if s + span <= 21] == [6, 9, 12, 15]
    assert test.tolist() == [s for s in complete if s >= 21] == [27, 30, 33]
    with pytest.raises(ValueError, match="split must be in"):
        co2_windows(ppm, 4, 2, 3, split=40)
    with pytest.raises(ValueError, match="no complete 6-week window on the test side"):
        co2_windows(ppm, 4, 2, 3, split=36)
    with pytest.raises(ValueError, match="at least 1"):
        co2_windows(ppm, 4, 0, 3, split=20)


@requires("statsmodels", install="pip install statsmodels")
def test_the_co2_record_and_its_windows() -> None:
    years, ppm = load_co2()
    assert ppm.shape == years.shape == (2284,) and int(np.isnan(ppm).sum()) == 59
    assert years[0] == pytest.approx(1958 + 87 / 365) and years[-1] == pytest.approx(
        2001.99, abs=0.01
    )
    assert np.all(np.diff(years) == pytest.approx(7 / 365.25, abs=0.003))
    assert 313 <= np.nanmin(ppm) < 316 and 370 < np.nanmax(ppm) < 375  # the 1958-2001 rise
    config = lat.LatentConfig(data="co2", observations=20)
    train, test = lat.load_series(config)
    assert (len(train), len(test)) == (290, 95)
    assert train.values.shape == (290, 20, 1) and test.grid.shape == (78,)
    assert test.n_interp == 52 and bool((test.times < test.grid[52]).all())
    # Centred on the mean of what each window observes; the targets are the record's weeks.
    assert float(test.values.mean(dim=1).abs().max()) < 1e-4
    split = int(0.8 * 2284)
    starts, _ = co2_windows(ppm, 52, 26, 4, split)
    first = torch.from_numpy(ppm[starts[0] : starts[0] + 78]).float()
    level = first[0] - train.grid_values[0, 0, 0]
    torch.testing.assert_close(train.grid_values[0, :, 0] + level, first)
    week = torch.round(train.times[0] * 365.2425 / 7).long()
    torch.testing.assert_close(train.values[0, :, 0], train.grid_values[0, week, 0])
    with pytest.raises(ValueError, match="at most the window's 52 weeks"):
        lat.load_series(lat.LatentConfig(data="co2", observations=53))


@requires("statsmodels", install="pip install statsmodels")
@pytest.mark.parametrize("model", ["latent-ode", "rnn-gaps"])
def test_a_model_trains_on_the_co2_record(model: str, tmp_path: Path) -> None:
    values = {
        "model": model, "data": "co2", "observations": 20, "iterations": 30,
        "batch_size": 32, "eval_every": 15, "log_every": 5, "rtol": 1e-3, "atol": 1e-3,
        "quiet": True, "out": str(tmp_path / "run"),
    }  # fmt: skip
    metrics = engine.train(lat, config_from_dict(lat.LatentConfig, values))
    epochs = [r for r in engine.read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert metrics["test_size"] == 95 and 0 < metrics["test_extrap_rmse"] < 10  # ppm
    assert "paper_test_extrap_rmse" not in metrics and "test_extrap_rmse_seen" not in metrics
    assert (tmp_path / "run" / "figures" / "predictions.png").exists()


@pytest.mark.parametrize("name", ["paper", "quick"])
def test_shipped_presets_are_valid(name: str) -> None:
    config = config_from_dict(lat.LatentConfig, load_preset("latent", name))
    assert config.data == "spirals" and config.latent_dim == 4


@pytest.mark.slow
def test_latent_ode_beats_the_rnn_baseline_on_held_out_spirals(tmp_path: Path) -> None:
    # Table 2's ordering at n = 30 with the quick recipe (measured: latent ODE 0.78; the RNN
    # with time gaps 2.3 after 2000 iterations), each run a few minutes on one thread.
    rmse = {}
    for model in ("latent-ode", "rnn-gaps"):
        run = tmp_path / model
        neuralode(
            "train", "latent", "--preset", "quick", "--model", model,
            "--out", str(run), "--quiet",
        )  # fmt: skip
        rmse[model] = json.loads((run / "metrics.json").read_text())["test_extrap_rmse"]
    assert rmse["latent-ode"] < 1.0
    assert rmse["latent-ode"] < rmse["rnn-gaps"]


@pytest.mark.parametrize("key", sorted(TABLE2))
def test_paper_numbers_are_table_2s(key: tuple[str, int]) -> None:
    model, n = key
    assert lat.PAPER_TABLE2[model][n] == TABLE2[key]


def test_the_table_script_averages_seeds_and_keeps_budgets_apart(tmp_path: Path) -> None:
    # benchmarks/latent_table.py prints the README's Table 2 from run folders: the mean and
    # range over seeds per (model, n, iterations), evaluation.json over metrics.json.
    script = table_script("latent_table")

    def run(name: str, config: dict[str, object], rmse: float, seen: float | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        base = {"experiment": "latent", "data": "spirals", "seed": 0, "iterations": 20000}
        (folder / "config.json").write_text(json.dumps({**base, **config}))
        metrics = {"test_extrap_rmse": rmse, "test_interp_rmse": 0.1}
        if seen is not None:
            metrics["test_extrap_rmse_seen"] = seen
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return folder

    ode = {"model": "latent-ode", "observations": 30}
    runs = [
        run("a", {**ode, "seed": 0}, 0.4, None),
        run("b", {**ode, "seed": 1}, 0.2, 0.1),
        run("c", {**ode, "iterations": 2000}, 0.7, 0.3),
        run("d", {"model": "rnn-gaps", "observations": 50}, 1.5, 0.9),
        run("e", {"model": "rnn", "observations": 30, "data": "co2"}, 2.5, None),
    ]
    (runs[0] / "evaluation.json").write_text(
        json.dumps({"test_extrap_rmse": 0.5, "test_extrap_rmse_seen": 0.2})
    )
    lines = script.table(runs).splitlines()
    assert lines[0] == "| extrapolation RMSE | n = 30 | n = 50 |"
    assert "| Latent ODE (paper) | 0.1642 | 0.1502 |" in lines
    assert (
        "| Latent ODE, ours, 20000 it., all series (2 seeds) | 0.350 (0.200-0.500) | - |" in lines
    )
    assert (
        "| Latent ODE, ours, 20000 it., seen series (2 seeds) | 0.150 (0.100-0.200) | - |" in lines
    )
    assert "| Latent ODE, ours, 2000 it., all series (1 seed) | 0.700 | - |" in lines
    assert "| RNN with time gaps, ours, 20000 it., seen series (1 seed) | - | 0.900 |" in lines
    co2 = script.co2_table(runs).splitlines()
    assert co2[2] == "| RNN | 30 | 20000 | 0 | 2.500 | 0.100 |" and len(co2) == 3
