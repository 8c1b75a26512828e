"""Brief, seeded runs of the four ported torchdiffeq examples, and torchdiffeq's recorded losses.

``run(name, backend)`` runs one example briefly in a subprocess, seeded (``random``, ``numpy`` and
``torch`` seeded with :data:`SEED` before the script starts, one torch thread) and returns the
iterations and losses it printed.  With ``backend="neuralode"`` the ported script runs as it is;
with ``backend="torchdiffeq"`` the same script runs with its ``from neuralode import odeint...``
lines turned back into ``from torchdiffeq import odeint...``, so the two runs differ by the ODE
solver only (data, initialisation, augmentation and optimiser draw the same random numbers).

Run this file once where torchdiffeq 0.2.5 is importable (it is not a dependency; e.g.
``pip install --no-deps --target /tmp/tdq torchdiffeq==0.2.5`` and ``PYTHONPATH=/tmp/tdq``)::

    .venv/bin/python examples/torchdiffeq/record_reference.py [--only ode_demo ...]

It writes torchdiffeq's losses, and for the record neuralode's and those of torchdiffeq itself at
half its tolerances (a calibration: how far other, equally valid steps move the losses), to
``tests/data/torchdiffeq_examples.json``; ``tests/test_examples.py`` (slow) runs
the neuralode side again and compares it with the JSON, so CI needs no torchdiffeq.

``odenet_mnist.py`` prints only at epoch boundaries (after a full-data accuracy pass that takes
many CPU-minutes), so it is not run as a script: :func:`_odenet_driver` imports its functions
(``ODEBlock``, ``ODEfunc``, ``get_mnist_loaders``, ...) and repeats its ``__main__`` training
step (same model, loss, SGD, learning-rate schedule) for ``--niters`` iterations, printing
each iteration's loss and NFE.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "tests" / "data" / "torchdiffeq_examples.json"
SEED = 0
UPSTREAM_COMMIT = "657943a"  # rtqichen/torchdiffeq, whose examples/ the ports copy

# Each example's brief configuration: its own argparse flags, and the pattern of its loss line.
RUNS: dict[str, dict[str, Any]] = {
    # Loss of the whole trajectory (t in [0, 25]) every --test_freq iterations.
    "ode_demo": {
        "args": ["--niters", "100", "--test_freq", "5"],
        "pattern": r"Iter (\d+) \| Total Loss ([-\d.]+)",
    },
    # Running average of the ELBO (momentum 0.99) each iteration; sign -1: the loss is -ELBO.
    "latent_ode": {
        "args": ["--niters", "50"],
        "pattern": r"Iter: (\d+), running avg elbo: ([-\d.]+)",
        "sign": -1,
    },
    # Running average of the negative log-likelihood (momentum 0.99) each iteration.
    "cnf": {
        "args": ["--niters", "20"],
        "pattern": r"Iter: (\d+), running avg loss: ([-\d.]+)",
    },
    # Cross-entropy of each training batch (driver below; the script's flags and --niters).
    "odenet_mnist": {
        "args": ["--network", "odenet", "--batch_size", "32", "--niters", "60"],
        "pattern": r"Iter (\d+) \| Loss ([-\d.]+)",
        "driver": "odenet",
    },
}


def _odenet_driver(g: dict[str, Any], niters: int) -> None:
    """``odenet_mnist.py``'s ``__main__`` training loop (``--downsampling-method conv``), for
    ``niters`` iterations, with ``g`` the script's namespace; prints loss and NFE each one."""
    nn, torch, args, norm = g["nn"], g["torch"], g["args"], g["norm"]
    downsampling_layers = [
        nn.Conv2d(1, 64, 3, 1),
        norm(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 4, 2, 1),
        norm(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 4, 2, 1),
    ]
    feature_layers = [g["ODEBlock"](g["ODEfunc"](64))]
    fc_layers = [
        norm(64),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d((1, 1)),
        g["Flatten"](),
        nn.Linear(64, 10),
    ]
    model = nn.Sequential(*downsampling_layers, *feature_layers, *fc_layers)
    criterion = nn.CrossEntropyLoss()
    train_loader, _, _ = g["get_mnist_loaders"](
        args.data_aug, args.batch_size, args.test_batch_size
    )
    data_gen = g["inf_generator"](train_loader)
    lr_fn = g["learning_rate_with_decay"](
        args.batch_size,
        batch_denom=128,
        batches_per_epoch=len(train_loader),
        boundary_epochs=[60, 100, 140],
        decay_rates=[1, 0.1, 0.01, 0.001],
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    for itr in range(niters):
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_fn(itr)
        optimizer.zero_grad()
        x, y = next(data_gen)
        loss = criterion(model(x), y)
        nfe_forward = feature_layers[0].nfe
        feature_layers[0].nfe = 0
        loss.backward()
        optimizer.step()
        nfe_backward = feature_layers[0].nfe
        feature_layers[0].nfe = 0
        print(
            f"Iter {itr:04d} | Loss {loss.item():.6f} | NFE-F {nfe_forward} | NFE-B {nfe_backward}",
            flush=True,
        )


def _halve_torchdiffeq_tolerances() -> None:
    """Make ``torchdiffeq.odeint``/``odeint_adjoint`` solve with half the rtol and atol they are
    given (torchdiffeq's defaults 1e-7 and 1e-9 when not given): the same solver taking other,
    equally valid steps.  How far its losses move measures how much training amplifies a change
    of steps, the kind of difference our dopri5 makes (a calibration; the test does not use it).
    """
    import torchdiffeq

    def halved(solve):
        def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, **kwargs):
            return solve(func, y0, t, rtol=rtol / 2, atol=atol / 2, **kwargs)

        return odeint

    torchdiffeq.odeint = halved(torchdiffeq.odeint)
    torchdiffeq.odeint_adjoint = halved(torchdiffeq.odeint_adjoint)


def _child(backend: str, name: str, argv: list[str]) -> None:
    """Run example ``name`` in this process, seeded, with ``backend``'s odeint."""
    import random

    import numpy as np
    import torch

    torch.set_num_threads(1)
    random.seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002  (the examples draw from the legacy global RNG)
    torch.manual_seed(SEED)
    script = HERE / f"{name}.py"
    source = script.read_text()
    if backend in ("torchdiffeq", "torchdiffeq-halftol"):
        ported = source
        source = source.replace("from neuralode import odeint", "from torchdiffeq import odeint")
        assert source != ported, "no odeint import to turn back"
        if backend == "torchdiffeq-halftol":
            _halve_torchdiffeq_tolerances()
    elif backend != "neuralode":
        raise ValueError(
            f"backend must be neuralode, torchdiffeq or torchdiffeq-halftol, got {backend!r}"
        )
    driver = RUNS[name].get("driver")
    niters = None
    if driver == "odenet":  # --niters is the driver's, the rest are the script's own flags
        i = argv.index("--niters")
        niters = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    sys.argv = [str(script), *argv]
    namespace = {"__name__": "__main__" if driver is None else "example", "__file__": str(script)}
    exec(compile(source, str(script), "exec"), namespace)
    if driver == "odenet":
        _odenet_driver(namespace, niters)


def run(name: str, backend: str = "neuralode", timeout: float = 600) -> dict[str, Any]:
    """Run example ``name`` briefly (:data:`RUNS`) in a subprocess; its iterations and losses.

    The subprocess runs in a temporary folder (the examples write figures and logs to their
    working directory).  Raises ``RuntimeError`` with the output when it fails.
    """
    cfg = RUNS[name]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="agg")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        backend,
        name,
        "--",
        *cfg["args"],
    ]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"{name} ({backend}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    found = re.findall(cfg["pattern"], proc.stdout)
    if not found:
        raise RuntimeError(f"{name} ({backend}) printed no loss:\n{proc.stdout[-3000:]}")
    return {
        "iters": [int(i) for i, _ in found],
        "losses": [cfg.get("sign", 1) * float(v) for _, v in found],
        "nfe": [
            [int(f), int(b)] for f, b in re.findall(r"NFE-F (\d+) \| NFE-B (\d+)", proc.stdout)
        ],
        "seconds": round(seconds, 1),
    }


def max_rel_diff(a: list[float], b: list[float]) -> float:
    """The largest ``|a_i - b_i| / |b_i|``."""
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--out", type=Path, default=DATA)
    opts = parser.parse_args()

    import torchdiffeq  # noqa: F401  (fail early where it is missing)

    record: dict[str, Any] = {"runs": {}}
    if opts.out.exists():
        record = json.loads(opts.out.read_text())
    record.update(
        {
            "about": "torchdiffeq's losses on brief seeded runs of its examples "
            "(examples/torchdiffeq/record_reference.py writes this)",
            "torchdiffeq_version": torchdiffeq.__version__,
            "upstream_commit": UPSTREAM_COMMIT,
            "seed": SEED,
        }
    )
    import torch

    record["torch_version"] = torch.__version__
    for name in opts.only:
        ref = run(name, "torchdiffeq")
        ours = run(name, "neuralode")
        if ref["iters"] != ours["iters"]:
            raise RuntimeError(f"{name}: iterations differ: {ref['iters']} vs {ours['iters']}")
        diff = max_rel_diff(ours["losses"], ref["losses"])
        half = run(name, "torchdiffeq-halftol")
        half_diff = max_rel_diff(half["losses"], ref["losses"])
        record["runs"][name] = {
            "args": RUNS[name]["args"],
            "iters": ref["iters"],
            "torchdiffeq_losses": ref["losses"],
            "torchdiffeq_nfe": ref["nfe"],
            "torchdiffeq_seconds": ref["seconds"],
            "neuralode_losses_when_recorded": ours["losses"],
            "neuralode_nfe_when_recorded": ours["nfe"],
            "neuralode_seconds_when_recorded": ours["seconds"],
            "max_rel_diff_when_recorded": diff,
            "torchdiffeq_halftol_losses": half["losses"],
            "torchdiffeq_halftol_max_rel_diff": half_diff,
        }
        print(
            f"{name}: torchdiffeq {ref['losses']} ({ref['seconds']} s)\n"
            f"{' ' * len(name)}  neuralode   {ours['losses']} ({ours['seconds']} s)\n"
            f"{' ' * len(name)}  torchdiffeq at half tol {half['losses']}\n"
            f"{' ' * len(name)}  max relative difference {diff:.3g} (neuralode), "
            f"{half_diff:.3g} (torchdiffeq at half the tolerances)",
            flush=True,
        )
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _backend, _name, _sep, *_argv = sys.argv[2:]
        _child(_backend, _name, _argv)
    else:
        main()
