from __future__ import annotations

import pytest

from speechlm.finetune.metrics import (
    character_errors,
    match_answer,
    normalize_text,
    pair_accuracy,
    unit_errors,
    word_errors,
)


def test_wer_of_exactly_one_third():
    counts = word_errors(["the cat sat"], ["the bat sat"])
    assert (counts.substitutions, counts.deletions, counts.insertions, counts.hits) == (1, 0, 0, 2)
    assert counts.rate == pytest.approx(1 / 3)


def test_wer_counts_each_kind_of_error():
    counts = word_errors(["red green blue black", "cat dog"], ["red blue black", "cat dog fish"])
    assert (counts.substitutions, counts.deletions, counts.insertions) == (0, 1, 1)
    assert counts.reference_length == 6 and counts.rate == pytest.approx(2 / 6)


def test_normalization_forgives_case_punctuation_and_spelling():
    assert word_errors(["Hello, Mr. Smith!"], ["hello mister smith"]).rate == 0
    assert word_errors(["Hello, Mr. Smith!"], ["hello mister smith"], normalize=False).rate > 0
    assert normalize_text("It's") == "it is"


def test_cer_of_one_character_in_four():
    assert character_errors(["abcd"], ["abxd"], normalize=False).rate == pytest.approx(1 / 4)


def test_unit_error_rate():
    counts = unit_errors([[1, 2, 3, 4]], [[1, 2, 4]])
    assert counts.deletions == 1 and counts.rate == pytest.approx(1 / 4)
    assert unit_errors([[5, 5]], [[5, 5]]).rate == 0


def test_empty_references_are_refused():
    with pytest.raises(ValueError, match="reference 0 .* empty after normalization"):
        word_errors(["?!"], ["x"])
    with pytest.raises(ValueError, match="reference 1 has no units"):
        unit_errors([[1], []], [[1], [2]])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_errors(["a", "b"], ["a"])


def test_answer_matching_levels():
    assert match_answer("Paris", ["Paris"]) == match_answer(" Paris ", ["Paris"])
    loose = match_answer("paris.", ["Paris"])
    assert not loose.exact and loose.normalized and loose.contains
    sentence = match_answer("The capital is Paris, of course.", ["Paris"])
    assert not sentence.normalized and sentence.contains
    assert not match_answer("Parisian food", ["Paris"]).contains  # whole words only
    accented = match_answer("The capital of Colombia is Bogotá.", ["Bogota"])
    assert accented.contains and match_answer("Bogotá!", ["Bogota"]).normalized  # accents as WER drops them


def test_an_answer_that_restates_the_question_matches_nothing():
    question = "Which is colder, ice or fire?"
    echoed = match_answer("Which is colder, ice were fire?", ["ice"], question)  # one word misheard
    assert echoed.restates_question and not (echoed.exact or echoed.normalized or echoed.contains)
    assert match_answer("Which is colder, ice were fire?", ["ice"]).contains  # without the question: it would count
    answered = match_answer("Ice is colder than fire.", ["ice"], question)
    assert answered.contains and not answered.restates_question
    assert not match_answer("", ["ice"], question).restates_question  # no answer is not a restatement
    assert match_answer("ice", ["ice"], "?").contains  # a question with no words: nothing to restate


def test_pair_accuracy():
    assert pair_accuracy([1.0, 2.0, 0.5], [0.0, 3.0, 0.5]) == pytest.approx(1 / 3)
