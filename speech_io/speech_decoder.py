"""A speech decoder for a codec's units, trained by the toolkit: text -> units, non-autoregressive.

The quick start's LM speaks by generating every 50 Hz unit with all of its layers; on 2 cores it trains on a few
hundred tokens a second, well under an epoch of the corpus's speech in its minutes, and its answers are not
understood (BENCHMARKS.md, "Speech out"). LLaMA-Omni instead hangs a small speech decoder off the LM: here the
LM writes the text (chain-of-modality) and this decoder speaks it.

It reads the text's phonemes (espeak-ng, as Piper bundles it: English spelling says little about sound) or its
characters. Each symbol's embedding is repeated over its share of the frames (``symbol_durations``: the frames
that symbol lasts on average, fit to the corpus's clip lengths, so the positions fall near where the clip says
it; with ``duration_predictor`` the frames a small convolutional predictor gives it from the symbols around it,
learnt from the clips' alignments; else an even share, ``units_per_symbol`` a symbol; with ``units_per_position``
k, over positions that speak k frames each), a small bidirectional transformer reads them, and CTC against the clip's units (repeats merged)
learns where each unit falls. Speaking takes each frame's likeliest unit other than the blank (a one-frame flicker
smoothed), one unit a frame. A text is spoken one sentence at a time (what a stream speaks as the LM finishes
each), so the whole equals the sentences spoken in turn.

It belongs to its codec (units mean nothing without their codebook): saved in the codec's folder as
``speech-decoder/`` (``speech_decoder_config.json`` + ``model.safetensors``), loaded with it, refused by a codec
whose codebook changed since (``codebook_fingerprint``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speechlm.speech_io.config_errors import ConfigProblems, settings_from_dict
from speechlm.speech_io.fast_dropout import use_fast_dropout
from speechlm.speech_io.saved_files import load_module, save_module

SPEECH_DECODER_FOLDER = "speech-decoder"  # inside the codec's folder
SPEECH_DECODER_CONFIG_NAME = "speech_decoder_config.json"
SPEECH_DECODER_WEIGHTS_NAME = "model.safetensors"
SYMBOL_KINDS = ("phonemes", "characters")
PADDING, UNKNOWN = 0, 1  # symbol ids before the vocabulary's
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """A short hash of a codec's layer-1 codebook: a decoder trained on one codebook is refused by another."""
    return hashlib.sha256(codebook.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


@functools.cache
def _espeak():
    try:
        from piper.phonemize_espeak import EspeakPhonemizer
    except ImportError as err:
        raise ImportError("this speech decoder reads phonemes, which come from espeak-ng as piper-tts bundles it: "
                          "pip install 'speechlm[speak]' (or train one with speech_decoder.symbols=characters)"
                          ) from err
    return EspeakPhonemizer(), threading.Lock()  # espeak-ng keeps one global state


def text_sentences(text: str, kind: str, language: str = "en-us") -> list[list[str]]:
    """``text`` as its sentences' symbols: espeak-ng's phonemes (its sentences, each word followed by a space)
    or lower-case characters (split after ``.``, ``!`` or ``?``). Empty sentences are left out."""
    if kind not in SYMBOL_KINDS:
        raise ValueError(f"symbols={kind!r}: choose one of {list(SYMBOL_KINDS)}")
    if kind == "characters":
        sentences = [list(part.strip().lower()) for part in _SENTENCE_END.split(text)]
    else:
        phonemizer, lock = _espeak()
        with lock:
            sentences = [[*sentence, " "] for sentence in phonemizer.phonemize(language, text)]
    return [sentence for sentence in sentences if any(not s.isspace() for s in sentence)]


def split_sentences(text: str) -> list[str]:
    """``text`` cut after each ``.``, ``!`` or ``?`` that white space follows, pieces stripped, empty ones left out:
    what a stream can speak as soon as the next one begins."""
    return [piece.strip() for piece in _SENTENCE_END.split(text) if piece.strip()]


@dataclass
class SpeechDecoderConfig:
    """The decoder's architecture, what it reads, and the codec it speaks for; saved as
    ``speech_decoder_config.json``."""

    codebook_size: int = field(default=1024, metadata={"help": "the codec's codes per layer (layer 1's)"})
    symbols: str = field(default="phonemes", metadata={"help": "what it reads: phonemes (espeak-ng) or characters"})
    language: str = field(default="en-us", metadata={"help": "espeak-ng voice of the phonemes"})
    vocabulary: list[str] = field(default_factory=list,
                                  metadata={"help": "the symbols it knows, in id order from 2 (training fills it)"})
    units_per_symbol: float = field(default=2.0, metadata={"help": "frames spoken per symbol (training measures it)"})
    symbol_durations: bool = field(default=True, metadata={
        "help": "each symbol speaks its own mean frames (`symbol_frames`) rather than units_per_symbol: the "
                "positions fall nearer where the clip says each symbol, and a sentence's length follows its sounds"})
    symbol_frames: list[float] = field(default_factory=list, metadata={
        "help": "with symbol_durations, the frames each vocabulary symbol speaks, in id order from 2 (training fits "
                "them to the clips' lengths)"})
    duration_predictor: bool = field(default=False, metadata={
        "help": "predict each symbol's frames from the symbols around it (convolutions, as FastSpeech's duration "
                "predictor), learnt from the clips' alignments (a manifest row's `alignment`: each phoneme's "
                "seconds, as Piper gives them), rather than each symbol's mean frames; needs symbols=phonemes"})
    units_per_position: int = field(default=2, metadata={
        "help": "frames each transformer position speaks (its head gives that many frames' logits): k reads 1/k "
                "of the positions, so a minutes-bounded training takes k times the steps (2: BENCHMARKS.md)"})
    hidden_size: int = field(default=256, metadata={"help": "width of the transformer"})
    num_layers: int = field(default=4, metadata={"help": "transformer layers"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    feed_forward_kernel: int = field(default=3, metadata={
        "help": "positions each layer's feed-forward reads at once (odd): 1 is the transformer's position-wise one, "
                "3 FastSpeech's convolution over a position and its neighbours (BENCHMARKS.md: unseen sentences spoken with "
                "5% fewer units in error)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in training"})
    codebook_fingerprint: str = field(default="", metadata={"help": "the codebook it was trained on (training sets it)"})

    def __post_init__(self) -> None:
        problems = ConfigProblems()
        problems.positive_integers(self, "codebook_size", "hidden_size", "num_layers", "num_heads",
                                   "units_per_position", "feed_forward_kernel")
        problems.check(not isinstance(self.feed_forward_kernel, int) or self.feed_forward_kernel <= 0  # said above
                       or self.feed_forward_kernel % 2 == 1,
                       f"feed_forward_kernel={self.feed_forward_kernel!r} (expected an odd number: the positions "
                       f"each side of one alike)")
        problems.check(self.symbols in SYMBOL_KINDS, f"symbols={self.symbols!r} (expected one of {list(SYMBOL_KINDS)})")
        problems.check(isinstance(self.units_per_symbol, (int, float)) and self.units_per_symbol > 0,
                       f"units_per_symbol={self.units_per_symbol!r} (expected a positive number)")
        problems.check(isinstance(self.symbol_durations, bool),
                       f"symbol_durations={self.symbol_durations!r} (expected true or false)")
        problems.check(isinstance(self.symbol_frames, list) and all(isinstance(f, (int, float)) and f >= 0
                                                                    for f in self.symbol_frames),
                       f"symbol_frames={self.symbol_frames!r:.60} (expected a list of non-negative numbers)")
        problems.check(not self.symbol_frames or len(self.symbol_frames) == len(self.vocabulary),
                       f"symbol_frames has {len(self.symbol_frames)} entries for {len(self.vocabulary)} symbols of the "
                       f"vocabulary (expected one a symbol)")
        problems.check(isinstance(self.duration_predictor, bool),
                       f"duration_predictor={self.duration_predictor!r} (expected true or false)")
        problems.check(not self.duration_predictor or self.symbols == "phonemes",
                       f"duration_predictor=true with symbols={self.symbols!r} (it learns from phoneme alignments: "
                       f"expected symbols=phonemes)")
        problems.transformer(self)
        problems.check(isinstance(self.vocabulary, list) and all(isinstance(s, str) for s in self.vocabulary),
                       f"vocabulary={self.vocabulary!r:.60} (expected a list of strings)")
        problems.raise_if_any("speech decoder config")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "speech decoder config") -> SpeechDecoderConfig:
        # a decoder saved before `units_per_position` existed speaks one frame a position, one saved before
        # `symbol_durations` gives every symbol the same frames, and one saved before `feed_forward_kernel` has
        # position-wise feed-forwards
        return settings_from_dict(cls, {"units_per_position": 1, "symbol_durations": False, "feed_forward_kernel": 1,
                                        **data}, source=source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sinusoid_positions(positions: torch.Tensor, width: int) -> torch.Tensor:
    """Sinusoidal encodings ``(*positions.shape, width)`` of integer ``positions`` (sines, then cosines)."""
    scale = torch.exp(torch.arange(0, width, 2, device=positions.device) * (-math.log(10000.0) / width))
    angles = positions.float()[..., None] * scale
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def spread(counts_total: int, symbols: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Frames of each of ``symbols`` symbols, as even as whole frames allow (or as near ``weights``' proportions),
    >= 1 each, summing to ``max(counts_total, symbols)``."""
    total = max(counts_total, symbols)
    if weights is None:
        edges = torch.tensor([round(total * (i + 1) / symbols) for i in range(symbols)])
        return torch.diff(edges, prepend=torch.zeros(1, dtype=edges.dtype)).clamp(min=1)
    # Whole frames nearest each symbol's share, at least one: the symbols that get more than their share (a stress
    # mark's 0.2 frames made 1) are paid for by the ones that keep the most above theirs, so the sentence keeps its
    # length (rounding each share up on its own spoke sentences ~16% longer than their clips)
    shares = weights.double().clamp(min=1e-6)
    ideal = total * shares / shares.sum()
    counts = ideal.floor().clamp(min=1).long()
    while (excess := int(counts.sum()) - total) != 0:
        if excess < 0:  # the largest remainders get a frame more
            counts[torch.topk(ideal - counts, -excess).indices] += 1
        else:  # the symbols furthest above their share (and above one frame) give one back
            room = torch.where(counts > 1, counts - ideal, torch.tensor(float("-inf"), dtype=ideal.dtype))
            counts[torch.topk(room, min(excess, int((counts > 1).sum()))).indices] -= 1
    return counts


class DurationPredictor(nn.Module):
    """Each symbol's ``log(1 + frames)`` from the symbols around it: FastSpeech's duration predictor (convolutions
    over the symbols, each followed by ReLU, layer norm and dropout), with its own symbol embedding."""

    def __init__(self, symbols: int, width: int, dropout: float, *, layers: int = 3, kernel: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(symbols, width, padding_idx=PADDING)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, padding=kernel // 2) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` long ``(B, S)`` (`PADDING` past a sentence's end) -> ``(B, S)`` predicted ``log(1 + frames)``."""
        hidden, keep = self.embed(ids), (ids != PADDING)[..., None]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            hidden = hidden * keep  # the padding stays silent between layers
            hidden = self.dropout(norm(torch.relu(conv(hidden.transpose(1, 2)).transpose(1, 2))))
        return self.out(hidden).squeeze(-1)


class ConvFeedForwardLayer(nn.TransformerEncoderLayer):
    """A pre-norm transformer layer whose feed-forward reads ``kernel`` neighbouring positions at once (FastSpeech's
    FFT block: speech is local, and a frame's unit depends on the sounds either side): its first linear takes the
    positions from ``kernel // 2`` before to ``kernel // 2`` after, side by side (a convolution over the positions,
    as one matrix product), padding and the sequence's ends read as zeros."""

    def __init__(self, width: int, heads: int, dropout: float, kernel: int) -> None:
        super().__init__(width, heads, 4 * width, dropout=dropout, batch_first=True, norm_first=True)
        self.kernel = kernel
        self.linear1 = nn.Linear(kernel * width, 4 * width)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        # torch's fast path reads linear1 as position-wise, so this layer always takes the composed path
        x = src + self._sa_block(self.norm1(src), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + self._ff_block(self._neighbours(self.norm2(x), src_key_padding_mask))

    def _neighbours(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """``(B, P, W)`` -> ``(B, P, kernel * W)``: each position with its neighbours', zeros past either end."""
        if padding is not None:  # True where padded, or (as torch's encoder passes it on) -inf there
            x = x.masked_fill((padding if padding.dtype == torch.bool else padding != 0)[..., None], 0)
        side = self.kernel // 2
        padded = nn.functional.pad(x, (0, 0, side, side))
        return torch.cat([padded[:, i: i + x.shape[1]] for i in range(self.kernel)], dim=-1)


class SpeechDecoder(nn.Module):
    """Symbols of a sentence, spread over its positions (``units_per_position`` frames each) -> per-frame logits
    over the codec's units and CTC's blank (id ``codebook_size``)."""

    def __init__(self, config: SpeechDecoderConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.symbol_ids = {symbol: index + 2 for index, symbol in enumerate(config.vocabulary)}
        self.embed = nn.Embedding(len(config.vocabulary) + 2, width, padding_idx=PADDING)
        layer = (nn.TransformerEncoderLayer(width, config.num_heads, 4 * width, dropout=config.dropout,
                                            batch_first=True, norm_first=True) if config.feed_forward_kernel == 1
                 else ConvFeedForwardLayer(width, config.num_heads, config.dropout, config.feed_forward_kernel))
        self.layers = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, config.units_per_position * (config.codebook_size + 1))
        self.durations = (DurationPredictor(len(config.vocabulary) + 2, width, config.dropout)
                          if config.duration_predictor else None)
        use_fast_dropout(self)  # torch's Bernoulli masks were 30% of a training step on a CPU (BENCHMARKS.md)

    @property
    def blank(self) -> int:
        return self.config.codebook_size

    def encode_text(self, text: str) -> list[torch.Tensor]:
        """Each sentence of ``text`` as symbol ids (`ids_of`)."""
        return [self.ids_of(sentence) for sentence in text_sentences(text, self.config.symbols, self.config.language)]

    def ids_of(self, symbols: Sequence[str]) -> torch.Tensor:
        """``symbols`` as ids (a symbol never seen in training is `UNKNOWN`)."""
        return torch.tensor([self.symbol_ids.get(s, UNKNOWN) for s in symbols], dtype=torch.long)

    def symbol_frames(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The frames each of ``ids`` (one sentence) speaks: predicted from the symbols around it with
        `SpeechDecoderConfig.duration_predictor`, else each symbol's mean with ``symbol_durations``
        (`mean_symbol_frames`), else None (every symbol the same)."""
        if self.durations is not None:
            with torch.no_grad():
                predicted = self.durations(ids[None].to(self.head.weight.device))[0]
            return predicted.double().expm1().clamp(min=0).cpu()
        return self.mean_symbol_frames(ids)

    def mean_symbol_frames(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Each of ``ids``' mean frames (`SpeechDecoderConfig.symbol_frames`; `UNKNOWN`: ``units_per_symbol``), or
        None where the decoder has none."""
        if not self.config.symbol_frames:
            return None
        table = torch.tensor([0.0, self.config.units_per_symbol, *self.config.symbol_frames], dtype=torch.float64)
        return table[ids.cpu()]

    def positions(self, ids: torch.Tensor, num_frames: int | None = None, frames: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """``ids`` repeated over the positions that speak ``num_frames`` frames (by default the symbols' own:
        `symbol_frames`, or ``units_per_symbol`` each), ``units_per_position`` frames a position, the last one's
        rounded up; each symbol gets its part of the frames by ``frames`` (a clip's own, in training), else by
        `symbol_frames`, else an even share."""
        frames = self.symbol_frames(ids) if frames is None else frames
        if num_frames is None:
            num_frames = round(float(frames.sum()) if frames is not None else len(ids) * self.config.units_per_symbol)
        counts = spread(-(-num_frames // self.config.units_per_position), len(ids), frames)
        return ids.repeat_interleave(counts.to(ids.device))

    def forward(self, positions: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` long ``(B, P)`` symbol ids (``padding`` True where padded) -> logits
        ``(B, P * units_per_position, codebook + 1)``, a position's frames in turn."""
        encoding = sinusoid_positions(torch.arange(positions.shape[1], device=positions.device),
                                      self.config.hidden_size)
        hidden = self.layers(self.embed(positions) + encoding, src_key_padding_mask=padding)
        logits = self.head(self.norm(hidden))
        return logits.reshape(*positions.shape[:1], -1, self.config.codebook_size + 1)

    @torch.inference_mode()
    def speak_sentence(self, ids: torch.Tensor) -> list[int]:
        """Units of one sentence's symbol ids: each frame's likeliest unit other than CTC's blank, a frame alone
        between two of another unit taking theirs. (CTC puts its one spike anywhere in a unit's stretch and blanks
        the rest; the unit each blank frame ranks next is heard better than the spike's held over the stretch:
        BENCHMARKS.md, "Each frame's likeliest unit".)"""
        if len(ids) == 0:
            return []
        logits = self(self.positions(ids)[None])[0]
        return smooth_flickers(logits[:, :self.blank].argmax(-1)).tolist()

    def speak(self, text: str) -> list[int]:
        """The units of ``text``, spoken one sentence (`split_sentences`, then espeak-ng's) at a time; an empty text,
        or one without a word, has none."""
        return [unit for piece in split_sentences(text) for ids in self.encode_text(piece)
                for unit in self.speak_sentence(ids)]

    def speak_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`speak` of each text: one at a time, so a text's units never depend on its batch."""
        return [self.speak(text) for text in texts]

    # ---- saving ---------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_module(self, self.config.to_dict(), directory, SPEECH_DECODER_CONFIG_NAME, SPEECH_DECODER_WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> SpeechDecoder:
        return load_module(lambda data, source: cls(SpeechDecoderConfig.from_dict(data, source=source)), directory,
                           SPEECH_DECODER_CONFIG_NAME, SPEECH_DECODER_WEIGHTS_NAME, "speech decoder")


def check_speech_decoder(decoder: SpeechDecoder, codebook_size: int, codebook: torch.Tensor) -> SpeechDecoder:
    """``decoder`` if it speaks the units of a codec with ``codebook_size`` codes and layer-1 ``codebook``, else
    an error that says what differs."""
    c = decoder.config
    if c.codebook_size != codebook_size:
        raise ValueError(f"a speech decoder for {c.codebook_size} units does not fit this codec ({codebook_size} "
                         f"codes a layer)")
    if c.codebook_fingerprint and c.codebook_fingerprint != codebook_fingerprint(codebook):
        raise ValueError("the speech decoder was trained on another codebook than this codec's (a codec rebuilt or "
                         "refilled since); train it again with speechlm train-speech-decoder")
    return decoder.eval()


def saved_speech_decoder(folder: Path) -> SpeechDecoder | None:
    """The speech decoder saved in a codec's ``folder``, if any; an error names its folder."""
    directory = folder / SPEECH_DECODER_FOLDER
    if not directory.is_dir():
        return None
    try:
        return SpeechDecoder.from_pretrained(directory)
    except ValueError as err:
        raise ValueError(f"{directory}: {err}") from None


def smooth_flickers(units: torch.Tensor) -> torch.Tensor:
    """``units`` (one a frame) where a unit lasts a single frame between two frames of one other unit: that
    frame takes their unit."""
    units = units.clone()
    if len(units) >= 3:
        flicker = (units[:-2] == units[2:]) & (units[1:-1] != units[:-2])
        units[1:-1][flicker] = units[:-2][flicker]
    return units


def merged_units(units: Sequence[int]) -> list[int]:
    """Units with runs merged: CTC's targets (its blanks and repeats give back the durations)."""
    return [unit for unit, _ in itertools.groupby(units)]


class HoldsSpeechDecoder:
    """What both codec kinds share about their speech decoder: ``speech_decoder`` (None until one is added),
    checked against the codec's codebook, saved and loaded in the codec's folder."""

    speech_decoder: SpeechDecoder | None = None

    def add_speech_decoder(self, decoder: SpeechDecoder) -> None:
        """Speak text in this codec's units with ``decoder``, trained for its codebook."""
        self.speech_decoder = check_speech_decoder(decoder, self.codebook_size, self.codebook_vectors(1)[0])

    def _load_speech_decoder(self, folder: Path) -> None:
        decoder = saved_speech_decoder(folder)
        if decoder is not None:
            try:
                self.add_speech_decoder(decoder)
            except ValueError as err:
                raise ValueError(f"{folder / SPEECH_DECODER_FOLDER}: {err}") from None

    def _save_speech_decoder(self, folder: Path) -> None:
        if self.speech_decoder is not None:
            self.speech_decoder.save_pretrained(folder / SPEECH_DECODER_FOLDER)
