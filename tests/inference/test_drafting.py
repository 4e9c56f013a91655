"""Transcriptions checked against the reader's transcript in one pass (`speechlm.drafting`) write what greedy
decoding step by step writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

import speechlm.responding as responding
from speechlm.adapters.building import build_processor, build_speechlm
from speechlm.drafting import accepted_drafts, drafts_apply
from speechlm.responding import eos_token_ids, generation_settings, respond
from speechlm.speech_io.processor import padding_token_id
from tests.adapters.test_readers import reader_spec


@pytest.fixture(scope="module")
def reading():
    model, tokenizer = build_speechlm(reader_spec())
    return model.eval(), build_processor(tokenizer, model.config)


def transcription_requests(lengths=(14000, 23000, 9000, 17000), seed=2):
    rng = np.random.default_rng(seed)
    return [[{"role": "user", "content": [
        {"type": "audio", "audio": (rng.standard_normal(samples) * 0.1).astype(np.float32), "sampling_rate": 16000},
        {"type": "text", "text": "Transcribe the audio."}]}] for samples in lengths]


def step_by_step(monkeypatch, function):
    with monkeypatch.context() as patched:
        patched.setattr(responding, "drafts_apply", lambda *args: False)
        return function()


@pytest.mark.parametrize("follow, refused", [(1e4, ()), (1e4, (1, 3)), (0.8, (0,)), (1e-3, ())])
def test_drafted_transcriptions_equal_step_by_step_ones(reading, monkeypatch, follow, refused):
    """The tiny random LM follows every transcript or none (its scores are nearly flat), so rows whose drafts are
    refused are also forced: they are decoded step by step in a batch of their own, and must come out the same."""
    model, processor = reading
    conversations = transcription_requests()
    checked = []
    real_check = responding.accepted_drafts

    def check(*args):
        checked.append([ok and row not in refused for row, ok in enumerate(real_check(*args))])
        return checked[-1]

    monkeypatch.setattr(responding, "accepted_drafts", check)

    def replies():
        return respond(model, processor, conversations, max_new_tokens=12, follow_transcript=follow)

    drafted = replies()
    plain = step_by_step(monkeypatch, replies)
    assert [r.text for r in drafted] == [r.text for r in plain]
    assert [r.units for r in drafted] == [r.units for r in plain]
    assert len(checked) == 1  # the drafts were checked once
    if follow > 1:
        assert checked[0] == [row not in refused for row in range(len(conversations))]  # verbatim but where refused
    if follow < 0.5:
        assert not any(checked[0])  # the LM's own text: every row decoded step by step


def test_a_draft_is_accepted_exactly_where_greedy_decoding_writes_it(reading):
    model, processor = reading
    inputs = processor(transcription_requests())
    prompt_length = inputs["input_ids"].shape[1]
    settings = generation_settings(model, processor, prompt_length, max_new_tokens=8, do_sample=False)
    with torch.inference_mode():
        greedy = model.generate(**inputs, **settings)[:, prompt_length:].tolist()
    eos, pad = eos_token_ids(model, processor)[0], padding_token_id(processor.tokenizer)
    drafts = [row[: row.index(eos) + 1] if eos in row else row for row in greedy]
    assert accepted_drafts(model, inputs, drafts, settings["logits_processor"], pad) == [True] * len(drafts)
    changed = [list(draft) for draft in drafts]
    changed[1][len(changed[1]) // 2] = (changed[1][len(changed[1]) // 2] + 1) % 100  # one other token
    assert accepted_drafts(model, inputs, changed, settings["logits_processor"], pad) == [True, False, True, True]


def test_only_plain_greedy_decoding_is_drafted():
    plain = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert drafts_apply(plain, {"do_sample": False})
    assert not drafts_apply(plain, {"do_sample": True, "temperature": 0.7})
    assert not drafts_apply(plain, {"num_beams": 4})
    assert not drafts_apply(plain, {"do_sample": False, "repetition_penalty": 1.2})
    assert not drafts_apply(GenerationConfig(eos_token_id=2, repetition_penalty=1.3), {"do_sample": False})
    assert not drafts_apply(GenerationConfig(eos_token_id=2, do_sample=True), {})


def test_a_refused_row_of_text_alone_decodes_without_the_batchs_clips(reading, monkeypatch):
    model, processor = reading
    conversations = [*transcription_requests(lengths=(14000, 9000)),
                     [{"role": "user", "content": "Transcribe the audio."}]]  # no clip: an empty transcript
    real_check = responding.accepted_drafts
    monkeypatch.setattr(responding, "accepted_drafts", lambda *args: [ok and row != 2 for row, ok in
                                                                     enumerate(real_check(*args))])

    def replies():
        return [r.text for r in respond(model, processor, conversations, max_new_tokens=12, follow_transcript=1e4)]

    assert replies() == step_by_step(monkeypatch, replies)


def test_a_callers_own_logits_processor_decodes_step_by_step(reading, monkeypatch):
    from transformers import LogitsProcessor, LogitsProcessorList

    class Counting(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            Counting.calls += 1
            return scores

    model, processor = reading
    checked = []
    monkeypatch.setattr(responding, "accepted_drafts", lambda *args: checked.append(args) or [True] * len(args[2]))
    respond(model, processor, transcription_requests(), max_new_tokens=6, follow_transcript=1e4,
            logits_processor=LogitsProcessorList([Counting()]))
    assert not checked and Counting.calls >= 1  # generate ran it, a step a token


def test_a_draft_stops_at_the_first_end_of_turn_id():
    from speechlm.responding import _before_any

    assert _before_any([5, 6, 7, 2, 8], ends=[9, 2]) == [5, 6, 7]
    assert _before_any([5, 6], ends=[2]) == [5, 6]
