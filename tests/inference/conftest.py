"""Saved tiny SpeechLMs that speak (a narrow codec beside them), as `speechlm init` writes them."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoProcessor

import speechlm  # noqa: F401  (registers the Auto classes and the pipeline)
from speechlm.adapters.building import build_codec, build_processor, build_speechlm
from tests.conftest import tiny_spec

# A narrow SpeechTokenizer (codebook = tiny_spec's 16 units): speaks in milliseconds.
NARROW_CODEC = dict(n_filters=8, dimension=32, semantic_dimension=32, lstm_layers=1, n_q=1)
SAMPLE = Path(__file__).parents[2] / "configs" / "tiny" / "sample.flac"


def save_speaking_model(directory: Path, *, lora_b_std: float | None = None, **spec_changes) -> Path:
    """``lora_b_std``: draw LoRA's B factors (zero when built) from N(0, std), so that the adapters matter."""
    import torch

    spec = tiny_spec(**({"codec": dict(NARROW_CODEC)} | spec_changes))
    model, tokenizer = build_speechlm(spec)
    if lora_b_std is not None:
        with torch.no_grad():
            for name, param in model.language_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=lora_b_std, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(directory)
    build_processor(tokenizer, model.config, codec=build_codec(spec), codec_name_or_path="codec").save_pretrained(
        directory)
    return directory


def add_tiny_speech_decoder(directory: Path) -> Path:
    """Give the saved model in ``directory`` a tiny random speech decoder (characters) in its codec's folder."""
    import torch

    from speechlm.speech_io.speech_decoder import SpeechDecoder, SpeechDecoderConfig, codebook_fingerprint

    codec = AutoProcessor.from_pretrained(directory).codec
    torch.manual_seed(0)
    config = SpeechDecoderConfig(codebook_size=codec.codebook_size, symbols="characters", hidden_size=16,
                                 num_layers=1, num_heads=2, vocabulary=list("abcdefghijklmnopqrstuvwxyz .,?!"),
                                 units_per_symbol=1.5,
                                 codebook_fingerprint=codebook_fingerprint(codec.codebook_vectors(1)[0]))
    codec.add_speech_decoder(SpeechDecoder(config).eval())
    codec.save_pretrained(directory / "codec")
    return directory


@pytest.fixture(scope="session")
def speaking_dir(tmp_path_factory) -> Path:
    """A standalone tiny model (random backbone saved whole) with its codec in ``codec/``."""
    return save_speaking_model(tmp_path_factory.mktemp("speaking"))


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, llama_dir) -> Path:
    """An adapter-only LoRA checkpoint over a tiny Llama directory (its LoRA B made non-zero)."""
    return save_speaking_model(tmp_path_factory.mktemp("lora"), lora_b_std=0.05, text_model=llama_dir, text=None,
                               mode="lora")


@pytest.fixture(scope="session")
def speaking(speaking_dir):
    """The model and processor of `speaking_dir`, loaded through the Auto classes."""
    return AutoModelForCausalLM.from_pretrained(speaking_dir), AutoProcessor.from_pretrained(speaking_dir)
