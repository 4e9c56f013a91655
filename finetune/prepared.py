"""The folder ``speechlm prepare`` writes, as data: its file names, the schema of its rows and the way an
`Example` becomes a row and back. `speechlm.finetune.prepare` writes it; `load_prepared` reads a finished one
(`speechlm.finetune.sources` takes it as a training source).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from speechlm.finetune.examples import Example, ManifestError, Span

PREPARE_RECORD = "prepare.json"
REPORT_NAME = "report.json"
CHUNKS_DIR = "chunks"
FORMAT_VERSION = 2  # 2: rows say whether their answer was truncated (`Example.answer_truncated`)


def load_prepared(directory: str | os.PathLike) -> list[Example]:
    """The examples of a finished ``speechlm prepare`` output, in source order, bad ones left out."""
    directory = Path(directory)
    report = directory / REPORT_NAME
    if not report.is_file():
        raise ManifestError(f"{directory}: preparation is not finished (no {REPORT_NAME}); run speechlm prepare "
                            f"again to complete it")
    settings = json.loads((directory / PREPARE_RECORD).read_text())
    if settings.get("format") != FORMAT_VERSION:
        raise ManifestError(f"{directory}: prepared in format {settings.get('format')}, this speechlm reads format "
                            f"{FORMAT_VERSION}; run speechlm prepare again into a new folder")
    examples = []
    for row in prepared_dataset(directory):
        examples.append(from_record(row, settings["unit_rate"], f"{directory} id {row['id']}"))
    return examples


def prepared_dataset(directory: str | os.PathLike):
    """The prepared rows as a `datasets.Dataset` (memory-mapped Arrow built from the parquet shards)."""
    import datasets

    directory = Path(directory)
    files = sorted(str(path) for path in (directory / CHUNKS_DIR).glob("chunk-*.parquet"))
    if not files:
        return datasets.Dataset.from_list([], features=datasets.Features.from_arrow_schema(row_schema()))
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(directory / ".cache"))


def to_record(example: Example) -> dict[str, Any]:
    record: dict[str, Any] = {"id": example.id, "text": example.text, "answer": example.answer,
                              "answer_truncated": example.answer_truncated, "task": example.task,
                              "where": example.where}
    for name in ("audio", "answer_audio"):
        value = getattr(example, name)
        record[name], record[f"{name}_bytes"] = None, None
        if isinstance(value, str):
            record[name] = value
        elif isinstance(value, dict):
            if value.get("bytes") is not None:
                record[f"{name}_bytes"] = bytes(value["bytes"])
            elif value.get("path") is not None:
                record[name] = str(value["path"])
    record["messages"] = None if example.messages is None else json.dumps(example.messages)
    for name in ("words", "sentences"):
        spans = getattr(example, name)
        record[name] = None if spans is None else json.dumps([asdict(span) for span in spans])
    return record


def from_record(row: dict[str, Any], unit_rate: int, where: str) -> Example:
    def audio(name):
        if row.get(f"{name}_bytes") is not None:
            return {"bytes": row[f"{name}_bytes"], "path": None}
        return row.get(name)

    def spans(name):
        return None if row.get(name) is None else [Span(**item) for item in json.loads(row[name])]

    return Example(id=row["id"], audio=audio("audio"), text=row["text"], answer=row["answer"],
                   answer_truncated=bool(row["answer_truncated"]), answer_audio=audio("answer_audio"),
                   messages=None if row["messages"] is None else json.loads(row["messages"]),
                   task=row["task"], words=spans("words"), sentences=spans("sentences"),
                   num_samples=row["num_samples"], answer_num_samples=row["answer_num_samples"],
                   units=row["units"], answer_units=row["answer_units"], units_all=row["units_all"],
                   unit_rate=unit_rate, where=row.get("where") or where)


def row_schema():
    import pyarrow as pa

    units = pa.list_(pa.int32())
    return pa.schema([
        ("id", pa.string()), ("where", pa.string()), ("text", pa.string()), ("answer", pa.string()),
        ("answer_truncated", pa.bool_()), ("task", pa.string()), ("messages", pa.string()),
        ("words", pa.string()), ("sentences", pa.string()),
        ("audio", pa.string()), ("audio_bytes", pa.binary()), ("num_samples", pa.int64()),
        ("answer_audio", pa.string()), ("answer_audio_bytes", pa.binary()), ("answer_num_samples", pa.int64()),
        ("units", units), ("answer_units", units), ("units_all", pa.list_(units)),
    ])
