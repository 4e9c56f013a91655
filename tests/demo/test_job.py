"""The quick start's main job at CI size: the same steps as `make demo` on a few dozen clips."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.demo.conftest import needs_demo_packages


def test_spread_picks_evenly_through_the_sources():
    from speechlm.demo.job import spread

    rows = [f"templates-{i}" for i in range(6)] + [f"questions-{i}" for i in range(3)]
    assert spread(rows, 3) == ["templates-0", "templates-3", "questions-0"]
    assert spread(rows, 20) == rows


def test_the_job_speaks_as_many_training_clips_as_its_plan_draws_unless_told(tmp_path, monkeypatch):
    from speechlm.configfile import read_yaml
    from speechlm.demo import __main__ as demo_main
    from speechlm.demo import job

    recipe = read_yaml(job.JobSettings().recipe)
    assert job.spoken_training_clips(job.JobSettings(), recipe) == recipe["data"]["num_samples"] == 960
    assert job.spoken_training_clips(job.JobSettings(overrides=["data.num_samples=100"]), recipe) == 100
    assert recipe["data"]["num_samples"] == 960  # the recipe itself as it was
    assert job.spoken_training_clips(job.JobSettings(spoken_train_clips=7, overrides=["data.num_samples=100"]),
                                     recipe) == 7
    assert job.spoken_training_clips(job.JobSettings(overrides=["data.num_samples=null"]), recipe) is None
    # a CTC pre-alignment reads every clip with a transcript
    assert job.spoken_training_clips(job.JobSettings(overrides=["alignment.max_steps=50"]), recipe) is None
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match=rf"spoken_train_clips={bad!r}: expected a number of training clips >= 1"):
            job.spoken_training_clips(job.JobSettings(spoken_train_clips=bad), recipe)
    with pytest.raises(ValueError, match=r"data.num_samples=0: expected a number of training clips >= 1"):
        job.spoken_training_clips(job.JobSettings(overrides=["data.num_samples=0"]), recipe)
    settings = []
    monkeypatch.setattr(demo_main, "run_job", settings.append)
    assert demo_main.main(["run", "--out", "o", "--spoken-train-clips", "12"]) == 0
    assert demo_main.main(["run", "--out", "o"]) == 0
    assert [s.spoken_train_clips for s in settings] == [12, None]


def test_training_texts_left_unspoken_get_no_units_and_stay_text(tmp_path):
    from speechlm.demo import job

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = {"train": [{"id": f"t{i}", "text": f"text {i}", **({"audio": f"audio/t{i}.flac"} if i % 2 else {})}
                      for i in range(8)],
            "heldout": [{"id": "h0", "text": "held out", "audio": "audio/h0.flac"}],
            "ood": [{"id": "o0", "text": "other", "audio": "audio/o0.flac"}]}
    for split, split_rows in rows.items():
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in split_rows))
    assets = dataclasses.replace(stand_in_assets(tmp_path), **{split: str(corpus / f"{split}.jsonl") for split in rows})
    read = job.corpus_rows(assets)
    assert [row.get("audio") for row in read["train"][:2]] == [None, str((corpus / "audio/t1.flac").resolve())]
    manifests = job.split_for_units(read, tmp_path / "data", train_units=2, heldout_units=1)
    units = [json.loads(line)["id"] for line in manifests["train-units"].read_text().splitlines()]
    text = [json.loads(line)["id"] for line in manifests["train-text"].read_text().splitlines()]
    assert units == ["t1", "t5"] and sorted(units + text) == sorted(row["id"] for row in rows["train"])


def test_units_are_kept_per_manifest_and_codec(tmp_path):
    from speechlm.demo.job import units_dir

    manifest, codec = tmp_path / "train-units.jsonl", tmp_path / "codec"
    codec.mkdir()
    manifest.write_text('{"id": "a"}\n')
    (codec / "SpeechTokenizer.pt").write_bytes(b"weights")
    first = units_dir(manifest, codec)
    (codec / "vocoder-rvq1").mkdir()  # a vocoder decodes: the units stay the encoder's
    (codec / "README.md").write_text("a vocoder trained for 9.8 minutes")  # describes, does not encode
    assert units_dir(manifest, codec) == first
    assert first.parent == tmp_path and first.name.startswith("train-units-") and units_dir(manifest, codec) == first
    (codec / "SpeechTokenizer.pt").write_bytes(b"weights of a codec rebuilt from another corpus")
    second = units_dir(manifest, codec)
    manifest.write_text('{"id": "b"}\n')
    assert len({first, second, units_dir(manifest, codec)}) == 3


@needs_demo_packages
def test_main_job_trains_and_reports_every_metric(tmp_path, demo_cache, monkeypatch):
    from speechlm.adapters.reading_cache import ReadingCache
    from speechlm.demo import job
    from speechlm.demo.job import HEADLINE, JobSettings, run_job
    from speechlm.evaluation import EvalSettings
    from speechlm.speech_io.audio import load_audio

    rates = []  # the speaking rate each evaluation's model speaks at
    dtypes = []  # the LM's dtype each evaluation gives each task
    evaluate_all = job.evaluate_all

    def recording(model, processor, eval_sets, settings_of, *args, **kwargs):
        rates.append(model.config.speech_units_per_character)
        dtypes.append({task: settings_of(task).lm_dtype for task, _ in eval_sets.values()})
        return evaluate_all(model, processor, eval_sets, settings_of, *args, **kwargs)

    monkeypatch.setattr(job, "evaluate_all", recording)

    settings = JobSettings(out=str(tmp_path / "out"), size="ci", cache=str(demo_cache), max_minutes=None,
                           curve_every_minutes=0.5, curve_items=4, tts_items=4, tts_train_clips=16,
                           overrides=["training.max_steps=16", "training.per_device_train_batch_size=4",
                                      "data.num_samples=64", "training.logging_steps=1",
                                      "training.learning_rate=0.003"],
                           eval=EvalSettings(batch_size=8, max_new_tokens=24, max_speech_units=100))
    report = run_job(settings, progress=lambda _: None)

    losses = [point["loss"] for point in report["training"]["losses"]]
    assert report["training"]["steps"] == 16 and len(losses) == 16
    # Every step logs its loss and each task's. That training learns is asserted on a fixed batch in
    # tests/finetune/test_train.py: here 16 batches of a real backbone, whose prompts already hold Whisper's
    # transcript, are noise (ASR 0.1-2.2 a batch in one run; a falling-ASR check failed two clean-clone runs).
    assert all(0 < loss < 20 for loss in losses), losses
    drawn = {task for point in report["training"]["losses"] for task in point["tasks"]}
    assert {"asr", "s2t_instruct"} <= drawn, drawn
    for name, metric, _ in HEADLINE:
        assert metric in report["after"][name], (name, metric)
        # Whisper base judges the trained model's speech only: the untrained one's is babble it loops on.
        assert (metric in report["before"][name]) == ("judge" not in metric), (name, metric)
    assert report["text_answers_unchanged"] is True  # LoRA acts on audio rows only: text answers stay
    assert report["alignment"] is None  # the recipe's whisper reader needs no CTC pre-alignment
    spoken = report["spoken_train_clips"]  # the ci corpus's codec trains here: every clip is spoken
    assert spoken["clips"] == spoken["of"] > 0
    # the untrained model speaks in the same length window as the trained one (the rate is the data's, not learned)
    assert len(rates) == 2 and rates[0] is not None and rates[0] == rates[1]
    # transcripts and speech with the LM in bfloat16, free answers (and the typed answers' check) as trained
    assert dtypes == [{"asr": "bfloat16", "qa": None, "tts": "bfloat16"}] * 2
    assert report["eval_bfloat16_tasks"] == ["asr", "tts"]
    curve = report["training"]["curve"]  # untrained, ..., after training
    assert curve[0]["step"] == 0 and curve[0]["minutes"] == 0 and curve[-1]["step"] == 16
    assert report["training"]["minutes"] == pytest.approx(curve[-1]["minutes"], abs=0.05)  # not the evaluation's
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["after"] == report["after"]
    markdown = (out / "report.md").read_text()
    assert "asr/ood" in markdown and "unit_error_rate" in markdown
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert load_audio(out / "answer.wav").shape[0] > 0
    assert report["answer"]["decoder"] == "vocoder"  # whisper units: the vocoder trained for them decodes
    assert report["answer"]["speech_by"] == "decoder"  # the assets' speech decoder speaks what the LM writes
    assert "speech decoder (`speech-decoder/` in its folder) spoke it" in markdown
    assert isinstance(report["answer"]["judge_heard"], str) and "Whisper base hears" in markdown
    assert (out / "model" / "processor_config.json").is_file()
    saved = json.loads((out / "model" / "config.json").read_text())["projector_config"]
    assert saved["reader_prompt"] is None  # Whisper hears each clip unprompted (the corpus's names cost ood WER)
    # the backbone ranks Whisper's beam after training transcripts, and the model keeps them
    assert saved["reader_lm_context"].startswith("Things users have said:\n")
    # every clip's reading is kept in the cache for the next run: the training clips (read ahead) and the
    # evaluation's, which the reader reads with the model's own beam
    kept = ReadingCache()
    assert kept.load(demo_cache / job.READINGS_FILE.format(size="ci")) >= report["read_ahead"]["clips"] + 1


def test_a_missing_recipe_fails_before_the_assets(tmp_path, monkeypatch):
    from speechlm.configfile import ConfigFileError
    from speechlm.demo import job

    monkeypatch.setattr(job, "check_runtime_packages", lambda: None)
    monkeypatch.setattr(job, "build_demo_assets", lambda *args, **kwargs: pytest.fail("assets built first"))
    with pytest.raises(ConfigFileError, match="nowhere.yaml: no such config file"):
        job.run_job(job.JobSettings(recipe=str(tmp_path / "nowhere.yaml"), out=str(tmp_path / "out")))


def test_the_default_recipe_is_found_from_any_working_directory(tmp_path, monkeypatch):
    from speechlm.configfile import read_yaml
    from speechlm.demo import job

    monkeypatch.chdir(tmp_path)  # no configs/ here: the source tree's recipe
    recipe = Path(job.JobSettings().recipe)
    assert recipe.is_absolute() and read_yaml(recipe)["model"]["projector"]["reader"] == "whisper"
    edited = tmp_path / job.QUICK_START_RECIPE  # a checkout's own copy wins
    edited.parent.mkdir(parents=True)
    edited.write_text("model: {}\n")
    assert job.JobSettings().recipe == job.QUICK_START_RECIPE


def test_the_command_line_can_skip_the_untrained_evaluation(monkeypatch):
    from speechlm.demo import __main__ as demo_main

    settings = []
    monkeypatch.setattr(demo_main, "run_job", settings.append)
    assert demo_main.main(["run", "--out", "o", "--no-untrained-eval", "training.max_steps=5"]) == 0
    assert demo_main.main(["run", "--out", "o", "--read-again"]) == 0
    assert [s.evaluate_untrained for s in settings] == [False, True]
    assert [s.keep_readings for s in settings] == [True, False]
    assert settings[0].overrides == ["training.max_steps=5"]


def test_the_recipe_says_how_many_minutes_the_job_trains_unless_it_is_told(tmp_path):
    from speechlm.configfile import read_yaml
    from speechlm.demo import job

    assets = stand_in_assets(tmp_path)
    recipe = read_yaml(job.JobSettings().recipe)
    recipe["training"]["max_minutes"] = 4.5  # a user's edit of the recipe is what runs

    def minutes(**settings) -> float:
        config, _ = job.job_config(recipe, assets, ["train"], tmp_path, job.JobSettings(**settings))
        return config.training.max_minutes

    assert minutes() == 4.5
    assert minutes(max_minutes=2.0) == 2.0  # --max-minutes
    assert minutes(max_minutes=2.0, overrides=["training.max_minutes=3"]) == 3.0


def test_a_report_without_the_untrained_evaluation_says_so():
    from speechlm.demo.job import format_report

    after = {"asr/heldout": {"wer": 0.05, "items": 245}}
    report = {"machine": {"cpus": 2, "processor": "x86_64", "torch": "2", "cuda": False}, "alignment": None,
              "training": {"steps": 3, "minutes": 1.0, "first_loss": 5.0, "last_loss": 1.0, "curve_items": 4,
                           "curve": []},
              "before": {}, "after": after, "text_answers_unchanged": None,
              "answer": {"question": "Is snow white?", "text": "Yes.", "units": 9, "wav": "answer.wav"},
              "seconds": {"train": 60.0}, "eval_seconds": {"before": {}, "after": {"asr/heldout": 41.5}}}
    text = format_report(report)
    assert "| asr/heldout (245 items) | wer | n/a | 0.0500 |" in text
    assert "Evaluation after training, seconds per set: asr/heldout 41.5" in text
    assert "Evaluation before" not in text
    assert "Evaluation settings" not in text  # a report written before they were kept
    assert "Machine: 2 CPUs (x86_64), torch 2, CUDA False." in text
    report["machine"].update(cpu_capability="AVX2", native_bfloat16=False)
    assert "CUDA False, CPU AVX2 without native bfloat16 (float32 throughout)." in format_report(report)
    report["machine"].update(cpu_capability="AVX512", native_bfloat16=True)
    assert "CUDA False, CPU AVX512 with native bfloat16." in format_report(report)


def test_the_report_names_the_evaluation_settings_that_differ_from_the_defaults():
    from dataclasses import asdict

    from speechlm.demo.job import JobSettings, _eval_settings_lines

    settings = JobSettings(recipe="r.yaml", out="out")
    lines = _eval_settings_lines({task: asdict(settings.eval_settings(task)) for task in ("asr", "qa")})
    assert lines[0] == ("Evaluation settings besides the defaults: asr: batch_size=40, max_speech_units=400, "
                        "lm_dtype='bfloat16'; qa: batch_size=40, max_speech_units=400")


def test_the_reader_ranks_in_a_context_of_training_transcripts_unless_the_recipe_gives_one(tmp_path):
    from speechlm.adapters.text_scoring import CONTEXT_HEADING
    from speechlm.configfile import read_yaml
    from speechlm.demo import job

    assets = stand_in_assets(tmp_path)
    texts = [f"Training sentence {i}." for i in range(300)]

    def context(recipe=None, texts=texts, **settings) -> str | None:
        recipe = recipe or read_yaml(job.JobSettings().recipe)
        config, _ = job.job_config(recipe, assets, ["train"], tmp_path, job.JobSettings(**settings), train_texts=texts)
        return config.model.projector.get("reader_lm_context")

    drawn = context()
    heading, *lines = drawn.split("\n")
    assert heading == CONTEXT_HEADING and len(lines) == job.JobSettings().reader_context_sentences == 100
    assert set(lines) <= set(texts)
    assert context(reader_context_sentences=5).count("\n") == 5
    assert context(reader_context_sentences=0) is None and context(texts=[]) is None
    assert context(overrides=["model.projector.reader_lm_context=Priya and Mei"]) == "Priya and Mei"
    own = read_yaml(job.JobSettings().recipe)
    own["model"]["projector"]["reader_lm_context"] = "A recipe's own context."
    assert context(own) == "A recipe's own context."


def stand_in_assets(cache: Path):
    """Assets a recipe can be resolved against without building any (names, not files)."""
    from speechlm.demo.build import DemoAssets

    return DemoAssets(cache=str(cache), text_model="lm", audio_encoder="whisper.pt", codec="codec", corpus="corpus",
                      train="train", heldout="heldout", ood="ood", card="CORPUS.md", seconds={})
