"""The demo's synthesized speech corpus: diverse texts spoken by a Piper voice, with manifests and a card.

    corpus/<size>/train.jsonl, heldout.jsonl, ood.jsonl, audio/*.flac, CORPUS.md, build.json

Rows follow the project's manifest format (``finetune.examples``): ``id``, ``audio`` (relative to the
manifest), ``text`` (what is spoken); spoken questions add ``answer`` (the backbone's own greedy answer
to the same text: the self-distillation target, as Ultravox) and, where we know one, ``expected``
(acceptable short answers, for accuracy). Informational fields: ``source``, ``kind``, ``synthesis``.

Splits: ``heldout`` is a seeded random share of each training source; ``ood`` holds the texts of a
source never used in training (package READMEs; a corpus size may train on other documentation, the
standard library's docstrings) and question kinds never asked in training.
Every clip and every backbone text is cached; a re-run with the same settings only re-reads them.

This module holds the sizes and `build_corpus`; the texts are `corpus_texts`, the synthesis `corpus_audio`,
the answer and vocabulary scoring `corpus_scoring`, the card `corpus_card`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile as sf

from speechlm.demo import texts
from speechlm.demo.corpus_audio import (
    ClipToSpeak,
    alignment_path,
    clip_file_name,
    speak_clips,
    synthesis_settings,
)
from speechlm.demo.corpus_card import corpus_card, split_counts
from speechlm.demo.corpus_scoring import question_accuracy, vocabulary_heard
from speechlm.demo.corpus_texts import EVALUATION_SPLITS, SPLITS, BackboneWriter, text_rows

CORPUS_VERSION = 3  # bump when rows or audio would change for the same settings


@dataclass(frozen=True)
class CorpusSize:
    """How many texts of each source; ``None`` takes all there are."""

    templates: int
    backbone: int
    questions: int | None
    docs: int | None
    stdlib: int = 0  # standard-library docstring sentences (train + heldout); none in the quick start
    # sentences the backbone writes with the `common_words` most common English words that the other training
    # texts speak fewer than `word_repeats` times, chosen to cover them (train + heldout)
    words: int = 0
    # the same kind of sentences heard by the speech decoder only (split `decoder`): the LM's splits stay as they are
    decoder_words: int = 0
    common_words: int = 1000
    word_repeats: int = 3
    heldout_fraction: float = 0.1
    question_heldout_fraction: float = 0.2  # more, so that spoken QA has enough known-answer questions

    def __post_init__(self) -> None:
        if self.words and self.decoder_words:
            raise ValueError(f"CorpusSize: words={self.words} and decoder_words={self.decoder_words}; the word "
                             "sentences go either to the LM's splits (words) or to the speech decoder's (decoder_words)")


CORPUS_SIZES = {
    # a few dozen clips: enough for every split, source and question kind to appear (CI, tests)
    "ci": CorpusSize(templates=16, backbone=8, questions=16, docs=6),
    # ~2,300 clips: the quick start's corpus. 1,000 stdlib sentences more raised the ood split's words heard
    # in training from 62% to 81% but made every figure worse at 15 minutes of training (BENCHMARKS.md).
    "full": CorpusSize(templates=1300, backbone=600, questions=None, docs=None, decoder_words=600),
    # the same hours of speech with 700 templates fewer and ~530 sentences with the common English words: the
    # 1,000 most common heard 3+ times in training 27% -> 54%, the ood words heard 62% -> 73%; its speech
    # decoder is heard far better (ood 72% -> 50% WER, spoken answers 56% -> 38%), but in two runs the LM
    # trained on it answered fewer spoken questions (9 and 7 of 22, against 10-13) and its ood WER was 9.5
    # and 10.4% (7.7-10.4% before): not the quick start's default (BENCHMARKS.md, `full39`, `full40`)
    "full-words": CorpusSize(templates=600, backbone=600, questions=None, docs=None, words=600),
}


@dataclass(frozen=True)
class Voice:
    """A Piper voice: its ONNX model and config files."""

    model: Path
    config: Path


@dataclass
class CorpusPaths:
    directory: Path
    manifests: dict[str, Path]
    card: Path
    build: dict


def corpus_size(size: str | CorpusSize) -> CorpusSize:
    if isinstance(size, CorpusSize):
        return size
    if size not in CORPUS_SIZES:
        raise ValueError(f"corpus size {size!r}: choose one of {list(CORPUS_SIZES)}")
    return CORPUS_SIZES[size]


def build_corpus(out: str | os.PathLike, backbone_dir: str | os.PathLike, voice: Voice, *,
                 size: str | CorpusSize = "ci", seed: int = 0, text_cache: str | os.PathLike | None = None,
                 workers: int | None = None, unspoken_splits: Sequence[str] = (), spoken_train: int | None = None,
                 progress: Callable[[str], None] = print) -> CorpusPaths:
    """Build (or reuse) the corpus in ``out``; ``text_cache`` keeps the backbone's texts across sizes;
    ``workers``: the processes that speak the clips (`speak_clips`; None: one a core). The rows of
    ``unspoken_splits`` keep their texts and get no clip (no ``audio`` field): the `decoder` split where the
    speech decoder is not trained here (the shipped codec's heard them); a later build without it speaks them.
    ``spoken_train``: speak only this many of the ``train`` split's clips (`spoken_training_ids`), the others
    kept as texts like the unspoken splits' rows (None: all)."""
    unknown = sorted(set(unspoken_splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unspoken_splits={list(unspoken_splits)}: {unknown} are not splits; choose from {list(SPLITS)}")
    if spoken_train is not None and (isinstance(spoken_train, bool) or not isinstance(spoken_train, int)
                                     or spoken_train < 0):
        raise ValueError(f"spoken_train={spoken_train!r}: expected a number of training clips >= 0, or None for all")
    settings = corpus_size(size)
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    writer = BackboneWriter(backbone_dir, Path(text_cache or out / "backbone-texts.json"))
    timings: dict[str, float] = {}

    start = time.perf_counter()
    docs, doc_versions = texts.doc_sentences()
    stdlib, python_version = texts.stdlib_sentences() if settings.stdlib else ([], None)
    rows = text_rows(settings, seed, writer, docs, stdlib, progress)
    timings["texts_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    questions = [row for row in rows if row["source"] == "questions"]
    progress(f"backbone answers for {len(questions)} spoken questions (greedy, cached)")
    for row, (answer, complete) in zip(questions, writer.answers([row["text"] for row in questions]),
                                       strict=True):
        row["answer"] = answer
        if not complete:
            row["answer_truncated"] = True
    timings["answers_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    training = [row for row in rows if row["split"] == "train"]
    spoken_ids = {row["id"] for row in training} if spoken_train is None else \
        set(spoken_training_ids(training, spoken_train, seed))
    unspoken = []
    for row in rows:
        if row["split"] in unspoken_splits or (row["split"] == "train" and row["id"] not in spoken_ids):
            continue
        row["synthesis"] = synthesis_settings(row["id"], seed)
        row["audio"] = f"audio/{clip_file_name(row['id'], row['text'], row['synthesis'], seed)}"
        path = out / row["audio"]
        aligned = alignment_path(path)
        if path.is_file() and aligned.is_file():
            row["alignment"] = json.loads(aligned.read_text())
        else:  # new, or a clip from before alignments: Piper speaks it again
            unspoken.append(row)
    clips = [ClipToSpeak(row["text"], row["synthesis"], out / row["audio"], seed) for row in unspoken]

    def spoken_so_far(done: int) -> None:
        if done % 100 == 0:
            progress(f"synthesized {done}/{len(clips)} clips")

    spoken = speak_clips(voice, clips, workers=workers, progress=spoken_so_far)
    for row, alignment in zip(unspoken, spoken, strict=True):
        row["alignment"] = alignment
    made = len(unspoken)
    timings["synthesis_seconds"] = time.perf_counter() - start
    timings = {key: round(value, 3) for key, value in timings.items()}
    timings["clips_synthesized"] = made
    if made:
        timings["synthesis_seconds_per_clip"] = round(timings["synthesis_seconds"] / made, 3)

    manifests = {}
    for split in SPLITS:
        manifests[split] = out / f"{split}.jsonl"
        split_rows = [{k: v for k, v in row.items() if k != "split"} for row in rows if row["split"] == split]
        manifests[split].write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in split_rows))
    audio_seconds = sum(sf.info(str(out / row["audio"])).duration for row in rows if "audio" in row)
    known = [row for row in rows if row.get("expected")]
    build = {"version": CORPUS_VERSION, "size": asdict(settings), "seed": seed,
             "clips": sum("audio" in row for row in rows), "unspoken_splits": sorted(unspoken_splits),
             "spoken_train": {"clips": len(spoken_ids), "of": len(training)},
             "audio_hours": round(audio_seconds / 3600, 3), "doc_packages": doc_versions,
             "stdlib_python": python_version, "vocabulary_heard": vocabulary_heard(rows),
             "backbone_text_accuracy": {split: question_accuracy([r for r in known if r["split"] == split])
                                        for split in ("train", *EVALUATION_SPLITS)},
             "counts": split_counts(rows), "this_run": timings}
    # A re-run that only re-reads the cache keeps the first build's timings (they are what a user waits).
    previous = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else {}
    build["first_build"] = previous["first_build"] if made == 0 and "first_build" in previous else timings
    (out / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    card = out / "CORPUS.md"
    card.write_text(corpus_card(build, voice))
    return CorpusPaths(out, manifests, card, build)


def spoken_training_ids(rows: Sequence[dict], count: int, seed: int = 0) -> list[str]:
    """The ids of ``count`` training rows to speak: every question first (the spoken requests that instruction
    tasks answer), then the other texts in an order seeded by their ids, so that a larger count speaks a superset
    (a cache's clips are reused) and each source keeps about its share."""
    questions = [row["id"] for row in rows if row["source"] == "questions"]
    others = sorted((row["id"] for row in rows if row["source"] != "questions"),
                    key=lambda row_id: hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest())
    return (questions + others)[:count]
