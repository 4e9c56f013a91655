"""`ReadingCache`: what a frozen Whisper encoder and reader made of each clip, kept for the next time.

A training epoch, the learning curve's evaluations and the evaluation after training read the same clips
again with the same frozen weights; encoding a clip and decoding Whisper's transcript cost more than the
LM step that uses them. Entries are keyed by the clip's log-mel bytes and a fingerprint of the weights
(a hash of every parameter's bytes, recomputed only when a parameter is replaced or changed in place), so
a changed clip or encoder never reads a stale entry. The oldest entries go first past ``max_bytes``.
A cache can be handed to another model (the same weights loaded again): the fingerprint decides.
A model's own cache is off (``max_bytes=0``: a served model would keep every clip it heard); the
training recipe gives the model it trains one. `save` and `load` keep it in a file between runs
(``training.readings_file``): a second run on the same clips with the same frozen parts reads none again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

DEFAULT_MAX_BYTES = 4 << 30
READINGS_FORMAT = "speechlm-readings-1"


class ReadingCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[tuple[str, str], tuple[torch.Tensor, list[int]]] = OrderedDict()
        self._fingerprints: dict[tuple, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprint(self, *modules: nn.Module, settings: tuple = (), tensors: Sequence[torch.Tensor] = ()) -> str:
        """A hash of the modules' parameters and buffers, of ``tensors`` and of ``settings`` (what else
        decides a reading: a reader's silence or prompt); rehashed only when a tensor is replaced or
        modified (its storage or torch's version counter changes)."""
        tensors = [*(t for module in modules for t in (*module.parameters(), *module.buffers())), *tensors]
        state = (repr(settings), *tensors_state(tensors))
        if state not in self._fingerprints:
            self._fingerprints = {state: weights_digest(tensors, settings)}  # the weights of one moment are enough
        return self._fingerprints[state]

    def weights_changed(self) -> None:
        """Hash the weights again at the next `fingerprint`: for a change torch's version counter does not see (a
        write through ``.data``, as peft's LoRA merge makes)."""
        self._fingerprints = {}

    @staticmethod
    def clip_key(features: torch.Tensor) -> str:
        """``n_mels, T`` log-mel of one clip (its real frames) -> a key."""
        features = features.detach().cpu().contiguous()
        return hashlib.sha1(str(tuple(features.shape)).encode() + features.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()

    def get(self, fingerprint: str, key: str) -> tuple[torch.Tensor, list[int]] | None:
        entry = self._entries.get((fingerprint, key))
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end((fingerprint, key))
        return entry

    def put(self, fingerprint: str, key: str, entry: tuple[torch.Tensor, list[int]]) -> None:
        frames, token_ids = entry
        frames = frames.detach().clone()  # not a view that would keep its whole batch alive
        size = frames.numel() * frames.element_size()
        if (fingerprint, key) in self._entries or size > self.max_bytes:
            return
        self._entries[(fingerprint, key)] = (frames, list(token_ids))
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1

    def save(self, path: str | os.PathLike) -> int:
        """Every entry into one safetensors file (written aside, then moved over ``path``); the count."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for (fingerprint, key), (frames, token_ids) in self._entries.items():
            tensors[f"{fingerprint}/{key}/frames"] = frames.contiguous()
            tensors[f"{fingerprint}/{key}/tokens"] = torch.tensor(token_ids, dtype=torch.int64)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".partial")
        # the least recently used first, so that a load within a smaller max_bytes keeps the most recent
        order = json.dumps([f"{fingerprint}/{key}" for fingerprint, key in self._entries])
        save_file(tensors, staging, metadata={"format": READINGS_FORMAT, "order": order})
        os.replace(staging, path)
        return len(self._entries)

    def load(self, path: str | os.PathLike) -> int:
        """The entries of a file `save` wrote, kept as `put` keeps them (within ``max_bytes``); the count read."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as saved:
                if (saved.metadata() or {}).get("format") != READINGS_FORMAT:
                    raise ValueError(f"{path}: not a file of readings (ReadingCache.save writes metadata "
                                     f"format={READINGS_FORMAT!r})")
                names = sorted(name.rsplit("/", 1)[0] for name in saved.keys() if name.endswith("/frames"))
                order = json.loads(saved.metadata().get("order", "[]"))
                if sorted(order) == names:  # the saved least-recently-used order (a file without one: by name)
                    names = order
                for name in names:
                    fingerprint, key = name.split("/")
                    self.put(fingerprint, key, (saved.get_tensor(f"{name}/frames"),
                                                saved.get_tensor(f"{name}/tokens").tolist()))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: cannot read the readings ({error})") from error
        return len(names)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def tensors_state(tensors) -> tuple:
    """What tells whether ``tensors`` changed without reading them: each one's storage, torch's version counter
    (an in-place write moves it; a write through ``.data`` does not), dtype, shape and device."""
    return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device) for t in tensors)


def weights_digest(tensors, settings: tuple = ()) -> str:
    """A hash of ``tensors`` (each one's dtype, shape and bytes, in order) and of ``settings``."""
    digest = hashlib.sha1(repr(settings).encode())
    for tensor in tensors:
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
