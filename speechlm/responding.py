"""One response from a SpeechLM, in the output mode asked for: whole (`respond`) or as a stream of events
(`stream_response`). The pipeline and ``speechlm generate`` are thin layers over these two calls.

A response is text (``text``), speech (``speech``: units decoded to a 16 kHz waveform by the codec), or
text then its speech (``text+speech``, chain-of-modality). The grammar lives in `speechlm.constraints`.

Who speaks (``speech_by``): the LM itself, generating the units, or the codec's speech decoder
(`speechlm.speech_io.speech_decoder`, where the codec has one: the default then), which speaks the text the LM
writes one sentence at a time. Either way the response's tokens read the same (`spoken_token_stream` splices
the decoder's units into the text as spans), so parsing, streaming and serving do not tell them apart.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from speechlm.constraints import (
    OUTPUT_MODES,
    OutputModeLogitsProcessor,
    SpeechLengthLogitsProcessor,
    SpeechSpanLogitsProcessor,
    SpeechTokenIds,
    TranscriptFollowingLogitsProcessor,
)
from speechlm.drafting import accepted_drafts, drafts_apply
from speechlm.speech_io.constants import SAMPLE_RATE
from speechlm.speech_io.processor import as_conversations, padding_token_id

DEFAULT_MAX_NEW_TOKENS = 64  # text tokens
DEFAULT_MAX_SPEECH_UNITS = 750  # 15 s at 50 Hz
STREAM_CHUNK_FRAMES = 10  # 0.2 s of audio per streamed chunk


@dataclass(frozen=True)
class SpeechLMReply:
    """A whole response: its text, its speech units, and their waveform (float32, 16 kHz) when it spoke."""

    text: str
    units: list[int]
    audio: np.ndarray | None
    sampling_rate: int = SAMPLE_RATE


@dataclass(frozen=True)
class TextDelta:
    """Newly generated text, to print as it comes."""

    text: str


@dataclass(frozen=True)
class AudioChunk:
    """The next piece of the spoken response, float32 at 16 kHz, to play as it comes."""

    array: np.ndarray
    sampling_rate: int = SAMPLE_RATE


ResponseEvent = TextDelta | AudioChunk


def generation_settings(model, processor, prompt_length: int, *, output: str = "text",
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                        max_speech_units: int = DEFAULT_MAX_SPEECH_UNITS, spoken_text: Sequence[str] | None = None,
                        follow_transcript: float = 0.0, transcripts: Sequence[Sequence[int]] | None = None,
                        **generate_kwargs) -> dict[str, Any]:
    """``generate`` keyword arguments for a response in ``output`` mode to prompts of ``prompt_length``.

    ``max_new_tokens`` bounds the text, ``max_speech_units`` the speech span; sampling settings
    (``do_sample``, ``temperature``, ``top_p``, ...) pass through. A model that knows its speaking rate
    (``config.speech_units_per_character``) keeps each span about as long as the text it speaks: each row's
    ``spoken_text`` where given (a TTS request), else the text generated before the span.
    ``follow_transcript`` > 0 (a transcription request to a model with a reader) keeps the text to each row's
    reader transcript (``transcripts``, from `reader_transcripts`) unless the LM prefers another token by
    more than that many log-odds (`TranscriptFollowingLogitsProcessor`).
    """
    if output not in OUTPUT_MODES:
        raise ValueError(f"output={output!r}: choose one of {list(OUTPUT_MODES)}")
    if output != "text" and not processor.has_codec:
        raise ValueError(f"output={output!r} needs a codec to turn units into sound, and this model has none; "
                         f"build it with a codec (model YAML `codec:`) or ask for output='text'")
    ids = SpeechTokenIds.of(model.config)
    eos = eos_token_ids(model, processor)
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(OutputModeLogitsProcessor(ids, prompt_length, output, eos,
                                                max_text_tokens=max_new_tokens if output == "text+speech" else None))
    processors.append(SpeechSpanLogitsProcessor(ids, prompt_length, max_speech_units))
    rate = model.config.speech_units_per_character
    if rate is not None and output != "text":
        spoken = None if spoken_text is None else torch.tensor([len(text.strip()) for text in spoken_text])
        processors.append(SpeechLengthLogitsProcessor(ids, prompt_length, rate, processor.token_characters(),
                                                      spoken, model.config.speech_length_tolerance,
                                                      model.config.speech_length_ceiling))
    if follow_transcript:
        if transcripts is None:
            raise ValueError("follow_transcript needs each row's reader transcript (transcripts=, from "
                             "reader_transcripts)")
        processors.append(TranscriptFollowingLogitsProcessor(transcripts, prompt_length, follow_transcript, eos[0]))
    # Room for the text, the span and its two markers, and the closing EOS.
    budget = {"text": max_new_tokens, "speech": max_speech_units + 3,
              "text+speech": max_new_tokens + max_speech_units + 3}[output]
    return {"max_new_tokens": budget, "logits_processor": processors, **generate_kwargs}


def eos_token_ids(model, processor) -> list[int]:
    """The ids that end a response: the model's generation config's, else the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [processor.tokenizer.eos_token_id])


SPEECH_BY = ("auto", "lm", "decoder")


def speaking_decoder(processor, output: str, speech_by: str = "auto"):
    """The speech decoder that speaks a response in ``output`` mode, or None where the LM speaks (or nothing
    does). ``speech_by``: "auto" (the codec's speech decoder where it has one, else the LM), "lm" or "decoder"."""
    if speech_by not in SPEECH_BY:
        raise ValueError(f"speech_by={speech_by!r}: choose one of {list(SPEECH_BY)}")
    if output == "text" or speech_by == "lm" or not processor.has_codec:
        return None
    decoder = processor.codec.speech_decoder
    if decoder is None and speech_by == "decoder":
        raise ValueError("speech_by='decoder': this model's codec has no speech decoder; train one with "
                         "`speechlm train-speech-decoder MANIFEST --codec CODEC_DIR`, or use speech_by='lm'")
    return decoder


def spoken_token_stream(processor, decoder, tokens: Iterable[int], output: str, *, eos: int | None = None,
                        max_speech_units: int = DEFAULT_MAX_SPEECH_UNITS, spoken_text: str | None = None
                        ) -> Iterator[int]:
    """A response's token ids as if the LM had spoken it: the text the LM writes (``tokens``, up to its EOS; kept
    in ``text+speech`` mode), and after each sentence as it completes, a span of ``decoder``'s units for it
    (at most ``max_speech_units`` in all), then the EOS the LM ended with (``eos`` where there is no LM text,
    and none where the LM ran out of tokens). ``spoken_text`` (a TTS request): speak that text, not the LM's
    (and in ``text+speech`` mode, write it). The spans are the sentences `SpeechDecoder.speak` reads, so the
    units equal its whole-text ones."""
    from speechlm.speech_io.speech_decoder import split_sentences

    tokenizer, ended = processor.tokenizer, spoken_text is not None
    special = set(tokenizer.all_special_ids)
    text_ids: list[int] = []
    spoken_sentences, units_left = 0, max_speech_units

    def spans(sentences: list[str]) -> Iterator[int]:
        nonlocal units_left
        for sentence in sentences:
            units = decoder.speak(sentence)[:units_left]
            if units:
                units_left -= len(units)
                yield processor.speech_start_token_id
                yield from (processor.speech_unit_start_id + unit for unit in units)
                yield processor.speech_end_token_id

    if spoken_text is not None and output == "text+speech":
        yield from tokenizer(spoken_text, add_special_tokens=False).input_ids
    for token in tokens if spoken_text is None else []:
        if token >= processor.text_vocab_size or token in special:
            eos, ended = token, True  # the LM's text ends here (a text response holds no speech tokens)
            break
        if output == "text+speech":
            yield token
        text_ids.append(token)
        sentences = split_sentences(tokenizer.decode(text_ids, skip_special_tokens=True))
        if len(sentences) - 1 > spoken_sentences:  # all but the last are complete
            yield from spans(sentences[spoken_sentences:-1])
            spoken_sentences = len(sentences) - 1
    text = spoken_text if spoken_text is not None else tokenizer.decode(text_ids, skip_special_tokens=True)
    yield from spans(split_sentences(text)[spoken_sentences:])
    if ended and eos is not None:
        yield eos


def respond(model, processor, conversations=None, *, audio=None, text: str | None = None,
            sampling_rate: int | None = None, output: str = "text", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            max_speech_units: int = DEFAULT_MAX_SPEECH_UNITS, voice=None,
            **generate_kwargs) -> SpeechLMReply | list[SpeechLMReply]:
    """The model's response to a conversation (a list of them: one batched ``generate``, a list back), or to
    a single turn of ``audio`` and/or ``text``. ``voice``: speak in this recording's voice (`voice_codes`).
    ``generate_kwargs`` pass through (sampling settings; ``speech_by``: who speaks, `speaking_decoder`)."""
    batch, batched = as_conversations(conversations, audio=audio, text=text, sampling_rate=sampling_rate)
    prompt = voice_codes(processor, voice)  # before generating: a bad prompt costs nothing
    inputs = processor(batch)
    new_tokens = generate_response_tokens(model, processor, inputs, output=output, max_new_tokens=max_new_tokens,
                                          max_speech_units=max_speech_units, **generate_kwargs)
    replies = replies_from_tokens(processor, new_tokens, voice_codes=prompt)
    return replies if batched else replies[0]


def voice_codes(processor, voice):
    """The codes of a voice prompt (a recording: a file path, resampled to 16 kHz, or a 16 kHz array; at least
    1 s, not silent) for the codec's completion model, which speaks the LM's layer-1 units in that voice with
    all of the codec's layers; None without a voice. A codec without one is an error that says how to get one."""
    if voice is None:
        return None
    codec = processor.codec
    if codec.n_q < 2 or not hasattr(codec, "voice_prompt"):
        raise ValueError(f"voice=: this model's codec ({type(codec).__name__}, {codec.n_q} layer) has no layers "
                         f"to speak a voice with; a SpeechTokenizer codec of 8 layers with a completion model "
                         f"does (speechlm train-completion)")
    return codec.voice_prompt(voice)


def generate_response_tokens(model, processor, inputs: Mapping[str, torch.Tensor], *, speech_by: str = "auto",
                             **settings) -> torch.Tensor:
    """``B, G`` new token ids for a batch of processor inputs (left-padded, as the processor makes them),
    right-padded. ``speech_by``: who speaks (`speaking_decoder`); where the codec's speech decoder does, the LM
    writes text and the decoder's units are spliced in (`spoken_token_stream`), or, for a TTS request
    (``spoken_text``), the decoder speaks the text given and the LM is not run."""
    output = settings.get("output", "text")
    decoder = speaking_decoder(processor, output, speech_by)
    spoken_text = settings.pop("spoken_text", None) if decoder is not None else None
    transcript_fallback = settings.pop("transcript_fallback", None)
    eos = eos_token_ids(model, processor)[0]
    if spoken_text is not None:
        rows: list[list[int]] = [[] for _ in spoken_text]
    else:
        text_only = {**settings, "output": "text"} if decoder is not None else settings
        with torch.inference_mode(), _with_transcripts(model, processor, inputs, text_only) as text_only:
            new_tokens = _text_tokens(model, processor, inputs, text_only)
        if transcript_fallback is not None and text_only.get("follow_transcript"):
            new_tokens = transcripts_where_run_off(processor, new_tokens, text_only["transcripts"],
                                                   transcript_fallback, eos)
        if decoder is None:
            return new_tokens
        rows = new_tokens.tolist()
    spoken = [list(spoken_token_stream(processor, decoder, row, output, eos=eos,
                                       max_speech_units=settings.get("max_speech_units", DEFAULT_MAX_SPEECH_UNITS),
                                       spoken_text=None if spoken_text is None else spoken_text[i]))
              for i, row in enumerate(rows)]
    return _right_padded(spoken, padding_token_id(processor.tokenizer))


def _text_tokens(model, processor, inputs: Mapping[str, torch.Tensor], settings: dict) -> torch.Tensor:
    """``B, G`` new token ids, right-padded. A greedy transcription that follows the reader's transcript is
    checked against that transcript in one pass first (`speechlm.drafting`): only the rows that leave it are
    decoded step by step, so a batch of transcriptions costs about one pass, not a pass per token."""
    kwargs = generation_settings(model, processor, inputs["input_ids"].shape[1], **settings)
    sampling = {key: value for key, value in kwargs.items() if key not in ("max_new_tokens", "logits_processor")}
    # a caller's own logits processors may keep state or tell rows apart: those decode as they were written for
    if (not settings.get("follow_transcript") or settings.get("logits_processor")
            or not drafts_apply(model.generation_config, sampling)):
        return _step_by_step(model, inputs, kwargs)
    ends = eos_token_ids(model, processor)
    eos, pad = ends[0], padding_token_id(processor.tokenizer)
    drafts = [[*_before_any(transcript, ends), eos][: kwargs["max_new_tokens"]] for transcript in settings["transcripts"]]
    accepted = accepted_drafts(model, inputs, drafts, kwargs["logits_processor"], pad)
    rows: list[list[int]] = [list(draft) if ok else [] for draft, ok in zip(drafts, accepted, strict=True)]
    left = [row for row, ok in enumerate(accepted) if not ok]
    if left:
        subset = {**settings, "transcripts": [settings["transcripts"][row] for row in left]}
        rest = rows_of_inputs(model, inputs, left)
        generated = _step_by_step(model, rest, generation_settings(model, processor, rest["input_ids"].shape[1], **subset))
        for row, tokens in zip(left, generated.tolist(), strict=True):
            rows[row] = tokens
    return _right_padded(rows, pad, device=inputs["input_ids"].device)


def _before_any(tokens: Sequence[int], ends: Sequence[int]) -> list[int]:
    """``tokens`` up to the first of ``ends`` (greedy decoding that wrote it would stop there)."""
    cut = next((index for index, token in enumerate(tokens) if token in ends), len(tokens))
    return list(tokens[:cut])


def _step_by_step(model, inputs: Mapping[str, torch.Tensor], generate_kwargs: dict) -> torch.Tensor:
    """``B, G`` new token ids from ``generate`` (``generate_kwargs``: `generation_settings` for these inputs), a
    decoding step a token."""
    return model.generate(**inputs, **generate_kwargs)[:, inputs["input_ids"].shape[1]:]


def rows_of_inputs(model, inputs: Mapping[str, torch.Tensor], rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """The processor inputs of ``rows`` alone (left-padded as before; their clips' features with them), the
    columns of left padding that every row kept leaves cut."""
    input_ids, attention_mask = inputs["input_ids"][list(rows)], inputs["attention_mask"][list(rows)]
    start = int(attention_mask.eq(0).all(0).long().cumprod(0).sum())  # leading columns of padding only
    chosen = {"input_ids": input_ids[:, start:], "attention_mask": attention_mask[:, start:]}
    if "input_features" in inputs:
        kept = set(rows)
        clips = [clip for clip, owner in enumerate(clip_rows(model, inputs)) if owner in kept]
        if clips:  # rows of text alone take no features
            chosen["input_features"] = inputs["input_features"][clips]
            if inputs.get("input_features_mask") is not None:
                chosen["input_features_mask"] = inputs["input_features_mask"][clips]
    return chosen


def clip_rows(model, inputs: Mapping[str, torch.Tensor]) -> list[int]:
    """The row each clip of ``inputs`` belongs to: a row's clips fill its ``<|audio|>`` placeholders, in order."""
    positions = model.audio_lengths(model._mel_lengths(inputs["input_features"], inputs.get("input_features_mask")))
    positions = positions.tolist()
    placeholders = (inputs["input_ids"] == model.config.audio_token_id).sum(1).tolist()
    owners, clip = [], 0
    for row, count in enumerate(placeholders):
        while count > 0:
            owners.append(row)
            count -= positions[clip]
            clip += 1
    return owners


def _right_padded(rows: Sequence[Sequence[int]], pad: int, device=None) -> torch.Tensor:
    """``rows`` of token ids as one ``B, G`` tensor, each padded on the right with ``pad``."""
    width = max(1, max(len(row) for row in rows))
    return torch.tensor([[*row] + [pad] * (width - len(row)) for row in rows], dtype=torch.long, device=device)


def transcripts_where_run_off(processor, new_tokens: torch.Tensor, transcripts: Sequence[Sequence[int]],
                              max_departure: float, eos: int) -> torch.Tensor:
    """``new_tokens`` ``(B, G)`` of transcription requests, with each row that strays from its reader transcript
    by more than ``max_departure`` (its word errors against the transcript over the transcript's words, as WER is
    counted) replaced by the transcript and ``eos``. A transcription that far from what Whisper heard has run on
    into an answer or a continuation, as the LM does on a clip whose transcript makes little sense to it; the
    reader's transcript is the better guess, as openai-whisper falls back where a decoding loops. A row whose
    transcript has no words is left alone."""
    from speechlm.finetune.metrics import normalize_text, word_errors

    if max_departure < 0:
        raise ValueError(f"transcript_fallback={max_departure}: expected >= 0 (the share of the transcript's words "
                         f"a transcription may differ in)")
    if len(new_tokens) != len(transcripts):
        raise ValueError(f"transcript_fallback compares one response a request with its transcript: {len(new_tokens)} "
                         f"responses to {len(transcripts)} requests (num_return_sequences > 1?)")
    pad = padding_token_id(processor.tokenizer)
    rows = new_tokens.tolist()
    for index, (row, transcript) in enumerate(zip(rows, transcripts, strict=True)):
        heard = processor.tokenizer.decode(list(transcript))
        if not normalize_text(heard).strip():
            continue
        written = row[: row.index(eos)] if eos in row else [token for token in row if token != pad]
        errors = word_errors([heard], [processor.tokenizer.decode(written, skip_special_tokens=True)])
        if errors.rate > max_departure:
            rows[index] = [*transcript, eos]
    return _right_padded(rows, pad, device=new_tokens.device)


def reader_transcripts(model, processor, inputs: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """Each row's transcript by the model's reader (its clips' transcripts in order), in token ids as the
    row's answer would begin (no leading space): what `TranscriptFollowingLogitsProcessor` follows."""
    if getattr(model, "audio_reader", None) is None:
        raise ValueError("follow_transcript needs a model with a reader (projector_config.reader: whisper)")
    if "input_features" not in inputs:
        clips, owners = [], []
    else:
        clips = model.audio_transcripts(inputs["input_features"], inputs.get("input_features_mask"))
        owners = clip_rows(model, inputs)
    transcripts = []
    for row in range(inputs["input_ids"].shape[0]):
        texts = [processor.tokenizer.decode(clips[clip]).strip() for clip, owner in enumerate(owners) if owner == row]
        text = " ".join(t for t in texts if t)
        transcripts.append(processor.tokenizer(text, add_special_tokens=False).input_ids if text else [])
    return transcripts


@contextmanager
def _with_transcripts(model, processor, inputs, settings: dict) -> Iterator[dict]:
    """``settings`` with each row's reader transcript where they ask to follow it; while inside, the model
    keeps what it read of each clip, so ``generate`` does not decode the clips again."""
    if not settings.get("follow_transcript"):
        yield settings
        return
    with model.keeping_readings():
        yield {**settings, "transcripts": reader_transcripts(model, processor, inputs)}


def replies_from_tokens(processor, new_tokens: torch.Tensor, *, voice_codes=None) -> list[SpeechLMReply]:
    """Text and units of each row; each speech span decoded on its own (as a stream decodes it: a response the
    speech decoder spoke has one span a sentence), all rows' spans in one exact codec batch. With
    ``voice_codes`` (`voice_codes`), each span is completed to all of the codec's layers in that voice first."""
    parsed = [processor.parse_response(row) for row in new_tokens]
    spans = [speech_spans(processor, row.tolist()) for row in new_tokens]
    if voice_codes is not None:
        spans = [[processor.codec.complete(span, voice_codes) for span in row] for row in spans]
    waves = iter(processor.codec.decode_batch([span for row in spans for span in row])) if any(spans) else iter(())
    audio = [np.concatenate([next(waves) for _ in row]) if row else None for row in spans]
    return [SpeechLMReply(response.text, response.units, wave) for response, wave in zip(parsed, audio, strict=True)]


def speech_spans(processor, token_ids: Sequence[int]) -> list[list[int]]:
    """The units of each speech span of a response, in order (a span left open at the end counts)."""
    first_unit, num_units = processor.speech_unit_start_id, processor.num_speech_units
    spans, current = [], None
    for token in token_ids:
        if token == processor.speech_start_token_id:
            current = []
            spans.append(current)
        elif current is not None and first_unit <= token < first_unit + num_units:
            current.append(token - first_unit)
        else:
            current = None
    return [span for span in spans if span]


def stream_response(model, processor, conversation=None, *, audio=None, text: str | None = None,
                    sampling_rate: int | None = None, output: str = "text",
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_speech_units: int = DEFAULT_MAX_SPEECH_UNITS,
                    chunk_frames: int = STREAM_CHUNK_FRAMES, speech_by: str = "auto", voice=None,
                    **generate_kwargs) -> Iterator[ResponseEvent]:
    """`TextDelta` and `AudioChunk` events of one response while the model is still generating it.

    ``generate`` runs in a worker thread and hands each token over a queue; units are fed to the codec's
    streamed decoder, which yields ``chunk_frames`` frames of audio as soon as they are final. An error in
    the worker is raised here; closing the iterator early stops generation, and the worker is always joined.
    Where the codec's speech decoder speaks (``speech_by``), each sentence is spoken as soon as the LM ends it;
    with a ``voice`` (`voice_codes`), in that voice, each span once its units are all in.
    """
    batch, batched = as_conversations(conversation, audio=audio, text=text, sampling_rate=sampling_rate)
    if batched:
        raise ValueError("stream_response streams one conversation; use respond for a batch")
    if generate_kwargs.get("transcript_fallback") is not None:
        raise ValueError("transcript_fallback judges a whole transcription, and a stream has sent its text by then; "
                         "use respond for it")
    generate_kwargs.pop("transcript_fallback", None)
    prompt = voice_codes(processor, voice)
    inputs = processor(batch)
    prompt_length = inputs["input_ids"].shape[1]
    decoder = speaking_decoder(processor, output, speech_by)
    with _with_transcripts(model, processor, inputs, generate_kwargs) as generate_kwargs:  # until the worker is joined
        settings = generation_settings(model, processor, prompt_length, output="text" if decoder else output,
                                       max_new_tokens=max_new_tokens, max_speech_units=max_speech_units,
                                       **generate_kwargs)
        tokens = _TokenQueue()
        stop = threading.Event()
        stopping = StoppingCriteriaList(settings.pop("stopping_criteria", None) or [])
        stopping.append(_StopWhenSet(stop))

        def work() -> None:
            try:
                with torch.inference_mode():
                    model.generate(**inputs, **settings, streamer=tokens, stopping_criteria=stopping)
            except BaseException as error:  # handed to the consumer, which re-raises it
                tokens.fail(error)
            finally:
                tokens.end()

        worker = threading.Thread(target=work, name="speechlm-generate", daemon=True)
        worker.start()
        try:
            spoken = tokens if decoder is None else spoken_token_stream(processor, decoder, tokens, output,
                                                                        max_speech_units=max_speech_units)
            yield from response_events(processor, spoken, chunk_frames, voice_codes=prompt)
        finally:
            stop.set()
            worker.join()


class _TokenQueue(BaseStreamer):
    """The streamer ``generate`` feeds: new token ids in, consumed by `response_events` in another thread."""

    _END = object()

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.skipped_prompt = False
        self.error: BaseException | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.skipped_prompt:  # generate pushes the prompt first
            self.skipped_prompt = True
            return
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("streaming supports one conversation at a time")
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(self._END)

    def fail(self, error: BaseException) -> None:
        self.error = error

    def __iter__(self) -> Iterator[int]:
        while (item := self.queue.get()) is not self._END:
            yield item
        if self.error is not None:
            raise self.error


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def response_events(processor, tokens: Iterable[int], chunk_frames: int = STREAM_CHUNK_FRAMES, *,
                    voice_codes=None) -> Iterator[ResponseEvent]:
    """Text deltas outside speech spans; inside one, audio chunks from the codec's streamed decode.

    ``tokens`` are one response's new token ids as generate makes them (`stream_response`'s queue, or one
    row of the server's batched decode, `speechlm.serving.batching`). With ``voice_codes``, a span is completed
    in that voice once its units are all in (the completion reads the whole span: a sentence, where the speech
    decoder speaks), then streamed."""
    stream = iter(tokens)
    text_ids: list[int] = []
    shown = ""
    first_unit, num_units = processor.speech_unit_start_id, processor.num_speech_units
    for token in stream:
        if token == processor.speech_start_token_id:
            def span_units() -> Iterator[int]:
                # The constraints allow only units and <|speech_end|> here; anything else also ends the span.
                for unit_token in stream:
                    if not first_unit <= unit_token < first_unit + num_units:
                        return
                    yield unit_token - first_unit

            units = span_units()
            if voice_codes is not None:
                layer_1 = list(units)
                units = iter([processor.codec.complete(layer_1, voice_codes)] if layer_1 else [])
            for chunk in processor.codec.decode_stream(units, chunk=chunk_frames):
                yield AudioChunk(chunk)
        elif token < processor.text_vocab_size:
            text_ids.append(token)
            decoded = processor.tokenizer.decode(text_ids, skip_special_tokens=True)
            # A byte-level tokenizer may stop mid-character; wait for the rest before showing it.
            if not decoded.endswith("\ufffd") and decoded.startswith(shown) and decoded != shown:
                yield TextDelta(decoded[len(shown):])
                shown = decoded
    # What was held back (bytes of a character that never completed) is shown as the whole decode shows it.
    decoded = processor.tokenizer.decode(text_ids, skip_special_tokens=True)
    if decoded != shown and decoded.startswith(shown):
        yield TextDelta(decoded[len(shown):])
