"""The SpeechTokenizer codec: waveforms <-> RVQ units, batched exactly and decoded as a stream.

Exactness, the one promise of this module: an item's units (and its audio) are bit-for-bit the same
whether it is encoded (decoded) alone or in a padded batch, and a stream's chunks concatenate to the
whole decode (to float rounding).

How, given SEANet = convolutions at the audio rate, an LSTM at 50 Hz, convolutions again:
- The high-rate convolutions run one item at a time, through upstream's own modules. On a CPU they
  gain nothing from batching (they are arithmetic-bound; a batch only adds memory traffic).
- The 50 Hz part (the LSTM and the convolution next to it) is batched. Each item is padded before a
  convolution as upstream pads it alone (reflect at its own end), and the encoder's bidirectional LSTM
  runs its backward direction over each item's own frames reversed, so padding never reaches a real
  frame. Batches have at least two rows: one-row matmuls take another kernel and round differently.
- Streamed decode carries the decoder LSTM's state (it is unidirectional) from chunk to chunk, and
  re-runs the non-causal convolutions around it with exactly as much left context and lookahead as
  their receptive field needs, so there is no seam to crossfade.

This module holds the config, the codec and its loading; the exact 50 Hz batching is `codec_batching`,
the streamed decode `codec_streaming`, the k-means that seeds codebooks `codec_kmeans`, and the upstream
package as we import it `codec_upstream`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speechlm.speech_io.codec_batching import ExactLSTM, pad_rows, run_with_lengths, split_at_lstm
from speechlm.speech_io.codec_kmeans import kmeans, nearest
from speechlm.speech_io.codec_streaming import StreamMargins, UnitStream
from speechlm.speech_io.codec_upstream import upstream
from speechlm.speech_io.completion import (
    COMPLETION_FOLDER,
    RVQCompletion,
    check_completion,
    saved_completion,
    voice_waveform,
)
from speechlm.speech_io.config_errors import ConfigProblems
from speechlm.speech_io.constants import SAMPLE_RATE
from speechlm.speech_io.hub_files import HUB_KWARGS, download_repo_folder, hub_name
from speechlm.speech_io.saved_files import read_json_object
from speechlm.speech_io.speech_decoder import SPEECH_DECODER_FOLDER, HoldsSpeechDecoder
from speechlm.speech_io.unit_checks import checked_units, checked_waveform
from speechlm.speech_io.vocoder import (
    VOCODER_FOLDER_PATTERN,
    UnitVocoder,
    VocoderStream,
    add_saved_vocoders,
    vocoder_folder,
)

CHECKPOINT_NAME = "SpeechTokenizer.pt"
CONFIG_NAME = "config.json"
# Written into config.json (upstream ignores unknown keys) by a codec built from a config: its decoder is
# random, so a vocoder trained for it (`vocoder.py`, kept in its folder) decodes its units instead.
DECODER_TRAINED_KEY = "speechlm_decoder_trained"
# Activations upstream can build: it calls act(alpha=1.0), which only ELU accepts, or Snake1d(channels).
SUPPORTED_ACTIVATIONS = ("ELU", "Snake")


@dataclass
class CodecConfig:
    """SpeechTokenizer's architecture; the keys are those of the published ``config.json``."""

    n_filters: int = field(default=64, metadata={"help": "channels of the first conv; doubles at each stride"})
    strides: list[int] = field(default_factory=lambda: [8, 5, 4, 2],
                               metadata={"help": "decoder upsampling ratios; their product is the hop (320)"})
    dimension: int = field(default=1024, metadata={"help": "width of the latent and of the codebooks"})
    semantic_dimension: int = field(default=768, metadata={"help": "width of the HuBERT distillation target"})
    bidirectional: bool = field(default=True, metadata={"help": "encoder LSTM direction (decoder: always not)"})
    dilation_base: int = field(default=2, metadata={"help": "dilation growth across residual layers"})
    residual_kernel_size: int = field(default=3, metadata={"help": "kernel of the residual convs"})
    n_residual_layers: int = field(default=1, metadata={"help": "residual blocks per resolution"})
    lstm_layers: int = field(default=2, metadata={"help": "LSTM layers in encoder and decoder (>= 1)"})
    activation: str = field(default="ELU", metadata={"help": f"one of {SUPPORTED_ACTIVATIONS}"})
    codebook_size: int = field(default=1024, metadata={"help": "codes per RVQ layer"})
    n_q: int = field(default=8, metadata={"help": "RVQ layers; layer 1 is the semantic one"})
    sample_rate: int = field(default=SAMPLE_RATE, metadata={"help": f"audio rate; speechlm works at {SAMPLE_RATE} Hz"})

    def __post_init__(self) -> None:
        problems = ConfigProblems()
        problems.positive_integers(self, "n_filters", "dimension", "semantic_dimension", "dilation_base",
                                   "residual_kernel_size", "n_residual_layers", "lstm_layers", "codebook_size", "n_q")
        if (not isinstance(self.strides, (list, tuple)) or not self.strides
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.strides)):
            problems.append(f"strides={self.strides!r} (expected a non-empty list of positive integers)")
        else:
            self.strides = list(self.strides)
        if not isinstance(self.bidirectional, bool):
            problems.append(f"bidirectional={self.bidirectional!r} (expected true or false)")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            problems.append(f"activation={self.activation!r} (expected one of {SUPPORTED_ACTIVATIONS})")
        if self.sample_rate != SAMPLE_RATE:
            problems.append(f"sample_rate={self.sample_rate!r} (expected {SAMPLE_RATE}: speechlm's audio is 16 kHz)")
        problems.raise_if_any("SpeechTokenizer codec config")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "codec config") -> CodecConfig:
        """The architecture keys of ``data``; other keys (published configs carry training settings) are ignored."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"{source}: missing SpeechTokenizer config keys {missing}; expected all of {names}")
        try:
            return cls(**{name: data[name] for name in names})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides)


class SpeechTokenizerCodec(HoldsSpeechDecoder):
    """SpeechTokenizer as speechlm uses it: 16 kHz waveforms <-> int64 units ``(n_q, frames)`` at 50 Hz.

    Build it with ``from_pretrained`` (a published or saved directory) or ``from_config`` (random
    weights, empty codebooks: call ``fill_codebooks`` before encoding). The model is always in eval
    mode: in training mode upstream's quantizer would start a k-means and update its codebooks.

    Units decode with SpeechTokenizer's own decoder, unless that decoder is untrained (a codec built from
    a config) and `UnitVocoder`s were trained for the codec (``vocoders``, by the RVQ layers each reads,
    saved in its ``vocoder-rvq<k>/`` folders): then the vocoder for the units' layers decodes them
    (``decodes_with``).
    """

    def __init__(self, model: nn.Module, config: CodecConfig, *, decoder_trained: bool = True,
                 vocoders: Mapping[int, UnitVocoder] | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.decoder_trained = decoder_trained
        self.vocoders: dict[int, UnitVocoder] = {}
        self.completion: RVQCompletion | None = None  # layers 2..n_q from a voice prompt (`complete`)
        for vocoder in (vocoders or {}).values():
            self.add_vocoder(vocoder)
        self._lstm_runners: dict[int, ExactLSTM] = {}

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: CodecConfig | Mapping[str, Any], *, seed: int | None = None) -> SpeechTokenizerCodec:
        """A codec with random weights (seeded if ``seed`` is given) and empty codebooks.

        The encoder's convolutions are re-drawn to keep the signal's scale (He-normal weights, zero biases):
        with upstream's initialization each layer shrinks the signal until the biases dominate, and the
        latents barely vary with the audio, so units carry little of it (BENCHMARKS.md, "Speech out")."""
        if not isinstance(config, CodecConfig):
            config = CodecConfig.from_dict(config)
        builder = upstream()["SpeechTokenizer"]
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            # Upstream builds with the old weight_norm; its FutureWarning is nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*weight_norm", category=FutureWarning)
            if seed is not None:
                torch.manual_seed(seed)
            model = builder(config.to_dict())
            _keep_scale(model.encoder)
            return cls(model, config, decoder_trained=False)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                        subfolder: str = "", **hub_kwargs) -> SpeechTokenizerCodec:
        """Load ``config.json`` + a ``.pt`` state dict: a directory, a config (or .pt) file path, or a Hub repo
        id followed by the folder that holds them, as published: ``fnlp/SpeechTokenizer/speechtokenizer_hubert_avg``
        (or ``subfolder=``). ``hub_kwargs`` (``revision``, ``token``, ``cache_dir``, ``local_files_only``) go to
        the download; offline, the files come from the Hub cache.

        A directory with several ``.pt`` files needs ``checkpoint=`` unless one is ``SpeechTokenizer.pt``.
        """
        unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
        if unknown:
            raise TypeError(f"SpeechTokenizerCodec.from_pretrained: unexpected keyword arguments {unknown}; it takes "
                            f"checkpoint, subfolder, {', '.join(HUB_KWARGS)}")
        if hub_name(path) is not None:
            checkpoint_name = Path(checkpoint).name if checkpoint is not None else None
            path = download_repo_folder("SpeechTokenizer codec", str(path), subfolder=subfolder,
                                        patterns=(CONFIG_NAME, checkpoint_name or "*.pt", f"{VOCODER_FOLDER_PATTERN}/*",
                                                  f"{SPEECH_DECODER_FOLDER}/*", f"{COMPLETION_FOLDER}/*"),
                                        **hub_kwargs)
            checkpoint = None if checkpoint_name is None else path / checkpoint_name
        else:
            path = Path(path) / subfolder
        config_path, checkpoint_path = _resolve_files(Path(path), None if checkpoint is None else Path(checkpoint))
        data = read_json_object(config_path, "SpeechTokenizer settings")
        codec = cls.from_config(CodecConfig.from_dict(data, source=str(config_path)))
        codec.decoder_trained = data.get(DECODER_TRAINED_KEY, True) is not False
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises pickle, zip and runtime errors alike for a bad file
            raise ValueError(f"{checkpoint_path}: not a loadable torch state dict ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from err
        _load_state(codec.model, state, checkpoint_path)
        add_saved_vocoders(codec, config_path.parent)
        codec._load_speech_decoder(config_path.parent)
        completion = saved_completion(config_path.parent)
        if completion is not None:
            try:
                codec.add_completion(completion)
            except ValueError as err:
                raise ValueError(f"{config_path.parent / COMPLETION_FOLDER}: {err}") from None
        return codec

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``SpeechTokenizer.pt`` (plain tensors), the published layout, and the
        vocoder (if any) in ``vocoder/``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        data = self.config.to_dict() | ({} if self.decoder_trained else {DECODER_TRAINED_KEY: False})
        (out / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
        state = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        torch.save(state, out / CHECKPOINT_NAME)
        for layers, vocoder in self.vocoders.items():
            vocoder.save_pretrained(out / vocoder_folder(layers))
        self._save_speech_decoder(out)
        if self.completion is not None:
            self.completion.save_pretrained(out / COMPLETION_FOLDER)

    def add_completion(self, model: RVQCompletion) -> None:
        """Complete layer-1 units to all layers in a voice's prompt with ``model``, trained for these codebooks."""
        self.completion = check_completion(model, self.codebook_vectors(self.n_q))

    def voice_prompt(self, voice: Any) -> np.ndarray:
        """The codes ``(n_q, frames)`` of a voice prompt for `complete`: a recording (a file path, resampled to
        16 kHz, or a 16 kHz array) of at least 1 s that is not silent. Encode it once for many completions."""
        self._require_completion()
        return self.encode([voice_waveform(voice)], n_q=self.n_q)[0]

    def complete(self, units: np.ndarray | Sequence[int] | torch.Tensor, voice: Any) -> np.ndarray:
        """Layer-1 ``units`` ``(T,)`` -> all ``n_q`` layers ``(n_q, T)`` in the voice of ``voice`` (`voice_prompt`'s
        codes, or a recording it takes), by the codec's completion model (`speechlm train-completion`). Decode
        the result with `decode`."""
        self._require_completion()
        layer_1 = self._check_units(units, "units")
        if layer_1.shape[0] != 1:
            raise ValueError(f"units of {layer_1.shape[0]} layers; completion starts from layer 1 alone")
        codes = np.asarray(voice) if isinstance(voice, (np.ndarray, torch.Tensor)) else None
        if codes is None or codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            codes = self.voice_prompt(voice)
        return self.completion.complete(layer_1[0], torch.from_numpy(codes.astype(np.int64))).numpy()

    def _require_completion(self) -> None:
        if self.completion is None:
            raise ValueError("this codec has no completion model (completion/ in its folder) to speak in a given "
                             "voice; train one with `speechlm train-completion MANIFEST --codec CODEC_DIR`")

    def add_vocoder(self, vocoder: UnitVocoder) -> None:
        """Decode units of ``vocoder.config.num_layers`` layers with ``vocoder`` while the decoder is untrained."""
        c = vocoder.config
        if (c.codebook_size, c.codebook_dimension) != (self.codebook_size, self.config.dimension) or c.num_layers > self.n_q:
            raise ValueError(f"a vocoder for {c.num_layers} layers of {c.codebook_size} codes of width "
                             f"{c.codebook_dimension} does not fit this codec ({self.n_q} layers of "
                             f"{self.codebook_size} codes of width {self.config.dimension})")
        if self.codebooks_filled and not torch.equal(vocoder.codebooks, self.codebook_vectors(c.num_layers).reshape(
                -1, c.codebook_dimension)):
            raise ValueError(f"the vocoder for {c.num_layers} layers was trained on other codebooks than this codec's "
                             f"(a codec rebuilt or refilled since); train it again with speechlm train-vocoder")
        self.vocoders[c.num_layers] = vocoder.eval()

    def codebook_vectors(self, num_layers: int) -> torch.Tensor:
        """The first ``num_layers`` layers' codebooks ``(num_layers, codebook_size, dimension)``: a unit's vector
        in the latent space the decoder reads (a frame's latent is the sum over its layers)."""
        return torch.stack([layer._codebook.embed.detach().clone() for layer in self._rvq_layers()[:num_layers]])

    # ---- facts --------------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def frame_rate(self) -> int:
        return self.sample_rate // self.hop_length

    def decodes_with(self, layers: int = 1) -> str:
        """``"vocoder"`` where a trained vocoder reads units of ``layers`` layers and the decoder is untrained,
        else ``"speechtokenizer"`` (a published checkpoint's decoder always decodes)."""
        return "vocoder" if not self.decoder_trained and layers in self.vocoders else "speechtokenizer"

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def n_q(self) -> int:
        return self.config.n_q

    @property
    def codebook_dimension(self) -> int:
        return self.config.dimension

    def num_frames(self, num_samples: int) -> int:
        """Units per layer for ``num_samples`` of audio: every started hop gets a frame."""
        return math.ceil(num_samples / self.hop_length)

    # ---- codebooks ----------------------------------------------------------------------------------

    @property
    def codebooks_filled(self) -> bool:
        return all(bool(layer._codebook.inited.item()) for layer in self._rvq_layers())

    @torch.inference_mode()
    def fill_codebooks(self, waveforms: Sequence[np.ndarray] | None = None, *, seed: int = 0,
                       kmeans_iters: int = 5) -> None:
        """Give every RVQ layer a deterministic codebook, so that different audio gets different units.

        With ``waveforms``: a seeded k-means (``kmeans_iters`` rounds, seeded from a random subset) of
        the encoder's latents for layer 1, of what layer 1 leaves over for layer 2, and so on. Without:
        seeded gaussian codebooks (std halving per layer, as residuals shrink). Either way the ``inited``
        flags are set, so upstream never starts its own k-means.
        """
        generator = torch.Generator().manual_seed(seed)
        residual = None
        if waveforms is not None:
            arrays = [self._check_waveform(w, i) for i, w in enumerate(waveforms)]
            if not arrays:
                raise ValueError("fill_codebooks got an empty list of waveforms; pass audio or None")
            residual = torch.cat([latent.T for latent in self._latents(arrays, batch_size=8)])  # N, D
        for index, layer in enumerate(self._rvq_layers()):
            book = layer._codebook
            size, dim = book.embed.shape
            if residual is None:
                embed = torch.randn(size, dim, generator=generator) * 0.5**index
                counts = torch.zeros(size)
            else:
                embed, counts = kmeans(residual, size, kmeans_iters, generator)
                residual = residual - embed[nearest(residual, embed)]
            book.embed.copy_(embed)
            book.embed_avg.copy_(embed)
            book.cluster_size.copy_(counts)
            book.inited.fill_(1.0)
        self.vocoders.clear()  # trained for the codebooks that were
        self.speech_decoder = None  # likewise
        self.completion = None  # likewise

    # ---- encode -------------------------------------------------------------------------------------

    def encode(self, waveforms: Sequence[np.ndarray], *, n_q: int | None = None, batch_size: int = 8
               ) -> list[np.ndarray]:
        """Units of 16 kHz mono waveforms: one int64 ``(n_q, ceil(samples / 320))`` array each.

        Items are sorted by length and run ``batch_size`` at a time; each item's units are exactly
        those it gets alone (see the module docstring).
        """
        n_q = self._check_n_q(n_q)
        self._require_codebooks("encode")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive integer")
        arrays = [self._check_waveform(w, i) for i, w in enumerate(waveforms)]
        quantizer = self.model.quantizer
        with torch.inference_mode():
            latents = self._latents(arrays, batch_size=batch_size)
            # RVQ works frame by frame, so one item at a time costs nothing in exactness or speed here.
            return [quantizer.encode(latent[None], n_q=n_q)[:, 0].numpy().astype(np.int64) for latent in latents]

    def _latents(self, arrays: list[np.ndarray], *, batch_size: int) -> list[torch.Tensor]:
        """Encoder outputs ``(D, frames)`` per waveform; items of similar length share a 50 Hz batch."""
        pre, lstm, post = split_at_lstm(self.model.encoder.model)
        order = sorted(range(len(arrays)), key=lambda i: arrays[i].shape[0])
        latents: list[torch.Tensor | None] = [None] * len(arrays)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                items = order[start:start + batch_size]
                hidden = [pre(torch.from_numpy(arrays[i])[None, None]) for i in items]  # 1, C, frames each
                x, lengths = pad_rows(hidden)
                x = self._lstm(lstm)(x, lengths)
                x, lengths = run_with_lengths(post, x, lengths)
                for row, i in enumerate(items):
                    assert lengths[row] == self.num_frames(arrays[i].shape[0]), (lengths[row], arrays[i].shape)
                    latents[i] = x[row, :, : lengths[row]].clone()
        return latents  # type: ignore[return-value]

    def _lstm(self, module: nn.Module) -> ExactLSTM:
        """The exact batched runner for one of upstream's SLSTMs (built once: it shares their weights)."""
        if id(module) not in self._lstm_runners:
            self._lstm_runners[id(module)] = ExactLSTM(module)
        return self._lstm_runners[id(module)]

    # ---- decode -------------------------------------------------------------------------------------

    def decode(self, units: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        """A float32 16 kHz waveform of ``frames * 320`` samples.

        ``units``: layer-1 units only (``(T,)`` or ``(1, T)``) or the first k layers ``(k, T)``, k <= n_q.
        """
        return self.decode_batch([units])[0]

    def decode_batch(self, units: Sequence[np.ndarray | Sequence[int] | torch.Tensor]) -> list[np.ndarray]:
        """``decode`` for several unit arrays (same number of layers), batched exactly."""
        self._require_codebooks("decode")
        codes = [self._check_units(u, f"units[{i}]") for i, u in enumerate(units)]
        if not codes:
            return []
        layers = {c.shape[0] for c in codes}
        if len(layers) > 1:
            raise ValueError(f"decode_batch got unit arrays with {sorted(layers)} layers; expected one count")
        if self.decodes_with(codes[0].shape[0]) == "vocoder":
            return self.vocoders[codes[0].shape[0]].decode_batch(codes)
        pre, lstm, post = split_at_lstm(self.model.decoder.model)
        with torch.inference_mode():
            # RVQ lookup is per frame; one item at a time keeps each item's arithmetic its own.
            latents = [self.model.quantizer.decode(c[:, None, :]) for c in codes]  # 1, D, frames each
            x, lengths = pad_rows(latents)
            x, lengths = run_with_lengths(pre, x, lengths)
            x = self._lstm(lstm)(x, lengths)
            return [post(x[row:row + 1, :, :length])[0, 0].numpy().astype(np.float32)
                    for row, length in enumerate(lengths[: len(codes)])]

    def decode_stream(self, units: Iterable[int | np.ndarray | Sequence[int] | torch.Tensor], *,
                      chunk: int = 10) -> Iterator[np.ndarray]:
        """Waveform chunks of ``chunk`` frames (``chunk * 320`` samples) while units are still arriving.

        ``units`` yields an int (one layer-1 unit), a 1-D array (several layer-1 units) or a ``(k, t)``
        array (k layers), with k fixed for the stream. A chunk is yielded as soon as ``chunk`` frames
        are final: that needs ``stream_lookahead`` more units (the decoder's non-causal convolutions
        look ahead). The last chunk holds what is left when the iterator ends. Concatenated, the
        chunks equal ``decode`` of all the units (to float rounding).
        """
        if chunk < 1:
            raise ValueError(f"chunk={chunk}; expected a positive number of frames")
        self._require_codebooks("decode_stream")
        return self._stream(iter(units), chunk)

    def _stream(self, items: Iterator, chunk: int) -> Iterator[np.ndarray]:
        # The first item's layers choose the decoder, as `decode_batch` chooses by its units' layers.
        first = next(items, None)
        if first is None:
            return
        layers = np.shape(first)[0] if np.ndim(first) == 2 else 1  # the stream checks every item as it comes
        stream = VocoderStream(self.vocoders, chunk, self._check_units) if self.decodes_with(layers) == "vocoder" \
            else UnitStream(self, chunk)
        yield from stream.run(itertools.chain([first], items))

    @property
    def stream_lookahead(self) -> int:
        """Units that must follow a frame before its audio is final (the decoder's right reach; a vocoder's
        when one decodes layer-1 units)."""
        if self.decodes_with(1) == "vocoder":
            return self.vocoders[1].lookahead
        margins = StreamMargins.of(self.model.decoder.model)
        return margins.pre_right + margins.post_right

    # ---- checks -------------------------------------------------------------------------------------

    def _rvq_layers(self) -> list[nn.Module]:
        return list(self.model.quantizer.vq.layers)

    def _require_codebooks(self, what: str) -> None:
        if not self.codebooks_filled:
            raise ValueError(f"{what}: the codec's codebooks are empty (a freshly built SpeechTokenizer); "
                             f"load a trained checkpoint or call fill_codebooks(waveforms or None) first")

    def _check_n_q(self, n_q: int | None) -> int:
        if n_q is None:
            return self.n_q
        if isinstance(n_q, bool) or not isinstance(n_q, int) or not 1 <= n_q <= self.n_q:
            raise ValueError(f"n_q={n_q!r}; this codec has {self.n_q} RVQ layers, expected 1 to {self.n_q}")
        return n_q

    def _check_waveform(self, waveform: Any, index: int) -> np.ndarray:
        return checked_waveform(waveform, index, self.sample_rate)

    def _check_units(self, units: Any, what: str) -> torch.Tensor:
        """Units as a long tensor ``(k, T)``; 1-D input is layer 1."""
        return checked_units(units, what, self.n_q, self.codebook_size)


# ---- loading ------------------------------------------------------------------------------------------


def _keep_scale(encoder: nn.Module) -> None:
    """He-normal convolution weights and zero biases, so a random encoder passes the signal's scale on."""
    for module in encoder.modules():
        if not isinstance(module, nn.Conv1d):
            continue
        weight = nn.init.kaiming_normal_(torch.empty_like(module.weight), nonlinearity="relu")
        if hasattr(module, "weight_v"):  # upstream's (old-style) weight norm: weight = g * v / |v|
            module.weight_v.data.copy_(weight)
            module.weight_g.data.copy_(weight.norm(dim=(1, 2), keepdim=True))
        else:
            module.weight.data.copy_(weight)
        if module.bias is not None:
            module.bias.data.zero_()


def _resolve_files(path: Path, checkpoint: Path | None) -> tuple[Path, Path]:
    """(config.json, checkpoint) from a directory, a config file or a checkpoint file."""
    if path.is_dir():
        config = path / CONFIG_NAME
        folder = path
    elif path.suffix == ".pt":
        config, folder = path.parent / CONFIG_NAME, path.parent
        checkpoint = checkpoint or path
    elif path.exists():
        config, folder = path, path.parent
    else:
        raise FileNotFoundError(f"{path}: no such codec directory or file; expected a directory with "
                                f"{CONFIG_NAME} and a .pt state dict")
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing; a SpeechTokenizer codec needs {CONFIG_NAME} beside its "
                                f"state dict")
    if checkpoint is None:
        candidates = sorted(folder.glob("*.pt"))
        named = [c for c in candidates if c.name == CHECKPOINT_NAME]
        if named:
            checkpoint = named[0]
        elif len(candidates) == 1:
            checkpoint = candidates[0]
        elif not candidates:
            raise FileNotFoundError(f"{folder}: no .pt state dict found; expected {CHECKPOINT_NAME} (or pass "
                                    f"checkpoint=...)")
        else:
            raise ValueError(f"{folder}: several .pt files ({', '.join(c.name for c in candidates)}); pass "
                             f"checkpoint=... to choose one")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint file not found")
    return config, checkpoint


def _load_state(model: nn.Module, state: Any, source: Path) -> None:
    """load_state_dict, with errors that name the file and the first offending keys."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source}: expected a state dict of tensors (as torch.save(model.state_dict())), "
                         f"got {type(state).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches, checkpoint vs config (first: {wrong[:5]})")
        raise ValueError(f"{source}: state dict does not match the architecture in {CONFIG_NAME}: "
                         + "; ".join(parts))
    model.load_state_dict(state)
