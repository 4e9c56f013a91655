from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import speechlm  # noqa: F401
from speechlm.cli import main

TINY_YAML = Path(__file__).parents[1] / "configs" / "tiny" / "model.yaml"


def test_init_builds_the_tiny_default(tmp_path, capsys):
    assert main(["init", str(TINY_YAML), "--out", str(tmp_path / "tiny"), "num_speech_units=32"]) == 0
    assert "saved to" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert type(model).__name__ == "SpeechLMForCausalLM" and model.config.num_speech_units == 32


def test_the_deepspeed_launchers_local_rank_argument_is_taken(tmp_path):
    # `deepspeed $(which speechlm) train ...` starts each rank as `speechlm --local_rank=N train ...`
    assert main(["--local_rank=1", "init", str(TINY_YAML), "--out", str(tmp_path), "num_speech_units=32"]) == 0


def test_bad_config_values_exit_2_naming_every_field(tmp_path, capsys):
    code = main(["init", str(TINY_YAML), "--out", str(tmp_path), "mode=half", "projector.stack_factor=0", "foo=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "mode='half'" in err and "stack_factor=0" in err and "foo: unknown key" in err
    assert "Traceback" not in err


def test_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["init", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"speechlm init: error: {tmp_path / 'nope.yaml'}: no such config file"


@pytest.mark.parametrize("command", [["eval", "--task", "asr", "--data", "x.jsonl"], ["generate", "--text", "hi"]])
def test_a_model_path_that_does_not_exist_is_named(tmp_path, capsys, command):
    assert main([command[0], "--model", str(tmp_path / "gone"), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"speechlm {command[0]}: error: --model {tmp_path / 'gone'}: no such directory (expected a saved "
                   f"SpeechLM directory or a Hub repo id, owner/name)")


def test_console_script_is_installed(tmp_path):
    result = subprocess.run([sys.executable, "-m", "speechlm.cli", "init", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "model YAML" in result.stdout


def test_init_saves_a_processor_that_matches_the_model(tmp_path):
    from transformers import AutoProcessor

    from speechlm import SpeechLMProcessor

    main(["init", str(TINY_YAML), "--out", str(tmp_path)])
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(processor, SpeechLMProcessor)
    assert processor.stack_factor == model.config.projector_config.stack_factor
    assert processor.audio_token_id == model.config.audio_token_id
