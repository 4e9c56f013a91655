"""Scoring the corpus's answers and words: whether an answer holds an expected short answer, and how much of
each held-out split's vocabulary some training clip speaks."""

from __future__ import annotations

from collections.abc import Sequence

from speechlm.demo.corpus_texts import EVALUATION_SPLITS
from speechlm.demo.texts import spoken_words
from speechlm.finetune.metrics import match_answer


def answer_is_correct(answer: str, expected: Sequence[str]) -> bool:
    """Whether an answer contains one of the expected short answers as whole words (as the evaluation's
    `match_answer` reads it: case, punctuation and accents aside)."""
    return match_answer(answer, expected).contains


def vocabulary_heard(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per held-out split (and per source in it): the share of its running words that some training
    clip speaks (a training text left unspoken is not heard). No adapter can be expected to write a word it
    never heard."""
    heard = {word for row in rows if row["split"] == "train" and "audio" in row for word in spoken_words(row["text"])}
    shares: dict[str, dict[str, float]] = {}
    for split in EVALUATION_SPLITS:
        split_rows = [row for row in rows if row["split"] == split]
        groups = {"all": split_rows, **{source: [row for row in split_rows if row["source"] == source]
                                        for source in sorted({row["source"] for row in split_rows})}}
        shares[split] = {}
        for name, group in groups.items():
            words = [word for row in group for word in spoken_words(row["text"])]
            if words:
                shares[split][name] = round(sum(word in heard for word in words) / len(words), 3)
    return shares


def question_accuracy(rows: list[dict]) -> dict:
    correct = sum(answer_is_correct(row["answer"], row["expected"]) for row in rows)
    return {"correct": correct, "questions": len(rows)}

