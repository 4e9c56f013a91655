"""Shared tiny components: everything is built in code from configs, nothing is downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import whisper
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from speechlm.adapters.building import ModelSpec
from speechlm.adapters.tiny import BYTE_VOCAB_SIZE, build_byte_tokenizer

# Widths of at least 64: bitsandbytes quantizes in 64-element blocks.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
TINY_AUDIO = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2)
TINY_PROJECTOR = dict(projector_type="mlp", stack_factor=2, hidden_size=48)
TINY_UNITS = 16


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
