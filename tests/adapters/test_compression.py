from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from speechlm.adapters.building import build_speechlm
from speechlm.adapters.compression import CTCCompressor
from speechlm.adapters.configuration import SpeechLMProjectorConfig
from speechlm.adapters.modeling import drop_masked_positions
from speechlm.speech_io.config_errors import ConfigError
from tests.adapters.conftest import audio_inputs
from tests.conftest import TINY_PROJECTOR, tiny_spec

VOCABULARY = torch.arange(3, 40)  # the tokens a CTC pre-alignment's transcripts would have used


@pytest.fixture
def compressed():
    """A tiny SpeechLM with CTC compression, aligned by hand: a zero blank keeps about half the frames."""
    model, tokenizer = build_speechlm(tiny_spec(projector={**TINY_PROJECTOR, "compression": "ctc"}))
    model.audio_compressor.set_alignment(torch.zeros(model.config.text_config.hidden_size), VOCABULARY, 1.0)
    return model.eval(), tokenizer


def test_keeps_one_frame_per_emitted_token_as_a_mix_of_token_embeddings():
    embeddings = torch.eye(4)  # tokens 0..3; the CTC vocabulary is tokens 1 and 2
    compressor = CTCCompressor(hidden_size=4, text_vocab_size=4)
    compressor.set_alignment(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([1, 2]), scale=0.5)
    a, b, blank = (torch.tensor(v) for v in ([0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]))
    #                       a  a(repeat) blank  a(new)  b  padding(looks like b)
    frames = torch.stack([a, a, blank, a, b, b])[None]
    valid = torch.tensor([[True, True, True, True, True, False]])
    mixed, kept = compressor(frames, valid, embeddings)
    assert kept.tolist() == [[True, False, False, True, True, False]]
    # scores are frames @ E.T / scale over tokens 1 and 2: a -> softmax([2, 0]) of rows 1 and 2
    weight = torch.tensor([2.0, 0.0]).softmax(-1)
    torch.testing.assert_close(mixed[0, 0], weight[0] * embeddings[1] + weight[1] * embeddings[2])
    torch.testing.assert_close(mixed[0, 4], weight[1] * embeddings[1] + weight[0] * embeddings[2])
    assert not mixed[0, ~kept[0]].any()


def test_before_the_alignment_every_frame_passes_as_without_compression():
    model, tokenizer = build_speechlm(tiny_spec(projector={**TINY_PROJECTOR, "compression": "ctc"}))
    plain, _ = build_speechlm(tiny_spec())  # same seed, same weights: the compressor draws nothing
    inputs = audio_inputs(model, tokenizer, [40, 23])
    real = inputs["attention_mask"].bool()  # padding positions take other position ids, and no one reads them
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits[real], plain.eval()(**inputs).logits[real])
    with pytest.raises(ValueError, match="token id 999, outside the text vocabulary of 259"):
        model.audio_compressor.set_alignment(torch.zeros(64), torch.tensor([5, 999]), 1.0)


def test_bad_compression_is_named():
    with pytest.raises(ConfigError, match="projector_config.compression='zip': choose one of"):
        SpeechLMProjectorConfig(compression="zip")


def _without_dropped_frames(model, inputs):
    """The same rows with the dropped placeholders taken out (left-padded): what the masking stands for."""
    embeds, mask = model.embed_inputs(**inputs)
    rows = [(embeds[i][mask[i].bool()], mask[i][mask[i].bool()]) for i in range(len(embeds))]
    width = max(len(row) for row, _ in rows)
    padded = torch.stack([torch.cat([torch.zeros(width - len(row), row.shape[1]), row]) for row, _ in rows])
    attention = torch.stack([torch.cat([torch.zeros(width - len(m), dtype=m.dtype), m]) for _, m in rows])
    return padded, attention, mask


def test_dropped_frames_are_skipped_as_if_removed(compressed):
    model, tokenizer = compressed
    inputs = audio_inputs(model, tokenizer, [40, 23])
    embeds, attention, mask = _without_dropped_frames(model, inputs)
    placeholders = inputs["input_ids"] == model.config.audio_token_id
    assert 0 < int(mask[placeholders].sum()) < int(placeholders.sum())  # some frames kept, some dropped
    with torch.no_grad():
        masked = model(**inputs).logits
        removed = model(inputs_embeds=embeds, attention_mask=attention,
                        position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits
    for row in range(2):
        torch.testing.assert_close(masked[row][mask[row].bool()], removed[row][attention[row].bool()])


def test_generate_keeps_the_prompt_layout_and_skips_dropped_frames(compressed):
    model, tokenizer = compressed
    inputs = audio_inputs(model, tokenizer, [40, 23])
    # left padding, as the processor makes prompts
    inputs["input_ids"] = torch.stack([row.roll(int((m == 0).sum())) for row, m in
                                       zip(inputs["input_ids"], inputs["attention_mask"], strict=True)])
    inputs["attention_mask"] = torch.stack([m.roll(int((m == 0).sum())) for m in inputs["attention_mask"]])
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(output[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    embeds, attention, _ = _without_dropped_frames(model, inputs)
    reference = model.generate(inputs_embeds=embeds, attention_mask=attention, max_new_tokens=6, do_sample=False)
    assert torch.equal(output[:, inputs["input_ids"].shape[1]:], reference)


def test_a_model_that_names_its_sources_saves_the_compressor_with_what_trained(llama_dir, whisper_pt, tmp_path):
    model, tokenizer = build_speechlm(tiny_spec(text_model=llama_dir, text={}, audio_encoder=whisper_pt, audio={},
                                                projector={**TINY_PROJECTOR, "compression": "ctc"}))
    model.audio_compressor.set_alignment(torch.zeros(model.config.text_config.hidden_size), VOCABULARY, 1.0)
    with torch.no_grad():
        model.audio_compressor.end_marker.normal_()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert {key.split(".")[0] for key in load_file(tmp_path / "model.safetensors")} == {
        "multi_modal_projector", "speech_vocab", "audio_compressor"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    inputs = audio_inputs(model, tokenizer, [40, 22])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model.eval()(**inputs).logits)


def test_the_alignment_saves_and_reloads(compressed, tmp_path):
    model, tokenizer = compressed
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.projector_config.compression == "ctc"
    assert torch.equal(loaded.audio_compressor.vocabulary_mask, model.audio_compressor.vocabulary_mask)
    inputs = audio_inputs(model, tokenizer, [40, 22])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_the_lm_stage_trains_the_compressor_and_leaves_the_aligned_projector(compressed):
    model, tokenizer = compressed
    compressor = model.audio_compressor
    assert not compressor.residual.weight.any() and not compressor.end_marker.any()  # a new model adds nothing
    inputs = audio_inputs(model, tokenizer, [40, 23])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.train()(**inputs, labels=labels).loss.backward()
    assert model.audio_compressor.end_marker.grad.abs().sum() > 0
    assert model.audio_compressor.residual.weight.grad.abs().sum() > 0
    assert all(param.grad is None for param in model.multi_modal_projector.parameters())
    assert not any(buffer.requires_grad for buffer in model.audio_compressor.buffers())


def test_the_training_loss_skips_the_dropped_frames_without_changing(compressed):
    """Training cuts the dropped frames out of the batch (no LM compute on them): the same loss and
    gradients as running the LM over the masked sequence."""
    model, tokenizer = compressed
    model.train()
    inputs = audio_inputs(model, tokenizer, [40, 23], text="hello")
    ids = inputs["input_ids"]
    # the text after each clip is the answer, all but its first token (a prompt token follows the audio)
    after_audio = (ids == model.config.audio_token_id).long().cumsum(-1).bool()
    after_audio[:, 1:] &= ids[:, :-1] != model.config.audio_token_id
    labels = ids.masked_fill(~after_audio | (ids == model.config.audio_token_id) | (inputs["attention_mask"] == 0),
                             -100)
    with torch.no_grad():
        model.audio_compressor.end_marker.normal_()

    def loss_and_grad(**kwargs):
        model.zero_grad()
        loss = model(**kwargs, labels=labels).loss
        loss.backward()
        return loss.detach(), model.audio_compressor.end_marker.grad.clone()

    lengths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    cut, cut_grad = loss_and_grad(**inputs)
    hook.remove()
    assert lengths[0] < ids.shape[1]  # the LM ran on a shorter batch
    embeds, attention = model.embed_inputs(**inputs)
    masked, masked_grad = loss_and_grad(inputs_embeds=embeds, attention_mask=attention,
                                        position_ids=(attention.cumsum(-1) - 1).clamp(min=0))
    torch.testing.assert_close(cut, masked)
    torch.testing.assert_close(cut_grad, masked_grad)


def test_drop_masked_positions_moves_attended_positions_to_the_front():
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]])
    labels = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    values = torch.arange(10.0).view(2, 5, 1).expand(2, 5, 3)
    new_mask, new_labels, (new_values,) = drop_masked_positions(mask, labels, values)
    assert new_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert new_labels.tolist() == [[10, 12, 13], [21, -100, -100]]
    assert new_values.shape == (2, 3, 3)
    assert new_values[0, :, 0].tolist() == [0.0, 2.0, 3.0] and new_values[1, 0, 0] == 6.0


def test_the_end_marker_lands_on_each_clips_last_kept_frame():
    compressor = CTCCompressor(hidden_size=2, text_vocab_size=2)
    compressor.set_alignment(torch.tensor([0.0, 0.0]), torch.tensor([0, 1]), scale=1.0)
    with torch.no_grad():
        compressor.end_marker.fill_(10.0)
    token, blank = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -1.0])
    frames = torch.stack([torch.stack([token, blank, token.flip(0), blank]),
                          torch.stack([blank, blank, blank, blank])])
    mixed, kept = compressor(frames, torch.ones(2, 4, dtype=torch.bool), torch.eye(2))
    assert kept.tolist() == [[True, False, True, False], [False] * 4]
    assert mixed[0, 0].max() < 1 and mixed[0, 2].min() > 10  # only the last kept frame carries the marker
    assert not mixed[1].any()


def test_a_bfloat16_model_compresses_in_bfloat16():
    model, tokenizer = build_speechlm(tiny_spec(projector={**TINY_PROJECTOR, "compression": "ctc"}, dtype="bfloat16"))
    model.audio_compressor.set_alignment(torch.zeros(model.config.text_config.hidden_size), VOCABULARY, 1.0)
    assert model.audio_compressor.residual.weight.dtype == torch.bfloat16
    assert model.audio_compressor.vocabulary_mask.dtype == torch.bool
    with torch.no_grad():
        assert model.eval()(**audio_inputs(model, tokenizer, [40, 23])).logits.dtype == torch.bfloat16
