from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speechlm.adapters.tiny import build_byte_tokenizer
from speechlm.speech_io.audio import AudioError, save_wav
from speechlm.speech_io.constants import IGNORE_INDEX, audio_placeholder_count, mel_frames
from speechlm.speech_io.processor import PLAIN_CHAT_TEMPLATE, SpeechLMProcessor
from speechlm.speech_io.units import expand_tokenizer
from tests.speech_io.conftest import speechlike

UNITS = 64


@pytest.fixture
def processor() -> SpeechLMProcessor:
    tokenizer = build_byte_tokenizer()
    expand_tokenizer(tokenizer, UNITS)
    return SpeechLMProcessor(tokenizer, stack_factor=2, num_speech_units=UNITS)


def user_audio(audio, text="What is said?", **extra):
    return [{"role": "user", "content": [{"type": "audio", "audio": audio, **extra}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("samples", [8000, 8001, 8159, 4321])
def test_each_clip_gets_as_many_placeholders_as_the_projector_emits(processor, samples):
    inputs = processor(user_audio({"array": speechlike(samples / 16000), "sampling_rate": 16000}))
    expected = audio_placeholder_count(mel_frames(samples), 2)
    assert int((inputs["input_ids"] == processor.audio_token_id).sum()) == expected
    assert inputs["input_features"].shape == (1, 80, mel_frames(samples))
    assert int(inputs["input_features_mask"].sum()) == mel_frames(samples)


def test_every_audio_form_gives_the_same_inputs(processor, tmp_path):
    wave = speechlike(0.6)
    save_wav(tmp_path / "clip.wav", wave)
    forms = [str(tmp_path / "clip.wav"), (tmp_path / "clip.wav").read_bytes(), {"array": wave, "sampling_rate": 16000}]
    results = [processor(user_audio(form)) for form in forms]
    results.append(processor(user_audio(wave, sampling_rate=16000)))
    results.append(processor(text="What is said?", audio=wave, sampling_rate=16000))
    for other in results[1:]:
        assert torch.equal(other["input_ids"], results[0]["input_ids"])
        # the wav file holds 16-bit samples: its log-mel differs from the float array in quiet bins only
        torch.testing.assert_close(other["input_features"], results[0]["input_features"], atol=0.02, rtol=0)


def test_generation_batch_is_left_padded_and_mixes_text_only_items(processor):
    batch = [user_audio(speechlike(0.9), sampling_rate=16000), [{"role": "user", "content": "Hi"}],
             user_audio(speechlike(0.3, seed=1), sampling_rate=16000)]
    inputs = processor(batch)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape[0] == 3 and bool(mask[:, -1].all())  # left padding: every row ends with a real token
    assert mask[1, 0] == 0 and ids[1, 0] == processor.tokenizer.pad_token_id
    assert inputs["input_features"].shape[0] == 2  # clips in order of appearance; the text row has none
    rendered = processor.decode(ids[1][mask[1].bool()])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_training_labels_cover_only_the_assistant_turns(processor):
    conversation = user_audio(speechlike(0.5), sampling_rate=16000) + [
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}, {"type": "units", "units": [1, 2, 63]}]},
    ]
    inputs = processor([conversation, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]],
                       return_labels=True)
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs["attention_mask"]
    assert mask[1, -1] == 0 and labels[1, -1] == IGNORE_INDEX  # right padding
    assert bool(mask[0].all())
    trained = processor.decode(ids[0][labels[0] != IGNORE_INDEX])
    assert trained == "A cat.<|im_end|>\nYes.<|speech_start|><|s_1|><|s_2|><|s_63|><|speech_end|><|im_end|>\n"
    assert not (labels[0] == processor.audio_token_id).any()
    assert processor.decode(ids[0][-1:]) == "\n"  # no generation prompt when training


@pytest.mark.parametrize("template", ["tokenizer's", "plain"])
def test_a_truncated_answer_is_learnt_without_its_end_of_turn(processor, template):
    if template == "plain":
        processor.tokenizer.chat_template = None
    question = [{"role": "user", "content": "Tell me"}]
    whole = processor([question + [{"role": "assistant", "content": "It was a long"}]], return_labels=True)
    cut = processor([question + [{"role": "assistant", "content": "It was a long", "truncated": True}]],
                    return_labels=True)
    trained = cut["input_ids"][0][cut["labels"][0] != IGNORE_INDEX]
    assert processor.decode(trained) == "It was a long"  # no end of turn to learn
    # the same tokens as the whole answer's, which only adds the labelled end of turn
    width = cut["input_ids"].shape[1]
    assert torch.equal(whole["input_ids"][0, :width], cut["input_ids"][0])
    end = whole["labels"][0][whole["labels"][0] != IGNORE_INDEX][len(trained):]
    assert processor.decode(end).startswith("<|im_end|>")
    # a later turn after a truncated one still gets its labels
    more = processor([question + [{"role": "assistant", "content": "It was", "truncated": True},
                                  {"role": "user", "content": "Go on"}, {"role": "assistant", "content": "a dog."}]],
                     return_labels=True)
    assert processor.decode(more["input_ids"][0][more["labels"][0] != IGNORE_INDEX]) == "It wasa dog.<|im_end|>\n"


def test_plain_template_without_a_chat_template(processor):
    processor.tokenizer.chat_template = None
    assert processor.chat_template == PLAIN_CHAT_TEMPLATE
    inputs = processor([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]],
                       return_labels=True)
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    assert processor.decode(ids) == "User: Hi\nAssistant: Yo<|im_end|>\n"
    assert processor.decode(ids[labels != IGNORE_INDEX]) == "Yo<|im_end|>\n"


def test_discrete_mode_spells_the_clip_in_units(processor, narrow_codec):
    processor._codec = narrow_codec
    wave = speechlike(0.5)
    inputs = processor(user_audio(wave, sampling_rate=16000), speech_input="discrete")
    ids = inputs["input_ids"][0].tolist()
    assert "input_features" not in inputs
    units = processor.parse_response(ids).units
    assert units == narrow_codec.encode([wave], n_q=1)[0][0].tolist()
    assert ids.count(processor.speech_start_token_id) == 1 and ids.count(processor.speech_end_token_id) == 1


def test_parse_response_splits_text_and_units(processor):
    ids = processor.tokenizer("Hello<|speech_start|><|s_5|><|s_7|><|speech_end|><|im_end|>").input_ids
    response = processor.parse_response(torch.tensor(ids))
    assert response.text == "Hello" and response.units == [5, 7]


def test_audio_errors_say_where_they_are(processor, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00")
    with pytest.raises(AudioError, match="conversation 0, user part 0: .*broken.wav"):
        processor(user_audio(str(broken)))
    with pytest.raises(AudioError, match="conversation 0, user part 0: .*NaN"):
        processor(user_audio(np.full(8000, np.nan, dtype=np.float32), sampling_rate=16000))


@pytest.mark.parametrize("conversation, message", [
    ([{"role": "user", "content": [{"type": "image", "image": "x"}]}], "unknown part"),
    ([{"role": "user", "content": [{"type": "units", "units": [64]}]}], r"units must lie in \[0, 64\)"),
    ([{"content": "no role"}], "message 0: expected a dict with 'role' and 'content'"),
    ([[]], "conversation 0: expected a non-empty list"),
])
def test_malformed_conversations_are_named(processor, conversation, message):
    with pytest.raises(ValueError, match=message):
        processor(conversation)


def test_tokenizer_without_speech_tokens_is_refused():
    with pytest.raises(ValueError, match="no <\\|audio\\|> token"):
        SpeechLMProcessor(build_byte_tokenizer())


def test_save_and_reload(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = SpeechLMProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    conversation = user_audio(speechlike(0.4), sampling_rate=16000)
    assert torch.equal(loaded(conversation)["input_ids"], processor(conversation)["input_ids"])


def test_loading_settings_are_kept_and_unknown_ones_refused(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert SpeechLMProcessor.from_pretrained(tmp_path, system_prompt="Short.").system_prompt == "Short."
    # what pipeline(dtype=..., device_map=...) passes along to every processor is not an error
    SpeechLMProcessor.from_pretrained(tmp_path, dtype="auto", device_map="cpu", _from_pipeline="speechlm")
    with pytest.raises(TypeError, match=r"\['sytem_prompt'\].*system_prompt"):
        SpeechLMProcessor.from_pretrained(tmp_path, sytem_prompt="Short.")


def test_system_prompt_goes_first_where_a_conversation_has_none(processor, tmp_path):
    processor.system_prompt = "Be brief."
    asked = [{"role": "user", "content": "Hi"}]
    own = [{"role": "system", "content": "Mine."}, *asked]
    assert processor.decode(processor(asked)["input_ids"][0]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert processor.decode(processor(own)["input_ids"][0]).startswith("<|im_start|>system\nMine.<|im_end|>")
    processor.save_pretrained(tmp_path)
    assert SpeechLMProcessor.from_pretrained(tmp_path).system_prompt == "Be brief."


def test_discrete_without_a_codec_says_how_to_get_one(processor):
    with pytest.raises(ValueError, match="discrete speech needs a codec"):
        processor(user_audio(speechlike(0.4), sampling_rate=16000), speech_input="discrete")


def test_a_separator_sets_a_clip_apart_from_the_text_beside_it(processor, tmp_path):
    clip = {"type": "audio", "audio": speechlike(0.4), "sampling_rate": 16000}
    text = {"type": "text", "text": "Transcribe."}
    placeholders = "<|audio|>" * processor.num_audio_placeholders(len(clip["audio"]))

    def user_turn(parts) -> str:
        rendered = processor.decode(processor([{"role": "user", "content": parts}])["input_ids"][0])
        return rendered.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]

    assert user_turn([clip, text]) == placeholders + "Transcribe."  # "" by default: a saved processor's format
    processor.audio_text_separator = "\n"
    assert user_turn([clip, text]) == placeholders + "\nTranscribe."
    assert user_turn([text, clip]) == "Transcribe.\n" + placeholders
    assert user_turn([text, text]) == "Transcribe.Transcribe."  # only between a clip and text
    units = {"type": "units", "units": [3, 4]}
    assert user_turn([units, text]).endswith(">\nTranscribe.")  # a clip as its units too (discrete input)
    answer = processor([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [text, units]}]])
    assert "Transcribe.<|speech_start|>" in processor.decode(answer["input_ids"][0])  # an answer is the model's own
    processor.save_pretrained(tmp_path)
    assert SpeechLMProcessor.from_pretrained(tmp_path).audio_text_separator == "\n"
    # a processor saved before the setting existed keeps the format its model was trained with
    config = tmp_path / "processor_config.json"
    settings = json.loads(config.read_text())
    del settings["audio_text_separator"]
    config.write_text(json.dumps(settings))
    assert SpeechLMProcessor.from_pretrained(tmp_path).audio_text_separator == ""
    with pytest.raises(ValueError, match=r"audio_text_separator=1: expected a string"):
        SpeechLMProcessor(processor.tokenizer, num_speech_units=UNITS, audio_text_separator=1)
