"""The corpus's speech: per-clip voice settings and the Piper synthesizer (16 kHz, optional noise)."""

from __future__ import annotations

import json
import multiprocessing
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.constants import SAMPLE_RATE

if TYPE_CHECKING:
    from speechlm.demo.corpus import Voice

SENTENCE_GAP_SECONDS = 0.25  # Piper returns one chunk per sentence; join them with a short pause
# Fewer clips than this to speak: one process (a worker's start, ~3 s of the library's imports and the voice,
# would cost more than it saves)
MIN_CLIPS_FOR_WORKERS = 64
MAX_WORKERS = 8  # each holds the library's imports, its own voice and onnxruntime (~1 GB resident on 2 cores)


def synthesis_settings(row_id: str, seed: int) -> dict:
    """Per-clip voice settings, stable for an id: speaking rate, Piper's two noise scales, added noise."""
    rng = np.random.default_rng([seed, zlib.crc32(row_id.encode())])
    snr = None if rng.random() < 0.5 else round(float(rng.uniform(15.0, 40.0)), 1)
    return {"length_scale": round(float(rng.uniform(0.8, 1.25)), 3),
            "noise_scale": round(float(rng.uniform(0.33, 0.9)), 3),
            "noise_w_scale": round(float(rng.uniform(0.4, 1.0)), 3),
            "snr_db": snr}


def clip_file_name(row_id: str, text: str, synthesis: dict, seed: int) -> str:
    """A clip's file name: it carries what was spoken and how, so a cached clip is never reused for another text."""
    spoken = zlib.crc32(json.dumps([text, synthesis, seed]).encode())
    return f"{row_id}-{spoken:08x}.flac"


def save_clip(audio: np.ndarray, path: Path) -> None:
    """16 kHz speech as 16-bit FLAC, written beside ``path`` and moved in whole (an interrupted write leaves none)."""
    staging = path.with_name(path.name + ".partial")
    sf.write(staging, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    os.replace(staging, path)


def save_alignment(alignment: list, path: Path) -> None:
    """A clip's alignment (`PiperSynthesizer.synthesize`) as JSON at ``path``, moved in whole."""
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(alignment, ensure_ascii=False))
    os.replace(staging, path)


def alignment_path(clip: Path) -> Path:
    """Where a clip's alignment is kept: beside it."""
    return clip.with_name(clip.stem + ".alignment.json")


def load_piper_voice(voice: Voice, *, threads: int | None = None):
    """Piper's voice with its ONNX graph patched in memory to give each phoneme's samples (as
    ``PiperVoice.load(include_alignments=True)``), run by onnxruntime on ``threads`` threads (None: its default,
    one a core)."""
    import onnx
    import onnxruntime
    from piper import PiperConfig, PiperVoice
    from piper.patch_voice_with_alignment import add_alignment_output

    model = onnx.load(str(voice.model))
    try:
        add_alignment_output(model)
    except ValueError:  # already an output (a voice patched on disk); a voice without it fails in `synthesize`
        pass
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return PiperVoice(session=session, config=PiperConfig.from_dict(json.loads(Path(voice.config).read_text())))


class PiperSynthesizer:
    """Text -> 16 kHz float32 speech with the Piper voice (22.05 kHz, resampled by speech_io), and how long each
    phoneme lasts in it (Piper's own durations: its ONNX graph patched in memory to give them, which needs onnx)."""

    def __init__(self, voice: Voice, *, threads: int | None = None) -> None:
        self.voice = load_piper_voice(voice, threads=threads)

    def __call__(self, text: str, *, length_scale: float, noise_scale: float, noise_w_scale: float,
                 snr_db: float | None, seed: int = 0) -> np.ndarray:
        return self.synthesize(text, length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale,
                               snr_db=snr_db, seed=seed)[0]

    def synthesize(self, text: str, *, length_scale: float, noise_scale: float, noise_w_scale: float,
                   snr_db: float | None, seed: int = 0) -> tuple[np.ndarray, list[list[list]]]:
        """The speech of ``text`` and its alignment: each sentence's phonemes (espeak-ng's, a word space after the
        last, as `text_sentences` reads them) with the seconds each lasts; the leading silence counts to the first
        phoneme, the trailing silence and the pause before the next sentence to the last space."""
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale)
        chunks = list(self.voice.synthesize(text, config, include_alignments=True))
        if not chunks:
            raise ValueError(f"Piper produced no audio for {text!r}")
        if any(chunk.phoneme_alignments is None for chunk in chunks):
            raise RuntimeError("Piper gave no phoneme durations: its voice is patched for them in memory, which "
                               "needs the onnx package (pip install onnx; the demo extra has it)")
        rate = chunks[0].sample_rate
        gap = np.zeros(int(SENTENCE_GAP_SECONDS * rate), np.float32)
        pieces = [piece for chunk in chunks for piece in (chunk.audio_float_array, gap)][:-1]
        alignment = []
        for index, chunk in enumerate(chunks):  # Piper's alignments: the sentence's start, its phonemes, its end
            start, *phonemes, end = [(a.phoneme, a.num_samples / rate) for a in chunk.phoneme_alignments]
            pause = SENTENCE_GAP_SECONDS if index < len(chunks) - 1 else 0.0
            sentence = [[symbol, seconds] for symbol, seconds in phonemes] + [[" ", end[1] + pause]]
            sentence[0][1] += start[1]
            alignment.append([[symbol, round(seconds, 5)] for symbol, seconds in sentence])
        audio = load_audio(np.concatenate(pieces), sampling_rate=rate, name=f"Piper audio of {text[:40]!r}")
        if snr_db is not None:
            rng = np.random.default_rng([seed, zlib.crc32(text.encode())])
            rms = float(np.sqrt(np.mean(audio**2))) or 1e-4
            audio = audio + (rms / 10 ** (snr_db / 20) * rng.standard_normal(audio.size)).astype(np.float32)
        return audio, alignment


@dataclass(frozen=True)
class ClipToSpeak:
    """A clip of the corpus still to synthesize: its text, voice settings (`synthesis_settings`) and file."""

    text: str
    synthesis: dict
    path: Path
    seed: int = 0


def speak_clip(synthesizer: PiperSynthesizer, clip: ClipToSpeak) -> list:
    """Synthesize ``clip`` and save it, its alignment beside it (`alignment_path`); the alignment."""
    audio, alignment = synthesizer.synthesize(clip.text, **clip.synthesis, seed=clip.seed)
    save_alignment(alignment, alignment_path(clip.path))
    save_clip(audio, clip.path)
    return alignment


def speak_clips(voice: Voice, clips: Sequence[ClipToSpeak], *, workers: int | None = None,
                progress: Callable[[int], None] = lambda done: None) -> Iterator[list]:
    """Each clip synthesized and saved (`speak_clip`), its alignment yielded in order; ``progress(done)`` after
    each. ``workers`` processes speak them, each with one onnxruntime thread (None: one a core the process may
    use, at most `MAX_WORKERS`, where there are `MIN_CLIPS_FOR_WORKERS` clips or more). On 2 cores a second
    onnxruntime thread made one process 1.39x faster, a second process of one thread 1.93x (BENCHMARKS.md).
    A clip saved before a failure stays saved, so a re-run speaks only the rest."""
    if workers is None:
        workers = min(usable_cores(), MAX_WORKERS) if len(clips) >= MIN_CLIPS_FOR_WORKERS else 1
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: expected at least 1 process to speak the clips")
    if workers == 1:
        synthesizer = PiperSynthesizer(voice)
        for done, clip in enumerate(clips, start=1):
            yield speak_clip(synthesizer, clip)
            progress(done)
        return
    # spawn: the parent may hold torch's and onnxruntime's thread pools, which a fork would copy broken
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(voice,)) as pool:
        for done, alignment in enumerate(pool.map(_speak_in_worker, clips, chunksize=4), start=1):
            yield alignment
            progress(done)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS says it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_worker_synthesizer: PiperSynthesizer | None = None  # a `speak_clips` worker process's own voice


def _start_worker(voice: Voice) -> None:
    global _worker_synthesizer
    _worker_synthesizer = PiperSynthesizer(voice, threads=1)


def _speak_in_worker(clip: ClipToSpeak) -> list:
    return speak_clip(_worker_synthesizer, clip)
