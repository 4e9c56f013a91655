"""``speechlm prepare``: check every audio file and extract codec units once, before training.

The output directory holds::

    prepare.json              the source's hash and the settings; a re-run must match them
    chunks/chunk-00007.parquet  the prepared rows of chunk 7 (rows 7*chunk_size ...), a `datasets` shard
    chunks/chunk-00007.json     the chunk's progress record: written last, so a chunk counts as done
                                only when both files are complete (each is written to a temp file
                                and renamed into place, which is atomic)
    report.json               totals and every bad file with its reason, written when all chunks are done

A re-run skips chunks that have a record, so a killed run resumes where it stopped, losing at most the
chunks in flight and never duplicating one. Under ``accelerate launch`` rank r takes chunks
r, r + world, r + 2 * world, ... and rank 0 writes the report once every rank is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechlm.finetune.examples import Example
from speechlm.finetune.prepared import (
    CHUNKS_DIR,
    FORMAT_VERSION,
    PREPARE_RECORD,
    REPORT_NAME,
    row_schema,
    to_record,
)
from speechlm.finetune.sources import load_examples
from speechlm.speech_io.audio import AudioError, load_audio

LAYER_CHOICES = ("1", "all")


class PrepareError(ValueError):
    """A preparation that cannot go on (other settings in the same directory, too many bad files)."""


@dataclass
class BadItem:
    id: str
    where: str
    field: str
    reason: str


@dataclass
class PrepareReport:
    out_dir: str
    total: int
    prepared: int
    bad: list[BadItem] = field(default_factory=list)
    max_bad_fraction: float = 0.05

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / max(self.total, 1)

    @property
    def passed(self) -> bool:
        return self.bad_fraction <= self.max_bad_fraction

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "prepared": self.prepared, "bad_count": len(self.bad),
                "bad_fraction": self.bad_fraction, "max_bad_fraction": self.max_bad_fraction,
                "passed": self.passed, "bad": [asdict(item) for item in self.bad]}


def prepare(source: Any, codec: Any, out: str | os.PathLike, *, layers: str = "1", batch_size: int = 8,
            chunk_size: int = 256, max_bad_fraction: float = 0.05, allow_extra_fields: bool = False,
            progress: bool = True) -> PrepareReport:
    """Check the audio of every example of ``source`` and extract its codec units into ``out``.

    ``codec``: a codec (`SpeechTokenizerCodec`, `WhisperUnitCodec`) or the directory it loads from. ``layers``: ``"1"`` keeps the
    first (semantic) RVQ layer, which is what the LM's unit tokens are; ``"all"`` also keeps every layer.
    Raises `PrepareError` when more than ``max_bad_fraction`` of the examples are bad (after writing
    the report that lists them).
    """
    from accelerate import PartialState

    if layers not in LAYER_CHOICES:
        raise PrepareError(f"layers={layers!r}: choose one of {list(LAYER_CHOICES)}")
    if batch_size < 1 or chunk_size < 1:
        raise PrepareError(f"batch_size={batch_size}, chunk_size={chunk_size}: both must be >= 1")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise PrepareError(f"max_bad_fraction={max_bad_fraction}: must be in [0, 1]")
    codec = _load_codec(codec)
    examples = load_examples(source, allow_extra_fields=allow_extra_fields)
    out_dir = Path(out)
    settings = {"format": FORMAT_VERSION, "source": str(source), "source_hash": examples_hash(examples),
                "codec_hash": codec_hash(codec), "layers": layers, "chunk_size": chunk_size,
                "num_examples": len(examples), "unit_rate": codec.frame_rate}
    # Without cpu=True, PartialState on a GPU-less machine under `accelerate launch --multi_gpu` reports
    # a single process on every rank: each would then prepare everything.
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=use_cpu or not torch.cuda.is_available())
    _check_settings(out_dir, settings)  # every rank, so that all of them fail alike
    if state.is_main_process:
        _write_atomic(out_dir / PREPARE_RECORD, json.dumps(settings, indent=2) + "\n", exists_ok=True)
    state.wait_for_everyone()

    chunks = range(0, -(-len(examples) // chunk_size))
    mine = [k for k in chunks if k % state.num_processes == state.process_index]
    _extract(examples, mine, codec, out_dir, settings, batch_size=batch_size, progress=progress,
             rank=state.process_index, world=state.num_processes)
    state.wait_for_everyone()

    report = _collect(out_dir, len(chunks), len(examples), max_bad_fraction)
    if state.is_main_process:
        _write_atomic(out_dir / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    state.wait_for_everyone()
    if not report.passed:
        shown = "; ".join(f"{item.where} {item.field}: {item.reason}" for item in report.bad[:3])
        raise PrepareError(f"{len(report.bad)} of {report.total} examples are bad ({report.bad_fraction:.1%} > "
                           f"max_bad_fraction={max_bad_fraction:.1%}); see {out_dir / REPORT_NAME} ({shown})")
    return report


# -- hashes ----------------------------------------------------------------------------------------------

def examples_hash(examples: Sequence[Example]) -> str:
    """A digest of the source rows (not of the audio bytes behind paths)."""
    digest = hashlib.sha256()
    for example in examples:
        record = {key: value for key, value in asdict(example).items() if key != "where"}
        for name in ("audio", "answer_audio"):
            value = record[name]
            if isinstance(value, dict) and value.get("bytes") is not None:
                record[name] = {"path": value.get("path"), "sha256": hashlib.sha256(value["bytes"]).hexdigest()}
        digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def codec_hash(codec) -> str:
    digest = hashlib.sha256(json.dumps(codec.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(codec.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# -- the work ----------------------------------------------------------------------------------------------

def _extract(examples: list[Example], chunks: list[int], codec, out_dir: Path, settings: dict, *,
             batch_size: int, progress: bool, rank: int, world: int) -> None:
    from tqdm.auto import tqdm

    size = settings["chunk_size"]
    chunk_dir = out_dir / CHUNKS_DIR
    chunk_dir.mkdir(parents=True, exist_ok=True)
    for chunk in chunks:  # leftovers of a killed run: never read, so safe to remove
        for stale in chunk_dir.glob(f"chunk-{chunk:05d}.*.tmp*"):
            stale.unlink(missing_ok=True)
    total = sum(len(examples[k * size:(k + 1) * size]) for k in chunks)
    desc = "prepare" if world == 1 else f"prepare rank {rank}/{world}"
    with tqdm(total=total, desc=desc, unit="ex", position=rank, disable=not progress) as bar:
        for chunk in chunks:
            rows = examples[chunk * size:(chunk + 1) * size]
            if _record_path(out_dir, chunk).is_file():
                bar.update(len(rows))
                continue
            records, bad = [], []
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                done, failed = _prepare_batch(batch, codec, settings, batch_size)
                records += done
                bad += failed
                bar.update(len(batch))
            _write_chunk(out_dir, chunk, records, bad, len(rows))


def _prepare_batch(batch: list[Example], codec, settings: dict, batch_size: int
                   ) -> tuple[list[dict], list[BadItem]]:
    """Load (and so check) every audio of the batch, then encode the good ones together."""
    waves: list[np.ndarray] = []
    slots: list[tuple[dict, str]] = []
    records, bad = [], []
    for example in batch:
        record = to_record(example)
        loaded = []
        for name in ("audio", "answer_audio"):
            source = getattr(example, name)
            if source is None:
                continue
            try:
                wave = load_audio(source, name=f"{example.where} {name}")
            except AudioError as error:
                bad.append(BadItem(example.id, example.where, name, str(error)))
                break
            loaded.append((name, wave))
        else:
            for name, wave in loaded:
                prefix = "" if name == "audio" else "answer_"
                record[f"{prefix}num_samples"] = int(wave.shape[0])
                waves.append(wave)
                slots.append((record, prefix))
            records.append(record)
    if waves:
        n_q = 1 if settings["layers"] == "1" else codec.n_q
        for (record, prefix), units in zip(slots, codec.encode(waves, n_q=n_q, batch_size=batch_size), strict=True):
            record[f"{prefix}units"] = units[0].astype(np.int32).tolist()
            if n_q > 1 and not prefix:
                record["units_all"] = units.astype(np.int32).tolist()
    return records, bad


def _write_chunk(out_dir: Path, chunk: int, records: list[dict], bad: list[BadItem], rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = row_schema()
    table = pa.Table.from_pylist([{name: record.get(name) for name in schema.names} for record in records],
                                 schema=schema)
    target = out_dir / CHUNKS_DIR / f"chunk-{chunk:05d}.parquet"
    temp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    pq.write_table(table, temp)
    os.replace(temp, target)
    # The record goes last: a chunk without one is redone, overwriting any parquet file it left.
    record = {"chunk": chunk, "rows": rows, "prepared": len(records), "bad": [asdict(item) for item in bad]}
    _write_atomic(_record_path(out_dir, chunk), json.dumps(record) + "\n")


def _record_path(out_dir: Path, chunk: int) -> Path:
    return out_dir / CHUNKS_DIR / f"chunk-{chunk:05d}.json"


def _collect(out_dir: Path, num_chunks: int, total: int, max_bad_fraction: float) -> PrepareReport:
    prepared, bad, missing = 0, [], []
    for chunk in range(num_chunks):
        path = _record_path(out_dir, chunk)
        if not path.is_file():
            missing.append(chunk)
            continue
        record = json.loads(path.read_text())
        prepared += record["prepared"]
        bad += [BadItem(**item) for item in record["bad"]]
    if missing:
        raise PrepareError(f"{out_dir}: chunks {missing[:10]} were not prepared (did a rank fail?); run "
                           f"speechlm prepare again to finish them")
    return PrepareReport(str(out_dir), total, prepared, bad, max_bad_fraction)


def _check_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / PREPARE_RECORD
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    changed = [key for key in ("format", "source_hash", "codec_hash", "layers", "chunk_size")
               if previous.get(key) != settings[key]]
    if changed:
        raise PrepareError(f"{out_dir} was prepared with other {', '.join(changed)} (from {previous.get('source')}); "
                           f"use another --out directory, or delete this one to start over")


def _write_atomic(path: Path, text: str, *, exists_ok: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if exists_ok and path.is_file() and path.read_text() == text:
        return
    temp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


def _load_codec(codec):
    if isinstance(codec, (str, os.PathLike)):
        from speechlm.speech_io.codec_loading import load_codec

        try:
            return load_codec(codec)
        except FileNotFoundError as error:
            raise PrepareError(f"--codec {codec}: {error}") from error
    return codec
