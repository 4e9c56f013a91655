"""How far a trained SpeechLM with a reader should keep to its reader's transcript when asked to transcribe.

On the ASR evaluation sets a quick-start job wrote (``OUT/eval-data``), with the job's trained model: the
WER of the reader's own transcripts (what the LM gets in each clip's transcript slots), then the model's
WER at each ``asr_follow_transcript`` (0: the LM alone), every clip of each split, as ``speechlm eval``
computes it. Choose the bias on the held-out split; the ood split shows what it does to text never trained on.

    python bench/bench_transcript_following.py --job /tmp/exp/reader6 --biases 0,2,5,8
    python bench/bench_transcript_following.py --job /tmp/exp/reader6 --biases 5 --reader-prompt "Anna, Priya."
    python bench/bench_transcript_following.py --job /tmp/exp/np61 --biases 5,8,12 \\
        --readings /tmp/democache/readings-full.safetensors --manifests questions-A.jsonl,questions-B.jsonl

``--reader-prompt`` gives the trained model's reader another prompt (``projector_config.reader_prompt``;
"" for none), ``--reader-beam`` another beam, ``--reader-silence`` another padding and ``--reader-lm-weight``
another weight for the backbone's ranking of the beam, without training again: the reader is frozen Whisper, so only its transcripts change.
``--manifests`` adds ASR manifests of clips neither split holds (a check of a bias chosen on the splits);
``--readings`` loads the job's readings file (`ReadingCache`), so that clips the job read are not read again;
``--lm-dtype`` is the LM's weights while transcribing (bfloat16, as the job evaluates ASR).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from speechlm.adapters.reading_cache import ReadingCache
from speechlm.demo.job import load_trained
from speechlm.evaluation import EvalSettings, evaluate, read_eval_manifest
from speechlm.finetune.metrics import word_errors
from speechlm.responding import reader_transcripts


def reader_wer(model, processor, items, batch_size: int, lm_dtype: str) -> tuple[dict, list[str]]:
    """The reader's transcripts alone against the references, and the transcripts: with the backbone that ranks
    the beam in ``lm_dtype``, as the evaluation reads them (and keeps them, under those weights)."""
    hypotheses = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        inputs = processor([[{"role": "user", "content": [{"type": "audio", "audio": item.fields["audio"]}]}]
                            for item in chunk])
        with torch.inference_mode(), model.language_model_in(lm_dtype):
            hypotheses += [processor.tokenizer.decode(ids) for ids in reader_transcripts(model, processor, inputs)]
    return word_errors([item.fields["text"] for item in items], hypotheses).to_dict(), hypotheses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="a quick-start job's --out folder (model/ and eval-data/)")
    parser.add_argument("--biases", default="0,2,5,8", help="asr_follow_transcript values, comma-separated")
    parser.add_argument("--splits", default="heldout,ood", help="the job's ASR splits")
    parser.add_argument("--manifests", default="",
                        help="more ASR manifests (JSONL: id, audio, text), comma-separated")
    parser.add_argument("--readings", help="a readings file the job kept (CACHE/readings-full.safetensors)")
    parser.add_argument("--lm-dtype", default="bfloat16",
                        help="the LM's weights while transcribing (the job's: bfloat16)")
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--reader-prompt", help="the reader's prompt for this run (\"\": none; default: the model's)")
    parser.add_argument("--reader-beam", type=int, help="the reader's beam size for this run (1: greedy; default: the model's)")
    parser.add_argument("--reader-silence", type=float, help="seconds of silence after each clip for this run (default: the model's)")
    parser.add_argument("--reader-lm-weight", type=float,
                        help="the backbone's weight in ranking the beam's transcripts for this run (default: the model's)")
    parser.add_argument("--out", help="write the figures here (JSON)")
    args = parser.parse_args()
    model, processor = load_trained(Path(args.job) / "model")
    if args.reader_prompt is not None:
        model.config.projector_config.reader_prompt = model.audio_reader.prompt = args.reader_prompt or None
    if args.reader_beam is not None:
        model.config.projector_config.reader_beam_size = model.audio_reader.beam_size = args.reader_beam
    if args.reader_silence is not None:
        model.config.projector_config.reader_silence_seconds = args.reader_silence
        model.audio_reader.silence_frames = round(args.reader_silence * 100)
    if args.reader_lm_weight is not None:
        model.config.projector_config.reader_lm_weight = model.audio_reader.lm_weight = args.reader_lm_weight
    if args.readings:
        model.reading_cache = ReadingCache()
        print(f"{model.reading_cache.load(args.readings)} readings loaded from {args.readings}", flush=True)
    manifests = {split: Path(args.job) / "eval-data" / f"asr-{split}.jsonl"
                 for split in args.splits.split(",") if split}
    manifests |= {Path(path).stem: Path(path) for path in args.manifests.split(",") if path}
    figures: dict[str, dict] = {}
    with model.keeping_readings():  # each clip read once: for the reader's WER, then every bias follows it
        for split, manifest in manifests.items():
            items = read_eval_manifest(manifest, "asr")
            start = time.perf_counter()
            figures[f"{split}/reader"], transcripts = reader_wer(model, processor, items, args.batch_size, args.lm_dtype)
            figures[f"{split}/reader"]["transcripts"] = [{"id": item.id, "reference": item.fields["text"],
                                                          "transcript": text} for item, text in zip(items, transcripts, strict=True)]
            print(f"{split} reader alone: WER {figures[f'{split}/reader']['rate']:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            for bias in (float(b) for b in args.biases.split(",") if b):
                start = time.perf_counter()
                settings = EvalSettings(batch_size=args.batch_size, max_new_tokens=64, asr_follow_transcript=bias,
                                        lm_dtype=args.lm_dtype)
                totals, records = evaluate(model, processor, "asr", items, settings)
                figures[f"{split}/follow={bias:g}"] = totals | {"hypotheses": [record["hypothesis"] for record in records]}
                print(f"{split} follow {bias:g}: WER {totals['wer']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
