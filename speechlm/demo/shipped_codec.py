"""The quick start's codec as it ships with the package: the codebook, vocoder and speech decoder of one build.

Trained in the job, the codec's helpers take 25 of its minutes from an empty cache (the vocoder 10, the speech
decoder 15; fewer minutes are heard worse: BENCHMARKS.md, `s70`), and they would come out the same on every
machine but for seeds: the units are k-means codes of the pinned Whisper base's frames, the corpus's texts and
splits are the pinned backbone's (shipped beside, `backbone-texts.json.gz`), its clips the pinned Piper voice's.
So one build's codec ships as a published checkpoint would (``data/codec/``), and `install_shipped_codec` puts it
together with the cache's Whisper base, whose first blocks make the units. What ships:

- ``config.json``: the codec's settings; ``codebook.safetensors``: its 1024 codes, float32 (a frame's unit is its
  nearest code: the exact codes keep the units the vocoder and speech decoder were trained on);
- ``vocoder-rvq1/`` and ``speech-decoder/``: config and weights, float16 (half the bytes; heard as well:
  BENCHMARKS.md, "The codec shipped");
- ``shipped.json``: the Whisper checkpoint (SHA-256) the units need, a digest of the texts the helpers heard (the
  corpus's ``train`` and ``decoder`` splits: a corpus of other texts may hold out what they heard, and trains
  its own), what each helper's training reported, and every shipped file's SHA-256.

    python -m speechlm.demo assets --size full --cache DIR --train-codec   # a maintainer's: train one, then
    python -m speechlm.demo ship-codec --cache DIR                        # write data/codec/ from it
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from speechlm.demo.assets import (
    STAMP,
    DemoAssetError,
    _fresh,
    _replace,
    _stamp_matches,
    _write_stamp,
    cache_dir,
    sha256_of,
)
from speechlm.finetune.examples import read_jsonl
from speechlm.speech_io.speech_decoder import SPEECH_DECODER_FOLDER, SPEECH_DECODER_WEIGHTS_NAME
from speechlm.speech_io.vocoder import VOCODER_WEIGHTS_NAME, vocoder_folder
from speechlm.speech_io.whisper_units import CONFIG_NAME

SHIPPED_CODEC = Path(__file__).parent / "data" / "codec"
PROVENANCE_NAME = "shipped.json"
CODEBOOK_NAME = "codebook.safetensors"
# the helpers' folders and weights, float16 but the vocoder's copy of the codebook
HALVED_WEIGHTS = {vocoder_folder(1): VOCODER_WEIGHTS_NAME, SPEECH_DECODER_FOLDER: SPEECH_DECODER_WEIGHTS_NAME}
INSTALLED_NAME = "units-shipped"  # the installed codec's folder in the cache


def heard_texts_digest(manifests: Sequence[str | os.PathLike]) -> str:
    """SHA-256 of the sorted texts of ``manifests``' rows: which sentences a codec's helpers heard."""
    texts = sorted(row.get("text", "") for manifest in manifests for row in read_jsonl(Path(manifest)))
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def ship_codec(codec_dir: str | os.PathLike, out: str | os.PathLike = SHIPPED_CODEC, *,
               heard: Sequence[str | os.PathLike]) -> Path:
    """Write ``out`` from a codec `build_codec` and `build_speech_decoder` built (``codec_dir``, with its stamp), whose
    helpers heard the manifests ``heard`` (the corpus's ``train`` and ``decoder`` splits)."""
    from safetensors.torch import load_file, save_file

    from speechlm.speech_io.codec_loading import load_codec
    from speechlm.speech_io.whisper_units import WhisperUnitCodec

    codec_dir, out = Path(codec_dir), Path(out)
    try:
        stamp = json.loads((codec_dir / STAMP).read_text())
        decoder_stamp = json.loads((codec_dir / SPEECH_DECODER_FOLDER / STAMP).read_text())
    except (OSError, ValueError) as error:
        raise DemoAssetError(f"{codec_dir}: not a codec the demo built with its speech decoder ({error})") from error
    codec = load_codec(codec_dir)
    if not isinstance(codec, WhisperUnitCodec) or codec.decodes_with(1) != "vocoder" or codec.speech_decoder is None:
        raise DemoAssetError(f"{codec_dir}: expected whisper units with a vocoder and a speech decoder")
    staging = _fresh(out.with_name(out.name + ".partial"))
    config = codec.config.to_dict() | {"source": ""}  # the installer names the cache's Whisper
    (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file({"codebook": codec.model.codebook.detach().contiguous()}, str(staging / CODEBOOK_NAME))
    for folder, weights in HALVED_WEIGHTS.items():
        (staging / folder).mkdir()
        for file in (codec_dir / folder).iterdir():
            if file.suffix == ".json" and file.name != STAMP:
                shutil.copy(file, staging / folder / file.name)
        state = load_file(str(codec_dir / folder / weights))
        save_file({key: value if key == "codebooks" or not value.is_floating_point() else value.half()
                   for key, value in state.items()}, str(staging / folder / weights))
    files = {path.relative_to(staging).as_posix(): sha256_of(path)
             for path in sorted(staging.rglob("*")) if path.is_file()}
    provenance = {"whisper": stamp["sources"]["whisper"], "heard_texts": heard_texts_digest(heard),
                  "vocoder": stamp.get("vocoder_report", ""), "speech_decoder": decoder_stamp.get("report", ""),
                  "files": files}
    (staging / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    _replace(staging, out)
    return out


def shipped_codec_fits(heard: Sequence[str | os.PathLike], shipped: str | os.PathLike = SHIPPED_CODEC) -> bool:
    """Whether the shipped codec's helpers heard exactly the texts of ``heard`` (so none of a corpus's held-out
    sentences)."""
    provenance = _read_provenance(Path(shipped))
    return provenance["heard_texts"] == heard_texts_digest(heard)


def install_shipped_codec(whisper_checkpoint: str | os.PathLike, cache: str | os.PathLike | None = None, *,
                          shipped: str | os.PathLike = SHIPPED_CODEC) -> Path:
    """The shipped codec as a codec folder in the cache (``units-shipped/``): Whisper base's first blocks from
    ``whisper_checkpoint``, the shipped codebook, vocoder and speech decoder. Built once; every shipped file's
    SHA-256 is checked first."""
    from safetensors.torch import load_file

    from speechlm.adapters.audio_encoder import read_whisper_checkpoint
    from speechlm.speech_io.codec_loading import load_codec
    from speechlm.speech_io.whisper_units import WhisperUnitCodec, WhisperUnitConfig

    shipped, whisper_checkpoint = Path(shipped), Path(whisper_checkpoint)
    provenance = _read_provenance(shipped)
    out = cache_dir(cache) / INSTALLED_NAME
    whisper = sha256_of(whisper_checkpoint)
    sources = {"shipped": sha256_of(shipped / PROVENANCE_NAME), "whisper": whisper}
    if _stamp_matches(out, sources):
        return out
    if whisper != provenance["whisper"]:
        raise DemoAssetError(f"{whisper_checkpoint}: SHA-256 {whisper}; the shipped codec's units are codes of the "
                             f"Whisper with SHA-256 {provenance['whisper']} (the demo's pinned Whisper base); "
                             f"train a codec for this one: --train-codec")
    for name, expected in provenance["files"].items():
        if not (shipped / name).is_file() or sha256_of(shipped / name) != expected:
            raise DemoAssetError(f"{shipped / name}: missing or not the shipped bytes (SHA-256 {expected} expected); "
                                 f"reinstall speechlm, or train the codec: --train-codec")
    config = WhisperUnitConfig.from_dict(json.loads((shipped / CONFIG_NAME).read_text()))
    dims, state = read_whisper_checkpoint(whisper_checkpoint)
    codec = WhisperUnitCodec.from_whisper(dims, state, source=os.fspath(whisper_checkpoint),
                                          encoder_blocks=config.encoder_blocks, codebook_size=config.codebook_size)
    with torch.no_grad():
        codec.model.codebook.copy_(load_file(str(shipped / CODEBOOK_NAME))["codebook"])
        codec.model.codebook_filled.fill_(1.0)
    staging = _fresh(out.with_name(out.name + ".partial"))
    codec.save_pretrained(staging)
    for folder in HALVED_WEIGHTS:
        shutil.copytree(shipped / folder, staging / folder)
    installed = load_codec(staging)  # the vocoder checks it was trained on this codebook
    if installed.decodes_with(1) != "vocoder" or installed.speech_decoder is None:
        raise DemoAssetError(f"{shipped}: the shipped codec lacks its vocoder or speech decoder")
    (staging / "README.md").write_text(
        "# Whisper units and their vocoder (shipped with speechlm)\n\n"
        f"The units: the nearest of {config.codebook_size} codes to each 20 ms frame of `{whisper_checkpoint}`'s "
        f"encoder after block {config.encoder_blocks}. Shipped from one build of the quick start's assets: "
        f"`vocoder-rvq1/` {provenance['vocoder']}; `speech-decoder/` {provenance['speech_decoder']}.\n")
    _write_stamp(staging, sources, shipped=str(shipped))
    _replace(staging, out)
    return out


def _read_provenance(shipped: Path) -> dict:
    path = shipped / PROVENANCE_NAME
    try:
        provenance = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DemoAssetError(f"{path}: unreadable ({error}); reinstall speechlm, or train the codec: --train-codec"
                             ) from error
    missing = [key for key in ("whisper", "heard_texts", "files") if key not in provenance]
    if missing:
        raise DemoAssetError(f"{path}: a shipped codec's provenance without {missing}; reinstall speechlm, or train "
                             f"the codec: --train-codec")
    return provenance


__all__ = ["SHIPPED_CODEC", "heard_texts_digest", "install_shipped_codec", "ship_codec", "shipped_codec_fits"]
