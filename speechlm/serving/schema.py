"""The request body of ``POST /v1/chat/completions`` (OpenAI's fields), checked and turned into a `ChatCall`.

pydantic checks types and ranges (`ChatCompletionRequest`; an unknown field is refused by name, as OpenAI
does); `parse_chat_request` checks what depends on the served model and refuses OpenAI parameters that
would change the answer but are not implemented here, rather than silently ignoring them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from speechlm.serving.audio_payload import OUTPUT_AUDIO_FORMATS
from speechlm.serving.batching import DecodeSettings
from speechlm.serving.conversation import RecentReplies, build_conversation
from speechlm.serving.errors import APIError, bad_request
from speechlm.serving.settings import ServeSettings

# modalities (as a set) -> the output mode of `speechlm.respond`. ["audio"] alone is our extension:
# speech without its text first.
OUTPUT_OF_MODALITIES = {frozenset({"text"}): "text", frozenset({"text", "audio"}): "text+speech",
                        frozenset({"audio"}): "speech"}
# OpenAI parameters that would change the answer, with the values that mean "not used".
UNSUPPORTED_UNLESS_DEFAULT: dict[str, tuple[Any, ...]] = {
    "stop": (None, [], ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "logprobs": (None, False), "top_logprobs": (None, 0),
    "logit_bias": (None, {}), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None,), "web_search_options": (None,),
}


class AudioOutputOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    voice: Any = None  # the model has one voice; OpenAI's clients require the field, so any value is accepted


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # include_obfuscation and future flags change nothing here
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion parameters; messages are checked part by part in `build_conversation`."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutputOptions | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_speech_units: int | None = Field(None, ge=1)  # ours: a bound on the spoken answer, 50 units a second
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    response_format: dict[str, Any] | None = None
    # Accepted and ignored: bookkeeping that does not change the answer.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    # Refused unless left at their defaults (UNSUPPORTED_UNLESS_DEFAULT).
    stop: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


@dataclass(frozen=True)
class ChatCall:
    """One accepted request: what to decode, and how to write the answer."""

    id: str
    created: int
    model: str
    conversation: list[dict]
    decode: DecodeSettings
    stream: bool
    include_usage: bool
    audio_format: str | None  # None: a text-only answer

    @property
    def speaks(self) -> bool:
        return self.audio_format is not None


def parse_chat_request(request: ChatCompletionRequest, *, served_model: str, cannot_speak: str | None,
                       max_audio_seconds: float, settings: ServeSettings, replies: RecentReplies) -> ChatCall:
    """A `ChatCall`, or an `APIError` (400, 404 for another model's name) that names the field at fault.
    ``cannot_speak``: why the model cannot answer in audio (`SpeechLMProcessor.cannot_speak`), None if it can."""
    if request.model != served_model:
        raise APIError(404, f"The model '{request.model}' does not exist: this server serves '{served_model}' "
                            f"(GET /v1/models)", param="model", code="model_not_found")
    for name, defaults in UNSUPPORTED_UNLESS_DEFAULT.items():
        value = getattr(request, name)
        if not any(value == default and type(value) is type(default) for default in defaults):
            raise bad_request(f"'{name}' is not supported by this server (a speechlm model); leave it out",
                              param=name, code="unsupported_parameter")
    if request.response_format not in (None, {"type": "text"}):
        raise bad_request("response_format: only {'type': 'text'} is supported", param="response_format",
                          code="unsupported_parameter")
    output = _output_mode(request, cannot_speak)
    max_tokens = request.max_completion_tokens or request.max_tokens or settings.default_max_tokens
    max_speech_units = request.max_speech_units or settings.max_speech_units
    if max_speech_units > settings.max_speech_units:
        raise bad_request(f"max_speech_units={max_speech_units}: this server allows at most "
                          f"{settings.max_speech_units} ({settings.max_speech_units / 50:g} s)",
                          param="max_speech_units", code="invalid_value")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options",
                          code="invalid_value")
    decode = DecodeSettings(output=output, max_new_tokens=max_tokens, max_speech_units=max_speech_units,
                            temperature=request.temperature, top_p=request.top_p, seed=request.seed)
    conversation = build_conversation(request.messages, max_audio_seconds=max_audio_seconds, replies=replies)
    return ChatCall(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served_model,
                    conversation=conversation, decode=decode, stream=request.stream,
                    include_usage=bool(request.stream_options and request.stream_options.include_usage),
                    audio_format=request.audio.format if output != "text" else None)


def _output_mode(request: ChatCompletionRequest, cannot_speak: str | None) -> str:
    modalities = request.modalities or ["text"]
    output = OUTPUT_OF_MODALITIES.get(frozenset(modalities))
    if output is None or len(set(modalities)) != len(modalities):
        raise bad_request(f"modalities={modalities}: expected ['text'], ['text', 'audio'] or ['audio']",
                          param="modalities", code="invalid_value")
    if output == "text":
        if request.audio is not None:
            raise bad_request("'audio' sets the spoken answer's format, but modalities does not ask for audio: "
                              "add 'audio' to modalities or leave 'audio' out", param="audio", code="invalid_value")
        return output
    if cannot_speak is not None:
        raise bad_request(f"this model cannot speak ({cannot_speak}): ask for modalities ['text']",
                          param="modalities", code="unsupported_modality")
    if request.audio is None:
        raise bad_request("modalities asks for audio: give audio: {\"format\": \"wav\"} (or \"pcm16\")",
                          param="audio", code="missing_required_parameter")
    if request.audio.format not in OUTPUT_AUDIO_FORMATS:
        raise bad_request(f"audio.format={request.audio.format!r} is not supported; expected one of "
                          f"{list(OUTPUT_AUDIO_FORMATS)} (16 kHz mono)", param="audio.format",
                          code="unsupported_format")
    return output
