"""Typed recipe configs: dataclasses, a strict YAML loader, ``dotted.key=value`` overrides.

A recipe declares its config as a (nested) dataclass; this module turns YAML + command-line overrides
into an instance of it and refuses anything it cannot check:

- an unknown key fails with its dotted path and the closest valid key (``difflib``), so a typo never
  silently falls back to a default;
- a value of the wrong type fails with the key, the expected type and the value;
- a required field (no default) that is missing fails with its dotted path.

Supported field types: ``bool``, ``int``, ``float`` (ints are accepted and widened; so are strings such
as ``"1e-3"``, because YAML 1.1 reads ``1e-3`` without a dot as a string), ``str``, ``Optional[X]`` /
``X | None``, ``Literal[...]``, ``tuple[X, ...]``, ``tuple[X, Y]``, ``list[X]``, ``dict[str, X]``,
``Any`` and nested dataclasses. The module is generic: it takes any dataclass type.

Usage::

    cfg = load_config(MyConfig, "configs/recipes/x.yaml", ["optimizer.lr=3e-4", "train.epochs=2"])
    cfg = parse_args(MyConfig)            # --config PATH [dotted.key=value ...] from sys.argv
    save_config(cfg, "outputs/x/config.yaml")
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from shardwise.errors import ConfigError, did_you_mean

__all__ = [
    "ConfigError",
    "apply_overrides",
    "from_dict",
    "load_config",
    "parse_args",
    "save_config",
    "to_dict",
]

T = TypeVar("T")

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------
# type checking / conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _fail_type(path: str, tp: Any, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (tuples, dataclasses)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            _fail_type(path, tp, value)
        return from_dict(tp, value, _path=path)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            _fail_type(path, tp, value)
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(arm, value, path)
            except ConfigError as e:
                errors.append(e)
        # a single non-None arm: its own message is the most precise
        if len(errors) == 1:
            raise errors[0]
        _fail_type(path, tp, value)
    if origin is Literal:
        # bool is an int subclass: `True` must not match Literal[1]
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}{hint}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail_type(path, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {_type_name(tp)} ({len(args)} items), got {value!r}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in pairs)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            _fail_type(path, tp, value)
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, f"{path}.<key>"): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            _fail_type(path, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail_type(path, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool):
            _fail_type(path, tp, value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        _fail_type(path, tp, value)
    if tp is str:
        if not isinstance(value, str):
            _fail_type(path, tp, value)
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            _fail_type(path, tp, value)
        return Path(value)
    raise ConfigError(f"{path}: unsupported annotation {tp!r} in the config dataclass (a bug in the recipe)")


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def _unknown_key(cls: type, key: str, path: str) -> ConfigError:
    valid = list(_fields(cls))
    hint = did_you_mean(key, valid, cutoff=0.5)
    return ConfigError(
        f"unknown config key {path or key!r} in {cls.__name__}{hint} (valid keys: {', '.join(valid)})"
    )


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, _path: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, strictly (see the module docstring)."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_path or '<root>'}: expected a mapping ({cls.__name__}), got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{_path}.{key}" if _path else str(key)
        if key not in fields:
            raise _unknown_key(cls, key, path)
        kwargs[key] = _convert(fields[key][1], value, path)
    for name, (f, _) in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in kwargs and required:
            path = f"{_path}.{name}" if _path else name
            raise ConfigError(f"missing required config key {path!r} ({cls.__name__})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise ConfigError(f"{_path or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data (tuples become lists) for a config dataclass instance."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------
# overrides, files, command line


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], cls: type | None = None
) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings to a raw config mapping (in place, also returned).

    Values are parsed with ``yaml.safe_load`` (``lr=3e-4`` -> float via the loader, ``betas=[0.9,0.95]``
    -> list, ``x=null`` -> None). When ``cls`` is given, each dotted path is checked against it first so
    that a misspelled override fails before anything else runs.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        if cls is not None:
            _check_path(cls, parts)
        node = data
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                # a key inside a mapping-valued field (data.data_files.train=...) keeps the field's
                # other default keys (the default test file) instead of replacing the whole mapping;
                # likewise a section the file does not set starts from its default values
                default = _default_mapping(cls, parts[: i + 1]) if cls is not None else None
                child = node[p] = dict(default or {})
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _default_mapping(cls: type, parts: list[str]) -> dict | None:
    """The default value at the dotted path ``parts`` of ``cls`` as a mapping when it is a mapping or
    a section, else None (a parent's ``default_factory`` wins over the child class's own defaults:
    ``model.config_overrides.x=1`` without a ``model`` section keeps the recipe's default model)."""
    tp: Any = cls
    obj: Any = dataclasses.MISSING
    for p in parts:
        if obj is not dataclasses.MISSING and dataclasses.is_dataclass(obj) and hasattr(obj, p):
            obj = getattr(obj, p)
        else:
            if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)) or p not in _fields(tp):
                return None
            f = _fields(tp)[p][0]
            obj = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if obj is dataclasses.MISSING or obj is None:
            return None
        tp = type(obj)
    return to_dict(obj) if isinstance(obj, dict) or dataclasses.is_dataclass(obj) else None


def _check_path(cls: type, parts: list[str]) -> None:
    tp: Any = cls
    for i, p in enumerate(parts):
        path = ".".join(parts[: i + 1])
        # look through Optional[Section] / Optional[dict[...]]
        if typing.get_origin(tp) in (Union, types.UnionType):
            arms = [a for a in typing.get_args(tp) if a is not type(None)]
            sections = [a for a in arms if dataclasses.is_dataclass(a)]
            tp = sections[0] if len(sections) == 1 else arms[0] if len(arms) == 1 else tp
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            fields = _fields(tp)
            if p not in fields:
                raise _unknown_key(tp, p, path)
            tp = fields[p][1]
        elif typing.get_origin(tp) in (dict, Mapping) or tp in (dict, Any):
            return  # free-form mapping: keys are not declared
        else:
            raise ConfigError(f"override {'.'.join(parts)!r}: {'.'.join(parts[:i])} is not a section")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML at ``path`` (or start from defaults when None), apply overrides, validate into ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, overrides, cls)
    where = f"{path}: " if path is not None else ""
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}", hint=e.hint) from None
    except RecursionError:  # a self-referencing YAML alias (&a [*a])
        raise ConfigError(f"{where}the config nests too deeply (a recursive YAML alias?)") from None


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config (every field, defaults included) as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))
    return path


def parse_args(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """``--config PATH [dotted.key=value ...]`` -> a validated ``cls``; exits with the error on bad input."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides: dotted.key=value, values parsed as YAML (e.g. optimizer.lr=3e-4 train.epochs=2).",
    )
    parser.add_argument("--config", type=Path, default=None, help="recipe YAML (see configs/recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        hint = e.hint or f"see {parser.prog} --help and the configs in configs/recipes/"
        parser.exit(2, f"error: {e}\nhint: {hint}\n")
