from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from speechlm.adapters.building import build_speechlm
from speechlm.adapters.modes import merge_lora
from speechlm.speech_io.config_errors import ConfigError
from tests.adapters.conftest import audio_inputs
from tests.conftest import TINY_PROJECTOR, tiny_spec


def gated_model(scope: str = "speech", **changes):
    """A tiny LoRA model gated to speech, its LoRA factors random (a fresh lora_B is zero: no effect)."""
    model, tokenizer = build_speechlm(tiny_spec(mode="lora", lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                                                lora_scope=scope, **changes))
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


def greedy_by_hand(model, inputs: dict, steps: int) -> torch.Tensor:
    """Greedy decoding of one row, each step a full forward without cache (the gate from the whole row)."""
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[0]


def test_generate_keeps_the_prompts_gate_over_every_decoding_step(gated):
    model, tokenizer = gated
    inputs = audio_and_text_rows(model, tokenizer)
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with model.language_model.disable_adapter():
        base = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(output[1], base[1])
    # the audio row's tokens come from the adapted layers at every step, not only the first
    assert torch.equal(output[0], greedy_by_hand(model, {key: value[:1] for key, value in inputs.items()}, 5))
    assert not torch.equal(output[0], base[0])


@pytest.mark.parametrize("scope", ["speech", "audio"])
def test_speech_tokens_of_a_text_row_run_the_adapted_layers_with_scope_speech(scope):
    model, tokenizer = gated_model(scope)
    config = model.config
    text = tokenizer("say hi", return_tensors="pt").input_ids
    speech = torch.tensor([[config.speech_start_token_id, config.speech_unit_start_id + 3,
                            config.speech_unit_start_id + 7]])
    ids = torch.cat([text, speech], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.language_model.disable_adapter():
            base = model(input_ids=ids).logits
    prompt = text.shape[1]
    assert torch.equal(logits[0, :prompt], base[0, :prompt])
    if scope == "audio":  # the row hears no audio: all of it runs the base weights
        assert torch.equal(logits, base)
    else:
        assert not torch.allclose(logits[0, prompt:], base[0, prompt:], atol=1e-3)
    # decoding a token at a time gates each new token as the whole row does
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(output[0], greedy_by_hand(model, {"input_ids": ids}, 4))


def lora_outputs(model, inputs: dict) -> torch.Tensor:
    """``B, T``: whether any LoRA update (a gated ``lora_B`` output) is non-zero at each position."""
    touched = []
    hooks = [module.register_forward_hook(lambda _, __, output: touched.append(output.detach().abs().sum(-1) > 0))
             for name, module in model.language_model.named_modules() if name.endswith("lora_B.default")]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(touched).any(0)


def test_scope_clip_adapts_only_the_clips_positions():
    model, tokenizer = gated_model("clip")
    inputs = audio_and_text_rows(model, tokenizer)
    clip = inputs["input_ids"] == model.config.audio_token_id
    assert torch.equal(lora_outputs(model, inputs), clip)  # the text row has no clip: nothing
    with torch.no_grad():
        logits = model(**inputs).logits
        with model.language_model.disable_adapter():
            base = model(**inputs).logits
    first = int(clip[0].nonzero()[0])
    assert torch.equal(logits[1], base[1]) and torch.equal(logits[0, :first], base[0, :first])
    assert not torch.allclose(logits[0, clip[0]], base[0, clip[0]], atol=1e-3)
    # the answer runs the base weights over the adapted clip, in decoding (LoRA skipped) as in one forward
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(output[0], greedy_by_hand(model, {key: value[:1] for key, value in inputs.items()}, 5))
    with model.language_model.disable_adapter():
        assert not torch.equal(output[0], model.generate(**inputs, max_new_tokens=5, do_sample=False)[0])


@pytest.mark.parametrize("compression", ["none", "ctc"])  # ctc: generate's first forward gets embeddings
def test_beams_and_samples_expand_the_gate(compression):
    model, tokenizer = gated_model(projector={**TINY_PROJECTOR, "compression": compression})
    if compression == "ctc":
        model.audio_compressor.set_alignment(torch.zeros(model.config.text_config.hidden_size), torch.arange(3, 40),
                                             1.0)
    inputs = audio_and_text_rows(model, tokenizer)
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    with model.language_model.disable_adapter():
        base = model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
    assert output.shape[0] == 4 and torch.equal(output[2:], base[2:])  # the text row's beams


def test_lora_learns_only_from_speech(gated):
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
    assert loaded.config.lora_scope == "speech" and loaded.lora_gate is not None
    inputs = audio_and_text_rows(model, tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_a_gated_lora_does_not_merge(gated):
    model, _ = gated
    with pytest.raises(ValueError, match="acts only on speech"):
        merge_lora(model)


def test_the_gate_needs_input_ids(gated):
    model, tokenizer = gated
    embeds = model.embed_tokens(tokenizer("hi", return_tensors="pt").input_ids)
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds)


@pytest.mark.parametrize(("changes", "message"), [
    ({"mode": "frozen", "lora_scope": "speech"}, "lora_scope='speech' gates LoRA"),
    ({"mode": "full", "lora_scope": "audio"}, "lora_scope='audio' gates LoRA"),
    ({"mode": "lora", "lora_scope": "speech!"}, r"lora_scope='speech!': choose one of \['all', 'audio', 'speech', 'clip'\]"),
])
def test_bad_scopes_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        build_speechlm(tiny_spec(**changes))


def test_a_stage_that_switches_mode_checks_the_scope_and_keeps_the_model_on_error():
    from speechlm.finetune.recipe import change_mode

    model, _ = build_speechlm(tiny_spec(mode="frozen"))
    with pytest.raises(ConfigError, match="lora_scope='audio' gates LoRA"):
        change_mode(model, "full", {}, "audio", train_audio_encoder=False)
    assert (model.config.mode, model.config.lora_scope, model.lora_gate) == ("frozen", "all", None)
    change_mode(model, "lora", {"r": 4}, "audio", train_audio_encoder=False)
    assert model.lora_gate is not None and model.lora_gate.scope == "audio"
    assert model.config.lora_config == {"r": 4, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def test_the_gate_follows_the_training_batch_cut_by_ctc_compression():
    model, tokenizer = gated_model(projector={**TINY_PROJECTOR, "compression": "ctc"})
    model.audio_compressor.set_alignment(torch.zeros(model.config.text_config.hidden_size), torch.arange(3, 40), 1.0)
    model.train()
    inputs = audio_inputs(model, tokenizer, [80])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.audio_token_id, -100)
    model(**inputs, labels=labels).loss.backward()
    assert model.lora_gate.positions.shape[1] < inputs["input_ids"].shape[1]  # frames cut, and the gate with them
    assert any(p.grad.any() for n, p in model.language_model.named_parameters() if "lora_" in n)


def test_a_text_request_skips_lora_compute_at_inference(gated):
    model, tokenizer = gated
    lora_b = next(module for name, module in model.language_model.named_modules() if name.endswith("lora_B.default"))
    calls = []
    lora_b.register_forward_hook(lambda *args: calls.append(1))
    inputs = audio_and_text_rows(model, tokenizer)
    text_only = {"input_ids": inputs["input_ids"][1:], "attention_mask": inputs["attention_mask"][1:]}
    with torch.no_grad():
        with model.language_model.disable_adapter():
            base = model(**text_only).logits
        assert torch.equal(model(**text_only).logits, base) and not calls
        model(**inputs)
    assert calls  # switched back on for a row that hears audio


def test_skipping_lora_leaves_a_layer_switched_off_by_the_user_off(gated):
    from peft.tuners.lora import LoraLayer

    model, tokenizer = gated
    layers = [module for module in model.language_model.modules() if isinstance(module, LoraLayer)]
    layers[0].enable_adapters(False)
    text_only = {key: value[1:] for key, value in audio_and_text_rows(model, tokenizer).items()
                 if key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        model(**text_only)
    assert layers[0].disable_adapters and not any(layer.disable_adapters for layer in layers[1:])
