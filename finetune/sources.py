"""Where examples come from: a JSONL manifest, a `speechlm prepare` output, or a Hugging Face dataset.

``load_examples`` takes any of them:
- ``*.jsonl``: a manifest (see ``finetune.examples``);
- a directory written by ``speechlm prepare`` (``prepare.json`` inside): examples with codec units;
- a directory written by ``datasets.Dataset.save_to_disk`` (``state.json`` inside);
- any other directory: an audiofolder as ``load_dataset("audiofolder")`` reads it: audio files and a
  ``metadata.jsonl`` or ``metadata.csv`` whose ``file_name`` column names each row's audio file, at the top
  or in ``train/``. Read here, not by ``datasets``, whose audiofolder needs torchcodec and FFmpeg only to
  pass the file names on;
- a ``datasets.Dataset`` object, e.g. from ``load_dataset("json", ...)`` with an Audio column.
Dataset columns carry the manifest's field names; audio columns are read undecoded (path/bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from speechlm.finetune.examples import (
    Example,
    ManifestError,
    parse_row,
    raise_problems,
    read_jsonl,
    read_manifest,
)
from speechlm.finetune.prepared import PREPARE_RECORD, load_prepared


def load_examples(source: Any, *, allow_extra_fields: bool = False) -> list[Example]:
    """Every example of ``source`` (see the module docstring for the accepted forms); a manifest's unknown
    fields are errors unless ``allow_extra_fields`` (see ``finetune.examples``)."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return examples_from_rows(undecoded(source), where=f"dataset {source.info.dataset_name or ''}".strip())
    path = Path(source)
    if path.is_file():
        return read_manifest(path, allow_extra_fields=allow_extra_fields)
    if not path.is_dir():
        raise ManifestError(f"{path}: no such manifest file or dataset directory")
    if (path / PREPARE_RECORD).is_file():
        return load_prepared(path)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise ManifestError(f"{path}: a DatasetDict without a 'train' split (has {sorted(dataset)})")
            dataset = dataset["train"]
        return examples_from_rows(undecoded(dataset), where=str(path), base_dir=path)
    return audiofolder_examples(path)


def audiofolder_examples(path: Path) -> list[Example]:
    """The examples of an audiofolder's train split (see the module docstring); ``file_name`` becomes
    ``audio``, the other columns keep their names."""
    candidates = [folder / f"metadata.{kind}" for folder in (path, path / "train") for kind in ("jsonl", "csv")]
    found = [candidate for candidate in candidates if candidate.is_file()]
    if not found:
        raise ManifestError(f"{path}: not a manifest, saved dataset or audiofolder directory (expected "
                            f"prepare.json, state.json, or an audiofolder's {' or '.join(c.name for c in candidates[:2])} "
                            f"here or in train/)")
    metadata = found[0]
    if metadata.suffix == ".csv":
        import csv

        with metadata.open(newline="", encoding="utf-8") as file:
            rows = [{key: value for key, value in row.items() if value != ""}  # an empty cell: no value
                    for row in csv.DictReader(file)]
    else:
        rows = read_jsonl(metadata)
    problems: list[str] = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("file_name"):
            problems.append(f"{metadata} row {number}: no 'file_name' (the audio file, relative to {metadata.parent})")
        else:
            row["audio"] = row.pop("file_name")
    raise_problems(problems, metadata)
    return examples_from_rows(rows, where=str(metadata), base_dir=metadata.parent)


def undecoded(dataset):
    """The dataset with every Audio column as ``{"path", "bytes"}``: speech_io decodes it, not torchcodec."""
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Audio) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Audio(decode=False))
    return dataset


def examples_from_rows(rows: Iterable[Mapping[str, Any]], *, where: str, base_dir: Path | None = None
                       ) -> list[Example]:
    problems: list[str] = []
    examples, seen = [], set()
    for index, row in enumerate(rows):
        row = dict(row)
        if row.get("id") is None:  # datasets fill absent columns with None
            row["id"] = str(index)
        example = parse_row(row, base_dir=base_dir, where=f"{where} row {index}", problems=problems)
        if example is None:
            continue
        if example.id in seen:
            problems.append(f"{where} row {index}, field 'id': {example.id!r} repeats; ids must be unique")
            continue
        seen.add(example.id)
        examples.append(example)
    raise_problems(problems, where)
    if not examples:
        raise ManifestError(f"{where}: holds no examples")
    return examples
