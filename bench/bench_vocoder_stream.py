"""Streaming a trained codec's speech out: the quick start's whisper-units codec, whose vocoder decodes.

The units of held-out clips (encoded by the codec) joined into one utterance of ``--seconds``, decoded whole and
streamed ``--chunk`` units at a time (`decode_stream`: each chunk vocoded with the vocoder's lookahead each side
and cross-faded); prints a markdown table for BENCHMARKS.md, in the form of bench_codec.py's (its timing rules):

    python -m speechlm.demo assets --size full --cache /tmp/democache   # the codec and its vocoder
    python bench/bench_vocoder_stream.py --cache /tmp/democache
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from bench_codec import snr_db, stream_timings, timed

from speechlm.finetune.examples import read_jsonl
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.codec_loading import load_codec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="the demo cache (assets-SIZE.json)")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read")
    parser.add_argument("--codec", help="a codec folder with a vocoder (default: the cache's)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the streamed utterance")
    parser.add_argument("--chunk", type=int, default=10, help="units per streamed chunk (50 per second)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assets = json.loads((Path(args.cache) / f"assets-{args.size}.json").read_text())
    codec = load_codec(args.codec or assets["codec"])
    heldout = Path(assets["heldout"])
    wanted = round(args.seconds * codec.frame_rate)
    pieces, count = [], 0
    for row in read_jsonl(heldout):
        if count >= wanted:
            break
        clip = load_audio(heldout.parent / row["audio"], sampling_rate=codec.sample_rate)
        units = codec.encode([clip])[0].reshape(-1)
        pieces.append(units)
        count += units.size
    units = np.concatenate(pieces)[:wanted]

    whole, whole_time = timed(lambda: codec.decode(units))
    chunk_times, chunks = stream_timings(codec, units, args.chunk)
    stream = np.concatenate(chunks)
    first = chunk_times[0]
    print(f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}; {args.seconds:g} s "
          f"({units.size} units of held-out clips), chunks of {args.chunk} units\n")
    print("| measure | goal | measured |\n| --- | --- | --- |")
    rows = [
        ("decode real-time factor", "", f"{whole_time / args.seconds:.3f}"),
        ("stream: time to first chunk / whole decode", "<= 0.15",
         f"{first / whole_time:.3f} ({1000 * first:.0f} ms vs {1000 * whole_time:.0f} ms)"),
        ("stream total / whole decode", "", f"{sum(chunk_times) / whole_time:.2f}"),
        ("stream vs whole decode SNR", "", f"{snr_db(whole[:stream.size], stream[:whole.size]):.1f} dB"),
        ("stream length == whole decode length", "yes", "yes" if stream.size == whole.size else
         f"NO ({stream.size} vs {whole.size})"),
        ("stream lookahead (units a chunk waits for)", "",
         f"{codec.stream_lookahead} ({1000 * codec.stream_lookahead / codec.frame_rate:.0f} ms)"),
    ]
    for measure, goal, measured in rows:
        print(f"| {measure} | {goal} | {measured} |")


if __name__ == "__main__":
    main()
