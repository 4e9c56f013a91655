from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speechlm.cli import main
from speechlm.evaluation import (
    EvalItem,
    EvalSettings,
    answers_start_alike,
    batch_order,
    evaluate,
    read_eval_manifest,
    run_evaluation,
    sequence_log_likelihoods,
    summarize,
)
from tests.inference.conftest import save_speaking_model

EVAL_DATA = Path(__file__).parents[2] / "configs" / "eval"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny speaking model with 128 units, so that the shipped manifests' units fit its codebook."""
    return save_speaking_model(tmp_path_factory.mktemp("model"), num_speech_units=128)


@pytest.mark.parametrize("task", ["asr", "qa", "tts", "slm", "latency"])
def test_report_has_every_item_and_total(model_dir, tmp_path, task, capsys):
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(model_dir), "--task", task, "--data", str(EVAL_DATA / f"{task}.jsonl"),
                 "--out", str(out), "--max-new-tokens", "4", "--max-speech-units", "20", "--batch-size", "2"]) == 0
    report = json.loads(out.read_text())
    lines = (EVAL_DATA / f"{task}.jsonl").read_text().splitlines()
    assert [item["id"] for item in report["items"]] == [json.loads(line)["id"] for line in lines]
    assert len(report["data_sha256"]) == 64 and report["settings"]["max_new_tokens"] == 4
    expected = {"asr": {"wer", "cer", "substitutions", "deletions", "insertions"},
                "qa": {"speech_normalized", "text_normalized", "speech_to_text_contains", "speech_as_text"},
                "tts": {"unit_error_rate", "reference_units", "length_ratio_median", "length_within_20_percent"},
                "slm": {"accuracy_summed", "accuracy_length_normalized"},
                "latency": {"mean_first_text_s", "mean_first_audio_s", "mean_total_s", "mean_real_time_factor"}}[task]
    assert expected <= report["totals"].keys()
    assert "| metric | value |" in capsys.readouterr().out


def test_items_batch_by_length_and_come_back_in_the_manifests_order(model_dir):
    from speechlm.demo.job import load_trained

    texts = ["a much longer sentence to say", "hi", "a medium one", "ok"]
    items = [EvalItem(f"item-{i}", {"text": text, "units": [1, 2, 3]}) for i, text in enumerate(texts)]
    assert batch_order("tts", items) == [1, 3, 2, 0]
    assert batch_order("latency", items) == [0, 1, 2, 3]  # as a user's requests come
    clips = read_eval_manifest(EVAL_DATA / "asr.jsonl", "asr")
    sizes = [Path(item.fields["audio"]).stat().st_size for item in clips]
    assert [sizes[i] for i in batch_order("asr", clips)] == sorted(sizes)
    model, processor = load_trained(model_dir)
    settings = EvalSettings(batch_size=2, max_speech_units=20)
    _, results = evaluate(model, processor, "tts", items, settings, progress=False)
    assert [result["id"] for result in results] == [item.id for item in items]
    alone = [evaluate(model, processor, "tts", [item], settings, progress=False)[1][0] for item in items]
    assert [result["units"] for result in results] == [result["units"] for result in alone]


def test_asr_totals_recount_the_items(model_dir):
    report = run_evaluation(str(model_dir), "asr", str(EVAL_DATA / "asr.jsonl"))
    words = sum(item["word_errors"]["reference_length"] for item in report["items"])
    errors = sum(item["word_errors"]["substitutions"] + item["word_errors"]["deletions"]
                 + item["word_errors"]["insertions"] for item in report["items"])
    assert report["totals"]["reference_words"] == words
    assert report["totals"]["wer"] == pytest.approx(errors / words)


def test_qa_counts_spoken_answers_that_start_as_the_typed_ones():
    typed = "The capital of Italy is Rome. It is a city of history and art."
    assert answers_start_alike(typed, typed)
    assert answers_start_alike("The capital of Italy is Rome. It is a city of history and many", typed)  # 10 words
    assert not answers_start_alike("The capital of Italy is Florence. It is a city of history.", typed)
    assert not answers_start_alike("", typed)
    results = [{"speech": {"contains": True, "exact": False, "normalized": False},
                "text": {"contains": True, "exact": False, "normalized": False}, "speech_as_text": alike}
               for alike in (True, True, False, True)]
    assert summarize("qa", results)["speech_as_text"] == 0.75
    del results[0]["speech_as_text"]  # a report written before the figure: counts as not alike
    assert summarize("qa", results)["speech_as_text"] == 0.5


def test_tts_totals_say_where_responses_stop():
    results = [{"reference_units": [1] * 10, "units": [1] * length} for length in (5, 9, 10, 12, 30)]
    totals = summarize("tts", results)
    assert totals["length_ratio_median"] == pytest.approx(1.0)
    assert totals["length_within_20_percent"] == pytest.approx(3 / 5)  # 0.9, 1.0 and 1.2 are within


def test_log_likelihood_is_the_sum_over_next_tokens(model_dir):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    ((summed, count),) = sequence_log_likelihoods(model, processor, [{"units": [3, 1, 4]}])
    ids = processor.tokenizer("<|speech_start|><|s_3|><|s_1|><|s_4|><|speech_end|>", add_special_tokens=False).input_ids
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    assert count == 4
    assert summed == pytest.approx(sum(log_probs[i, ids[i + 1]].item() for i in range(4)), abs=1e-4)


def test_manifest_errors_name_file_line_and_field(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav", "text": "x"}\n')
    with pytest.raises(ValueError, match="m.jsonl line 1: audio file .*a.wav does not exist"):
        read_eval_manifest(manifest, "asr")
    manifest.write_text('{"id": "a", "text": "x"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl line 1: the asr task needs fields \['audio', 'text'\]; missing \['audio'\]"):
        read_eval_manifest(manifest, "asr")
    manifest.write_text('{"id": "a"\n')
    with pytest.raises(ValueError, match="m.jsonl line 1: not valid JSON"):
        read_eval_manifest(manifest, "slm")
    manifest.write_text('{"id": "a", "audio": "m.jsonl", "question": "q", "answers": []}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="(?s)2 problems.*'answers' must be a non-empty list.*line 2: the qa task"):
        read_eval_manifest(manifest, "qa")


def test_cli_reports_a_missing_manifest_in_one_line(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(model_dir), "--task", "asr", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.jsonl: no such manifest")


def test_two_processes_split_the_items_and_one_writes_the_report(model_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "report.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", "29731", "-m", "speechlm.cli", "eval", "--model", str(model_dir), "--task", "slm",
         "--data", str(EVAL_DATA / "slm.jsonl"), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["processes"] == 2
    assert [item["id"] for item in report["items"]] == ["word-order", "agreement", "units"]
    assert result.stdout.count("report written to") == 1


def test_tts_judge_transcribes_the_generated_speech(model_dir, tmp_path):
    from speechlm.evaluation import EvalSettings
    from tests.conftest import save_tiny_whisper

    judge = save_tiny_whisper(tmp_path / "judge.pt", n_vocab=51864, n_text_ctx=64)  # decodes <= 32 tokens
    settings = EvalSettings(judge=judge, max_speech_units=20, max_new_tokens=8)
    report = run_evaluation(str(model_dir), "tts", str(EVAL_DATA / "tts.jsonl"), settings)
    assert all("judge_transcript" in item for item in report["items"])
    assert "judge_wer" in report["totals"] and "reference_judge_wer" in report["totals"]
    assert all("reference_judge_transcript" in item and item["decoder"] == "speechtokenizer" for item in report["items"])
    assert all(len(item["units"]) <= 20 for item in report["items"])


def test_the_judge_cache_keeps_what_the_references_sound_like(tmp_path, monkeypatch):
    from speechlm import evaluation
    from speechlm.evaluation import EvalSettings, judged_references, load_judge
    from speechlm.finetune.demo_data import NARROW_CODEC
    from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec
    from speechlm.speech_io.config_errors import ConfigError
    from tests.conftest import save_tiny_whisper

    def codec_of(seed: int) -> SpeechTokenizerCodec:
        codec = SpeechTokenizerCodec.from_config(CodecConfig(**NARROW_CODEC), seed=seed)
        codec.fill_codebooks([np.random.default_rng(s).standard_normal(16000).astype(np.float32) * 0.1
                              for s in range(3)], seed=0)
        return codec

    path = save_tiny_whisper(tmp_path / "judge.pt", n_vocab=51864, n_text_ctx=64)
    judge, codec = load_judge(path), codec_of(0)
    references = [[1, 2, 3, 4, 5, 6], [7, 7, 8, 8, 9, 9]]
    fresh = judged_references(judge, EvalSettings(judge=path), codec, references)
    settings = EvalSettings(judge=path, judge_cache=str(tmp_path / "judged.json"))
    assert judged_references(judge, settings, codec, references) == fresh
    heard = []
    transcribe_batch = evaluation.transcribe_batch
    monkeypatch.setattr(evaluation, "transcribe_batch", lambda j, w: heard.append(len(w)) or transcribe_batch(j, w))
    assert judged_references(judge, settings, codec, [references[1], [3, 3, 3, 3]])[0] == fresh[1]
    assert heard == [1]  # only the new reference was judged
    other = codec_of(1)  # another decoder: the kept transcripts do not apply
    judged_references(judge, settings, other, references)
    assert heard == [1, 2]
    with pytest.raises(ConfigError, match="judge_cache='x.json': keeps what a judge heard; set judge= too"):
        EvalSettings(judge_cache="x.json")
    (tmp_path / "judged.json").write_text("{not json")
    with pytest.raises(ValueError, match="judged.json: not a JSON file of judged references"):
        judged_references(judge, settings, codec, references)


def test_the_judge_decodes_a_looping_transcript_again_at_the_next_temperature(tmp_path, monkeypatch):
    import whisper

    from speechlm.evaluation import load_judge, transcribe
    from tests.conftest import save_tiny_whisper

    judge = load_judge(save_tiny_whisper(tmp_path / "judge.pt", n_vocab=51864, n_text_ctx=64))
    decode, tried = whisper.decode, []

    def looping_when_greedy(model, mel, options):
        tried.append(options.temperature)
        result = decode(model, mel, options)
        if options.temperature == 0:  # greedy decodes a batch: a list of results
            return [dataclasses.replace(one, text="that " * 50, compression_ratio=9.0) for one in result]
        return result

    monkeypatch.setattr(whisper, "decode", looping_when_greedy)
    heard = transcribe(judge, torch.zeros(16000).numpy())
    assert tried[:2] == [0.0, 0.2] and heard != ("that " * 50).strip()
    assert transcribe(judge, torch.zeros(16000).numpy()) == heard  # seeded


def test_the_judge_hears_a_batch_as_it_hears_each_clip_alone(tmp_path, monkeypatch):
    import whisper

    from speechlm.evaluation import load_judge, transcribe, transcribe_batch
    from tests.conftest import save_tiny_whisper

    judge = load_judge(save_tiny_whisper(tmp_path / "judge.pt", n_vocab=51864, n_text_ctx=64))
    generator = torch.Generator().manual_seed(0)
    waves = [0.1 * torch.randn(16000 * seconds, generator=generator).numpy() for seconds in (1, 3, 2, 1, 2, 2)]
    decode, calls = whisper.decode, []

    def counting(model, mel, options):
        calls.append((mel.shape[0] if mel.ndim == 3 else "alone", mel.shape[-1]))
        result = decode(model, mel, options)
        if mel.ndim == 3:  # the third clip loops when greedy, as unclear speech does
            result = [dataclasses.replace(one, compression_ratio=9.0) if (len(calls), i) == (2, 1) else one
                      for i, one in enumerate(result)]
        return result

    monkeypatch.setattr(whisper, "decode", counting)
    heard = transcribe_batch(judge, waves, batch_size=2)
    # each clip in its own length and 5 s of silence, in whole 2 s: the 1 s clips in 6 s, the 2-3 s ones in 8 s;
    # greedy two at a time among clips of one window, the looping clip again alone
    assert [call for call in calls if call[0] != "alone"] == [(2, 600), (2, 800), (2, 800)] and len(heard) == 6
    assert calls[calls.index((2, 800)) + 1] == ("alone", 800)
    monkeypatch.setattr(whisper, "decode", decode)
    alone = [transcribe(judge, wave) for wave in waves]
    assert [heard[i] for i in (0, 1, 3, 4, 5)] == [alone[i] for i in (0, 1, 3, 4, 5)]
    assert transcribe_batch(judge, []) == []
    # an empty clip is heard as its window of silence, as a clip shorter than a mel frame is
    assert transcribe_batch(judge, [np.zeros(0, dtype=np.float32)]) == [transcribe(judge, np.zeros(100))]


def test_the_judge_must_take_short_windows(tmp_path):
    import whisper

    from speechlm.evaluation import transcribe_batch
    from tests.conftest import save_tiny_whisper

    stock = whisper.load_model(str(save_tiny_whisper(tmp_path / "judge.pt", n_vocab=51864, n_text_ctx=64)), device="cpu")
    with pytest.raises(TypeError, match=r"load_judge\(path\), not whisper.load_model"):
        transcribe_batch(stock, [np.zeros(16000, dtype=np.float32)])


def test_looping_answers_are_decoded_again_at_the_next_temperature(model_dir):
    from whisper.utils import compression_ratio

    from speechlm.evaluation import EvalSettings

    manifest = str(EVAL_DATA / "asr.jsonl")
    greedy = run_evaluation(str(model_dir), "asr", manifest, EvalSettings(max_new_tokens=24))
    assert greedy["totals"]["sampled"] == 0 and {item["temperature"] for item in greedy["items"]} == {0.0}
    # a tiny random model's greedy text repeats itself; those answers, and only those, are sampled again
    settings = EvalSettings(max_new_tokens=24, temperatures=(0.0, 1.0))
    fallback = run_evaluation(str(model_dir), "asr", manifest, settings)
    for before, after in zip(greedy["items"], fallback["items"], strict=True):
        loops = compression_ratio(before["hypothesis"]) > settings.compression_ratio_threshold
        assert after["temperature"] == (1.0 if loops else 0.0)
        assert (after["hypothesis"] == before["hypothesis"]) or loops
    assert fallback["totals"]["sampled"] == sum(item["temperature"] > 0 for item in fallback["items"]) > 0
    again = run_evaluation(str(model_dir), "asr", manifest, settings)  # seeded: a run repeats
    assert [item["hypothesis"] for item in again["items"]] == [item["hypothesis"] for item in fallback["items"]]


def test_tts_units_can_be_sampled_and_a_seeded_run_repeats(model_dir):
    manifest = str(EVAL_DATA / "tts.jsonl")
    greedy = run_evaluation(str(model_dir), "tts", manifest, EvalSettings(max_speech_units=20))
    settings = EvalSettings(max_speech_units=20, tts_temperature=1.0)
    sampled = run_evaluation(str(model_dir), "tts", manifest, settings)
    again = run_evaluation(str(model_dir), "tts", manifest, settings)
    assert [item["units"] for item in again["items"]] == [item["units"] for item in sampled["items"]]
    assert [item["units"] for item in sampled["items"]] != [item["units"] for item in greedy["items"]]
    with pytest.raises(ValueError, match=r"tts_temperature=-0.5: expected >= 0"):
        EvalSettings(tts_temperature=-0.5)


def test_temperatures_are_checked(tmp_path, capsys):
    from speechlm.evaluation import EvalSettings
    from speechlm.speech_io.config_errors import ConfigError

    with pytest.raises(ConfigError, match=r"invalid EvalSettings:\n  - temperatures=\(0.0, -1.0\): expected one or more"):
        EvalSettings(temperatures=(0.0, -1.0))
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path), "--task", "asr", "--data", "x.jsonl", "--temperatures", "0,hot"])
    assert "--temperatures: expected comma-separated numbers, got '0,hot'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--task", "asr", "--data", "x.jsonl", "--temperatures", "0,-1"]) == 2
    assert "temperatures=(0.0, -1.0): expected one or more temperatures >= 0" in capsys.readouterr().err


def test_evaluation_in_bfloat16_restores_the_weights_and_checks_the_dtype(model_dir, monkeypatch):
    from speechlm.adapters import modeling
    from speechlm.demo.job import load_trained

    monkeypatch.setattr(modeling, "native_bfloat16", lambda device_type: True)
    model, processor = load_trained(model_dir)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.language_model.dtype))
    items = [EvalItem("a", {"text": "hello there", "units": [1, 2, 3]})]
    totals, _ = evaluate(model, processor, "tts", items, EvalSettings(max_speech_units=8, lm_dtype="bfloat16"),
                         progress=False)
    assert seen and set(seen) == {torch.bfloat16} and totals["items"] == 1
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="lm_dtype='int8'"):
        EvalSettings(lm_dtype="int8")


def test_tts_measures_the_speech_decoder_where_the_codec_has_one(model_dir, tmp_path, capsys):
    import shutil

    from speechlm.speech_io.codec_loading import load_codec
    from tests.inference.conftest import add_tiny_speech_decoder

    decoding = tmp_path / "decoding"
    shutil.copytree(model_dir, decoding)
    add_tiny_speech_decoder(decoding)
    manifest = str(EVAL_DATA / "tts.jsonl")
    spoken = run_evaluation(str(decoding), "tts", manifest, EvalSettings(max_speech_units=20))
    decoder = load_codec(decoding / "codec").speech_decoder
    assert [item["units"] for item in spoken["items"]] == [decoder.speak(item["text"])[:20] for item in spoken["items"]]
    assert {item["speech_by"] for item in spoken["items"]} == {"decoder"}
    by_lm = run_evaluation(str(decoding), "tts", manifest, EvalSettings(max_speech_units=20, speech_by="lm"))
    plain = run_evaluation(str(model_dir), "tts", manifest, EvalSettings(max_speech_units=20))
    assert [item["units"] for item in by_lm["items"]] == [item["units"] for item in plain["items"]]
    assert {item["speech_by"] for item in by_lm["items"]} == {"lm"}
    with pytest.raises(ValueError, match=r"speech_by='nobody': expected one of \['auto', 'lm', 'decoder'\]"):
        EvalSettings(speech_by="nobody")
    assert main(["eval", "--model", str(decoding), "--task", "tts", "--data", manifest, "--speech-by", "lm",
                 "--max-speech-units", "20"]) == 0
    capsys.readouterr()
