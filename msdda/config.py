"""Configs are dataclasses, loaded from YAML and overridden from the command line as ``key.sub=value``.

Loading is strict: an unknown key, a value of the wrong type or a malformed override is one clear error that
names the key and the expected type, before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from msdda.errors import UserError

__all__ = ["load_config", "config_from_dict", "config_to_dict", "apply_overrides", "ConfigError"]

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not fit the config's dataclass."""


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check (and where lossless, convert) ``value`` against a dataclass field's annotation."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if origin is typing.Literal:
        if value is False and "no" in typing.get_args(annotation):  # YAML 1.1 reads a bare no as false
            return "no"
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(annotation))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {annotation.__name__} fields, got {value!r}")
        return config_from_dict(annotation, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        items = [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def config_from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; {cls.__name__} has {sorted(names)}")
    values = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (for YAML, JSON and adapter metadata)."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in order."""
    for override in overrides:
        key, separator, raw = override.partition("=")
        if not separator or not key:
            raise ConfigError(f"override {override!r} must look like key.sub=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: the value is not valid YAML ({_yaml_problem(error)}); fix it "
                              f"({YAML_FIX}), or quote the whole value to pass it as a string") from error
    return data


YAML_FIX = "close a [ or {, quote a value holding ': ', indent with spaces"


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Why the parser stopped, with where the construct it was inside began (an unclosed [ is found lines later)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context, opened = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and opened is not None:
        return f"{context} from line {opened.line + 1}, column {opened.column + 1}: {problem}"
    return f"{context}: {problem}" if context else problem


def _yaml_error(path: Path, error: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the file, the line and column (1-based) where the parser stopped, and why."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    return f"{where}: not valid YAML ({_yaml_problem(error)}); fix the syntax there ({YAML_FIX})"


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass ``cls`` from a YAML file (optional) with dotted overrides applied on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(_yaml_error(path, error)) from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    return config_from_dict(cls, apply_overrides(data, list(overrides or [])))
