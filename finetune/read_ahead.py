"""Reading the training clips once before the Trainer (``training.read_ahead``).

What the frozen Whisper encoder (and the whisper reader's decoder) make of a clip does not change while the
adapters train, so the model's `ReadingCache` keeps it. A training step reads the few clips of its batch,
each of its own length, so the reader decodes them in small groups; read ahead, the clips go in batches of
similar length (one decoding loop for a batch), the training clock does not run, and the steps only look
them up. A clip whose features differ from the ones read ahead (another rate, a changed file) is simply
read again in its step: the cache is keyed by the clip's log-mel and the weights. ``training.readings_file``
keeps the readings between runs (the recipe's `read_ahead` loads and saves it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from speechlm.finetune.examples import Example

logger = logging.getLogger(__name__)


@dataclass
class ReadAhead:
    clips: int
    seconds: float
    cached_bytes: int
    read: int = 0  # of the clips, those the encoder (and reader) read; the rest were kept from before
    from_file: int = 0  # readings loaded from training.readings_file first

    def summary(self) -> str:
        kept = f", {self.clips - self.read} of them kept from before" if self.read < self.clips else ""
        loaded = f"; {self.from_file} readings loaded from the readings file" if self.from_file else ""
        return (f"read {self.clips} training clips ahead in {self.seconds:.0f} s{kept} "
                f"({self.cached_bytes / 2**20:.0f} MiB kept{loaded})")


def clips_to_read(examples: Sequence[Example]) -> list:
    """Each distinct input audio of the examples, shortest first (so a batch shares a length)."""
    seen: dict = {}
    for example in examples:
        if example.has("audio"):
            key = str(example.audio) if isinstance(example.audio, str | Path) else id(example.audio)
            seen.setdefault(key, (example.num_samples or 0, example.audio))
    return [audio for _, audio in sorted(seen.values(), key=lambda pair: pair[0])]


def read_ahead(model, processor, examples: Sequence[Example], batch_size: int = 32,
               progress: bool = True) -> ReadAhead:
    """Every clip of ``examples`` (the recipe's `clips_to_read_ahead`: those the training will read) through the
    frozen encoder (and reader) into ``model.reading_cache``."""
    if model.config.train_audio_encoder:
        raise ValueError("training.read_ahead keeps what a frozen encoder reads; this model trains its encoder "
                         "(model.train_audio_encoder: true), so every step must read its clips again")
    cache = model.reading_cache
    if cache.max_bytes == 0:
        raise ValueError("training.read_ahead needs a model that keeps its readings (model.reading_cache has "
                         "max_bytes=0); the recipe's build_model gives it one")
    clips = clips_to_read(examples)
    evictions, misses = cache.evictions, cache.misses
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for first in tqdm(range(0, len(clips), batch_size), desc="read ahead", disable=not progress):
            batch = clips[first: first + batch_size]
            inputs = processor([[{"role": "user", "content": [{"type": "audio", "audio": audio}]}] for audio in batch])
            features = inputs["input_features"].to(model.device)
            with torch.no_grad():  # not inference_mode: the kept frames go into training steps
                model.get_audio_features(features, inputs["input_features_mask"].to(model.device))
    finally:
        model.train(was_training)
    result = ReadAhead(clips=len(clips), seconds=time.perf_counter() - start, cached_bytes=cache.bytes,
                       read=cache.misses - misses)
    logger.info(result.summary())
    if cache.evictions > evictions:
        logger.warning("the reading cache (max_bytes %d) could not keep every clip read ahead: %d were dropped and "
                       "will be read again in their steps; give it more bytes or turn training.read_ahead off",
                       cache.max_bytes, cache.evictions - evictions)
    return result
