"""``speechlm eval``: the survey's metrics for a saved SpeechLM over a manifest, as a table and a JSON report.

Manifests are JSONL, one item per line, audio paths relative to the manifest:

- ``asr``: ``{"id", "audio", "text"}`` -> WER and CER (Whisper's English normalizer), with S/D/I counts; a
  model with a reader keeps to its reader's transcript unless sure of a correction (``asr_follow_transcript``).
- ``qa``: ``{"id", "audio", "question", "answers": [...]}`` -> spoken-question accuracy beside the same
  model's accuracy on the question as text; their ratio is the modality gap. An answer that says the
  question again matches nothing (a choice question holds its answer) and is counted apart.
- ``tts``: ``{"id", "text", "units": [...]}`` (or ``"audio"`` to encode with the model's codec) -> the
  unit error rate of the spoken response against the reference units and, given an openai-whisper
  checkpoint as judge, the WER of the judge's transcript of the generated audio.
- ``slm``: ``{"id", "real": X, "fake": X}`` with X one of ``{"audio": path}``, ``{"units": [...]}``,
  ``{"text": str}`` -> the share of pairs where the real member is more likely (sWUGGY / sBLIMP /
  sStoryCloze style), by summed and by length-normalized log-likelihood.
- ``latency``: ``{"id", "audio" and/or "text"}`` -> time to the first text token and to the first audio
  chunk of a streamed response, the whole response time and its real-time factor.

Under ``accelerate launch`` the items are split across processes and the results gathered.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from speechlm.finetune.examples import ManifestError, jsonl_rows, raise_problems
from speechlm.finetune.metrics import character_errors, match_answer, pair_accuracy, unit_errors, word_errors
from speechlm.responding import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_SPEECH_UNITS,
    SPEECH_BY,
    AudioChunk,
    TextDelta,
    generate_response_tokens,
    respond,
    speaking_decoder,
    stream_response,
)
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.config_errors import ConfigProblems
from speechlm.speech_io.constants import SAMPLE_RATE
from speechlm.speech_io.units import units_to_text

EVAL_TASKS = ("asr", "qa", "tts", "slm", "latency")
LM_DTYPES = ("bfloat16", "float16", "float32")  # what `EvalSettings.lm_dtype` may name
REQUIRED_FIELDS = {"asr": ("audio", "text"), "qa": ("audio", "question", "answers"), "tts": ("text",),
                   "slm": ("real", "fake"), "latency": ()}


# openai-whisper's transcribe: a text whose gzip compression ratio is above this loops (the judge's and the
# evaluation's text answers' fallback to the next temperature)
LOOP_COMPRESSION_RATIO = 2.4


@dataclass
class EvalSettings:
    batch_size: int = field(default=8, metadata={"help": "items per generate / scoring call"})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "longest text response"})
    asr_prompt: str = field(default="Transcribe the audio.", metadata={"help": "instruction beside the clip"})
    # 12, not 5: the quick start's frozen backbone left the reader's transcript mostly to make it worse (10
    # of its 11 departures on the held-out clips); a LoRA-tuned one's held-out name fixes cost as many ood
    asr_follow_transcript: float = field(default=12.0, metadata={
        "help": "asr, a model with a reader: log-odds the next token of the reader's transcript gains (0: the LM "
                "alone)"})
    asr_transcript_fallback: float | None = field(default=0.3, metadata={
        "help": "asr, following the transcript: a transcription whose word errors against the reader's transcript "
                "are above this share of its words has run on (an answer, a continuation), and the transcript "
                "stands instead (none: never)"})
    tts_prompt: str = field(default="Say this out loud: {text}", metadata={"help": "the tts request; {text}"})
    tts_temperature: float = field(default=0.0, metadata={
        "help": "tts: the speech units' sampling temperature (0: greedy; sampling is seeded)"})
    max_speech_units: int = field(default=DEFAULT_MAX_SPEECH_UNITS, metadata={
        "help": "longest spoken response (50 units a second)"})
    speech_by: str = field(default="auto", metadata={
        "help": "who speaks: auto (the codec's speech decoder where it has one, else the LM), lm or decoder"})
    lm_dtype: str | None = field(default=None, metadata={
        "help": "the language model's weights while evaluating (bfloat16: a decoding step reads half the bytes; "
                "the audio side keeps its dtype); none: as loaded"})
    judge: str | None = field(default=None, metadata={"help": "openai-whisper .pt that transcribes tts audio"})
    judge_cache: str | None = field(default=None, metadata={
        "help": "tts: a JSON file that keeps what the judge heard of each reference (the same every run: the "
                "reference's units, the codec's decoder and the judge decide it), reused while all three are the "
                "same; none: judged every time"})
    output: str = field(default="text+speech", metadata={"help": "latency: the response mode to time"})
    # openai-whisper's transcribe: decode greedily, and where the text loops (compresses too well), decode it
    # again at the next temperature; (0.0,) is greedy only
    temperatures: tuple[float, ...] = field(default=(0.0,), metadata={
        "help": "text decoding temperatures, tried in turn where the answer loops (0: greedy)"})
    compression_ratio_threshold: float = field(default=LOOP_COMPRESSION_RATIO, metadata={
        "help": "an answer whose gzip compression ratio is above this loops"})

    def __post_init__(self):
        problems = ConfigProblems()
        problems.check(bool(self.temperatures) and all(t >= 0 for t in self.temperatures),
                       f"temperatures={self.temperatures}: expected one or more temperatures >= 0")
        problems.check(self.speech_by in SPEECH_BY, f"speech_by={self.speech_by!r}: expected one of {list(SPEECH_BY)}")
        problems.check(self.tts_temperature >= 0, f"tts_temperature={self.tts_temperature}: expected >= 0 (0: greedy)")
        problems.check(self.asr_follow_transcript >= 0,
                       f"asr_follow_transcript={self.asr_follow_transcript}: expected >= 0 (0: the LM alone)")
        problems.check(self.asr_transcript_fallback is None or self.asr_transcript_fallback >= 0,
                       f"asr_transcript_fallback={self.asr_transcript_fallback}: expected >= 0 or none")
        problems.check(self.lm_dtype is None or self.lm_dtype in LM_DTYPES,
                       f"lm_dtype={self.lm_dtype!r}: expected one of {', '.join(LM_DTYPES)} or none")
        problems.check(self.judge_cache is None or self.judge is not None,
                       f"judge_cache={self.judge_cache!r}: keeps what a judge heard; set judge= too")
        problems.raise_if_any("EvalSettings")


@dataclass
class EvalItem:
    id: str
    fields: dict[str, Any]


def read_eval_manifest(path: str | Path, task: str) -> list[EvalItem]:
    """Items of a JSONL manifest, audio paths made absolute; one error lists every bad line (file, line,
    field)."""
    if task not in EVAL_TASKS:
        raise ValueError(f"task {task!r}: choose one of {list(EVAL_TASKS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest")
    problems: list[str] = []
    items = []
    for number, where, row in jsonl_rows(path, problems):
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object per line")
            continue
        missing = [name for name in REQUIRED_FIELDS[task] if name not in row]
        if missing:
            problems.append(f"{where}: the {task} task needs fields {list(REQUIRED_FIELDS[task])}; missing {missing}")
            continue
        if task == "qa" and (not isinstance(row["answers"], list) or not row["answers"]):
            problems.append(f"{where}: 'answers' must be a non-empty list of strings")
        if task == "tts" and "units" not in row and "audio" not in row:
            problems.append(f"{where}: the tts task needs reference 'units' (or 'audio' to encode)")
        if task == "latency" and "audio" not in row and "text" not in row:
            problems.append(f"{where}: the latency task needs 'audio' and/or 'text'")
        items.append(EvalItem(str(row.get("id", number)), _resolve_audio(row, path.parent, where, problems)))
    raise_problems(problems, path)
    if not items:
        raise ManifestError(f"{path}: no items")
    return items


def _resolve_audio(row: dict, root: Path, where: str, problems: list[str]) -> dict:
    row = dict(row)
    for key in ("audio", "real", "fake"):
        value = row.get(key)
        if key == "audio" and isinstance(value, str):
            row[key] = _existing(root / value, where, key, problems)
        elif isinstance(value, dict) and isinstance(value.get("audio"), str):
            row[key] = {**value, "audio": _existing(root / value["audio"], where, f"{key}.audio", problems)}
    return row


def _existing(path: Path, where: str, name: str, problems: list[str]) -> str:
    if not path.is_file():
        problems.append(f"{where}: {name} file {path} does not exist")
    return str(path)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- model calls --------------------------------------------------------------------------------------
def sampling_options(temperature: float) -> dict:
    """``generate`` options for ``temperature``: 0 is greedy, else plain sampling (no top-k or top-p cut)."""
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def generate_text(model, processor, conversations: Sequence[list[dict]], settings: EvalSettings,
                  temperatures_used: list[float] | None = None, **generate_kwargs) -> list[str]:
    """Text answers, ``settings.batch_size`` conversations per ``generate`` call: at the first of
    ``settings.temperatures`` (0: greedy), then, for the answers that loop, at the next one, and so on (the
    last try stands). Sampling is seeded, so a run repeats. ``temperatures_used`` gets each answer's."""
    from whisper.utils import compression_ratio

    answers: list[str] = [""] * len(conversations)
    used = [settings.temperatures[0]] * len(conversations)
    pending = list(range(len(conversations)))
    # seeded, and the caller's random state (CPU and this GPU) comes back afterwards
    forked_devices = [model.device] if model.device.type == "cuda" else []
    for attempt, temperature in enumerate(settings.temperatures):
        with torch.random.fork_rng(devices=forked_devices):
            torch.manual_seed(attempt)
            for start in range(0, len(pending), settings.batch_size):
                chosen = pending[start: start + settings.batch_size]
                replies = respond(model, processor, [conversations[i] for i in chosen], output="text",
                                  max_new_tokens=settings.max_new_tokens, **sampling_options(temperature),
                                  **generate_kwargs)
                for index, reply in zip(chosen, replies, strict=True):
                    answers[index], used[index] = reply.text.strip(), temperature
        pending = [i for i in pending if compression_ratio(answers[i]) > settings.compression_ratio_threshold]
        if not pending:
            break
    if temperatures_used is not None:
        temperatures_used[:] = used
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
    return processor.codec.encode([load_audio(audio_path)], n_q=1)[0][0].tolist()


# -- tasks --------------------------------------------------------------------------------------------
def evaluate_asr(model, processor, items: list[EvalItem], settings: EvalSettings) -> list[dict]:
    conversations = [[{"role": "user", "content": [{"type": "audio", "audio": item.fields["audio"]},
                                                   {"type": "text", "text": settings.asr_prompt}]}]
                     for item in items]
    temperatures: list[float] = []
    # with a reader, the transcript keeps to the reader's unless the LM is sure of a correction
    following = settings.asr_follow_transcript if getattr(model, "audio_reader", None) is not None else 0.0
    hypotheses = generate_text(model, processor, conversations, settings, temperatures, follow_transcript=following,
                               transcript_fallback=settings.asr_transcript_fallback)  # used only while following
    results = []
    for item, hypothesis, temperature in zip(items, hypotheses, temperatures, strict=True):
        words = word_errors([item.fields["text"]], [hypothesis])
        results.append({"id": item.id, "reference": item.fields["text"], "hypothesis": hypothesis,
                        "word_errors": words.to_dict(), "temperature": temperature})
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
                        "speech": vars(match_answer(from_speech, answers, item.fields["question"])),
                        "text": vars(match_answer(from_text, answers, item.fields["question"])),
                        "speech_as_text": answers_start_alike(from_speech, from_text)})
    return results


AS_TEXT_WORDS = 10  # a spoken request "answered as typed" starts its answer with the typed answer's first words


def answers_start_alike(from_speech: str, from_text: str, words: int = AS_TEXT_WORDS) -> bool:
    """Whether the answer to a spoken question starts with the same ``words`` words as the answer to it typed:
    the spoken request acted as the typed one, whether or not the backbone knows the answer (on a few dozen
    questions that a small backbone gets right about half the time, one answer moves the contains-rate by
    several points; this paired figure does not hang on it)."""
    return from_speech.split()[:words] == from_text.split()[:words]


def evaluate_slm(model, processor, items: list[EvalItem], settings: EvalSettings) -> list[dict]:
    real = sequence_log_likelihoods(model, processor, [item.fields["real"] for item in items])
    fake = sequence_log_likelihoods(model, processor, [item.fields["fake"] for item in items])
    return [{"id": item.id, "real_log_likelihood": r[0], "real_tokens": r[1], "fake_log_likelihood": f[0],
             "fake_tokens": f[1]} for item, r, f in zip(items, real, fake, strict=True)]


def evaluate_tts(model, processor, items: list[EvalItem], settings: EvalSettings) -> list[dict]:
    requests = [[{"role": "user", "content": settings.tts_prompt.format(text=item.fields["text"])}] for item in items]
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(0)
        new_tokens = generate_response_tokens(model, processor, processor(requests), output="speech",
                                              max_speech_units=settings.max_speech_units,
                                              speech_by=settings.speech_by,
                                              spoken_text=[item.fields["text"] for item in items],
                                              **sampling_options(settings.tts_temperature))
    responses = [processor.parse_response(row) for row in new_tokens]
    judge = load_judge(settings.judge) if settings.judge else None
    references = [item.fields["units"] if item.fields.get("units") is not None
                  else _encode_units(processor, item.fields["audio"]) for item in items]
    speaker = "lm" if speaking_decoder(processor, "speech", settings.speech_by) is None else "decoder"
    results = []
    for item, response, reference in zip(items, responses, references, strict=True):
        results.append({"id": item.id, "text": item.fields["text"], "reference_units": list(reference),
                        "units": response.units, "unit_errors": unit_errors([reference], [response.units]).to_dict(),
                        "speech_by": speaker})
    if judge is not None:
        # The judge hears the answers and the references decoded by the same decoder (the codec's, or the
        # vocoder trained for it): the references' WER is the most the answers' can reach.
        codec = processor.codec
        spoken = [i for i, response in enumerate(responses) if response.units]
        answers = dict(zip(spoken, codec.decode_batch([responses[i].units for i in spoken]), strict=True)
                       ) if spoken else {}
        heard = dict(zip(answers, transcribe_batch(judge, list(answers.values())), strict=True))
        heard_references = judged_references(judge, settings, codec, references)
        for index, (result, reference_heard) in enumerate(zip(results, heard_references, strict=True)):
            result["judge_transcript"] = heard.get(index, "")
            result["reference_judge_transcript"] = reference_heard
            result["decoder"] = codec.decodes_with(1)
    return results


def judged_references(judge, settings: EvalSettings, codec, references: Sequence) -> list[str]:
    """What the judge hears of each reference's units decoded by ``codec``; with ``settings.judge_cache``, kept
    there by a key of the judge's file, the decoder's weights and the units, and only the new ones judged."""
    if settings.judge_cache is None:
        return transcribe_batch(judge, codec.decode_batch(references))
    path = Path(settings.judge_cache)
    try:
        kept = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"judge_cache {path}: not a JSON file of judged references ({error}); delete it and it "
                         f"is judged again") from error
    setting = f"{file_sha256(settings.judge)}:{decoder_fingerprint(codec)}:{JUDGE_TEMPERATURES}:{JUDGE_SILENCE_SECONDS}"
    keys = [hashlib.sha256(f"{setting}:{list(map(int, units))}".encode()).hexdigest() for units in references]
    new = [i for i, key in enumerate(keys) if key not in kept]
    if new:
        heard = transcribe_batch(judge, codec.decode_batch([references[i] for i in new]))
        kept.update({keys[i]: text for i, text in zip(new, heard, strict=True)})
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(kept))
        partial.replace(path)  # a run stopped while writing leaves the kept file whole
    return [kept[key] for key in keys]


def decoder_fingerprint(codec) -> str:
    """A hash of the weights that turn ``codec``'s layer-1 units into audio: its trained vocoder's where that
    decodes (`decodes_with`), else the codec's own model."""
    from speechlm.adapters.reading_cache import weights_digest

    module = codec.vocoders[1] if codec.decodes_with(1) == "vocoder" else codec.model
    return weights_digest([*module.parameters(), *module.buffers()])


def load_judge(path: str):
    """openai-whisper's model from ``path``, its encoder one that takes a window shorter than 30 s
    (`WhisperAudioEncoder`: the same weights and, on 30 s, the same frames)."""
    import whisper

    from speechlm.adapters.audio_encoder import WHISPER_DIM_FIELDS, WhisperAudioEncoder
    from speechlm.adapters.configuration import SpeechLMAudioConfig

    if not Path(path).is_file():
        raise FileNotFoundError(f"judge {path}: no such openai-whisper checkpoint")
    judge = whisper.load_model(path, device="cpu")
    encoder = WhisperAudioEncoder(SpeechLMAudioConfig(**{name: getattr(judge.dims, name) for name in WHISPER_DIM_FIELDS}))
    encoder.load_state_dict(judge.encoder.state_dict())
    judge.encoder = encoder.eval()
    return judge


# openai-whisper's transcribe: greedy, and where the text loops (gzip ratio above LOOP_COMPRESSION_RATIO), sampled
# again at the next temperature. Unclear speech makes a greedy Whisper repeat a word hundreds of times, which would
# count as hundreds of insertions against a ten-word sentence.
JUDGE_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Silence heard after each clip (the quick start's reader_silence_seconds): on the quick start's TTS sets the same
# WER as openai-whisper's 30 s windows (0.4-2.2 points lower) in 0.36x the time (BENCHMARKS.md)
JUDGE_SILENCE_SECONDS = 5.0


def transcribe(judge, waveform) -> str:
    """The judge's English transcript of one waveform (`transcribe_batch`)."""
    return transcribe_batch(judge, [waveform])[0]


def transcribe_batch(judge, waveforms: Sequence, *, batch_size: int = 16) -> list[str]:
    """The judge's English transcripts, decoded as openai-whisper's ``transcribe`` decodes a window: greedy,
    ``batch_size`` clips per decoding call, then, one by one, the temperature fallback where a text loops
    (seeded, so a run repeats). Each clip is heard with ``JUDGE_SILENCE_SECONDS`` of silence after it, as the
    whisper reader reads (Whisper's decoder repeats itself on short input without silence after it); clips
    that share a window decode together, so a clip is heard the same alone or in a batch."""
    import whisper

    from speechlm.adapters.audio_encoder import WhisperAudioEncoder
    from speechlm.adapters.readers import silence_windows

    if not isinstance(judge.encoder, WhisperAudioEncoder):  # openai-whisper's own asserts a 30 s input
        raise TypeError(f"transcribe_batch hears clips in windows shorter than 30 s, which the judge's encoder "
                        f"({type(judge.encoder).__name__}) does not take: load the judge with "
                        f"speechlm.evaluation.load_judge(path), not whisper.load_model")
    # at most 30 s, as openai-whisper's window
    audio = [torch.as_tensor(waveform, dtype=torch.float32).flatten()[: whisper.audio.N_SAMPLES] for waveform in waveforms]
    mel_lengths = torch.tensor([len(clip) // whisper.audio.HOP_LENGTH for clip in audio], dtype=torch.long)
    windows = silence_windows(mel_lengths, round(JUDGE_SILENCE_SECONDS * 100)).tolist()
    mels = [whisper.log_mel_spectrogram(whisper.pad_or_trim(clip, window * whisper.audio.HOP_LENGTH),
                                        n_mels=judge.dims.n_mels) for clip, window in zip(audio, windows, strict=True)]
    texts = [""] * len(mels)
    order = sorted(range(len(mels)), key=lambda index: windows[index])
    for _, same_window in itertools.groupby(order, key=lambda index: windows[index]):
        same_window = list(same_window)
        for start in range(0, len(same_window), batch_size):
            rows = same_window[start:start + batch_size]
            greedy = judge_decode(judge, torch.stack([mels[row] for row in rows]), JUDGE_TEMPERATURES[0])
            for row, result in zip(rows, greedy, strict=True):
                texts[row] = heard_without_loop(judge, mels[row], result)
    return texts


def judge_decode(judge, mel: torch.Tensor, temperature: float):
    """openai-whisper's decoding of ``mel`` (one log-mel or a batch) by the judge, English, without timestamps."""
    import whisper

    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, temperature=temperature)
    return whisper.decode(judge, mel, options)


def heard_without_loop(judge, mel: torch.Tensor, result) -> str:
    """The text of ``result`` (the greedy decoding of ``mel``) or, where it loops, of ``mel`` decoded again at the
    next of `JUDGE_TEMPERATURES` (seeded, so a run repeats)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for temperature in JUDGE_TEMPERATURES[1:]:
            if result.compression_ratio <= LOOP_COMPRESSION_RATIO:
                break
            result = judge_decode(judge, mel, temperature)
    return result.text.strip()


def evaluate_latency(model, processor, items: list[EvalItem], settings: EvalSettings) -> list[dict]:
    """One streamed response per item, timed from the call: first text, first audio, whole response."""
    results = []
    for item in items:
        start = time.perf_counter()
        first_text = first_audio = None
        audio_samples = 0
        for event in stream_response(model, processor, audio=item.fields.get("audio"), text=item.fields.get("text"),
                                     output=settings.output, max_new_tokens=settings.max_new_tokens,
                                     max_speech_units=settings.max_speech_units, speech_by=settings.speech_by,
                                     do_sample=False):
            now = time.perf_counter() - start
            if isinstance(event, TextDelta) and event.text and first_text is None:
                first_text = now
            elif isinstance(event, AudioChunk):
                first_audio = now if first_audio is None else first_audio
                audio_samples += event.array.shape[0]
        total = time.perf_counter() - start
        audio_seconds = audio_samples / SAMPLE_RATE
        results.append({"id": item.id, "first_text_s": first_text, "first_audio_s": first_audio, "total_s": total,
                        "audio_s": audio_seconds, "real_time_factor": total / audio_seconds if audio_seconds else None})
    return results


# what a request's length is read from, for batching items of similar lengths (`batch_order`)
BATCH_LENGTH_FIELDS = {"asr": "audio", "qa": "question", "tts": "text", "slm": None, "latency": None}
TASK_RUNNERS: dict[str, Callable] = {"asr": evaluate_asr, "qa": evaluate_qa, "tts": evaluate_tts,
                                     "slm": evaluate_slm, "latency": evaluate_latency}


def summarize(task: str, results: list[dict]) -> dict[str, float]:
    """Totals over per-item results (recomputed from counts, so shards sum exactly)."""
    if task == "asr":
        refs = [r["reference"] for r in results]
        hyps = [r["hypothesis"] for r in results]
        words, chars = word_errors(refs, hyps), character_errors(refs, hyps)
        return {"wer": words.rate, "cer": chars.rate, "substitutions": words.substitutions,
                "deletions": words.deletions, "insertions": words.insertions,
                "reference_words": words.reference_length, "items": len(results),
                "sampled": sum(1 for r in results if r.get("temperature", 0.0) > 0)}  # greedy text looped
    if task == "qa":
        totals: dict[str, float] = {"items": len(results)}
        for level in ("exact", "normalized", "contains"):
            speech = sum(r["speech"][level] for r in results) / len(results)
            text = sum(r["text"][level] for r in results) / len(results)
            totals[f"speech_{level}"], totals[f"text_{level}"] = speech, text
            totals[f"speech_to_text_{level}"] = speech / text if text else math.nan
        # spoken questions answered as the typed ones are (the first words alike); absent in older reports
        totals["speech_as_text"] = sum(r.get("speech_as_text", False) for r in results) / len(results)
        # spoken questions answered by saying them again: the task overfitting of a model drilled on ASR
        totals["speech_restates_question"] = sum(r["speech"].get("restates_question", False)
                                                 for r in results) / len(results)
        return totals
    if task == "tts":
        units = unit_errors([r["reference_units"] for r in results], [r["units"] for r in results])
        ratios = [len(r["units"]) / len(r["reference_units"]) for r in results]
        totals = {"unit_error_rate": units.rate, "reference_units": units.reference_length, "items": len(results),
                  # where a response stops: its length against the reference's
                  "length_ratio_median": statistics.median(ratios) if ratios else math.nan,
                  "length_within_20_percent": sum(abs(r - 1) <= 0.2 for r in ratios) / len(ratios) if ratios else math.nan}
        if results and "judge_transcript" in results[0]:
            texts = [r["text"] for r in results]
            totals["judge_wer"] = word_errors(texts, [r["judge_transcript"] for r in results]).rate
            if "reference_judge_transcript" in results[0]:
                totals["reference_judge_wer"] = word_errors(texts, [r["reference_judge_transcript"]
                                                                    for r in results]).rate
        return totals
    if task == "latency":
        totals = {"items": len(results)}
        for key in ("first_text_s", "first_audio_s", "total_s", "real_time_factor"):
            values = [r[key] for r in results if r[key] is not None]
            totals[f"mean_{key}"] = sum(values) / len(values) if values else math.nan
        return totals
    summed = pair_accuracy([r["real_log_likelihood"] for r in results], [r["fake_log_likelihood"] for r in results])
    normalized = pair_accuracy([r["real_log_likelihood"] / r["real_tokens"] for r in results],
                               [r["fake_log_likelihood"] / r["fake_tokens"] for r in results])
    return {"accuracy_summed": summed, "accuracy_length_normalized": normalized, "pairs": len(results)}


def batch_order(task: str, items: Sequence[EvalItem]) -> list[int]:
    """The order items are batched in: by the length of what each asks (a clip's file size, a text's characters),
    so a batch pads less and, generating, waits less for its longest answer (the quick start's ood ASR set:
    131.1 -> 110.7 s at batch 40; BENCHMARKS.md). Latency keeps the manifest's order, as a user's requests come."""
    field = BATCH_LENGTH_FIELDS.get(task)
    if field is None:
        return list(range(len(items)))

    def length(item: EvalItem) -> int:
        value = item.fields[field]
        if field != "audio":
            return len(value)
        return Path(value).stat().st_size if isinstance(value, str) else 0  # audio given in memory: first

    return sorted(range(len(items)), key=lambda i: length(items[i]))


def evaluate(model, processor, task: str, items: Sequence[EvalItem], settings: EvalSettings | None = None, *,
             progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """``(totals, per-item results)`` of one task for a model in memory (e.g. during training)."""
    settings = settings or EvalSettings()
    runner = TASK_RUNNERS[task]
    order = batch_order(task, items)
    ordered: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        with model.language_model_in(settings.lm_dtype):
            for start in tqdm(range(0, len(items), settings.batch_size), desc=f"eval {task}",
                              disable=not progress):
                batch = [items[i] for i in order[start: start + settings.batch_size]]
                ordered += runner(model, processor, batch, settings)
    finally:
        model.train(was_training)
    results: list[dict] = [{}] * len(items)
    for index, result in zip(order, ordered, strict=True):  # back in the manifest's order
        results[index] = result
    return (summarize(task, results) if results else {}), results


def run_evaluation(model_dir: str, task: str, manifest: str, settings: EvalSettings | None = None) -> dict:
    """Load the model, evaluate every item (sharded across processes under accelerate), return the report."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from transformers import AutoModelForCausalLM, AutoProcessor

    settings = settings or EvalSettings()
    items = read_eval_manifest(manifest, task)
    # cpu=True on a machine without CUDA: otherwise a CPU launch runs N unconnected copies
    state = PartialState(cpu=not torch.cuda.is_available())
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(state.device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    with state.split_between_processes(items) as shard:
        _, local = evaluate(model, processor, task, shard, settings, progress=state.is_local_main_process)
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
