"""Build a new SpeechLM from its parts (``speechlm init``, a recipe's ``model:``).

Parts come from real checkpoints (an HF causal-LM directory or Hub id, an openai-whisper ``.pt``) or,
when a source is left out, are tiny random components made from the given dimensions. Loading a saved
one is `speechlm.adapters.loading`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from speechlm.adapters.audio_encoder import read_whisper_checkpoint
from speechlm.adapters.configuration import (
    ENCODER_DTYPES,
    TRAINING_MODES,
    SpeechLMAudioConfig,
    SpeechLMConfig,
    SpeechLMProjectorConfig,
    lora_problems,
)
from speechlm.adapters.loading import DTYPES, assemble_model, load_backbone
from speechlm.adapters.modeling import SpeechLMForCausalLM
from speechlm.adapters.modes import unknown_lora_keys
from speechlm.adapters.tiny import BYTE_VOCAB_SIZE, build_byte_tokenizer
from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec
from speechlm.speech_io.codec_loading import Codec, load_codec
from speechlm.speech_io.config_errors import ConfigError, ConfigProblems
from speechlm.speech_io.hub_files import missing_from_cache, not_cached_message
from speechlm.speech_io.processor import SpeechLMProcessor
from speechlm.speech_io.units import expand_tokenizer
from speechlm.speech_io.whisper_units import WhisperUnitCodec


@dataclass
class ModelSpec:
    """What ``speechlm init`` (and the ``model:`` section of a training recipe) builds."""

    text_model: str | None = field(default=None, metadata={
        "help": "HF causal-LM directory or Hub id; null builds a random backbone from `text`"})
    text: dict | None = field(default_factory=dict, metadata={
        "help": "config kwargs of a random backbone (model_type defaults to llama), e.g. hidden_size"})
    audio_encoder: str | None = field(default=None, metadata={
        "help": "openai-whisper checkpoint (.pt with dims + model_state_dict); null: random from `audio`"})
    audio: dict | None = field(default_factory=dict, metadata={"help": "Whisper encoder dims of a random encoder"})
    projector: dict | None = field(default_factory=dict, metadata={
        "help": "projector_type (mlp|swiglu), stack_factor, hidden_size, compression (none|ctc), reader "
                "(none|whisper) and its reader_* settings"})
    num_speech_units: int = field(default=1024, metadata={"help": "codec codebook size (SpeechTokenizer: 1024)"})
    codec: str | dict | None = field(default=None, metadata={
        "help": "the speech-output codec: a codec folder (a SpeechTokenizer's config.json + .pt, or whisper units' "
                "from speechlm whisper-units) or Hub repo id and folder "
                "(fnlp/SpeechTokenizer/speechtokenizer_hubert_avg), or SpeechTokenizer "
                "dims of a random codec ({} = the published ones; codebook_size is num_speech_units; codebooks "
                "filled from `seed`); null: no codec (the model answers in text only)"})
    mode: str = field(default="frozen", metadata={"help": f"backbone training mode: {'|'.join(TRAINING_MODES)}"})
    lora: dict | None = field(default_factory=dict, metadata={
        "help": "peft LoraConfig settings for mode lora/qlora: r, lora_alpha, lora_dropout, target_modules, use_rslora, "
                "use_dora, ... (unset: r 16, lora_alpha 32, lora_dropout 0.05, all-linear)"})
    lora_scope: str | None = field(default=None, metadata={
        "help": "where LoRA acts: all | audio (only rows that hear audio; text runs the base weights exactly) | "
                "speech (those and speech tokens) | clip (a clip's own positions: the request's text and the answer "
                "run the base weights); null: all, or the saved model's own with init_from"})
    train_audio_encoder: bool = field(default=False, metadata={"help": "also train the Whisper encoder"})
    audio_encoder_dtype: str = field(default="float32", metadata={
        "help": f"what the Whisper encoder computes in: {'|'.join(ENCODER_DTYPES)} (bfloat16: autocast where the "
                "device has it natively, half a CPU's encoding time)"})
    dtype: str = field(default="float32", metadata={"help": f"weights dtype: {'|'.join(DTYPES)}"})
    seed: int = field(default=0, metadata={"help": "seed of random components and new vocabulary rows"})

    def __post_init__(self):
        for name in ("text", "audio", "projector", "lora"):
            if getattr(self, name) is None:
                setattr(self, name, {})
        problems = ConfigProblems()
        if self.mode not in TRAINING_MODES:
            problems.append(f"mode={self.mode!r}: choose one of {list(TRAINING_MODES)}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r}: choose one of {list(DTYPES)}")
        if self.audio_encoder_dtype not in ENCODER_DTYPES:
            problems.append(f"audio_encoder_dtype={self.audio_encoder_dtype!r}: choose one of {list(ENCODER_DTYPES)}")
        if self.mode == "qlora" and self.text_model is None:
            problems.append("mode='qlora' needs text_model (a path or Hub id) to load in 4 bits")
        problems.extend(lora_problems(self.lora, where="lora"))
        if self.lora and self.mode in ("lora", "qlora"):
            problems.extend(unknown_lora_keys(self.lora, where="lora"))
        if self.audio_encoder is not None and self.audio:
            problems.append("give audio_encoder (a checkpoint) or audio (random dims), not both")
        if self.text_model is not None and self.text:
            problems.append("give text_model (a checkpoint) or text (random dims), not both")
        if isinstance(self.codec, dict):
            size = self.codec.get("codebook_size", self.num_speech_units)
            if size != self.num_speech_units:
                problems.append(f"codec.codebook_size={size} differs from num_speech_units={self.num_speech_units}; "
                                f"leave it out (it is read from num_speech_units)")
            try:
                CodecConfig(**{**self.codec, "codebook_size": self.num_speech_units})
            except ConfigError as error:
                problems.extend(f"codec.{problem}" for problem in error.problems)
            except TypeError as error:
                problems.append(f"codec: {error}")
        for cls, kwargs in ((SpeechLMAudioConfig, self.audio), (SpeechLMProjectorConfig, self.projector)):
            try:
                cls(**kwargs)
            except ConfigError as error:
                problems.extend(error.problems)
            except (TypeError, ValueError) as error:
                problems.append(f"{cls.__name__}: {error}")
        problems.raise_if_any("model spec")


def build_speechlm(spec: ModelSpec) -> tuple[SpeechLMForCausalLM, object]:
    """A new SpeechLM and its expanded tokenizer from a `ModelSpec`."""
    dtype = DTYPES[spec.dtype]
    torch.manual_seed(spec.seed)
    if spec.text_model is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.text_model)
        except OSError as error:
            if missing_from_cache(spec.text_model):
                raise FileNotFoundError(not_cached_message("text model", spec.text_model)) from error
            raise FileNotFoundError(f"text model {spec.text_model!r}: no tokenizer ({error})") from error
        language_model = load_backbone(spec.text_model, mode=spec.mode, dtype=dtype)
        text_config = language_model.config
    else:
        tokenizer = build_byte_tokenizer()
        text_kwargs = {"model_type": "llama", "vocab_size": BYTE_VOCAB_SIZE, "bos_token_id": None,
                       "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **spec.text}
        text_config = AutoConfig.for_model(**text_kwargs)
        language_model = AutoModelForCausalLM.from_config(text_config)
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the backbone embeds only "
                         f"{text_config.vocab_size}; they do not belong together")
    text_vocab_size = expand_tokenizer(tokenizer, spec.num_speech_units)

    audio_state = None
    if spec.audio_encoder is not None:
        dims, audio_state = read_whisper_checkpoint(spec.audio_encoder)
        audio_config = SpeechLMAudioConfig(**dims)
    else:
        audio_config = SpeechLMAudioConfig(**spec.audio)
    config = SpeechLMConfig(
        text_config=text_config, audio_config=audio_config, projector_config=dict(spec.projector),
        num_speech_units=spec.num_speech_units, text_vocab_size=text_vocab_size, mode=spec.mode,
        train_audio_encoder=spec.train_audio_encoder, audio_encoder_dtype=spec.audio_encoder_dtype,
        text_model_name_or_path=spec.text_model,
        audio_model_name_or_path=spec.audio_encoder, lora_config=dict(spec.lora), lora_scope=spec.lora_scope or "all")
    model = assemble_model(SpeechLMForCausalLM, config, dtype=dtype, language_model=language_model,
                           audio_state=audio_state)
    model.set_text_tokenizer(tokenizer)
    generator = torch.Generator().manual_seed(spec.seed)
    model.speech_vocab.initialize_from(model.get_input_embeddings().weight, model.get_output_embeddings().weight,
                                       generator=generator)
    return model, tokenizer


def build_codec(spec: ModelSpec) -> Codec | None:
    """The codec a speaking model decodes its units with: loaded from ``spec.codec`` (a directory or Hub repo), or
    random at the given dims with seeded codebooks (so that a fresh model's speech is reproducible)."""
    if spec.codec is None:
        return None
    if isinstance(spec.codec, str):
        codec = load_codec(spec.codec)
        if codec.codebook_size != spec.num_speech_units:
            raise ValueError(f"codec {spec.codec!r} has {codec.codebook_size} codes per layer but "
                             f"num_speech_units={spec.num_speech_units}; set num_speech_units to match the codec")
        return codec
    codec = SpeechTokenizerCodec.from_config(CodecConfig(**{**spec.codec, "codebook_size": spec.num_speech_units}),
                                             seed=spec.seed)
    codec.fill_codebooks(None, seed=spec.seed)
    return codec


def build_whisper_unit_codec(whisper_checkpoint: str | os.PathLike, clips: Sequence[np.ndarray], *,
                             encoder_blocks: int = 4, codebook_size: int = 1024, seed: int = 0) -> WhisperUnitCodec:
    """A `WhisperUnitCodec` cut from an openai-whisper ``.pt`` (its first ``encoder_blocks`` encoder blocks), its
    codebook a seeded k-means of ``clips``' frames. It decodes once a vocoder is trained for it."""
    dims, state = read_whisper_checkpoint(whisper_checkpoint)
    codec = WhisperUnitCodec.from_whisper(dims, state, source=os.fspath(whisper_checkpoint),
                                          encoder_blocks=encoder_blocks, codebook_size=codebook_size)
    codec.fill_codebooks(clips, seed=seed)
    return codec


def build_processor(tokenizer, config: SpeechLMConfig, **settings) -> SpeechLMProcessor:
    """The processor that matches a model: mel bins and stacking read from its config."""
    return SpeechLMProcessor(tokenizer, n_mels=config.audio_config.n_mels,
                             stack_factor=config.projector_config.stack_factor,
                             reader_tokens_per_second=config.projector_config.reader_slots_per_second,
                             num_speech_units=config.num_speech_units, **settings)


