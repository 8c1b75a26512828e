"""The density experiment's table from run folders, and NLL and NFE curves of runs side by side.

Reads each run's ``config.json`` and ``metrics.jsonl`` (and ``metrics.json`` when the run has
finished) and prints one Markdown line per run: the data set, the model with its integration
time and regularisers, the iterations, the last and best exact-trace test NLL (nats) beside the
true density's NLL of the same points where it is known, the forward and backward NFE of the
last 100 training iterations, and the seconds per iteration.  ``--figure`` draws the test NLL
and the training NFE (forward + backward) of the ``--curves`` runs against the iteration, in two
panels side by side (the RNODE comparison of docs/experiments/density.md).

    python benchmarks/density_table.py runs/density-*            # after `make density`
    python benchmarks/density_table.py runs/density-* --figure rnode.png \\
        --curves "FFJORD, T = 1=runs/density-ffjord-8gaussians-T1" \\
                 "RNODE=runs/density-rnode-8gaussians"
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from neuralode.experiments.density import DensityConfig
from neuralode.experiments.engine import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _tables.py, beside this script
from _tables import parse, save_figure  # noqa: E402

#: Training iterations whose NFE the table averages (FFJORD's logs smooth over about as many).
LAST = 100


def label(config: dict[str, Any]) -> str:
    """The model as the table names it: FFJORD/CNF with its T and regularisers, or the NF."""
    model = str(config.get("model"))
    if model == "planar-nf":
        return f"planar NF (K = {config.get('num_layers')})"
    name = {"ffjord": "FFJORD", "cnf": "planar CNF"}.get(model, model)
    parts = [f"T = {config.get('T')}{' learned' if config.get('train_T') else ' fixed'}"]
    trace = DensityConfig(model=model, trace=config.get("trace", "auto")).resolved_trace
    parts.append("exact trace" if trace == "exact" else "Hutchinson")
    for key, short in (("kinetic_weight", "kinetic"), ("jacobian_weight", "Jacobian")):
        if config.get(key):
            parts.append(f"{short} {config[key]:g}")
    return f"{name} ({', '.join(parts)})"


def row(run: Path) -> dict[str, Any] | None:
    """One run's line of the table, or None for a folder that is not a density run."""
    if not (run / "config.json").is_file():
        return None
    config = json.loads((run / "config.json").read_text())
    if config.get("experiment") != "density":
        return None
    lines = read_metrics(run)
    epochs = [r for r in lines if r.get("kind") == "epoch" and "test_nll" in r]
    if not epochs:
        return None
    last_step = int(epochs[-1]["step"])
    recent = [r for r in lines if r.get("kind") == "train" and r["step"] > last_step - LAST]

    def mean(key: str) -> float | None:
        values = [float(r[key]) for r in recent if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    seconds = sum(float(r.get("seconds", 0.0)) for r in epochs)
    return {
        "data": config["data"],
        "model": label(config),
        "iterations": last_step,
        # A finished run that was extended (`neuralode resume --iterations N`) keeps its old
        # metrics.json until the extension ends: count the iterations too.
        "finished": (run / "metrics.json").is_file()
        and last_step >= int(config.get("iterations", 0)),
        "test_nll": float(epochs[-1]["test_nll"]),
        "best_test_nll": min(float(r["test_nll"]) for r in epochs),
        "true_nll": epochs[-1].get("true_nll"),
        "nfe_forward": mean("nfe_forward"),
        "nfe_backward": mean("nfe_backward"),
        "seconds_per_iteration": seconds / max(last_step, 1),
    }


def gaussian_nll(data: str, n: int = 200_000, seed: int = 0) -> float:
    """The NLL (nats) of the best Gaussian for ``data``: ``0.5 log det(2 pi e S)`` with ``S`` the
    covariance of ``n`` points, what a linear flow reaches at best (a flow that sits near it
    has not yet bent)."""
    import numpy as np

    from neuralode.data import toy2d

    points = toy2d.sample(data, n, seed).astype(np.float64)
    cov = np.cov(points, rowvar=False)
    return float(0.5 * np.linalg.slogdet(2 * np.pi * np.e * cov)[1])


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(runs: list[Path]) -> str:
    """The Markdown table of the density runs among ``runs`` (others are skipped)."""
    lines = [
        "| data | model | iterations | test NLL (best) | true NLL | Gaussian NLL | "
        f"NFE fwd / bwd (last {LAST} its) | s / it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    gaussian: dict[str, float] = {}
    for run in runs:
        r = row(run)
        if r is None:
            continue
        if r["data"] not in gaussian:
            gaussian[r["data"]] = gaussian_nll(r["data"])
        its = f"{r['iterations']}" + ("" if r["finished"] else " (unfinished)")
        lines.append(
            f"| {r['data']} | {r['model']} | {its} | {r['test_nll']:.3f} "
            f"({r['best_test_nll']:.3f}) | {_num(r['true_nll'], 3)} | {gaussian[r['data']]:.3f} | "
            f"{_num(r['nfe_forward'], 1)} / {_num(r['nfe_backward'], 1)} | "
            f"{r['seconds_per_iteration']:.3f} |"
        )
    return "\n".join(lines)


def figure(path: Path, curves: list[tuple[str, Path]], title: str = "") -> None:
    """Test NLL (left) and training NFE per iteration, forward + backward (right), of each
    ``(label, run)`` against the iteration; the true NLL dashed where it is known (once per
    value, in the colour of the first run that has it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    drawn: set[float] = set()
    for i, (name, run) in enumerate(curves):
        lines = read_metrics(run)
        epochs = [r for r in lines if r.get("kind") == "epoch" and "test_nll" in r]
        train = [r for r in lines if r.get("kind") == "train" and "nfe_forward" in r]
        colour = f"C{i}"
        steps = [r["step"] for r in epochs]
        left.plot(steps, [r["test_nll"] for r in epochs], color=colour, label=name)
        true_nll = next((r["true_nll"] for r in epochs if r.get("true_nll") is not None), None)
        if true_nll is not None and true_nll not in drawn:
            drawn.add(true_nll)
            data = json.loads((run / "config.json").read_text()).get("data")
            left.axhline(true_nll, color=colour, ls="--", lw=1, label=f"true density of {data}")
        right.plot(
            [r["step"] for r in train],
            [r["nfe_forward"] + r.get("nfe_backward", 0.0) for r in train],
            color=colour,
            lw=0.8,
            label=name,
        )
    left.set(
        xlabel="iteration", ylabel="test NLL (nats, exact trace)", title="negative log-likelihood"
    )
    right.set(
        xlabel="iteration",
        ylabel="NFE per training iteration (forward + backward)",
        title="function evaluations",
    )
    save_figure(fig, (left, right), path, title)


def main() -> None:
    args = parse(__doc__, "density", title=True)
    runs = args.runs
    print(table(runs))
    if args.figure:
        figure(args.figure, args.curves, args.title)


if __name__ == "__main__":
    main()
