"""The files a codec's helpers (vocoder, speech decoder, completion model) and a codec's settings are saved as: a
JSON config and safetensors weights, each a ``ValueError`` naming the file when it is unreadable or does not fit
(a user's folder, possibly mixed up)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import load_file, save_file
from torch import nn

Module = TypeVar("Module", bound=nn.Module)


def save_module(module: nn.Module, config: dict[str, Any], directory: str | os.PathLike, config_name: str,
                weights_name: str) -> None:
    """``config`` as ``directory/config_name`` (JSON) and ``module``'s state as ``directory/weights_name``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / config_name).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(out / weights_name))


def load_module(build: Callable[[dict[str, Any], str], Module], directory: str | os.PathLike, config_name: str,
                weights_name: str, what: str) -> Module:
    """The module `save_module` wrote in ``directory``: ``build(config, source)`` makes it from its config, then
    its weights are loaded (eval mode). ``what`` names it in the errors."""
    folder = Path(directory)
    config_path, weights_path = folder / config_name, folder / weights_name
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a saved {what} has {config_name} and {weights_name}")
    module = build(read_json_object(config_path, f"{what} settings"), str(config_path))
    load_fitting_state(module, weights_path, config_path)
    return module.eval()


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
