from __future__ import annotations

import random

import pytest
import torch

from speechlm.finetune.examples import Example, Span
from speechlm.finetune.tasks import PROMPTS, TASKS, RenderSettings, eligible, render
from speechlm.speech_io.constants import IGNORE_INDEX
from speechlm.speech_io.units import units_to_text

UNITS = list(range(10, 60))  # 50 frames: 1 s at 50 Hz


def example(**fields) -> Example:
    base = dict(id="e", audio={"array": torch.zeros(16000).numpy(), "sampling_rate": 16000}, num_samples=16000,
                text="one two three four", units=UNITS, unit_rate=50)
    return Example(**{**base, **fields})


def labelled(processor, conversation, speech_input="continuous") -> tuple[str, str, torch.Tensor]:
    """(decoded labelled tokens, decoded unlabelled tokens, input_ids) of one rendered conversation."""
    batch = processor([conversation], return_labels=True, speech_input=speech_input)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])  # labels are the tokens themselves where set
    return processor.decode(ids[trained]), processor.decode(ids[~trained]), ids


def run(task, processor, ex, seed=0, **settings):
    return labelled(processor, render(task, ex, random.Random(seed), RenderSettings(**settings)),
                    settings.get("speech_input", "continuous"))


def test_asr_learns_only_the_transcript(processor):
    out, prompt, ids = run("asr", processor, example())
    assert out == "one two three four<|im_end|>\n"
    assert any(p in prompt for p in PROMPTS["asr"]) and "<|audio|>" in prompt
    assert int((ids == processor.audio_token_id).sum()) == processor.num_audio_placeholders(16000)


def test_asr_with_discrete_input_reads_prepared_units(processor):
    out, prompt, _ = run("asr", processor, example(), speech_input="discrete")
    assert out == "one two three four<|im_end|>\n" and units_to_text(UNITS) in prompt.replace(" ", "")


def test_tts_learns_the_units(processor):
    out, prompt, _ = run("tts", processor, example())
    assert out == units_to_text(UNITS) + "<|im_end|>\n"
    assert "one two three four" in prompt and "<|s_" not in prompt


def test_continuation_learns_the_rest_of_the_units(processor):
    for seed in range(5):
        out, prompt, _ = run("continuation", processor, example(), seed=seed)
        prefix, rest = prompt.count("<|s_"), out.count("<|s_")
        assert prefix + rest == len(UNITS) and len(UNITS) // 4 <= prefix <= 3 * len(UNITS) // 4
        assert out.startswith("<|speech_start|>") and out.endswith("<|speech_end|><|im_end|>\n")


def test_s2t_instruct_learns_the_answer_or_the_rows_own_assistant_turns(processor):
    out, prompt, _ = run("s2t_instruct", processor, example(answer="Paris."))
    assert out == "Paris.<|im_end|>\n" and "<|audio|>" in prompt
    messages = [{"role": "user", "content": [{"type": "audio", "audio": example().audio}]},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "more"},
                {"role": "assistant", "content": "B"}]
    out, prompt, _ = run("s2t_instruct", processor, example(messages=messages))
    assert out == "A<|im_end|>\nB<|im_end|>\n" and "more" in prompt


def test_s2t_instruct_learns_a_truncated_answer_without_its_end_of_turn(processor):
    out, _, _ = run("s2t_instruct", processor, example(answer="Paris is the capital of", answer_truncated=True))
    assert out == "Paris is the capital of"  # the backbone's answer went on: the model must not learn to stop


def test_s2s_chain_learns_text_then_speech(processor):
    answer_units = [3, 4, 5]
    out, prompt, _ = run("s2s_chain", processor, example(answer="Yes.", answer_units=answer_units))
    assert out == "Yes.\n" + units_to_text(answer_units) + "<|im_end|>\n"
    assert "<|audio|>" in prompt and "Yes." not in prompt


def test_interleaved_slices_units_at_word_times(processor):
    words = [Span("one", 0.0, 0.2), Span("two", 0.2, 0.4), Span("three", 0.4, 0.7), Span("four", 0.7, 1.0)]
    ex = example(words=words)
    for seed in range(6):
        conversation = render("interleaved", ex, random.Random(seed), RenderSettings(max_interleave_words=2))
        parts = conversation[0]["content"][1:] + conversation[1]["content"]
        kinds = [part["type"] for part in parts]
        assert all(a != b for a, b in zip(kinds, kinds[1:], strict=False))  # modalities alternate
        spoken = [u for part in parts if part["type"] == "units" for u in part["units"]]
        assert spoken == sorted(spoken) and set(spoken) <= set(UNITS)  # in order, from the clip itself
        written = " ".join(part["text"] for part in parts if part["type"] == "text").split()
        assert set(written) <= {"one", "two", "three", "four"}
        out, prompt, _ = labelled(processor, conversation)
        first = parts[0]
        assert (first.get("text") or "<|s_") in prompt and out.endswith("<|im_end|>\n")
    # word "three" spans 0.4-0.7 s: frames 20..35 when it is spoken on its own
    sentence = example(sentences=[Span("one two", 0.0, 0.4), Span("three four", 0.4, 1.0)])
    conversation = render("interleaved", sentence, random.Random(1), RenderSettings(interleave="sentence"))
    units = [p for m in conversation for p in m["content"] if p["type"] == "units"][0]["units"]
    assert units in (UNITS[:20], UNITS[20:])


def test_text_replay(processor):
    out, prompt, _ = run("text", processor, example(audio=None))
    head = prompt.split("\n")[1].split("<|im_end|>")[0]  # the user turn: "<prompt> <first words>"
    instruction = next(p for p in PROMPTS["text"] if head.startswith(p))
    assert head[len(instruction) + 1:] + " " + out.removesuffix("<|im_end|>\n") == "one two three four"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out, _, _ = run("text", processor, example(messages=chat))
    assert out == "hello<|im_end|>\n"


def test_s2t_kl_takes_every_transcribed_clip_or_only_the_answered_ones():
    answered, unanswered = example(answer="a"), example(answer=None)
    assert eligible("s2t_kl", answered, RenderSettings()) and eligible("s2t_kl", unanswered, RenderSettings())
    only_answered = RenderSettings(s2t_kl_rows="answered")
    assert eligible("s2t_kl", answered, only_answered) and not eligible("s2t_kl", unanswered, only_answered)


@pytest.mark.parametrize(("task", "missing"), [("asr", "text"), ("tts", "units"), ("s2s_chain", "answer_units"),
                                               ("interleaved", "words"), ("s2t_kl", "text")])
def test_eligibility_follows_the_fields(task, missing):
    full = example(answer="a", answer_units=[1], words=[Span("one", 0, 0.5), Span("two", 0.5, 1)])
    settings = RenderSettings()
    assert eligible(task, full, settings)
    assert not eligible(task, example(**{**full.__dict__, missing: None}), settings)
    assert not eligible(task, example(**{**full.__dict__, "task": "text"}), settings) or task == "text"
    assert set(TASKS) == {"asr", "tts", "continuation", "s2t_instruct", "s2s_chain", "interleaved", "text", "s2t_kl"}
