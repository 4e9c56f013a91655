"""Speaking the quick start's corpus: one process against worker processes of one onnxruntime thread each.

The first ``--clips`` rows of a corpus manifest (their texts and voice settings) spoken into a scratch folder by
`speak_clips` with each ``--workers`` count (1: one process on onnxruntime's default threads), each timed whole,
workers' start included; prints a markdown table for BENCHMARKS.md:

    python -m speechlm.demo assets --size full --cache /tmp/democache   # the corpus
    python bench/bench_synthesis.py --manifest /tmp/democache/corpus-full/train.jsonl --clips 300 --workers 1,2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import soundfile as sf

from speechlm.demo.assets import verified
from speechlm.demo.corpus import Voice
from speechlm.demo.corpus_audio import ClipToSpeak, speak_clips
from speechlm.finetune.examples import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="a corpus manifest (rows with text and synthesis)")
    parser.add_argument("--clips", type=int, default=300, help="rows to speak, from the first")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time in turn")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each count (alternating); the table keeps the best")
    args = parser.parse_args()
    voice = Voice(verified("piper_voice"), verified("piper_voice_config"))
    rows = [row for row in read_jsonl(Path(args.manifest)) if row.get("synthesis")][: args.clips]
    counts = [int(count) for count in args.workers.split(",")]
    best: dict[int, float] = {}
    audio_seconds = 0.0
    for _ in range(args.repeats):
        for workers in counts:
            with tempfile.TemporaryDirectory() as scratch:
                clips = [ClipToSpeak(row["text"], row["synthesis"], Path(scratch) / f"{index}.flac")
                         for index, row in enumerate(rows)]
                start = time.perf_counter()
                for _alignment in speak_clips(voice, clips, workers=workers):
                    pass
                seconds = time.perf_counter() - start
                audio_seconds = sum(sf.info(str(clip.path)).duration for clip in clips)
            best[workers] = min(best.get(workers, float("inf")), seconds)
            print(f"workers={workers}: {seconds:.1f} s", flush=True)
    base = best[counts[0]]
    print(f"\n{len(rows)} clips ({audio_seconds / 60:.1f} min of speech), {platform.processor() or platform.machine()}, "
          f"best of {args.repeats}\n")
    print("| processes | seconds | a clip | x the first row |\n| --- | --- | --- | --- |")
    for workers in counts:
        print(f"| {workers} | {best[workers]:.1f} | {best[workers] / len(rows):.3f} | {best[workers] / base:.2f}x |")


if __name__ == "__main__":
    main()
