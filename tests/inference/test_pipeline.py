from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
from transformers import pipeline

from speechlm.pipeline import SpeechLMInputError
from tests.inference.conftest import SAMPLE


@pytest.fixture(scope="module")
def pipe(speaking_dir):
    return pipeline("speechlm", model=str(speaking_dir))


@pytest.fixture(scope="module")
def sample():
    wave, rate = sf.read(SAMPLE, dtype="float32")
    return wave, rate


def test_every_audio_form_gives_the_same_answer(pipe, sample):
    wave, rate = sample
    settings = dict(text="What did you hear?", max_new_tokens=6)
    expected = pipe(str(SAMPLE), **settings)
    assert set(expected) == {"text", "audio"} and isinstance(expected["text"], str) and expected["audio"] is None
    for form in (SAMPLE.read_bytes(), {"array": wave, "sampling_rate": rate}, {"path": str(SAMPLE)}):
        assert pipe(form, **settings) == expected
    assert pipe(wave, sampling_rate=rate, **settings) == expected
    assert pipe({"audio": str(SAMPLE), "text": "What did you hear?"}, max_new_tokens=6) == expected
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": str(SAMPLE)},
                                                 {"type": "text", "text": "What did you hear?"}]}]
    assert pipe(conversation, max_new_tokens=6) == expected


def test_text_only_and_spoken_outputs(pipe):
    assert isinstance(pipe(text="Hello", max_new_tokens=4)["text"], str)
    spoken = pipe(text="Hello", output="speech", max_speech_units=10)
    assert spoken["text"] == "" and spoken["audio"]["sampling_rate"] == 16000
    assert spoken["audio"]["array"].dtype == np.float32 and 0 < spoken["audio"]["array"].size <= 10 * 320
    # generate_kwargs reach generate: sampling with different seeds answers differently.
    import torch

    answers = set()
    for seed in range(3):
        torch.manual_seed(seed)
        answers.add(pipe(text="Hello", max_new_tokens=8, generate_kwargs={"do_sample": True})["text"])
    assert len(answers) > 1


def test_a_list_is_batched_and_answers_as_one_at_a_time(pipe, sample):
    wave, rate = sample
    inputs = [{"audio": wave[: rate // 2 * (i + 1)], "text": "hm"} if i % 2 else {"text": "x" * (i + 1)}
              for i in range(5)]
    inputs = [{**item, "audio": {"array": item["audio"], "sampling_rate": rate}} if "audio" in item else item
              for item in inputs]
    settings = dict(output="text+speech", max_new_tokens=4, max_speech_units=8)
    batched = pipe(inputs, batch_size=4, **settings)
    single = [pipe(item, **settings) for item in inputs]
    assert len(batched) == 5
    for b, s in zip(batched, single, strict=True):
        assert b["text"] == s["text"]
        np.testing.assert_allclose(b["audio"]["array"], s["audio"]["array"], atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    ("missing.wav", "input 1: 'missing.wav' is not an audio file"),
    (np.zeros(16000, dtype=np.float32), "input 1 \\(array \\(16000,\\)\\): a bare array needs sampling_rate"),
    (np.zeros(10, dtype=np.float32), None),
    ({"foo": 1}, "input 1: a dict with keys \\['foo'\\]"),
    (b"not audio", "input 1 \\(9 bytes\\): not readable as audio"),
    (3, "input 1 \\(int\\): cannot load audio from a int"),
    ({"text": 5}, "input 1: text must be a string"),
])
def test_a_bad_input_is_named(pipe, bad, message):
    if message is None:  # an array too short to hear
        with pytest.raises(SpeechLMInputError, match="input 1 .*shorter than one encoder frame"):
            pipe([{"text": "fine"}, {"audio": {"array": bad, "sampling_rate": 16000}}])
        return
    with pytest.raises(SpeechLMInputError, match=message):
        pipe([{"text": "fine"}, bad])


def test_a_single_bad_input_and_bad_arguments(pipe):
    with pytest.raises(SpeechLMInputError, match="^input: no audio and no text"):
        pipe(None)
    with pytest.raises(TypeError, match="generate_kwargs"):
        pipe(text="hi", temperature=0.5)


def test_fresh_processes_load_saved_directories(speaking_dir, lora_dir, tmp_path):
    """Adapter-only (LoRA over a local base) and merged checkpoints, in a process that only imports speechlm."""
    from speechlm.finetune.hub import merge_checkpoint

    merged = merge_checkpoint(lora_dir, tmp_path / "merged")
    script = textwrap.dedent(f"""
        import json, sys
        import speechlm
        from transformers import AutoModelForCausalLM, AutoProcessor, pipeline
        from speechlm.responding import respond
        out = {{}}
        for name, path in (("lora", {str(lora_dir)!r}), ("merged", {str(merged)!r}), ("speaking", {str(speaking_dir)!r})):
            pipe = pipeline("speechlm", model=path)
            reply = pipe({str(SAMPLE)!r}, text="hm", output="text+speech", max_new_tokens=5, max_speech_units=6)
            direct = respond(AutoModelForCausalLM.from_pretrained(path), AutoProcessor.from_pretrained(path),
                             audio={str(SAMPLE)!r}, text="hm", output="text+speech", max_new_tokens=5,
                             max_speech_units=6)
            out[name] = [reply["text"], reply["audio"]["array"].tolist(), direct.text, direct.audio.tolist()]
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for text, audio, direct_text, direct_audio in out.values():
        assert text == direct_text and np.allclose(audio, direct_audio, atol=1e-5)
    # Merging LoRA changes nothing the model says.
    assert out["lora"][0] == out["merged"][0] and np.allclose(out["lora"][1], out["merged"][1], atol=1e-4)


@pytest.fixture(scope="module")
def gated_pipe(tmp_path_factory):
    """A pipeline over LoRA gated to audio rows (its B factors non-zero): the model holds per-call state."""
    from tests.inference.conftest import save_speaking_model

    directory = save_speaking_model(tmp_path_factory.mktemp("gated"), lora_b_std=0.5, mode="lora",
                                    lora_scope="audio")
    return pipeline("speechlm", model=str(directory))


def test_threads_calling_one_pipeline_get_what_each_call_gets_alone(gated_pipe, sample):
    from concurrent.futures import ThreadPoolExecutor

    pipe = gated_pipe
    wave, rate = sample
    inputs = [{"audio": {"array": wave[: rate // 4 * (i + 1)], "sampling_rate": rate}, "text": "hm"} if i % 2
              else {"text": "y" * (i + 1)} for i in range(8)]
    alone = [pipe(item, max_new_tokens=6, output="text+speech" if i == 3 else "text") for i, item in enumerate(inputs)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda i: pipe(inputs[i], max_new_tokens=6,
                                                output="text+speech" if i == 3 else "text"), range(8)))
    for one, other in zip(alone, together, strict=True):
        assert one["text"] == other["text"]
        assert (one["audio"] is None) == (other["audio"] is None)
        if one["audio"] is not None:
            np.testing.assert_array_equal(one["audio"]["array"], other["audio"]["array"])


def resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_resident_memory_settles_over_200_calls(pipe, sample):
    import gc

    wave, rate = sample
    rng = np.random.default_rng(0)
    sizes = []
    for call in range(200):  # a new clip every call: a server never hears the same one twice
        clip = wave[: rate // 2] + rng.normal(0, 1e-3, rate // 2).astype(np.float32)
        pipe({"audio": {"array": clip, "sampling_rate": rate}, "text": "hm"}, max_new_tokens=4)
        if call in (49, 199):
            gc.collect()
            sizes.append(resident_bytes())
    growth = sizes[1] - sizes[0]
    print(f"resident memory after 50 calls {sizes[0] / 2**20:.1f} MiB, after 200 {sizes[1] / 2**20:.1f} MiB")
    assert growth < 8 * 2**20, f"grew {growth / 2**20:.1f} MiB over the last 150 calls"
