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
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from speechlm.speech_io.constants import SAMPLE_RATE
from speechlm.speech_io.hub_files import HUB_KWARGS, download_repo_folder, hub_name

CHECKPOINT_NAME = "SpeechTokenizer.pt"
CONFIG_NAME = "config.json"
INSTALL_HINT = "pip install --no-deps speechtokenizer==1.0.1"
# Activations upstream can build: it calls act(alpha=1.0), which only ELU accepts, or Snake1d(channels).
SUPPORTED_ACTIVATIONS = ("ELU", "Snake")


def import_speechtokenizer_model() -> ModuleType:
    """``speechtokenizer.model`` without running the package ``__init__``.

    speechtokenizer 1.0.1's ``__init__`` imports its trainer, which needs beartype and a torchaudio
    that does not load beside current torch. The model needs neither, so we register an empty package
    module (its ``__path__`` from the installed package, its ``__init__`` never executed) and import
    the model module from it. This is the only place that knows about the problem.
    """
    if "speechtokenizer" not in sys.modules:
        spec = importlib.util.find_spec("speechtokenizer")  # finding a spec runs no package code
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"the SpeechTokenizer codec needs the speechtokenizer package: {INSTALL_HINT} "
                              f"(--no-deps: its declared requirements are its trainer's)")
        sys.modules["speechtokenizer"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("speechtokenizer.model")


def _upstream() -> dict[str, Any]:
    """The upstream classes and helpers this module walks; the layout test pins them."""
    model = import_speechtokenizer_model()
    conv = importlib.import_module("speechtokenizer.modules.conv")
    seanet = importlib.import_module("speechtokenizer.modules.seanet")
    lstm = importlib.import_module("speechtokenizer.modules.lstm")
    return {
        "SpeechTokenizer": model.SpeechTokenizer,
        "SConv1d": conv.SConv1d,
        "SConvTranspose1d": conv.SConvTranspose1d,
        "pad1d": conv.pad1d,
        "extra_padding": conv.get_extra_padding_for_conv1d,
        "SEANetResnetBlock": seanet.SEANetResnetBlock,
        "Snake1d": seanet.Snake1d,
        "SLSTM": lstm.SLSTM,
    }


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
        problems = []
        for name in ("n_filters", "dimension", "semantic_dimension", "dilation_base", "residual_kernel_size",
                     "n_residual_layers", "lstm_layers", "codebook_size", "n_q"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} (expected a positive integer)")
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
        if problems:
            raise ValueError("invalid SpeechTokenizer codec config: " + "; ".join(problems))

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


class SpeechTokenizerCodec:
    """SpeechTokenizer as speechlm uses it: 16 kHz waveforms <-> int64 units ``(n_q, frames)`` at 50 Hz.

    Build it with ``from_pretrained`` (a published or saved directory) or ``from_config`` (random
    weights, empty codebooks: call ``fill_codebooks`` before encoding). The model is always in eval
    mode: in training mode upstream's quantizer would start a k-means and update its codebooks.
    """

    def __init__(self, model: nn.Module, config: CodecConfig) -> None:
        self.model = model.eval()
        self.config = config
        self._lstm_runners: dict[int, _ExactLSTM] = {}

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: CodecConfig | Mapping[str, Any], *, seed: int | None = None) -> SpeechTokenizerCodec:
        """A codec with random weights (seeded if ``seed`` is given) and empty codebooks."""
        if not isinstance(config, CodecConfig):
            config = CodecConfig.from_dict(config)
        builder = _upstream()["SpeechTokenizer"]
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            # Upstream builds with the old weight_norm; its FutureWarning is nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*weight_norm", category=FutureWarning)
            if seed is not None:
                torch.manual_seed(seed)
            return cls(builder(config.to_dict()), config)

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
                                        patterns=(CONFIG_NAME, checkpoint_name or "*.pt"), **hub_kwargs)
            checkpoint = None if checkpoint_name is None else path / checkpoint_name
        else:
            path = Path(path) / subfolder
        config_path, checkpoint_path = _resolve_files(Path(path), None if checkpoint is None else Path(checkpoint))
        try:
            data = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{config_path}: not a readable JSON config ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{config_path}: expected a JSON object of SpeechTokenizer settings")
        codec = cls.from_config(CodecConfig.from_dict(data, source=str(config_path)))
        try:
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises pickle, zip and runtime errors alike for a bad file
            raise ValueError(f"{checkpoint_path}: not a loadable torch state dict ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from err
        _load_state(codec.model, state, checkpoint_path)
        return codec

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``SpeechTokenizer.pt`` (plain tensors), the published layout."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {key: value.detach().clone() for key, value in self.model.state_dict().items()}
        torch.save(state, out / CHECKPOINT_NAME)

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

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def n_q(self) -> int:
        return self.config.n_q

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
                embed, counts = _kmeans(residual, size, kmeans_iters, generator)
                residual = residual - embed[_nearest(residual, embed)]
            book.embed.copy_(embed)
            book.embed_avg.copy_(embed)
            book.cluster_size.copy_(counts)
            book.inited.fill_(1.0)

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
        pre, lstm, post = _split_at_lstm(self.model.encoder.model)
        order = sorted(range(len(arrays)), key=lambda i: arrays[i].shape[0])
        latents: list[torch.Tensor | None] = [None] * len(arrays)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                items = order[start:start + batch_size]
                hidden = [pre(torch.from_numpy(arrays[i])[None, None]) for i in items]  # 1, C, frames each
                x, lengths = _pad_rows(hidden)
                x = self._lstm(lstm)(x, lengths)
                x, lengths = _run_with_lengths(post, x, lengths)
                for row, i in enumerate(items):
                    assert lengths[row] == self.num_frames(arrays[i].shape[0]), (lengths[row], arrays[i].shape)
                    latents[i] = x[row, :, : lengths[row]].clone()
        return latents  # type: ignore[return-value]

    def _lstm(self, module: nn.Module) -> _ExactLSTM:
        """The exact batched runner for one of upstream's SLSTMs (built once: it shares their weights)."""
        if id(module) not in self._lstm_runners:
            self._lstm_runners[id(module)] = _ExactLSTM(module)
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
        pre, lstm, post = _split_at_lstm(self.model.decoder.model)
        with torch.inference_mode():
            # RVQ lookup is per frame; one item at a time keeps each item's arithmetic its own.
            latents = [self.model.quantizer.decode(c[:, None, :]) for c in codes]  # 1, D, frames each
            x, lengths = _pad_rows(latents)
            x, lengths = _run_with_lengths(pre, x, lengths)
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
        return _UnitStream(self, chunk).run(units)

    @property
    def stream_lookahead(self) -> int:
        """Units that must follow a frame before its audio is final (the decoder's right reach)."""
        margins = _StreamMargins.of(self.model.decoder.model)
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
        array = np.asarray(waveform)
        if array.ndim != 1 or array.shape[0] == 0:
            raise ValueError(f"waveform {index} has shape {array.shape}; expected a non-empty mono (samples,) "
                             f"array at {self.sample_rate} Hz (load it with speech_io.audio.load_audio)")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"waveform {index} has dtype {array.dtype}; expected float samples in [-1, 1]")
        if not np.isfinite(array).all():
            raise ValueError(f"waveform {index} holds NaN or infinite samples; expected finite values")
        return np.ascontiguousarray(array, dtype=np.float32)

    def _check_units(self, units: Any, what: str) -> torch.Tensor:
        """Units as a long tensor ``(k, T)``; 1-D input is layer 1."""
        array = units.detach().cpu().numpy() if isinstance(units, torch.Tensor) else np.asarray(units)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2:
            raise ValueError(f"{what} has shape {array.shape}; expected (T,) layer-1 units or (k, T) with "
                             f"k <= {self.n_q} layers")
        if array.shape[0] < 1 or array.shape[0] > self.n_q:
            raise ValueError(f"{what} has shape {array.shape}: {array.shape[0]} layers, but the codec has "
                             f"{self.n_q}; expected (k, T) with 1 <= k <= {self.n_q}")
        if array.shape[1] == 0:
            raise ValueError(f"{what} has shape {array.shape}: no frames; expected at least one unit")
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{what} has dtype {array.dtype}; expected integer units")
        bad = (array < 0) | (array >= self.codebook_size)
        if bad.any():
            layer, frame = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(f"{what}: unit {int(array[layer, frame])} at layer {layer}, frame {frame} is outside "
                             f"the codebook [0, {self.codebook_size})")
        return torch.from_numpy(array.astype(np.int64))


# ---- loading ------------------------------------------------------------------------------------------


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


# ---- k-means for codebooks -------------------------------------------------------------------------------


def _nearest(samples: torch.Tensor, means: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Index of the nearest mean for every sample, in blocks to bound memory."""
    norms = means.pow(2).sum(1)
    return torch.cat([(norms - 2 * part @ means.T).argmin(1) for part in samples.split(block)])


def _kmeans(samples: torch.Tensor, size: int, iters: int, generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(means ``(size, D)``, cluster sizes) from a seeded subset and ``iters`` Lloyd rounds."""
    # Seed from distinct frames only: repeated frames (e.g. zero residuals of one-member clusters)
    # would make identical codes, whose ties float rounding then breaks either way.
    distinct = torch.unique(samples, dim=0)
    count = distinct.shape[0]
    if count >= size:
        means = distinct[torch.randperm(count, generator=generator)[:size]].clone()
    else:
        # Fewer distinct frames than codes: add jittered copies, well apart so that no two codes nearly tie.
        extra = distinct[torch.randint(count, (size - count,), generator=generator)]
        scale = samples.std(0).clamp_min(1e-3) * 0.5
        means = torch.cat([distinct, extra + scale * torch.randn(size - count, samples.shape[1], generator=generator)])
    sizes = torch.zeros(size)
    for _ in range(iters):
        assign = _nearest(samples, means)
        sizes = torch.bincount(assign, minlength=size).float()
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        filled = sizes > 0
        means[filled] = sums[filled] / sizes[filled, None]  # empty clusters keep their seed
    return means, sizes


# ---- exact batching at 50 Hz ----------------------------------------------------------------------------


def _split_at_lstm(seanet: nn.Sequential) -> tuple[nn.Sequential, nn.Module, nn.Sequential]:
    """(layers before, the SLSTM, layers after) of a SEANet encoder's or decoder's ``model``."""
    lstm_type = _upstream()["SLSTM"]
    where = [i for i, module in enumerate(seanet) if isinstance(module, lstm_type)]
    if len(where) != 1:
        raise TypeError(f"expected one SLSTM in SpeechTokenizer's SEANet, found {len(where)}; speechtokenizer's "
                        f"layout changed (expected 1.0.1: {INSTALL_HINT})")
    return seanet[: where[0]], seanet[where[0]], seanet[where[0] + 1:]


def _pad_rows(items: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """``(1, C, T_i)`` tensors as one right-padded ``(B, C, T_max)`` batch of at least two rows.

    A one-row batch would send the LSTM's matmuls down the matrix-vector path, which rounds
    differently; a zero row keeps an item alone bit-identical to the same item in a batch.
    """
    lengths = [item.shape[-1] for item in items]
    batch = items[0].new_zeros(max(len(items), 2), items[0].shape[1], max(lengths))
    for row, item in enumerate(items):
        batch[row, :, : lengths[row]] = item[0]
    return batch, lengths + [1] * (batch.shape[0] - len(items))


def _run_with_lengths(module: nn.Module, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
    """``module(x)`` for a right-padded batch ``(B, C, T)``, as if each item ran alone.

    For the stacks next to the LSTM: stride-1 convolutions and elementwise activations. Returns the
    output (junk past each length) and each item's output length.
    """
    up = _upstream()
    if isinstance(module, nn.Sequential):
        for child in module:
            x, lengths = _run_with_lengths(child, x, lengths)
        return x, lengths
    if isinstance(module, up["SConv1d"]):
        return _conv_with_lengths(module, x, lengths, up)
    if isinstance(module, (nn.Identity, nn.ELU, up["Snake1d"])):  # elementwise: padding cannot leak
        return module(x), lengths
    raise TypeError(f"unexpected {type(module).__name__} next to SpeechTokenizer's LSTM; speechtokenizer's "
                    f"layout changed (expected 1.0.1: {INSTALL_HINT})")


def _conv_with_lengths(module: nn.Module, x: torch.Tensor, lengths: list[int], up: dict[str, Any]
                       ) -> tuple[torch.Tensor, list[int]]:
    """SConv1d per item: each item padded as upstream pads it alone, then one batched convolution."""
    conv = module.conv.conv
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    padding_total = (kernel - 1) * dilation - (stride - 1)
    if padding_total == 0 and stride == 1:
        return module.conv(x), lengths  # a pointwise conv: nothing crosses item boundaries
    pieces = []
    for row, length in enumerate(lengths):
        item = x[row:row + 1, :, :length]
        extra = up["extra_padding"](item, kernel, stride, padding_total)
        if module.causal:
            paddings = (padding_total, extra)
        else:
            right = padding_total // 2
            paddings = (padding_total - right, right + extra)
        pieces.append(up["pad1d"](item, paddings, mode=module.pad_mode))
    padded = x.new_zeros(x.shape[0], x.shape[1], max(p.shape[-1] for p in pieces))
    for row, piece in enumerate(pieces):
        padded[row, :, : piece.shape[-1]] = piece[0]
    span = dilation * (kernel - 1) + 1
    return module.conv(padded), [(p.shape[-1] - span) // stride + 1 for p in pieces]


class _ExactLSTM:
    """An SLSTM over a right-padded batch, each item's frames unaffected by the padding.

    A unidirectional LSTM never looks right, so padding at the end is harmless. A bidirectional one
    is run layer by layer and direction by direction (one-direction LSTMs sharing upstream's weight
    tensors): the backward direction reads each item's own frames reversed, so it starts at the
    item's end rather than at the padding.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        lstm = module.lstm
        self.directions: list[tuple[nn.LSTM, nn.LSTM]] = []
        if module.bidirectional:
            for layer in range(lstm.num_layers):
                self.directions.append((self._one_direction(lstm, layer, ""),
                                        self._one_direction(lstm, layer, "_reverse")))

    @staticmethod
    def _one_direction(lstm: nn.LSTM, layer: int, suffix: str) -> nn.LSTM:
        weight_ih = getattr(lstm, f"weight_ih_l{layer}{suffix}")
        single = nn.LSTM(weight_ih.shape[1], lstm.hidden_size, 1, bias=lstm.bias)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if lstm.bias else ("weight_ih", "weight_hh"):
            setattr(single, f"{name}_l0", getattr(lstm, f"{name}_l{layer}{suffix}"))  # shared, not copied
        return single.eval()

    def __call__(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        steps = x.permute(2, 0, 1)  # T, B, C
        if self.module.bidirectional:
            out = steps
            for forward, backward in self.directions:
                ahead, _ = forward(out)
                behind, _ = backward(_reverse_each(out, lengths))
                out = torch.cat([ahead, _reverse_each(behind, lengths)], dim=-1)
            steps = steps.repeat(1, 1, 2)  # upstream's skip for a doubled width
        else:
            out, _ = self.module.lstm(steps)
        if self.module.skip:
            out = out + steps
        return out.permute(1, 2, 0)  # B, C, T


def _reverse_each(steps: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Reverse each item's first ``length`` steps of a ``(T, B, C)`` batch; padding stays in place."""
    time = torch.arange(steps.shape[0])[:, None]  # T, 1
    ends = torch.tensor(lengths)[None, :]  # 1, B
    index = torch.where(time < ends, ends - 1 - time, time)  # T, B
    return steps.gather(0, index[:, :, None].expand_as(steps))


# ---- streamed decode --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamMargins:
    """Receptive field of the decoder around its LSTM, in frames: what a chunk needs on each side."""

    pre_left: int
    pre_right: int
    post_left: int
    post_right: int

    @staticmethod
    def of(decoder: nn.Sequential) -> _StreamMargins:
        pre, lstm, post = _split_at_lstm(decoder)
        assert not lstm.bidirectional, "streaming carries a unidirectional decoder LSTM's state"
        pre_left, pre_right, _ = _reach(pre, 1.0)
        post_left, post_right, _ = _reach(post, 1.0)
        return _StreamMargins(math.ceil(pre_left), math.ceil(pre_right),
                              math.ceil(post_left) + 1, math.ceil(post_right) + 1)


def _reach(module: nn.Module, frames_per_sample: float) -> tuple[float, float, float]:
    """(left, right) reach of ``module`` in frames, and the frames-per-sample of its output.

    Upper bounds: exact for stride-1 convolutions, generous by one input sample for transposed ones.
    """
    up = _upstream()
    if isinstance(module, nn.Sequential):
        left = right = 0.0
        for child in module:
            child_left, child_right, frames_per_sample = _reach(child, frames_per_sample)
            left, right = left + child_left, right + child_right
        return left, right, frames_per_sample
    if isinstance(module, up["SConv1d"]):
        conv = module.conv.conv
        assert conv.stride[0] == 1, "the decoder's convolutions do not downsample"
        total = (conv.kernel_size[0] - 1) * conv.dilation[0]
        left, right = (total, 0) if module.causal else (total - total // 2, total // 2)
        return left * frames_per_sample, right * frames_per_sample, frames_per_sample
    if isinstance(module, up["SConvTranspose1d"]):
        kernel, stride = module.convtr.convtr.kernel_size[0], module.convtr.convtr.stride[0]
        reach = (kernel / stride + 1) * frames_per_sample
        return reach, reach, frames_per_sample / stride
    if isinstance(module, up["SEANetResnetBlock"]):
        block_left, block_right, _ = _reach(module.block, frames_per_sample)
        short_left, short_right, _ = _reach(module.shortcut, frames_per_sample)
        return max(block_left, short_left), max(block_right, short_right), frames_per_sample
    if isinstance(module, (nn.Identity, nn.ELU, up["Snake1d"])):
        return 0.0, 0.0, frames_per_sample
    raise TypeError(f"unexpected {type(module).__name__} in SpeechTokenizer's decoder; speechtokenizer's "
                    f"layout changed (expected 1.0.1: {INSTALL_HINT})")


class _UnitStream:
    """State of one streamed decode: units so far, the LSTM's carried state, frames already emitted."""

    def __init__(self, codec: SpeechTokenizerCodec, chunk: int) -> None:
        self.codec = codec
        self.chunk = chunk
        decoder = codec.model.decoder.model
        self.margins = _StreamMargins.of(decoder)
        self.pre, self.lstm, self.post = _split_at_lstm(decoder)
        self.units = torch.zeros(0, 0, dtype=torch.long)  # k, N
        self.lstm_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lstm_out = torch.zeros(1, self.lstm.lstm.hidden_size, 0)  # 1, C, frames [offset, lstm_done)
        self.offset = 0  # absolute frame of lstm_out[..., 0]
        self.lstm_done = 0  # frames whose LSTM output is final
        self.emitted = 0  # frames whose audio has been yielded

    def run(self, source: Iterable[Any]) -> Iterator[np.ndarray]:
        for index, item in enumerate(source):
            self._append(item, index)
            ready = self.units.shape[1] - self.margins.pre_right - self.margins.post_right
            if ready - self.emitted >= self.chunk:
                yield self._advance(final=False)
        if self.units.shape[1] > self.emitted:
            yield self._advance(final=True)

    def _append(self, item: Any, index: int) -> None:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            item = [int(item)]
        units = self.codec._check_units(item, f"streamed units item {index}")
        if self.units.shape[1] == 0:
            self.units = units
        elif units.shape[0] != self.units.shape[0]:
            raise ValueError(f"streamed units item {index} has {units.shape[0]} layers but the stream began "
                             f"with {self.units.shape[0]}; expected the same number throughout")
        else:
            self.units = torch.cat([self.units, units], dim=1)

    @torch.inference_mode()
    def _advance(self, *, final: bool) -> np.ndarray:
        """Run the LSTM as far as its inputs are final, then emit every frame whose audio is final."""
        margins, total, hop = self.margins, self.units.shape[1], self.codec.hop_length
        target = total if final else total - margins.pre_right
        if target > self.lstm_done:
            start = max(0, self.lstm_done - margins.pre_left)
            latent = self.codec.model.quantizer.decode(self.units[:, None, start:total])  # 1, D, frames
            hidden = self.pre(latent)[..., self.lstm_done - start: target - start]
            steps = hidden.permute(2, 0, 1)  # T, 1, C
            out, self.lstm_state = self.lstm.lstm(steps, self.lstm_state)
            if self.lstm.skip:
                out = out + steps
            self.lstm_out = torch.cat([self.lstm_out, out.permute(1, 2, 0)], dim=-1)
            self.lstm_done = target
        end = self.lstm_done if final else self.lstm_done - margins.post_right
        start = max(0, self.emitted - margins.post_left)
        wav = self.post(self.lstm_out[..., start - self.offset: self.lstm_done - self.offset])  # 1, 1, samples
        piece = wav[0, 0, (self.emitted - start) * hop: (end - start) * hop]
        self.emitted = end
        # LSTM outputs left of the next window are never read again.
        drop = max(0, self.emitted - margins.post_left - self.offset)
        self.lstm_out, self.offset = self.lstm_out[..., drop:], self.offset + drop
        return piece.numpy().astype(np.float32)
