"""Helpers for tests that run the ``neuralode`` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from neuralode.experiments import engine


def env() -> dict[str, str]:
    """The environment of a child run: one torch thread (tests share 2 cores), unbuffered."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def neuralode(
    *args: str, check: bool = True, timeout: float = 600, without: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m neuralode ARGS``; with ``check``, fail the test showing its output.

    ``without`` names modules the child must see as not installed (a ``sitecustomize`` on its
    path sets them to ``None`` in ``sys.modules``: importing them raises ModuleNotFoundError
    and ``importlib.util.find_spec`` returns None, as for a package that is absent).
    """
    child_env = env()
    if without:
        shim = Path(tempfile.mkdtemp(prefix="without-"))
        (shim / "sitecustomize.py").write_text(
            "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in without)
        )
        child_env["PYTHONPATH"] = os.pathsep.join(
            [str(shim), *filter(None, [child_env.get("PYTHONPATH")])]
        )
    proc = subprocess.run(
        [sys.executable, "-m", "neuralode", *args],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"neuralode {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def records(run: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl without wall-clock fields (they differ between any two runs)."""
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in engine.read_metrics(run)]


def table_script(name: str) -> Any:
    """``benchmarks/NAME.py`` imported as a module (the experiments' table scripts are not in
    the package; their tests call ``table`` and ``figure`` directly)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
