"""Training an `RVQCompletion` for a codec (`speechlm train-completion`): the codec encodes each clip with all of
its layers, and the model learns layer k + 1 from layers 1..k and a prompt, for a number of minutes (or steps);
then it joins the codec's folder (``completion/``), and a response spoken in a given voice completes the LM's
layer-1 units with it before the codec decodes all of its layers.

Each step asks one layer of every crop in its batch (k + 1 drawn evenly from 2..L, as VALL-E's non-autoregressive
stage trains), cross-entropy over that layer's codes. A crop's prompt is the start of the same clip, cut before
the crop, as VALL-E prompts with another part of the same utterance: the voice is the clip's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from speechlm.finetune.timed_training import TimedTraining, TrainingReport, train_for_minutes
from speechlm.finetune.vocoder_training import encoded_clips, manifest_clips
from speechlm.speech_io.codec_loading import Codec, load_codec
from speechlm.speech_io.completion import (
    COMPLETION_FOLDER,
    CompletionConfig,
    RVQCompletion,
    codebooks_fingerprint,
)
from speechlm.speech_io.config_errors import ConfigProblems

MIN_TARGET_FRAMES = 10  # a clip keeps at least this many frames after its prompt (0.2 s)


@dataclass
class CompletionTraining(TimedTraining):
    """How long and on what the completion model trains (`TimedTraining`, and the crops' prompt and length)."""

    batch_size: int = field(default=8, metadata={"help": "crops per step"})
    crop_frames: int = field(default=250, metadata={"help": "target frames per crop (5 s at 50 Hz)"})
    prompt_frames: int = field(default=150, metadata={"help": "prompt frames at most, cut from the clip's start "
                                                                "(at most a third of a short clip)"})
    what: ClassVar[str] = "completion training settings"

    def problems(self) -> ConfigProblems:
        problems = super().problems()
        problems.positive_integers(self, "crop_frames", "prompt_frames")
        return problems


def completion_examples(codec: Codec, manifests: Sequence[str | Path], num_layers: int, max_clips: int | None
                        ) -> list[torch.Tensor]:
    """The manifests' clips as ``(num_layers, T)`` codes, those long enough for a prompt and a target."""
    examples = [torch.from_numpy(codes) for codes in encoded_clips(codec, manifest_clips(manifests, max_clips),
                                                                    num_layers)]
    return [codes for codes in examples if codes.shape[1] >= 2 * MIN_TARGET_FRAMES]


def _batch(examples: list[torch.Tensor], rng: np.random.Generator, settings: CompletionTraining
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Prompts ``(B, L, P)`` and targets ``(B, L, T)`` with their paddings, and how many layers are known."""
    num_layers = examples[0].shape[0]
    prompts, targets = [], []
    for index in rng.integers(0, len(examples), settings.batch_size):
        codes = examples[index]
        cut = min(settings.prompt_frames, codes.shape[1] // 3)
        start = int(rng.integers(cut, max(cut, codes.shape[1] - settings.crop_frames) + 1))
        prompts.append(codes[:, :cut])
        targets.append(codes[:, start: start + settings.crop_frames])
    known = int(rng.integers(1, num_layers))
    return (*_padded(prompts, left=True), *_padded(targets, left=False), known)


def _padded(items: list[torch.Tensor], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, n)`` code tensors padded with code 0 to ``(B, L, N)`` (on the left: prompts, which run into their
    targets), and where the padding is ``(B, N)``."""
    width = max(item.shape[1] for item in items)
    gaps = [width - item.shape[1] for item in items]
    codes = torch.stack([nn.functional.pad(item, (gap, 0) if left else (0, gap)) for item, gap in zip(items, gaps,
                                                                                                        strict=True)])
    columns = torch.arange(width)[None]
    gaps = torch.tensor(gaps)[:, None]
    padding = columns < gaps if left else columns >= width - gaps
    return codes, padding


def train_completion(examples: list[torch.Tensor], config: CompletionConfig, settings: CompletionTraining, *,
                     codebooks: torch.Tensor) -> tuple[RVQCompletion, TrainingReport]:
    """A completion model trained on ``examples`` (``(L, T)`` codes) until ``max_minutes`` or ``max_steps``;
    ``codebooks`` (the codec's, ``(L, codebook_size, D)``) are its input vectors and its fingerprint."""
    if not examples:
        raise ValueError(f"no clip of at least {2 * MIN_TARGET_FRAMES} frames; the completion model has nothing "
                         f"to learn from")
    if examples[0].shape[0] != config.num_layers:
        raise ValueError(f"examples of {examples[0].shape[0]} layers; the completion config has "
                         f"num_layers={config.num_layers}")
    config = replace(config, codebook_fingerprint=codebooks_fingerprint(codebooks))
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = RVQCompletion(config, codebooks)

    def cross_entropy(batch) -> torch.Tensor:
        prompt, prompt_padding, target, target_padding, known = batch
        logits = model(prompt, target[:, :known], prompt_padding, target_padding)
        asked = target[:, known].masked_fill(target_padding, -100)  # padding frames are not asked
        return nn.functional.cross_entropy(logits.transpose(1, 2).float(), asked, ignore_index=-100)

    batches: Iterator = iter(lambda: _batch(examples, rng, settings), None)  # random crops, endlessly
    report = train_for_minutes(model, batches, cross_entropy, settings, clips=len(examples),
                               loss="cross-entropy of the asked layer", clip_norm=1.0)
    return model, report


def train_codec_completion(codec_dir: str | Path, manifests: Sequence[str | Path], config: CompletionConfig,
                           settings: CompletionTraining, *, codec: Codec | None = None) -> tuple[Path, TrainingReport]:
    """Train a completion model for the codec in ``codec_dir`` on the manifests' clips and save it into that
    folder. ``codec``: that folder's codec, where the caller has loaded it already."""
    codec = load_codec(codec_dir) if codec is None else codec
    fits = (config.codebook_size, config.codebook_dimension) == (codec.codebook_size, codec.codebook_dimension)
    if codec.n_q < 2 or not fits or config.num_layers != codec.n_q:
        raise ValueError(f"completion config: {config.num_layers} layers of {config.codebook_size} codes of width "
                         f"{config.codebook_dimension}; the codec in {codec_dir} has {codec.n_q} layers of "
                         f"{codec.codebook_size} codes of width {codec.codebook_dimension}"
                         + (" (one layer: nothing to complete)" if codec.n_q < 2 else ""))
    examples = completion_examples(codec, manifests, config.num_layers, settings.max_clips)
    model, report = train_completion(examples, config, settings, codebooks=codec.codebook_vectors(codec.n_q))
    out = Path(codec_dir) / COMPLETION_FOLDER
    model.save_pretrained(out)
    return out, report


def completion_config(codec: Codec, **settings) -> CompletionConfig:
    """A completion config that fits ``codec`` (its layers and codebooks), with ``settings`` over the defaults."""
    fitting = {"num_layers": codec.n_q, "codebook_size": codec.codebook_size,
               "codebook_dimension": codec.codebook_dimension}
    return CompletionConfig(**(fitting | settings))
