"""The survey's evaluation metrics (sec. 6) for adapter-based SpeechLMs, on plain Python values.

Each function takes references and hypotheses and returns counts as well as rates, so that reports can
be summed across shards and checked by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import jiwer
from whisper.normalizers import EnglishTextNormalizer
from whisper.normalizers.basic import remove_symbols_and_diacritics

_normalizer = EnglishTextNormalizer()


def normalize_text(text: str) -> str:
    """Whisper's English normalizer: lower case, no punctuation, spelled-out forms unified."""
    return _normalizer(text)


@dataclass(frozen=True)
class ErrorCounts:
    """Edit operations of hypotheses against references (words, characters or units)."""

    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def reference_length(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def rate(self) -> float:
        return (self.substitutions + self.deletions + self.insertions) / max(self.reference_length, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "reference_length": self.reference_length, "rate": self.rate}


def _counts(output) -> ErrorCounts:
    return ErrorCounts(output.substitutions, output.deletions, output.insertions, output.hits)


def _check_lengths(references: Sequence, hypotheses: Sequence) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")


def word_errors(references: Sequence[str], hypotheses: Sequence[str], *, normalize: bool = True) -> ErrorCounts:
    """Word edit counts (WER = ``.rate``), after Whisper's English normalizer unless ``normalize=False``.
    A reference that normalizes to nothing is an error: WER is undefined for it."""
    _check_lengths(references, hypotheses)
    refs = [normalize_text(r) if normalize else r for r in references]
    hyps = [normalize_text(h) if normalize else h for h in hypotheses]
    empty = [i for i, r in enumerate(refs) if not r.strip()]
    if empty:
        raise ValueError(f"reference {empty[0]} ({references[empty[0]]!r}) is empty after normalization; "
                         f"WER needs at least one reference word")
    return _counts(jiwer.process_words(refs, hyps))


def character_errors(references: Sequence[str], hypotheses: Sequence[str], *, normalize: bool = True) -> ErrorCounts:
    """Character edit counts (CER = ``.rate``), spaces included, after the same normalization as WER."""
    _check_lengths(references, hypotheses)
    refs = [normalize_text(r) if normalize else r for r in references]
    hyps = [normalize_text(h) if normalize else h for h in hypotheses]
    return _counts(jiwer.process_characters(refs, hyps))


def unit_errors(references: Sequence[Sequence[int]], hypotheses: Sequence[Sequence[int]]) -> ErrorCounts:
    """Speech-unit edit counts: the unit error rate (``.rate``) of generated against reference units."""
    _check_lengths(references, hypotheses)
    empty = [i for i, r in enumerate(references) if len(r) == 0]
    if empty:
        raise ValueError(f"reference {empty[0]} has no units; the unit error rate needs at least one")
    as_words = [" ".join(f"u{u}" for u in seq) for seq in references]
    hyp_words = [" ".join(f"u{u}" for u in seq) for seq in hypotheses]
    return _counts(jiwer.process_words(as_words, hyp_words))


def _loose(text: str) -> str:
    """Lower case, punctuation and symbols as spaces, accents dropped ("Bogotá" is "bogota": a reference list
    spelled without them, as WER's normalizer does)."""
    return " ".join(remove_symbols_and_diacritics(text.lower()).split())


# A prediction within this word error rate of the question says the question again (a SpeechLM that
# transcribes a spoken question instead of answering it): "Which is colder, ice or fire?" contains "ice".
RESTATED_QUESTION_WER = 0.25


@dataclass(frozen=True)
class AnswerMatch:
    exact: bool       # the prediction is one of the answers, character for character after trimming
    normalized: bool  # equal after lower-casing and removing punctuation and extra spaces
    contains: bool    # an answer appears, normalized, as whole words inside the normalized prediction
    restates_question: bool = False  # the prediction is the question again: no level matches


def match_answer(prediction: str, answers: Sequence[str], question: str | None = None) -> AnswerMatch:
    """How ``prediction`` matches any of ``answers``; given the ``question``, a prediction that restates it
    (`RESTATED_QUESTION_WER`) matches nothing, even where the question holds the answer (a choice)."""
    if not answers:
        raise ValueError("an item needs at least one reference answer")
    if (question is not None and _loose(prediction) and normalize_text(question).split()
            and word_errors([question], [prediction]).rate < RESTATED_QUESTION_WER):
        return AnswerMatch(exact=False, normalized=False, contains=False, restates_question=True)
    loose_prediction = f" {_loose(prediction)} "
    return AnswerMatch(
        exact=any(prediction.strip() == a.strip() for a in answers),
        normalized=any(_loose(prediction) == _loose(a) for a in answers),
        contains=any(f" {_loose(a)} " in loose_prediction for a in answers if _loose(a)),
    )


def pair_accuracy(real_scores: Sequence[float], fake_scores: Sequence[float]) -> float:
    """Share of pairs where the real member scores higher than the fake one (ties count as misses)."""
    _check_lengths(real_scores, fake_scores)
    if not real_scores:
        raise ValueError("pair accuracy needs at least one pair")
    return sum(r > f for r, f in zip(real_scores, fake_scores, strict=True)) / len(real_scores)
