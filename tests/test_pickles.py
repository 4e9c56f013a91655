"""No pickle runs code: every checkpoint speechlm reads with torch.load is loaded with ``weights_only=True``.

A ``.pt`` from the Hub is a pickle; unpickled in full it can run anything. Each loader is handed one whose
``__reduce__`` would create a file: it must refuse with an error naming the file, and the file must
never appear. The source scan makes sure no new ``torch.load`` forgets the flag.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest
import torch

from speechlm.adapters.audio_encoder import read_whisper_checkpoint
from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec
from tests.speech_io.conftest import NARROW_CODEC

ROOT = Path(__file__).parents[1]


class CreatesAFile:
    """Unpickled in full, this calls ``open(path, "w")``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_an_openai_whisper_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"dims": {"n_mels": 80}, "model_state_dict": CreatesAFile(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt: not a loadable openai-whisper checkpoint .*UnpicklingError"):
        read_whisper_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_speechtokenizer_checkpoint_that_runs_code_is_refused(tmp_path):
    SpeechTokenizerCodec.from_config(CodecConfig(**NARROW_CODEC), seed=0).save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"encoder.weight": CreatesAFile(marker)}, tmp_path / "SpeechTokenizer.pt")
    with pytest.raises(ValueError, match=r"SpeechTokenizer\.pt: not a loadable torch state dict \(UnpicklingError"):
        SpeechTokenizerCodec.from_pretrained(tmp_path)
    assert not marker.exists()


def test_every_torch_load_in_the_sources_is_weights_only():
    calls = []
    for folder in ("speechlm", "adapters", "speech_io", "finetune", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    flags = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", flags.get("weights_only")))
    assert calls, "the scan found no torch.load at all"
    assert [where for where, flag in calls if flag != "True"] == []
