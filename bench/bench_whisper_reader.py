"""How well, and how fast, does the whisper reader transcribe, by the silence its clips are padded with?

The reader (`adapters/readers.py`) encodes each clip followed by ``reader_silence_seconds`` of Whisper's
silence (its window rounded up to whole 2 s, at most 30 s) and lets Whisper's own decoder read it. 30 s
gives every clip openai-whisper's own input; less costs less but is not what Whisper was trained on. For
each silence: the WER of the reader's transcripts on clips spread over the quick start's held-out
splits, and the seconds a clip (encoder pass and decoding, batched). The anchor is openai-whisper's own decoding, as the
evaluation's judge hears a clip (`speechlm.evaluation.transcribe`: greedy, with 5 s of silence after it).

Uses the quick start's assets (``python -m speechlm.demo assets --size full``).

    python bench/bench_whisper_reader.py --clips 48 --silences 0,3,5,7,30
"""

from __future__ import annotations

import argparse
import time

import torch

from speechlm.adapters.audio_encoder import load_whisper_encoder, read_whisper_checkpoint
from speechlm.adapters.configuration import SpeechLMAudioConfig, SpeechLMProjectorConfig
from speechlm.adapters.readers import WhisperTranscriptReader
from speechlm.demo.build import load_demo_assets
from speechlm.demo.job import corpus_rows, spread
from speechlm.evaluation import load_judge, transcribe
from speechlm.finetune.metrics import word_errors
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.features import log_mel_features


def reader_transcripts(path: str, waves, silence: float, batch_size: int) -> tuple[list[str], float]:
    dims, encoder_state = read_whisper_checkpoint(path)
    audio_config = SpeechLMAudioConfig(**dims)
    encoder = load_whisper_encoder(path, audio_config).eval()
    reader = WhisperTranscriptReader(audio_config, SpeechLMProjectorConfig(
        reader="whisper", reader_silence_seconds=silence)).eval()
    reader.decoder.load_state_dict(read_whisper_checkpoint(path, "decoder")[1])
    texts: list[str] = []
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(waves), batch_size):
            features = log_mel_features(waves[first: first + batch_size])
            windows = reader.windows(features.lengths)
            padded = reader.pad_with_silence(features.input_features, features.lengths, windows)
            frames = encoder(padded, windows)
            texts += reader.transcribe(frames, windows)
    return texts, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64, help="clips spread over each held-out split")
    parser.add_argument("--silences", default="0,3,5,7,30", help="seconds of silence after each clip")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache", help="the demo assets' cache folder")
    parser.add_argument("--size", default="full", help="the corpus size whose assets to read (full, full-words)")
    args = parser.parse_args()
    torch.manual_seed(0)
    assets = load_demo_assets(args.size, args.cache)
    rows = corpus_rows(assets)
    print(f"Whisper base ({assets.audio_encoder}); {args.clips} clips per split; torch threads "
          f"{torch.get_num_threads()}")
    print("| split | decoding | WER | seconds a clip |")
    print("| --- | --- | --- | --- |")
    judge = load_judge(str(assets.audio_encoder))
    for split in ("heldout", "ood"):
        chosen = spread(rows[split], args.clips)
        waves = [load_audio(row["audio"]) for row in chosen]
        references = [row["text"] for row in chosen]
        start = time.perf_counter()
        stock = [transcribe(judge, wave) for wave in waves]
        seconds = time.perf_counter() - start
        print(f"| {split} | openai-whisper (30 s, one clip at a time) | {word_errors(references, stock).rate:.1%} "
              f"| {seconds / len(waves):.3f} |")
        for silence in (float(w) for w in args.silences.split(",")):
            texts, seconds = reader_transcripts(assets.audio_encoder, waves, silence, args.batch_size)
            print(f"| {split} | reader, {silence:g} s of silence | {word_errors(references, texts).rate:.1%} "
                  f"| {seconds / len(waves):.3f} |", flush=True)


if __name__ == "__main__":
    main()
