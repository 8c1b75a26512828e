"""The survivors report of `make mutate`: mutmut's survivors against the reviewed list.

Every mutant that survives the solver-core tests must be listed in ``mutation_survivors.md``
(beside this file) with the reason it is equivalent (it cannot change any observable result).
This script reads mutmut's results, prints the counts, the survivors that are not listed (each
with its diff), and listed mutants that are now killed (those not run since their function
changed are only counted), and exits 1 if any survivor is unlisted.

Run it after ``mutmut run`` from the repository root (``make mutate`` does both):

    .venv/bin/python tests/mutation_report.py [--out runs/mutation/report.md]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
LISTED = HERE / "mutation_survivors.md"
# A "timeout" counts as caught, as in mutmut's own score: the mutant made the tests run past
# a multiple of their normal CPU time (for example a NaN error ratio that rejects every step
# forever), which a CI run would fail on.
# "skipped": tests/mutation_fast.py --skip-device did not run it (a device= argument only,
# which no test on a CPU-only machine sees); it must be listed as a survivor is.
NOT_KILLED = ("survived", "no tests", "suspicious", "segfault", "skipped")


def mutmut(*args: str) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(exe), *args], capture_output=True, text=True, check=True)
    return out.stdout


def results() -> dict[str, str]:
    """mutant name -> status, for every mutant mutmut generated."""
    status = {}
    for line in mutmut("results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+): (.+?)\s*$", line)
        if m:
            status[m.group(1)] = m.group(2)
    return status


def listed() -> dict[str, str]:
    """Mutant name -> the reason given in the reviewed list (lines ``- `name`: reason``)."""
    out = {}
    for line in LISTED.read_text().splitlines():
        m = re.match(r"- `([^`]+)`:?\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    status = results()
    counts = Counter(status.values())
    survivors = sorted(n for n, s in status.items() if s in NOT_KILLED)
    reviewed = listed()
    unlisted = [n for n in survivors if n not in reviewed]
    # A listed mutant is stale only where this run checked it and the tests caught it; one
    # mutmut has not run since its function changed ("not checked") keeps its place.
    stale = sorted(n for n in reviewed if status.get(n) in ("killed", "timeout"))
    unchecked = sorted(
        n for n in reviewed if status.get(n) not in (*NOT_KILLED, "killed", "timeout")
    )
    lines = [
        f"mutants: {len(status)}; " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        f"survivors: {len(survivors)}, listed as equivalent: {len(survivors) - len(unlisted)}, "
        f"unlisted: {len(unlisted)}",
    ]
    if stale:
        lines.append(f"listed but now killed (remove from the list): {', '.join(stale)}")
    if unchecked:
        lines.append(f"listed, not checked by the last runs: {len(unchecked)}")
    for name in unlisted:
        lines += ["", f"## {name} ({status[name]})", "```diff", mutmut("show", name), "```"]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if unlisted else 0


if __name__ == "__main__":
    sys.exit(main())
