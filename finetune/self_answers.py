"""The backbone's own answers to a manifest's texts (`speechlm answer`): spoken-instruction data without labels.

A spoken request is best learnt with the answer the frozen backbone gives the same request typed: the adapter
learns to make speech mean what the text means, and the backbone keeps its own knowledge and voice (DiVA, arXiv
2410.02678, distils the same target; the quick start's ``s2t_instruct`` rows are these answers, and they lift its
spoken answers from the cascade's level to 0.93-0.99x the typed ones: BENCHMARKS.md). Each row's ``text`` is put
to the backbone as a user's message, with the system turn the training will use, and its greedy answer becomes
the row's ``answer``; an answer cut by ``max_new_tokens`` keeps its complete sentences and is marked
``answer_truncated`` (learnt without its end of turn).

Prompts of equal token length are generated together, so no padding enters the computation and each answer is
what the backbone says to that prompt alone (a batch gives the answers one at a time would).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechlm.finetune.examples import AUDIO_FIELDS, read_jsonl, read_manifest
from speechlm.speech_io.config_errors import ConfigProblems

_SENTENCE_END = re.compile(r"[.!?](\s|$)")


@dataclass
class AnswerSettings:
    """How the backbone answers (`speechlm answer`'s options)."""

    system_prompt: str | None = field(default=None, metadata={
        "help": "the system turn before each prompt; None: the chat template's own default (use the training "
                "recipe's data.system_prompt: the answers are learnt after that same turn)"})
    max_new_tokens: int = field(default=64, metadata={"help": "an answer's bound; a longer one is cut to its "
                                                               "complete sentences and marked answer_truncated"})
    batch_size: int = field(default=32, metadata={"help": "prompts of one token length generated together"})

    def __post_init__(self) -> None:
        problems = ConfigProblems()
        problems.positive_integers(self, "max_new_tokens", "batch_size")
        problems.check(self.system_prompt is None or isinstance(self.system_prompt, str),
                       f"system_prompt={self.system_prompt!r:.60} (expected a string or None)")
        problems.raise_if_any("answer settings")


@dataclass
class AnswerReport:
    """What `answer_manifest` did."""

    rows: int            # rows in the manifest
    answered: int        # rows that got the backbone's answer
    truncated: int       # of those, answers cut by max_new_tokens
    kept: int            # rows whose own answer was kept
    unanswered: int      # rows with no text to answer, or a conversation of their own (``messages``)
    empty: int           # rows the backbone answered with nothing (left without an answer)
    out: Path

    def summary(self) -> str:
        return (f"{self.answered} of {self.rows} rows answered ({self.truncated} cut at the token bound), "
                f"{self.kept} kept their own answer, {self.unanswered} have no text to answer (or their own messages), {self.empty} got an empty "
                f"answer; written to {self.out}")


def complete_sentences(text: str, complete: bool) -> str:
    """The answer as generated; cut back to its last full sentence where generation hit the length bound."""
    text = text.strip()
    if complete:
        return text
    ends = [match.end() for match in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]].strip() if ends else text


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """``messages`` in the tokenizer's chat template (the processor's plain one where it has none), as token ids."""
    from speechlm.speech_io.processor import PLAIN_CHAT_TEMPLATE

    return tokenizer.apply_chat_template(messages, chat_template=tokenizer.chat_template or PLAIN_CHAT_TEMPLATE,
                                         add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=True)["input_ids"]


def prompt_ids(tokenizer, text: str, system_prompt: str | None) -> list[int]:
    """``text`` as a user's message after ``system_prompt`` (None: the template's default), ready to answer."""
    messages = [{"role": "user", "content": text}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return chat_ids(tokenizer, messages, add_generation_prompt=True)


def end_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends an answer: the tokenizer's end, the generation config's (Llama 3's ``<|eot_id|>``
    beside ``<|end_of_text|>``) and the one the chat template closes an assistant turn with (a base model given an
    instruct template may not name it)."""
    ends = model.generation_config.eos_token_id
    ids = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    turn_end = turn_end_token_id(tokenizer)
    if turn_end is not None:
        ids.add(turn_end)
    if not ids:
        raise ValueError("the backbone names no end-of-sequence token (tokenizer, generation config or chat "
                         "template): an answer could not be told complete from cut")
    return ids


def turn_end_token_id(tokenizer) -> int | None:
    """The special token that follows an assistant turn's text in the chat template (ChatML's ``<|im_end|>``), or
    None where the template puts none there."""
    asked = [{"role": "user", "content": "Hi."}]
    prompt = chat_ids(tokenizer, asked, add_generation_prompt=True)
    whole = chat_ids(tokenizer, [*asked, {"role": "assistant", "content": "Hello."}], add_generation_prompt=False)
    if whole[:len(prompt)] != prompt:
        return None
    special = set(tokenizer.all_special_ids)
    return next((token for token in whole[len(prompt):] if token in special), None)


def greedy_answers(model, tokenizer, prompts: Sequence[str], settings: AnswerSettings
                   ) -> Iterator[list[tuple[str, str, bool]]]:
    """``(prompt, answer, whether it ended by itself)`` for each of ``prompts``, a batch at a time (prompts of one
    token length together), so a caller can keep each batch as it comes."""
    import torch

    ends = sorted(end_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    by_length: dict[int, list[tuple[str, list[int]]]] = {}
    for prompt in dict.fromkeys(prompts):
        ids = prompt_ids(tokenizer, prompt, settings.system_prompt)
        by_length.setdefault(len(ids), []).append((prompt, ids))
    device = next(model.parameters()).device
    for group in by_length.values():
        for start in range(0, len(group), settings.batch_size):
            batch = group[start:start + settings.batch_size]
            input_ids = torch.tensor([ids for _, ids in batch], device=device)
            with torch.no_grad():
                generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                           max_new_tokens=settings.max_new_tokens, do_sample=False,
                                           eos_token_id=ends, pad_token_id=pad)
            answers = []
            for (prompt, _), row in zip(batch, generated[:, input_ids.shape[1]:].tolist(), strict=True):
                stop = next((i for i, token in enumerate(row) if token in ends), None)
                complete = stop is not None
                text = tokenizer.decode(row[:stop], skip_special_tokens=True)
                answers.append((prompt, complete_sentences(text, complete), complete))
            yield answers


def answer_manifest(manifest: str | os.PathLike, out: str | os.PathLike, backbone: str | os.PathLike,
                    settings: AnswerSettings, *, overwrite: bool = False, allow_extra_fields: bool = False,
                    device: str | None = None, dtype: str | None = None,
                    progress: Callable[[str], None] = print) -> AnswerReport:
    """Write ``manifest`` to ``out`` with the backbone's answer to each row's ``text`` (rows that have an answer
    keep it unless ``overwrite``; a row with its own ``messages`` is learnt as they are, and not answered; other
    fields are kept, and paths are rewritten relative to ``out``'s folder). The manifest is checked whole before
    the backbone loads; answers are kept in ``OUT.partial.jsonl`` as they come, so an interrupted run resumes
    where it stopped."""
    manifest, out = Path(manifest), Path(out)
    read_manifest(manifest, allow_extra_fields=allow_extra_fields)  # every bad row named before any work
    if out.resolve() == manifest.resolve():
        raise ValueError(f"--out {out}: the manifest itself; write the answered manifest to another file")
    rows = read_jsonl(manifest)

    def wants(row: Any) -> bool:
        return _answerable(row) and (overwrite or not row.get("answer"))

    def key(text: str) -> str:  # what an answer depends on: a run with other settings answers afresh
        return json.dumps([str(backbone), dtype, settings.system_prompt, settings.max_new_tokens, text])

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.jsonl")
    cache = _read_partial(partial)
    missing = [row["text"] for row in rows if wants(row) and key(row["text"]) not in cache]
    if missing:
        model, tokenizer = load_backbone(backbone, device=device, dtype=dtype)
        progress(f"answering {len(dict.fromkeys(missing))} texts with {backbone} (greedy, "
                 f"{len(cache)} kept from an earlier run)")
        with partial.open("a") as kept:
            for batch in greedy_answers(model, tokenizer, missing, settings):
                for prompt, answer, complete in batch:
                    cache[key(prompt)] = (answer, complete)
                    kept.write(json.dumps({"key": key(prompt), "answer": answer, "complete": complete},
                                          ensure_ascii=False) + "\n")
                kept.flush()
    answered = truncated = empty = 0
    written = []
    for row in rows:
        row = _moved(row, manifest.parent, out.parent)
        if wants(row):
            answer, complete = cache[key(row["text"])]
            row.pop("answer_truncated", None)
            if answer:
                row["answer"] = answer
                answered += 1
                if not complete:
                    row["answer_truncated"] = True
                    truncated += 1
            else:
                row.pop("answer", None)
                empty += 1
        written.append(json.dumps(row, ensure_ascii=False))
    staging = out.with_name(out.name + ".writing")
    staging.write_text("\n".join(written) + "\n")
    os.replace(staging, out)  # whole or not at all
    partial.unlink(missing_ok=True)
    unanswerable = sum(not _answerable(row) for row in rows)
    return AnswerReport(rows=len(rows), answered=answered, truncated=truncated, empty=empty,
                        kept=len(rows) - unanswerable - answered - empty, unanswered=unanswerable, out=out)


def _read_partial(path: Path) -> dict[str, tuple[str, bool]]:
    """The answers an interrupted run kept (its last line may be cut off mid-write: it is answered again)."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    cache = {}
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            cache[entry["key"]] = (entry["answer"], entry["complete"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                raise ValueError(f"{path} line {number}: not an answer kept by speechlm answer (expected "
                                 f"{{\"key\", \"answer\", \"complete\"}}); delete the file to answer afresh") from None
    return cache


def load_backbone(backbone: str | os.PathLike, *, device: str | None = None, dtype: str | None = None):
    """The backbone's causal LM (in eval mode, on ``device``, as ``dtype``; None: the checkpoint's own) and
    tokenizer, loaded as a SpeechLM loads its backbone (`adapters.loading.load_backbone`: a folder or Hub id that
    is missing is named)."""
    import torch
    from transformers import AutoTokenizer

    from speechlm.adapters.loading import load_backbone as load_text_model

    torch_dtype = "auto"  # what transformers does without one: the checkpoint's own
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype={dtype!r}: expected a torch dtype such as float32 or bfloat16")
    model = load_text_model(str(backbone), mode="frozen", dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    return (model.to(device) if device else model), tokenizer


def _answerable(row: Any) -> bool:
    """A row with a text to answer and no conversation of its own (`s2t_instruct` learns that as it is)."""
    return _has_text(row) and not row.get("messages")


def _has_text(row: Any) -> bool:
    return isinstance(row, dict) and isinstance(row.get("text"), str) and bool(row["text"].strip())


def _moved(row: Any, source: Path, target: Path) -> Any:
    """``row`` with its relative audio paths (fields and message parts) relative to ``target`` instead of
    ``source``."""
    source, target = os.path.abspath(source), os.path.abspath(target)  # not resolved: a linked folder stays named
    if not isinstance(row, dict) or source == target:
        return row

    def moved(value: Any) -> Any:
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            return value
        return os.path.relpath(os.path.join(source, value), target)

    row = {**row, **{name: moved(row[name]) for name in AUDIO_FIELDS if name in row}}
    if isinstance(row.get("messages"), list):
        row["messages"] = [
            {**message, "content": [{**part, "audio": moved(part.get("audio"))}
                                    if isinstance(part, dict) and part.get("type") == "audio" else part
                                    for part in message["content"]]}
            if isinstance(message, dict) and isinstance(message.get("content"), list) else message
            for message in row["messages"]]
    return row
