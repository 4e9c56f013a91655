"""Shared tiny components: everything is built in code from configs, nothing is downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import whisper
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from speechlm.adapters.building import ModelSpec
from speechlm.adapters.tiny import BYTE_VOCAB_SIZE, build_byte_tokenizer
from tests.hub_cache import cache_repo, offline_cache

# Widths of at least 64: bitsandbytes quantizes in 64-element blocks.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
TINY_AUDIO = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2)
TINY_PROJECTOR = dict(projector_type="mlp", stack_factor=2, hidden_size=48)
TINY_UNITS = 16
# The published SpeechTokenizer's repo and the folder that holds its config.json and SpeechTokenizer.pt.
PUBLISHED_CODEC = "fnlp/SpeechTokenizer/speechtokenizer_hubert_avg"


def tiny_spec(**changes) -> ModelSpec:
    fields = dict(text=dict(TINY_TEXT), audio=dict(TINY_AUDIO), projector=dict(TINY_PROJECTOR),
                  num_speech_units=TINY_UNITS)
    fields.update(changes)
    return ModelSpec(**fields)


def save_tiny_backbone(directory, config_class=LlamaConfig, *, seed: int = 0, **overrides) -> str:
    """A real HF causal-LM directory (config.json + model.safetensors + tokenizer files)."""
    tokenizer = build_byte_tokenizer()
    config = config_class(**{**TINY_TEXT, "vocab_size": BYTE_VOCAB_SIZE, "eos_token_id": tokenizer.eos_token_id,
                             "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, **overrides})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def save_tiny_whisper(path, *, seed: int = 0, n_vocab: int = 64, n_text_ctx: int = 16, **dims) -> str:
    """A real openai-whisper checkpoint: ``{"dims", "model_state_dict"}`` of a tiny Whisper. To decode
    with it (as a judge), give it the English vocabulary: ``n_vocab=51864, n_text_ctx=448``."""
    audio = {**TINY_AUDIO, **dims}
    model_dims = whisper.model.ModelDimensions(**audio, n_vocab=n_vocab, n_text_ctx=n_text_ctx,
                                               n_text_state=audio["n_audio_state"],
                                               n_text_head=audio["n_audio_head"], n_text_layer=1)
    torch.manual_seed(seed)
    model = whisper.model.Whisper(model_dims)
    # openai-whisper leaves the decoder's positional embedding as torch.empty (a checkpoint fills it): uninitialised
    # memory, NaN at times, which greedy decoding hides and sampling does not
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    torch.save({"dims": model_dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return save_tiny_backbone(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> str:
    return save_tiny_backbone(tmp_path_factory.mktemp("qwen2"), Qwen2Config)


@pytest.fixture(scope="session")
def whisper_pt(tmp_path_factory) -> str:
    return save_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny.pt")


@pytest.fixture(scope="session")
def published_codec():
    """A narrow random SpeechTokenizer with 64 codes (the tiny recipe's units), seeded codebooks."""
    from speechlm.finetune.demo_data import NARROW_CODEC
    from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec

    codec = SpeechTokenizerCodec.from_config(CodecConfig(**NARROW_CODEC), seed=0)
    codec.fill_codebooks(None, seed=0)
    return codec


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, llama_dir, published_codec) -> Path:
    """A Hugging Face cache as downloads leave it: `llama_dir` as ``owner/tiny-llama``, and `published_codec` in
    the layout of the published SpeechTokenizer repo (its README at the root; under ``speechtokenizer_hubert_avg/``
    ``config.json``, with the training settings the published one carries, and ``SpeechTokenizer.pt``)."""
    cache = tmp_path_factory.mktemp("hf-cache")
    cache_repo(cache, "owner/tiny-llama", llama_dir)
    repo = tmp_path_factory.mktemp("speechtokenizer-repo")
    owner, name, folder = PUBLISHED_CODEC.split("/", 2)
    published_codec.save_pretrained(repo / folder)
    config = {**published_codec.config.to_dict(), "num_mels": 80, "segment_size": 48000, "learning_rate": 1e-4,
              "semantic_model_layer": "avg", "distill_type": "d_axis", "results_folder": "Log/spt_base"}
    (repo / folder / "config.json").write_text(json.dumps(config, indent=4))
    (repo / "README.md").write_text("# SpeechTokenizer\n")
    (repo / ".gitattributes").write_text("*.pt filter=lfs diff=lfs merge=lfs -text\n")
    cache_repo(cache, f"{owner}/{name}", repo)
    return cache


@pytest.fixture
def offline_hub(hub_cache) -> Iterator[Path]:
    """`hub_cache` as this test's Hub cache (and its subprocesses'), with HF_HUB_OFFLINE=1."""
    with offline_cache(hub_cache) as cache:
        yield cache
