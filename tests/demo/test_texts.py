from __future__ import annotations

import json
import platform
from collections import Counter

import pytest

from speechlm.demo import texts
from speechlm.demo.corpus_audio import synthesis_settings
from speechlm.demo.corpus_texts import (
    ANSWER_SYSTEM_PROMPT,
    BackboneWriter,
    _clean_sentence,
    _uses_word,
    covering_sentences,
    seed_text_cache,
)
from tests.demo.conftest import needs_demo_packages


def test_templates_are_distinct_and_seeded():
    first = texts.template_sentences(200, seed=3)
    assert len(set(first)) == 200 and first == texts.template_sentences(200, seed=3)
    assert first != texts.template_sentences(200, seed=4)
    assert all(sentence[0].isupper() and sentence[-1] in ".?" for sentence in first)


def test_doc_sentences_keep_plain_prose_only():
    readme = """# Title

Install it with pip. This library resamples audio quickly and keeps the quality high.

```python
import soxr  # A code line that looks like prose but sits in a fence.
```

    An indented code block with enough words in it to pass the length test.

| a table | with cells that should never become a sentence at all |

See [the guide](https://example.com) for more details about all the options here.
Call soxr.resample(x, 44100, 16000) to convert one array from one rate to another.
Our CamelCase NamesLike ThisOne are hard for a voice to read aloud.
"""
    sentences = texts._sentences(texts._plain_text(readme))
    assert sentences == ["This library resamples audio quickly and keeps the quality high.",
                         "See the guide for more details about all the options here."]


def test_doc_sentences_come_from_installed_package_metadata():
    sentences, versions = texts.doc_sentences(("numpy", "speechlm-no-such-package"))
    assert list(versions) == ["numpy"] and sentences


def test_stdlib_sentences_are_plain_docstring_prose_of_this_python():
    sentences, version = texts.stdlib_sentences()
    assert version == platform.python_version() and len(sentences) > 1000
    assert len(set(sentences)) == len(sentences)
    assert "Return the sample arithmetic mean of data." in sentences  # statistics.mean
    assert all(sentence.endswith(".") and "(" not in sentence and "_" not in sentence for sentence in sentences)


def test_questions_cover_many_kinds_and_hold_some_out():
    questions = texts.all_questions()
    kinds = {question.kind for question in questions}
    assert len(kinds) >= 12 and set(texts.OOD_QUESTION_KINDS) < kinds
    assert len({question.text for question in questions}) == len(questions)
    capital = next(q for q in questions if q.text == "What is the capital of Japan?")
    assert capital.expected == ("Tokyo",)


def test_generated_text_is_cleaned_to_one_speakable_sentence():
    assert _clean_sentence('"The river runs fast in spring. It floods."\nMore') == "The river runs fast in spring."
    assert _clean_sentence("Too short.") is None
    assert _clean_sentence("Use `numpy.array` to build ten arrays today.") is None


def test_synthesis_settings_are_stable_per_clip_and_varied():
    settings = [synthesis_settings(f"templates-{i:05d}", 0) for i in range(50)]
    assert settings[7] == synthesis_settings("templates-00007", 0)
    assert len({s["length_scale"] for s in settings}) > 40
    assert all(0.8 <= s["length_scale"] <= 1.25 for s in settings)
    assert 10 < sum(s["snr_db"] is None for s in settings) < 40


def test_answers_are_checked_by_whole_words():
    from speechlm.demo.corpus_scoring import answer_is_correct

    assert answer_is_correct("The capital of France is Paris.", ["Paris"])
    assert answer_is_correct("A day has twenty-four hours.", ["24", "twenty-four"])
    assert not answer_is_correct("A Parisian cafe.", ["Paris"])
    assert not answer_is_correct("I know.", ["no"])
    assert answer_is_correct("The capital of Colombia is Bogotá.", ["Bogota"])


@needs_demo_packages
def test_common_words_follow_wordfreq_and_skip_letters_and_abbreviations():
    words = texts.common_words(300)
    assert len(words) == len(set(words)) == 300
    assert words[:3] == ["the", "and", "for"]  # "to", "of", "a", "in", "i" are shorter than three letters
    assert all(word.isalpha() and word.islower() and len(word) >= 3 for word in words)
    assert texts.common_words(50) == words[:50]


def test_spoken_words_are_counted_as_a_listener_hears_them():
    assert texts.spoken_words("It's 7 o'clock, Tom's TV is on!") == ["it's", "7", "o'clock", "tom's", "tv", "is",
                                                                      "on"]


def test_a_word_sentence_must_speak_the_word_and_not_talk_about_words():
    assert _uses_word("The government met on Monday.", "government")
    assert not _uses_word("Governments met on Monday.", "government")  # another word, not the one asked for
    assert not _uses_word("A simple sentence with government in it.", "government")
    assert _uses_word("She never said a word about it.", "word")


def test_covering_sentences_pick_the_sentence_that_adds_most_hearings_first():
    candidates = ["The cat sat.", "The dog and the cat ran home.", "A dog ran.", "A dog ran.", "Birds sing."]
    heard = Counter({"cat": 1})
    picked = covering_sentences(candidates, ["cat", "dog", "ran", "home"], heard, count=10, repeats=2)
    # gains: 4 (dog, cat, ran, home), then "A dog ran." 2 (dog, ran), then nothing is still needed twice
    assert picked == ["The dog and the cat ran home.", "A dog ran."]
    assert heard == Counter({"cat": 1}), "the caller's counts are left as they were"
    assert covering_sentences(candidates, ["cat", "dog", "ran", "home"], heard, count=1, repeats=2) == [
        "The dog and the cat ran home."]
    assert covering_sentences(candidates, ["bird"], Counter(), count=3, repeats=1) == []


def test_shipped_texts_seed_an_empty_cache_and_never_replace_one(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "backbone-texts.json"
    assert seed_text_cache(cache) > 1000
    shipped = json.loads(cache.read_text())
    assert {key.split("|")[0] for key in shipped} == {"sentences", "word", "answer"}
    # the writer reads them as its own: no backbone is loaded for what the package already holds
    writer = BackboneWriter(tmp_path / "no-backbone-here", cache)
    monkeypatch.setattr(writer, "_load", lambda: pytest.fail("the backbone was loaded for a shipped text"))
    question = next(key for key in shipped if key.startswith("answer|")).split("|", 2)[2]
    assert writer.answers([question]) == [tuple(shipped[f"answer|system={ANSWER_SYSTEM_PROMPT!r}|{question}"])]
    word = next(key.split("|")[2] for key, kept in shipped.items() if key.startswith("word|0|") and kept)
    assert writer.sentences(20, seed=0) and writer.word_sentences([word], seed=0) == shipped[f"word|0|{word}"]
    cache.write_text('{"answer|x": ["mine", true]}')  # a cache already there is the user's: left alone
    assert seed_text_cache(cache) == 0 and json.loads(cache.read_text()) == {"answer|x": ["mine", True]}
