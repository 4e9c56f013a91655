"""The corpus's texts: which texts of which source go to which split (`text_rows`), and the backbone's own
sentences and greedy answers (`BackboneWriter`, cached). The text material itself is `speechlm.demo.texts`."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from speechlm.demo import texts
from speechlm.finetune.self_answers import AnswerSettings, greedy_answers, load_backbone, prompt_ids

if TYPE_CHECKING:
    from speechlm.demo.corpus import CorpusSize

# `decoder` holds clips only the speech decoder trains on (`CorpusSize.decoder_words`); the LM never sees them
SPLITS = ("train", "heldout", "ood", "decoder")
EVALUATION_SPLITS = ("heldout", "ood")
SOURCES = ("templates", "backbone", "words", "stdlib", "questions", "docs")
ANSWER_MAX_NEW_TOKENS = 64
# The system turn of the self-distilled answers: the training recipe must use the same one (the job sets
# data.system_prompt to it), so that the adapter learns the answers the backbone gives in that setting.
ANSWER_SYSTEM_PROMPT = ""
SENTENCE_SAMPLES_PER_CALL = 8
TOPICS_PER_CALL = 10
# Sentences with a given word: a quarter of SmolLM2-135M's samples are a plain sentence that holds the word
# (the rest talk about the word or the sentence, or run on), so four samples find one for about two words in three.
WORD_SAMPLES_PER_CALL = 4
WORDS_PER_CALL = 20


def text_rows(settings: CorpusSize, seed: int, writer: BackboneWriter, docs: list[str], stdlib: list[str],
               progress: Callable[[str], None]) -> list[dict]:
    """Every row's text, source and split, in a fixed order (ids are stable for a given size and seed)."""
    rng = random.Random(seed)
    rows: list[dict] = []

    def add(source: str, items: Sequence[str], split_of: Callable[[int], str], **extra_of) -> None:
        for index, text in enumerate(items):
            row = {"id": f"{source}-{index:05d}", "text": text, "source": source, "split": split_of(index)}
            for key, values in extra_of.items():
                if values[index] is not None:
                    row[key] = values[index]
            rows.append(row)

    def random_split(count: int, salt: str) -> Callable[[int], str]:
        held = set(random.Random(f"{seed}-{salt}").sample(range(count), _heldout_count(count,
                                                                                     settings.heldout_fraction)))
        return lambda index: "heldout" if index in held else "train"

    sentences = texts.template_sentences(settings.templates, seed)
    add("templates", sentences, random_split(len(sentences), "templates"))

    progress(f"backbone sentences: {settings.backbone} (sampled once, cached)")
    written = writer.sentences(settings.backbone, seed)
    add("backbone", written, random_split(len(written), "backbone"))

    picked = random.Random(f"{seed}-stdlib").sample(stdlib, min(settings.stdlib, len(stdlib)))
    add("stdlib", picked, random_split(len(picked), "stdlib"))

    questions = _pick_questions(settings.questions, rng)
    in_domain = [i for i, q in enumerate(questions) if q.kind not in texts.OOD_QUESTION_KINDS]
    held = set(random.Random(f"{seed}-questions").sample(
        in_domain, _heldout_count(len(in_domain), settings.question_heldout_fraction)))
    add("questions", [q.text for q in questions],
        lambda i: "ood" if questions[i].kind in texts.OOD_QUESTION_KINDS else ("heldout" if i in held else "train"),
        kind=[q.kind for q in questions], expected=[list(q.expected) or None for q in questions])

    if settings.words or settings.decoder_words:
        # last of the training sources: the words the others already speak often enough need no sentence
        heard = Counter(word for row in rows if row["split"] == "train" for word in texts.spoken_words(row["text"]))
        targets = texts.common_words(settings.common_words)
        rare = [word for word in targets if heard[word] < settings.word_repeats]
        progress(f"sentences with common words: {len(rare)} of the {len(targets)} most common are heard fewer "
                 f"than {settings.word_repeats} times (sampled once, cached)")
        picked = covering_sentences(writer.word_sentences(rare, seed), targets, heard,
                                    settings.words or settings.decoder_words, settings.word_repeats)
        add("words", picked, random_split(len(picked), "words") if settings.words else lambda index: "decoder")

    picked = docs if settings.docs is None else random.Random(f"{seed}-docs").sample(docs, min(settings.docs,
                                                                                                 len(docs)))
    add("docs", picked, lambda index: "ood")
    return rows


def covering_sentences(candidates: Sequence[str], targets: Sequence[str], heard: Counter, count: int,
                       repeats: int) -> list[str]:
    """Up to ``count`` distinct candidates, chosen greedily: each the one that speaks the most ``targets``
    still heard fewer than ``repeats`` times (the first such candidate on ties). Stops early when no
    candidate adds a hearing that is still needed."""
    heard, wanted = Counter(heard), set(targets)
    candidates = list(dict.fromkeys(candidates))
    words_of = [set(texts.spoken_words(sentence)) & wanted for sentence in candidates]
    left = list(range(len(candidates)))
    picked: list[str] = []
    while len(picked) < count and left:
        gains = [sum(heard[word] < repeats for word in words_of[index]) for index in left]
        best = max(range(len(left)), key=gains.__getitem__)
        if gains[best] == 0:
            break
        index = left.pop(best)
        picked.append(candidates[index])
        heard.update(words_of[index])
    return picked


def _heldout_count(count: int, fraction: float) -> int:
    return min(count - 1, max(1, round(count * fraction))) if count >= 2 else 0


def _pick_questions(count: int | None, rng: random.Random) -> list[texts.Question]:
    """All questions, or ``count`` of them covering every kind (round-robin over kinds, seeded)."""
    questions = texts.all_questions()
    if count is None or count >= len(questions):
        return questions
    by_kind: dict[str, list[texts.Question]] = {}
    for question in questions:
        by_kind.setdefault(question.kind, []).append(question)
    for group in by_kind.values():
        rng.shuffle(group)
    picked: list[texts.Question] = []
    while len(picked) < count:
        for group in by_kind.values():
            if group and len(picked) < count:
                picked.append(group.pop())
    return picked


# What the quick start's backbone (the pinned SmolLM2-135M-Instruct GGUF, `assets.PINNED_FILES`) wrote for the
# corpus: the writer's cache of a whole `full` build (sampled sentences, word sentences, greedy answers), shipped
# so that a fresh machine does not spend ~35 minutes of 2 cores writing them again (BENCHMARKS.md). The keys
# name the seeds and prompts; anything a build asks for that is not in it, the backbone writes as before.
SHIPPED_TEXTS = Path(__file__).parent / "data" / "backbone-texts.json.gz"


def seed_text_cache(cache_file: str | os.PathLike, shipped: Path = SHIPPED_TEXTS) -> int:
    """Start the quick start's text cache from the shipped texts where it does not exist yet; the number of
    texts it starts with (0: a cache was already there, and is left as it is)."""
    cache_file = Path(cache_file)
    if cache_file.exists():
        return 0
    with gzip.open(shipped, "rt", encoding="utf-8") as f:
        texts_written = json.load(f)
    _write_text_cache(cache_file, texts_written)
    return len(texts_written)


def _write_text_cache(cache_file: Path, cache: dict) -> None:
    """The writer's cache file, replaced whole (an interrupted write leaves the previous one)."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    staging = cache_file.with_name(cache_file.name + ".partial")
    staging.write_text(json.dumps(cache, indent=1, ensure_ascii=False) + "\n")
    os.replace(staging, cache_file)


class BackboneWriter:
    """The backbone's own texts: sampled sentences about topics and greedy answers, cached in a JSON file.

    Answers are generated in batches of prompts of equal token length, so no padding enters the
    computation and each answer is what the model says to that prompt alone.
    """

    def __init__(self, model_dir: str | os.PathLike, cache_file: Path, *, batch_size: int = 32) -> None:
        self.model_dir, self.cache_file, self.batch_size = Path(model_dir), cache_file, batch_size
        self.cache: dict[str, object] = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            self._model, self._tokenizer = load_backbone(self.model_dir)
        return self._model, self._tokenizer

    def _save(self) -> None:
        _write_text_cache(self.cache_file, self.cache)

    def answers(self, prompts: Sequence[str]) -> list[tuple[str, bool]]:
        """(answer, whether it ended by itself) per prompt: greedy, at most `ANSWER_MAX_NEW_TOKENS`
        (`finetune.self_answers`, what `speechlm answer` writes into a user's manifest)."""
        key = f"answer|system={ANSWER_SYSTEM_PROMPT!r}|{{}}".format
        missing = sorted({p for p in prompts if key(p) not in self.cache})
        if missing:
            model, tokenizer = self._load()
            settings = AnswerSettings(system_prompt=ANSWER_SYSTEM_PROMPT, max_new_tokens=ANSWER_MAX_NEW_TOKENS,
                                      batch_size=self.batch_size)
            for batch in greedy_answers(model, tokenizer, missing, settings):
                self.cache.update({key(prompt): [answer, complete] for prompt, answer, complete in batch})
                self._save()
        return [tuple(self.cache[key(p)]) for p in prompts]

    def sentences(self, count: int, seed: int) -> list[str]:
        """``count`` distinct sentences the backbone writes about `texts.TOPICS`.

        Sampled in calls of `TOPICS_PER_CALL` topics x `SENTENCE_SAMPLES_PER_CALL` samples, each call
        seeded by (seed, round, chunk): the same calls in the same order, whatever ``count`` is.
        """
        found: list[str] = []
        seen: set[str] = set()
        chunks = [texts.TOPICS[i:i + TOPICS_PER_CALL] for i in range(0, len(texts.TOPICS), TOPICS_PER_CALL)]
        for round_index in range(64):
            for chunk_index, topics in enumerate(chunks):
                if len(found) >= count:
                    return found[:count]
                for sentence in self._samples(topics, f"sentences|{seed}|{round_index}|{chunk_index}"):
                    if sentence not in seen:
                        seen.add(sentence)
                        found.append(sentence)
        raise ValueError(f"the backbone wrote only {len(found)} distinct usable sentences; asked for {count}")

    def _samples(self, topics: Sequence[str], key: str) -> list[str]:
        if key not in self.cache:
            raw = self._sample([texts.SENTENCE_PROMPT.format(topic=topic) for topic in topics], key,
                               SENTENCE_SAMPLES_PER_CALL, max_new_tokens=40)
            self.cache[key] = [s for s in (_clean_sentence(text) for text in raw) if s]
            self._save()
        return list(self.cache[key])

    def word_sentences(self, words: Sequence[str], seed: int) -> list[str]:
        """The sentences the backbone wrote with each of ``words`` (`texts.WORD_PROMPT`), in word order:
        `WORD_SAMPLES_PER_CALL` samples per word, kept when plain, speakable and holding the word itself.
        Cached per word; the words not cached yet are sampled `WORDS_PER_CALL` at a time."""
        key = f"word|{seed}|{{}}".format
        missing = [word for word in dict.fromkeys(words) if key(word) not in self.cache]
        for start in range(0, len(missing), WORDS_PER_CALL):
            batch = missing[start:start + WORDS_PER_CALL]
            raw = self._sample([texts.WORD_PROMPT.format(word=word) for word in batch], key("|".join(batch)),
                               WORD_SAMPLES_PER_CALL, max_new_tokens=32)
            for index, word in enumerate(batch):
                samples = raw[index * WORD_SAMPLES_PER_CALL:(index + 1) * WORD_SAMPLES_PER_CALL]
                self.cache[key(word)] = [s for s in (_clean_sentence(text) for text in samples)
                                         if s and _uses_word(s, word)]
            self._save()
        return [sentence for word in words for sentence in self.cache[key(word)]]

    def _sample(self, prompts: Sequence[str], key: str, per_prompt: int, *, max_new_tokens: int) -> list[str]:
        """``per_prompt`` sampled replies to each prompt (prompt by prompt), seeded by ``key``."""
        import torch

        model, tokenizer = self._load()
        rows = [prompt_ids(tokenizer, prompt, None) for prompt in prompts]
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id
        # left padding, so every row's sampled continuation starts right after its prompt
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows])
        torch.manual_seed(zlib.crc32(key.encode()))
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                       temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens,
                                       num_return_sequences=per_prompt)
        return tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)


_SENTENCE_CHARS = re.compile(r"^[A-Za-z0-9 ,.'!?;:-]+$")


def _clean_sentence(text: str) -> str | None:
    """The first sentence of a generated text if it is plain, speakable and 5 to 25 words long."""
    line = text.strip().split("\n")[0].strip().strip('"*').strip()
    match = re.match(r"^(.+?[.!?])(\s|$)", line)
    if not match:
        return None
    sentence = match.group(1).replace("\u2019", "'")
    if not 5 <= len(sentence.split()) <= 25 or not _SENTENCE_CHARS.match(sentence) or not sentence[0].isupper():
        return None
    return sentence


def _uses_word(sentence: str, word: str) -> bool:
    """Whether a sentence speaks ``word`` itself and is not about words or sentences (the backbone often
    answers "A simple sentence with the word ... is ...")."""
    spoken = texts.spoken_words(sentence)
    talks_about_words = {"word", "words", "sentence", "sentences"} - {word}
    return word in spoken and not talks_about_words & set(spoken)
