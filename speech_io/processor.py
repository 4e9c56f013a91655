"""`SpeechLMProcessor`: chat-style conversations with audio -> model inputs (and labels for training).

A conversation is a list of ``{"role", "content"}`` messages. ``content`` is a string or a list of parts:

- ``{"type": "text", "text": "..."}``
- ``{"type": "audio", "audio": <path | bytes | array (+ "sampling_rate") | {"array", "sampling_rate"}>}``
- ``{"type": "units", "units": [k, ...]}``: codec units, e.g. a spoken answer to learn (TTS targets)

An assistant message with ``"truncated": True`` is text cut where its generation hit a length limit: for
training, its tokens are labels and its end of turn is not.

Audio parts become, per ``speech_input``, either ``<|audio|>`` placeholders, exactly as many as the
Whisper encoder + projector emit for that clip (``continuous``), or the clip's first-layer codec units
between ``<|speech_start|>`` and ``<|speech_end|>`` (``discrete``).

Without a chat template on the tokenizer, ``PLAIN_CHAT_TEMPLATE`` renders ``Role: content`` lines and
ends assistant turns with the EOS token.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, BatchFeature

from speechlm.speech_io.audio import MAX_SECONDS, AudioError, load_audio
from speechlm.speech_io.constants import IGNORE_INDEX, audio_placeholder_count, mel_frames
from speechlm.speech_io.features import log_mel_features
from speechlm.speech_io.hub_files import HUB_KWARGS as DOWNLOAD_KWARGS
from speechlm.speech_io.hub_files import missing_from_cache, not_cached_message
from speechlm.speech_io.units import (
    AUDIO_TOKEN,
    SPEECH_END_TOKEN,
    SPEECH_START_TOKEN,
    check_tokenizer_layout,
    speech_token_ids,
    token_ids_to_units,
    units_to_text,
)

PROCESSOR_CONFIG_NAME = "processor_config.json"
# The folder inside a model directory that holds its codec (named relative to the directory, so it can move).
CODEC_FOLDER = "codec"
SPEECH_INPUT_MODES = ("continuous", "discrete")
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    # HF renders templates with trim_blocks, which eats a newline written after a block tag
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
# What from_pretrained hands to the Hub download (the pipeline passes local_files_only, for one), and the
# folder of the repo or directory that holds the processor.
HUB_KWARGS = (*DOWNLOAD_KWARGS, "subfolder")
# What AutoProcessor and pipeline() pass along to every processor: their bookkeeping, and the model's
# loading arguments (pipeline(dtype=..., device_map=...) hands its model_kwargs to the processor too).
PASSED_ALONG_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code", "code_revision", "_commit_hash",
                       "use_fast", "dtype", "torch_dtype", "device_map", "attn_implementation")


@dataclass(frozen=True)
class SpeechLMResponse:
    """Generated tokens split into what they say: text, and speech units (to decode with the codec)."""

    text: str
    units: list[int]


def as_conversations(conversations=None, *, audio=None, text: str | None = None,
                     sampling_rate: int | None = None) -> tuple[list[list[Mapping]], bool]:
    """``(conversations, batched)`` from one conversation, a list of them, or a single user turn of
    ``audio`` and/or ``text``; ``batched`` says whether a list of conversations came in."""
    if conversations is None:
        if audio is None and text is None:
            raise ValueError("give a conversation, or audio and/or text")
        content: list[dict] = []
        if audio is not None:
            content.append({"type": "audio", "audio": audio, "sampling_rate": sampling_rate})
        if text is not None:
            content.append({"type": "text", "text": text})
        return [[{"role": "user", "content": content}]], False
    if audio is not None or text is not None:
        raise ValueError("give a conversation or audio/text, not both")
    if isinstance(conversations, Mapping):
        raise ValueError("conversations: expected a list of messages (or a list of such lists), got a dict")
    if isinstance(conversations, Sequence) and conversations and isinstance(conversations[0], Mapping):
        return [list(conversations)], False
    return [list(c) for c in conversations], True


# The separator of a processor saved before `audio_text_separator` existed: nothing (the format its model learnt).
UNSEPARATED = ""


def saved_processor_settings(name_or_path: str | os.PathLike, **hub_kwargs) -> dict[str, Any] | None:
    """The settings a processor was saved with in a model directory or Hub repo (its ``processor_config.json``,
    less the class name); None where none was saved."""
    from transformers.utils import cached_file

    config_file = cached_file(name_or_path, PROCESSOR_CONFIG_NAME, _raise_exceptions_for_missing_entries=False,
                              **hub_kwargs)
    if config_file is None:
        return None
    try:
        settings = json.loads(Path(config_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file}: not a processor's JSON settings ({error})") from error
    if not isinstance(settings, dict):
        raise ValueError(f"{config_file}: expected a JSON object of processor settings, got {type(settings).__name__}")
    settings.pop("processor_class", None)
    return settings


class SpeechLMProcessor:
    """Tokenizer + Whisper features + codec settings, saved beside the model (``processor_config.json``)."""

    def __init__(self, tokenizer, *, n_mels: int = 80, stack_factor: int = 5, reader_tokens_per_second: int = 0,
                 num_speech_units: int = 1024,
                 max_audio_seconds: float = MAX_SECONDS, speech_input: str = "continuous",
                 codec_name_or_path: str | None = None, codec=None, system_prompt: str | None = None,
                 audio_text_separator: str = UNSEPARATED):
        if speech_input not in SPEECH_INPUT_MODES:
            raise ValueError(f"speech_input={speech_input!r}: choose one of {list(SPEECH_INPUT_MODES)}")
        if not isinstance(audio_text_separator, str):
            raise ValueError(f"audio_text_separator={audio_text_separator!r}: expected a string (\"\" or \"\\n\")")
        vocab = tokenizer.get_vocab()
        if AUDIO_TOKEN not in vocab:
            raise ValueError(f"the tokenizer has no {AUDIO_TOKEN} token: expand it with "
                             f"speechlm.speech_io.units.expand_tokenizer (speechlm init does)")
        self.text_vocab_size = vocab[AUDIO_TOKEN]
        check_tokenizer_layout(tokenizer, self.text_vocab_size, num_speech_units, source="tokenizer")
        self.tokenizer = tokenizer
        self.n_mels = n_mels
        self.stack_factor = stack_factor
        # a model with a reader also gets this many positions a second of audio for the clip's transcript
        self.reader_tokens_per_second = reader_tokens_per_second
        self.num_speech_units = num_speech_units
        self.max_audio_seconds = max_audio_seconds
        self.speech_input = speech_input
        self.codec_name_or_path = codec_name_or_path
        # Put first in conversations that have no system turn; None leaves that to the chat template
        # (SmolLM2's adds its own ~20-token default, a quarter of a short ASR sample).
        self.system_prompt = system_prompt
        # Put between a clip and a text part beside it in a request: with "" the clip's transcript slots run
        # straight into the text ("...Spain vs.Transcribe the audio."); a processor saved before it keeps ""
        self.audio_text_separator = audio_text_separator
        self._codec = codec
        self._loaded_from: tuple[str, dict] | None = None  # (directory or repo id, hub kwargs), by from_pretrained
        self._token_characters: torch.Tensor | None = None
        ids = speech_token_ids(self.text_vocab_size)
        self.audio_token_id = ids["audio_token_id"]
        self.speech_start_token_id = ids["speech_start_token_id"]
        self.speech_end_token_id = ids["speech_end_token_id"]
        self.speech_unit_start_id = ids["speech_unit_start_id"]

    # -- settings ------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        return self.tokenizer.chat_template or PLAIN_CHAT_TEMPLATE

    @property
    def has_codec(self) -> bool:
        return self._codec is not None or self.codec_name_or_path is not None

    @property
    def cannot_speak(self) -> str | None:
        """Why speech units cannot become sound here (a reason to show a user), or None when they can.
        Loads the codec: a whisper-units codec decodes only once a vocoder is trained for it."""
        if not self.has_codec:
            return "it has no codec to turn speech units into sound"
        if self.codec.decodes_with(1) == "none":
            return ("its codec has no vocoder for its units yet; train one with `speechlm train-vocoder MANIFEST "
                    "--codec CODEC_DIR --layers 1`")
        return None

    @property
    def codec(self):
        """The codec (SpeechTokenizer or whisper units, `codec_loading.load_codec`), loaded on first use from
        ``codec_name_or_path``.

        A relative ``codec_name_or_path`` (``speechlm init`` writes `CODEC_FOLDER`) names a folder inside the
        directory or Hub repo the processor was loaded from, so that a model directory can move or be pushed.
        """
        if self._codec is None:
            if self.codec_name_or_path is None:
                raise ValueError("discrete speech needs a codec: pass codec= or codec_name_or_path= to the "
                                 "processor (a codec folder: SpeechTokenizer's config.json and .pt, or whisper units')")
            from speechlm.speech_io.codec_loading import load_codec

            self._codec = load_codec(self._codec_location())
        return self._codec

    def _codec_location(self) -> Path:
        path = Path(self.codec_name_or_path)
        if path.is_absolute() or self._loaded_from is None:
            return path
        root, hub_kwargs = self._loaded_from
        if Path(root).is_dir():
            return Path(root) / (hub_kwargs.get("subfolder") or "") / path
        from speechlm.speech_io.codec_loading import CODEC_FILE_PATTERNS
        from speechlm.speech_io.hub_files import download_repo_folder

        # A Hub repo: fetch the codec's files and its vocoders, if any (a folder of the snapshot).
        kwargs = dict(hub_kwargs)
        folder = "/".join(part for part in (kwargs.pop("subfolder", None), path.as_posix()) if part)
        return download_repo_folder("codec", root, subfolder=folder,
                                    patterns=CODEC_FILE_PATTERNS, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"processor_class": type(self).__name__, "n_mels": self.n_mels, "stack_factor": self.stack_factor,
                "reader_tokens_per_second": self.reader_tokens_per_second,
                "num_speech_units": self.num_speech_units, "max_audio_seconds": self.max_audio_seconds,
                "speech_input": self.speech_input, "codec_name_or_path": self.codec_name_or_path,
                "system_prompt": self.system_prompt, "audio_text_separator": self.audio_text_separator}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = list(self.tokenizer.save_pretrained(directory))
        config_file = directory / PROCESSOR_CONFIG_NAME
        config_file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        files.append(str(config_file))
        if self.has_codec and not Path(self.codec_name_or_path or ".").is_absolute():
            # A relative codec travels with the processor: the saved directory must be complete on its own.
            target = directory / (self.codec_name_or_path or CODEC_FOLDER)
            if self.codec_name_or_path is None:
                self.codec_name_or_path = target.name
                config_file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            if self._codec is not None or target.resolve() != self._codec_location().resolve():
                self.codec.save_pretrained(target)
                files.append(str(target))
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SpeechLMProcessor:
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        for key in PASSED_ALONG_KWARGS:
            kwargs.pop(key, None)
        settings_names = set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer"}
        unknown = sorted(set(kwargs) - settings_names)
        if unknown:
            raise TypeError(f"SpeechLMProcessor.from_pretrained({str(pretrained_model_name_or_path)!r}): unexpected "
                            f"keyword arguments {unknown}; its settings are {sorted(settings_names)}")
        if missing_from_cache(pretrained_model_name_or_path, hub_kwargs):  # transformers' error would not say so
            raise FileNotFoundError(not_cached_message("SpeechLM processor", str(pretrained_model_name_or_path),
                                                       hub_kwargs))
        settings = saved_processor_settings(pretrained_model_name_or_path, **hub_kwargs)
        if settings is None:
            raise FileNotFoundError(f"{pretrained_model_name_or_path}: no {PROCESSOR_CONFIG_NAME} (save the "
                                    f"processor with save_pretrained, as speechlm init does)")
        settings.update(kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        processor = cls(tokenizer, **settings)
        processor._loaded_from = (str(pretrained_model_name_or_path), hub_kwargs)
        return processor

    # -- inputs --------------------------------------------------------------------------------------
    def __call__(self, conversations=None, *, text: str | None = None, audio=None, sampling_rate: int | None = None,
                 add_generation_prompt: bool | None = None, return_labels: bool = False,
                 padding_side: str | None = None, speech_input: str | None = None) -> BatchFeature:
        """Model inputs for one conversation or a list of them (or a single ``text`` and/or ``audio``).

        Generation (default): a generation prompt is appended and rows are left-padded.
        Training (``return_labels=True``): rows are right-padded and ``labels`` hold the assistant turns'
        tokens (-100 elsewhere). Returns ``input_ids``, ``attention_mask``, and when there is continuous
        audio ``input_features`` / ``input_features_mask`` (clips in order of appearance).
        """
        batch, _ = as_conversations(conversations, audio=audio, text=text, sampling_rate=sampling_rate)
        speech_input = speech_input or self.speech_input
        if speech_input not in SPEECH_INPUT_MODES:
            raise ValueError(f"speech_input={speech_input!r}: choose one of {list(SPEECH_INPUT_MODES)}")
        if add_generation_prompt is None:
            add_generation_prompt = not return_labels
        padding_side = padding_side or ("right" if return_labels else "left")

        clips: list[np.ndarray] = []
        rows, label_rows = [], []
        for index, conversation in enumerate(batch):
            messages = [self._render_message(message, speech_input, clips, f"conversation {index}")
                        for message in self._with_system_prompt(self._check_conversation(conversation, index))]
            ids, labels = self._tokenize(messages, add_generation_prompt)
            rows.append(ids)
            label_rows.append(labels)

        width = max(map(len, rows))
        pad_id = padding_token_id(self.tokenizer)
        data: dict[str, Any] = {
            "input_ids": torch.tensor([_pad(row, width, pad_id, padding_side) for row in rows]),
            "attention_mask": torch.tensor([_pad([1] * len(row), width, 0, padding_side) for row in rows]),
        }
        if return_labels:
            data["labels"] = torch.tensor([_pad(row, width, IGNORE_INDEX, padding_side) for row in label_rows])
        if clips:
            features = log_mel_features(clips, n_mels=self.n_mels)
            data["input_features"] = features.input_features
            data["input_features_mask"] = features.input_features_mask
        return BatchFeature(data)

    def num_audio_placeholders(self, num_samples: int) -> int:
        """``<|audio|>`` positions for a 16 kHz clip of ``num_samples`` (what encoder + projector emit, and
        a reader's transcript slots)."""
        return int(audio_placeholder_count(mel_frames(num_samples), self.stack_factor, self.reader_tokens_per_second))

    @staticmethod
    def _check_conversation(conversation, index: int) -> list[Mapping]:
        if not isinstance(conversation, Sequence) or isinstance(conversation, str) or not conversation:
            raise ValueError(f"conversation {index}: expected a non-empty list of {{'role', 'content'}} messages")
        for turn, message in enumerate(conversation):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"conversation {index}, message {turn}: expected a dict with 'role' and "
                                 f"'content', got {message!r:.80}")
        return list(conversation)

    def _with_system_prompt(self, conversation: list[Mapping]) -> list[Mapping]:
        if self.system_prompt is None or conversation[0]["role"] == "system":
            return conversation
        return [{"role": "system", "content": self.system_prompt}, *conversation]

    def _render_message(self, message: Mapping, speech_input: str, clips: list[np.ndarray], where: str) -> dict:
        content = message["content"]
        if isinstance(content, str):
            return {**message, "content": content}
        pieces = []
        previous = None
        for number, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            label = f"{where}, {message['role']} part {number}"
            if message["role"] != "assistant" and is_speech_beside_text(previous, kind):
                pieces.append(self.audio_text_separator)
            previous = kind
            if kind == "text":
                pieces.append(part["text"])
            elif kind == "audio":
                try:
                    waveform = load_audio(part.get("audio"), sampling_rate=part.get("sampling_rate"),
                                          max_seconds=self.max_audio_seconds)
                except AudioError as error:  # say where in the batch, too
                    raise AudioError(f"{label}: {error}") from error
                if speech_input == "continuous":
                    clips.append(waveform)
                    pieces.append(AUDIO_TOKEN * self.num_audio_placeholders(waveform.shape[0]))
                else:
                    pieces.append(units_to_text(self.codec.encode([waveform], n_q=1)[0][0]))
            elif kind == "units":
                units = np.asarray(part["units"])
                if units.ndim != 1 or not np.issubdtype(units.dtype, np.integer):
                    raise ValueError(f"{label}: units must be a 1-D list of integers, got shape {units.shape}")
                if units.size and (units.min() < 0 or units.max() >= self.num_speech_units):
                    raise ValueError(f"{label}: units must lie in [0, {self.num_speech_units}), got "
                                     f"{int(units.min())}..{int(units.max())}")
                pieces.append(units_to_text(units.tolist()))
            else:
                raise ValueError(f"{label}: unknown part {part!r:.80}; expected type 'text', 'audio' or 'units'")
        return {**message, "content": "".join(pieces)}

    def _render(self, messages: list[dict], add_generation_prompt: bool, *, open_end: bool = False) -> str:
        """The conversation as text; ``open_end``: its last message left open (no end of turn after it)."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=open_end)

    def _tokenize(self, messages: list[dict], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        """Token ids and labels: each assistant turn is the difference between the conversation rendered
        up to it (with a generation prompt) and rendered through it, so any chat template works. A turn
        marked ``truncated`` (its text stops where a generation was cut) is rendered open: its end of turn
        gets no label, so the model does not learn to stop there."""
        segments: list[tuple[str, bool]] = []
        done = ""
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:turn], add_generation_prompt=True)
            full = self._render(messages[: turn + 1], add_generation_prompt=False,
                                open_end=bool(message.get("truncated")))
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the chat template does not render conversations prefix by prefix, so assistant "
                                 "turns cannot be located for labels; use a template that does")
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        segments.append((self._render(messages, add_generation_prompt)[len(done):], False))

        ids, labels = [], []
        for text, trained in segments:
            piece = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return ids, labels

    # -- outputs -------------------------------------------------------------------------------------
    def parse_response(self, token_ids: Sequence[int] | torch.Tensor) -> SpeechLMResponse:
        """Split generated ids into text (speech and special tokens dropped) and speech units."""
        ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
        units = token_ids_to_units(ids, self.speech_unit_start_id, self.num_speech_units)
        text_ids = [t for t in ids if t < self.text_vocab_size]
        return SpeechLMResponse(self.tokenizer.decode(text_ids, skip_special_tokens=True), units)

    def token_characters(self) -> torch.Tensor:
        """``text_vocab_size`` characters each text token decodes to (special tokens: 0), for counting the
        characters of generated text without decoding it; computed once."""
        if self._token_characters is None:
            special = set(self.tokenizer.all_special_ids)
            pieces = self.tokenizer.batch_decode([[i] for i in range(self.text_vocab_size)])
            self._token_characters = torch.tensor(
                [0 if i in special else len(piece) for i, piece in enumerate(pieces)], dtype=torch.int32)
        return self._token_characters

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, **kwargs)


def is_speech_beside_text(kind: str | None, next_kind: str | None) -> bool:
    """Whether two neighbouring parts of a request are a clip (audio, or its units) and text, either way round:
    where `SpeechLMProcessor.audio_text_separator` goes (an answer's text and units are the model's own)."""
    return {kind, next_kind} in ({"audio", "text"}, {"units", "text"})


def padding_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (Llama tokenizers have no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _pad(row: list[int], width: int, value: int, side: str) -> list[int]:
    padding = [value] * (width - len(row))
    return padding + row if side == "left" else row + padding


__all__ = ["PLAIN_CHAT_TEMPLATE", "SPEECH_END_TOKEN", "SPEECH_START_TOKEN", "SpeechLMProcessor",
           "SpeechLMResponse"]
