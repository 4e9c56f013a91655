"""RVQ completion: shapes, masks, batch against one at a time, saving, the codec's checks, voice prompts."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.speech_io.completion import (
    CompletionConfig,
    RVQCompletion,
    check_completion,
    codebooks_fingerprint,
    saved_completion,
    voice_waveform,
)
from speechlm.speech_io.config_errors import ConfigError

TINY = dict(num_layers=3, codebook_size=16, codebook_dimension=8, hidden_size=16, num_blocks=2, num_heads=2,
            dropout=0.0, max_prompt_frames=12)


@pytest.fixture
def model() -> RVQCompletion:
    torch.manual_seed(0)
    codebooks = torch.randn(3, 16, 8)
    config = CompletionConfig(**TINY, codebook_fingerprint=codebooks_fingerprint(codebooks))
    return RVQCompletion(config, codebooks).eval()


def test_it_asks_one_layer_of_every_target_frame(model):
    prompt, known = torch.randint(0, 16, (2, 3, 7)), torch.randint(0, 16, (2, 2, 11))
    assert model(prompt, known).shape == (2, 11, 16)
    assert model(prompt, known[:, :1]).shape == (2, 11, 16)
    with pytest.raises(ValueError, match="expected 3 and 1 to 2"):
        model(prompt, known.repeat(1, 2, 1)[:, :3])
    with pytest.raises(ValueError, match="expected 3 and 1 to 2"):
        model(prompt[:, :2], known)


def test_padding_changes_nothing_and_a_batch_equals_one_at_a_time(model):
    prompts = [torch.randint(0, 16, (3, n)) for n in (5, 9)]
    targets = [torch.randint(0, 16, (1, n)) for n in (8, 13)]
    alone = [model(p[None], t[None])[0] for p, t in zip(prompts, targets, strict=True)]
    # prompts padded on the left (they run into their targets), targets on the right
    prompt = torch.stack([torch.nn.functional.pad(p, (9 - p.shape[1], 0)) for p in prompts])
    target = torch.stack([torch.nn.functional.pad(t, (0, 13 - t.shape[1])) for t in targets])
    prompt_padding = torch.arange(9)[None] < torch.tensor([4, 0])[:, None]
    target_padding = torch.arange(13)[None] >= torch.tensor([8, 13])[:, None]
    batched = model(prompt, target, prompt_padding, target_padding)
    torch.testing.assert_close(batched[0, :8], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched[1], alone[1], atol=1e-5, rtol=1e-4)
    units = [torch.randint(0, 16, (n,)) for n in (6, 10)]
    voice = torch.randint(0, 16, (3, 20))
    assert all(torch.equal(a, b) for a, b in zip(model.complete_batch(units, voice),
                                                 [model.complete(u, voice) for u in units], strict=True))


def test_completion_keeps_layer_one_and_fills_the_rest_in_the_codebook(model):
    units = torch.randint(0, 16, (25,))
    codes = model.complete(units, torch.randint(0, 16, (3, 40)))
    assert codes.shape == (3, 25) and torch.equal(codes[0], units)
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert model.complete([], torch.randint(0, 16, (3, 4))).shape == (3, 0)
    # only the prompt's last max_prompt_frames frames are read
    long_prompt = torch.randint(0, 16, (3, 30))
    assert torch.equal(model.complete(units, long_prompt), model.complete(units, long_prompt[:, -12:]))
    with pytest.raises(ValueError, match=r"expected \(3 or more, frames\)"):
        model.complete(units, torch.randint(0, 16, (2, 10)))
    with pytest.raises(ValueError, match="codes run 0..16; expected 0..15"):
        model.complete(units, torch.full((3, 5), 16).index_fill(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="units run"):
        model.complete(torch.tensor([3, 99]), torch.randint(0, 16, (3, 5)))


def test_it_saves_and_loads_and_its_codec_must_match(model, tmp_path):
    model.save_pretrained(tmp_path / "completion")
    loaded = saved_completion(tmp_path)
    units, voice = torch.randint(0, 16, (9,)), torch.randint(0, 16, (3, 8))
    assert torch.equal(loaded.complete(units, voice), model.complete(units, voice))
    assert saved_completion(tmp_path / "elsewhere") is None
    assert check_completion(loaded, model.codebooks.reshape(3, 16, 8)) is loaded
    with pytest.raises(ValueError, match="trained on other codebooks"):
        check_completion(loaded, torch.randn(3, 16, 8))
    with pytest.raises(ValueError, match=r"does not fit this codec \(\(2, 16, 8\)\)"):
        check_completion(loaded, torch.randn(2, 16, 8))
    (tmp_path / "completion" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"):
        saved_completion(tmp_path)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError) as caught:
        CompletionConfig(num_layers=1, hidden_size=10, num_heads=4, dropout=1.5)
    assert [p.split("=")[0] for p in caught.value.problems] == ["num_layers", "dropout", "hidden_size"]


def test_a_voice_prompt_is_resampled_and_must_be_long_and_audible(tmp_path):
    t = np.arange(int(1.5 * 22050)) / 22050
    sf.write(tmp_path / "voice.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050)
    assert abs(voice_waveform(tmp_path / "voice.wav").size - 24000) <= 2  # 1.5 s at 16 kHz
    with pytest.raises(ValueError, match=r"0\.50 s of audio; a voice prompt needs at least 1 s"):
        voice_waveform(np.full(8000, 0.1, dtype=np.float32))
    with pytest.raises(ValueError, match="silent"):
        voice_waveform(np.zeros(32000, dtype=np.float32))
