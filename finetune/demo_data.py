"""A small synthetic speech corpus and a narrow codec for the tiny CPU recipe and the tests.

    python -m speechlm.finetune.demo_data out/tiny-data [--examples 24]

Each "word" is a voiced burst whose pitch and length depend on the word, so the audio carries what the
text says and a model can learn the pairing; every clip has exact word timings. Rows alternate between
transcription rows and question/answer rows (with a spoken answer) so every task of the survey has data.
The codec is SpeechTokenizer's architecture, narrow and random, with codebooks filled from this audio.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np

from speechlm.speech_io.audio import save_wav
from speechlm.speech_io.constants import SAMPLE_RATE

WORDS = ("hello", "world", "speech", "model", "yes", "no", "red", "blue", "one", "two", "three", "cat",
         "dog", "sun", "rain", "play")
QUESTIONS = (("what color is the sky", "blue"), ("say yes", "yes"), ("count to two", "one two"),
             ("name an animal", "cat"), ("what falls from clouds", "rain"))
NARROW_CODEC = dict(n_filters=8, dimension=32, semantic_dimension=32, strides=[8, 5, 4, 2], codebook_size=64,
                    n_q=2, lstm_layers=1)
PAUSE_SECONDS = 0.06


def word_audio(word: str, rng: np.random.Generator) -> np.ndarray:
    """A voiced burst: pitch and length from the word (stable), amplitude jitter from ``rng``."""
    code = zlib.crc32(word.encode())
    seconds = 0.12 + 0.03 * len(word)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 100 + (code % 200)
    voice = sum(np.sin(2 * np.pi * k * pitch * t) / k for k in range(1, 5))
    envelope = np.sin(np.pi * t / seconds) ** 2
    return (0.2 * rng.uniform(0.8, 1.2) * voice * envelope).astype(np.float32)


def utterance(words: list[str], rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """The words spoken one after another with short pauses, and their timings in seconds."""
    pieces, timings, cursor = [np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), np.float32)], [], PAUSE_SECONDS
    for word in words:
        wave = word_audio(word, rng)
        timings.append({"text": word, "start": round(cursor, 4), "end": round(cursor + wave.size / SAMPLE_RATE, 4)})
        pause = np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), np.float32)
        pieces += [wave, pause]
        cursor += (wave.size + pause.size) / SAMPLE_RATE
    audio = np.concatenate(pieces)
    return audio + 0.002 * rng.standard_normal(audio.size).astype(np.float32), timings


def write_demo_corpus(out: str | Path, *, examples: int = 24, seed: int = 0, codec: bool = True) -> Path:
    """Write ``out/manifest.jsonl``, ``out/wavs/*.wav`` and (with ``codec``) ``out/codec/``; return the manifest."""
    out = Path(out)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, clips = [], []
    for index in range(examples):
        row_id = f"utt{index:03d}"
        if index % 3 == 2:
            question, answer = QUESTIONS[index % len(QUESTIONS)]
            audio, timings = utterance(question.split(), rng)
            answer_audio, _ = utterance(answer.split(), rng)
            save_wav(out / "wavs" / f"{row_id}_answer.wav", answer_audio)
            row = {"id": row_id, "audio": f"wavs/{row_id}.wav", "text": question, "answer": answer,
                   "answer_audio": f"wavs/{row_id}_answer.wav"}
        else:
            words = list(rng.choice(WORDS, size=int(rng.integers(2, 7))))
            audio, timings = utterance(words, rng)
            row = {"id": row_id, "audio": f"wavs/{row_id}.wav", "text": " ".join(words), "words": timings}
        save_wav(out / "wavs" / f"{row_id}.wav", audio)
        clips.append(audio)
        rows.append(row)
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    if codec:
        write_demo_codec(out / "codec", clips[:8], seed=seed)
    return manifest


def write_demo_codec(directory: str | Path, clips: list[np.ndarray], *, seed: int = 0) -> Path:
    """A narrow random SpeechTokenizer with codebooks k-means-filled from ``clips``, saved to ``directory``."""
    from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec

    codec = SpeechTokenizerCodec.from_config(CodecConfig(**NARROW_CODEC), seed=seed)
    codec.fill_codebooks(clips, seed=seed)
    codec.save_pretrained(directory)
    return Path(directory)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write manifest.jsonl, wavs/ and codec/ to")
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_demo_corpus(args.out, examples=args.examples, seed=args.seed))


if __name__ == "__main__":
    main()
