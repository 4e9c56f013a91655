"""RVQ completion from a voice prompt: the LM's layer-1 units -> all of the codec's layers, in the prompt's voice.

The LM speaks SpeechTokenizer's first RVQ layer (what is said); the other seven carry the voice and the acoustic
detail its decoder needs. As VALL-E's non-autoregressive stage (and AnyGPT's SoundStorm stage), a small
bidirectional transformer predicts them one layer at a time from the layers known so far and a few seconds of a
prompt's full codes: layer k+1 of every frame at once, given layers 1..k of the target and all layers of the
prompt. Seven passes complete a sentence.

A unit enters as its codebook vector (a frozen copy of the codec's codebooks, as the vocoder's): a target frame
reads the sum of its known layers' vectors, the partial latent the next layer's code quantizes the residual of;
a prompt frame reads the sum of all its layers' vectors, the whole latent. Which layer is asked for, and which
frames are the prompt's, are learned embeddings added to every frame.

It belongs to its codec: saved in the codec's folder as ``completion/`` (``completion_config.json`` +
``model.safetensors``), refused by a codec whose codebooks changed since (``codebook_fingerprint``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speechlm.speech_io.config_errors import ConfigProblems, settings_from_dict
from speechlm.speech_io.constants import SAMPLE_RATE
from speechlm.speech_io.saved_files import load_module, save_module
from speechlm.speech_io.speech_decoder import codebook_fingerprint, sinusoid_positions
from speechlm.speech_io.vocoder import register_codebooks, summed_codebook_vectors

COMPLETION_FOLDER = "completion"  # inside the codec's folder
COMPLETION_CONFIG_NAME = "completion_config.json"
COMPLETION_WEIGHTS_NAME = "model.safetensors"


@dataclass
class CompletionConfig:
    """The completion model's architecture and the codec it completes; saved as ``completion_config.json``."""

    num_layers: int = field(default=8, metadata={"help": "the codec's RVQ layers (it predicts layers 2 to this)"})
    codebook_size: int = field(default=1024, metadata={"help": "codes per RVQ layer (the codec's)"})
    codebook_dimension: int = field(default=1024, metadata={"help": "width of the codec's codebook vectors"})
    hidden_size: int = field(default=256, metadata={"help": "width of the transformer"})
    num_blocks: int = field(default=4, metadata={"help": "transformer layers"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in training"})
    max_prompt_frames: int = field(default=150, metadata={"help": "prompt frames read at most (150: 3 s at 50 Hz); "
                                                                  "a longer prompt keeps its last ones"})
    codebook_fingerprint: str = field(default="", metadata={"help": "the codebooks it was trained on (training sets it)"})

    def __post_init__(self) -> None:
        problems = ConfigProblems()
        problems.positive_integers(self, "codebook_size", "codebook_dimension", "hidden_size", "num_blocks",
                                   "num_heads", "max_prompt_frames")
        problems.check(isinstance(self.num_layers, int) and self.num_layers >= 2,
                       f"num_layers={self.num_layers!r} (expected 2 or more: layer 1 is given, the rest predicted)")
        problems.transformer(self)
        problems.raise_if_any("completion config")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "completion config") -> CompletionConfig:
        return settings_from_dict(cls, data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RVQCompletion(nn.Module):
    """Prompt codes ``(B, L, P)`` and a target's first ``k`` layers ``(B, k, T)`` -> logits of layer ``k + 1``
    ``(B, T, codebook_size)``."""

    def __init__(self, config: CompletionConfig, codebooks: torch.Tensor | None = None) -> None:
        """``codebooks``: the codec's ``(num_layers, codebook_size, codebook_dimension)`` vectors; None leaves
        zeros, for a model whose saved state is loaded next."""
        super().__init__()
        self.config = config
        c = config
        register_codebooks(self, codebooks, (c.num_layers, c.codebook_size, c.codebook_dimension), "completion")
        self.from_codebooks = nn.Linear(c.codebook_dimension, c.hidden_size)
        self.asked_layer = nn.Embedding(c.num_layers, c.hidden_size)  # row k: layer k + 1 (0-based k) is asked for
        self.is_prompt = nn.Embedding(2, c.hidden_size)
        block = nn.TransformerEncoderLayer(c.hidden_size, c.num_heads, 4 * c.hidden_size, dropout=c.dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, c.num_blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.hidden_size)
        self.heads = nn.ModuleList(nn.Linear(c.hidden_size, c.codebook_size) for _ in range(c.num_layers - 1))

    def forward(self, prompt: torch.Tensor, known: torch.Tensor, prompt_padding: torch.Tensor | None = None,
                target_padding: torch.Tensor | None = None) -> torch.Tensor:
        """``prompt`` ``(B, L, P)`` (all layers), ``known`` ``(B, k, T)`` with 1 <= k < L -> logits of layer k + 1
        at the target's frames ``(B, T, codebook_size)``. The paddings are True where a frame is padding: prompts
        are padded on the left, targets on the right, so that each row's prompt runs straight into its target
        and its positions start at 0 as they do alone."""
        k, num_prompt = known.shape[1], prompt.shape[2]
        if not 1 <= k < self.config.num_layers or prompt.shape[1] != self.config.num_layers:
            raise ValueError(f"prompt of {prompt.shape[1]} layers and {k} known target layers; expected "
                             f"{self.config.num_layers} and 1 to {self.config.num_layers - 1}")
        frames = torch.cat([summed_codebook_vectors(self, prompt), summed_codebook_vectors(self, known)], dim=1)  # B, P + T, D
        segment = torch.cat([torch.ones(num_prompt, dtype=torch.long), torch.zeros(known.shape[2], dtype=torch.long)])
        positions = torch.arange(frames.shape[1], device=frames.device)[None]
        if prompt_padding is not None:  # a left-padded prompt starts at position 0 after its padding
            positions = (positions - prompt_padding.sum(dim=1, keepdim=True).to(frames.device)).clamp(min=0)
        hidden = (self.from_codebooks(frames) + self.is_prompt(segment.to(frames.device))
                  + self.asked_layer.weight[k] + sinusoid_positions(positions, self.config.hidden_size))
        padding = None
        if prompt_padding is not None or target_padding is not None:
            batch = frames.shape[0]
            padding = torch.cat([
                prompt_padding if prompt_padding is not None else torch.zeros(batch, num_prompt, dtype=torch.bool),
                target_padding if target_padding is not None else torch.zeros(batch, known.shape[2], dtype=torch.bool),
            ], dim=1).to(frames.device)
        hidden = self.blocks(hidden, src_key_padding_mask=padding)
        return self.heads[k - 1](self.norm(hidden[:, num_prompt:]))

    # ---- completing -----------------------------------------------------------------------------------

    def check_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        """The prompt's last ``max_prompt_frames`` frames of all layers, or an error that says what it needs."""
        prompt = torch.as_tensor(prompt)
        if prompt.ndim != 2 or prompt.shape[0] < self.config.num_layers or prompt.shape[1] == 0:
            raise ValueError(f"a voice prompt's codes of shape {tuple(prompt.shape)}; expected ({self.config.num_layers} "
                             f"or more, frames): encode the prompt with all of the codec's layers")
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.config.codebook_size:
            raise ValueError(f"a voice prompt's codes run {int(prompt.min())}..{int(prompt.max())}; expected "
                             f"0..{self.config.codebook_size - 1}")
        return prompt[: self.config.num_layers, -self.config.max_prompt_frames:].long()

    @torch.inference_mode()
    def complete(self, units: torch.Tensor | Sequence[int], prompt: torch.Tensor) -> torch.Tensor:
        """Layer-1 ``units`` ``(T,)`` (or ``(1, T)``) and a prompt's codes ``(L, P)`` -> all layers ``(L, T)``,
        each layer the most likely code of every frame given the layers before it."""
        codes = torch.as_tensor(units, dtype=torch.long).reshape(1, -1)
        if codes.shape[1] and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"units run {int(codes.min())}..{int(codes.max())}; expected "
                             f"0..{self.config.codebook_size - 1}")
        if codes.shape[1] == 0:
            return torch.zeros(self.config.num_layers, 0, dtype=torch.long)
        prompt = self.check_prompt(prompt)[None].to(self.codebooks.device)
        codes = codes.to(self.codebooks.device)
        while codes.shape[0] < self.config.num_layers:
            logits = self(prompt, codes[None])[0]
            codes = torch.cat([codes, logits.argmax(-1)[None]], dim=0)
        return codes.cpu()

    def complete_batch(self, units: Sequence[torch.Tensor | Sequence[int]], prompt: torch.Tensor) -> list[torch.Tensor]:
        """`complete` of each item with the same prompt: one at a time, so an item never depends on its batch."""
        return [self.complete(item, prompt) for item in units]

    # ---- saving ---------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_module(self, self.config.to_dict(), directory, COMPLETION_CONFIG_NAME, COMPLETION_WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> RVQCompletion:
        # its frozen codebooks come with the state
        return load_module(lambda data, source: cls(CompletionConfig.from_dict(data, source=source)), directory,
                           COMPLETION_CONFIG_NAME, COMPLETION_WEIGHTS_NAME, "completion model")


def codebooks_fingerprint(codebooks: torch.Tensor) -> str:
    """A fingerprint of all of a codec's codebooks ``(L, codebook_size, D)``."""
    return codebook_fingerprint(codebooks.reshape(-1, codebooks.shape[-1]))


def check_completion(model: RVQCompletion, codebooks: torch.Tensor) -> RVQCompletion:
    """``model`` if it completes the units of a codec with these ``(L, codebook_size, D)`` ``codebooks``, else an
    error that says what differs."""
    c = model.config
    if (c.num_layers, c.codebook_size, c.codebook_dimension) != tuple(codebooks.shape):
        raise ValueError(f"a completion model for {c.num_layers} layers of {c.codebook_size} codes of width "
                         f"{c.codebook_dimension} does not fit this codec ({tuple(codebooks.shape)})")
    if c.codebook_fingerprint and c.codebook_fingerprint != codebooks_fingerprint(codebooks):
        raise ValueError("the completion model was trained on other codebooks than this codec's (a codec rebuilt or "
                         "refilled since); train it again with speechlm train-completion")
    return model.eval()


MIN_VOICE_SECONDS = 1.0  # a voice prompt shorter than this carries too little of the voice
SILENT_RMS = 1e-3  # a prompt quieter than this (root mean square of its samples) is taken for silence


def saved_completion(folder: Path) -> RVQCompletion | None:
    """The completion model saved in a codec's ``folder``, if any; an error names its folder."""
    directory = folder / COMPLETION_FOLDER
    if not directory.is_dir():
        return None
    try:
        return RVQCompletion.from_pretrained(directory)
    except ValueError as err:
        raise ValueError(f"{directory}: {err}") from None


def voice_waveform(voice: Any) -> np.ndarray:
    """A voice prompt as 16 kHz mono samples: a file path (any rate; resampled, as `load_audio` does) or a
    16 kHz array; an error if it is shorter than `MIN_VOICE_SECONDS` or silent."""
    from speechlm.speech_io.audio import load_audio

    label = str(voice) if isinstance(voice, (str, os.PathLike)) else "the voice prompt"
    samples = load_audio(voice, name=label) if isinstance(voice, (str, os.PathLike)) else \
        load_audio(np.asarray(voice, dtype=np.float32), sampling_rate=SAMPLE_RATE, name=label)
    if samples.size < MIN_VOICE_SECONDS * SAMPLE_RATE:
        raise ValueError(f"{label}: {samples.size / SAMPLE_RATE:.2f} s of audio; a voice prompt needs at least "
                         f"{MIN_VOICE_SECONDS:g} s (2-3 s of clear speech is best)")
    if float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) < SILENT_RMS:
        raise ValueError(f"{label}: silent (RMS below {SILENT_RMS:g}); a voice prompt is a recording of the "
                         f"voice to speak in")
    return samples
