"""What a SpeechLM may generate next, as transformers ``LogitsProcessor``s.

A response is text, a speech span ``<|speech_start|> <|s_k|>... <|speech_end|>``, or text then a span
(chain-of-modality). `SpeechSpanLogitsProcessor` keeps every response well formed; `OutputModeLogitsProcessor`
steers it into the mode the caller asked for; `SpeechLengthLogitsProcessor` keeps speech as long as its
text, and `TranscriptFollowingLogitsProcessor` keeps a transcription to the reader's transcript. They read
the state of each row from the tokens generated so far (after ``prompt_length``), so they need no per-row
bookkeeping and work for batches and beams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

OUTPUT_MODES = ("text", "speech", "text+speech")


@dataclass(frozen=True)
class SpeechTokenIds:
    """The added-token ids a response grammar needs (from a `SpeechLMConfig` or `SpeechLMProcessor`)."""

    audio: int
    speech_start: int
    speech_end: int
    unit_start: int
    num_units: int

    @classmethod
    def of(cls, owner) -> SpeechTokenIds:
        return cls(owner.audio_token_id, owner.speech_start_token_id, owner.speech_end_token_id,
                   owner.speech_unit_start_id, owner.num_speech_units)


@dataclass(frozen=True)
class _RowState:
    in_span: torch.Tensor  # B: inside an open speech span
    span_units: torch.Tensor  # B: units generated in the open span
    span_closed: torch.Tensor  # B: a span has ended
    span_opened: torch.Tensor  # B: a span has started
    text_tokens: torch.Tensor  # B: generated tokens that are not speech tokens


def _row_state(input_ids: torch.Tensor, prompt_length: int, ids: SpeechTokenIds) -> _RowState:
    generated = input_ids[:, prompt_length:]  # B, G
    positions = torch.arange(generated.shape[1], device=generated.device)
    is_start, is_end = generated == ids.speech_start, generated == ids.speech_end
    is_unit = (generated >= ids.unit_start) & (generated < ids.unit_start + ids.num_units)
    none = torch.full((generated.shape[0], 1), -1, device=generated.device)
    last_start = torch.cat([none, torch.where(is_start, positions, -1)], dim=1).amax(1)
    last_end = torch.cat([none, torch.where(is_end, positions, -1)], dim=1).amax(1)
    in_span = last_start > last_end
    span_units = (is_unit & (positions > last_start[:, None])).sum(1) * in_span
    return _RowState(in_span, span_units, is_end.any(1), is_start.any(1),
                     (~(is_unit | is_start | is_end)).sum(1))


def _unit_tokens(ids: SpeechTokenIds, scores: torch.Tensor) -> torch.Tensor:
    """``V`` True at the speech-unit token ids of ``scores``' vocabulary."""
    vocab = torch.arange(scores.shape[1], device=scores.device)
    return (vocab >= ids.unit_start) & (vocab < ids.unit_start + ids.num_units)


def _force(scores: torch.Tensor, rows: torch.Tensor, token: int) -> None:
    """Make ``token`` the only choice in ``rows`` (its score finite even if a warper had dropped it)."""
    if rows.any():
        scores[rows] = -torch.inf
        scores[rows, token] = 0.0


def _restrict(scores: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> None:
    """Keep only ``allowed`` tokens in ``rows``. Custom processors run after generate's own warpers, so a
    top-k/top-p may already have dropped every allowed token; those rows choose uniformly among them."""
    if not rows.any():
        return
    kept = scores[rows].masked_fill(~allowed, -torch.inf)
    dead = torch.isinf(kept).all(1)
    kept[dead] = torch.where(allowed, 0.0, -torch.inf)
    scores[rows] = kept


class SpeechSpanLogitsProcessor(LogitsProcessor):
    """Well-formed speech: inside a span only unit tokens and ``<|speech_end|>`` (not before the first
    unit); outside, no unit tokens,
    no stray ``<|speech_end|>``, and never the input placeholder ``<|audio|>``. A span that reaches
    ``max_speech_units`` units is closed."""

    def __init__(self, ids: SpeechTokenIds, prompt_length: int, max_speech_units: int):
        if max_speech_units < 1:
            raise ValueError(f"max_speech_units={max_speech_units}: must be >= 1")
        self.ids, self.prompt_length, self.max_speech_units = ids, prompt_length, max_speech_units

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids, state = self.ids, _row_state(input_ids, self.prompt_length, self.ids)
        scores = scores.clone()
        vocab = torch.arange(scores.shape[1], device=scores.device)
        units = _unit_tokens(ids, scores)
        outside = ~state.in_span
        scores[outside[:, None] & (units | (vocab == ids.speech_end) | (vocab == ids.audio))] = -torch.inf
        _restrict(scores, state.in_span & (state.span_units > 0), units | (vocab == ids.speech_end))
        _restrict(scores, state.in_span & (state.span_units == 0), units)  # a span says something
        _force(scores, state.in_span & (state.span_units >= self.max_speech_units), ids.speech_end)
        return scores


class OutputModeLogitsProcessor(LogitsProcessor):
    """Steer a response into ``text``, ``speech`` or ``text+speech`` (text, then its speech).

    - ``text``: no speech span may start.
    - ``speech``: the response opens with ``<|speech_start|>`` and ends after its span.
    - ``text+speech``: where the model would end its text (EOS), it starts the span instead (the EOS
      probability moves to ``<|speech_start|>``); after ``max_text_tokens`` text tokens the span is
      forced. The response ends after its span.
    """

    def __init__(self, ids: SpeechTokenIds, prompt_length: int, output: str, eos_token_ids: Sequence[int],
                 max_text_tokens: int | None = None):
        if output not in OUTPUT_MODES:
            raise ValueError(f"output={output!r}: choose one of {list(OUTPUT_MODES)}")
        if not eos_token_ids:
            raise ValueError("the model has no eos_token_id; a response cannot end after its speech")
        self.ids, self.prompt_length, self.output = ids, prompt_length, output
        self.eos_token_ids = list(eos_token_ids)
        self.max_text_tokens = max_text_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids, state = self.ids, _row_state(input_ids, self.prompt_length, self.ids)
        scores = scores.clone()
        if self.output == "text":
            scores[:, ids.speech_start] = -torch.inf
            return scores
        eos = self.eos_token_ids
        before_span = ~state.span_opened
        if self.output == "speech":
            _force(scores, before_span, ids.speech_start)
        else:
            rows = before_span.nonzero().squeeze(1)
            if rows.numel():
                merged = torch.logsumexp(scores[rows][:, [ids.speech_start, *eos]], dim=1)
                scores[rows, ids.speech_start] = merged
                scores[rows[:, None], torch.tensor(eos, device=scores.device)] = -torch.inf
            if self.max_text_tokens is not None:
                _force(scores, before_span & (state.text_tokens >= self.max_text_tokens), ids.speech_start)
        _force(scores, state.span_closed & ~state.in_span, eos[0])
        return scores


class SpeechLengthLogitsProcessor(LogitsProcessor):
    """A speech span about as long as the text it speaks, whatever the LM would do: the speaking rate the
    model was trained on (``units_per_character``, fit on its training pairs) times the characters spoken
    gives the span's expected units; ``<|speech_end|>`` is barred below ``1 - tolerance`` of them and forced
    at ``ceiling`` times them (``1 + tolerance`` when not given), and in between the model chooses (a
    duration model as TTS systems use one: an LM that has to count ~200 units to stop does not,
    BENCHMARKS.md).

    The characters are ``spoken_characters`` where the caller knows the text (a TTS request), else those
    of the text the response generated before its span (chain-of-modality: the span speaks that text),
    counted with ``token_characters`` (``V``: characters of each token id). A row with neither is left to
    the model."""

    def __init__(self, ids: SpeechTokenIds, prompt_length: int, units_per_character: float,
                 token_characters: torch.Tensor, spoken_characters: torch.Tensor | None = None,
                 tolerance: float = 0.25, ceiling: float | None = None):
        if units_per_character <= 0:
            raise ValueError(f"units_per_character={units_per_character}: must be > 0")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance={tolerance}: must be in [0, 1)")
        ceiling = 1.0 + tolerance if ceiling is None else ceiling
        if not ceiling > 1.0 - tolerance:
            raise ValueError(f"ceiling={ceiling}: must be above 1 - tolerance = {1.0 - tolerance:g}")
        self.ids, self.prompt_length = ids, prompt_length
        self.units_per_character, self.tolerance, self.ceiling = units_per_character, tolerance, ceiling
        self.token_characters, self.spoken_characters = token_characters, spoken_characters

    def expected_units(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``B`` expected units of each row's span (0: no expectation)."""
        if self.spoken_characters is not None:
            characters = self.spoken_characters.to(input_ids.device, torch.float32)
            rows = input_ids.shape[0]
            if rows % len(characters):
                raise ValueError(f"spoken text for {len(characters)} rows, and the batch has {rows}")
            characters = characters.repeat_interleave(rows // len(characters))  # beams of each row
        else:
            generated = input_ids[:, self.prompt_length:]
            before_span = (generated == self.ids.speech_start).long().cumsum(1) == 0
            counts = self.token_characters.to(generated.device)[generated.clamp(max=len(self.token_characters) - 1)]
            text = generated < len(self.token_characters)  # added tokens count no characters
            characters = (counts * (before_span & text)).sum(1).float()
        return characters * self.units_per_character

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids, state = self.ids, _row_state(input_ids, self.prompt_length, self.ids)
        expected = self.expected_units(input_ids)
        known = state.in_span & (expected > 0)
        if not known.any():
            return scores
        scores = scores.clone()
        lower = torch.floor(expected * (1 - self.tolerance)).clamp(min=1)
        upper = torch.ceil(expected * self.ceiling).clamp(min=lower + 1)
        _restrict(scores, known & (state.span_units < lower), _unit_tokens(ids, scores))  # no end yet
        _force(scores, known & (state.span_units >= upper), ids.speech_end)
        return scores


class TranscriptFollowingLogitsProcessor(LogitsProcessor):
    """A transcription that keeps to the reader's transcript unless the LM prefers another token by more than
    ``bias``: each row's next transcript token gains ``bias`` (log-odds), and once the transcript is spent,
    ``eos_token_id`` does, ``bias`` more for every token written past the transcript's length and
    ``lookahead`` more. The LM may still leave the transcript (a correction it is sure of); where the tokens
    generated so far have got to in the transcript is read again at each step, a token matching one of the
    next ``lookahead`` transcript tokens skipping the ones before it. A row whose transcript is empty is left
    to the model. ``bias`` 0 is the model alone; a large one, the transcript verbatim.

    The LM alone paraphrases what it has not heard in training (a 135M backbone repeats even text only
    loosely); the reader's transcript carries what Whisper's decoder learned from 680k hours."""

    def __init__(self, transcripts: Sequence[Sequence[int]], prompt_length: int, bias: float, eos_token_id: int,
                 lookahead: int = 3):
        if bias < 0:
            raise ValueError(f"bias={bias}: must be >= 0 (0 leaves the model alone)")
        self.transcripts = [list(ids) for ids in transcripts]
        self.prompt_length, self.bias, self.eos_token_id, self.lookahead = prompt_length, bias, eos_token_id, lookahead

    def position(self, generated: Sequence[int], transcript: Sequence[int]) -> int:
        """How many of ``transcript``'s tokens ``generated`` has covered."""
        covered = 0
        for token in generated:
            ahead = transcript[covered: covered + self.lookahead + 1]
            if token in ahead:
                covered += ahead.index(token) + 1
        return covered

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        if rows % len(self.transcripts):
            raise ValueError(f"transcripts for {len(self.transcripts)} rows, and the batch has {rows}")
        beams = rows // len(self.transcripts)
        scores = scores.clone()
        for row, generated in enumerate(input_ids[:, self.prompt_length:].tolist()):
            transcript = self.transcripts[row // beams]
            if not transcript:
                continue
            covered = self.position(generated, transcript)
            if covered < len(transcript):
                scores[row, transcript[covered]] += self.bias
            # The end gains the bias once the transcript is spent, and again for each token written past the
            # transcript's length and ``lookahead`` more (room for a correction that takes more tokens): a
            # run-on (a loop, an answer) stops within a few tokens
            overrun = max(len(generated) - len(transcript) - self.lookahead, 0)
            scores[row, self.eos_token_id] += self.bias * ((covered == len(transcript)) + overrun)
        return scores
