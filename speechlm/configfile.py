"""YAML recipes -> typed dataclasses, with ``key.sub=value`` overrides from the command line.

Unknown keys and bad values are reported all at once, each naming the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from speechlm.speech_io.config_errors import ConfigError

T = TypeVar("T")


class ConfigFileError(ConfigError):
    """A recipe file or override is malformed (one problem, one line naming the file or the override), or
    the settings it holds are invalid (every bad key at once)."""

    def __init__(self, problems: str | list[str]):
        if isinstance(problems, str):
            ValueError.__init__(self, problems)
            self.problems = [problems]
        else:
            super().__init__("config", problems)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigFileError(f"{path}: not UTF-8 text (byte {error.start + 1})") from error
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["model.mode=lora", "seed=3"]`` -> nested updates; values are parsed as YAML scalars/lists."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigFileError(f"override {override!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise ConfigFileError(f"override {override!r}: the value is not a YAML scalar or list ({problem})") from error
        _set(data, key, value, f"override {override!r}")
    return data


def set_values(data: dict, values: dict[str, Any]) -> dict:
    """``{"model.mode": "lora"}`` -> nested updates, the values as they are (a program's settings: nothing
    to parse)."""
    for key, value in values.items():
        _set(data, key, value, f"setting {key!r}")
    return data


def _set(data: dict, key: str, value: Any, what: str) -> None:
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigFileError(f"{what}: {part!r} is not a section")
    node[leaf] = value


def build_dataclass(cls: type[T], data: dict, *, where: str = "") -> T:
    """Instantiate ``cls`` from ``data``, recursing into dataclass-typed fields; unknown keys and
    ``__post_init__`` errors of every section are collected and raised together."""
    problems: list[str] = []
    result = _build(cls, data, where, problems)
    if problems:
        raise ConfigFileError(problems)
    return result


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {data!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    for key in unknown:
        problems.append(f"{prefix}{key}: unknown key; valid keys are {sorted(fields)}")
    kwargs = {}
    broken_section = False
    for name, value in data.items():
        if name not in fields:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{prefix}{name}", problems)
            if value is None:
                broken_section = True
                continue
        elif not _matches(value, hint):
            problems.append(f"{prefix}{name}={value!r}: expected {_type_name(hint)}")
            continue
        kwargs[name] = value
    if broken_section:  # its default in place of the broken one would report problems that are not there
        return None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        for problem in getattr(error, "problems", None) or [str(error)]:
            problems.append(f"{prefix}{problem}")
        return None


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    hint = origin or hint
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
