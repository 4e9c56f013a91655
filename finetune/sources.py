"""Where examples come from: a JSONL manifest, a `speechlm prepare` output, or a Hugging Face dataset.

``load_examples`` takes any of them:
- ``*.jsonl``: a manifest (see ``finetune.examples``);
- a directory written by ``speechlm prepare`` (``prepare.json`` inside): examples with codec units;
- a directory written by ``datasets.Dataset.save_to_disk`` (``state.json`` inside);
- any other directory: ``load_dataset("audiofolder", data_dir=...)`` (audio files + ``metadata.jsonl``);
- a ``datasets.Dataset`` object, e.g. from ``load_dataset("json", ...)`` with an Audio column.
Dataset columns carry the manifest's field names; audio columns are read undecoded (path/bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from speechlm.finetune.examples import Example, ManifestError, parse_row, raise_problems, read_manifest

PREPARE_RECORD = "prepare.json"


def load_examples(source: Any) -> list[Example]:
    """Every example of ``source`` (see the module docstring for the accepted forms)."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return examples_from_rows(undecoded(source), where=f"dataset {source.info.dataset_name or ''}".strip())
    path = Path(source)
    if path.is_file():
        return read_manifest(path)
    if not path.is_dir():
        raise ManifestError(f"{path}: no such manifest file or dataset directory")
    if (path / PREPARE_RECORD).is_file():
        from speechlm.finetune.prepare import load_prepared

        return load_prepared(path)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise ManifestError(f"{path}: a DatasetDict without a 'train' split (has {sorted(dataset)})")
            dataset = dataset["train"]
        return examples_from_rows(undecoded(dataset), where=str(path), base_dir=path)
    try:
        dataset = datasets.load_dataset("audiofolder", data_dir=str(path), split="train")
    except ImportError as error:  # datasets encodes Audio columns with torchcodec (which needs FFmpeg)
        raise ManifestError(f"{path}: reading an audiofolder needs torchcodec and FFmpeg ({error}); install them, "
                            f"or list the files in a JSONL manifest") from error
    return examples_from_rows(undecoded(dataset), where=str(path), base_dir=path)


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
