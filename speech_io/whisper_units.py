"""Semantic speech units: k-means codes of a Whisper encoder's frames, 50 Hz, decoded by a vocoder trained here.

Why a second unit source beside SpeechTokenizer: the published SpeechTokenizer checkpoints do not install
offline, and a SpeechTokenizer with random weights gives layer-1 units that carry almost nothing of what was
said (a vocoder trained on them is not understood: BENCHMARKS.md, "Speech out"). SpeechGPT speaks k-means
units of HuBERT's frames; these are the same idea with the encoder the model already hears with. The first
``encoder_blocks`` blocks of a Whisper encoder (block 4 of Whisper base's 6 carries the most of the spectrum)
run on the clip's own length, and each frame's nearest codebook vector is its unit: one layer, the size of
SpeechTokenizer's layer 1 (1024 codes at 50 Hz, 320 samples a unit), so the LM's vocabulary, the processor and
the TTS task work unchanged. There is no decoder: a `UnitVocoder` trained for the codebook (``speechlm
train-vocoder``, kept in ``vocoder-rvq1/``) turns units back into audio.

The folder it saves: ``config.json`` (``"codec_type": "whisper-units"`` and the dims), ``model.safetensors``
(the encoder's kept blocks and the codebook: the codec loads without the Whisper checkpoint it was cut from),
``vocoder-rvq1/``. `speechlm.speech_io.codec_loading.load_codec` reads either kind of codec folder.

Shapes: waveform ``(samples,)`` -> padded to ``320 * T`` samples -> log-mel ``(n_mels, 2T)`` -> two
convolutions (the second strides by 2) ``(T, D)`` -> ``encoder_blocks`` attention blocks ``(T, D)`` ->
nearest codebook row ``(1, T)``. Clips over 30 s (Whisper's positional embeddings) run in 30 s windows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from whisper.audio import log_mel_spectrogram
from whisper.model import ResidualAttentionBlock, sinusoids

from speechlm.speech_io.codec_kmeans import kmeans, nearest
from speechlm.speech_io.config_errors import ConfigProblems, settings_from_dict
from speechlm.speech_io.constants import SAMPLE_RATE
from speechlm.speech_io.features import SUPPORTED_N_MELS
from speechlm.speech_io.hub_files import HUB_KWARGS, download_repo_folder, hub_name
from speechlm.speech_io.saved_files import load_fitting_state, read_json_object
from speechlm.speech_io.speech_decoder import SPEECH_DECODER_FOLDER, HoldsSpeechDecoder
from speechlm.speech_io.unit_checks import checked_units, checked_waveform
from speechlm.speech_io.vocoder import (
    VOCODER_FOLDER_PATTERN,
    UnitVocoder,
    VocoderStream,
    add_saved_vocoders,
    vocoder_folder,
)

WHISPER_UNITS_TYPE = "whisper-units"
CODEC_TYPE_KEY = "codec_type"  # in config.json; a SpeechTokenizer config has none
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
UNIT_HOP = 320  # samples a unit: 50 Hz, as SpeechTokenizer's
WINDOW_FRAMES = 1500  # units a window: Whisper's 30 s of positional embeddings


@dataclass
class WhisperUnitConfig:
    """The kept part of a Whisper encoder and the codebook; saved as ``config.json``."""

    n_mels: int = field(default=80, metadata={"help": "mel bins of the Whisper it was cut from"})
    n_audio_state: int = field(default=512, metadata={"help": "width of the encoder (Whisper base: 512)"})
    n_audio_head: int = field(default=8, metadata={"help": "attention heads per block"})
    encoder_blocks: int = field(default=4, metadata={"help": "encoder blocks kept; units are read after the last"})
    codebook_size: int = field(default=1024, metadata={"help": "units (k-means codes)"})
    source: str = field(default="", metadata={"help": "the Whisper checkpoint the blocks were cut from (a note)"})

    def __post_init__(self) -> None:
        problems = ConfigProblems()
        problems.positive_integers(self, "n_audio_state", "n_audio_head", "encoder_blocks", "codebook_size")
        problems.check(self.n_mels in SUPPORTED_N_MELS, f"n_mels={self.n_mels!r} (expected one of {SUPPORTED_N_MELS})")
        if not problems and self.n_audio_state % self.n_audio_head:
            problems.append(f"n_audio_state={self.n_audio_state} is not a multiple of n_audio_head={self.n_audio_head}")
        problems.raise_if_any("whisper-units codec config")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "whisper-units codec config") -> WhisperUnitConfig:
        values = {key: value for key, value in data.items() if key != CODEC_TYPE_KEY}
        return settings_from_dict(cls, values, source=source)

    def to_dict(self) -> dict[str, Any]:
        return {CODEC_TYPE_KEY: WHISPER_UNITS_TYPE, **asdict(self)}


class WhisperUnitEncoder(nn.Module):
    """Whisper's front (two convolutions, positional embeddings) and its first blocks, and the codebook."""

    def __init__(self, config: WhisperUnitConfig) -> None:
        super().__init__()
        d = config.n_audio_state
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(WINDOW_FRAMES, d))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(d, config.n_audio_head) for _ in range(config.encoder_blocks))
        self.register_buffer("codebook", torch.zeros(config.codebook_size, d))
        self.register_buffer("codebook_filled", torch.zeros(()))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel ``(n_mels, 2T)``, ``T <= WINDOW_FRAMES`` -> frames ``(T, D)``."""
        x = nn.functional.gelu(self.conv1(mel[None]))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return x[0]


class WhisperUnitCodec(HoldsSpeechDecoder):
    """16 kHz waveforms <-> int64 units ``(1, frames)`` at 50 Hz; the interface of `SpeechTokenizerCodec` with
    one layer. Build it with ``from_whisper`` (blocks cut from a Whisper checkpoint, then ``fill_codebooks``),
    ``from_config`` (random weights, for tests) or ``from_pretrained`` (a saved folder)."""

    def __init__(self, encoder: WhisperUnitEncoder, config: WhisperUnitConfig, *,
                 vocoders: Mapping[int, UnitVocoder] | None = None) -> None:
        self.model = encoder.eval()
        self.config = config
        self.vocoders: dict[int, UnitVocoder] = {}
        for vocoder in (vocoders or {}).values():
            self.add_vocoder(vocoder)

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: WhisperUnitConfig | Mapping[str, Any], *, seed: int | None = None) -> WhisperUnitCodec:
        """Random weights (seeded if ``seed`` is given) and an empty codebook."""
        if not isinstance(config, WhisperUnitConfig):
            config = WhisperUnitConfig.from_dict(config)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return cls(WhisperUnitEncoder(config), config)

    @classmethod
    def from_whisper(cls, dims: Mapping[str, int], encoder_state: Mapping[str, torch.Tensor], *, source: str = "",
                     encoder_blocks: int = 4, codebook_size: int = 1024) -> WhisperUnitCodec:
        """The first ``encoder_blocks`` blocks of a Whisper encoder, from its dims (``n_mels``, ``n_audio_state``,
        ``n_audio_head``, ``n_audio_layer``) and its ``encoder.*`` state with the prefix removed (as
        `speechlm.adapters.audio_encoder.read_whisper_checkpoint` gives them); the codebook is still empty."""
        if dims.get("n_audio_ctx", WINDOW_FRAMES) != WINDOW_FRAMES:
            raise ValueError(f"the Whisper encoder{f' in {source}' if source else ''} has n_audio_ctx="
                             f"{dims['n_audio_ctx']}; whisper units read Whisper's {WINDOW_FRAMES} frames (30 s)")
        if encoder_blocks > dims["n_audio_layer"]:
            raise ValueError(f"encoder_blocks={encoder_blocks}, but the Whisper encoder{f' in {source}' if source else ''} "
                             f"has {dims['n_audio_layer']} blocks")
        config = WhisperUnitConfig(n_mels=dims["n_mels"], n_audio_state=dims["n_audio_state"],
                                   n_audio_head=dims["n_audio_head"], encoder_blocks=encoder_blocks,
                                   codebook_size=codebook_size, source=source)
        encoder = WhisperUnitEncoder(config)
        def kept(key: str) -> bool:  # the front and the first blocks; ln_post follows the last block, not ours
            return not key.startswith(("blocks.", "ln_post.")) or (
                key.startswith("blocks.") and int(key.split(".")[1]) < encoder_blocks)

        kept_state = {key: value.float() for key, value in encoder_state.items() if kept(key)}
        missing, unexpected = encoder.load_state_dict(kept_state, strict=False)
        missing = [key for key in missing if key not in ("codebook", "codebook_filled")]
        if missing or unexpected:
            raise ValueError(f"Whisper encoder state{f' in {source}' if source else ''} does not fit its dims: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return cls(encoder, config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, subfolder: str = "", **hub_kwargs) -> WhisperUnitCodec:
        """A saved folder (``config.json`` + ``model.safetensors`` + vocoders), or a Hub repo id and folder."""
        unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
        if unknown:
            raise TypeError(f"WhisperUnitCodec.from_pretrained: unexpected keyword arguments {unknown}; it takes "
                            f"subfolder, {', '.join(HUB_KWARGS)}")
        if hub_name(path) is not None:
            folder = download_repo_folder("whisper-units codec", str(path), subfolder=subfolder,
                                          patterns=CODEC_FILES, **hub_kwargs)
        else:
            folder = Path(path) / subfolder
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for file in (config_path, weights_path):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing; a whisper-units codec folder has {CONFIG_NAME} and "
                                        f"{WEIGHTS_NAME}")
        data = read_json_object(config_path, "whisper-units codec settings")
        if data.get(CODEC_TYPE_KEY) != WHISPER_UNITS_TYPE:
            raise ValueError(f"{config_path}: not a whisper-units codec config (expected "
                             f"\"{CODEC_TYPE_KEY}\": \"{WHISPER_UNITS_TYPE}\")")
        config = WhisperUnitConfig.from_dict(data, source=str(config_path))
        encoder = WhisperUnitEncoder(config)
        load_fitting_state(encoder, weights_path, config_path)
        codec = cls(encoder, config)
        add_saved_vocoders(codec, folder)
        codec._load_speech_decoder(folder)
        return codec

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()}, str(out / WEIGHTS_NAME))
        for layers, vocoder in self.vocoders.items():
            vocoder.save_pretrained(out / vocoder_folder(layers))
        self._save_speech_decoder(out)

    def add_vocoder(self, vocoder: UnitVocoder) -> None:
        """Decode units with ``vocoder``, trained for this codebook."""
        c = vocoder.config
        if (c.num_layers, c.codebook_size, c.codebook_dimension) != (1, self.codebook_size, self.codebook_dimension):
            raise ValueError(f"a vocoder for {c.num_layers} layers of {c.codebook_size} codes of width "
                             f"{c.codebook_dimension} does not fit this codec (1 layer of {self.codebook_size} "
                             f"codes of width {self.codebook_dimension})")
        if self.codebooks_filled and not torch.equal(vocoder.codebooks, self.model.codebook):
            raise ValueError("the vocoder was trained on another codebook than this codec's (a codec refilled "
                             "since); train it again with speechlm train-vocoder")
        self.vocoders[1] = vocoder.eval()

    def codebook_vectors(self, num_layers: int = 1) -> torch.Tensor:
        """The codebook ``(1, codebook_size, D)``: what a unit stands for, as the vocoder reads it."""
        self._check_n_q(num_layers)
        return self.model.codebook.detach().clone()[None]

    # ---- facts --------------------------------------------------------------------------------------

    sample_rate = SAMPLE_RATE
    hop_length = UNIT_HOP
    frame_rate = SAMPLE_RATE // UNIT_HOP
    n_q = 1

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def codebook_dimension(self) -> int:
        return self.config.n_audio_state

    def decodes_with(self, layers: int = 1) -> str:
        """``"vocoder"`` once one is trained for the codebook, else ``"none"`` (the codec cannot decode yet)."""
        return "vocoder" if layers in self.vocoders else "none"

    def num_frames(self, num_samples: int) -> int:
        """Units for ``num_samples`` of audio: every started hop gets one."""
        return math.ceil(num_samples / UNIT_HOP)

    @property
    def codebooks_filled(self) -> bool:
        return bool(self.model.codebook_filled.item())

    # ---- units --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def frames(self, waveform: np.ndarray) -> torch.Tensor:
        """The kept blocks' output ``(num_frames(samples), D)`` for one checked waveform."""
        units = self.num_frames(len(waveform))
        samples = torch.nn.functional.pad(torch.from_numpy(waveform), (0, units * UNIT_HOP - len(waveform)))
        mel = log_mel_spectrogram(samples, n_mels=self.config.n_mels)  # n_mels, 2 * units
        return torch.cat([self.model(mel[:, 2 * start: 2 * (start + WINDOW_FRAMES)])
                          for start in range(0, units, WINDOW_FRAMES)])

    @torch.inference_mode()
    def fill_codebooks(self, waveforms: Sequence[np.ndarray], *, seed: int = 0, kmeans_iters: int = 10) -> None:
        """The codebook: a seeded k-means (``kmeans_iters`` rounds) of the clips' frames."""
        arrays = [checked_waveform(w, i, self.sample_rate) for i, w in enumerate(waveforms)]
        if not arrays:
            raise ValueError("fill_codebooks got an empty list of waveforms; pass the clips to draw units from")
        samples = torch.cat([self.frames(array) for array in arrays])
        if samples.shape[0] < self.codebook_size:
            raise ValueError(f"fill_codebooks got {samples.shape[0]} frames ({samples.shape[0] / self.frame_rate:.1f} s "
                             f"of audio) for {self.codebook_size} codes; expected at least one frame a code")
        means, _ = kmeans(samples, self.codebook_size, kmeans_iters, torch.Generator().manual_seed(seed))
        self.model.codebook.copy_(means)
        self.model.codebook_filled.fill_(1.0)
        self.vocoders.clear()  # trained for the codebook that was
        self.speech_decoder = None  # likewise

    def encode(self, waveforms: Sequence[np.ndarray], *, n_q: int | None = None, batch_size: int = 8
               ) -> list[np.ndarray]:
        """Units of 16 kHz mono waveforms: one int64 ``(1, ceil(samples / 320))`` array each, computed one clip
        at a time (so the same whether a clip comes alone or in a list). ``batch_size`` is accepted for the
        codec interface and not needed."""
        self._check_n_q(1 if n_q is None else n_q)
        if not self.codebooks_filled:
            raise ValueError("encode: this whisper-units codec has an empty codebook; call "
                             "fill_codebooks(waveforms) first")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive integer")
        arrays = [checked_waveform(w, i, self.sample_rate) for i, w in enumerate(waveforms)]
        codebook = self.model.codebook
        return [nearest(self.frames(array), codebook)[None].numpy().astype(np.int64) for array in arrays]

    # ---- decode -------------------------------------------------------------------------------------

    def decode(self, units: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        """A float32 16 kHz waveform of ``frames * 320`` samples from ``(T,)`` or ``(1, T)`` units."""
        return self.decode_batch([units])[0]

    def decode_batch(self, units: Sequence[np.ndarray | Sequence[int] | torch.Tensor]) -> list[np.ndarray]:
        self._require_vocoder("decode")
        return self.vocoders[1].decode_batch([self._check_units(u, f"units[{i}]") for i, u in enumerate(units)])

    def decode_stream(self, units: Iterable[int | np.ndarray | Sequence[int] | torch.Tensor], *,
                      chunk: int = 10) -> Iterator[np.ndarray]:
        """Waveform chunks of ``chunk`` units while units are still arriving (`VocoderStream`: each chunk vocoded
        with ``stream_lookahead`` units of context each side and cross-faded into the next)."""
        if chunk < 1:
            raise ValueError(f"chunk={chunk}; expected a positive number of frames")
        self._require_vocoder("decode_stream")
        return VocoderStream(self.vocoders, chunk, self._check_units).run(iter(units))

    @property
    def stream_lookahead(self) -> int:
        self._require_vocoder("stream")
        return self.vocoders[1].lookahead

    # ---- checks -------------------------------------------------------------------------------------

    def _require_vocoder(self, what: str) -> None:
        if 1 not in self.vocoders:
            raise ValueError(f"cannot {what}: this whisper-units codec has no vocoder yet (it has no decoder of "
                             f"its own); train one with `speechlm train-vocoder MANIFEST --codec CODEC_DIR --layers 1`")

    def _check_n_q(self, n_q: int) -> None:
        if n_q != 1:
            raise ValueError(f"n_q={n_q!r}; a whisper-units codec has one layer of units")

    def _check_units(self, units: Any, what: str) -> torch.Tensor:
        return checked_units(units, what, 1, self.codebook_size)


CODEC_FILES = (CONFIG_NAME, WEIGHTS_NAME, f"{VOCODER_FOLDER_PATTERN}/*", f"{SPEECH_DECODER_FOLDER}/*")
