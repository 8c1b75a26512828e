"""Mutation testing of chosen functions in one process: mutmut's mutants, switched on one at a time.

``mutmut run`` starts a fresh process per mutant (import torch, collect the tests: seconds each)
after a statistics pass over the whole test selection; on this 2-core machine that set-up alone
took half an hour.  This script uses mutmut's own mutant generation (``mutants/``, the
``[tool.mutmut]`` settings of ``pyproject.toml``) and its trampolines, but runs the tests in one
pytest session:

1. each selected test runs once with no mutant, recording which mutated functions it reaches
   (mutmut's ``"stats"`` mode, without its call stack, a ContextVar that torch.compile cannot
   trace; what runs only inside a compiled trace is not recorded) and how long it takes (a
   test that fails here is left out, and named);
   and, with ``--lines`` (the default), which statements of the mutated functions it runs (a
   line trace of the mutated files only); the pass is kept in ``mutants/.clean/`` and read back
   by a later run of the same tests over the same code (``--no-cache`` runs it again);
2. for each mutant whose name matches ``--mutants``, the tests that run the changed statement
   (with ``--lines``; a test that never runs it cannot see the edit) or reach its function (with
   ``--no-lines``, or where the edit is outside the body, in a signature), and the tests that
   ran compiled code while reaching the function (what runs inside torch.compile's trace is
   seen by neither record), run until one fails (killed), one runs past ``--timeout-factor``
   times its clean time plus ``--timeout-extra`` seconds (timeout, counted as caught, as by
   mutmut), or all pass (survived).  The tests that killed an earlier mutant of the same
   function go first, then the rest fastest first;
3. each verdict goes into mutmut's ``mutants/**/*.meta`` files as soon as it is known, so
   ``mutmut results`` and ``tests/mutation_report.py`` read them as they read ``mutmut run``'s,
   and a run that is stopped keeps what it finished (``--unchecked`` runs only the mutants
   without a verdict: a long run goes on where it stopped).

Usage (from the repository root; ``make mutate-fast MUTANTS=... MUTANT_TESTS=...`` wraps it)::

    .venv/bin/python tests/mutation_fast.py --mutants 'neuralode.solvers.krylov.x_gmres*' \\
        -- tests/test_krylov.py -k "gmres_ or preconditioning"

The mutants see the state the tests leave behind in one process (a cache filled by an earlier
test), so a verdict here can differ from ``mutmut run``'s; a survivor is checked by hand
(``mutmut apply NAME`` in a scratch copy) before it is listed as equivalent.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import hashlib
import itertools
import json
import os
import re
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class _Timeout(BaseException):
    """Raised by the alarm: a BaseException, so that ``except Exception`` in code under test
    does not swallow it."""


def generate() -> None:
    """mutmut's mutant generation (as ``mutmut run`` does it, without its test runs)."""
    from mutmut.__main__ import create_mutants
    from mutmut.mutation.trampoline import set_mutant_under_test
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    create_mutants(2)
    set_mutant_under_test("")


def mutants_matching(patterns: list[str], unchecked: bool = False) -> dict[str, Path]:
    """Mutant name -> its ``.meta`` file, for the names matching any pattern (with
    ``unchecked``, only those without a verdict yet)."""
    out = {}
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if unchecked and code is not None:
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                out[name] = meta.resolve()
    return out


def _statement_lines(tree: ast.AST) -> dict[int, tuple[int, int]]:
    """Line -> the line range of the innermost statement holding it (a compound statement's
    header only: its body's lines belong to the body's statements)."""
    out: dict[int, tuple[int, int]] = {}

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                end = child.end_lineno or child.lineno
                inner = [
                    c.lineno
                    for f in ("body", "orelse", "finalbody", "handlers")
                    for c in getattr(child, f, []) or []
                    if isinstance(c, ast.AST)
                ]
                header_end = min(inner) - 1 if inner else end
                for line in range(child.lineno, max(header_end, child.lineno) + 1):
                    out[line] = (child.lineno, max(header_end, child.lineno))
            visit(child)

    visit(tree)
    return out


class ChangedStatements:
    """Which statements of its function's original copy (``..._mutmut_orig`` in ``mutants/``)
    a mutant changes, as ``(file, first line, last line)`` ranges; None where the edit is not
    inside the body (a signature, a decorator)."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[dict[str, ast.AST], dict[int, tuple[int, int]], list[str]]]
        self.files = {}

    def _parse(
        self, path: Path
    ) -> tuple[dict[str, ast.AST], dict[int, tuple[int, int]], list[str]]:
        if path not in self.files:
            text = path.read_text()
            tree = ast.parse(text)
            defs = {
                n.name: n
                for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            self.files[path] = (defs, _statement_lines(tree), text.splitlines())
        return self.files[path]

    def _pair(self, name: str, source: Path) -> tuple[Any, Any, str, str] | None:
        """The original's and the mutant's definitions and names (``None``: not found)."""
        defs = self._parse(source)[0]
        func = name.rpartition(".")[2]
        orig = re.sub(r"__mutmut_\d+$", "__mutmut_orig", func)
        if func not in defs or orig not in defs:
            return None
        return defs[orig], defs[func], orig, func

    def bodies(self, name: str, source: Path) -> tuple[list[str], list[str]] | None:
        """The original and the mutated function's source lines (``None``: not found)."""
        pair = self._pair(name, source)
        if pair is None:
            return None
        a, b, orig, func = pair
        lines = self._parse(source)[2]
        return (
            [x.replace(orig, "") for x in lines[a.lineno - 1 : a.end_lineno]],
            [x.replace(func, "") for x in lines[b.lineno - 1 : b.end_lineno]],
        )

    def __call__(self, name: str, source: Path) -> list[tuple[str, int, int]] | None:
        pair = self._pair(name, source)
        if pair is None:
            return None
        a, b, orig, func = pair
        _, statements, lines = self._parse(source)
        body_a, body_b = a.body[0].lineno, b.body[0].lineno
        if lines[a.lineno - 1 : body_a - 1] != [
            x.replace(func, orig) for x in lines[b.lineno - 1 : body_b - 1]
        ]:
            return None  # the signature changed
        old = lines[body_a - 1 : a.end_lineno]
        new = lines[body_b - 1 : b.end_lineno]
        changed: set[int] = set()
        for tag, i1, i2, _, _ in difflib.SequenceMatcher(
            None, old, new, autojunk=False
        ).get_opcodes():
            if tag == "equal":
                continue
            changed.update(range(body_a + i1, body_a + max(i2, i1 + 1)))
        if not changed:
            return None
        out = set()
        for line in changed:
            if line not in statements:
                return None
            out.add((str(source), *statements[line]))
        return sorted(out)


_DEVICE_ARG = re.compile(r"\s*,?\s*\bdevice\s*=\s*[\w.]+")


def device_only(old: list[str], new: list[str]) -> bool:
    """Whether a mutant's only change is a ``device=`` argument dropped or made ``None``: on a
    CPU-only machine every tensor is on the default device, so no test can see it (each such
    mutant in a statement every test runs cost minutes to confirm)."""
    changed = [
        (a, b)
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
            None, old, new, autojunk=False
        ).get_opcodes()
        if tag != "equal"
        for a, b in itertools.zip_longest(old[i1:i2], new[j1:j2], fillvalue="")
    ]
    if len(changed) != 1:
        return False
    a, b = changed[0]

    def bare(line: str) -> str:
        return re.sub(r",\s*\)", ")", _DEVICE_ARG.sub("", line)).replace(" ", "")

    return "device" in a and a != b and bare(a) == bare(b)


class _NoCallStack:
    """Stands in for mutmut's ``MutmutCallStack`` (a ContextVar) in the clean pass."""

    @staticmethod
    def get() -> tuple[None, int]:
        return None, 0

    @staticmethod
    def set(value: object) -> None:
        return None

    @staticmethod
    def reset(token: object) -> None:
        return None


class Runner:
    """A pytest plugin that takes over the test loop."""

    def __init__(
        self,
        names: dict[str, Path],
        factor: float,
        extra: float,
        lines: bool = True,
        keep: bool = True,
        cache: bool = True,
        skip_device: bool = False,
    ) -> None:
        self.names, self.factor, self.extra, self.lines = names, factor, extra, lines
        self.keep, self.cache, self.skip_device = keep, cache, skip_device
        self.verdicts: dict[str, int] = {}
        # the mutated files (a mutant's .meta file beside its .py)
        self.sources = {n: m.with_suffix("") for n, m in names.items()}

    def _clean_cache(self, items: list[Any]) -> Path:
        """Where the clean pass of these tests over these mutated files is kept: its name is a
        hash of the test ids, the mutated files, ``--lines`` and every file under ``mutants/``'s
        ``src`` and ``tests`` (a change of code or tests, or a regeneration, makes a new one)."""
        digest = hashlib.sha256()
        for nodeid in sorted(item.nodeid for item in items):
            digest.update(nodeid.encode() + b"\0")
        for source in sorted({str(p) for p in self.sources.values()}):
            digest.update(source.encode() + b"\0")
        digest.update(b"lines" if self.lines else b"nolines")
        here = Path.cwd()
        for top in ("src", "tests", "examples"):
            for path in sorted((here / top).rglob("*.py")):
                digest.update(str(path.relative_to(here)).encode() + b"\0" + path.read_bytes())
        return here / ".clean" / f"{digest.hexdigest()[:20]}.json"

    def record(self, name: str, code: int) -> None:
        """Keep one verdict, in its ``.meta`` file at once (written whole, then renamed): a run
        that is stopped keeps what it finished, and ``--unchecked`` goes on from there."""
        self.verdicts[name] = code
        if not self.keep:
            return
        meta = self.names[name]
        data = json.loads(meta.read_text())
        data["exit_code_by_key"][name] = code
        tmp = meta.with_suffix(".meta.tmp")
        tmp.write_text(json.dumps(data, indent=4))
        tmp.replace(meta)

    def _run(self, item: Any, limit: float | None) -> tuple[bool, float, bool]:
        """(passed, seconds, timed out) of one run of ``item``."""
        from _pytest.runner import runtestprotocol

        fired = False

        def alarm(signum: int, frame: Any) -> None:
            nonlocal fired
            fired = True
            raise _Timeout

        old = signal.signal(signal.SIGALRM, alarm)
        if limit is not None:
            signal.setitimer(signal.ITIMER_REAL, limit)
        start = time.perf_counter()
        timed_out = False
        try:
            reports = runtestprotocol(item, nextitem=None, log=False)
            passed = all(r.passed or r.skipped for r in reports)
        except _Timeout:
            passed, timed_out = False, True
        except Exception:
            # The alarm can land inside pytest's own code (formatting a failure's report: a
            # SystemError out of ast.parse ended a run that way); after it fired, whatever
            # it broke is the timeout.
            if not fired:
                raise
            passed, timed_out = False, True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        return passed, time.perf_counter() - start, timed_out

    def pytest_runtestloop(self, session: Any) -> bool:
        import mutmut.mutation.trampoline as trampoline
        import torch
        from mutmut.mutation.trampoline import set_mutant_under_test
        from mutmut.utils.format_utils import mangled_name_from_mutant_name

        hits: set[str] = set()

        def hit(name: str, caller: object = None) -> None:
            # (not while torch.compile traces: a while_loop's body may not change Python
            # state, and its trace would fail; such a test reaches what it runs eagerly)
            if not torch.compiler.is_compiling():
                hits.add(name)

        trampoline.record_trampoline_hit = hit  # type: ignore[assignment]
        # mutmut's trampolines keep their call stack in a ContextVar, which torch.compile
        # cannot trace: every test that compiles a solve (fullgraph) failed the clean pass and
        # was left out.  Which test reaches which function is all this runner needs.
        trampoline.MutmutCallStack = _NoCallStack  # type: ignore[assignment,misc]
        reached: dict[str, list[Any]] = defaultdict(list)
        clean: dict[Any, float] = {}
        # (file, line) -> the tests that ran it, in the mutated files' original copies
        ran: dict[tuple[str, int], set[Any]] = defaultdict(set)
        compiling: set[Any] = set()
        files = {str(p.resolve()) for p in self.sources.values()}
        lines_hit: set[tuple[str, int]] = set()

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                lines_hit.add((frame.f_code.co_filename, frame.f_lineno))
            return local

        import torch._dynamo.eval_frame as eval_frame
        from torch._dynamo.utils import counters

        # A call into torch.compile's compiled code passes through eval_frame.py (a graph
        # compiled by an earlier test and reused converts no new frame)
        compiled_entry = eval_frame.__file__
        entered: list[bool] = [False]

        def calls(frame: Any, event: str, arg: Any) -> Any:
            # (every frame of a mutated file: a function nested in a mutated one has its own)
            name = frame.f_code.co_filename
            if name == compiled_entry:
                entered[0] = True
            return local if name in files else None

        frames = counters["frames"]
        cache = self._clean_cache(session.items) if self.cache else None
        by_id = {item.nodeid: item for item in session.items}
        saved = json.loads(cache.read_text()) if cache is not None and cache.exists() else None
        t0 = time.perf_counter()
        if saved is not None:
            clean = {by_id[k]: v for k, v in saved["clean"].items()}
            compiling = {by_id[k] for k in saved["compiling"]}
            for name, ids in saved["reached"].items():
                reached[name] = [by_id[k] for k in ids]
            for nodeid, by_file in saved["lines"].items():
                for f, lines in by_file.items():
                    for line in lines:
                        ran[(f, line)].add(by_id[nodeid])
            print(f"clean pass read from {cache}", flush=True)
        else:
            lines_of: dict[str, dict[str, list[int]]] = {}
            set_mutant_under_test("stats")
            for item in session.items:
                hits.clear()
                lines_hit.clear()
                entered[0] = False
                before = sum(frames.values())
                if self.lines:
                    sys.settrace(calls)
                try:
                    passed, seconds, _ = self._run(item, None)
                finally:
                    sys.settrace(None)
                if not passed:
                    print(f"left out (fails without a mutant): {item.nodeid}", flush=True)
                    continue
                clean[item] = seconds
                if entered[0] or sum(frames.values()) != before:
                    compiling.add(item)
                for name in hits:
                    reached[name].append(item)
                by_file: dict[str, list[int]] = defaultdict(list)
                for key in lines_hit:
                    ran[key].add(item)
                    by_file[key[0]].append(key[1])
                lines_of[item.nodeid] = {f: sorted(v) for f, v in by_file.items()}
            if cache is not None:
                cache.parent.mkdir(exist_ok=True)
                data = {
                    "clean": {item.nodeid: s for item, s in clean.items()},
                    "compiling": [item.nodeid for item in compiling],
                    "reached": {n: [item.nodeid for item in v] for n, v in reached.items()},
                    "lines": lines_of,
                }
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(data))
                tmp.replace(cache)
        print(
            f"clean pass: {len(clean)} tests ({len(compiling)} ran compiled code), "
            f"{time.perf_counter() - t0:.0f} s; "
            f"{len(self.names)} mutants",
            flush=True,
        )
        # A failure's report is not read, and pytest builds it by parsing the failing frames'
        # files: mutmut's copy of _loop.py has 160,000 lines, 8 s per failure.
        from _pytest.nodes import Node

        Node._repr_failure_py = lambda self, excinfo, style=None: excinfo.exconly()[:500]  # type: ignore[method-assign,assignment,misc]
        changed = ChangedStatements()
        killers: dict[str, set[Any]] = defaultdict(set)  # function -> tests that killed
        t0 = time.perf_counter()
        for i, name in enumerate(sorted(self.names)):
            if self.skip_device:
                bodies = changed.bodies(name, self.sources[name])
                if bodies is not None and device_only(*bodies):
                    self.record(name, 34)
                    print(f"[{i + 1}/{len(self.names)}] skipped (device only) {name}", flush=True)
                    continue
            function = mangled_name_from_mutant_name(name)
            tests = reached.get(function, [])
            where = changed(name, self.sources[name]) if self.lines else None
            if where is not None:
                # a test that never ran the changed statement cannot see the edit; one that
                # compiled may have run it inside a trace, where neither record sees it
                seen = set().union(
                    *(ran.get((f, line), set()) for f, a, b in where for line in range(a, b + 1))
                )
                tests = [t for t in tests if t in seen or t in compiling]
            tests = sorted(tests, key=lambda t: (t not in killers[function], clean[t]))
            if not tests:
                self.record(name, 33)
                print(f"[{i + 1}/{len(self.names)}] no tests {name}", flush=True)
                continue
            set_mutant_under_test(name)
            verdict, by, tried = 0, "", 0
            start = time.perf_counter()
            for item in tests:
                limit = self.factor * clean[item] + self.extra
                passed, _, timed_out = self._run(item, limit)
                tried += 1
                if timed_out:
                    verdict = 36
                elif not passed:
                    verdict = 1
                    killers[function].add(item)
                if verdict:
                    by = f" by {item.nodeid}"
                    break
            set_mutant_under_test("")
            self.record(name, verdict)
            status = {0: "SURVIVED", 1: "killed", 36: "timeout"}[verdict]
            print(
                f"[{i + 1}/{len(self.names)} {time.perf_counter() - t0:.0f} s] {status} {name}"
                f" ({tried}/{len(tests)} tests, {time.perf_counter() - start:.1f} s){by}",
                flush=True,
            )
        return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", nargs="+", required=True, help="fnmatch patterns of names")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: files, -k ...")
    ap.add_argument("--timeout-factor", type=float, default=10.0)
    ap.add_argument("--timeout-extra", type=float, default=10.0)
    ap.add_argument("--fresh", action="store_true", help="delete mutants/ and generate anew")
    ap.add_argument(
        "--lines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run only the tests that ran the changed statement (default) or, with --no-lines,"
        " every test that reached the changed function",
    )
    ap.add_argument(
        "--skip-listed",
        action="store_true",
        help="leave out the mutants tests/mutation_survivors.md lists as equivalent (a device"
        " argument in a statement every test runs costs minutes to confirm)",
    )
    ap.add_argument(
        "--no-record",
        action="store_true",
        help="print the verdicts only (a check of new tests beside a run that records the same"
        " module's verdicts)",
    )
    ap.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the clean pass in mutants/.clean/ and read it back when the code, tests and"
        " selection are the same (the pass takes 10-17 minutes for a large selection)",
    )
    ap.add_argument(
        "--skip-device",
        action="store_true",
        help="record a mutant whose only change is a device= argument dropped or made None as"
        " skipped (mutmut's code 34) without running it: no test on a CPU-only machine sees"
        " it; tests/mutation_survivors.md must still list it (class device)",
    )
    ap.add_argument(
        "--unchecked",
        action="store_true",
        help="only mutants without a verdict (go on after a stop)",
    )
    args = ap.parse_args()
    tests = [a for a in args.pytest_args if a != "--"]
    if not tests:
        ap.error("give the tests after --, for example: -- tests/test_krylov.py -k gmres")
    os.chdir(ROOT)
    if args.fresh and Path("mutants").exists():
        import shutil

        shutil.rmtree("mutants")
    generate()
    names = mutants_matching(args.mutants, args.unchecked)
    if args.skip_listed:
        from mutation_report import listed

        known = listed()
        skipped = [n for n in names if n in known]
        names = {n: m for n, m in names.items() if n not in skipped}
        print(f"{len(skipped)} mutants listed as equivalent left out", flush=True)
    if not names:
        print(f"no mutant matches {args.mutants}")
        return 2
    # Import the mutated package, not the checkout's.
    os.chdir("mutants")
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "src"]
    sys.path.insert(0, str(Path("src").resolve()))
    sys.path.insert(0, str(Path("tests").resolve()))
    import pytest

    runner = Runner(
        names,
        args.timeout_factor,
        args.timeout_extra,
        args.lines,
        not args.no_record,
        args.cache,
        args.skip_device,
    )
    pytest.main(
        ["-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:xdist", *tests],
        plugins=[runner],
    )
    survived = sorted(n for n, c in runner.verdicts.items() if c == 0)
    print(f"{len(runner.verdicts)} mutants: {len(survived)} survived")
    for name in survived:
        print("  ", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
