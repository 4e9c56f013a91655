"""The survey's training tasks (sec. 4), each rendering an example as a conversation for the processor.

The processor puts labels on assistant turns only, so a task says what the model must produce by
putting exactly that in the assistant turn. Prompts come from a small, varied list per task, chosen
by a seeded ``random.Random`` so that a sample renders the same every time.

| task | user turn (no loss) | assistant turn (loss) |
| --- | --- | --- |
| ``asr`` | speech + instruction | transcript |
| ``tts`` | instruction + text | units of the speech |
| ``continuation`` | instruction + first units | the remaining units |
| ``s2t_instruct`` | the spoken request alone, as a user asks (or the row's own ``messages``) | text answer (a truncated one without its end of turn) |
| ``s2s_chain`` | spoken instruction | text answer, then units of the spoken answer (SpeechGPT) |
| ``interleaved`` | first span | the rest: text and unit spans alternating at word/sentence boundaries (SpiRit-LM) |
| ``text`` | first part of a text (or the row's text-only ``messages``) | the rest |
| ``s2t_kl`` | spoken instruction; the teacher gets its transcript as text | the answer, or nothing: no labels, but the KL divergence to the frozen backbone's next-token distributions given the text (`finetune.behaviour`) |

"Speech" is the audio (``speech_input="continuous"``: Whisper features at ``<|audio|>``) or its units
(``"discrete"``: from ``speechlm prepare``, else encoded by the processor's codec).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from speechlm.finetune.examples import TASK_NAMES, Example, Span

PROMPTS: dict[str, tuple[str, ...]] = {
    "asr": ("Transcribe the audio.", "What is said in this recording?", "Write down what you hear.",
            "Repeat the speech as text."),
    "tts": ("Say this out loud: {text}", "Read the following aloud: {text}", "Speak: {text}",
            "Turn this text into speech: {text}"),
    "continuation": ("Continue this speech.", "Keep talking from here.", "What comes next?"),
    # the spoken request alone, as a user asks: with "Answer the spoken request." beside 2 of 3, a model drilled
    # on ASR answered fewer spoken questions (BENCHMARKS.md, bench_spoken_questions.py); a row's own
    # `messages` may still say more
    "s2t_instruct": ("",),
    "s2s_chain": ("Answer in text, then say the answer.", "Respond in writing and in speech.",
                  "Listen, answer, then speak your answer."),
    "interleaved": ("Continue, switching between text and speech.", "Go on, mixing speech and text."),
    "text": ("Continue the text.", "Go on:", "Complete this:"),
    "s2t_kl": ("",),  # the spoken prompt is the instruction itself, as its transcript is the teacher's
}
INTERLEAVE_LEVELS = ("word", "sentence")
# s2t_kl's rows: every clip with a transcript (an unanswered one distils how an answer starts), or only the
# answered ones (whole answers distilled: the spoken question should get the typed one's answer)
S2T_KL_ROWS = ("all", "answered")
DEFAULT_UNIT_RATE = 50  # SpeechTokenizer: 320-sample hop at 16 kHz


@dataclass(frozen=True)
class RenderSettings:
    speech_input: str = "continuous"
    interleave: str = "word"
    max_interleave_words: int = 5
    s2t_kl_rows: str = "all"


Conversation = list[dict]


@dataclass(frozen=True)
class Task:
    """``eligible(example, settings)`` says whether an example has what ``render`` needs. A distillation
    task also renders the ``teacher``'s conversation, whose assistant turn is the same."""

    name: str
    needs: str
    eligible: Callable[[Example, RenderSettings], bool]
    render: Callable[[Example, random.Random, RenderSettings], Conversation]
    teacher: Callable[[Example, random.Random, RenderSettings], Conversation] | None = None


# -- parts ---------------------------------------------------------------------------------------------

def speech_part(example: Example, settings: RenderSettings, *, answer: bool = False) -> dict:
    """The example's (or its answer's) speech as the recipe wants it in: audio or units."""
    units = example.answer_units if answer else example.units
    if settings.speech_input == "discrete" and units:
        return {"type": "units", "units": units}
    part = {"type": "audio", "audio": example.answer_audio if answer else example.audio}
    samples = example.answer_num_samples if answer else example.num_samples
    if samples is not None:
        part["num_samples"] = samples  # lets the dataset measure lengths without loading audio
    return part


def units_part(units: list[int]) -> dict:
    return {"type": "units", "units": list(units)}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def prompt(task: str, rng: random.Random, **values) -> str:
    return rng.choice(PROMPTS[task]).format(**values)


def with_prompt(speech: dict, instruction: str, rng: random.Random) -> list[dict]:
    """Speech and an instruction in a random order (both orders occur in real use); empty ones left out."""
    if not instruction:
        return [speech]
    return [speech, text_part(instruction)] if rng.random() < 0.5 else [text_part(instruction), speech]


def chat(user: list[dict] | str, assistant: list[dict] | str, *, truncated: bool = False) -> Conversation:
    """A user turn and the assistant's; a ``truncated`` answer is learnt without its end of turn."""
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": assistant, **({"truncated": True} if truncated else {})}]


def has_audio_parts(messages: list[dict] | None) -> bool:
    return any(isinstance(message["content"], list)
               and any(isinstance(part, dict) and part.get("type") == "audio" for part in message["content"])
               for message in messages or [])


# -- the tasks -------------------------------------------------------------------------------------------

def render_asr(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    return chat(with_prompt(speech_part(example, settings), prompt("asr", rng), rng), example.text)


def render_tts(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    return chat(prompt("tts", rng, text=example.text), [units_part(example.units)])


def render_continuation(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    units = example.units
    split = rng.randint(len(units) // 4, (3 * len(units)) // 4)  # at least a quarter on each side
    return chat([text_part(prompt("continuation", rng)), units_part(units[:split])], [units_part(units[split:])])


def render_s2t_instruct(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    if example.messages is not None:
        return example.messages
    return chat(with_prompt(speech_part(example, settings), prompt("s2t_instruct", rng), rng), example.answer,
                truncated=example.answer_truncated)


def render_s2s_chain(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    answer = [text_part(example.answer + "\n"), units_part(example.answer_units)]
    return chat(with_prompt(speech_part(example, settings), prompt("s2s_chain", rng), rng), answer)


def render_interleaved(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    groups = interleave_groups(example, rng, settings)
    rate = example.unit_rate or DEFAULT_UNIT_RATE
    speech_first = rng.random() < 0.5
    parts = []
    for index, (text, start, end) in enumerate(groups):
        if (index % 2 == 0) == speech_first:
            # Units cover from this group's first word to the next group's: the pause goes with the speech.
            parts.append(units_part(example.units[int(round(start * rate)):int(round(end * rate))]))
        else:
            parts.append(text_part(text))  # spans alternate, so a text span sits between unit spans
    return chat([text_part(prompt("interleaved", rng) + " "), parts[0]], parts[1:])


def interleave_groups(example: Example, rng: random.Random, settings: RenderSettings
                      ) -> list[tuple[str, float, float]]:
    """(text, start, end) of consecutive groups of spans: 1..max words, or one sentence each. A group ends
    where the next one starts (the last one at the end of the units)."""
    spans: list[Span] = interleave_spans(example, settings) or []
    if settings.interleave == "sentence" and example.sentences:
        sizes = [1] * len(spans)
    else:
        sizes = []
        while sum(sizes) < len(spans):
            # The first group leaves at least one span over: it is the prompt, the rest is to learn.
            limit = settings.max_interleave_words if sizes else min(settings.max_interleave_words, len(spans) - 1)
            sizes.append(rng.randint(1, limit))
    groups, first = [], 0
    for size in sizes:
        chosen = spans[first:first + size]
        if not chosen:
            break
        groups.append([" ".join(span.text for span in chosen), chosen[0].start])
        first += size
    groups[0][1] = 0.0
    total = len(example.units) / (example.unit_rate or DEFAULT_UNIT_RATE)
    ends = [start for _, start in groups[1:]] + [total]
    return [(text, start, end) for (text, start), end in zip(groups, ends, strict=True)]


def interleave_spans(example: Example, settings: RenderSettings) -> list[Span] | None:
    if settings.interleave == "sentence":
        return example.sentences or example.words
    return example.words or example.sentences


def render_text(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    if example.messages is not None:
        return example.messages
    words = example.text.split()
    split = rng.randint(1, len(words) - 1)
    return chat(f"{prompt('text', rng)} {' '.join(words[:split])}", " ".join(words[split:]))


def render_s2t_kl(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    """The spoken prompt alone; the assistant turn is the positions whose distributions are distilled: the
    row's answer if it has one, else only the first (the distribution of how an answer starts)."""
    return chat([speech_part(example, settings)], example.answer or "")


def render_s2t_kl_teacher(example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    return chat(example.text, example.answer or "")


def _eligible_interleaved(example: Example, settings: RenderSettings) -> bool:
    spans = interleave_spans(example, settings)
    return bool(example.units) and spans is not None and len(spans) >= 2


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("asr", "audio + text", lambda e, s: e.has("audio") and e.has("text"), render_asr),
    Task("tts", "text + units (speechlm prepare)", lambda e, s: e.has("text") and e.has("units"), render_tts),
    Task("continuation", "units (speechlm prepare) of at least 4 frames",
         lambda e, s: e.has("units") and len(e.units) >= 4, render_continuation),
    Task("s2t_instruct", "audio + answer, or messages with audio",
         lambda e, s: (e.has("audio") and e.has("answer")) or has_audio_parts(e.messages), render_s2t_instruct),
    Task("s2s_chain", "audio + answer + answer_audio units (speechlm prepare)",
         lambda e, s: e.has("audio") and e.has("answer") and e.has("answer_units"), render_s2s_chain),
    Task("interleaved", "units (speechlm prepare) + word or sentence timings (2 or more)",
         _eligible_interleaved, render_interleaved),
    Task("text", "text of 2 or more words, or text-only messages",
         lambda e, s: (e.messages is not None and not has_audio_parts(e.messages))
         or (e.messages is None and e.has("text") and len(e.text.split()) >= 2), render_text),
    Task("s2t_kl", "audio + text (its transcript; an answer is optional, or required by s2t_kl_rows=answered)",
         lambda e, s: e.has("audio") and e.has("text") and (s.s2t_kl_rows == "all" or e.has("answer")),
         render_s2t_kl, teacher=render_s2t_kl_teacher),
)}
assert tuple(TASKS) == TASK_NAMES, "examples.TASK_NAMES lists the tasks for manifest validation"


def eligible(task: str, example: Example, settings: RenderSettings) -> bool:
    """Whether ``example`` can serve ``task`` (it has the fields, and its own ``task`` field allows it)."""
    return (example.task is None or example.task == task) and TASKS[task].eligible(example, settings)


def render(task: str, example: Example, rng: random.Random, settings: RenderSettings) -> Conversation:
    return TASKS[task].render(example, rng, settings)


def render_teacher(task: str, example: Example, rng: random.Random, settings: RenderSettings) -> Conversation | None:
    """The teacher's conversation of a distillation task (None for the others)."""
    teacher = TASKS[task].teacher
    return None if teacher is None else teacher(example, rng, settings)
