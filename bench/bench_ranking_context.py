"""What the backbone should read before it ranks Whisper's beam (`reader_lm_context`), on a job's ASR clips.

Every clip of a quick-start job's ASR splits (``OUT/eval-data``) is read once with the trained model's reader
(Whisper base's beam): each clip's finished transcripts, Whisper's summed log-probability and token count of
each, are kept. Each distinct transcript is then scored by the backbone after each context (`UserTextScorer`),
and the beam ranked again as the reader ranks it (openai-whisper's length-normalized ranking of Whisper's sum
plus the weight times the backbone's score), for each weight: the reader's WER on each split, side by side on
the same beams. A context is ``default`` (the chat template's own system turn), ``names`` (the corpus's names
in a sentence) or ``N`` / ``N:SEED`` (`sample_context`: N of the training manifest's transcripts, drawn with
SEED, 0 unless given).

    HF_HUB_OFFLINE=1 python bench/bench_ranking_context.py --job /tmp/exp/np87/demo \\
        --train /tmp/democache87/corpus-full/train.jsonl --contexts default,names,30,100 --beams beams.json

``--beams`` keeps the beams read (a second run with the same file reads no clip again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from whisper.decoding import MaximumLikelihoodRanker

from speechlm.adapters import readers
from speechlm.adapters.text_scoring import UserTextScorer, sample_context
from speechlm.demo.job import load_trained
from speechlm.demo.texts import NAMES
from speechlm.evaluation import read_eval_manifest
from speechlm.finetune.metrics import word_errors
from speechlm.responding import reader_transcripts


class BeamRecorder:
    """Keeps each clip's finished transcripts while the reader ranks them as it would: the reader's
    `transcribe` and `BackboneRanker.rank`, each clip's beam under the index of the clip it belongs to."""

    def __init__(self):
        self.beams: dict[int, list[dict]] = {}
        self.offset, self.rows = 0, []

    def __enter__(self):
        recorder = self
        self.kept = readers.WhisperTranscriptReader.transcribe, readers.BackboneRanker.rank

        def transcribe(reader, frames, windows):  # the reader's own, noting which clips each decoding holds
            texts = [""] * frames.shape[0]
            encoded = (windows + 1) // 2
            for length in torch.unique(encoded).tolist():
                rows = (encoded == length).nonzero().squeeze(-1)
                recorder.rows = [recorder.offset + row for row in rows.tolist()]
                for row, text in zip(rows.tolist(), reader._decode(frames[rows, :length]), strict=True):
                    texts[row] = text
            return texts

        def rank(ranker, tokens, sum_logprobs):
            texts = [ranker.tokenizer.decode(candidate.tolist()).strip() for group in tokens for candidate in group]
            scores, text = iter(ranker.score(texts)), iter(texts)
            for clip, group, logprobs in zip(recorder.rows, tokens, sum_logprobs, strict=True):
                recorder.beams[clip] = [{"text": next(text), "whisper": logprob, "length": len(candidate),
                                         "model": next(scores)} for candidate, logprob in zip(group, logprobs, strict=True)]
            fused = [[c["whisper"] + ranker.weight * c["model"] for c in recorder.beams[clip]] for clip in recorder.rows]
            return MaximumLikelihoodRanker.rank(ranker, tokens, fused)

        readers.WhisperTranscriptReader.transcribe, readers.BackboneRanker.rank = transcribe, rank
        return self

    def __exit__(self, *exc):
        readers.WhisperTranscriptReader.transcribe, readers.BackboneRanker.rank = self.kept


def read_beams(model, processor, items, batch_size: int) -> list[list[dict]]:
    """Each item's beam of finished transcripts, the reader's transcript of it as ``chosen``."""
    with BeamRecorder() as recorder:
        chosen = []
        for start in range(0, len(items), batch_size):
            chunk = items[start: start + batch_size]
            recorder.offset = start
            inputs = processor([[{"role": "user", "content": [{"type": "audio", "audio": item.fields["audio"]}]}]
                                for item in chunk])
            with torch.inference_mode(), model.language_model_in("bfloat16"):
                chosen += [processor.tokenizer.decode(ids) for ids in reader_transcripts(model, processor, inputs)]
    return [recorder.beams.get(index, [{"text": text, "whisper": 0.0, "length": 1, "model": 0.0}])
            for index, text in enumerate(chosen)]


def context_text(spec: str, train_texts: list[str]) -> str | None:
    if spec == "default":
        return None
    if spec == "names":
        return "The user may mention these people: " + ", ".join(NAMES) + "."
    count, _, seed = spec.partition(":")
    return sample_context(train_texts, int(count), seed=int(seed or 0))


def ranked_wer(items, beams, key: str, weight: float) -> float:
    """The reader's WER with each beam ranked by Whisper's sum plus ``weight`` times the ``key`` scores, over
    the token count (openai-whisper's `MaximumLikelihoodRanker`), loops cut as the reader cuts them."""
    chosen = [readers.without_loop(max(beam, key=lambda c: (c["whisper"] + weight * c[key]) / c["length"])["text"])
              for beam in beams]
    return word_errors([item.fields["text"] for item in items], chosen).rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="a quick-start job's --out folder (model/ and eval-data/)")
    parser.add_argument("--train", required=True, help="the job's training manifest (CACHE/corpus-full/train.jsonl)")
    parser.add_argument("--splits", default="heldout,ood")
    parser.add_argument("--contexts", default="default,30", help="comma-separated: default, names, N or N:SEED")
    parser.add_argument("--weights", default="0,0.3,0.5,0.7,1.0")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--beams", help="a JSON file of the beams read: written, or read if it exists")
    args = parser.parse_args()
    model, processor = load_trained(Path(args.job) / "model")
    if not model.audio_reader.rescores:  # before any clip is read: there would be no beam to rank
        raise SystemExit("the model's reader does not rank a beam (reader_beam_size 1 or reader_lm_weight 0)")
    items = {split: read_eval_manifest(Path(args.job) / "eval-data" / f"asr-{split}.jsonl", "asr")
             for split in args.splits.split(",")}
    if args.beams and Path(args.beams).is_file():
        beams = json.loads(Path(args.beams).read_text())
    else:
        beams = {}
        for split, split_items in items.items():
            start = time.perf_counter()
            beams[split] = read_beams(model, processor, split_items, args.batch_size)
            print(f"{split}: {len(split_items)} clips read in {time.perf_counter() - start:.0f} s", flush=True)
        if args.beams:
            Path(args.beams).write_text(json.dumps(beams))
    train_texts = [json.loads(line)["text"] for line in Path(args.train).read_text().splitlines() if line.strip()]
    texts = sorted({c["text"] for split in beams.values() for beam in split for c in beam})
    for spec in args.contexts.split(","):
        scorer = UserTextScorer(model, processor.tokenizer, context=context_text(spec, train_texts))
        start = time.perf_counter()
        with torch.inference_mode():
            scores = dict(zip(texts, scorer(texts), strict=True))
        print(f"context {spec}: {len(scorer.prefix)} tokens before each text, {len(texts)} texts scored in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        for split in beams.values():
            for beam in split:
                for candidate in beam:
                    candidate[spec] = scores[candidate["text"]]
        for weight in (float(w) for w in args.weights.split(",")):
            print(f"  weight {weight:g}: " + ", ".join(
                f"{split} {100 * ranked_wer(items[split], beams[split], spec, weight):.2f}%" for split in beams), flush=True)


if __name__ == "__main__":
    main()
