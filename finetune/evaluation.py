"""``speechlm eval``: the survey's metrics for a saved SpeechLM over a manifest, as a table and a JSON report.

Manifests are JSONL, one item per line, audio paths relative to the manifest:

- ``asr``: ``{"id", "audio", "text"}`` -> WER and CER (Whisper's English normalizer), with S/D/I counts.
- ``qa``: ``{"id", "audio", "question", "answers": [...]}`` -> spoken-question accuracy beside the same
  model's accuracy on the question as text; their ratio is the modality gap.
- ``slm``: ``{"id", "real": X, "fake": X}`` with X one of ``{"audio": path}``, ``{"units": [...]}``,
  ``{"text": str}`` -> the share of pairs where the real member is more likely (sWUGGY / sBLIMP /
  sStoryCloze style), by summed and by length-normalized log-likelihood.

Under ``accelerate launch`` the items are split across processes and the results gathered.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from speechlm.finetune.metrics import character_errors, match_answer, pair_accuracy, word_errors
from speechlm.speech_io.units import units_to_text

EVAL_TASKS = ("asr", "qa", "slm")
REQUIRED_FIELDS = {"asr": ("audio", "text"), "qa": ("audio", "question", "answers"), "slm": ("real", "fake")}


@dataclass
class EvalSettings:
    batch_size: int = field(default=8, metadata={"help": "items per generate / scoring call"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest text response"})
    asr_prompt: str = field(default="Transcribe the audio.", metadata={"help": "instruction beside the clip"})


@dataclass
class EvalItem:
    id: str
    fields: dict[str, Any]


def read_eval_manifest(path: str | Path, task: str) -> list[EvalItem]:
    """Items of a JSONL manifest, audio paths made absolute; errors name the file, line and field."""
    if task not in EVAL_TASKS:
        raise ValueError(f"task {task!r}: choose one of {list(EVAL_TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object per line")
        missing = [name for name in REQUIRED_FIELDS[task] if name not in row]
        if missing:
            raise ValueError(f"{where}: the {task} task needs fields {list(REQUIRED_FIELDS[task])}; missing {missing}")
        row = _resolve_audio(row, path.parent, where)
        if task == "qa" and (not isinstance(row["answers"], list) or not row["answers"]):
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
        items.append(EvalItem(str(row.get("id", number)), row))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _resolve_audio(row: dict, root: Path, where: str) -> dict:
    row = dict(row)
    for key in ("audio", "real", "fake"):
        value = row.get(key)
        if key == "audio" and isinstance(value, str):
            row[key] = _existing(root / value, where, key)
        elif isinstance(value, dict) and isinstance(value.get("audio"), str):
            row[key] = {**value, "audio": _existing(root / value["audio"], where, f"{key}.audio")}
    return row


def _existing(path: Path, where: str, name: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: {name} file {path} does not exist")
    return str(path)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- model calls --------------------------------------------------------------------------------------
def generate_text(model, processor, conversations: Sequence[list[dict]], settings: EvalSettings) -> list[str]:
    """Greedy text answers, ``settings.batch_size`` conversations per ``generate`` call."""
    answers = []
    for start in range(0, len(conversations), settings.batch_size):
        inputs = processor(list(conversations[start: start + settings.batch_size]))
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False)
        prompt_length = inputs["input_ids"].shape[1]
        answers += [processor.parse_response(row[prompt_length:]).text.strip() for row in output]
    return answers


def sequence_log_likelihoods(model, processor, members: Sequence[dict]) -> list[tuple[float, int]]:
    """(summed log-likelihood, token count) of each member: units between speech tokens, or text."""
    token_rows = []
    for member in members:
        if "text" in member:
            text = member["text"]
        else:
            units = member["units"] if "units" in member else _encode_units(processor, member["audio"])
            text = units_to_text(units)
        token_rows.append(processor.tokenizer(text, add_special_tokens=False).input_ids)
    results = []
    for row in token_rows:
        if len(row) < 2:
            raise ValueError(f"a pair member has {len(row)} tokens; scoring needs at least 2")
        ids = torch.tensor([row])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        log_probs = torch.log_softmax(logits[0, :-1], dim=-1)
        picked = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)
        results.append((float(picked.sum()), len(row) - 1))
    return results


def _encode_units(processor, audio_path: str) -> list[int]:
    from speechlm.speech_io.audio import load_audio

    return processor.codec.encode([load_audio(audio_path)], n_q=1)[0][0].tolist()


# -- tasks --------------------------------------------------------------------------------------------
def evaluate_asr(model, processor, items: list[EvalItem], settings: EvalSettings) -> list[dict]:
    conversations = [[{"role": "user", "content": [{"type": "audio", "audio": item.fields["audio"]},
                                                   {"type": "text", "text": settings.asr_prompt}]}]
                     for item in items]
    hypotheses = generate_text(model, processor, conversations, settings)
    results = []
    for item, hypothesis in zip(items, hypotheses, strict=True):
        words = word_errors([item.fields["text"]], [hypothesis])
        results.append({"id": item.id, "reference": item.fields["text"], "hypothesis": hypothesis,
                        "word_errors": words.to_dict()})
    return results


def evaluate_qa(model, processor, items: list[EvalItem], settings: EvalSettings) -> list[dict]:
    spoken = [[{"role": "user", "content": [{"type": "audio", "audio": item.fields["audio"]}]}] for item in items]
    written = [[{"role": "user", "content": item.fields["question"]}] for item in items]
    speech_answers = generate_text(model, processor, spoken, settings)
    text_answers = generate_text(model, processor, written, settings)
    results = []
    for item, from_speech, from_text in zip(items, speech_answers, text_answers, strict=True):
        answers = item.fields["answers"]
        results.append({"id": item.id, "question": item.fields["question"], "answers": answers,
                        "speech_answer": from_speech, "text_answer": from_text,
                        "speech": vars(match_answer(from_speech, answers)),
                        "text": vars(match_answer(from_text, answers))})
    return results


def evaluate_slm(model, processor, items: list[EvalItem], settings: EvalSettings) -> list[dict]:
    real = sequence_log_likelihoods(model, processor, [item.fields["real"] for item in items])
    fake = sequence_log_likelihoods(model, processor, [item.fields["fake"] for item in items])
    return [{"id": item.id, "real_log_likelihood": r[0], "real_tokens": r[1], "fake_log_likelihood": f[0],
             "fake_tokens": f[1]} for item, r, f in zip(items, real, fake, strict=True)]


TASK_RUNNERS: dict[str, Callable] = {"asr": evaluate_asr, "qa": evaluate_qa, "slm": evaluate_slm}


def summarize(task: str, results: list[dict]) -> dict[str, float]:
    """Totals over per-item results (recomputed from counts, so shards sum exactly)."""
    if task == "asr":
        refs = [r["reference"] for r in results]
        hyps = [r["hypothesis"] for r in results]
        words, chars = word_errors(refs, hyps), character_errors(refs, hyps)
        return {"wer": words.rate, "cer": chars.rate, "substitutions": words.substitutions,
                "deletions": words.deletions, "insertions": words.insertions,
                "reference_words": words.reference_length, "items": len(results)}
    if task == "qa":
        totals: dict[str, float] = {"items": len(results)}
        for level in ("exact", "normalized", "contains"):
            speech = sum(r["speech"][level] for r in results) / len(results)
            text = sum(r["text"][level] for r in results) / len(results)
            totals[f"speech_{level}"], totals[f"text_{level}"] = speech, text
            totals[f"speech_to_text_{level}"] = speech / text if text else math.nan
        return totals
    summed = pair_accuracy([r["real_log_likelihood"] for r in results], [r["fake_log_likelihood"] for r in results])
    normalized = pair_accuracy([r["real_log_likelihood"] / r["real_tokens"] for r in results],
                               [r["fake_log_likelihood"] / r["fake_tokens"] for r in results])
    return {"accuracy_summed": summed, "accuracy_length_normalized": normalized, "pairs": len(results)}


def run_evaluation(model_dir: str, task: str, manifest: str, settings: EvalSettings | None = None) -> dict:
    """Load the model, evaluate every item (sharded across processes under accelerate), return the report."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import AutoModelForCausalLM, AutoProcessor

    import speechlm  # noqa: F401  (registers the Auto classes)

    settings = settings or EvalSettings()
    items = read_eval_manifest(manifest, task)
    # cpu=True on a machine without CUDA: otherwise a CPU launch runs N unconnected copies (NOTES.md)
    state = PartialState(cpu=not torch.cuda.is_available())
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(state.device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    runner = TASK_RUNNERS[task]
    with state.split_between_processes(items) as shard:
        local = []
        for start in tqdm(range(0, len(shard), settings.batch_size), desc=f"eval {task}",
                          disable=not state.is_local_main_process):
            local += runner(model, processor, shard[start: start + settings.batch_size], settings)
    results = gather_object(local) if state.num_processes > 1 else local
    order = {item.id: index for index, item in enumerate(items)}
    results = sorted(results, key=lambda r: order[r["id"]])
    report = {"task": task, "model": str(model_dir), "data": str(manifest), "data_sha256": file_sha256(manifest),
            "settings": vars(settings), "processes": state.num_processes, "totals": summarize(task, results),
            "items": results}
    return report


def format_table(report: dict) -> str:
    rows = [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
            for name, value in report["totals"].items()]
    return "\n".join([f"{report['task']} on {report['data']}", "| metric | value |", "|---|---|", *rows])
