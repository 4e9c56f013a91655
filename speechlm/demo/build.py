"""Build every asset of the quick start into the cache: backbone, Whisper, corpus, codec (units, vocoder and
speech decoder: shipped with the package for the quick start's corpus, `speechlm.demo.shipped_codec`).

    python -m speechlm.demo assets --size ci     # a few dozen clips (CI)
    python -m speechlm.demo assets --size full   # ~2,300 clips (the quick start)
    python -m speechlm.demo assets --size full --train-codec   # and its codec trained here (25 minutes more)

Re-runs reuse what is built. ``assets.json`` in the cache lists the paths for the training recipe.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from speechlm.demo.assets import (
    build_backbone,
    build_codec,
    build_speech_decoder,
    build_whisper,
    cache_dir,
    verified,
)
from speechlm.demo.corpus import CorpusPaths, CorpusSize, Voice, build_corpus, corpus_size
from speechlm.demo.corpus_texts import seed_text_cache
from speechlm.demo.shipped_codec import install_shipped_codec, shipped_codec_fits
from speechlm.finetune.speech_decoder_training import SpeechDecoderTraining
from speechlm.finetune.vocoder_training import VocoderTraining

# The vocoder that makes the codec's units (the LM's speech) audible: a few steps on the CI corpus,
# VOCODER_MINUTES on the quick start's (BENCHMARKS.md, "Speech out": what more minutes and clips buy; at 5 its
# speech is heard at 18% WER against 14%).
VOCODER_MINUTES = 10.0
VOCODER_TRAINING = {"ci": VocoderTraining(max_steps=4, max_clips=8, batch_size=4),
                    "full": VocoderTraining(max_minutes=VOCODER_MINUTES, max_clips=800)}
# The speech decoder that speaks the trained model's answers (the LM writes them): a few steps on the CI corpus,
# SPEECH_DECODER_MINUTES on all of the quick start's training clips (BENCHMARKS.md, "Speech out": 7.5, or 10
# without dropout's cost, speak unseen sentences worse).
SPEECH_DECODER_MINUTES = 15.0
SPEECH_DECODER_TRAINING = {"ci": SpeechDecoderTraining(max_steps=4, max_clips=8, batch_size=4),
                           "full": SpeechDecoderTraining(max_minutes=SPEECH_DECODER_MINUTES)}


@dataclass
class DemoAssets:
    """Paths of the built assets (strings, so that this serializes as the recipe's input)."""

    cache: str
    text_model: str
    audio_encoder: str
    codec: str
    corpus: str
    train: str
    heldout: str
    ood: str
    card: str
    seconds: dict


def build_demo_assets(size: str | CorpusSize = "ci", cache: str | os.PathLike | None = None, *, seed: int = 0,
                      train_codec: bool = False, spoken_train: int | None = None, progress=print) -> DemoAssets:
    """Every asset of the corpus ``size`` in ``cache``. The codec is the one that ships with the package where its
    helpers heard this corpus's texts (the quick start's, `full`), else, or with ``train_codec``, trained here on
    the corpus (25 minutes for `full`). ``spoken_train``: the training clips to speak (`build_corpus`; a job
    speaks those its training can draw); a codec trained here hears them all."""
    root = cache_dir(cache)
    seconds: dict[str, float] = {}

    def step(name: str, build):
        start = time.perf_counter()
        progress(f"[demo] {name} ...")
        result = build()
        seconds[name] = round(time.perf_counter() - start, 1)
        progress(f"[demo] {name}: {result.directory if isinstance(result, CorpusPaths) else result} "
                 f"({seconds[name]} s)")
        return result

    backbone = step("backbone", lambda: build_backbone(root))
    whisper = step("whisper", lambda: build_whisper(root))
    voice = Voice(verified("piper_voice"), verified("piper_voice_config"))
    name = size if isinstance(size, str) else "custom"
    text_cache = root / "backbone-texts.json"
    if shipped := seed_text_cache(text_cache):  # the pinned backbone's texts: not written again on a new machine
        progress(f"[demo] {shipped} texts of the backbone's from the package ({text_cache})")

    def corpus_stage(unspoken_splits: tuple[str, ...], spoken_train: int | None) -> CorpusPaths:
        return build_corpus(root / f"corpus-{name}", backbone, voice, size=corpus_size(size), seed=seed,
                            text_cache=text_cache, unspoken_splits=unspoken_splits, spoken_train=spoken_train,
                            progress=progress)

    # the `decoder` split's clips only the speech decoder hears: spoken only where it trains here
    corpus = step("corpus", lambda: corpus_stage(*(((), None) if train_codec else (("decoder",), spoken_train))))
    decoder_manifests = speech_decoder_manifests(corpus.directory)
    if not train_codec and shipped_codec_fits(decoder_manifests):
        codec = step("codec (shipped)", lambda: install_shipped_codec(whisper, root))
    else:
        if not train_codec:
            progress(f"[demo] the shipped codec's helpers heard other texts than corpus-{name}'s: training its own")
            left_unspoken = corpus.build["spoken_train"]["clips"] < corpus.build["spoken_train"]["of"]
            if corpus.manifests["decoder"].stat().st_size or left_unspoken:
                corpus = step("corpus (the codec's clips)", lambda: corpus_stage((), None))
        codec = step("codec", lambda: build_codec(corpus.manifests["train"], whisper, root, seed=seed,
                                                  vocoder=VOCODER_TRAINING.get(name, VOCODER_TRAINING["full"]),
                                                  progress=progress))
        step("speech decoder", lambda: build_speech_decoder(
            codec, decoder_manifests,
            training=SPEECH_DECODER_TRAINING.get(name, SPEECH_DECODER_TRAINING["full"]), progress=progress))
    assets = DemoAssets(cache=str(root), text_model=str(backbone), audio_encoder=str(whisper), codec=str(codec),
                        corpus=str(corpus.directory), train=str(corpus.manifests["train"]),
                        heldout=str(corpus.manifests["heldout"]), ood=str(corpus.manifests["ood"]),
                        card=str(corpus.card), seconds=seconds)
    (root / f"assets-{name}.json").write_text(json.dumps(asdict(assets), indent=2) + "\n")
    return assets


def speech_decoder_manifests(corpus_dir: str | os.PathLike) -> list[Path]:
    """What a corpus's speech decoder hears: the LM's training clips, and those only it hears (split `decoder`,
    where the size has them)."""
    manifests = [Path(corpus_dir) / f"{split}.jsonl" for split in ("train", "decoder")]
    return [manifest for manifest in manifests if manifest.stat().st_size]


def load_demo_assets(size: str = "ci", cache: str | os.PathLike | None = None) -> DemoAssets:
    """The assets of an earlier `build_demo_assets` run (``assets-<size>.json`` in the cache)."""
    path = cache_dir(cache) / f"assets-{size}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no demo assets built yet; run: python -m speechlm.demo assets --size {size}")
    return DemoAssets(**json.loads(path.read_text()))


__all__ = ["DemoAssets", "build_demo_assets", "load_demo_assets", "speech_decoder_manifests"]
