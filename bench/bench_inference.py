"""Inference benchmarks on the tiny default (run by hand; figures go to BENCHMARKS.md with this command).

    HF_HUB_OFFLINE=1 python bench/bench_inference.py [--repeats 3]

1. Streaming: time to the first audio chunk vs time to the whole response, for a 10 s spoken answer
   (500 units; <|speech_end|> suppressed so the span runs to its bound). Goal: ratio <= 0.2.
2. Pipeline overhead: `pipeline("speechlm")` vs the processor + `model.generate` + `parse_response` by hand,
   same audio + text input, same 64 new tokens. Goal: direct time / pipeline time >= 0.95.
3. Batching: the pipeline on 8 inputs of mixed lengths (0.5 to 3.9 s of audio), batch_size=8 vs one at a time,
   32 new tokens each. Goal: >= 2x throughput.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

import speechlm  # noqa: F401  (registers the Auto classes and the pipeline)
from speechlm.cli import init
from speechlm.responding import AudioChunk, stream_response

ROOT = Path(__file__).parents[1]
SAMPLE = ROOT / "configs" / "tiny" / "sample.flac"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_audio_ratio(model, processor, repeats: int) -> tuple[float, float]:
    """(median seconds to the first audio chunk, median seconds to the end) for a 10 s spoken answer."""
    firsts, wholes = [], []
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        first = None
        samples = 0
        for event in stream_response(model, processor, audio=str(SAMPLE), text="Answer aloud.", output="speech",
                                     max_speech_units=500, suppress_tokens=[processor.speech_end_token_id]):
            if isinstance(event, AudioChunk):
                first = first or time.perf_counter() - start
                samples += event.array.size
        whole = time.perf_counter() - start
        assert samples == 500 * 320, samples
        if attempt:  # the first run warms up
            firsts.append(first)
            wholes.append(whole)
    return statistics.median(firsts), statistics.median(wholes)


def pipeline_overhead(pipe, model, processor, repeats: int) -> tuple[float, float]:
    settings = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)

    def direct():
        inputs = processor(audio=str(SAMPLE), text="What did you hear?")
        with torch.inference_mode():
            out = model.generate(**inputs, **settings)
        return processor.parse_response(out[0, inputs["input_ids"].shape[1]:]).text

    def piped():
        return pipe(str(SAMPLE), text="What did you hear?", max_new_tokens=64,
                    generate_kwargs={"min_new_tokens": 64, "do_sample": False})["text"]

    return timed(direct, repeats), timed(piped, repeats)


def batching(pipe, repeats: int) -> tuple[float, float]:
    wave, rate = sf.read(SAMPLE, dtype="float32")
    lengths = [0.5, 3.9, 1.0, 2.5, 0.8, 3.0, 1.5, 2.0]  # seconds, mixed order
    inputs = [{"audio": {"array": wave[: int(s * rate)], "sampling_rate": rate}, "text": "Transcribe."}
              for s in lengths]
    settings = dict(max_new_tokens=32, generate_kwargs={"min_new_tokens": 32, "do_sample": False})
    batched = timed(lambda: pipe(inputs, batch_size=8, **settings), repeats)
    single = timed(lambda: [pipe(item, **settings) for item in inputs], repeats)
    return batched, single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        directory = init(str(ROOT / "configs" / "tiny" / "model.yaml"), str(Path(tmp) / "tiny"), [])
        model = AutoModelForCausalLM.from_pretrained(directory)
        processor = AutoProcessor.from_pretrained(directory)
        pipe = pipeline("speechlm", model=str(directory))

        print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}")
        first, whole = first_audio_ratio(model, processor, args.repeats)
        print(f"| streaming, 10 s spoken answer | first audio {first:.3f} s | whole response {whole:.2f} s | "
              f"ratio {first / whole:.3f} | goal <= 0.2 |")
        direct, piped = pipeline_overhead(pipe, model, processor, args.repeats)
        print(f"| pipeline vs generate by hand (64 tokens) | by hand {direct:.3f} s | pipeline {piped:.3f} s | "
              f"ratio {direct / piped:.3f} | goal >= 0.95 |")
        batched, single = batching(pipe, args.repeats)
        print(f"| pipeline batch 8 vs one at a time (32 tokens) | batched {batched:.2f} s | one at a time "
              f"{single:.2f} s | speed-up {single / batched:.2f}x | goal >= 2x |")


if __name__ == "__main__":
    main()
