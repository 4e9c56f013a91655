"""A decoded answer written as OpenAI writes one: a ``chat.completion`` object, or ``chat.completion.chunk``
objects while it decodes.

Text answers put text in ``content``. Spoken answers (modalities with ``audio``) put it in
``audio.transcript`` and the speech in ``audio.data``, as OpenAI's audio models do; streamed, each text
delta is a ``delta.audio.transcript`` and each audio chunk a ``delta.audio.data``, and the last audio delta
carries only ``expires_at`` (how long the answer's ``audio.id`` may be sent back in a later turn).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from speechlm.responding import TextDelta
from speechlm.serving.audio_payload import encode_output_audio
from speechlm.serving.batching import GenerationJob
from speechlm.serving.conversation import RecentReplies
from speechlm.serving.schema import ChatCall

FINISH_REASONS = {"stop": "stop", "length": "length"}  # a cancelled request has no one to tell


def completion(call: ChatCall, job: GenerationJob, events: Iterable, replies: RecentReplies) -> dict[str, Any]:
    """The whole answer, once decoded."""
    text, chunks = [], []
    for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
        else:
            chunks.append(event.array)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text), "refusal": None, "annotations": []}
    if call.speaks:
        audio_id = _audio_id()
        speech = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        message["content"] = None
        message["audio"] = {"id": audio_id, "data": encode_output_audio(speech, call.audio_format),
                            "expires_at": replies.add(audio_id, "".join(text)), "transcript": "".join(text)}
    return {"id": call.id, "object": "chat.completion", "created": call.created, "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH_REASONS.get(job.finish_reason)}],
            "usage": usage(job)}


def completion_chunks(call: ChatCall, job: GenerationJob, events: Iterable,
                      replies: RecentReplies) -> Iterator[dict[str, Any]]:
    """One chunk per text delta or audio chunk as they are decoded; then the finish, then usage if asked."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    audio_id = _audio_id() if call.speaks else None
    yield chunk({"role": "assistant", "content": None if call.speaks else "", "refusal": None})
    transcript = []
    for event in events:
        if isinstance(event, TextDelta):
            transcript.append(event.text)
            yield chunk({"audio": {"id": audio_id, "transcript": event.text}} if call.speaks
                        else {"content": event.text})
        else:
            yield chunk({"audio": {"id": audio_id, "data": encode_output_audio(event.array, call.audio_format)}})
    if call.speaks:
        yield chunk({"audio": {"id": audio_id, "expires_at": replies.add(audio_id, "".join(transcript))}})
    yield chunk({}, FINISH_REASONS.get(job.finish_reason))
    if call.include_usage:
        yield {"id": call.id, "object": "chat.completion.chunk", "created": call.created, "model": call.model,
               "choices": [], "usage": usage(job)}


def usage(job: GenerationJob) -> dict[str, Any]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
            "completion_tokens_details": {"audio_tokens": job.speech_units, "reasoning_tokens": 0}}


def _audio_id() -> str:
    return f"audio_{uuid.uuid4().hex}"
