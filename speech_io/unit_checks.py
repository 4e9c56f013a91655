"""The checks every codec makes of what it is given: a waveform to encode, units to decode."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def checked_waveform(waveform: Any, index: int, sample_rate: int) -> np.ndarray:
    """``waveform`` as contiguous float32 samples, or an error that names item ``index`` and what was expected."""
    array = np.asarray(waveform)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"waveform {index} has shape {array.shape}; expected a non-empty mono (samples,) "
                         f"array at {sample_rate} Hz (load it with speech_io.audio.load_audio)")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"waveform {index} has dtype {array.dtype}; expected float samples in [-1, 1]")
    if not np.isfinite(array).all():
        raise ValueError(f"waveform {index} holds NaN or infinite samples; expected finite values")
    return np.ascontiguousarray(array, dtype=np.float32)


def checked_units(units: Any, what: str, n_q: int, codebook_size: int) -> torch.Tensor:
    """Units as a long tensor ``(k, T)`` with ``1 <= k <= n_q`` and every code in the codebook; 1-D input is
    layer 1. ``what`` names the input in the error."""
    array = units.detach().cpu().numpy() if isinstance(units, torch.Tensor) else np.asarray(units)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{what} has shape {array.shape}; expected (T,) layer-1 units or (k, T) with "
                         f"k <= {n_q} layers")
    if array.shape[0] < 1 or array.shape[0] > n_q:
        raise ValueError(f"{what} has shape {array.shape}: {array.shape[0]} layers, but the codec has "
                         f"{n_q}; expected (k, T) with 1 <= k <= {n_q}")
    if array.shape[1] == 0:
        raise ValueError(f"{what} has shape {array.shape}: no frames; expected at least one unit")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} has dtype {array.dtype}; expected integer units")
    bad = (array < 0) | (array >= codebook_size)
    if bad.any():
        layer, frame = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"{what}: unit {int(array[layer, frame])} at layer {layer}, frame {frame} is outside "
                         f"the codebook [0, {codebook_size})")
    return torch.from_numpy(array.astype(np.int64))
