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
field (`--n_layer=6`, `--compile` / `--compile=false` for booleans, `--block_size=none` for None where a field
may be None), all listed by `--help`.

Several configs from one command line (a model config and a training config, say):

    args, mcfg, tcfg = parse_configs(parser, LlamaConfig, TrainConfig, argv=argv, default_preset="cpu")

gives one `--preset` for all of them and one flag per field; a field two configs share is one flag
setting both, allowed only when they agree on its type, default and preset values.

Floats: nan and inf are refused in every float field (`lr (nan) must be a finite number`) unless
the field says otherwise with `field(default=..., metadata=ALLOW_NONFINITE)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, ClassVar

from course.errors import ConfigError

ALLOW_NONFINITE = {"allow_nonfinite": True}  # field metadata: this float may be nan or +-inf
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


class _NoneGiven:
    """What `--field=none` parses to for an optional field: "set it to None", told apart from "not given"."""

    def __repr__(self) -> str:
        return "None"


NONE_GIVEN = _NoneGiven()


def _optional(tp: type):
    """The argparse type of an `X | None` field: `none` (any case) means None, anything else parses as X."""
    def parse(text: str):
        return NONE_GIVEN if str(text).strip().lower() == "none" else tp(text)
    parse.__name__ = tp.__name__  # argparse's message stays "invalid int value: 'x'"
    return parse


def _base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, optional?) for annotations like int, float, str | None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


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
        allow_nonfinite = {f.name for f in dataclasses.fields(self) if f.metadata.get("allow_nonfinite")}
        for name, (tp, optional) in self.field_types().items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if tp is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok and _nonfinite(value) and name not in allow_nonfinite:
                    errors.append(f"{name} ({value}) must be a finite number")
                    continue
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
            if isinstance(value, (int, float)) and not _nonfinite(value) and value <= 0:
                errors.append(f"{name} ({value}) must be > 0")

    def check_range(self, errors: list[str], name: str, lo: float, hi: float, hi_open: bool = False) -> None:
        value = getattr(self, name)
        if not isinstance(value, (int, float)) or _nonfinite(value):  # nan/inf: check() reported it
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
        add_config_args(parser, cls, default_preset=default_preset)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BaseConfig":
        """Build the config from a parsed namespace: preset, then explicit flags, then validate."""
        return _build(cls, args).validate_config()


# ---- several configs from one command line -------------------------------------------------------------
def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set explicitly on the command line."""
    return {k[len("cfg__"):]: (None if v is NONE_GIVEN else v) for k, v in vars(args).items()
            if k.startswith("cfg__") and v is not None}


def _preset(args: argparse.Namespace) -> str | None:
    return getattr(args, "preset", None)


class _PresetAction(argparse.Action):
    """Store --preset and remember that it was given (a --resume must refuse an explicit one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.preset_given = True


def _build(cls: type[BaseConfig], args: argparse.Namespace) -> BaseConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    preset = _preset(args) if cls.PRESETS else None
    return cls.from_preset(preset, **{k: v for k, v in _given(args).items() if k in names})


def _check_shared_fields(classes: tuple[type[BaseConfig], ...]) -> None:
    """A field in two configs is one flag: refuse it unless both agree on type, default and preset values."""
    seen: dict[str, type[BaseConfig]] = {}
    presets = {p for c in classes for p in c.PRESETS}
    for cls in classes:
        for f in dataclasses.fields(cls):
            other = seen.setdefault(f.name, cls)
            if other is cls:
                continue
            a, b = other(), cls()
            same = (other.field_types()[f.name] == cls.field_types()[f.name]
                    and getattr(a, f.name) == getattr(b, f.name)
                    and all(other.PRESETS.get(p, {}).get(f.name, getattr(a, f.name))
                            == cls.PRESETS.get(p, {}).get(f.name, getattr(b, f.name)) for p in presets))
            if not same:
                raise ConfigError(f"field '{f.name}' is in both {other.__name__} and {cls.__name__} with different "
                                  "types, defaults or preset values; one --" + f.name + " flag cannot set both: "
                                  "rename one of them")


def add_config_args(parser: argparse.ArgumentParser, *config_classes: type[BaseConfig],
                    default_preset: str | None = None) -> None:
    """One --preset (if any config has presets) and one --<field> flag per distinct field of the configs."""
    _check_shared_fields(config_classes)
    # No prefix abbreviations: with them `--lr=1000` would silently set --lr_decay_iters.
    parser.allow_abbrev = False
    presets = list(dict.fromkeys(p for c in config_classes for p in c.PRESETS))
    if presets:
        parser.add_argument("--preset", choices=presets, default=default_preset, action=_PresetAction,
                            help=f"start every config from a preset (default: {default_preset})")
        parser.set_defaults(preset_given=False)
    added: set[str] = set()
    for cls in config_classes:
        group = parser.add_argument_group(f"{cls.__name__} (any field can be overridden, e.g. --field=value)")
        defaults = cls()
        types_ = cls.field_types()
        for f in dataclasses.fields(cls):
            if f.name in added:
                continue
            added.add(f.name)
            tp, optional = types_[f.name]
            kwargs: dict[str, Any] = {"default": None, "dest": f"cfg__{f.name}",
                                      "help": f"default {getattr(defaults, f.name)!r}"}
            if tp is bool:
                kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
            elif tp in (int, float, str):
                kwargs.update(type=_optional(tp) if optional else tp, metavar=tp.__name__.upper())
                if optional:
                    kwargs["help"] += " (none: None)"
            group.add_argument(f"--{f.name}", **kwargs)


def configs_from_args(args: argparse.Namespace, *config_classes: type[BaseConfig]) -> tuple[BaseConfig, ...]:
    """Build and validate every config; the invalid fields of all of them are reported in one line."""
    configs, errors = [], []
    for cls in config_classes:
        cfg = _build(cls, args)
        errors += cfg.check()
        configs.append(cfg)
    if errors:
        raise ConfigError("invalid config: " + "; ".join(dict.fromkeys(errors)))
    return tuple(configs)


def parse_configs(parser: argparse.ArgumentParser, *config_classes: type[BaseConfig],
                  argv: list[str] | None = None, default_preset: str | None = None) -> tuple:
    """Add the configs' flags to `parser`, parse `argv`, return `(args, cfg1, cfg2, ...)`, validated.

    On `args` also: `preset` (the preset used, default_preset when none was given), `preset_given`
    (whether --preset was on the command line) and `overrides` (the fields set explicitly), which a
    `--resume` needs to tell which flags change the saved run.
    """
    add_config_args(parser, *config_classes, default_preset=default_preset)
    args = parser.parse_args(argv)
    args.preset_given = getattr(args, "preset_given", False)
    args.preset = _preset(args)
    args.overrides = _given(args)
    return (args, *configs_from_args(args, *config_classes))
