"""Codec throughput and streaming latency at the published SpeechTokenizer size (random weights).

Run by hand (not a test); prints a markdown table for BENCHMARKS.md:

    python bench/bench_codec.py --threads 2

Weights are random and codebooks are filled from the benchmark's own synthetic speech-like audio, so
the numbers measure the mechanics (speed, exactness), not audio quality.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec

SAMPLE_RATE = 16000


def speechlike(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Voiced harmonics on a wandering pitch, syllable-rate amplitude modulation, fricative noise bursts."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) * rng.uniform(0.2, 1.0) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None)
    bursts = (np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)) > 0.85) * rng.standard_normal(t.size) * 0.3
    return (0.15 * (voiced * syllables + bursts)).astype(np.float32)


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = float(np.sum((reference - estimate) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference**2)) / noise)


REPEATS = 3  # shared 2-core VMs vary 2x (even a plain matmul): report the fastest of a few runs


def timed(work):
    """(result, seconds): an untimed warm-up, then the fastest of REPEATS runs."""
    result, best = work(), float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return result, best


def stream_timings(codec: SpeechTokenizerCodec, units: np.ndarray, chunk: int) -> tuple[list[float], list[np.ndarray]]:
    """Seconds from the previous chunk (or the start) to each chunk, and the chunks, of the fastest run."""
    runs = []
    for _ in range(REPEATS + 1):  # the first run warms up, as in timed()
        gaps, chunks = [], []
        last = time.perf_counter()
        for piece in codec.decode_stream(iter(units.tolist()), chunk=chunk):
            now = time.perf_counter()
            gaps.append(now - last)
            chunks.append(piece)
            last = now
        runs.append((gaps, chunks))
    return min(runs[1:], key=lambda run: sum(run[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="weights, signals and codebooks")
    parser.add_argument("--chunk", type=int, default=10, help="frames per streamed chunk (50 per second)")
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="length of the streamed utterance")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    codec = SpeechTokenizerCodec.from_config(CodecConfig(), seed=args.seed)  # the published architecture
    clips = [speechlike(seconds, rng) for seconds in (1.3, 4.6, 2.2, 5.8, 3.1, 1.9, 4.1, 2.7)]
    utterance = speechlike(args.stream_seconds, rng)
    codec.fill_codebooks(clips, seed=args.seed)
    audio_seconds = sum(c.size for c in clips) / SAMPLE_RATE

    def upstream_one_at_a_time() -> None:
        with torch.inference_mode():
            for clip in clips:
                codec.model.encode(torch.from_numpy(clip)[None, None])

    # Every configuration runs once untimed first: CPU kernels are set up per input shape (the first
    # call for a new length costs far more than the arithmetic), and each method sees new shapes.
    alone, one_at_a_time = timed(lambda: [codec.encode([clip])[0] for clip in clips])
    batched, batch_time = timed(lambda: codec.encode(clips, batch_size=8))
    _, upstream_time = timed(upstream_one_at_a_time)
    exact = all(np.array_equal(a, b) for a, b in zip(alone, batched, strict=True))

    units = codec.encode([utterance])[0][0]  # layer 1: what the LM generates
    whole, whole_time = timed(lambda: codec.decode(units))
    chunk_times, chunks = stream_timings(codec, units, args.chunk)
    stream_time = sum(chunk_times)
    stream = np.concatenate(chunks)
    first = chunk_times[0]
    chunk_ms = 1000 * args.chunk / codec.frame_rate

    rows = [
        ("encode, batch 8 (audio s per wall s)", "", f"{audio_seconds / batch_time:.1f}"),
        ("encode, one at a time, ours (audio s per wall s)", "", f"{audio_seconds / one_at_a_time:.1f}"),
        ("encode, one at a time, upstream `model.encode`", "", f"{audio_seconds / upstream_time:.1f}"),
        ("batched speedup vs ours one at a time", ">= 2x", f"{one_at_a_time / batch_time:.2f}x"),
        ("batched speedup vs upstream one at a time", "", f"{upstream_time / batch_time:.2f}x"),
        ("batched codes identical to one at a time", "yes", "yes" if exact else "NO"),
        (f"decode real-time factor ({args.stream_seconds:g} s, layer-1 units)", "", f"{whole_time / args.stream_seconds:.3f}"),
        ("stream: time to first chunk / whole decode", "<= 0.15", f"{first / whole_time:.3f} ({1000 * first:.0f} ms vs {1000 * whole_time:.0f} ms)"),
        ("stream vs whole decode SNR", ">= 30 dB", f"{snr_db(whole, stream):.1f} dB"),
        ("stream length == whole decode length", "yes", "yes" if stream.size == whole.size else "NO"),
        (f"per-chunk latency, mean / max ({args.chunk} frames = {chunk_ms:.0f} ms audio)", "",
         f"{1000 * np.mean(chunk_times[1:]):.0f} / {1000 * np.max(chunk_times[1:]):.0f} ms"),
        ("stream total / whole decode", "", f"{stream_time / whole_time:.2f}"),
        ("stream lookahead (units a frame waits for)", "", f"{codec.stream_lookahead} ({1000 * codec.stream_lookahead / codec.frame_rate:.0f} ms)"),
    ]
    print(f"SpeechTokenizer published size, random weights; {len(clips)} clips, {audio_seconds:.1f} s of audio; "
          f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}; "
          f"fastest of {REPEATS} runs after a warm-up\n")
    print("| measure | goal | measured |\n| --- | --- | --- |")
    for name, goal, value in rows:
        print(f"| {name} | {goal} | {value} |")


if __name__ == "__main__":
    main()
