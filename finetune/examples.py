"""Training examples: what one manifest row (or dataset row) holds, checked field by field.

A manifest is JSONL, one example per line; paths are relative to the manifest's folder::

    {"id": "utt1", "audio": "wavs/utt1.wav", "text": "hello world",
     "words": [{"text": "hello", "start": 0.12, "end": 0.48}, {"text": "world", "start": 0.55, "end": 0.98}]}
    {"id": "q7", "audio": "wavs/q7.wav", "answer": "Paris.", "answer_audio": "wavs/q7_answer.wav"}
    {"id": "chat3", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

Fields: ``id`` (required, unique), ``audio`` (the spoken input), ``text`` (its transcript), ``answer``
and ``answer_audio`` (a text answer and its spoken form, for instruction tasks), ``answer_truncated``
(true: the answer is the start of a longer one, cut where its generation hit a length limit, so the
model learns its tokens but not to stop after them), ``messages`` (a conversation in the processor's
format; ``"truncated": true`` on an assistant message means the same), ``task`` (restricts the row to
one task), ``words`` / ``sentences`` (timings in seconds within ``audio``, for interleaving). Any other
field is an error naming the closest known one (a typo such as ``txt`` would otherwise train on rows
without text); ``allow_extra_fields`` (``speechlm prepare --allow-extra-fields``,
``data.allow_extra_fields``) ignores them, for data that carries its own bookkeeping. Dataset columns
are not checked: a dataset has its own.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Rows may restrict themselves to one of these; finetune.tasks defines them.
TASK_NAMES = ("asr", "tts", "continuation", "s2t_instruct", "s2s_chain", "interleaved", "text", "s2t_kl")
TEXT_FIELDS = ("text", "answer")
AUDIO_FIELDS = ("audio", "answer_audio")
TIMING_FIELDS = ("words", "sentences")
MANIFEST_FIELDS = ("id", *TEXT_FIELDS, "answer_truncated", *AUDIO_FIELDS, "messages", "task", *TIMING_FIELDS)


class ManifestError(ValueError):
    """Rows that cannot be used; the message names the file, the line and the field of each."""


@dataclass
class Span:
    """A word or sentence of ``text`` and where it is spoken in ``audio`` (seconds)."""

    text: str
    start: float
    end: float


@dataclass
class Example:
    """One training example. Audio is a path (absolute), file bytes, or a datasets Audio dict."""

    id: str
    audio: Any = None
    text: str | None = None
    answer: str | None = None
    answer_audio: Any = None
    answer_truncated: bool = False  # the answer stops where its generation was cut, not where it ends
    messages: list[dict] | None = None
    task: str | None = None
    words: list[Span] | None = None
    sentences: list[Span] | None = None
    # Filled by `speechlm prepare`: 16 kHz sample counts and codec units (layer 1) of the two audios.
    num_samples: int | None = None
    answer_num_samples: int | None = None
    units: list[int] | None = None
    answer_units: list[int] | None = None
    units_all: list[list[int]] | None = None
    unit_rate: int | None = None
    where: str = field(default="", repr=False)  # "manifest.jsonl line 3", for messages

    def has(self, name: str) -> bool:
        value = getattr(self, name)
        return value is not None and value != "" and value != []


def parse_row(row: Mapping[str, Any], *, base_dir: Path | None, where: str,
              problems: list[str], allow_extra_fields: bool = True) -> Example | None:
    """An `Example` from a manifest or dataset row; appends ``"{where}, field 'x': ..."`` to ``problems``.
    Fields other than `MANIFEST_FIELDS` are ignored with ``allow_extra_fields``, and problems without."""
    start = len(problems)

    def bad(name: str, message: str) -> None:
        problems.append(f"{where}, field {name!r}: {message}")

    if not isinstance(row, Mapping):
        problems.append(f"{where}: expected a JSON object, got {type(row).__name__}")
        return None
    if not allow_extra_fields:
        for name in row:
            if name not in MANIFEST_FIELDS:
                bad(name, f"not a manifest field{closest_field(str(name))}; known fields: {list(MANIFEST_FIELDS)} "
                          f"(allow_extra_fields, or --allow-extra-fields, ignores fields like it)")
    row_id = row.get("id")
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    if not isinstance(row_id, str) or not row_id:
        bad("id", f"expected a non-empty string, got {row_id!r}")
    values: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            bad(name, f"expected a string, got {type(value).__name__}")
        values[name] = value
    truncated = row.get("answer_truncated")
    if truncated is not None and not isinstance(truncated, bool):
        bad("answer_truncated", f"expected true or false, got {truncated!r:.40}")
    values["answer_truncated"] = bool(truncated)
    for name in AUDIO_FIELDS:
        values[name] = _audio_field(row.get(name), base_dir, lambda message, n=name: bad(n, message))
    task = row.get("task")
    if task is not None and task not in TASK_NAMES:
        bad("task", f"{task!r} is not a task; choose one of {list(TASK_NAMES)}")
    values["task"] = task
    messages = row.get("messages")
    if messages is not None:
        messages = _messages(messages, base_dir, lambda message: bad("messages", message))
    values["messages"] = messages
    for name in TIMING_FIELDS:
        values[name] = _spans(row.get(name), lambda message, n=name: bad(n, message))
    if all(row.get(name) is None for name in ("audio", "text", "messages")):
        problems.append(f"{where}: has none of 'audio', 'text', 'messages'; an example needs at least one")
    if any(values[name] for name in TIMING_FIELDS) and values["audio"] is None:
        problems.append(f"{where}: has word/sentence timings but no 'audio' they refer to")
    if len(problems) > start:
        return None
    return Example(id=row_id, where=where, **values)


def closest_field(name: str) -> str:
    close = difflib.get_close_matches(name, MANIFEST_FIELDS, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_manifest(path: str | Path, *, allow_extra_fields: bool = False) -> list[Example]:
    """Every row of a JSONL manifest, or one `ManifestError` listing every bad row (file, line, field)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest file")
    problems: list[str] = []
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for number, where, row in jsonl_rows(path, problems):
        example = parse_row(row, base_dir=path.parent, where=where, problems=problems,
                            allow_extra_fields=allow_extra_fields)
        if example is None:
            continue
        if example.id in seen:
            problems.append(f"{where}, field 'id': {example.id!r} repeats line {seen[example.id]}; ids must be "
                            f"unique")
            continue
        seen[example.id] = number
        examples.append(example)
    raise_problems(problems, path)
    if not examples:
        raise ManifestError(f"{path}: holds no examples (expected one JSON object per line)")
    return examples


def jsonl_rows(path: Path, problems: list[str]) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "FILE line N", parsed row)`` of each non-blank line; lines that are not JSON are
    added to ``problems`` instead, so that a reader can report every bad line at once."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problems.append(f"{where}: not UTF-8 text (byte {error.start + 1}); JSONL is UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield number, where, json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{where}: not valid JSON ({error.msg} at column {error.colno})")


def read_jsonl(path: str | Path) -> list[Any]:
    """Every row of a JSONL file; a `ManifestError` naming each line that is not JSON."""
    problems: list[str] = []
    rows = [row for _, _, row in jsonl_rows(Path(path), problems)]
    raise_problems(problems, path)
    return rows


def raise_problems(problems: list[str], source: Path | str, *, shown: int = 20) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise ManifestError(f"{source}: {len(problems)} problems:\n  - " + "\n  - ".join(problems[:shown]) + more)


def _audio_field(value: Any, base_dir: Path | None, bad) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            bad("expected a path, got an empty string")
            return None
        path = Path(value)
        return str(path if path.is_absolute() or base_dir is None else (base_dir / path).resolve())
    if isinstance(value, Mapping) and any(value.get(key) is not None for key in ("path", "bytes", "array")):
        return dict(value)  # a datasets Audio dict; load_audio reads every form of it
    bad(f"expected a path relative to the manifest (or a datasets Audio dict), got {value!r:.60}")
    return None


def _messages(value: Any, base_dir: Path | None, bad) -> list[dict] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            bad("expected a list of {'role', 'content'} messages (or its JSON text)")
            return None
    if not isinstance(value, list) or not value:
        bad("expected a non-empty list of {'role', 'content'} messages")
        return None
    messages = []
    for turn, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            bad(f"message {turn}: expected a dict with 'role' and 'content', got {message!r:.60}")
            return None
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "audio" and isinstance(part.get("audio"), str):
                    part = {**part, "audio": _audio_field(part["audio"], base_dir, bad)}
                parts.append(part)
            content = parts
        elif not isinstance(content, str):
            bad(f"message {turn}: content must be a string or a list of parts, got {type(content).__name__}")
            return None
        truncated = message.get("truncated", False)
        if not isinstance(truncated, bool) or (truncated and message["role"] != "assistant"):
            bad(f"message {turn}: 'truncated' is true or false, on an assistant message; got {truncated!r:.40} "
                f"on a {message['role']!r} message")
            return None
        messages.append({"role": message["role"], "content": content,
                         **({"truncated": True} if truncated else {})})
    if not any(message["role"] == "assistant" for message in messages):
        bad("has no assistant message, so there is nothing to learn")
        return None
    return messages


def _spans(value: Any, bad) -> list[Span] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            bad("expected a list of {'text', 'start', 'end'} (or its JSON text)")
            return None
    if not isinstance(value, list):
        bad(f"expected a list of {{'text', 'start', 'end'}}, got {type(value).__name__}")
        return None
    spans: list[Span] = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            bad(f"item {index}: expected {{'text', 'start', 'end'}}, got {item!r:.60}")
            return None
        text = item.get("text", item.get("word"))
        start, end = item.get("start"), item.get("end")
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                      for x in (start, end))
        if not isinstance(text, str) or not numbers:
            bad(f"item {index}: expected {{'text': str, 'start': seconds, 'end': seconds}}, got {item!r:.60}")
            return None
        if not 0 <= start <= end:
            bad(f"item {index}: start={start} end={end}; expected 0 <= start <= end")
            return None
        if spans and start < spans[-1].start:
            bad(f"item {index}: starts at {start} s, before item {index - 1} ({spans[-1].start} s); expected "
                f"spans in time order")
            return None
        spans.append(Span(text, float(start), float(end)))
    return spans
