from __future__ import annotations

import pytest
import torch

from speechlm.adapters.building import build_speechlm
from tests.adapters.conftest import audio_inputs
from tests.conftest import tiny_spec


def trainable_prefixes(model) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


def test_frozen_trains_only_projector_and_new_rows():
    model, _ = build_speechlm(tiny_spec(mode="frozen"))
    assert trainable_prefixes(model) == {"multi_modal_projector", "speech_vocab"}
    counts = model.parameter_counts()
    own = sum(p.numel() for part in (model.multi_modal_projector, model.speech_vocab) for p in part.parameters())
    assert counts.trainable == own and counts.total == sum(p.numel() for p in model.parameters())


def test_train_audio_encoder_unfreezes_it():
    model, _ = build_speechlm(tiny_spec(train_audio_encoder=True))
    assert "audio_tower" in trainable_prefixes(model)


def test_lora_trains_adapters_but_not_base_weights():
    model, _ = build_speechlm(tiny_spec(mode="lora", lora={"r": 4, "lora_alpha": 8, "use_rslora": True}))
    lm_trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    assert trainable_prefixes(model) == {"multi_modal_projector", "speech_vocab", "language_model"}
    peft_config = model.language_model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.use_rslora) == (4, 8, True)  # any LoraConfig setting


def test_full_trains_everything_but_the_encoder():
    model, _ = build_speechlm(tiny_spec(mode="full"))
    assert all(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.audio_tower.parameters())


def test_lora_step_changes_only_trainable_weights():
    model, tokenizer = build_speechlm(tiny_spec(mode="lora"))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = audio_inputs(model.train(), tokenizer, [30])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before)


def test_qlora_runs_forward_and_backward(llama_dir):
    pytest.importorskip("bitsandbytes")
    model, tokenizer = build_speechlm(tiny_spec(mode="qlora", text_model=llama_dir, text={}))
    assert model.text_model.is_loaded_in_4bit
    inputs = audio_inputs(model.train(), tokenizer, [30])
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    lora_grads = [p.grad for n, p in model.language_model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert model.parameter_counts().trainable < model.parameter_counts().total


def test_qlora_without_a_checkpoint_is_refused():
    with pytest.raises(ValueError, match="qlora.*needs text_model"):
        tiny_spec(mode="qlora")
