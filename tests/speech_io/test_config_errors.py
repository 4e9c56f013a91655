from __future__ import annotations

from dataclasses import dataclass

import pytest

from speechlm.speech_io.config_errors import ConfigError, ConfigProblems


@dataclass
class Settings:
    size: object = 4
    steps: object = None


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "4", None])
def test_positive_integers_names_the_field_and_the_value(bad):
    problems = ConfigProblems()
    problems.positive_integers(Settings(size=bad), "size")
    assert problems == [f"size={bad!r} (expected a positive integer)"]
    with pytest.raises(ConfigError, match=r"invalid Settings:\n  - size="):
        problems.raise_if_any("Settings")


def test_optional_positive_integers_take_none():
    problems = ConfigProblems()
    problems.positive_integers(Settings(size=1, steps=None), "size", "steps", optional=True)
    assert problems == []
    problems.positive_integers(Settings(steps=0), "steps", optional=True)
    assert problems == ["steps=0 (expected a positive integer or null)"]
