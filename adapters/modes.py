"""Training modes: which parameters learn. LoRA is always peft's.

In every mode the projector and the added vocabulary rows train; the Whisper encoder trains only with
``train_audio_encoder``. With CTC compression the projector keeps its pre-aligned weights and the
compressor's two terms (residual map, end marker) train instead (`speechlm.adapters.compression`).
The backbone is frozen (``frozen``), gets LoRA adapters (``lora``), is a 4-bit
NF4 model with LoRA adapters (``qlora``), or trains whole (``full``). With ``lora_scope="audio"`` the
LoRA adapters act only on rows that hear audio, with ``"speech"`` also on speech tokens
(`speechlm.adapters.lora_gate`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from speechlm.adapters.lora_gate import SpeechGate
from speechlm.speech_io.config_errors import ConfigProblems

if TYPE_CHECKING:
    from peft import LoraConfig

    from speechlm.adapters.modeling import SpeechLMForCausalLM


def is_peft_model(module) -> bool:
    """Whether peft wraps this backbone (checked without importing peft, which imports bitsandbytes)."""
    return type(module).__module__.startswith("peft.")


def lora_config(model: SpeechLMForCausalLM) -> LoraConfig:
    """peft's ``LoraConfig`` from ``model.config.lora_config``."""
    from peft import LoraConfig

    ConfigProblems(unknown_lora_keys(model.config.lora_config)).raise_if_any("SpeechLMConfig")
    return LoraConfig(**model.config.lora_config, task_type="CAUSAL_LM")


def unknown_lora_keys(lora: dict, where: str = "lora_config") -> list[str]:
    """Keys of ``lora`` that peft's ``LoraConfig`` does not take, as problems (imports peft)."""
    from peft import LoraConfig

    known = {field.name for field in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(lora) - known)
    return [f"{where} has keys peft's LoraConfig does not take: {unknown} (it takes r, lora_alpha, lora_dropout, "
            f"target_modules, use_rslora, use_dora, ...)"] if unknown else []


def apply_training_mode(model: SpeechLMForCausalLM) -> SpeechLMForCausalLM:
    """Set ``requires_grad`` (and wrap the backbone with peft LoRA) as ``model.config.mode`` says."""
    config = model.config
    if config.mode in ("lora", "qlora") and not is_peft_model(model.language_model):
        from peft import get_peft_model, prepare_model_for_kbit_training

        backbone = model.language_model
        if config.mode == "qlora":
            if not getattr(backbone, "is_loaded_in_4bit", False):
                raise ValueError("mode='qlora' needs a backbone loaded in 4 bits: build it from text_model "
                                 "(a path or Hub id) so that it loads with bitsandbytes NF4")
            backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
        model.language_model = get_peft_model(backbone, lora_config(model))
    attach_lora_gate(model)
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(model.audio_compressor is None)
    if model.audio_compressor is not None:
        model.audio_compressor.requires_grad_(True)
    model.speech_vocab.requires_grad_(True)
    if config.train_audio_encoder:
        model.audio_tower.requires_grad_(True)
    if config.mode == "full":
        model.language_model.requires_grad_(True)
    elif config.mode in ("lora", "qlora"):
        for name, param in model.language_model.named_parameters():
            param.requires_grad_("lora_" in name)
    return model


def attach_lora_gate(model: SpeechLMForCausalLM) -> None:
    """Give a model with a gated ``lora_scope`` its gate on the LoRA layers (once; see `SpeechGate`)."""
    config = model.config
    gate = model.lora_gate
    if gate is not None and config.lora_scope != gate.scope:
        raise ValueError(f"lora_scope={config.lora_scope!r}, but this model's LoRA is already gated otherwise; "
                         f"rebuild it to change the scope")
    if config.lora_scope == "all":
        return
    if gate is None:
        model.lora_gate = SpeechGate(config.audio_token_id, config.lora_scope)
    model.lora_gate.attach(model.language_model)


def merge_lora(model: SpeechLMForCausalLM) -> SpeechLMForCausalLM:
    """Fold LoRA into the backbone's weights and make the model standalone (checkpoints include the
    backbone and need no base model). The result is in ``frozen`` mode. A LoRA gated to speech cannot
    fold: merged, it would change text too."""
    if model.lora_gate is not None:
        raise ValueError(f"this model's LoRA acts only on speech (lora_scope={model.config.lora_scope!r}); merged "
                         f"into the weights it would change text too: keep the adapter (save_pretrained keeps it small)")
    if is_peft_model(model.language_model):
        if getattr(model.text_model, "is_loaded_in_4bit", False):
            raise ValueError("cannot merge LoRA into a 4-bit backbone exactly: load the checkpoint with "
                             "mode='lora' (full-precision backbone) and merge that")
        model.language_model = model.language_model.merge_and_unload()
        model.weights_changed()  # peft merges through ``.data``, which torch's version counters do not see
    model.config.mode = "frozen"
    model.config.text_model_name_or_path = None
    model.config.audio_model_name_or_path = None
    return apply_training_mode(model)
