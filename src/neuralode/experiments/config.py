"""Experiment configs: frozen dataclasses, filled from defaults, a TOML file and command-line flags.

An experiment declares its settings once, as a dataclass whose fields carry a help string::

    @dataclass(frozen=True)
    class MyConfig:
        lr: float = field(default=0.1, metadata={"help": "learning rate"})

:func:`add_config_arguments` turns every field into a ``--flag`` (``lr`` -> ``--lr``,
``batch_size`` -> ``--batch-size``; booleans get ``--flag/--no-flag``; tuples take several
values), and :func:`resolve_config` builds the config with this precedence (last wins):

1. the dataclass defaults;
2. a recipe shipped inside the package, ``--preset NAME`` (the TOML files
   ``neuralode/experiments/presets/EXPERIMENT-NAME.toml``, listed by :func:`presets`);
3. the ``[config]`` table (or the top level) of the TOML file given by ``--config FILE``;
4. flags given on the command line.

Unknown keys in a config file and values of the wrong type are errors that name the key, so a
typo never silently falls back to a default. The resolved config is written to the run folder as
``config.json`` and is what ``neuralode resume`` reads back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

__all__ = [
    "RunSettings",
    "add_config_arguments",
    "load_preset",
    "presets",
    "check_at_least",
    "check_positive",
    "config_from_dict",
    "flag_name",
    "load_config_file",
    "resolve_config",
    "run_field",
]

C = TypeVar("C")


#: Help of the settings every run has (:class:`RunSettings`).
_RUN_HELP: dict[str, dict[str, Any]] = {
    "out": {"help": "run folder", "metavar": "DIR"},
    "seed": {"help": "seed of the initial weights and of every random draw"},
    "device": {"help": "device", "choices": ("auto", "cpu", "cuda")},
    "threads": {"help": "torch CPU threads (default: torch's choice, one per core)"},
    "log_every": {"help": "steps between 'train' metric lines"},
    "checkpoint_every": {"help": "steps between extra checkpoints (0: only at evaluations)"},
    "quiet": {"help": "no progress bar; one line per evaluation"},
    "fault_step": {"help": "testing: SIGKILL the process after this step", "hidden": True},
}


def run_field(name: str, default: Any, help: str | None = None) -> Any:
    """A :class:`RunSettings` field redeclared with an experiment's own default (and help)."""
    metadata = dict(_RUN_HELP[name])
    if help is not None:
        metadata["help"] = help
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings every run has, whatever its experiment: where it writes, its seed, device
    and threads, how often it logs and checkpoints, and how much it prints. An experiment's
    config class extends it (redeclaring a field with :func:`run_field` to change its
    default); ``neuralode train NAME --help`` lists the experiment's own settings first."""

    out: str = run_field("out", "runs/run")
    seed: int = run_field("seed", 0)
    device: str = run_field("device", "auto")
    threads: int | None = run_field("threads", None)
    log_every: int = run_field("log_every", 50)
    checkpoint_every: int = run_field("checkpoint_every", 0)
    quiet: bool = run_field("quiet", False)
    fault_step: int | None = run_field("fault_step", None)

    def validate(self) -> None:
        """Check the run settings (experiments extend this and call it)."""
        check_at_least(self, 1, "log_every")
        check_at_least(self, 0, "checkpoint_every")
        if self.threads is not None:
            check_at_least(self, 1, "threads")


def flag_name(name: str) -> str:
    """The command-line flag of config field ``name`` (``batch_size`` -> ``--batch-size``)."""
    return "--" + name.replace("_", "-")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(type, optional)`` for ``X | None`` annotations; ``(tp, False)`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check/convert one value for field ``name`` of annotated type ``tp``."""
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key {name!r} must not be empty (None)")
    origin = typing.get_origin(base)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {name!r} expects a list, got {value!r}")
        (item,) = {a for a in typing.get_args(base) if a is not Ellipsis} or {Any}
        return tuple(_coerce(name, item, v) for v in value)
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {name!r} expects true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {name!r} expects an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {name!r} expects a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {name!r} expects a string, got {value!r}")
        return value
    return value


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, experiment: str | None = None
) -> None:
    """Add ``--config FILE``, ``--preset NAME`` (when ``experiment`` ships presets) and one flag
    per field of dataclass ``cls`` to ``parser``.

    Flags default to :data:`argparse.SUPPRESS`, so :func:`resolve_config` can tell a flag the
    user gave from one left at its default. A field's ``metadata`` may hold ``help``,
    ``choices``, ``metavar`` and ``hidden`` (testing-only settings, not shown in ``--help``).
    """
    shipped = sorted(presets(experiment)) if experiment else []
    if shipped:
        parser.add_argument(
            "--preset",
            choices=shipped,
            default=argparse.SUPPRESS,
            help="a recipe shipped with neuralode (docs/experiments says what each one is and how "
            "long it takes); --config and flags override its settings",
        )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML file with settings (flags given on the command line override it)",
    )
    hints = _field_types(cls)
    shared = {f.name for f in dataclasses.fields(RunSettings)}
    fields = dataclasses.fields(cls)
    ordered = [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]
    for f in ordered:
        flag = flag_name(f.name)
        base, optional = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None:
            help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if f.metadata.get("hidden"):  # testing-only settings
            kwargs["help"] = argparse.SUPPRESS
        metavar: str | None = f.metadata.get("metavar") or _METAVARS.get(
            typing.get_args(base)[0] if typing.get_origin(base) is tuple else base, "V"
        )
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            metavar = None  # argparse then shows {a,b,c}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is tuple:
            item = next(a for a in typing.get_args(base) if a is not Ellipsis)
            parser.add_argument(flag, nargs="*", type=item, metavar=metavar, **kwargs)
            continue
        convert = base if base in (int, float, str) else str
        if optional:
            parser.add_argument(
                flag_name(f.name), type=_optional(convert), metavar=metavar, **kwargs
            )
        else:
            parser.add_argument(flag, type=convert, metavar=metavar, **kwargs)


def _optional(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file: its ``[config]`` table if present, else its top level.

    Raises:
        FileNotFoundError: if the file does not exist (the message names it).
        ValueError: if the file is a folder or not valid TOML.
    """
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--config {str(file)!r} is a folder; give a TOML file")
    if not file.is_file():
        raise FileNotFoundError(f"config file {str(file)!r} does not exist")
    return _parse_toml(file.read_text(encoding="utf-8"), f"config file {str(file)!r}")


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where} is not valid TOML: {exc}") from None
    table = data.get("config", data)
    if not isinstance(table, dict):
        raise ValueError(f"{where}: [config] must be a table")
    return dict(table)


def presets(experiment: str) -> dict[str, Any]:
    """The recipes shipped for ``experiment``: preset name -> its TOML file (an
    :mod:`importlib.resources` traversable, so they are found in any installation)."""
    from importlib import resources

    folder = resources.files("neuralode.experiments") / "presets"
    prefix = f"{experiment}-"
    return {
        entry.name[len(prefix) : -len(".toml")]: entry
        for entry in folder.iterdir()
        if entry.name.startswith(prefix) and entry.name.endswith(".toml")
    }


def load_preset(experiment: str, name: str) -> dict[str, Any]:
    """The settings of preset ``name`` of ``experiment``.

    Raises:
        ValueError: if there is no such preset (the message lists the ones there are).
    """
    shipped = presets(experiment)
    if name not in shipped:
        known = ", ".join(sorted(shipped)) or "none"
        raise ValueError(f"--preset {name!r} is not a recipe of {experiment!r}; presets: {known}")
    return _parse_toml(shipped[name].read_text(encoding="utf-8"), f"preset {name!r}")


def check_at_least(config: Any, minimum: float, *names: str) -> None:
    """Raise ``ValueError("NAME must be at least MINIMUM; got V")`` for the first field of
    ``config`` in ``names`` below ``minimum`` (one setting per message, so the CLI can name its
    flag)."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}; got {value}")


def check_positive(config: Any, *names: str) -> None:
    """Raise ``ValueError("NAME must be positive; got V")`` for the first field of ``config`` in
    ``names`` that is not greater than 0 (NaN included)."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name} must be positive; got {value}")


def config_from_dict(cls: type[C], values: Mapping[str, Any], *, source: str = "config") -> C:
    """Build dataclass ``cls`` from defaults overridden by ``values`` (type-checked).

    Raises:
        ValueError: for a key that is not a field of ``cls`` (listing the known ones) or a
            value of the wrong type.
    """
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; known settings: "
            f"{', '.join(sorted(names))}"
        )
    checked = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        allowed = f.metadata.get("choices")
        if allowed is not None and f.name in checked and checked[f.name] not in allowed:
            raise ValueError(
                f"{f.name} must be one of {', '.join(map(str, allowed))}; got {checked[f.name]!r}"
            )
    config = cls(**checked)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def resolve_config(cls: type[C], args: argparse.Namespace, experiment: str | None = None) -> C:
    """The config of ``cls`` from defaults < ``args.preset`` (a recipe of ``experiment``) <
    ``args.config`` TOML file < flags in ``args``."""
    values: dict[str, Any] = {}
    sources = []
    preset = getattr(args, "preset", None)
    if preset:
        if experiment is None:
            raise ValueError("--preset needs the experiment it belongs to")
        values.update(load_preset(experiment, preset))
        sources.append(f"preset {preset!r}")
    config_file = getattr(args, "config", None)
    if config_file:
        values.update(load_config_file(config_file))
        sources.append(f"config file {config_file!r}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in names:
        if name in vars(args):
            values[name] = getattr(args, name)
    source = " or ".join([*sources, "command line"])
    return config_from_dict(cls, values, source=source)
