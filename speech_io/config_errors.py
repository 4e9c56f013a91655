"""The one way settings report what is wrong with them: every settings class of the toolkit (the codec's,
the model's, a recipe's sections, the evaluation's, the server's, a config file's) collects its problems in
a `ConfigProblems` and raises them together as one `ConfigError`, each naming the field, its value and what
would be valid. It lives in the bottom layer so that every layer can use it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

Settings = TypeVar("Settings")


class ConfigError(ValueError):
    """Configuration values a user set are invalid; the message names every bad field at once, and
    ``problems`` lists them (a caller that gathers several sections' problems extends its own with them)."""

    def __init__(self, owner: str, problems: list[str]):
        super().__init__(f"invalid {owner}:\n  - " + "\n  - ".join(problems))
        self.problems = list(problems)


class ConfigProblems(list):
    """The problems found in one settings object, raised together as one `ConfigError`."""

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)

    def positive_integers(self, settings: object, *names: str, optional: bool = False) -> None:
        """Each named field of ``settings`` must be an int >= 1 (bools are not); ``optional``: or None."""
        for name in names:
            value = getattr(settings, name)
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self.append(f"{name}={value!r} (expected a positive integer{' or null' if optional else ''})")

    def transformer(self, settings: object) -> None:
        """A transformer's ``hidden_size`` must split into its ``num_heads``, and its ``dropout`` be in [0, 1)."""
        width, heads, dropout = settings.hidden_size, settings.num_heads, settings.dropout
        self.check(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
                   f"dropout={dropout!r} (expected a number in [0, 1))")
        if isinstance(width, int) and isinstance(heads, int) and heads > 0:
            self.check(width % heads == 0, f"hidden_size={width} (expected a multiple of num_heads={heads})")

    def raise_if_any(self, owner: str) -> None:
        if self:
            raise ConfigError(owner, self)


def settings_from_dict(cls: type[Settings], data: Mapping[str, Any], *, source: str) -> Settings:
    """``cls(**data)`` for a settings dataclass read from a file: unknown keys, wrong types and bad values are
    one ``ValueError`` that names ``source`` (the file or its role) and, for unknown keys, the known ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; expected some of {sorted(names)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
