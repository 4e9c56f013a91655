from __future__ import annotations

import struct

import pytest
import torch
import whisper

from speechlm.adapters.audio_encoder import load_whisper_encoder
from speechlm.adapters.ct2_format import CT2FormatError, read_ct2_model
from speechlm.adapters.whisper_ct2 import convert_whisper_ct2, find_ct2_files
from speechlm.cli import main
from tests.adapters.ct2_writer import quantize_int8, whisper_to_ct2_variables, write_ct2_model
from tests.conftest import save_tiny_whisper


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> dict:
    """A tiny random openai-whisper checkpoint (float32) with nonzero biases everywhere."""
    path = save_tiny_whisper(tmp_path_factory.mktemp("w") / "tiny.pt", seed=7)
    checkpoint = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    for name, value in checkpoint["model_state_dict"].items():
        # decoder.positional_embedding is torch.empty in openai-whisper: it may hold NaNs, which never compare equal
        if name.endswith((".bias", "_ln.weight")) or name == "decoder.positional_embedding":
            value.copy_(torch.randn(value.shape, generator=generator))
    return checkpoint


@pytest.fixture
def ct2_dir(tmp_path, tiny_whisper):
    variables = whisper_to_ct2_variables(tiny_whisper["model_state_dict"], tiny_whisper["dims"])
    write_ct2_model(tmp_path / "ct2" / "model.bin", variables)
    (tmp_path / "ct2" / "vocabulary.txt").write_text("\n".join(f"t{i}" for i in range(64)) + "\n")
    return tmp_path / "ct2"


def assert_same_state(converted: dict, original: dict) -> None:
    assert converted["dims"] == original["dims"]
    assert converted["model_state_dict"].keys() == original["model_state_dict"].keys()
    for name, value in original["model_state_dict"].items():
        assert torch.equal(converted["model_state_dict"][name], value), name


def test_float32_round_trip_is_exact(ct2_dir, tiny_whisper, tmp_path):
    out = convert_whisper_ct2(ct2_dir, tmp_path / "out.pt", dtype="float32")
    assert_same_state(torch.load(out, weights_only=True), tiny_whisper)


def test_float16_output_and_float16_source(tmp_path, tiny_whisper):
    half = {name: value.half() for name, value in tiny_whisper["model_state_dict"].items()}
    variables = whisper_to_ct2_variables(half, tiny_whisper["dims"])
    write_ct2_model(tmp_path / "model.bin", variables)
    converted = torch.load(convert_whisper_ct2(tmp_path / "model.bin", tmp_path / "o.pt"), weights_only=True)
    assert_same_state(converted, {"dims": tiny_whisper["dims"], "model_state_dict": half})
    assert all(value.dtype == torch.float16 for value in converted["model_state_dict"].values())


def test_split_parts_are_read_in_order(ct2_dir, tiny_whisper, tmp_path):
    data = (ct2_dir / "model.bin").read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    cut = len(data) // 3
    # part10 sorts before part2 as text: parts are ordered by their number
    for name, chunk in (("model.bin.part1", data[:cut]), ("model.bin.part2", data[cut:2 * cut]),
                        ("model.bin.part10", data[2 * cut:])):
        (parts / name).write_bytes(chunk)
    assert [p.name for p in find_ct2_files(parts)] == ["model.bin.part1", "model.bin.part2", "model.bin.part10"]
    out = convert_whisper_ct2(parts, tmp_path / "a.pt", dtype="float32")
    assert_same_state(torch.load(out, weights_only=True), tiny_whisper)
    files = [parts / "model.bin.part1", parts / "model.bin.part2", parts / "model.bin.part10"]
    out = convert_whisper_ct2(files, tmp_path / "b.pt", dtype="float32")
    assert_same_state(torch.load(out, weights_only=True), tiny_whisper)


def test_openai_whisper_and_speechlm_load_the_result(ct2_dir, tiny_whisper, tmp_path):
    out = convert_whisper_ct2(ct2_dir, tmp_path / "w.pt", dtype="float32")
    model = whisper.load_model(str(out), device="cpu")
    reference = whisper.model.Whisper(whisper.model.ModelDimensions(**tiny_whisper["dims"]))
    reference.load_state_dict(tiny_whisper["model_state_dict"])
    mel, tokens = torch.randn(1, 80, 3000), torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(mel, tokens), reference.eval()(mel, tokens))
    encoder = load_whisper_encoder(out)
    assert torch.equal(encoder.conv2.weight, tiny_whisper["model_state_dict"]["encoder.conv2.weight"])


def test_nonzero_key_bias_is_dropped_because_softmax_cancels_it(tmp_path, tiny_whisper):
    variables = whisper_to_ct2_variables(tiny_whisper["model_state_dict"], tiny_whisper["dims"])
    bias = variables["encoder/layer_0/self_attention/linear_0/bias"]
    width = bias.shape[0] // 3
    bias[width:2 * width] = 5.0  # the key slice
    write_ct2_model(tmp_path / "model.bin", variables)
    converted = torch.load(convert_whisper_ct2(tmp_path / "model.bin", tmp_path / "w.pt", dtype="float32"),
                           weights_only=True)
    assert_same_state(converted, tiny_whisper)


def test_int8_weights_are_dequantized(tmp_path, tiny_whisper):
    variables = quantize_int8(whisper_to_ct2_variables(tiny_whisper["model_state_dict"], tiny_whisper["dims"]))
    write_ct2_model(tmp_path / "model.bin", variables)
    state = torch.load(convert_whisper_ct2(tmp_path / "model.bin", tmp_path / "w.pt", dtype="float32"),
                       weights_only=True)["model_state_dict"]
    for name, value in tiny_whisper["model_state_dict"].items():
        # int8 keeps 1/254 of each row's range
        tolerance = value.abs().reshape(value.shape[0], -1).amax() / 127 if value.ndim > 1 else 0
        assert (state[name] - value).abs().max() <= tolerance + 1e-6, name


def test_reader_exposes_spec_and_aliases(ct2_dir):
    model = read_ct2_model(ct2_dir / "model.bin")
    assert (model.binary_version, model.spec_name, model.spec_revision) == (6, "WhisperSpec", 3)
    assert model.variables["decoder/projection/weight"] is model.variables["decoder/embeddings/weight"]


@pytest.mark.parametrize("header, message", [
    (b"PK\x03\x04", "binary version 67324752 .*expected a CTranslate2 model.bin"),
    (struct.pack("<I", 7), "binary version 7"),
])
def test_bad_version_is_refused(tmp_path, header, message):
    path = tmp_path / "model.bin"
    path.write_bytes(header + b"\0" * 16)
    with pytest.raises(CT2FormatError, match=f"{path}: {message}"):
        convert_whisper_ct2(path, tmp_path / "o.pt")


def test_truncated_file_names_the_variable_and_offset(ct2_dir, tmp_path):
    data = (ct2_dir / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CT2FormatError, match=r"model.bin: truncated: data of .* at byte \d+ needs \d+ bytes"):
        convert_whisper_ct2(tmp_path / "model.bin", tmp_path / "o.pt")


def test_a_missing_part_is_reported(ct2_dir, tmp_path):
    data = (ct2_dir / "model.bin").read_bytes()
    (tmp_path / "model.bin.part1").write_bytes(data[: len(data) // 2])
    with pytest.raises(CT2FormatError, match="is it one part of a split model.bin"):
        convert_whisper_ct2(tmp_path, tmp_path / "o.pt")
    with pytest.raises(CT2FormatError, match="model.bin.part2: no such file"):
        convert_whisper_ct2([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"], tmp_path / "o.pt")


def test_trailing_bytes_are_refused(ct2_dir, tmp_path):
    (tmp_path / "model.bin").write_bytes((ct2_dir / "model.bin").read_bytes() * 2)
    with pytest.raises(CT2FormatError, match="unexpected bytes after the model"):
        convert_whisper_ct2(tmp_path / "model.bin", tmp_path / "o.pt")


def test_unknown_variable_is_named(tmp_path, tiny_whisper):
    variables = whisper_to_ct2_variables(tiny_whisper["model_state_dict"], tiny_whisper["dims"])
    variables["encoder/extra_norm/gamma"] = torch.ones(32)
    write_ct2_model(tmp_path / "model.bin", variables)
    with pytest.raises(CT2FormatError, match="unknown variable.*encoder/extra_norm/gamma"):
        convert_whisper_ct2(tmp_path / "model.bin", tmp_path / "o.pt")


def test_missing_variable_and_shape_mismatch_are_named(tmp_path, tiny_whisper):
    variables = whisper_to_ct2_variables(tiny_whisper["model_state_dict"], tiny_whisper["dims"])
    del variables["encoder/layer_1/ffn/linear_1/bias"]
    write_ct2_model(tmp_path / "a.bin", variables)
    with pytest.raises(CT2FormatError, match="encoder/layer_1/ffn/linear_1/bias is missing"):
        convert_whisper_ct2(tmp_path / "a.bin", tmp_path / "o.pt")
    variables = whisper_to_ct2_variables(tiny_whisper["model_state_dict"], tiny_whisper["dims"])
    variables["encoder/layer_0/ffn/linear_0/weight"] = torch.zeros(100, 32)
    variables["encoder/layer_0/ffn/linear_0/bias"] = torch.zeros(100)
    write_ct2_model(tmp_path / "b.bin", variables)
    with pytest.raises(CT2FormatError, match=r"shape mismatch.*encoder.blocks.0.mlp.0.weight: \[100, 32\] "
                                             r"\(expected \[128, 32\]\)"):
        convert_whisper_ct2(tmp_path / "b.bin", tmp_path / "o.pt")


def test_other_specs_and_decoder_flags_are_refused(tmp_path, tiny_whisper):
    variables = whisper_to_ct2_variables(tiny_whisper["model_state_dict"], tiny_whisper["dims"])
    write_ct2_model(tmp_path / "a.bin", variables, spec="TransformerDecoderModelSpec")
    with pytest.raises(CT2FormatError, match="holds a CTranslate2 TransformerDecoderModelSpec; expected a WhisperSpec"):
        convert_whisper_ct2(tmp_path / "a.bin", tmp_path / "o.pt")
    variables["decoder/pre_norm"] = torch.tensor(0, dtype=torch.int8)
    write_ct2_model(tmp_path / "b.bin", variables)
    with pytest.raises(CT2FormatError, match="decoder/pre_norm is 0; openai-whisper's decoder needs 1"):
        convert_whisper_ct2(tmp_path / "b.bin", tmp_path / "o.pt")


def test_vocabulary_of_another_model_is_refused(ct2_dir, tmp_path):
    (ct2_dir / "vocabulary.txt").write_text("a\nb\n")
    with pytest.raises(CT2FormatError, match="vocabulary.txt: 2 tokens, but the model's embeddings have 64 rows"):
        convert_whisper_ct2(ct2_dir, tmp_path / "o.pt")


def test_cli_converts_and_reports_errors_in_one_line(ct2_dir, tiny_whisper, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    assert main(["convert", "whisper-ct2", str(ct2_dir), str(out), "--dtype", "float32"]) == 0
    assert_same_state(torch.load(out, weights_only=True), tiny_whisper)
    assert str(out) in capsys.readouterr().out
    assert main(["convert", "whisper-ct2", str(tmp_path / "nowhere"), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"speechlm convert: error: {tmp_path / 'nowhere'}: no such CTranslate2 model directory or model.bin file"
