"""Reassemble a saved SpeechLM (``from_pretrained``): the base parts from the sources its config names
(an HF causal LM, an openai-whisper ``.pt``; random where it names none), the saved tensors on top.

The model class comes in as an argument, so that `speechlm.adapters.modeling` can call this from
``from_pretrained`` while this module imports nothing of the model's.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from speechlm.adapters.audio_encoder import (
    WHISPER_TEXT_DIM_FIELDS,
    check_whisper_dims,
    read_whisper_checkpoint,
)
from speechlm.adapters.configuration import SpeechLMConfig
from speechlm.adapters.modes import apply_training_mode
from speechlm.speech_io.hub_files import download_repo_folder, missing_from_cache, not_cached_message
from speechlm.speech_io.processor import HUB_KWARGS as PROCESSOR_HUB_KWARGS
from speechlm.speech_io.units import check_tokenizer_layout

if TYPE_CHECKING:
    from speechlm.adapters.modeling import SpeechLMForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS_NAME = "model.safetensors"


def load_backbone(source: str, *, mode: str, dtype: torch.dtype, **hub_kwargs) -> PreTrainedModel:
    """The backbone from a directory or Hub id; 4-bit NF4 (bitsandbytes) for ``qlora``."""
    # transformers (5.25) swaps layers of a model loaded onto a GPU (qlora's is) for kernels it fetches from the
    # Hub unless told not to: offline that load fails, and online it runs downloaded code. Opt in with use_kernels.
    kwargs = {"dtype": dtype, "use_kernels": False, **hub_kwargs}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        if missing_from_cache(source, hub_kwargs):  # transformers' message would name neither repo nor cache
            raise FileNotFoundError(not_cached_message("text model", source, hub_kwargs)) from error
        raise FileNotFoundError(f"text model {source!r}: {error}") from error


def assemble_model(model_class: type[SpeechLMForCausalLM], config: SpeechLMConfig, *,
                   dtype: torch.dtype = torch.float32, language_model: PreTrainedModel | None = None,
                   audio_state: dict[str, torch.Tensor] | None = None, **hub_kwargs) -> SpeechLMForCausalLM:
    """A ``model_class`` model with base weights from the config's sources (random where it names none),
    mode applied."""
    if language_model is None and config.text_model_name_or_path is not None:
        language_model = load_backbone(config.text_model_name_or_path, mode=config.mode, dtype=dtype, **hub_kwargs)
    model = model_class(config, language_model=language_model)
    backbone_device = model.language_model.get_input_embeddings().weight.device
    if backbone_device.type != "cpu":  # qlora: bitsandbytes loads the 4-bit backbone straight onto the GPU
        for name, part in model.named_children():
            if name != "language_model":
                part.to(backbone_device)
    if audio_state is None and config.audio_model_name_or_path is not None:
        dims, audio_state = read_whisper_checkpoint(config.audio_model_name_or_path)
        check_whisper_dims(config.audio_config, dims, config.audio_model_name_or_path)
    if audio_state is not None:
        model.audio_tower.load_state_dict(audio_state)
    if model.audio_reader is not None and config.audio_model_name_or_path is not None:
        dims, decoder_state = read_whisper_checkpoint(config.audio_model_name_or_path, "decoder")
        check_whisper_dims(config.audio_config, dims, config.audio_model_name_or_path, WHISPER_TEXT_DIM_FIELDS)
        model.audio_reader.decoder.load_state_dict(decoder_state)
    if dtype != torch.float32:
        # 4-bit weights keep their storage; everything else takes the requested dtype.
        for part in (model.audio_tower, model.multi_modal_projector, model.speech_vocab, model.audio_compressor,
                     model.audio_reader):
            if part is not None:
                part.to(dtype)  # floating-point tensors only: the compressor's vocabulary mask stays bool
        for norm in (*model.audio_tower.modules(), *(model.audio_reader or torch.nn.Module()).modules()):
            if isinstance(norm, torch.nn.LayerNorm):
                norm.float()  # they compute in fp32 (FloatLayerNorm): fp32 weights lose nothing to rounding
        if not getattr(model.text_model, "is_quantized", False):
            model.language_model.to(dtype)
    return apply_training_mode(model)


# where this SpeechLM's own files come from (a subfolder of the repo or directory among them): the processor's
HUB_KWARGS = PROCESSOR_HUB_KWARGS
BACKBONE_KWARGS = ("attn_implementation", "use_kernels")  # passed on to the backbone's from_pretrained
SPREAD_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_checkpoint_dir(name_or_path: str | os.PathLike, **hub_kwargs) -> Path:
    """A local directory for a saved SpeechLM: the path itself, or a Hub snapshot of its small files."""
    path = Path(name_or_path)
    subfolder = hub_kwargs.get("subfolder") or ""
    if path.is_dir():
        return path / subfolder
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path}: not a SpeechLM directory (expected config.json and "
                                f"{WEIGHTS_NAME} written by save_pretrained)")
    allowed = {key: hub_kwargs[key] for key in HUB_KWARGS if key in hub_kwargs and key != "subfolder"}
    return download_repo_folder("SpeechLM", str(name_or_path), subfolder=subfolder, **allowed)


def load_speechlm(model_class: type[SpeechLMForCausalLM], name_or_path: str | os.PathLike, *,
                  dtype: torch.dtype | str | None = None, mode: str | None = None, device_map=None,
                  config: SpeechLMConfig | None = None, **kwargs) -> SpeechLMForCausalLM:
    """`SpeechLMForCausalLM.from_pretrained`: base parts from their sources, then the saved tensors.

    ``dtype``: a torch dtype, one of `DTYPES`' names, or ``"auto"`` (the saved tensors' dtype); float32 when
    not given. ``device_map``: a device, or a dict that puts every module on one device (the model is not
    split). ``revision``/``token``/``cache_dir`` say where the SpeechLM's files come from;
    ``attn_implementation`` reaches the backbone. Any other keyword is refused by name.

    Every tensor the model expects from the checkpoint must be there and every saved tensor must fit;
    the error names the file and the first offending keys. The tokenizer saved beside the model, if
    any, must have the speech tokens at the config's ids.
    """
    unknown = sorted(set(kwargs) - {*HUB_KWARGS, *BACKBONE_KWARGS})
    if unknown:
        raise TypeError(f"load_speechlm({str(name_or_path)!r}): unexpected keyword arguments {unknown}; it takes "
                        f"dtype, mode, device_map, config, {', '.join(HUB_KWARGS + BACKBONE_KWARGS)}")
    device = single_device(device_map)
    directory = resolve_checkpoint_dir(name_or_path, **kwargs)
    config = config or SpeechLMConfig.from_pretrained(directory)
    if mode is not None:
        config.mode = mode

    weights_file = directory / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} (a SpeechLM checkpoint holds config.json "
                                f"and {WEIGHTS_NAME})")
    saved = load_file(weights_file)
    dtype = resolve_dtype(dtype, saved)
    check_speech_vocab_rows(config, saved, weights_file)
    tokenizer = None
    if (directory / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
        check_tokenizer_layout(tokenizer, config.text_vocab_size, config.num_speech_units,
                               source=f"{directory} tokenizer")

    # ``revision`` names a commit of this SpeechLM's repo, not of the base model's: the base loads as the
    # config names it
    base_kwargs = {key: kwargs[key] for key in ("token", "cache_dir", "local_files_only", "proxies", *BACKBONE_KWARGS)
                   if key in kwargs}
    model = assemble_model(model_class, config, dtype=dtype, **base_kwargs)
    expected = {key for key in model.state_dict() if model.is_checkpoint_key(key)}
    missing, unexpected = sorted(expected - saved.keys()), sorted(saved.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not fit the model its config.json describes: "
                         f"missing {len(missing)} tensors {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}")
    model.load_state_dict(saved, strict=False)
    if "attn_implementation" in kwargs:  # a backbone built from its config (no source) gets it here
        model.text_model.set_attn_implementation(kwargs["attn_implementation"])
    if tokenizer is not None:
        model.set_text_tokenizer(tokenizer)
    if device is not None:
        model.to(device)
    model.name_or_path = model.config.name_or_path = str(name_or_path)  # as transformers does: what was asked for
    model.checkpoint_dir = directory  # the folder read (a Hub repo's snapshot at the asked revision)
    return model.eval()


def resolve_dtype(dtype: torch.dtype | str | None, saved: dict[str, torch.Tensor]) -> torch.dtype:
    """What ``dtype`` means to `load_speechlm`; ``"auto"`` is the dtype most saved floating tensors have."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        counts = Counter(tensor.dtype for tensor in saved.values() if tensor.is_floating_point())
        return counts.most_common(1)[0][0] if counts else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected 'auto', one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def single_device(device_map) -> torch.device | None:
    """The one device ``device_map`` puts the model on: a SpeechLM is not split across devices, so a map
    that spreads its modules is refused rather than loaded somewhere else."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(device) for device in device_map.values()}
        if len(devices) != 1:
            raise ValueError(f"device_map {device_map}: a SpeechLM loads whole on one device; this map spreads "
                             f"it over {sorted(devices)}")
        device_map = devices.pop()
    if device_map in SPREAD_DEVICE_MAPS:  # one accelerator when there is one, as transformers would pick
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device_map {device_map!r}: not a device ({error})") from error


def check_speech_vocab_rows(config: SpeechLMConfig, saved: dict[str, torch.Tensor], weights_file: Path) -> None:
    rows = saved.get("speech_vocab.embed_tokens.weight")
    if rows is not None and rows.shape[0] != config.num_added_tokens:
        raise ValueError(f"{weights_file} has {rows.shape[0]} speech-vocabulary rows but config.json expects "
                         f"{config.num_added_tokens} (num_speech_units={config.num_speech_units} + 3 special)")
