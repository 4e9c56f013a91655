"""Training a `UnitVocoder` for a codec (`speechlm train-vocoder`): the codec encodes each clip, the clip's
log-mel is the target, and the vocoder learns units -> log-mel by L1 over random crops, for a number of
minutes (or steps), then joins the codec's folder (``vocoder-rvq<k>/``) so that every decode of the
codec's units (responder, pipeline, stream, evaluation) uses it while the codec's decoder is untrained.

No GAN and no neural waveform stage: on 2 CPU cores a log-mel regressor trains in minutes and Griffin-Lim
turns it into audio Whisper can follow (BENCHMARKS.md, "Speech out").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from speechlm.finetune.timed_training import TimedTraining, TrainingReport, train_for_minutes
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.codec_loading import Codec, load_codec
from speechlm.speech_io.config_errors import ConfigProblems
from speechlm.speech_io.spectrogram import LOG_FLOOR
from speechlm.speech_io.vocoder import UnitVocoder, VocoderConfig, vocoder_folder


@dataclass
class VocoderTraining(TimedTraining):
    """How long and on what the vocoder trains (`TimedTraining`, and random crops of the clips)."""

    max_clips: int | None = field(default=800, metadata={"help": "clips of the manifests to train on (null: all)"})
    batch_size: int = field(default=16, metadata={"help": "crops per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate (cosine decay by minutes)"})
    crop_units: int = field(default=100, metadata={"help": "units per crop (2 s at 50 Hz)"})
    what: ClassVar[str] = "vocoder training settings"

    def problems(self) -> ConfigProblems:
        problems = super().problems()
        problems.positive_integers(self, "crop_units")
        return problems


@dataclass
class VocoderExample:
    units: torch.Tensor  # long (k, T)
    log_mel: torch.Tensor  # (n_mels, T * upsample)


def manifest_clips(manifests: Sequence[str | Path], max_clips: int | None) -> list[Path]:
    """The audio files of JSONL manifests (rows with ``audio``, relative to the manifest), in order."""
    from speechlm.finetune.examples import read_jsonl

    clips: list[Path] = []
    for manifest in manifests:
        path = Path(manifest)
        rows = read_jsonl(path)
        clips += [path.parent / row["audio"] for row in rows if isinstance(row, dict) and row.get("audio")]
    if not clips:
        raise ValueError(f"{', '.join(map(str, manifests))}: no rows with 'audio'; the vocoder trains on clips")
    if max_clips is not None and len(clips) > max_clips:
        # An even spread over the manifests, not their first rows (those are often one source).
        clips = [clips[round(i * len(clips) / max_clips)] for i in range(max_clips)]
    return clips


def encoded_clips(codec: Codec, clips: Sequence[Path], n_q: int) -> list[np.ndarray]:
    """Each clip's ``(n_q, T)`` units, 64 clips read and encoded at a time (a bounded number of waveforms in
    memory at once)."""
    codes: list[np.ndarray] = []
    for start in range(0, len(clips), 64):
        codes += codec.encode([load_audio(clip) for clip in clips[start: start + 64]], n_q=n_q)
    return codes


def vocoder_examples(codec: Codec, waveforms: Sequence[np.ndarray], config: VocoderConfig
                     ) -> list[VocoderExample]:
    """Each clip's first ``config.num_layers`` units and its log-mel, cut or padded to the units' frames."""
    from speechlm.speech_io.spectrogram import MelSpectrogram

    spectrogram = MelSpectrogram(config.spectrogram)
    examples = []
    for units, wave in zip(codec.encode(waveforms, n_q=config.num_layers), waveforms, strict=True):
        frames = units.shape[1] * config.upsample
        log_mel = spectrogram.log_mel(wave)[:, :frames]
        log_mel = torch.nn.functional.pad(log_mel, (0, frames - log_mel.shape[1]), value=math.log(LOG_FLOOR))
        examples.append(VocoderExample(torch.from_numpy(units), log_mel))
    return examples


def _batch(examples: list[VocoderExample], rng: np.random.Generator, settings: VocoderTraining, upsample: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of ``crop_units``; shorter clips are padded with silence (unit 0 is as good as any: the
    target is the log floor there, and the network learns what padding sounds like)."""
    crop = settings.crop_units
    units, targets = [], []
    for index in rng.integers(0, len(examples), settings.batch_size):
        example = examples[index]
        start = int(rng.integers(0, max(1, example.units.shape[1] - crop + 1)))
        piece = example.units[:, start:start + crop]
        target = example.log_mel[:, start * upsample:(start + crop) * upsample]
        units.append(torch.nn.functional.pad(piece, (0, crop - piece.shape[1])))
        targets.append(torch.nn.functional.pad(target, (0, crop * upsample - target.shape[1]),
                                               value=math.log(LOG_FLOOR)))
    return torch.stack(units), torch.stack(targets)


def vocoder_config(codec: Codec, num_layers: int, **settings) -> VocoderConfig:
    """A vocoder config that fits ``codec`` (its codebooks' size and width), with ``settings`` over the defaults."""
    return VocoderConfig(num_layers=num_layers, codebook_size=codec.codebook_size,
                         codebook_dimension=codec.codebook_dimension, **settings)


def train_vocoder(codec: Codec, examples: list[VocoderExample], config: VocoderConfig,
                  settings: VocoderTraining) -> tuple[UnitVocoder, TrainingReport]:
    """A vocoder for ``codec``'s units trained on ``examples`` until ``max_minutes`` or ``max_steps``."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    vocoder = UnitVocoder(config, codec.codebook_vectors(config.num_layers))

    def l1(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        units, target = batch
        return (vocoder(units) - target).abs().mean()

    crops = iter(lambda: _batch(examples, rng, settings, config.upsample), None)  # random crops, endlessly
    report = train_for_minutes(vocoder, crops, l1, settings, clips=len(examples), loss="L1 log-mel")
    return vocoder, report


def train_codec_vocoder(codec_dir: str | Path, manifests: Sequence[str | Path], config: VocoderConfig,
                        settings: VocoderTraining, *, codec: Codec | None = None
                        ) -> tuple[Path, TrainingReport]:
    """Train a vocoder for the codec in ``codec_dir`` on the manifests' clips and save it into that folder.
    ``codec``: that folder's codec, where the caller has loaded it already."""
    codec = load_codec(codec_dir) if codec is None else codec
    fits = (config.codebook_size, config.codebook_dimension) == (codec.codebook_size, codec.codebook_dimension)
    if not fits or config.num_layers > codec.n_q:
        raise ValueError(f"vocoder config: {config.num_layers} layers of {config.codebook_size} codes of width "
                         f"{config.codebook_dimension}; the codec in {codec_dir} has {codec.n_q} layers of "
                         f"{codec.codebook_size} codes of width {codec.codebook_dimension}")
    waves = [load_audio(clip) for clip in manifest_clips(manifests, settings.max_clips)]
    vocoder, report = train_vocoder(codec, vocoder_examples(codec, waves, config), config, settings)
    out = Path(codec_dir) / vocoder_folder(config.num_layers)
    vocoder.save_pretrained(out)
    return out, report
