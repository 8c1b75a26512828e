"""The MNIST experiment's table from run folders, and test-error curves of runs side by side.

Reads each run's ``config.json`` and ``metrics.jsonl`` and prints one Markdown line per MNIST
run: the model and its parameter count, the recipe (optimizer, schedule, epochs, batch size,
crops), the epochs done, the last and best test error beside the paper's (Table 1), the training
time, and the ODE block's forward and backward evaluations per batch in the last epoch.
``--figure`` draws the test error (log scale) of the ``--curves`` runs against the epoch, and
the NFE per batch of those that have an adaptive block (docs/experiments/mnist.md).

    python benchmarks/mnist_table.py runs/mnist-*                # after `make mnist-long`
    python benchmarks/mnist_table.py runs/mnist-long-* --figure mnist-long.png \\
        --curves "ODE-Net=runs/mnist-long-odenet" "ResNet=runs/mnist-long-resnet"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from neuralode.experiments.engine import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _tables.py, beside this script
from _tables import parse, save_figure  # noqa: E402

#: Test error of Table 1 of Chen et al. (2018), in percent.
PAPER_TEST_ERROR = {"mlp": 1.60, "resnet": 0.41, "rknet": 0.47, "odenet": 0.42}
NAMES = {"mlp": "1-layer MLP", "resnet": "ResNet", "rknet": "RK-Net", "odenet": "ODE-Net"}


def recipe(config: dict[str, Any]) -> str:
    """The training recipe in a few words: optimizer, peak lr, schedule, batch, crops."""
    crops = ", crops" if config.get("augment") else ""
    return (
        f"{config.get('optimizer')} {config.get('lr'):g}, {config.get('schedule')}, "
        f"batch {config.get('batch_size')}{crops}"
    )


def row(run: Path) -> dict[str, Any] | None:
    """One run's line of the table, or None for a folder that is not an MNIST run."""
    if not (run / "config.json").is_file():
        return None
    config = json.loads((run / "config.json").read_text())
    if config.get("experiment") != "mnist":
        return None
    epochs = [r for r in read_metrics(run) if r.get("kind") == "epoch" and "test_error" in r]
    if not epochs:
        return None
    summary_path = run / "metrics.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "model": str(config.get("model")),
        "parameters": summary.get("parameters"),
        "recipe": recipe(config),
        "epochs": len(epochs),
        "planned": config.get("epochs"),
        "test_error": 100 * float(epochs[-1]["test_error"]),
        "best_test_error": 100 * min(float(r["test_error"]) for r in epochs),
        "minutes": sum(float(r.get("seconds", 0.0)) for r in epochs) / 60,
        "nfe_forward": epochs[-1].get("train_nfe_forward"),
        "nfe_backward": epochs[-1].get("train_nfe_backward"),
    }


def table(runs: list[Path]) -> str:
    """The Markdown table of the MNIST runs among ``runs`` (others are skipped)."""
    lines = [
        "| model | parameters | recipe | epochs | test error (best) | paper's test error | "
        "training time | NFE fwd / bwd per batch (last epoch) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        r = row(run)
        if r is None:
            continue
        params = "-" if r["parameters"] is None else f"{r['parameters']:,}"
        done = f"{r['epochs']}" + ("" if r["epochs"] >= r["planned"] else f" of {r['planned']}")
        nfe = "-"
        if r["nfe_forward"]:
            nfe = f"{r['nfe_forward']:.1f} / {r['nfe_backward'] or 0:.1f}"
        lines.append(
            f"| {NAMES.get(r['model'], r['model'])} | {params} | {r['recipe']} | {done} | "
            f"{r['test_error']:.2f}% ({r['best_test_error']:.2f}%) | "
            f"{PAPER_TEST_ERROR.get(r['model'], float('nan')):.2f}% | {r['minutes']:.0f} min | "
            f"{nfe} |"
        )
    return "\n".join(lines)


def figure(path: Path, curves: list[tuple[str, Path]], title: str = "") -> None:
    """Test error per epoch (left, log scale, the paper's errors dotted) and the ODE block's
    NFE per batch during training (right) of each ``(label, run)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, (name, run) in enumerate(curves):
        lines = read_metrics(run)
        epochs = [r for r in lines if r.get("kind") == "epoch" and "test_error" in r]
        train = [r for r in lines if r.get("kind") == "train"]
        model = json.loads((run / "config.json").read_text()).get("model")
        colour = f"C{i}"
        left.plot(
            [r["epoch"] for r in epochs],
            [100 * r["test_error"] for r in epochs],
            "o-",
            color=colour,
            label=name,
        )
        if model in PAPER_TEST_ERROR:
            left.axhline(
                PAPER_TEST_ERROR[model],
                color=colour,
                ls=":",
                lw=1,
                label=f"{name}, paper (160 epochs)",
            )
        if any(r.get("nfe_forward") for r in train):
            x = [r["epoch"] for r in train]
            right.plot(x, [r["nfe_forward"] for r in train], color=colour, label=f"{name} forward")
            right.plot(
                x,
                [r.get("nfe_backward") or 0 for r in train],
                color=colour,
                ls="--",
                label=f"{name} backward (adjoint)",
            )
    left.set(xlabel="epoch", ylabel="test error (%)", yscale="log", title="test error")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    right.set(xlabel="epoch", ylabel="function evaluations per batch", title="NFE of the ODE block")
    save_figure(fig, (left, right), path, title)


def main() -> None:
    args = parse(__doc__, "MNIST", title=True)
    print(table(args.runs))
    if args.figure:
        figure(args.figure, args.curves, args.title)


if __name__ == "__main__":
    main()
