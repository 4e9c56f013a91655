"""Servers over the tests' tiny speaking model, each on a free local port of its own, and the official client."""

from __future__ import annotations

import base64
import io

import openai
import pytest
import soundfile as sf
from transformers import AutoModelForCausalLM, AutoProcessor

from speechlm.serving import ServeSettings, start_server
from tests.inference.conftest import SAMPLE, save_speaking_model

API_KEY = "sk-test-0123456789"
MODEL_NAME = "tiny-speaker"


def wav_base64(array, rate: int = 16000) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, array, rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="session")
def sample_wav() -> str:
    """configs/tiny/sample.flac as base64 16-bit wav, as a client would send it."""
    array, rate = sf.read(SAMPLE, dtype="float32")
    return wav_base64(array, rate)


@pytest.fixture(scope="session")
def speaking(tmp_path_factory):
    """The model and processor of a saved tiny SpeechLM that speaks (`save_speaking_model`)."""
    directory = save_speaking_model(tmp_path_factory.mktemp("served"))
    return AutoModelForCausalLM.from_pretrained(directory), AutoProcessor.from_pretrained(directory)


@pytest.fixture(scope="module")
def server(speaking):
    """The tiny speaking model behind an API key, batches of up to 4."""
    model, processor = speaking
    running = start_server(model, processor, ServeSettings(port=0, api_key=API_KEY, max_batch_size=4, max_waiting=16,
                                                           max_request_bytes=2 * 1024 * 1024),
                           model_name=MODEL_NAME)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
