"""Speaking in a given voice: the codec's completion model turns the LM's layer-1 units into all of the codec's
layers from a voice prompt, in `respond`, `stream_response`, the pipeline and `speechlm generate`."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

from speechlm.cli import main
from speechlm.responding import (
    AudioChunk,
    generate_response_tokens,
    respond,
    speech_spans,
    stream_response,
)
from speechlm.speech_io.completion import CompletionConfig, RVQCompletion, codebooks_fingerprint
from tests.inference.conftest import NARROW_CODEC, add_tiny_speech_decoder, save_speaking_model

PROMPT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def voiced(tmp_path_factory):
    """A tiny model whose two-layer codec has a speech decoder and a random completion model, and a voice."""
    directory = save_speaking_model(tmp_path_factory.mktemp("voiced") / "model", codec=dict(NARROW_CODEC, n_q=2))
    add_tiny_speech_decoder(directory)
    codec = AutoProcessor.from_pretrained(directory).codec
    codebooks = codec.codebook_vectors(codec.n_q)
    torch.manual_seed(0)
    config = CompletionConfig(num_layers=2, codebook_size=codec.codebook_size,
                              codebook_dimension=codec.codebook_dimension, hidden_size=16, num_blocks=1, num_heads=2,
                              codebook_fingerprint=codebooks_fingerprint(codebooks))
    codec.add_completion(RVQCompletion(config, codebooks))
    codec.save_pretrained(directory / "codec")
    voice = directory.parent / "voice.wav"
    t = np.arange(int(1.5 * 22050)) / 22050
    sf.write(voice, (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), 22050)
    return AutoModelForCausalLM.from_pretrained(directory), AutoProcessor.from_pretrained(directory), voice, directory


def test_respond_speaks_each_span_completed_in_the_voice(voiced):
    model, processor, voice, _ = voiced
    codec = processor.codec
    plain = respond(model, processor, PROMPT, output="speech", max_new_tokens=12)
    spoken = respond(model, processor, PROMPT, output="speech", max_new_tokens=12, voice=voice)
    assert spoken.units == plain.units  # what is said is the LM's; the voice only adds layers
    prompt = codec.voice_prompt(voice)
    assert prompt.shape == (2, 75)  # 1.5 s at 50 Hz, resampled from 22.05 kHz
    tokens = generate_response_tokens(model, processor, processor([PROMPT]), output="speech", max_new_tokens=12)
    spans = speech_spans(processor, tokens[0].tolist())
    expected = np.concatenate(codec.decode_batch([codec.complete(span, prompt) for span in spans]))
    np.testing.assert_array_equal(spoken.audio, expected)
    assert spoken.audio.shape == plain.audio.shape and not np.array_equal(spoken.audio, plain.audio)


def test_a_stream_and_the_pipeline_speak_in_the_same_voice(voiced):
    model, processor, voice, directory = voiced
    whole = respond(model, processor, PROMPT, output="speech", max_new_tokens=12, voice=voice).audio
    streamed = np.concatenate([event.array for event in stream_response(
        model, processor, PROMPT, output="speech", max_new_tokens=12, voice=voice) if isinstance(event, AudioChunk)])
    np.testing.assert_allclose(streamed, whole, atol=1e-4)
    speaker = pipeline("speechlm", model=model, processor=processor)
    heard = speaker(PROMPT, output="speech", max_new_tokens=12, voice=str(voice))
    np.testing.assert_array_equal(heard["audio"]["array"], whole)


def test_a_bad_voice_is_refused_before_anything_is_generated(voiced, speaking, tmp_path, capsys):
    model, processor, voice, directory = voiced
    sf.write(tmp_path / "short.wav", np.full(8000, 0.1, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=r"short.wav: 0\.50 s of audio; a voice prompt needs at least 1 s"):
        respond(model, processor, PROMPT, output="speech", voice=tmp_path / "short.wav")
    with pytest.raises(ValueError, match="silent"):
        respond(model, processor, PROMPT, output="speech", voice=np.zeros(32000, dtype=np.float32))
    plain_model, plain = speaking  # a one-layer codec: nothing to speak a voice with
    with pytest.raises(ValueError, match="voice=: this model's codec .* has no layers to speak a voice with"):
        respond(plain_model, plain, PROMPT, output="speech", voice=voice)
    assert main(["generate", "--model", str(directory), "--text", "hi", "--voice", str(voice)]) != 0
    assert "--voice needs --output speech or text+speech" in capsys.readouterr().err
    out = tmp_path / "answer.wav"
    assert main(["generate", "--model", str(directory), "--text", "hi", "--output", "speech", "--out-audio", str(out),
                 "--voice", str(voice), "--max-new-tokens", "6"]) == 0
    assert sf.info(out).frames > 0
