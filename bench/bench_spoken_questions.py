"""Does the quick start's model answer a spoken question, or transcribe it? Recipe variants side by side.

On a quick-start cache (``python -m speechlm.demo assets --size full`` or an earlier ``make demo``), each
variant trains the quick-start recipe with its overrides for the same number of LM steps (not minutes: a
minutes budget gives each variant whatever steps the machine fits, and the step count alone moved spoken
QA from 11/22 to 3/22 between two runs of one recipe), from the same seed, on the same clips read ahead once
(the frozen encoder and reader read the same for every variant; their cache is handed on). Then, for every
held-out and out-of-domain clip whose text is a question (51 on the full corpus), the trained model gets the
clip alone, as a user asks:

- ``transcribed``: the answer is the question again (`RESTATED_QUESTION_WER` of the question's text), the
  task overfitting of arXiv 2410.03798;
- ``qa``: on the questions with known answers (the job's ``qa/heldout`` and ``qa/ood`` sets), the answer
  contains one of them and does not restate the question (as ``speechlm eval`` counts it), beside the same
  question typed (the text answer runs the base weights);
- ``as_typed``: the answer starts with the same 10 words as the answer to the question typed, on every
  question (known answer or not): how far the spoken request acts as the typed one, a figure that does not
  hang on whether a 135M backbone happens to know the answer (22 held-out questions move QA by 4.5 points each);
- ``asr``: held-out WER on the learning curve's 64 clips (the recipe's beam-5 reader), so a variant that
  answers better but transcribes worse shows.

    HF_HUB_OFFLINE=1 python bench/bench_spoken_questions.py --cache /tmp/democache --out /tmp/exp/sq \\
        --variant recipe= --variant alone=prompts.s2t_instruct= --steps 150

A variant is ``NAME=OVERRIDE,OVERRIDE`` (recipe overrides, ``key.sub=value``), with one more kind of
override: ``prompts.TASK=P1|P2`` replaces the task's instruction prompts for that variant (empty: the
speech alone).

``--answer-scope clip`` asks each trained model the spoken questions again with its LoRA gate set to that
scope (``lora_scope``) at inference only: for a model trained with ``audio``, ``clip`` leaves every answer token
to the base weights. The clips' readings start from the cache's kept readings (``make demo`` keeps them) where
there are any, so no variant waits for the read-ahead.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

from speechlm.configfile import read_yaml
from speechlm.demo.build import load_demo_assets
from speechlm.demo.job import (
    READINGS_FILE,
    JobSettings,
    corpus_rows,
    job_config,
    load_trained,
    prepare_corpus,
    spread,
    write_eval_sets,
)
from speechlm.evaluation import EvalSettings, answers_start_alike, evaluate, generate_text, read_eval_manifest
from speechlm.finetune import recipe, tasks
from speechlm.finetune.metrics import match_answer


def parse_variant(text: str) -> tuple[str, list[str], dict[str, tuple[str, ...]]]:
    name, _, rest = text.partition("=")
    overrides, prompts = [], {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("prompts."):
            prompts[key.removeprefix("prompts.")] = tuple(value.split("|"))
        else:
            overrides.append(item)
    return name, overrides, prompts


def spoken_questions(corpus: dict[str, list[dict]]) -> list[dict]:
    return [{"split": split, **row} for split in ("heldout", "ood") for row in corpus[split]
            if row["text"].rstrip().endswith("?")]


def answer_questions(model, processor, questions: list[dict], settings: EvalSettings) -> dict:
    spoken = [[{"role": "user", "content": [{"type": "audio", "audio": q["audio"]}]}] for q in questions]
    typed = [[{"role": "user", "content": q["text"]}] for q in questions]
    speech_answers = generate_text(model, processor, spoken, settings)
    text_answers = generate_text(model, processor, typed, settings)
    return scored(questions, speech_answers, text_answers)


def scored(questions: list[dict], speech_answers: list[str], text_answers: list[str]) -> dict:
    items, figures = [], {}
    for q, from_speech, from_text in zip(questions, speech_answers, text_answers, strict=True):
        # without known answers, any list will do: only whether the answer restates the question counts
        speech = match_answer(from_speech, q.get("expected") or [q["text"]], q["text"])
        item = {"id": q["id"], "split": q["split"], "question": q["text"], "speech_answer": from_speech,
                "text_answer": from_text, "transcribed": speech.restates_question,
                "as_typed": answers_start_alike(from_speech, from_text)}
        if q.get("expected"):  # a restated question answers nothing, even a choice it holds the answer to
            item["speech_contains"] = speech.contains
            item["text_contains"] = match_answer(from_text, q["expected"], q["text"]).contains
        items.append(item)
    for split in ("heldout", "ood"):
        mine = [i for i in items if i["split"] == split]
        known = [i for i in mine if "speech_contains" in i]
        figures[split] = {"questions": len(mine), "transcribed": sum(i["transcribed"] for i in mine),
                          "as_typed": sum(i["as_typed"] for i in mine),
                          "qa_items": len(known), "speech_contains": sum(i["speech_contains"] for i in known),
                          "text_contains": sum(i["text_contains"] for i in known)}
    return {"figures": figures, "items": items}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="the quick start's cache (assets-SIZE.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDE,OVERRIDE (see above)")
    parser.add_argument("--steps", type=int, default=150, help="LM steps each variant trains")
    parser.add_argument("--size", default="full")
    parser.add_argument("--answer-scope", action="append", default=[],
                        help="also answer with the LoRA gate set to this lora_scope at inference (e.g. clip)")
    parser.add_argument("--rescore", action="store_true",
                        help="score the answers an earlier run wrote to --out again (the variants' names)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    settings = JobSettings(out=str(out), size=args.size, cache=args.cache, max_minutes=None)
    assets = load_demo_assets(args.size, args.cache)
    corpus = corpus_rows(assets)
    if args.rescore:
        questions = spoken_questions(corpus)
        for name in (parse_variant(text)[0] for text in args.variant):
            answers = {item["id"]: item for item in json.loads((out / f"{name}-answers.json").read_text())}
            again = scored(questions, [answers[q["id"]]["speech_answer"] for q in questions],
                           [answers[q["id"]]["text_answer"] for q in questions])
            print(f"[bench] {name}: {json.dumps(again['figures'])}")
        return
    train_sources, reference_units = prepare_corpus(corpus, assets, settings)
    eval_sets = write_eval_sets(corpus, reference_units, out / "eval-data")
    curve_items = spread(read_eval_manifest(eval_sets["asr/heldout"][1], "asr"), settings.curve_items)
    questions = spoken_questions(corpus)
    eval_settings = replace(settings.eval, batch_size=40)
    recipe_yaml = read_yaml(settings.recipe)

    shared_readings, results = None, {}
    for text in args.variant:
        name, overrides, prompts = parse_variant(text)
        saved_prompts = dict(tasks.PROMPTS)
        tasks.PROMPTS.update(prompts)
        try:
            run = replace(settings, out=str(out / name),
                          overrides=[f"training.max_steps={args.steps}", "training.max_minutes=null", *overrides])
            # job_config sets values in the dict it is given: each variant starts from its own copy
            config, _ = job_config(copy.deepcopy(recipe_yaml), assets, train_sources, out / name, run,
                                   train_texts=[row["text"] for row in corpus["train"]])
            model, tokenizer = recipe.build_model(config)
            processor = recipe.build_processor(config, model, tokenizer)
            if shared_readings is not None:
                model.reading_cache = shared_readings
            elif (kept := Path(args.cache) / READINGS_FILE.format(size=args.size)).is_file():
                print(f"[bench] {model.reading_cache.load(kept)} readings of clips loaded from {kept}", flush=True)
            examples = recipe.load_training_examples(config)
            recipe.fit_speaking_rate(config, model, examples)
            dataset = recipe.build_datasets(config, processor, examples)
            start = time.perf_counter()
            ahead = recipe.read_ahead(config, model, processor, recipe.clips_to_read_ahead(config, examples, dataset))
            read_seconds = time.perf_counter() - start
            shared_readings = model.reading_cache
            trainer = recipe.build_trainer(config, model, processor, dataset)
            start = time.perf_counter()
            result = recipe.train(config, trainer)
            train_minutes = (time.perf_counter() - start) / 60
            model_dir = recipe.save(config, trainer)
        finally:
            tasks.PROMPTS.clear()
            tasks.PROMPTS.update(saved_prompts)
        trained, trained_processor = load_trained(model_dir)
        trained.reading_cache = shared_readings
        start = time.perf_counter()
        answered = answer_questions(trained, trained_processor, questions, eval_settings)
        asr, _ = evaluate(trained, trained_processor, "asr", curve_items, eval_settings)
        by_scope = {}
        for scope in (s for s in args.answer_scope if s != trained.lora_gate.scope):  # not the trained one again
            trained_scope, trained.lora_gate.scope = trained.lora_gate.scope, scope
            again = answer_questions(trained, trained_processor, questions, eval_settings)
            trained.lora_gate.scope = trained_scope
            by_scope[scope] = again["figures"]
            (out / f"{name}-answers-{scope}.json").write_text(json.dumps(again["items"], indent=1))
        results[name] = {"overrides": overrides, "prompts": {k: list(v) for k, v in prompts.items()},
                         "steps": result.global_step, "train_minutes": round(train_minutes, 2),
                         "read_ahead_seconds": round(read_seconds, 1), "ahead": None if ahead is None else ahead.clips,
                         "last_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
                         "questions": answered["figures"], "questions_by_answer_scope": by_scope,
                         "asr_wer_64": asr["wer"],
                         "eval_seconds": round(time.perf_counter() - start, 1)}
        (out / f"{name}-answers.json").write_text(json.dumps(answered["items"], indent=1))
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"[bench] {name}: {json.dumps(results[name])}", flush=True)
        del model, trainer, trained


if __name__ == "__main__":
    main()
