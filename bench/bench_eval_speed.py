"""Where a quick-start evaluation's minutes go, and what each saving costs in transcripts.

On a job's trained model and evaluation sets (``OUT/model``, ``OUT/eval-data``), side by side in one process:

- **reading** (the frozen Whisper encoder and the reader's beam over every clip of an ASR split): openai-whisper's
  own first decoding step (the prompt for every beam, every position projected onto the vocabulary) against
  the reader's (`SharedPromptInference`: once a clip, two positions), and the encoder in float32 against
  bfloat16 autocast (``audio_encoder_dtype``); seconds, the reader's WER, and how many transcripts are the
  same as the first row's;
- **ranked reading** (the job's reader as saved: its beam ranked by the backbone, the LM's weights in bfloat16
  as the job's ASR evaluation has them, over every clip of both ASR splits): the reader before this round
  (every cache a copy per beam, the backbone scoring each text after its own copy of the user turn's
  opening), with the opening run once a call (`UserTextScorer`), then with the cross-attention's keys once
  a clip (`beams_attend_together`); seconds, the reader's WER, transcripts as the first row's;
- **scoring** (the same reading): the backbone scoring every finished transcript of the beam in the beam's
  order, against each distinct transcript once, packed (`UserTextScorer`: the library now);
- **batching** (``speechlm eval``'s ASR and TTS tasks): items in the manifest's order against batched by
  length (`batch_order`), seconds and the task's figures;
- **the LM's dtype** (every evaluation set of the job, with the job's settings): the language model's weights
  in float32 against bfloat16 (``EvalSettings.lm_dtype``), the clips' readings cached first (as the job's
  evaluation after training finds them), seconds, the figures, and how many outputs are the same;
- **the judge** (the TTS task's Whisper base, on tts/heldout's reference units decoded by the codec): the
  decode's seconds, then the judge hearing one window at a time against `transcribe_batch`'s batches, seconds and
  how many transcripts are the same as one at a time;
- **the judge's window** (both TTS sets, their references and the job's trained answers from its
  ``eval-items.json``): openai-whisper's 30 s windows against the clip and ``JUDGE_SILENCE_SECONDS`` of silence
  (`transcribe_batch`: the library now); seconds, WER against the text, transcripts as the 30 s judge's.

    python bench/bench_eval_speed.py --job /tmp/exp/reader9 --out /tmp/exp/eval-speed.json
    python bench/bench_eval_speed.py --job /tmp/exp/np50 --sections ranked-reading --out /tmp/exp/ranked.json
    python bench/bench_eval_speed.py --job /tmp/exp/np57 --sections scoring --out /tmp/exp/scoring.json
    python bench/bench_eval_speed.py --job /tmp/exp/full33 --sections lm-dtype --out /tmp/exp/lm-dtype.json
    python bench/bench_eval_speed.py --job /tmp/exp/full38 --sections judge --judge /tmp/democache/whisper-base.pt
    python bench/bench_eval_speed.py --job /tmp/exp/np77/demo --sections judge-window --judge /tmp/democache76/whisper-base.pt
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from whisper.decoding import DecodingTask, PyTorchInference

from speechlm.adapters import readers
from speechlm.adapters.reading_cache import ReadingCache
from speechlm.adapters.text_scoring import UserTextScorer, base_weights
from speechlm.demo.job import JobSettings, load_trained
from speechlm.evaluation import (
    BATCH_LENGTH_FIELDS,
    JUDGE_SILENCE_SECONDS,
    JUDGE_TEMPERATURES,
    EvalSettings,
    evaluate,
    heard_without_loop,
    judge_decode,
    load_judge,
    read_eval_manifest,
    transcribe_batch,
)
from speechlm.finetune.metrics import word_errors


class OpenAIWhisperInference(readers.SharedPromptInference):
    def logits(self, tokens, audio_features):  # openai-whisper's: every beam, every prompt position
        return PyTorchInference.logits(self, tokens, audio_features)


@contextmanager
def openai_whisper_first_step():
    kept = readers.SharedPromptInference, readers.BatchDecodingTask._main_loop
    readers.SharedPromptInference, readers.BatchDecodingTask._main_loop = OpenAIWhisperInference, DecodingTask._main_loop
    try:
        yield
    finally:
        readers.SharedPromptInference, readers.BatchDecodingTask._main_loop = kept


class CrossAttentionPerBeam(readers.SharedPromptInference):
    """The reader's inference before `beams_attend_together`: after the first step every cache, the
    cross-attention's keys and values too, is copied for each beam, and each beam reads its own copy."""

    def logits(self, tokens, audio_features):
        first = not self.kv_cache
        logits = super().logits(tokens, audio_features)
        if first:
            for block in self.model.decoder.blocks:
                block.cross_attn.__dict__.pop("qkv_attention", None)
                for module in (block.cross_attn.key, block.cross_attn.value):
                    self.kv_cache[module] = self.kv_cache[module].repeat_interleave(self.n_group, dim=0)
        return logits


class OpeningWithEachText(UserTextScorer):
    """The scorer before this round: each text after its own copy of the user turn's opening, and the head
    over a slice of the hidden states."""

    @torch.no_grad()
    def __call__(self, texts):
        scores = []
        with base_weights(self.model):
            for start in range(0, len(texts), self.batch_size):
                scores += self._with_opening(texts[start: start + self.batch_size])
        return scores

    def _with_opening(self, texts):
        model, prefix = self.model, self.prefix
        embeddings = model.get_input_embeddings()
        own = [self.tokenizer(text.strip(), add_special_tokens=False).input_ids for text in texts]
        ids = torch.zeros(len(own), len(prefix) + max(map(len, own)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(own):
            ids[row, : len(prefix) + len(tokens)] = torch.tensor(prefix + tokens)
            mask[row, : len(prefix) + len(tokens)] = 1
        hidden = model.get_decoder()(inputs_embeds=embeddings(ids), attention_mask=mask).last_hidden_state
        start = len(prefix)
        logits = model.get_output_embeddings()(hidden[:, start - 1: -1])[..., : model.config.text_vocab_size]
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, start:, None]).squeeze(-1)
        return (picked * mask[:, start:]).sum(-1).tolist()


@contextmanager
def earlier_reader(model, processor, opening_each_text: bool, cross_attention_per_beam: bool):
    reader = model.audio_reader
    kept = reader.text_scorer, readers.SharedPromptInference
    if opening_each_text:
        reader.text_scorer = OpeningWithEachText(model, processor.tokenizer)
    if cross_attention_per_beam:
        readers.SharedPromptInference = CrossAttentionPerBeam
    try:
        yield
    finally:
        reader.text_scorer, readers.SharedPromptInference = kept


def ranked_reading_rows(model, processor, items, batch_size: int) -> list[dict]:
    variants = [("before: cross-attention a copy per beam, the opening with each text", True, True),
                ("the opening once a call", False, True),
                ("and the cross-attention's keys once a clip (the library now)", False, False)]
    with model.language_model_in("bfloat16"):
        return compare_readings(model, processor, items, batch_size, [
            (name, functools.partial(earlier_reader, model, processor, opening_each_text, per_beam))
            for name, opening_each_text, per_beam in variants])


class EveryTextInTurn(UserTextScorer):
    """The scorer before this round: every text the beam hands it, in the beam's order."""

    def __call__(self, texts):
        return self.score_token_ids([self.tokenizer(text.strip(), add_special_tokens=False).input_ids for text in texts])


@contextmanager
def scorer_in_place(reader, scorer):
    kept, reader.text_scorer = reader.text_scorer, scorer
    try:
        yield
    finally:
        reader.text_scorer = kept


def scoring_rows(model, processor, items, batch_size: int) -> list[dict]:
    before = EveryTextInTurn(model, processor.tokenizer)
    with model.language_model_in("bfloat16"):
        return compare_readings(model, processor, items, batch_size, [
            ("before: every transcript of the beam scored, in the beam's order",
             functools.partial(scorer_in_place, model.audio_reader, before)),
            ("each distinct transcript scored once, packed (the library now)", nullcontext)])


def read_split(model, processor, items, batch_size: int) -> tuple[float, list[str]]:
    """Seconds to read every clip (encoder + reader, nothing kept between calls) and the transcripts."""
    texts, start = [], time.perf_counter()
    for first in range(0, len(items), batch_size):
        inputs = processor([[{"role": "user", "content": [{"type": "audio", "audio": item.fields["audio"]}]}]
                            for item in items[first: first + batch_size]])
        with torch.inference_mode():
            ids = model.audio_transcripts(inputs["input_features"], inputs["input_features_mask"])
        texts += [processor.tokenizer.decode(row).strip() for row in ids]
    return time.perf_counter() - start, texts


def compare_readings(model, processor, items, batch_size: int, variants) -> list[dict]:
    """Each variant (a name, and a context to read in) reads every clip: seconds, the reader's WER, and how many
    transcripts are the first variant's."""
    references = [item.fields["text"] for item in items]
    rows, first_texts = [], None
    for name, context in variants:
        with context():
            seconds, texts = read_split(model, processor, items, batch_size)
        first_texts = first_texts or texts
        rows.append({"variant": name, "seconds": round(seconds, 1),
                     "reader_wer": round(word_errors(references, texts).rate, 4),
                     "same_as_first": sum(a == b for a, b in zip(texts, first_texts, strict=True)), "clips": len(items)})
        print(rows[-1], flush=True)
    return rows


@contextmanager
def encoder_dtype(model, dtype: str, context):
    model.config.audio_encoder_dtype = dtype
    with context():
        yield


def reading_rows(model, processor, items, batch_size: int) -> list[dict]:
    variants = [("openai-whisper first step, encoder float32", openai_whisper_first_step, "float32"),
                ("first step once a clip, encoder float32", nullcontext, "float32"),
                ("first step once a clip, encoder bfloat16", nullcontext, "bfloat16")]
    return compare_readings(model, processor, items, batch_size, [
        (name, functools.partial(encoder_dtype, model, dtype, context)) for name, context, dtype in variants])


def batching_rows(model, processor, task: str, items, batch_sizes: list[int], settings: EvalSettings) -> list[dict]:
    rows = []
    for batch_size in batch_sizes:
        for ordered in (False, True):
            kept = BATCH_LENGTH_FIELDS[task]
            BATCH_LENGTH_FIELDS[task] = kept if ordered else None
            try:
                start = time.perf_counter()
                totals, _ = evaluate(model, processor, task, items, replace(settings, batch_size=batch_size),
                                     progress=False)
            finally:
                BATCH_LENGTH_FIELDS[task] = kept
            rows.append({"task": task, "batch_size": batch_size, "order": "by length" if ordered else "manifest",
                         "seconds": round(time.perf_counter() - start, 1), "totals": totals})
            print(rows[-1], flush=True)
    return rows


def lm_dtype_rows(model, processor, task: str, items, settings: EvalSettings) -> list[dict]:
    """float32, bfloat16, float32 again: the first run reads the clips into the cache (its seconds include
    the reading), the other two time the LM alone."""
    model.reading_cache = ReadingCache()
    output = {"asr": "hypothesis", "qa": "speech_answer", "tts": "units"}[task]
    rows, outputs = [], {}
    for dtype in (["float32"] if task in ("asr", "qa") else []) + ["bfloat16", "float32"]:
        start = time.perf_counter()
        totals, results = evaluate(model, processor, task, items, replace(settings, lm_dtype=dtype), progress=False)
        row = {"task": task, "lm_dtype": dtype, "readings_cached": bool(rows) or task == "tts",
               "seconds": round(time.perf_counter() - start, 1), "totals": totals}
        outputs[dtype] = results
        if dtype == "float32" and "bfloat16" in outputs:
            pairs = list(zip(outputs["bfloat16"], results, strict=True))
            row["same_outputs_as_bfloat16"] = sum(a[output] == b[output] for a, b in pairs)
            if task == "qa":
                row["same_typed_answers_as_bfloat16"] = sum(a["text_answer"] == b["text_answer"] for a, b in pairs)
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def judge_rows(processor, items, judge_path: str, batch_sizes: list[int]) -> list[dict]:
    judge = load_judge(judge_path)
    start = time.perf_counter()
    waves = processor.codec.decode_batch([item.fields["units"] for item in items])
    rows = [{"variant": f"decode {len(waves)} references ({processor.codec.decodes_with(1)})",
             "seconds": round(time.perf_counter() - start, 1)}]
    print(rows[-1], flush=True)
    alone = None
    for batch_size in [1, *batch_sizes]:
        start = time.perf_counter()
        heard = [text for wave in waves for text in transcribe_batch(judge, [wave])] if batch_size == 1 else \
            transcribe_batch(judge, waves, batch_size=batch_size)
        alone = alone or heard
        rows.append({"variant": "one window at a time" if batch_size == 1 else f"batches of {batch_size}",
                     "seconds": round(time.perf_counter() - start, 1),
                     "same_as_one_at_a_time": sum(a == b for a, b in zip(heard, alone, strict=True)),
                     "windows": len(waves)})
        print(rows[-1], flush=True)
    return rows


def thirty_second_windows(judge, waveforms, batch_size: int = 16) -> list[str]:
    """The judge before `JUDGE_SILENCE_SECONDS`: openai-whisper's own model, every clip padded to 30 s."""
    import whisper

    texts = []
    for start in range(0, len(waveforms), batch_size):
        mels = [whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.as_tensor(wave, dtype=torch.float32)),
                                            n_mels=judge.dims.n_mels) for wave in waveforms[start:start + batch_size]]
        greedy = judge_decode(judge, torch.stack(mels), JUDGE_TEMPERATURES[0])
        texts += [heard_without_loop(judge, mel, result) for mel, result in zip(mels, greedy, strict=True)]
    return texts


def judge_window_rows(processor, job: Path, judge_path: str) -> list[dict]:
    """The TTS sets' references and the job's trained answers (its ``eval-items.json``), heard by the judge in
    30 s windows and in the clip and `JUDGE_SILENCE_SECONDS`: seconds, WER against the text, transcripts alike."""
    import whisper

    after = json.loads((job / "eval-items.json").read_text())["after"]
    judges = {"30 s windows (openai-whisper's model)": (whisper.load_model(judge_path, device="cpu"), thirty_second_windows),
              f"the clip and {JUDGE_SILENCE_SECONDS:g} s of silence (the library)": (load_judge(judge_path), transcribe_batch)}
    rows = []
    for split in ("tts/heldout", "tts/ood"):
        items = after[split]
        texts = [item["text"] for item in items]
        for field, what in (("reference_units", "references"), ("units", "trained answers")):
            waves = processor.codec.decode_batch([item[field] for item in items])
            heard = {}
            for variant, (judge, hear) in judges.items():
                start = time.perf_counter()
                heard[variant] = hear(judge, waves)
                rows.append({"set": split, "audio": what, "variant": variant,
                             "seconds": round(time.perf_counter() - start, 1),
                             "wer": round(word_errors(texts, heard[variant]).rate, 4),
                             "same_as_30s": sum(a == b for a, b in zip(next(iter(heard.values())), heard[variant],
                                                                       strict=True))})
                print(rows[-1], flush=True)
    return rows


SECTIONS = ("reading", "ranked-reading", "scoring", "batching", "lm-dtype", "judge", "judge-window")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="a quick-start job's --out folder (model/ and eval-data/)")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {list(SECTIONS)}")
    parser.add_argument("--judge", help="judge section: the openai-whisper .pt that hears the TTS audio")
    parser.add_argument("--out", help="write the figures here (JSON)")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if not set(sections) <= set(SECTIONS):
        parser.error(f"--sections {args.sections}: choose from {list(SECTIONS)}")
    job = Path(args.job)
    model, processor = load_trained(job / "model")
    figures = {}
    if "reading" in sections:
        heldout = read_eval_manifest(job / "eval-data" / "asr-heldout.jsonl", "asr")
        figures["reading asr/heldout"] = reading_rows(model, processor, heldout, args.batch_size)
        model.config.audio_encoder_dtype = "bfloat16"
    if "ranked-reading" in sections:
        for split in ("heldout", "ood"):
            figures[f"ranked reading asr/{split}"] = ranked_reading_rows(
                model, processor, read_eval_manifest(job / "eval-data" / f"asr-{split}.jsonl", "asr"), args.batch_size)
    if "scoring" in sections:
        for split in ("heldout", "ood"):
            figures[f"scoring asr/{split}"] = scoring_rows(
                model, processor, read_eval_manifest(job / "eval-data" / f"asr-{split}.jsonl", "asr"), args.batch_size)
    if "batching" in sections:
        figures["batching asr/ood"] = batching_rows(
            model, processor, "asr", read_eval_manifest(job / "eval-data" / "asr-ood.jsonl", "asr"),
            [args.batch_size], EvalSettings())
        figures["batching tts/heldout"] = batching_rows(
            model, processor, "tts", read_eval_manifest(job / "eval-data" / "tts-heldout.jsonl", "tts"),
            [args.batch_size, args.batch_size // 2], EvalSettings(max_speech_units=400))
    if "lm-dtype" in sections:
        settings = replace(JobSettings().eval, batch_size=args.batch_size)
        for path in sorted((job / "eval-data").glob("*.jsonl")):  # asr-heldout.jsonl: the job's asr/heldout
            task = path.stem.split("-")[0]
            figures[f"lm dtype {path.stem}"] = lm_dtype_rows(model, processor, task, read_eval_manifest(path, task),
                                                             settings)
    if "judge-window" in sections:
        if not args.judge:
            parser.error("--sections judge-window needs --judge (an openai-whisper .pt)")
        figures["judge window"] = judge_window_rows(processor, job, args.judge)
    if "judge" in sections:
        if not args.judge:
            parser.error("--sections judge needs --judge (an openai-whisper .pt)")
        figures["judge tts/heldout"] = judge_rows(
            processor, read_eval_manifest(job / "eval-data" / "tts-heldout.jsonl", "tts"), args.judge, [8, 16, 40])
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
