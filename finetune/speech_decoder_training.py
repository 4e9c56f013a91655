"""Training a `SpeechDecoder` for a codec (`speechlm train-speech-decoder`): the codec encodes each clip of the
manifests, the clip's text becomes symbols, and the decoder learns text -> units by CTC, for a number of
minutes (or steps); then it joins the codec's folder (``speech-decoder/``), and every response asked to speak
(responder, pipeline, stream, server, evaluation) has the LM write the text and the decoder speak it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from speechlm.finetune.timed_training import TimedTraining, TrainingReport, train_for_minutes
from speechlm.finetune.vocoder_training import encoded_clips
from speechlm.speech_io.codec_loading import Codec, load_codec
from speechlm.speech_io.speech_decoder import (
    PADDING,
    SPEECH_DECODER_FOLDER,
    SpeechDecoder,
    SpeechDecoderConfig,
    codebook_fingerprint,
    merged_units,
    text_sentences,
)


@dataclass
class SpeechDecoderTraining(TimedTraining):
    """How long and on what the speech decoder trains (`TimedTraining`: all clips, batches of 16 of similar length)."""

    what: ClassVar[str] = "speech decoder training settings"


@dataclass
class SpokenText:
    """A clip's text and its units (the codec's layer 1, 50 Hz); where known, its ``alignment``: each phoneme of
    the text (espeak-ng's, sentence after sentence) with the seconds it lasts in the clip. ``source`` names it in
    errors."""

    text: str
    units: list[int]
    alignment: list[tuple[str, float]] | None = None
    source: str = ""


def manifest_spoken_texts(manifests: Sequence[str | Path], codec: Codec, max_clips: int | None) -> list[SpokenText]:
    """The clips of JSONL manifests (rows with ``audio``, relative to the manifest, and ``text``; optionally an
    ``alignment``, `row_alignment`) with their units; with ``max_clips``, an even spread over the manifests."""
    from speechlm.finetune.examples import read_jsonl

    rows: list[tuple[Path, str, list[tuple[str, float]] | None, str]] = []
    for manifest in manifests:
        path = Path(manifest)
        for index, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row, dict) or not row.get("audio"):
                continue
            if not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ValueError(f"{path}: row {index} has audio but no 'text'; the speech decoder learns the "
                                 f"units of a clip's text")
            source = f"{path}: row {index}"
            rows.append((path.parent / row["audio"], row["text"], row_alignment(row, source), source))
    if not rows:
        raise ValueError(f"{', '.join(map(str, manifests))}: no rows with 'audio' and 'text'; the speech decoder "
                         f"trains on spoken texts")
    if max_clips is not None and len(rows) > max_clips:
        rows = [rows[round(i * len(rows) / max_clips)] for i in range(max_clips)]
    units = encoded_clips(codec, [clip for clip, *_ in rows], n_q=1)
    return [SpokenText(text, codes[0].tolist(), alignment, source)
            for (_, text, alignment, source), codes in zip(rows, units, strict=True)]


def row_alignment(row: dict, source: str) -> list[tuple[str, float]] | None:
    """A manifest row's ``alignment`` (its text's sentences, each a list of ``[phoneme, seconds]`` pairs, as the
    quick start's corpus writes Piper's), flattened; None where the row has none."""
    alignment = row.get("alignment")
    if alignment is None:
        return None
    pairs = [pair for sentence in alignment for pair in sentence] if isinstance(alignment, list) and all(
        isinstance(sentence, list) for sentence in alignment) else None
    if not pairs or not all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                            and isinstance(pair[1], (int, float)) and pair[1] >= 0 for pair in pairs):
        raise ValueError(f"{source}: 'alignment' should be a list of sentences, each a list of [phoneme, seconds] "
                         f"pairs (seconds >= 0); got {alignment!r:.80}")
    return [(symbol, float(seconds)) for symbol, seconds in pairs]


def alignment_frames(seconds: Sequence[float], num_frames: int) -> torch.Tensor:
    """Each symbol's whole frames out of a clip's ``num_frames``, in proportion to ``seconds`` (cut where the
    running total falls, so that they sum to ``num_frames``; a codec's frame count and the clip's seconds differ
    by its padding)."""
    ends = torch.tensor(seconds, dtype=torch.float64).cumsum(0)
    ends = (ends / ends[-1].clamp(min=1e-9) * num_frames).round().long()
    return torch.diff(ends, prepend=torch.zeros(1, dtype=torch.long))


def vocabulary_of(texts: Sequence[str], symbols: str, language: str) -> list[str]:
    """Every symbol of ``texts``, sorted: the decoder's vocabulary."""
    return sorted({s for text in texts for sentence in text_sentences(text, symbols, language) for s in sentence})


def _symbols_and_units(decoder: SpeechDecoder, spoken: Sequence[SpokenText]
                       ) -> list[tuple[torch.Tensor, list[int], torch.Tensor | None]]:
    """Each clip's symbol ids (its sentences read as one), units, and where it has an alignment each symbol's
    frames (`alignment_frames`), where it has both symbols and units. An alignment whose phonemes are not the
    decoder's for the text (another espeak-ng, language or text) is an error that names the clip."""
    examples = []
    for item in spoken:
        symbols = [s for sentence in text_sentences(item.text, decoder.config.symbols, decoder.config.language)
                   for s in sentence]
        ids = decoder.ids_of(symbols)
        if not len(ids) or not item.units:
            continue
        frames = None
        if item.alignment is not None and decoder.config.duration_predictor:
            if [symbol for symbol, _ in item.alignment] != symbols:
                raise ValueError(f"{item.source or item.text[:40]!r}: the alignment's phonemes "
                                 f"{''.join(s for s, _ in item.alignment)[:60]!r} are not espeak-ng's for the text "
                                 f"({''.join(symbols)[:60]!r}, language {decoder.config.language}); align the clip "
                                 f"with the decoder's phonemes, or train without duration_predictor")
            frames = alignment_frames([seconds for _, seconds in item.alignment], len(item.units))
        examples.append((ids, item.units, frames))
    return examples


def fit_symbol_frames(pairs: Sequence[tuple[torch.Tensor, list[int]]], vocabulary_size: int, *,
                      prior_weight: float = 10.0) -> tuple[float, list[float]]:
    """The units a symbol over all clips, and each vocabulary symbol's own mean frames: every clip's frame count
    fit as the sum of its symbols' frames by least squares, each symbol drawn towards the mean rate as if it had
    been heard ``prior_weight`` times more at that rate (a symbol the clips say rarely, or never, keeps near the
    mean rather than taking a pause's length); a symbol whose fit is negative speaks no frames, and the rest are
    fit again without it; a symbol never heard speaks the mean rate."""
    rate = sum(len(units) for _, units in pairs) / max(1, sum(len(ids) for ids, _ in pairs))
    size = vocabulary_size + 2
    counts = torch.zeros(len(pairs), size, dtype=torch.float64)
    for row, (ids, _) in enumerate(pairs):
        counts[row].index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    frames = torch.tensor([float(len(units)) for _, units in pairs], dtype=torch.float64)
    gram = counts.T @ counts + prior_weight * torch.eye(size, dtype=torch.float64)
    target = counts.T @ frames + prior_weight * rate
    heard = counts.sum(0) > 0
    free = heard.clone()
    durations = torch.zeros(size, dtype=torch.float64)
    while free.any():
        durations.zero_()
        durations[free] = torch.linalg.solve(gram[free][:, free], target[free])
        if (durations >= 0).all():
            break
        free &= durations > 0
    return rate, torch.where(heard, durations, rate)[2:].tolist()


def train_speech_decoder(spoken: Sequence[SpokenText], config: SpeechDecoderConfig, settings: SpeechDecoderTraining,
                         *, codebook: torch.Tensor | None = None) -> tuple[SpeechDecoder, TrainingReport]:
    """A speech decoder trained on ``spoken`` until ``max_minutes`` or ``max_steps``. Its vocabulary and
    speaking rate come from ``spoken`` (``config``'s are replaced); ``codebook`` (the codec's layer 1) is
    fingerprinted so that another codebook refuses it."""
    texts = [item.text for item in spoken]
    vocabulary = vocabulary_of(texts, config.symbols, config.language)
    config = replace(config, vocabulary=vocabulary,
                     codebook_fingerprint=codebook_fingerprint(codebook) if codebook is not None else "")
    torch.manual_seed(settings.seed)
    decoder = SpeechDecoder(config)
    clips = _symbols_and_units(decoder, spoken)
    if not clips:
        raise ValueError("no clip has both units and a spoken symbol; the speech decoder has nothing to learn")
    if config.duration_predictor and all(frames is None for *_, frames in clips):
        raise ValueError("duration_predictor=true, but no clip has an 'alignment' (each phoneme's seconds) to learn "
                         "durations from; add alignments to the manifests, or train without it")
    rate, symbol_frames = fit_symbol_frames([(ids, units) for ids, units, _ in clips], len(vocabulary))
    decoder.config.units_per_symbol = rate
    decoder.config.symbol_frames = symbol_frames if config.symbol_durations else []
    # each clip: its symbols spread over its own frame count (by its alignment where it has one, else by the
    # symbols' mean frames), its merged units (CTC's target), and its symbols and their frames where aligned
    examples = [(decoder.positions(ids, len(units), frames if frames is not None else _mean_or_even(decoder, ids)),
                 torch.tensor(merged_units(units)), ids, frames) for ids, units, frames in clips]
    ctc = nn.CTCLoss(blank=decoder.blank, zero_infinity=True)

    def loss_of(indices: list[int]) -> torch.Tensor:
        positions = [examples[i][0] for i in indices]
        targets = [examples[i][1] for i in indices]
        lengths = torch.tensor([len(p) for p in positions])
        padded = nn.utils.rnn.pad_sequence(positions, batch_first=True)
        padding = torch.arange(padded.shape[1])[None] >= lengths[:, None]
        log_probs = decoder(padded, padding).log_softmax(-1).transpose(0, 1)  # T, B, C as CTC takes them
        frames = lengths * decoder.config.units_per_position
        loss = ctc(log_probs, torch.cat(targets), frames, torch.tensor([len(t) for t in targets]))
        timed = [examples[i] for i in indices if examples[i][3] is not None]
        if decoder.durations is not None and timed:
            loss = loss + duration_loss(decoder.durations, [ids for _, _, ids, _ in timed],
                                        [frames for *_, frames in timed])
        return loss

    report = train_for_minutes(decoder, _epochs(examples, settings), loss_of, settings, clips=len(examples),
                               loss="CTC + duration loss" if decoder.durations is not None else "CTC loss",
                               clip_norm=1.0)
    return decoder, report


def _mean_or_even(decoder: SpeechDecoder, ids: torch.Tensor) -> torch.Tensor:
    """A clip without an alignment is spread by its symbols' mean frames, or evenly: never by a predictor that is
    still untrained."""
    frames = decoder.mean_symbol_frames(ids)
    return torch.ones(len(ids), dtype=torch.float64) if frames is None else frames


def duration_loss(predictor: nn.Module, ids: Sequence[torch.Tensor], frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean squared error of ``predictor``'s ``log(1 + frames)`` over every symbol of the clips (FastSpeech's)."""
    padded = nn.utils.rnn.pad_sequence(list(ids), batch_first=True)
    target = nn.utils.rnn.pad_sequence([f.float() for f in frames], batch_first=True).log1p()
    mask = padded != PADDING
    predicted = predictor(padded).float()
    return ((predicted - target)[mask] ** 2).mean()


def _epochs(examples: list[tuple], settings: SpeechDecoderTraining
            ) -> Iterator[list[int]]:
    """Batches of examples of similar length, in a new random order every epoch, endlessly."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    batches = [order[i: i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    rng = random.Random(settings.seed)
    while True:
        rng.shuffle(batches)
        yield from batches


def train_codec_speech_decoder(codec_dir: str | Path, manifests: Sequence[str | Path], config: SpeechDecoderConfig,
                               settings: SpeechDecoderTraining, *, codec: Codec | None = None
                               ) -> tuple[Path, TrainingReport]:
    """Train a speech decoder for the codec in ``codec_dir`` on the manifests' clips and save it into that
    folder. ``codec``: that folder's codec, where the caller has loaded it already."""
    codec = load_codec(codec_dir) if codec is None else codec
    if config.codebook_size != codec.codebook_size:
        raise ValueError(f"speech decoder config: codebook_size={config.codebook_size}; the codec in {codec_dir} "
                         f"has {codec.codebook_size} codes a layer")
    spoken = manifest_spoken_texts(manifests, codec, settings.max_clips)
    decoder, report = train_speech_decoder(spoken, config, settings, codebook=codec.codebook_vectors(1)[0])
    codec.add_speech_decoder(decoder)
    out = Path(codec_dir) / SPEECH_DECODER_FOLDER
    decoder.save_pretrained(out)
    return out, report
