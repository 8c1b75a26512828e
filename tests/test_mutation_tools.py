"""The mutation runner's test selection (`tests/mutation_fast.py`): which statements a mutant
changes.  A test that never runs the changed statement is not run against the mutant, so a
range that misses the edit would turn a caught mutant into a survivor."""

from __future__ import annotations

from pathlib import Path

from mutation_fast import ChangedStatements, device_only

# A function as mutmut writes it into mutants/: the original copy, then one copy per edit.
ORIG = """\
def x_f__mutmut_orig(a, k=2):
    if a > 0:
        b = (a +
             1)
    else:
        b = helper(
            "one "
            "two",
        )
    def inner(c):
        return c * k
    return inner(b)
"""


def _mutants(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """A mutants file: the original, then mutant i applying edits[i - 1] to its text."""
    parts = [ORIG]
    for i, (old, new) in enumerate(edits, 1):
        assert old in ORIG
        parts.append(ORIG.replace("__mutmut_orig", f"__mutmut_{i}").replace(old, new))
    path = tmp_path / "mod.py"
    path.write_text("\n".join(parts))
    return path


def test_a_mutant_maps_to_the_statement_it_changes(tmp_path: Path) -> None:
    path = _mutants(
        tmp_path,
        ("1)", "2)"),  # the continuation line of an assignment: the whole statement
        ("a > 0", "a >= 0"),  # the if's header, not its body
        ('"two"', '"XXtwoXX"'),  # a string's second line: the call's whole statement
        ("c * k", "c / k"),  # inside a nested function
        ("k=2", "k=3"),  # the signature: no statement of the body
        ("    return inner(b)", "    return None"),
    )
    changed = ChangedStatements()
    where = {i: changed(f"pkg.mod.x_f__mutmut_{i}", path) for i in range(1, 7)}
    f = str(path)
    assert where[1] == [(f, 3, 4)]
    assert where[2] == [(f, 2, 2)]
    assert where[3] == [(f, 6, 9)]
    assert where[4] == [(f, 11, 11)]
    assert where[5] is None
    assert where[6] == [(f, 12, 12)]


def test_an_unknown_function_maps_to_none(tmp_path: Path) -> None:
    path = _mutants(tmp_path, ("1)", "2)"))
    assert ChangedStatements()("pkg.mod.x_g__mutmut_1", path) is None


def test_device_only_edits_are_told_apart() -> None:
    """``--skip-device`` leaves out a mutant that only drops a ``device=`` argument or makes it
    ``None`` (invisible on a CPU-only machine), and nothing else."""
    line = "    x = torch.zeros(n, dtype=torch.bool, device=y.device)"
    assert device_only([line], [line.replace("device=y.device", "device=None")])
    assert device_only([line], [line.replace("device=y.device", "")])
    assert device_only([line], [line.replace(", device=y.device", "")])
    first = "    eye = torch.eye(N, device=y.device, dtype=y.dtype)"
    assert device_only([first], [first.replace("device=y.device, ", "")])
    assert not device_only([line], [line.replace("torch.bool", "None")])
    assert not device_only(
        [line], [line.replace("device=y.device", "device=None").replace("n", "m")]
    )
    assert not device_only(
        [line, "    return x"], [line.replace("y.device", "None"), "    return None"]
    )
    assert not device_only(["    x = 1"], ["    x = 2"])
    assert not device_only([line], [line])
