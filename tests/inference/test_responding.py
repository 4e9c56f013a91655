from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transformers import StoppingCriteria

from speechlm.responding import (
    AudioChunk,
    TextDelta,
    generate_response_tokens,
    respond,
    stream_response,
)
from tests.inference.conftest import SAMPLE


def layout(processor, row: list[int]) -> str:
    """A response as a string of T (text), [ (start), u (unit), ] (end), E (eos)."""
    names = {processor.speech_start_token_id: "[", processor.speech_end_token_id: "]",
             processor.tokenizer.eos_token_id: "E", processor.tokenizer.pad_token_id: ""}
    unit0 = processor.speech_unit_start_id
    return "".join(names.get(t, "u" if unit0 <= t < unit0 + processor.num_speech_units else "T") for t in row)


@pytest.mark.parametrize("output", ["text", "speech", "text+speech"])
def test_every_mode_is_well_formed_even_when_sampling(speaking, output):
    model, processor = speaking
    inputs = processor([[{"role": "user", "content": "hello"}], [{"role": "user", "content": "a longer prompt"}]])
    torch.manual_seed(0)
    rows = generate_response_tokens(model, processor, inputs, output=output, max_new_tokens=6, max_speech_units=12,
                                    do_sample=True, top_k=4)
    for row in rows.tolist():
        shape = layout(processor, row)
        if output == "text":
            assert set(shape) <= {"T", "E"}
        elif output == "speech":
            assert shape.startswith("[") and "T" not in shape
        if output != "text":
            spans = shape.rstrip("E").split("[")
            assert len(spans) == 2 and len(spans[0]) <= 6 and set(spans[0]) <= {"T"}
            body = spans[1]
            assert set(body.rstrip("]")) <= {"u"} and 1 <= body.count("u") <= 12
            assert body.endswith("]") and shape.endswith("]E")


def test_replies_carry_text_units_and_their_audio(speaking):
    model, processor = speaking
    text_reply = respond(model, processor, audio=str(SAMPLE), text="What?", output="text", max_new_tokens=5)
    assert text_reply.audio is None and text_reply.units == [] and isinstance(text_reply.text, str)
    spoken = respond(model, processor, text="Say hi", output="speech", max_speech_units=15)
    assert spoken.text == "" and 1 <= len(spoken.units) <= 15
    assert spoken.audio.dtype == np.float32 and spoken.audio.shape == (len(spoken.units) * 320,)
    np.testing.assert_array_equal(spoken.audio, processor.codec.decode(spoken.units))
    batch = respond(model, processor, [[{"role": "user", "content": "Say hi"}]] * 2, output="speech",
                    max_speech_units=15)
    assert [r.units for r in batch] == [spoken.units] * 2


def test_speech_needs_a_codec_and_a_known_mode(speaking):
    model, processor = speaking
    with pytest.raises(ValueError, match="output='voice'"):
        respond(model, processor, text="hi", output="voice")
    saved, processor._codec, processor.codec_name_or_path = (processor._codec, processor.codec_name_or_path), None, None
    try:
        with pytest.raises(ValueError, match="needs a codec"):
            respond(model, processor, text="hi", output="speech")
    finally:
        processor._codec, processor.codec_name_or_path = saved


class _HoldUntil(StoppingCriteria):
    """Counts generation steps; at step ``hold_at`` waits (bounded) for the consumer to see audio."""

    def __init__(self, hold_at: int, seen: threading.Event):
        self.steps, self.hold_at, self.seen = 0, hold_at, seen

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        if self.steps == self.hold_at:
            self.seen.wait(timeout=60)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_first_audio_arrives_while_the_model_is_still_speaking(speaking):
    model, processor = speaking
    seen = threading.Event()
    steps = _HoldUntil(hold_at=60, seen=seen)
    events, steps_at_first_audio = [], None
    for event in stream_response(model, processor, text="Say hi", output="text+speech", max_new_tokens=4,
                                 max_speech_units=120, stopping_criteria=[steps]):
        if isinstance(event, AudioChunk) and steps_at_first_audio is None:
            steps_at_first_audio = steps.steps
            seen.set()
        events.append(event)
    assert steps_at_first_audio is not None and steps_at_first_audio < steps.steps
    chunks = [e.array for e in events if isinstance(e, AudioChunk)]
    assert all(c.dtype == np.float32 for c in chunks) and len(chunks) > 2
    # The streamed speech is the whole response's speech, decoded in one go, to float rounding.
    whole = respond(model, processor, text="Say hi", output="text+speech", max_new_tokens=4, max_speech_units=120)
    streamed = np.concatenate(chunks)
    assert streamed.shape == whole.audio.shape
    snr = 10 * np.log10(np.sum(whole.audio**2) / max(np.sum((streamed - whole.audio) ** 2), 1e-30))
    assert snr > 60
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == whole.text


def test_streamed_text_is_the_whole_text(speaking):
    model, processor = speaking
    events = list(stream_response(model, processor, text="Hello there", output="text", max_new_tokens=12))
    assert all(isinstance(e, TextDelta) for e in events)
    whole = respond(model, processor, text="Hello there", output="text", max_new_tokens=12)
    assert "".join(e.text for e in events) == whole.text


def test_a_stream_cannot_fall_back_to_the_transcript(speaking):
    model, processor = speaking
    with pytest.raises(ValueError, match="transcript_fallback judges a whole transcription"):
        next(stream_response(model, processor, text="hi", output="text", transcript_fallback=0.5))


def test_an_error_in_generation_reaches_the_consumer_and_the_worker_ends(speaking):
    model, processor = speaking

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("boom at step")

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="boom at step"):
        list(stream_response(model, processor, text="hi", output="speech", max_speech_units=20,
                             stopping_criteria=[Boom()]))
    assert threading.active_count() == before


def test_closing_the_stream_early_stops_generation(speaking):
    model, processor = speaking
    before = threading.active_count()
    stream = stream_response(model, processor, text="hi", output="speech", max_speech_units=2000)
    first = next(e for e in stream if isinstance(e, AudioChunk))
    stream.close()
    assert first.array.size and threading.active_count() == before


def test_a_model_that_knows_its_speaking_rate_speaks_as_long_as_its_text(speaking):
    model, processor = speaking
    model.config.speech_units_per_character = 1.0
    try:
        texts = ["hello there", "a much longer sentence to be read aloud"]
        inputs = processor([[{"role": "user", "content": f"Say: {text}"}] for text in texts])
        rows = generate_response_tokens(model, processor, inputs, output="speech", max_speech_units=200,
                                        spoken_text=texts, do_sample=True, top_k=4)
        for text, row in zip(texts, rows, strict=True):
            assert 0.75 * len(text) - 1 <= len(processor.parse_response(row).units) <= 1.25 * len(text) + 1
        # chain-of-modality: the span is as long as the text the response generated first
        rows = generate_response_tokens(model, processor, inputs, output="text+speech", max_new_tokens=6,
                                        max_speech_units=200, do_sample=True, top_k=4)
        for row in rows:
            reply = processor.parse_response(row)
            expected = int(processor.token_characters()[[t for t in row.tolist() if t < processor.text_vocab_size
                                                         and t != processor.tokenizer.eos_token_id]].sum())
            if expected:
                assert 0.75 * expected - 1 <= len(reply.units) <= 1.25 * expected + 1, (reply.text, expected)
    finally:
        model.config.speech_units_per_character = None


def test_token_characters_are_what_each_token_decodes_to(speaking):
    _, processor = speaking
    characters = processor.token_characters()
    assert characters.shape == (processor.text_vocab_size,)
    ids = processor.tokenizer("hello there", add_special_tokens=False).input_ids
    assert int(characters[ids].sum()) == len(processor.tokenizer.decode(ids))
    assert int(characters[processor.tokenizer.eos_token_id]) == 0
