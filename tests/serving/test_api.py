"""The server through the official `openai` client: answers as `speechlm.respond` gives them, streamed as
they decode, and refusals in OpenAI's shape that name the field at fault."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from speechlm.pipeline import model_lock
from speechlm.responding import respond
from speechlm.serving import ServeSettings, start_server
from speechlm.speech_io.whisper_units import WhisperUnitCodec, WhisperUnitConfig
from tests.serving.conftest import API_KEY, MODEL_NAME, wav_base64


def audio_question(sample_wav: str, text: str = "What did you hear?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": sample_wav, "format": "wav"}},
                                         {"type": "text", "text": text}]}]


def as_processor_conversation(sample_wav: str, text: str = "What did you hear?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": base64.b64decode(sample_wav)},
                                         {"type": "text", "text": text}]}]


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).owned_by == "speechlm"


def test_text_answer_is_what_respond_gives(client, speaking, sample_wav):
    answer = client.chat.completions.create(model=MODEL_NAME, messages=audio_question(sample_wav), max_tokens=8)
    expected = respond(*speaking, as_processor_conversation(sample_wav), output="text", max_new_tokens=8)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].message.audio is None
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 10 and 1 <= answer.usage.completion_tokens <= 8


def test_audio_answer_is_a_16khz_wav_of_the_spoken_units(client, speaking, sample_wav):
    answer = client.chat.completions.create(model=MODEL_NAME, messages=audio_question(sample_wav),
                                            modalities=["text", "audio"], audio={"format": "wav", "voice": "alloy"},
                                            max_completion_tokens=6, extra_body={"max_speech_units": 30})
    message = answer.choices[0].message
    expected = respond(*speaking, as_processor_conversation(sample_wav), output="text+speech", max_new_tokens=6,
                       max_speech_units=30)
    assert message.content is None and message.audio.transcript == expected.text
    audio, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == 16000 and audio.shape == (len(expected.units) * 320,)
    np.testing.assert_allclose(audio, expected.audio, atol=2 / 32768)
    assert answer.usage.completion_tokens_details.audio_tokens == len(expected.units)
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > time.time()


def test_streamed_answer_arrives_in_text_and_audio_deltas(client, speaking, sample_wav):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=audio_question(sample_wav),
                                            modalities=["text", "audio"], audio={"format": "pcm16", "voice": "alloy"},
                                            max_tokens=6, stream=True, stream_options={"include_usage": True},
                                            extra_body={"max_speech_units": 40})
    transcript, pcm, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            audio = choice.delta.audio  # a dict-like model: OpenAI's stream types leave it open
            if audio is not None:
                audio = audio if isinstance(audio, dict) else audio.model_dump()
                transcript += [audio["transcript"]] if audio.get("transcript") else []
                pcm += [base64.b64decode(audio["data"])] if audio.get("data") else []
            finish = choice.finish_reason or finish
    expected = respond(*speaking, as_processor_conversation(sample_wav), output="text+speech", max_new_tokens=6,
                       max_speech_units=40)
    assert "".join(transcript) == expected.text
    assert len(pcm) >= 2, "the speech should arrive in several deltas while it decodes"
    speech = np.frombuffer(b"".join(pcm), dtype="<i2").astype(np.float32) / 32767
    np.testing.assert_allclose(speech, expected.audio, atol=2 / 32768)
    assert finish in ("stop", "length") and usage.completion_tokens_details.audio_tokens == len(expected.units)


def test_text_stream_ends_with_done(server, sample_wav):
    body = {"model": MODEL_NAME, "messages": audio_question(sample_wav), "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in events)
    assert '"finish_reason": null' in events[0] and '"role": "assistant"' in events[0]


def test_an_answer_can_be_sent_back_by_its_audio_id(client, sample_wav):
    first = client.chat.completions.create(model=MODEL_NAME, messages=audio_question(sample_wav), max_tokens=4,
                                           modalities=["text", "audio"], audio={"format": "wav", "voice": "x"},
                                           extra_body={"max_speech_units": 10})
    follow_up = [*audio_question(sample_wav), {"role": "assistant", "audio": {"id": first.choices[0].message.audio.id}},
                 {"role": "user", "content": "And then?"}]
    assert client.chat.completions.create(model=MODEL_NAME, messages=follow_up, max_tokens=4).choices[0].message


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(server, client, speaking, sample_wav):
    questions = [f"Question number {i}?" for i in range(4)]
    model, processor = speaking
    scheduler = server.server.config.app.state.scheduler

    def ask(question: str):
        return pool.submit(client.chat.completions.create, model=MODEL_NAME, max_tokens=6,
                           messages=audio_question(sample_wav, question))

    with ThreadPoolExecutor(4) as pool:
        with model_lock(model):  # the worker takes the first request and waits for the model; three more queue
            futures = [ask(questions[0])]
            wait_until(lambda: scheduler.running == 1)
            futures += [ask(question) for question in questions[1:]]
            wait_until(lambda: scheduler.waiting == 3)
        answers = [future.result().choices[0].message.content for future in futures]
    assert list(scheduler.batch_sizes)[-2:] == [1, 3]
    for question, answer in zip(questions, answers, strict=True):
        assert answer == respond(model, processor, as_processor_conversation(sample_wav, question),
                                 max_new_tokens=6).text


def wait_until(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


TOO_LONG = wav_base64(np.zeros(31 * 16000, dtype=np.float32))


@pytest.mark.parametrize("change, param, message", [
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "not base64!",
                                                                                         "format": "wav"}}]}]},
     "messages[0].content[0].input_audio.data", "is not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"hello, these bytes are no audio file").decode(), "format": "wav"}}]}]},
     "messages[0].content[0].input_audio.data", "not readable as audio"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": TOO_LONG,
                                                                                         "format": "wav"}}]}]},
     "messages[0].content[0].input_audio.data", "31.00 s of audio; this model hears at most 30 s"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA",
                                                                                         "format": "m4a"}}]}]},
     "messages[0].content[0].input_audio.format", "'m4a' is not supported; expected one of ['wav', 'mp3', 'flac']"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "'image_url' is not supported"),
    ({"modalities": ["text", "audio"], "audio": {"format": "mp3", "voice": "alloy"}},
     "audio.format", "'mp3' is not supported; expected one of ['wav', 'pcm16']"),
    ({"modalities": ["text", "audio"]}, "audio", "give audio: {\"format\": \"wav\"}"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"max_tokns": 5}, "max_tokns", "Unrecognized request argument supplied: max_tokns"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "'tools' is not supported"),
    ({"n": 2}, "n", "less than or equal to 1"),
    ({"max_tokens": 5000}, "messages", "maximum context length is 512 tokens"),
])
def test_bad_requests_get_a_400_naming_the_problem(client, change, param, message):
    body = {"messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, **{k: v for k, v in body.items() if k != "max_tokns"},
                                       extra_body={k: v for k, v in body.items() if k == "max_tokns"})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message.content is not None  # still serving


def test_another_models_name_is_a_404(client):
    with pytest.raises(openai.NotFoundError, match="this server serves 'tiny-speaker'") as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"


def test_a_body_past_the_size_limit_is_a_413(client):
    big = base64.b64encode(bytes(3 * 1024 * 1024)).decode()
    with pytest.raises(openai.APIStatusError, match="larger than this server's limit") as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": big, "format": "wav"}}]}])
    assert caught.value.status_code == 413


@pytest.mark.parametrize("key", ["sk-wrong", None])
def test_a_wrong_or_missing_key_is_a_401_on_every_route(server, key):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "unused", max_retries=0)
    headers = {} if key else {"Authorization": ""}
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       extra_headers=headers)
    assert caught.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/health", "/nowhere"):
        response = httpx.get(f"{server.url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("codec, reason", [
    (None, "it has no codec"),
    ("whisper-units", "its codec has no vocoder .*speechlm train-vocoder"),  # whisper units decode with one only
])
def test_audio_from_a_model_that_cannot_speak_is_a_400_saying_why(speaking, codec, reason):
    model, processor = speaking
    if codec is None:
        mute = type(processor).from_pretrained(processor._loaded_from[0], codec_name_or_path=None)
    else:
        units = WhisperUnitCodec.from_config(WhisperUnitConfig(n_audio_state=32, n_audio_head=2, encoder_blocks=1,
                                                               codebook_size=model.config.num_speech_units))
        mute = type(processor).from_pretrained(processor._loaded_from[0], codec=units, codec_name_or_path=None)
    running = start_server(model, mute, ServeSettings(port=0), model_name="mute")
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match=f"this model cannot speak \\({reason}") as caught:
            client.chat.completions.create(model="mute", messages=[{"role": "user", "content": "hi"}],
                                           modalities=["text", "audio"], audio={"format": "wav", "voice": "alloy"})
        assert caught.value.body["param"] == "modalities"
        assert client.chat.completions.create(model="mute", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2).choices[0].message.content is not None
    finally:
        running.stop()


def test_past_the_bound_requests_get_a_429_not_a_queue(speaking):
    model, processor = speaking
    running = start_server(model, processor, ServeSettings(port=0, max_batch_size=1, max_waiting=1),
                           model_name="busy")
    scheduler = running.server.config.app.state.scheduler
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        with ThreadPoolExecutor(2) as pool, model_lock(model):  # the worker takes one request, blocks on the model
            first = pool.submit(client.chat.completions.create, model="busy", max_tokens=2,
                                messages=[{"role": "user", "content": "one"}])
            wait_until(lambda: scheduler.running == 1 and scheduler.waiting == 0)
            second = pool.submit(client.chat.completions.create, model="busy", max_tokens=2,
                                 messages=[{"role": "user", "content": "two"}])
            wait_until(lambda: scheduler.waiting == 1)
            with pytest.raises(openai.RateLimitError, match="at capacity") as caught:
                client.chat.completions.create(model="busy", max_tokens=2, messages=[{"role": "user", "content": "3"}])
            assert caught.value.body["code"] == "rate_limit_exceeded"
            assert caught.value.response.headers["retry-after"] == "1"
        assert first.result().choices[0].message.content is not None
        assert second.result().choices[0].message.content is not None
    finally:
        running.stop()


def test_a_client_leaving_mid_stream_stops_its_row_and_the_server_goes_on(server, client, sample_wav):
    scheduler = server.server.config.app.state.scheduler
    cancelled = scheduler.finish_reasons["cancelled"]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=audio_question(sample_wav), stream=True,
                                            modalities=["audio"], audio={"format": "pcm16", "voice": "alloy"},
                                            extra_body={"max_speech_units": 300})
    next(iter(stream))
    stream.close()
    wait_until(lambda: scheduler.running == 0)
    assert scheduler.finish_reasons["cancelled"] == cancelled + 1
    assert client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message.content is not None
