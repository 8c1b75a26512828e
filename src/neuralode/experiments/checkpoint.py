"""Checkpoints that survive a crash and load safely.

- **Atomic**: :func:`save_checkpoint` serialises to memory, writes a temp file in the target
  folder, fsyncs it and renames it over the old checkpoint, so a process killed at any moment
  leaves either the previous checkpoint or the new one, never a torn file.
- **Safe**: :func:`load_checkpoint` uses ``torch.load(weights_only=True)``, which admits tensors
  and plain containers only; a checkpoint that would need arbitrary code to unpickle is refused.
  Everything we store (model, optimizer and scheduler state dicts, RNG states, counters) is made
  of tensors, numbers, strings, lists and dicts for that reason.
- **Complete**: :func:`capture_rng` / :func:`restore_rng` carry Python's, numpy's and torch's
  global generators (and CUDA's when present), so a resumed run draws the same random numbers as
  an uninterrupted one.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuralode.experiments.common import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

#: Bumped when the layout of the checkpoint dictionary changes incompatibly.
CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe or of another format."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain containers) atomically to ``path``."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        CheckpointError: if the file is missing, truncated or corrupt, needs globals that a
            weights-only load refuses (a pickle that could run code), or has another format.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {str(file)!r}")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln]
        if not refused:
            raise CheckpointError(
                f"checkpoint {str(file)!r} is corrupt or not a checkpoint (it does not unpickle "
                "as tensors and containers). Delete it to restart the run from scratch."
            ) from None
        raise CheckpointError(
            f"checkpoint {str(file)!r} was refused by the safe loader (weights_only=True): it "
            f"holds objects other than tensors and plain containers ({refused[0]}). neuralode "
            "never writes such files; do not load it with weights_only=False unless you trust "
            "its source."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {str(file)!r} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}). "
            "Delete it to restart the run from scratch."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {str(file)!r} is not a neuralode checkpoint of format "
            f"{CHECKPOINT_FORMAT} (found {found!r})"
        )
    return state


def capture_rng() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's global generators (weights-only loadable)."""
    version, internal, gauss = random.getstate()
    np_state: Any = np.random.get_state()  # noqa: NPY002 - the legacy global generator is saved
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    # torch.cuda.is_initialized has no annotations (torch 2.13).
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore generator states captured by :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
