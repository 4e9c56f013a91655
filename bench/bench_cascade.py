"""The cascade anchor: openai-whisper transcribes, and the backbone gets the transcript as text.

On the evaluation sets a quick-start job wrote (``OUT/eval-data``): Whisper base's own WER on ASR clips
spread over each split (the evaluation's judge, `speechlm.evaluation.transcribe_batch`: greedy, English,
each clip heard with 5 s of silence after it), and
spoken-QA accuracy when the backbone answers Whisper's transcript of each question, beside the same
questions as written text. A trained SpeechLM answers text requests with its base backbone exactly
(LoRA gated to audio), so any of the job's models serves as the backbone here.

    python bench/bench_cascade.py --job /tmp/exp/reader1 --model /tmp/exp/reader1/model --asr-clips 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from speechlm.demo.build import load_demo_assets
from speechlm.demo.job import load_trained, spread
from speechlm.evaluation import (
    EvalSettings,
    generate_text,
    load_judge,
    read_eval_manifest,
    transcribe,
    transcribe_batch,
)
from speechlm.finetune.metrics import match_answer, word_errors
from speechlm.speech_io.audio import load_audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="a quick-start job's --out folder (its eval-data/ is read)")
    parser.add_argument("--model", required=True, help="a SpeechLM whose text requests run the base backbone")
    parser.add_argument("--cache", help="the demo assets' cache folder (Whisper base)")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    parser.add_argument("--asr-clips", type=int, default=64, help="ASR clips spread over each split")
    parser.add_argument("--out", help="write the figures and every item here (JSON)")
    args = parser.parse_args()
    torch.manual_seed(0)
    assets = load_demo_assets(args.size, args.cache)
    judge = load_judge(str(assets.audio_encoder))
    model, processor = load_trained(Path(args.model))
    settings = EvalSettings(batch_size=40, max_new_tokens=64)
    data = Path(args.job) / "eval-data"
    report = {}
    for split in ("heldout", "ood"):
        start = time.perf_counter()
        asr = spread(read_eval_manifest(data / f"asr-{split}.jsonl", "asr"), args.asr_clips)
        heard = transcribe_batch(judge, [load_audio(item.fields["audio"]) for item in asr])
        wer = word_errors([item.fields["text"] for item in asr], heard).rate
        qa = read_eval_manifest(data / f"qa-{split}.jsonl", "qa")
        by_id = {item.id: text for item, text in zip(asr, heard, strict=True)}
        questions = [by_id.get(item.id) or transcribe(judge, load_audio(item.fields["audio"])) for item in qa]
        cascade = generate_text(model, processor, [[{"role": "user", "content": q}] for q in questions], settings)
        written = generate_text(model, processor, [[{"role": "user", "content": item.fields["question"]}]
                                                   for item in qa], settings)
        correct = [match_answer(answer, item.fields["answers"]).contains for answer, item in zip(cascade, qa, strict=True)]
        text_correct = [match_answer(answer, item.fields["answers"]).contains
                        for answer, item in zip(written, qa, strict=True)]
        report[split] = {"whisper_wer": wer, "asr_items": len(asr), "qa_items": len(qa),
                         "cascade_qa": sum(correct), "text_qa": sum(text_correct),
                         "seconds": round(time.perf_counter() - start, 1),
                         "items": [{"id": item.id, "question": item.fields["question"], "heard": q, "answer": a,
                                    "correct": c} for item, q, a, c in zip(qa, questions, cascade, correct, strict=True)]}
        print(f"{split}: Whisper base WER {wer:.1%} on {len(asr)} clips; spoken QA through the cascade "
              f"{sum(correct)}/{len(qa)}, as text {sum(text_correct)}/{len(qa)} ({report[split]['seconds']} s)",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
