from __future__ import annotations

import pytest
import torch

from speechlm.constraints import (
    OutputModeLogitsProcessor,
    SpeechLengthLogitsProcessor,
    SpeechSpanLogitsProcessor,
    SpeechTokenIds,
    TranscriptFollowingLogitsProcessor,
)

# A 20-token vocabulary: text 0..9, <|audio|> 10, <|speech_start|> 11, <|speech_end|> 12, units 13..16, more text.
IDS = SpeechTokenIds(audio=10, speech_start=11, speech_end=12, unit_start=13, num_units=4)
UNITS = list(range(13, 17))
EOS = 9
PROMPT = [1, 2, 3]
VOCAB = 20


def finite(scores: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in scores]


def call(processor, *generated: list[int]) -> torch.Tensor:
    width = max(map(len, generated))
    assert all(len(g) == width for g in generated)
    input_ids = torch.tensor([PROMPT + g for g in generated])
    return processor(input_ids, torch.zeros(len(generated), VOCAB))


def test_inside_a_span_only_units_and_its_end():
    span = SpeechSpanLogitsProcessor(IDS, len(PROMPT), max_speech_units=10)
    inside, opened, outside = finite(call(span, [11, 13, 14], [5, 5, 11], [5, 11, 12]))
    assert inside == [12, *UNITS] and opened == UNITS  # no empty span
    assert not set(outside) & {*UNITS, 12, 10}  # no units, no stray end, never <|audio|>
    assert 11 in outside and EOS in outside


def test_a_span_is_closed_at_max_speech_units():
    span = SpeechSpanLogitsProcessor(IDS, len(PROMPT), max_speech_units=2)
    scores = call(span, [11, 13, 14], [11, 13, 5])
    assert finite(scores)[0] == [12] and scores[0, 12] == 0
    assert finite(scores)[1] == [12, *UNITS]


def test_the_prompt_does_not_count():
    # A closed span in the prompt (discrete speech input) leaves generation outside any span.
    span = SpeechSpanLogitsProcessor(IDS, 5, max_speech_units=3)
    scores = span(torch.tensor([[11, 13, 14, 12, 4]]), torch.zeros(1, VOCAB))
    assert not set(finite(scores)[0]) & set(UNITS)


def test_allowed_tokens_survive_a_warper_that_dropped_them():
    # generate runs top-k before custom processors: if it kept only text, the span still continues.
    span = SpeechSpanLogitsProcessor(IDS, len(PROMPT), max_speech_units=10)
    scores = torch.full((1, VOCAB), -torch.inf)
    scores[0, 3] = 1.0
    out = span(torch.tensor([PROMPT + [11, 13]]), scores)
    assert finite(out) == [[12, *UNITS]]


def test_text_mode_never_starts_speech():
    mode = OutputModeLogitsProcessor(IDS, len(PROMPT), "text", [EOS])
    assert 11 not in finite(call(mode, [4]))[0]


def test_speech_mode_opens_with_a_span_and_ends_after_it():
    mode = OutputModeLogitsProcessor(IDS, len(PROMPT), "speech", [EOS])
    assert finite(mode(torch.tensor([PROMPT]), torch.zeros(1, VOCAB))) == [[11]]
    assert finite(call(mode, [11, 13, 12])) == [[EOS]]
    assert len(finite(call(mode, [11, 13]))[0]) == VOCAB  # inside: the span processor's business


def test_text_then_speech_moves_the_end_of_text_to_the_span():
    mode = OutputModeLogitsProcessor(IDS, len(PROMPT), "text+speech", [EOS], max_text_tokens=3)
    scores = torch.zeros(1, VOCAB)
    scores[0, EOS], scores[0, 11] = 2.0, 1.0
    out = mode(torch.tensor([PROMPT + [4]]), scores)
    assert out[0, EOS] == -torch.inf
    assert out[0, 11] == pytest.approx(torch.logaddexp(torch.tensor(2.0), torch.tensor(1.0)).item())
    assert finite(call(mode, [4, 5, 6])) == [[11]]  # the text budget is spent: speak now
    assert finite(call(mode, [4, 11, 13, 12])) == [[EOS]]


def test_unknown_mode_and_bad_bounds_are_named():
    with pytest.raises(ValueError, match="output='audio'"):
        OutputModeLogitsProcessor(IDS, 0, "audio", [EOS])
    with pytest.raises(ValueError, match="max_speech_units=0"):
        SpeechSpanLogitsProcessor(IDS, 0, 0)


# Text tokens 0..9 and 17..19 are 2 characters each; the added tokens none.
CHARACTERS = torch.tensor([2] * 10)


def test_a_known_text_sets_where_its_speech_may_end():
    # 4 characters at 1 unit each: the end is barred below 3 units (4 x 0.75) and forced at 5 (4 x 1.25).
    length = SpeechLengthLogitsProcessor(IDS, len(PROMPT), 1.0, CHARACTERS, torch.tensor([4]), tolerance=0.25)
    short, inside, long = (finite(call(length, [11, *[13] * n])) for n in (2, 3, 5))
    assert 12 not in short[0] and set(UNITS) <= set(short[0])
    assert len(inside[0]) == VOCAB  # between the bounds the model chooses
    assert long == [[12]]


def test_a_ceiling_ends_the_span_at_the_expected_length():
    # 8 characters at 1 unit each, ceiling 1.0: barred below 6, forced at 8 (a model that rarely ends a
    # span itself ends at the length its text implies, not at the window's top).
    length = SpeechLengthLogitsProcessor(IDS, len(PROMPT), 1.0, CHARACTERS, torch.tensor([8]), tolerance=0.25,
                                         ceiling=1.0)
    assert 12 not in finite(call(length, [11, *[13] * 5]))[0]
    assert len(finite(call(length, [11, *[13] * 7]))[0]) == VOCAB
    assert finite(call(length, [11, *[13] * 8])) == [[12]]
    with pytest.raises(ValueError, match="ceiling=0.5: must be above 1 - tolerance = 0.75"):
        SpeechLengthLogitsProcessor(IDS, 3, 1.0, CHARACTERS, tolerance=0.25, ceiling=0.5)


def test_chain_of_modality_counts_the_text_before_its_span():
    # Two text tokens (4 characters) then the span; the prompt's tokens do not count.
    length = SpeechLengthLogitsProcessor(IDS, len(PROMPT), 1.0, CHARACTERS, tolerance=0.25)
    assert float(length.expected_units(torch.tensor([PROMPT + [5, 6, 11, 13]]))[0]) == 4.0
    assert finite(call(length, [5, 6, 11, 13, 13, 13, 13, 13])) == [[12]]
    assert len(finite(call(length, [11, 13, 13]))[0]) == VOCAB  # no text before it: the model decides


def test_beams_repeat_each_rows_text_and_a_mismatch_is_named():
    length = SpeechLengthLogitsProcessor(IDS, len(PROMPT), 1.0, CHARACTERS, torch.tensor([4, 40]))
    expected = length.expected_units(torch.tensor([PROMPT] * 4))
    assert expected.tolist() == [4.0, 4.0, 40.0, 40.0]
    with pytest.raises(ValueError, match="spoken text for 2 rows, and the batch has 3"):
        length.expected_units(torch.tensor([PROMPT] * 3))
    with pytest.raises(ValueError, match="units_per_character=0"):
        SpeechLengthLogitsProcessor(IDS, 3, 0, CHARACTERS)


def test_the_next_transcript_token_gains_the_bias_then_the_end():
    follow = TranscriptFollowingLogitsProcessor([[4, 5, 6], []], len(PROMPT), bias=3.0, eos_token_id=EOS)
    scores = call(follow, [4, 5], [4, 5])
    assert scores[0].nonzero().flatten().tolist() == [6] and scores[0, 6] == 3.0
    assert not scores[1].any()  # no transcript (a silent clip): the model alone
    spent = call(follow, [4, 5, 6], [1, 2, 3])
    assert spent[0].nonzero().flatten().tolist() == [EOS]


def test_the_end_gains_more_with_each_token_past_the_transcript():
    follow = TranscriptFollowingLogitsProcessor([[4, 5]], len(PROMPT), bias=2.0, eos_token_id=EOS, lookahead=1)
    assert call(follow, [4, 5])[0, EOS] == 2.0  # spent
    assert call(follow, [4, 5, 8])[0, EOS] == 2.0  # one token of room (the lookahead): a correction
    assert call(follow, [4, 5, 8, 4])[0, EOS] == 4.0  # then a run-on: more each token
    assert call(follow, [4, 5, 8, 4, 5])[0, EOS] == 6.0
    assert call(follow, [9, 9, 9, 9])[0, EOS] == 2.0  # off the transcript and past its length: the end too


def test_following_resumes_after_a_skipped_or_an_inserted_token():
    follow = TranscriptFollowingLogitsProcessor([[4, 5, 6, 7]], len(PROMPT), bias=1.0, eos_token_id=EOS)
    assert follow.position([4, 6], [4, 5, 6, 7]) == 3  # skipped 5: on to 7
    assert follow.position([4, 8], [4, 5, 6, 7]) == 1  # inserted 8: 5 is still next
    assert call(follow, [4, 8])[0].nonzero().flatten().tolist() == [5]
    far = TranscriptFollowingLogitsProcessor([[1, 2, 3, 4, 5, 6]], 0, bias=1.0, eos_token_id=EOS, lookahead=1)
    assert far.position([1, 4], [1, 2, 3, 4, 5, 6]) == 1  # 4 is beyond the lookahead: a new word


def test_following_repeats_each_rows_transcript_for_its_beams_and_checks_its_settings():
    follow = TranscriptFollowingLogitsProcessor([[4], [5]], len(PROMPT), bias=2.0, eos_token_id=EOS)
    scores = call(follow, [], [], [], [])  # 2 rows x 2 beams
    assert [row.nonzero().flatten().tolist() for row in scores] == [[4], [4], [5], [5]]
    with pytest.raises(ValueError, match="transcripts for 2 rows, and the batch has 3"):
        call(follow, [], [], [])
    with pytest.raises(ValueError, match="bias=-1"):
        TranscriptFollowingLogitsProcessor([[4]], 0, bias=-1.0, eos_token_id=EOS)
