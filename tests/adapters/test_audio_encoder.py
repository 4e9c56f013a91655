from __future__ import annotations

import pytest
import torch
from whisper.model import AudioEncoder

from speechlm.adapters.audio_encoder import WhisperAudioEncoder, load_whisper_encoder, read_whisper_checkpoint
from speechlm.adapters.configuration import SpeechLMAudioConfig
from speechlm.speech_io.constants import encoder_frames
from tests.conftest import TINY_AUDIO, save_tiny_whisper


@pytest.fixture
def encoder() -> WhisperAudioEncoder:
    torch.manual_seed(0)
    return WhisperAudioEncoder(SpeechLMAudioConfig(**TINY_AUDIO)).eval()


def test_full_30s_input_equals_the_stock_encoder(encoder):
    stock = AudioEncoder(80, 1500, 32, 2, 2).eval()
    stock.load_state_dict(encoder.state_dict())
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        assert torch.equal(encoder(mel), stock(mel))


def test_short_input_uses_the_first_positions(encoder):
    with torch.no_grad():
        assert encoder(torch.randn(2, 80, 301)).shape == (2, 151, 32)


@pytest.mark.parametrize("short_frames", [120, 121])  # odd lengths end mid-way through conv2's stride
def test_a_clip_encodes_the_same_alone_and_in_a_padded_batch(encoder, short_frames):
    short, long = torch.randn(1, 80, short_frames), torch.randn(1, 80, 200)
    batch = torch.zeros(2, 80, 200)
    batch[0, :, :short_frames], batch[1] = short[0], long[0]
    with torch.no_grad():
        alone = encoder(short, torch.tensor([short_frames]))
        batched = encoder(batch, torch.tensor([short_frames, 200]))
        assert alone.shape[1] == encoder_frames(short_frames)
        torch.testing.assert_close(batched[0, : alone.shape[1]], alone[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[1], encoder(long)[0], rtol=1e-5, atol=1e-5)


def test_over_30s_is_refused(encoder):
    with pytest.raises(ValueError, match="3002 mel frames.*at most 3000"):
        encoder(torch.randn(1, 80, 3002))


def test_openai_whisper_checkpoint_loads(tmp_path):
    path = save_tiny_whisper(tmp_path / "w.pt", seed=3)
    dims, state = read_whisper_checkpoint(path)
    assert dims == {**TINY_AUDIO, "n_vocab": 64, "n_text_ctx": 16, "n_text_state": 32, "n_text_head": 2,
                    "n_text_layer": 1}  # the decoder's dims too, for the whisper reader
    encoder = load_whisper_encoder(path)
    full = torch.load(path, weights_only=True)["model_state_dict"]
    assert torch.equal(encoder.conv1.weight, full["encoder.conv1.weight"])


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_whisper_checkpoint(tmp_path / "missing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {}}, wrong)
    with pytest.raises(ValueError, match="wrong.pt.*'dims' and 'model_state_dict'"):
        read_whisper_checkpoint(wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: not a loadable"):
        read_whisper_checkpoint(garbage)


class Payload:
    """Any class: weights_only loading must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"dims": {}, "model_state_dict": {}, "x": Payload()}, path)
    with pytest.raises(ValueError, match="pickled.pt: not a loadable"):
        read_whisper_checkpoint(path)


def test_dims_mismatch_names_both_sides(tmp_path):
    path = save_tiny_whisper(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="n_audio_layer: checkpoint 2 vs config 3"):
        load_whisper_encoder(path, SpeechLMAudioConfig(**{**TINY_AUDIO, "n_audio_layer": 3}))
