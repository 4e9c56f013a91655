"""A model whose codec has a speech decoder: the LM writes, the decoder speaks, in every way a response is made."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

from speechlm.responding import (
    AudioChunk,
    TextDelta,
    generate_response_tokens,
    respond,
    speaking_decoder,
    spoken_token_stream,
    stream_response,
)
from tests.inference.conftest import add_tiny_speech_decoder

PROMPT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def decoding(speaking_dir, tmp_path_factory):
    """`speaking_dir` with a tiny speech decoder saved in its codec's folder, loaded back."""
    directory = tmp_path_factory.mktemp("decoding") / "model"
    shutil.copytree(speaking_dir, directory)
    add_tiny_speech_decoder(directory)
    return AutoModelForCausalLM.from_pretrained(directory), AutoProcessor.from_pretrained(directory)


def test_the_lm_writes_and_the_decoder_speaks(decoding):
    model, processor = decoding
    decoder = processor.codec.speech_decoder
    assert decoder is not None and speaking_decoder(processor, "speech") is decoder
    written = respond(model, processor, PROMPT, output="text", max_new_tokens=12)
    both = respond(model, processor, PROMPT, output="text+speech", max_new_tokens=12)
    assert both.text == written.text
    assert both.units == decoder.speak(written.text)[:750]
    np.testing.assert_array_equal(both.audio, processor.codec.decode(both.units))
    spoken = respond(model, processor, PROMPT, output="speech", max_new_tokens=12)
    assert spoken.text == "" and spoken.units == both.units
    short = respond(model, processor, PROMPT, output="speech", max_new_tokens=12, max_speech_units=5)
    assert short.units == both.units[:5]


def test_the_lm_still_speaks_when_asked(decoding, speaking):
    model, processor = decoding
    by_lm = respond(model, processor, PROMPT, output="speech", max_speech_units=10, speech_by="lm")
    plain_model, plain = speaking  # the same weights, a codec without a speech decoder
    assert by_lm.units == respond(plain_model, plain, PROMPT, output="speech", max_speech_units=10).units
    with pytest.raises(ValueError, match="speech_by='decoder': this model's codec has no speech decoder"):
        respond(plain_model, plain, PROMPT, output="speech", speech_by="decoder")
    with pytest.raises(ValueError, match="speech_by='loud'"):
        respond(model, processor, PROMPT, output="speech", speech_by="loud")


def test_a_tts_request_speaks_its_text_without_the_lm(decoding, monkeypatch):
    model, processor = decoding
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("a TTS request ran the LM"))
    texts = ["the cat sat. on the mat", "hi"]
    rows = generate_response_tokens(model, processor, processor([PROMPT, PROMPT]), output="speech",
                                    spoken_text=texts)
    replies = [processor.parse_response(row) for row in rows]
    assert [r.units for r in replies] == [processor.codec.speech_decoder.speak(t) for t in texts]
    assert [r.text for r in replies] == ["", ""]


def test_each_sentence_is_spoken_as_soon_as_it_ends(decoding):
    model, processor = decoding
    decoder = processor.codec.speech_decoder
    text = "the cat sat. did it? yes"
    tokens = processor.tokenizer(text, add_special_tokens=False).input_ids
    eos = processor.tokenizer.eos_token_id
    out = list(spoken_token_stream(processor, decoder, [*tokens, eos, eos], "text+speech"))
    assert out[-1] == eos and out.count(eos) == 1  # the LM's EOS ends it; what follows is padding
    starts = [i for i, t in enumerate(out) if t == processor.speech_start_token_id]
    assert len(starts) == 3
    # the first span comes once the text after "sat." begins: before the rest of the text
    text_before = [t for t in out[: starts[0]] if t < processor.text_vocab_size]
    assert processor.tokenizer.decode(text_before).startswith("the cat sat.")
    assert len(text_before) < len(tokens)
    assert processor.parse_response(out).units == decoder.speak(text)
    assert processor.parse_response(out).text == text
    spoken_only = list(spoken_token_stream(processor, decoder, tokens, "speech", max_speech_units=7))
    assert processor.parse_response(spoken_only).units == decoder.speak(text)[:7]
    assert processor.parse_response(spoken_only).text == ""  # and no EOS: the LM did not end


def test_the_stream_speaks_what_the_whole_response_speaks(decoding, monkeypatch):
    model, processor = decoding
    # sentences: the whole response decodes each span on its own, as the stream does
    written = "the cat sat. did it? yes"
    ids = processor.tokenizer(written, add_special_tokens=False).input_ids + [processor.tokenizer.eos_token_id]
    monkeypatch.setattr(model, "generate", lambda **kwargs: writing(kwargs, ids))
    whole = respond(model, processor, PROMPT, output="text+speech")
    assert whole.text == written and whole.units == processor.codec.speech_decoder.speak(written)
    events = list(stream_response(model, processor, PROMPT, output="text+speech"))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == whole.text
    audio = np.concatenate([e.array for e in events if isinstance(e, AudioChunk)])
    np.testing.assert_allclose(audio, whole.audio, atol=1e-5)
    assert isinstance(events[-1], AudioChunk) and any(isinstance(e, TextDelta) for e in events[events.index(
        next(e for e in events if isinstance(e, AudioChunk))):])  # the first sentence is heard before the text ends


def writing(kwargs, ids: list[int]) -> torch.Tensor:
    """``generate`` writing ``ids`` after each prompt: handed to its streamer one at a time, if it has one."""
    prompts = kwargs["input_ids"]
    if (streamer := kwargs.get("streamer")) is not None:
        streamer.put(prompts)
        for token in ids:
            streamer.put(torch.tensor([token]))
        streamer.end()
    return torch.cat([prompts, torch.tensor([ids] * len(prompts))], dim=1)


def test_the_pipeline_speaks_through_the_decoder(decoding):
    model, processor = decoding
    speak = pipeline("speechlm", model=model, processor=processor)
    out = speak(PROMPT, output="speech", max_new_tokens=12)
    reply = respond(model, processor, PROMPT, output="speech", max_new_tokens=12)
    np.testing.assert_array_equal(out["audio"]["array"], reply.audio)
    by_lm = speak(PROMPT, output="speech", max_speech_units=6, speech_by="lm")
    assert len(by_lm["audio"]["array"]) <= 6 * 320
