"""One loader for both kinds of codec folder: SpeechTokenizer's (``config.json`` + a ``.pt``, the published
layout) and whisper units' (``config.json`` with ``"codec_type": "whisper-units"`` + ``model.safetensors``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from speechlm.speech_io.codec import CHECKPOINT_NAME, SpeechTokenizerCodec
from speechlm.speech_io.hub_files import download_repo_folder, hub_name
from speechlm.speech_io.whisper_units import (
    CODEC_FILES,
    CODEC_TYPE_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    WHISPER_UNITS_TYPE,
    WhisperUnitCodec,
)

Codec = SpeechTokenizerCodec | WhisperUnitCodec
# What a codec folder may hold, for a download that must bring either kind whole.
CODEC_FILE_PATTERNS = (*CODEC_FILES, CHECKPOINT_NAME, "*.pt")


def codec_type(folder: str | os.PathLike) -> str:
    """``"whisper-units"`` or ``"speechtokenizer"``: what the folder's ``config.json`` says it holds."""
    config = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config}: not a readable JSON config ({err})") from err
    kind = data.get(CODEC_TYPE_KEY, "speechtokenizer") if isinstance(data, dict) else "speechtokenizer"
    if kind not in (WHISPER_UNITS_TYPE, "speechtokenizer"):
        raise ValueError(f"{config}: {CODEC_TYPE_KEY}={kind!r}; expected {WHISPER_UNITS_TYPE!r} or none "
                         f"(a SpeechTokenizer config)")
    return kind


def load_codec(path: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, subfolder: str = "",
               **hub_kwargs) -> Codec:
    """The codec saved in ``path`` (a folder, a SpeechTokenizer config or ``.pt`` file, or a Hub repo id and
    folder), whichever its kind; ``checkpoint`` and ``hub_kwargs`` as `SpeechTokenizerCodec.from_pretrained`."""
    if hub_name(path) is not None:
        path = download_repo_folder("codec", str(path), subfolder=subfolder, patterns=CODEC_FILE_PATTERNS,
                                    **hub_kwargs)
        subfolder, hub_kwargs = "", {}
        checkpoint = None if checkpoint is None else path / Path(checkpoint).name  # a file of the download
    location = Path(path) / subfolder
    folder = location if location.is_dir() else location.parent  # a config or .pt file names its folder
    if folder.is_dir() and codec_type(folder) == WHISPER_UNITS_TYPE:
        if checkpoint is not None:
            raise ValueError(f"{folder}: a whisper-units codec has one weights file ({WEIGHTS_NAME}); "
                             f"checkpoint={checkpoint} is for a SpeechTokenizer folder")
        return WhisperUnitCodec.from_pretrained(folder)
    return SpeechTokenizerCodec.from_pretrained(location, checkpoint=checkpoint, **hub_kwargs)
