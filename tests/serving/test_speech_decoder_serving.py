"""A served model whose codec has a speech decoder: the LM writes, the decoder speaks, in whole and streamed answers."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import soundfile as sf
from transformers import AutoModelForCausalLM, AutoProcessor

from speechlm.responding import respond
from speechlm.serving import ServeSettings, start_server
from tests.inference.conftest import add_tiny_speech_decoder, save_speaking_model
from tests.serving.conftest import API_KEY, MODEL_NAME

QUESTION = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def decoding(tmp_path_factory):
    directory = add_tiny_speech_decoder(save_speaking_model(tmp_path_factory.mktemp("served-decoding")))
    return AutoModelForCausalLM.from_pretrained(directory), AutoProcessor.from_pretrained(directory)


@pytest.fixture(scope="module")
def client(decoding):
    running = start_server(*decoding, ServeSettings(port=0, api_key=API_KEY, max_batch_size=4, max_waiting=16),
                           model_name=MODEL_NAME)
    yield openai.OpenAI(base_url=f"{running.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    running.stop()


def test_the_decoder_speaks_the_served_answer(client, decoding):
    answer = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, modalities=["text", "audio"],
                                            audio={"format": "wav", "voice": "alloy"}, max_completion_tokens=10)
    expected = respond(*decoding, QUESTION, output="text+speech", max_new_tokens=10)
    assert expected.units == decoding[1].codec.speech_decoder.speak(expected.text)
    message = answer.choices[0].message
    assert message.audio.transcript == expected.text
    audio, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == 16000
    np.testing.assert_allclose(audio, expected.audio, atol=2 / 32768)
    assert answer.usage.completion_tokens_details.audio_tokens == len(expected.units)


def test_the_streamed_answer_is_the_whole_one(client, decoding):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, modalities=["text", "audio"],
                                            audio={"format": "pcm16", "voice": "alloy"}, max_tokens=10, stream=True)
    transcript, pcm = [], []
    for chunk in stream:
        for choice in chunk.choices:
            audio = choice.delta.audio
            if audio is not None:
                audio = audio if isinstance(audio, dict) else audio.model_dump()
                transcript += [audio["transcript"]] if audio.get("transcript") else []
                pcm += [base64.b64decode(audio["data"])] if audio.get("data") else []
    expected = respond(*decoding, QUESTION, output="text+speech", max_new_tokens=10)
    assert "".join(transcript) == expected.text
    speech = np.frombuffer(b"".join(pcm), dtype="<i2").astype(np.float32) / 32767
    np.testing.assert_allclose(speech, expected.audio, atol=2 / 32768)
