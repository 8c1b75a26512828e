"""Table 2 of the paper from latent run folders, and the test RMSE of runs against iterations.

Also the runs on the Mauna Loa CO2 record (``--data co2``), in a table of their own.

Reads each run's ``config.json`` (model, observations, seed) and its final metrics
(``evaluation.json`` when ``neuralode evaluate`` wrote one, else ``metrics.json``), groups the
runs by model and n, and prints a Markdown table of the extrapolation RMSE over all test series
and over the ``seen`` ones (whose extrapolation targets lie on points some training window
observes: :func:`neuralode.experiments.latent.extrapolation_seen`), each as the mean over seeds
with the range, beside the paper's numbers.  ``--figure`` draws the test extrapolation RMSE
of the ``--curves`` runs against the iteration.

    python benchmarks/latent_table.py runs/latent-*            # after `make latent`
    python benchmarks/latent_table.py runs/latent-* --figure budget.png \\
        --curves "latent ODE, n = 30=runs/latent-latent-ode-30-s0"
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from neuralode.experiments.engine import read_metrics

# Chen et al. (2018), Table 2: predictive RMSE at n = 30, 50, 100 observed points.
PAPER = {
    "rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813},
    "latent-ode": {30: 0.1642, 50: 0.1502, 100: 0.1346},
}
NAMES = {"latent-ode": "Latent ODE", "rnn": "RNN", "rnn-gaps": "RNN with time gaps"}


def final_metrics(run: Path) -> dict[str, Any]:
    """The run's last test metrics: ``evaluation.json`` if present, else ``metrics.json``."""
    for name in ("evaluation.json", "metrics.json"):
        if (run / name).is_file():
            return dict(json.loads((run / name).read_text()))
    raise SystemExit(f"{run}: no metrics.json or evaluation.json (train or evaluate it first)")


def cell(values: list[float]) -> str:
    """``mean`` of one value, ``mean (min-max)`` of several."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def table(runs: list[Path]) -> str:
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        if config.get("experiment") != "latent" or config.get("data") != "spirals":
            continue
        metrics = final_metrics(run)
        group = (config["model"], int(config["observations"]), int(config["iterations"]))
        groups[group].append(metrics)
    ns = sorted({n for _, n, _ in groups})
    head = "| extrapolation RMSE | " + " | ".join(f"n = {n}" for n in ns) + " |"
    lines = [head, "|" + " --- |" * (len(ns) + 1)]
    for model in ("rnn", "latent-ode"):
        lines.append(
            f"| {NAMES[model]} (paper) | "
            + " | ".join(f"{PAPER[model].get(n, '-')}" for n in ns)
            + " |"
        )
    for model in ("rnn", "rnn-gaps", "latent-ode"):
        for steps in sorted({s for m, _, s in groups if m == model}):
            for key, what in (("test_extrap_rmse", "all"), ("test_extrap_rmse_seen", "seen")):
                row, seeds = [], 0
                for n in ns:
                    found = groups.get((model, n, steps), [])
                    row.append(cell([r[key] for r in found if r.get(key) is not None]))
                    seeds = max(seeds, len(found))
                lines.append(
                    f"| {NAMES[model]}, ours, {steps} it., {what} series "
                    f"({seeds} seed{'s' * (seeds > 1)}) | " + " | ".join(row) + " |"
                )
    return "\n".join(lines)


def co2_table(runs: list[Path]) -> str:
    """The Mauna Loa CO2 runs: test RMSE (ppm) of the 26 weeks after each window and of the
    window itself, by model (one line per run)."""
    lines = [
        "| CO2, ppm | n | iterations | seed | extrapolation RMSE | interpolation RMSE |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        if config.get("experiment") != "latent" or config.get("data") != "co2":
            continue
        m = final_metrics(run)
        interp = m.get("test_interp_rmse")
        lines.append(
            f"| {NAMES[config['model']]} | {config['observations']} | {config['iterations']} | "
            f"{config['seed']} | {m['test_extrap_rmse']:.3f} | "
            + ("-" if interp is None else f"{interp:.3f}")
            + " |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def co2_naive(observations: int) -> dict[str, float]:
    """Test extrapolation RMSE (ppm) of two predictors that learn nothing, on the CO2 windows
    of ``observations`` weeks: each target week is the same week a year earlier, linearly
    interpolated between the window's observations, as it is and plus the training windows'
    mean rise over a year."""
    import numpy as np

    from neuralode.experiments import latent

    train, test = latent.load_series(latent.LatentConfig(data="co2", observations=observations))
    n = test.n_interp
    horizon = len(test.grid) - n
    rise = float((train.grid_values[:, n:, 0] - train.grid_values[:, :horizon, 0]).mean())
    grid = test.grid.numpy()
    year_ago = np.stack(
        [
            np.interp(grid[n:] - grid[n], test.times[b].numpy(), test.values[b, :, 0].numpy())
            for b in range(len(test))
        ]
    )
    target = test.grid_values[:, n:, 0].numpy()
    return {
        "the same week a year earlier": float(np.sqrt(((year_ago - target) ** 2).mean())),
        "the same week a year earlier, plus the mean yearly rise": float(
            np.sqrt(((year_ago + rise - target) ** 2).mean())
        ),
    }


def figure(path: Path, curves: list[tuple[str, Path]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for i, (label, run) in enumerate(curves):
        rows = read_metrics(run)
        for key, style, what in (
            ("test_extrap_rmse", "-", "all test series"),
            ("test_extrap_rmse_seen", "--", "seen series"),
        ):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), style, color=f"C{i}", label=f"{label}: {what}")
    ax.axhline(0.1642, color="k", ls=":", lw=1, label="paper, latent ODE, n = 30")
    ax.axhline(0.1346, color="gray", ls=":", lw=1, label="paper, latent ODE, n = 100")
    ax.set(
        xlabel="iteration (batches of 100 series)",
        ylabel="test extrapolation RMSE",
        yscale="log",
        title="Latent ODE on the spirals: test RMSE against the training budget",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    from _tables import parse  # beside this script (on sys.path when it runs as one)

    args = parse(__doc__, "latent")
    runs = args.runs
    print(table(runs))
    co2 = co2_table(runs)
    if co2:
        print("\n" + co2)
        observations = {
            json.loads((r / "config.json").read_text())["observations"]
            for r in runs
            if json.loads((r / "config.json").read_text()).get("data") == "co2"
        }
        for n in sorted(observations):
            for name, rmse in co2_naive(n).items():
                print(f"| {name} | {n} | - | - | {rmse:.3f} | - |")
    if args.figure:
        figure(args.figure, args.curves)


if __name__ == "__main__":
    main()
