"""The quick start's main job: real weights, a synthesized corpus, stage-1 training, evaluation before and
after, and a report.

    python -m speechlm.demo run --recipe configs/smollm2-135m/stage1_align.yaml --out out/demo

Steps, each reusing what an earlier run left in the cache: build the assets (SmolLM2-135M-Instruct,
Whisper base, the Piper corpus, the codec); extract the speech units of the training and held-out clips
(`speechlm prepare`); build the SpeechLM from the recipe; evaluate it untrained; train, measuring held-out
WER every few minutes of training (the learning curve); save; evaluate again; write ``report.json``,
``report.md``, ``curves.png`` and ``answer.wav`` (the trained model answering a held-out spoken question).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from speechlm.demo.assets import STAMP, check_runtime_packages, sha256_of
from speechlm.demo.build import DemoAssets, build_demo_assets
from speechlm.demo.corpus_texts import ANSWER_SYSTEM_PROMPT
from speechlm.evaluation import (
    EvalItem,
    EvalSettings,
    evaluate,
    load_judge,
    read_eval_manifest,
    summarize,
    transcribe,
)
from speechlm.finetune.examples import read_jsonl
from speechlm.finetune.prepared import FORMAT_VERSION
from speechlm.finetune.trainer import TrainingClock

# Metrics in the report: (eval set, task, total) and whether lower is better.
HEADLINE = (("asr/heldout", "wer", True), ("asr/ood", "wer", True), ("qa/heldout", "speech_contains", False),
            ("qa/heldout", "text_contains", False), ("qa/heldout", "speech_to_text_contains", False),
            ("qa/heldout", "speech_as_text", False), ("qa/ood", "speech_contains", False),
            ("qa/ood", "text_contains", False), ("qa/ood", "speech_to_text_contains", False),
            ("qa/ood", "speech_as_text", False), ("tts/heldout", "unit_error_rate", True),
            ("tts/heldout", "length_within_20_percent", False), ("tts/heldout", "judge_wer", True),
            ("tts/heldout", "reference_judge_wer", True), ("tts/ood", "unit_error_rate", True),
            ("tts/ood", "length_within_20_percent", False), ("tts/ood", "judge_wer", True),
            ("tts/ood", "reference_judge_wer", True))


QUICK_START_RECIPE = "configs/smollm2-135m/stage1_align.yaml"
READINGS_FILE = "readings-{size}.safetensors"  # in the cache, per corpus size: `JobSettings.keep_readings`
JUDGED_REFERENCES_FILE = "judged-references-{size}.json"  # what the judge heard of the tts references, likewise


def quick_start_recipe() -> str:
    """The quick start's recipe: the working directory's copy (a user's edited checkout), else the one in
    the source tree this package runs from (`make demo` run from elsewhere, an editable install)."""
    here = Path(QUICK_START_RECIPE)
    source_tree = Path(__file__).resolve().parents[2] / QUICK_START_RECIPE
    if here.is_file() or not source_tree.is_file():
        return str(here)  # if neither exists, reading it names the path the user would expect
    return str(source_tree)


@dataclass
class JobSettings:
    recipe: str = field(default_factory=quick_start_recipe)
    out: str = "out/demo"
    size: str = "full"
    cache: str | None = None
    overrides: list[str] = field(default_factory=list)  # recipe overrides, key.sub=value
    max_minutes: float | None = None  # training stops here (None: the recipe's training.max_minutes)
    curve_every_minutes: float = 2.5  # a learning-curve point every this many minutes of training
    curve_items: int = 64  # held-out clips (spread over the split) per learning-curve point; the final
                          # figures use every clip
    tts_items: int = 40  # clips of each held-out split the tts task speaks (each a ~150-unit generation)
    # Training clips whose speech units are extracted for the tts task (whisper units: ~20 clips a second on 2
    # cores; a published-size SpeechTokenizer encodes ~2, so all ~2,000 would take it a quarter of an hour).
    tts_train_clips: int = 400
    # Training clips Piper speaks; the rest of the training split stays text (`build_corpus`'s spoken_train). None:
    # as many as the recipe's data.num_samples, the most its plan can draw (all where it sets none, or where a CTC
    # pre-alignment reads every clip): the quick start's 960 draws heard 567 distinct clips of 1,928 spoken, and 487
    # of the 960 now; ~5 of a from-empty job's minutes went to speaking clips no step heard. Where the codec trains
    # here (`train_codec`, or a corpus size the shipped codec was not made for) every clip is spoken: it hears them.
    spoken_train_clips: int | None = None
    # What the frozen Whisper encoder and reader make of every clip (training and evaluation), kept in the cache
    # (READINGS_FILE) between runs: a re-run on the same corpus reads no clip again (~7 minutes on 2 cores); and
    # what the judge heard of the tts references (JUDGED_REFERENCES_FILE: `EvalSettings.judge_cache`)
    keep_readings: bool = True
    # Training transcripts the backbone reads before each of Whisper's transcripts it ranks (the reader's
    # `reader_lm_context`, unless the recipe gives its own; 0: none): it prefers what this corpus says among
    # what Whisper heard (held-out WER 3.62 -> 2.74% on np87's clips, ood 6.88 -> 7.37%, at the recipe's weight
    # 0.7; 30 sentences 2.99-3.14%, BENCHMARKS.md)
    reader_context_sentences: int = 100
    # False: no evaluation of the untrained model (the report's "before" is empty), for variants of a recipe
    # compared after training; their untrained models are the same backbone and encoder
    evaluate_untrained: bool = True
    # True: the codec (vocoder and speech decoder) trained on the corpus, not the one the package ships for it
    train_codec: bool = False
    eval: EvalSettings = field(default_factory=lambda: EvalSettings(batch_size=40,
                                                                      max_speech_units=400))
    # Evaluated with the LM's weights in bfloat16 (`EvalSettings.lm_dtype`, where the CPU has it natively): the
    # same transcripts and TTS figures in 0.5-0.7x the time. QA keeps float32: 64-token free answers drift in
    # bfloat16 (a third of them differ, typed ones too), and its typed answers are the base model's check.
    bfloat16_tasks: tuple[str, ...] = ("asr", "tts")

    def eval_settings(self, task: str) -> EvalSettings:
        """The evaluation settings of ``task`` (the learning curve's: asr)."""
        return replace(self.eval, lm_dtype="bfloat16") if task in self.bfloat16_tasks else self.eval


def spoken_training_clips(settings: JobSettings, recipe_yaml: dict) -> int | None:
    """The training clips the job asks Piper to speak (`JobSettings.spoken_train_clips`): the user's number, else
    the recipe's ``data.num_samples`` after the overrides; None (all) where it sets none or where a CTC
    pre-alignment (``alignment.max_steps`` > 0) reads every clip with a transcript. Either number is checked here,
    before anything is built."""
    from speechlm.configfile import apply_overrides

    chosen, where = settings.spoken_train_clips, "spoken_train_clips"
    if chosen is None:
        resolved = apply_overrides(copy.deepcopy(recipe_yaml), settings.overrides)
        if ((resolved.get("alignment") or {}).get("max_steps") or 0) > 0:
            return None
        chosen, where = (resolved.get("data") or {}).get("num_samples"), "data.num_samples"
    if chosen is not None and (isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 1):
        raise ValueError(f"{where}={chosen!r}: expected a number of training clips >= 1 (--spoken-train-clips), "
                         "or none for the recipe's data.num_samples")
    return chosen


# -- evaluation sets ------------------------------------------------------------------------------------

def corpus_rows(assets: DemoAssets) -> dict[str, list[dict]]:
    """``train``, ``heldout`` and ``ood`` manifest rows, audio paths made absolute (so that ``speechlm eval``
    runs on the manifests written from them, from anywhere); a training text left unspoken has none."""
    return {split: _rows(Path(getattr(assets, split))) for split in ("train", "heldout", "ood")}


def split_for_units(rows: dict[str, list[dict]], out: Path, train_units: int, heldout_units: int) -> dict[str, Path]:
    """Manifests of the clips whose units are extracted, spread over the sources: ``train-units`` (tts
    training, of the spoken clips), ``heldout-units`` and ``ood-units`` (tts references); ``train-text``: the rest
    of the training split, for the tasks that need no units. Deterministic, so that `prepare` reuses its output."""
    out.mkdir(parents=True, exist_ok=True)
    train, heldout, ood = rows["train"], rows["heldout"], rows["ood"]
    with_units = spread([row for row in train if "audio" in row], train_units)
    chosen = {row["id"] for row in with_units}
    rest = [row for row in train if row["id"] not in chosen]
    manifests = {"train-units": _write_jsonl(out / "train-units.jsonl", with_units),
                 "heldout-units": _write_jsonl(out / "heldout-units.jsonl", spread(heldout, heldout_units)),
                 "ood-units": _write_jsonl(out / "ood-units.jsonl", spread(ood, heldout_units))}
    if rest:
        manifests["train-text"] = _write_jsonl(out / "train-text.jsonl", rest)
    return manifests


def units_dir(manifest: Path, codec: Path) -> Path:
    """Where `prepare` puts the units of ``manifest``: beside it, named by its content and the codec's
    files, so that another selection, corpus or codec (a new corpus rebuilds the codec) gets its own."""
    # The codec's weights and config: its vocoders (folders) decode, and its README and build stamp describe
    # (the vocoder's training minutes among them); none changes what the encoder gives.
    codec_files = "".join(f"{path.name}={sha256_of(path)}" for path in sorted(codec.iterdir())
                          if path.is_file() and path.name not in ("README.md", STAMP))
    # The prepared format too: a folder an older speechlm prepared is prepared anew beside it, not refused.
    stamp = f"{codec_files}format={FORMAT_VERSION}"
    digest = hashlib.sha256(manifest.read_bytes() + stamp.encode()).hexdigest()[:12]
    return manifest.with_name(f"{manifest.stem}-{digest}")


def _rows(manifest: Path) -> list[dict]:
    rows = read_jsonl(manifest)
    for row in rows:
        if "audio" in row:
            row["audio"] = str((manifest.parent / row["audio"]).resolve())
    return rows


def write_eval_sets(corpus: dict[str, list[dict]], units: dict[str, list[int]], out: Path) -> dict[str, tuple[str, Path]]:
    """``name -> (task, manifest)``: ASR on both held-out splits, spoken QA on their questions with known
    answers, TTS on the clips that have ``units`` (id -> reference units from `speechlm prepare`)."""
    out.mkdir(parents=True, exist_ok=True)
    sets: dict[str, tuple[str, Path]] = {}
    for split in ("heldout", "ood"):
        rows = corpus[split]
        asr = [{"id": r["id"], "audio": r["audio"], "text": r["text"]} for r in rows]
        qa = [{"id": r["id"], "audio": r["audio"], "question": r["text"], "answers": r["expected"]}
              for r in rows if r.get("expected")]
        sets[f"asr/{split}"] = ("asr", _write_jsonl(out / f"asr-{split}.jsonl", asr))
        sets[f"qa/{split}"] = ("qa", _write_jsonl(out / f"qa-{split}.jsonl", qa))
        tts = [{"id": r["id"], "text": r["text"], "units": units[r["id"]]} for r in rows if r["id"] in units]
        sets[f"tts/{split}"] = ("tts", _write_jsonl(out / f"tts-{split}.jsonl", tts))
    return {name: value for name, value in sets.items() if value[1].stat().st_size}


def spread(items: list, count: int) -> list:
    """``count`` items evenly spaced through ``items`` (a manifest lists its sources one after another)."""
    if count >= len(items):
        return list(items)
    return [items[index * len(items) // count] for index in range(count)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluate_all(model, processor, eval_sets: dict[str, tuple[str, Path]], settings: Callable[[str], EvalSettings],
                 progress=print) -> dict[str, dict]:
    """``name -> {"totals", "items", "seconds"}`` for every eval set, each task with ``settings(task)``."""
    reports = {}
    for name, (task, manifest) in eval_sets.items():
        start = time.perf_counter()
        totals, items = evaluate(model, processor, task, read_eval_manifest(manifest, task), settings(task))
        reports[name] = {"totals": totals, "items": items, "seconds": round(time.perf_counter() - start, 1)}
        shown = {key: round(value, 4) if isinstance(value, float) else value for key, value in totals.items()}
        progress(f"[demo] {name}: {shown}")
    return reports


# -- the learning curve ---------------------------------------------------------------------------------

class LearningCurve(TrainerCallback):
    """Held-out WER every ``every_minutes`` of training by ``clock`` (the trainer's, which stops training at
    ``training.max_minutes``); the clock stands still while the curve's own evaluation runs."""

    def __init__(self, model, processor, items: list[EvalItem], settings: EvalSettings, *, every_minutes: float,
                 clock: TrainingClock, progress=print):
        self.model, self.processor, self.items, self.settings = model, processor, items, settings
        self.every_minutes, self.clock, self.progress = every_minutes, clock, progress
        self.points: list[dict] = []  # minutes, step, wer
        self.losses: list[dict] = []  # minutes, step, loss

    @property
    def minutes(self) -> float:
        return self.clock.minutes

    def start_from(self, untrained: list[dict]) -> None:
        """Training began before the Trainer (CTC pre-alignment, counted on the clock): the curve's first
        point is the untrained model's WER on its clips, taken from ``untrained`` (per-clip results of the
        full evaluation)."""
        chosen = {item.id for item in self.items}
        results = [result for result in untrained if result["id"] in chosen]
        self.points.append({"minutes": 0.0, "step": 0, "wer": summarize("asr", results)["wer"]})

    def on_train_begin(self, args, state, control, **kwargs):
        self._measure(state.global_step)  # untrained, or after CTC pre-alignment (its minutes already counted)

    def on_step_end(self, args, state, control, **kwargs):
        if self.minutes >= self.points[-1]["minutes"] + self.every_minutes:
            self._measure(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            tasks = {key.removeprefix("loss_"): value for key, value in logs.items() if key.startswith("loss_")}
            self.losses.append({"minutes": round(self.minutes, 3), "step": state.global_step, "loss": logs["loss"],
                                "tasks": tasks})

    def on_train_end(self, args, state, control, **kwargs):
        self.progress(f"[demo] {self.minutes:.1f} min of training: stopped at step {state.global_step}")
        if not self.points or self.points[-1]["step"] != state.global_step:
            self._measure(state.global_step)

    def _measure(self, step: int) -> None:
        with self.clock.paused():
            totals, _ = evaluate(self.model, self.processor, "asr", self.items, self.settings, progress=False)
        self.points.append({"minutes": round(self.minutes, 3), "step": step, "wer": totals["wer"]})
        self.progress(f"[demo] curve: {self.minutes:.1f} min, step {step}: held-out WER {totals['wer']:.4f} "
                      f"({len(self.items)} clips)")


# -- the job ------------------------------------------------------------------------------------------------

def run_job(settings: JobSettings, progress=print) -> dict:
    from speechlm.configfile import read_yaml
    from speechlm.finetune import recipe

    check_runtime_packages()  # before hours of work, not at the plot
    recipe_yaml = read_yaml(settings.recipe)  # a wrong path fails now, not after the assets
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    lap_start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal lap_start
        now = time.perf_counter()
        seconds[name] = round(now - lap_start, 1)
        lap_start = now

    spoken_train = spoken_training_clips(settings, recipe_yaml)
    assets = build_demo_assets(settings.size, settings.cache, train_codec=settings.train_codec,
                               spoken_train=spoken_train, progress=progress)
    lap("assets")
    if settings.eval.judge is None:  # Whisper base hears the trained model's tts answers and their references
        settings = replace(settings, eval=replace(settings.eval, judge=assets.audio_encoder))
    if settings.keep_readings and settings.eval.judge_cache is None:  # the references sound the same every run
        settings = replace(settings, eval=replace(
            settings.eval, judge_cache=str(Path(assets.cache) / JUDGED_REFERENCES_FILE.format(size=settings.size))))
    corpus = corpus_rows(assets)
    train_sources, reference_units = prepare_corpus(corpus, assets, settings, progress)
    lap("prepare")

    config, job_values = job_config(recipe_yaml, assets, train_sources, out, settings,
                                    train_texts=[row["text"] for row in corpus["train"]])
    model, tokenizer = recipe.build_model(config)
    processor = recipe.build_processor(config, model, tokenizer)
    readings = Path(assets.cache) / READINGS_FILE.format(size=settings.size)
    if settings.keep_readings and readings.is_file():
        progress(f"[demo] {model.reading_cache.load(readings)} readings of clips loaded from {readings}")
    eval_sets = write_eval_sets(corpus, reference_units, out / "eval-data")
    progress(f"[demo] {model.parameter_counts()}")
    # The speaking rate is the training pairs' statistic, not something learned: fitted before the untrained
    # model speaks, its responses keep to the same length window as the trained model's (and do not all run
    # to the unit cap), so the comparison is of what training taught
    examples = recipe.load_training_examples(config)
    recipe.fit_speaking_rate(config, model, examples)
    before = {}
    if settings.evaluate_untrained:
        progress("[demo] evaluating the untrained model")
        # Without the judge: an untrained model's units are babble, on which Whisper loops (5 minutes of the
        # quick start's evaluation, to say 300-500% WER); the references' ceiling is judged after training.
        before = evaluate_all(model, processor, eval_sets,
                              lambda task: replace(settings.eval_settings(task), judge=None, judge_cache=None), progress)
    lap("eval_before")

    curve_items = spread(read_eval_manifest(eval_sets["asr/heldout"][1], "asr"), settings.curve_items)
    training_clock = TrainingClock()
    curve = LearningCurve(model, processor, curve_items, settings.eval_settings("asr"),
                          every_minutes=settings.curve_every_minutes, clock=training_clock, progress=progress)
    dataset = recipe.build_datasets(config, processor, examples)
    ahead = recipe.read_ahead(config, model, processor, recipe.clips_to_read_ahead(config, examples, dataset))
    if ahead is not None:
        lap("read_ahead")
        progress(f"[demo] {ahead.summary()}")
    alignment = recipe.align(config, model, tokenizer, examples)
    if alignment is not None:  # its minutes are training minutes: the schedule and the stop count them
        training_clock.add(alignment.seconds)
        if before:
            curve.start_from(before["asr/heldout"]["items"])
        progress(f"[demo] {alignment.summary()}")
    trainer = recipe.build_trainer(config, model, processor, dataset, callbacks=[curve], clock=training_clock)
    result = recipe.train(config, trainer)
    training_minutes = curve.minutes  # the clock runs on through the evaluation after
    model_dir = recipe.save(config, trainer)
    lap("train")

    # Evaluate the saved model as a user loads it (the Trainer's model still runs under its bf16 autocast).
    reading_cache = model.reading_cache  # the same frozen encoder (and reader): what they read stays valid
    model, processor = load_trained(model_dir)
    model.reading_cache = reading_cache
    progress("[demo] evaluating the trained model")
    after = evaluate_all(model, processor, eval_sets, settings.eval_settings, progress)
    lap("eval_after")
    if settings.keep_readings:
        progress(f"[demo] {reading_cache.save(readings)} readings of clips kept in {readings}")
    # Whisper base (the judge) says what answer.wav sounds like, as it does for every tts answer.
    answer = spoken_answer(model, processor, eval_sets, out / "answer.wav", settings.eval, judge=settings.eval.judge)
    report = {
        "machine": machine(), "assets": asdict(assets), "recipe": settings.recipe,
        "job_settings": job_values, "overrides": settings.overrides,
        "spoken_train_clips": json.loads((Path(assets.corpus) / "build.json").read_text())["spoken_train"],
        "model": str(model_dir), "eval_sets": {name: str(path) for name, (_, path) in eval_sets.items()},
        "read_ahead": None if ahead is None else {**asdict(ahead), "summary": ahead.summary()},
        "alignment": None if alignment is None else {**asdict(alignment), "summary": alignment.summary()},
        "training": training_summary(result.global_step, training_minutes, curve),
        "before": {name: _without_nan(r["totals"]) for name, r in before.items()},
        "after": {name: _without_nan(r["totals"]) for name, r in after.items()},
        "text_answers_unchanged": text_answers_unchanged(before, after),
        "eval_bfloat16_tasks": list(settings.bfloat16_tasks),
        "eval_settings": {task: asdict(settings.eval_settings(task)) for task in dict.fromkeys(
            task for task, _ in eval_sets.values())},
        "answer": answer,
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
        # where the evaluations' minutes go, set by set
        "eval_seconds": {"before": {name: r["seconds"] for name, r in before.items()},
                         "after": {name: r["seconds"] for name, r in after.items()}},
    }
    write_report(report, before, after, out, progress)
    progress(f"[demo] trained model: {model_dir}")
    return report


def prepare_corpus(corpus: dict[str, list[dict]], assets: DemoAssets, settings: JobSettings, progress=print) -> tuple[list, dict]:
    """The corpus's splits with their speech units (`speechlm prepare`, cached by content): the training
    sources (units, and the text rows if any) and the held-out and ood clips' reference units."""
    from speechlm.finetune.prepare import prepare
    from speechlm.finetune.prepared import load_prepared

    manifests = split_for_units(corpus, Path(assets.cache) / f"demo-data-{settings.size}",
                                settings.tts_train_clips, settings.tts_items)
    prepared = {}
    for name in ("train-units", "heldout-units", "ood-units"):
        prepared[name] = units_dir(manifests[name], Path(assets.codec))
        progress(f"[demo] speech units of {manifests[name]} -> {prepared[name]}")
        # the corpus's rows also say how each clip was synthesized (source, synthesis): not training fields
        prepare(manifests[name], assets.codec, prepared[name], allow_extra_fields=True)
    reference_units = {example.id: list(example.units) for name in ("heldout-units", "ood-units")
                       for example in load_prepared(prepared[name])}
    train_sources = [prepared["train-units"], *([manifests["train-text"]] if "train-text" in manifests else [])]
    return train_sources, reference_units


def job_config(recipe_yaml: dict, assets: DemoAssets, train_sources: list, out: Path, settings: JobSettings,
               train_texts: Sequence[str] = ()) -> tuple:
    """The recipe as this job runs it: its own values (the cached assets, the prepared data, the output
    folder; the reader's ranking context drawn from ``train_texts`` where the recipe has none), then the
    user's overrides. Returns the `TrainConfig` and the job's own values (for the report)."""
    from speechlm.adapters.text_scoring import sample_context
    from speechlm.configfile import apply_overrides, build_dataclass, set_values
    from speechlm.finetune.config import TrainConfig

    projector = recipe_yaml.get("model", {}).get("projector") or {}
    context = sample_context(train_texts, settings.reader_context_sentences, seed=0) \
        if projector.get("reader_lm_context") is None else None

    job_values = {"model.text_model": assets.text_model, "model.audio_encoder": assets.audio_encoder,
                  "data.train": [str(source) for source in train_sources], "data.codec": assets.codec,
                  "data.allow_extra_fields": True,  # train-text.jsonl's rows say how each text was made
                  "data.system_prompt": ANSWER_SYSTEM_PROMPT,  # what the answers were distilled with
                  "training.output_dir": str(out / "model"),
                  # transformers refuses bf16 on a machine without a GPU unless told to use the CPU
                  **({} if torch.cuda.is_available() else {"training.use_cpu": True}),
                  **({} if settings.max_minutes is None else {"training.max_minutes": settings.max_minutes}),
                  **({} if context is None else {"model.projector.reader_lm_context": context})}
    resolved = apply_overrides(set_values(recipe_yaml, job_values), settings.overrides)
    return build_dataclass(TrainConfig, resolved), job_values


def training_summary(steps: int, minutes: float, curve: LearningCurve) -> dict:
    return {"steps": steps, "minutes": round(minutes, 2),
            "first_loss": curve.losses[0]["loss"] if curve.losses else None,
            "last_loss": curve.losses[-1]["loss"] if curve.losses else None,
            "curve_items": len(curve.items), "curve": curve.points, "losses": curve.losses}


def machine() -> dict:
    """The machine's figures that decide the job's minutes: on a CPU without native bfloat16 (AVX2 only) the LM,
    the encoder and training run in float32, and the job takes about twice as long (BENCHMARKS.md, `np87`)."""
    from speechlm.adapters.audio_encoder import native_bfloat16

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bfloat16": native_bfloat16("cpu")}


def write_report(report: dict, before: dict, after: dict, out: Path, progress=print) -> None:
    """``report.json``, ``report.md``, ``curves.png`` and every item's result (``eval-items.json``)."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval-items.json").write_text(json.dumps({"before": {n: r["items"] for n, r in before.items()},
                                                     "after": {n: r["items"] for n, r in after.items()}}, indent=1))
    (out / "report.md").write_text(format_report(report))
    plot_curves(report, out / "curves.png")
    for name in ("report.md", "report.json", "curves.png", "answer.wav", "eval-items.json"):
        progress(f"[demo] wrote {out / name}")


def _without_nan(totals: dict) -> dict:
    """NaN (a ratio over a zero accuracy) as null: JSON has no NaN."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in totals.items()}


def load_trained(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoProcessor

    import speechlm  # noqa: F401  (registers the Auto classes)

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def text_answers_unchanged(before: dict, after: dict) -> bool | None:
    """Whether every QA text answer is what the untrained model said (a frozen backbone, or LoRA gated
    to audio rows: it must be)."""
    pairs = [(b["text_answer"], a["text_answer"]) for name in before if name.startswith("qa/")
             for b, a in zip(before[name]["items"], after[name]["items"], strict=True)]
    return all(b == a for b, a in pairs) if pairs else None


def spoken_answer(model, processor, eval_sets: dict, wav: Path, settings: EvalSettings, *,
                  judge: str | None = None) -> dict:
    """The trained model's text-and-speech answer to the first held-out spoken question, saved as a wav."""
    from speechlm.responding import respond, speaking_decoder
    from speechlm.speech_io.audio import save_wav

    name = "qa/heldout" if "qa/heldout" in eval_sets else "asr/heldout"
    row = json.loads(eval_sets[name][1].read_text().splitlines()[0])
    model.eval()
    reply = respond(model, processor, audio=row["audio"], output="text+speech", max_new_tokens=settings.max_new_tokens,
                    max_speech_units=settings.max_speech_units, do_sample=False)
    heard = None
    if reply.audio is not None:
        save_wav(wav, reply.audio)
        if judge:
            heard = transcribe(load_judge(judge), reply.audio)
    return {"question_audio": row["audio"], "question": row.get("question", row.get("text")), "text": reply.text,
            "units": len(reply.units), "wav": str(wav) if reply.audio is not None else None,
            "decoder": processor.codec.decodes_with(1), "decoder_trained": getattr(processor.codec, "decoder_trained", None),
            "speech_by": "lm" if speaking_decoder(processor, "text+speech") is None else "decoder",
            "judge_heard": heard}


# -- report ---------------------------------------------------------------------------------------------

def answer_audio_note(answer: dict) -> str:
    heard = f" Whisper base hears: {answer['judge_heard']!r}." if answer.get("judge_heard") is not None else ""
    spoken = ("The LM wrote the answer and the codec's speech decoder (`speech-decoder/` in its folder) spoke it "
              "as units. " if answer.get("speech_by") == "decoder" else "")
    if answer.get("decoder") == "vocoder":
        return (f"{spoken}Its units are decoded by the vocoder trained for the codec (`vocoder-rvq1/` in the codec's "
                f"folder: log-mel and Griffin-Lim).{heard}")
    if answer.get("decoder_trained") is False:
        return f"The codec's SpeechTokenizer decoder has random weights and no vocoder: its audio is not speech.{heard}"
    return f"Its units are decoded by the codec's SpeechTokenizer decoder.{heard}"


def format_report(report: dict) -> str:
    lines = ["# speechlm quick start: report", "",
             f"Machine: {report['machine']['cpus']} CPUs ({report['machine']['processor']}), torch "
             f"{report['machine']['torch']}, CUDA {report['machine']['cuda']}{_cpu_line(report['machine'])}.",
             *_alignment_line(report["alignment"]),
             f"Training: {report['training']['steps']} steps in {report['training']['minutes']} min, loss "
             f"{report['training']['first_loss']} -> {report['training']['last_loss']}.", "",
             "| eval set | metric | before | after |", "| --- | --- | --- | --- |"]
    for name, metric, _ in HEADLINE:
        if name in report["after"]:
            before = report["before"].get(name, {}).get(metric)
            after = report["after"][name].get(metric)
            lines.append(f"| {name} ({report['after'][name].get('items')} items) | {metric} | {_fmt(before)} | "
                         f"{_fmt(after)} |")
    lines += ["", f"Backbone's text answers unchanged by training: {report['text_answers_unchanged']}.", "",
              f"Learning curve (held-out WER on {report['training']['curve_items']} clips spread over the held-out "
              "split, by minutes of training; the table above uses every clip):", "",
              "| minutes | step | WER |", "| --- | --- | --- |"]
    lines += [f"| {p['minutes']:.1f} | {p['step']} | {p['wer']:.4f} |" for p in report["training"]["curve"]]
    answer = report["answer"]
    lines += ["", f"Spoken question: {answer['question']!r}; answer: {answer['text']!r} ({answer['units']} speech "
              f"units, {answer['wav']}). " + answer_audio_note(answer), "",
              "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()), ""]
    lines += _eval_settings_lines(report.get("eval_settings", {}))
    for when, sets in report.get("eval_seconds", {}).items():
        if sets:
            lines += [f"Evaluation {when} training, seconds per set: "
                      + ", ".join(f"{name} {seconds}" for name, seconds in sets.items()), ""]
    return "\n".join(lines)


def _cpu_line(machine: dict) -> str:
    if "cpu_capability" not in machine:  # a report written before they were kept
        return ""
    native = machine["native_bfloat16"]
    return (f", CPU {machine['cpu_capability']} with{'' if native else 'out'} native bfloat16"
            f"{'' if native or machine.get('cuda') else ' (float32 throughout)'}")


def _eval_settings_lines(settings: dict[str, dict]) -> list[str]:
    """Each task's evaluation settings where they differ from `EvalSettings`' defaults (as the JSON keeps them)."""
    defaults = json.loads(json.dumps(asdict(EvalSettings())))
    changed = {task: ", ".join(f"{key}={value!r}" for key, value in json.loads(json.dumps(values)).items()
                               if value != defaults.get(key)) for task, values in settings.items()}
    return ["Evaluation settings besides the defaults: " + "; ".join(
        f"{task}: {values or 'none'}" for task, values in changed.items()), ""] if changed else []


def _alignment_line(alignment: dict | None) -> list[str]:
    return [] if alignment is None else [f"{alignment['summary']} (counted in the training minutes)."]


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)


def plot_curves(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, wer_axes) = plt.subplots(1, 2, figsize=(10, 4))
    losses = report["training"]["losses"]
    loss_axes.plot([p["minutes"] for p in losses], [p["loss"] for p in losses], marker=".", color="black",
                   label="all (each logged step's batches)")
    # each task's loss over its own positions: a mixed loss jumps when one batch holds only a harder task
    for task in sorted({task for point in losses for task in point.get("tasks", {})}):
        points = [p for p in losses if task in p.get("tasks", {})]
        loss_axes.plot([p["minutes"] for p in points], [p["tasks"][task] for p in points], marker=".",
                       linewidth=0.8, label=task)
    loss_axes.set(xlabel="minutes of training", ylabel="training loss", title="loss by task", yscale="log")
    loss_axes.legend(fontsize=7)
    curve = report["training"]["curve"]
    wer_axes.plot([p["minutes"] for p in curve], [p["wer"] for p in curve], marker="o")
    wer_axes.set(xlabel="minutes of training", ylabel="WER", title="held-out ASR WER", yscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


__all__ = ["JobSettings", "LearningCurve", "run_job", "write_eval_sets"]
