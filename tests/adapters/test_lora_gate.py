from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from speechlm.adapters.building import build_speechlm
from speechlm.adapters.configuration import ConfigError
from speechlm.adapters.modes import merge_lora
from tests.adapters.conftest import audio_inputs
from tests.conftest import tiny_spec


def gated_model(**changes):
    """A tiny LoRA model gated to audio rows, its LoRA factors random (a fresh lora_B is zero: no effect)."""
    model, tokenizer = build_speechlm(tiny_spec(mode="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0,
                                                                   "scope": "audio"}, **changes))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval(), tokenizer


def audio_and_text_rows(model, tokenizer):
    """Row 0 hears a clip; row 1 is the same text with the clip's placeholders spelt as text tokens."""
    inputs = audio_inputs(model, tokenizer, [30])
    ids = inputs["input_ids"]
    text_row = ids.masked_fill(ids == model.config.audio_token_id, tokenizer("a").input_ids[0])
    inputs["input_ids"] = torch.cat([ids, text_row])
    inputs["attention_mask"] = inputs["attention_mask"].repeat(2, 1)
    return inputs


@pytest.fixture
def gated():
    return gated_model()


def test_text_rows_run_the_base_weights_and_audio_rows_the_adapted_ones(gated):
    model, tokenizer = gated
    inputs = audio_and_text_rows(model, tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
        with model.language_model.disable_adapter():
            base = model(**inputs).logits
    assert torch.equal(logits[1], base[1])
    assert not torch.allclose(logits[0], base[0], atol=1e-3)


def test_generate_keeps_the_prompts_gate_over_every_decoding_step(gated):
    model, tokenizer = gated
    inputs = audio_and_text_rows(model, tokenizer)
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with model.language_model.disable_adapter():
        base = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(output[1], base[1])
    # Greedy decoding by hand, each step a full forward without cache: the audio row's tokens come from
    # the adapted layers at every step, not only the first.
    ids = inputs["input_ids"][:1]
    single = {key: value[:1] for key, value in inputs.items()}
    with torch.no_grad():
        for _ in range(5):
            logits = model(**{**single, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(output[0], ids[0])
    assert not torch.equal(output[0], base[0])


def test_lora_learns_only_from_rows_that_hear_audio(gated):
    model, tokenizer = gated
    model.train()
    inputs = audio_and_text_rows(model, tokenizer)
    text_only = {"input_ids": inputs["input_ids"][1:], "attention_mask": inputs["attention_mask"][1:]}
    model(**text_only, labels=text_only["input_ids"]).loss.backward()
    lora = [p for n, p in model.language_model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and not p.grad.any() for p in lora)
    model.zero_grad()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in lora) and any(p.grad.any() for p in lora)


def test_gradient_checkpointing_recomputes_with_the_same_gate(gated):
    model, tokenizer = gated
    model.train()
    inputs = audio_and_text_rows(model, tokenizer)

    def lora_grads():
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return [p.grad.clone() for n, p in model.language_model.named_parameters() if "lora_" in n]

    plain = lora_grads()
    model.activation_checkpointing_enable()
    for with_checkpointing, without in zip(lora_grads(), plain, strict=True):
        torch.testing.assert_close(with_checkpointing, without)


def test_the_gate_saves_and_reloads(llama_dir, tmp_path):
    model, tokenizer = gated_model(text_model=llama_dir, text={})
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.lora_scope == "audio" and loaded.lora_gate is not None
    inputs = audio_and_text_rows(model, tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_a_gated_lora_does_not_merge(gated):
    model, _ = gated
    with pytest.raises(ValueError, match="only on rows with audio"):
        merge_lora(model)


def test_the_gate_needs_input_ids(gated):
    model, tokenizer = gated
    embeds = model.embed_tokens(tokenizer("hi", return_tensors="pt").input_ids)
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds)


@pytest.mark.parametrize(("changes", "message"), [
    ({"mode": "frozen", "lora": {"scope": "audio"}}, "lora_scope='audio' gates LoRA"),
    ({"mode": "lora", "lora": {"scope": "speech"}}, r"lora_scope='speech': choose one of \['all', 'audio'\]"),
])
def test_bad_scopes_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        build_speechlm(tiny_spec(**changes))
