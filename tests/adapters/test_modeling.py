from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from speechlm.adapters.building import build_speechlm
from tests.adapters.conftest import audio_inputs
from tests.conftest import tiny_spec


def test_forward_backward_reaches_the_projector_and_new_rows(tiny):
    model, tokenizer = tiny
    model.train()
    inputs = audio_inputs(model, tokenizer, [40, 23])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    # training computes the head at labelled positions only
    assert out.logits.shape == (int((labels[:, 1:] != -100).sum()), model.config.vocab_size)
    out.loss.backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.speech_vocab.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in model.language_model.parameters())  # frozen backbone


def test_loss_counts_only_labelled_positions(tiny):
    model, tokenizer = tiny
    inputs = audio_inputs(model, tokenizer, [30])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -3:] = inputs["input_ids"][0, -3:]
    out = model.eval()(**inputs, labels=labels)
    logits = out.logits[0, -4:-1]  # positions predicting the last three tokens
    expected = torch.nn.functional.cross_entropy(logits, labels[0, -3:])
    torch.testing.assert_close(out.loss, expected)


def test_training_loss_at_labelled_positions_equals_the_full_logits_loss(tiny):
    model, tokenizer = tiny
    inputs = audio_inputs(model, tokenizer, [40, 23])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :5] = -100
    full = model.eval()(**inputs, labels=labels)
    full.loss.backward()
    full_grad = model.multi_modal_projector.linear_1.weight.grad.clone()
    model.zero_grad()
    labelled = model.train()(**inputs, labels=labels)
    labelled.loss.backward()
    torch.testing.assert_close(labelled.loss, full.loss)
    torch.testing.assert_close(model.multi_modal_projector.linear_1.weight.grad, full_grad)
    # and with the Trainer's token count for gradient accumulation (a sum over labelled tokens, divided)
    count = torch.tensor(int((labels[:, 1:] != -100).sum()) * 2)
    torch.testing.assert_close(model(**inputs, labels=labels, num_items_in_batch=count).loss,
                               model.eval()(**inputs, labels=labels, num_items_in_batch=count).loss)


def test_placeholder_count_mismatch_names_both_counts(tiny):
    model, tokenizer = tiny
    inputs = audio_inputs(model, tokenizer, [40])  # 40 mel -> 20 frames -> 10 placeholders
    inputs["input_ids"] = inputs["input_ids"][:, 1:]  # keep all placeholders, drop a text token: still fine
    model(**inputs | {"attention_mask": None})
    inputs["input_features_mask"][0, 30:] = 0  # now the clip yields 8 embeddings for 10 placeholders
    with pytest.raises(ValueError, match="10 <\\|audio\\|> placeholder tokens but the audio yields 8"):
        model(**inputs)


def test_placeholders_without_features_are_an_error(tiny):
    model, tokenizer = tiny
    inputs = audio_inputs(model, tokenizer, [40])
    with pytest.raises(ValueError, match="no input_features"):
        model(input_ids=inputs["input_ids"])


def test_out_of_vocabulary_ids_are_an_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=f"outside this model's vocabulary \\[0, {model.config.vocab_size}\\)"):
        model(input_ids=torch.tensor([[1, model.config.vocab_size]]))


def test_padded_audio_never_leaks_into_a_shorter_clip(tiny):
    model, tokenizer = tiny
    batch = audio_inputs(model, tokenizer, [27, 60], seed=1)
    alone = audio_inputs(model, tokenizer, [27], seed=1)
    with torch.no_grad():
        batched_logits = model(**batch).logits[0, : alone["input_ids"].shape[1]]
        alone_logits = model(**alone).logits[0]
    torch.testing.assert_close(batched_logits, alone_logits, rtol=1e-4, atol=1e-5)


def test_text_only_logits_are_bit_identical_to_the_base_model():
    spec = tiny_spec()
    model, tokenizer = build_speechlm(spec)
    torch.manual_seed(spec.seed)
    base = AutoModelForCausalLM.from_config(model.text_model.config).eval()
    base.load_state_dict(model.text_model.state_dict())
    ids = torch.tensor([tokenizer("The cat sat on the mat.").input_ids])
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        theirs = base(input_ids=ids).logits
    text_vocab = model.config.text_vocab_size
    assert torch.equal(ours[..., :text_vocab], theirs[..., :text_vocab])


def test_frozen_backbone_from_a_checkpoint_keeps_its_text_logits(llama_dir):
    model, tokenizer = build_speechlm(tiny_spec(text_model=llama_dir, text={}))
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ids = torch.tensor([tokenizer("Hello there, general.").input_ids])
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits[..., : model.config.text_vocab_size]
        assert torch.equal(ours, base(input_ids=ids).logits)


def test_other_backbone_family(qwen2_dir, tiny):
    model, tokenizer = build_speechlm(tiny_spec(text_model=qwen2_dir, text={}))
    assert model.text_model.config.model_type == "qwen2"
    inputs = audio_inputs(model.eval(), tokenizer, [33])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("with_audio", [False, True])
def test_generate_with_cache_equals_without(tiny, with_audio):
    model, tokenizer = tiny
    if with_audio:
        inputs = audio_inputs(model, tokenizer, [40, 26])
    else:
        encoded = tokenizer(["Say something", "Hi"], return_tensors="pt", padding=True, padding_side="left")
        inputs = dict(encoded)
    with_cache = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    without = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_audio_features_reach_only_the_first_generation_step(tiny):
    model, tokenizer = tiny
    inputs = audio_inputs(model, tokenizer, [40])
    seen = []
    model.audio_tower.register_forward_hook(lambda module, args, output: seen.append(args[0].shape))
    model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert len(seen) == 1


def test_speech_unit_tokens_are_single_ids(tiny):
    model, tokenizer = tiny
    config = model.config
    ids = tokenizer("<|speech_start|><|s_0|><|s_15|><|speech_end|>", add_special_tokens=False).input_ids
    assert ids == [config.speech_start_token_id, config.speech_unit_start_id, config.speech_unit_start_id + 15,
                   config.speech_end_token_id]


def test_distributed_training_gives_every_trainable_part_a_gradient(tiny, tmp_path):
    """ZeRO needs the same gradients from every rank in every step, audio in the batch or not."""
    import torch.distributed as dist

    model, tokenizer = tiny
    model.train()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ids = torch.tensor([tokenizer("text only").input_ids])
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        loss = out.loss.detach()
    finally:
        dist.destroy_process_group()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable)
    assert all(p.grad.abs().sum() == 0 for name, p in trainable if name.startswith("multi_modal_projector"))
    with torch.no_grad():  # and the zero added changed nothing
        model.eval()
        assert torch.equal(model(input_ids=ids, labels=ids).loss, loss)


def test_a_bfloat16_model_hears():
    # openai-whisper's LayerNorm computes in fp32 whatever the model's dtype; its weights stay fp32
    model, tokenizer = build_speechlm(tiny_spec(dtype="bfloat16"))
    with torch.no_grad():
        logits = model.eval()(**audio_inputs(model, tokenizer, [40, 23])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16


def test_a_model_cast_to_bfloat16_whole_hears():
    # .to(bfloat16) casts the encoder's layer norms too; a CPU refuses their fp32 input with bf16 weights
    model, tokenizer = build_speechlm(tiny_spec())
    model.to(torch.bfloat16)
    with torch.no_grad():
        logits = model.eval()(**audio_inputs(model, tokenizer, [40, 23])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_an_encoder_in_bfloat16_hears_close_to_float32_and_saves_with_the_model(tmp_path, monkeypatch):
    from speechlm.adapters import audio_encoder

    # the bfloat16 path, taken on a CPU without native bfloat16 too (there it is slow, not wrong; the job falls back)
    monkeypatch.setattr(audio_encoder, "native_bfloat16", lambda device_type: True)
    plain, tokenizer = build_speechlm(tiny_spec())
    fast, _ = build_speechlm(tiny_spec(audio_encoder_dtype="bfloat16"))  # the same seed: the same weights
    inputs = audio_inputs(plain, tokenizer, [40, 23])
    with torch.no_grad():
        ours, theirs = (model.eval().get_audio_features(inputs["input_features"], inputs["input_features_mask"])
                        for model in (fast, plain))
    assert ours.dtype == torch.float32 and not torch.equal(ours, theirs)
    assert torch.allclose(ours, theirs, atol=0.05, rtol=0.05)
    fast.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.audio_encoder_dtype == "bfloat16"


def test_an_encoder_in_bfloat16_runs_in_float32_where_the_device_lacks_it(monkeypatch, caplog):
    from speechlm.adapters import audio_encoder

    monkeypatch.setattr(audio_encoder, "native_bfloat16", lambda device_type: False)
    audio_encoder.warn_float32_fallback.cache_clear()  # it warns once a process
    plain, tokenizer = build_speechlm(tiny_spec())
    fast, _ = build_speechlm(tiny_spec(audio_encoder_dtype="bfloat16"))
    inputs = audio_inputs(plain, tokenizer, [40, 23])
    with torch.no_grad():
        ours, theirs = (model.eval().get_audio_features(inputs["input_features"], inputs["input_features_mask"])
                        for model in (fast, plain))
    assert torch.equal(ours, theirs)
    assert "no native bfloat16" in caplog.text


def test_a_bfloat16_reading_is_not_taken_for_a_float32_one(monkeypatch):
    from speechlm.adapters import audio_encoder
    from speechlm.adapters.reading_cache import ReadingCache

    monkeypatch.setattr(audio_encoder, "native_bfloat16", lambda device_type: True)  # as above

    plain, tokenizer = build_speechlm(tiny_spec())
    fast, _ = build_speechlm(tiny_spec(audio_encoder_dtype="bfloat16"))
    inputs = audio_inputs(plain, tokenizer, [40])
    plain.reading_cache = fast.reading_cache = ReadingCache()  # one cache handed between them
    with torch.no_grad():
        theirs = plain.eval().get_audio_features(inputs["input_features"], inputs["input_features_mask"])
        ours = fast.eval().get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    assert len(plain.reading_cache) == 2 and not torch.equal(ours, theirs)


def test_an_unknown_encoder_dtype_is_named():
    from speechlm.speech_io.config_errors import ConfigError

    with pytest.raises(ConfigError, match="audio_encoder_dtype='float16'"):
        tiny_spec(audio_encoder_dtype="float16")


def test_the_language_model_runs_in_bfloat16_inside_and_gets_its_own_tensors_back(monkeypatch):
    from speechlm.adapters import modeling

    monkeypatch.setattr(modeling, "native_bfloat16", lambda device_type: True)
    model, tokenizer = build_speechlm(tiny_spec(mode="lora"))
    model.eval()
    inputs = audio_inputs(model, tokenizer, [40, 23])
    lm_parameters = [*model.language_model.parameters(), *model.speech_vocab.parameters()]
    before = {id(p): (p.data_ptr(), p.data.clone()) for p in model.parameters()}
    buffers = [b.dtype for b in model.language_model.buffers()]
    with torch.no_grad():
        reference = model(**inputs).logits
        with model.language_model_in("bfloat16"):
            assert {p.dtype for p in lm_parameters} == {torch.bfloat16}
            assert any("lora_A" in name for name, p in model.language_model.named_parameters()
                       if p.dtype == torch.bfloat16)
            assert {p.dtype for p in model.audio_tower.parameters()} == {torch.float32}  # the audio side keeps its
            assert [b.dtype for b in model.language_model.buffers()] == buffers  # rotary frequencies too
            fast = model(**inputs).logits
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference, atol=0.05, rtol=0.05)
    for p in model.parameters():  # the very tensors, not a float32 copy of the rounded ones
        storage, values = before[id(p)]
        assert p.data_ptr() == storage and torch.equal(p.data, values)


def test_the_language_model_dtype_is_checked_and_kept_where_the_device_lacks_bfloat16(monkeypatch, caplog):
    from speechlm.adapters import audio_encoder, modeling

    model, _ = build_speechlm(tiny_spec())
    with pytest.raises(ValueError, match="'int8'.*expected a floating torch dtype"):
        with model.language_model_in("int8"):
            pass
    monkeypatch.setattr(modeling, "native_bfloat16", lambda device_type: False)
    audio_encoder.warn_float32_fallback.cache_clear()
    with model.language_model_in(torch.bfloat16):
        assert {p.dtype for p in model.language_model.parameters()} == {torch.float32}
    assert "no native bfloat16" in caplog.text
