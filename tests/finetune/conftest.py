"""Shared data for the training tests: the synthetic demo corpus, its narrow codec, its prepared form."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from speechlm.adapters.tiny import build_byte_tokenizer
from speechlm.finetune.demo_data import NARROW_CODEC, write_demo_corpus
from speechlm.speech_io.processor import SpeechLMProcessor
from speechlm.speech_io.units import expand_tokenizer

UNITS = NARROW_CODEC["codebook_size"]
TINY_TRAIN_YAML = Path(__file__).parents[2] / "configs" / "tiny" / "train.yaml"
# DeepSpeed JIT-compiles its ops once (about a minute); every test run shares the build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "speechlm-tests" / "torch_extensions"))


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """12 synthetic utterances (transcription rows with word timings, and question/answer rows) and
    ``codec/`` beside them; returns the manifest path."""
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), examples=12)


@pytest.fixture(scope="session")
def demo_codec(demo_corpus):
    from speechlm.speech_io.codec import SpeechTokenizerCodec

    return SpeechTokenizerCodec.from_pretrained(demo_corpus.parent / "codec")


@pytest.fixture(scope="session")
def prepared(demo_corpus, demo_codec, tmp_path_factory) -> Path:
    from speechlm.finetune.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(demo_corpus, demo_codec, out, chunk_size=5, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared_examples(prepared):
    from speechlm.finetune.prepared import load_prepared

    return load_prepared(prepared)


@pytest.fixture
def processor() -> SpeechLMProcessor:
    tokenizer = build_byte_tokenizer()
    expand_tokenizer(tokenizer, UNITS)
    return SpeechLMProcessor(tokenizer, stack_factor=2, num_speech_units=UNITS)
