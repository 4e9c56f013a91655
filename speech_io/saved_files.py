"""Reading the files a saved codec or vocoder is made of: its JSON config and its safetensors weights, each a
``ValueError`` naming the file when it is unreadable or does not fit (a user's folder, possibly mixed up)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (``what``: the settings it should hold, for the error)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON config ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of {what}")
    return data


def load_fitting_state(module: nn.Module, weights_path: Path, config_path: Path) -> None:
    """Load ``weights_path`` into ``module`` (built from ``config_path``), or say which tensors do not fit."""
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
    expected = module.state_dict()
    wrong = sorted(set(state) ^ set(expected)) + [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
        if key in state and state[key].shape != value.shape]
    if wrong:
        raise ValueError(f"{weights_path}: does not fit {config_path.name} (first differences: {wrong[:5]})")
    module.load_state_dict(state)
