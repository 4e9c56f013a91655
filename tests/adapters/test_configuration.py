from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, LlamaConfig

import speechlm  # noqa: F401  (registers the Auto classes)
from speechlm import SpeechLMConfig
from speechlm.adapters.configuration import SpeechLMAudioConfig
from speechlm.speech_io.config_errors import ConfigError


def make_config(**changes) -> SpeechLMConfig:
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       vocab_size=300)
    fields = dict(text_config=text, audio_config={"n_audio_state": 32, "n_audio_head": 2},
                  projector_config={"stack_factor": 4, "hidden_size": 64}, num_speech_units=16)
    return SpeechLMConfig(**{**fields, **changes})


def test_token_ids_follow_text_vocab_size():
    config = make_config(text_vocab_size=290)
    assert (config.audio_token_id, config.speech_start_token_id, config.speech_end_token_id,
            config.speech_unit_start_id) == (290, 291, 292, 293)
    assert config.vocab_size == 290 + 3 + 16
    assert config.hidden_size == 32  # read from text_config, never repeated


def test_round_trip_through_auto_config(tmp_path):
    config = make_config(mode="lora", lora_config={"r": 4, "use_dora": True}, text_model_name_or_path="some/llama")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SpeechLMConfig)
    assert isinstance(loaded.audio_config, SpeechLMAudioConfig)
    assert loaded.text_config.model_type == "llama" and loaded.text_config.hidden_size == 32
    assert loaded.projector_config.stack_factor == 4
    assert (loaded.mode, loaded.text_model_name_or_path) == ("lora", "some/llama")
    assert loaded.lora_config == {"r": 4, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                                  "use_dora": True}
    assert loaded.speech_unit_start_id == config.speech_unit_start_id


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as error:
        make_config(mode="half", num_speech_units=0, lora_config={"lora_dropout": 1.5}, speech_length_ceiling=0.7)
    message = str(error.value)
    assert "mode='half'" in message and "frozen" in message
    assert "num_speech_units=0" in message
    assert "lora_config.lora_dropout=1.5" in message
    assert "speech_length_ceiling=0.7: must be above 1 - speech_length_tolerance = 0.75" in message


def test_a_config_saved_with_flat_lora_keys_loads_them_into_lora_config(tmp_path):
    config = make_config(mode="lora")
    saved = config.to_dict()
    del saved["lora_config"]
    saved.update(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj"])  # an older save
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.lora_config == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    assert not hasattr(loaded, "lora_r")


def test_lora_settings_peft_does_not_take_are_named():
    from speechlm.adapters.building import build_speechlm
    from tests.conftest import tiny_spec

    with pytest.raises(ConfigError, match=r"lora has keys peft's LoraConfig does not take: \['alpha', 'scope'\]"):
        build_speechlm(tiny_spec(mode="lora", lora={"r": 4, "alpha": 8, "scope": "audio"}))
    with pytest.raises(ConfigError, match=r"lora.r=0: must be an integer >= 1"):
        build_speechlm(tiny_spec(mode="lora", lora={"r": 0}))


def test_recorded_ids_must_agree_with_the_layout():
    with pytest.raises(ConfigError, match="audio_token_id=5 disagrees with text_vocab_size=300"):
        make_config(audio_token_id=5)


def test_text_vocab_beyond_the_embedding_is_refused():
    with pytest.raises(ConfigError, match="text_vocab_size=400"):
        make_config(text_vocab_size=400)


@pytest.mark.parametrize("field, value, expected", [
    ("n_mels", 81, "80 or 128"),
    ("n_audio_head", 3, "not divisible"),
])
def test_audio_config_errors_name_the_field(field, value, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        SpeechLMAudioConfig(n_audio_state=32, **{field: value})
    assert field in str(error.value)


def test_unknown_projector_type_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"projector_type='conv'.*\['mlp', 'swiglu'\]"):
        make_config(projector_config={"projector_type": "conv"})
