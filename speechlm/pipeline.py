"""``transformers.pipeline("speechlm", model=DIR_OR_REPO)``: audio and/or text in, text and speech out.

Registered by `speechlm.registration`. Each input is one of

- audio: a file path, file bytes, an array (with ``sampling_rate=``), a ``{"array", "sampling_rate"}`` or
  ``{"path"}``/``{"bytes"}`` dict (the forms `speech_io.audio.load_audio` reads);
- ``{"audio": <audio>, "text": str}`` (either key may be left out);
- a conversation: a list of ``{"role", "content"}`` messages (see `SpeechLMProcessor`);
- nothing (``None``) when ``text=`` is given.

``text=`` is the instruction for every input that has no text of its own. A list of inputs is batched,
``batch_size`` at a time (all at once by default). Each output is
``{"text": str, "audio": {"array": np.ndarray, "sampling_rate": 16000} | None}``.

Calls may come from several threads: the model holds per-call state (which rows the speech-gated LoRA
acts on while it decodes), so calls on one model run one at a time, each as it would alone.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers import Pipeline

from speechlm.responding import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_SPEECH_UNITS,
    generate_response_tokens,
    replies_from_tokens,
    voice_codes,
)
from speechlm.speech_io.audio import AudioError, load_audio
from speechlm.speech_io.constants import SAMPLE_RATE

AUDIO_DICT_KEYS = ({"array", "sampling_rate"}, {"path"}, {"bytes"})
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per model, shared by its pipelines
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.Lock:
    """The lock that runs one call at a time on ``model`` (whichever pipeline calls it)."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.Lock())


class SpeechLMInputError(ValueError):
    """A pipeline input that cannot be used; the message names the input by its position."""


class SpeechLMPipeline(Pipeline):
    # pipeline() accepts only ProcessorMixin processors; ours loads itself below, from the model's directory.
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _pipeline_calls_generate = True

    def __init__(self, model, processor=None, **kwargs):
        if processor is None:
            from transformers import AutoProcessor

            # from the folder the weights came from: a Hub model's snapshot at the revision asked for
            # (pipeline() passes its `revision` to the model's loading only)
            processor = AutoProcessor.from_pretrained(getattr(model, "checkpoint_dir", None) or model.name_or_path)
        super().__init__(model, processor=processor, **kwargs)

    def __call__(self, inputs=None, *, text: str | None = None, sampling_rate: int | None = None,
                 batch_size: int | None = None, **kwargs):
        """Respond to one input (a dict back) or a list of inputs (a list back, generated in batches).

        Keyword arguments: ``output`` ("text", "speech", "text+speech"), ``max_new_tokens`` (text),
        ``max_speech_units``, ``speech_by`` (who speaks: "auto", "lm" or "decoder", `speaking_decoder`),
        ``voice`` (speak in this recording's voice: a file path or a 16 kHz array, at least 1 s; the codec's
        completion model, `responding.voice_codes`), ``generate_kwargs`` (a dict passed to ``generate``, e.g.
        sampling settings).
        """
        batched = isinstance(inputs, list) and not _is_conversation(inputs)
        items = inputs if batched else [inputs]
        if not items:
            return []
        conversations = [self._conversation(item, text, sampling_rate, f"input {i}" if batched else "input")
                         for i, item in enumerate(items)]
        _, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}  # a voice given at construction
        size = batch_size or self._batch_size or len(conversations)
        outputs = []
        with model_lock(self.model):
            for start in range(0, len(conversations), size):
                model_inputs = self.preprocess(conversations[start:start + size])
                outputs += self.postprocess(self.forward(model_inputs, **forward_params), **postprocess_params)
        return outputs if batched else outputs[0]

    def _sanitize_parameters(self, output: str | None = None, max_new_tokens: int | None = None,
                             max_speech_units: int | None = None, speech_by: str | None = None,
                             voice=None, generate_kwargs: dict | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected pipeline arguments {sorted(kwargs)}; pass generate settings as "
                            f"generate_kwargs={{...}}")
        forward: dict[str, Any] = {}
        if output is not None:
            forward["output"] = output
        if max_new_tokens is not None:
            forward["max_new_tokens"] = max_new_tokens
        if max_speech_units is not None:
            forward["max_speech_units"] = max_speech_units
        if speech_by is not None:
            forward["speech_by"] = speech_by
        if generate_kwargs:
            forward["generate_kwargs"] = dict(generate_kwargs)
        postprocess = {} if voice is None else {"voice_codes": voice_codes(self.processor, voice)}
        return {}, forward, postprocess

    def preprocess(self, conversations: list[list[Mapping]]) -> dict[str, Any]:
        return dict(self.processor(conversations))

    def _forward(self, model_inputs: dict[str, Any], output: str = "text", max_new_tokens: int | None = None,
                 max_speech_units: int = DEFAULT_MAX_SPEECH_UNITS, speech_by: str = "auto",
                 generate_kwargs: dict | None = None):
        # Generation settings given when the pipeline was built, then those of this call.
        settings = {**self._generation_defaults, **self._generate_kwargs, **(generate_kwargs or {})}
        text_budget = settings.pop("max_new_tokens", None)
        return generate_response_tokens(self.model, self.processor, model_inputs, output=output,
                                        max_new_tokens=max_new_tokens or text_budget or DEFAULT_MAX_NEW_TOKENS,
                                        max_speech_units=max_speech_units, speech_by=speech_by, **settings)

    def postprocess(self, new_tokens, voice_codes=None) -> list[dict[str, Any]]:
        return [{"text": reply.text,
                 "audio": None if reply.audio is None else {"array": reply.audio, "sampling_rate": reply.sampling_rate}}
                for reply in replies_from_tokens(self.processor, new_tokens, voice_codes=voice_codes)]

    # -- inputs --------------------------------------------------------------------------------------
    def _conversation(self, item: Any, text: str | None, sampling_rate: int | None, name: str) -> list[Mapping]:
        """One input as a conversation whose audio is already loaded, or a `SpeechLMInputError` naming it."""
        if _is_conversation(item):
            if text is not None:
                raise SpeechLMInputError(f"{name}: a conversation carries its own text; leave text= out")
            return item
        audio = item
        if isinstance(item, Mapping) and not any(keys <= item.keys() for keys in AUDIO_DICT_KEYS):
            unknown = set(item) - {"audio", "text"}
            if unknown or not item:
                raise SpeechLMInputError(f"{name}: a dict with keys {sorted(item)}; expected {{'audio', 'text'}}, "
                                         f"or audio as {{'array', 'sampling_rate'}}, {{'path'}} or {{'bytes'}}")
            audio, text = item.get("audio"), item.get("text", text)
        if isinstance(audio, (str, os.PathLike)) and not os.path.isfile(audio):
            raise SpeechLMInputError(f"{name}: {os.fspath(audio)!r} is not an audio file; pass a text prompt as "
                                     f"text=..., or a conversation")
        if text is not None and not isinstance(text, str):
            raise SpeechLMInputError(f"{name}: text must be a string, got {type(text).__name__}")
        if audio is None and text is None:
            raise SpeechLMInputError(f"{name}: no audio and no text; give audio, text=..., or a conversation")
        content: list[dict] = []
        if audio is not None:
            try:
                waveform = load_audio(audio, sampling_rate=sampling_rate, max_seconds=self.processor.max_audio_seconds,
                                      name=f"{name} ({_describe(audio)})")
            except AudioError as error:
                raise SpeechLMInputError(str(error)) from error
            content.append({"type": "audio", "audio": waveform, "sampling_rate": SAMPLE_RATE})
        if text is not None:
            content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]


def _is_conversation(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and bool(value)
            and isinstance(value[0], Mapping) and "role" in value[0])


def _describe(audio: Any) -> str:
    if isinstance(audio, (str, os.PathLike)):
        return os.fspath(audio)
    if isinstance(audio, (bytes, bytearray)):
        return f"{len(audio)} bytes"
    if isinstance(audio, np.ndarray):
        return f"array {audio.shape}"
    return type(audio).__name__
