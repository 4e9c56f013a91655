"""Whether speech decoded from the codec's units is intelligible: Whisper base (the judge) transcribes held-out
clips decoded from their *reference* units, side by side with the original audio and with audio rebuilt by
Griffin-Lim from the clips' true log-mel (the floor of any log-mel vocoder).

Rows: each ``--layers`` value up to the codec's layers, a vocoder trained here for ``--minutes`` on ``--clips``
training clips (the codec encodes them) with `speechlm.finetune.vocoder_training`, then decoding the held-out
clips' units; and a SpeechTokenizer codec's own decoder on all its layers (random in a codec built from a config).
``--codec`` is the demo cache's (whisper units, one layer) by default; a SpeechTokenizer built from a config shows
what a random codec's layers give.

    speechlm whisper-units /tmp/democache/whisper-base.pt /tmp/democache/corpus-full/train.jsonl --out units
    python bench/bench_vocoder.py --cache /tmp/democache --codec units --layers 1 --minutes 8 --clips 800
    python bench/bench_vocoder.py --cache /tmp/democache --codec RANDOM_SPEECHTOKENIZER --layers 1,8 --minutes 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from speechlm.evaluation import load_judge, transcribe
from speechlm.finetune.examples import read_jsonl
from speechlm.finetune.metrics import word_errors
from speechlm.finetune.vocoder_training import (
    VocoderTraining,
    manifest_clips,
    train_vocoder,
    vocoder_config,
    vocoder_examples,
)
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.codec_loading import load_codec
from speechlm.speech_io.spectrogram import MelSpectrogram


def judged(judge, texts: list[str], waves: list[np.ndarray]) -> dict:
    heard = [transcribe(judge, wave) for wave in waves]
    return {"judge_wer": round(word_errors(texts, heard).rate, 4), "heard": heard[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="the demo cache (assets-SIZE.json)")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    parser.add_argument("--codec", help="a codec folder (default: the cache's)")
    parser.add_argument("--layers", default="1,8", help="RVQ layers of each vocoder trained, comma-separated")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--clips", type=int, default=800)
    parser.add_argument("--heldout", type=int, default=60, help="held-out clips judged (the split's first)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(2)

    assets = json.loads((Path(args.cache) / f"assets-{args.size}.json").read_text())
    codec = load_codec(args.codec or assets["codec"])
    judge = load_judge(assets["audio_encoder"])
    rows = [row for row in read_jsonl(assets["heldout"]) if row.get("audio")][: args.heldout]
    texts = [row["text"] for row in rows]
    heldout = [load_audio(Path(assets["heldout"]).parent / row["audio"]) for row in rows]
    results: dict = {"original audio": judged(judge, texts, heldout)}
    spectrogram = MelSpectrogram()
    results["Griffin-Lim from the true log-mel"] = judged(
        judge, texts, [spectrogram.waveform(spectrogram.log_mel(wave), len(wave)) for wave in heldout])
    if codec.decodes_with(codec.n_q) == "speechtokenizer":  # a whisper-units codec has no decoder of its own
        units = codec.encode(heldout)
        results["the codec's own decoder, all layers"] = judged(judge, texts, codec.decode_batch(units))

    clips = [load_audio(clip) for clip in manifest_clips([assets["train"]], args.clips)]
    for layers in (int(value) for value in args.layers.split(",")):
        if layers > codec.n_q:
            print(f"--layers {layers}: the codec has {codec.n_q}; skipped")
            continue
        config = vocoder_config(codec, layers)
        start = time.perf_counter()
        examples = vocoder_examples(codec, clips, config)
        encode_s = time.perf_counter() - start
        vocoder, report = train_vocoder(codec, examples, config,
                                        VocoderTraining(max_minutes=args.minutes, max_clips=None))
        with torch.inference_mode():
            targets = vocoder_examples(codec, heldout, config)
            l1 = float(np.mean([(vocoder(e.units[None])[0] - e.log_mel).abs().mean().item() for e in targets]))
        start = time.perf_counter()
        waves = vocoder.decode_batch([e.units for e in targets])
        decode_s = time.perf_counter() - start
        results[f"vocoder, RVQ 1-{layers}" if layers > 1 else "vocoder, RVQ 1"] = {
            **judged(judge, texts, waves), "heldout_l1_log_mel": round(l1, 4), "steps": report.steps,
            "train_minutes": round(report.minutes, 2), "encode_seconds": round(encode_s, 1), "clips": len(clips),
            "decode_real_time_factor": round(decode_s / (sum(len(w) for w in waves) / 16000), 4),
            "first_losses": [round(x, 3) for x in report.losses[:3]], "last_loss": round(report.losses[-1], 4)}
    for name, result in results.items():
        print(f"{name:40s} {result['judge_wer']:.4f}  {({k: v for k, v in result.items() if k != 'heard'})}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
