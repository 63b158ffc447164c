"""Dataclass configs with presets, validation and command-line overrides.

A project's config.py subclasses BaseConfig:

    @dataclass
    class GPTConfig(BaseConfig):
        n_layer: int = 4
        dropout: float = 0.0
        PRESETS: ClassVar[dict] = {"cpu": {...}, "gpu": {...}}

        def check(self) -> list[str]:
            errors = super().check()
            self.check_positive(errors, "n_layer")
            return errors

Scripts then do `parser = argparse.ArgumentParser(...); GPTConfig.add_args(parser)` and
`cfg = GPTConfig.from_args(parser.parse_args())`, which gives `--preset cpu` and one flag per
field (`--n_layer=6`, `--compile` / `--compile=false` for booleans), all listed by `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, ClassVar

from course.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


def _base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, optional?) for annotations like int, float, str | None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


@dataclasses.dataclass
class BaseConfig:
    """Base for every project's hyperparameters. Subclasses add fields, PRESETS and check()."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    # ---- validation -------------------------------------------------------------------
    @classmethod
    def field_types(cls) -> dict[str, tuple[type, bool]]:
        hints = typing.get_type_hints(cls)
        return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}

    def check(self) -> list[str]:
        """Return one message per invalid field. Subclasses call super().check() and extend."""
        errors: list[str] = []
        for name, (tp, optional) in self.field_types().items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if tp is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif tp is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif tp in (bool, str):
                ok = isinstance(value, tp)
            else:
                ok = True
            if not ok:
                errors.append(f"{name} ({value!r}) must be of type {tp.__name__}")
        return errors

    def check_positive(self, errors: list[str], *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, (int, float)) and value <= 0:
                errors.append(f"{name} ({value}) must be > 0")

    def check_range(self, errors: list[str], name: str, lo: float, hi: float, hi_open: bool = False) -> None:
        value = getattr(self, name)
        if not isinstance(value, (int, float)):
            return
        if value < lo or value > hi or (hi_open and value == hi):
            bracket = ")" if hi_open else "]"
            errors.append(f"{name} ({value}) must be in [{lo}, {hi}{bracket}")

    def check_choice(self, errors: list[str], name: str, choices: typing.Iterable[str]) -> None:
        choices = tuple(choices)
        value = getattr(self, name)
        if value not in choices:
            errors.append(f"{name} ({value!r}) must be one of: {', '.join(map(str, choices))}")

    def validate_config(self) -> "BaseConfig":
        """Raise ConfigError naming every invalid field; return self when all is well."""
        errors = self.check()
        if errors:
            raise ConfigError("invalid config: " + "; ".join(errors))
        return self

    # ---- display and (de)serialisation ------------------------------------------------
    def print_config(self, title: str | None = None) -> None:
        print(self.format_config(title))

    def format_config(self, title: str | None = None) -> str:
        title = title or type(self).__name__
        defaults = type(self)()
        width = max(len(f.name) for f in dataclasses.fields(self))
        lines = [f"{title}:"]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            mark = "" if value == getattr(defaults, f.name) else "   *"
            lines.append(f"  {f.name:<{width}} = {value!r}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)

    # ---- presets and command line -----------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str | None = None, **overrides: Any) -> "BaseConfig":
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.PRESETS:
                raise ConfigError(f"unknown preset '{preset}'; choose from: {', '.join(cls.PRESETS) or '(none)'}")
            values.update(cls.PRESETS[preset])
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
        """Add --preset and one --<field> flag per config field to an argparse parser."""
        # No prefix abbreviations: with them `--lr=1000` would silently set --lr_decay_iters.
        parser.allow_abbrev = False
        group = parser.add_argument_group(f"{cls.__name__} (any field can be overridden, e.g. --field=value)")
        if cls.PRESETS:
            group.add_argument("--preset", choices=list(cls.PRESETS), default=default_preset,
                               help=f"start from a preset (default: {default_preset})")
        defaults = cls()
        for f in dataclasses.fields(cls):
            tp, optional = cls.field_types()[f.name]
            kwargs: dict[str, Any] = {"default": None, "dest": f"cfg__{f.name}",
                                      "help": f"default {getattr(defaults, f.name)!r}"}
            if tp is bool:
                kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
            elif tp in (int, float, str):
                kwargs.update(type=tp, metavar=tp.__name__.upper())
            group.add_argument(f"--{f.name}", **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BaseConfig":
        """Build the config from a parsed namespace: preset, then explicit flags, then validate."""
        overrides = {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}
        return cls.from_preset(getattr(args, "preset", None), **overrides).validate_config()
