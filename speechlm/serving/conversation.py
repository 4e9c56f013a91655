"""OpenAI chat messages -> a `SpeechLMProcessor` conversation, audio decoded; errors name the message part.

User turns take ``text`` and ``input_audio`` parts; system (and ``developer``) turns text; assistant turns
text, or the ``audio: {"id"}`` of an earlier spoken answer of this server (its transcript stands in for
it, as the model's own turn is text it generated before speaking).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

from speechlm.serving.audio_payload import decode_input_audio
from speechlm.serving.errors import bad_request
from speechlm.speech_io.constants import SAMPLE_RATE

ROLE_OF = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_FIELDS = {"system": {"role", "content", "name"}, "developer": {"role", "content", "name"},
                  "user": {"role", "content", "name"},
                  "assistant": {"role", "content", "name", "audio", "refusal", "tool_calls"}}
AUDIO_ID_SECONDS = 3600  # how long an answer's audio id can be sent back (OpenAI's expires_at is an hour too)


class RecentReplies:
    """Transcripts of recent spoken answers by audio id, for multi-turn requests that refer to them.

    Bounded by count and age: a server must not keep every answer it gave.
    """

    def __init__(self, capacity: int = 4096, seconds: float = AUDIO_ID_SECONDS):
        self.capacity = capacity
        self.seconds = seconds
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, audio_id: str, transcript: str) -> int:
        """Remember ``transcript``; returns when the id expires (Unix seconds)."""
        now = time.time()
        with self._lock:
            self._items[audio_id] = (now, transcript)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return int(now + self.seconds)

    def get(self, audio_id: str) -> str | None:
        with self._lock:
            item = self._items.get(audio_id)
        if item is None or time.time() - item[0] > self.seconds:
            return None
        return item[1]


def build_conversation(messages: list[dict[str, Any]], *, max_audio_seconds: float,
                       replies: RecentReplies) -> list[dict]:
    """The processor's conversation: ``{"role", "content": [parts]}`` with audio as 16 kHz arrays."""
    conversation = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role")
        if role not in ROLE_OF:
            raise bad_request(f"{where}.role={role!r} is not supported; expected one of {sorted(ROLE_OF)}",
                              param=f"{where}.role", code="invalid_value")
        unknown = sorted(set(message) - MESSAGE_FIELDS[role])
        if unknown:
            raise bad_request(f"{where} ({role}) has unsupported field(s) {unknown}", param=f"{where}.{unknown[0]}",
                              code="unknown_parameter")
        if role == "assistant":
            content = _assistant_content(message, where, replies)
        else:
            content = _content(message.get("content"), where, role, max_audio_seconds)
        conversation.append({"role": ROLE_OF[role], "content": content})
    return conversation


def _content(content: Any, where: str, role: str, max_audio_seconds: float) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where}.content must be a string or a non-empty list of parts",
                          param=f"{where}.content", code="invalid_value")
    kinds = ("text", "input_audio") if role == "user" else ("text",)
    parts = []
    for number, part in enumerate(content):
        at = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            raise bad_request(f"{at}: a part of type {kind!r} is not supported in a {role} message; this model "
                              f"takes {' and '.join(repr(k) for k in kinds)} parts", param=f"{at}.type",
                              code="unsupported_content_type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string", param=f"{at}.text", code="invalid_value")
            parts.append({"type": "text", "text": part["text"]})
        else:
            waveform = decode_input_audio(part.get("input_audio"), param=f"{at}.input_audio",
                                          max_seconds=max_audio_seconds)
            parts.append({"type": "audio", "audio": waveform, "sampling_rate": SAMPLE_RATE})
    return parts


def _assistant_content(message: dict[str, Any], where: str, replies: RecentReplies) -> list[dict]:
    if message.get("tool_calls"):
        raise bad_request(f"{where}.tool_calls: this server has no tools", param=f"{where}.tool_calls",
                          code="unsupported_parameter")
    content = message.get("content")
    if content is not None:
        return _content(content, where, "assistant", 0.0)
    audio = message.get("audio")
    audio_id = audio.get("id") if isinstance(audio, dict) else None
    if audio_id is None:
        raise bad_request(f"{where}: an assistant message needs content, or audio: {{\"id\"}} of an earlier answer",
                          param=f"{where}.content", code="invalid_value")
    transcript = replies.get(audio_id)
    if transcript is None:
        raise bad_request(f"{where}.audio.id={audio_id!r} is not a recent answer of this server (ids last "
                          f"{AUDIO_ID_SECONDS // 60} minutes); send the answer's transcript as content instead",
                          param=f"{where}.audio.id", code="invalid_value")
    return [{"type": "text", "text": transcript}]
