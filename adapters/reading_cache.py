"""`ReadingCache`: what a frozen Whisper encoder and reader made of each clip, kept for the next time.

A training epoch, the learning curve's evaluations and the evaluation after training read the same clips
again with the same frozen weights; encoding a clip and decoding Whisper's transcript cost more than the
LM step that uses them. Entries are keyed by the clip's log-mel bytes and a fingerprint of the weights
(a hash of every parameter's bytes, recomputed only when a parameter is replaced or changed in place), so
a changed clip or encoder never reads a stale entry. The oldest entries go first past ``max_bytes``.
A cache can be handed to another model (the same weights loaded again): the fingerprint decides.
A model's own cache is off (``max_bytes=0``: a served model would keep every clip it heard); the
training recipe gives the model it trains one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

DEFAULT_MAX_BYTES = 4 << 30


class ReadingCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[tuple[str, str], tuple[torch.Tensor, list[int]]] = OrderedDict()
        self._fingerprints: dict[tuple, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprint(self, *modules: nn.Module, settings: tuple = ()) -> str:
        """A hash of the modules' parameters and buffers and of ``settings`` (what else decides a reading:
        a reader's silence or prompt); rehashed only when a tensor is replaced or modified (its storage or
        torch's version counter changes)."""
        tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
        state = (repr(settings), *((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors))
        if state not in self._fingerprints:
            digest = hashlib.sha1(repr(settings).encode())
            for tensor in tensors:
                digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprints = {state: digest.hexdigest()}  # the weights of one moment are enough
        return self._fingerprints[state]

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

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
